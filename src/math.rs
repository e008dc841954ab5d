//! The margin maths in f64: the target transform `t(c)` and its derivative `dt/dc`
//! (MATH.md, forward step 4 and "Backward"). The GPU twin of this file is `kernels/common.cuh`
//! (`fm_target`); keep the two in step.

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

/// `psi(c)` and `dpsi/dc` (MATH.md step 4), before the lambda blend and the gradient mode.
///
/// - Easy policy with `c <= 0`: `psi = c`, derivative 1.
/// - No angular margin (`m1 = 1`, `m2 = 0`): `psi = c - m3`, derivative 1, no clamp.
/// - Otherwise `theta = acos(clamp(c, -1 + d, 1 - d))`, `a = m1*theta + m2` and
///   - Raw / Easy: `psi = cos(a) - m3`, `dpsi/dc = m1 sin(a) / sin(theta)`;
///   - Fallback: the same while `a <= pi`, else `psi = c - m2 sin(m2) - m3`, derivative 1;
///   - Monotonic: `k = floor(a/pi)`, `psi = (-1)^k cos(a) - 2k - m3`,
///     `dpsi/dc = (-1)^k m1 sin(a) / sin(theta)`.
pub fn psi(spec: &MarginLoss, c: f64) -> (f64, f64) {
    let policy = spec.effective_policy();
    if policy == OverflowPolicy::Easy && c <= 0.0 {
        return (c, 1.0);
    }
    if !spec.has_angular_margin() {
        return (c - spec.m3, 1.0);
    }
    let cc = c.clamp(-1.0 + THETA_CLAMP, 1.0 - THETA_CLAMP);
    let theta = cc.acos();
    let a = spec.m1 * theta + spec.m2;
    // sin(theta) >= sin(acos(1 - 1e-7)) ~ 4.5e-4 thanks to the clamp: no division by zero.
    let slope = spec.m1 * a.sin() / theta.sin();
    match policy {
        OverflowPolicy::Raw | OverflowPolicy::Easy => (a.cos() - spec.m3, slope),
        OverflowPolicy::Fallback => {
            if a > PI {
                (c - spec.m2 * spec.m2.sin() - spec.m3, 1.0)
            } else {
                (a.cos() - spec.m3, slope)
            }
        }
        OverflowPolicy::Monotonic => {
            let k = (a / PI).floor();
            let sign = if (k as i64) % 2 == 0 { 1.0 } else { -1.0 };
            (sign * a.cos() - 2.0 * k - spec.m3, sign * slope)
        }
    }
}

/// The target transform with the lambda blend and the gradient mode applied
/// (MATH.md step 4 and "Backward").
pub fn target(spec: &MarginLoss, c: f64) -> Target {
    let (p, dp) = psi(spec, c);
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
