//! Central finite differences on the f64 CPU path, for every preset and every option that changes
//! the maths (MATH.md "Backward"). Each case also checks the forward against an independent naive
//! evaluation of MATH.md (`common::naive_rows`), so a wrong forward cannot hide behind a backward
//! that is consistent with it.
//!
//! Inputs are seeded, shapes are odd (B=7, D=13, C=29 and similar), and rows whose target cosine
//! lies within `KINK_GAP` of a non-smooth point of the target transform (the Fallback threshold,
//! the Monotonic branch points, Easy's `c = 0`, the angle clamp) are redrawn, so no difference
//! quotient straddles a kink.

mod common;

use common::*;
use fused_margin::{cpu, GradientMode, MarginLoss, OverflowPolicy, Reduction, Shape};
use rand::{rngs::StdRng, Rng};
use std::f64::consts::PI;

/// Finite-difference step on f64: the truncation error `h^2 f'''/6` (~1e-12) and the rounding
/// error `eps*|L|/h` (~1e-10*|L|) are then both far below the tolerance.
const H: f64 = 1e-6;
/// Relative tolerance of the comparison `|analytic - fd| <= atol + RTOL*|fd|`.
const RTOL: f64 = 1e-6;
/// Absolute tolerance per unit of objective: the rounding error of a difference quotient grows
/// with the magnitude of the loss being differenced (`eps*|L|/h`).
const ATOL_PER_LOSS: f64 = 1e-7;
/// Minimum distance, in cosine, between a row's target cosine and any kink of the target transform.
/// A step of `H` moves a cosine by at most ~`H/|x_i|` ~ 1e-6, so 1e-3 is far away.
const KINK_GAP: f64 = 1e-3;

/// How a test case's inputs are drawn.
#[derive(Clone, Copy)]
struct Draw {
    shape: Shape,
    seed: u64,
    /// Rows placed near `-w_y` (target angle close to pi), so `m1*theta + m2 > pi` happens.
    crossing_rows: usize,
    /// Per-coordinate noise around `-w_y` of the crossing rows (smaller: angle closer to pi).
    crossing_noise: f64,
    /// Trailing rows given a negative label (alternately -1 and -100).
    ignored_rows: usize,
    /// Range of the feature row norms.
    x_norms: (f64, f64),
    /// Range of the class row norms (matters with `normalize_weights(false)`).
    w_norms: (f64, f64),
}

impl Draw {
    fn new(seed: u64) -> Self {
        Self {
            shape: Shape::new(7, 13, 29),
            seed,
            crossing_rows: 0,
            crossing_noise: 0.1,
            ignored_rows: 0,
            x_norms: (0.5, 2.0),
            w_norms: (0.5, 2.0),
        }
    }
    fn crossing(mut self, n: usize) -> Self {
        self.crossing_rows = n;
        self
    }
    fn crossing_noise(mut self, sigma: f64) -> Self {
        self.crossing_noise = sigma;
        self
    }
    fn ignored(mut self, n: usize) -> Self {
        self.ignored_rows = n;
        self
    }
    fn w_norms(mut self, lo: f64, hi: f64) -> Self {
        self.w_norms = (lo, hi);
        self
    }
    fn shape(mut self, b: usize, d: usize, c: usize) -> Self {
        self.shape = Shape::new(b, d, c);
        self
    }
}

struct Case {
    shape: Shape,
    x: Vec<f64>,
    w: Vec<f64>,
    labels: Vec<i32>,
    /// Per-row upstream for `Reduction::None` (random, with signs of both kinds).
    upstream: Option<Vec<f64>>,
}

