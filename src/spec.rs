//! The loss specification: one plain value that drives every backend (CPU reference, fused GPU
//! plan, naive GPU plan), so one spec can be run through all of them and compared.
//!
//! Every field follows `docs/MATH.md` ("Forward", step 4, and "Backward").

use crate::error::{Error, Result};
use crate::variant::{
    AdaFace, CurricularFace, ElasticFace, ElasticKind, ElasticPlus, MagFace, Variant,
};

/// What happens where `m1*theta + m2 > pi`, i.e. where `cos(m1*theta + m2)` stops decreasing in
/// `theta` (MATH.md, forward step 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OverflowPolicy {
    /// SphereFace's monotonic extension:
    /// `psi = (-1)^k cos(m1*theta + m2) - 2k - m3`, `k = floor((m1*theta + m2)/pi)`.
    /// The default when `m1 != 1`.
    Monotonic,
    /// Past the threshold (`m1*theta + m2 > pi`), `psi = c - m2*sin(m2) - m3`
    /// (pytorch-metric-learning, insightface before 2022). The default when `m1 == 1`.
    Fallback,
    /// Plain `cos(m1*theta + m2) - m3` everywhere (insightface arcface_torch today).
    Raw,
    /// Margin only where `c > 0` (plain `cos(m1*theta + m2) - m3` there); `psi = c` where `c <= 0`.
    Easy,
    /// AdaFace's angle clip, only with [`Variant::AdaFace`]: `psi = cos(theta') - m3_i` with
    /// `theta' = clip(theta + m2_i, e, pi - e)`, `e = 1e-3`, a true clamp (no gradient outside).
    Clip,
}

/// How the target transform enters the backward (MATH.md, "Backward").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum GradientMode {
    /// The true derivative `dtarget/dc` (pytorch-metric-learning). The default.
    #[default]
    Full,
    /// The margin as a constant shift: `dtarget/dc = 1` (insightface arcface_torch, OpenSphere).
    Detached,
}

/// How per-row losses `l_i` become the returned loss (MATH.md, forward step 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Reduction {
    /// Mean over the rows whose label is not negative; 0 (and zero gradients) when every row is
    /// ignored, where PyTorch gives NaN. The default.
    #[default]
    Mean,
    /// Sum over all rows (ignored rows add 0).
    Sum,
    /// One loss per row (ignored rows give 0); backward takes one upstream value per row.
    None,
}

/// The margin-softmax loss family `z_iy = r_i * target(c_iy)`, `l_i = logsumexp_j z_ij - z_iy`
/// with `psi(c) = cos(m1*theta + m2) - m3` (MATH.md).
///
/// Build it from a preset and adjust with the chained setters; `validate()` (called by every
/// backend) names any field out of range.
///
/// | preset | m1 | m2 | m3 | s | anchor |
/// |---|---|---|---|---|---|
/// | [`nsl`](Self::nsl) | 1 | 0 | 0 | given (NormFace uses ~16-32) | NormFace / normalized softmax |
/// | [`cosface`](Self::cosface) | 1 | 0 | m (0.35 paper, 0.4 insightface) | 64 | CosFace / LMCL |
/// | [`arcface`](Self::arcface) | 1 | m (0.5) | 0 | 64 | ArcFace |
/// | [`sphereface`](Self::sphereface) | m (4) | 0 | 0 | 1, with feature norm | SphereFace / A-Softmax |
/// | [`combined`](Self::combined) | m1 | m2 | m3 ((1, 0.3, 0.2) insightface) | 64 | insightface "combined" |
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MarginLoss {
    /// Multiplicative angular margin (SphereFace). `>= 1`; 1 means none.
    pub m1: f64,
    /// Additive angular margin in radians (ArcFace). `0 <= m2 < pi`.
    pub m2: f64,
    /// Additive cosine margin (CosFace). `0 <= m3 <= 2`.
    pub m3: f64,
    /// Scale `s`: `r_i = s` with normalized features, `r_i = s*|x_i|` without. Finite, `> 0`.
    pub s: f64,
    /// L2-normalize the features `x_i` (default true). When false the row scale becomes
    /// `s*|x_i|` (the original SphereFace); the cosine still uses the unit feature direction.
    pub normalize_features: bool,
    /// L2-normalize the class weights `w_j` (default true). When false `c_ij = xh_i . w_j` is no
    /// cosine; the angle clamp still bounds `theta`.
    pub normalize_weights: bool,
    /// The `m1*theta + m2 > pi` policy; `None` picks the default: Monotonic when `m1 != 1`,
    /// Fallback when `m1 == 1` (see [`MarginLoss::effective_policy`]).
    pub policy: Option<OverflowPolicy>,
    /// Full or detached margin gradient.
    pub gradient: GradientMode,
    /// SphereFace annealing `lambda >= 0`: target `= (lambda*c + psi)/(1 + lambda)`; 0 means none.
    /// See [`SphereFaceSchedule`] for the original schedule.
    pub lambda: f64,
    /// How per-row losses are reduced.
    pub reduction: Reduction,
    /// The loss with per-row or batch state this spec is, if any ([`Variant::Plain`] for the
    /// fixed-margin family). See [`crate::variant`].
    pub variant: Variant,
}

