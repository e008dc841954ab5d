//! The GPU plans (fused and naive) against the CPU f64 reference, on the same rounded inputs, with
//! MATH.md's precision bars: every preset and option, f32 / f16 / bf16, odd shapes, outliers,
//! ignored labels, outputs poisoned with NaN before every launch.
//!
//! Without a GPU every test prints why and passes; with `FUSED_MARGIN_REQUIRE_GPU=1` (the GPU
//! machine's bundle sets it) a missing device fails instead.
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use fused_margin::cuda::{
    self, CudaElement, F32Precision, FusedMarginLoss, GpuForward, GpuForwardOut, GpuGradOut,
    GpuGradients, GpuUpstream, LabelCheck, Options, Plan,
};
use fused_margin::{
    cpu, DType, GradientMode, MarginLoss, OverflowPolicy, Reduction, Shape, Upstream,
};
use half::{bf16, f16};
use std::sync::Arc;

mod common;
use common::{bars, margin_inputs as inputs, rel};

fn gpu_or_skip() -> Option<Arc<CudaStream>> {
    let required = std::env::var("FUSED_MARGIN_REQUIRE_GPU").as_deref() == Ok("1");
    if !cuda::device_available() {
        assert!(
            !required,
            "FUSED_MARGIN_REQUIRE_GPU=1 but no CUDA device/driver was found"
        );
        eprintln!("skipped: no CUDA driver or device on this machine");
        return None;
    }
    if !cuda::nvrtc_available() {
        assert!(
            !required,
            "FUSED_MARGIN_REQUIRE_GPU=1 but libnvrtc cannot be loaded"
        );
        eprintln!("skipped: libnvrtc not found");
        return None;
    }
    Some(cuda::default_stream(0).expect("open device 0"))
}

/// A handle on `stream` with the default options changed by `set`.
fn handle(stream: &Arc<CudaStream>, set: impl FnOnce(&mut Options)) -> FusedMarginLoss {
    let mut o = Options::default();
    set(&mut o);
    FusedMarginLoss::with_options(stream.clone(), o).unwrap()
}

/// A handle with the plan `plan` and poisoning on (the tests' usual handle).
fn poisoned(stream: &Arc<CudaStream>, plan: Plan) -> FusedMarginLoss {
    handle(stream, |o| {
        o.plan = plan;
        o.poison = true;
    })
}

/// Whether `gpu` runs f32 inputs through TF32.
fn tf32_on(gpu: &FusedMarginLoss) -> bool {
    gpu.options().f32_precision == F32Precision::Tf32
}

fn to_f64<T: CudaElement>(v: &[T]) -> Vec<f64> {
    v.iter().map(|e| e.to_f64()).collect()
}

/// `v` rounded to `T` and uploaded on `s`.
fn upload<T: CudaElement>(s: &Arc<CudaStream>, v: &[f64]) -> CudaSlice<T> {
    s.clone_htod(&v.iter().map(|&e| T::from_f64(e)).collect::<Vec<T>>())
        .unwrap()
}

/// Forward, then backward with upstream 1 and gradients in the input dtype.
fn step<T: CudaElement>(
    gpu: &FusedMarginLoss,
    spec: &MarginLoss,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    l: &CudaSlice<i32>,
    shape: Shape,
) -> (GpuForward, GpuGradients<T>) {
    let (xv, wv, lv) = (x.as_view(), w.as_view(), l.as_view());
    let f = gpu.forward(spec, &xv, &wv, &lv, shape).unwrap();
    let g = gpu.backward(&f, &xv, &wv, &lv, GpuUpstream::ONE).unwrap();
    (f, g)
}

/// `step` with f32 gradients.
fn step_f32<T: CudaElement>(
    gpu: &FusedMarginLoss,
    spec: &MarginLoss,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    l: &CudaSlice<i32>,
    shape: Shape,
) -> (GpuForward, GpuGradients<f32>) {
    let (xv, wv, lv) = (x.as_view(), w.as_view(), l.as_view());
    let f = gpu.forward(spec, &xv, &wv, &lv, shape).unwrap();
    let g = gpu
        .backward_f32(&f, &xv, &wv, &lv, GpuUpstream::ONE)
        .unwrap();
    (f, g)
}

/// Runs one case through `gpu` and the CPU reference and checks every output against the bars.
fn check<T: CudaElement>(gpu: &FusedMarginLoss, spec: &MarginLoss, shape: Shape, seed: u64) {
    // TF32 keeps 10 mantissa bits: outlier-dominated cosines would carry more error than the TF32
    // bars allow for at s = 64 (README, `f32_precision`), so TF32 runs get inputs without
    // them.
    let tf32 = T::DTYPE == DType::F32 && tf32_on(gpu);
    check_with::<T>(
        gpu,
        spec,
        shape,
        common::margin_inputs_opts(shape, seed, !tf32),
    );
}

/// `check` on given inputs.
fn check_with<T: CudaElement>(
    gpu: &FusedMarginLoss,
    spec: &MarginLoss,
    shape: Shape,
    mut inp: common::Inputs,
) {
    let opts = gpu.options();
    let what = format!("{:?} {:?} {:?} {shape:?}", opts.plan, T::DTYPE, spec);
    let s = gpu.stream();
    let tf32 = T::DTYPE == DType::F32 && tf32_on(gpu);
    if !spec.normalize_weights {
        // Raw weights with outliers make logits of ~1000 when features are raw too: no f32
        // computation meets 1e-4 on such a conditioning, so keep the raw logits moderate.
        inp.w.iter_mut().for_each(|v| *v *= 0.25);
    }
    let x: Vec<T> = inp.x.iter().map(|&v| T::from_f64(v)).collect();
    let w: Vec<T> = inp.w.iter().map(|&v| T::from_f64(v)).collect();
    let up32: Vec<f32> = inp.upstream.iter().map(|&v| v as f32).collect();
    let up64: Vec<f64> = up32.iter().map(|&v| v as f64).collect();

    let reference = cpu::forward(spec, &x, &w, &inp.labels, shape).unwrap();
    assert!(
        reference.loss.is_finite(),
        "{what}: the reference itself is not finite: bad inputs"
    );
    let cpu_up = match spec.reduction {
        Reduction::None => Upstream::PerRow(&up64),
        _ => Upstream::Scalar(1.0),
    };
    let rgrad = cpu::backward(spec, &reference, &x, &w, &inp.labels, shape, cpu_up).unwrap();

    let xd = s.clone_htod(&x).unwrap();
    let wd = s.clone_htod(&w).unwrap();
    let ld = s.clone_htod(&inp.labels).unwrap();
    let ud = s.clone_htod(&up32).unwrap();
    let uv = ud.as_view();
    let gup = match spec.reduction {
        Reduction::None => GpuUpstream::PerRow(&uv),
        _ => GpuUpstream::ONE,
    };
    let fwd = gpu
        .forward(spec, &xd.as_view(), &wd.as_view(), &ld.as_view(), shape)
        .unwrap_or_else(|e| panic!("{what}: forward: {e}"));
    // The tensor-core forward runs exactly where it should: fused plan, tensor cores on, and
    // f16/bf16 with D % 8 == 0 or f32 with TF32 opted in and D % 4 == 0.
    let tc_expected = opts.plan == Plan::Fused
        && opts.tensor_cores
        && if T::DTYPE == DType::F32 {
            tf32 && shape.d % 4 == 0
        } else {
            shape.d % 8 == 0
        };
    assert_eq!(fwd.tensor_cores, tc_expected, "{what}: tensor-core path");
    let wg_expected = tc_expected && T::DTYPE != DType::F32 && gpu.device_facts().sm90a;
    assert_eq!(fwd.wgmma, wg_expected, "{what}: wgmma path");
    // The result names the kernels that ran: the tile kernel of the path asserted above.
    let tile = if fwd.wgmma {
        Some("fm_fwd_tiles_wg")
    } else if tc_expected && T::DTYPE == DType::F32 {
        Some("fm_fwd_tiles_tf32")
    } else if tc_expected {
        Some("fm_fwd_tiles_tc")
    } else if opts.plan == Plan::Fused {
        Some("fm_fwd_tiles")
    } else {
        None
    };
    if let Some(tile) = tile {
        assert!(
            fwd.kernels.iter().any(|k| k.starts_with(tile)),
            "{what}: {tile} not in {:?}",
            fwd.kernels
        );
    }
    assert!(!fwd.kernels.is_empty(), "{what}: no kernels listed");
    let (lbar, gbar) = if T::DTYPE == DType::F32 && fwd.tensor_cores {
        common::TF32_BARS
    } else {
        bars(T::DTYPE)
    };
    // MATH.md's conditioning clause, as on the emulator: within ~1 degree of the angle clamp the
    // bars apply to the spread of the reference over target cosines moved by the path's rounding
    // of a cosine; everywhere else the allowance is 0.
    let (x64, w64) = (to_f64(&x), to_f64(&w));
    let g_rows = cpu_up.per_row(spec.reduction, &inp.labels).unwrap();
    let (a_rows, a_dx, a_dw) = common::conditioning_allowance(
        spec,
        &x64,
        &w64,
        &inp.labels,
        shape,
        &g_rows,
        common::cosine_rounding(shape.d, T::DTYPE == DType::F32 && fwd.tensor_cores),
    );

    let row_loss: Vec<f64> = fwd
        .row_loss_host()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let loss = fwd.loss_host().unwrap() as f64;
    assert!(loss.is_finite(), "{what}: loss {loss}");
    assert!(
        row_loss.iter().all(|v| v.is_finite()),
        "{what}: non-finite row loss"
    );
    let e_rows = rel(&row_loss, &reference.row_loss);
    assert!(
        e_rows <= lbar + a_rows,
        "{what}: row losses rel err {e_rows:e} > {lbar:e} (allowance {a_rows:e})"
    );
    let e_loss = if reference.loss == 0.0 {
        loss.abs()
    } else {
        (loss - reference.loss).abs() / reference.loss.abs()
    };
    assert!(
        e_loss <= lbar + a_rows,
        "{what}: loss {loss} vs {} (rel {e_loss:e})",
        reference.loss
    );
    let lse: Vec<f64> = fwd.lse_host().unwrap().iter().map(|&v| v as f64).collect();
    let e_lse = rel(&lse, &reference.lse);
    assert!(e_lse <= lbar + a_rows, "{what}: lse rel err {e_lse:e}");

    // Gradients in the input dtype, then in f32.
    let g = gpu
        .backward(&fwd, &xd.as_view(), &wd.as_view(), &ld.as_view(), gup)
        .unwrap_or_else(|e| panic!("{what}: backward: {e}"));
    let tc_bwd_expected = tc_expected && T::DTYPE != DType::F32 && opts.tensor_core_backward;
    assert_eq!(
        g.tensor_cores, tc_bwd_expected,
        "{what}: tensor-core backward path"
    );
    assert_eq!(
        g.kernels.iter().any(|k| k.starts_with("fm_grad_x_tc")),
        tc_bwd_expected,
        "{what}: backward kernels {:?}",
        g.kernels
    );
    g.check()
        .unwrap_or_else(|e| panic!("{what}: gradients' label check: {e}"));
    assert_eq!(
        fwd.counted().unwrap(),
        reference.counted,
        "{what}: counted rows"
    );
    let dx = to_f64(&s.clone_dtoh(&g.dx).unwrap());
    let dw = to_f64(&s.clone_dtoh(&g.dw).unwrap());
    assert!(
        dx.iter().chain(&dw).all(|v| v.is_finite()),
        "{what}: non-finite gradient"
    );
    let (ex, ew) = (rel(&dx, &rgrad.dx), rel(&dw, &rgrad.dw));
    assert!(
        ex <= gbar + a_dx && ew <= gbar + a_dw,
        "{what}: dx rel {ex:e}, dw rel {ew:e} (bar {gbar:e}, allowances {a_dx:e}, {a_dw:e})"
    );

    let g32 = gpu
        .backward_f32(&fwd, &xd.as_view(), &wd.as_view(), &ld.as_view(), gup)
        .unwrap_or_else(|e| panic!("{what}: backward_f32: {e}"));
    let dx32: Vec<f64> = s
        .clone_dtoh(&g32.dx)
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let dw32: Vec<f64> = s
        .clone_dtoh(&g32.dw)
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let (ex, ew) = (rel(&dx32, &rgrad.dx), rel(&dw32, &rgrad.dw));
    assert!(
        ex <= gbar + a_dx && ew <= gbar + a_dw,
        "{what}: f32 grads: dx rel {ex:e}, dw rel {ew:e}"
    );
}

