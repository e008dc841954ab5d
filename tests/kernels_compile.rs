//! Every kernel variant compiles with NVRTC for sm_90 (no GPU needed, only libnvrtc).
//! Skips with a printed reason when libnvrtc is absent; fails instead when
//! `FUSED_MARGIN_REQUIRE_NVRTC=1` (as CI sets it).
use fused_margin::cuda::{
    compile_ptx_uncached, entry_name, nvrtc_available, Unit, ENTRY_POINTS, F32_ENTRY_POINTS,
    HALF_ENTRY_POINTS, KERNEL_DTYPES, SM90A_HALF_ENTRY_POINTS,
};
use std::collections::BTreeSet;

/// The `.entry` names of a PTX text.
fn entries(ptx: &str) -> BTreeSet<String> {
    ptx.lines()
        .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
        .map(|l| l.split('(').next().unwrap_or(l).to_string())
        .collect()
}

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
    let ptx = compile_ptx_uncached(dtype, Unit::All, arch)
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
    let e = compile_ptx_uncached(fused_margin::DType::F64, Unit::All, "sm_90").unwrap_err();
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

/// The margin maths (double acos/sin/cos) runs once per row in fm_target_rows, not per element
/// in the tile kernels: inlined at every element a thread holds it made most of a module's code
/// and of its compile time. No tile or gradient kernel has a double-precision instruction.
#[test]
fn tile_kernels_carry_no_margin_maths() {
    if !nvrtc_or_skip() {
        return;
    }
    for dtype in [fused_margin::DType::F32, fused_margin::DType::BF16] {
        let ptx = compile_ptx_uncached(dtype, Unit::All, "sm_90")
            .unwrap()
            .to_src();
        let mut checked = 0;
        for body in ptx.split(".entry ").skip(1) {
            let name = body.split(['(', ' ', '\n']).next().unwrap_or("");
            let family = name.starts_with("fm_fwd_tiles") || name.starts_with("fm_grad_");
            if family {
                checked += 1;
                assert!(
                    !body.contains(".f64"),
                    "{name}: double-precision arithmetic in a tile kernel"
                );
            }
            if name.starts_with("fm_target_rows") {
                assert!(body.contains(".f64"), "{name}: the margin maths in double");
            }
        }
        assert!(
            checked >= 4,
            "{dtype:?}: {checked} tile kernels found in the PTX"
        );
    }
}

/// The compile units (`Unit`, kernels/all.cu's FM_UNIT): each unit's PTX holds exactly the entry
/// points `Unit::of` assigns to it, and together they hold the whole translation unit's, each
/// once; f32 and bf16 for sm_90a (every entry point of its dtype). Prints each unit's compile
/// time (BENCHMARKS.md, "First call").
#[test]
fn units_hold_exactly_their_entry_points() {
    if !nvrtc_or_skip() {
        return;
    }
    for dtype in [fused_margin::DType::F32, fused_margin::DType::BF16] {
        let all = entries(
            &compile_ptx_uncached(dtype, Unit::All, "sm_90a")
                .unwrap()
                .to_src(),
        );
        assert!(all.len() > 20, "{dtype:?}: {all:?}");
        let mut union = BTreeSet::new();
        for unit in Unit::EACH {
            let t = std::time::Instant::now();
            let ptx = compile_ptx_uncached(dtype, unit, "sm_90a")
                .unwrap_or_else(|e| panic!("{dtype:?} {unit:?}: {e}"))
                .to_src();
            let got = entries(&ptx);
            println!(
                "{dtype:?} {:>12}: {:.2} s, {} entry points, {} bytes of PTX",
                unit.name(),
                t.elapsed().as_secs_f64(),
                got.len(),
                ptx.len()
            );
            for name in &got {
                let base = name
                    .strip_suffix(&format!("_{}", dtype.suffix()))
                    .unwrap_or_else(|| panic!("{name}: no dtype suffix"));
                assert_eq!(Unit::of(base), Some(unit), "{name} compiled into {unit:?}");
                assert!(union.insert(name.clone()), "{name} in two units");
            }
        }
        assert_eq!(
            union, all,
            "{dtype:?}: the units together are the whole module"
        );
    }
    assert_eq!(
        Unit::of("fm_grad_w_tc_d512_f32out"),
        Some(Unit::GradTc32F32Out)
    );
    assert_eq!(Unit::of("fm_grad_w_f32out"), Some(Unit::GradSimt));
    assert_eq!(Unit::of("naive_nothing"), None);
    assert_eq!(Unit::of("fm_grad"), None);
}

/// The on-disk PTX cache: a second compile reads the file; a foreign, corrupt or unreadable
/// file is ignored and replaced; a directory that cannot be created costs only the cache.
#[test]
fn disk_cache_round_trip_and_failures() {
    use fused_margin::cuda::{compile_ptx_in, PtxSource};
    use fused_margin::DType;
    if !nvrtc_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("fm-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let t = std::time::Instant::now();
    let (first, how) = compile_ptx_in(Some(&dir), DType::F32, Unit::Core, "sm_80").unwrap();
    let compile_s = t.elapsed().as_secs_f64();
    assert_eq!(how, PtxSource::Compiled);
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "one cache file: {files:?}");
    let t = std::time::Instant::now();
    let (again, how) = compile_ptx_in(Some(&dir), DType::F32, Unit::Core, "sm_80").unwrap();
    println!(
        "f32 sm_80: compiled in {compile_s:.1} s, read from disk in {:.3} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(how, PtxSource::Disk);
    assert_eq!(again.to_src(), first.to_src());
    // Another dtype or arch is another file.
    let (_, how) = compile_ptx_in(Some(&dir), DType::F32, Unit::Core, "sm_90").unwrap();
    assert_eq!(how, PtxSource::Compiled);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
    // Truncated, a foreign key, a NUL: each ignored, recompiled and replaced.
    let text = std::fs::read_to_string(&files[0]).unwrap();
    let (head, _) = text.split_once('\n').unwrap();
    for bad in [
        text[..text.len() / 2].to_string(),
        text.replacen(head, "// some other key", 1),
        text.replacen(".version", ".version\0", 1),
    ] {
        std::fs::write(&files[0], bad).unwrap();
        let (p, how) = compile_ptx_in(Some(&dir), DType::F32, Unit::Core, "sm_80").unwrap();
        assert_eq!(how, PtxSource::Compiled);
        assert_eq!(p.to_src(), first.to_src());
        assert_eq!(
            std::fs::read_to_string(&files[0]).unwrap(),
            text,
            "replaced"
        );
    }
    // A cache "directory" that is a file, and one under /proc (cannot be created): no cache,
    // no error.
    for unusable in [files[0].clone(), "/proc/fused-margin-cache".into()] {
        let (p, how) = compile_ptx_in(Some(&unusable), DType::F32, Unit::Core, "sm_80").unwrap();
        assert_eq!(how, PtxSource::Compiled, "{}", unusable.display());
        assert_eq!(p.to_src(), first.to_src());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