/// The angle clamp `d` of MATH.md: `theta = acos(clamp(c, -1 + d, 1 - d))`.
pub const THETA_CLAMP: f64 = 1e-7;
/// The normalization floor `eps` of MATH.md: `x / max(|x|, eps)` (as `F.normalize`).
pub const NORM_EPS: f64 = 1e-12;

/// Upper bound accepted for `m1` (SphereFace uses 1.35..4; larger values only make the loss
/// numerically meaningless).
pub const M1_MAX: f64 = 16.0;
/// Upper bound accepted for `m3` (a cosine shift beyond 2 exceeds the cosine's whole range).
pub const M3_MAX: f64 = 2.0;
/// Upper bound accepted for the scale `s`. Published values are 1 to 64 (NormFace 16-32, SphereFace
/// 1 with the feature norm, CosFace/ArcFace 64); the bound keeps the kernels' f32 logits, whose
/// magnitude is at most `36 s` with both normalizations on (docs/MATH.md, "Range"), far from
/// overflow, where `s = 1e300` or `f64::MAX` gave infinite or NaN losses.
pub const S_MAX: f64 = 1e6;
/// Upper bound accepted for the magnitude of an upstream gradient (scalar or per row). Loss
/// scaling for f16 training uses factors of 2^16 to 2^24; 1e12 leaves room for those and keeps
/// `s * g` products (the scale of every `dc`) inside f32 and f64.
pub const UPSTREAM_MAX: f64 = 1e12;

impl Default for MarginLoss {
    /// ArcFace with m = 0.5, s = 64 (the most common configuration).
    fn default() -> Self {
        Self::arcface(0.5)
    }
}

impl MarginLoss {
    const BASE: MarginLoss = MarginLoss {
        m1: 1.0,
        m2: 0.0,
        m3: 0.0,
        s: 64.0,
        normalize_features: true,
        normalize_weights: true,
        policy: None,
        gradient: GradientMode::Full,
        lambda: 0.0,
        reduction: Reduction::Mean,
        variant: Variant::Plain,
    };

    /// Normalized softmax (NormFace): no margin, `z_ij = s * cos(theta_ij)`.
    pub fn nsl(s: f64) -> Self {
        Self { s, ..Self::BASE }
    }

    /// CosFace / LMCL: `psi = cos(theta) - m`, s = 64. The paper uses m = 0.35, insightface 0.4.
    pub fn cosface(m: f64) -> Self {
        Self {
            m3: m,
            ..Self::BASE
        }
    }