/// Every preset and every option that changes the maths.
fn specs() -> Vec<MarginLoss> {
    vec![
        MarginLoss::nsl(16.0),
        MarginLoss::cosface(0.35),
        MarginLoss::cosface(0.4)
            .scale(30.0)
            .policy(OverflowPolicy::Easy),
        MarginLoss::arcface(0.5),
        MarginLoss::arcface(0.5).policy(OverflowPolicy::Monotonic),
        MarginLoss::arcface(0.5).policy(OverflowPolicy::Raw),
        MarginLoss::arcface(0.5).policy(OverflowPolicy::Easy),
        MarginLoss::arcface(0.5).gradient(GradientMode::Detached),
        MarginLoss::arcface(0.5)
            .reduction(Reduction::Sum)
            .scale(16.0),
        MarginLoss::arcface(0.5)
            .reduction(Reduction::None)
            .scale(16.0),
        MarginLoss::arcface(0.5).normalize_weights(false).scale(8.0),
        MarginLoss::combined(1.0, 0.3, 0.2),
        MarginLoss::sphereface(4.0),
        MarginLoss::sphereface(4.0).lambda(5.0),
        MarginLoss::sphereface(4.0).gradient(GradientMode::Detached),
        MarginLoss::sphereface(1.7)
            .normalize_features(true)
            .scale(30.0),
        MarginLoss::nsl(1.0)
            .normalize_features(false)
            .normalize_weights(false),
    ]
}

fn run_all<T: CudaElement>(plan: Plan) {
    run_all_opts::<T>(plan, |_| {});
}

/// Every spec and shape on a handle for `plan` with poisoning on and the options `set` changes.
fn run_all_opts<T: CudaElement>(plan: Plan, set: impl FnOnce(&mut Options)) {
    let Some(stream) = gpu_or_skip() else { return };
    let gpu = handle(&stream, |o| {
        o.plan = plan;
        o.poison = true;
        set(o);
    });
    if plan == Plan::Naive {
        eprintln!(
            "naive plan matrix products on cuBLAS: {}",
            gpu.device_facts().cublas
        );
    }
    // D not a multiple of 8 and C not a multiple of the 32-class tile; the second shape spans
    // several class splits and two 128-wide gradient column chunks; the third has D % 8 == 0
    // (the tensor-core forward for f16/bf16) with a partial last k step (136 = 4*32 + 8), a
    // partial last 128-class tile and a partial last 64-row tile; the fourth has D > 256 (the
    // tensor-core backward's 32 x 512 tiles, fm_grad_*_tc_d512, with a partial column chunk) and
    // B = 33 (one row past a 32-row tile).
    let shapes = [
        Shape::new(37, 77, 301),
        Shape::new(70, 130, 2051),
        Shape::new(45, 136, 1000),
        Shape::new(33, 264, 700),
    ];
    for (n, spec) in specs().iter().enumerate() {
        for (m, &shape) in shapes.iter().enumerate() {
            check::<T>(&gpu, spec, shape, 1000 + 10 * n as u64 + m as u64);
        }
    }
}

#[test]
fn fused_f32() {
    run_all::<f32>(Plan::Fused);
}
#[test]
fn fused_f16() {
    run_all::<f16>(Plan::Fused);
}
#[test]
fn fused_bf16() {
    run_all::<bf16>(Plan::Fused);
}
#[test]
fn naive_f32() {
    run_all::<f32>(Plan::Naive);
}
#[test]
fn naive_f16() {
    run_all::<f16>(Plan::Naive);
}
#[test]
fn naive_bf16() {
    run_all::<bf16>(Plan::Naive);
}
#[test]
fn fused_simt_bf16() {
    // The SIMT forward for half inputs too (tensor cores off), on the same cases.
    run_all_opts::<bf16>(Plan::Fused, |o| o.tensor_cores = false);
}
#[test]
fn fused_simt_backward_f16() {
    // The SIMT backward after the tensor-core forward (the tensor-core backward is the default,
    // where D % 8 == 0), on the same cases.
    run_all_opts::<f16>(Plan::Fused, |o| o.tensor_core_backward = false);
}
#[test]
fn fused_simt_backward_bf16() {
    run_all_opts::<bf16>(Plan::Fused, |o| o.tensor_core_backward = false);
}
#[test]
fn fused_tf32_f32() {
    // f32 through the TF32 forward (opt-in), with MATH.md's TF32 bars.
    run_all_opts::<f32>(Plan::Fused, |o| o.f32_precision = F32Precision::Tf32);
}
#[test]
fn fused_wide_tiles_bf16_and_tf32() {
    // The wide (128 x 256) tensor-core forward tiles, 16-bit and TF32.
    run_all_opts::<bf16>(Plan::Fused, |o| o.kernel_override.wide_forward_tiles = true);
    run_all_opts::<f32>(Plan::Fused, |o| {
        o.kernel_override.wide_forward_tiles = true;
        o.f32_precision = F32Precision::Tf32;
    });
}
/// The wgmma forward (sm_90a; on other GPUs the handle falls back to mma.sync, which the
/// assertion on `fwd.wgmma` in `check_with` verifies), then with the tensor-core backward after it.
#[test]
fn fused_wgmma_bf16_f16() {
    let o = |tc_backward| {
        move |o: &mut Options| {
            o.kernel_override.wgmma = true;
            o.tensor_core_backward = tc_backward;
        }
    };
    run_all_opts::<bf16>(Plan::Fused, o(false));
    run_all_opts::<f16>(Plan::Fused, o(true));
}