/// The cosines where the target transform of `spec` is not smooth (MATH.md step 4).
fn kinks(spec: &MarginLoss) -> Vec<f64> {
    let mut out = Vec::new();
    let policy = policy_of(spec);
    if policy == OverflowPolicy::Easy {
        out.push(0.0);
    }
    if spec.m1 == 1.0 && spec.m2 == 0.0 {
        return out; // psi = c - m3: no angle, no clamp
    }
    // The clamp at |c| = 1 - d.
    out.push(1.0 - CLAMP_D);
    out.push(-1.0 + CLAMP_D);
    match policy {
        OverflowPolicy::Fallback => out.push(((PI - spec.m2) / spec.m1).cos()),
        OverflowPolicy::Monotonic => {
            // a = k*pi for every k the angle range [m2, m1*pi + m2] reaches.
            let mut k = 1.0;
            while k * PI <= spec.m1 * PI + spec.m2 {
                let theta = (k * PI - spec.m2) / spec.m1;
                if (0.0..=PI).contains(&theta) {
                    out.push(theta.cos());
                }
                k += 1.0;
            }
        }
        OverflowPolicy::Raw | OverflowPolicy::Easy | OverflowPolicy::Clip => {}
    }
    out
}

fn draw(spec: &MarginLoss, d: Draw) -> Case {
    let mut rng: StdRng = rng(d.seed);
    let Shape { b, d: dim, c } = d.shape;
    let w = rows(&mut rng, c, dim, d.w_norms);
    let mut labels = labels(&mut rng, b, c);
    let kinks = kinks(spec);
    let mut x = vec![0.0; b * dim];
    for i in 0..b {
        let y = labels[i] as usize;
        let wy_dir = unit(&w[y * dim..(y + 1) * dim]);
        let mut tries = 0;
        loop {
            let n = rng.random_range(d.x_norms.0..d.x_norms.1);
            let row: Vec<f64> = if i < d.crossing_rows {
                // Near the opposite of the target class: theta close to pi.
                let r: Vec<f64> = wy_dir
                    .iter()
                    .map(|v| -v + d.crossing_noise * normal(&mut rng))
                    .collect();
                unit(&r).iter().map(|v| v * n).collect()
            } else {
                let r: Vec<f64> = (0..dim).map(|_| normal(&mut rng)).collect();
                unit(&r).iter().map(|v| v * n).collect()
            };
            x[i * dim..(i + 1) * dim].copy_from_slice(&row);
            let cy = target_cosine(spec, &x, &w, dim, i, y);
            if kinks.iter().all(|k| (cy - k).abs() > KINK_GAP) {
                break;
            }
            tries += 1;
            assert!(tries < 1000, "could not draw row {i} away from the kinks");
        }
    }
    for (n, l) in labels.iter_mut().rev().take(d.ignored_rows).enumerate() {
        *l = if n % 2 == 0 { -1 } else { -100 };
    }
    let upstream = (spec.reduction == Reduction::None)
        .then(|| (0..b).map(|_| rng.random_range(-1.0..2.0)).collect());
    Case {
        shape: d.shape,
        x,
        w,
        labels,
        upstream,
    }
}

/// The angle arguments `a_i = m1*theta_i + m2` of the counted rows.
fn angle_args(spec: &MarginLoss, case: &Case) -> Vec<f64> {
    (0..case.shape.b)
        .filter(|&i| case.labels[i] >= 0)
        .map(|i| {
            let c = target_cosine(
                spec,
                &case.x,
                &case.w,
                case.shape.d,
                i,
                case.labels[i] as usize,
            );
            angle_arg(spec, c)
        })
        .collect()
}

/// Asserts that at least two counted rows have `m1*theta + m2 > pi` and at least one does not, so
/// both sides of the overflow policy are exercised.
fn assert_crossings(spec: &MarginLoss, case: &Case) {
    let a = angle_args(spec, case);
    let over = a.iter().filter(|&&a| a > PI).count();
    assert!(
        over >= 2 && over < a.len(),
        "want rows on both sides of m1*theta + m2 = pi, got {over} of {} over (a = {a:?})",
        a.len()
    );
}

fn crate_objective(spec: &MarginLoss, case: &Case, x: &[f64], w: &[f64]) -> f64 {
    let fwd = cpu::forward(spec, x, w, &case.labels, case.shape).unwrap();
    objective((&fwd.row_loss, fwd.loss), spec, case.upstream.as_deref())
}