    /// ArcFace: `psi = cos(theta + m)`, s = 64, m = 0.5 in the paper; overflow policy Fallback
    /// (`psi = c - m*sin(m)` past `theta > pi - m`) unless set otherwise.
    pub fn arcface(m: f64) -> Self {
        Self {
            m2: m,
            ..Self::BASE
        }
    }

    /// SphereFace / A-Softmax as in the paper: `psi = (-1)^k cos(m*theta) - 2k`, m = 4, features
    /// not normalized (`r_i = |x_i|`, s = 1), weights normalized, Monotonic policy. Add annealing
    /// with [`lambda`](Self::lambda) (see [`SphereFaceSchedule`]).
    pub fn sphereface(m: f64) -> Self {
        Self {
            m1: m,
            s: 1.0,
            normalize_features: false,
            ..Self::BASE
        }
    }

    /// insightface's combined margin `psi = cos(m1*theta + m2) - m3` (its configs use (1, 0.3, 0.2)), s = 64.
    pub fn combined(m1: f64, m2: f64, m3: f64) -> Self {
        Self {
            m1,
            m2,
            m3,
            ..Self::BASE
        }
    }

    /// Sub-center ArcFace with `k` sub-centers per class (3 in the paper): ArcFace's `m2 = 0.5`,
    /// `s = 64`, Fallback policy (as pytorch-metric-learning; insightface's is
    /// [`Raw`](OverflowPolicy::Raw)); any margins via [`margins`](Self::margins). `w` has
    /// `C*k` rows. insightface gives a tie's gradient to every tied sub-center, this crate to the
    /// lowest one (ties have measure zero with real data).
    pub fn subcenter(k: usize) -> Self {
        Self {
            m2: 0.5,
            variant: Variant::SubCenter { k },
            ..Self::BASE
        }
    }

    /// AdaFace with the published defaults ([`AdaFace::default`]: `m = 0.4, h = 0.333,
    /// alpha = 0.01`), `s = 64` and its angle clip ([`OverflowPolicy::Clip`]). Needs its state
    /// ([`LossState::ADAFACE_INIT`](crate::variant::LossState::ADAFACE_INIT) at the start).
    /// Unlike the reference head.py, negatives are not clamped to `1 - 1e-3` (they differ only
    /// where a cosine exceeds it); CVLface's Partial FC variant is
    /// `.gradient(Detached).policy(Raw)`.
    pub fn adaface() -> Self {
        Self {
            policy: Some(OverflowPolicy::Clip),
            variant: Variant::AdaFace(AdaFace::default()),
            ..Self::BASE
        }
    }

    /// CurricularFace with ArcFace's target (`m2 = 0.5`, Fallback), `s = 64` and
    /// `alpha = 0.01` (TFace uses 0.1). Needs its state
    /// ([`LossState::CURRICULAR_INIT`](crate::variant::LossState::CURRICULAR_INIT) at the start).
    pub fn curricularface() -> Self {
        Self {
            m2: 0.5,
            variant: Variant::CurricularFace(CurricularFace::default()),
            ..Self::BASE
        }
    }

    /// MagFace with the published defaults ([`MagFace::default`]), `s = 64` and MagLinear's
    /// `easy_margin` ([`OverflowPolicy::Easy`]; its `False` is [`Fallback`](OverflowPolicy::Fallback)).
    /// The row loss includes the regularizer `lambda_g g(a_i)`.
    pub fn magface() -> Self {
        Self {
            policy: Some(OverflowPolicy::Easy),
            variant: Variant::MagFace(MagFace::default()),
            ..Self::BASE
        }
    }

    /// ElasticFace-Arc (`m = 0.5, sigma = 0.05`, Raw policy as published) or ElasticFace-Cos
    /// (`m = 0.35, sigma = 0.05`), `s = 64`; ElasticFace+ with `plus` (use `sigma = 0.0175` Arc,
    /// `0.02` Cos for it, through [`variant`](Self::variant)). Needs margins per call
    /// ([`ElasticMargins`](crate::variant::ElasticMargins)).
    pub fn elasticface(kind: ElasticKind, plus: ElasticPlus) -> Self {
        let (m, sigma, policy) = match kind {
            ElasticKind::Arc => (0.5, 0.05, Some(OverflowPolicy::Raw)),
            ElasticKind::Cos => (0.35, 0.05, None),
        };
        Self {
            policy,
            variant: Variant::ElasticFace(ElasticFace {
                kind,
                m,
                sigma,
                plus,
            }),
            ..Self::BASE
        }
    }

