//! The raw entry, for frameworks other than candle (burn, tch, custom engines): device pointers,
//! lengths, a dtype and a `CUstream` in; the loss and the gradients written into buffers the
//! caller owns. Nothing here allocates memory the caller sees or frees memory the caller owns.
//!
//! ```no_run
//! use fused_margin::cuda::raw::{self, RawBuffer, RawForwardOut, RawGradOut, RawInputs, RawUpstream};
//! use fused_margin::{DType, MarginLoss, Shape};
//! # fn main() -> Result<(), fused_margin::Error> {
//! # let (x_ptr, w_ptr, labels_ptr, loss_ptr, dx_ptr, dw_ptr) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
//! # let stream: raw::CUstream = std::ptr::null_mut();
//! // Device buffers owned by the framework, and the stream its work runs on.
//! let shape = Shape::new(512, 128, 10_000); // B, D, C
//! let inputs = RawInputs {
//!     x: RawBuffer::new(x_ptr, 512 * 128),       // B x D, bf16
//!     w: RawBuffer::new(w_ptr, 10_000 * 128),    // C x D, bf16
//!     labels: RawBuffer::new(labels_ptr, 512),   // B i32 (negative = ignored row)
//!     dtype: DType::BF16,
//!     shape,
//! };
//! let spec = MarginLoss::arcface(0.5);
//! let out = RawForwardOut { loss: Some(RawBuffer::new(loss_ptr, 1)), row_loss: None };
//! let grads = RawGradOut {
//!     dx: RawBuffer::new(dx_ptr, 512 * 128),
//!     dw: RawBuffer::new(dw_ptr, 10_000 * 128),
//!     dtype: DType::F32, // or DType::BF16, the input dtype
//! };
//! // SAFETY: the pointers are live allocations of the stated lengths on device 0, `stream`
//! // belongs to device 0's primary context, outputs overlap nothing, and nothing else touches
//! // these buffers until the work enqueued here has run (see the functions' "Safety").
//! let fwd = unsafe { raw::forward(0, stream, &spec, &inputs, &out)? };
//! // The backward takes the spec from the forward's result.
//! unsafe { raw::backward(0, stream, &fwd, &inputs, RawUpstream::ONE, &grads)? };
//! # Ok(()) }
//! ```
//!
//! Every argument is checked before any driver call (dtype, shape, lengths against the shape, null
//! and misaligned pointers, outputs overlapping any other buffer passed, the upstream kind against
//! the reduction; the same checks are public and safe as [`check_forward`], [`check_backward`],
//! [`check_forward_backward`]), and the stream is checked to belong to device `ordinal`'s primary
//! context. What cannot be checked is the contract in each function's "Safety" section.
//!
//! Costs: the kernels write the loss, the row losses and the gradients straight into the caller's
//! outputs (through [`FusedMarginLoss::forward_into`] and
//! [`backward_into`](FusedMarginLoss::backward_into)): nothing is copied after them. A handle
//! per (device, stream handle value) is created on first use and kept for the process,
//! so kernels are loaded once per stream; a framework that creates streams without bound should
//! reuse a few.

use super::libs;
use super::spans::{check_disjoint, Span};
use super::{CudaElement, DeviceUpstream, FusedMarginLoss, GpuForwardOut, GpuGradOut, GpuSaved};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::spec::{MarginLoss, Reduction, Shape};
use crate::variant::{LossState, RowInputs};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::{bf16, f16};
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex, OnceLock};

pub use cudarc::driver::sys::{CUdeviceptr, CUstream};

/// A device buffer the caller owns: a `CUdeviceptr` and its length in elements (not bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawBuffer {
    /// The device address of the first element.
    pub ptr: CUdeviceptr,
    /// The number of elements.
    pub len: usize,
}

impl RawBuffer {
    /// A buffer of `len` elements at `ptr`.
    pub fn new(ptr: CUdeviceptr, len: usize) -> Self {
        Self { ptr, len }
    }
}