/// The tensor-core backward at widths where its resident tiles take most of the device's shared
/// memory: D = 512 and 520 (two partner buffers on an H100/H200: 172 and 183 KB), D = 1,024
/// (one buffer, two D chunks), against the reference, after asserting that the backward runs on
/// tensor cores there.
#[test]
fn tc_backward_wide_d_and_one_buffer() {
    let Some(stream) = gpu_or_skip() else { return };
    let gpu = poisoned(&stream, Plan::Fused);
    let spec = MarginLoss::arcface(0.5);
    for (k, shape) in [
        Shape::new(96, 512, 700),
        Shape::new(70, 520, 300),
        Shape::new(33, 1024, 200),
    ]
    .into_iter()
    .enumerate()
    {
        let inp = inputs(shape, 920 + k as u64);
        let x = upload::<bf16>(&stream, &inp.x);
        let w = upload::<bf16>(&stream, &inp.w);
        let l = stream.clone_htod(&inp.labels).unwrap();
        let (_, g) = step_f32(&gpu, &spec, &x, &w, &l, shape);
        assert!(g.tensor_cores, "{shape:?}: tensor-core backward");
        check::<bf16>(&gpu, &spec, shape, 900 + k as u64);
        check::<f16>(&gpu, &spec, shape, 910 + k as u64);
    }
}

/// `LabelCheck::Host` (the other suites run the default, `LabelCheck::Device`): labels checked
/// and counted on the host give the same results (fused plan on tensor cores and SIMT, naive
/// plan), every spec.
#[test]
fn host_label_check_bf16_f32_and_naive() {
    let o = |o: &mut Options| o.label_check = LabelCheck::Host;
    run_all_opts::<bf16>(Plan::Fused, o);
    run_all_opts::<f32>(Plan::Fused, o);
    run_all_opts::<f16>(Plan::Naive, o);
}

/// `LabelCheck::Device` with bad labels: the calls succeed, reading a result returns the typed
/// error (the same LabelOutOfRange the host check gives), the loss and gradients are NaN, labels
/// that are not the forward's are a ForwardMismatch from `GpuGradients::check`, and mixing
/// label-check modes between forward and backward is a ForwardMismatch before any launch.
#[test]
fn device_label_check_reports_errors_when_read() {
    let Some(stream) = gpu_or_skip() else { return };
    for plan in [Plan::Fused, Plan::Naive] {
        let gpu = handle(&stream, |o| {
            o.plan = plan;
            o.label_check = LabelCheck::Device;
        });
        let shape = Shape::new(4, 8, 10);
        let xs: Vec<f32> = (0..32).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect();
        let ws: Vec<f32> = (0..80).map(|i| ((i * 5 % 13) as f32 - 6.0) / 6.0).collect();
        let x = stream.clone_htod(&xs).unwrap();
        let w = stream.clone_htod(&ws).unwrap();
        let l = stream.clone_htod(&[1i32, 2, 3, 4]).unwrap();
        let bad_l = stream.clone_htod(&[1i32, -1, 10, 12]).unwrap();
        let permuted_l = stream.clone_htod(&[2i32, 1, 3, 4]).unwrap();
        let spec = MarginLoss::arcface(0.5);
        let (xv, wv) = (x.as_view(), w.as_view());

        let f = gpu
            .forward(&spec, &xv, &wv, &bad_l.as_view(), shape)
            .unwrap();
        for e in [f.check().unwrap_err(), f.loss_host().unwrap_err()] {
            assert!(
                matches!(
                    e,
                    fused_margin::Error::LabelOutOfRange {
                        row: 2,
                        label: 10,
                        classes: 10
                    }
                ),
                "{plan:?}: {e}"
            );
        }
        let raw_loss = stream.clone_dtoh(&f.loss).unwrap()[0];
        assert!(
            raw_loss.is_nan(),
            "{plan:?}: loss {raw_loss} with a bad label"
        );
        let g = gpu
            .backward(&f, &xv, &wv, &bad_l.as_view(), GpuUpstream::ONE)
            .unwrap();
        assert!(matches!(
            g.check(),
            Err(fused_margin::Error::LabelOutOfRange { row: 2, .. })
        ));
        let dw = stream.clone_dtoh(&g.dw).unwrap();
        assert!(dw.iter().all(|v| v.is_nan()), "{plan:?}: dw not poisoned");

        let f = gpu.forward(&spec, &xv, &wv, &l.as_view(), shape).unwrap();
        assert_eq!(f.counted().unwrap(), 4);
        assert!(f.loss_host().unwrap().is_finite());
        let g = gpu
            .backward(&f, &xv, &wv, &permuted_l.as_view(), GpuUpstream::ONE)
            .unwrap();
        assert!(
            matches!(g.check(), Err(fused_margin::Error::ForwardMismatch { .. })),
            "{plan:?}: permuted labels"
        );
        let dx = stream.clone_dtoh(&g.dx).unwrap();
        assert!(dx.iter().all(|v| v.is_nan()), "{plan:?}: dx not poisoned");
        let g = gpu
            .backward(&f, &xv, &wv, &l.as_view(), GpuUpstream::ONE)
            .unwrap();
        g.check().unwrap();

        let host = handle(&stream, |o| o.plan = plan);
        let e = host
            .backward(&f, &xv, &wv, &l.as_view(), GpuUpstream::ONE)
            .unwrap_err();
        assert!(
            matches!(e, fused_margin::Error::ForwardMismatch { .. }),
            "{e}"
        );
    }
}

#[test]
fn naive_plain_kernels_f32() {
    // The naive plan's own matrix-product kernels (used where libcublas is missing).
    run_all_opts::<f32>(Plan::Naive, |o| o.cublas = false);
}

#[test]
fn tiny_shapes_and_all_ignored() {
    let Some(stream) = gpu_or_skip() else { return };
    for plan in [Plan::Fused, Plan::Naive] {
        let gpu = poisoned(&stream, plan);
        for shape in [
            Shape::new(1, 3, 2),
            Shape::new(1, 1, 1),
            Shape::new(2, 5, 1),
            Shape::new(3, 200, 33),
        ] {
            check::<f32>(&gpu, &MarginLoss::arcface(0.5), shape, 7);
            check::<bf16>(&gpu, &MarginLoss::sphereface(4.0), shape, 8);
        }
        // Every row ignored: loss 0 and zero gradients (MATH.md step 6).
        let s = gpu.stream();
        let shape = Shape::new(9, 6, 16);
        let x = s.clone_htod(&vec![0.3f32; 54]).unwrap();
        let w = s
            .clone_htod(&(0..96).map(|i| i as f32 * 0.01).collect::<Vec<_>>())
            .unwrap();
        let l = s.clone_htod(&[-1i32; 9]).unwrap();
        let (f, g) = step(&gpu, &MarginLoss::arcface(0.5), &x, &w, &l, shape);
        assert_eq!(f.loss_host().unwrap(), 0.0);
        assert!(s.clone_dtoh(&g.dx).unwrap().iter().all(|&v| v == 0.0));
        assert!(s.clone_dtoh(&g.dw).unwrap().iter().all(|&v| v == 0.0));
    }
}

#[test]
fn extreme_logits_stay_finite() {
    let Some(stream) = gpu_or_skip() else { return };
    let gpu = poisoned(&stream, Plan::Fused);
    for s in [64.0, 1000.0] {
        check::<f32>(
            &gpu,
            &MarginLoss::arcface(0.5).scale(s),
            Shape::new(19, 33, 513),
            11,
        );
    }
}