    /// Sets the loss variant (with its parameters).
    pub fn variant(mut self, variant: Variant) -> Self {
        self.variant = variant;
        self
    }

    /// Sets the scale `s`.
    pub fn scale(mut self, s: f64) -> Self {
        self.s = s;
        self
    }

    /// Sets all three margins `(m1, m2, m3)` of `cos(m1*theta + m2) - m3`.
    pub fn margins(mut self, m1: f64, m2: f64, m3: f64) -> Self {
        self.m1 = m1;
        self.m2 = m2;
        self.m3 = m3;
        self
    }

    /// Switches feature normalization (false: row scale `s*|x_i|`).
    pub fn normalize_features(mut self, on: bool) -> Self {
        self.normalize_features = on;
        self
    }

    /// Switches class-weight normalization.
    pub fn normalize_weights(mut self, on: bool) -> Self {
        self.normalize_weights = on;
        self
    }

    /// Sets the overflow policy explicitly (instead of the `m1`-dependent default).
    pub fn policy(mut self, policy: OverflowPolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Sets the gradient mode.
    pub fn gradient(mut self, mode: GradientMode) -> Self {
        self.gradient = mode;
        self
    }

    /// Sets the SphereFace annealing `lambda` (0 = none).
    pub fn lambda(mut self, lambda: f64) -> Self {
        self.lambda = lambda;
        self
    }

    /// Sets the reduction.
    pub fn reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// The policy in force: the explicit one, else Monotonic when `m1 != 1` and Fallback when
    /// `m1 == 1` (MATH.md).
    pub fn effective_policy(&self) -> OverflowPolicy {
        self.policy.unwrap_or(if self.m1 != 1.0 {
            OverflowPolicy::Monotonic
        } else {
            OverflowPolicy::Fallback
        })
    }

    /// True when the target transform involves the angle (`m1 != 1` or `m2 != 0`). Without it
    /// `psi = c - m3` directly, with no acos/cos round trip and no clamp (MATH.md).
    ///
    /// AdaFace, MagFace and ElasticFace-Arc always go through the angle (their `m2_i` is per row);
    /// ElasticFace-Cos never does.
    pub fn has_angular_margin(&self) -> bool {
        match self.variant {
            Variant::AdaFace(_) | Variant::MagFace(_) => true,
            Variant::ElasticFace(e) => e.kind == ElasticKind::Arc,
            _ => self.m1 != 1.0 || self.m2 != 0.0,
        }
    }

    /// Checks every field against its documented range and names the first bad one:
    /// `s` finite in `(0, 1e6]` ([`S_MAX`]); `m1` finite in `[1, 16]`; `m2` finite in `[0, pi)`; `m3` finite in
    /// `[0, 2]`; `lambda` finite and `>= 0`.
    pub fn validate(&self) -> Result<()> {
        fn check(field: &'static str, value: f64, ok: bool, rule: &'static str) -> Result<()> {
            if ok {
                Ok(())
            } else {
                Err(Error::InvalidSpec { field, value, rule })
            }
        }
        let s = self.s;
        check(
            "s",
            s,
            s.is_finite() && s > 0.0 && s <= S_MAX,
            "must be finite, > 0 and <= 1e6",
        )?;
        let m1 = self.m1;
        check(
            "m1",
            m1,
            m1.is_finite() && (1.0..=M1_MAX).contains(&m1),
            "must be finite and in [1, 16]",
        )?;
        let m2 = self.m2;
        check(
            "m2",
            m2,
            m2.is_finite() && (0.0..std::f64::consts::PI).contains(&m2),
            "must be finite and in [0, pi)",
        )?;
        let m3 = self.m3;
        check(
            "m3",
            m3,
            m3.is_finite() && (0.0..=M3_MAX).contains(&m3),
            "must be finite and in [0, 2]",
        )?;
        let l = self.lambda;
        check(
            "lambda",
            l,
            l.is_finite() && l >= 0.0,
            "must be finite and >= 0",
        )?;
        self.variant.validate()?;
        if self.variant.has_row_margins() {
            // These losses set m2_i, m3_i per row: a spec margin as well would be ambiguous.
            for (field, v, base) in [("m1", m1, 1.0), ("m2", m2, 0.0), ("m3", m3, 0.0)] {
                if v != base {
                    return Err(Error::InvalidSpec {
                        field,
                        value: v,
                        rule: "must be the neutral value (m1 = 1, m2 = m3 = 0) for AdaFace, \
                               MagFace and ElasticFace, which set their margins per row",
                    });
                }
            }
        }
        if self.policy == Some(OverflowPolicy::Clip) && !matches!(self.variant, Variant::AdaFace(_))
        {
            return Err(Error::InvalidSpec {
                field: "policy",
                value: f64::NAN,
                rule: "Clip (AdaFace's angle clip) is only valid with Variant::AdaFace",
            });
        }
        Ok(())
    }
}

/// SphereFace's annealing schedule `lambda = max(lambda_min, base * (1 + gamma*iter)^-power)`
/// (MATH.md, forward step 4; the original Caffe defaults are `base = 1000`, `gamma = 0.12`,
/// `power = 1`, `lambda_min = 5`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SphereFaceSchedule {
    /// Starting lambda.
    pub base: f64,
    /// Decay rate per iteration.
    pub gamma: f64,
    /// Decay exponent.
    pub power: f64,
    /// Floor.
    pub lambda_min: f64,
}

