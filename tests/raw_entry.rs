//! The raw-pointer entry (`fused_margin::cuda::raw`): its argument checks (no GPU needed), and on a
//! GPU its results against the CPU reference, with the caller's memory left intact.
//!
//! The GPU tests print why and pass without a device; with `FUSED_MARGIN_REQUIRE_GPU=1` a missing
//! device fails instead.

use fused_margin::cuda::raw::{self, RawBuffer, RawForwardOut, RawGradOut, RawInputs, RawUpstream};
use fused_margin::{DType, Error, MarginLoss, Reduction, Shape};

const B: usize = 4;
const D: usize = 8;
const C: usize = 5;

/// Well-formed arguments at made-up, non-overlapping, aligned addresses (never dereferenced: the
/// checks under test read no memory).
fn args(dtype: DType) -> (RawInputs, RawForwardOut, RawGradOut) {
    let base = 0x7000_0000_0000u64;
    let inputs = RawInputs {
        x: RawBuffer::new(base, B * D),
        w: RawBuffer::new(base + 0x10_000, C * D),
        labels: RawBuffer::new(base + 0x20_000, B),
        dtype,
        shape: Shape::new(B, D, C),
    };
    let out = RawForwardOut {
        loss: Some(RawBuffer::new(base + 0x30_000, 1)),
        row_loss: Some(RawBuffer::new(base + 0x40_000, B)),
    };
    let grads = RawGradOut {
        dx: RawBuffer::new(base + 0x50_000, B * D),
        dw: RawBuffer::new(base + 0x60_000, C * D),
        dtype,
    };
    (inputs, out, grads)
}

