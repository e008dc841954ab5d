//! The loss as a candle op with autograd (feature `candle`; the CUDA path with `candle-cuda`).
//!
//! ```
//! use candle_core::{DType, Device, Tensor, Var};
//! use fused_margin::{candle::margin_loss, MarginLoss};
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 8), &dev)?)?; // B x D embeddings
//! let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (10, 8), &dev)?)?; // C x D class weights
//! let labels = Tensor::new(&[3i64, 0, 9, -1], &dev)?; // -1: row ignored
//! let loss = margin_loss(x.as_tensor(), w.as_tensor(), &labels, &MarginLoss::arcface(0.5))?;
//! let grads = loss.backward()?;
//! assert_eq!(grads.get(x.as_tensor()).unwrap().dims(), &[4, 8]);
//! assert_eq!(grads.get(w.as_tensor()).unwrap().dims(), &[10, 8]);
//! # Ok(()) }
//! ```
//!
//! How it works: [`margin_loss`] checks and converts the arguments, then applies a `CustomOp3`
//! on `(x, w, labels)`. Its forward runs this crate's CPU reference (CPU tensors) or the fused
//! kernels on candle's own stream (CUDA tensors, feature `candle-cuda`) and keeps what the
//! backward needs (per-row logsumexp and norms: `O(B + C)`, never `B x C`) inside the op, which
//! candle's graph holds as long as the loss tensor lives. Its `bwd` applies a second op on the
//! same inputs that computes `dx` and `dw` together, on the same device as the forward, into one
//! buffer (`dx`, then `dw` at a 256-byte aligned offset) that it returns as one tensor; `bwd`
//! splits it into the two gradients with `narrow` and `reshape`, which share its storage (no
//! copy). On CUDA the kernels write both in place ([`FusedMarginLoss::backward_into`]) and the
//! forward's loss likewise ([`FusedMarginLoss::forward_into`]). Gradients are in the input
//! dtype; they are not themselves differentiable (no second-order gradients).
//!
//! [`FusedMarginLoss::backward_into`]: crate::cuda::FusedMarginLoss::backward_into
//! [`FusedMarginLoss::forward_into`]: crate::cuda::FusedMarginLoss::forward_into
//!
//! Loss dtype: the scalar loss of `Reduction::Mean` and `Reduction::Sum` is f32 for every input
//! dtype, as PyTorch's autocast computes losses in f32. The sum of B row losses outgrows f16
//! (65,504) quickly: ArcFace at s = 64 on 2,048 rows sums to about 125,000. The per-row losses
//! of `Reduction::None` keep the input dtype (each row is at most about `2 s + ln C`, which fits).

use crate::cpu;
use crate::cuda::Options;
use crate::dtype::Element;
use crate::error::Error;
use crate::spec::{MarginLoss, Reduction, Shape, Upstream};
use crate::variant::{ElasticMargins, ElasticRng, LossState, RowInputs};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Tensor, WithDType};
use half::{bf16, f16};
use std::sync::{Arc, Mutex, MutexGuard};

/// The margin-softmax loss of `spec` for embeddings `x` (B x D), class weights `w` (C x D) and
/// `labels` (B), as a candle tensor that takes part in autograd: `loss.backward()` gives
/// gradients for `x` and `w` (labels get none).
///
/// - `x` and `w`: rank 2, the same dtype (f32, f16 or bf16), contiguous (row-major), on the same
///   device. CPU tensors run this crate's f64 reference; CUDA tensors (feature `candle-cuda`) run
///   the fused kernels on the device's own candle stream.
/// - `labels`: rank 1, B integers of dtype `i64`, `i32`, `i16`, `u32` or `u8`, on the same device;
///   `0 <= y < C`, and a negative label (signed dtypes only) ignores its row (MATH.md). `i32`
///   labels are used as they are; the other dtypes are converted to `i32` through the host (one
///   copy of B integers each way).
/// - The result: for `Reduction::Mean` and `Reduction::Sum` a scalar of dtype **f32** whatever
///   the input dtype (the sum, accumulated in f64 on the CPU and f32 on CUDA, would overflow f16
///   beyond 65,504; PyTorch's autocast returns losses in f32 for the same reason); for
///   `Reduction::None` the B per-row losses in the dtype of `x` (ignored rows give 0). The
///   gradients `dx` and `dw` have the dtype of `x` and `w` either way.
///
/// Every bad argument is a candle error naming the values: a wrong rank or shape (with the shapes),
/// a non-contiguous tensor (with its shape and stride), mismatched dtypes or devices, a label out
/// of range (with its row, its value and C), a spec field out of range. On CUDA with the default
/// options the labels are checked on the device ([`crate::cuda::LabelCheck::Device`]): the forward
/// queues without waiting, a row with a label `>= C` makes the loss NaN, and the backward
/// reports the label error (row, label, C) before it runs; `LabelCheck::Host` in
/// [`margin_loss_with`]'s options makes the forward itself fail instead, at one synchronous copy
/// per call. A scalar upstream gradient is read back in the backward.
pub fn margin_loss(
    x: &Tensor,
    w: &Tensor,
    labels: &Tensor,
    spec: &MarginLoss,
) -> candle_core::Result<Tensor> {
    margin_loss_with(x, w, labels, spec, &Options::default())
}

