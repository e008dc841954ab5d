//! The losses with per-row or batch state (docs/MATH.md, "Losses with per-row or batch state"):
//! sub-center ArcFace, AdaFace, CurricularFace, MagFace and ElasticFace. Each is the margin family
//! of [`MarginLoss`](crate::MarginLoss) with per-row target margins `m2_i, m3_i` (and, for
//! CurricularFace, re-weighted hard negatives), selected by [`MarginLoss::variant`](crate::MarginLoss::variant).
//!
//! State (AdaFace's running mean and deviation of feature norms, CurricularFace's `t`) belongs to
//! the caller: a call takes it in [`RowInputs::state`] and returns it updated
//! ([`cpu::Forward::state`](crate::cpu::Forward::state)), so every call is a pure function of its
//! inputs and a training loop can checkpoint the state with its weights.
//!
//! Backends: the CPU reference computes all five. The GPU plans run ElasticFace without the Plus
//! reordering ([`FusedMarginLoss::forward_with`](crate::cuda::FusedMarginLoss::forward_with):
//! the host draws the margins and the kernels read them where each row's target is formed); the
//! others, and every variant through the candle op and the raw entry, return
//! [`Error::Unsupported`] before any launch.

use crate::error::{Error, Result};

/// Which loss of the family: the fixed-margin one, or one with per-row or batch state.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Variant {
    /// `cos(m1*theta + m2) - m3` with the spec's margins on every row (NSL, SphereFace, CosFace,
    /// ArcFace, combined). The default.
    #[default]
    Plain,
    /// Sub-center ArcFace (Deng et al., ECCV 2020): `w` has `C*K` rows, class-major (row
    /// `j*K + k` is sub-center `k` of class `j`); the cosine of class `j` is the largest of its
    /// `K`, and the gradient goes to that winner only (the lowest `k` on a tie). The spec's
    /// margins, policy and options apply to that cosine unchanged.
    SubCenter {
        /// Sub-centers per class, `1..=64` (3 in the paper; 1 is the plain loss).
        k: usize,
    },
    /// AdaFace (Kim et al., CVPR 2022): the margin adapts to the feature norm's place in the
    /// batch's running statistics (state: [`LossState::AdaFace`]).
    AdaFace(AdaFace),
    /// CurricularFace (Huang et al., CVPR 2020): negatives harder than the target are re-weighted
    /// by a running `t` (state: [`LossState::CurricularFace`]). The spec's margins set the target.
    CurricularFace(CurricularFace),
    /// MagFace (Meng et al., CVPR 2021): an ArcFace margin linear in the clamped feature norm,
    /// plus a regularizer of the norm in the row loss.
    MagFace(MagFace),
    /// ElasticFace (Boutros et al., CVPRW 2022): a margin drawn per row from a normal
    /// distribution (given by the caller, or drawn from a seed by the generator of MATH.md).
    ElasticFace(ElasticFace),
}

/// AdaFace's parameters. Defaults (the published training runs): `m = 0.4`, `h = 0.333`,
/// `alpha = 0.01`, with the spec's `s = 64` and [`OverflowPolicy::Clip`](crate::OverflowPolicy::Clip).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaFace {
    /// The margin `m`, finite in `[0, 1.5]` (0.4; the repository's config.py uses 0.5).
    pub m: f64,
    /// The concentration `h`, finite in `[0, 10]` (0.333; 0 turns the adaptation off).
    pub h: f64,
    /// The running statistics' momentum `alpha`, in `[0, 1]` (0.01; head.py's default is 1).
    pub alpha: f64,
}

impl Default for AdaFace {
    fn default() -> Self {
        Self {
            m: 0.4,
            h: 0.333,
            alpha: 0.01,
        }
    }
}

/// CurricularFace's parameters. Default `alpha = 0.01` (TFace uses 0.1), with ArcFace's
/// `m2 = 0.5`, `s = 64` and the Fallback policy in the spec.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurricularFace {
    /// The momentum of `t`, in `[0, 1]`.
    pub alpha: f64,
}

impl Default for CurricularFace {
    fn default() -> Self {
        Self { alpha: 0.01 }
    }
}

/// MagFace's parameters. Defaults: `l_a = 10`, `u_a = 110`, `l_m = 0.45`, `u_m = 0.8`,
/// `lambda_g = 20` (the repository's run.sh uses 35), `s = 64`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MagFace {
    /// The lower norm bound `l_a`, finite and `> 0`.
    pub l_a: f64,
    /// The upper norm bound `u_a`, finite and `> l_a`.
    pub u_a: f64,
    /// The margin at `l_a`, finite in `[0, pi)`.
    pub l_m: f64,
    /// The margin at `u_a`, finite in `[l_m, pi)`.
    pub u_m: f64,
    /// The regularizer's weight `lambda_g`, finite and `>= 0`.
    pub lambda_g: f64,
}

