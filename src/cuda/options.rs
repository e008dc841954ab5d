//! What a user chooses for a [`FusedMarginLoss`](super::FusedMarginLoss): one plain value,
//! fixed when the handle is made ([`FusedMarginLoss::with_options`](super::FusedMarginLoss::with_options)).
//!
//! What actually ran is in the results ([`GpuSaved::tensor_cores`](super::GpuSaved::tensor_cores),
//! [`GpuSaved::kernels`](super::GpuSaved::kernels), ...): an option is a permission, and the
//! plan builder (src/cuda/plan.rs) falls back where a path's conditions (dtype, `D`, alignment,
//! device) do not hold.

use super::LabelCheck;

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

/// How the fused forward multiplies f32 inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum F32Precision {
    /// Exact f32 arithmetic (SIMT tiles): the default.
    #[default]
    Exact,
    /// Opt-in: f32 inputs through TF32 tensor cores in the fused forward (kernels/logits_tc.cu,
    /// `mma.sync.m16n8k8` on operands rounded to TF32 with `cvt.rna`), when
    /// [`Options::tensor_cores`] is on, `D % 4 == 0` and `x`, `w` are 16-byte aligned. The
    /// backward then recomputes the logits from TF32-rounded operands too, so it stays consistent
    /// with the saved logsumexp. Precision: docs/MATH.md's TF32 bars (1e-3 loss, 5e-3 gradients,
    /// normwise) for inputs without extreme outliers; TF32 keeps 10 mantissa bits, so a cosine
    /// dominated by a few large entries carries ~5e-4 of error, which the scale `s` multiplies in
    /// the logits.
    ///
    /// Status: matches the reference within those bars on the CPU emulator of the kernels; not
    /// yet run or timed on a GPU.
    Tf32,
}

/// Kernel candidates only benchmarks and tests should pick: not part of the supported options,
/// and free to change or disappear when the benchmarks have decided between the candidates.
#[doc(hidden)]
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct KernelOverride {
    /// The tensor-core forward with 128 x 256 block tiles (warps of 64 x 64: four times the
    /// products per fragment load of the default 64 x 128 tiles, 92 KB of shared memory, one
    /// block per SM). Same results up to f32 summation order (BENCHMARKS.md). A device whose
    /// blocks cannot have that much shared memory keeps the default tiles.
    pub wide_forward_tiles: bool,
    /// On compute capability 9.0 (H100, H200) the f16/bf16 forward on wgmma, Hopper's warpgroup
    /// tensor-core instruction (kernels/logits_wg.cu: 128 x 128 tiles, both operands read from
    /// shared memory through descriptors, a 5-stage `cp.async` pipeline), under the tensor-core
    /// forward's conditions. The handle's kernels are then compiled for `sm_90a`, the
    /// architecture-specific target that has wgmma; elsewhere this changes nothing. Takes
    /// precedence over `wide_forward_tiles`.
    pub wgmma: bool,
}

/// Everything a user chooses for a [`FusedMarginLoss`](super::FusedMarginLoss), as one plain
/// value. [`Options::default`] is what [`FusedMarginLoss::new`](super::FusedMarginLoss::new)
/// uses.
///
/// The struct is `#[non_exhaustive]` (options may be added without a breaking change), so it is
/// built from the default and changed field by field:
///
/// ```
/// use fused_margin::cuda::{F32Precision, LabelCheck, Options, Plan};
/// let mut o = Options::default();
/// o.f32_precision = F32Precision::Tf32;
/// o.label_check = LabelCheck::Device;
/// assert_eq!(o.plan, Plan::Fused);
/// // let gpu = fused_margin::cuda::FusedMarginLoss::with_options(stream, o)?;
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Which sequence of kernels runs (default [`Plan::Fused`]).
    pub plan: Plan,
    /// Whether the fused forward may use tensor cores for f16/bf16 inputs (default true); f32
    /// inputs also need [`F32Precision::Tf32`]. Off selects the SIMT tiles, for comparison.
    pub tensor_cores: bool,
    /// How the fused forward multiplies f32 inputs (default [`F32Precision::Exact`]).
    pub f32_precision: F32Precision,
    /// The fused backward on tensor cores for f16/bf16 inputs (default true; kernels/grad_tc.cu),
    /// under the tensor-core forward's conditions (tensor cores on, `D % 8 == 0`, 16-byte aligned
    /// `x` and `w`); otherwise, or with `false`, the SIMT backward runs.
    ///
    /// Status: its results match the f64 reference within docs/MATH.md's bars on the CPU emulator
    /// of the kernels (tests/emulated_kernels.rs) and it compiles without spills for sm_90, but it
    /// has not yet run on a GPU. The device self-check ([`Options::self_check`]) compares it with
    /// the SIMT backward on the user's device before its first use and falls back on
    /// disagreement.
    pub tensor_core_backward: bool,
    /// Where labels are checked (default [`LabelCheck::Device`]: by a small kernel, with no
    /// synchronization; a bad label is reported when a result is read, as its documentation
    /// says). [`LabelCheck::Host`] checks them before any launch, at the cost of one synchronous
    /// copy per call: for debugging, or to have `forward` itself fail on a bad label. A backward
    /// must use its forward's setting.
    pub label_check: LabelCheck,
    /// Whether the naive plan may use cuBLAS for its three matrix products (default true, as
    /// eager frameworks do). Without libcublas, or with `false`, it uses its own plain kernels.
    /// The fused plan never uses cuBLAS.
    pub cublas: bool,
    /// Debugging aid (default false): fill every output and workspace with NaN before the
    /// kernels run, so an element a kernel failed to write shows up as NaN instead of a
    /// plausible stale value. Costs one fill kernel per output and one for the workspace arena
    /// per call.
    pub poison: bool,
    /// The device self-check (default true): the first time this handle would run a fast kernel
    /// path (tensor cores, TF32, the wide or wgmma tiles) for a dtype and D, it runs a small
    /// problem (B = 37, C = 300, that D) through it and through the SIMT kernels and compares
    /// every output with docs/MATH.md's bars; on disagreement it uses the SIMT kernels for that
    /// path from then on, says why once on stderr and records it
    /// ([`FusedMarginLoss::self_checks`](super::FusedMarginLoss::self_checks)). Costs two small
    /// forward-backward pairs and a few synchronous copies, once per path.
    pub self_check: bool,
    /// Benchmark-only kernel candidates (see `KernelOverride`); default: none.
    #[doc(hidden)]
    pub kernel_override: KernelOverride,
}

impl Default for Options {
    /// Fused plan, tensor cores on for f16/bf16 (forward and backward), exact f32, labels checked on
    /// the device, cuBLAS for the naive plan, no poisoning, the self-check on, no kernel override.
    fn default() -> Self {
        Self {
            plan: Plan::Fused,
            tensor_cores: true,
            f32_precision: F32Precision::Exact,
            tensor_core_backward: true,
            label_check: LabelCheck::Device,
            cublas: true,
            poison: false,
            self_check: true,
            kernel_override: KernelOverride::default(),
        }
    }
}
