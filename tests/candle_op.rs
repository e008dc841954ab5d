//! The candle op (`fused_margin::candle::margin_loss`): forward and gradients against this crate's
//! CPU reference for f32, f16 and bf16 and several presets and reductions; the plain softmax case
//! against candle-nn's `cross_entropy` and candle's own autograd; the argument errors.
//!
//! On the CPU the op is the reference itself, rounded once to the tensor dtype, so the CPU tests
//! demand exact equality with that rounding. With feature `candle-cuda` the same comparisons run
//! on the GPU against MATH.md's precision bars; without a device they print why and pass, and
//! with `FUSED_MARGIN_REQUIRE_GPU=1` a missing device fails instead.
#![cfg(feature = "candle")]

use candle_core::{DType, Device, Tensor, Var};
use fused_margin::candle::margin_loss;
use fused_margin::{cpu, Element, MarginLoss, Reduction, Shape, Upstream};
use half::{bf16, f16};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Seeded inputs: x (B x D) and w (C x D) standard normal-ish, labels in 0..C with row 1 ignored.
fn inputs(shape: Shape, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<i64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = |rng: &mut StdRng| -> f32 {
        // Sum of uniforms: roughly normal, enough spread for these tests.
        (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum::<f32>()
    };
    let x = (0..shape.b * shape.d).map(|_| normal(&mut rng)).collect();
    let w = (0..shape.c * shape.d).map(|_| normal(&mut rng)).collect();
    let labels = (0..shape.b)
        .map(|i| {
            if i == 1 {
                -1
            } else {
                rng.random_range(0..shape.c as i64)
            }
        })
        .collect();
    (x, w, labels)
}

/// Every preset, plus options that change the backward (detached margin, lambda blend).
fn presets() -> Vec<(&'static str, MarginLoss)> {
    vec![
        ("arcface", MarginLoss::arcface(0.5).scale(16.0)),
        ("cosface", MarginLoss::cosface(0.35).scale(16.0)),
        ("sphereface", MarginLoss::sphereface(4.0).lambda(5.0)),
        ("combined", MarginLoss::combined(1.0, 0.3, 0.2).scale(8.0)),
        ("nsl", MarginLoss::nsl(10.0)),
        (
            "arcface_detached",
            MarginLoss::arcface(0.5)
                .scale(16.0)
                .gradient(fused_margin::GradientMode::Detached),
        ),
    ]
}

/// What the op returned: loss values (1 or B), dx (B x D), dw (C x D), all as f64.
struct Outputs {
    loss: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
}

/// Runs the op on `device` with `dtype` tensors. For `Reduction::None` the objective is
/// `sum_i g_i l_i` with the seeded weights `g`, so the backward sees a non-trivial per-row
/// upstream; returns the outputs and `g` as the dtype rounded it.
fn run_op(
    device: &Device,
    dtype: DType,
    spec: &MarginLoss,
    shape: Shape,
    seed: u64,
) -> candle_core::Result<(Outputs, Vec<f64>)> {
    let (x, w, labels) = inputs(shape, seed);
    let xt = Var::from_tensor(&Tensor::from_vec(x, (shape.b, shape.d), device)?.to_dtype(dtype)?)?;
    let wt = Var::from_tensor(&Tensor::from_vec(w, (shape.c, shape.d), device)?.to_dtype(dtype)?)?;
    let lt = Tensor::from_vec(labels, shape.b, device)?;
    let loss = margin_loss(xt.as_tensor(), wt.as_tensor(), &lt, spec)?;
    let (objective, g) = if spec.reduction == Reduction::None {
        assert_eq!(loss.dims(), &[shape.b]);
        let g: Vec<f32> = (0..shape.b).map(|i| 0.5 + 0.25 * i as f32).collect();
        let gt = Tensor::from_vec(g, shape.b, device)?.to_dtype(dtype)?;
        let g64 = gt.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        ((&loss * &gt)?.sum_all()?, g64)
    } else {
        assert_eq!(loss.dims(), &[] as &[usize]);
        (loss.clone(), vec![])
    };
    let grads = objective.backward()?;
    let to64 = |t: &Tensor| -> candle_core::Result<Vec<f64>> {
        t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
    };
    let dx = grads.get(xt.as_tensor()).expect("dx");
    let dw = grads.get(wt.as_tensor()).expect("dw");
    assert_eq!(dx.dims(), &[shape.b, shape.d]);
    assert_eq!(dw.dims(), &[shape.c, shape.d]);
    assert_eq!(dx.dtype(), dtype);
    assert_eq!(dw.dtype(), dtype);
    // A scalar loss is f32 for every input dtype (as autocast); row losses keep the dtype.
    let loss_dtype = if spec.reduction == Reduction::None {
        dtype
    } else {
        DType::F32
    };
    assert_eq!(loss.dtype(), loss_dtype);
    Ok((
        Outputs {
            loss: to64(&loss)?,
            dx: to64(dx)?,
            dw: to64(dw)?,
        },
        g,
    ))
}

/// The reference on the inputs as the dtype rounded them: loss values, dx, dw in f64.
fn reference<T: Element>(spec: &MarginLoss, shape: Shape, seed: u64, g: &[f64]) -> Outputs {
    let (x, w, labels) = inputs(shape, seed);
    let round = |v: Vec<f32>| -> Vec<T> { v.into_iter().map(|e| T::from_f64(e as f64)).collect() };
    let (x, w) = (round(x), round(w));
    let labels: Vec<i32> = labels.iter().map(|&l| l as i32).collect();
    let fwd = cpu::forward(spec, &x, &w, &labels, shape).expect("reference forward");
    let upstream = if spec.reduction == Reduction::None {
        Upstream::PerRow(g)
    } else {
        Upstream::ONE
    };
    let grads =
        cpu::backward(spec, &fwd, &x, &w, &labels, shape, upstream).expect("reference backward");
    Outputs {
        loss: if spec.reduction == Reduction::None {
            fwd.row_loss
        } else {
            vec![fwd.loss]
        },
        dx: grads.dx,
        dw: grads.dw,
    }
}

/// Rounds f64 values to `T` and back: what the CPU op must return exactly.
fn rounded<T: Element>(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&e| T::from_f64(e).to_f64()).collect()
}

