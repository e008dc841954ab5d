//! Extreme inputs on the CPU reference (the GPU side is in `tests/gpu_vs_cpu.rs`): C = 1, D = 1,
//! B = 1, labels at 0 and C-1, every row ignored under reduction none, s = 1000 with large feature
//! norms and every option, margins at `validate()`'s limits, zero-norm rows (the `eps` path),
//! entries near the f32 range's ends. What `tests/closed_form.rs` already covers (s = 1000 on the
//! presets with normalized features, every row ignored under mean and sum, B = 1 with C = 2 by
//! hand) is not repeated.
//!
//! B*C > 2^31 needs the GPU (`tests/gpu_vs_cpu.rs`, `huge_b_times_c`); the CPU reference at that
//! size would take minutes.

mod common;

use common::*;
use fused_margin::{cpu, GradientMode, MarginLoss, OverflowPolicy, Reduction, Shape, Upstream};
use rand::Rng;
use std::f64::consts::PI;

const POLICIES: [OverflowPolicy; 4] = [
    OverflowPolicy::Monotonic,
    OverflowPolicy::Fallback,
    OverflowPolicy::Raw,
    OverflowPolicy::Easy,
];

fn all_finite(v: &[f64]) -> bool {
    v.iter().all(|e| e.is_finite())
}

/// Every preset, every policy, both gradient modes, lambda, both normalization switches.
fn many_specs() -> Vec<MarginLoss> {
    let mut out = Vec::new();
    for base in [
        MarginLoss::nsl(16.0),
        MarginLoss::cosface(0.35),
        MarginLoss::arcface(0.5),
        MarginLoss::sphereface(4.0),
        MarginLoss::combined(1.0, 0.3, 0.2),
        MarginLoss::combined(2.5, 0.4, 0.1),
    ] {
        for policy in POLICIES {
            for (gradient, lambda) in [(GradientMode::Full, 0.0), (GradientMode::Detached, 3.0)] {
                out.push(base.policy(policy).gradient(gradient).lambda(lambda));
            }
        }
        out.push(base.normalize_features(!base.normalize_features));
        out.push(base.normalize_weights(false));
    }
    out
}

/// Forward against the naive MATH.md evaluation (relative 1e-10).
fn matches_naive(spec: &MarginLoss, x: &[f64], w: &[f64], labels: &[i32], shape: Shape) {
    matches_naive_except(spec, x, w, labels, shape, &[]);
}

/// The same, leaving out the rows in `skip` (rows placed exactly on a jump of the target
/// transform, where the last bit of the cosine decides the side).
fn matches_naive_except(
    spec: &MarginLoss,
    x: &[f64],
    w: &[f64],
    labels: &[i32],
    shape: Shape,
    skip: &[usize],
) {
    let fwd = cpu::forward(spec, x, w, labels, shape).unwrap();
    let naive = naive_rows(spec, x, w, labels, shape, &|_, c| target_ref(spec, c));
    let keep = |v: &[f64]| -> Vec<f64> {
        v.iter()
            .enumerate()
            .filter(|(i, _)| !skip.contains(i))
            .map(|(_, &e)| e)
            .collect()
    };
    assert_close(
        &format!("{spec:?} {shape:?}: row_loss (rows {skip:?} left out)"),
        &keep(&fwd.row_loss),
        &keep(&naive),
        1e-12,
        1e-10,
    );
}

#[test]
fn one_class_gives_zero_loss_and_zero_gradients() {
    // C = 1: the softmax over one logit is 1, so l_i = 0 and dz = g (1 - 1) = 0 exactly.
    let mut r = rng(1);
    for spec in many_specs() {
        for (b, d) in [(1, 1), (5, 7), (17, 3)] {
            let shape = Shape::new(b, d, 1);
            let x = rows(&mut r, b, d, (0.1, 10.0));
            let w = rows(&mut r, 1, d, (0.5, 2.0));
            let mut labels = vec![0; b];
            labels[b - 1] = if b > 1 { -1 } else { 0 };
            for red in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let spec = spec.reduction(red);
                let up = vec![1.5; b];
                let upstream = (red == Reduction::None).then_some(up.as_slice());
                let (fwd, g) = run(&spec, &x, &w, &labels, shape, upstream);
                let what = format!("{spec:?} {shape:?}");
                assert_eq!(fwd.loss, 0.0, "{what}");
                assert!(fwd.row_loss.iter().all(|&l| l == 0.0), "{what}");
                assert!(g.dx.iter().chain(&g.dw).all(|&v| v == 0.0), "{what}");
            }
        }
    }
}