#[test]
fn fused_memory_is_not_b_by_c() {
    let Some(stream) = gpu_or_skip() else { return };
    let shape = Shape::new(64, 40, 100_003);
    let inp = inputs(shape, 5);
    let spec = MarginLoss::arcface(0.5);
    let s = stream.clone();
    let x = s
        .clone_htod(&inp.x.iter().map(|&v| v as f32).collect::<Vec<_>>())
        .unwrap();
    let w = s
        .clone_htod(&inp.w.iter().map(|&v| v as f32).collect::<Vec<_>>())
        .unwrap();
    let l = s.clone_htod(&inp.labels).unwrap();
    let bc_bytes = 4 * shape.b * shape.c;
    for plan in [Plan::Fused, Plan::Naive] {
        let gpu = handle(&stream, |o| o.plan = plan);
        let (f, g) = step(&gpu, &spec, &x, &w, &l, shape);
        eprintln!(
            "{plan:?}: forward workspace {} B, backward workspace {} B, one B x C f32 buffer {bc_bytes} B",
            f.workspace_bytes, g.workspace_bytes
        );
        match plan {
            Plan::Fused => {
                // O(B + C + B x splits + B x D x splits): far below one B x C buffer.
                assert!(
                    f.workspace_bytes * 16 < bc_bytes,
                    "fused forward {}",
                    f.workspace_bytes
                );
                assert!(
                    g.workspace_bytes * 16 < bc_bytes,
                    "fused backward {}",
                    g.workspace_bytes
                );
            }
            Plan::Naive => assert!(f.workspace_bytes >= 5 * bc_bytes),
        }
    }
}

#[test]
fn fused_is_deterministic() {
    deterministic(false);
}
#[test]
fn fused_tc_backward_is_deterministic() {
    deterministic(true);
}

fn deterministic(tc_backward: bool) {
    let Some(stream) = gpu_or_skip() else { return };
    let gpu = handle(&stream, |o| o.tensor_core_backward = tc_backward);
    let shape = Shape::new(150, 96, 7001);
    let inp = inputs(shape, 9);
    let x = upload::<bf16>(&stream, &inp.x);
    let w = upload::<bf16>(&stream, &inp.w);
    let l = stream.clone_htod(&inp.labels).unwrap();
    let spec = MarginLoss::arcface(0.5);
    let run = || {
        let (f, g) = step_f32(&gpu, &spec, &x, &w, &l, shape);
        assert_eq!(g.tensor_cores, tc_backward, "backward path");
        (
            f.loss_host().unwrap().to_bits(),
            stream
                .clone_dtoh(&g.dx)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>(),
            stream
                .clone_dtoh(&g.dw)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>(),
        )
    };
    let a = run();
    let b = run();
    assert!(a == b, "fused forward/backward differ bitwise between runs");
}

#[test]
fn misuse_is_a_typed_error() {
    let Some(stream) = gpu_or_skip() else { return };
    // The host label check, so that a bad label fails the call itself (the default reports it
    // when a result is read: `device_label_check_reports_errors_when_read`).
    let gpu = handle(&stream, |o| o.label_check = LabelCheck::Host);
    let shape = Shape::new(4, 8, 10);
    let x = stream.clone_htod(&[0.5f32; 32]).unwrap();
    let w = stream.clone_htod(&[0.25f32; 80]).unwrap();
    let bad_w = stream.clone_htod(&[0.25f32; 79]).unwrap();
    let l = stream.clone_htod(&[1i32, 2, 3, 4]).unwrap();
    let bad_l = stream.clone_htod(&[1i32, 2, 10, 4]).unwrap();
    let other_l = stream.clone_htod(&[1i32, 2, 3, 5]).unwrap();
    let permuted_l = stream.clone_htod(&[2i32, 1, 3, 4]).unwrap();
    let spec = MarginLoss::arcface(0.5);
    let e = gpu
        .forward(&spec, &x.as_view(), &bad_w.as_view(), &l.as_view(), shape)
        .unwrap_err();
    assert!(e.to_string().contains("79"), "{e}");
    let e = gpu
        .forward(&spec, &x.as_view(), &w.as_view(), &bad_l.as_view(), shape)
        .unwrap_err();
    assert!(e.to_string().contains("label 10"), "{e}");
    let e = gpu
        .forward(
            &spec.scale(f64::NAN),
            &x.as_view(),
            &w.as_view(),
            &l.as_view(),
            shape,
        )
        .unwrap_err();
    assert!(e.to_string().contains("s = NaN"), "{e}");
    // The backward takes the forward's spec: there is no other spec to disagree with.
    let f = gpu
        .forward(&spec, &x.as_view(), &w.as_view(), &l.as_view(), shape)
        .unwrap();
    assert_eq!(f.spec(), &spec);
    assert_eq!(f.shape(), shape);
    let e = gpu
        .backward(
            &f,
            &x.as_view(),
            &bad_w.as_view(),
            &l.as_view(),
            GpuUpstream::ONE,
        )
        .unwrap_err();
    assert!(e.to_string().contains("79"), "{e}");
    for labels in [&other_l, &permuted_l] {
        let e = gpu
            .backward(
                &f,
                &x.as_view(),
                &w.as_view(),
                &labels.as_view(),
                GpuUpstream::ONE,
            )
            .unwrap_err();
        assert!(
            matches!(e, fused_margin::Error::ForwardMismatch { .. }),
            "{e}"
        );
    }
    let up = stream.clone_htod(&[1.0f32; 4]).unwrap();
    let uv = up.as_view();
    let e = gpu
        .backward(
            &f,
            &x.as_view(),
            &w.as_view(),
            &l.as_view(),
            GpuUpstream::PerRow(&uv),
        )
        .unwrap_err();
    assert!(matches!(e, fused_margin::Error::Upstream { .. }), "{e}");
}

/// B*C > 2^31 (small D keeps it cheap): 64-bit offsets everywhere. Rows are independent in the
/// forward and in dx, so the first 96 rows are checked against the CPU f64 reference (the full
/// reference would take minutes); dw, which needs every row, is checked fused against naive: two
/// independent implementations, the naive one indexing its B x C buffers past 2^31.
#[test]
fn huge_b_times_c() {
    let Some(stream) = gpu_or_skip() else { return };
    let shape = Shape::new(66_000, 8, 32_771);
    assert!(shape.b * shape.c > (1usize << 31));
    let inp = inputs(shape, 3);
    let x: Vec<f32> = inp.x.iter().map(|&v| v as f32).collect();
    let w: Vec<f32> = inp.w.iter().map(|&v| v as f32).collect();
    let spec = MarginLoss::arcface(0.5).scale(30.0);
    let counted = inp.labels.iter().filter(|&&l| l >= 0).count();

    let sub = Shape::new(96, shape.d, shape.c);
    let sub_spec = spec.reduction(Reduction::Sum);
    let (xs, ls) = (&x[..sub.b * sub.d], &inp.labels[..sub.b]);
    let reference = cpu::forward(&sub_spec, xs, &w, ls, sub).unwrap();
    let up = Upstream::Scalar(1.0 / counted as f64);
    let rgrad = cpu::backward(&sub_spec, &reference, xs, &w, ls, sub, up).unwrap();

    let xd = stream.clone_htod(&x).unwrap();
    let wd = stream.clone_htod(&w).unwrap();
    let ld = stream.clone_htod(&inp.labels).unwrap();
    let (free, _) = stream.context().mem_get_info().unwrap();
    let mut plans = vec![Plan::Fused];
    // The naive plan materializes five B x C f32 buffers (~43 GB here).
    if free > 60 << 30 {
        plans.push(Plan::Naive);
    } else {
        eprintln!("naive plan skipped for the huge case: only {free} bytes free");
    }
    let mut dws = Vec::new();
    for plan in plans {
        let gpu = handle(&stream, |o| o.plan = plan);
        let (f, g) = step(&gpu, &spec, &xd, &wd, &ld, shape);
        let loss = f.loss_host().unwrap() as f64;
        assert!(loss.is_finite() && loss > 0.0, "{plan:?}: loss {loss}");
        let rows: Vec<f64> = f.row_loss_host().unwrap()[..sub.b]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let e = rel(&rows, &reference.row_loss);
        assert!(e < 1e-5, "{plan:?}: row losses rel {e:e}");
        let dx: Vec<f64> = stream.clone_dtoh(&g.dx).unwrap()[..sub.b * sub.d]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let ex = rel(&dx, &rgrad.dx);
        assert!(ex < 1e-4, "{plan:?}: dx rel {ex:e}");
        let dw: Vec<f64> = stream
            .clone_dtoh(&g.dw)
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
        assert!(
            dw.iter().all(|v| v.is_finite()) && dw.iter().any(|&v| v != 0.0),
            "{plan:?}: dw"
        );
        dws.push(dw);
    }
    if dws.len() == 2 {
        let e = rel(&dws[0], &dws[1]);
        assert!(e < 1e-4, "fused vs naive dw rel {e:e}");
    }
}