/// [`margin_loss`] with the GPU path's [`Options`] (plan, tensor cores, TF32, label check, ...)
/// for CUDA tensors; CPU tensors run the f64 reference whatever the options. One
/// [`FusedMarginLoss`](crate::cuda::FusedMarginLoss) is kept per (device, options).
pub fn margin_loss_with(
    x: &Tensor,
    w: &Tensor,
    labels: &Tensor,
    spec: &MarginLoss,
    options: &Options,
) -> candle_core::Result<Tensor> {
    Ok(margin_loss_with_inputs(x, w, labels, spec, options, &RowInputs::default())?.0)
}

/// [`margin_loss_with`] for a loss that takes per-row inputs or carries state (as
/// [`crate::cpu::forward_with`]): AdaFace's and CurricularFace's state in (`inputs.state`),
/// ElasticFace's margins (`inputs.margins`: B host values, or the generator's seed and step).
/// Returns the loss and the state out (AdaFace, CurricularFace; `None` for the others), which the
/// next step passes in: the caller owns the state, so a run is reproducible and checkpoints it
/// with the weights. On CUDA the state out is copied to the host (it waits for the forward).
///
/// Sub-center ArcFace and MagFace need no inputs ([`margin_loss`] runs them); sub-center's `w` is
/// `C*K x D`, class-major (rows `jK .. jK + K - 1` are class `j`'s), and so is its gradient.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use fused_margin::candle::margin_loss_with_inputs;
/// use fused_margin::{cuda::Options, LossState, MarginLoss, RowInputs};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let x = Tensor::randn(0f32, 1.0, (4, 8), &dev)?;
/// let w = Tensor::randn(0f32, 1.0, (10, 8), &dev)?;
/// let labels = Tensor::new(&[3i64, 0, 9, 1], &dev)?;
/// let spec = MarginLoss::curricularface();
/// let mut state = LossState::CURRICULAR_INIT;
/// let (loss, out) = margin_loss_with_inputs(
///     &x, &w, &labels, &spec, &Options::default(), &RowInputs::with_state(state),
/// )?;
/// state = out.unwrap(); // t after this batch, for the next step
/// assert!(matches!(state, LossState::CurricularFace { .. }));
/// loss.backward()?;
/// # Ok(()) }
/// ```
pub fn margin_loss_with_inputs(
    x: &Tensor,
    w: &Tensor,
    labels: &Tensor,
    spec: &MarginLoss,
    options: &Options,
    inputs: &RowInputs<'_>,
) -> candle_core::Result<(Tensor, Option<LossState>)> {
    spec.validate().map_err(wrap)?;
    let shape = check_args(x, w, labels, spec.variant.centers())?;
    shape.validate().map_err(wrap)?;
    spec.variant.check_inputs(inputs, shape.b).map_err(wrap)?;
    let labels = labels_i32(labels, shape, x.device())?;
    let saved: SavedSlot = Arc::new(Mutex::new(None));
    let op = MarginOp {
        spec: *spec,
        shape,
        options: options.clone(),
        rows: OwnedRows::of(inputs),
        saved: saved.clone(),
    };
    let loss = x.apply_op3(w, &labels, op)?;
    // candle runs the op eagerly: its forward has filled the slot.
    let state = match &*lock(&saved) {
        Some(Saved::Cpu(f)) => f.state,
        #[cfg(feature = "candle-cuda")]
        Some(Saved::Cuda(f)) => f.state().map_err(wrap)?,
        None => None,
    };
    Ok((loss, state))
}

/// The per-row inputs, owned: the ops live in candle's graph after the call that made them (a
/// backward may recompute the forward from them).
#[derive(Debug, Clone, PartialEq)]
struct OwnedRows {
    state: Option<LossState>,
    margins: Option<OwnedMargins>,
}

#[derive(Debug, Clone, PartialEq)]
enum OwnedMargins {
    Given(Vec<f64>),
    Seeded(ElasticRng),
}

impl OwnedRows {
    fn of(r: &RowInputs<'_>) -> Self {
        Self {
            state: r.state,
            margins: r.margins.map(|m| match m {
                ElasticMargins::Given(v) => OwnedMargins::Given(v.to_vec()),
                ElasticMargins::Seeded(g) => OwnedMargins::Seeded(g),
            }),
        }
    }

