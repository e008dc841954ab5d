//! What the GPU calls take and give back besides the inputs: the upstream gradient
//! ([`DeviceUpstream`]), the forward's result ([`GpuForward`]) and the gradients
//! ([`GpuGradients`]), with their host copies and label checks.

use super::labels::{self, LabelCheck, LabelState};
use super::launch::cuda_err;
use super::options::Plan;
use crate::dtype::DType;
use crate::error::Result;
use crate::spec::{MarginLoss, Shape};
use cudarc::driver::{CudaSlice, CudaStream, CudaView};
use std::sync::Arc;

/// The upstream gradient `dObjective/dloss` of a backward on the device, generic over how a
/// per-row buffer is given: [`GpuUpstream`] (a cudarc view) for
/// [`FusedMarginLoss::backward`](super::FusedMarginLoss::backward), and
/// [`RawUpstream`](super::raw::RawUpstream) (a raw device pointer) for
/// [`raw::backward`](super::raw::backward).
///
/// (The CPU reference's [`crate::Upstream`] takes f64 values on the host.)
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeviceUpstream<P> {
    /// For `Reduction::Mean` and `Reduction::Sum` (usually 1).
    Scalar(f32),
    /// For `Reduction::None`: B f32 values on the device, one per row.
    PerRow(P),
}

impl<P> DeviceUpstream<P> {
    /// The usual upstream of a scalar loss: 1.
    pub const ONE: Self = DeviceUpstream::Scalar(1.0);

    /// The same upstream with its per-row buffer given another way (e.g. a raw pointer made a
    /// view).
    pub fn map<Q>(self, f: impl FnOnce(P) -> Q) -> DeviceUpstream<Q> {
        match self {
            DeviceUpstream::Scalar(v) => DeviceUpstream::Scalar(v),
            DeviceUpstream::PerRow(p) => DeviceUpstream::PerRow(f(p)),
        }
    }
}

/// The upstream gradient for [`FusedMarginLoss::backward`](super::FusedMarginLoss::backward): a
/// scalar, or a per-row view of B f32 on the handle's device.
pub type GpuUpstream<'a> = DeviceUpstream<&'a CudaView<'a, f32>>;

/// The result of a GPU forward: the loss on the device (copy it with [`GpuForward::loss_host`]),
/// per-row losses and logsumexps, and what backward needs (norms, the spec and shape).
#[derive(Debug)]
pub struct GpuForward {
    /// The reduced loss, one f32 (for `Reduction::None`: the sum of `row_loss`).
    pub loss: CudaSlice<f32>,
    /// `l_i` per row (0 for ignored rows).
    pub row_loss: CudaSlice<f32>,
    /// `logsumexp_j z_ij` per row: what backward recomputes the softmax from.
    pub lse: CudaSlice<f32>,
    /// `|x_i|` per row.
    pub x_norm: CudaSlice<f32>,
    /// `|w_j|` per class.
    pub w_norm: CudaSlice<f32>,
    /// The fused plan's per-row (target(c_iy), dtarget/dc), 2 B f32, which its backward reads
    /// (so both passes use the same target); `None` for the naive plan.
    pub(crate) target: Option<CudaSlice<f32>>,
    /// Bytes of temporary device memory the forward allocated beyond its outputs (the crate's own
    /// accounting of every workspace buffer).
    pub workspace_bytes: usize,
    /// Whether the logits tiles ran on tensor cores: fused plan, tensor cores not switched off,
    /// 16-byte aligned inputs, and f16/bf16 with `D % 8 == 0` or f32 through TF32
    /// ([`F32Precision::Tf32`](super::F32Precision::Tf32)) with `D % 4 == 0`.
    pub tensor_cores: bool,
    /// Whether they ran on Hopper's wgmma (kernels/logits_wg.cu; a benchmark-only kernel
    /// override, on an sm_90 device).
    pub wgmma: bool,
    /// The kernels that ran, in launch order: entry points without their dtype suffix (as in
    /// [`ENTRY_POINTS`](super::ENTRY_POINTS); [`entry_name`](super::entry_name) gives the full
    /// name). The naive plan's cuBLAS products are not kernels of this crate and are not listed.
    pub kernels: Vec<String>,
    pub(super) spec: MarginLoss,
    pub(super) shape: Shape,
    pub(super) dtype: DType,
    pub(super) plan: Plan,
    pub(super) labels: LabelState,
    pub(super) stream: Arc<CudaStream>,
}

