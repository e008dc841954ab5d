//! Typed errors. Every check runs before any work (CPU) or any launch (GPU), and every message
//! names the offending value, so a caller can fix the call without reading this crate's code.

use std::fmt;

/// Everything that can go wrong in a call into this crate. `#[non_exhaustive]`: match with a
/// wildcard arm. [`std::error::Error::source`] gives the CUDA library's own error behind
/// [`Error::Cuda`] and [`Error::Compile`] (a [`CudaSource`]), so a caller can tell, say,
/// out-of-memory from an invalid argument.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
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
        /// NVRTC's error code, where NVRTC gave one (not when libnvrtc is missing).
        source: Option<CudaSource>,
    },
    /// A collective among the ranks of a sharded call failed: a rank left the group, passed
    /// other lengths than the others, rejected its inputs, or the communication library
    /// (NCCL) returned an error.
    Collective {
        /// The collective (`"all_gather"`, ...) or the step of the sharded call.
        op: &'static str,
        /// What went wrong, naming the rank.
        detail: String,
        /// A CUDA driver error behind it, where there is one (NCCL's own result code is in
        /// `detail`).
        source: Option<CudaSource>,
    },
    /// A CUDA driver or cuBLAS call failed.
    Cuda {
        /// What was being done (e.g. `"launch logits_fwd_bf16"`).
        context: String,
        /// The library's error, as text.
        detail: String,
        /// The library's error itself.
        source: Option<CudaSource>,
    },
}

/// The CUDA library error behind an [`Error::Cuda`] or [`Error::Compile`], as cudarc reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CudaSource {
    /// A driver API call (`CUresult`): e.g. `CUDA_ERROR_OUT_OF_MEMORY`.
    Driver(cudarc::driver::DriverError),
    /// A cuBLAS call.
    Cublas(cudarc::cublas::result::CublasError),
    /// NVRTC.
    Nvrtc(cudarc::nvrtc::result::NvrtcError),
}

impl CudaSource {
    fn error(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            CudaSource::Driver(e) => e,
            CudaSource::Cublas(e) => e,
            CudaSource::Nvrtc(e) => e,
        }
    }
}

/// A driver error as text. cudarc asks libcuda for the name, and panics where libcuda cannot be
/// loaded; an error value can exist without it (built by a caller, or in a test), so then the
/// raw `CUresult` is printed.
fn driver_text(e: &cudarc::driver::DriverError) -> String {
    if crate::cuda::libs::driver_present() {
        format!("{e:?}")
    } else {
        format!("{:?}", e.0)
    }
}

impl fmt::Display for CudaSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaSource::Driver(e) => f.write_str(&driver_text(e)),
            other => fmt::Display::fmt(other.error(), f),
        }
    }
}

impl std::error::Error for CudaSource {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.error())
    }
}

impl Error {
    /// A failed driver call as [`Error::Cuda`], `context` saying what was being done.
    pub fn driver(context: &str, e: cudarc::driver::DriverError) -> Error {
        Error::Cuda {
            context: context.to_string(),
            detail: driver_text(&e),
            source: Some(CudaSource::Driver(e)),
        }
    }

    /// A failed cuBLAS call as [`Error::Cuda`].
    pub fn cublas(context: &str, e: cudarc::cublas::result::CublasError) -> Error {
        Error::Cuda {
            context: context.to_string(),
            detail: format!("{e:?}"),
            source: Some(CudaSource::Cublas(e)),
        }
    }

    /// The driver's error code behind this error, if it is a failed driver call (for example
    /// `CUDA_ERROR_OUT_OF_MEMORY`).
    pub fn driver_error(&self) -> Option<cudarc::driver::DriverError> {
        match self {
            Error::Cuda {
                source: Some(CudaSource::Driver(e)),
                ..
            } => Some(*e),
            _ => None,
        }
    }
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
            Error::Compile { module, log, .. } => {
                write!(f, "NVRTC failed to compile {module}:\n{log}")
            }
            Error::Collective { op, detail, .. } => {
                write!(f, "collective {op} failed: {detail}")
            }
            Error::Cuda {
                context, detail, ..
            } => write!(f, "CUDA error during {context}: {detail}"),
        }
    }
}

impl std::error::Error for Error {
    /// The CUDA library's error (driver, cuBLAS, NVRTC) behind [`Error::Cuda`] and
    /// [`Error::Compile`]; `None` for this crate's own checks.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Cuda {
                source: Some(s), ..
            }
            | Error::Compile {
                source: Some(s), ..
            }
            | Error::Collective {
                source: Some(s), ..
            } => Some(s.error()),
            _ => None,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
