//! The non-finite policy of the CPU reference (docs/MATH.md, "Non-finite input", and the
//! rustdoc of `cpu::forward`): NaN and +-Inf in `x` or `w` are not checked and are no error; they
//! propagate through IEEE arithmetic as in PyTorch (`F.normalize` + linear + `cross_entropy`), and
//! only what depends on the bad value becomes non-finite.

mod common;

use common::*;
use fused_margin::{cpu, GradientMode, MarginLoss, OverflowPolicy, Reduction, Shape, Upstream};
use half::bf16;

/// Specs covering every path a row can take: no angular margin, angular margin under each
/// policy, feature norm as scale, unnormalized weights, lambda, detached gradient.
fn specs() -> Vec<MarginLoss> {
    vec![
        MarginLoss::nsl(16.0),
        MarginLoss::cosface(0.35),
        MarginLoss::arcface(0.5),
        MarginLoss::arcface(0.5).policy(OverflowPolicy::Raw),
        MarginLoss::arcface(0.5).policy(OverflowPolicy::Easy),
        MarginLoss::combined(2.0, 0.3, 0.2),
        MarginLoss::sphereface(4.0).lambda(5.0),
        MarginLoss::cosface(0.35).normalize_weights(false),
        MarginLoss::arcface(0.5).gradient(GradientMode::Detached),
    ]
}

/// A finite problem: B=6, D=5, C=7, row 5 ignored.
fn case(seed: u64) -> (Shape, Vec<f64>, Vec<f64>, Vec<i32>) {
    let shape = Shape::new(6, 5, 7);
    let mut r = rng(seed);
    let x = rows(&mut r, shape.b, shape.d, (0.5, 2.0));
    let w = rows(&mut r, shape.c, shape.d, (0.5, 0.95));
    let mut l = labels(&mut r, shape.b, shape.c);
    l[5] = -1;
    (shape, x, w, l)
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|e| e.to_bits()).collect()
}

fn row(v: &[f64], d: usize, i: usize) -> &[f64] {
    &v[i * d..(i + 1) * d]
}

/// The values a test writes into one entry of `x` or `w`.
const BAD: [f64; 3] = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];

#[test]
fn a_non_finite_x_row_poisons_its_loss_and_dw_only() {
    let (shape, x, w, labels) = case(1);
    let d = shape.d;
    let bad_row = 2;
    for base in specs() {
        for bad in BAD {
            let mut xb = x.clone();
            xb[bad_row * d + 3] = bad;
            // Reduction none: the other rows' losses and lse are bit-identical to the clean run.
            let spec = base.reduction(Reduction::None);
            let up: Vec<f64> = (0..shape.b).map(|i| 0.5 + i as f64).collect();
            let (clean, gc) = run(&spec, &x, &w, &labels, shape, Some(&up));
            let fwd = cpu::forward(&spec, &xb, &w, &labels, shape).expect("no error on NaN/Inf");
            let what = format!("{spec:?}, x[{bad_row}][3] = {bad}");
            assert!(fwd.row_loss[bad_row].is_nan(), "{what}: row loss");
            assert!(fwd.loss.is_nan(), "{what}: sum of the row losses");
            for i in (0..shape.b).filter(|&i| i != bad_row) {
                assert_eq!(
                    fwd.row_loss[i].to_bits(),
                    clean.row_loss[i].to_bits(),
                    "{what}: row {i} changed"
                );
                assert_eq!(fwd.lse[i].to_bits(), clean.lse[i].to_bits(), "{what}");
            }
            // Backward: dx of the bad row and every dw row are non-finite, the other dx rows are
            // bit-identical to the clean run.
            let g = cpu::backward(&spec, &fwd, &xb, &w, &labels, shape, Upstream::PerRow(&up))
                .expect("no error on NaN/Inf");
            assert!(
                row(&g.dx, d, bad_row).iter().any(|v| !v.is_finite()),
                "{what}"
            );
            for j in 0..shape.c {
                assert!(
                    row(&g.dw, d, j).iter().any(|v| !v.is_finite()),
                    "{what}: dw {j}"
                );
            }
            for i in (0..shape.b).filter(|&i| i != bad_row) {
                assert_eq!(
                    bits(row(&g.dx, d, i)),
                    bits(row(&gc.dx, d, i)),
                    "{what}: dx {i}"
                );
            }
            // Mean and sum: the reduced loss is NaN.
            for red in [Reduction::Mean, Reduction::Sum] {
                let spec = base.reduction(red);
                let fwd = cpu::forward(&spec, &xb, &w, &labels, shape).unwrap();
                assert!(fwd.loss.is_nan(), "{what}, {red:?}");
                let g = cpu::backward(&spec, &fwd, &xb, &w, &labels, shape, Upstream::ONE).unwrap();
                assert!(g.dw.iter().any(|v| !v.is_finite()), "{what}, {red:?}");
            }
        }
    }
}

