//! The kernels' option block, laid out exactly as `struct FmParams` in kernels/common.cuh.

use crate::spec::{GradientMode, MarginLoss, OverflowPolicy};
use cudarc::driver::DeviceRepr;

/// `struct FmParams` of kernels/common.cuh: 12 four-byte fields, no padding.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct FmParams {
    pub s: f32,
    pub m1: f32,
    pub m2: f32,
    pub m3: f32,
    pub lambda: f32,
    pub fallback_shift: f32,
    pub policy: i32,
    pub detached: i32,
    pub angular: i32,
    pub normalize_features: i32,
    pub normalize_weights: i32,
    /// 1: the SIMT backward rounds its dot-product operands to TF32 (after a TF32 forward).
    pub tf32_dots: i32,
}

// SAFETY: a plain #[repr(C)] struct of f32/i32 fields, matching the C struct field for field;
// kernels receive it by value.
unsafe impl DeviceRepr for FmParams {}

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
            policy: match spec.effective_policy() {
                OverflowPolicy::Monotonic => 0,
                OverflowPolicy::Fallback => 1,
                OverflowPolicy::Raw => 2,
                OverflowPolicy::Easy => 3,
            },
            detached: (spec.gradient == GradientMode::Detached) as i32,
            angular: spec.has_angular_margin() as i32,
            normalize_features: spec.normalize_features as i32,
            normalize_weights: spec.normalize_weights as i32,
            tf32_dots: 0,
        }
    }
}