impl Default for SphereFaceSchedule {
    /// The original SphereFace values: base 1000, gamma 0.12, power 1, lambda_min 5.
    fn default() -> Self {
        Self {
            base: 1000.0,
            gamma: 0.12,
            power: 1.0,
            lambda_min: 5.0,
        }
    }
}

impl SphereFaceSchedule {
    /// Checks every field and names the first bad one: `base` and `lambda_min` finite and `>= 0`,
    /// `gamma` and `power` finite and `>= 0` (a negative rate or exponent would make lambda grow,
    /// and a NaN anywhere would silently give `lambda_min` through `max`).
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("schedule.base", self.base),
            ("schedule.gamma", self.gamma),
            ("schedule.power", self.power),
            ("schedule.lambda_min", self.lambda_min),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(Error::InvalidSpec {
                    field,
                    value,
                    rule: "must be finite and >= 0",
                });
            }
        }
        Ok(())
    }

    /// `lambda` at iteration `iter`: `max(lambda_min, base * (1 + gamma*iter)^-power)`, after
    /// [`validate`](Self::validate).
    pub fn lambda_at(&self, iter: u64) -> Result<f64> {
        self.validate()?;
        let decayed = self.base * (1.0 + self.gamma * iter as f64).powf(-self.power);
        Ok(decayed.max(self.lambda_min))
    }
}

/// The problem size: `B` rows of embeddings, `D` embedding dimensions, `C` classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Batch rows `B`.
    pub b: usize,
    /// Embedding dimension `D`.
    pub d: usize,
    /// Number of classes `C`.
    pub c: usize,
}

impl Shape {
    /// A shape `B x D` features, `C x D` weights.
    pub fn new(b: usize, d: usize, c: usize) -> Self {
        Self { b, d, c }
    }

