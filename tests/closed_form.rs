//! Special cases with values computed independently in the test (by hand, from MATH.md), and the
//! algebraic relations between reductions, upstreams and element types.

mod common;

use common::*;
use fused_margin::{cpu, Element, MarginLoss, OverflowPolicy, Reduction, Shape, Upstream};
use half::{bf16, f16};
use std::f64::consts::PI;

/// `log(1 + exp(u))` without overflow for large `u`.
fn softplus(u: f64) -> f64 {
    if u > 0.0 {
        u + (-u).exp().ln_1p()
    } else {
        u.exp().ln_1p()
    }
}

fn sigmoid(u: f64) -> f64 {
    1.0 / (1.0 + (-u).exp())
}

fn all_finite(v: &[f64]) -> bool {
    v.iter().all(|e| e.is_finite())
}

/// Inputs for the relation tests: B=11 (3 ignored), D=13, C=29.
fn random_case(seed: u64) -> (Shape, Vec<f64>, Vec<f64>, Vec<i32>) {
    let shape = Shape::new(11, 13, 29);
    let mut r = rng(seed);
    let x = rows(&mut r, shape.b, shape.d, (0.5, 2.0));
    let w = rows(&mut r, shape.c, shape.d, (0.5, 2.0));
    let mut l = labels(&mut r, shape.b, shape.c);
    l[2] = -1;
    l[5] = -100;
    l[10] = -1;
    (shape, x, w, l)
}

#[test]
fn zero_margins_equal_normalized_softmax_cross_entropy() {
    let (shape, x, w, labels) = random_case(100);
    let s = 10.0;
    // Mean over counted rows of -log softmax(s * cos)_y, written out directly.
    let d = shape.d;
    let mut total = 0.0;
    let mut counted = 0;
    for i in 0..shape.b {
        if labels[i] < 0 {
            continue;
        }
        let xh = unit(&x[i * d..(i + 1) * d]);
        let z: Vec<f64> = (0..shape.c)
            .map(|j| s * dot(&xh, &unit(&w[j * d..(j + 1) * d])))
            .collect();
        let denom: f64 = z.iter().map(|v| v.exp()).sum();
        total += -(z[labels[i] as usize].exp() / denom).ln();
        counted += 1;
    }
    let want = total / counted as f64;
    let specs = [
        MarginLoss::nsl(s),
        MarginLoss::cosface(0.0).scale(s),
        MarginLoss::arcface(0.0).scale(s),
        MarginLoss::combined(1.0, 0.0, 0.0).scale(s),
        MarginLoss::sphereface(1.0)
            .normalize_features(true)
            .scale(s),
    ];
    for spec in specs {
        for policy in [
            OverflowPolicy::Monotonic,
            OverflowPolicy::Fallback,
            OverflowPolicy::Raw,
            OverflowPolicy::Easy,
        ] {
            let spec = spec.policy(policy);
            let got = cpu::forward(&spec, &x, &w, &labels, shape).unwrap().loss;
            assert!(
                (got - want).abs() <= 1e-12 * want.abs(),
                "{spec:?}: {got} vs {want}"
            );
        }
    }
}

/// B = 1, C = 2, D = 2: `x` at angle `alpha` with norm `n`, class 0 (the target) along the first
/// axis, class 1 at angle `beta`. Then `c_target = cos(alpha)`, `c_other = cos(alpha - beta)` and
/// `loss = log(1 + exp(r*c_other - r*target))`.
fn two_class(spec: &MarginLoss, alpha: f64, beta: f64, n: f64) -> (f64, Vec<f64>, Vec<f64>) {
    let x = [n * alpha.cos(), n * alpha.sin()];
    // Class norms other than 1, to exercise the weight normalization.
    let w = [1.7, 0.0, 0.6 * beta.cos(), 0.6 * beta.sin()];
    let shape = Shape::new(1, 2, 2);
    let fwd = cpu::forward(spec, &x, &w, &[0], shape).unwrap();
    let g = cpu::backward(spec, &fwd, &x, &w, &[0], shape, Upstream::ONE).unwrap();
    (fwd.loss, g.dx, g.dw)
}