/// The inputs: `x` (B x D) and `w` (C x D; C K x D, class-major, for sub-center ArcFace with K
/// sub-centers) row-major of `dtype` (f32, f16 or bf16), and `labels` (B `i32`, `0 <= y < C`,
/// negative = ignored row).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RawInputs {
    /// Embeddings, `B*D` elements of `dtype`.
    pub x: RawBuffer,
    /// Class weights, `C*D` elements of `dtype` (`C*K*D` with sub-centers).
    pub w: RawBuffer,
    /// Labels, `B` elements of `i32`.
    pub labels: RawBuffer,
    /// The element type of `x` and `w`.
    pub dtype: DType,
    /// The problem size.
    pub shape: Shape,
}

/// Where [`forward`] writes its results (f32 device buffers; `None` skips one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RawForwardOut {
    /// One f32: the reduced loss (for `Reduction::None`, the sum of the row losses).
    pub loss: Option<RawBuffer>,
    /// B f32: the per-row losses `l_i` (0 for ignored rows).
    pub row_loss: Option<RawBuffer>,
}

/// Where the backward writes `dx` (B x D) and `dw` (as `w`), in `dtype`: the input dtype, or f32
/// for any input dtype (accumulation is f32 either way; f32 skips the final rounding).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RawGradOut {
    /// `dloss/dx`, `B*D` elements of `dtype`.
    pub dx: RawBuffer,
    /// `dloss/dw`, `C*D` elements of `dtype` (`C*K*D` with sub-centers).
    pub dw: RawBuffer,
    /// The inputs' dtype or `DType::F32`.
    pub dtype: DType,
}

/// The upstream gradient `dObjective/dloss`: `RawUpstream::Scalar(g)` for `Reduction::Mean` and
/// `Reduction::Sum` (usually 1: [`DeviceUpstream::ONE`]), `RawUpstream::PerRow(buffer)` of B f32
/// on the device for `Reduction::None`. The same enum as the handle's
/// [`GpuUpstream`](super::GpuUpstream), with the per-row buffer given as a raw pointer.
pub type RawUpstream = DeviceUpstream<RawBuffer>;

/// What [`forward`] keeps for [`backward`]: per-row logsumexp and the norms (`O(B + C)` floats,
/// in device memory this crate owns, allocated on the forward's stream and freed on it when this
/// value is dropped), and the loss or the row losses where the caller gave no buffer for them.
#[derive(Debug)]
pub struct RawForward {
    fwd: GpuSaved,
    ordinal: usize,
    stream: usize,
    dtype: DType,
}

impl RawForward {
    /// Copies the reduced loss to the host (synchronizes the stream) when [`forward`] wrote it
    /// into this crate's memory, i.e. when [`RawForwardOut::loss`] was `None`. When the caller
    /// gave a loss buffer the loss is only there (written in place, not copied), and this is an
    /// [`Error::Unsupported`] saying so: read the caller's buffer after the stream has run.
    pub fn loss_host(&self) -> Result<f32> {
        self.fwd.loss_host()
    }

    /// The number of rows that count (label >= 0). (Raw entry points check labels on the host,
    /// before the launch; the `Result` is [`GpuSaved::counted`]'s.)
    pub fn counted(&self) -> Result<usize> {
        self.fwd.counted()
    }

    /// The shape the forward ran with.
    pub fn shape(&self) -> Shape {
        self.fwd.shape()
    }

    /// The loss the forward computed (the backward uses it).
    pub fn spec(&self) -> &MarginLoss {
        self.fwd.spec()
    }

    /// The state out of AdaFace or CurricularFace (copied to the host: synchronizes the
    /// stream), `None` for the losses without state; see
    /// [`GpuSaved::state`](super::GpuSaved::state).
    pub fn state(&self) -> Result<Option<LossState>> {
        self.fwd.state()
    }
}