    /// Checks that no dimension is zero and that `B*D`, `C*D` and `B*C` fit `usize` and the
    /// 63-bit offsets the kernels use.
    pub fn validate(&self) -> Result<()> {
        for (dim, v) in [("B", self.b), ("D", self.d), ("C", self.c)] {
            if v == 0 {
                return Err(Error::EmptyDimension { dim });
            }
        }
        for (what, a, b) in [
            ("B*D", self.b, self.d),
            ("C*D", self.c, self.d),
            ("B*C", self.b, self.c),
        ] {
            match a.checked_mul(b) {
                Some(n) if n <= i64::MAX as usize => {}
                _ => {
                    return Err(Error::TooLarge {
                        what: "shape",
                        detail: format!("{what} = {a} * {b} overflows 63-bit indexing"),
                    })
                }
            }
        }
        if self.b > i32::MAX as usize || self.c > i32::MAX as usize {
            return Err(Error::TooLarge {
                what: "shape",
                detail: format!(
                    "B = {} and C = {} must each be < 2^31 (labels are i32)",
                    self.b, self.c
                ),
            });
        }
        Ok(())
    }

    /// [`Self::check_lengths`] for a loss with `k` sub-centers per class
    /// ([`crate::Variant::centers`]): `w` has `C*k` rows, so `w_len == C*k*D`.
    pub fn check_lengths_with_centers(
        &self,
        k: usize,
        x_len: usize,
        w_len: usize,
        labels_len: usize,
    ) -> Result<()> {
        if k <= 1 {
            return self.check_lengths(x_len, w_len, labels_len);
        }
        let Some(n) = self.c.checked_mul(k).and_then(|r| r.checked_mul(self.d)) else {
            return Err(Error::TooLarge {
                what: "w",
                detail: format!("C*K*D = {}*{k}*{} overflows usize", self.c, self.d),
            });
        };
        if n != w_len {
            return Err(Error::Length {
                what: "w (C*K*D with sub-centers)",
                expected: n,
                got: w_len,
            });
        }
        self.check_lengths(x_len, self.c * self.d, labels_len)
    }

    /// Checks the shape and that the buffers fit it: `x_len == B*D`, `w_len == C*D`,
    /// `labels_len == B`.
    pub fn check_lengths(&self, x_len: usize, w_len: usize, labels_len: usize) -> Result<()> {
        self.validate()?;
        for (what, expected, got) in [
            ("x", self.b * self.d, x_len),
            ("w", self.c * self.d, w_len),
            ("labels", self.b, labels_len),
        ] {
            if expected != got {
                return Err(Error::Length {
                    what,
                    expected,
                    got,
                });
            }
        }
        Ok(())
    }