fn dtypes() -> [DType; 3] {
    [DType::F32, DType::F16, DType::BF16]
}

fn rounded_as(dtype: DType, v: &[f64]) -> Vec<f64> {
    match dtype {
        DType::F32 => rounded::<f32>(v),
        DType::F16 => rounded::<f16>(v),
        DType::BF16 => rounded::<bf16>(v),
        other => panic!("no reference for {other:?}"),
    }
}

fn reference_as(dtype: DType, spec: &MarginLoss, shape: Shape, seed: u64, g: &[f64]) -> Outputs {
    match dtype {
        DType::F32 => reference::<f32>(spec, shape, seed, g),
        DType::F16 => reference::<f16>(spec, shape, seed, g),
        DType::BF16 => reference::<bf16>(spec, shape, seed, g),
        other => panic!("no reference for {other:?}"),
    }
}

/// `|out - ref| / |ref|` (normwise), MATH.md's error measure.
fn rel(out: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let num: f64 = out
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let den: f64 = reference.iter().map(|b| b * b).sum::<f64>().sqrt();
    if out.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    num / den.max(f64::MIN_POSITIVE)
}

#[test]
fn cpu_op_equals_the_reference_rounded_for_every_dtype_preset_and_reduction() {
    let shape = Shape::new(7, 24, 13);
    for dtype in dtypes() {
        for (name, base) in presets() {
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let spec = base.reduction(reduction);
                let seed = 11;
                let (out, g) = run_op(&Device::Cpu, dtype, &spec, shape, seed).unwrap();
                let r = reference_as(dtype, &spec, shape, seed, &g);
                let what = format!("{name} {dtype:?} {reduction:?}");
                let loss_dtype = if reduction == Reduction::None {
                    dtype
                } else {
                    DType::F32
                };
                assert_eq!(out.loss, rounded_as(loss_dtype, &r.loss), "loss, {what}");
                assert_eq!(out.dx, rounded_as(dtype, &r.dx), "dx, {what}");
                assert_eq!(out.dw, rounded_as(dtype, &r.dw), "dw, {what}");
                assert!(out.dx.iter().any(|&v| v != 0.0), "dx all zero, {what}");
            }
        }
    }
}