impl Default for MagFace {
    fn default() -> Self {
        Self {
            l_a: 10.0,
            u_a: 110.0,
            l_m: 0.45,
            u_m: 0.8,
            lambda_g: 20.0,
        }
    }
}

/// Which margin ElasticFace draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElasticKind {
    /// ElasticFace-Arc: the additive angular margin `m2_i` (Raw policy, as published).
    Arc,
    /// ElasticFace-Cos: the additive cosine margin `m3_i`.
    Cos,
}

/// ElasticFace+'s reordering of the drawn margins by the target cosines (MATH.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ElasticPlus {
    /// The drawn margins as they are (plain ElasticFace). The default.
    #[default]
    None,
    /// The counted row with the k-th largest target cosine gets the k-th smallest margin.
    Rank,
    /// fdbtrs/ElasticFace's code: counted row `p` gets the `pi(p)`-th smallest margin, where
    /// `pi(p)` is the row with the p-th largest target cosine (it indexes by the permutation, not
    /// its inverse).
    Published,
}

/// ElasticFace's parameters. Defaults: Arc `m = 0.5, sigma = 0.05`; Cos `m = 0.35,
/// sigma = 0.05`; Plus uses `sigma = 0.0175` (Arc) and `0.02` (Cos). `s = 64`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ElasticFace {
    /// Arc or Cos.
    pub kind: ElasticKind,
    /// The mean margin `m`, finite in `[0, pi)` (Arc) or `[0, 2]` (Cos).
    pub m: f64,
    /// The margins' standard deviation, finite in `[0, 1]`.
    pub sigma: f64,
    /// ElasticFace+'s reordering.
    pub plus: ElasticPlus,
}

/// The state a loss carries from call to call, owned by the caller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossState {
    /// AdaFace: the running mean and standard deviation of the clipped feature norms.
    AdaFace {
        /// Running mean `mu` (20 at the start of training).
        mean: f64,
        /// Running standard deviation `sigma` (100 at the start of training).
        std: f64,
    },
    /// CurricularFace: the running mean `t` of the target cosines (0 at the start).
    CurricularFace {
        /// The running `t`.
        t: f64,
    },
}

impl LossState {
    /// AdaFace's state at the start of training: `mean = 20`, `std = 100`.
    pub const ADAFACE_INIT: LossState = LossState::AdaFace {
        mean: 20.0,
        std: 100.0,
    };
    /// CurricularFace's state at the start of training: `t = 0`.
    pub const CURRICULAR_INIT: LossState = LossState::CurricularFace { t: 0.0 };
}

/// The counter-based generator ElasticFace draws its margins from (MATH.md): row `i` of a call
/// draws from `(seed, step, row_offset + i)`, so a sharded or repeated call draws the same values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ElasticRng {
    /// The run's seed.
    pub seed: u64,
    /// The training step (a new draw every step).
    pub step: u64,
    /// The global index of this call's first row (0 unless the batch is split across calls).
    pub row_offset: u64,
}

/// ElasticFace's per-row margins for one call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ElasticMargins<'a> {
    /// One margin per row (B values), before the Plus reordering.
    Given(&'a [f64]),
    /// Drawn by the generator.
    Seeded(ElasticRng),
}

/// What a call of a loss with state or per-row inputs takes besides `x`, `w` and the labels.
/// The fixed-margin losses and MagFace need nothing (`RowInputs::default()`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RowInputs<'a> {
    /// AdaFace's or CurricularFace's state in (required by those two, refused by the others).
    pub state: Option<LossState>,
    /// ElasticFace's margins (required by ElasticFace, refused by the others).
    pub margins: Option<ElasticMargins<'a>>,
}

impl<'a> RowInputs<'a> {
    /// Inputs carrying a state.
    pub fn with_state(state: LossState) -> Self {
        Self {
            state: Some(state),
            margins: None,
        }
    }

    /// Inputs carrying ElasticFace's margins.
    pub fn with_margins(margins: ElasticMargins<'a>) -> Self {
        Self {
            state: None,
            margins: Some(margins),
        }
    }
}