/// The non-finite policy (docs/MATH.md, "Non-finite input") on the GPU: fused (SIMT and
/// tensor-core paths) and naive, f32 and bf16 (tests/common: `non_finite_policy`).
#[test]
fn non_finite_inputs_propagate() {
    let Some(stream) = gpu_or_skip() else { return };
    fn on<T: CudaElement>(gpu: &FusedMarginLoss, label: &str, spec: MarginLoss, seed: u64) {
        let s = gpu.stream().clone();
        common::non_finite_policy::<T>(
            spec,
            seed,
            bars(T::DTYPE),
            label,
            &mut |shape, x, w, labels, up| {
                let xd = s.clone_htod(x).unwrap();
                let wd = s.clone_htod(w).unwrap();
                let ld = s.clone_htod(labels).unwrap();
                let ud = s.clone_htod(up).unwrap();
                let uv = ud.as_view();
                let spec = spec.reduction(Reduction::None);
                let f = gpu
                    .forward(&spec, &xd.as_view(), &wd.as_view(), &ld.as_view(), shape)
                    .unwrap();
                let g = gpu
                    .backward_f32(
                        &f,
                        &xd.as_view(),
                        &wd.as_view(),
                        &ld.as_view(),
                        GpuUpstream::PerRow(&uv),
                    )
                    .unwrap();
                let v = |d: &cudarc::driver::CudaSlice<f32>| -> Vec<f64> {
                    s.clone_dtoh(d).unwrap().iter().map(|&e| e as f64).collect()
                };
                let rl: Vec<f64> = f
                    .row_loss_host()
                    .unwrap()
                    .iter()
                    .map(|&e| e as f64)
                    .collect();
                (rl, v(&g.dx), v(&g.dw))
            },
        );
    }
    let handles = [
        ("gpu fused", FusedMarginLoss::new(stream.clone()).unwrap()),
        (
            "gpu fused, tensor-core backward",
            handle(&stream, |o| o.tensor_core_backward = true),
        ),
        ("gpu naive", handle(&stream, |o| o.plan = Plan::Naive)),
    ];
    for (k, spec) in [
        MarginLoss::arcface(0.5),
        MarginLoss::sphereface(4.0).lambda(5.0),
    ]
    .into_iter()
    .enumerate()
    {
        for (label, gpu) in &handles {
            on::<f32>(gpu, label, spec, 700 + k as u64);
            on::<bf16>(gpu, label, spec, 710 + k as u64);
        }
    }
}

/// Zero feature and class rows (MATH.md's eps path) through every GPU path, against the reference
/// with the bars.
#[test]
fn zero_norm_rows() {
    let Some(stream) = gpu_or_skip() else { return };
    let tc_backward = |o: &mut Options| o.tensor_core_backward = true;
    let handles = [
        poisoned(&stream, Plan::Fused),
        handle(&stream, |o| {
            o.poison = true;
            tc_backward(o);
        }),
        poisoned(&stream, Plan::Naive),
    ];
    let shape = Shape::new(40, 16, 70);
    for (k, spec) in common::zero_row_specs().into_iter().enumerate() {
        for gpu in &handles {
            check_with::<f32>(
                gpu,
                &spec,
                shape,
                common::zero_row_inputs(shape, 60 + k as u64),
            );
            check_with::<bf16>(
                gpu,
                &spec,
                shape,
                common::zero_row_inputs(shape, 70 + k as u64),
            );
        }
    }
}

/// Inputs at the eps rule's edge on the GPU: rows below eps (`dv = dvh / eps`) through every
/// path; through the tensor-core backward (both tile shapes), a zero class no row targets (its dw
/// made of probabilities below f16's range) and targets near the angle clamp (the target entry
/// kept out of the 16-bit product). The same cases pass on the emulator (tests/emulated_kernels.rs).
#[test]
fn eps_rule_tiny_probabilities_and_targets_near_the_clamp() {
    let Some(stream) = gpu_or_skip() else { return };
    let handles = [
        poisoned(&stream, Plan::Fused),
        poisoned(&stream, Plan::Naive),
        handle(&stream, |o| {
            o.poison = true;
            o.tensor_core_backward = true;
        }),
    ];
    let tc = &handles[2];
    let shape = Shape::new(40, 16, 70);
    for (k, spec) in common::zero_row_specs().into_iter().enumerate() {
        for gpu in &handles {
            let inp = || common::tiny_row_inputs(shape, 80 + k as u64);
            check_with::<f32>(gpu, &spec, shape, inp());
            check_with::<bf16>(gpu, &spec, shape, inp());
            check_with::<f16>(gpu, &spec, shape, inp());
        }
    }
    let shapes = [(40, 16, 70), (40, 136, 300), (40, 264, 150), (33, 296, 97)];
    for (k, spec) in common::zero_row_specs().into_iter().enumerate() {
        for (n, &(b, d, c)) in shapes.iter().enumerate() {
            let shape = Shape::new(b, d, c);
            let seed = 1_600 + 10 * k as u64 + n as u64;
            let inp = || common::untargeted_zero_class_inputs(shape, seed);
            check_with::<f16>(tc, &spec, shape, inp());
            check_with::<bf16>(tc, &spec, shape, inp());
        }
    }
    let clamp_specs = [
        MarginLoss::arcface(0.5).policy(OverflowPolicy::Raw),
        MarginLoss::arcface(0.5).policy(OverflowPolicy::Monotonic),
        MarginLoss::combined(2.0, 0.3, 0.0),
    ];
    for (k, spec) in clamp_specs.iter().enumerate() {
        for (n, &(b, d, c)) in [(40, 136, 150), (40, 264, 150), (33, 296, 97)]
            .iter()
            .enumerate()
        {
            let shape = Shape::new(b, d, c);
            let seed = 1_700 + 10 * k as u64 + n as u64;
            let inp = || common::near_clamp_inputs(shape, seed);
            check_with::<f16>(tc, spec, shape, inp());
            check_with::<bf16>(tc, spec, shape, inp());
        }
    }
}

/// Labels at 0 and C - 1 only, at tile edges (C = 129, 257: one class past a tile), every GPU
/// path.
#[test]
fn labels_at_both_ends() {
    let Some(stream) = gpu_or_skip() else { return };
    for gpu in [
        poisoned(&stream, Plan::Fused),
        handle(&stream, |o| {
            o.poison = true;
            o.tensor_core_backward = true;
            o.kernel_override.wide_forward_tiles = true;
        }),
        poisoned(&stream, Plan::Naive),
    ] {
        for shape in [Shape::new(33, 16, 129), Shape::new(65, 40, 257)] {
            let mut inp = inputs(shape, 95);
            for (i, l) in inp.labels.iter_mut().enumerate() {
                if *l >= 0 {
                    *l = if i % 2 == 0 { 0 } else { shape.c as i32 - 1 };
                }
            }
            check_with::<bf16>(&gpu, &MarginLoss::arcface(0.5), shape, inp);
        }
    }
}

/// Margins at validate()'s limits and s = 1000: finite everywhere, loss near the
/// reference (at m1 = 16 the target's slope at the angle clamp is too steep for f32 cosines to
/// meet the normwise bars; tests/emulated_kernels.rs says the same of the emulated kernels).
#[test]
fn margins_at_their_limits() {
    let Some(stream) = gpu_or_skip() else { return };
    let shape = Shape::new(24, 16, 40);
    let inp = common::margin_inputs_opts(shape, 80, false);
    let ld = stream.clone_htod(&inp.labels).unwrap();
    for plan in [Plan::Fused, Plan::Naive] {
        let gpu = handle(&stream, |o| {
            o.plan = plan;
            o.tensor_core_backward = true;
        });
        for spec in common::limit_specs() {
            fn one<T: CudaElement>(
                gpu: &FusedMarginLoss,
                spec: &MarginLoss,
                inp: &common::Inputs,
                ld: &cudarc::driver::CudaSlice<i32>,
                shape: Shape,
            ) {
                let s = gpu.stream();
                let x: Vec<T> = inp.x.iter().map(|&v| T::from_f64(v)).collect();
                let w: Vec<T> = inp.w.iter().map(|&v| T::from_f64(v)).collect();
                let reference = cpu::forward(spec, &x, &w, &inp.labels, shape).unwrap().loss;
                let (xd, wd) = (s.clone_htod(&x).unwrap(), s.clone_htod(&w).unwrap());
                let (f, g) = step_f32(gpu, spec, &xd, &wd, ld, shape);
                let what = format!("{:?} {:?} {spec:?}", gpu.options().plan, T::DTYPE);
                let loss = f.loss_host().unwrap() as f64;
                let lse = f.lse_host().unwrap();
                assert!(
                    loss.is_finite() && lse.iter().all(|v| v.is_finite()),
                    "{what}: forward"
                );
                let (dx, dw) = (s.clone_dtoh(&g.dx).unwrap(), s.clone_dtoh(&g.dw).unwrap());
                assert!(
                    dx.iter().chain(&dw).all(|v| v.is_finite()),
                    "{what}: gradients"
                );
                assert!(
                    (loss - reference).abs() <= 0.05 * reference.abs().max(1.0),
                    "{what}: loss {loss} vs {reference}"
                );
            }
            one::<f32>(&gpu, &spec, &inp, &ld, shape);
            one::<bf16>(&gpu, &spec, &inp, &ld, shape);
        }
    }
}

