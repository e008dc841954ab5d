//! The margin maths in f64: the target transform `t(c)` and its derivative `dt/dc`
//! (MATH.md, forward step 4 and "Backward"), and the per-row slot [`RowMargin`]: the margins and
//! scale of one row. The GPU twin of this file is `kernels/common.cuh` (`fm_row_margin`,
//! `fm_target`); keep the two in step.

use crate::spec::{GradientMode, MarginLoss, OverflowPolicy, THETA_CLAMP};
use crate::variant::{
    AdaFace, ElasticFace, ElasticKind, ElasticMargins, ElasticPlus, LossState, MagFace, Variant,
    ADAFACE_EPS, ADAFACE_NORM_MAX,
};
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
/// For the fixed-margin family they are the spec's, the same for every row ([`RowMargin::uniform`]).
/// The losses whose margins vary per row (MagFace's `m(|x_i|)`, AdaFace's norm-adaptive margin,
/// ElasticFace's drawn one) compute them once per call from the row's context and the state
/// (`adaface_row`, `magface_row`, `elastic_row` below; the CPU reference keeps one `RowMargin`
/// per row, the kernels read the given margins in `fm_row_margin_given`): every caller of the
/// margin maths passes its row's `RowMargin`.
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
///     `dpsi/dc = (-1)^k m1 sin(a) / sin(theta)`;
///   - Clip (AdaFace): `psi = cos(clip(a, e, pi - e)) - m3`, `dpsi/dc = sin(a) / sin(theta)`
///     inside the clip, 0 outside.
///
/// `d` is `1e-7`; for AdaFace it is its `e = 1e-3` and the cosine clamp is a true clamp (no
/// gradient outside it), under every policy.
pub fn psi(spec: &MarginLoss, m: &RowMargin, c: f64) -> (f64, f64) {
    let (v, dc, _) = psi_parts(spec, m, c);
    (v, dc)
}

/// [`psi`] with its derivative in the row's `m2` too: `(psi, dpsi/dc, dpsi/dm2)`, each branch
/// written once (MagFace's margin depends on the feature norm, so its gradient reaches `x`
/// through `m2_i`). `dpsi/dm2` is 0 wherever `psi` does not depend on `m2`.
pub fn psi_parts(spec: &MarginLoss, m: &RowMargin, c: f64) -> (f64, f64, f64) {
    let policy = spec.effective_policy();
    if policy == OverflowPolicy::Easy && c <= 0.0 {
        return (c, 1.0, 0.0);
    }
    if !spec.has_angular_margin() {
        return (c - m.m3, 1.0, 0.0);
    }
    let ada = matches!(spec.variant, Variant::AdaFace(_));
    let d = if ada { ADAFACE_EPS } else { THETA_CLAMP };
    let cc = c.clamp(-1.0 + d, 1.0 - d);
    // AdaFace's clamp is a true one: outside it psi is constant in c.
    let live = !ada || (c > -1.0 + d && c < 1.0 - d);
    let theta = cc.acos();
    let a = m.m1 * theta + m.m2;
    // sin(theta) >= sin(acos(1 - 1e-7)) ~ 4.5e-4 thanks to the clamp: no division by zero.
    let slope = if live {
        m.m1 * a.sin() / theta.sin()
    } else {
        0.0
    };
    match policy {
        OverflowPolicy::Raw | OverflowPolicy::Easy => (a.cos() - m.m3, slope, -a.sin()),
        OverflowPolicy::Fallback => {
            if a > PI {
                // AdaFace's clamp holds here too: the clamped cosine, no slope outside.
                let (cf, sf) = if ada {
                    (cc, if live { 1.0 } else { 0.0 })
                } else {
                    (c, 1.0)
                };
                let dm2 = -(m.m2.sin() + m.m2 * m.m2.cos());
                (cf - m.m2 * m.m2.sin() - m.m3, sf, dm2)
            } else {
                (a.cos() - m.m3, slope, -a.sin())
            }
        }
        OverflowPolicy::Monotonic => {
            let k = (a / PI).floor();
            let sign = if (k as i64) % 2 == 0 { 1.0 } else { -1.0 };
            (
                sign * a.cos() - 2.0 * k - m.m3,
                sign * slope,
                -sign * a.sin(),
            )
        }
        OverflowPolicy::Clip => {
            let e = ADAFACE_EPS;
            let inside = a > e && a < PI - e;
            let tp = a.clamp(e, PI - e);
            let (dc, dm2) = if inside {
                (slope, -a.sin())
            } else {
                (0.0, 0.0)
            };
            (tp.cos() - m.m3, dc, dm2)
        }
    }
}