/// AdaFace's and CurricularFace's clamp `e` (MATH.md): AdaFace's norm floor, cosine clamp and
/// angle clip.
pub const ADAFACE_EPS: f64 = 1e-3;
/// AdaFace's upper clip of the feature norm.
pub const ADAFACE_NORM_MAX: f64 = 100.0;
/// Bound on ElasticFace's given margins: `|m_i| <= 16` (radians for Arc, a cosine shift for
/// Cos). The contract leaves the draws unclamped; a draw is at most `m + 8.6 sigma < 12` for a
/// valid spec, and 16 keeps the Cos logits within `17 s` (docs/MATH.md, "Range").
pub const ELASTIC_MARGIN_MAX: f64 = 16.0;
/// Largest number of sub-centers accepted.
pub const SUBCENTER_K_MAX: usize = 64;

fn check(field: &'static str, value: f64, ok: bool, rule: &'static str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidSpec { field, value, rule })
    }
}

impl Variant {
    /// True for the losses whose target margins differ per row (AdaFace, MagFace, ElasticFace):
    /// they set `m2_i, m3_i` themselves and need the spec's `m1 = 1, m2 = m3 = 0`.
    pub fn has_row_margins(&self) -> bool {
        matches!(
            self,
            Variant::AdaFace(_) | Variant::MagFace(_) | Variant::ElasticFace(_)
        )
    }

    /// The state a training run starts from ([`LossState::ADAFACE_INIT`],
    /// [`LossState::CURRICULAR_INIT`]); `None` for the losses without state.
    pub fn initial_state(&self) -> Option<LossState> {
        match self {
            Variant::AdaFace(_) => Some(LossState::ADAFACE_INIT),
            Variant::CurricularFace(_) => Some(LossState::CURRICULAR_INIT),
            _ => None,
        }
    }

