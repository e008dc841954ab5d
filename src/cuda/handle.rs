//! [`FusedMarginLoss`]: the handle bound to one stream. Construction (device facts, the module
//! architecture), the per-dtype module cache, allocation, validation, and the forward and
//! backward entry points, which build a launch plan (src/cuda/plan.rs) and run it
//! (src/cuda/exec.rs).

mod sharded;
pub use sharded::{GpuShardForward, GpuShardGradients};

use super::exec;
use super::labels::{LabelCheck, LabelState};
use super::launch::{cuda_err, fill_nan, CudaElement, Kernels};
use super::libs;
use super::options::{F32Precision, Options, Plan};
use super::params::FmParams;
use super::plan::{self, Buf};
use super::results::{
    DeviceUpstream, GpuBackwardRun, GpuForward, GpuForwardOut, GpuGradOut, GpuGradients, GpuSaved,
    GpuUpstream,
};
use super::selfcheck::{self, CheckOutputs, Outcome, SelfCheckReport};
use super::spans::{check_disjoint, Span};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::spec::{
    check_per_row_upstream, check_scalar_upstream, scalar_upstream_per_row, MarginLoss, Reduction,
    Shape,
};
use crate::variant::RowInputs;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DeviceSlice,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// True when the CUDA driver library can be loaded and reports at least one device.
/// Checks `is_culib_present` first: cudarc panics when libcuda is missing.
pub fn device_available() -> bool {
    if !libs::driver_present() {
        return false;
    }
    matches!(CudaContext::device_count(), Ok(n) if n > 0)
}

/// Opens device `ordinal` and returns its default stream, or `Error::NoDevice` saying why not:
/// no driver library (checked before cudarc is asked, since cudarc panics without one), no such
/// device, or a driver that fails to initialize. Prefer it to `CudaContext::new(ordinal)`,
/// which panics on a machine without libcuda.
pub fn default_stream(ordinal: usize) -> Result<Arc<CudaStream>> {
    if !libs::driver_present() {
        return Err(Error::NoDevice {
            reason: "libcuda (the NVIDIA driver library) was not found".into(),
        });
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| Error::NoDevice {
        reason: format!("cannot open CUDA device {ordinal}: {e:?}"),
    })?;
    Ok(ctx.default_stream())
}

/// The GPU loss operator bound to one stream, with its [`Options`] fixed at construction.
/// Kernels are compiled by NVRTC once per (input dtype, architecture) per process and loaded once
/// per handle; the handle is `Send + Sync` and can be shared between threads.
pub struct FusedMarginLoss {
    pub(super) stream: Arc<CudaStream>,
    options: Options,
    /// The architecture the module is compiled for: `sm_{major}{minor}`, or `sm_90a` when the
    /// wgmma override is on for a (9, 0) device.
    arch: String,
    /// Compute capability (major, minor).
    cc: (i32, i32),
    sm_count: u32,
    /// The most dynamic shared memory a block may opt into (99 KB on sm_86/89, 163 KB on sm_80,
    /// 227 KB on sm_90): tile shapes that need more are not selected.
    smem_optin: u32,
    blas: OnceLock<Option<CudaBlas>>,
    modules: Mutex<HashMap<DType, Arc<Kernels>>>,
    /// The self-checks run so far (src/cuda/selfcheck.rs), one per fast kernel path.
    self_checks: Mutex<Vec<SelfCheckReport>>,
    /// The choices decided per (dtype, D), so later calls make one lookup, not two plans.
    decided: Mutex<HashMap<(DType, usize), plan::Choices>>,
    /// The workspace arena of the fused plans (src/cuda/exec.rs): grown to the largest
    /// forward's or backward's workspace seen, kept until [`Self::release_workspace`] or drop.
    pub(super) arena: Mutex<Option<CudaSlice<f32>>>,
}

impl std::fmt::Debug for FusedMarginLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedMarginLoss")
            .field("arch", &self.arch)
            .field("cc", &self.cc)
            .field("sm_count", &self.sm_count)
            .field("smem_optin", &self.smem_optin)
            .field("options", &self.options)
            .finish()
    }
}

