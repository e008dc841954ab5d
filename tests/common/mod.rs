//! Helpers shared by the integration tests: seeded inputs, an independent f64 evaluation of
//! MATH.md (written from the contract, not from `src/`), and central finite differences.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use fused_margin::{cpu, MarginLoss, OverflowPolicy, Reduction, Shape, Upstream};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::f64::consts::PI;

/// MATH.md's angle clamp `d` and normalization floor `eps`, restated here so the test's maths
/// does not lean on the crate's constants.
pub const CLAMP_D: f64 = 1e-7;
pub const EPS: f64 = 1e-12;

/// A seeded generator, so every failure reproduces.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// A standard normal sample (Box-Muller; `rand` 0.9 has no normal distribution without
/// `rand_distr`, which is not a dev-dependency).
pub fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// `v / max(|v|, eps)`.
pub fn unit(a: &[f64]) -> Vec<f64> {
    let n = norm(a).max(EPS);
    a.iter().map(|v| v / n).collect()
}

/// `c_iy` as MATH.md defines it: unit feature direction against the (normalized or raw) class row.
pub fn target_cosine(spec: &MarginLoss, x: &[f64], w: &[f64], d: usize, i: usize, y: usize) -> f64 {
    let xh = unit(&x[i * d..(i + 1) * d]);
    let wy = &w[y * d..(y + 1) * d];
    if spec.normalize_weights {
        dot(&xh, &unit(wy))
    } else {
        dot(&xh, wy)
    }
}

/// The policy MATH.md says is in force: explicit, else Monotonic for `m1 != 1`, Fallback otherwise.
pub fn policy_of(spec: &MarginLoss) -> OverflowPolicy {
    spec.policy.unwrap_or(if spec.m1 != 1.0 {
        OverflowPolicy::Monotonic
    } else {
        OverflowPolicy::Fallback
    })
}

/// The angle argument `a = m1*theta + m2` at cosine `c` (with MATH.md's clamp).
pub fn angle_arg(spec: &MarginLoss, c: f64) -> f64 {
    spec.m1 * c.clamp(-1.0 + CLAMP_D, 1.0 - CLAMP_D).acos() + spec.m2
}

/// `psi(c)` of MATH.md step 4, written from the contract.
pub fn psi_ref(spec: &MarginLoss, c: f64) -> f64 {
    let policy = policy_of(spec);
    if policy == OverflowPolicy::Easy && c <= 0.0 {
        return c;
    }
    if spec.m1 == 1.0 && spec.m2 == 0.0 {
        return c - spec.m3;
    }
    let a = angle_arg(spec, c);
    match policy {
        OverflowPolicy::Raw | OverflowPolicy::Easy => a.cos() - spec.m3,
        OverflowPolicy::Fallback if a > PI => c - spec.m2 * spec.m2.sin() - spec.m3,
        OverflowPolicy::Fallback => a.cos() - spec.m3,
        OverflowPolicy::Monotonic => {
            let k = (a / PI).floor();
            let sign = if (k as i64).rem_euclid(2) == 0 {
                1.0
            } else {
                -1.0
            };
            sign * a.cos() - 2.0 * k - spec.m3
        }
        // AdaFace's clip has per-row margins: the golden files check it, not this writing.
        OverflowPolicy::Clip => panic!("psi_ref covers the fixed-margin family only"),
    }
}

/// The target value with the lambda blend: `(lambda*c + psi)/(1 + lambda)`.
pub fn target_ref(spec: &MarginLoss, c: f64) -> f64 {
    (spec.lambda * c + psi_ref(spec, c)) / (1.0 + spec.lambda)
}

/// Per-row losses of MATH.md computed naively in f64, with the target transform supplied per row
/// (`target(i, c)`), so a test can also freeze the margin as a constant shift.
pub fn naive_rows(
    spec: &MarginLoss,
    x: &[f64],
    w: &[f64],
    labels: &[i32],
    shape: Shape,
    target: &dyn Fn(usize, f64) -> f64,
) -> Vec<f64> {
    let d = shape.d;
    (0..shape.b)
        .map(|i| {
            if labels[i] < 0 {
                return 0.0;
            }
            let xi = &x[i * d..(i + 1) * d];
            let xh = unit(xi);
            let r = if spec.normalize_features {
                spec.s
            } else {
                spec.s * norm(xi)
            };
            let y = labels[i] as usize;
            let z: Vec<f64> = (0..shape.c)
                .map(|j| {
                    let wj = &w[j * d..(j + 1) * d];
                    let c = if spec.normalize_weights {
                        dot(&xh, &unit(wj))
                    } else {
                        dot(&xh, wj)
                    };
                    r * if j == y { target(i, c) } else { c }
                })
                .collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            lse - z[y]
        })
        .collect()
}

