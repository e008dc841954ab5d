//! The random case generator shared by `tests/property.rs` (CPU reference against finite
//! differences) and `tests/gpu_property.rs` (GPU plans against the CPU reference): seeded random
//! specs, shapes and inputs. See `tests/property.rs` for what is drawn and why.
#![allow(dead_code)]

use crate::common::*;
use fused_margin::{GradientMode, MarginLoss, OverflowPolicy, Reduction, Shape};
use rand::{rngs::StdRng, Rng};
use std::f64::consts::PI;

/// Minimum distance, in cosine, between a target cosine and a kink of the target transform. A
/// finite-difference step moves a cosine by ~1e-6, so 1e-3 is far away.
pub const KINK_GAP: f64 = 1e-3;
/// With an angular margin, target cosines stay within `[-1 + CLAMP_BAND, 1 - CLAMP_BAND]`
/// (`sin(theta) >= 0.2`), away from the clamp at `1 - 1e-7`.
pub const CLAMP_BAND: f64 = 0.02;
/// Redraws allowed per row before the row is ignored instead.
pub const MAX_TRIES: usize = 200;
/// Cases per test (each test draws its own family of specs).
pub const DEFAULT_CASES: u64 = 200;

/// Which preset a case starts from.
#[derive(Debug, Clone, Copy)]
pub enum Preset {
    Nsl,
    CosFace,
    ArcFace,
    SphereFace,
    Combined,
}

/// Log-uniform in `[lo, hi]`.
pub fn log_uniform(rng: &mut StdRng, lo: f64, hi: f64) -> f64 {
    (rng.random_range(lo.ln()..=hi.ln())).exp()
}

/// A random spec starting from `preset`: margins within `validate()`'s ranges (kept where finite
/// differences are meaningful: `m1 <= 8`, `m2 <= 1.5`; the range ends themselves are in
/// `tests/extreme.rs`), random policy (or the default), gradient mode, normalization switches,
/// lambda and reduction.
pub fn random_spec(rng: &mut StdRng, preset: Preset) -> MarginLoss {
    let mut spec = match preset {
        Preset::Nsl => MarginLoss::nsl(log_uniform(rng, 1.0, 64.0)),
        Preset::CosFace => MarginLoss::cosface(rng.random_range(0.0..=2.0)),
        Preset::ArcFace => MarginLoss::arcface(rng.random_range(0.0..1.5)),
        Preset::SphereFace => MarginLoss::sphereface(rng.random_range(1.0..=8.0)),
        Preset::Combined => MarginLoss::combined(
            if rng.random_bool(0.5) {
                1.0
            } else {
                rng.random_range(1.0..=4.0)
            },
            rng.random_range(0.0..1.0),
            rng.random_range(0.0..=0.5),
        ),
    };
    if rng.random_bool(0.5) {
        spec = spec.policy(match rng.random_range(0..4) {
            0 => OverflowPolicy::Monotonic,
            1 => OverflowPolicy::Fallback,
            2 => OverflowPolicy::Raw,
            _ => OverflowPolicy::Easy,
        });
    }
    if rng.random_bool(0.3) {
        spec = spec.gradient(GradientMode::Detached);
    }
    if rng.random_bool(0.25) {
        spec = spec.normalize_features(!spec.normalize_features);
    }
    if rng.random_bool(0.25) {
        spec = spec.normalize_weights(false);
    }
    // The row scale is s (normalized features) or s*|x_i|: keep either in a trainable range.
    spec = spec.scale(if spec.normalize_features {
        log_uniform(rng, 1.0, 64.0)
    } else {
        log_uniform(rng, 0.1, 4.0)
    });
    if rng.random_bool(0.3) {
        spec = spec.lambda(if rng.random_bool(0.5) {
            log_uniform(rng, 0.01, 10.0)
        } else {
            log_uniform(rng, 10.0, 1000.0)
        });
    }
    spec = spec.reduction(match rng.random_range(0..3) {
        0 => Reduction::Mean,
        1 => Reduction::Sum,
        _ => Reduction::None,
    });
    spec.validate().expect("random_spec drew an invalid spec");
    spec
}

/// The cosines where the target transform is not smooth (MATH.md step 4), without the clamp
/// (handled by `CLAMP_BAND`).
pub fn kinks(spec: &MarginLoss) -> Vec<f64> {
    let mut out = Vec::new();
    let policy = policy_of(spec);
    if policy == OverflowPolicy::Easy {
        out.push(0.0);
    }
    if spec.m1 == 1.0 && spec.m2 == 0.0 {
        return out;
    }
    match policy {
        OverflowPolicy::Fallback if spec.m1 * PI + spec.m2 > PI => {
            out.push(((PI - spec.m2) / spec.m1).cos())
        }
        OverflowPolicy::Monotonic => {
            let mut k = 1.0;
            while k * PI <= spec.m1 * PI + spec.m2 {
                let theta = (k * PI - spec.m2) / spec.m1;
                if (0.0..=PI).contains(&theta) {
                    out.push(theta.cos());
                }
                k += 1.0;
            }
        }
        _ => {}
    }
    out
}