#[test]
fn one_row_two_classes_by_hand() {
    let (beta, n): (f64, f64) = (2.0, 1.7);
    let check = |spec: MarginLoss, alpha: f64, r: f64, target: f64| {
        let want = softplus(r * ((alpha - beta).cos() - target));
        let (got, _, _) = two_class(&spec, alpha, beta, n);
        // loss = lse - z_y cancels: its rounding error scales with the logits (~r), not the loss.
        assert!(
            (got - want).abs() <= 1e-12 * want.abs() + 1e-14 * r,
            "{spec:?} at alpha {alpha}: {got} vs {want}"
        );
    };
    let alpha: f64 = 0.7;
    check(MarginLoss::nsl(16.0), alpha, 16.0, alpha.cos());
    check(MarginLoss::cosface(0.35), alpha, 64.0, alpha.cos() - 0.35);
    check(MarginLoss::arcface(0.5), alpha, 64.0, (alpha + 0.5).cos());
    check(
        MarginLoss::combined(1.0, 0.3, 0.2),
        alpha,
        64.0,
        (alpha + 0.3).cos() - 0.2,
    );
    // ArcFace past the threshold (alpha + m > pi): Fallback gives c - m sin(m), Raw cos(alpha + m),
    // Monotonic -cos(alpha + m) - 2 (k = 1).
    let alpha: f64 = 2.9;
    check(
        MarginLoss::arcface(0.5),
        alpha,
        64.0,
        alpha.cos() - 0.5 * 0.5f64.sin(),
    );
    check(
        MarginLoss::arcface(0.5).policy(OverflowPolicy::Raw),
        alpha,
        64.0,
        (alpha + 0.5).cos(),
    );
    check(
        MarginLoss::arcface(0.5).policy(OverflowPolicy::Monotonic),
        alpha,
        64.0,
        -(alpha + 0.5).cos() - 2.0,
    );
    // Easy with c <= 0: no margin at all.
    check(
        MarginLoss::arcface(0.5).policy(OverflowPolicy::Easy),
        alpha,
        64.0,
        alpha.cos(),
    );
    // SphereFace m = 4: r = |x| (s = 1, unnormalized features); at alpha = 1, 4*alpha is in
    // [pi, 2 pi), so k = 1 and psi = -cos(4) - 2.
    let alpha: f64 = 1.0;
    let psi = -(4.0f64).cos() - 2.0;
    check(MarginLoss::sphereface(4.0), alpha, n, psi);
    // With annealing lambda = 5: target = (5c + psi)/6.
    check(
        MarginLoss::sphereface(4.0).lambda(5.0),
        alpha,
        n,
        (5.0 * alpha.cos() + psi) / 6.0,
    );
}

#[test]
fn one_row_two_classes_gradient_by_hand() {
    // With normalized features the loss depends on x only through alpha:
    // L(alpha) = softplus(s*(cos(alpha - beta) - target(alpha))), so dx along the tangent
    // (-sin alpha, cos alpha) is L'(alpha)/n and dx along x itself is 0.
    let (alpha, beta, n, s): (f64, f64, f64, f64) = (0.7, 2.0, 1.7, 64.0);
    let cases: [(MarginLoss, f64, f64); 2] = [
        // (spec, target(alpha), dtarget/dalpha)
        (
            MarginLoss::arcface(0.5),
            (alpha + 0.5).cos(),
            -(alpha + 0.5).sin(),
        ),
        (MarginLoss::cosface(0.35), alpha.cos() - 0.35, -alpha.sin()),
    ];
    for (spec, t, dt) in cases {
        let u = s * ((alpha - beta).cos() - t);
        let dl_dalpha = sigmoid(u) * s * (-(alpha - beta).sin() - dt);
        let (_, dx, _) = two_class(&spec, alpha, beta, n);
        let tangent = dx[0] * -alpha.sin() + dx[1] * alpha.cos();
        let radial = dx[0] * alpha.cos() + dx[1] * alpha.sin();
        let want = dl_dalpha / n;
        // The softmax weights come from the cancelling difference of logits ~s (as above).
        assert!(
            (tangent - want).abs() <= 1e-12 * want.abs() + 1e-14 * s,
            "{spec:?}: {tangent} vs {want}"
        );
        assert!(
            radial.abs() <= 1e-12 * want.abs(),
            "{spec:?}: radial {radial}"
        );
    }
}