    fn inputs(&self) -> RowInputs<'_> {
        RowInputs {
            state: self.state,
            margins: self.margins.as_ref().map(|m| match m {
                OwnedMargins::Given(v) => ElasticMargins::Given(v),
                OwnedMargins::Seeded(g) => ElasticMargins::Seeded(*g),
            }),
        }
    }
}

/// A margin-softmax head as a candle module: it owns the class weights (a `C x D` variable named
/// `weight` from a [`candle_nn::VarBuilder`], as candle-nn's `Linear` owns its own; `C*K x D`
/// for sub-center ArcFace) and gives the loss of embeddings and labels.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use fused_margin::candle::MarginHead;
/// use fused_margin::MarginLoss;
/// # fn main() -> candle_core::Result<()> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let head = MarginHead::new(vb.pp("arcface"), 10, 4, MarginLoss::arcface(0.5))?;
/// let emb = Tensor::randn(0f32, 1.0, (3, 4), &Device::Cpu)?;
/// let labels = Tensor::new(&[0i64, 7, 9], &Device::Cpu)?;
/// let loss = head.forward(&emb, &labels)?; // an f32 scalar with autograd to emb and weight
/// let grads = loss.backward()?;
/// assert!(grads.get(head.weight()).is_some());
/// assert_eq!(varmap.all_vars().len(), 1); // the optimizer sees the class weights
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MarginHead {
    weight: Tensor,
    spec: MarginLoss,
    options: Options,
}

impl MarginHead {
    /// A head for `classes` classes of `dim`-dimensional embeddings with loss `spec`; the weights
    /// are `vb`'s variable `weight` (`classes x dim`, or `classes*K x dim` with `K` sub-centers),
    /// initialized standard normal when new (the loss normalizes them; insightface starts from
    /// normal(0, 0.01), the same directions).
    pub fn new(
        vb: candle_nn::VarBuilder,
        classes: usize,
        dim: usize,
        spec: MarginLoss,
    ) -> candle_core::Result<Self> {
        spec.validate().map_err(wrap)?;
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        let rows = classes.checked_mul(spec.variant.centers()).ok_or_else(|| {
            msg(format!(
                "fused_margin::candle::MarginHead: {classes} classes x {} sub-centers overflow usize",
                spec.variant.centers()
            ))
        })?;
        let weight = vb.get_with_hints((rows, dim), "weight", init)?;
        Ok(Self {
            weight,
            spec,
            options: Options::default(),
        })
    }

    /// The same head with the GPU path's `options` (see [`margin_loss_with`]).
    pub fn with_options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }

    /// The class weights, `classes x dim` (`classes*K x dim` with sub-centers).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The loss spec.
    pub fn spec(&self) -> &MarginLoss {
        &self.spec
    }

    /// The loss of `embeddings` (`B x dim`, the weights' dtype and device) with `labels` (B
    /// integers; negative ignores a row): [`margin_loss_with`] against the head's weights.
    pub fn forward(&self, embeddings: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
        margin_loss_with(embeddings, &self.weight, labels, &self.spec, &self.options)
    }

    /// [`Self::forward`] for a loss with per-row inputs or state: [`margin_loss_with_inputs`]
    /// against the head's weights (the loss and the state out).
    pub fn forward_with(
        &self,
        embeddings: &Tensor,
        labels: &Tensor,
        inputs: &RowInputs<'_>,
    ) -> candle_core::Result<(Tensor, Option<LossState>)> {
        margin_loss_with_inputs(
            embeddings,
            &self.weight,
            labels,
            &self.spec,
            &self.options,
            inputs,
        )
    }
}