/// Determinism across stream interleavings and threads: handles on two
/// streams of the device, run concurrently from several threads each (one handle shared by its
/// threads), give bit-identical losses and gradients to one handle run alone; so do inputs
/// uploaded on another stream of the same device (cudarc orders the streams with events).
#[test]
fn deterministic_across_streams_and_threads() {
    let Some(stream) = gpu_or_skip() else { return };
    let shape = Shape::new(150, 96, 7001);
    let inp = inputs(shape, 90);
    let spec = MarginLoss::arcface(0.5);
    for tc_backward in [false, true] {
        type Bits = (u32, Vec<u16>, Vec<u16>);
        let run = |gpu: &FusedMarginLoss| -> Bits {
            // Inputs uploaded on the handle's own stream, so each run reads its own buffers.
            let s = gpu.stream();
            let x = upload::<bf16>(s, &inp.x);
            let w = upload::<bf16>(s, &inp.w);
            let l = s.clone_htod(&inp.labels).unwrap();
            let (f, g) = step(gpu, &spec, &x, &w, &l, shape);
            let bits = |v: Vec<bf16>| v.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
            (
                f.loss_host().unwrap().to_bits(),
                bits(s.clone_dtoh(&g.dx).unwrap()),
                bits(s.clone_dtoh(&g.dw).unwrap()),
            )
        };
        let tc = |s: &Arc<CudaStream>| handle(s, |o| o.tensor_core_backward = tc_backward);
        let alone = run(&tc(&stream));
        let streams = [
            stream.context().new_stream().unwrap(),
            stream.context().new_stream().unwrap(),
        ];
        let handles: Vec<FusedMarginLoss> = streams.iter().map(tc).collect();
        let results: Vec<Bits> = std::thread::scope(|sc| {
            let joins: Vec<_> = (0..6)
                .map(|t| {
                    let h = &handles[t % 2];
                    sc.spawn(move || run(h))
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        });
        for (t, r) in results.iter().enumerate() {
            assert!(
                *r == alone,
                "thread {t} (stream {}), tc_backward {tc_backward}: results differ from one handle alone",
                t % 2
            );
        }
        // Inputs written on stream 0, read by a handle on stream 1 without any explicit sync.
        let s0 = &streams[0];
        let x = upload::<bf16>(s0, &inp.x);
        let w = upload::<bf16>(s0, &inp.w);
        let l = s0.clone_htod(&inp.labels).unwrap();
        let h1 = &handles[1];
        let f = h1
            .forward(&spec, &x.as_view(), &w.as_view(), &l.as_view(), shape)
            .unwrap();
        assert_eq!(
            f.loss_host().unwrap().to_bits(),
            alone.0,
            "inputs from another stream"
        );
    }
}

/// Buffers of another device are a typed error before any launch. Needs two
/// GPUs; skipped with a message on one.
#[test]
fn buffers_on_another_device_are_a_typed_error() {
    let Some(stream) = gpu_or_skip() else { return };
    let n = cudarc::driver::CudaContext::device_count().unwrap_or(1);
    if n < 2 {
        eprintln!("skipped: one GPU on this machine; another device's buffers need a second one");
        return;
    }
    let other = cuda::default_stream(1).unwrap();
    let gpu = FusedMarginLoss::new(stream.clone()).unwrap();
    let shape = Shape::new(4, 8, 10);
    let x = stream.clone_htod(&[0.5f32; 32]).unwrap();
    let w = stream.clone_htod(&[0.25f32; 80]).unwrap();
    let l_other = other.clone_htod(&[1i32, 2, 3, 4]).unwrap();
    let e = gpu
        .forward(
            &MarginLoss::arcface(0.5),
            &x.as_view(),
            &w.as_view(),
            &l_other.as_view(),
            shape,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            fused_margin::Error::InvalidArgument { what: "labels", .. }
        ),
        "{e}"
    );
}

/// The device self-check on real hardware: the default bf16 path (tensor-core forward) and the
/// opt-in tensor-core backward each pass it once per (dtype, D) and are then used; the SIMT-only
/// handle runs none; switched off, none runs.
#[test]
fn self_check_passes_on_this_device() {
    let Some(stream) = gpu_or_skip() else {
        return;
    };
    let shape = Shape::new(64, 128, 1000);
    let inp = common::margin_inputs(shape, 4_242);
    let x: Vec<half::bf16> = inp.x.iter().map(|&v| half::bf16::from_f64(v)).collect();
    let w: Vec<half::bf16> = inp.w.iter().map(|&v| half::bf16::from_f64(v)).collect();
    let (xd, wd) = (
        stream.clone_htod(&x).unwrap(),
        stream.clone_htod(&w).unwrap(),
    );
    let ld = stream.clone_htod(&inp.labels).unwrap();
    let spec = MarginLoss::arcface(0.5);
    for (tc_bwd, self_check) in [(false, true), (true, true), (true, false)] {
        let gpu = handle(&stream, |o| {
            o.tensor_core_backward = tc_bwd;
            o.self_check = self_check;
        });
        for _ in 0..2 {
            let fwd = gpu
                .forward(&spec, &xd.as_view(), &wd.as_view(), &ld.as_view(), shape)
                .unwrap();
            let g = gpu
                .backward(
                    &fwd,
                    &xd.as_view(),
                    &wd.as_view(),
                    &ld.as_view(),
                    GpuUpstream::ONE,
                )
                .unwrap();
            assert!(
                fwd.tensor_cores && g.tensor_cores == tc_bwd,
                "the fast path is used"
            );
        }
        let reports = gpu.self_checks();
        if !self_check {
            assert!(reports.is_empty());
            continue;
        }
        assert_eq!(reports.len(), 1, "one check per path: {reports:?}");
        assert_eq!(
            reports[0].outcome,
            cuda::SelfCheckOutcome::Passed,
            "{reports:?}"
        );
        assert_eq!((reports[0].dtype, reports[0].d), (DType::BF16, 128));
    }
    let simt = handle(&stream, |o| o.tensor_cores = false);
    simt.forward(&spec, &xd.as_view(), &wd.as_view(), &ld.as_view(), shape)
        .unwrap();
    assert!(simt.self_checks().is_empty(), "nothing fast to check");
}

/// Exact bit patterns of device values (through f64, exact for f32, f16 and bf16), so that NaN
/// compares equal to the same NaN.
fn bits_of<T: CudaElement, S: DevicePtr<T>>(s: &Arc<CudaStream>, v: &S) -> Vec<u64> {
    s.clone_dtoh(v)
        .unwrap()
        .iter()
        .map(|e| e.to_f64().to_bits())
        .collect()
}

/// The `_into` calls against the allocating ones on one handle, bit for bit: forward into both
/// views, forward into the loss view only (the row losses then stay with the saved state),
/// backward and f32 backward into dx and dw as two views of one buffer, dw starting one element
/// past dx (so only element alignment holds).
fn into_same<T: CudaElement>(gpu: &FusedMarginLoss, spec: &MarginLoss, shape: Shape, seed: u64) {
    let s = gpu.stream();
    let what = format!("{:?} {:?} {spec:?} {shape:?}", gpu.options().plan, T::DTYPE);
    let inp = common::margin_inputs(shape, seed);
    let (x, w) = (upload::<T>(s, &inp.x), upload::<T>(s, &inp.w));
    let l = s.clone_htod(&inp.labels).unwrap();
    let g = upload::<f32>(s, &inp.upstream);
    let (xv, wv, lv, gv) = (x.as_view(), w.as_view(), l.as_view(), g.as_view());
    let up = match spec.reduction {
        Reduction::None => GpuUpstream::PerRow(&gv),
        Reduction::Mean | Reduction::Sum => GpuUpstream::Scalar(0.75),
    };
    let (b, d, c) = (shape.b, shape.d, shape.c);

    let f = gpu.forward(spec, &xv, &wv, &lv, shape).unwrap();
    let mut loss = s.alloc_zeros::<f32>(1).unwrap();
    let mut rows = s.alloc_zeros::<f32>(b).unwrap();
    let saved = gpu
        .forward_into(
            spec,
            &xv,
            &wv,
            &lv,
            shape,
            GpuForwardOut {
                loss: Some(loss.as_view_mut()),
                row_loss: Some(rows.as_view_mut()),
            },
        )
        .unwrap();
    assert_eq!(bits_of(s, &loss), bits_of(s, &f.loss), "{what}: loss");
    assert_eq!(
        bits_of(s, &rows),
        bits_of(s, &f.row_loss),
        "{what}: row losses"
    );
    assert_eq!(bits_of(s, &saved.lse), bits_of(s, &f.lse), "{what}: lse");
    assert_eq!(saved.kernels, f.kernels, "{what}: kernels");
    assert!(
        matches!(
            saved.loss_host(),
            Err(fused_margin::Error::Unsupported { .. })
        ),
        "{what}: the loss is the caller's"
    );
    // Only the loss given: the row losses are kept by the saved state.
    let mut loss2 = s.alloc_zeros::<f32>(1).unwrap();
    let part = gpu
        .forward_into(
            spec,
            &xv,
            &wv,
            &lv,
            shape,
            GpuForwardOut {
                loss: Some(loss2.as_view_mut()),
                row_loss: None,
            },
        )
        .unwrap();
    assert_eq!(bits_of(s, &loss2), bits_of(s, &f.loss), "{what}: loss only");
    let kept: Vec<u32> = part
        .row_loss_host()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let want: Vec<u32> = f
        .row_loss_host()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(kept, want, "{what}: kept row losses");

    let gr = gpu.backward(&f, &xv, &wv, &lv, up).unwrap();
    let mut both = s.alloc_zeros::<T>(b * d + 1 + c * d).unwrap();
    let (mut head, dw) = both.split_at_mut(b * d + 1);
    let run = gpu
        .backward_into(
            &saved,
            &xv,
            &wv,
            &lv,
            up,
            GpuGradOut {
                dx: head.slice_mut(..b * d),
                dw,
            },
        )
        .unwrap();
    run.check().unwrap();
    assert_eq!(run.kernels, gr.kernels, "{what}: backward kernels");
    assert_eq!(
        bits_of(s, &both.slice(..b * d)),
        bits_of(s, &gr.dx),
        "{what}: dx"
    );
    assert_eq!(
        bits_of(s, &both.slice(b * d + 1..)),
        bits_of(s, &gr.dw),
        "{what}: dw"
    );
    assert_eq!(
        bits_of(s, &both.slice(b * d..b * d + 1)),
        vec![0f64.to_bits()],
        "{what}: the element between dx and dw is untouched"
    );

    let g32 = gpu.backward_f32(&f, &xv, &wv, &lv, up).unwrap();
    let mut dx32 = s.alloc_zeros::<f32>(b * d).unwrap();
    let mut dw32 = s.alloc_zeros::<f32>(c * d).unwrap();
    gpu.backward_f32_into(
        &saved,
        &xv,
        &wv,
        &lv,
        up,
        GpuGradOut {
            dx: dx32.as_view_mut(),
            dw: dw32.as_view_mut(),
        },
    )
    .unwrap();
    assert_eq!(bits_of(s, &dx32), bits_of(s, &g32.dx), "{what}: f32 dx");
    assert_eq!(bits_of(s, &dw32), bits_of(s, &g32.dw), "{what}: f32 dw");
}

#[test]
fn into_results_equal_the_allocating_calls_bit_for_bit() {
    let Some(stream) = gpu_or_skip() else { return };
    let shape = Shape::new(37, 64, 301);
    let specs = [
        MarginLoss::arcface(0.5),
        MarginLoss::cosface(0.35).reduction(Reduction::Sum),
        MarginLoss::arcface(0.5).reduction(Reduction::None),
    ];
    for plan in [Plan::Fused, Plan::Naive] {
        // Poisoned: an element of a view the kernels failed to write would read NaN.
        let gpu = poisoned(&stream, plan);
        for (k, spec) in specs.iter().enumerate() {
            into_same::<f32>(&gpu, spec, shape, 70 + k as u64);
            into_same::<bf16>(&gpu, spec, shape, 80 + k as u64);
            into_same::<f16>(&gpu, spec, shape, 90 + k as u64);
        }
    }
    // The host label check too (the raw entry's mode).
    let host = handle(&stream, |o| {
        o.label_check = LabelCheck::Host;
        o.poison = true;
    });
    into_same::<bf16>(&host, &specs[0], shape, 99);
}

/// A second `CudaSlice` over `len` elements at byte offset `off` of memory `owner` holds (how
/// another framework's tensor can alias it): never freed, leaked on drop.
struct Alias<T>(std::mem::ManuallyDrop<CudaSlice<T>>);

impl<T> Alias<T> {
    fn of<U>(s: &Arc<CudaStream>, owner: &CudaSlice<U>, off: u64, len: usize) -> Self {
        let (p, _record) = owner.device_ptr(s);
        // SAFETY: `off + len` elements of T lie inside `owner`'s allocation (the callers' sizes),
        // which outlives this alias; the alias is never freed (Drop leaks it).
        Self(std::mem::ManuallyDrop::new(unsafe {
            s.upgrade_device_ptr::<T>(p + off, len)
        }))
    }
}

impl<T> Drop for Alias<T> {
    fn drop(&mut self) {
        // SAFETY: taken once, here; the memory is `owner`'s, so hand the pointer back unfreed.
        let _ = unsafe { std::mem::ManuallyDrop::take(&mut self.0) }.leak();
    }
}

#[test]
fn into_bad_views_are_typed_errors_before_any_launch() {
    use fused_margin::Error;
    let Some(stream) = gpu_or_skip() else { return };
    // Poisoned: had anything been enqueued for the call, the views would hold NaN.
    let gpu = poisoned(&stream, Plan::Fused);
    let s = &stream;
    let shape = Shape::new(4, 8, 10);
    let (b, d, c) = (shape.b, shape.d, shape.c);
    let x = s.clone_htod(&[0.5f32; 32]).unwrap();
    let w = s.clone_htod(&[0.25f32; 80]).unwrap();
    let l = s.clone_htod(&[1i32, 2, 3, 4]).unwrap();
    let (xv, wv, lv) = (x.as_view(), w.as_view(), l.as_view());
    let spec = MarginLoss::arcface(0.5);
    let sentinel = 7.0f32;
    let untouched = |v: &CudaSlice<f32>, what: &str| {
        let h = s.clone_dtoh(v).unwrap();
        assert!(
            h.iter().all(|&e| e == sentinel),
            "{what} was written: {h:?}"
        );
    };
    let invalid = |r: Result<(), Error>, what: &str, part: &str| match r {
        Err(Error::InvalidArgument { what: w, detail }) => {
            assert_eq!(w, what, "{detail}");
            assert!(detail.contains(part), "{detail}");
        }
        other => panic!("expected InvalidArgument for {what}, got {other:?}"),
    };

    // Lengths.
    let mut loss2 = s.clone_htod(&[sentinel; 2]).unwrap();
    let e = gpu.forward_into(
        &spec,
        &xv,
        &wv,
        &lv,
        shape,
        GpuForwardOut {
            loss: Some(loss2.as_view_mut()),
            row_loss: None,
        },
    );
    assert!(
        matches!(
            e,
            Err(Error::Length {
                what: "loss",
                expected: 1,
                got: 2
            })
        ),
        "{e:?}"
    );
    untouched(&loss2, "loss");
    let mut rows = s.clone_htod(&[sentinel; 5]).unwrap();
    let e = gpu.forward_into(
        &spec,
        &xv,
        &wv,
        &lv,
        shape,
        GpuForwardOut {
            loss: None,
            row_loss: Some(rows.slice_mut(..b - 1)),
        },
    );
    assert!(
        matches!(
            e,
            Err(Error::Length {
                what: "row_loss",
                expected: 4,
                got: 3
            })
        ),
        "{e:?}"
    );
    untouched(&rows, "row_loss");

    // The loss inside the row losses (an alias of element 2).
    let mut inner = Alias::<f32>::of(s, &rows, 8, 1);
    let e = gpu.forward_into(
        &spec,
        &xv,
        &wv,
        &lv,
        shape,
        GpuForwardOut {
            loss: Some(inner.0.as_view_mut()),
            row_loss: Some(rows.slice_mut(..b)),
        },
    );
    invalid(e.map(drop), "loss", "overlaps row_loss");
    untouched(&rows, "row_loss");

    let f = gpu.forward(&spec, &xv, &wv, &lv, shape).unwrap();
    // One element more than dx and dw need.
    let mut grads = s.clone_htod(&vec![sentinel; b * d + c * d + 1]).unwrap();
    // dx one element short.
    {
        let (mut dx, mut dw) = grads.split_at_mut(b * d);
        let e = gpu.backward_into(
            &f,
            &xv,
            &wv,
            &lv,
            GpuUpstream::ONE,
            GpuGradOut {
                dx: dx.slice_mut(1..),
                dw: dw.slice_mut(..c * d),
            },
        );
        assert!(
            matches!(
                e,
                Err(Error::Length {
                    what: "dx",
                    expected: 32,
                    got: 31
                })
            ),
            "{e:?}"
        );
    }
    // dw one element long.
    {
        let (dx, dw) = grads.split_at_mut(b * d);
        let e = gpu.backward_into(&f, &xv, &wv, &lv, GpuUpstream::ONE, GpuGradOut { dx, dw });
        assert!(
            matches!(
                e,
                Err(Error::Length {
                    what: "dw",
                    expected: 320,
                    got: 321
                })
            ),
            "{e:?}"
        );
    }
    untouched(&grads, "dx, dw");
    // dw starting four elements before the end of dx (an alias), and dx over x itself.
    let mut dw_alias = Alias::<f32>::of(s, &grads, 4 * (b * d - 4) as u64, c * d);
    {
        let (mut dx, _) = grads.split_at_mut(b * d);
        let e = gpu.backward_into(
            &f,
            &xv,
            &wv,
            &lv,
            GpuUpstream::ONE,
            GpuGradOut {
                dx: dx.slice_mut(..),
                dw: dw_alias.0.as_view_mut(),
            },
        );
        invalid(e.map(drop), "dx", "overlaps dw");
    }
    untouched(&grads, "dx, dw");
    let mut x_alias = Alias::<f32>::of(s, &x, 0, b * d);
    {
        let (_, mut dw) = grads.split_at_mut(b * d);
        let e = gpu.backward_into(
            &f,
            &xv,
            &wv,
            &lv,
            GpuUpstream::ONE,
            GpuGradOut {
                dx: x_alias.0.as_view_mut(),
                dw: dw.slice_mut(..c * d),
            },
        );
        invalid(e.map(drop), "dx", "overlaps x");
    }
    untouched(&grads, "dx, dw");
    assert_eq!(s.clone_dtoh(&x).unwrap(), vec![0.5f32; 32], "x was written");
    // And views of the right lengths work: every element of dx and dw written, the one past
    // them not.
    let (dx, mut dw) = grads.split_at_mut(b * d);
    gpu.backward_into(
        &f,
        &xv,
        &wv,
        &lv,
        GpuUpstream::ONE,
        GpuGradOut {
            dx,
            dw: dw.slice_mut(..c * d),
        },
    )
    .unwrap()
    .check()
    .unwrap();
    let h = s.clone_dtoh(&grads).unwrap();
    let (written, past) = h.split_at(b * d + c * d);
    assert!(
        written.iter().all(|v| v.is_finite() && *v != sentinel),
        "{h:?}"
    );
    assert_eq!(past, [sentinel]);
}

/// Every loss with per-row inputs or state on the GPU (`forward_with`), on both plans and every
/// dtype, against the CPU reference with the same inputs: sub-center ArcFace (w of C K rows),
/// AdaFace and CurricularFace (state in, state out compared), MagFace (feature norms across its
/// clamp), ElasticFace with given and seeded margins and with Plus. Inputs that do not belong to
/// the loss are refused before any launch.
#[test]
fn losses_with_state_through_forward_with() {
    use fused_margin::{
        ElasticKind, ElasticMargins, ElasticPlus, ElasticRng, LossState, RowInputs,
    };
    let Some(stream) = gpu_or_skip() else { return };
    fn one<T: CudaElement>(gpu: &FusedMarginLoss, spec: &MarginLoss, rows_in: &RowInputs) {
        let shape = Shape::new(37, 64, 301);
        let k = spec.variant.centers();
        let mut inp = inputs(Shape::new(shape.b, shape.d, shape.c * k), 91);
        inp.labels
            .iter_mut()
            .filter(|l| **l >= 0)
            .for_each(|l| *l /= k as i32);
        // Feature norms 4 .. 124 in a scrambled order: across MagFace's clamp, AdaFace's z spread.
        for (i, row) in inp.x.chunks_mut(shape.d).enumerate() {
            let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            let target = 4.0 + 120.0 * ((7 * i) % shape.b) as f64 / shape.b as f64;
            row.iter_mut().for_each(|v| *v *= target / n.max(1e-30));
        }
        let s = gpu.stream();
        let x: Vec<T> = inp.x.iter().map(|&v| T::from_f64(v)).collect();
        let w: Vec<T> = inp.w.iter().map(|&v| T::from_f64(v)).collect();
        let r = cpu::forward_with(spec, &x, &w, &inp.labels, shape, rows_in).unwrap();
        let rg = cpu::backward(spec, &r, &x, &w, &inp.labels, shape, Upstream::ONE).unwrap();
        let (xd, wd, ld) = (
            s.clone_htod(&x).unwrap(),
            s.clone_htod(&w).unwrap(),
            s.clone_htod(&inp.labels).unwrap(),
        );
        let (xv, wv, lv) = (xd.as_view(), wd.as_view(), ld.as_view());
        let f = gpu
            .forward_with(spec, &xv, &wv, &lv, shape, rows_in)
            .unwrap();
        let g = gpu
            .backward_f32(&f, &xv, &wv, &lv, GpuUpstream::ONE)
            .unwrap();
        let what = format!("{:?} {:?} {spec:?}", gpu.options().plan, T::DTYPE);
        let (lbar, gbar) = bars(T::DTYPE);
        let rows = to_f64(&s.clone_dtoh(&f.row_loss).unwrap());
        assert!(rel(&rows, &r.row_loss) <= lbar, "{what}: row loss");
        let dx = to_f64(&s.clone_dtoh(&g.dx).unwrap());
        let dw = to_f64(&s.clone_dtoh(&g.dw).unwrap());
        assert_eq!(dw.len(), shape.c * k * shape.d, "{what}: dw of C K rows");
        assert!(
            rel(&dx, &rg.dx) <= gbar && rel(&dw, &rg.dw) <= gbar,
            "{what}: gradients dx {:e}, dw {:e}",
            rel(&dx, &rg.dx),
            rel(&dw, &rg.dw)
        );
        let pairs = match (f.saved.state().unwrap(), r.state) {
            (None, None) => vec![],
            (
                Some(LossState::AdaFace { mean, std }),
                Some(LossState::AdaFace { mean: m, std: d }),
            ) => {
                vec![(mean, m), (std, d)]
            }
            (Some(LossState::CurricularFace { t }), Some(LossState::CurricularFace { t: u })) => {
                vec![(t, u)]
            }
            (o, r) => panic!("{what}: state {o:?}, reference {r:?}"),
        };
        for (o, r) in pairs {
            assert!(
                (o - r).abs() <= lbar * r.abs().max(1e-3),
                "{what}: state {o} vs {r}"
            );
        }
    }
    let margins: Vec<f64> = (0..37).map(|i| 0.45 + 0.003 * i as f64).collect();
    let given = RowInputs::with_margins(ElasticMargins::Given(&margins));
    let seeded = RowInputs::with_margins(ElasticMargins::Seeded(ElasticRng {
        seed: 3,
        step: 4,
        row_offset: 0,
    }));
    let none = RowInputs::default();
    let ada = RowInputs::with_state(LossState::AdaFace {
        mean: 40.0,
        std: 30.0,
    });
    let curr = RowInputs::with_state(LossState::CurricularFace { t: 0.3 });
    let arc = MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::None);
    let cos = MarginLoss::elasticface(ElasticKind::Cos, ElasticPlus::None);
    let plus = MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::Rank);
    for plan in [Plan::Fused, Plan::Naive] {
        let gpu = poisoned(&stream, plan);
        one::<f32>(&gpu, &arc, &given);
        one::<bf16>(&gpu, &arc, &seeded);
        one::<f16>(&gpu, &cos, &seeded);
        one::<bf16>(&gpu, &plus, &seeded);
        for (spec, rows) in [
            (MarginLoss::subcenter(3), &none),
            (MarginLoss::adaface(), &ada),
            (MarginLoss::curricularface(), &curr),
            (MarginLoss::magface(), &none),
        ] {
            one::<f32>(&gpu, &spec, rows);
            one::<bf16>(&gpu, &spec, rows);
            one::<f16>(&gpu, &spec, rows);
        }
        // Refused before any launch: inputs of another loss, a missing state.
        let x = upload::<f32>(&stream, &[0.5; 8]);
        let w = upload::<f32>(&stream, &[0.5; 12]);
        let l = stream.clone_htod(&[0i32, 1]).unwrap();
        let (xv, wv, lv) = (x.as_view(), w.as_view(), l.as_view());
        for (spec, rows) in [
            (MarginLoss::adaface(), &seeded),
            (MarginLoss::adaface(), &none),
            (MarginLoss::arcface(0.5), &curr),
        ] {
            let e = gpu
                .forward_with(&spec, &xv, &wv, &lv, Shape::new(2, 4, 3), rows)
                .unwrap_err();
            assert!(
                matches!(e, fused_margin::Error::InvalidArgument { .. }),
                "{e}"
            );
        }
        // Sub-centers: w of C*D elements is a length error.
        let e = gpu
            .forward(
                &MarginLoss::subcenter(3),
                &xv,
                &wv,
                &lv,
                Shape::new(2, 4, 3),
            )
            .unwrap_err();
        assert!(
            matches!(
                e,
                fused_margin::Error::Length {
                    what: "w (C*K*D with sub-centers)",
                    ..
                }
            ),
            "{e}"
        );
    }
}