#[test]
fn extreme_scale_stays_finite() {
    // The target class points opposite the feature and a wrong class along it: the logit gap is
    // about 2s (2000 at s = 1000), far beyond exp's range, and the loss is that gap.
    let shape = Shape::new(2, 3, 3);
    let x = [1.0, 0.0, 0.0, 0.0, 0.0, 2.0];
    let w = [-1.0, 1e-3, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 3.0];
    // Row 0: target class 0 (c ~ -1), class 1 has c = 1. Row 1: target class 2 (c = 1 exactly).
    let labels = [0, 2];
    let c0 = -1.0 / (1.0f64 + 1e-6).sqrt();
    for s in [64.0, 1000.0] {
        for spec in [
            MarginLoss::nsl(s),
            MarginLoss::cosface(0.35).scale(s),
            MarginLoss::arcface(0.5).scale(s),
            MarginLoss::arcface(0.5)
                .scale(s)
                .policy(OverflowPolicy::Raw),
            MarginLoss::arcface(0.5)
                .scale(s)
                .policy(OverflowPolicy::Monotonic),
            MarginLoss::sphereface(4.0)
                .normalize_features(true)
                .scale(s),
        ] {
            let fwd = cpu::forward(&spec, &x, &w, &labels, shape).unwrap();
            let g = cpu::backward(&spec, &fwd, &x, &w, &labels, shape, Upstream::ONE).unwrap();
            assert!(
                fwd.loss.is_finite() && all_finite(&fwd.row_loss),
                "{spec:?}"
            );
            assert!(all_finite(&g.dx) && all_finite(&g.dw), "{spec:?}");
            // Row 0 by hand: logits s*c0 (target, through psi), s*1, s*c(x, w_2) = 0.
            let z = [s * target_ref(&spec, c0), s, 0.0];
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            let want = lse - z[0];
            assert!(want > s, "the case is not extreme: {want}");
            assert!(
                (fwd.row_loss[0] - want).abs() <= 1e-12 * want,
                "{spec:?}: {} vs {want}",
                fwd.row_loss[0]
            );
            // Row 1 is solved with an enormous margin of safety: loss ~ exp(-gap), not below 0.
            assert!(
                fwd.row_loss[1] >= 0.0 && fwd.row_loss[1] < 1e-10,
                "{spec:?}"
            );
        }
    }
}

#[test]
fn mean_with_every_row_ignored_is_zero() {
    let (shape, x, w, _) = random_case(101);
    let labels = vec![-1; shape.b];
    for spec in [
        MarginLoss::arcface(0.5),
        MarginLoss::arcface(0.5).reduction(Reduction::Sum),
        MarginLoss::sphereface(4.0),
    ] {
        let fwd = cpu::forward(&spec, &x, &w, &labels, shape).unwrap();
        assert_eq!(fwd.loss, 0.0, "{spec:?}");
        assert_eq!(fwd.counted, 0);
        assert!(fwd.row_loss.iter().all(|&l| l == 0.0));
        let g = cpu::backward(&spec, &fwd, &x, &w, &labels, shape, Upstream::ONE).unwrap();
        assert!(g.dx.iter().chain(&g.dw).all(|&v| v == 0.0), "{spec:?}");
    }
}

