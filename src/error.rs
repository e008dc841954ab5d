//! Typed errors. Every check runs before any work (CPU) or any launch (GPU), and every message
//! names the offending value, so a caller can fix the call without reading this crate's code.

use std::fmt;

/// Everything that can go wrong in a call into this crate.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// A field of [`crate::MarginLoss`] is out of its documented range (see `MarginLoss::validate`).
    InvalidSpec {
        /// The field name, as spelled in `MarginLoss` (`"s"`, `"m1"`, ...).
        field: &'static str,
        /// The rejected value.
        value: f64,
        /// The rule it breaks, e.g. `"must be finite and > 0"`.
        rule: &'static str,
    },
    /// A dimension of the problem is zero.
    EmptyDimension {
        /// `"B"`, `"D"` or `"C"`.
        dim: &'static str,
    },
    /// A buffer's length does not match the shape.
    Length {
        /// Which buffer (`"x"`, `"w"`, `"labels"`, `"upstream"`, ...).
        what: &'static str,
        /// The length the shape implies, e.g. `B*D`.
        expected: usize,
        /// The length passed.
        got: usize,
    },
    /// A label is `>= C` (negative labels are fine: they mark ignored rows).
    LabelOutOfRange {
        /// The row index.
        row: usize,
        /// The label found there.
        label: i64,
        /// The number of classes `C`.
        classes: usize,
    },
    /// The problem is too large for a buffer or an index type (e.g. `B*D` overflows `usize`).
    TooLarge {
        /// What overflowed.
        what: &'static str,
        /// The detail, with the values.
        detail: String,
    },
    /// The upstream gradient does not fit the reduction (a scalar for `mean`/`sum`, B values for `none`).
    Upstream {
        /// What was wrong, with the values.
        detail: String,
    },
    /// A forward result was passed to backward with a different spec or shape than it was made with.
    ForwardMismatch {
        /// What differs, with both values.
        detail: String,
    },
    /// An option or combination this backend does not support.
    Unsupported {
        /// What, with the values.
        detail: String,
    },
    /// An argument is unusable: a buffer on another device (or CUDA context) than the handle's
    /// stream; for the raw-pointer entry ([`crate::cuda::raw`]) also a null or misaligned
    /// pointer, an output overlapping another buffer, a stream of another context.
    InvalidArgument {
        /// Which argument (`"x"`, `"dx"`, `"stream"`, ...).
        what: &'static str,
        /// What is wrong, with the values.
        detail: String,
    },
    /// No CUDA driver or device is available (the GPU path was asked for).
    NoDevice {
        /// Why, e.g. "libcuda not found".
        reason: String,
    },
    /// NVRTC failed to compile a kernel module; `log` is NVRTC's program log.
    Compile {
        /// The module and its options, e.g. `"fused (f16, sm_90)"`.
        module: String,
        /// NVRTC's log, verbatim.
        log: String,
    },
    /// A CUDA driver call failed.
    Cuda {
        /// What was being done (e.g. `"launch logits_fwd_bf16"`).
        context: String,
        /// The driver's error.
        detail: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidSpec { field, value, rule } => {
                write!(f, "invalid loss spec: {field} = {value} ({field} {rule})")
            }
            Error::EmptyDimension { dim } => write!(f, "empty dimension: {dim} = 0"),
            Error::Length {
                what,
                expected,
                got,
            } => write!(f, "{what} has length {got}, expected {expected}"),
            Error::LabelOutOfRange {
                row,
                label,
                classes,
            } => write!(
                f,
                "label {label} at row {row} is out of range for C = {classes} classes (valid: 0..{classes}, or negative to ignore the row)"
            ),
            Error::TooLarge { what, detail } => write!(f, "{what} too large: {detail}"),
            Error::Upstream { detail } => write!(f, "bad upstream gradient: {detail}"),
            Error::ForwardMismatch { detail } => {
                write!(f, "forward result does not match this backward call: {detail}")
            }
            Error::Unsupported { detail } => write!(f, "unsupported: {detail}"),
            Error::InvalidArgument { what, detail } => write!(f, "invalid argument {what}: {detail}"),
            Error::NoDevice { reason } => write!(f, "no CUDA device: {reason}"),
            Error::Compile { module, log } => {
                write!(f, "NVRTC failed to compile {module}:\n{log}")
            }
            Error::Cuda { context, detail } => write!(f, "CUDA error during {context}: {detail}"),
        }
    }
}

impl std::error::Error for Error {}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