fn invalid_what(e: Error) -> (&'static str, String) {
    match e {
        Error::InvalidArgument { what, detail } => (what, detail),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn well_formed_arguments_pass_the_checks() {
    let spec = MarginLoss::arcface(0.5);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let (inputs, out, grads) = args(dtype);
        raw::check_forward(&spec, &inputs, &out).unwrap();
        raw::check_backward(&spec, &inputs, RawUpstream::Scalar(1.0), &grads).unwrap();
        let f32_grads = RawGradOut {
            dtype: DType::F32,
            ..grads
        };
        raw::check_forward_backward(&spec, &inputs, RawUpstream::Scalar(1.0), &out, &f32_grads)
            .unwrap();
        // Outputs are optional in the forward.
        raw::check_forward(&spec, &inputs, &RawForwardOut::default()).unwrap();
    }
}

#[test]
fn lengths_must_fit_the_shape() {
    let spec = MarginLoss::arcface(0.5);
    let (mut inputs, out, mut grads) = args(DType::F32);
    inputs.w.len = C * D - 1;
    assert_eq!(
        raw::check_forward(&spec, &inputs, &out),
        Err(Error::Length {
            what: "w",
            expected: C * D,
            got: C * D - 1
        })
    );
    let (inputs, mut out, _) = args(DType::F32);
    out.row_loss = Some(RawBuffer::new(out.row_loss.unwrap().ptr, B + 1));
    assert_eq!(
        raw::check_forward(&spec, &inputs, &out),
        Err(Error::Length {
            what: "row_loss",
            expected: B,
            got: B + 1
        })
    );
    grads.dw.len = 3;
    assert_eq!(
        raw::check_backward(&spec, &inputs, RawUpstream::Scalar(1.0), &grads),
        Err(Error::Length {
            what: "dw",
            expected: C * D,
            got: 3
        })
    );
    let mut bad = inputs;
    bad.shape = Shape::new(B, 0, C);
    assert_eq!(
        raw::check_forward(&spec, &bad, &RawForwardOut::default()),
        Err(Error::EmptyDimension { dim: "D" })
    );
}

#[test]
fn null_misaligned_and_overlapping_pointers_are_rejected() {
    let spec = MarginLoss::cosface(0.35);
    let (mut inputs, out, grads) = args(DType::BF16);
    inputs.labels.ptr = 0;
    let (what, detail) = invalid_what(raw::check_forward(&spec, &inputs, &out).unwrap_err());
    assert_eq!(what, "labels");
    assert!(detail.contains("null"), "{detail}");

    let (mut inputs, _, _) = args(DType::BF16);
    inputs.x.ptr += 1; // bf16 needs 2-byte alignment
    let (what, detail) = invalid_what(raw::check_forward(&spec, &inputs, &out).unwrap_err());
    assert_eq!(what, "x");
    assert!(
        detail.contains("0x700000000001") && detail.contains("2-byte"),
        "{detail}"
    );

    // dx starting inside w: the output overlaps an input.
    let (inputs, _, mut g) = args(DType::BF16);
    g.dx.ptr = inputs.w.ptr + 16;
    let (what, detail) = invalid_what(
        raw::check_backward(&spec, &inputs, RawUpstream::Scalar(1.0), &g).unwrap_err(),
    );
    assert_eq!(what, "dx");
    assert!(detail.contains("overlaps w"), "{detail}");

    // The loss written into dw (forward_backward checks outputs against each other).
    let (inputs, mut o, g) = args(DType::BF16);
    o.loss = Some(RawBuffer::new(g.dw.ptr + 4, 1));
    let (what, detail) = invalid_what(
        raw::check_forward_backward(&spec, &inputs, RawUpstream::Scalar(1.0), &o, &grads)
            .unwrap_err(),
    );
    assert_eq!(what, "loss");
    assert!(detail.contains("overlaps dw"), "{detail}");

    // Adjacent buffers touch but do not overlap.
    let (inputs, _, mut g) = args(DType::F32);
    g.dx.ptr = inputs.x.ptr + (B * D * 4) as u64; // right after x
    g.dw.ptr = g.dx.ptr + (B * D * 4) as u64;
    assert!(g.dw.ptr + (C * D * 4) as u64 <= inputs.w.ptr);
    raw::check_backward(&spec, &inputs, RawUpstream::Scalar(1.0), &g).unwrap();

    // An address range that wraps around.
    let (mut inputs, out, _) = args(DType::F32);
    inputs.x.ptr = u64::MAX - 3;
    let (what, detail) = invalid_what(raw::check_forward(&spec, &inputs, &out).unwrap_err());
    assert_eq!(what, "x");
    assert!(detail.contains("overflows"), "{detail}");
}

#[test]
fn dtypes_upstream_and_spec_are_checked() {
    let spec = MarginLoss::arcface(0.5);
    let (mut inputs, out, grads) = args(DType::F32);
    inputs.dtype = DType::F64;
    assert!(matches!(
        raw::check_forward(&spec, &inputs, &out),
        Err(Error::Unsupported { detail }) if detail.contains("F64")
    ));

    let (inputs, _, mut g) = args(DType::F32);
    g.dtype = DType::BF16; // neither the input dtype nor f32
    assert!(matches!(
        raw::check_backward(&spec, &inputs, RawUpstream::Scalar(1.0), &g),
        Err(Error::Unsupported { detail }) if detail.contains("BF16") && detail.contains("F32")
    ));

    let per_row = RawUpstream::PerRow(RawBuffer::new(0x7000_0007_0000, B));
    assert!(matches!(
        raw::check_backward(&spec, &inputs, per_row, &grads),
        Err(Error::Upstream { detail }) if detail.contains("Mean")
    ));
    let none = spec.reduction(Reduction::None);
    assert!(matches!(
        raw::check_backward(&none, &inputs, RawUpstream::Scalar(1.0), &grads),
        Err(Error::Upstream { .. })
    ));
    raw::check_backward(&none, &inputs, per_row, &grads).unwrap();
    let short = RawUpstream::PerRow(RawBuffer::new(0x7000_0007_0000, B - 1));
    assert_eq!(
        raw::check_backward(&none, &inputs, short, &grads),
        Err(Error::Length {
            what: "upstream",
            expected: B,
            got: B - 1
        })
    );
    // The upstream is read while dx is written: they must not overlap.
    let on_dx = RawUpstream::PerRow(RawBuffer::new(grads.dx.ptr, B));
    let (what, _) = invalid_what(raw::check_backward(&none, &inputs, on_dx, &grads).unwrap_err());
    assert_eq!(what, "dx");
    assert!(matches!(
        raw::check_backward(&spec, &inputs, RawUpstream::Scalar(f32::NAN), &grads),
        Err(Error::Upstream { .. })
    ));

    let bad = MarginLoss::arcface(4.0);
    assert!(matches!(
        raw::check_forward(&bad, &inputs, &out),
        Err(Error::InvalidSpec { field: "m2", .. })
    ));
}

/// The losses with per-row inputs or state: the inputs they need are checked against the loss
/// before any driver call, and sub-center ArcFace's w and dw have C*K rows.
#[test]
fn losses_with_state_are_checked_first() {
    use fused_margin::{
        ElasticKind, ElasticMargins, ElasticPlus, ElasticRng, LossState, RowInputs,
    };
    let (inputs, out, grads) = args(DType::BF16);
    // AdaFace needs its state: without it the plain check names the row inputs.
    let ada = MarginLoss::adaface();
    let (what, detail) = invalid_what(raw::check_forward(&ada, &inputs, &out).unwrap_err());
    assert_eq!(what, "row inputs", "{detail}");
    let state = RowInputs::with_state(LossState::ADAFACE_INIT);
    raw::check_forward_with(&ada, &inputs, &state, &out).unwrap();
    // A state of the wrong loss, or a bad value in it, is refused too.
    let curr = RowInputs::with_state(LossState::CurricularFace { t: 0.0 });
    assert!(raw::check_forward_with(&ada, &inputs, &curr, &out).is_err());
    let bad = RowInputs::with_state(LossState::AdaFace {
        mean: f64::NAN,
        std: 1.0,
    });
    assert!(matches!(
        raw::check_forward_with(&ada, &inputs, &bad, &out),
        Err(Error::InvalidSpec {
            field: "state.mean",
            ..
        })
    ));
    // ElasticFace takes margins; a loss without per-row inputs refuses them.
    let ela = MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::None);
    let seeded = RowInputs::with_margins(ElasticMargins::Seeded(ElasticRng {
        seed: 1,
        step: 2,
        row_offset: 0,
    }));
    raw::check_forward_with(&ela, &inputs, &seeded, &out).unwrap();
    assert!(raw::check_forward(&ela, &inputs, &out).is_err());
    let arc = MarginLoss::arcface(0.5);
    assert!(raw::check_forward_with(&arc, &inputs, &seeded, &out).is_err());
    // MagFace needs nothing.
    raw::check_forward(&MarginLoss::magface(), &inputs, &out).unwrap();

    // Sub-centers: w (and dw) of C*K*D elements; C*D is a length error naming them.
    let sub = MarginLoss::subcenter(3);
    assert_eq!(
        raw::check_forward(&sub, &inputs, &out),
        Err(Error::Length {
            what: "w",
            expected: C * 3 * D,
            got: C * D
        })
    );
    let base = 0x7100_0000_0000u64;
    let wide = RawInputs {
        w: RawBuffer::new(base, C * 3 * D),
        ..inputs
    };
    raw::check_forward(&sub, &wide, &out).unwrap();
    assert_eq!(
        raw::check_backward(&sub, &wide, RawUpstream::ONE, &grads),
        Err(Error::Length {
            what: "dw",
            expected: C * 3 * D,
            got: C * D
        })
    );
    let sub_grads = RawGradOut {
        dw: RawBuffer::new(base + 0x10_0000, C * 3 * D),
        ..grads
    };
    raw::check_backward(&sub, &wide, RawUpstream::ONE, &sub_grads).unwrap();
}