/// Forward pass (docs/MATH.md "Forward") on the caller's buffers and stream. The kernels write
/// the loss and/or the per-row losses straight into `out` (no copy), and the call returns what
/// [`backward`] needs.
///
/// # Safety
///
/// The caller guarantees, for the pointers in `inputs` and `out`:
/// - each is a live device allocation of device `ordinal`, valid for `len` elements of its type
///   (`inputs.dtype` for `x` and `w`, `i32` for `labels`, `f32` for the outputs; outputs valid
///   for writes by the kernels this call enqueues), and `labels` holds initialized values;
/// - the buffers stay allocated, the inputs unmodified and the outputs neither read nor written
///   by anything else, until the work this call enqueues on `stream` has completed: order other
///   work after it on `stream` (or wait for an event recorded there after this call);
/// - the outputs overlap no other buffer passed (checked for the buffers passed here, but not
///   against memory the caller does not pass).
///
/// And for `stream`:
/// - it is a live stream of device `ordinal`'s primary context (the context the CUDA runtime API
///   uses, as PyTorch, JAX, candle and most frameworks do), or one of the special handles
///   (null: the legacy default stream; `CU_STREAM_PER_THREAD`), and checked to be;
/// - it stays alive until the returned [`RawForward`] is dropped (dropping it frees this crate's
///   buffers on that stream) and, as this crate keeps a handle per stream value, it is not
///   passed again after it is destroyed unless the value now names another live stream.
///
/// The calling thread's current context is set to device `ordinal`'s primary context. The labels
/// are copied to the host to be checked before any launch, so the call waits for work already
/// on `stream`. An error returned after the launches began (a failed launch) may leave the
/// outputs partly written.
pub unsafe fn forward(
    ordinal: usize,
    stream: CUstream,
    spec: &MarginLoss,
    inputs: &RawInputs,
    out: &RawForwardOut,
) -> Result<RawForward> {
    // SAFETY: forwarded from this function's contract.
    unsafe { forward_with(ordinal, stream, spec, inputs, &RowInputs::default(), out) }
}

/// [`forward`] for a loss that takes per-row inputs or state (as
/// [`FusedMarginLoss::forward_with`]): AdaFace's or CurricularFace's state in `rows.state`
/// (its update is [`RawForward::state`]), ElasticFace's margins in `rows.margins` (host values
/// or the generator's seed and step). The other losses take `RowInputs::default()`, which is
/// [`forward`].
///
/// # Safety
///
/// [`forward`]'s contract.
pub unsafe fn forward_with(
    ordinal: usize,
    stream: CUstream,
    spec: &MarginLoss,
    inputs: &RawInputs,
    rows: &RowInputs<'_>,
    out: &RawForwardOut,
) -> Result<RawForward> {
    check_forward_with(spec, inputs, rows, out)?;
    let gpu = handle(ordinal, stream)?;
    // SAFETY: forwarded from this function's contract; the checks above hold.
    let fwd = unsafe {
        match inputs.dtype {
            DType::F32 => forward_typed::<f32>(&gpu, spec, inputs, rows, out)?,
            DType::F16 => forward_typed::<f16>(&gpu, spec, inputs, rows, out)?,
            DType::BF16 => forward_typed::<bf16>(&gpu, spec, inputs, rows, out)?,
            DType::F64 => return Err(unsupported_dtype(inputs.dtype)),
        }
    };
    Ok(RawForward {
        fwd,
        ordinal,
        stream: stream as usize,
        dtype: inputs.dtype,
    })
}

/// Backward pass (docs/MATH.md "Backward"): the kernels write `dx` and `dw` straight into `out`
/// (no copy), from `fwd` (returned by
/// [`forward`] for the same inputs, device and stream), with the forward's spec
/// ([`RawForward::spec`]).
///
/// # Safety
///
/// The contract of [`forward`], for the pointers in `inputs`, `out` (of `out.dtype`) and a
/// `RawUpstream::PerRow` buffer (B f32), on the same `ordinal` and `stream` as `fwd`'s forward;
/// `x`, `w` and `labels` hold the values the forward saw.
pub unsafe fn backward(
    ordinal: usize,
    stream: CUstream,
    fwd: &RawForward,
    inputs: &RawInputs,
    upstream: RawUpstream,
    out: &RawGradOut,
) -> Result<()> {
    check_backward(fwd.spec(), inputs, upstream, out)?;
    if fwd.ordinal != ordinal
        || fwd.stream != stream as usize
        || fwd.dtype != inputs.dtype
        || fwd.shape() != inputs.shape
    {
        return Err(Error::ForwardMismatch {
            detail: format!(
                "forward ran on device {} stream {:#x} with {:?} inputs of {:?}, backward is on \
                 device {ordinal} stream {:#x} with {:?} inputs of {:?}",
                fwd.ordinal,
                fwd.stream,
                fwd.dtype,
                fwd.shape(),
                stream as usize,
                inputs.dtype,
                inputs.shape
            ),
        });
    }
    let gpu = handle(ordinal, stream)?;
    // SAFETY: forwarded from this function's contract; the checks above hold.
    unsafe {
        match inputs.dtype {
            DType::F32 => backward_typed::<f32>(&gpu, &fwd.fwd, inputs, upstream, out),
            DType::F16 => backward_typed::<f16>(&gpu, &fwd.fwd, inputs, upstream, out),
            DType::BF16 => backward_typed::<bf16>(&gpu, &fwd.fwd, inputs, upstream, out),
            DType::F64 => Err(unsupported_dtype(inputs.dtype)),
        }
    }
}

