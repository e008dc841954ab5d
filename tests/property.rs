//! Property tests of the CPU reference (random specs, shapes and inputs against finite
//! differences; the GPU side is `tests/gpu_property.rs`): many seeded random specs
//! (every preset, random margins within `validate()`'s ranges, random policy, gradient mode,
//! normalization switches, lambda and reduction), random odd shapes (B in 1..=9, D in 1..=17,
//! C in 1..=33) and random inputs with outliers (row norms over four decades, single large
//! coordinates, ignored rows). Each case checks, on the f64 path:
//!
//! - the forward against an independent naive evaluation of MATH.md (`common::naive_rows`);
//! - `dx` and `dw` against central finite differences of that naive evaluation. `Full` mode
//!   differences the loss itself; `Detached` mode differences the loss with the margin frozen as a
//!   constant per-row shift `target(c_iy) - c_iy` (the loss `Detached` is the exact gradient of, as
//!   in `cpu_gradcheck.rs`).
//!
//! Rows whose target cosine lies within `KINK_GAP` of a non-smooth point of the target transform
//! (Fallback threshold, Monotonic branch points, Easy's `c = 0`), or, with an angular margin, near
//! the angle clamp (`|c| > 1 - CLAMP_BAND`, where the straight-through gradient is by contract not
//! the derivative and `dpsi/dc` grows like `1/sin(theta)`), are redrawn; a row that cannot be drawn
//! away from them (D = 1 with an angular margin: every cosine is +-1) is ignored instead.
//!
//! Every failure names its case seed. `FUSED_MARGIN_PROPERTY_SEED=<seed> cargo test --release
//! --test property` reruns that one case (in every test of this file); `FUSED_MARGIN_PROPERTY_CASES`
//! changes the number of cases per test (default 200). The generator lives in
//! `tests/property_cases/mod.rs`, shared with the GPU hook `tests/gpu_property.rs`.

mod common;
mod property_cases;

use common::*;
use fused_margin::GradientMode;
use property_cases::*;
use std::f64::consts::PI;

/// Relative finite-difference step: coordinate `k` of row `r` moves by `H_REL * |row r|`, so the
/// step is the same fraction of every row whatever its norm (the rows span four decades).
const H_REL: f64 = 1e-6;
/// Relative tolerance per coordinate.
const RTOL: f64 = 1e-5;
/// Absolute tolerance, as a fraction of the largest difference quotient of the same row: covers
/// the truncation error of coordinates whose own derivative is small.
const ROW_ATOL: f64 = 1e-6;

/// The objective the backward is the exact gradient of, evaluated naively: the loss (Full), or
/// the loss with the margin frozen at the current inputs (Detached).
fn objective_fn(case: &Case) -> impl Fn(&[f64], &[f64]) -> f64 + '_ {
    let spec = case.spec;
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
    move |x: &[f64], w: &[f64]| {
        let rows = match spec.gradient {
            GradientMode::Full => naive_rows(&spec, x, w, &case.labels, case.shape, &|_, c| {
                target_ref(&spec, c)
            }),
            GradientMode::Detached => {
                naive_rows(&spec, x, w, &case.labels, case.shape, &|i, c| c + delta[i])
            }
        };
        let red = reduce(spec.reduction, &rows, &case.labels);
        objective((&rows, red), &spec, case.upstream.as_deref())
    }
}

/// Central differences with a step proportional to each row's norm; returns the quotients and the
/// step used per coordinate.
fn row_scaled_diff(v: &[f64], d: usize, f: &mut dyn FnMut(&[f64]) -> f64) -> (Vec<f64>, Vec<f64>) {
    let mut p = v.to_vec();
    let mut fd = Vec::with_capacity(v.len());
    let mut hs = Vec::with_capacity(v.len());
    for (r, row) in v.chunks(d).enumerate() {
        let h = H_REL * norm(row).max(1e-3);
        for k in r * d..(r + 1) * d {
            p[k] = v[k] + h;
            let up = f(&p);
            p[k] = v[k] - h;
            let down = f(&p);
            p[k] = v[k];
            fd.push((up - down) / (2.0 * h));
            hs.push(h);
        }
    }
    (fd, hs)
}

/// Compares analytic against finite differences row by row: `|a - fd| <= RTOL*|fd| +
/// ROW_ATOL*max_row|fd| + noise`, where `noise = 1e-14*max(|obj|, 1)/h` bounds the rounding
/// error of a difference quotient of an objective of magnitude `|obj|`.
fn compare(
    what: &str,
    got: &[f64],
    fd: &[f64],
    hs: &[f64],
    d: usize,
    obj: f64,
) -> Result<(), String> {
    for (r, (g_row, f_row)) in got.chunks(d).zip(fd.chunks(d)).enumerate() {
        let row_max = f_row.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (k, (&g, &f)) in g_row.iter().zip(f_row).enumerate() {
            let h = hs[r * d + k];
            let allowed = RTOL * f.abs() + ROW_ATOL * row_max + 1e-14 * obj.abs().max(1.0) / h;
            if !g.is_finite() || (g - f).abs() > allowed {
                return Err(format!(
                    "{what}[{r}][{k}]: analytic {g:e}, finite difference {f:e} (diff {:e}, \
                     allowed {allowed:e})",
                    (g - f).abs()
                ));
            }
        }
    }
    Ok(())
}