/// The raw upstream is the handle's upstream enum with a raw buffer in it (one type,
/// `cuda::DeviceUpstream`), so its constant and `map` are the same.
#[test]
fn the_raw_upstream_is_the_device_upstream() {
    let one: fused_margin::cuda::DeviceUpstream<RawBuffer> = RawUpstream::ONE;
    assert_eq!(one, RawUpstream::Scalar(1.0));
    let rows = RawUpstream::PerRow(RawBuffer::new(0x7000_0007_0000, B));
    assert_eq!(
        rows.map(|b| b.len),
        fused_margin::cuda::DeviceUpstream::PerRow(B)
    );
}

#[test]
fn the_entry_itself_checks_first_and_reports_a_missing_device() {
    let spec = MarginLoss::arcface(0.5);
    let (mut inputs, out, _) = args(DType::F32);
    inputs.x.len = 1;
    // SAFETY: the length check fails before any driver call, so no pointer is used.
    let r = unsafe { raw::forward(0, std::ptr::null_mut(), &spec, &inputs, &out) };
    assert!(matches!(r, Err(Error::Length { what: "x", .. })), "{r:?}");
    if fused_margin::cuda::device_available() {
        eprintln!("(a device is present: the no-device path is not reachable here)");
        return;
    }
    let (inputs, out, _) = args(DType::F32);
    // SAFETY: without a CUDA device nothing can dereference these made-up pointers.
    let r = unsafe { raw::forward(0, std::ptr::null_mut(), &spec, &inputs, &out) };
    assert!(matches!(r, Err(Error::NoDevice { .. })), "{r:?}");
}