/// Turns this crate's error into a candle error, keeping its message (which names the values).
fn wrap(e: Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

fn msg(text: String) -> candle_core::Error {
    candle_core::Error::Msg(text).bt()
}

fn is_float_input(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Checks ranks, shapes, dtypes, devices and contiguity before anything runs, and returns the
/// problem's (B, D, C); `k` sub-centers per class (`w` has `C*k` rows).
fn check_args(x: &Tensor, w: &Tensor, labels: &Tensor, k: usize) -> candle_core::Result<Shape> {
    const WHO: &str = "fused_margin::candle::margin_loss";
    let (xd, wd, ld) = (x.dims(), w.dims(), labels.dims());
    if xd.len() != 2 || wd.len() != 2 || ld.len() != 1 {
        return Err(msg(format!(
            "{WHO}: expected x of rank 2 (B x D), w of rank 2 (C x D) and labels of rank 1 (B); \
             got x {xd:?}, w {wd:?}, labels {ld:?}"
        )));
    }
    if k > 1 && wd[0] % k != 0 {
        return Err(msg(format!(
            "{WHO}: with {k} sub-centers w has C*{k} rows (class-major); got w {wd:?}, whose {} \
             rows are not a multiple of {k}",
            wd[0]
        )));
    }
    let shape = Shape::new(xd[0], xd[1], wd[0] / k.max(1));
    if wd[1] != shape.d || ld[0] != shape.b {
        return Err(msg(format!(
            "{WHO}: shapes do not fit: x {xd:?} (B x D), w {wd:?} (C x D, D must be {}), \
             labels {ld:?} (must be [{}])",
            shape.d, shape.b
        )));
    }
    if !is_float_input(x.dtype()) || x.dtype() != w.dtype() {
        return Err(msg(format!(
            "{WHO}: x and w must have the same dtype, one of f32, f16, bf16; got x {:?}, w {:?}",
            x.dtype(),
            w.dtype()
        )));
    }
    if !x.device().same_device(w.device()) || !x.device().same_device(labels.device()) {
        return Err(msg(format!(
            "{WHO}: x, w and labels must be on one device; got x on {:?}, w on {:?}, labels on {:?}",
            x.device().location(),
            w.device().location(),
            labels.device().location()
        )));
    }
    for (name, t) in [("x", x), ("w", w)] {
        if !t.is_contiguous() {
            return Err(msg(format!(
                "{WHO}: {name} must be contiguous (row-major); got shape {:?} with stride {:?} \
                 (call .contiguous() first)",
                t.dims(),
                t.stride()
            )));
        }
    }
    Ok(shape)
}

/// The labels as a contiguous `i32` tensor on `device`, the type every backend takes.
fn labels_i32(labels: &Tensor, shape: Shape, device: &Device) -> candle_core::Result<Tensor> {
    if labels.dtype() == DType::I32 {
        // Used as they are: the backends check the range (on CUDA by default on the device, the
        // error then reported by the backward; see `margin_loss`).
        return labels.contiguous();
    }
    // candle has no i64 -> i32 cast on CUDA, so convert on the host (B integers).
    let host = labels.to_device(&Device::Cpu)?;
    let values: Vec<i64> = match labels.dtype() {
        DType::I64 => host.to_vec1::<i64>()?,
        DType::I16 => host.to_vec1::<i16>()?.into_iter().map(i64::from).collect(),
        DType::U32 => host.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        DType::U8 => host.to_vec1::<u8>()?.into_iter().map(i64::from).collect(),
        other => {
            return Err(msg(format!(
                "fused_margin::candle::margin_loss: labels must be integers (i64, i32, i16, u32 \
                 or u8); got dtype {other:?}"
            )))
        }
    };
    let mut out = Vec::with_capacity(values.len());
    for (row, &label) in values.iter().enumerate() {
        // Negative labels (ignored rows) map to -1. The values are on the host here anyway, so
        // a label >= C is reported now (i32 labels are checked by the backends).
        let bad = || {
            wrap(Error::LabelOutOfRange {
                row,
                label,
                classes: shape.c,
            })
        };
        let v = if label < 0 {
            -1
        } else if label as u64 >= shape.c as u64 {
            return Err(bad());
        } else {
            i32::try_from(label).map_err(|_| bad())?
        };
        out.push(v);
    }
    Tensor::from_vec(out, shape.b, device)
}

/// The host slice of a contiguous CPU tensor argument, or an error with its shape and stride.
fn cpu_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    name: &str,
) -> candle_core::Result<&'a [T]> {
    let all = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&all[start..end]),
        None => Err(not_contiguous(name, l)),
    }
}

fn not_contiguous(name: &str, l: &Layout) -> candle_core::Error {
    msg(format!(
        "fused_margin::candle: {name} must be contiguous; got shape {:?} with stride {:?}",
        l.dims(),
        l.stride()
    ))
}

/// What the forward keeps for the backward: the saved statistics of the backend that ran.
enum Saved {
    Cpu(cpu::Forward),
    #[cfg(feature = "candle-cuda")]
    Cuda(Box<crate::cuda::GpuSaved>),
}

type SavedSlot = Arc<Mutex<Option<Saved>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves nothing half-written that matters here: each slot is
    // replaced whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The forward op: `(x, w, labels) -> loss`.
struct MarginOp {
    spec: MarginLoss,
    shape: Shape,
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    options: Options,
    rows: OwnedRows,
    saved: SavedSlot,
}

/// The CPU side of both ops, for one element type.
trait CpuTyped {
    fn cpu_typed<T: Element + WithDType>(
        &self,
        x: &[T],
        w: &[T],
        labels: &[i32],
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)>;
}