/// ArcFace at s = 64 summed over 2,048 rows is about 125,000, beyond f16's 65,504: the f16 and
/// bf16 ops return that sum in f32 (finite), close to the f32 op's (inputs rounded to f16 or
/// bf16 move it a little), and the mean as well; backward still gives f16/bf16 gradients.
#[test]
fn half_precision_sum_over_2048_rows_is_a_finite_f32_loss() {
    let shape = Shape::new(2048, 32, 300);
    let (x, w, labels) = inputs(shape, 12);
    let dev = Device::Cpu;
    let labels = Tensor::from_vec(labels, shape.b, &dev).unwrap();
    let x32 = Tensor::from_vec(x, (shape.b, shape.d), &dev).unwrap();
    let w32 = Tensor::from_vec(w, (shape.c, shape.d), &dev).unwrap();
    for reduction in [Reduction::Sum, Reduction::Mean] {
        let spec = MarginLoss::arcface(0.5).scale(64.0).reduction(reduction);
        let full = margin_loss(&x32, &w32, &labels, &spec)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if reduction == Reduction::Sum {
            assert!(full > 65504.0, "the case must overflow f16: sum {full}");
        }
        for (dtype, bar) in [(DType::F16, 1e-4), (DType::BF16, 1e-3)] {
            let x = Var::from_tensor(&x32.to_dtype(dtype).unwrap()).unwrap();
            let w = Var::from_tensor(&w32.to_dtype(dtype).unwrap()).unwrap();
            let loss = margin_loss(x.as_tensor(), w.as_tensor(), &labels, &spec).unwrap();
            assert_eq!(loss.dtype(), DType::F32, "{dtype:?} {reduction:?}");
            let v = loss.to_scalar::<f32>().unwrap();
            assert!(v.is_finite(), "{dtype:?} {reduction:?}: loss {v}");
            let e = ((v - full) / full).abs();
            assert!(e <= bar, "{dtype:?} {reduction:?}: {v} vs f32 {full} ({e})");
            let grads = loss.backward().unwrap();
            let dx = grads.get(x.as_tensor()).unwrap();
            assert_eq!(dx.dtype(), dtype);
            let dx = dx.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            assert!(dx.to_vec1::<f32>().unwrap().iter().all(|g| g.is_finite()));
        }
    }
}

#[test]
fn ignored_rows_get_zero_loss_and_zero_gradient() {
    let shape = Shape::new(5, 8, 6);
    let spec = MarginLoss::arcface(0.5)
        .scale(8.0)
        .reduction(Reduction::None);
    let (out, _) = run_op(&Device::Cpu, DType::F32, &spec, shape, 3).unwrap();
    // Row 1 has label -1 (see `inputs`).
    assert_eq!(out.loss[1], 0.0);
    assert!(out.dx[shape.d..2 * shape.d].iter().all(|&v| v == 0.0));
    assert!(out.loss[0] > 0.0 && out.loss[2] > 0.0);
}

/// All margins 0, scale 1, no normalization: `z = x w^T`, so the loss is plain softmax
/// cross-entropy on those logits. candle-nn's `cross_entropy` and candle's autograd through
/// `x.matmul(w^T)` must agree with the op (f32 arithmetic on candle's side: MATH.md's f32 bars).
fn cross_entropy_case(device: &Device) -> candle_core::Result<()> {
    let shape = Shape::new(9, 16, 11);
    let (x, w, labels) = inputs(shape, 5);
    let labels: Vec<u32> = labels.iter().map(|&l| l.max(0) as u32).collect();
    let xv = Var::from_tensor(&Tensor::from_vec(x, (shape.b, shape.d), device)?)?;
    let wv = Var::from_tensor(&Tensor::from_vec(w, (shape.c, shape.d), device)?)?;
    let lt = Tensor::from_vec(labels, shape.b, device)?;
    let spec = MarginLoss::nsl(1.0)
        .normalize_features(false)
        .normalize_weights(false);

    let ours = margin_loss(xv.as_tensor(), wv.as_tensor(), &lt, &spec)?;
    let ours_grads = ours.backward()?;
    let logits = xv.as_tensor().matmul(&wv.as_tensor().t()?)?;
    let theirs = candle_nn::loss::cross_entropy(&logits, &lt)?;
    let theirs_grads = theirs.backward()?;

    let v = |t: &Tensor| -> candle_core::Result<Vec<f64>> {
        t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
    };
    let (a, b) = (v(&ours)?, v(&theirs)?);
    assert!(rel(&a, &b) <= 1e-5, "loss: ours {a:?}, cross_entropy {b:?}");
    for (name, var) in [("dx", &xv), ("dw", &wv)] {
        let a = v(ours_grads.get(var.as_tensor()).expect("ours"))?;
        let b = v(theirs_grads.get(var.as_tensor()).expect("theirs"))?;
        let e = rel(&a, &b);
        assert!(e <= 1e-4, "{name}: normwise relative difference {e}");
    }
    Ok(())
}

#[test]
fn plain_softmax_case_equals_candle_nn_cross_entropy_and_its_gradients() {
    cross_entropy_case(&Device::Cpu).unwrap();
}