#[test]
fn one_dimension_matches_the_contract() {
    // D = 1: every unit row is +-1, so every cosine is +-1 (at the clamp with an angular margin).
    // Through a normalization the gradient then vanishes (dvh - vh (vh . dvh) = 0, up to the
    // rounding of vh = v * (1/|v|)); the loss still depends on |x_i| through the row scale when
    // features are not normalized.
    let mut r = rng(2);
    let shape = Shape::new(6, 1, 5);
    for spec in many_specs() {
        let x: Vec<f64> = (0..6)
            .map(|_| r.random_range(0.3..3.0) * sign(&mut r))
            .collect();
        let w: Vec<f64> = (0..5)
            .map(|_| r.random_range(0.3..3.0) * sign(&mut r))
            .collect();
        let labels = vec![0, 4, 2, -1, 4, 0];
        matches_naive(&spec, &x, &w, &labels, shape);
        let (fwd, g) = run(&spec, &x, &w, &labels, shape, None);
        assert!(fwd.loss.is_finite() && all_finite(&g.dx) && all_finite(&g.dw));
        // The gradients before the projection are O(s) (at most ~s*m1*(1 + lambda) here).
        let tiny = 1e-12 * spec.s * 16.0;
        if spec.normalize_features {
            assert!(
                g.dx.iter().all(|v| v.abs() < tiny),
                "{spec:?}: dx {:?}",
                g.dx
            );
        }
        if spec.normalize_weights {
            assert!(
                g.dw.iter().all(|v| v.abs() < tiny),
                "{spec:?}: dw {:?}",
                g.dw
            );
        }
        // Smooth directions: the feature norm (no feature normalization), and the class weights
        // when unnormalized without an angular margin (no clamp): finite differences agree.
        let f = |x: &[f64], w: &[f64]| cpu::forward(&spec, x, w, &labels, shape).unwrap().loss;
        if !spec.normalize_features {
            let fd = central_diff(&x, 1e-6, &mut |xp| f(xp, &w));
            assert_close(&format!("{spec:?}: dx"), &g.dx, &fd, 1e-7, 1e-6);
        }
        if !spec.normalize_weights && !spec.has_angular_margin() {
            let fd = central_diff(&w, 1e-6, &mut |wp| f(&x, wp));
            assert_close(&format!("{spec:?}: dw"), &g.dw, &fd, 1e-7, 1e-6);
        }
    }
}

fn sign(r: &mut rand::rngs::StdRng) -> f64 {
    if r.random_bool(0.5) {
        1.0
    } else {
        -1.0
    }
}

#[test]
fn one_row_with_labels_at_both_ends() {
    // B = 1 with label 0 and label C-1, for every spec: forward against the naive evaluation and
    // both gradients against central differences (away from the kinks: a random direction in
    // D = 9 keeps the target cosine well inside (-1, 1)).
    let mut r = rng(3);
    for spec in many_specs() {
        for c in [2, 13] {
            for label in [0, c as i32 - 1] {
                let shape = Shape::new(1, 9, c);
                let x = rows(&mut r, 1, 9, (0.5, 2.0));
                let w = rows(&mut r, c, 9, (0.5, 0.95));
                let labels = [label];
                let cy = target_cosine(&spec, &x, &w, 9, 0, label as usize);
                let near_kink = kinks_near(&spec, cy);
                matches_naive(&spec, &x, &w, &labels, shape);
                let (fwd, g) = run(&spec, &x, &w, &labels, shape, None);
                assert!(fwd.loss.is_finite() && fwd.loss >= 0.0, "{spec:?}");
                if near_kink || spec.gradient == GradientMode::Detached {
                    // Detached is the frozen-margin gradient (tests/cpu_gradcheck.rs, property.rs).
                    assert!(all_finite(&g.dx) && all_finite(&g.dw));
                    continue;
                }
                let f = |x: &[f64], w: &[f64]| cpu::forward(&spec, x, w, &labels, shape).unwrap();
                let fdx = central_diff(&x, 1e-6, &mut |xp| f(xp, &w).loss);
                let fdw = central_diff(&w, 1e-6, &mut |wp| f(&x, wp).loss);
                let what = format!("{spec:?} C={c} label={label}");
                assert_close(
                    &format!("{what}: dx"),
                    &g.dx,
                    &fdx,
                    1e-7 * fwd.loss.max(1.0),
                    1e-6,
                );
                assert_close(
                    &format!("{what}: dw"),
                    &g.dw,
                    &fdw,
                    1e-7 * fwd.loss.max(1.0),
                    1e-6,
                );
            }
        }
    }
}