/// One random problem.
pub struct Case {
    pub seed: u64,
    pub spec: MarginLoss,
    pub shape: Shape,
    pub x: Vec<f64>,
    pub w: Vec<f64>,
    pub labels: Vec<i32>,
    pub upstream: Option<Vec<f64>>,
}

impl Case {
    /// Enough to reproduce and read a failure.
    pub fn describe(&self) -> String {
        format!(
            "property case seed {} (rerun: FUSED_MARGIN_PROPERTY_SEED={} cargo test --release \
             --test property): shape {:?}, labels {:?}, spec {:?}",
            self.seed, self.seed, self.shape, self.labels, self.spec
        )
    }
}

/// A random row of length `d`: Gaussian direction, log-uniform norm over four decades, and now and
/// then one coordinate 30x the rest (an outlier that makes the row nearly axis-aligned).
pub fn random_row(rng: &mut StdRng, d: usize, norms: (f64, f64)) -> Vec<f64> {
    let mut r: Vec<f64> = (0..d).map(|_| normal(rng)).collect();
    if d > 1 && rng.random_bool(0.2) {
        let k = rng.random_range(0..d);
        r[k] *= 30.0;
    }
    let n = log_uniform(rng, norms.0, norms.1) / norm(&r).max(1e-300);
    r.iter().map(|v| v * n).collect()
}

pub fn draw(seed: u64, preset: Preset) -> Case {
    let mut rng = rng(seed);
    let spec = random_spec(&mut rng, preset);
    let shape = Shape::new(
        rng.random_range(1..=9),
        rng.random_range(1..=17),
        rng.random_range(1..=33),
    );
    let Shape { b, d, c } = shape;
    // Unnormalized class rows stay below norm 1.5, so target cosines in the allowed band are easy
    // to draw; normalized ones span four decades.
    let w_norms = if spec.normalize_weights {
        (0.01, 100.0)
    } else {
        (0.3, 1.5)
    };
    let mut w = Vec::with_capacity(c * d);
    for _ in 0..c {
        w.extend(random_row(&mut rng, d, w_norms));
    }
    let mut labels = labels(&mut rng, b, c);
    // Label 0 and label C-1 in every case with room for them.
    if b >= 2 {
        labels[0] = 0;
        labels[b - 1] = c as i32 - 1;
    }
    let x_norms = if spec.normalize_features {
        (0.01, 100.0)
    } else {
        (0.1, 10.0)
    };
    let kinks = kinks(&spec);
    let angular = spec.has_angular_margin();
    let mut x = vec![0.0; b * d];
    for i in 0..b {
        let y = labels[i] as usize;
        let mut ok = false;
        for _ in 0..MAX_TRIES {
            // A third of the rows near -w_y, so target angles near pi (the overflow branches) occur.
            let row = if rng.random_bool(0.33) {
                let wy = unit(&w[y * d..(y + 1) * d]);
                let noise = rng.random_range(0.02..0.5);
                let r: Vec<f64> = wy.iter().map(|v| -v + noise * normal(&mut rng)).collect();
                let n = log_uniform(&mut rng, x_norms.0, x_norms.1);
                unit(&r).iter().map(|v| v * n).collect()
            } else {
                random_row(&mut rng, d, x_norms)
            };
            x[i * d..(i + 1) * d].copy_from_slice(&row);
            let cy = target_cosine(&spec, &x, &w, d, i, y);
            let clear_of_clamp = !angular || cy.abs() <= 1.0 - CLAMP_BAND;
            if clear_of_clamp && kinks.iter().all(|k| (cy - k).abs() > KINK_GAP) {
                ok = true;
                break;
            }
        }
        if !ok {
            labels[i] = -1;
        }
    }
    // About one row in six ignored (both conventions).
    for l in labels.iter_mut() {
        if rng.random_bool(1.0 / 6.0) {
            *l = if rng.random_bool(0.5) { -1 } else { -100 };
        }
    }
    let upstream = (spec.reduction == Reduction::None)
        .then(|| (0..b).map(|_| rng.random_range(-1.0..2.0)).collect());
    Case {
        seed,
        spec,
        shape,
        x,
        w,
        labels,
        upstream,
    }
}

/// Case seeds of one test: `FUSED_MARGIN_PROPERTY_SEED` alone when set, else `base..base+n`.
pub fn seeds(base: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("FUSED_MARGIN_PROPERTY_SEED") {
        return vec![s
            .parse()
            .expect("FUSED_MARGIN_PROPERTY_SEED must be an integer")];
    }
    let n = std::env::var("FUSED_MARGIN_PROPERTY_CASES")
        .ok()
        .map(|v| {
            v.parse()
                .expect("FUSED_MARGIN_PROPERTY_CASES must be an integer")
        })
        .unwrap_or(DEFAULT_CASES);
    (base..base + n).collect()
}