    /// An order-sensitive 64-bit fingerprint of `labels` (FNV-1a over row and label), so a
    /// backward can tell that its labels are not the forward's even when they are a permutation
    /// of them (same count, same sum). Shared by every backend.
    pub fn labels_fingerprint(labels: &[i32]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (row, &label) in labels.iter().enumerate() {
            for byte in (row as u64)
                .to_le_bytes()
                .into_iter()
                .chain(label.to_le_bytes())
            {
                h ^= byte as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }

    /// Checks every label: `label < C` (negative labels mark ignored rows). Returns the number of
    /// rows that count (labels `>= 0`).
    pub fn check_labels(&self, labels: &[i32]) -> Result<usize> {
        let mut counted = 0usize;
        for (row, &label) in labels.iter().enumerate() {
            if label >= 0 {
                if label as usize >= self.c {
                    return Err(Error::LabelOutOfRange {
                        row,
                        label: label as i64,
                        classes: self.c,
                    });
                }
                counted += 1;
            }
        }
        Ok(counted)
    }
}

/// The upstream gradient handed to backward: the derivative of the caller's objective with respect
/// to the returned loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Upstream<'a> {
    /// For `Reduction::Mean` and `Reduction::Sum`: `dObjective/dloss`, usually 1.
    Scalar(f64),
    /// For `Reduction::None`: one value per row (B values; ignored rows' values are unused and
    /// not checked, so a NaN there is fine).
    PerRow(&'a [f64]),
}

impl Upstream<'_> {
    /// The usual upstream gradient of a scalar loss: 1.
    pub const ONE: Upstream<'static> = Upstream::Scalar(1.0);

    /// The per-row upstream `g_i` of MATH.md ("Backward"): `dL/N` for mean over `N` counted rows
    /// (0 when `N = 0`), `dL` for sum, the given values for none; 0 for ignored rows. Checks that
    /// the variant fits the reduction, the length is B and the values of counted rows are finite
    /// and at most [`UPSTREAM_MAX`] in magnitude (ignored rows' values are never read).
    pub fn per_row(&self, reduction: Reduction, labels: &[i32]) -> Result<Vec<f64>> {
        let b = labels.len();
        let counted = labels.iter().filter(|&&l| l >= 0).count();
        let g: Vec<f64> = match *self {
            Upstream::Scalar(v) => {
                vec![scalar_upstream_per_row(reduction, v, b, counted)?; b]
            }
            Upstream::PerRow(values) => {
                check_per_row_upstream(reduction, values.len(), b)?;
                for (i, (&v, &l)) in values.iter().zip(labels).enumerate() {
                    if l >= 0 {
                        check_upstream_value(v, &format!("upstream gradient of row {i}"))?;
                    }
                }
                values.to_vec()
            }
        };
        Ok(labels
            .iter()
            .zip(g)
            .map(|(&l, gi)| if l >= 0 { gi } else { 0.0 })
            .collect())
    }
}

/// Checks a scalar upstream `v` against the reduction: it must be finite, and the reduction
/// `Mean` or `Sum` (`None` needs one value per row). Shared by every backend; a backend that
/// divides by the counted rows on the device checks with this alone.
pub fn check_scalar_upstream(reduction: Reduction, v: f64, b: usize) -> Result<()> {
    check_upstream_value(v, "scalar upstream gradient")?;
    if reduction == Reduction::None {
        return Err(Error::Upstream {
            detail: format!(
                "reduction none needs one upstream value per row (B = {b}), got the scalar {v}"
            ),
        });
    }
    Ok(())
}

/// One upstream value: finite and `|v| <= UPSTREAM_MAX`; `what` names it in the error.
/// Shared by every backend.
pub fn check_upstream_value(v: f64, what: &str) -> Result<()> {
    if !v.is_finite() {
        return Err(Error::Upstream {
            detail: format!("{what} is {v}, not finite"),
        });
    }
    if v.abs() > UPSTREAM_MAX {
        return Err(Error::Upstream {
            detail: format!(
                "{what} is {v}: |g| must be <= 1e12 (beyond that the gradients can overflow; \
                 scale the loss instead)"
            ),
        });
    }
    Ok(())
}

/// The per-row `g_i` a scalar upstream `v` gives (MATH.md "Backward"): `v/N` for mean over `N`
/// counted rows (0 when `N = 0`), `v` for sum. Errors as [`check_scalar_upstream`]. Shared by
/// every backend.
pub fn scalar_upstream_per_row(
    reduction: Reduction,
    v: f64,
    b: usize,
    counted: usize,
) -> Result<f64> {
    check_scalar_upstream(reduction, v, b)?;
    Ok(match reduction {
        Reduction::Mean if counted == 0 => 0.0,
        Reduction::Mean => v / counted as f64,
        _ => v,
    })
}

/// Checks a per-row upstream of `len` values against the reduction (only `None` takes one) and
/// `B`. Shared by every backend.
pub fn check_per_row_upstream(reduction: Reduction, len: usize, b: usize) -> Result<()> {
    if reduction != Reduction::None {
        return Err(Error::Upstream {
            detail: format!(
                "reduction {reduction:?} needs a scalar upstream gradient, got {len} per-row values"
            ),
        });
    }
    if len != b {
        return Err(Error::Length {
            what: "upstream",
            expected: b,
            got: len,
        });
    }
    Ok(())
}