#[test]
fn sum_is_mean_times_counted_rows() {
    let (shape, x, w, labels) = random_case(102);
    let mean = MarginLoss::combined(1.0, 0.3, 0.2);
    let sum = mean.reduction(Reduction::Sum);
    let (fm, gm) = run(&mean, &x, &w, &labels, shape, None);
    let (fs, gs) = run(&sum, &x, &w, &labels, shape, None);
    let n = labels.iter().filter(|&&l| l >= 0).count();
    assert_eq!(fm.counted, n);
    assert!((fs.loss - fm.loss * n as f64).abs() <= 1e-12 * fs.loss);
    let scaled = |v: &[f64]| v.iter().map(|e| e * n as f64).collect::<Vec<_>>();
    assert_close("dx", &gs.dx, &scaled(&gm.dx), 1e-15, 1e-12);
    assert_close("dw", &gs.dw, &scaled(&gm.dw), 1e-15, 1e-12);
}

#[test]
fn none_row_losses_sum_to_sum() {
    let (shape, x, w, labels) = random_case(103);
    let none = MarginLoss::arcface(0.5).reduction(Reduction::None);
    let sum = none.reduction(Reduction::Sum);
    let ones = vec![1.0; shape.b];
    let (fn_, gn) = run(&none, &x, &w, &labels, shape, Some(&ones));
    let (fs, gs) = run(&sum, &x, &w, &labels, shape, None);
    let total: f64 = fn_.row_loss.iter().sum();
    assert!((total - fs.loss).abs() <= 1e-12 * fs.loss);
    for (i, &l) in labels.iter().enumerate() {
        if l < 0 {
            assert_eq!(fn_.row_loss[i], 0.0, "ignored row {i}");
        } else {
            assert!(fn_.row_loss[i] > 0.0, "row {i}");
        }
    }
    assert_close("dx", &gn.dx, &gs.dx, 1e-15, 1e-12);
    assert_close("dw", &gn.dw, &gs.dw, 1e-15, 1e-12);
}

#[test]
fn upstream_scales_gradients_and_ignored_rows_get_none() {
    let (shape, x, w, labels) = random_case(104);
    let spec = MarginLoss::arcface(0.5);
    let fwd = cpu::forward(&spec, &x, &w, &labels, shape).unwrap();
    let g1 = cpu::backward(&spec, &fwd, &x, &w, &labels, shape, Upstream::ONE).unwrap();
    let g25 = cpu::backward(&spec, &fwd, &x, &w, &labels, shape, Upstream::Scalar(2.5)).unwrap();
    let scaled: Vec<f64> = g1.dx.iter().map(|v| v * 2.5).collect();
    assert_close("2.5 dx", &g25.dx, &scaled, 1e-15, 1e-13);
    // Ignored rows receive exactly zero gradient.
    for (i, &l) in labels.iter().enumerate() {
        let row = &g1.dx[i * shape.d..(i + 1) * shape.d];
        assert_eq!(l < 0, row.iter().all(|&v| v == 0.0), "row {i}, label {l}");
    }
    // Per-row upstream values of ignored rows are unused.
    let none = spec.reduction(Reduction::None);
    let fwd = cpu::forward(&none, &x, &w, &labels, shape).unwrap();
    let mut up: Vec<f64> = (0..shape.b).map(|i| 0.5 + i as f64 * 0.1).collect();
    let a = cpu::backward(&none, &fwd, &x, &w, &labels, shape, Upstream::PerRow(&up)).unwrap();
    for (u, &l) in up.iter_mut().zip(&labels) {
        if l < 0 {
            *u = 1e6;
        }
    }
    let b = cpu::backward(&none, &fwd, &x, &w, &labels, shape, Upstream::PerRow(&up)).unwrap();
    assert_eq!(a, b);
}

