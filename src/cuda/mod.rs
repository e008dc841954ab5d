//! The GPU path: NVRTC-compiled kernels launched through cudarc on the caller's stream.
//!
//! [`default_stream`] opens a device and returns [`Error::NoDevice`](crate::Error::NoDevice)
//! (never a panic) where there is no driver or no GPU; the cudarc types a caller handles
//! ([`CudaStream`], [`CudaSlice`], [`CudaView`]) are re-exported here, and the whole of
//! [`cudarc`] for the rest, so the caller needs no cudarc dependency of its own (one of the same
//! version also works: it is the same crate).
//!
//! ```
//! use fused_margin::cuda::{default_stream, F32Precision, FusedMarginLoss, GpuUpstream, Options};
//! use fused_margin::{Error, MarginLoss, Shape};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let stream = match default_stream(0) {
//!     Ok(stream) => stream,
//!     Err(Error::NoDevice { reason }) => {
//!         println!("no GPU here ({reason}); the CPU reference is fused_margin::cpu");
//!         return Ok(());
//!     }
//!     Err(e) => return Err(e.into()),
//! };
//! // Options are a plain value (`#[non_exhaustive]`: start from the default, set fields).
//! let mut options = Options::default();
//! options.f32_precision = F32Precision::Tf32;
//! let gpu = FusedMarginLoss::with_options(stream.clone(), options)?;
//! let shape = Shape::new(2, 4, 3);
//! let x = stream.clone_htod(&[0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])?;
//! let w = stream.clone_htod(&[1.0f32; 12])?;
//! let labels = stream.clone_htod(&[0i32, 2])?;
//! let spec = MarginLoss::arcface(0.5);
//! let (xv, wv, lv) = (x.as_view(), w.as_view(), labels.as_view());
//! let fwd = gpu.forward(&spec, &xv, &wv, &lv, shape)?;
//! println!("loss {} from kernels {:?}", fwd.loss_host()?, fwd.kernels);
//! // The backward takes the spec and shape from the forward's result.
//! let grads = gpu.backward(&fwd, &xv, &wv, &lv, GpuUpstream::ONE)?;
//! assert_eq!((grads.dx.len(), grads.dw.len()), (8, 12));
//! # Ok(()) }
//! ```
//!
//! Validation happens in Rust before any launch: spec, shape, lengths, devices. The label range
//! is checked on the device by default ([`LabelCheck::Device`]: no synchronization, so a step
//! queues without waiting for the GPU), and a bad label is reported when a result is read
//! ([`GpuSaved::check`], `loss_host`, [`GpuBackwardRun::check`]); until then the outputs it
//! touches are NaN. [`LabelCheck::Host`] copies the labels to the host and checks them before any
//! launch instead (one synchronous copy per call).
//!
//! After the first call of a shape a default step allocates only its outputs: the fused plans'
//! workspaces come from an arena the handle keeps ([`FusedMarginLoss::workspace_held_bytes`]).
//! [`FusedMarginLoss::forward_into`], [`FusedMarginLoss::backward_into`] and
//! [`FusedMarginLoss::backward_f32_into`] write the outputs into the caller's views instead
//! ([`GpuForwardOut`], [`GpuGradOut`]; checked before any launch), returning what the backward
//! needs ([`GpuSaved`]) or what ran ([`GpuBackwardRun`]); [`FusedMarginLoss::forward`] and
//! [`FusedMarginLoss::backward`] are the same calls into buffers they allocate.
//!
//! Files: `options.rs` ([`Options`]: what the user chooses), `handle.rs` ([`FusedMarginLoss`]:
//! device facts, module cache, allocation, validation, forward and backward and their `_into`
//! forms), `results.rs`
//! ([`GpuForward`], [`GpuGradients`], [`GpuSaved`], [`GpuBackwardRun`], [`DeviceUpstream`]),
//! `spans.rs` (the overlap check of output views and raw pointers), `plan.rs` (the launch plan as
//! data), `exec.rs` (its cudarc executor), `launch.rs` (small launch helpers), `labels.rs`,
//! `compile.rs` (NVRTC), `params.rs`, `libs.rs`, [`measure`], [`raw`].

pub mod args;
mod compile;
mod exec;
mod geometry;
mod handle;
mod labels;
mod launch;
pub(crate) mod libs;
pub mod measure;
#[cfg(feature = "nccl")]
mod nccl;
mod options;
pub mod params;
pub mod plan;
pub mod raw;
mod results;
pub mod selfcheck;
mod spans;

/// The cudarc this crate is built against (0.19): its device buffers, views and streams are what
/// [`FusedMarginLoss`] takes.
pub use cudarc;
/// cudarc's types in this module's signatures, re-exported so a caller can name them.
pub use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};

pub use compile::{
    cache_dir, compile_ptx, compile_ptx_in, compile_ptx_uncached, entry_name, nvrtc_available,
    source, PtxSource, Unit, ENTRY_POINTS, F32_ENTRY_POINTS, HALF_ENTRY_POINTS, KERNEL_DTYPES,
    SM90A_HALF_ENTRY_POINTS,
};
pub use handle::{
    default_stream, device_available, FusedMarginLoss, GpuShardForward, GpuShardGradients,
};
pub use labels::LabelCheck;
#[doc(hidden)]
pub use launch::CudaElement;
pub(crate) use launch::{cuda_err, Kernels};
#[doc(hidden)]
#[cfg(feature = "nccl")]
pub use nccl::{nccl_available, NcclComm, NcclId};
pub use options::KernelOverride;
pub use options::{F32Precision, Options, Plan};
pub use results::{
    DeviceUpstream, GpuBackwardRun, GpuForward, GpuForwardOut, GpuGradOut, GpuGradients, GpuSaved,
    GpuUpstream,
};
pub use selfcheck::{Outcome as SelfCheckOutcome, SelfCheckReport};