/// The reduction of MATH.md step 6 applied to per-row losses.
pub fn reduce(reduction: Reduction, rows: &[f64], labels: &[i32]) -> f64 {
    let total: f64 = rows.iter().sum();
    let counted = labels.iter().filter(|&&l| l >= 0).count();
    match reduction {
        Reduction::Mean if counted == 0 => 0.0,
        Reduction::Mean => total / counted as f64,
        _ => total,
    }
}

/// The scalar objective a gradient check differentiates: the reduced loss for mean/sum, and
/// `sum_i u_i l_i` for `Reduction::None` with upstream `u`.
pub fn objective(row_or_loss: (&[f64], f64), spec: &MarginLoss, upstream: Option<&[f64]>) -> f64 {
    match (spec.reduction, upstream) {
        (Reduction::None, Some(u)) => row_or_loss.0.iter().zip(u).map(|(l, g)| l * g).sum(),
        _ => row_or_loss.1,
    }
}

/// Central differences of `f` at every coordinate of `v`, step `h`.
pub fn central_diff(v: &[f64], h: f64, f: &mut dyn FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut p = v.to_vec();
    (0..v.len())
        .map(|k| {
            p[k] = v[k] + h;
            let up = f(&p);
            p[k] = v[k] - h;
            let down = f(&p);
            p[k] = v[k];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// Asserts `|got - want| <= atol + rtol*|want|` elementwise, naming the first offender.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite() && (g - w).abs() <= atol + rtol * w.abs(),
            "{what}[{k}]: got {g}, want {w} (diff {:e}, allowed {:e})",
            (g - w).abs(),
            atol + rtol * w.abs()
        );
    }
}

/// Uniform random labels in `0..c`.
pub fn labels(rng: &mut StdRng, b: usize, c: usize) -> Vec<i32> {
    (0..b).map(|_| rng.random_range(0..c as i32)).collect()
}

/// Gaussian rows of length `d`, each rescaled to a norm drawn from `norms`.
pub fn rows(rng: &mut StdRng, n: usize, d: usize, norms: (f64, f64)) -> Vec<f64> {
    let mut out = Vec::with_capacity(n * d);
    for _ in 0..n {
        let r: Vec<f64> = (0..d).map(|_| normal(rng)).collect();
        let scale = rng.random_range(norms.0..norms.1) / norm(&r);
        out.extend(r.iter().map(|v| v * scale));
    }
    out
}

/// Runs the crate's CPU forward and backward on f64 inputs.
pub fn run(
    spec: &MarginLoss,
    x: &[f64],
    w: &[f64],
    labels: &[i32],
    shape: Shape,
    upstream: Option<&[f64]>,
) -> (cpu::Forward, cpu::Gradients) {
    let fwd = cpu::forward(spec, x, w, labels, shape).expect("forward");
    let up = match upstream {
        Some(u) => Upstream::PerRow(u),
        None => Upstream::ONE,
    };
    let g = cpu::backward(spec, &fwd, x, w, labels, shape, up).expect("backward");
    (fwd, g)
}

/// Normwise relative error `|a - b| / |b|` (MATH.md's precision bars), absolute when the
/// reference `b` is all zeros.
pub fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel: length mismatch");
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// Random inputs: uniform entries, a few large outliers, several ignored rows (-1 and -100), and
/// some rows pointed almost opposite their class so target angles cross pi - m (every overflow
/// policy branch runs).
pub struct Inputs {
    pub x: Vec<f64>,
    pub w: Vec<f64>,
    pub labels: Vec<i32>,
    pub upstream: Vec<f64>,
}

pub fn margin_inputs(shape: Shape, seed: u64) -> Inputs {
    margin_inputs_opts(shape, seed, true)
}