/// Checks the CPU arguments (contiguous, labels i32) and runs `op` for x's dtype.
fn cpu_dispatch<O: CpuTyped>(
    op: &O,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
    let labels = cpu_slice::<i32>(s3, l3, "labels")?;
    match s1.dtype() {
        DType::F32 => op.cpu_typed::<f32>(cpu_slice(s1, l1, "x")?, cpu_slice(s2, l2, "w")?, labels),
        DType::F16 => op.cpu_typed::<f16>(cpu_slice(s1, l1, "x")?, cpu_slice(s2, l2, "w")?, labels),
        DType::BF16 => {
            op.cpu_typed::<bf16>(cpu_slice(s1, l1, "x")?, cpu_slice(s2, l2, "w")?, labels)
        }
        other => Err(msg(format!(
            "fused_margin::candle: x has dtype {other:?}; the op takes f32, f16, bf16"
        ))),
    }
}

impl MarginOp {
    /// The result's dtype for inputs of `input`: f32 for a scalar loss (see [`margin_loss`]), the
    /// input dtype for per-row losses.
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    fn out_dtype(&self, input: DType) -> DType {
        match self.spec.reduction {
            Reduction::None => input,
            Reduction::Mean | Reduction::Sum => DType::F32,
        }
    }

    fn out_shape(&self) -> candle_core::Shape {
        match self.spec.reduction {
            Reduction::None => candle_core::Shape::from(self.shape.b),
            Reduction::Mean | Reduction::Sum => candle_core::Shape::from(()),
        }
    }
}

impl CpuTyped for MarginOp {
    fn cpu_typed<T: Element + WithDType>(
        &self,
        x: &[T],
        w: &[T],
        labels: &[i32],
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let fwd = cpu::forward_with(&self.spec, x, w, labels, self.shape, &self.rows.inputs())
            .map_err(wrap)?;
        let out = match self.spec.reduction {
            Reduction::None => T::to_cpu_storage_owned(
                fwd.row_loss
                    .iter()
                    .map(|&v| <T as Element>::from_f64(v))
                    .collect(),
            ),
            // f32 for every input dtype: the f64 sum rounded once (see margin_loss).
            Reduction::Mean | Reduction::Sum => CpuStorage::F32(vec![fwd.loss as f32]),
        };
        *lock(&self.saved) = Some(Saved::Cpu(fwd));
        Ok((out, self.out_shape()))
    }
}

impl CustomOp3 for MarginOp {
    fn name(&self) -> &'static str {
        "fused-margin-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        cpu_dispatch(self, (s1, l1), (s2, l2), (s3, l3))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let gpu = gpu::handle(s1.device(), &self.options)?;
        let (slot, storage) = match s1.dtype() {
            DType::F32 => gpu::forward::<f32>(&gpu, self, s1, l1, s2, l2, s3, l3)?,
            DType::F16 => gpu::forward::<f16>(&gpu, self, s1, l1, s2, l2, s3, l3)?,
            DType::BF16 => gpu::forward::<bf16>(&gpu, self, s1, l1, s2, l2, s3, l3)?,
            other => {
                return Err(msg(format!(
                    "fused_margin::candle: x has dtype {other:?}; the op takes f32, f16, bf16"
                )))
            }
        };
        *lock(&self.saved) = Some(slot);
        Ok((storage, self.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        labels: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let upstream = match (self.spec.reduction, x.device()) {
            (Reduction::None, Device::Cpu) => {
                UpstreamArg::PerRowHost(grad_res.to_dtype(DType::F64)?.to_vec1::<f64>()?)
            }
            // Stays on the device: the kernels read it there.
            (Reduction::None, _) => {
                UpstreamArg::PerRowDevice(grad_res.to_dtype(DType::F32)?.contiguous()?)
            }
            // A scalar is read back (one value; the kernels take it as an argument).
            (Reduction::Mean | Reduction::Sum, _) => {
                UpstreamArg::Scalar(grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64)
            }
        };
        let k = self.spec.variant.centers();
        let layout = GradLayout::new(self.shape, k, x.dtype().size_in_bytes())?;
        let grad_op = GradOp {
            spec: self.spec,
            shape: self.shape,
            options: self.options.clone(),
            rows: self.rows.clone(),
            saved: self.saved.clone(),
            upstream,
            layout,
        };
        // One op gives both gradients, in one buffer; the two views share its storage.
        let Shape { b, d, c } = self.shape;
        let both = x.apply_op3_no_bwd(w, labels, &grad_op)?;
        let dx = both.narrow(0, 0, b * d)?.reshape((b, d))?;
        let dw = both
            .narrow(0, layout.dw_offset, c * k * d)?
            .reshape((c * k, d))?;
        Ok((Some(dx), Some(dw), None))
    }
}

/// Where the backward op puts the gradients in the one buffer it returns: `dx` (B x D) at 0, `dw`
/// (C x D, C K x D with sub-centers) at `dw_offset`, the first multiple of 256 bytes after `dx`, so `dw` starts as aligned
/// as a fresh allocation. (The kernels store gradients one element at a time, which needs only
/// element alignment; the padding keeps `dw` fit for vectorized readers and stores, at most 255
/// bytes.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GradLayout {
    dw_offset: usize,
    /// Elements of the whole buffer: `dw_offset + C*K*D`.
    len: usize,
}