/// The full check: forward against the naive MATH.md evaluation, then analytic `dx`, `dw` against
/// central differences of the crate's forward.
fn gradcheck(spec: MarginLoss, case: &Case) {
    let (fwd, g) = run(
        &spec,
        &case.x,
        &case.w,
        &case.labels,
        case.shape,
        case.upstream.as_deref(),
    );
    let naive = naive_rows(
        &spec,
        &case.x,
        &case.w,
        &case.labels,
        case.shape,
        &|_, c| target_ref(&spec, c),
    );
    assert_close("row_loss vs naive", &fwd.row_loss, &naive, 1e-12, 1e-10);
    let naive_loss = reduce(spec.reduction, &naive, &case.labels);
    assert_close("loss vs naive", &[fwd.loss], &[naive_loss], 1e-12, 1e-10);

    let obj = crate_objective(&spec, case, &case.x, &case.w);
    let atol = ATOL_PER_LOSS * obj.abs().max(1.0);
    let fdx = central_diff(&case.x, H, &mut |xp| {
        crate_objective(&spec, case, xp, &case.w)
    });
    let fdw = central_diff(&case.w, H, &mut |wp| {
        crate_objective(&spec, case, &case.x, wp)
    });
    assert_close("dx", &g.dx, &fdx, atol, RTOL);
    assert_close("dw", &g.dw, &fdw, atol, RTOL);
    // A check against all-zero gradients would pass trivially; these cases never have them.
    assert!(g.dx.iter().any(|v| v.abs() > 1e-6) && g.dw.iter().any(|v| v.abs() > 1e-6));
}

/// Detached mode (MATH.md "Backward": `dtarget/dc = 1`) is the exact gradient of a loss whose
/// margin is frozen as a constant per-row shift `delta_i = target(c_iy) - c_iy`, evaluated at the
/// current inputs. That frozen loss is written here (naive evaluation, shift from `target_ref`),
/// and differenced.
fn detached_check(spec: MarginLoss, case: &Case) {
    assert_eq!(spec.gradient, GradientMode::Detached);
    let (fwd, g) = run(
        &spec,
        &case.x,
        &case.w,
        &case.labels,
        case.shape,
        case.upstream.as_deref(),
    );
    let d = case.shape.d;
    let delta: Vec<f64> = (0..case.shape.b)
        .map(|i| {
            if case.labels[i] < 0 {
                return 0.0;
            }
            let c = target_cosine(&spec, &case.x, &case.w, d, i, case.labels[i] as usize);
            target_ref(&spec, c) - c
        })
        .collect();
    let frozen = |x: &[f64], w: &[f64]| {
        let rows = naive_rows(&spec, x, w, &case.labels, case.shape, &|i, c| c + delta[i]);
        let red = reduce(spec.reduction, &rows, &case.labels);
        objective((&rows, red), &spec, case.upstream.as_deref())
    };
    // At the current point the frozen loss is the loss itself.
    let obj = frozen(&case.x, &case.w);
    let crate_obj = objective((&fwd.row_loss, fwd.loss), &spec, case.upstream.as_deref());
    assert_close("frozen loss", &[obj], &[crate_obj], 1e-12, 1e-10);

    let atol = ATOL_PER_LOSS * obj.abs().max(1.0);
    let fdx = central_diff(&case.x, H, &mut |xp| frozen(xp, &case.w));
    let fdw = central_diff(&case.w, H, &mut |wp| frozen(&case.x, wp));
    assert_close("detached dx", &g.dx, &fdx, atol, RTOL);
    assert_close("detached dw", &g.dw, &fdw, atol, RTOL);

    // The case must be one where detaching matters, or the check above proves nothing new.
    let (_, full) = run(
        &spec.gradient(GradientMode::Full),
        &case.x,
        &case.w,
        &case.labels,
        case.shape,
        case.upstream.as_deref(),
    );
    let diff: f64 = full.dx.iter().zip(&g.dx).map(|(a, b)| (a - b).abs()).sum();
    assert!(diff > 1e-3, "Full and Detached dx agree (diff {diff})");
}