#[test]
fn normalized_inputs_are_scale_invariant() {
    // With both normalizations on, scaling a row by k leaves the loss alone and divides that
    // row's gradient by k (MATH.md: dx = (dxh - xh(xh.dxh)) / |x|).
    let (shape, x, w, labels) = random_case(105);
    let spec = MarginLoss::arcface(0.5);
    let (f1, g1) = run(&spec, &x, &w, &labels, shape, None);
    let x3: Vec<f64> = x.iter().map(|v| v * 3.0).collect();
    let w4: Vec<f64> = w.iter().map(|v| v * 0.25).collect();
    let (f2, g2) = run(&spec, &x3, &w4, &labels, shape, None);
    assert!((f1.loss - f2.loss).abs() <= 1e-12 * f1.loss);
    let dx3: Vec<f64> = g1.dx.iter().map(|v| v / 3.0).collect();
    let dw4: Vec<f64> = g1.dw.iter().map(|v| v * 4.0).collect();
    assert_close("dx", &g2.dx, &dx3, 1e-15, 1e-10);
    assert_close("dw", &g2.dw, &dw4, 1e-15, 1e-10);
    // The saved norms are the input norms (before the eps floor).
    for i in 0..shape.b {
        let n = norm(&x3[i * shape.d..(i + 1) * shape.d]);
        assert!((f2.x_norm[i] - n).abs() <= 1e-14 * n);
    }
    for j in 0..shape.c {
        let n = norm(&w4[j * shape.d..(j + 1) * shape.d]);
        assert!((f2.w_norm[j] - n).abs() <= 1e-14 * n);
    }
}

#[test]
fn saved_logsumexp_matches_the_logits() {
    // lse_i = logsumexp_j z_ij, for counted rows with the margin at the target and for ignored
    // rows over the plain logits r_i c_ij.
    let (shape, x, w, labels) = random_case(106);
    let spec = MarginLoss::sphereface(4.0).lambda(3.0);
    let fwd = cpu::forward(&spec, &x, &w, &labels, shape).unwrap();
    let d = shape.d;
    for i in 0..shape.b {
        let xi = &x[i * d..(i + 1) * d];
        let xh = unit(xi);
        let r = norm(xi); // s = 1, unnormalized features
        let z: Vec<f64> = (0..shape.c)
            .map(|j| {
                let c = dot(&xh, &unit(&w[j * d..(j + 1) * d]));
                if labels[i] == j as i32 {
                    r * target_ref(&spec, c)
                } else {
                    r * c
                }
            })
            .collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        assert!(
            (fwd.lse[i] - lse).abs() <= 1e-12 * lse.abs().max(1.0),
            "row {i}"
        );
    }
}

/// Rounds `v` to `T`, runs the crate on the `T` values and on the same values widened to f64, and
/// requires the same results: the CPU reference widens exactly and computes everything in f64.
fn same_as_f64_on_rounded<T: Element>(spec: &MarginLoss) {
    let (shape, x, w, labels) = random_case(107 + T::DTYPE.size() as u64);
    let xt: Vec<T> = x.iter().map(|&v| T::from_f64(v)).collect();
    let wt: Vec<T> = w.iter().map(|&v| T::from_f64(v)).collect();
    let x64: Vec<f64> = xt.iter().map(|v| v.to_f64()).collect();
    let w64: Vec<f64> = wt.iter().map(|v| v.to_f64()).collect();
    // The rounding must actually have happened, or this test compares f64 with itself.
    assert!(x64.iter().zip(&x).any(|(a, b)| a != b));
    let ft = cpu::forward(spec, &xt, &wt, &labels, shape).unwrap();
    let gt = cpu::backward(spec, &ft, &xt, &wt, &labels, shape, Upstream::ONE).unwrap();
    let (f64_, g64) = run(spec, &x64, &w64, &labels, shape, None);
    let what = format!("{:?}", T::DTYPE);
    assert_close(&what, &[ft.loss], &[f64_.loss], 1e-14, 1e-12);
    assert_close(&what, &ft.row_loss, &f64_.row_loss, 1e-14, 1e-12);
    assert_close(&what, &ft.lse, &f64_.lse, 1e-14, 1e-12);
    assert_close(&what, &gt.dx, &g64.dx, 1e-14, 1e-12);
    assert_close(&what, &gt.dw, &g64.dw, 1e-14, 1e-12);
}