    /// Sub-centers per class (1 but for [`Variant::SubCenter`]).
    pub fn centers(&self) -> usize {
        match self {
            Variant::SubCenter { k } => *k,
            _ => 1,
        }
    }

    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::SubCenter { .. } => "sub-center",
            Variant::AdaFace(_) => "AdaFace",
            Variant::CurricularFace(_) => "CurricularFace",
            Variant::MagFace(_) => "MagFace",
            Variant::ElasticFace(_) => "ElasticFace",
        }
    }

    /// Checks the variant's parameters and names the first bad one.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Variant::Plain => Ok(()),
            Variant::SubCenter { k } => check(
                "subcenter.k",
                k as f64,
                (1..=SUBCENTER_K_MAX).contains(&k),
                "must be in [1, 64]",
            ),
            Variant::AdaFace(a) => {
                check(
                    "adaface.m",
                    a.m,
                    a.m.is_finite() && (0.0..=1.5).contains(&a.m),
                    "must be finite and in [0, 1.5]",
                )?;
                check(
                    "adaface.h",
                    a.h,
                    a.h.is_finite() && (0.0..=10.0).contains(&a.h),
                    "must be finite and in [0, 10]",
                )?;
                check(
                    "adaface.alpha",
                    a.alpha,
                    (0.0..=1.0).contains(&a.alpha),
                    "must be in [0, 1]",
                )
            }
            Variant::CurricularFace(c) => check(
                "curricularface.alpha",
                c.alpha,
                (0.0..=1.0).contains(&c.alpha),
                "must be in [0, 1]",
            ),
            Variant::MagFace(g) => {
                check(
                    "magface.l_a",
                    g.l_a,
                    g.l_a.is_finite() && g.l_a > 0.0,
                    "must be finite and > 0",
                )?;
                check(
                    "magface.u_a",
                    g.u_a,
                    g.u_a.is_finite() && g.u_a > g.l_a,
                    "must be finite and > l_a",
                )?;
                check(
                    "magface.l_m",
                    g.l_m,
                    g.l_m.is_finite() && (0.0..std::f64::consts::PI).contains(&g.l_m),
                    "must be finite and in [0, pi)",
                )?;
                check(
                    "magface.u_m",
                    g.u_m,
                    g.u_m.is_finite() && g.u_m >= g.l_m && g.u_m < std::f64::consts::PI,
                    "must be finite and in [l_m, pi)",
                )?;
                check(
                    "magface.lambda_g",
                    g.lambda_g,
                    g.lambda_g.is_finite() && g.lambda_g >= 0.0,
                    "must be finite and >= 0",
                )
            }
            Variant::ElasticFace(e) => {
                let (ok, rule) = match e.kind {
                    ElasticKind::Arc => (
                        (0.0..std::f64::consts::PI).contains(&e.m),
                        "must be finite and in [0, pi) for ElasticFace-Arc",
                    ),
                    ElasticKind::Cos => (
                        (0.0..=2.0).contains(&e.m),
                        "must be finite and in [0, 2] for ElasticFace-Cos",
                    ),
                };
                check("elasticface.m", e.m, ok, rule)?;
                check(
                    "elasticface.sigma",
                    e.sigma,
                    (0.0..=1.0).contains(&e.sigma),
                    "must be finite and in [0, 1]",
                )
            }
        }
    }

    /// Checks a call's [`RowInputs`] against the variant: the state a stateful loss needs (of its
    /// kind, finite, `std >= 0`), ElasticFace's given margins (B finite values with
    /// `|m_i| <= 16`, [`ELASTIC_MARGIN_MAX`]; drawn ones are within it for every valid spec), and
    /// nothing a loss would ignore.
    pub fn check_inputs(&self, inputs: &RowInputs<'_>, b: usize) -> Result<()> {
        let refuse = |what: &str| {
            Err(Error::InvalidArgument {
                what: "row inputs",
                detail: format!("the {} loss takes no {what}", self.name()),
            })
        };
        match (self, inputs.state) {
            (Variant::AdaFace(_), Some(LossState::AdaFace { mean, std })) => {
                check("state.mean", mean, mean.is_finite(), "must be finite")?;
                check(
                    "state.std",
                    std,
                    std.is_finite() && std >= 0.0,
                    "must be finite and >= 0",
                )?;
            }
            (Variant::CurricularFace(_), Some(LossState::CurricularFace { t })) => {
                check("state.t", t, t.is_finite(), "must be finite")?;
            }
            (Variant::AdaFace(_) | Variant::CurricularFace(_), s) => {
                return Err(Error::InvalidArgument {
                    what: "row inputs",
                    detail: format!(
                        "the {} loss needs its state in RowInputs::state (LossState::{}), got {s:?}",
                        self.name(),
                        if matches!(self, Variant::AdaFace(_)) {
                            "ADAFACE_INIT at the start of training"
                        } else {
                            "CURRICULAR_INIT at the start of training"
                        }
                    ),
                })
            }
            (_, Some(_)) => return refuse("state"),
            (_, None) => {}
        }
        match (self, inputs.margins) {
            (Variant::ElasticFace(_), Some(ElasticMargins::Given(m))) => {
                if m.len() != b {
                    return Err(Error::Length {
                        what: "margins",
                        expected: b,
                        got: m.len(),
                    });
                }
                if let Some((i, &v)) = m
                    .iter()
                    .enumerate()
                    .find(|(_, v)| !v.is_finite() || v.abs() > ELASTIC_MARGIN_MAX)
                {
                    return Err(Error::InvalidArgument {
                        what: "margins",
                        detail: format!(
                            "margin {i} is {v}: each must be finite with |m_i| <= 16 (the \
                             range in which the logits stay within docs/MATH.md's bounds)"
                        ),
                    });
                }
            }
            (Variant::ElasticFace(_), Some(ElasticMargins::Seeded(_))) => {}
            (Variant::ElasticFace(_), None) => {
                return Err(Error::InvalidArgument {
                    what: "row inputs",
                    detail: "the ElasticFace loss needs its margins in RowInputs::margins \
                             (ElasticMargins::Given with B values, or ElasticMargins::Seeded)"
                        .into(),
                })
            }
            (_, Some(_)) => return refuse("margins"),
            (_, None) => {}
        }
        Ok(())
    }
}

/// The 64-bit mixing function of ElasticFace's generator (MATH.md: a SplitMix64 step).
pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl ElasticRng {
    /// The two 64-bit words global row `g` draws from: `h_j = sm(key ^ (2g + j))` with
    /// `key = sm(sm(seed) ^ step)`.
    pub fn words(&self, g: u64) -> (u64, u64) {
        let key = splitmix(splitmix(self.seed) ^ self.step);
        let base = g.wrapping_mul(2);
        (splitmix(key ^ base), splitmix(key ^ base.wrapping_add(1)))
    }

    /// The standard normal value of this call's row `i` (Box-Muller on the two words in f64;
    /// `u1` is never 0, so the value is finite: at most `sqrt(2 * 53 ln 2) ~ 8.6` in magnitude).
    pub fn normal(&self, i: usize) -> f64 {
        let (h0, h1) = self.words(self.row_offset.wrapping_add(i as u64));
        let scale = 2f64.powi(-53);
        let u1 = ((h0 >> 11) + 1) as f64 * scale;
        let u2 = (h1 >> 11) as f64 * scale;
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}