// ---- presets ---------------------------------------------------------------------------------

#[test]
fn nsl_mean() {
    let spec = MarginLoss::nsl(16.0);
    gradcheck(spec, &draw(&spec, Draw::new(1)));
}

#[test]
fn cosface_mean() {
    let spec = MarginLoss::cosface(0.35);
    gradcheck(spec, &draw(&spec, Draw::new(2)));
}

#[test]
fn arcface_fallback_across_threshold() {
    let spec = MarginLoss::arcface(0.5);
    assert_eq!(spec.effective_policy(), OverflowPolicy::Fallback);
    let case = draw(&spec, Draw::new(3).crossing(4));
    assert_crossings(&spec, &case);
    gradcheck(spec, &case);
}

#[test]
fn arcface_monotonic_across_threshold() {
    let spec = MarginLoss::arcface(0.5).policy(OverflowPolicy::Monotonic);
    let case = draw(&spec, Draw::new(4).crossing(4));
    assert_crossings(&spec, &case);
    gradcheck(spec, &case);
}

#[test]
fn arcface_raw_across_threshold() {
    let spec = MarginLoss::arcface(0.5).policy(OverflowPolicy::Raw);
    let case = draw(&spec, Draw::new(5).crossing(4));
    assert_crossings(&spec, &case);
    gradcheck(spec, &case);
}

#[test]
fn arcface_easy_both_signs_of_cosine() {
    let spec = MarginLoss::arcface(0.5).policy(OverflowPolicy::Easy);
    let case = draw(&spec, Draw::new(6).crossing(3).shape(9, 13, 29));
    assert_crossings(&spec, &case);
    let d = case.shape.d;
    let pos = (0..case.shape.b)
        .filter(|&i| target_cosine(&spec, &case.x, &case.w, d, i, case.labels[i] as usize) > 0.0)
        .count();
    assert!(pos >= 1 && pos < case.shape.b, "{pos} rows with c > 0");
    gradcheck(spec, &case);
}

#[test]
fn cosface_easy_both_signs_of_cosine() {
    let spec = MarginLoss::cosface(0.35).policy(OverflowPolicy::Easy);
    let case = draw(&spec, Draw::new(7).crossing(3));
    let d = case.shape.d;
    let pos = (0..case.shape.b)
        .filter(|&i| target_cosine(&spec, &case.x, &case.w, d, i, case.labels[i] as usize) > 0.0)
        .count();
    assert!(pos >= 1 && pos < case.shape.b, "{pos} rows with c > 0");
    gradcheck(spec, &case);
}

#[test]
fn sphereface_m4_feature_norm_monotonic() {
    let spec = MarginLoss::sphereface(4.0);
    assert!(!spec.normalize_features);
    let case = draw(&spec, Draw::new(8).crossing(3));
    // Several branches k = floor(4*theta/pi) are visited.
    let mut ks: Vec<i64> = angle_args(&spec, &case)
        .iter()
        .map(|a| (a / PI).floor() as i64)
        .collect();
    ks.sort();
    ks.dedup();
    assert!(ks.len() >= 2, "branches {ks:?}");
    gradcheck(spec, &case);
}

#[test]
fn sphereface_m4_lambda_blend() {
    let spec = MarginLoss::sphereface(4.0).lambda(5.0);
    gradcheck(spec, &draw(&spec, Draw::new(9).crossing(2)));
}

#[test]
fn sphereface_m1_35_normalized_features() {
    let spec = MarginLoss::sphereface(1.35)
        .normalize_features(true)
        .scale(30.0);
    let case = draw(&spec, Draw::new(10).crossing(4));
    assert_crossings(&spec, &case);
    gradcheck(spec, &case);
}