mod gpu {
    use super::*;
    use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr};
    use fused_margin::{cpu, Element, Upstream};
    use half::bf16;
    use std::sync::{Arc, Mutex, MutexGuard};

    /// Held by each GPU test: one at a time, so that the pool measurement of
    /// `gpu_outputs_are_written_in_place` sees only its own allocations.
    fn serial() -> MutexGuard<'static, ()> {
        static GPU: Mutex<()> = Mutex::new(());
        GPU.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stream() -> Option<Arc<CudaStream>> {
        let required = std::env::var("FUSED_MARGIN_REQUIRE_GPU").as_deref() == Ok("1");
        if !fused_margin::cuda::device_available() {
            assert!(
                !required,
                "FUSED_MARGIN_REQUIRE_GPU=1 but no CUDA device/driver was found"
            );
            eprintln!("skipped: no CUDA driver or device on this machine");
            return None;
        }
        // A non-default stream of the primary context, as a framework would own.
        Some(
            CudaContext::new(0)
                .expect("device 0")
                .new_stream()
                .expect("stream"),
        )
    }

    fn ptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> RawBuffer {
        let (p, _sync) = s.device_ptr(stream);
        RawBuffer::new(p, s.len())
    }

    fn data(shape: Shape) -> (Vec<f32>, Vec<f32>, Vec<i32>) {
        let f = |i: usize, k: f32| (i as f32 * k).sin() * 1.7 + (i % 7) as f32 * 0.1;
        let x = (0..shape.b * shape.d).map(|i| f(i, 0.37)).collect();
        let w = (0..shape.c * shape.d).map(|i| f(i, 0.61)).collect();
        let labels = (0..shape.b)
            .map(|i| {
                if i == 2 {
                    -1
                } else {
                    ((i * 7) % shape.c) as i32
                }
            })
            .collect();
        (x, w, labels)
    }

    fn rel(out: &[f64], r: &[f64]) -> f64 {
        if out.iter().any(|v| !v.is_finite()) {
            return f64::INFINITY;
        }
        let num: f64 = out.iter().zip(r).map(|(a, b)| (a - b) * (a - b)).sum();
        let den: f64 = r.iter().map(|b| b * b).sum();
        (num / den).sqrt()
    }

    fn host<T: DeviceRepr + Element>(stream: &Arc<CudaStream>, s: &CudaSlice<T>) -> Vec<f64> {
        stream
            .clone_dtoh(s)
            .unwrap()
            .into_iter()
            .map(|v| v.to_f64())
            .collect()
    }

    /// Forward, then backward with gradients in the input dtype and in f32, against the
    /// reference; the inputs read back unchanged afterwards (and are freed by their owner).
    fn case<T: DeviceRepr + Element + cudarc::driver::ValidAsZeroBits>(
        stream: &Arc<CudaStream>,
        dtype: DType,
        bars: (f64, f64),
    ) {
        let shape = Shape::new(37, 72, 101);
        let (x, w, labels) = data(shape);
        let xt: Vec<T> = x.iter().map(|&v| T::from_f64(v as f64)).collect();
        let wt: Vec<T> = w.iter().map(|&v| T::from_f64(v as f64)).collect();
        let spec = MarginLoss::arcface(0.5).scale(16.0);
        let r = cpu::forward(&spec, &xt, &wt, &labels, shape).unwrap();
        let rg = cpu::backward(&spec, &r, &xt, &wt, &labels, shape, Upstream::ONE).unwrap();

        let xd = stream.clone_htod(&xt).unwrap();
        let wd = stream.clone_htod(&wt).unwrap();
        let ld = stream.clone_htod(&labels).unwrap();
        let loss = stream.alloc_zeros::<f32>(1).unwrap();
        let dx = stream.alloc_zeros::<T>(shape.b * shape.d).unwrap();
        let dw = stream.alloc_zeros::<T>(shape.c * shape.d).unwrap();
        let dx32 = stream.alloc_zeros::<f32>(shape.b * shape.d).unwrap();
        let dw32 = stream.alloc_zeros::<f32>(shape.c * shape.d).unwrap();
        let inputs = RawInputs {
            x: ptr(&xd, stream),
            w: ptr(&wd, stream),
            labels: ptr(&ld, stream),
            dtype,
            shape,
        };
        let out = RawForwardOut {
            loss: Some(ptr(&loss, stream)),
            row_loss: None,
        };
        let cu = stream.cu_stream();
        // SAFETY: every pointer is a live allocation of the stated length on device 0, made on
        // `stream` (of the primary context), outputs are separate allocations, and everything
        // is read back on the same stream.
        let fwd = unsafe { raw::forward(0, cu, &spec, &inputs, &out) }.unwrap();
        assert_eq!(fwd.spec(), &spec);
        assert_eq!(fwd.shape(), shape);
        for (gdx, gdw, gdtype) in [
            (ptr(&dx, stream), ptr(&dw, stream), dtype),
            (ptr(&dx32, stream), ptr(&dw32, stream), DType::F32),
        ] {
            let grads = RawGradOut {
                dx: gdx,
                dw: gdw,
                dtype: gdtype,
            };
            // SAFETY: as above.
            unsafe { raw::backward(0, cu, &fwd, &inputs, RawUpstream::Scalar(1.0), &grads) }
                .unwrap();
        }
        let l = host(stream, &loss);
        assert!(
            rel(&l, &[r.loss]) <= bars.0,
            "{dtype:?} loss {l:?} vs {}",
            r.loss
        );
        // The loss is only in the caller's buffer (written in place, never copied)...
        assert!(
            matches!(fwd.loss_host(), Err(Error::Unsupported { .. })),
            "{:?}",
            fwd.loss_host()
        );
        // ...and kept by this crate when the caller gives no buffer for it: the same bits.
        // SAFETY: as above.
        let kept = unsafe { raw::forward(0, cu, &spec, &inputs, &RawForwardOut::default()) };
        assert_eq!(
            kept.unwrap().loss_host().unwrap().to_bits(),
            (l[0] as f32).to_bits()
        );
        for (name, got, want) in [
            ("dx", host(stream, &dx), &rg.dx),
            ("dw", host(stream, &dw), &rg.dw),
            ("dx f32", host(stream, &dx32), &rg.dx),
            ("dw f32", host(stream, &dw32), &rg.dw),
        ] {
            let e = rel(&got, want);
            assert!(e <= bars.1, "{dtype:?} {name}: {e} > {}", bars.1);
        }
        // The caller's inputs are intact and still the caller's.
        assert_eq!(stream.clone_dtoh(&ld).unwrap(), labels);
        let back: Vec<f64> = host(stream, &xd);
        assert_eq!(back, xt.iter().map(|v| v.to_f64()).collect::<Vec<_>>());

        // A backward on another stream than its forward is refused.
        let other = stream.context().new_stream().unwrap();
        let grads = RawGradOut {
            dx: ptr(&dx, stream),
            dw: ptr(&dw, stream),
            dtype,
        };
        // SAFETY: as above; `other` is a live stream of the same context.
        let e = unsafe {
            raw::backward(
                0,
                other.cu_stream(),
                &fwd,
                &inputs,
                RawUpstream::Scalar(1.0),
                &grads,
            )
        };
        assert!(matches!(e, Err(Error::ForwardMismatch { .. })), "{e:?}");
        // So is one whose inputs have another shape (one class fewer: prefixes of the same
        // buffers, so every length fits its own shape).
        let fewer = Shape::new(shape.b, shape.d, shape.c - 1);
        let small = RawInputs {
            w: RawBuffer::new(inputs.w.ptr, fewer.c * fewer.d),
            shape: fewer,
            ..inputs
        };
        let small_grads = RawGradOut {
            dw: RawBuffer::new(grads.dw.ptr, fewer.c * fewer.d),
            ..grads
        };
        // SAFETY: as above; every buffer is a prefix of a live allocation.
        let e = unsafe { raw::backward(0, cu, &fwd, &small, RawUpstream::ONE, &small_grads) };
        assert!(matches!(e, Err(Error::ForwardMismatch { .. })), "{e:?}");
        drop(fwd);
        stream.synchronize().unwrap();
    }

    #[test]
    fn gpu_forward_backward_match_the_reference() {
        let _one = serial();
        let Some(stream) = stream() else { return };
        case::<f32>(&stream, DType::F32, (1e-5, 1e-4));
        case::<bf16>(&stream, DType::BF16, (5e-3, 2e-2));
    }

    /// The losses with state through the raw entry: sub-center ArcFace (w and dw of C K rows),
    /// CurricularFace (`forward_with` with its state in, the state out from the result), against
    /// the reference.
    #[test]
    fn gpu_losses_with_state_through_forward_with() {
        use fused_margin::{LossState, RowInputs};
        let _one = serial();
        let Some(stream) = stream() else { return };
        let shape = Shape::new(37, 72, 101);
        for (spec, rows) in [
            (MarginLoss::subcenter(3).scale(16.0), RowInputs::default()),
            (
                MarginLoss::curricularface().scale(16.0),
                RowInputs::with_state(LossState::CurricularFace { t: 0.3 }),
            ),
        ] {
            let k = spec.variant.centers();
            let (x, w, labels) = data(Shape::new(shape.b, shape.d, shape.c * k));
            let labels: Vec<i32> = labels
                .iter()
                .map(|&l| if l < 0 { l } else { l / k as i32 })
                .collect();
            let xt: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let wt: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let r = cpu::forward_with(&spec, &xt, &wt, &labels, shape, &rows).unwrap();
            let rg = cpu::backward(&spec, &r, &xt, &wt, &labels, shape, Upstream::ONE).unwrap();
            let (xd, wd, ld) = (
                stream.clone_htod(&xt).unwrap(),
                stream.clone_htod(&wt).unwrap(),
                stream.clone_htod(&labels).unwrap(),
            );
            let loss = stream.alloc_zeros::<f32>(1).unwrap();
            let dx = stream.alloc_zeros::<f32>(shape.b * shape.d).unwrap();
            let dw = stream.alloc_zeros::<f32>(shape.c * k * shape.d).unwrap();
            let inputs = RawInputs {
                x: ptr(&xd, &stream),
                w: ptr(&wd, &stream),
                labels: ptr(&ld, &stream),
                dtype: DType::BF16,
                shape,
            };
            let out = RawForwardOut {
                loss: Some(ptr(&loss, &stream)),
                row_loss: None,
            };
            let cu = stream.cu_stream();
            // SAFETY: live allocations of the stated lengths on device 0, made on `stream`,
            // outputs separate, everything read back on the same stream.
            let fwd = unsafe { raw::forward_with(0, cu, &spec, &inputs, &rows, &out) }.unwrap();
            let grads = RawGradOut {
                dx: ptr(&dx, &stream),
                dw: ptr(&dw, &stream),
                dtype: DType::F32,
            };
            // SAFETY: as above.
            unsafe { raw::backward(0, cu, &fwd, &inputs, RawUpstream::ONE, &grads) }.unwrap();
            let what = format!("{spec:?}");
            assert!(
                rel(&host(&stream, &loss), &[r.loss]) <= 5e-3,
                "{what}: loss"
            );
            assert!(rel(&host(&stream, &dx), &rg.dx) <= 2e-2, "{what}: dx");
            assert!(rel(&host(&stream, &dw), &rg.dw) <= 2e-2, "{what}: dw");
            match (fwd.state().unwrap(), r.state) {
                (None, None) => {}
                (
                    Some(LossState::CurricularFace { t }),
                    Some(LossState::CurricularFace { t: u }),
                ) => {
                    assert!(
                        (t - u).abs() <= 5e-3 * u.abs().max(1e-3),
                        "{what}: t {t} vs {u}"
                    )
                }
                (o, r) => panic!("{what}: state {o:?}, reference {r:?}"),
            }
        }
    }

    #[test]
    fn gpu_forward_backward_in_one_call_with_per_row_upstream() {
        let _one = serial();
        let Some(stream) = stream() else { return };
        let shape = Shape::new(19, 40, 33);
        let (x, w, labels) = data(shape);
        let spec = MarginLoss::cosface(0.35)
            .scale(16.0)
            .reduction(Reduction::None);
        let g: Vec<f32> = (0..shape.b).map(|i| 0.25 + i as f32 * 0.5).collect();
        let g64: Vec<f64> = g.iter().map(|&v| v as f64).collect();
        let r = cpu::forward(&spec, &x, &w, &labels, shape).unwrap();
        let rg = cpu::backward(&spec, &r, &x, &w, &labels, shape, Upstream::PerRow(&g64)).unwrap();

        let xd = stream.clone_htod(&x).unwrap();
        let wd = stream.clone_htod(&w).unwrap();
        let ld = stream.clone_htod(&labels).unwrap();
        let gd = stream.clone_htod(&g).unwrap();
        let rows = stream.alloc_zeros::<f32>(shape.b).unwrap();
        let dx = stream.alloc_zeros::<f32>(shape.b * shape.d).unwrap();
        let dw = stream.alloc_zeros::<f32>(shape.c * shape.d).unwrap();
        let inputs = RawInputs {
            x: ptr(&xd, &stream),
            w: ptr(&wd, &stream),
            labels: ptr(&ld, &stream),
            dtype: DType::F32,
            shape,
        };
        let out = RawForwardOut {
            loss: None,
            row_loss: Some(ptr(&rows, &stream)),
        };
        let grads = RawGradOut {
            dx: ptr(&dx, &stream),
            dw: ptr(&dw, &stream),
            dtype: DType::F32,
        };
        // SAFETY: live allocations of the stated lengths on device 0, made on `stream`; outputs
        // are separate allocations; read back on the same stream.
        unsafe {
            raw::forward_backward(
                0,
                stream.cu_stream(),
                &spec,
                &inputs,
                RawUpstream::PerRow(ptr(&gd, &stream)),
                &out,
                &grads,
            )
        }
        .unwrap();
        let got_rows = host(&stream, &rows);
        assert!(rel(&got_rows, &r.row_loss) <= 1e-5);
        assert_eq!(got_rows[2], 0.0, "row 2 is ignored");
        assert!(rel(&host(&stream, &dx), &rg.dx) <= 1e-4);
        assert!(rel(&host(&stream, &dw), &rg.dw) <= 1e-4);
    }

    /// The kernels write the caller's buffers themselves: a warm backward allocates nothing near
    /// the size of the gradients (it used to write this crate's own dx and dw and copy them), and
    /// repeated calls give the same bits in the caller's buffers.
    #[test]
    fn gpu_outputs_are_written_in_place() {
        let _one = serial();
        let Some(stream) = stream() else { return };
        let Ok(pool) = fused_margin::cuda::measure::PoolPeak::new(&stream) else {
            eprintln!("skipped: no stream-ordered allocator to measure");
            return;
        };
        let shape = Shape::new(64, 128, 4096);
        let (x, w, labels) = data(shape);
        let xd = stream.clone_htod(&x).unwrap();
        let wd = stream.clone_htod(&w).unwrap();
        let ld = stream.clone_htod(&labels).unwrap();
        let loss = stream.alloc_zeros::<f32>(1).unwrap();
        let dx = stream.alloc_zeros::<f32>(shape.b * shape.d).unwrap();
        let dw = stream.alloc_zeros::<f32>(shape.c * shape.d).unwrap();
        let inputs = RawInputs {
            x: ptr(&xd, &stream),
            w: ptr(&wd, &stream),
            labels: ptr(&ld, &stream),
            dtype: DType::F32,
            shape,
        };
        let out = RawForwardOut {
            loss: Some(ptr(&loss, &stream)),
            row_loss: None,
        };
        let grads = RawGradOut {
            dx: ptr(&dx, &stream),
            dw: ptr(&dw, &stream),
            dtype: DType::F32,
        };
        let spec = MarginLoss::arcface(0.5).scale(16.0);
        let cu = stream.cu_stream();
        let step = || {
            // SAFETY: live allocations of the stated lengths on device 0, made on `stream`;
            // outputs are separate allocations; read back on the same stream.
            unsafe { raw::forward_backward(0, cu, &spec, &inputs, RawUpstream::ONE, &out, &grads) }
                .unwrap();
            stream.synchronize().unwrap();
        };
        // The first call loads the kernels and grows the handle's workspace arena.
        step();
        let first = (host(&stream, &loss), host(&stream, &dx), host(&stream, &dw));
        pool.reset().unwrap();
        let before = pool.used().unwrap();
        step();
        let extra = pool.high().unwrap() - before;
        let grad_bytes = (4 * (shape.b + shape.c) * shape.d) as u64;
        assert!(
            extra < grad_bytes / 4,
            "a warm step allocated {extra} bytes at its peak; the gradients are {grad_bytes}"
        );
        let again = (host(&stream, &loss), host(&stream, &dx), host(&stream, &dw));
        assert_eq!(first, again, "the caller's outputs, call to call");
        assert!(again.2.iter().any(|&v| v != 0.0), "dw was written");
    }
}
