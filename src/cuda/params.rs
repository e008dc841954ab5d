//! The kernels' option block, laid out exactly as `struct FmParams` in kernels/common.cuh.
//! Every kernel family takes it by value; [`FmParams::from_spec`] is the one place a spec
//! becomes kernel parameters.

use crate::spec::{GradientMode, MarginLoss, OverflowPolicy, THETA_CLAMP};
use crate::variant::{ElasticKind, ElasticPlus, Variant, ADAFACE_EPS};
use cudarc::driver::DeviceRepr;

/// `struct FmParams` of kernels/common.cuh: 20 four-byte fields, no padding (80 bytes,
/// static_assert there).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FmParams {
    /// Scale `s`.
    pub s: f32,
    /// Multiplicative angular margin `m1`.
    pub m1: f32,
    /// Additive angular margin `m2`.
    pub m2: f32,
    /// Additive cosine margin `m3`.
    pub m3: f32,
    /// SphereFace's blend `lambda`.
    pub lambda: f32,
    /// `m2 sin m2`, the Fallback policy's shift (taken in f64).
    pub fallback_shift: f32,
    /// The effective overflow policy: 0 Monotonic, 1 Fallback, 2 Raw, 3 Easy.
    pub policy: i32,
    /// 1: the target's margin term is detached from the gradient.
    pub detached: i32,
    /// 1: the spec has an angular margin (m1 != 1 or m2 != 0).
    pub angular: i32,
    /// 1: features are L2-normalized.
    pub normalize_features: i32,
    /// 1: class weights are L2-normalized.
    pub normalize_weights: i32,
    /// 1: the SIMT backward rounds its dot-product operands to TF32 (after a TF32 forward).
    pub tf32_dots: i32,
    /// The loss with per-row or batch state ([`VariantCode`]).
    pub variant: i32,
    /// The cosine clamp `d` of `theta = acos(clamp(c, -1 + d, 1 - d))`: `1e-7`, or AdaFace's
    /// `e = 1e-3` (a true clamp there).
    pub clamp: f32,
    /// The variant's parameters: AdaFace `(m, h, alpha)`, CurricularFace `(alpha)`, MagFace
    /// `(l_a, u_a, l_m, u_m, lambda_g)`, ElasticFace `(kind: 0 Arc / 1 Cos, plus: 0 none /
    /// 1 rank / 2 published)`; zeros after them.
    pub vp: [f32; 5],
    /// Sub-centers per class `K` (1 but for sub-center ArcFace): `w` has `C*K` rows, class
    /// `j`'s are `jK .. jK + K - 1`.
    pub centers: i32,
}

// SAFETY: a plain #[repr(C)] struct of f32/i32 fields, matching the C struct field for field;
// kernels receive it by value.
unsafe impl DeviceRepr for FmParams {}
// SAFETY: #[repr(C)], 4-byte fields only (no padding), every bit pattern valid.
unsafe impl bytemuck::Zeroable for FmParams {}
// SAFETY: as for Zeroable; Copy and 'static.
unsafe impl bytemuck::Pod for FmParams {}
const _: () = assert!(std::mem::size_of::<FmParams>() == 80);

/// `FmParams.policy`'s codes: the values of `FM_POLICY_*` in kernels/geometry.cuh (checked by
/// the unit test below).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyCode {
    /// FM_G_POLICY_MONOTONIC.
    Monotonic = super::geometry::POLICY_MONOTONIC as i32,
    /// FM_G_POLICY_FALLBACK.
    Fallback = super::geometry::POLICY_FALLBACK as i32,
    /// FM_G_POLICY_RAW.
    Raw = super::geometry::POLICY_RAW as i32,
    /// FM_G_POLICY_EASY.
    Easy = super::geometry::POLICY_EASY as i32,
    /// FM_G_POLICY_CLIP (AdaFace's angle clip).
    Clip = super::geometry::POLICY_CLIP as i32,
}

/// `FmParams.variant`'s codes: `FM_G_VAR_*` of kernels/geometry.cuh.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VariantCode {
    /// The fixed-margin family and sub-center ArcFace (its `K` is [`FmParams::centers`]).
    Plain = super::geometry::VAR_PLAIN as i32,
    /// AdaFace.
    AdaFace = super::geometry::VAR_ADAFACE as i32,
    /// CurricularFace.
    CurricularFace = super::geometry::VAR_CURRICULAR as i32,
    /// MagFace.
    MagFace = super::geometry::VAR_MAGFACE as i32,
    /// ElasticFace.
    ElasticFace = super::geometry::VAR_ELASTIC as i32,
}

impl PolicyCode {
    /// The code of an (effective) overflow policy.
    pub fn of(p: OverflowPolicy) -> Self {
        match p {
            OverflowPolicy::Monotonic => Self::Monotonic,
            OverflowPolicy::Fallback => Self::Fallback,
            OverflowPolicy::Raw => Self::Raw,
            OverflowPolicy::Easy => Self::Easy,
            OverflowPolicy::Clip => Self::Clip,
        }
    }
}

impl FmParams {
    /// The kernels' view of a validated spec (margins rounded to f32; `m2 sin m2` taken in f64).
    pub fn from_spec(spec: &MarginLoss) -> Self {
        Self {
            s: spec.s as f32,
            m1: spec.m1 as f32,
            m2: spec.m2 as f32,
            m3: spec.m3 as f32,
            lambda: spec.lambda as f32,
            fallback_shift: (spec.m2 * spec.m2.sin()) as f32,
            policy: PolicyCode::of(spec.effective_policy()) as i32,
            detached: (spec.gradient == GradientMode::Detached) as i32,
            angular: spec.has_angular_margin() as i32,
            normalize_features: spec.normalize_features as i32,
            normalize_weights: spec.normalize_weights as i32,
            tf32_dots: 0,
            variant: VariantCode::of(&spec.variant) as i32,
            clamp: if matches!(spec.variant, Variant::AdaFace(_)) {
                ADAFACE_EPS as f32
            } else {
                THETA_CLAMP as f32
            },
            vp: variant_params(&spec.variant),
            centers: spec.variant.centers() as i32,
        }
    }
}

impl VariantCode {
    /// The code of a variant.
    pub fn of(v: &Variant) -> Self {
        match v {
            Variant::Plain | Variant::SubCenter { .. } => Self::Plain,
            Variant::AdaFace(_) => Self::AdaFace,
            Variant::CurricularFace(_) => Self::CurricularFace,
            Variant::MagFace(_) => Self::MagFace,
            Variant::ElasticFace(_) => Self::ElasticFace,
        }
    }
}

/// `FmParams.vp` of a variant (the layout in its field's documentation).
fn variant_params(v: &Variant) -> [f32; 5] {
    let f = |v: f64| v as f32;
    match *v {
        Variant::AdaFace(a) => [f(a.m), f(a.h), f(a.alpha), 0.0, 0.0],
        Variant::CurricularFace(c) => [f(c.alpha), 0.0, 0.0, 0.0, 0.0],
        Variant::MagFace(g) => [f(g.l_a), f(g.u_a), f(g.l_m), f(g.u_m), f(g.lambda_g)],
        Variant::ElasticFace(e) => {
            let kind = match e.kind {
                ElasticKind::Arc => 0.0,
                ElasticKind::Cos => 1.0,
            };
            let plus = match e.plus {
                ElasticPlus::None => 0.0,
                ElasticPlus::Rank => 1.0,
                ElasticPlus::Published => 2.0,
            };
            [kind, plus, 0.0, 0.0, 0.0]
        }
        Variant::Plain | Variant::SubCenter { .. } => [0.0; 5],
    }
}
