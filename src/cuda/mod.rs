//! The GPU path: NVRTC-compiled kernels launched through cudarc on the caller's stream.
//!
//! [`default_stream`] opens a device and returns [`Error::NoDevice`] (never a panic) where there
//! is no driver or no GPU; the cudarc types a caller handles ([`CudaStream`], [`CudaSlice`],
//! [`CudaView`]) are re-exported here, and the whole of [`cudarc`] for the rest, so the caller
//! needs no cudarc dependency of its own (one of the same version also works: it is the same
//! crate).
//!
//! ```
//! use fused_margin::cuda::{default_stream, FusedMarginLoss, GpuUpstream};
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
//! let gpu = FusedMarginLoss::new(stream.clone())?;
//! let shape = Shape::new(2, 4, 3);
//! let x = stream.clone_htod(&[0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])?;
//! let w = stream.clone_htod(&[1.0f32; 12])?;
//! let labels = stream.clone_htod(&[0i32, 2])?;
//! let spec = MarginLoss::arcface(0.5);
//! let (xv, wv, lv) = (x.as_view(), w.as_view(), labels.as_view());
//! let fwd = gpu.forward(&spec, &xv, &wv, &lv, shape)?;
//! println!("loss {}", fwd.loss_host()?);
//! let grads = gpu.backward(&spec, &fwd, &xv, &wv, &lv, GpuUpstream::ONE)?;
//! assert_eq!((grads.dx.len(), grads.dw.len()), (8, 12));
//! # Ok(()) }
//! ```
//!
//! Validation happens in Rust before any launch. By default that includes the label range: the
//! B labels are copied to the host for it (one small synchronous copy per call).
//! [`LabelCheck::Device`] checks them on the device instead, with no synchronization, and reports
//! a bad label when a result is read ([`GpuForward::check`], [`GpuGradients::check`]).

mod compile;
mod exec;
mod labels;
mod libs;
pub mod measure;
pub mod params;
pub mod plan;
pub mod raw;

pub use labels::LabelCheck;

/// The cudarc this crate is built against (0.19): its device buffers, views and streams are what
/// [`FusedMarginLoss`] takes.
pub use cudarc;
/// cudarc's types in this module's signatures, re-exported so a caller can name them.
pub use cudarc::driver::{CudaSlice, CudaStream, CudaView};

pub use compile::{
    compile_ptx, compile_ptx_uncached, entry_name, nvrtc_available, source, ENTRY_POINTS,
    F32_ENTRY_POINTS, HALF_ENTRY_POINTS, KERNEL_DTYPES, SM90A_HALF_ENTRY_POINTS,
};

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::spec::{
    check_per_row_upstream, check_scalar_upstream, scalar_upstream_per_row, MarginLoss, Reduction,
    Shape,
};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, DevicePtr, DeviceRepr, DeviceSlice, DriverError,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use labels::LabelState;
use params::FmParams;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// An input element type the kernels accept: f32, half::f16, half::bf16.
pub trait CudaElement: Element + DeviceRepr + ValidAsZeroBits {}
impl CudaElement for f32 {}
impl CudaElement for half::f16 {}
impl CudaElement for half::bf16 {}

/// The kernels' option block for `spec`: `struct FmParams` of kernels/common.cuh, 12 four-byte
/// little-endian fields. For tools that run the kernel source themselves; the test suite's CPU
/// emulator (tests/emu) uses it so the emulated kernels see exactly what a launch passes.
#[doc(hidden)]
pub fn kernel_params_bytes(spec: &MarginLoss) -> Result<[u8; 48]> {
    spec.validate()?;
    let p = FmParams::from_spec(spec);
    let words: [u32; 12] = [
        p.s.to_bits(),
        p.m1.to_bits(),
        p.m2.to_bits(),
        p.m3.to_bits(),
        p.lambda.to_bits(),
        p.fallback_shift.to_bits(),
        p.policy as u32,
        p.detached as u32,
        p.angular as u32,
        p.normalize_features as u32,
        p.normalize_weights as u32,
        p.tf32_dots as u32,
    ];
    let mut out = [0u8; 48];
    for (chunk, w) in out.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    Ok(out)
}

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