#[test]
fn backward_can_run_twice_on_one_loss() {
    // The forward's saved statistics stay with the graph, so a second backward sees them too.
    let dev = Device::Cpu;
    let shape = Shape::new(6, 8, 5);
    let (x, w, labels) = inputs(shape, 8);
    let x = Var::from_tensor(&Tensor::from_vec(x, (6, 8), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::from_vec(w, (5, 8), &dev).unwrap()).unwrap();
    let labels = Tensor::from_vec(labels, 6, &dev).unwrap();
    let loss = margin_loss(
        x.as_tensor(),
        w.as_tensor(),
        &labels,
        &MarginLoss::default(),
    )
    .unwrap();
    let a = loss.backward().unwrap();
    let b = loss.backward().unwrap();
    for t in [x.as_tensor(), w.as_tensor()] {
        let ga = a
            .get(t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let gb = b
            .get(t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(ga, gb);
        assert!(ga.iter().any(|&v| v != 0.0));
    }
}

/// The backward op returns dx and dw as two views of one buffer (`bwd` narrows them out; their
/// layout is unit-tested in src/candle.rs): through candle's gradient store and an optimizer step
/// they behave as any gradient, dims and values, in every dtype.
#[test]
fn gradients_from_one_buffer_train_like_any_other() {
    use candle_nn::Optimizer;
    let dev = Device::Cpu;
    let shape = Shape::new(3, 7, 5);
    let (x, w, labels) = inputs(shape, 12);
    let spec = MarginLoss::arcface(0.5).scale(8.0);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let var = |v: &[f32], dims: (usize, usize)| {
            let t = Tensor::from_vec(v.to_vec(), dims, &dev).unwrap();
            Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
        };
        let (xt, wt) = (var(&x, (3, 7)), var(&w, (5, 7)));
        let lt = Tensor::from_vec(labels.clone(), 3, &dev).unwrap();
        let loss = margin_loss(xt.as_tensor(), wt.as_tensor(), &lt, &spec).unwrap();
        let grads = loss.backward().unwrap();
        let (dx, dw) = (
            grads.get(xt.as_tensor()).unwrap(),
            grads.get(wt.as_tensor()).unwrap(),
        );
        assert_eq!(
            (dx.dims(), dw.dims()),
            (&[3, 7][..], &[5, 7][..]),
            "{dtype:?}"
        );
        // SGD on the two views moves w by exactly -lr dw (the reference's dw, rounded).
        let v = |t: &Tensor| {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let (w0, dw0) = (v(wt.as_tensor()), v(dw));
        let mut sgd = candle_nn::SGD::new(vec![wt.clone()], 0.5).unwrap();
        sgd.backward_step(&loss).unwrap();
        let want: Vec<f64> = w0.iter().zip(&dw0).map(|(a, g)| a - 0.5 * g).collect();
        let got = v(wt.as_tensor());
        let tol = if dtype == DType::F32 { 1e-6 } else { 2e-2 };
        for (k, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= tol * (1.0 + b.abs()),
                "{dtype:?} w[{k}]: {a} vs {b}"
            );
        }
        assert_ne!(got, w0, "{dtype:?}: the step moved w");
    }
}

/// The error of a call, as text (the op must fail).
fn err_text(r: candle_core::Result<Tensor>) -> String {
    match r {
        Ok(t) => panic!("expected an error, got a tensor of shape {:?}", t.dims()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "error {text:?} does not mention {p:?}");
    }
}

#[test]
fn non_contiguous_inputs_are_errors_naming_shape_and_stride() {
    let dev = Device::Cpu;
    let spec = MarginLoss::arcface(0.5);
    let labels = Tensor::new(&[0i64, 1, 2, 3], &dev).unwrap();
    let w = Tensor::zeros((5, 8), DType::F32, &dev).unwrap();
    // (8, 4) transposed: shape [4, 8], stride [1, 4].
    let xt = Tensor::ones((8, 4), DType::F32, &dev).unwrap().t().unwrap();
    let text = err_text(margin_loss(&xt, &w, &labels, &spec));
    assert_mentions(&text, &["x must be contiguous", "[4, 8]", "[1, 4]"]);
    let x = Tensor::ones((4, 8), DType::F32, &dev).unwrap();
    let wt = Tensor::ones((8, 5), DType::F32, &dev).unwrap().t().unwrap();
    let text = err_text(margin_loss(&x, &wt, &labels, &spec));
    assert_mentions(&text, &["w must be contiguous", "[5, 8]", "[1, 5]"]);
    // Strided labels are fine: they are converted, not read in place.
    let strided = Tensor::new(&[[0i64, 9], [1, 9], [2, 9], [3, 9]], &dev)
        .unwrap()
        .narrow(1, 0, 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    assert!(!strided.is_contiguous());
    let w = Tensor::ones((5, 8), DType::F32, &dev).unwrap();
    assert!(margin_loss(&x, &w, &strided, &spec).is_ok());
}

#[test]
fn wrong_shapes_ranks_dtypes_and_labels_are_errors_naming_the_values() {
    let dev = Device::Cpu;
    let spec = MarginLoss::arcface(0.5);
    let x = Tensor::ones((4, 8), DType::F32, &dev).unwrap();
    let w = Tensor::ones((5, 8), DType::F32, &dev).unwrap();
    let labels = Tensor::new(&[0i64, 1, 2, 3], &dev).unwrap();

    let w7 = Tensor::ones((5, 7), DType::F32, &dev).unwrap();
    let text = err_text(margin_loss(&x, &w7, &labels, &spec));
    assert_mentions(&text, &["[4, 8]", "[5, 7]", "D must be 8"]);

    let l3 = Tensor::new(&[0i64, 1, 2], &dev).unwrap();
    let text = err_text(margin_loss(&x, &w, &l3, &spec));
    assert_mentions(&text, &["labels [3]", "must be [4]"]);

    let x3 = Tensor::ones((4, 8, 1), DType::F32, &dev).unwrap();
    let text = err_text(margin_loss(&x3, &w, &labels, &spec));
    assert_mentions(&text, &["rank 2", "[4, 8, 1]"]);

    let wh = w.to_dtype(DType::F16).unwrap();
    let text = err_text(margin_loss(&x, &wh, &labels, &spec));
    assert_mentions(&text, &["same dtype", "F32", "F16"]);

    // A loss with state needs it: refused before anything runs, naming what to pass.
    let text = err_text(margin_loss(&x, &w, &labels, &MarginLoss::adaface()));
    assert_mentions(&text, &["AdaFace", "RowInputs::state", "ADAFACE_INIT"]);
    // Sub-centers: w's rows must be a multiple of K.
    let text = err_text(margin_loss(&x, &w, &labels, &MarginLoss::subcenter(3)));
    assert_mentions(&text, &["3 sub-centers", "[5, 8]", "multiple of 3"]);

    let x64 = x.to_dtype(DType::F64).unwrap();
    let w64 = w.to_dtype(DType::F64).unwrap();
    let text = err_text(margin_loss(&x64, &w64, &labels, &spec));
    assert_mentions(&text, &["f32, f16, bf16", "F64"]);

    let lf = Tensor::new(&[0f32, 1., 2., 3.], &dev).unwrap();
    let text = err_text(margin_loss(&x, &w, &lf, &spec));
    assert_mentions(&text, &["labels must be integers", "F32"]);

    for labels in [
        Tensor::new(&[0i64, 1, 7, 3], &dev).unwrap(),
        Tensor::new(&[0i32, 1, 7, 3], &dev).unwrap(),
        Tensor::new(&[0u32, 1, 7, 3], &dev).unwrap(),
    ] {
        let text = err_text(margin_loss(&x, &w, &labels, &spec));
        assert_mentions(&text, &["label 7", "row 2", "C = 5"]);
    }
    let big = Tensor::new(&[0i64, 1, 1 << 40, 3], &dev).unwrap();
    let text = err_text(margin_loss(&x, &w, &big, &spec));
    assert_mentions(&text, &["label 1099511627776", "row 2", "C = 5"]);

    let text = err_text(margin_loss(
        &x,
        &w,
        &labels,
        &MarginLoss::arcface(0.5).scale(-1.0),
    ));
    assert_mentions(&text, &["s = -1"]);
}

#[test]
fn every_integer_label_dtype_gives_the_same_result() {
    let dev = Device::Cpu;
    let shape = Shape::new(4, 8, 5);
    let (x, w, _) = inputs(shape, 9);
    let x = Tensor::from_vec(x, (4, 8), &dev).unwrap();
    let w = Tensor::from_vec(w, (5, 8), &dev).unwrap();
    let spec = MarginLoss::cosface(0.35).scale(8.0);
    let base = margin_loss(&x, &w, &Tensor::new(&[0i64, 4, 2, 3], &dev).unwrap(), &spec)
        .unwrap()
        .to_vec0::<f32>()
        .unwrap();
    for labels in [
        Tensor::new(&[0i32, 4, 2, 3], &dev).unwrap(),
        Tensor::new(&[0u32, 4, 2, 3], &dev).unwrap(),
        Tensor::new(&[0u8, 4, 2, 3], &dev).unwrap(),
        Tensor::new(&[0i16, 4, 2, 3], &dev).unwrap(),
    ] {
        let dtype = labels.dtype();
        let v = margin_loss(&x, &w, &labels, &spec)
            .unwrap()
            .to_vec0::<f32>()
            .unwrap();
        assert_eq!(v, base, "labels {dtype:?}");
    }
    // The i64 loss itself is the reference's.
    let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let ws = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let r = cpu::forward(&spec, &xs, &ws, &[0, 4, 2, 3], shape).unwrap();
    assert_eq!(base, r.loss as f32);
}

/// The five losses with per-row inputs or state, each with what it takes (AdaFace's and
/// CurricularFace's state, ElasticFace's seeded margins; sub-center ArcFace's K).
fn state_cases() -> Vec<(&'static str, MarginLoss, fused_margin::RowInputs<'static>)> {
    use fused_margin::{
        ElasticKind, ElasticMargins, ElasticPlus, ElasticRng, LossState, RowInputs,
    };
    let rng = ElasticMargins::Seeded(ElasticRng {
        seed: 5,
        step: 7,
        row_offset: 0,
    });
    vec![
        (
            "subcenter",
            MarginLoss::subcenter(3).scale(16.0),
            RowInputs::default(),
        ),
        (
            "adaface",
            MarginLoss::adaface().scale(16.0),
            RowInputs::with_state(LossState::AdaFace {
                mean: 4.0,
                std: 1.5,
            }),
        ),
        (
            "curricular",
            MarginLoss::curricularface().scale(16.0),
            RowInputs::with_state(LossState::CurricularFace { t: 0.2 }),
        ),
        (
            "magface",
            MarginLoss::magface().scale(16.0),
            RowInputs::default(),
        ),
        (
            "elastic+",
            MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::Rank).scale(16.0),
            RowInputs::with_margins(rng),
        ),
    ]
}

/// Runs `margin_loss_with_inputs` on `device` (w has C*K rows with sub-centers; x rows scaled
/// so MagFace's norms sit inside its clamp); returns the loss, dx, dw and the state out, and the
/// reference of the same rounded inputs.
fn run_state_case(
    device: &Device,
    dtype: DType,
    spec: &MarginLoss,
    rows: &fused_margin::RowInputs<'_>,
    shape: Shape,
    seed: u64,
) -> (
    Outputs,
    Option<fused_margin::LossState>,
    Outputs,
    Option<fused_margin::LossState>,
) {
    let k = spec.variant.centers();
    let wide = Shape::new(shape.b, shape.d, shape.c * k);
    let (x, w, labels) = inputs(wide, seed);
    let labels: Vec<i64> = labels
        .iter()
        .map(|&l| if l < 0 { l } else { l / k as i64 })
        .collect();
    // Norms 8 .. 40: MagFace's clamp [10, 110] is crossed, AdaFace's z spreads.
    let x: Vec<f32> = x
        .chunks(shape.d)
        .enumerate()
        .flat_map(|(i, r)| {
            let n = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
            let target = 8.0 + 32.0 * ((5 * i) % shape.b) as f32 / shape.b as f32;
            r.iter().map(move |v| v * target / n).collect::<Vec<_>>()
        })
        .collect();
    let xt = Var::from_tensor(
        &Tensor::from_vec(x.clone(), (shape.b, shape.d), device)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
    .unwrap();
    let wt = Var::from_tensor(
        &Tensor::from_vec(w.clone(), (shape.c * k, shape.d), device)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
    .unwrap();
    let lt = Tensor::from_vec(labels.clone(), shape.b, device).unwrap();
    let (loss, state) = fused_margin::candle::margin_loss_with_inputs(
        xt.as_tensor(),
        wt.as_tensor(),
        &lt,
        spec,
        &fused_margin::cuda::Options::default(),
        rows,
    )
    .unwrap();
    let grads = loss.backward().unwrap();
    let to64 = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let dw = grads.get(wt.as_tensor()).expect("dw");
    assert_eq!(dw.dims(), &[shape.c * k, shape.d]);
    let out = Outputs {
        loss: to64(&loss),
        dx: to64(grads.get(xt.as_tensor()).expect("dx")),
        dw: to64(dw),
    };
    // The reference on the inputs as the dtype rounded them.
    let round = |v: &[f32]| -> Vec<f64> {
        let t = Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu).unwrap();
        to64(&t.to_dtype(dtype).unwrap())
    };
    let (x64, w64) = (round(&x), round(&w));
    let l32: Vec<i32> = labels.iter().map(|&l| l as i32).collect();
    let fwd = cpu::forward_with(spec, &x64, &w64, &l32, shape, rows).unwrap();
    let g = cpu::backward(spec, &fwd, &x64, &w64, &l32, shape, Upstream::ONE).unwrap();
    let r = Outputs {
        loss: vec![fwd.loss],
        dx: g.dx,
        dw: g.dw,
    };
    (out, state, r, fwd.state)
}

/// On the CPU the op is the reference rounded once: every loss with state, every dtype, and its
/// state out (the same f64 values).
#[test]
fn cpu_op_runs_the_losses_with_state() {
    let shape = Shape::new(9, 16, 11);
    for dtype in dtypes() {
        for (name, spec, rows) in state_cases() {
            let (out, state, r, r_state) =
                run_state_case(&Device::Cpu, dtype, &spec, &rows, shape, 31);
            let what = format!("{name} {dtype:?}");
            assert_eq!(out.loss, rounded_as(DType::F32, &r.loss), "loss, {what}");
            assert_eq!(out.dx, rounded_as(dtype, &r.dx), "dx, {what}");
            assert_eq!(out.dw, rounded_as(dtype, &r.dw), "dw, {what}");
            assert_eq!(state, r_state, "state, {what}");
            assert_eq!(
                state.is_some(),
                spec.variant.initial_state().is_some(),
                "{what}"
            );
        }
    }
}

#[cfg(feature = "candle-cuda")]
mod gpu {
    use super::*;

    /// The losses with state through the op on the GPU: MATH.md's bars, the state out to the loss
    /// bar (relative, floor 1e-3).
    #[test]
    fn gpu_op_runs_the_losses_with_state() {
        let Some(dev) = device() else { return };
        let shape = Shape::new(37, 72, 101);
        for dtype in dtypes() {
            let (loss_bar, grad_bar) = bars(dtype);
            for (name, spec, rows) in state_cases() {
                let (out, state, r, r_state) = run_state_case(&dev, dtype, &spec, &rows, shape, 41);
                let what = format!("{name} {dtype:?}");
                let e = rel(&out.loss, &r.loss);
                assert!(e <= loss_bar, "loss {what}: {e} > {loss_bar}");
                let e = rel(&out.dx, &r.dx);
                assert!(e <= grad_bar, "dx {what}: {e} > {grad_bar}");
                let e = rel(&out.dw, &r.dw);
                assert!(e <= grad_bar, "dw {what}: {e} > {grad_bar}");
                let pairs = match (state, r_state) {
                    (None, None) => vec![],
                    (
                        Some(fused_margin::LossState::AdaFace { mean, std }),
                        Some(fused_margin::LossState::AdaFace { mean: m, std: s }),
                    ) => vec![(mean, m), (std, s)],
                    (
                        Some(fused_margin::LossState::CurricularFace { t }),
                        Some(fused_margin::LossState::CurricularFace { t: u }),
                    ) => vec![(t, u)],
                    (o, r) => panic!("{what}: state {o:?} vs {r:?}"),
                };
                for (o, r) in pairs {
                    assert!(
                        (o - r).abs() <= loss_bar * r.abs().max(1e-3),
                        "{what}: state {o} vs {r}"
                    );
                }
            }
        }
    }

    /// Device 0, or `None` (with the reason printed) when there is none and none is required.
    fn device() -> Option<Device> {
        let required = std::env::var("FUSED_MARGIN_REQUIRE_GPU").as_deref() == Ok("1");
        if !fused_margin::cuda::device_available() {
            assert!(
                !required,
                "FUSED_MARGIN_REQUIRE_GPU=1 but no CUDA device/driver was found"
            );
            eprintln!("skipped: no CUDA driver or device on this machine");
            return None;
        }
        Some(Device::new_cuda(0).expect("candle CUDA device 0"))
    }

    /// MATH.md's bars (loss, gradients) for the fused kernels, per input dtype.
    fn bars(dtype: DType) -> (f64, f64) {
        match dtype {
            DType::F32 => (1e-5, 1e-4),
            DType::F16 => (1e-3, 5e-3),
            DType::BF16 => (5e-3, 2e-2),
            other => panic!("no bar for {other:?}"),
        }
    }

    #[test]
    fn gpu_op_matches_the_reference_for_every_dtype_preset_and_reduction() {
        let Some(dev) = device() else { return };
        // Not powers of two, more classes than one tile.
        let shape = Shape::new(37, 72, 101);
        for dtype in dtypes() {
            let (loss_bar, grad_bar) = bars(dtype);
            for (name, base) in presets() {
                for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                    let spec = base.reduction(reduction);
                    let seed = 21;
                    let (out, g) = run_op(&dev, dtype, &spec, shape, seed).unwrap();
                    let r = reference_as(dtype, &spec, shape, seed, &g);
                    let what = format!("{name} {dtype:?} {reduction:?}");
                    let e = rel(&out.loss, &r.loss);
                    assert!(e <= loss_bar, "loss {what}: {e} > {loss_bar}");
                    let e = rel(&out.dx, &r.dx);
                    assert!(e <= grad_bar, "dx {what}: {e} > {grad_bar}");
                    let e = rel(&out.dw, &r.dw);
                    assert!(e <= grad_bar, "dw {what}: {e} > {grad_bar}");
                }
            }
        }
    }

    #[test]
    fn gpu_plain_softmax_case_equals_candle_nn_cross_entropy() {
        let Some(dev) = device() else { return };
        cross_entropy_case(&dev).unwrap();
    }

    #[test]
    fn gpu_errors_name_the_values() {
        let Some(dev) = device() else { return };
        let spec = MarginLoss::arcface(0.5);
        let x = Tensor::ones((4, 8), DType::F32, &dev).unwrap();
        let w = Tensor::ones((5, 8), DType::F32, &dev).unwrap();
        let labels = Tensor::new(&[0i64, 1, 7, 3], &dev).unwrap();
        let text = err_text(margin_loss(&x, &w, &labels, &spec));
        assert_mentions(&text, &["label 7", "row 2", "C = 5"]);
        // i32 labels are checked on the device by default: the loss is NaN and the backward
        // reports the label; with the host check the forward does.
        let l32 = Tensor::new(&[0i32, 1, 7, 3], &dev).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let loss = margin_loss(xv.as_tensor(), &w, &l32, &spec).unwrap();
        assert!(loss.to_scalar::<f32>().unwrap().is_nan());
        let text = match loss.backward() {
            Ok(_) => panic!("expected the backward to report the label"),
            Err(e) => e.to_string(),
        };
        assert_mentions(&text, &["label 7", "row 2", "C = 5"]);
        let mut host = fused_margin::cuda::Options::default();
        host.label_check = fused_margin::cuda::LabelCheck::Host;
        let text = err_text(fused_margin::candle::margin_loss_with(
            &x, &w, &l32, &spec, &host,
        ));
        assert_mentions(&text, &["label 7", "row 2", "C = 5"]);
        let xt = Tensor::ones((8, 4), DType::F32, &dev).unwrap().t().unwrap();
        let text = err_text(margin_loss(&xt, &w, &labels, &spec));
        assert_mentions(&text, &["x must be contiguous", "[4, 8]", "[1, 4]"]);
        let cpu_w = Tensor::ones((5, 8), DType::F32, &Device::Cpu).unwrap();
        let text = err_text(margin_loss(&x, &cpu_w, &labels, &spec));
        assert_mentions(&text, &["one device"]);
    }

    #[test]
    fn gpu_repeated_calls_agree() {
        let Some(dev) = device() else { return };
        let shape = Shape::new(16, 32, 40);
        let spec = MarginLoss::arcface(0.5).scale(16.0);
        let first = run_op(&dev, DType::F32, &spec, shape, 4).unwrap().0;
        // The cached handle serves the second call; the kernels are deterministic.
        let second = run_op(&dev, DType::F32, &spec, shape, 4).unwrap().0;
        assert_eq!(first.loss, second.loss);
        assert_eq!(first.dx, second.dx);
        assert_eq!(first.dw, second.dw);
    }
}

/// `MarginHead` is the op against a `VarBuilder` variable: the same loss and gradients as
/// `margin_loss` on that weight, the weight registered in the `VarMap` (so an optimizer trains it),
/// options accepted (CPU tensors: the reference whatever they say), and a bad spec refused.
#[test]
fn margin_head_is_the_op_on_its_own_weights() {
    use candle_nn::{VarBuilder, VarMap};
    use fused_margin::candle::{margin_loss_with, MarginHead};
    let dev = Device::Cpu;
    let shape = Shape::new(6, 5, 9);
    let (x, _, labels) = inputs(shape, 31);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let spec = MarginLoss::cosface(0.35);
    let head = MarginHead::new(vb.pp("head"), shape.c, shape.d, spec).unwrap();
    assert_eq!(head.weight().dims(), &[shape.c, shape.d]);
    let vars = varmap.all_vars();
    assert_eq!(vars.len(), 1, "the class weights are the VarMap's");
    let x = Var::from_tensor(&Tensor::from_vec(x, (shape.b, shape.d), &dev).unwrap()).unwrap();
    let y = Tensor::from_vec(labels, shape.b, &dev).unwrap();
    let loss = head.forward(x.as_tensor(), &y).unwrap();
    let grads = loss.backward().unwrap();
    let direct = margin_loss(x.as_tensor(), head.weight(), &y, &spec).unwrap();
    let dgrads = direct.backward().unwrap();
    let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(v(&loss), v(&direct));
    let dw = grads
        .get(vars[0].as_tensor())
        .expect("a gradient for the head's weight");
    assert_eq!(v(dw), v(dgrads.get(head.weight()).unwrap()));
    assert_eq!(
        v(grads.get(x.as_tensor()).unwrap()),
        v(dgrads.get(x.as_tensor()).unwrap())
    );
    let mut o = fused_margin::cuda::Options::default();
    o.tensor_cores = false;
    let with = head.clone().with_options(o.clone());
    assert_eq!(v(&with.forward(x.as_tensor(), &y).unwrap()), v(&loss));
    let again = margin_loss_with(x.as_tensor(), head.weight(), &y, &spec, &o).unwrap();
    assert_eq!(v(&again), v(&loss));
    let bad = MarginHead::new(
        vb.pp("bad"),
        shape.c,
        shape.d,
        MarginLoss::arcface(0.5).scale(-1.0),
    );
    let e = bad.unwrap_err().to_string();
    assert!(e.contains("s = -1"), "{e}");
}