/// [`forward`] then [`backward`] in one call, for engines that take the loss and the gradients
/// together (the saved statistics are dropped at the end).
///
/// # Safety
///
/// The contracts of [`forward`] and [`backward`] together; all outputs (`fwd_out`'s and
/// `grad_out`'s) overlap no other buffer.
pub unsafe fn forward_backward(
    ordinal: usize,
    stream: CUstream,
    spec: &MarginLoss,
    inputs: &RawInputs,
    upstream: RawUpstream,
    fwd_out: &RawForwardOut,
    grad_out: &RawGradOut,
) -> Result<()> {
    check_forward_backward(spec, inputs, upstream, fwd_out, grad_out)?;
    // SAFETY: forwarded from this function's contract.
    let fwd = unsafe { forward(ordinal, stream, spec, inputs, fwd_out)? };
    // SAFETY: as above; `fwd` came from this stream and device.
    unsafe { backward(ordinal, stream, &fwd, inputs, upstream, grad_out) }
}

/// The checks [`forward`] makes before any driver call, as a safe function: the spec, the shape,
/// the dtype, every buffer's length against the shape, null and misaligned pointers, outputs
/// overlapping another buffer passed, and that the loss needs no per-row inputs (AdaFace,
/// CurricularFace and ElasticFace go through [`forward_with`]). It reads no memory.
pub fn check_forward(spec: &MarginLoss, inputs: &RawInputs, out: &RawForwardOut) -> Result<()> {
    check_forward_with(spec, inputs, &RowInputs::default(), out)
}

/// The checks [`forward_with`] makes before any driver call: [`check_forward`]'s, with the
/// per-row inputs checked against the loss ([`crate::Variant::check_inputs`]).
pub fn check_forward_with(
    spec: &MarginLoss,
    inputs: &RawInputs,
    rows: &RowInputs<'_>,
    out: &RawForwardOut,
) -> Result<()> {
    check_inputs(spec, inputs)?;
    spec.variant.check_inputs(rows, inputs.shape.b)?;
    check_forward_out(inputs, out)
}

/// The checks [`backward`] makes before any driver call (as [`check_forward`], plus the
/// gradient dtype and the upstream kind against the reduction).
pub fn check_backward(
    spec: &MarginLoss,
    inputs: &RawInputs,
    upstream: RawUpstream,
    out: &RawGradOut,
) -> Result<()> {
    check_inputs(spec, inputs)?;
    check_grad_out(spec, inputs, upstream, out)
}

/// The checks [`forward_backward`] makes before any driver call: both of the above, and no
/// overlap between the forward's outputs and the gradients.
pub fn check_forward_backward(
    spec: &MarginLoss,
    inputs: &RawInputs,
    upstream: RawUpstream,
    fwd_out: &RawForwardOut,
    grad_out: &RawGradOut,
) -> Result<()> {
    check_forward(spec, inputs, fwd_out)?;
    check_backward(spec, inputs, upstream, grad_out)?;
    let mut outs = forward_outputs(fwd_out);
    outs.extend(grad_outputs(grad_out));
    check_disjoint(&[], &outs)
}

fn unsupported_dtype(dtype: DType) -> Error {
    Error::Unsupported {
        detail: format!("{dtype:?} inputs: the kernels take f32, f16, bf16"),
    }
}

fn invalid(what: &'static str, detail: String) -> Error {
    Error::InvalidArgument { what, detail }
}

/// A buffer with its name and element size, for the pointer checks.
fn named(what: &'static str, buf: RawBuffer, elem: usize) -> Span {
    Span {
        what,
        ptr: buf.ptr,
        len: buf.len,
        elem,
    }
}

