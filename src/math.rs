//! The margin maths in f64: the target transform `t(c)` and its derivative `dt/dc`
//! (MATH.md, forward step 4 and "Backward"), and the per-row slot [`RowMargin`]: the margins and
//! scale of one row. The GPU twin of this file is `kernels/common.cuh` (`fm_row_margin`,
//! `fm_target`); keep the two in step.

use crate::spec::{GradientMode, MarginLoss, OverflowPolicy, THETA_CLAMP};
use std::f64::consts::PI;

/// The target logit's transform at one cosine: `value = target(c)` and `deriv = dtarget/dc`
/// as used by the backward (1 in `Detached` mode before the lambda blend).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    /// `target(c) = (lambda*c + psi(c)) / (1 + lambda)`.
    pub value: f64,
    /// `dtarget/dc = (lambda + dpsi/dc) / (1 + lambda)`, with `dpsi/dc = 1` when detached.
    pub deriv: f64,
}

/// The margins and scale of one row: what `target` and the row scale `r_i` read.
///
/// For every loss so far they are the spec's, the same for every row ([`RowMargin::of`] ignores
/// the row). A loss whose margin or scale varies per row (MagFace's `m(|x_i|)`, AdaFace's
/// norm-adaptive margin, ElasticFace's sampled one) computes them in [`RowMargin::of`] from the
/// row's context, and the CPU reference and the kernels (`fm_row_margin`) pick them up with no
/// other change: every caller of the margin maths passes its row's `RowMargin`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowMargin {
    /// Multiplicative angular margin.
    pub m1: f64,
    /// Additive angular margin.
    pub m2: f64,
    /// Additive cosine margin.
    pub m3: f64,
    /// Scale.
    pub s: f64,
}

impl RowMargin {
    /// The margins of row `row`, whose raw feature norm is `x_norm`.
    pub fn of(spec: &MarginLoss, row: usize, x_norm: f64) -> Self {
        let _ = (row, x_norm); // the per-row context: unused by the fixed-margin losses
        Self::uniform(spec)
    }

    /// The spec's margins (every row's, for the fixed-margin losses).
    pub fn uniform(spec: &MarginLoss) -> Self {
        Self {
            m1: spec.m1,
            m2: spec.m2,
            m3: spec.m3,
            s: spec.s,
        }
    }

    /// The row scale `r_i` (MATH.md step 3): `s`, times `|x_i|` without feature normalization.
    pub fn row_scale(&self, spec: &MarginLoss, x_norm: f64) -> f64 {
        if spec.normalize_features {
            self.s
        } else {
            self.s * x_norm
        }
    }
}

/// `psi(c)` and `dpsi/dc` (MATH.md step 4) with the row's margins `m`, before the lambda blend
/// and the gradient mode.
///
/// - Easy policy with `c <= 0`: `psi = c`, derivative 1.
/// - No angular margin (`m1 = 1`, `m2 = 0`): `psi = c - m3`, derivative 1, no clamp.
/// - Otherwise `theta = acos(clamp(c, -1 + d, 1 - d))`, `a = m1*theta + m2` and
///   - Raw / Easy: `psi = cos(a) - m3`, `dpsi/dc = m1 sin(a) / sin(theta)`;
///   - Fallback: the same while `a <= pi`, else `psi = c - m2 sin(m2) - m3`, derivative 1;
///   - Monotonic: `k = floor(a/pi)`, `psi = (-1)^k cos(a) - 2k - m3`,
///     `dpsi/dc = (-1)^k m1 sin(a) / sin(theta)`.
pub fn psi(spec: &MarginLoss, m: &RowMargin, c: f64) -> (f64, f64) {
    let policy = spec.effective_policy();
    if policy == OverflowPolicy::Easy && c <= 0.0 {
        return (c, 1.0);
    }
    if !spec.has_angular_margin() {
        return (c - m.m3, 1.0);
    }
    let cc = c.clamp(-1.0 + THETA_CLAMP, 1.0 - THETA_CLAMP);
    let theta = cc.acos();
    let a = m.m1 * theta + m.m2;
    // sin(theta) >= sin(acos(1 - 1e-7)) ~ 4.5e-4 thanks to the clamp: no division by zero.
    let slope = m.m1 * a.sin() / theta.sin();
    match policy {
        OverflowPolicy::Raw | OverflowPolicy::Easy => (a.cos() - m.m3, slope),
        OverflowPolicy::Fallback => {
            if a > PI {
                (c - m.m2 * m.m2.sin() - m.m3, 1.0)
            } else {
                (a.cos() - m.m3, slope)
            }
        }
        OverflowPolicy::Monotonic => {
            let k = (a / PI).floor();
            let sign = if (k as i64) % 2 == 0 { 1.0 } else { -1.0 };
            (sign * a.cos() - 2.0 * k - m.m3, sign * slope)
        }
    }
}

/// The target transform with the row's margins `m`, the lambda blend and the gradient mode
/// applied (MATH.md step 4 and "Backward").
pub fn target(spec: &MarginLoss, m: &RowMargin, c: f64) -> Target {
    let (p, dp) = psi(spec, m, c);
    let dp = match spec.gradient {
        GradientMode::Full => dp,
        GradientMode::Detached => 1.0,
    };
    if spec.lambda > 0.0 {
        let l = spec.lambda;
        Target {
            value: (l * c + p) / (1.0 + l),
            deriv: (l + dp) / (1.0 + l),
        }
    } else {
        Target {
            value: p,
            deriv: dp,
        }
    }
}