#[test]
fn a_non_finite_ignored_row_changes_nothing_but_its_own_dx() {
    let (shape, x, w, labels) = case(2);
    let d = shape.d;
    let ignored = 5;
    assert!(labels[ignored] < 0);
    for base in specs() {
        for red in [Reduction::Mean, Reduction::Sum] {
            let spec = base.reduction(red);
            for bad in BAD {
                let mut xb = x.clone();
                xb[ignored * d] = bad;
                let what = format!("{spec:?}, ignored row = {bad}");
                let (clean, gc) = run(&spec, &x, &w, &labels, shape, None);
                let (fwd, g) = run(&spec, &xb, &w, &labels, shape, None);
                assert_eq!(fwd.loss.to_bits(), clean.loss.to_bits(), "{what}: loss");
                assert_eq!(fwd.row_loss[ignored], 0.0, "{what}");
                assert_eq!(bits(&g.dw), bits(&gc.dw), "{what}: dw");
                for i in (0..shape.b).filter(|&i| i != ignored) {
                    assert_eq!(bits(row(&g.dx, d, i)), bits(row(&gc.dx, d, i)), "{what}");
                }
                // The row's own dx is 0 * NaN through the normalization backward (as in PyTorch).
                assert!(row(&g.dx, d, ignored).iter().all(|v| v.is_nan()), "{what}");
            }
        }
    }
}

#[test]
fn a_non_finite_class_row_poisons_every_counted_row() {
    let (shape, x, w, labels) = case(3);
    let d = shape.d;
    for base in specs() {
        if !base.normalize_weights {
            continue; // below
        }
        for bad in BAD {
            for j in [0, 4, shape.c - 1] {
                let mut wb = w.clone();
                wb[j * d + 1] = bad;
                let spec = base.reduction(Reduction::None);
                let up = vec![1.0; shape.b];
                let what = format!("{spec:?}, w[{j}][1] = {bad}");
                let (fwd, g) = run(&spec, &x, &wb, &labels, shape, Some(&up));
                for (i, &l) in labels.iter().enumerate() {
                    if l >= 0 {
                        assert!(fwd.row_loss[i].is_nan(), "{what}: row {i}");
                        assert!(
                            row(&g.dx, d, i).iter().all(|v| v.is_nan()),
                            "{what}: dx {i}"
                        );
                    } else {
                        assert_eq!(fwd.row_loss[i], 0.0, "{what}: ignored row {i}");
                    }
                }
                assert!(fwd.loss.is_nan(), "{what}");
                assert!(g.dw.iter().all(|v| v.is_nan()), "{what}: dw");
            }
        }
    }
}

#[test]
fn an_infinite_unnormalized_class_row_leaves_something_non_finite_in_every_counted_row() {
    // Without weight normalization an infinite entry gives infinite logits: +Inf makes the row's
    // loss non-finite; -Inf drops the class from the softmax (exp(-Inf) = 0, as PyTorch) and
    // leaves the loss finite, but the row's dx is NaN (0 * Inf). Never all finite.
    let (shape, x, w, labels) = case(4);
    let d = shape.d;
    for base in [
        MarginLoss::cosface(0.35),
        MarginLoss::nsl(8.0),
        MarginLoss::arcface(0.5),
    ] {
        let spec = base.normalize_weights(false).reduction(Reduction::None);
        for bad in BAD {
            for j in [0, 3, shape.c - 1] {
                let mut wb = w.clone();
                wb[j * d + 2] = bad;
                let up = vec![1.0; shape.b];
                let (fwd, g) = run(&spec, &x, &wb, &labels, shape, Some(&up));
                for (i, &l) in labels.iter().enumerate().filter(|(_, &l)| l >= 0) {
                    let all_finite = fwd.row_loss[i].is_finite()
                        && row(&g.dx, d, i).iter().all(|v| v.is_finite());
                    assert!(
                        !all_finite,
                        "{spec:?}, w[{j}][2] = {bad}, row {i} (label {l}): all finite"
                    );
                }
            }
        }
    }
}