/// Which sequence of kernels computes the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Plan {
    /// Fused tiles (the default): logits recomputed in backward, extra memory
    /// `O(B + C + B x class splits + B x D x splits)`, never `B x C`.
    #[default]
    Fused,
    /// One plain kernel per step with every intermediate materialized (`B x C` cosines, logits,
    /// softmax, ...): eager PyTorch's shape of work, kept as the benchmark and test baseline.
    Naive,
}

/// The upstream gradient for [`FusedMarginLoss::backward`].
#[derive(Debug, Clone, Copy)]
pub enum GpuUpstream<'a> {
    /// `dObjective/dloss` for mean and sum reductions (usually 1).
    Scalar(f32),
    /// One value per row, on the device, for `Reduction::None`.
    PerRow(&'a CudaView<'a, f32>),
}

impl GpuUpstream<'_> {
    /// The usual upstream of a scalar loss: 1.
    pub const ONE: GpuUpstream<'static> = GpuUpstream::Scalar(1.0);
}

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
    /// Bytes of temporary device memory the forward allocated beyond its outputs (the crate's own
    /// accounting of every workspace buffer).
    pub workspace_bytes: usize,
    /// Whether the logits tiles ran on tensor cores: fused plan, tensor cores not switched off,
    /// 16-byte aligned inputs, and f16/bf16 with `D % 8 == 0` or f32 through TF32
    /// ([`FusedMarginLoss::with_tf32`]) with `D % 4 == 0`.
    pub tensor_cores: bool,
    /// Whether they ran on Hopper's wgmma (kernels/logits_wg.cu; [`FusedMarginLoss::with_wgmma`]).
    pub wgmma: bool,
    spec: MarginLoss,
    shape: Shape,
    dtype: DType,
    plan: Plan,
    labels: LabelState,
    stream: Arc<CudaStream>,
}

impl GpuForward {
    /// Ok when the labels were valid. Under [`LabelCheck::Host`] that was checked before the
    /// launch and this costs nothing; under [`LabelCheck::Device`] it copies the device's label
    /// status to the host (synchronizes the stream) and returns the
    /// [`Error::LabelOutOfRange`] it reports.
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

    /// The shape this result was computed for.
    pub fn shape(&self) -> Shape {
        self.shape
    }
}

/// Gradients on the device, in the input dtype `O = T` or in f32 (see
/// [`FusedMarginLoss::backward_f32`]).
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
    /// Under [`LabelCheck::Device`]: the backward's label status and the shape, for
    /// [`Self::check`].
    label_status: Option<(CudaSlice<i64>, Arc<CudaStream>, Shape)>,
}

impl<O> GpuGradients<O> {
    /// Ok when the backward's labels were valid and the forward's. Under [`LabelCheck::Host`]
    /// that was checked before the launch and this costs nothing; under [`LabelCheck::Device`] it
    /// copies the device's label status to the host (synchronizes the stream) and returns the
    /// [`Error::LabelOutOfRange`] or [`Error::ForwardMismatch`] it reports (the gradients are
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

/// The GPU loss operator bound to one stream. Kernels are compiled by NVRTC once per
/// (input dtype, architecture) per process and loaded once per handle; the handle is
/// `Send + Sync` and can be shared between threads.
pub struct FusedMarginLoss {
    stream: Arc<CudaStream>,
    arch: String,
    sm_count: u32,
    /// The most dynamic shared memory a block may opt into (99 KB on sm_86/89, 163 KB on sm_80,
    /// 227 KB on sm_90): tile shapes that need more are not selected.
    smem_optin: u32,
    plan: Plan,
    poison: bool,
    use_cublas: bool,
    tensor_cores: bool,
    tc_backward: bool,
    tf32: bool,
    wide_tiles: bool,
    wgmma: bool,
    /// Compute capability (major, minor).
    cc: (i32, i32),
    label_check: LabelCheck,
    blas: OnceLock<Option<CudaBlas>>,
    modules: Mutex<HashMap<DType, Arc<Kernels>>>,
}

impl std::fmt::Debug for FusedMarginLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedMarginLoss")
            .field("arch", &self.arch)
            .field("sm_count", &self.sm_count)
            .field("smem_optin", &self.smem_optin)
            .field("plan", &self.plan)
            .field("poison", &self.poison)
            .field("use_cublas", &self.use_cublas)
            .field("tensor_cores", &self.tensor_cores)
            .field("tc_backward", &self.tc_backward)
            .field("tf32", &self.tf32)
            .field("wide_tiles", &self.wide_tiles)
            .finish()
    }
}