/// One case: forward against the naive evaluation, then both gradients against differences.
/// Returns whether the gradients are non-trivial (some entry above 1e-9).
fn check(case: &Case) -> Result<bool, String> {
    let spec = &case.spec;
    let (fwd, g) = run(
        spec,
        &case.x,
        &case.w,
        &case.labels,
        case.shape,
        case.upstream.as_deref(),
    );
    let naive = naive_rows(spec, &case.x, &case.w, &case.labels, case.shape, &|_, c| {
        target_ref(spec, c)
    });
    for (i, (a, b)) in fwd.row_loss.iter().zip(&naive).enumerate() {
        if !a.is_finite() || (a - b).abs() > 1e-12 + 1e-10 * b.abs() {
            return Err(format!("row_loss[{i}]: {a} vs naive {b}"));
        }
    }
    let naive_loss = reduce(spec.reduction, &naive, &case.labels);
    if (fwd.loss - naive_loss).abs() > 1e-12 + 1e-10 * naive_loss.abs() {
        return Err(format!("loss {} vs naive {naive_loss}", fwd.loss));
    }
    if fwd.counted != case.labels.iter().filter(|&&l| l >= 0).count() {
        return Err(format!("counted {}", fwd.counted));
    }

    let f = objective_fn(case);
    let obj = f(&case.x, &case.w);
    let crate_obj = objective((&fwd.row_loss, fwd.loss), spec, case.upstream.as_deref());
    if (obj - crate_obj).abs() > 1e-12 + 1e-10 * obj.abs() {
        return Err(format!("objective {crate_obj} vs naive {obj}"));
    }
    let d = case.shape.d;
    let (fdx, hx) = row_scaled_diff(&case.x, d, &mut |xp| f(xp, &case.w));
    let (fdw, hw) = row_scaled_diff(&case.w, d, &mut |wp| f(&case.x, wp));
    compare("dx", &g.dx, &fdx, &hx, d, obj)?;
    compare("dw", &g.dw, &fdw, &hw, d, obj)?;
    // Ignored rows get no gradient.
    for (i, &l) in case.labels.iter().enumerate() {
        if l < 0 && g.dx[i * d..(i + 1) * d].iter().any(|&v| v != 0.0) {
            return Err(format!("ignored row {i} has a non-zero dx"));
        }
    }
    Ok(g.dx.iter().chain(&g.dw).any(|v| v.abs() > 1e-9))
}

/// Runs every case of one preset family; fails naming each failing seed.
fn property(base: u64, preset: Preset) {
    let mut failures = Vec::new();
    let mut nonzero = 0;
    let cases = seeds(base);
    for &seed in &cases {
        let case = draw(seed, preset);
        match check(&case) {
            Ok(true) => nonzero += 1,
            Ok(false) => {}
            Err(e) => failures.push(format!("{}\n    {e}", case.describe())),
        }
    }
    assert!(
        failures.is_empty(),
        "{preset:?}: {} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // A property over all-zero gradients would hold trivially: most cases must have real ones.
    assert!(
        cases.len() < 4 || nonzero * 2 > cases.len(),
        "{preset:?}: only {nonzero} of {} cases have a non-zero gradient",
        cases.len()
    );
}

#[test]
fn nsl_random_specs_match_finite_differences() {
    property(1_000, Preset::Nsl);
}

#[test]
fn cosface_random_specs_match_finite_differences() {
    property(2_000, Preset::CosFace);
}

#[test]
fn arcface_random_specs_match_finite_differences() {
    property(3_000, Preset::ArcFace);
}

#[test]
fn sphereface_random_specs_match_finite_differences() {
    property(4_000, Preset::SphereFace);
}

#[test]
fn combined_random_specs_match_finite_differences() {
    property(5_000, Preset::Combined);
}

/// The generator itself covers what the property is about: every policy and both gradient
/// modes, normalization switches, lambda, every reduction, B = 1, C = 1, D = 1, both sides of
/// `m1*theta + m2 = pi` and ignored rows, over the default seeds of the five tests above.
#[test]
fn generator_covers_the_options() {
    if std::env::var("FUSED_MARGIN_PROPERTY_SEED").is_ok() {
        return;
    }
    let mut seen = std::collections::BTreeSet::new();
    for (base, preset) in [
        (1_000, Preset::Nsl),
        (2_000, Preset::CosFace),
        (3_000, Preset::ArcFace),
        (4_000, Preset::SphereFace),
        (5_000, Preset::Combined),
    ] {
        for seed in base..base + DEFAULT_CASES {
            let case = draw(seed, preset);
            let s = &case.spec;
            seen.insert(format!("{:?}", s.effective_policy()));
            seen.insert(format!("{:?}", s.gradient));
            seen.insert(format!("{:?}", s.reduction));
            seen.insert(format!("features {}", s.normalize_features));
            seen.insert(format!("weights {}", s.normalize_weights));
            if s.lambda > 0.0 {
                seen.insert("lambda".into());
            }
            for (dim, v) in [
                ("B", case.shape.b),
                ("C", case.shape.c),
                ("D", case.shape.d),
            ] {
                if v == 1 {
                    seen.insert(format!("{dim} = 1"));
                }
            }
            if case.labels.iter().any(|&l| l < 0) {
                seen.insert("ignored".into());
            }
            for (i, &l) in case.labels.iter().enumerate() {
                if l < 0 || !s.has_angular_margin() {
                    continue;
                }
                let c = target_cosine(s, &case.x, &case.w, case.shape.d, i, l as usize);
                let over = angle_arg(s, c) > PI;
                seen.insert(format!("over pi {over}"));
            }
        }
    }
    for want in [
        "Monotonic",
        "Fallback",
        "Raw",
        "Easy",
        "Full",
        "Detached",
        "Mean",
        "Sum",
        "None",
        "features true",
        "features false",
        "weights true",
        "weights false",
        "lambda",
        "B = 1",
        "C = 1",
        "D = 1",
        "ignored",
        "over pi true",
        "over pi false",
    ] {
        assert!(seen.contains(want), "no default case has {want}: {seen:?}");
    }
}