/// `dtarget/dm2` at `c` with the row's margins ([`psi_parts`]), after the lambda blend and the
/// gradient mode (0 when detached).
pub fn target_dm2(spec: &MarginLoss, m: &RowMargin, c: f64) -> f64 {
    if spec.gradient == GradientMode::Detached {
        return 0.0;
    }
    psi_parts(spec, m, c).2 / (1.0 + spec.lambda)
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

// ---- The losses with per-row or batch state (MATH.md, "Losses with per-row or batch state").
// Each computes its rows' margins (or CurricularFace's threshold) from the call's counted rows;
// state is updated first and the rows read the updated value.

/// AdaFace's state after a call whose counted rows have raw feature norms `norms`:
/// `n = clip(|x|, e, 100)`, `mu <- alpha mean(n) + (1 - alpha) mu`, and with two rows or more
/// `sigma <- alpha sd(n) + (1 - alpha) sigma` (`sd` with divisor `N - 1`, as `torch.std`).
/// No counted row keeps the state.
pub fn adaface_update(a: &AdaFace, mean: f64, std: f64, norms: &[f64]) -> (f64, f64) {
    let n = norms.len();
    if n == 0 {
        return (mean, std);
    }
    let clip = |v: f64| v.clamp(ADAFACE_EPS, ADAFACE_NORM_MAX);
    let mu_b = norms.iter().map(|&v| clip(v)).sum::<f64>() / n as f64;
    let mean_out = a.alpha * mu_b + (1.0 - a.alpha) * mean;
    let std_out = if n >= 2 {
        let var = norms.iter().map(|&v| (clip(v) - mu_b).powi(2)).sum::<f64>() / (n - 1) as f64;
        a.alpha * var.sqrt() + (1.0 - a.alpha) * std
    } else {
        std
    };
    (mean_out, std_out)
}

/// AdaFace's row: `z = clip(h (n - mu) / (sigma + e), -1, 1)` from the row's raw norm and the
/// updated state; returns `(z, m2 = -m z, m3 = m (1 + z))`.
pub fn adaface_row(a: &AdaFace, mean: f64, std: f64, x_norm: f64) -> (f64, f64, f64) {
    let n = x_norm.clamp(ADAFACE_EPS, ADAFACE_NORM_MAX);
    let z = (a.h * (n - mean) / (std + ADAFACE_EPS)).clamp(-1.0, 1.0);
    (z, -a.m * z, a.m * (1.0 + z))
}

/// MagFace's row: `a = clip(|x|, l_a, u_a)` and `m2 = l_m + q (a - l_a)`,
/// `q = (u_m - l_m) / (u_a - l_a)`; returns `(a, m2, live)` where `live` is `l_a < |x| < u_a`
/// (the clamp passes the norm's gradient only inside).
pub fn magface_row(g: &MagFace, x_norm: f64) -> (f64, f64, bool) {
    // max then min, not clamp: no panic for parameters validate() would refuse.
    let a = x_norm.max(g.l_a).min(g.u_a);
    let m2 = g.l_m + magface_slope(g) * (a - g.l_a);
    (a, m2, x_norm > g.l_a && x_norm < g.u_a)
}

/// MagFace's `q = dm2/da`.
pub fn magface_slope(g: &MagFace) -> f64 {
    (g.u_m - g.l_m) / (g.u_a - g.l_a)
}

/// MagFace's regularizer `g(a) = a / u_a^2 + 1/a` and its derivative `1/u_a^2 - 1/a^2`.
pub fn magface_reg(g: &MagFace, a: f64) -> (f64, f64) {
    let u2 = g.u_a * g.u_a;
    (a / u2 + 1.0 / a, 1.0 / u2 - 1.0 / (a * a))
}

/// CurricularFace's `t` after a call whose counted rows have target cosines `cos_y` (before the
/// margin): `t <- alpha mean(c_iy) + (1 - alpha) t`; no counted row keeps it.
pub fn curricular_update(alpha: f64, t: f64, cos_y: &[f64]) -> f64 {
    if cos_y.is_empty() {
        return t;
    }
    let mean = cos_y.iter().sum::<f64>() / cos_y.len() as f64;
    alpha * mean + (1.0 - alpha) * t
}

/// CurricularFace's hardness threshold of a row, `tau = cos(m1 theta + m2) - m3` with the
/// spec's margins and no overflow policy (`c - m3` without an angular margin); no gradient.
pub fn curricular_tau(spec: &MarginLoss, c_y: f64) -> f64 {
    if spec.m1 == 1.0 && spec.m2 == 0.0 {
        return c_y - spec.m3;
    }
    let theta = c_y.clamp(-1.0 + THETA_CLAMP, 1.0 - THETA_CLAMP).acos();
    (spec.m1 * theta + spec.m2).cos() - spec.m3
}

/// A CurricularFace negative: `c` itself unless harder than the row's threshold (`c > tau`),
/// then `c (t + c)` with derivative `t + 2c`. Returns `(value, dvalue/dc)`.
pub fn curricular_negative(t: f64, tau: f64, c: f64) -> (f64, f64) {
    if c > tau {
        (c * (t + c), t + 2.0 * c)
    } else {
        (c, 1.0)
    }
}

/// ElasticFace's margins of a call of `b` rows, before the Plus reordering: the given ones, or
/// `m + sigma * N(0, 1)` from the generator for every row.
pub fn elastic_draw(e: &ElasticFace, margins: &ElasticMargins<'_>, b: usize) -> Vec<f64> {
    match margins {
        ElasticMargins::Given(m) => m.to_vec(),
        ElasticMargins::Seeded(rng) => (0..b).map(|i| e.m + e.sigma * rng.normal(i)).collect(),
    }
}

/// ElasticFace+'s reordering of `margins` in place (MATH.md): the counted rows (`labels >= 0`,
/// numbered `p` in order) sorted by their target cosine `cos_y`, largest first (ties: the lower
/// row first) give `pi`; their margins sorted ascending give `sorted`. Rank: row `pi(k)` takes
/// `sorted[k]`; Published: row `p` takes `sorted[pi(p)]`. Ignored rows keep theirs.
/// Slices of other lengths than `labels` leave `margins` as they are.
pub fn elastic_plus(plus: ElasticPlus, labels: &[i32], cos_y: &[f64], margins: &mut [f64]) {
    if plus == ElasticPlus::None || cos_y.len() != labels.len() || margins.len() != labels.len() {
        return;
    }
    let rows: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] >= 0).collect();
    // pi as positions among the counted rows.
    let mut pi: Vec<usize> = (0..rows.len()).collect();
    pi.sort_by(|&a, &b| cos_y[rows[b]].total_cmp(&cos_y[rows[a]]).then(a.cmp(&b)));
    let mut sorted: Vec<f64> = rows.iter().map(|&i| margins[i]).collect();
    sorted.sort_by(f64::total_cmp);
    for k in 0..rows.len() {
        match plus {
            ElasticPlus::Rank => margins[rows[pi[k]]] = sorted[k],
            ElasticPlus::Published => margins[rows[k]] = sorted[pi[k]],
            ElasticPlus::None => {}
        }
    }
}

/// The margins of row `i` for an ElasticFace margin `m_i`: Arc sets `m2`, Cos sets `m3`.
pub fn elastic_row(e: &ElasticFace, s: f64, m_i: f64) -> RowMargin {
    let (m2, m3) = match e.kind {
        ElasticKind::Arc => (m_i, 0.0),
        ElasticKind::Cos => (0.0, m_i),
    };
    RowMargin { m1: 1.0, m2, m3, s }
}

/// The state out of a call, from the state in and the call's counted rows' raw norms and
/// target cosines (`None` for the losses without state).
pub fn state_out(
    spec: &MarginLoss,
    state_in: Option<LossState>,
    norms: &[f64],
    cos_y: &[f64],
) -> Option<LossState> {
    match (spec.variant, state_in) {
        (Variant::AdaFace(a), Some(LossState::AdaFace { mean, std })) => {
            let (mean, std) = adaface_update(&a, mean, std, norms);
            Some(LossState::AdaFace { mean, std })
        }
        (Variant::CurricularFace(c), Some(LossState::CurricularFace { t })) => {
            Some(LossState::CurricularFace {
                t: curricular_update(c.alpha, t, cos_y),
            })
        }
        _ => None,
    }
}