impl FusedMarginLoss {
    /// A handle on `stream` with [`Options::default`] (the fused plan). Reads the device's
    /// architecture and SM count; compiles nothing yet.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        Self::with_options(stream, Options::default())
    }

    /// A handle on `stream` with `options` (build them from [`Options::default`], field by
    /// field). Reads the device's architecture and SM count; compiles nothing yet. With the wgmma
    /// kernel override on a compute-capability-9.0 device the kernels are compiled for `sm_90a`.
    pub fn with_options(stream: Arc<CudaStream>, options: Options) -> Result<Self> {
        let ctx = stream.context();
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| cuda_err("query compute capability", e))?;
        if major < 8 {
            return Err(Error::Unsupported {
                detail: format!(
                    "compute capability {major}.{minor}: the kernels need sm_80 or newer"
                ),
            });
        }
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| cuda_err("query SM count", e))? as u32;
        let smem_optin = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| cuda_err("query the shared memory per block", e))? as u32;
        let arch = if options.kernel_override.wgmma && (major, minor) == (9, 0) {
            "sm_90a".to_string()
        } else {
            format!("sm_{major}{minor}")
        };
        Ok(Self {
            stream,
            options,
            arch,
            cc: (major, minor),
            sm_count,
            smem_optin,
            blas: OnceLock::new(),
            modules: Mutex::new(HashMap::new()),
            self_checks: Mutex::new(Vec::new()),
            decided: Mutex::new(HashMap::new()),
            arena: Mutex::new(None),
        })
    }

    /// The device self-checks this handle has run (see [`Options::self_check`]): per fast kernel
    /// path (dtype, D, kernels), whether it agreed with the SIMT kernels on this device and is
    /// used, or why not.
    pub fn self_checks(&self) -> Vec<SelfCheckReport> {
        self.self_checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The choices for a call with `T` inputs and `d` columns: the handle's, or the SIMT kernels
    /// where the self-check of the fast path they select failed. Runs that self-check the first
    /// time the path is selected (src/cuda/selfcheck.rs).
    fn checked_choices<T: CudaElement>(&self, d: usize) -> Result<plan::Choices> {
        let ch = self.choices();
        if !self.options.self_check || self.options.plan == Plan::Naive {
            return Ok(ch);
        }
        let key = (T::DTYPE, d);
        if let Some(c) = self
            .decided
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(*c);
        }
        let c = self.self_check::<T>(d, &ch)?;
        self.decided
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, c);
        Ok(c)
    }

    /// The decision of [`Self::checked_choices`] for a (dtype, D) not seen yet: the self-check of
    /// the fast path `ch` selects (once per kernel set), or `ch` itself when it selects none.
    fn self_check<T: CudaElement>(&self, d: usize, ch: &plan::Choices) -> Result<plan::Choices> {
        let ch = *ch;
        let pr = selfcheck::problem(d);
        let (fwd, bwd) = self.problem_plans(T::DTYPE, &pr, &ch)?;
        if !selfcheck::is_fast(&fwd, &bwd) {
            return Ok(ch);
        }
        let kernels: Vec<String> = fwd
            .launches()
            .chain(bwd.launches())
            .map(|l| l.entry.clone())
            .collect();
        let mut reports = self.self_checks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = reports
            .iter()
            .find(|r| r.dtype == T::DTYPE && r.kernels == kernels)
        {
            return Ok(selfcheck::choices_after(&r.outcome, &ch));
        }
        // Every compile unit of both runs at once, so they compile in parallel (this is the first
        // call's compile). A failure here is left for the runs to report: the SIMT run's is the
        // call's error, the fast run's a failed check.
        let reference = selfcheck::reference_choices(&ch);
        let (sf, sb) = self.problem_plans(T::DTYPE, &pr, &reference)?;
        let _ = self.kernels(T::DTYPE)?.prepare(
            [&fwd, &bwd, &sf, &sb]
                .into_iter()
                .flat_map(|p| p.launches().map(|l| l.entry.as_str())),
        );
        // The SIMT run is the yardstick: its failure is the call's error, not the fast path's.
        let simt = self.run_problem::<T>(&pr, &reference)?;
        let outcome = match self.run_problem::<T>(&pr, &ch) {
            Ok(fast) => {
                let tf32 = T::DTYPE == DType::F32 && ch.tf32;
                match selfcheck::compare(T::DTYPE, tf32, &fast, &simt) {
                    Ok(()) => Outcome::Passed,
                    Err(why) => Outcome::Failed(why),
                }
            }
            Err(e) => Outcome::Failed(format!("it failed to run: {e}")),
        };
        if let Outcome::Failed(why) = &outcome {
            eprintln!(
                "fused-margin: self-check failed on {} for {:?} inputs, D = {d} ({why}); this \
                 handle runs the SIMT kernels instead of {kernels:?}",
                self.arch,
                T::DTYPE
            );
        }
        let next = selfcheck::choices_after(&outcome, &ch);
        reports.push(SelfCheckReport {
            dtype: T::DTYPE,
            d,
            kernels,
            outcome,
        });
        Ok(next)
    }

    /// The forward and backward plans of the self-check problem under `ch`.
    fn problem_plans(
        &self,
        dtype: DType,
        pr: &selfcheck::SelfCheckProblem,
        ch: &plan::Choices,
    ) -> Result<(plan::LaunchPlan, plan::LaunchPlan)> {
        let params = FmParams::from_spec(&pr.spec);
        let mean = pr.spec.reduction == Reduction::Mean;
        let dev = self.device_facts();
        let fwd = plan::forward(
            &dev,
            ch,
            &plan::ForwardProblem {
                dtype,
                shape: pr.shape,
                aligned: true,
                params,
                mean,
                row_margins: false,
            },
        )?;
        let bwd = plan::backward(
            &dev,
            ch,
            &plan::BackwardProblem {
                dtype,
                grad_dtype: DType::F32,
                shape: pr.shape,
                aligned: true,
                params,
                mean,
                upstream: plan::PlanUpstream::Scalar(1.0),
                fwd_tensor_cores: fwd.tensor_cores,
                row_margins: false,
            },
        )?;
        Ok((fwd, bwd))
    }

    /// The self-check problem's forward and backward under `ch` on this device, on the host.
    fn run_problem<T: CudaElement>(
        &self,
        pr: &selfcheck::SelfCheckProblem,
        ch: &plan::Choices,
    ) -> Result<CheckOutputs> {
        let up = |v: &[f64]| -> Vec<T> { v.iter().map(|&e| T::from_f64(e)).collect() };
        let htod = |what: &str, r: std::result::Result<CudaSlice<T>, _>| {
            r.map_err(|e| cuda_err(&format!("copy the self-check's {what}"), e))
        };
        let x = htod("x", self.stream.clone_htod(&up(&pr.x)))?;
        let w = htod("w", self.stream.clone_htod(&up(&pr.w)))?;
        let labels = self
            .stream
            .clone_htod(&pr.labels)
            .map_err(|e| cuda_err("copy the self-check's labels", e))?;
        let (xv, wv, lv) = (x.as_view(), w.as_view(), labels.as_view());
        let fwd = self.forward_owned(
            &pr.spec,
            &xv,
            &wv,
            &lv,
            pr.shape,
            Some(ch),
            &RowInputs::default(),
        )?;
        let g = self.backward_owned::<T, f32>(&fwd, &xv, &wv, &lv, GpuUpstream::ONE, Some(ch))?;
        let host = |what: &str, v: &CudaSlice<f32>| -> Result<Vec<f64>> {
            let h = self
                .stream
                .clone_dtoh(v)
                .map_err(|e| cuda_err(&format!("copy the self-check's {what}"), e))?;
            Ok(h.into_iter().map(f64::from).collect())
        };
        Ok(CheckOutputs {
            loss: fwd.loss_host()? as f64,
            lse: host("lse", &fwd.lse)?,
            dx: host("dx", &g.dx)?,
            dw: host("dw", &g.dw)?,
        })
    }

    /// Bytes of device memory the handle holds for the fused plans' workspaces between calls:
    /// the largest `workspace_bytes` of any forward or backward so far (each workspace rounded up
    /// to 256 bytes), 0 before the first call. A call whose workspaces fit allocates none.
    pub fn workspace_held_bytes(&self) -> usize {
        let a = self.arena.lock().unwrap_or_else(|p| p.into_inner());
        a.as_ref().map_or(0, |s| 4 * s.len())
    }

    /// Frees the workspace arena (on the stream, after the work already enqueued): for a caller
    /// done with a large shape that wants the memory back. The next call allocates it again.
    pub fn release_workspace(&self) {
        *self.arena.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The options this handle was made with.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device architecture the kernels are compiled for, e.g. `"sm_90"` (`"sm_90a"` with
    /// the wgmma kernel override on an H100/H200).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// What the plan builder knows of this handle's device. `cublas` is true when the naive plan
    /// is selected and its matrix products run on cuBLAS (loaded on first use); `sm90a` when the
    /// module holds the wgmma forward.
    pub fn device_facts(&self) -> plan::DeviceFacts {
        plan::DeviceFacts {
            cc: self.cc,
            sm_count: self.sm_count as usize,
            smem_optin: self.smem_optin,
            sm90a: self.arch == "sm_90a",
            cublas: self.options.plan == Plan::Naive && self.blas().is_some(),
        }
    }

    /// The handle's options as the plan builder reads them.
    pub fn choices(&self) -> plan::Choices {
        let o = &self.options;
        plan::Choices {
            plan: o.plan,
            tensor_cores: o.tensor_cores,
            tf32: o.f32_precision == F32Precision::Tf32,
            wide_tiles: o.kernel_override.wide_forward_tiles,
            wgmma: o.kernel_override.wgmma,
            tc_backward: o.tensor_core_backward,
            label_check: o.label_check,
            tiles_per_split: None,
        }
    }

    /// The cuBLAS handle the naive plan uses, created on first use; `None` when disabled or when
    /// libcublas cannot be loaded.
    pub(crate) fn blas(&self) -> Option<&CudaBlas> {
        self.blas
            .get_or_init(|| {
                if !self.options.cublas || !libs::cublas_present() {
                    return None;
                }
                CudaBlas::new(self.stream.clone()).ok()
            })
            .as_ref()
    }

    /// The kernels of `dtype`: each compile unit compiled (once per process) and loaded (once per
    /// handle) when a plan first launches it (`Kernels::prepare`).
    pub(crate) fn kernels(&self, dtype: DType) -> Result<Arc<Kernels>> {
        let mut mods = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = mods.get(&dtype) {
            return Ok(k.clone());
        }
        crate::cuda::compile::check_dtype(dtype)?;
        let k = Arc::new(Kernels::new(
            self.stream.context().clone(),
            &self.arch,
            dtype,
        ));
        mods.insert(dtype, k.clone());
        Ok(k)
    }

    /// Allocates `n` elements, uninitialized (as `torch.empty`): zero-filling every output and
    /// workspace cost one memset per buffer, about ten stream operations per forward and backward,
    /// which at small C is host time on the critical path. Poisoned with NaN when
    /// [`Options::poison`] is on.
    pub(crate) fn alloc<O: CudaElement>(&self, k: &Kernels, n: usize) -> Result<CudaSlice<O>> {
        // SAFETY: the memory is uninitialized. Every caller passes the buffer to kernels that write
        // each element before anything reads it: the forward's and backward's outputs and
        // workspaces are written whole (rows < B, classes < C, dims < D, every split), and where a
        // kernel skips an element (z_iy of a row whose label is not in 0..C) no reader touches it.
        // The GPU suite runs with poisoning on, so an element read before it is written shows as
        // NaN there. f32, f16 and bf16 have no invalid bit patterns.
        let mut s = unsafe { self.stream.alloc::<O>(n.max(1)) }
            .map_err(|e| cuda_err(&format!("allocate {n} x {}", O::DTYPE.suffix()), e))?;
        if self.options.poison {
            fill_nan(&self.stream, k, &mut s.as_view_mut())?;
        }
        Ok(s)
    }

    /// A buffer must live in this handle's CUDA context (its device): a pointer of another
    /// device would be an invalid address here. Buffers on another stream of the same context are
    /// fine: cudarc makes this handle's stream wait for their last write (stream-ordered events,
    /// unless the caller switched event tracking off) and records this stream's reads.
    fn check_device(&self, what: &'static str, buf_stream: &Arc<CudaStream>) -> Result<()> {
        let (mine, theirs) = (self.stream.context(), buf_stream.context());
        if **mine != **theirs {
            return Err(Error::InvalidArgument {
                what,
                detail: format!(
                    "the buffer lives on device {} (another CUDA context); this handle's stream is on device {}",
                    theirs.ordinal(),
                    mine.ordinal()
                ),
            });
        }
        Ok(())
    }

    /// Checks spec, shape, buffer lengths and devices before any launch.
    fn check_inputs<T: CudaElement>(
        &self,
        spec: &MarginLoss,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        shape: Shape,
    ) -> Result<()> {
        spec.validate()?;
        shape.check_lengths_with_centers(spec.variant.centers(), x.len(), w.len(), labels.len())?;
        self.check_device("x", x.stream())?;
        self.check_device("w", w.stream())?;
        self.check_device("labels", labels.stream())?;
        if shape.d > i32::MAX as usize {
            return Err(Error::TooLarge {
                what: "shape",
                detail: format!("D = {} must be < 2^31", shape.d),
            });
        }
        Ok(())
    }

    /// Under [`LabelCheck::Host`] the labels copied to the host and checked there, giving
    /// (counted rows, fingerprint). Under [`LabelCheck::Device`] (None) the plan's first launch
    /// checks them.
    fn host_labels(
        &self,
        labels: &CudaView<'_, i32>,
        shape: Shape,
    ) -> Result<Option<(usize, u64)>> {
        match self.options.label_check {
            LabelCheck::Host => {
                let host = self
                    .stream
                    .clone_dtoh(labels)
                    .map_err(|e| cuda_err("copy labels to host for validation", e))?;
                let counted = shape.check_labels(&host)?;
                Ok(Some((counted, Shape::labels_fingerprint(&host))))
            }
            LabelCheck::Device => Ok(None),
        }
    }

    /// The address range of a view, for the overlap checks. (cudarc gives a view's address only
    /// through `device_ptr`, which also orders this stream after the view's last write.)
    fn span<E, V: DevicePtr<E>>(&self, what: &'static str, v: &V) -> Span {
        let (ptr, _record) = v.device_ptr(&self.stream);
        Span {
            what,
            ptr,
            len: v.len(),
            elem: std::mem::size_of::<E>(),
        }
    }

    /// A caller's output view: exactly `expected` elements, on this handle's device. Returns its
    /// address range for the overlap check.
    fn check_out<E>(
        &self,
        what: &'static str,
        v: &CudaViewMut<'_, E>,
        expected: usize,
    ) -> Result<Span> {
        if v.len() != expected {
            return Err(Error::Length {
                what,
                expected,
                got: v.len(),
            });
        }
        self.check_device(what, v.stream())?;
        Ok(self.span::<E, _>(what, v))
    }

    /// An output buffer of this crate's for a result the caller did not give a view for:
    /// uninitialized, as [`Self::alloc`], and poisoned by the executor with the other output
    /// views when [`Options::poison`] is on (not here: it would be filled twice).
    fn alloc_output<O: CudaElement>(&self, n: usize) -> Result<CudaSlice<O>> {
        // SAFETY: uninitialized device memory of a type with no invalid bit patterns, bound as an
        // output view of the plan's Loss, RowLoss, Dx or Dw, which its kernels write whole (the
        // loss by fm_reduce_loss, every row loss by fm_combine_rows / naive_softmax, every
        // element of dx and dw by fm_x_finish, the dw kernels or naive_norm_backward) before
        // anything reads them.
        unsafe { self.stream.alloc::<O>(n.max(1)) }
            .map_err(|e| cuda_err(&format!("allocate {n} x {}", O::DTYPE.suffix()), e))
    }

    /// True when both views start at 16-byte aligned device addresses (cp.async's 16-byte copies
    /// need it).
    fn aligned16<T: CudaElement>(&self, x: &CudaView<'_, T>, w: &CudaView<'_, T>) -> bool {
        let (px, _rx) = x.device_ptr(&self.stream);
        let (pw, _rw) = w.device_ptr(&self.stream);
        px % 16 == 0 && pw % 16 == 0
    }

    /// Forward pass on the GPU (docs/MATH.md "Forward"). `x`: B x D, `w`: C x D (C K x D with
    /// sub-centers, class-major), `labels`: B i32
    /// (negative = ignored), all on this handle's device. The loss and the row losses are
    /// written into buffers this call allocates ([`Self::forward_into`] with no views).
    pub fn forward<T: CudaElement>(
        &self,
        spec: &MarginLoss,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        shape: Shape,
    ) -> Result<GpuForward> {
        self.forward_owned(spec, x, w, labels, shape, None, &RowInputs::default())
    }

    /// [`Self::forward`] for a loss that takes per-row inputs or state (as
    /// [`crate::cpu::forward_with`]): AdaFace's and CurricularFace's state in
    /// ([`RowInputs::state`], copied to the device; the state out is
    /// [`GpuSaved::state`]), ElasticFace's margins (given, or drawn by the generator on the host:
    /// B values, reordered on the device for ElasticFace+). MagFace and sub-center ArcFace need
    /// none (`RowInputs::default()`, or [`Self::forward`]). [`crate::Variant::check_inputs`]'s
    /// errors come before any launch.
    pub fn forward_with<T: CudaElement>(
        &self,
        spec: &MarginLoss,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        shape: Shape,
        inputs: &RowInputs<'_>,
    ) -> Result<GpuForward> {
        self.forward_owned(spec, x, w, labels, shape, None, inputs)
    }

    /// [`Self::forward`] that writes the loss and/or the row losses into the caller's views
    /// (`out`; no copy: the kernels write them in place) and returns what the backward needs.
    /// An output left `None` goes to a buffer of this crate's, kept by the returned
    /// [`GpuSaved`].
    ///
    /// Checked before any launch, besides [`Self::forward`]'s checks: each view's length (the
    /// loss 1, the row losses B; [`Error::Length`] naming `"loss"` or `"row_loss"`), its device
    /// ([`Error::InvalidArgument`]), and that it overlaps no input and no other output
    /// ([`Error::InvalidArgument`] naming the output, both address ranges and lengths). The
    /// element type is f32 by the signature. A view on another stream of the handle's device is
    /// ordered as an input is (cudarc's events).
    pub fn forward_into<T: CudaElement>(
        &self,
        spec: &MarginLoss,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        shape: Shape,
        out: GpuForwardOut<'_>,
    ) -> Result<GpuSaved> {
        self.forward_impl(
            spec,
            x,
            w,
            labels,
            shape,
            out,
            None,
            &RowInputs::default(),
            None,
        )
    }

    /// [`Self::forward_into`] for a loss that takes per-row inputs or state (as
    /// [`Self::forward_with`]).
    #[allow(clippy::too_many_arguments)] // forward_into's and forward_with's, together
    pub fn forward_into_with<T: CudaElement>(
        &self,
        spec: &MarginLoss,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        shape: Shape,
        inputs: &RowInputs<'_>,
        out: GpuForwardOut<'_>,
    ) -> Result<GpuSaved> {
        self.forward_impl(spec, x, w, labels, shape, out, None, inputs, None)
    }

    /// The allocating forward under `choices` (None: the handle's after the self-check): the
    /// `_into` path with no views, its two outputs moved out of the saved state.
    #[allow(clippy::too_many_arguments)] // forward_impl's, less the output views
    fn forward_owned<T: CudaElement>(
        &self,
        spec: &MarginLoss,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        shape: Shape,
        choices: Option<&plan::Choices>,
        inputs: &RowInputs<'_>,
    ) -> Result<GpuForward> {
        let mut saved = self.forward_impl(
            spec,
            x,
            w,
            labels,
            shape,
            GpuForwardOut::default(),
            choices,
            inputs,
            None,
        )?;
        match (saved.loss.take(), saved.row_loss.take()) {
            (Some(loss), Some(row_loss)) => Ok(GpuForward {
                loss,
                row_loss,
                saved,
            }),
            _ => Err(Error::InvalidArgument {
                what: "launch plan",
                detail: "the forward kept no loss or no row losses".into(),
            }),
        }
    }

    /// The forward into `out` under `choices`, or (None) the handle's after the self-check.
    #[allow(clippy::too_many_arguments)]
    fn forward_impl<T: CudaElement>(
        &self,
        spec: &MarginLoss,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        shape: Shape,
        out: GpuForwardOut<'_>,
        choices: Option<&plan::Choices>,
        inputs: &RowInputs<'_>,
        shard: Option<sharded::ShardCtx<'_>>,
    ) -> Result<GpuSaved> {
        // Partial FC: w has the rank's num_local classes, the problem its sampled columns.
        let w_classes = shard
            .as_ref()
            .and_then(|sc| sc.widx.as_ref())
            .map(|(_, n)| *n);
        let wshape = Shape {
            c: w_classes.unwrap_or(shape.c),
            ..shape
        };
        self.check_inputs(spec, x, w, labels, wshape)?;
        let host_margins = plan::row_margins(spec, inputs, shape.b)?;
        let mut outs = Vec::new();
        if let Some(v) = &out.loss {
            outs.push(self.check_out("loss", v, 1)?);
        }
        if let Some(v) = &out.row_loss {
            outs.push(self.check_out("row_loss", v, shape.b)?);
        }
        if !outs.is_empty() {
            let ins = [
                self.span::<T, _>("x", x),
                self.span::<T, _>("w", w),
                self.span::<i32, _>("labels", labels),
            ];
            check_disjoint(&ins, &outs)?;
        }
        // Sharded: the labels were checked and mapped to this rank's classes on the host.
        let host_labels = match &shard {
            Some(sc) => Some(sc.labels),
            None => self.host_labels(labels, shape)?,
        };
        let mut ch = match choices {
            Some(c) => *c,
            None => self.checked_choices::<T>(shape.d)?,
        };
        if shard.is_some() {
            ch.label_check = LabelCheck::Host;
        }
        let k = self.kernels(T::DTYPE)?;
        let problem = plan::ForwardProblem {
            dtype: T::DTYPE,
            shape,
            aligned: self.aligned16(x, w),
            params: FmParams::from_spec(spec),
            mean: spec.reduction == Reduction::Mean,
            row_margins: host_margins.is_some(),
        };
        let lp = match &shard {
            Some(sc) => plan::shard_forward(
                &self.device_facts(),
                &ch,
                &problem,
                sc.world,
                sc.widx.is_some(),
            )?,
            None => plan::forward(&self.device_facts(), &ch, &problem)?,
        };
        // Pageable host memory: the copy has read it when the call returns.
        let row_margins = match &host_margins {
            Some(m) => Some(
                self.stream
                    .clone_htod(m)
                    .map_err(|e| cuda_err("copy the row margins", e))?,
            ),
            None => None,
        };
        // The state in (16 bytes at most), as f64 bit patterns.
        let state_in = match plan::state_in(spec, inputs, shape.b)? {
            Some(v) => Some(
                self.stream
                    .clone_htod(&v)
                    .map_err(|e| cuda_err("copy the state in", e))?,
            ),
            None => None,
        };
        let bound = exec::Bound {
            x,
            w,
            labels,
            g_rows: None,
            saved: match &row_margins {
                Some(m) => vec![(Buf::RowMargins, m)],
                None => Vec::new(),
            },
            prev_status: None,
            state_in: state_in.as_ref(),
            comm: shard.as_ref().map(|sc| sc.comm),
            ints: match shard.as_ref().and_then(|sc| sc.widx.as_ref()) {
                Some((i, _)) => vec![(Buf::WIdx, i)],
                None => Vec::new(),
            },
            exchanged: shard.as_ref().map(|sc| sc.exchanged),
        };
        // The outputs without a caller's view go to buffers of this crate's, kept by the result.
        let mut own_loss = match out.loss {
            Some(_) => None,
            None => Some(self.alloc_output::<f32>(1)?),
        };
        let mut own_rows = match out.row_loss {
            Some(_) => None,
            None => Some(self.alloc_output::<f32>(shape.b)?),
        };
        let mut views: Vec<(Buf, exec::Out<'_, f32>)> = Vec::with_capacity(2);
        for (buf, given, own) in [
            (Buf::Loss, out.loss, &mut own_loss),
            (Buf::RowLoss, out.row_loss, &mut own_rows),
        ] {
            if let Some(v) = given.or_else(|| own.as_mut().map(|s| s.as_view_mut())) {
                views.push((buf, exec::Out::F32(v)));
            }
        }
        // A sharded plan's records stay out of the arena: the exchange copies them whole.
        let mut keep = plan::FORWARD_OUTPUTS.to_vec();
        if shard.is_some() {
            keep.extend([
                Buf::ShardRec,
                Buf::ShardAll,
                Buf::ShardCos,
                Buf::ShardCosAll,
            ]);
        }
        let mut kept = exec::execute::<T, f32>(self, &k, &lp, &bound, views, &keep)?;
        let labels = match host_labels {
            Some((counted, fingerprint)) => LabelState::Host {
                counted,
                fingerprint,
            },
            None => LabelState::Device(kept.i64(Buf::Status)?),
        };
        let (lse, x_norm, w_norm) = (
            kept.f32(Buf::Lse)?,
            kept.f32(Buf::XNorm)?,
            kept.f32(Buf::WNorm)?,
        );
        let target = kept.f32_if_any(Buf::Target);
        let dev_margins = kept.f32_if_any(Buf::DevMargins);
        let state_out = kept.i64_if_any(Buf::StateOut);
        // Lets go of the views into own_loss and own_rows.
        drop(kept);
        Ok(GpuSaved {
            lse,
            x_norm,
            w_norm,
            target,
            row_margins,
            dev_margins,
            state_out,
            loss: own_loss,
            row_loss: own_rows,
            workspace_bytes: lp.workspace_bytes,
            tensor_cores: lp.tensor_cores,
            wgmma: lp.wgmma,
            kernels: lp.launches().map(|l| l.entry.clone()).collect(),
            spec: *spec,
            shape,
            dtype: T::DTYPE,
            plan: self.options.plan,
            labels,
            sharded: shard.is_some(),
            widx: shard.and_then(|sc| sc.widx),
            stream: self.stream.clone(),
        })
    }

    /// Backward pass (docs/MATH.md "Backward") of `fwd`, gradients in the input dtype, in buffers
    /// this call allocates ([`Self::backward_into`] into them). The spec and shape are the
    /// forward's ([`GpuSaved::spec`], [`GpuSaved::shape`]); a [`GpuForward`] passes as
    /// `&fwd` (it dereferences to its [`GpuSaved`]).
    ///
    /// # What is checked against the forward
    ///
    /// Before any launch: the dtype, plan and [`LabelCheck`] mode are the forward's, every
    /// buffer's length fits the forward's shape and lives on this handle's device, and the
    /// upstream fits the reduction (finite, `|g| <= 1e12` for a scalar). Labels: under
    /// [`LabelCheck::Host`] their count and order-sensitive fingerprint are compared with the
    /// forward's (a typed error here); under [`LabelCheck::Device`] the device record is
    /// (reported by [`GpuBackwardRun::check`]).
    ///
    /// **`x` and `w` are not compared with the forward's.** The backward recomputes the logits
    /// from the `x` and `w` given and the norms and logsumexp the forward saved, so other inputs
    /// (even of the same shape) give wrong gradients without an error. The CPU reference does
    /// compare them (row norms and a fingerprint of every element); on the GPU that would be one
    /// more pass over `x` and `w` per step, and keeping them unchanged between the two calls is
    /// the caller's part, as with any saved activation.
    pub fn backward<T: CudaElement>(
        &self,
        fwd: &GpuSaved,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        upstream: GpuUpstream<'_>,
    ) -> Result<GpuGradients<T>> {
        self.backward_owned::<T, T>(fwd, x, w, labels, upstream, None)
    }

    /// Backward pass with f32 gradients whatever the input dtype (accumulation is f32 either way;
    /// this skips the final rounding to f16/bf16). Checks as [`Self::backward`].
    pub fn backward_f32<T: CudaElement>(
        &self,
        fwd: &GpuSaved,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        upstream: GpuUpstream<'_>,
    ) -> Result<GpuGradients<f32>> {
        self.backward_owned::<T, f32>(fwd, x, w, labels, upstream, None)
    }

    /// [`Self::backward`] that writes `dx` and `dw` (input dtype) into the caller's views
    /// (`out`; no copy: the kernels write them in place).
    ///
    /// Checked before any launch, besides [`Self::backward`]'s checks: each view's length
    /// (`dx` B x D, `dw` C x D, C K x D with sub-centers; [`Error::Length`] naming `"dx"` or
    /// `"dw"`), its device
    /// ([`Error::InvalidArgument`]), and that the two overlap neither each other nor `x`, `w`,
    /// `labels` or a per-row upstream ([`Error::InvalidArgument`] naming the output, both address
    /// ranges and lengths). The element type is the input dtype by the signature
    /// ([`Self::backward_f32_into`] for f32). The views need only their element alignment (the
    /// kernels store one element at a time), so dx and dw may be two views of one buffer at any
    /// split.
    pub fn backward_into<T: CudaElement>(
        &self,
        fwd: &GpuSaved,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        upstream: GpuUpstream<'_>,
        out: GpuGradOut<'_, T>,
    ) -> Result<GpuBackwardRun> {
        self.backward_with::<T, T>(fwd, x, w, labels, upstream, out, None)
    }

    /// [`Self::backward_f32`] into the caller's f32 views: checks as [`Self::backward_into`].
    pub fn backward_f32_into<T: CudaElement>(
        &self,
        fwd: &GpuSaved,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        upstream: GpuUpstream<'_>,
        out: GpuGradOut<'_, f32>,
    ) -> Result<GpuBackwardRun> {
        self.backward_with::<T, f32>(fwd, x, w, labels, upstream, out, None)
    }

    /// The allocating backward under `choices` (None: the handle's after the self-check): the
    /// `_into` path into two buffers allocated once the checks that need no launch have passed
    /// (so a bad call allocates nothing).
    fn backward_owned<T: CudaElement, O: CudaElement>(
        &self,
        fwd: &GpuSaved,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        upstream: GpuUpstream<'_>,
        choices: Option<&plan::Choices>,
    ) -> Result<GpuGradients<O>> {
        self.check_backward_args::<T>(fwd, x, w, labels, upstream)?;
        let shape = fwd.shape;
        let mut dx = self.alloc_output::<O>(shape.b * shape.d)?;
        let mut dw = self.alloc_output::<O>(shape.c * fwd.spec.variant.centers() * shape.d)?;
        let out = GpuGradOut {
            dx: dx.as_view_mut(),
            dw: dw.as_view_mut(),
        };
        let run = self.backward_with::<T, O>(fwd, x, w, labels, upstream, out, choices)?;
        Ok(GpuGradients { dx, dw, run })
    }

    /// The backward's checks against the forward and of the inputs and the upstream, in the
    /// order [`Self::backward_with`] makes them (cheap: no copy, no launch).
    fn check_backward_args<T: CudaElement>(
        &self,
        fwd: &GpuSaved,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        upstream: GpuUpstream<'_>,
    ) -> Result<()> {
        let (spec, shape) = (&fwd.spec, fwd.shape);
        // A sharded forward checked its labels on the host, whatever the handle's option.
        let label_check = if fwd.sharded {
            LabelCheck::Host
        } else {
            self.options.label_check
        };
        if fwd.label_check() != label_check {
            return Err(Error::ForwardMismatch {
                detail: format!(
                    "the forward checked labels with {:?}, this handle with {label_check:?}",
                    fwd.label_check(),
                ),
            });
        }
        if fwd.dtype != T::DTYPE || fwd.plan != self.options.plan {
            return Err(Error::ForwardMismatch {
                detail: format!(
                    "forward ran {:?} with {:?} inputs, backward is {:?} with {:?}",
                    fwd.plan,
                    fwd.dtype,
                    self.options.plan,
                    T::DTYPE
                ),
            });
        }
        // The upstream is checked before anything is launched; its per-row value for a scalar
        // needs the counted rows, known here only under LabelCheck::Host.
        match upstream {
            DeviceUpstream::Scalar(v) => check_scalar_upstream(spec.reduction, v as f64, shape.b)?,
            DeviceUpstream::PerRow(view) => {
                check_per_row_upstream(spec.reduction, view.len(), shape.b)?;
                self.check_device("upstream", view.stream())?;
            }
        }
        let wshape = Shape {
            c: fwd.widx.as_ref().map_or(shape.c, |(_, n)| *n),
            ..shape
        };
        self.check_inputs(spec, x, w, labels, wshape)
    }

    /// The backward into `out` under `choices`, or (None) the handle's after the self-check.
    #[allow(clippy::too_many_arguments)]
    fn backward_with<T: CudaElement, O: CudaElement>(
        &self,
        fwd: &GpuSaved,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        upstream: GpuUpstream<'_>,
        out: GpuGradOut<'_, O>,
        choices: Option<&plan::Choices>,
    ) -> Result<GpuBackwardRun> {
        let (spec, shape) = (&fwd.spec, fwd.shape);
        self.check_backward_args::<T>(fwd, x, w, labels, upstream)?;
        let per_row = match upstream {
            DeviceUpstream::Scalar(_) => None,
            DeviceUpstream::PerRow(view) => Some(view),
        };
        let outs = [
            self.check_out("dx", &out.dx, shape.b * shape.d)?,
            self.check_out("dw", &out.dw, shape.c * spec.variant.centers() * shape.d)?,
        ];
        let mut ins = vec![
            self.span::<T, _>("x", x),
            self.span::<T, _>("w", w),
            self.span::<i32, _>("labels", labels),
        ];
        if let Some(g) = per_row {
            ins.push(self.span::<f32, _>("upstream", g));
        }
        check_disjoint(&ins, &outs)?;
        let host_labels = if fwd.sharded {
            Some(sharded::local_label_state(self, labels, shape)?)
        } else {
            self.host_labels(labels, shape)?
        };
        let mut ch = match choices {
            Some(c) => *c,
            None => self.checked_choices::<T>(shape.d)?,
        };
        if fwd.sharded {
            ch.label_check = LabelCheck::Host;
        }
        let k = self.kernels(T::DTYPE)?;
        let upstream = match (host_labels, &fwd.labels) {
            (
                Some((counted, fingerprint)),
                LabelState::Host {
                    counted: fc,
                    fingerprint: ff,
                },
            ) => {
                if *fc != counted || *ff != fingerprint {
                    return Err(Error::ForwardMismatch {
                        detail: format!(
                            "labels differ from the forward's (counted {fc} vs {counted} of B = \
                             {}; same count means other values or another order)",
                            shape.b
                        ),
                    });
                }
                match upstream {
                    DeviceUpstream::Scalar(v) => {
                        let g =
                            scalar_upstream_per_row(spec.reduction, v as f64, shape.b, counted)?;
                        plan::PlanUpstream::Scalar(g as f32)
                    }
                    DeviceUpstream::PerRow(_) => plan::PlanUpstream::PerRow,
                }
            }
            // The per-row upstream comes from the device status (1/counted for the mean),
            // poisoned there when the labels are bad or not the forward's.
            (None, LabelState::Device(_)) => match upstream {
                DeviceUpstream::Scalar(v) => plan::PlanUpstream::Scalar(v),
                DeviceUpstream::PerRow(_) => plan::PlanUpstream::PerRow,
            },
            // Ruled out by the label_check comparison above; kept as the typed error it would be.
            (state, _) => {
                return Err(Error::ForwardMismatch {
                    detail: format!(
                        "the forward checked labels with {:?}, this backward with {:?}",
                        fwd.label_check(),
                        if state.is_some() {
                            LabelCheck::Host
                        } else {
                            LabelCheck::Device
                        }
                    ),
                })
            }
        };
        let problem = plan::BackwardProblem {
            dtype: T::DTYPE,
            grad_dtype: O::DTYPE,
            shape,
            aligned: self.aligned16(x, w),
            params: FmParams::from_spec(spec),
            mean: spec.reduction == Reduction::Mean,
            upstream,
            fwd_tensor_cores: fwd.tensor_cores,
            row_margins: fwd.row_margins.is_some(),
        };
        let lp = if fwd.sharded {
            plan::shard_backward(&self.device_facts(), &ch, &problem, fwd.widx.is_some())?
        } else {
            plan::backward(&self.device_facts(), &ch, &problem)?
        };
        let bound = exec::Bound {
            x,
            w,
            labels,
            g_rows: per_row,
            saved: {
                let mut saved = vec![
                    (Buf::XNorm, &fwd.x_norm),
                    (Buf::WNorm, &fwd.w_norm),
                    (Buf::Lse, &fwd.lse),
                ];
                if let Some(t) = &fwd.target {
                    saved.push((Buf::Target, t));
                }
                if let Some(m) = &fwd.row_margins {
                    saved.push((Buf::RowMargins, m));
                }
                if let Some(m) = &fwd.dev_margins {
                    saved.push((Buf::DevMargins, m));
                }
                saved
            },
            prev_status: match &fwd.labels {
                LabelState::Device(status) => Some(status),
                LabelState::Host { .. } => None,
            },
            state_in: None,
            comm: None,
            ints: match fwd.widx.as_ref() {
                Some((i, _)) => vec![(Buf::WIdx, i)],
                None => Vec::new(),
            },
            exchanged: None,
        };
        let views = vec![
            (Buf::Dx, exec::Out::Grad(out.dx)),
            (Buf::Dw, exec::Out::Grad(out.dw)),
        ];
        let mut kept =
            exec::execute::<T, O>(self, &k, &lp, &bound, views, &plan::BACKWARD_OUTPUTS)?;
        let label_status = match host_labels {
            Some(_) => None,
            None => Some((kept.i64(Buf::Status)?, self.stream.clone(), shape)),
        };
        Ok(GpuBackwardRun {
            workspace_bytes: lp.workspace_bytes,
            tensor_cores: lp.tensor_cores,
            kernels: lp.launches().map(|l| l.entry.clone()).collect(),
            label_status,
        })
    }
}

// The handle is shared across threads (one per stream, many callers): keep it Send + Sync.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<FusedMarginLoss>();
    assert_send_sync::<GpuForward>();
    assert_send_sync::<GpuSaved>();
    assert_send_sync::<GpuBackwardRun>();
    assert_send_sync::<Options>();
};