#[test]
fn combined_insightface_fallback() {
    let spec = MarginLoss::combined(1.0, 0.3, 0.2);
    // m2 = 0.3 puts the threshold at theta > pi - 0.3 (c < -0.955): crossing rows sit closer to -w_y.
    let case = draw(&spec, Draw::new(11).crossing(4).crossing_noise(0.04));
    assert_crossings(&spec, &case);
    gradcheck(spec, &case);
}

#[test]
fn combined_m1_2_monotonic() {
    let spec = MarginLoss::combined(2.0, 0.3, 0.1);
    assert_eq!(spec.effective_policy(), OverflowPolicy::Monotonic);
    let case = draw(&spec, Draw::new(12).crossing(3));
    assert_crossings(&spec, &case);
    gradcheck(spec, &case);
}

#[test]
fn combined_m1_1_5_raw() {
    let spec = MarginLoss::combined(1.5, 0.2, 0.1).policy(OverflowPolicy::Raw);
    let case = draw(&spec, Draw::new(13).crossing(3));
    assert_crossings(&spec, &case);
    gradcheck(spec, &case);
}

// ---- normalization switches -------------------------------------------------------------------

#[test]
fn arcface_unnormalized_weights() {
    // Class norms below 1 keep |c| away from the clamp (where the gradient is straight-through by
    // contract and so differs from the difference quotient); m2 = 1 puts the threshold at
    // c = cos(pi - 1) ~ -0.54, which the crossing rows pass.
    let spec = MarginLoss::arcface(1.0).normalize_weights(false);
    let case = draw(&spec, Draw::new(14).crossing(4).w_norms(0.6, 0.95));
    assert_crossings(&spec, &case);
    gradcheck(spec, &case);
}

#[test]
fn cosface_unnormalized_weights_large_norms() {
    // No angular margin: no clamp, so class norms above 1 are fine.
    let spec = MarginLoss::cosface(0.35)
        .normalize_weights(false)
        .scale(8.0);
    gradcheck(spec, &draw(&spec, Draw::new(15).w_norms(0.5, 3.0)));
}

#[test]
fn arcface_unnormalized_features_and_weights() {
    let spec = MarginLoss::arcface(1.0)
        .normalize_features(false)
        .normalize_weights(false)
        .scale(4.0);
    let case = draw(&spec, Draw::new(16).crossing(4).w_norms(0.6, 0.95));
    assert_crossings(&spec, &case);
    gradcheck(spec, &case);
}

// ---- ignored rows and reductions ---------------------------------------------------------------

#[test]
fn arcface_mean_with_ignored_rows() {
    let spec = MarginLoss::arcface(0.5);
    let case = draw(&spec, Draw::new(17).crossing(3).ignored(3));
    assert!(case.labels.contains(&-1) && case.labels.contains(&-100));
    gradcheck(spec, &case);
}

#[test]
fn arcface_sum_with_ignored_rows() {
    let spec = MarginLoss::arcface(0.5).reduction(Reduction::Sum);
    let case = draw(&spec, Draw::new(18).crossing(3).ignored(2));
    assert_crossings(&spec, &case);
    gradcheck(spec, &case);
}

#[test]
fn combined_none_per_row_upstream() {
    let spec = MarginLoss::combined(1.0, 0.3, 0.2).reduction(Reduction::None);
    let case = draw(&spec, Draw::new(19).crossing(3).ignored(2));
    assert!(case.upstream.is_some());
    gradcheck(spec, &case);
}

#[test]
fn sphereface_none_per_row_upstream() {
    let spec = MarginLoss::sphereface(4.0)
        .lambda(2.0)
        .reduction(Reduction::None);
    gradcheck(spec, &draw(&spec, Draw::new(20).crossing(2).ignored(1)));
}

// ---- gradient mode -----------------------------------------------------------------------------

#[test]
fn arcface_detached_is_frozen_margin_gradient() {
    let spec = MarginLoss::arcface(0.5).gradient(GradientMode::Detached);
    let case = draw(&spec, Draw::new(21).crossing(3));
    assert_crossings(&spec, &case);
    detached_check(spec, &case);
}