/// True when `c` is within 1e-3 of a non-smooth point of `spec`'s target transform.
fn kinks_near(spec: &MarginLoss, c: f64) -> bool {
    let policy = policy_of(spec);
    if policy == OverflowPolicy::Easy && c.abs() < 1e-3 {
        return true;
    }
    if !spec.has_angular_margin() {
        return false;
    }
    if c.abs() > 1.0 - 1e-3 {
        return true;
    }
    let a = angle_arg(spec, c);
    // Fallback jumps and Monotonic changes branch at a = k*pi.
    let frac = (a / PI - (a / PI).round()).abs();
    matches!(policy, OverflowPolicy::Fallback | OverflowPolicy::Monotonic) && frac < 1e-3
}

#[test]
fn every_row_ignored_under_reduction_none() {
    // closed_form.rs covers mean and sum; reduction none takes a per-row upstream, which is unused.
    let mut r = rng(4);
    let shape = Shape::new(7, 5, 9);
    let x = rows(&mut r, 7, 5, (0.5, 2.0));
    let w = rows(&mut r, 9, 5, (0.5, 2.0));
    let labels = [-1, -100, -1, -7, -1, -1, i32::MIN];
    let up: Vec<f64> = (0..7).map(|i| i as f64 - 3.0).collect();
    for spec in many_specs() {
        let spec = spec.reduction(Reduction::None);
        let (fwd, g) = run(&spec, &x, &w, &labels, shape, Some(&up));
        assert_eq!(fwd.counted, 0);
        assert_eq!(fwd.loss, 0.0, "{spec:?}");
        assert!(fwd.row_loss.iter().all(|&l| l == 0.0), "{spec:?}");
        assert!(all_finite(&fwd.lse), "{spec:?}");
        assert!(g.dx.iter().chain(&g.dw).all(|&v| v == 0.0), "{spec:?}");
    }
}

#[test]
fn scale_1000_with_large_feature_norms_and_every_option() {
    // closed_form.rs checks s = 1000 on the presets with normalized features by hand. Here the
    // row scale goes further (s = 1000 on features of norm up to 1000 without feature
    // normalization: logits ~1e6), with every policy, gradient mode, lambda and reduction, and
    // C = 300 random classes: the loss matches the naive evaluation and nothing overflows (the
    // gradients at s = 1000 are checked against finite differences in the next test).
    let mut r = rng(5);
    let shape = Shape::new(9, 16, 300);
    let w = rows(&mut r, shape.c, shape.d, (0.5, 0.95));
    let labels = labels(&mut r, shape.b, shape.c);
    for spec in many_specs() {
        let spec = spec.scale(1000.0);
        let norms = if spec.normalize_features {
            (0.5, 2.0)
        } else {
            (1.0, 1000.0)
        };
        let x = rows(&mut r, shape.b, shape.d, norms);
        matches_naive(&spec, &x, &w, &labels, shape);
        for red in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            let spec = spec.reduction(red);
            let up = vec![1.0; shape.b];
            let upstream = (red == Reduction::None).then_some(up.as_slice());
            let (fwd, g) = run(&spec, &x, &w, &labels, shape, upstream);
            assert!(fwd.loss.is_finite() && fwd.loss >= 0.0, "{spec:?}");
            assert!(
                all_finite(&fwd.lse) && all_finite(&fwd.row_loss),
                "{spec:?}"
            );
            assert!(all_finite(&g.dx) && all_finite(&g.dw), "{spec:?}");
        }
    }
}