/// Checks a pointer: not null, aligned to its element size, its length as expected.
fn check_buffer(b: Span, expected: usize) -> Result<()> {
    if b.len != expected {
        return Err(Error::Length {
            what: b.what,
            expected,
            got: b.len,
        });
    }
    if b.ptr == 0 {
        return Err(invalid(b.what, "null device pointer".into()));
    }
    if b.ptr % b.elem as u64 != 0 {
        return Err(invalid(
            b.what,
            format!(
                "pointer {:#x} is not aligned to its {}-byte elements",
                b.ptr, b.elem
            ),
        ));
    }
    b.bytes().map(|_| ())
}

fn input_buffers(inputs: &RawInputs) -> Result<[Span; 3]> {
    let elem = match inputs.dtype {
        DType::F32 | DType::F16 | DType::BF16 => inputs.dtype.size(),
        DType::F64 => return Err(unsupported_dtype(inputs.dtype)),
    };
    Ok([
        named("x", inputs.x, elem),
        named("w", inputs.w, elem),
        named("labels", inputs.labels, 4),
    ])
}

fn check_inputs(spec: &MarginLoss, inputs: &RawInputs) -> Result<()> {
    spec.validate()?;
    let s = inputs.shape;
    s.validate()?;
    if s.d > i32::MAX as usize {
        return Err(Error::TooLarge {
            what: "shape",
            detail: format!("D = {} must be < 2^31", s.d),
        });
    }
    let [x, w, labels] = input_buffers(inputs)?;
    check_buffer(x, s.b * s.d)?;
    check_buffer(w, w_len(spec, s)?)?;
    check_buffer(labels, s.b)
}

/// `w`'s (and `dw`'s) elements: `C*D`, or `C*K*D` with sub-centers.
fn w_len(spec: &MarginLoss, s: Shape) -> Result<usize> {
    let k = spec.variant.centers();
    s.c.checked_mul(k)
        .and_then(|r| r.checked_mul(s.d))
        .ok_or_else(|| Error::TooLarge {
            what: "w",
            detail: format!("C*K*D = {}*{k}*{} overflows usize", s.c, s.d),
        })
}

fn forward_outputs(out: &RawForwardOut) -> Vec<Span> {
    let mut v = Vec::new();
    if let Some(buf) = out.loss {
        v.push(named("loss", buf, 4));
    }
    if let Some(buf) = out.row_loss {
        v.push(named("row_loss", buf, 4));
    }
    v
}

fn grad_outputs(out: &RawGradOut) -> Vec<Span> {
    let elem = out.dtype.size();
    vec![named("dx", out.dx, elem), named("dw", out.dw, elem)]
}

fn check_forward_out(inputs: &RawInputs, out: &RawForwardOut) -> Result<()> {
    let outs = forward_outputs(out);
    for o in &outs {
        let expected = if o.what == "loss" { 1 } else { inputs.shape.b };
        check_buffer(*o, expected)?;
    }
    check_disjoint(&input_buffers(inputs)?, &outs)
}

fn check_grad_out(
    spec: &MarginLoss,
    inputs: &RawInputs,
    upstream: RawUpstream,
    out: &RawGradOut,
) -> Result<()> {
    if out.dtype != inputs.dtype && out.dtype != DType::F32 {
        return Err(Error::Unsupported {
            detail: format!(
                "gradients of {:?} for {:?} inputs: the input dtype or F32",
                out.dtype, inputs.dtype
            ),
        });
    }
    let s = inputs.shape;
    let outs = grad_outputs(out);
    check_buffer(outs[0], s.b * s.d)?;
    check_buffer(outs[1], w_len(spec, s)?)?;
    let mut reads = input_buffers(inputs)?.to_vec();
    match (upstream, spec.reduction) {
        (RawUpstream::Scalar(v), Reduction::Mean | Reduction::Sum) => {
            crate::spec::check_upstream_value(v as f64, "scalar upstream")?;
        }
        (RawUpstream::PerRow(buf), Reduction::None) => {
            let g = named("upstream", buf, 4);
            check_buffer(g, s.b)?;
            reads.push(g);
        }
        (RawUpstream::Scalar(_), Reduction::None) => {
            return Err(Error::Upstream {
                detail: "reduction none takes RawUpstream::PerRow (B values), got a scalar".into(),
            })
        }
        (RawUpstream::PerRow(b), r) => {
            return Err(Error::Upstream {
                detail: format!(
                    "reduction {r:?} takes RawUpstream::Scalar, got PerRow ({} values)",
                    b.len
                ),
            })
        }
    }
    check_disjoint(&reads, &outs)
}