/// `margin_inputs`, with the large outliers only when `outliers`.
pub fn margin_inputs_opts(shape: Shape, seed: u64, outliers: bool) -> Inputs {
    let mut rng = rng(seed);
    let (b, d, c) = (shape.b, shape.d, shape.c);
    let mut x: Vec<f64> = (0..b * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut w: Vec<f64> = (0..c * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    let labels: Vec<i32> = (0..b)
        .map(|i| match i % 7 {
            3 if b > 1 => -1,
            5 if b > 1 => -100,
            _ => rng.random_range(0..c as i32),
        })
        .collect();
    for i in 0..b {
        if labels[i] >= 0 && i % 4 == 1 {
            // x_i ~ -w_y: theta near pi.
            let y = labels[i] as usize;
            for k in 0..d {
                x[i * d + k] = -w[y * d + k] * 0.7 + rng.random_range(-0.05..0.05);
            }
        }
    }
    // Outliers are set, not multiplied, so an element drawn twice cannot compound past f16's range.
    for _ in 0..(b * d / 50).max(1) {
        let e = rng.random_range(0..b * d);
        if outliers {
            x[e] = x[e].signum() * rng.random_range(20.0..40.0);
        }
    }
    for _ in 0..(c * d / 50).max(1) {
        let e = rng.random_range(0..c * d);
        if outliers {
            w[e] = w[e].signum() * rng.random_range(10.0..25.0);
        }
    }
    let upstream = (0..b).map(|_| rng.random_range(0.5..1.5)).collect();
    Inputs {
        x,
        w,
        labels,
        upstream,
    }
}

/// The outputs a backend gives for one non-finite-policy run: row losses, dx, dw.
pub type PolicyOut = (Vec<f64>, Vec<f64>, Vec<f64>);

/// A backend for `non_finite_policy`: (shape, x, w, labels, per-row upstream) -> outputs.
pub type PolicyRun<'a, T> = dyn FnMut(Shape, &[T], &[T], &[i32], &[f32]) -> PolicyOut + 'a;

/// The non-finite policy (docs/MATH.md, "Non-finite input"; tests/non_finite.rs for the CPU) for
/// a backend:
/// `run(shape, x, w, labels, upstream)` computes reduction-none row losses and the gradients for
/// `spec` (reduction none, per-row upstream). One entry of a counted x row, of an ignored x row,
/// and of a class row is set to NaN, +Inf and -Inf in turn: only what depends on the bad value
/// may become non-finite, and the rest matches the reference on the same inputs within
/// `(loss bar, gradient bar)`.
pub fn non_finite_policy<T: fused_margin::Element>(
    spec: MarginLoss,
    seed: u64,
    (lbar, gbar): (f64, f64),
    what: &str,
    run: &mut PolicyRun<'_, T>,
) {
    let shape = Shape::new(40, 16, 70);
    let d = shape.d;
    let base = margin_inputs(shape, seed);
    let labels = base.labels.clone();
    let (bad_row, ignored) = (2, 3);
    assert!(labels[bad_row] >= 0 && labels[ignored] < 0);
    let up: Vec<f32> = (0..shape.b).map(|i| 0.5 + (i % 5) as f32).collect();
    let up64: Vec<f64> = up.iter().map(|&v| v as f64).collect();
    let spec = spec.reduction(Reduction::None);
    let rows_of = |v: &[f64], skip: usize| -> Vec<f64> {
        v.chunks(d)
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .flat_map(|(_, r)| r.to_vec())
            .collect()
    };
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        for (place, bad_x) in [
            ("x row", Some(bad_row)),
            ("ignored x row", Some(ignored)),
            ("w row", None),
        ] {
            let mut x = base.x.clone();
            let mut w = base.w.clone();
            match bad_x {
                Some(r) => x[r * d + 3] = bad,
                None => w[7 * d + 1] = bad,
            }
            let xt: Vec<T> = x.iter().map(|&v| T::from_f64(v)).collect();
            let wt: Vec<T> = w.iter().map(|&v| T::from_f64(v)).collect();
            let what = format!("{what}, {:?}, {place} = {bad}, {spec:?}", T::DTYPE);
            let (row_loss, dx, dw) = run(shape, &xt, &wt, &labels, &up);
            let r = cpu::forward(&spec, &xt, &wt, &labels, shape).unwrap();
            let g = cpu::backward(&spec, &r, &xt, &wt, &labels, shape, Upstream::PerRow(&up64))
                .unwrap();
            match bad_x {
                Some(row) if row == bad_row => {
                    assert!(
                        row_loss[row].is_nan(),
                        "{what}: its row loss {}",
                        row_loss[row]
                    );
                    let ol: Vec<f64> = (0..shape.b)
                        .filter(|&i| i != row)
                        .map(|i| row_loss[i])
                        .collect();
                    let rl: Vec<f64> = (0..shape.b)
                        .filter(|&i| i != row)
                        .map(|i| r.row_loss[i])
                        .collect();
                    assert!(rel(&ol, &rl) <= lbar, "{what}: other rows' losses");
                    assert!(
                        dx[row * d..(row + 1) * d].iter().any(|v| !v.is_finite()),
                        "{what}: its dx"
                    );
                    let e = rel(&rows_of(&dx, row), &rows_of(&g.dx, row));
                    assert!(e <= gbar, "{what}: other dx rows rel {e:e}");
                    for j in 0..shape.c {
                        assert!(
                            dw[j * d..(j + 1) * d].iter().any(|v| !v.is_finite()),
                            "{what}: dw {j}"
                        );
                    }
                }
                Some(row) => {
                    assert_eq!(row_loss[row], 0.0, "{what}: ignored row loss");
                    assert!(rel(&row_loss, &r.row_loss) <= lbar, "{what}: row losses");
                    assert!(
                        rel(&rows_of(&dx, row), &rows_of(&g.dx, row)) <= gbar,
                        "{what}: dx"
                    );
                    assert!(rel(&dw, &g.dw) <= gbar, "{what}: dw");
                    assert!(
                        dx[row * d..(row + 1) * d].iter().all(|v| v.is_nan()),
                        "{what}: its dx"
                    );
                }
                None => {
                    for (i, &l) in labels.iter().enumerate() {
                        if l >= 0 {
                            assert!(row_loss[i].is_nan(), "{what}: row {i} loss {}", row_loss[i]);
                            assert!(
                                dx[i * d..(i + 1) * d].iter().all(|v| v.is_nan()),
                                "{what}: dx {i}"
                            );
                        } else {
                            assert_eq!(row_loss[i], 0.0, "{what}: ignored row {i}");
                        }
                    }
                    assert!(dw.iter().all(|v| v.is_nan()), "{what}: dw");
                }
            }
        }
    }
}

/// `margin_inputs` with x row 1 and class row 5 set to zero (MATH.md's eps path) and the
/// classes moderate (no outliers): the extreme-input cases of the GPU and emulator suites.
pub fn zero_row_inputs(shape: Shape, seed: u64) -> Inputs {
    let mut inp = margin_inputs_opts(shape, seed, false);
    let d = shape.d;
    if shape.b > 1 {
        inp.x[d..2 * d].iter_mut().for_each(|v| *v = 0.0);
    }
    if shape.c > 5 {
        inp.w[5 * d..6 * d].iter_mut().for_each(|v| *v = 0.0);
    }
    inp
}

/// `zero_row_inputs` with x row 1 and class row 5 scaled to norm 0.7 eps instead of zero: below
/// the floor with a direction, where the normalization backward is `dv = dvh / eps`.
pub fn tiny_row_inputs(shape: Shape, seed: u64) -> Inputs {
    let mut inp = margin_inputs_opts(shape, seed, false);
    let d = shape.d;
    for (v, row, n) in [(&mut inp.x, 1, shape.b), (&mut inp.w, 5, shape.c)] {
        if n > row {
            let r = &mut v[row * d..(row + 1) * d];
            let k = 0.7 * EPS / norm(r);
            r.iter_mut().for_each(|e| *e *= k);
        }
    }
    inp
}

/// `zero_row_inputs` with no row targeting the zero class row 5: its dw = dwh / eps is made only
/// of probabilities e_i5 = exp(-lse_i), far below f16's normal range (2^-14) at s = 64, and it
/// dominates dw's norm (the tensor-core backward's f16 scaling).
pub fn untargeted_zero_class_inputs(shape: Shape, seed: u64) -> Inputs {
    let mut inp = zero_row_inputs(shape, seed);
    for l in inp.labels.iter_mut() {
        if *l == 5 {
            *l = 6;
        }
    }
    inp
}

/// `margin_inputs` (no outliers) with every fifth counted row rebuilt so that its target class
/// weight is within 0.5 - 1 degree of exactly opposite (alternate rows) or of exactly along its
/// feature; an along row gets a competing class 0.4 rad away, so its target probability is not
/// ~1 and the steep slope there carries weight. Near the angle clamp the target's dtarget/dc is
/// ~m1 sin(m1 theta + m2) / sin(theta), tens to a hundred here.
pub fn near_clamp_inputs(shape: Shape, seed: u64) -> Inputs {
    let mut inp = margin_inputs_opts(shape, seed, false);
    let (b, d, c) = (shape.b, shape.d, shape.c);
    let mut r = rng(seed ^ 0x00c1_a4b0);
    let unit = |v: Vec<f64>| {
        let n = norm(&v);
        v.into_iter().map(|e| e / n).collect::<Vec<f64>>()
    };
    // A random unit vector orthogonal to the given orthonormal ones (Gram-Schmidt).
    let mut ortho = |basis: &[&[f64]]| {
        let mut v: Vec<f64> = (0..d).map(|_| normal(&mut r)).collect();
        for q in basis {
            let p = dot(&v, q);
            v.iter_mut().zip(q.iter()).for_each(|(a, b)| *a -= p * b);
        }
        unit(v)
    };
    let degrees = [0.5, 1.0, 0.8];
    let mut n = 0;
    for i in 0..b {
        if inp.labels[i] < 0 || i % 5 != 0 || 2 * n + 1 >= c {
            continue;
        }
        let (y, k) = (2 * n, 2 * n + 1);
        let opposite = n % 2 == 0;
        let delta = f64::to_radians(degrees[(n / 2) % 3]);
        let wy = unit(inp.w[y * d..(y + 1) * d].to_vec());
        let u = ortho(&[&wy]);
        let v = ortho(&[&wy, &u]);
        let xn = norm(&inp.x[i * d..(i + 1) * d]);
        let along = if opposite { -delta.cos() } else { delta.cos() };
        for e in 0..d {
            inp.x[i * d + e] = xn * (along * wy[e] + delta.sin() * u[e]);
        }
        if !opposite {
            let (alpha, wn) = (0.4f64, norm(&inp.w[k * d..(k + 1) * d]));
            for e in 0..d {
                inp.w[k * d + e] = wn * (alpha.cos() * wy[e] + alpha.sin() * v[e]);
            }
        }
        inp.labels[i] = y as i32;
        n += 1;
    }
    inp
}

/// The specs the zero-norm-row cases run: normalized, unnormalized features, and a blended
/// multiplicative margin (the eps path through each kind of target).
pub fn zero_row_specs() -> [MarginLoss; 3] {
    [
        MarginLoss::arcface(0.5),
        MarginLoss::cosface(0.35).normalize_features(false),
        MarginLoss::sphereface(4.0).lambda(5.0),
    ]
}

/// Specs at `validate()`'s limits: m1 = 16, m2 just below pi, m3 = 2, s = 1000, alone and
/// together, under every overflow policy, with and without lambda and feature normalization.
pub fn limit_specs() -> Vec<MarginLoss> {
    let below_pi = f64::from_bits(PI.to_bits() - 1);
    let mut v = Vec::new();
    for (m1, m2, m3) in [
        (16.0, 0.0, 0.0),
        (1.0, below_pi, 0.0),
        (1.0, 0.0, 2.0),
        (16.0, below_pi, 2.0),
    ] {
        for policy in [
            OverflowPolicy::Monotonic,
            OverflowPolicy::Fallback,
            OverflowPolicy::Raw,
            OverflowPolicy::Easy,
        ] {
            let s = MarginLoss::combined(m1, m2, m3).policy(policy);
            v.push(s);
            v.push(s.scale(1000.0).lambda(5.0));
            v.push(s.normalize_features(false));
        }
    }
    v
}

/// MATH.md's precision bars (loss, gradients; normwise relative) per input dtype; f32 is exact
/// f32 arithmetic.
pub fn bars(dt: fused_margin::DType) -> (f64, f64) {
    use fused_margin::DType;
    match dt {
        DType::F32 => (1e-5, 1e-4),
        DType::F16 => (1e-3, 5e-3),
        DType::BF16 => (5e-3, 2e-2),
        DType::F64 => unreachable!("the GPU kernels take f32, f16, bf16"),
    }
}

/// MATH.md's bars for f32 inputs through TF32 tensor cores (loss, gradients).
pub const TF32_BARS: (f64, f64) = (1e-3, 5e-3);

/// The documented policy for an infinite entry in a class row without weight normalization,
/// checked with the bad class at each of `positions` (first, last, inside a class tile and at a
/// tile or split boundary): an online logsumexp that starts from `max = -Inf` must not give
/// `exp(-Inf - -Inf) = NaN` when the bad class comes first.
///
/// - `-Inf` (a logit of `-Inf` for every row, whose features are positive): the class leaves the
///   softmax. Every row loss equals the loss of the same problem without that class (within the
///   bars), the other classes' `dw` equal that problem's, the bad class's `dw` is 0, and the
///   counted rows' `dx` is non-finite (`0 * -Inf` in `dxh`).
/// - `+Inf`: every counted row's loss is non-finite, of the same kind (NaN or +Inf) at every
///   position of the class.
///
/// `run` gets the problem and returns (row losses, dx, dw); `spec` must not normalize weights.
pub fn infinite_class_policy<T: fused_margin::Element>(
    spec: MarginLoss,
    shape: Shape,
    positions: &[usize],
    seed: u64,
    (lbar, gbar): (f64, f64),
    what: &str,
    run: &mut PolicyRun<'_, T>,
) {
    assert!(!spec.normalize_weights);
    let spec = spec.reduction(Reduction::None);
    let (b, d, c) = (shape.b, shape.d, shape.c);
    let mut r = rng(seed);
    // Positive features: x_i . w_j = -Inf for a class with one -Inf entry.
    let x: Vec<f64> = (0..b * d).map(|_| r.random_range(0.1..1.0)).collect();
    // The clean classes 0..c-1 (moderate raw logits), and which of them each row is labelled.
    let clean: Vec<f64> = (0..(c - 1) * d)
        .map(|_| 0.25 * r.random_range(-1.0..1.0))
        .collect();
    let mut lab: Vec<i32> = (0..b).map(|_| r.random_range(0..(c - 1) as i32)).collect();
    if b > 2 {
        lab[2] = -1;
    }
    let up: Vec<f32> = (0..b).map(|i| 0.5 + (i % 3) as f32).collect();
    let up64: Vec<f64> = up.iter().map(|&v| v as f64).collect();
    let cast = |v: &[f64]| v.iter().map(|&e| T::from_f64(e)).collect::<Vec<T>>();
    let reduced = Shape::new(b, d, c - 1);
    let rf = cpu::forward(&spec, &cast(&x), &cast(&clean), &lab, reduced).unwrap();
    let rg = cpu::backward(
        &spec,
        &rf,
        &cast(&x),
        &cast(&clean),
        &lab,
        reduced,
        Upstream::PerRow(&up64),
    )
    .unwrap();
    for bad in [f64::NEG_INFINITY, f64::INFINITY] {
        let mut kinds: Option<Vec<(bool, bool)>> = None;
        for &pos in positions {
            // Class `pos` is the bad one; clean class k sits at k, or k + 1 from pos on.
            let at = |k: usize| if k < pos { k } else { k + 1 };
            let mut w = vec![0.0; c * d];
            for k in 0..c - 1 {
                w[at(k) * d..(at(k) + 1) * d].copy_from_slice(&clean[k * d..(k + 1) * d]);
            }
            for e in &mut w[pos * d..(pos + 1) * d] {
                *e = 0.1;
            }
            w[pos * d + d / 2] = bad;
            let labels: Vec<i32> = lab
                .iter()
                .map(|&l| if l < 0 { l } else { at(l as usize) as i32 })
                .collect();
            let wt = cast(&w);
            let (row_loss, dx, dw) = run(shape, &cast(&x), &wt, &labels, &up);
            let what = format!("{what}, {spec:?}, class {pos} of {c} has {bad}");
            if bad < 0.0 {
                let e = rel(&row_loss, &rf.row_loss);
                assert!(
                    e <= lbar,
                    "{what}: row losses rel {e:e} vs the class removed"
                );
                let mut others = Vec::new();
                for k in 0..c - 1 {
                    others.extend_from_slice(&dw[at(k) * d..(at(k) + 1) * d]);
                }
                let e = rel(&others, &rg.dw);
                assert!(e <= gbar, "{what}: other classes' dw rel {e:e}");
                assert!(
                    dw[pos * d..(pos + 1) * d].iter().all(|&v| v == 0.0),
                    "{what}: the bad class's dw {:?}",
                    &dw[pos * d..(pos + 1) * d]
                );
                for (i, &l) in labels.iter().enumerate().filter(|(_, &l)| l >= 0) {
                    assert!(
                        dx[i * d..(i + 1) * d].iter().any(|v| !v.is_finite()),
                        "{what}: dx row {i} (label {l}) all finite"
                    );
                }
            } else {
                let k: Vec<(bool, bool)> = labels
                    .iter()
                    .zip(&row_loss)
                    .filter(|(&l, _)| l >= 0)
                    .map(|(_, v)| (v.is_nan(), v.is_infinite()))
                    .collect();
                assert!(
                    k.iter().all(|&(nan, inf)| nan || inf),
                    "{what}: row losses {row_loss:?}"
                );
                match &kinds {
                    None => kinds = Some(k),
                    Some(first) => assert_eq!(first, &k, "{what}: kinds depend on the position"),
                }
            }
        }
    }
}

/// The conditioning clause of the contract: a target within ~1 degree of the angle clamp (0 or
/// pi), with an angular margin, where `dtarget/dc` is steep enough that one rounding of the
/// cosine moves the results more than the bars allow. "Steep" is what ArcFace's slope is 1 degree
/// from the clamp (`sin(theta + 0.5) / sin(theta)` ~ 27): a larger m1 reaches it farther from the
/// clamp (m1 = 16: `16 sin(16 theta) / sin(theta)` is ~240 at 2 degrees), so the rows counted are
/// those within 1 degree of the clamp or with `|dtarget/dc| >= 25`.
pub fn near_clamp_rows(
    spec: &MarginLoss,
    x: &[f64],
    w: &[f64],
    labels: &[i32],
    shape: Shape,
) -> Vec<usize> {
    if !spec.has_angular_margin() {
        return Vec::new();
    }
    let cos1 = (1.0f64).to_radians().cos();
    (0..shape.b)
        .filter(|&i| {
            labels[i] >= 0 && {
                let c = target_cosine(spec, x, w, shape.d, i, labels[i] as usize);
                c.abs() > cos1
                    || fused_margin::math::target(
                        spec,
                        &fused_margin::math::RowMargin::uniform(spec),
                        c,
                    )
                    .deriv
                    .abs()
                        >= 25.0
            }
        })
        .collect()
}

/// MATH.md's forward and backward in f64 (written out here, with the crate's `math::target`),
/// with every counted row's target cosine moved by `shift`: (row losses, dx, dw). The spread of
/// these over `shift = +-delta` is how far one rounding of the cosine moves the reference.
pub fn reference_with_target_shift(
    spec: &MarginLoss,
    x: &[f64],
    w: &[f64],
    labels: &[i32],
    shape: Shape,
    g_rows: &[f64],
    shift: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (b, d, c) = (shape.b, shape.d, shape.c);
    let xn: Vec<f64> = (0..b).map(|i| norm(&x[i * d..(i + 1) * d])).collect();
    let wn: Vec<f64> = (0..c).map(|j| norm(&w[j * d..(j + 1) * d])).collect();
    let xh: Vec<f64> = (0..b).flat_map(|i| unit(&x[i * d..(i + 1) * d])).collect();
    let wh: Vec<f64> = if spec.normalize_weights {
        (0..c).flat_map(|j| unit(&w[j * d..(j + 1) * d])).collect()
    } else {
        w.to_vec()
    };
    let mut rows = vec![0.0; b];
    let mut dxh = vec![0.0; b * d];
    let mut dn = vec![0.0; b];
    let mut dwh = vec![0.0; c * d];
    for i in 0..b {
        let y = labels[i];
        if y < 0 {
            continue;
        }
        let r = if spec.normalize_features {
            spec.s
        } else {
            spec.s * xn[i]
        };
        let xi = &xh[i * d..(i + 1) * d];
        let mut t = vec![0.0; c];
        let mut dt = vec![1.0; c];
        for j in 0..c {
            let cj = dot(xi, &wh[j * d..(j + 1) * d]);
            if j == y as usize {
                let tg = fused_margin::math::target(
                    spec,
                    &fused_margin::math::RowMargin::uniform(spec),
                    cj + shift,
                );
                (t[j], dt[j]) = (tg.value, tg.deriv);
            } else {
                t[j] = cj;
            }
        }
        let z: Vec<f64> = t.iter().map(|v| r * v).collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        rows[i] = lse - z[y as usize];
        for j in 0..c {
            let onehot = if j == y as usize { 1.0 } else { 0.0 };
            let dz = g_rows[i] * ((z[j] - lse).exp() - onehot);
            dn[i] += spec.s * dz * t[j];
            let dc = r * dz * dt[j];
            for k in 0..d {
                dxh[i * d + k] += dc * wh[j * d + k];
                dwh[j * d + k] += dc * xi[k];
            }
        }
    }
    let back = |dvh: &mut [f64], vh: &[f64], n: f64| {
        if n < EPS {
            dvh.iter_mut().for_each(|a| *a /= EPS);
        } else {
            let p = dot(vh, dvh);
            for (a, v) in dvh.iter_mut().zip(vh) {
                *a = (*a - v * p) / n;
            }
        }
    };
    for i in 0..b {
        back(&mut dxh[i * d..(i + 1) * d], &xh[i * d..(i + 1) * d], xn[i]);
        if !spec.normalize_features {
            for k in 0..d {
                dxh[i * d + k] += dn[i] * xh[i * d + k];
            }
        }
    }
    if spec.normalize_weights {
        for j in 0..c {
            back(&mut dwh[j * d..(j + 1) * d], &wh[j * d..(j + 1) * d], wn[j]);
        }
    }
    (rows, dxh, dwh)
}

/// The allowance the conditioning clause gives a case, as relative amounts to add to the bars
/// (row losses, dx, dw): zero unless some counted row's target is within ~1 degree of the clamp
/// (`near_clamp_rows`); else the normwise spread of the reference over target cosines moved by
/// `+-delta` (the path's rounding of a cosine), relative to the reference. `g_rows` is the
/// per-row upstream (0 on ignored rows).
pub fn conditioning_allowance(
    spec: &MarginLoss,
    x: &[f64],
    w: &[f64],
    labels: &[i32],
    shape: Shape,
    g_rows: &[f64],
    delta: f64,
) -> (f64, f64, f64) {
    // The losses with per-row margins or state get no allowance: the perturbed reference here
    // has the spec's margins only, so their cases keep away from the clamp and meet the bars.
    if spec.variant != fused_margin::Variant::Plain
        || near_clamp_rows(spec, x, w, labels, shape).is_empty()
    {
        return (0.0, 0.0, 0.0);
    }
    let base = reference_with_target_shift(spec, x, w, labels, shape, g_rows, 0.0);
    let mut out = (0.0f64, 0.0f64, 0.0f64);
    for sh in [delta, -delta] {
        let p = reference_with_target_shift(spec, x, w, labels, shape, g_rows, sh);
        out.0 = out.0.max(rel(&p.0, &base.0));
        out.1 = out.1.max(rel(&p.1, &base.1));
        out.2 = out.2.max(rel(&p.2, &base.2));
    }
    out
}

/// The rounding of a cosine on a path that accumulates D products in f32 (`2^-23 sqrt(D)`, a
/// random walk of D roundings at twice f32's unit roundoff) or with TF32-rounded operands
/// (`2^-10`: both operands rounded at 2^-11).
pub fn cosine_rounding(d: usize, tf32: bool) -> f64 {
    if tf32 {
        2f64.powi(-10)
    } else {
        2f64.powi(-23) * (d as f64).sqrt()
    }
}

/// The unsharded problem over Partial FC's sampled classes (every rank's, in rank order, which
/// is global class order): their `per` values each of `w` (K rows of D) and the labels as the
/// classes' positions among them. Returns (w, labels, the number of classes).
pub fn sampled_reference<T: Copy>(
    w: &[T],
    labels: &[i32],
    per: usize,
    sampled: &[fused_margin::shard::Sampled],
) -> (Vec<T>, Vec<i32>, usize) {
    let ids: Vec<usize> = sampled.iter().flat_map(|s| s.global_classes()).collect();
    let rw = ids
        .iter()
        .flat_map(|&g| w[g * per..(g + 1) * per].iter().copied())
        .collect();
    let rl = labels
        .iter()
        .map(|&y| match y {
            y if y >= 0 => ids.binary_search(&(y as usize)).expect("a sampled target") as i32,
            y => y,
        })
        .collect();
    (rw, rl, ids.len())
}