#[test]
fn scale_1000_gradients_match_finite_differences() {
    // Large s makes the softmax nearly one-hot; the gradients must still be right, not just
    // finite, also where they are largest: rows 0 and 1 are placed on the softmax transition
    // between their target and another class (target logit = that class's logit, by bisection
    // along the arc between the two class directions), where the curvature is ~s^2.
    let shape = Shape::new(4, 6, 5);
    let d = shape.d;
    for (seed, spec) in [
        (60, MarginLoss::arcface(0.5).scale(1000.0)),
        (61, MarginLoss::cosface(0.35).scale(1000.0)),
        (62, MarginLoss::nsl(1000.0).reduction(Reduction::Sum)),
        (63, MarginLoss::combined(2.0, 0.3, 0.1).scale(1000.0)),
        (
            64,
            MarginLoss::sphereface(4.0)
                .normalize_features(true)
                .scale(1000.0),
        ),
    ] {
        let mut r = rng(seed);
        let mut x = rows(&mut r, shape.b, d, (1.0, 30.0));
        let w = rows(&mut r, shape.c, d, (0.5, 2.0));
        let labels = vec![0, 3, 1, 4];
        for (i, k) in [(0, 2), (1, 4)] {
            let wy = unit(&w[labels[i] as usize * d..(labels[i] as usize + 1) * d]);
            let wk = unit(&w[k * d..(k + 1) * d]);
            let at = |t: f64| -> Vec<f64> {
                let v: Vec<f64> = wy
                    .iter()
                    .zip(&wk)
                    .map(|(a, b)| (1.0 - t) * a + t * b)
                    .collect();
                unit(&v).iter().map(|e| 1.5 * e).collect()
            };
            let gap = |t: f64| {
                let v = at(t);
                target_ref(&spec, dot(&unit(&v), &wy)) - dot(&unit(&v), &wk)
            };
            let (mut lo, mut hi) = (0.0, 1.0);
            assert!(
                gap(lo) > 0.0 && gap(hi) < 0.0,
                "{spec:?}: no crossing for row {i}"
            );
            for _ in 0..80 {
                let mid = 0.5 * (lo + hi);
                if gap(mid) > 0.0 {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            x[i * d..(i + 1) * d].copy_from_slice(&at(lo));
        }
        let (fwd, g) = run(&spec, &x, &w, &labels, shape, None);
        // p_y = exp(-l_i): a real transition in at least one placed row.
        assert!(
            fwd.row_loss[..2].iter().any(|&l| (0.05..3.0).contains(&l)),
            "{spec:?}: rows not on the transition: {:?}",
            fwd.row_loss
        );
        let f = |x: &[f64], w: &[f64]| cpu::forward(&spec, x, w, &labels, shape).unwrap().loss;
        let atol = 1e-7 * fwd.loss.max(1.0);
        let fdx = central_diff(&x, 1e-7, &mut |xp| f(xp, &w));
        let fdw = central_diff(&w, 1e-7, &mut |wp| f(&x, wp));
        assert_close(&format!("{spec:?}: dx"), &g.dx, &fdx, atol, 1e-5);
        assert_close(&format!("{spec:?}: dw"), &g.dw, &fdw, atol, 1e-5);
        assert!(g.dx.iter().any(|v| v.abs() > 1.0), "{spec:?}: trivial case");
    }
}

#[test]
fn margins_at_their_limits_stay_finite() {
    // m1 = 16, m2 just below pi, m3 = 2 (validate()'s ends), alone and together, under every
    // policy and gradient mode, on rows at the clamp (x = +-w_y: c = +-1), at c = 0 and random.
    let below_pi = f64::from_bits(PI.to_bits() - 1);
    let mut r = rng(7);
    let shape = Shape::new(8, 4, 6);
    let w = rows(&mut r, shape.c, shape.d, (0.5, 2.0));
    let labels = vec![0, 1, 2, 3, 4, 5, 5, 0];
    let mut x = rows(&mut r, shape.b, shape.d, (0.5, 2.0));
    let d = shape.d;
    // Row 0 along w_0 (c = 1), row 1 against w_1 (c = -1), row 2 orthogonal to w_2 (c = 0).
    for k in 0..d {
        x[k] = 2.0 * w[k];
        x[d + k] = -0.5 * w[d + k];
    }
    let w2 = &w[2 * d..3 * d];
    let x2: Vec<f64> = x[2 * d..3 * d].to_vec();
    let proj = dot(&x2, w2) / dot(w2, w2);
    for k in 0..d {
        x[2 * d + k] = x2[k] - proj * w2[k];
    }
    assert!(target_cosine(&MarginLoss::nsl(1.0), &x, &w, d, 2, 2).abs() < 1e-15);
    for (m1, m2, m3) in [
        (16.0, 0.0, 0.0),
        (1.0, below_pi, 0.0),
        (1.0, 0.0, 2.0),
        (16.0, below_pi, 2.0),
        (16.0, 0.5, 0.35),
    ] {
        for policy in POLICIES {
            for gradient in [GradientMode::Full, GradientMode::Detached] {
                for lambda in [0.0, 5.0] {
                    let spec = MarginLoss::combined(m1, m2, m3)
                        .policy(policy)
                        .gradient(gradient)
                        .lambda(lambda);
                    spec.validate().unwrap();
                    // Row 2 sits on Easy's jump at c = 0: compared for finiteness only.
                    let skip: &[usize] = if policy == OverflowPolicy::Easy {
                        &[2]
                    } else {
                        &[]
                    };
                    for spec in [spec, spec.scale(1000.0), spec.normalize_features(false)] {
                        matches_naive_except(&spec, &x, &w, &labels, shape, skip);
                        let (fwd, g) = run(&spec, &x, &w, &labels, shape, None);
                        assert!(fwd.loss.is_finite(), "{spec:?}");
                        assert!(all_finite(&g.dx) && all_finite(&g.dw), "{spec:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn zero_feature_row_takes_the_eps_path() {
    // x_i = 0: xh_i = 0 / max(0, eps) = 0, every cosine 0, so with normalized features
    // l_i = ln(exp(s t0) + C - 1) - s t0 with t0 = target(0), and
    // dx_i = (dxh_i - 0) / eps = (s g / eps) [ (p_y - 1) t'(0) wh_y + sum_{j != y} p_j wh_j ].
    // The row adds nothing to dw (xh_i = 0). Without feature normalization r_i = s*0 = 0: every
    // logit is 0, l_i = ln C, and dx_i = dn_i xh_i = 0.
    let mut r = rng(8);
    let shape = Shape::new(3, 5, 7);
    let d = shape.d;
    let mut x = rows(&mut r, 3, d, (0.5, 2.0));
    x[d..2 * d].fill(0.0);
    let w = rows(&mut r, 7, d, (0.5, 2.0));
    let labels = [2, 4, 6];
    for base in many_specs() {
        let spec = base.reduction(Reduction::Sum);
        let (fwd, g) = run(&spec, &x, &w, &labels, shape, None);
        let what = format!("{spec:?}");
        assert!(
            fwd.loss.is_finite() && all_finite(&g.dx) && all_finite(&g.dw),
            "{what}"
        );
        assert_eq!(fwd.x_norm[1], 0.0);
        matches_naive(&spec, &x, &w, &labels, shape);
        let c = shape.c as f64;
        if spec.normalize_features {
            let t = fused_margin::math::target(
                &spec,
                &fused_margin::math::RowMargin::uniform(&spec),
                0.0,
            );
            let s = spec.s;
            let want = ((s * t.value).exp() + c - 1.0).ln() - s * t.value;
            assert!(
                (fwd.row_loss[1] - want).abs() <= 1e-12 * want.abs().max(1.0),
                "{what}"
            );
            let denom = (s * t.value).exp() + c - 1.0;
            let mut want_dx = vec![0.0; d];
            for j in 0..shape.c {
                let wh = unit(&w[j * d..(j + 1) * d]);
                let wh = if spec.normalize_weights {
                    wh
                } else {
                    w[j * d..(j + 1) * d].to_vec()
                };
                let coef = if j == 4 {
                    ((s * t.value).exp() / denom - 1.0) * t.deriv
                } else {
                    1.0 / denom
                };
                for k in 0..d {
                    want_dx[k] += s * coef * wh[k] / EPS;
                }
            }
            assert_close(
                &format!("{what}: dx"),
                &g.dx[d..2 * d],
                &want_dx,
                0.0,
                1e-10,
            );
        } else {
            assert!((fwd.row_loss[1] - c.ln()).abs() <= 1e-15 * c.ln(), "{what}");
            assert!(g.dx[d..2 * d].iter().all(|&v| v == 0.0), "{what}");
        }
        // The zero row adds nothing to dw: the same as with that row ignored (sum reduction).
        let (_, g_ign) = run(&spec, &x, &w, &[2, -1, 6], shape, None);
        assert_eq!(g.dw, g_ign.dw, "{what}: dw");
    }
}

#[test]
fn zero_class_row_takes_the_eps_path() {
    // w_j = 0 with normalized weights: wh_j = 0, c_ij = 0 for every row, and
    // dw_j = dwh_j / eps = (1/eps) sum_i dc_ij xh_i with dc_ij = r_i g (p_ij - [j = y_i]) t'_ij,
    // computed here from the saved lse.
    let mut r = rng(9);
    let shape = Shape::new(4, 5, 6);
    let d = shape.d;
    let x = rows(&mut r, 4, d, (0.5, 2.0));
    let mut w = rows(&mut r, 6, d, (0.5, 2.0));
    let zero = 3;
    w[zero * d..(zero + 1) * d].fill(0.0);
    let labels = [3, 0, 5, 3];
    for spec in many_specs() {
        let spec = spec.reduction(Reduction::Mean);
        let (fwd, g) = run(&spec, &x, &w, &labels, shape, None);
        let what = format!("{spec:?}");
        assert!(
            fwd.loss.is_finite() && all_finite(&g.dx) && all_finite(&g.dw),
            "{what}"
        );
        matches_naive(&spec, &x, &w, &labels, shape);
        if !spec.normalize_weights {
            // Unnormalized: dw_j = dwh_j directly (a plain product), already finite.
            continue;
        }
        let gi = 1.0 / 4.0;
        let mut want = vec![0.0; d];
        for i in 0..shape.b {
            let xi = &x[i * d..(i + 1) * d];
            let xh = unit(xi);
            let ri = if spec.normalize_features {
                spec.s
            } else {
                spec.s * norm(xi)
            };
            let (t, dt) = if labels[i] as usize == zero {
                let tg = fused_margin::math::target(
                    &spec,
                    &fused_margin::math::RowMargin::uniform(&spec),
                    0.0,
                );
                (tg.value, tg.deriv)
            } else {
                (0.0, 1.0)
            };
            let p = (ri * t - fwd.lse[i]).exp();
            let onehot = if labels[i] as usize == zero { 1.0 } else { 0.0 };
            let dc = ri * gi * (p - onehot) * dt;
            for k in 0..d {
                want[k] += dc * xh[k] / EPS;
            }
        }
        assert_close(
            &format!("{what}: dw of the zero class"),
            &g.dw[zero * d..(zero + 1) * d],
            &want,
            0.0,
            1e-10,
        );
    }
}

#[test]
fn entries_at_the_ends_of_the_f32_range() {
    // The reference accumulates in f64: rows of f32 entries near f32::MAX do not overflow their
    // norms, and with both normalizations the loss is the one of the same directions at unit
    // scale. Rows of tiny entries (1e-38, and subnormal 1e-45) have norms below eps: the eps
    // path, finite.
    let mut r = rng(10);
    let shape = Shape::new(5, 8, 11);
    let xd = rows(&mut r, 5, 8, (0.5, 1.0));
    let wd = rows(&mut r, 11, 8, (0.5, 1.0));
    let labels = labels(&mut r, 5, 11);
    let big = |v: &[f64], k: f64| v.iter().map(|&e| (e * k) as f32).collect::<Vec<f32>>();
    for spec in [
        MarginLoss::arcface(0.5),
        MarginLoss::cosface(0.35).scale(1000.0),
        MarginLoss::combined(4.0, 0.2, 0.1),
    ] {
        let unit_scale =
            cpu::forward(&spec, &big(&xd, 1.0), &big(&wd, 1.0), &labels, shape).unwrap();
        for k in [1e38, 1e-38] {
            let (x, w) = (big(&xd, k), big(&wd, 1.0));
            let fwd = cpu::forward(&spec, &x, &w, &labels, shape).unwrap();
            let g = cpu::backward(&spec, &fwd, &x, &w, &labels, shape, Upstream::ONE).unwrap();
            assert!(fwd.loss.is_finite(), "{spec:?} x*{k}");
            assert!(all_finite(&g.dx) && all_finite(&g.dw), "{spec:?} x*{k}");
            if k > 1.0 {
                assert!(x.iter().any(|v| v.abs() > 1e37), "not extreme");
                let rel = (fwd.loss - unit_scale.loss).abs() / unit_scale.loss;
                assert!(rel < 1e-6, "{spec:?}: {} vs {}", fwd.loss, unit_scale.loss);
            }
        }
        // f32 subnormals in w: norm below eps, every such class row on the eps path.
        let w_sub = vec![f32::from_bits(1); 11 * 8];
        let fwd = cpu::forward(&spec, &big(&xd, 1.0), &w_sub, &labels, shape).unwrap();
        let g = cpu::backward(
            &spec,
            &fwd,
            &big(&xd, 1.0),
            &w_sub,
            &labels,
            shape,
            Upstream::ONE,
        )
        .unwrap();
        assert!(
            fwd.loss.is_finite() && all_finite(&g.dx) && all_finite(&g.dw),
            "{spec:?}"
        );
    }
}

#[test]
fn rows_below_eps_take_the_derivative_of_the_forward() {
    // Below eps the forward is vh = v / eps, linear in v, so the normalization backward is
    // dv = dvh / eps with no projection term (as F.normalize's autograd). The former formula
    // (dvh - vh (vh . dvh)) / eps differs by up to |vh|^2 ~ 50 % for a row just below eps; finite
    // differences of the forward decide. Row 1 of x and class 2 of w have norms 0.7 eps.
    let shape = Shape::new(4, 6, 5);
    let mut r = rng(77);
    let mut x = rows(&mut r, shape.b, shape.d, (0.5, 2.0));
    let mut w = rows(&mut r, shape.c, shape.d, (0.5, 2.0));
    let d = shape.d;
    for (v, row) in [(&mut x, 1usize), (&mut w, 2)] {
        let n = norm(&v[row * d..(row + 1) * d]);
        v[row * d..(row + 1) * d]
            .iter_mut()
            .for_each(|e| *e *= 0.7 * EPS / n);
    }
    let labels = vec![2, 2, 0, 4];
    for spec in [
        MarginLoss::arcface(0.5),
        MarginLoss::cosface(0.35),
        MarginLoss::sphereface(4.0).lambda(5.0),
        MarginLoss::nsl(16.0),
    ] {
        let (_, g) = run(&spec, &x, &w, &labels, shape, None);
        let loss = |x: &[f64], w: &[f64]| cpu::forward(&spec, x, w, &labels, shape).unwrap().loss;
        // A step of 1e-3 of the tiny rows' entries keeps them below eps; the forward is smooth.
        for (what, grad, row, is_x) in [("dx", &g.dx, 1usize, true), ("dw", &g.dw, 2, false)] {
            if is_x && !spec.normalize_features {
                // The row scale s|x_i| ~ 1e-12 makes that row's loss flat to f64: nothing to
                // difference. Its dx is checked where the row is normalized.
                continue;
            }
            let v = if is_x { &x } else { &w };
            let h = 1e-3 * 0.7 * EPS / (d as f64).sqrt();
            let mut f = |p: &[f64]| {
                let mut full = v.clone();
                full[row * d..(row + 1) * d].copy_from_slice(p);
                if is_x {
                    loss(&full, &w)
                } else {
                    loss(&x, &full)
                }
            };
            let fd = central_diff(&v[row * d..(row + 1) * d], h, &mut f);
            let got = &grad[row * d..(row + 1) * d];
            let e = rel(got, &fd);
            assert!(
                e < 1e-5,
                "{spec:?} {what} row {row}: rel {e:e}, {got:?} vs {fd:?}"
            );
        }
    }
}

/// The range `validate()` and the upstream checks allow, at its edges: s = 1e6, upstream
/// gradients of 1e12, margins at their limits, zero and sub-eps rows, f32 entries near f32::MAX
/// without normalization. The CPU reference (f64) gives finite results for every finite f32
/// input there; just past the bounds is a typed error.
#[test]
fn the_accepted_range_gives_finite_results() {
    use fused_margin::spec::{S_MAX, UPSTREAM_MAX};
    // The reported cases: valid specs before, non-finite results.
    let shape = Shape::new(1, 2, 3);
    let x = [1e10f32, 0.0];
    let w = [1.0f32, 0.0, 0.0, 1.0, -1.0, 0.5];
    for spec in [
        MarginLoss::sphereface(4.0).scale(1e300),
        MarginLoss::arcface(0.5).scale(f64::MAX),
    ] {
        assert!(matches!(
            cpu::forward(&spec, &x, &w, &[0], shape),
            Err(fused_margin::Error::InvalidSpec { field: "s", .. })
        ));
    }
    let spec = MarginLoss::arcface(0.5).reduction(Reduction::Sum);
    let fwd = cpu::forward(&spec, &x, &w, &[0], shape).unwrap();
    assert!(matches!(
        cpu::backward(&spec, &fwd, &x, &w, &[0], shape, Upstream::Scalar(1e308)),
        Err(fused_margin::Error::Upstream { .. })
    ));

    let shape = Shape::new(6, 8, 9);
    let mut r = rng(91);
    let mut xd = rows(&mut r, shape.b, shape.d, (0.5, 2.0));
    let mut wd = rows(&mut r, shape.c, shape.d, (0.5, 2.0));
    let d = shape.d;
    xd[d..2 * d].iter_mut().for_each(|v| *v = 0.0); // zero row
    wd[2 * d..3 * d].iter_mut().for_each(|v| *v *= 1e-13); // below eps
                                                           // Row 3 nearly along its class 4, row 4 nearly opposite it: the steepest target slopes.
    let w4: Vec<f64> = wd[4 * d..5 * d].to_vec();
    for (row, sign) in [(3usize, 1.0), (4, -1.0)] {
        for k in 0..d {
            xd[row * d + k] = sign * w4[k] + 1e-6 * (k as f64 - 3.5);
        }
    }
    let labels = vec![0, 1, 8, 4, 4, -1];
    let mut specs = limit_specs();
    specs.push(MarginLoss::sphereface(4.0).lambda(5.0));
    for base in specs {
        for (scale_x, scale_w) in [(1.0, 1.0), (1e37, 1.0), (1.0, 1e37)] {
            let spec = base
                .scale(S_MAX)
                .normalize_features(scale_x == 1.0 && base.normalize_features)
                .normalize_weights(scale_w == 1.0)
                .reduction(Reduction::Sum);
            let x: Vec<f32> = xd.iter().map(|&v| (v * scale_x) as f32).collect();
            let w: Vec<f32> = wd.iter().map(|&v| (v * scale_w) as f32).collect();
            assert!(x.iter().chain(&w).all(|v| v.is_finite()));
            let fwd = cpu::forward(&spec, &x, &w, &labels, shape).unwrap();
            let what = format!("{spec:?}, x * {scale_x}, w * {scale_w}");
            assert!(
                fwd.loss.is_finite() && fwd.lse.iter().all(|v| v.is_finite()),
                "{what}: loss {}",
                fwd.loss
            );
            for g in [UPSTREAM_MAX, -UPSTREAM_MAX] {
                let gr = cpu::backward(&spec, &fwd, &x, &w, &labels, shape, Upstream::Scalar(g))
                    .unwrap();
                assert!(
                    all_finite(&gr.dx) && all_finite(&gr.dw),
                    "{what}, upstream {g}: gradients"
                );
            }
        }
    }
}