#[test]
fn low_precision_inputs_match_f64_on_the_rounded_values() {
    for spec in [
        MarginLoss::arcface(0.5),
        MarginLoss::sphereface(4.0).lambda(5.0),
        MarginLoss::cosface(0.35).normalize_weights(false),
    ] {
        same_as_f64_on_rounded::<f32>(&spec);
        same_as_f64_on_rounded::<f16>(&spec);
        same_as_f64_on_rounded::<bf16>(&spec);
    }
}

#[test]
fn arcface_fallback_jump_at_the_threshold_by_hand() {
    // A guard on the test's own reading of MATH.md, computed without the crate: for ArcFace the
    // Fallback branch c - m sin(m) at the threshold theta = pi - m differs from cos(pi) = -1
    // (a jump), while Monotonic is continuous there. The gradient checks rely on this reading
    // to keep away from the jump.
    let m: f64 = 0.5;
    let c_star = (PI - m).cos();
    let fallback_right = c_star - m * m.sin();
    assert!((fallback_right - -1.0).abs() > 0.1);
    let spec = MarginLoss::arcface(m).policy(OverflowPolicy::Monotonic);
    let left = psi_ref(&spec, c_star + 1e-9);
    let right = psi_ref(&spec, c_star - 1e-9);
    assert!((left - right).abs() < 1e-6);
    // And the crate agrees on both sides of the jump.
    let shape = Shape::new(1, 2, 2);
    for theta in [PI - m - 1e-6, PI - m + 1e-6] {
        let x = [theta.cos(), theta.sin()];
        let w = [1.0, 0.0, 0.0, 1.0];
        let spec = MarginLoss::arcface(m).scale(1.0);
        let got = cpu::forward(&spec, &x, &w, &[0], shape).unwrap().loss;
        let t = if theta + m > PI {
            theta.cos() - m * m.sin()
        } else {
            (theta + m).cos()
        };
        let want = softplus(theta.sin() - t);
        assert!(
            (got - want).abs() <= 1e-12 * want,
            "theta {theta}: {got} vs {want}"
        );
    }
}

#[test]
fn easy_margin_switches_exactly_at_c_zero() {
    // B = 1, C = 2 just either side of c = 0 (theta = pi/2 -/+ 1e-6): Easy applies the margin for
    // c > 0 and none for c <= 0, so the loss jumps there by hand.
    let (beta, n): (f64, f64) = (2.0, 1.3);
    for (spec, margin) in [
        (
            MarginLoss::arcface(0.5).policy(OverflowPolicy::Easy),
            (|a: f64| (a + 0.5).cos()) as fn(f64) -> f64,
        ),
        (
            MarginLoss::cosface(0.35).policy(OverflowPolicy::Easy),
            (|a: f64| a.cos() - 0.35) as fn(f64) -> f64,
        ),
    ] {
        for alpha in [PI / 2.0 - 1e-6, PI / 2.0 + 1e-6] {
            let t = if alpha.cos() > 0.0 {
                margin(alpha)
            } else {
                alpha.cos()
            };
            let want = softplus(64.0 * ((alpha - beta).cos() - t));
            let (got, _, _) = two_class(&spec, alpha, beta, n);
            assert!(
                (got - want).abs() <= 1e-12 * want + 1e-14 * 64.0,
                "{spec:?} at alpha {alpha}: {got} vs {want}"
            );
        }
    }
}
