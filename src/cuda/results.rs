//! What the GPU calls take and give back besides the inputs: the upstream gradient
//! ([`DeviceUpstream`]), the caller's output views of the `*_into` calls ([`GpuForwardOut`],
//! [`GpuGradOut`]), what a forward keeps for its backward ([`GpuSaved`]) and what a backward ran
//! ([`GpuBackwardRun`]), and the allocating calls' results ([`GpuForward`], [`GpuGradients`]),
//! with their host copies and label checks.

use super::labels::{self, LabelCheck, LabelState};
use super::launch::cuda_err;
use super::options::Plan;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::spec::{MarginLoss, Shape};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
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

/// Where [`FusedMarginLoss::forward_into`](super::FusedMarginLoss::forward_into) writes: views
/// of f32 device memory the caller owns, on the handle's device. An output left `None` is
/// written into a buffer of this crate's, kept by the returned [`GpuSaved`] (read it with
/// [`GpuSaved::loss_host`], [`GpuSaved::row_loss_host`]).
#[derive(Debug, Default)]
pub struct GpuForwardOut<'a> {
    /// One f32: the reduced loss (for `Reduction::None`, the sum of the row losses).
    pub loss: Option<CudaViewMut<'a, f32>>,
    /// B f32: the per-row losses `l_i` (0 for ignored rows).
    pub row_loss: Option<CudaViewMut<'a, f32>>,
}

/// Where [`FusedMarginLoss::backward_into`](super::FusedMarginLoss::backward_into) (`O` = the
/// input dtype) and [`backward_f32_into`](super::FusedMarginLoss::backward_f32_into) (`O` = f32)
/// write the gradients: views of device memory the caller owns, on the handle's device, disjoint
/// from each other and from the inputs. Two views of one buffer work (e.g. `split_at_mut`).
#[derive(Debug)]
pub struct GpuGradOut<'a, O> {
    /// `dloss/dx`: B x D row-major, exactly `B*D` elements.
    pub dx: CudaViewMut<'a, O>,
    /// `dloss/dw`: C x D row-major, exactly `C*D` elements (`C*K*D` with sub-centers).
    pub dw: CudaViewMut<'a, O>,
}

/// What a GPU forward keeps for its backward (per-row logsumexp, the norms, the target record,
/// the label status: `O(B + C)` floats in this crate's device memory), and what ran. Returned by
/// [`FusedMarginLoss::forward_into`](super::FusedMarginLoss::forward_into) and inside every
/// [`GpuForward`] (which dereferences to it); the backward takes it.
#[derive(Debug)]
pub struct GpuSaved {
    /// `logsumexp_j z_ij` per row: what backward recomputes the softmax from.
    pub lse: CudaSlice<f32>,
    /// `|x_i|` per row.
    pub x_norm: CudaSlice<f32>,
    /// `|w_j|` per class.
    pub w_norm: CudaSlice<f32>,
    /// The fused plan's per-row (target(c_iy), dtarget/dc), 2 B f32, which its backward reads
    /// (so both passes use the same target); `None` for the naive plan.
    pub(crate) target: Option<CudaSlice<f32>>,
    /// The caller's per-row margins `(m2_i, m3_i)` on the device (ElasticFace), which the naive
    /// backward reads again; `None` for the spec's margins.
    pub(crate) row_margins: Option<CudaSlice<f32>>,
    /// The per-row margins the device computed (AdaFace, ElasticFace+), which the naive
    /// backward reads again; `None` for the other losses.
    pub(crate) dev_margins: Option<CudaSlice<f32>>,
    /// The loss's state out on the device (AdaFace `(mean, std)`, CurricularFace `(t)`, as f64
    /// bit patterns; [`GpuSaved::state`] reads it); `None` for the losses without state.
    pub(crate) state_out: Option<CudaSlice<i64>>,
    /// The reduced loss when it was not written into a caller's view.
    pub(super) loss: Option<CudaSlice<f32>>,
    /// The per-row losses when they were not written into a caller's view.
    pub(super) row_loss: Option<CudaSlice<f32>>,
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
    /// A class-sharded forward's (`FusedMarginLoss::shard_forward`): labels local to the rank,
    /// checked on the host.
    pub(super) sharded: bool,
    /// Partial FC: the sampled classes (the kernels' `widx`) and the rows of `w` they index
    /// into (the rank's `num_local`).
    pub(super) widx: Option<(CudaSlice<i32>, usize)>,
    pub(super) stream: Arc<CudaStream>,
}

/// `what` (a loss this result does not hold) as the error of a host copy.
fn written_to_caller(what: &str) -> Error {
    Error::Unsupported {
        detail: format!(
            "this forward wrote the {what} into the caller's view (GpuForwardOut); read it there"
        ),
    }
}

impl GpuSaved {
    /// Ok when the labels were valid. Under [`LabelCheck::Host`] that was checked before the
    /// launch and this costs nothing; under [`LabelCheck::Device`] it copies the device's label
    /// status to the host (synchronizes the stream) and returns the
    /// [`Error::LabelOutOfRange`](crate::Error::LabelOutOfRange) it reports.
    pub fn check(&self) -> Result<()> {
        self.counted().map(|_| ())
    }

