//! The kernels' option block, laid out exactly as `struct FmParams` in kernels/common.cuh.
//! Every kernel family takes it by value; [`FmParams::from_spec`] is the one place a spec
//! becomes kernel parameters.

use crate::spec::{GradientMode, MarginLoss, OverflowPolicy};
use cudarc::driver::DeviceRepr;

/// `struct FmParams` of kernels/common.cuh: 12 four-byte fields, no padding (48 bytes,
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
}

// SAFETY: a plain #[repr(C)] struct of f32/i32 fields, matching the C struct field for field;
// kernels receive it by value.
unsafe impl DeviceRepr for FmParams {}
// SAFETY: #[repr(C)], twelve 4-byte fields (no padding), every bit pattern valid.
unsafe impl bytemuck::Zeroable for FmParams {}
// SAFETY: as for Zeroable; Copy and 'static.
unsafe impl bytemuck::Pod for FmParams {}
const _: () = assert!(std::mem::size_of::<FmParams>() == 48);

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
}

impl PolicyCode {
    /// The code of an (effective) overflow policy.
    pub fn of(p: OverflowPolicy) -> Self {
        match p {
            OverflowPolicy::Monotonic => Self::Monotonic,
            OverflowPolicy::Fallback => Self::Fallback,
            OverflowPolicy::Raw => Self::Raw,
            OverflowPolicy::Easy => Self::Easy,
            // AdaFace's clip: never reaches a kernel. validate() allows Clip only with AdaFace,
            // and every GPU entry refuses Clip by name (plan::check_gpu_variant; candle and the
            // raw entry refuse every variant) before building parameters. Raw is a placeholder.
            OverflowPolicy::Clip => Self::Raw,
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
        }
    }
}