impl GradLayout {
    const ALIGN_BYTES: usize = 256;

    /// The layout for `shape` with `k` sub-centers and elements of `elem_bytes` (2 or 4).
    fn new(shape: Shape, k: usize, elem_bytes: usize) -> candle_core::Result<Self> {
        let per = (Self::ALIGN_BYTES / elem_bytes.max(1)).max(1);
        // Checked although margin_loss validated the shape: a wrap here would misplace dw.
        let dw_offset = shape
            .b
            .checked_mul(shape.d)
            .and_then(|dx| dx.div_ceil(per).checked_mul(per));
        let dw_len = shape.c.checked_mul(k).and_then(|r| r.checked_mul(shape.d));
        let len = dw_offset.and_then(|o| dw_len.and_then(|n| o.checked_add(n)));
        let (Some(dw_offset), Some(len)) = (dw_offset, len) else {
            return Err(msg(format!(
                "fused_margin::candle: the gradients of {shape:?} with {k} sub-centers (B*D and \
                 C*K*D elements, dw at a 256-byte boundary) overflow usize"
            )));
        };
        Ok(Self { dw_offset, len })
    }
}

/// The upstream gradient of the loss, as the backward's backend wants it.
enum UpstreamArg {
    /// `dObjective/dloss` of a scalar loss.
    Scalar(f64),
    /// One value per row, on the host (CPU backend).
    PerRowHost(Vec<f64>),
    /// One f32 value per row, contiguous on the device (CUDA backend).
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    PerRowDevice(Tensor),
}

/// The backward op: `(x, w, labels) -> [dx, padding, dw]`, one rank-1 tensor laid out as
/// `layout` says.
struct GradOp {
    spec: MarginLoss,
    shape: Shape,
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    options: Options,
    /// The forward's per-row inputs, for a backward that must recompute it.
    rows: OwnedRows,
    saved: SavedSlot,
    upstream: UpstreamArg,
    layout: GradLayout,
}

impl CpuTyped for GradOp {
    fn cpu_typed<T: Element + WithDType>(
        &self,
        x: &[T],
        w: &[T],
        labels: &[i32],
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let upstream = match &self.upstream {
            UpstreamArg::Scalar(v) => Upstream::Scalar(*v),
            UpstreamArg::PerRowHost(v) => Upstream::PerRow(v),
            UpstreamArg::PerRowDevice(_) => {
                return Err(msg(
                    "fused_margin::candle: internal: device upstream on the CPU backend".into(),
                ))
            }
        };
        let saved = lock(&self.saved);
        let recomputed;
        let fwd = match &*saved {
            Some(Saved::Cpu(f)) => f,
            // Not saved by a CPU forward (cannot happen through margin_loss): recompute it.
            _ => {
                recomputed =
                    cpu::forward_with(&self.spec, x, w, labels, self.shape, &self.rows.inputs())
                        .map_err(wrap)?;
                &recomputed
            }
        };
        let g = cpu::backward(&self.spec, fwd, x, w, labels, self.shape, upstream).map_err(wrap)?;
        // dx, zeros up to dw's offset, dw: the CUDA op's layout, so `bwd` splits both alike.
        let mut both: Vec<T> = Vec::with_capacity(self.layout.len);
        both.extend(g.dx.iter().map(|&v| <T as Element>::from_f64(v)));
        both.resize(self.layout.dw_offset, <T as Element>::from_f64(0.0));
        both.extend(g.dw.iter().map(|&v| <T as Element>::from_f64(v)));
        if both.len() != self.layout.len {
            return Err(msg(format!(
                "fused_margin::candle: internal: {} gradient values for a layout of {}",
                both.len(),
                self.layout.len
            )));
        }
        Ok((
            T::to_cpu_storage_owned(both),
            candle_core::Shape::from(self.layout.len),
        ))
    }
}

impl CustomOp3 for GradOp {
    fn name(&self) -> &'static str {
        "fused-margin-loss-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        cpu_dispatch(self, (s1, l1), (s2, l2), (s3, l3))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let gpu = gpu::handle(s1.device(), &self.options)?;
        let both = match s1.dtype() {
            DType::F32 => gpu::backward::<f32>(&gpu, self, s1, l1, s2, l2, s3, l3)?,
            DType::F16 => gpu::backward::<f16>(&gpu, self, s1, l1, s2, l2, s3, l3)?,
            DType::BF16 => gpu::backward::<bf16>(&gpu, self, s1, l1, s2, l2, s3, l3)?,
            other => {
                return Err(msg(format!(
                    "fused_margin::candle: x has dtype {other:?}; the op takes f32, f16, bf16"
                )))
            }
        };
        Ok((both, candle_core::Shape::from(self.layout.len)))
    }
}

