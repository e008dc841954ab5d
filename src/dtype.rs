//! Element types accepted for `x` and `w`: f32, f16 and bf16 (plus f64 on the CPU reference, for
//! finite-difference checks). Accumulation is always f32 or wider (MATH.md, "Inputs").

use half::{bf16, f16};

/// The element type of a buffer, as the kernels name it (entry points end in `_f32`, `_f16`, `_bf16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE binary64 (CPU reference only).
    F64,
}

impl DType {
    /// The suffix of the kernels' entry points and the C type name used in them.
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
        }
    }

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F64 => 8,
        }
    }
}

/// A floating-point element the CPU reference reads (converted exactly to f64) and writes.
pub trait Element: Copy + Send + Sync + PartialEq + std::fmt::Debug + 'static {
    /// The tag of this type.
    const DTYPE: DType;
    /// Exact widening to f64.
    fn to_f64(self) -> f64;
    /// Rounding (to nearest even) from f64.
    fn from_f64(v: f64) -> Self;
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
}