/// One context per device, and one handle per stream handle value on it.
struct DeviceEntry {
    ctx: Arc<CudaContext>,
    handles: HashMap<usize, Arc<FusedMarginLoss>>,
}

/// The handle for `stream` on device `ordinal`, after checking the device and that the stream
/// belongs to its primary context.
///
/// # Safety
/// `stream` is a live stream handle (or a special one), as in [`forward`]'s contract.
unsafe fn handle(ordinal: usize, stream: CUstream) -> Result<Arc<FusedMarginLoss>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, DeviceEntry>>> = OnceLock::new();
    if !libs::driver_present() {
        return Err(Error::NoDevice {
            reason: "libcuda (the NVIDIA driver library) was not found".into(),
        });
    }
    let count = CudaContext::device_count().map_err(|e| Error::NoDevice {
        reason: format!("cannot count CUDA devices: {e:?}"),
    })?;
    if ordinal >= count.max(0) as usize {
        return Err(Error::NoDevice {
            reason: format!("device ordinal {ordinal} does not exist ({count} devices)"),
        });
    }
    let mut devices = DEVICES
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let entry = match devices.entry(ordinal) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => {
            let ctx = CudaContext::new(ordinal).map_err(|e| Error::NoDevice {
                reason: format!("cannot open CUDA device {ordinal}: {e:?}"),
            })?;
            // SAFETY: every buffer this context's slices touch is used on one stream per call
            // (the caller's), and ordering against the caller's other streams is the caller's
            // side of the contract, so cudarc's cross-stream events would only cost driver calls.
            unsafe { ctx.disable_event_tracking() };
            v.insert(DeviceEntry {
                ctx,
                handles: HashMap::new(),
            })
        }
    };
    let ctx = entry.ctx.clone();
    ctx.bind_to_thread()
        .map_err(|e| super::cuda_err("make the device's primary context current", e))?;
    let mut owner: cudarc::driver::sys::CUcontext = std::ptr::null_mut();
    // SAFETY: `stream` is a live (or special) stream handle by the caller's contract; the driver
    // writes one context handle.
    unsafe { cudarc::driver::sys::cuStreamGetCtx(stream, &mut owner) }
        .result()
        .map_err(|e| {
            invalid(
                "stream",
                format!("cuStreamGetCtx({:#x}) failed: {e:?}", stream as usize),
            )
        })?;
    if owner != ctx.cu_ctx() {
        return Err(invalid(
            "stream",
            format!(
                "stream {:#x} belongs to context {:#x}, not to device {ordinal}'s primary \
                 context {:#x}",
                stream as usize,
                owner as usize,
                ctx.cu_ctx() as usize
            ),
        ));
    }
    if let Some(h) = entry.handles.get(&(stream as usize)) {
        return Ok(h.clone());
    }
    // SAFETY: the stream belongs to this context (checked) and stays alive while it is used
    // (the caller's contract); the wrapper never destroys it.
    let borrowed = unsafe { ctx.wrap_borrowed_stream(stream) };
    // Labels checked on the host: the raw backward returns no result object that could report
    // a bad label later, so each call reports it itself (and waits for the stream to do so).
    let options = super::Options {
        label_check: super::LabelCheck::Host,
        ..Default::default()
    };
    let h = Arc::new(FusedMarginLoss::with_options(borrowed, options)?);
    entry.handles.insert(stream as usize, h.clone());
    Ok(h)
}

/// A caller's buffer as a `CudaSlice` that is never freed: dropping it gives the pointer back
/// (`CudaSlice::leak`) instead of freeing it, on every path out, unwinding included.
struct Borrowed<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
}

impl<T> Borrowed<T> {
    /// # Safety
    /// `buf.ptr` is valid for `buf.len` elements of `T` on `stream`'s context for as long as this
    /// value and the work enqueued on it exist (the public functions' contract).
    unsafe fn new(stream: &Arc<CudaStream>, buf: RawBuffer) -> Self {
        Self {
            // SAFETY: as above; the memory holds valid `T` values (inputs) or is only written
            // (outputs) by the caller's contract.
            slice: ManuallyDrop::new(unsafe { stream.upgrade_device_ptr(buf.ptr, buf.len) }),
        }
    }
}

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        // SAFETY: `slice` is taken exactly once, here, and not used afterwards.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        // The caller owns the memory: hand the pointer back instead of freeing it.
        let _ = slice.leak();
    }
}