#[test]
fn sphereface_detached_lambda_is_frozen_margin_gradient() {
    let spec = MarginLoss::sphereface(4.0)
        .lambda(5.0)
        .gradient(GradientMode::Detached);
    detached_check(spec, &draw(&spec, Draw::new(22).crossing(2)));
}

#[test]
fn combined_raw_detached_none_is_frozen_margin_gradient() {
    let spec = MarginLoss::combined(1.2, 0.3, 0.2)
        .policy(OverflowPolicy::Raw)
        .gradient(GradientMode::Detached)
        .reduction(Reduction::None);
    detached_check(spec, &draw(&spec, Draw::new(23).crossing(2).ignored(2)));
}

#[test]
fn detached_equals_full_where_the_target_derivative_is_one() {
    // CosFace: psi = c - m3, derivative 1 everywhere.
    let cos = MarginLoss::cosface(0.35);
    let case = draw(&cos, Draw::new(24));
    let (_, full) = run(&cos, &case.x, &case.w, &case.labels, case.shape, None);
    let det = cos.gradient(GradientMode::Detached);
    let (_, detached) = run(&det, &case.x, &case.w, &case.labels, case.shape, None);
    assert_close("cosface dx", &detached.dx, &full.dx, 1e-15, 1e-13);
    assert_close("cosface dw", &detached.dw, &full.dw, 1e-15, 1e-13);

    // ArcFace with every counted row past the Fallback threshold: psi = c - m2 sin m2, derivative 1.
    let arc = MarginLoss::arcface(0.5);
    let case = draw(&arc, Draw::new(25).crossing(7).crossing_noise(0.04));
    let a = angle_args(&arc, &case);
    assert!(
        a.iter().all(|&a| a > PI),
        "not all rows past the threshold: {a:?}"
    );
    let (_, full) = run(&arc, &case.x, &case.w, &case.labels, case.shape, None);
    let det = arc.gradient(GradientMode::Detached);
    let (_, detached) = run(&det, &case.x, &case.w, &case.labels, case.shape, None);
    assert_close("fallback dx", &detached.dx, &full.dx, 1e-15, 1e-13);
    assert_close("fallback dw", &detached.dw, &full.dw, 1e-15, 1e-13);
}

#[test]
fn the_shifted_reference_of_the_tests_is_the_crate_reference_at_zero_shift() {
    // tests/common's conditioning allowance rests on reference_with_target_shift: at shift 0 it
    // must be the crate's reference (every option that changes the maths).
    let shape = Shape::new(7, 6, 9);
    for (k, spec) in [
        MarginLoss::arcface(0.5),
        MarginLoss::cosface(0.35).normalize_features(false),
        MarginLoss::sphereface(4.0).lambda(5.0),
        MarginLoss::combined(2.0, 0.3, 0.2).normalize_weights(false),
    ]
    .into_iter()
    .enumerate()
    {
        let inp = zero_row_inputs(shape, 900 + k as u64);
        let spec = spec.reduction(fused_margin::Reduction::None);
        let g: Vec<f64> = inp
            .labels
            .iter()
            .zip(&inp.upstream)
            .map(|(&l, &u)| if l >= 0 { u } else { 0.0 })
            .collect();
        let (f, gr) = run(
            &spec,
            &inp.x,
            &inp.w,
            &inp.labels,
            shape,
            Some(&inp.upstream),
        );
        let (rows, dx, dw) =
            reference_with_target_shift(&spec, &inp.x, &inp.w, &inp.labels, shape, &g, 0.0);
        assert!(rel(&rows, &f.row_loss) < 1e-12, "{spec:?} rows");
        assert!(rel(&dx, &gr.dx) < 1e-12, "{spec:?} dx");
        assert!(rel(&dw, &gr.dw) < 1e-12, "{spec:?} dw");
    }
}