/// The CUDA side: one [`FusedMarginLoss`](crate::cuda::FusedMarginLoss) per candle device,
/// and the typed forward and backward on candle's storage.
#[cfg(feature = "candle-cuda")]
mod gpu {
    use super::{lock, msg, not_contiguous, wrap, GradOp, MarginOp, Saved, UpstreamArg};
    use crate::cuda::{
        CudaElement, FusedMarginLoss, GpuForwardOut, GpuGradOut, GpuSaved, GpuUpstream, Options,
    };
    use crate::spec::Reduction;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::{CudaDType, DeviceId};
    use candle_core::{CudaDevice, CudaStorage, Layout, Storage, WithDType};
    use cudarc::driver::CudaView;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    /// Handles per candle device, one per distinct options.
    type Handles = Mutex<HashMap<DeviceId, Vec<(Options, Arc<FusedMarginLoss>)>>>;

    /// The handle for candle device `dev` and `options`, created on first use and kept for the
    /// process, so modules are loaded once per device (NVRTC compiles once per process anyway).
    /// Keyed by candle's device id (each `Device::new_cuda` is a distinct device with its own
    /// stream) and the options.
    pub(super) fn handle(
        dev: &CudaDevice,
        options: &Options,
    ) -> candle_core::Result<Arc<FusedMarginLoss>> {
        static HANDLES: OnceLock<Handles> = OnceLock::new();
        let mut map = lock(HANDLES.get_or_init(|| Mutex::new(HashMap::new())));
        let mine = map.entry(dev.id()).or_default();
        if let Some((_, h)) = mine.iter().find(|(o, _)| o == options) {
            return Ok(h.clone());
        }
        let h = Arc::new(
            FusedMarginLoss::with_options(dev.cuda_stream(), options.clone()).map_err(wrap)?,
        );
        mine.push((options.clone(), h.clone()));
        Ok(h)
    }