/// One loaded module and the functions fetched from it so far.
pub(crate) struct Kernels {
    module: Arc<CudaModule>,
    dtype: DType,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

impl Kernels {
    /// The entry point `base` for this module's dtype (e.g. `fm_grad_w` -> `fm_grad_w_bf16`).
    pub(crate) fn get(&self, base: &str) -> Result<CudaFunction> {
        self.get_with_smem(base, 0)
    }

    /// `get` for a kernel launched with `smem_bytes` of dynamic shared memory (always the same
    /// for one entry point): on first load the function is allowed that much, which CUDA
    /// requires above 48 KB. Cached with the function, so launches pay no driver call for it.
    pub(crate) fn get_with_smem(&self, base: &str, smem_bytes: u32) -> Result<CudaFunction> {
        let name = entry_name(base, self.dtype);
        let mut fns = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = fns.get(&name) {
            return Ok(f.clone());
        }
        let f = self
            .module
            .load_function(&name)
            .map_err(|e| cuda_err(&format!("load kernel {name}"), e))?;
        if smem_bytes > 0 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes as i32,
            )
            .map_err(|e| cuda_err(&format!("allow {smem_bytes} B of dynamic shared memory for {name}"), e))?;
        }
        fns.insert(name, f.clone());
        Ok(f)
    }
}

pub(crate) fn cuda_err(context: &str, e: DriverError) -> Error {
    Error::Cuda {
        context: context.to_string(),
        detail: format!("{e:?}"),
    }
}