    /// Copies the reduced loss to the host (synchronizes the stream), when this crate holds it:
    /// [`GpuForward`] always does; after `forward_into` only when
    /// [`GpuForwardOut::loss`] was `None` (else it is an [`Error::Unsupported`] saying so: the
    /// loss is in the caller's view). Checks the labels first ([`Self::check`]).
    pub fn loss_host(&self) -> Result<f32> {
        let loss = self
            .loss
            .as_ref()
            .ok_or_else(|| written_to_caller("loss"))?;
        copy_loss(self, loss)
    }

    /// The loss's state out (AdaFace's `(mean, std)`, CurricularFace's `t`: the state in,
    /// updated by this call's counted rows), copied to the host (synchronizes the stream);
    /// `None` for the losses without state. Pass it as the next call's
    /// [`RowInputs::state`](crate::variant::RowInputs::state). The backward reads the device copy
    /// the forward used, never this one.
    pub fn state(&self) -> Result<Option<crate::variant::LossState>> {
        let Some(out) = &self.state_out else {
            return Ok(None);
        };
        let v = self
            .stream
            .clone_dtoh(out)
            .map_err(|e| cuda_err("copy the state out to host", e))?;
        Ok(super::plan::state_of(&self.spec, &v))
    }

    /// Copies the per-row losses to the host (synchronizes the stream), when this crate holds
    /// them (as [`Self::loss_host`]). Checks the labels first.
    pub fn row_loss_host(&self) -> Result<Vec<f32>> {
        let rows = self
            .row_loss
            .as_ref()
            .ok_or_else(|| written_to_caller("row losses"))?;
        copy_rows(self, rows)
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

fn copy_loss(saved: &GpuSaved, loss: &CudaSlice<f32>) -> Result<f32> {
    saved.check()?;
    let v = saved
        .stream
        .clone_dtoh(loss)
        .map_err(|e| cuda_err("copy loss to host", e))?;
    v.first().copied().ok_or(Error::Length {
        what: "loss",
        expected: 1,
        got: 0,
    })
}

fn copy_rows(saved: &GpuSaved, rows: &CudaSlice<f32>) -> Result<Vec<f32>> {
    saved.check()?;
    saved
        .stream
        .clone_dtoh(rows)
        .map_err(|e| cuda_err("copy row losses to host", e))
}

/// The result of a GPU forward ([`FusedMarginLoss::forward`](super::FusedMarginLoss::forward)):
/// the loss and the per-row losses on the device, in buffers of this crate's (copy them with
/// [`GpuForward::loss_host`], [`GpuForward::row_loss_host`]), and what the backward needs: it
/// dereferences to [`GpuSaved`] (`fwd.lse`, `fwd.kernels`, `fwd.check()`, ...).
#[derive(Debug)]
pub struct GpuForward {
    /// The reduced loss, one f32 (for `Reduction::None`: the sum of `row_loss`).
    pub loss: CudaSlice<f32>,
    /// `l_i` per row (0 for ignored rows).
    pub row_loss: CudaSlice<f32>,
    /// What the backward reads, and what ran.
    pub saved: GpuSaved,
}

impl std::ops::Deref for GpuForward {
    type Target = GpuSaved;
    fn deref(&self) -> &GpuSaved {
        &self.saved
    }
}

impl GpuForward {
    /// Copies the reduced loss to the host (synchronizes the stream). Checks the labels first
    /// ([`GpuSaved::check`]).
    pub fn loss_host(&self) -> Result<f32> {
        copy_loss(&self.saved, &self.loss)
    }

    /// Copies the per-row losses to the host (synchronizes the stream). Checks the labels first.
    pub fn row_loss_host(&self) -> Result<Vec<f32>> {
        copy_rows(&self.saved, &self.row_loss)
    }
}

/// What a GPU backward ran and its label check, without the gradients: returned by
/// [`FusedMarginLoss::backward_into`](super::FusedMarginLoss::backward_into) (the gradients are
/// in the caller's views) and inside every [`GpuGradients`] (which dereferences to it).
#[derive(Debug)]
pub struct GpuBackwardRun {
    /// Bytes of temporary device memory the backward allocated beyond the gradients.
    pub workspace_bytes: usize,
    /// True when the tensor-core backward (kernels/grad_tc.cu) computed these gradients.
    pub tensor_cores: bool,
    /// The kernels that ran, in launch order (as [`GpuSaved::kernels`]).
    pub kernels: Vec<String>,
    /// Under [`LabelCheck::Device`]: the backward's label status and the shape, for
    /// [`Self::check`].
    pub(super) label_status: Option<(CudaSlice<i64>, Arc<CudaStream>, Shape)>,
}

impl GpuBackwardRun {
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

/// Gradients on the device, in the input dtype `O = T` or in f32 (see
/// [`FusedMarginLoss::backward_f32`](super::FusedMarginLoss::backward_f32)), in buffers of this
/// crate's; dereferences to [`GpuBackwardRun`] (`grads.kernels`, `grads.check()`, ...).
#[derive(Debug)]
pub struct GpuGradients<O> {
    /// `dloss/dx`, B x D row-major.
    pub dx: CudaSlice<O>,
    /// `dloss/dw`, C x D row-major (C K x D with sub-centers).
    pub dw: CudaSlice<O>,
    /// What ran, and the label check.
    pub run: GpuBackwardRun,
}

impl<O> std::ops::Deref for GpuGradients<O> {
    type Target = GpuBackwardRun;
    fn deref(&self) -> &GpuBackwardRun {
        &self.run
    }
}