#[test]
fn non_finite_low_precision_inputs_propagate_the_same_way() {
    let (shape, x, w, labels) = case(5);
    let d = shape.d;
    let spec = MarginLoss::arcface(0.5).reduction(Reduction::None);
    let up = vec![1.0; shape.b];
    for bad in BAD {
        let mut xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f64(v)).collect();
        xb[d] = bf16::from_f64(bad);
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f64(v)).collect();
        let fwd = cpu::forward(&spec, &xb, &wb, &labels, shape).unwrap();
        assert!(fwd.row_loss[1].is_nan(), "bf16 {bad}");
        assert!(fwd.row_loss[0].is_finite() && fwd.row_loss[2].is_finite());
        let g =
            cpu::backward(&spec, &fwd, &xb, &wb, &labels, shape, Upstream::PerRow(&up)).unwrap();
        assert!(row(&g.dx, d, 0).iter().all(|v| v.is_finite()));
        assert!(row(&g.dx, d, 1).iter().any(|v| v.is_nan()));

        let mut xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        xf[d] = bad as f32;
        let wf: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        let fwd = cpu::forward(&spec, &xf, &wf, &labels, shape).unwrap();
        assert!(fwd.row_loss[1].is_nan(), "f32 {bad}");
        assert!(fwd.row_loss[0].is_finite() && fwd.row_loss[2].is_finite());
    }
}

#[test]
fn a_minus_inf_class_leaves_the_softmax_at_every_position() {
    // The reported case: arcface 0.5 with raw weights, x = [0.5, 1.0], label 1, the class
    // [-inf, 0] first gave NaN and last gave 49.35. Every order of the three classes must give
    // the loss of the two finite classes alone.
    let spec = MarginLoss::arcface(0.5)
        .normalize_weights(false)
        .reduction(Reduction::None);
    let x = [0.5, 1.0];
    let classes = [[f64::NEG_INFINITY, 0.0], [0.0, 1.0], [1.0, 1.0]];
    let (two, _) = run(
        &spec,
        &x,
        &[0.0, 1.0, 1.0, 1.0],
        &[0],
        Shape::new(1, 2, 2),
        Some(&[1.0]),
    );
    for perm in [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ] {
        let w: Vec<f64> = perm.iter().flat_map(|&k| classes[k]).collect();
        let label = perm.iter().position(|&k| k == 1).unwrap() as i32;
        let (fwd, g) = run(&spec, &x, &w, &[label], Shape::new(1, 2, 3), Some(&[1.0]));
        let want = two.row_loss[0];
        assert!(
            (fwd.row_loss[0] - want).abs() <= 1e-12 * want,
            "order {perm:?}: {} vs {want}",
            fwd.row_loss[0]
        );
        assert!(g.dx.iter().any(|v| !v.is_finite()), "order {perm:?}: dx");
    }
}

#[test]
fn an_infinite_raw_class_follows_the_policy_at_every_position() {
    for (k, spec) in [
        MarginLoss::arcface(0.5),
        MarginLoss::cosface(0.35),
        MarginLoss::nsl(8.0),
        MarginLoss::sphereface(4.0).lambda(5.0),
    ]
    .into_iter()
    .enumerate()
    {
        infinite_class_policy::<f64>(
            spec.normalize_weights(false),
            Shape::new(6, 5, 7),
            &[0, 1, 2, 3, 4, 5, 6],
            40 + k as u64,
            (1e-12, 1e-12),
            "cpu",
            &mut |shape, x, w, labels, up| {
                let s = spec.normalize_weights(false).reduction(Reduction::None);
                let up: Vec<f64> = up.iter().map(|&v| v as f64).collect();
                let (f, g) = run(&s, x, w, labels, shape, Some(&up));
                (f.row_loss, g.dx, g.dw)
            },
        );
    }
}