    /// The contiguous elements of a CUDA tensor argument as a view.
    fn view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        name: &str,
    ) -> candle_core::Result<CudaView<'a, T>> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| not_contiguous(name, l))?;
        Ok(s.as_cuda_slice::<T>()?.slice(start..end))
    }

    /// f32 device values as a candle storage of `dtype` (candle's own cast kernel).
    fn to_dtype(
        dev: &CudaDevice,
        values: cudarc::driver::CudaSlice<f32>,
        dtype: candle_core::DType,
    ) -> candle_core::Result<CudaStorage> {
        let n = values.len();
        let s = CudaStorage::wrap_cuda_slice(values, dev.clone());
        if dtype == candle_core::DType::F32 {
            Ok(s)
        } else {
            s.to_dtype(&Layout::contiguous(n), dtype)
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward<T: CudaElement + CudaDType + WithDType>(
        gpu: &FusedMarginLoss,
        op: &MarginOp,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(Saved, CudaStorage)> {
        let (x, w, labels) = (
            view::<T>(s1, l1, "x")?,
            view::<T>(s2, l2, "w")?,
            view::<i32>(s3, l3, "labels")?,
        );
        // The loss (mean, sum) or the row losses (none): the op's result, written in place by
        // the kernels; the other one stays with the saved state.
        let n = match op.spec.reduction {
            Reduction::None => op.shape.b,
            Reduction::Mean | Reduction::Sum => 1,
        };
        // SAFETY: uninitialized f32 device memory (no invalid bit patterns) of exactly the
        // output's length, which forward_into checks and its kernels write whole (fm_reduce_loss
        // the loss; fm_combine_rows / naive_softmax every row) before anything reads it; on an
        // error it is dropped unread.
        let mut out = unsafe { gpu.stream().alloc::<f32>(n) }
            .map_err(|e| msg(format!("fused_margin::candle: allocate the loss: {e:?}")))?;
        let views = match op.spec.reduction {
            Reduction::None => GpuForwardOut {
                loss: None,
                row_loss: Some(out.as_view_mut()),
            },
            Reduction::Mean | Reduction::Sum => GpuForwardOut {
                loss: Some(out.as_view_mut()),
                row_loss: None,
            },
        };
        let saved = gpu
            .forward_into_with(
                &op.spec,
                &x,
                &w,
                &labels,
                op.shape,
                &op.rows.inputs(),
                views,
            )
            .map_err(wrap)?;
        // The scalar loss stays f32 (see margin_loss); row losses take the input dtype.
        let storage = to_dtype(s1.device(), out, op.out_dtype(<T as WithDType>::DTYPE))?;
        Ok((Saved::Cuda(Box::new(saved)), storage))
    }

    /// `dx` and `dw` into one buffer laid out as `op.layout` (the op's result), written in
    /// place by the kernels.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward<T: CudaElement + CudaDType + WithDType>(
        gpu: &FusedMarginLoss,
        op: &GradOp,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<CudaStorage> {
        let (x, w, labels) = (
            view::<T>(s1, l1, "x")?,
            view::<T>(s2, l2, "w")?,
            view::<i32>(s3, l3, "labels")?,
        );
        let saved = lock(&op.saved);
        let recomputed: GpuSaved;
        let fwd: &GpuSaved = match &*saved {
            Some(Saved::Cuda(f)) => f,
            // Not saved by a CUDA forward (cannot happen through margin_loss): recompute it.
            _ => {
                recomputed = gpu
                    .forward_into_with(
                        &op.spec,
                        &x,
                        &w,
                        &labels,
                        op.shape,
                        &op.rows.inputs(),
                        GpuForwardOut::default(),
                    )
                    .map_err(wrap)?;
                &recomputed
            }
        };
        // Labels are checked on the device by default (`LabelCheck::Device`): a bad one is
        // reported here, as the typed error, before the backward is queued. A scalar upstream was
        // read back already (the stream has run the forward), so this small copy waits for
        // nothing more.
        fwd.check().map_err(wrap)?;
        let internal = |what: &str| {
            msg(format!(
                "fused_margin::candle: internal: the gradient buffer has no room for {what}"
            ))
        };
        let bd = op.shape.b * op.shape.d;
        // SAFETY: uninitialized device memory of T (f32, f16 or bf16: no invalid bit patterns).
        // backward_into writes every element of dx (0..B*D) and of dw (dw_offset..len) before
        // anything reads them, and the padding between them is never read: the op's result is
        // only seen through the two tensors `bwd` narrows out of it. On an error it is dropped.
        let mut both = unsafe { gpu.stream().alloc::<T>(op.layout.len) }.map_err(|e| {
            msg(format!(
                "fused_margin::candle: allocate the gradients: {e:?}"
            ))
        })?;
        let (mut head, dw) = both
            .try_split_at_mut(op.layout.dw_offset)
            .ok_or_else(|| internal("dw"))?;
        let dx = head.try_slice_mut(..bd).ok_or_else(|| internal("dx"))?;
        let out = GpuGradOut { dx, dw };
        match &op.upstream {
            UpstreamArg::Scalar(v) => {
                gpu.backward_into::<T>(fwd, &x, &w, &labels, GpuUpstream::Scalar(*v as f32), out)
            }
            UpstreamArg::PerRowDevice(t) => {
                let (storage, layout) = t.storage_and_layout();
                let Storage::Cuda(cs) = &*storage else {
                    return Err(msg(
                        "fused_margin::candle: the upstream gradient is not on the CUDA device"
                            .into(),
                    ));
                };
                let g = view::<f32>(cs, layout, "upstream gradient")?;
                gpu.backward_into::<T>(fwd, &x, &w, &labels, GpuUpstream::PerRow(&g), out)
            }
            UpstreamArg::PerRowHost(_) => {
                return Err(msg(
                    "fused_margin::candle: internal: host upstream on the CUDA backend".into(),
                ))
            }
        }
        .map_err(wrap)?;
        Ok(CudaStorage::wrap_cuda_slice(both, s1.device().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dw_starts_at_the_next_256_byte_boundary_after_dx() {
        // B*D = 21: dw after 64 f32 (256 bytes) or 128 16-bit elements.
        let s = Shape::new(3, 7, 5);
        assert_eq!(
            GradLayout::new(s, 1, 4).unwrap(),
            GradLayout {
                dw_offset: 64,
                len: 64 + 35
            }
        );
        assert_eq!(GradLayout::new(s, 1, 2).unwrap().dw_offset, 128);
        // dx already ends on a boundary: no padding.
        let even = Shape::new(2, 64, 3);
        assert_eq!(
            GradLayout::new(even, 1, 2).unwrap(),
            GradLayout {
                dw_offset: 128,
                len: 128 + 192
            }
        );
        assert_eq!(
            GradLayout::new(Shape::new(2, 65, 3), 1, 4)
                .unwrap()
                .dw_offset,
            192
        );
        // An offset plus C*D past usize is an error, not a wrap.
        let huge = Shape::new(1, 3, usize::MAX / 3);
        assert!(GradLayout::new(huge, 1, 4).is_err());
        // Sub-centers: dw has C K rows.
        assert_eq!(GradLayout::new(s, 3, 4).unwrap().len, 64 + 3 * 35);
        assert!(GradLayout::new(Shape::new(1, 3, usize::MAX / 6), 3, 4).is_err());
    }
}