/// A 1-D launch of `n` threads in blocks of `threads`.
pub(crate) fn grid_1d(n: u64, threads: u32) -> Result<LaunchConfig> {
    let blocks = n.div_ceil(threads as u64);
    if blocks > u32::MAX as u64 {
        return Err(Error::TooLarge {
            what: "launch",
            detail: format!("{n} threads need {blocks} blocks of {threads} (> 2^32 - 1)"),
        });
    }
    Ok(LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

impl FusedMarginLoss {
    /// A handle on `stream` with the default (fused) plan. Reads the device's architecture and
    /// SM count; compiles nothing yet.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
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
        Ok(Self {
            stream,
            arch: format!("sm_{major}{minor}"),
            sm_count,
            smem_optin,
            plan: Plan::Fused,
            poison: false,
            use_cublas: true,
            tensor_cores: true,
            tc_backward: false,
            tf32: false,
            wide_tiles: false,
            wgmma: false,
            cc: (major, minor),
            label_check: LabelCheck::Host,
            blas: OnceLock::new(),
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// Selects the plan used by later calls.
    pub fn with_plan(mut self, plan: Plan) -> Self {
        self.plan = plan;
        self
    }

    /// Whether the fused forward may use tensor cores for f16/bf16 inputs (default true; f32 inputs
    /// use exact f32 arithmetic unless [`Self::with_tf32`] opts in). Switching off selects the SIMT
    /// tiles, for comparison.
    pub fn with_tensor_cores(mut self, on: bool) -> Self {
        self.tensor_cores = on;
        self
    }

    /// Whether tensor cores are allowed for the fused forward (see [`Self::with_tensor_cores`]).
    pub fn tensor_cores_enabled(&self) -> bool {
        self.tensor_cores
    }

    /// Opt-in (default false): f32 inputs through TF32 tensor cores in the fused forward
    /// (kernels/logits_tc.cu, `mma.sync.m16n8k8` on operands rounded to TF32 with `cvt.rna`),
    /// when tensor cores are on, `D % 4 == 0` and `x`, `w` are 16-byte aligned. The backward then
    /// recomputes the logits from TF32-rounded operands too, so it stays consistent with the saved
    /// logsumexp. Precision: MATH.md's TF32 bars (1e-3 loss, 5e-3 gradients, normwise) for inputs
    /// without extreme outliers; TF32 keeps 10 mantissa bits, so a cosine dominated by a few large
    /// entries carries ~5e-4 of error, which the scale `s` multiplies in the logits. Exact f32
    /// stays the default.
    ///
    /// Status: matches the reference within those bars on the CPU emulator of the kernels; not yet
    /// run or timed on a GPU.
    pub fn with_tf32(mut self, on: bool) -> Self {
        self.tf32 = on;
        self
    }

    /// Whether TF32 is allowed for f32 inputs (see [`Self::with_tf32`]).
    pub fn tf32_enabled(&self) -> bool {
        self.tf32
    }

    /// Experimental (default false): the tensor-core forward with 128 x 256 block tiles (warps of
    /// 64 x 64: four times the products per fragment load of the default 64 x 128 tiles, 92 KB of
    /// shared memory, one block per SM). Same results up to f32 summation order; kept as a
    /// candidate until the benchmarks decide between the two (BENCHMARKS.md). A device whose
    /// blocks cannot have that much shared memory keeps the default tiles.
    pub fn with_wide_forward_tiles(mut self, on: bool) -> Self {
        self.wide_tiles = on;
        self
    }

    /// Whether the wide forward tiles are selected (see [`Self::with_wide_forward_tiles`]).
    pub fn wide_forward_tiles(&self) -> bool {
        self.wide_tiles
    }

    /// Experimental (default false): on compute capability 9.0 (H100, H200) the f16/bf16 forward
    /// on wgmma, Hopper's warpgroup tensor-core instruction (kernels/logits_wg.cu: 128 x 128
    /// tiles, both operands read from shared memory through descriptors, a 5-stage `cp.async`
    /// pipeline), under the tensor-core forward's conditions (tensor cores on, `D % 8 == 0`,
    /// 16-byte aligned `x` and `w`). The kernels are then compiled for `sm_90a`, the
    /// architecture-specific target that has wgmma. Elsewhere this changes nothing. Takes
    /// precedence over [`Self::with_wide_forward_tiles`].
    ///
    /// Status: matches the reference within MATH.md's bars on the CPU emulator of the kernels
    /// (which models wgmma's descriptors and 128-byte swizzle from the PTX ISA); not yet run on
    /// a GPU.
    pub fn with_wgmma(mut self, on: bool) -> Self {
        self.wgmma = on;
        let arch = if on && self.cc == (9, 0) {
            "sm_90a".to_string()
        } else {
            format!("sm_{}{}", self.cc.0, self.cc.1)
        };
        if arch != self.arch {
            self.arch = arch;
            self.modules = Mutex::new(HashMap::new());
        }
        self
    }

    /// Whether the forward may use wgmma: requested and the device is compute capability 9.0.
    pub fn wgmma_enabled(&self) -> bool {
        self.wgmma && self.arch == "sm_90a"
    }

    /// Opt-in (default false): the fused backward on tensor cores for f16/bf16 inputs
    /// (kernels/grad_tc.cu), under the same conditions as the tensor-core forward (tensor cores
    /// on, `D % 8 == 0`, 16-byte aligned `x` and `w`); otherwise the SIMT backward runs.
    ///
    /// Status: its results match the f64 reference within MATH.md's bars on the CPU emulator of
    /// the kernels (tests/emulated_kernels.rs), and it compiles without spills for sm_90, but it
    /// has not yet run on a GPU; it becomes the default once the GPU suite has passed it there.
    pub fn with_tensor_core_backward(mut self, on: bool) -> Self {
        self.tc_backward = on;
        self
    }

    /// Whether the tensor-core backward is requested (see [`Self::with_tensor_core_backward`]).
    pub fn tensor_core_backward_enabled(&self) -> bool {
        self.tc_backward
    }

    /// Where labels are checked (default [`LabelCheck::Host`]: before any launch, one synchronous
    /// copy per call). [`LabelCheck::Device`] removes that synchronization; see its documentation
    /// for how errors are reported then. Forward and backward must use the same setting.
    pub fn with_label_check(mut self, check: LabelCheck) -> Self {
        self.label_check = check;
        self
    }

    /// Where labels are checked (see [`Self::with_label_check`]).
    pub fn label_check(&self) -> LabelCheck {
        self.label_check
    }

    /// Whether the naive plan may use cuBLAS for its three matrix products (default true, as
    /// eager frameworks do). Without libcublas, or with `false`, it uses its own plain kernels.
    pub fn with_cublas(mut self, on: bool) -> Self {
        self.use_cublas = on;
        self.blas = OnceLock::new();
        self
    }

    /// The cuBLAS handle the naive plan uses, created on first use; `None` when disabled or when
    /// libcublas cannot be loaded.
    pub(crate) fn blas(&self) -> Option<&CudaBlas> {
        self.blas
            .get_or_init(|| {
                if !self.use_cublas || !libs::cublas_present() {
                    return None;
                }
                CudaBlas::new(self.stream.clone()).ok()
            })
            .as_ref()
    }

    /// True when the naive plan's matrix products run on cuBLAS (see [`Self::with_cublas`]).
    pub fn naive_uses_cublas(&self) -> bool {
        self.blas().is_some()
    }

    /// Debugging aid: fill every output and workspace with NaN before the kernels run, so an
    /// element a kernel failed to write shows up as NaN instead of a plausible stale value.
    pub fn with_poison(mut self, on: bool) -> Self {
        self.poison = on;
        self
    }

    /// The plan in use.
    pub fn plan(&self) -> Plan {
        self.plan
    }

    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device architecture the kernels are compiled for, e.g. `"sm_90"` (`"sm_90a"` with
    /// [`Self::with_wgmma`] on an H100/H200).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub(crate) fn kernels(&self, dtype: DType) -> Result<Arc<Kernels>> {
        let mut mods = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = mods.get(&dtype) {
            return Ok(k.clone());
        }
        let ptx = compile_ptx(dtype, &self.arch)?;
        let module = self
            .stream
            .context()
            .load_module(ptx)
            .map_err(|e| cuda_err("load kernel module", e))?;
        let k = Arc::new(Kernels {
            module,
            dtype,
            functions: Mutex::new(HashMap::new()),
        });
        mods.insert(dtype, k.clone());
        Ok(k)
    }

    /// Allocates `n` elements, uninitialized (as `torch.empty`): zero-filling every output and
    /// workspace cost one memset per buffer, about ten stream operations per forward and backward,
    /// which at small C is host time on the critical path. Poisoned with NaN when poisoning is on.
    pub(crate) fn alloc<O: CudaElement>(&self, k: &Kernels, n: usize) -> Result<CudaSlice<O>> {
        // SAFETY: the memory is uninitialized. Every caller passes the buffer to kernels that write
        // each element before anything reads it: the forward's and backward's outputs and
        // workspaces are written whole (rows < B, classes < C, dims < D, every split), and where a
        // kernel skips an element (z_iy of a row whose label is not in 0..C) no reader touches it.
        // The GPU suite runs with poisoning on, so an element read before it is written shows as
        // NaN there. f32, f16 and bf16 have no invalid bit patterns.
        let mut s = unsafe { self.stream.alloc::<O>(n.max(1)) }
            .map_err(|e| cuda_err(&format!("allocate {n} x {}", O::DTYPE.suffix()), e))?;
        if self.poison {
            self.fill_nan(k, &mut s)?;
        }
        Ok(s)
    }

    fn fill_nan<O: CudaElement>(&self, k: &Kernels, s: &mut CudaSlice<O>) -> Result<()> {
        let n = s.len() as i64;
        let cfg = grid_1d(n as u64, 256)?;
        match O::DTYPE.size() {
            4 => {
                let f = k.get("fm_fill_u32")?;
                let nan: u32 = 0x7fc0_0000;
                let mut b = self.stream.launch_builder(&f);
                b.arg(s).arg(&n).arg(&nan);
                // SAFETY: fm_fill_u32(unsigned*, i64 n, unsigned) writes n 4-byte elements of a
                // buffer of exactly n 4-byte elements.
                unsafe { b.launch(cfg) }.map_err(|e| cuda_err("poison buffer", e))?;
            }
            _ => {
                let f = k.get("fm_fill_u16")?;
                // f16 NaN 0x7e00; bf16 NaN 0x7fc0.
                let nan: u16 = if O::DTYPE == DType::BF16 {
                    0x7fc0
                } else {
                    0x7e00
                };
                let mut b = self.stream.launch_builder(&f);
                b.arg(s).arg(&n).arg(&nan);
                // SAFETY: fm_fill_u16(unsigned short*, i64 n, unsigned short) writes n 2-byte
                // elements of a buffer of exactly n 2-byte elements.
                unsafe { b.launch(cfg) }.map_err(|e| cuda_err("poison buffer", e))?;
            }
        }
        Ok(())
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

    /// Checks spec, shape, buffer lengths and devices before any launch, then the labels under
    /// [`LabelCheck::Host`]: copied to the host and checked there, giving (counted rows,
    /// fingerprint). Under [`LabelCheck::Device`] (None) the plan's first launch checks them.
    fn validate<T: CudaElement>(
        &self,
        spec: &MarginLoss,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        shape: Shape,
    ) -> Result<Option<(usize, u64)>> {
        spec.validate()?;
        shape.check_lengths(x.len(), w.len(), labels.len())?;
        self.check_device("x", x.stream())?;
        self.check_device("w", w.stream())?;
        self.check_device("labels", labels.stream())?;
        if shape.d > i32::MAX as usize {
            return Err(Error::TooLarge {
                what: "shape",
                detail: format!("D = {} must be < 2^31", shape.d),
            });
        }
        match self.label_check {
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

    /// What the plan builder knows of this handle's device.
    pub fn device_facts(&self) -> plan::DeviceFacts {
        plan::DeviceFacts {
            cc: self.cc,
            sm_count: self.sm_count as usize,
            smem_optin: self.smem_optin,
            sm90a: self.arch == "sm_90a",
            cublas: self.plan == Plan::Naive && self.blas().is_some(),
        }
    }

    /// The handle's switches as the plan builder reads them.
    pub fn choices(&self) -> plan::Choices {
        plan::Choices {
            plan: self.plan,
            tensor_cores: self.tensor_cores,
            tf32: self.tf32,
            wide_tiles: self.wide_tiles,
            wgmma: self.wgmma,
            tc_backward: self.tc_backward,
            label_check: self.label_check,
            tiles_per_split: None,
        }
    }

    /// True when both views start at 16-byte aligned device addresses (cp.async's 16-byte copies
    /// need it).
    fn aligned16<T: CudaElement>(&self, x: &CudaView<'_, T>, w: &CudaView<'_, T>) -> bool {
        let (px, _rx) = x.device_ptr(&self.stream);
        let (pw, _rw) = w.device_ptr(&self.stream);
        px % 16 == 0 && pw % 16 == 0
    }

    /// Forward pass on the GPU (MATH.md "Forward"). `x`: B x D, `w`: C x D, `labels`: B i32
    /// (negative = ignored), all on this handle's device.
    pub fn forward<T: CudaElement>(
        &self,
        spec: &MarginLoss,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        shape: Shape,
    ) -> Result<GpuForward> {
        let host_labels = self.validate(spec, x, w, labels, shape)?;
        let k = self.kernels(T::DTYPE)?;
        let problem = plan::ForwardProblem {
            dtype: T::DTYPE,
            shape,
            aligned: self.aligned16(x, w),
            params: FmParams::from_spec(spec),
            mean: spec.reduction == Reduction::Mean,
        };
        let lp = plan::forward(&self.device_facts(), &self.choices(), &problem)?;
        let bound = exec::Bound {
            x,
            w,
            labels,
            g_rows: None,
            saved: Vec::new(),
            prev_status: None,
        };
        use plan::Buf;
        let keep = [
            Buf::Loss,
            Buf::RowLoss,
            Buf::Lse,
            Buf::XNorm,
            Buf::WNorm,
            Buf::Status,
        ];
        let mut kept = exec::execute::<T, f32>(self, &k, &lp, &bound, &keep)?;
        let label_state = match host_labels {
            Some((counted, fingerprint)) => LabelState::Host {
                counted,
                fingerprint,
            },
            None => LabelState::Device(kept.i64(Buf::Status)?),
        };
        let out = ForwardOut {
            loss: kept.f32(Buf::Loss)?,
            row_loss: kept.f32(Buf::RowLoss)?,
            lse: kept.f32(Buf::Lse)?,
            x_norm: kept.f32(Buf::XNorm)?,
            w_norm: kept.f32(Buf::WNorm)?,
            workspace_bytes: lp.workspace_bytes,
            tensor_cores: lp.tensor_cores,
            wgmma: lp.wgmma,
        };
        Ok(GpuForward {
            loss: out.loss,
            row_loss: out.row_loss,
            lse: out.lse,
            x_norm: out.x_norm,
            w_norm: out.w_norm,
            workspace_bytes: out.workspace_bytes,
            tensor_cores: out.tensor_cores,
            wgmma: out.wgmma,
            spec: *spec,
            shape,
            dtype: T::DTYPE,
            plan: self.plan,
            labels: label_state,
            stream: self.stream.clone(),
        })
    }

    /// Backward pass (MATH.md "Backward"), gradients in the input dtype.
    ///
    /// # What is checked against the forward
    ///
    /// Before any launch: the spec is valid and equal to the forward's, the dtype, plan and
    /// [`LabelCheck`] mode are the forward's, every buffer's length fits the forward's shape and
    /// lives on this handle's device, and the upstream fits the reduction (finite, `|g| <= 1e12`
    /// for a scalar). Labels: under [`LabelCheck::Host`] their count and order-sensitive
    /// fingerprint are compared with the forward's (a typed error here); under
    /// [`LabelCheck::Device`] the device record is (reported by [`GpuGradients::check`]).
    ///
    /// **`x` and `w` are not compared with the forward's.** The backward recomputes the logits
    /// from the `x` and `w` given and the norms and logsumexp the forward saved, so other inputs
    /// (even of the same shape) give wrong gradients without an error. The CPU reference does
    /// compare them (row norms and a fingerprint of every element); on the GPU that would be one
    /// more pass over `x` and `w` per step, and keeping them unchanged between the two calls is
    /// the caller's part, as with any saved activation.
    pub fn backward<T: CudaElement>(
        &self,
        spec: &MarginLoss,
        fwd: &GpuForward,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        upstream: GpuUpstream<'_>,
    ) -> Result<GpuGradients<T>> {
        self.backward_impl::<T, T>(spec, fwd, x, w, labels, upstream)
    }

    /// Backward pass with f32 gradients whatever the input dtype (accumulation is f32 either way;
    /// this skips the final rounding to f16/bf16).
    pub fn backward_f32<T: CudaElement>(
        &self,
        spec: &MarginLoss,
        fwd: &GpuForward,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        upstream: GpuUpstream<'_>,
    ) -> Result<GpuGradients<f32>> {
        self.backward_impl::<T, f32>(spec, fwd, x, w, labels, upstream)
    }

    fn backward_impl<T: CudaElement, O: CudaElement>(
        &self,
        spec: &MarginLoss,
        fwd: &GpuForward,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        upstream: GpuUpstream<'_>,
    ) -> Result<GpuGradients<O>> {
        // An invalid spec is named as such, before it is compared with the forward's.
        spec.validate()?;
        let shape = fwd.shape;
        if fwd.label_check() != self.label_check {
            return Err(Error::ForwardMismatch {
                detail: format!(
                    "the forward checked labels with {:?}, this handle with {:?}",
                    fwd.label_check(),
                    self.label_check
                ),
            });
        }
        if fwd.spec != *spec {
            return Err(Error::ForwardMismatch {
                detail: format!("forward spec {:?}, backward spec {:?}", fwd.spec, spec),
            });
        }
        if fwd.dtype != T::DTYPE || fwd.plan != self.plan {
            return Err(Error::ForwardMismatch {
                detail: format!(
                    "forward ran {:?} with {:?} inputs, backward is {:?} with {:?}",
                    fwd.plan,
                    fwd.dtype,
                    self.plan,
                    T::DTYPE
                ),
            });
        }
        // The upstream is checked before anything is launched; its per-row value for a scalar
        // needs the counted rows, known here only under LabelCheck::Host.
        let per_row = match upstream {
            GpuUpstream::Scalar(v) => {
                check_scalar_upstream(spec.reduction, v as f64, shape.b)?;
                None
            }
            GpuUpstream::PerRow(view) => {
                check_per_row_upstream(spec.reduction, view.len(), shape.b)?;
                self.check_device("upstream", view.stream())?;
                Some(view)
            }
        };
        let host_labels = self.validate(spec, x, w, labels, shape)?;
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
                    GpuUpstream::Scalar(v) => {
                        let g =
                            scalar_upstream_per_row(spec.reduction, v as f64, shape.b, counted)?;
                        plan::PlanUpstream::Scalar(g as f32)
                    }
                    GpuUpstream::PerRow(_) => plan::PlanUpstream::PerRow,
                }
            }
            // The per-row upstream comes from the device status (1/counted for the mean),
            // poisoned there when the labels are bad or not the forward's.
            (None, LabelState::Device(_)) => match upstream {
                GpuUpstream::Scalar(v) => plan::PlanUpstream::Scalar(v),
                GpuUpstream::PerRow(_) => plan::PlanUpstream::PerRow,
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
        };
        let lp = plan::backward(&self.device_facts(), &self.choices(), &problem)?;
        use plan::Buf;
        let bound = exec::Bound {
            x,
            w,
            labels,
            g_rows: per_row,
            saved: vec![
                (Buf::XNorm, &fwd.x_norm),
                (Buf::WNorm, &fwd.w_norm),
                (Buf::Lse, &fwd.lse),
            ],
            prev_status: match &fwd.labels {
                LabelState::Device(status) => Some(status),
                LabelState::Host { .. } => None,
            },
        };
        let mut kept =
            exec::execute::<T, O>(self, &k, &lp, &bound, &[Buf::Dx, Buf::Dw, Buf::Status])?;
        let label_status = match host_labels {
            Some(_) => None,
            None => Some((kept.i64(Buf::Status)?, self.stream.clone(), shape)),
        };
        Ok(GpuGradients {
            dx: kept.grad(Buf::Dx)?,
            dw: kept.grad(Buf::Dw)?,
            workspace_bytes: lp.workspace_bytes,
            tensor_cores: lp.tensor_cores,
            label_status,
        })
    }
}

/// What a plan's forward hands back to [`FusedMarginLoss::forward`].
pub(crate) struct ForwardOut {
    pub tensor_cores: bool,
    pub wgmma: bool,
    pub loss: CudaSlice<f32>,
    pub row_loss: CudaSlice<f32>,
    pub lse: CudaSlice<f32>,
    pub x_norm: CudaSlice<f32>,
    pub w_norm: CudaSlice<f32>,
    pub workspace_bytes: usize,
}

// The handle is shared across threads (one per stream, many callers): keep it Send + Sync.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<FusedMarginLoss>();
    assert_send_sync::<GpuForward>();
};