impl GpuForward {
    /// Ok when the labels were valid. Under [`LabelCheck::Host`] that was checked before the
    /// launch and this costs nothing; under [`LabelCheck::Device`] it copies the device's label
    /// status to the host (synchronizes the stream) and returns the
    /// [`Error::LabelOutOfRange`](crate::Error::LabelOutOfRange) it reports.
    pub fn check(&self) -> Result<()> {
        self.counted().map(|_| ())
    }

    /// Copies the reduced loss to the host (synchronizes the stream). Checks the labels first
    /// ([`Self::check`]).
    pub fn loss_host(&self) -> Result<f32> {
        self.check()?;
        let v = self
            .stream
            .clone_dtoh(&self.loss)
            .map_err(|e| cuda_err("copy loss to host", e))?;
        Ok(v[0])
    }

    /// Copies the per-row losses to the host (synchronizes the stream). Checks the labels first.
    pub fn row_loss_host(&self) -> Result<Vec<f32>> {
        self.check()?;
        self.stream
            .clone_dtoh(&self.row_loss)
            .map_err(|e| cuda_err("copy row losses to host", e))
    }

    /// Copies the per-row logsumexps to the host (synchronizes the stream). Checks the labels
    /// first.
    pub fn lse_host(&self) -> Result<Vec<f32>> {
        self.check()?;
        self.stream
            .clone_dtoh(&self.lse)
            .map_err(|e| cuda_err("copy lse to host", e))
    }

    /// The number of rows that count (label >= 0). Under [`LabelCheck::Device`] it is known on
    /// the device only: this copies the label status (synchronizes the stream) and returns the
    /// label error it reports, if any.
    pub fn counted(&self) -> Result<usize> {
        match &self.labels {
            LabelState::Host { counted, .. } => Ok(*counted),
            LabelState::Device(status) => {
                Ok(labels::read_status(&self.stream, status, self.shape)?.counted)
            }
        }
    }

    /// How this forward checked its labels.
    pub fn label_check(&self) -> LabelCheck {
        match self.labels {
            LabelState::Host { .. } => LabelCheck::Host,
            LabelState::Device(_) => LabelCheck::Device,
        }
    }

    /// The loss this result was computed for (the backward uses it).
    pub fn spec(&self) -> &MarginLoss {
        &self.spec
    }

    /// The shape this result was computed for (the backward uses it).
    pub fn shape(&self) -> Shape {
        self.shape
    }
}

/// Gradients on the device, in the input dtype `O = T` or in f32 (see
/// [`FusedMarginLoss::backward_f32`](super::FusedMarginLoss::backward_f32)).
#[derive(Debug)]
pub struct GpuGradients<O> {
    /// `dloss/dx`, B x D row-major.
    pub dx: CudaSlice<O>,
    /// `dloss/dw`, C x D row-major.
    pub dw: CudaSlice<O>,
    /// Bytes of temporary device memory the backward allocated beyond the gradients.
    pub workspace_bytes: usize,
    /// True when the tensor-core backward (kernels/grad_tc.cu) computed these gradients.
    pub tensor_cores: bool,
    /// The kernels that ran, in launch order (as [`GpuForward::kernels`]).
    pub kernels: Vec<String>,
    /// Under [`LabelCheck::Device`]: the backward's label status and the shape, for
    /// [`Self::check`].
    pub(super) label_status: Option<(CudaSlice<i64>, Arc<CudaStream>, Shape)>,
}

impl<O> GpuGradients<O> {
    /// Ok when the backward's labels were valid and the forward's. Under [`LabelCheck::Host`]
    /// that was checked before the launch and this costs nothing; under [`LabelCheck::Device`] it
    /// copies the device's label status to the host (synchronizes the stream) and returns the
    /// [`Error::LabelOutOfRange`](crate::Error::LabelOutOfRange) or
    /// [`Error::ForwardMismatch`](crate::Error::ForwardMismatch) it reports (the gradients are
    /// then NaN).
    pub fn check(&self) -> Result<()> {
        match &self.label_status {
            None => Ok(()),
            Some((status, stream, shape)) => {
                labels::read_status(stream, status, *shape).map(|_| ())
            }
        }
    }
}
