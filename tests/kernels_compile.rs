//! Every kernel variant compiles with NVRTC for sm_90 (no GPU needed, only libnvrtc).
//! Skips with a printed reason when libnvrtc is absent; fails instead when
//! `FUSED_MARGIN_REQUIRE_NVRTC=1` (as CI sets it).
use fused_margin::cuda::{
    compile_ptx_uncached, entry_name, nvrtc_available, ENTRY_POINTS, F32_ENTRY_POINTS,
    HALF_ENTRY_POINTS, KERNEL_DTYPES, SM90A_HALF_ENTRY_POINTS,
};

fn nvrtc_or_skip() -> bool {
    if nvrtc_available() {
        return true;
    }
    if std::env::var("FUSED_MARGIN_REQUIRE_NVRTC").as_deref() == Ok("1") {
        panic!("FUSED_MARGIN_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded (LD_LIBRARY_PATH?)");
    }
    eprintln!("skipped: libnvrtc not found (pip install nvidia-cuda-nvrtc==13.0.88 and add nvidia/cu13/lib to LD_LIBRARY_PATH)");
    false
}

/// Compiles one dtype and checks every entry point is in the PTX.
fn compiles(dtype: fused_margin::DType, arch: &str) {
    if !nvrtc_or_skip() {
        return;
    }
    let ptx = compile_ptx_uncached(dtype, arch)
        .unwrap_or_else(|e| panic!("{dtype:?} for {arch}: {e}"))
        .to_src();
    let half = if dtype == fused_margin::DType::F32 {
        &F32_ENTRY_POINTS[..]
    } else {
        &HALF_ENTRY_POINTS[..]
    };
    for base in ENTRY_POINTS.iter().chain(half) {
        let name = entry_name(base, dtype);
        assert!(
            ptx.contains(&format!(".entry {name}(")),
            "{name} missing from the {dtype:?} PTX for {arch}"
        );
    }
    // The wgmma forward exists exactly in the f16/bf16 modules for sm_90a, and uses wgmma there.
    let sm90a = arch == "sm_90a" && dtype != fused_margin::DType::F32;
    for base in SM90A_HALF_ENTRY_POINTS {
        let name = entry_name(base, dtype);
        assert_eq!(
            ptx.contains(&format!(".entry {name}(")),
            sm90a,
            "{name} in the {dtype:?} PTX for {arch}"
        );
    }
    assert_eq!(
        ptx.contains("wgmma.mma_async.sync.aligned.m64n128k16.f32"),
        sm90a,
        "wgmma in the {dtype:?} PTX for {arch}"
    );
    // Accurate maths (no silent fast-math): IEEE square root and division, never the approximations
    // that --use_fast_math substitutes.
    assert!(
        ptx.contains("sqrt.rn.f32"),
        "no IEEE sqrt in the {dtype:?} PTX"
    );
    assert!(
        !ptx.contains("sqrt.approx.f32") && !ptx.contains("sqrt.approx.ftz.f32"),
        "approximate sqrt in the {dtype:?} PTX"
    );
    assert!(
        !ptx.contains("div.approx") && !ptx.contains("div.full.f32"),
        "approximate division in the {dtype:?} PTX"
    );
}

#[test]
fn f32_kernels_compile_for_sm90() {
    compiles(fused_margin::DType::F32, "sm_90");
}

#[test]
fn f16_kernels_compile_for_sm90() {
    compiles(fused_margin::DType::F16, "sm_90");
}

#[test]
fn bf16_kernels_compile_for_sm90() {
    compiles(fused_margin::DType::BF16, "sm_90");
}

/// The architecture-specific Hopper target (the wgmma override): every kernel plus the wgmma forward.
#[test]
fn kernels_compile_for_sm90a() {
    for dt in KERNEL_DTYPES {
        compiles(dt, "sm_90a");
    }
}

#[test]
fn kernels_compile_for_sm80_too() {
    // The v1 kernels only need sm_80 features (bf16 cvt); keep Ampere working.
    for dt in KERNEL_DTYPES {
        compiles(dt, "sm_80");
    }
}

#[test]
fn f64_is_rejected_with_a_clear_error() {
    if !nvrtc_or_skip() {
        return;
    }
    let e = compile_ptx_uncached(fused_margin::DType::F64, "sm_90").unwrap_err();
    assert!(e.to_string().contains("f64"), "{e}");
}

#[test]
fn embedded_source_has_no_includes_left() {
    let src = fused_margin::cuda::source::KERNELS_CU;
    assert!(
        !src.lines().any(|l| l.trim_start().starts_with("#include")),
        "build.rs must inline every include"
    );
    for f in [
        "logits_tc.cu",
        "common.cuh",
        "tile.cuh",
        "normalize.cu",
        "logits.cu",
        "combine.cu",
        "grad.cu",
        "naive.cu",
    ] {
        assert!(
            src.contains(&format!("// ---- {f} ----")),
            "{f} not embedded"
        );
    }
}