impl<T> std::ops::Deref for Borrowed<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> std::ops::DerefMut for Borrowed<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

/// # Safety
/// [`forward`]'s contract, with `inputs.dtype` the dtype of `T`.
unsafe fn forward_typed<T: CudaElement>(
    gpu: &FusedMarginLoss,
    spec: &MarginLoss,
    inputs: &RawInputs,
    row_inputs: &RowInputs<'_>,
    out: &RawForwardOut,
) -> Result<GpuSaved> {
    let s = gpu.stream();
    // SAFETY: forwarded from `forward`'s contract.
    let (x, w, labels) = unsafe {
        (
            Borrowed::<T>::new(s, inputs.x),
            Borrowed::<T>::new(s, inputs.w),
            Borrowed::<i32>::new(s, inputs.labels),
        )
    };
    // SAFETY: forwarded; the outputs are f32 buffers of the checked lengths (1, B), valid for
    // the kernels' writes, overlapping nothing else passed (checked).
    let (mut loss, mut rows) = unsafe {
        (
            out.loss.map(|b| Borrowed::<f32>::new(s, b)),
            out.row_loss.map(|b| Borrowed::<f32>::new(s, b)),
        )
    };
    gpu.forward_into_with(
        spec,
        &x.as_view(),
        &w.as_view(),
        &labels.as_view(),
        inputs.shape,
        row_inputs,
        GpuForwardOut {
            loss: loss.as_mut().map(|b| b.as_view_mut()),
            row_loss: rows.as_mut().map(|b| b.as_view_mut()),
        },
    )
}

/// # Safety
/// [`backward`]'s contract, with `inputs.dtype` the dtype of `T`.
unsafe fn backward_typed<T: CudaElement>(
    gpu: &FusedMarginLoss,
    fwd: &GpuSaved,
    inputs: &RawInputs,
    upstream: RawUpstream,
    out: &RawGradOut,
) -> Result<()> {
    let s = gpu.stream();
    // SAFETY: forwarded from `backward`'s contract.
    let (x, w, labels) = unsafe {
        (
            Borrowed::<T>::new(s, inputs.x),
            Borrowed::<T>::new(s, inputs.w),
            Borrowed::<i32>::new(s, inputs.labels),
        )
    };
    let (xv, wv, lv) = (x.as_view(), w.as_view(), labels.as_view());
    // The per-row buffer borrowed as a view, then the same upstream with the view in it.
    let g: Borrowed<f32>;
    let gv;
    let up = match upstream {
        DeviceUpstream::Scalar(v) => DeviceUpstream::Scalar(v),
        DeviceUpstream::PerRow(buf) => {
            // SAFETY: forwarded; a per-row upstream is B f32 (checked).
            g = unsafe { Borrowed::<f32>::new(s, buf) };
            gv = g.as_view();
            DeviceUpstream::PerRow(&gv)
        }
    };
    // The gradients go straight into the caller's dx and dw.
    if out.dtype == T::DTYPE {
        // SAFETY: forwarded; `out.dtype` is T's, the lengths are B*D and w's (checked), valid
        // for the kernels' writes, overlapping nothing else passed (checked).
        let (mut dx, mut dw) =
            unsafe { (Borrowed::<T>::new(s, out.dx), Borrowed::<T>::new(s, out.dw)) };
        let views = GpuGradOut {
            dx: dx.as_view_mut(),
            dw: dw.as_view_mut(),
        };
        gpu.backward_into::<T>(fwd, &xv, &wv, &lv, up, views)?;
    } else {
        // SAFETY: as above, with `out.dtype` F32 (check_grad_out allows only T's dtype or F32).
        let (mut dx, mut dw) = unsafe {
            (
                Borrowed::<f32>::new(s, out.dx),
                Borrowed::<f32>::new(s, out.dw),
            )
        };
        let views = GpuGradOut {
            dx: dx.as_view_mut(),
            dw: dw.as_view_mut(),
        };
        gpu.backward_f32_into::<T>(fwd, &xv, &wv, &lv, up, views)?;
    }
    Ok(())
}
