//! The launch plan as data: which kernels a forward or a backward launches, in what order, with
//! what grid, block, dynamic shared memory and arguments, decided once from the device's facts,
//! the caller's choices and the problem, before anything runs.
//!
//! Two executors run a [`LaunchPlan`]: the cudarc one (src/cuda/exec.rs, the product) and the
//! CPU emulator of the kernels (tests/emu), whose C++ side is only a table from entry-point name
//! to kernel. So the selection logic here (tile shapes by shared-memory limit, class splits by SM
//! count, the precedence of the options, argument order) is what the emulated tests exercise,
//! and nothing else knows it. Buffers are named by role ([`Buf`]); the executor binds the
//! caller's inputs and allocates the rest from [`LaunchPlan::buffers`].
//!
//! Nothing here touches a device: the builders are plain functions of plain values, so their
//! choices are unit-tested for device kinds this machine does not have.

use super::args::{self, GradArgs, Layout, Packed, TileArgs};
use super::params::{FmParams, VariantCode};
use super::LabelCheck;
use super::Plan;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::spec::{MarginLoss, Shape};
use crate::variant::{LossState, RowInputs, Variant};

/// What the builder needs to know of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceFacts {
    /// Compute capability (major, minor).
    pub cc: (i32, i32),
    /// Streaming multiprocessors: class splits aim for [`BLOCKS_PER_SM`] blocks on each.
    pub sm_count: usize,
    /// The most dynamic shared memory one block may opt into (bytes): tile shapes needing more
    /// are not selected.
    pub smem_optin: u32,
    /// Whether the loaded module holds the sm_90a kernels (wgmma): only an sm_90 device with
    /// wgmma asked for.
    pub sm90a: bool,
    /// Whether cuBLAS is loaded for the naive plan's matrix products.
    pub cublas: bool,
}

impl DeviceFacts {
    /// A100 (sm_80): 108 SMs, 163 KB of opt-in shared memory per block.
    pub const A100: Self = Self::new((8, 0), 108, 166_912);
    /// RTX 30xx / A10 class (sm_86): 99 KB per block; SM count of an RTX 3090.
    pub const SM86: Self = Self::new((8, 6), 82, 101_376);
    /// RTX 40xx / L4 / L40 class (sm_89): 99 KB per block; SM count of an L40.
    pub const SM89: Self = Self::new((8, 9), 142, 101_376);
    /// H100 PCIe (sm_90): 114 SMs, 227 KB per block.
    pub const H100_PCIE: Self = Self::new((9, 0), 114, 232_448);
    /// H100 SXM / H200 (sm_90): 132 SMs, 227 KB per block.
    pub const H100: Self = Self::new((9, 0), 132, 232_448);

    /// Facts with sm90a and cuBLAS off.
    pub const fn new(cc: (i32, i32), sm_count: usize, smem_optin: u32) -> Self {
        Self {
            cc,
            sm_count,
            smem_optin,
            sm90a: false,
            cublas: false,
        }
    }
}

/// What the caller chose (the handle's switches), as the builder reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choices {
    /// Fused or naive.
    pub plan: Plan,
    /// Tensor cores for the f16/bf16 forward (and, with `tf32`, the f32 one).
    pub tensor_cores: bool,
    /// The f32 forward through TF32 tensor cores.
    pub tf32: bool,
    /// The 128 x 256 tensor-core forward tiles.
    pub wide_tiles: bool,
    /// The wgmma forward (needs [`DeviceFacts::sm90a`]).
    pub wgmma: bool,
    /// The f16/bf16 backward on tensor cores.
    pub tc_backward: bool,
    /// Where labels are checked.
    pub label_check: LabelCheck,
    /// Testing only: class tiles per split of the forward and of the dx backward instead of the
    /// SM-count heuristic (the emulated tests force several splits on small shapes with it).
    pub tiles_per_split: Option<(usize, usize)>,
}

impl Default for Choices {
    /// The handle's defaults ([`super::Options::default`]): fused plan, tensor cores on forward
    /// and backward, everything opt-in off, labels checked on the device.
    fn default() -> Self {
        Self {
            plan: Plan::Fused,
            tensor_cores: true,
            tf32: false,
            wide_tiles: false,
            wgmma: false,
            tc_backward: true,
            label_check: LabelCheck::Device,
            tiles_per_split: None,
        }
    }
}

/// A buffer by its role in a step. The executor binds the caller's (inputs, the forward's saved
/// values) and allocates the others as [`LaunchPlan::buffers`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Buf {
    /// Features, B x D of the input dtype (given).
    X,
    /// Class weights, C x D of the input dtype (given).
    W,
    /// B labels of this call (given).
    Labels,
    /// The caller's per-row upstream, B f32 (given, backward with `Reduction::None`).
    GRows,
    /// The forward's label status record under [`LabelCheck::Device`] (given to the backward).
    PrevStatus,
    /// This call's label status record, [`STATUS_LEN`] i64 (zeroed; kept by the result).
    Status,
    /// Row norms of x, B f32 (forward output; given to the backward).
    XNorm,
    /// Row norms of w, C f32 (forward output; given to the backward).
    WNorm,
    /// Per-row logsumexp, B f32 (forward output; given to the backward).
    Lse,
    /// Per-row loss, B f32 (forward output).
    RowLoss,
    /// The reduced loss, 1 f32 (forward output).
    Loss,
    /// Per-row online-softmax maxima per class split, B x nsplit f32.
    PartM,
    /// Per-row online-softmax sums per class split, B x nsplit f32.
    PartS,
    /// The target logit per row, B f32.
    Zy,
    /// The target record, [`target_len`] f32: per row (target(c_iy), dtarget/dc) interleaved,
    /// then sections of B floats (the cross-entropy, CurricularFace's threshold, the target
    /// cosine, MagFace's regularizer and norm-gradient coefficients) and CurricularFace's `t`
    /// (kernels/common.cuh `FM_TGT_*`; `fm_target_rows`, read by every tile kernel; forward
    /// output, given to the backward).
    Target,
    /// The tensor-core backward's power-of-two scale K, 1 f32.
    Scale,
    /// The caller's per-row margins `(m2_i, m3_i)`, 2 B f32 (given: ElasticFace's, as drawn).
    RowMargins,
    /// The per-row margins `(m2_i, m3_i)` the device computes, 2 B f32: AdaFace's from the
    /// batch statistics, ElasticFace+'s reordering of [`Buf::RowMargins`] (forward output, given
    /// to the naive backward).
    DevMargins,
    /// The caller's state in, as f64 bit patterns in i64 (AdaFace `(mean, std)`,
    /// CurricularFace `(t)`; given).
    StateIn,
    /// The state out, as [`Buf::StateIn`] (forward output).
    StateOut,
    /// ElasticFace+'s scratch of the reordering, 2 B f32.
    PlusScratch,
    /// MagFace's norm-gradient coefficient per row, B f32 (`fm_norm_coef`).
    NormCoef,
    /// dx partials per class split, nsplit x B x D f32.
    DxhPart,
    /// Projection partials per class split, nsplit x B f32.
    ProjPart,
    /// Norm-gradient partials per class split, nsplit x B f32.
    DnPart,
    /// The per-row upstream the device computes under [`LabelCheck::Device`], B f32 (zeroed).
    GDev,
    /// Naive plan: normalized x, B x D f32.
    Xh,
    /// Naive plan: normalized w, C x D f32 (C K x D with sub-centers).
    Wh,
    /// Naive plan: cosines, B x C f32.
    Cos,
    /// Naive plan with sub-centers: the cosines of every row of w, B x C K f32.
    CosAll,
    /// Naive plan with sub-centers: each (row, class)'s winning sub-center, B x C f32 (small
    /// integers, exact in f32).
    Win,
    /// Naive plan with sub-centers: dc at the winners, 0 elsewhere, B x C K f32.
    DcAll,
    /// Naive plan: logits, B x C f32.
    Logits,
    /// Naive plan: target values, B x C f32.
    Tval,
    /// Naive plan: target slopes, B x C f32.
    Dt,
    /// Naive plan: probabilities, then (in place) dlogits, B x C f32.
    Prob,
    /// Naive plan: the norm gradient per row, B f32.
    Dn,
    /// Naive plan: gradient of xh, B x D f32.
    Dxh,
    /// Naive plan: gradient of wh, C x D f32.
    Dwh,
    /// Partial FC's sampled classes of the rank (local indices, ascending), i32, one per column
    /// (given; read by every kernel that reads `W`, `widx` in kernels/args.cuh).
    WIdx,
    /// Class-sharded CurricularFace and ElasticFace+: this rank's `(c_iy, owned)` per row,
    /// 2 B f32 (`fm_shard_cos_out`).
    ShardCos,
    /// Every rank's [`Buf::ShardCos`], rank-major, W x 2 B f32 (the all-gather).
    ShardCosAll,
    /// Partial FC's inverse index: per local class its column, or -1 when not sampled, i32,
    /// `num_local` (given; [`full_dw`]).
    WInv,
    /// Partial FC: `dw` in the rank's full layout, `num_local*K x D` f32 ([`full_dw`]'s output).
    DwFull,
    /// Class-sharded forward: this rank's record per row, B x [`SHARD_REC`] f32 (`fm_shard_stats`).
    ShardRec,
    /// Class-sharded forward: every rank's records, rank-major, W x B x [`SHARD_REC`] f32 (the
    /// all-gather of [`Buf::ShardRec`], [`Step::Exchange`]).
    ShardAll,
    /// dloss/dx, B x D of the gradient dtype (backward output).
    Dx,
    /// dloss/dw, C x D of the gradient dtype (backward output).
    Dw,
}

/// Element type of an allocated buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// f32.
    F32,
    /// i64 (status records).
    I64,
    /// The gradient dtype of the backward (f32, or the 16-bit input dtype).
    Grad,
}

/// How an allocated buffer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// Uninitialized: every element is written before it is read (poisoned with NaN when the
    /// handle poisons, and always on the emulator).
    Uninit,
}

/// One buffer the executor allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufSpec {
    /// The role.
    pub buf: Buf,
    /// The element type.
    pub elem: Elem,
    /// Elements (at least 1 is allocated).
    pub len: usize,
    /// How it starts.
    pub init: Init,
}

/// One kernel argument, in the kernel's parameter order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// A buffer the kernel reads.
    Read(Buf),
    /// A buffer the kernel writes (and may read).
    Write(Buf),
    /// A null pointer: an optional buffer absent.
    Null,
    /// A 64-bit integer (`i64`: row and class counts).
    I64(i64),
    /// A 32-bit integer (`int`: D, flags, split counts).
    I32(i32),
    /// A float (the scalar upstream).
    F32(f32),
    /// The spec's option block, `struct FmParams` by value.
    Params(FmParams),
}

/// One kernel launch.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// The entry point without its dtype suffix (`fm_grad_w_tc_f32out` runs as
    /// `fm_grad_w_tc_f32out_bf16` for bf16 inputs).
    pub entry: String,
    /// Grid dimensions (x, y, z).
    pub grid: [u32; 3],
    /// Threads per block (1-D blocks).
    pub block: u32,
    /// Dynamic shared memory, bytes (the executor opts the function in above 48 KB).
    pub smem: u32,
    /// The kernel's arguments in parameter order, or the fields of its argument struct in
    /// layout order when `packed` names one.
    pub args: Vec<Arg>,
    /// The argument struct the kernel takes by value (kernels/args.cuh), or `None` for
    /// positional parameters.
    pub packed: Option<&'static Layout>,
}

/// cuBLAS operation of a [`Gemm`] operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmOp {
    /// As stored.
    N,
    /// Transposed.
    T,
}

/// A column-major SGEMM `c (m x n) = op(a) (m x k) . op(b) (k x n)`, alpha 1, beta 0 (the naive
/// plan with cuBLAS; plain kernels replace it where cuBLAS is absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemm {
    /// Operation on `a`.
    pub ta: GemmOp,
    /// Operation on `b`.
    pub tb: GemmOp,
    /// Rows of `c`.
    pub m: i32,
    /// Columns of `c`.
    pub n: i32,
    /// The inner dimension.
    pub k: i32,
    /// First operand.
    pub a: Buf,
    /// Its leading dimension.
    pub lda: i32,
    /// Second operand.
    pub b: Buf,
    /// Its leading dimension.
    pub ldb: i32,
    /// The result.
    pub c: Buf,
    /// Its leading dimension.
    pub ldc: i32,
    /// What the product is, for error messages.
    pub what: &'static str,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// A kernel launch.
    Kernel(Launch),
    /// A cuBLAS SGEMM.
    Gemm(Gemm),
    /// An all-gather among the ranks of a class-sharded call (module `shard`): `send` (f32) of
    /// every rank into `recv`, rank-major. The executor copies to the host and calls the
    /// caller's [`crate::shard::Communicator`]; the emulator's tests run the plan in two jobs
    /// around it.
    Exchange {
        /// This rank's buffer.
        send: Buf,
        /// Every rank's, `world` times `send`'s length.
        recv: Buf,
        /// The index of the first record's `owned` value (0 or 1) in `send`: a rank that failed
        /// before the exchange sends -1 there (and everywhere), which the others detect.
        flag: usize,
    },
}

/// Floats per row of a class-sharded forward's record: `(m, s, z, reg, owned)`
/// (kernels/common.cuh `FM_SHARD_REC`).
pub const SHARD_REC: usize = 5;

/// Everything a forward or a backward launches, and what it allocates.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchPlan {
    /// The steps, in stream order.
    pub steps: Vec<Step>,
    /// The buffers to allocate, in allocation order.
    pub buffers: Vec<BufSpec>,
    /// Bytes of workspace beyond the outputs (the results' `workspace_bytes`).
    pub workspace_bytes: usize,
    /// Whether the main kernels run on tensor cores.
    pub tensor_cores: bool,
    /// Whether the forward runs on wgmma.
    pub wgmma: bool,
    /// Whether the executor may take the workspaces (the allocated buffers the caller does not
    /// keep) from the handle's arena, kept between calls: the fused plans, whose workspaces are
    /// `O(nsplit (B D + B))` (see `workspace_bytes`). The naive plan's B x C workspaces are
    /// allocated per call and freed after their last use, so its peak stays what
    /// `workspace_bytes` states and nothing that size stays resident between calls.
    pub pooled: bool,
}

/// The buffers a forward's result keeps (the rest are workspaces).
pub const FORWARD_OUTPUTS: [Buf; 9] = [
    Buf::Loss,
    Buf::RowLoss,
    Buf::Lse,
    Buf::XNorm,
    Buf::WNorm,
    Buf::Target,
    Buf::Status,
    Buf::DevMargins,
    Buf::StateOut,
];

/// Floats of the target record of `b` rows ([`Buf::Target`]): 8 sections of B and one float.
pub fn target_len(b: usize) -> usize {
    g::TARGET_SECTIONS * b + 1
}

/// The buffers a backward's result keeps.
pub const BACKWARD_OUTPUTS: [Buf; 3] = [Buf::Dx, Buf::Dw, Buf::Status];

/// Arena offsets are multiples of 64 f32 (256 bytes): every workspace starts as aligned as a
/// fresh allocation, more than the 16-byte vector accesses need.
pub const ARENA_ALIGN: usize = 64;

impl LaunchPlan {
    /// The arena length (f32 elements) this plan needs for the workspaces it pools, and each
    /// one's offset in elements, in allocation order. A buffer is pooled when the plan is
    /// ([`Self::pooled`]), it is f32 and not in `keep` (the buffers the caller keeps:
    /// [`FORWARD_OUTPUTS`], [`BACKWARD_OUTPUTS`]). The regions are disjoint: workspaces of one
    /// plan never share memory, whatever their lifetimes.
    pub fn arena_layout(&self, keep: &[Buf]) -> (usize, Vec<(Buf, usize)>) {
        let mut total = 0;
        let mut offs = Vec::new();
        if self.pooled {
            for s in &self.buffers {
                if s.elem == Elem::F32 && !keep.contains(&s.buf) {
                    offs.push((s.buf, total));
                    total += s.len.max(1).div_ceil(ARENA_ALIGN) * ARENA_ALIGN;
                }
            }
        }
        (total, offs)
    }

    /// The kernel launches, in order.
    pub fn launches(&self) -> impl Iterator<Item = &Launch> {
        self.steps.iter().filter_map(|s| match s {
            Step::Kernel(l) => Some(l),
            Step::Gemm(_) | Step::Exchange { .. } => None,
        })
    }

    /// The allocation of `buf`, if this plan allocates it.
    pub fn spec_of(&self, buf: Buf) -> Option<&BufSpec> {
        self.buffers.iter().find(|s| s.buf == buf)
    }

    /// The index of the last step that uses `buf` (the executor frees workspaces after it).
    pub fn last_use(&self, buf: Buf) -> Option<usize> {
        self.steps.iter().rposition(|s| match s {
            Step::Kernel(l) => l
                .args
                .iter()
                .any(|a| matches!(a, Arg::Read(b) | Arg::Write(b) if *b == buf)),
            Step::Gemm(g) => g.a == buf || g.b == buf || g.c == buf,
            Step::Exchange { send, recv, .. } => *send == buf || *recv == buf,
        })
    }

    /// A short signature of the launch sequence (entries, grids, shared memory), for counting
    /// distinct plans.
    pub fn signature(&self) -> String {
        let mut s = String::new();
        for st in &self.steps {
            match st {
                Step::Kernel(l) => {
                    s.push_str(&format!("{}{:?}/{}/{};", l.entry, l.grid, l.block, l.smem))
                }
                Step::Gemm(g) => s.push_str(&format!("gemm:{};", g.what)),
                Step::Exchange { send, .. } => s.push_str(&format!("exchange:{send:?};")),
            }
        }
        s
    }
}

/// The upstream gradient as the backward's kernels take it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PlanUpstream {
    /// The caller's per-row buffer ([`Buf::GRows`]).
    PerRow,
    /// One value per counted row: under [`LabelCheck::Host`] the host's per-row value (1/counted
    /// for the mean); under [`LabelCheck::Device`] the caller's scalar (the device divides).
    Scalar(f32),
}

/// A forward's problem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForwardProblem {
    /// The input dtype.
    pub dtype: DType,
    /// B, D, C.
    pub shape: Shape,
    /// Both x and w start at 16-byte aligned addresses.
    pub aligned: bool,
    /// The spec's kernel parameters.
    pub params: FmParams,
    /// `Reduction::Mean`.
    pub mean: bool,
    /// The caller gives per-row margins ([`Buf::RowMargins`]: ElasticFace's), read where the
    /// target is formed.
    pub row_margins: bool,
}

/// A backward's problem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackwardProblem {
    /// The input dtype.
    pub dtype: DType,
    /// The gradients' dtype: f32 or `dtype`.
    pub grad_dtype: DType,
    /// B, D, C.
    pub shape: Shape,
    /// Both x and w start at 16-byte aligned addresses.
    pub aligned: bool,
    /// The spec's kernel parameters.
    pub params: FmParams,
    /// `Reduction::Mean`.
    pub mean: bool,
    /// How the upstream gradient reaches the kernels.
    pub upstream: PlanUpstream,
    /// Whether the forward ran on tensor cores (after a TF32 forward the SIMT backward rounds its
    /// operands to TF32 too).
    pub fwd_tensor_cores: bool,
    /// The forward had per-row margins ([`Buf::RowMargins`]; the naive backward recomputes the
    /// target from them, the fused one reads the forward's target record).
    pub row_margins: bool,
}

use super::geometry as g;

/// i64 entries of a label status record (kernels/labels.cu: FM_STATUS_LEN).
pub const STATUS_LEN: usize = g::STATUS_LEN;
/// Threads per tile block (FM_THREADS).
pub const THREADS: u32 = g::THREADS as u32;
/// Blocks per SM the split heuristics aim for.
pub const BLOCKS_PER_SM: usize = 4;
/// Rows and classes per SIMT tile (FM_BM, FM_BN in kernels/tile.cuh).
const BM: usize = g::BM;
const BN: usize = g::BN;
/// Rows and classes per tensor-core forward tile (FmTcShape<Op, 2, 4> in kernels/logits_tc.cu).
const TC_TILE: (usize, usize) = (g::TC_BM, g::TC_BN);
/// Rows and classes per wide tensor-core forward tile (FmTcShape<Op, 4, 8>).
const TC_WIDE: (usize, usize) = (g::TC_WIDE_BM, g::TC_WIDE_BN);
/// Rows and classes per wgmma forward tile (WG_BM, WG_BN in kernels/logits_wg.cu).
const WG_TILE: (usize, usize) = (g::WG_BM, g::WG_BN);
/// Dynamic shared memory of a wgmma forward block: 5 stages of 32 KB plus 1 KB to align them to
/// 1024 bytes.
const WG_SMEM_BYTES: u32 = g::WG_SMEM as u32;
/// Gradient columns per SIMT backward block (FM_DC).
const DC: usize = g::DC;
/// Partner rows per tensor-core backward tile (GT_PN in kernels/grad_tc.cu).
const GT_PN: usize = g::GT_PN;
/// Upper bound on class splits of the SIMT dx backward (bounds its B x D x nsplit partials).
const MAX_X_SPLITS: usize = 64;
/// Upper bound on class splits of the tensor-core dx kernel: `nsplit x B x D` f32 partials
/// (32 MiB at B = D = 512).
const MAX_TC_X_SPLITS: usize = 32;
/// Upper bound on class splits of the forward (its partials are only B x nsplit pairs).
const MAX_FWD_SPLITS: usize = 1024;

/// Dynamic shared memory of a tensor-core forward block of `tile` (FmTcShape::SMEM_BYTES).
const fn tc_smem_bytes(tile: (usize, usize)) -> u32 {
    if tile.0 == g::TC_WIDE_BM {
        g::TC_WIDE_SMEM as u32
    } else {
        g::TC_SMEM as u32
    }
}

/// How the class tiles are split across blocks: `nsplit` splits of `tiles_per_split` tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Splits {
    /// Class tiles per split.
    pub tiles_per_split: usize,
    /// Splits.
    pub nsplit: usize,
}

/// Spreads `ntiles` class tiles over enough splits that `other_blocks * nsplit` fills the GPU
/// ([`BLOCKS_PER_SM`] blocks per SM), at most `max_splits`; every split is non-empty.
pub fn splits(ntiles: usize, other_blocks: usize, sm_count: usize, max_splits: usize) -> Splits {
    let target = BLOCKS_PER_SM * sm_count.max(1);
    let want = target
        .div_ceil(other_blocks.max(1))
        .clamp(1, max_splits.min(ntiles).max(1));
    by_tiles(ntiles, ntiles.div_ceil(want))
}

/// `ntiles` in splits of `tiles_per_split` (at least 1).
fn by_tiles(ntiles: usize, tiles_per_split: usize) -> Splits {
    let tiles_per_split = tiles_per_split.max(1);
    Splits {
        tiles_per_split,
        nsplit: ntiles.max(1).div_ceil(tiles_per_split),
    }
}

fn too_large(what: &'static str, detail: String) -> Error {
    Error::TooLarge { what, detail }
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| too_large("shape", format!("{what} = {v} does not fit i32")))
}

/// A grid of tile blocks, within CUDA's limits.
fn grid3(x: usize, y: usize, z: usize, what: &str) -> Result<[u32; 3]> {
    if x > u32::MAX as usize / 2 || y > 65535 || z > 65535 {
        return Err(too_large(
            "launch",
            format!("{what}: grid ({x}, {y}, {z}) exceeds CUDA's limits (2^31-1, 65535, 65535)"),
        ));
    }
    Ok([x as u32, y as u32, z as u32])
}

/// A 1-D grid of `n` threads in blocks of `threads`.
fn grid_1d(n: u64, threads: u32) -> Result<[u32; 3]> {
    let blocks = n.div_ceil(threads as u64);
    if blocks > u32::MAX as u64 {
        return Err(too_large(
            "launch",
            format!("{n} threads need {blocks} blocks of {threads} (> 2^32 - 1)"),
        ));
    }
    Ok([blocks.max(1) as u32, 1, 1])
}

/// One block per row (the naive plan's row kernels).
fn rows_grid(rows: usize) -> Result<[u32; 3]> {
    if rows > i32::MAX as usize {
        return Err(too_large(
            "launch",
            format!("naive plan: {rows} rows exceed one block per row (2^31 - 1)"),
        ));
    }
    Ok([rows.max(1) as u32, 1, 1])
}

/// The entry writing gradients of `grad` from inputs `input`.
fn out_entry(base: &str, input: DType, grad: DType) -> String {
    if grad == DType::F32 && input != DType::F32 {
        format!("{base}_f32out")
    } else {
        base.to_string()
    }
}

/// Plan under construction.
struct Builder {
    steps: Vec<Step>,
    buffers: Vec<BufSpec>,
    /// [`LaunchPlan::pooled`]: true unless a B x C workspace is allocated.
    pooled: bool,
    /// What the kernels' `widx` is: [`Buf::WIdx`] with Partial FC's sampled classes, else null.
    widx: Arg,
    /// The world size of a class-sharded plan (its exchanges), else None.
    shard: Option<usize>,
}

impl Builder {
    fn new() -> Self {
        Self {
            steps: Vec::new(),
            buffers: Vec::new(),
            pooled: true,
            widx: Null,
            shard: None,
        }
    }
    fn alloc(&mut self, buf: Buf, elem: Elem, len: usize) {
        self.buffers.push(BufSpec {
            buf,
            elem,
            len,
            init: Init::Uninit,
        });
    }
    fn launch(&mut self, entry: &str, grid: [u32; 3], block: u32, smem: u32, args: Vec<Arg>) {
        self.steps.push(Step::Kernel(Launch {
            entry: entry.to_string(),
            grid,
            block,
            smem,
            args,
            packed: None,
        }));
    }
    /// A launch of a family kernel: its argument struct, each field held to its kind.
    fn launch_struct(
        &mut self,
        entry: &str,
        grid: [u32; 3],
        block: u32,
        smem: u32,
        args: impl Into<Packed>,
    ) -> Result<()> {
        let p: Packed = args.into();
        args::check(entry, p.layout, &p.fields)?;
        self.steps.push(Step::Kernel(Launch {
            entry: entry.to_string(),
            grid,
            block,
            smem,
            args: p.fields,
            packed: Some(p.layout),
        }));
        Ok(())
    }
    fn finish(self, workspace_bytes: usize, tensor_cores: bool, wgmma: bool) -> LaunchPlan {
        LaunchPlan {
            pooled: self.pooled,
            steps: self.steps,
            buffers: self.buffers,
            workspace_bytes,
            tensor_cores,
            wgmma,
        }
    }
}

use Arg::{Null, Params, Read, Write, F32, I32, I64};

/// The rows of w: `C`, or `C*K` with sub-centers ([`FmParams::centers`]).
fn w_rows(p: &FmParams, shape: Shape) -> usize {
    shape.c * p.centers.max(1) as usize
}

/// Row norms of x (B rows) and w ([`w_rows`]) in one launch: one warp per row, x's rows first.
fn row_norms(bd: &mut Builder, p: &FmParams, shape: Shape) -> Result<()> {
    let (b, c) = (shape.b, w_rows(p, shape));
    let d = i32_of(shape.d, "D")?;
    bd.alloc(Buf::XNorm, Elem::F32, b);
    bd.alloc(Buf::WNorm, Elem::F32, c);
    bd.launch(
        "fm_row_norms",
        grid_1d((b as u64 + c as u64) * 32, THREADS)?,
        THREADS,
        0,
        vec![
            Read(Buf::X),
            I64(b as i64),
            Write(Buf::XNorm),
            Read(Buf::W),
            I64(c as i64),
            Write(Buf::WNorm),
            I32(d),
            bd.widx,
            I32(p.centers.max(1)),
        ],
    );
    Ok(())
}

/// The margin at each row's target (`fm_target_rows`, kernels/normalize.cu), once per row, so the
/// tile kernels evaluate no margin maths per element. One warp per row: it reads x's row, w's
/// label row and both norms (labels outside 0..C read no w), and writes `Target[2 row..2 row + 2]`,
/// an output of the forward (kept with its result) that the fused backward reads. Its last B
/// elements are the rows' cross-entropies `l_i`, written by `fm_combine_rows` (computed there
/// without cancellation, for the backward's target entry `expm1(-l_i)`).
fn target_rows(bd: &mut Builder, p: FmParams, shape: Shape, rowm: Arg) -> Result<()> {
    let (b, d) = (shape.b, i32_of(shape.d, "D")?);
    bd.launch(
        "fm_target_rows",
        grid_1d(b as u64 * 32, THREADS)?,
        THREADS,
        0,
        vec![
            Read(Buf::X),
            Read(Buf::W),
            Read(Buf::Labels),
            Read(Buf::XNorm),
            Read(Buf::WNorm),
            rowm,
            Params(p),
            I64(b as i64),
            I64(shape.c as i64),
            I32(d),
            bd.widx,
            Write(Buf::Target),
        ],
    );
    Ok(())
}

/// What the losses with per-row or batch state need of a plan, from the kernels' parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RowNeeds {
    /// f64 values of the state (AdaFace 2, CurricularFace 1, else 0).
    state: usize,
    /// The device computes the per-row margins ([`Buf::DevMargins`]: AdaFace, ElasticFace+).
    dev_margins: bool,
    /// The naive plan reads the target record (CurricularFace's thresholds and `t`, MagFace's
    /// regularizer and coefficients, the cosines ElasticFace+ orders by).
    naive_record: bool,
    /// MagFace's norm gradient ([`Buf::NormCoef`]).
    norm_coef: bool,
}

fn row_needs(p: &FmParams) -> RowNeeds {
    let v = p.variant;
    let plus = v == VariantCode::ElasticFace as i32 && p.vp[1] != 0.0;
    let ada = v == VariantCode::AdaFace as i32;
    let curr = v == VariantCode::CurricularFace as i32;
    let mag = v == VariantCode::MagFace as i32;
    RowNeeds {
        state: if ada { 2 } else { curr as usize },
        dev_margins: ada || plus,
        naive_record: curr || mag || plus,
        norm_coef: mag,
    }
}

/// The per-row steps of a forward, after the row norms (docs/MATH.md "Losses with per-row or
/// batch state"): AdaFace's batch statistics and margins before the targets
/// (`fm_adaface_state`), the target record (`fm_target_rows`), then CurricularFace's `t` from
/// the counted rows' target cosines (`fm_curricular_state`, written over the record's `t`) or
/// ElasticFace+'s reordering of the drawn margins by them (`fm_elastic_plus`) and the targets
/// again with the reordered margins. One block each for the batch steps (fixed order). Returns
/// the margins argument the target was formed with.
fn row_steps(bd: &mut Builder, p: FmParams, shape: Shape, given: bool) -> Result<Arg> {
    let b = shape.b;
    let needs = row_needs(&p);
    let mut rowm = row_margins_arg(given);
    bd.alloc(Buf::Target, Elem::F32, target_len(b));
    if needs.state > 0 {
        bd.alloc(Buf::StateOut, Elem::I64, needs.state);
    }
    if needs.dev_margins {
        bd.alloc(Buf::DevMargins, Elem::F32, 2 * b);
    }
    if p.variant == VariantCode::AdaFace as i32 {
        bd.launch(
            "fm_adaface_state",
            [1, 1, 1],
            1024,
            0,
            vec![
                Read(Buf::Labels),
                Read(Buf::XNorm),
                I64(b as i64),
                Read(Buf::StateIn),
                Params(p),
                Write(Buf::StateOut),
                Write(Buf::DevMargins),
            ],
        );
        rowm = Read(Buf::DevMargins);
    }
    target_rows(bd, p, shape, rowm)?;
    let plus = needs.dev_margins && p.variant == VariantCode::ElasticFace as i32;
    if let (Some(world), true) = (
        bd.shard,
        plus || p.variant == VariantCode::CurricularFace as i32,
    ) {
        // Sharded: the state reads every counted row's target cosine, which only the target's
        // rank has; one all-gather of (c_iy, owned) per row fills the others' in (and
        // CurricularFace's thresholds) before the state kernels run.
        bd.alloc(Buf::ShardCos, Elem::F32, 2 * b);
        bd.launch(
            "fm_shard_cos_out",
            grid_1d(b as u64, 256)?,
            256,
            0,
            vec![
                Read(Buf::Labels),
                Read(Buf::Target),
                I64(b as i64),
                I64(shape.c as i64),
                Write(Buf::ShardCos),
            ],
        );
        let all = b
            .checked_mul(2 * world)
            .ok_or_else(|| too_large("shard", format!("B = {b} cosines of {world} ranks")))?;
        bd.alloc(Buf::ShardCosAll, Elem::F32, all);
        bd.steps.push(Step::Exchange {
            send: Buf::ShardCos,
            recv: Buf::ShardCosAll,
            flag: 1,
        });
        bd.launch(
            "fm_shard_cos_in",
            grid_1d(b as u64, 256)?,
            256,
            0,
            vec![
                Read(Buf::ShardCosAll),
                I32(i32_of(world, "world size")?),
                Read(Buf::Labels),
                Params(p),
                I64(b as i64),
                I64(shape.c as i64),
                Write(Buf::Target),
            ],
        );
    }
    if p.variant == VariantCode::CurricularFace as i32 {
        bd.launch(
            "fm_curricular_state",
            [1, 1, 1],
            1024,
            0,
            vec![
                Read(Buf::Labels),
                I64(b as i64),
                Read(Buf::StateIn),
                Params(p),
                Write(Buf::StateOut),
                Write(Buf::Target),
            ],
        );
    }
    if plus {
        if !given {
            return Err(Error::InvalidArgument {
                what: "row inputs",
                detail: "ElasticFace+ reorders the margins the caller gives (or the host draws)"
                    .into(),
            });
        }
        bd.alloc(Buf::PlusScratch, Elem::F32, 2 * b);
        bd.launch(
            "fm_elastic_plus",
            [1, 1, 1],
            1024,
            0,
            vec![
                Read(Buf::Labels),
                I64(b as i64),
                Read(Buf::Target),
                Read(Buf::RowMargins),
                Params(p),
                Write(Buf::PlusScratch),
                Write(Buf::DevMargins),
            ],
        );
        rowm = Read(Buf::DevMargins);
        target_rows(bd, p, shape, rowm)?;
    }
    Ok(rowm)
}

/// The reduction of per-row losses into the loss (one block, fixed order). Under
/// [`LabelCheck::Device`] the same launch writes the forward's label status record
/// (kernels/labels.cu; written whole by the kernel, so no memset): one launch, not two, for
/// what is one pass over the B labels either way.
fn reduce_loss(bd: &mut Builder, shape: Shape, mean: bool, label_check: LabelCheck) {
    bd.alloc(Buf::Loss, Elem::F32, 1);
    let status = match label_check {
        LabelCheck::Device => {
            bd.alloc(Buf::Status, Elem::I64, STATUS_LEN);
            Write(Buf::Status)
        }
        LabelCheck::Host => Null,
    };
    bd.launch(
        "fm_reduce_loss",
        [1, 1, 1],
        1024,
        0,
        vec![
            Read(Buf::RowLoss),
            Read(Buf::Labels),
            I64(shape.b as i64),
            I64(shape.c as i64),
            I32(mean as i32),
            Write(Buf::Loss),
            status,
        ],
    );
}

/// Whether the tensor-core kernels may run: 16-byte cp.async chunks wholly inside each row
/// (D % 8 == 0 for 16-bit inputs, D % 4 == 0 for f32) and both matrices 16-byte aligned.
fn tc_shape_ok(dtype: DType, d: usize, aligned: bool) -> bool {
    let vec = 16 / dtype.size();
    aligned && d % vec == 0
}

/// The per-row margins `(m2_i, m3_i)` the host gives this call's loss (None: none given): the
/// buffer [`Buf::RowMargins`] a plan with `row_margins` reads, 2 B f32, computed by the host as
/// input data (the handle and the emulated tests bind the same values): ElasticFace's drawn or
/// given margins, before ElasticFace+'s reordering (which the device does, by the target
/// cosines it computes). Errors as [`Variant::check_inputs`].
pub fn row_margins(
    spec: &MarginLoss,
    inputs: &RowInputs<'_>,
    b: usize,
) -> Result<Option<Vec<f32>>> {
    spec.variant.check_inputs(inputs, b)?;
    match (spec.variant, inputs.margins) {
        (Variant::ElasticFace(e), Some(m)) => {
            let drawn = crate::math::elastic_draw(&e, &m, b);
            Ok(Some(
                drawn
                    .iter()
                    .flat_map(|&m_i| {
                        let r = crate::math::elastic_row(&e, spec.s, m_i);
                        [r.m2 as f32, r.m3 as f32]
                    })
                    .collect(),
            ))
        }
        _ => Ok(None),
    }
}

/// The state in of this call's loss as the plans bind it ([`Buf::StateIn`]): f64 bit patterns,
/// AdaFace `(mean, std)`, CurricularFace `(t)`; `None` for the losses without state. Errors as
/// [`Variant::check_inputs`].
pub fn state_in(spec: &MarginLoss, inputs: &RowInputs<'_>, b: usize) -> Result<Option<Vec<i64>>> {
    spec.variant.check_inputs(inputs, b)?;
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits() as i64).collect::<Vec<i64>>();
    Ok(match inputs.state {
        Some(LossState::AdaFace { mean, std }) => Some(bits(&[mean, std])),
        Some(LossState::CurricularFace { t }) => Some(bits(&[t])),
        None => None,
    })
}

/// The state out a forward of `spec` wrote ([`Buf::StateOut`], as [`state_in`] lays it out).
pub fn state_of(spec: &MarginLoss, out: &[i64]) -> Option<LossState> {
    let f = |k: usize| out.get(k).map(|&v| f64::from_bits(v as u64));
    match spec.variant {
        Variant::AdaFace(_) => Some(LossState::AdaFace {
            mean: f(0)?,
            std: f(1)?,
        }),
        Variant::CurricularFace(_) => Some(LossState::CurricularFace { t: f(0)? }),
        _ => None,
    }
}

/// The per-row margins argument: the caller's buffer, or null (the spec's margins).
fn row_margins_arg(given: bool) -> Arg {
    if given {
        Read(Buf::RowMargins)
    } else {
        Null
    }
}

/// The forward of `choices.plan`.
pub fn forward(dev: &DeviceFacts, ch: &Choices, pr: &ForwardProblem) -> Result<LaunchPlan> {
    check_dtype(pr.dtype)?;
    let shape = pr.shape;
    let mut bd = Builder::new();
    match ch.plan {
        Plan::Fused => fused_forward(bd, dev, ch, pr, None),
        Plan::Naive => {
            let bytes = naive_materialize(&mut bd, dev, pr.params, shape, true, pr.row_margins)?;
            reduce_loss(&mut bd, shape, pr.mean, ch.label_check);
            Ok(bd.finish(bytes, false, false))
        }
    }
}

/// The forward of one rank of a class-sharded call among `world` ranks (module `shard`): the
/// fused forward on this rank's classes (`pr.shape.c` = its `num_local`; labels local, another
/// rank's class as `C`: [`crate::shard::column_labels`]), then instead of the combine: `fm_shard_stats` (this
/// rank's record per row), the all-gather of the records ([`Step::Exchange`]), `fm_shard_combine`
/// (every rank merges them in rank order: the same bits on every rank) and the loss. The losses
/// whose per-row state reads other ranks' target cosines (CurricularFace, ElasticFace+) exchange
/// them first (`fm_shard_cos_out`, an exchange, `fm_shard_cos_in`, before the state kernels).
/// Refused: the naive plan and [`LabelCheck::Device`] (the host maps the labels).
///
/// `sampled`: Partial FC, the kernels read the classes of `pr.shape.c` columns through
/// [`Buf::WIdx`] (the sampled local classes, i32, ascending; `W` stays the rank's whole slice).
pub fn shard_forward(
    dev: &DeviceFacts,
    ch: &Choices,
    pr: &ForwardProblem,
    world: usize,
    sampled: bool,
) -> Result<LaunchPlan> {
    check_dtype(pr.dtype)?;
    if ch.plan != Plan::Fused || ch.label_check != LabelCheck::Host {
        return Err(Error::Unsupported {
            detail: format!(
                "a class-sharded forward runs the fused plan with LabelCheck::Host, not {:?} \
                 with {:?}",
                ch.plan, ch.label_check
            ),
        });
    }
    if world == 0 {
        return Err(Error::InvalidArgument {
            what: "world",
            detail: "a sharded call needs at least one rank".into(),
        });
    }
    let mut bd = Builder::new();
    if sampled {
        bd.widx = Read(Buf::WIdx);
    }
    bd.shard = Some(world);
    fused_forward(bd, dev, ch, pr, Some(world))
}

/// The backward of a rank of a class-sharded call ([`shard_forward`]): the fused backward on
/// its classes (its labels as [`crate::shard::column_labels`] maps them), its classes read through
/// [`Buf::WIdx`] when `sampled` (dw by column: the sampled classes' rows, in index order).
/// [`LabelCheck::Host`] and the fused plan only.
pub fn shard_backward(
    dev: &DeviceFacts,
    ch: &Choices,
    pr: &BackwardProblem,
    sampled: bool,
) -> Result<LaunchPlan> {
    if ch.plan != Plan::Fused || ch.label_check != LabelCheck::Host {
        return Err(Error::Unsupported {
            detail: format!(
                "a class-sharded backward runs the fused plan with LabelCheck::Host, not {:?} \
                 with {:?}",
                ch.plan, ch.label_check
            ),
        });
    }
    let mut bd = Builder::new();
    if sampled {
        bd.widx = Read(Buf::WIdx);
    }
    backward_on(bd, dev, ch, pr)
}

/// Partial FC's `dw` in the rank's full layout ([`crate::shard::DwLayout::Full`]): from the
/// sampled rows' `dw` ([`Buf::Dw`], `n_sampled*K x D` f32, given) and the inverse index
/// ([`Buf::WInv`]), `fm_gather_rows` writes [`Buf::DwFull`] (`num_local*K x D`) whole: each
/// class's rows from its column, zeros for the classes not sampled.
pub fn full_dw(num_local: usize, k: usize, d: usize) -> Result<LaunchPlan> {
    let per = k
        .checked_mul(d)
        .filter(|&p| p <= i32::MAX as usize)
        .ok_or_else(|| too_large("dw", format!("K*D = {k}*{d} per class")))?;
    let n = num_local
        .checked_mul(per)
        .ok_or_else(|| too_large("dw", format!("{num_local} classes of {per}")))?;
    let mut bd = Builder::new();
    bd.alloc(Buf::DwFull, Elem::F32, n);
    bd.launch(
        "fm_gather_rows",
        grid_1d(n as u64, 256)?,
        256,
        0,
        vec![
            Read(Buf::Dw),
            Read(Buf::WInv),
            I64(num_local as i64),
            I32(per as i32),
            Write(Buf::DwFull),
        ],
    );
    Ok(bd.finish(0, false, false))
}

fn check_dtype(dtype: DType) -> Result<()> {
    if dtype == DType::F64 {
        return Err(Error::Unsupported {
            detail: "the GPU kernels take f32, f16 and bf16 inputs, not f64".into(),
        });
    }
    Ok(())
}

/// The fused forward (docs/ARCHITECTURE.md "Fused data flow"): norms, logits tiles with online
/// softmax statistics per class split, the combine, the loss. Extra memory `O(B x nsplit)`.
fn fused_forward(
    mut bd: Builder,
    dev: &DeviceFacts,
    ch: &Choices,
    pr: &ForwardProblem,
    shard: Option<usize>,
) -> Result<LaunchPlan> {
    let (b, d, c) = (pr.shape.b, pr.shape.d, pr.shape.c);
    let di = i32_of(d, "D")?;
    row_norms(&mut bd, &pr.params, pr.shape)?;
    row_steps(&mut bd, pr.params, pr.shape, pr.row_margins)?;

    // Tensor cores (kernels/logits_tc.cu) for f16/bf16 when the 16-byte cp.async copies are legal;
    // f32 takes the TF32 variant of the same kernel when opted in. Each tile shape needs its
    // dynamic shared memory within what a block of this device may opt into, else the next
    // smaller shape runs.
    let half = pr.dtype != DType::F32;
    let tensor_cores = ch.tensor_cores && (half || ch.tf32) && tc_shape_ok(pr.dtype, d, pr.aligned);
    let wgmma = tensor_cores && half && ch.wgmma && dev.sm90a && WG_SMEM_BYTES <= dev.smem_optin;
    // Sub-centers: the *_sc instantiations of the narrow and wgmma tiles (a second set of
    // accumulators for the class maxima; no wide one). The SIMT kernel takes any K.
    let sub = pr.params.centers > 1;
    let wide = tensor_cores && !sub && ch.wide_tiles && tc_smem_bytes(TC_WIDE) <= dev.smem_optin;
    let (tile, entry, smem) = match (tensor_cores, half, wide) {
        _ if wgmma && sub => (WG_TILE, "fm_fwd_tiles_wg_sc", WG_SMEM_BYTES),
        _ if wgmma => (WG_TILE, "fm_fwd_tiles_wg", WG_SMEM_BYTES),
        (true, true, false) if sub => (TC_TILE, "fm_fwd_tiles_tc_sc", tc_smem_bytes(TC_TILE)),
        (true, true, false) => (TC_TILE, "fm_fwd_tiles_tc", tc_smem_bytes(TC_TILE)),
        (true, true, true) => (TC_WIDE, "fm_fwd_tiles_tc_wide", tc_smem_bytes(TC_WIDE)),
        (true, false, false) if sub => (TC_TILE, "fm_fwd_tiles_tf32_sc", tc_smem_bytes(TC_TILE)),
        (true, false, false) => (TC_TILE, "fm_fwd_tiles_tf32", tc_smem_bytes(TC_TILE)),
        (true, false, true) => (TC_WIDE, "fm_fwd_tiles_tf32_wide", tc_smem_bytes(TC_WIDE)),
        (false, _, _) if sub => ((BM, BN), "fm_fwd_tiles_sc", 0),
        (false, _, _) => ((BM, BN), "fm_fwd_tiles", 0),
    };
    let row_tiles = b.div_ceil(tile.0);
    let ntiles = c.div_ceil(tile.1);
    let sp = match ch.tiles_per_split {
        Some((f, _)) => by_tiles(ntiles, f),
        None => splits(ntiles, row_tiles, dev.sm_count, MAX_FWD_SPLITS),
    };
    bd.alloc(Buf::PartM, Elem::F32, b * sp.nsplit);
    bd.alloc(Buf::PartS, Elem::F32, b * sp.nsplit);
    bd.alloc(Buf::Zy, Elem::F32, b);
    // ElasticFace+'s reordering scratch (2 B floats) with the partials and zy.
    let plus_scratch = if row_needs(&pr.params).dev_margins && pr.row_margins {
        2 * b
    } else {
        0
    };
    let workspace_bytes = 4 * (2 * b * sp.nsplit + b + plus_scratch);
    let tps = i32_of(sp.tiles_per_split, "tiles per split")?;
    let ns = i32_of(sp.nsplit, "class splits")?;
    // All six tile kernels take FmTileArgs. Grid (row_tiles, nsplit) over tiles of `tile`:
    // every block reads rows < B of x and classes < C of w, and writes part_m/part_s at
    // row * nsplit + split and zy[row]; chunks past B, C or D are zero-filled without reading.
    bd.launch_struct(
        entry,
        grid3(row_tiles, sp.nsplit, 1, entry)?,
        THREADS,
        smem,
        TileArgs {
            x: Read(Buf::X),
            w: Read(Buf::W),
            widx: bd.widx,
            labels: Read(Buf::Labels),
            xnorm: Read(Buf::XNorm),
            wnorm: Read(Buf::WNorm),
            tgt: Read(Buf::Target),
            part_m: Write(Buf::PartM),
            part_s: Write(Buf::PartS),
            zy: Write(Buf::Zy),
            p: Params(pr.params),
            b: I64(b as i64),
            c: I64(c as i64),
            d: I32(di),
            tiles_per_split: I32(tps),
            nsplit: I32(ns),
        },
    )?;
    if let Some(world) = shard {
        // One record per row, all-gathered, merged in rank order on every rank.
        bd.alloc(Buf::ShardRec, Elem::F32, b * SHARD_REC);
        bd.launch(
            "fm_shard_stats",
            grid_1d(b as u64, 256)?,
            256,
            0,
            vec![
                Read(Buf::PartM),
                Read(Buf::PartS),
                I32(ns),
                Read(Buf::Zy),
                Read(Buf::Labels),
                Read(Buf::Target),
                I64(b as i64),
                I64(c as i64),
                Write(Buf::ShardRec),
            ],
        );
        let all = b
            .checked_mul(SHARD_REC * world)
            .ok_or_else(|| too_large("shard", format!("B = {b} records of {world} ranks")))?;
        bd.alloc(Buf::ShardAll, Elem::F32, all);
        bd.steps.push(Step::Exchange {
            send: Buf::ShardRec,
            recv: Buf::ShardAll,
            flag: SHARD_REC - 1,
        });
        bd.alloc(Buf::Lse, Elem::F32, b);
        bd.alloc(Buf::RowLoss, Elem::F32, b);
        bd.launch(
            "fm_shard_combine",
            grid_1d(b as u64, 256)?,
            256,
            0,
            vec![
                Read(Buf::ShardAll),
                I32(i32_of(world, "world size")?),
                Read(Buf::Labels),
                I64(b as i64),
                Write(Buf::Lse),
                Write(Buf::RowLoss),
                Write(Buf::Target),
            ],
        );
        reduce_loss(&mut bd, pr.shape, pr.mean, ch.label_check);
        let cosines = if bd.buffers.iter().any(|s| s.buf == Buf::ShardCos) {
            4 * 2 * b * (world + 1)
        } else {
            0
        };
        let records = 4 * b * SHARD_REC * (world + 1) + cosines;
        return Ok(bd.finish(workspace_bytes + records, tensor_cores, wgmma));
    }
    bd.alloc(Buf::Lse, Elem::F32, b);
    bd.alloc(Buf::RowLoss, Elem::F32, b);
    // One thread per row: its nsplit partials, zy[row] only for a label in 0..C.
    bd.launch(
        "fm_combine_rows",
        grid_1d(b as u64, 256)?,
        256,
        0,
        vec![
            Read(Buf::PartM),
            Read(Buf::PartS),
            I32(ns),
            Read(Buf::Zy),
            Read(Buf::Labels),
            I64(b as i64),
            I64(c as i64),
            Write(Buf::Lse),
            Write(Buf::RowLoss),
            Write(Buf::Target),
        ],
    );
    reduce_loss(&mut bd, pr.shape, pr.mean, ch.label_check);
    Ok(bd.finish(workspace_bytes, tensor_cores, wgmma))
}

/// The backward's tiling: the SIMT kernels (grad.cu) or the tensor-core ones (grad_tc.cu).
struct BackwardTiles {
    /// Rows of x per dx block and classes per partner tile of the dx kernel.
    rows: usize,
    classes: usize,
    /// Classes per dw block.
    w_classes: usize,
    /// Columns of D per block (blocks of one tile along D recompute its logits).
    dchunk: usize,
    max_x_splits: usize,
    /// Kernel base names: dx partials and dw.
    x_kernel: &'static str,
    w_kernel: &'static str,
    /// The tensor-core kernels' fixed dynamic shared memory, `sizeof(FmGt<OWN>::Smem)` (0 for
    /// the SIMT kernels); the resident tiles come on top ([`tc_backward_smem`]).
    smem_fixed: usize,
}

const SIMT_BACKWARD: BackwardTiles = BackwardTiles {
    rows: BM,
    classes: BN,
    w_classes: BN,
    dchunk: DC,
    max_x_splits: MAX_X_SPLITS,
    x_kernel: "fm_grad_x_partial",
    w_kernel: "fm_grad_w",
    smem_fixed: 0,
};

/// The SIMT backward of sub-center ArcFace: the same tiles, the `*_sc` instantiations (K dot tiles
/// per class tile, the winners kept; dW blocks per sub-center).
const SIMT_BACKWARD_SC: BackwardTiles = BackwardTiles {
    x_kernel: "fm_grad_x_partial_sc",
    w_kernel: "fm_grad_w_sc",
    ..SIMT_BACKWARD
};

/// The tensor-core backward, FmGt<64> of kernels/grad_tc.cu: 64 own rows (or classes) x 256
/// columns of D per block. For D <= 256, where one chunk covers D.
const TC_BACKWARD: BackwardTiles = BackwardTiles {
    rows: g::GT64_OWN,
    classes: GT_PN,
    w_classes: g::GT64_OWN,
    dchunk: g::GT64_DCH,
    max_x_splits: MAX_TC_X_SPLITS,
    x_kernel: "fm_grad_x_tc",
    w_kernel: "fm_grad_w_tc",
    smem_fixed: g::GT64_FIXED_SMEM, // sizeof(FmGt<64>::Smem), static_assert in grad_tc.cu
};

/// FmGt<32>: 32 own rows x 512 columns per block, so up to D = 512 each block recomputes its
/// logits once, where TC_BACKWARD's two D chunks recompute them twice.
const TC_BACKWARD_D512: BackwardTiles = BackwardTiles {
    rows: g::GT32_OWN,
    classes: GT_PN,
    w_classes: g::GT32_OWN,
    dchunk: g::GT32_DCH,
    max_x_splits: MAX_TC_X_SPLITS,
    x_kernel: "fm_grad_x_tc_d512",
    w_kernel: "fm_grad_w_tc_d512",
    smem_fixed: g::GT32_FIXED_SMEM, // sizeof(FmGt<32>::Smem), static_assert in grad_tc.cu
};

/// The tensor-core backward's tiles for width `d`: FmGt<32> (512 columns per block) past 256.
fn tc_backward_tiles(d: usize) -> &'static BackwardTiles {
    if d > TC_BACKWARD.dchunk {
        &TC_BACKWARD_D512
    } else {
        &TC_BACKWARD
    }
}

/// Dynamic shared memory of a tensor-core backward block at width `d` with `stages` partner
/// buffers (kernels/grad_tc.cu; the tiles `backward` picks for `d`): the fixed part, then the own
/// rows and the partner tiles, resident with all D columns, each row `fm_gt_ld(D)` = D rounded up
/// to 32, plus 8, 16-bit elements. At D = 512 (FmGt<32>) with two stages:
/// 5,888 + 2 * 520 * (32 + 2 * 64) = 172,288 bytes.
pub fn tc_backward_smem(d: usize, stages: usize) -> usize {
    let t = tc_backward_tiles(d);
    let ld = d.div_ceil(32) * 32 + 8;
    t.smem_fixed + 2 * ld * (t.rows + stages * GT_PN)
}

/// The backward of `choices.plan`. Under [`LabelCheck::Device`] it starts with this call's
/// label status (against [`Buf::PrevStatus`]) and the per-row upstream the device derives from
/// it ([`Buf::GDev`]).
pub fn backward(dev: &DeviceFacts, ch: &Choices, pr: &BackwardProblem) -> Result<LaunchPlan> {
    backward_on(Builder::new(), dev, ch, pr)
}

fn backward_on(
    mut bd: Builder,
    dev: &DeviceFacts,
    ch: &Choices,
    pr: &BackwardProblem,
) -> Result<LaunchPlan> {
    check_dtype(pr.dtype)?;
    if pr.grad_dtype != DType::F32 && pr.grad_dtype != pr.dtype {
        return Err(Error::Unsupported {
            detail: format!(
                "gradients in {:?} from {:?} inputs: f32 or the input dtype",
                pr.grad_dtype, pr.dtype
            ),
        });
    }
    let shape = pr.shape;
    // (per-row buffer or null, scalar) as the gradient kernels take them.
    let (g_rows, g_scalar) = match ch.label_check {
        LabelCheck::Device => {
            let (g_in, g) = match pr.upstream {
                PlanUpstream::PerRow => (Read(Buf::GRows), 0.0),
                PlanUpstream::Scalar(v) => (Null, v),
            };
            // One block: this call's label status (compared with the forward's record), then every
            // row's upstream from it, poisoned (NaN) when the labels are bad or not the
            // forward's. Both written whole: no memset.
            bd.alloc(Buf::Status, Elem::I64, STATUS_LEN);
            bd.alloc(Buf::GDev, Elem::F32, shape.b);
            bd.launch(
                "fm_label_status",
                [1, 1, 1],
                1024,
                0,
                vec![
                    Read(Buf::Labels),
                    I64(shape.b as i64),
                    I64(shape.c as i64),
                    Read(Buf::PrevStatus),
                    Write(Buf::Status),
                    g_in,
                    F32(g),
                    I32(pr.mean as i32),
                    Write(Buf::GDev),
                ],
            );
            (Read(Buf::GDev), 0.0)
        }
        LabelCheck::Host => match pr.upstream {
            PlanUpstream::PerRow => (Read(Buf::GRows), 0.0),
            PlanUpstream::Scalar(v) => (Null, v),
        },
    };
    let mut lp = match ch.plan {
        Plan::Fused => fused_backward(bd, dev, ch, pr, g_rows, g_scalar),
        Plan::Naive => naive_backward(bd, dev, pr, g_rows, g_scalar),
    }?;
    // The device's per-row upstream is workspace too (alive for the whole backward).
    if ch.label_check == LabelCheck::Device {
        lp.workspace_bytes += 4 * shape.b;
    }
    Ok(lp)
}

fn fused_backward(
    mut bd: Builder,
    dev: &DeviceFacts,
    ch: &Choices,
    pr: &BackwardProblem,
    g_rows: Arg,
    g_scalar: f32,
) -> Result<LaunchPlan> {
    let (b, d, c) = (pr.shape.b, pr.shape.d, pr.shape.c);
    // After a TF32 forward the SIMT backward recomputes the logits from TF32-rounded operands, so
    // its softmax is consistent with the saved lse.
    let mut p = pr.params;
    p.tf32_dots = (pr.fwd_tensor_cores && pr.dtype == DType::F32) as i32;
    let half = pr.dtype != DType::F32;
    // Sub-centers: the SIMT kernels (the tensor-core ones have no winner pass yet).
    let tc_asked = ch.tc_backward
        && ch.tensor_cores
        && half
        && p.centers <= 1
        && tc_shape_ok(pr.dtype, d, pr.aligned);
    // The 32 x 512 tiles for D > 256. The tensor-core kernels keep their own rows and 2 (else 1)
    // partner tiles in shared memory with all D columns: where not even 1 fits the device's
    // block limit (D past 1,152 on an H100, past 480 on a 99 KB sm_86/89 part), the SIMT kernels.
    let tc_tiles = tc_backward_tiles(d);
    let stages = [2, 1]
        .into_iter()
        .find(|&st| tc_backward_smem(d, st) <= dev.smem_optin as usize)
        .filter(|_| tc_asked);
    let tc = stages.is_some();
    let t = match (tc, p.centers > 1) {
        (true, _) => tc_tiles,
        (false, false) => &SIMT_BACKWARD,
        (false, true) => &SIMT_BACKWARD_SC,
    };
    let stages = stages.unwrap_or(0);
    let smem = if tc {
        tc_backward_smem(d, stages) as u32
    } else {
        0
    };
    let row_tiles = b.div_ceil(t.rows);
    let ntiles = c.div_ceil(t.classes);
    let dchunks = d.div_ceil(t.dchunk);
    let sp = match ch.tiles_per_split {
        Some((_, x)) => by_tiles(ntiles, x),
        None => splits(ntiles, row_tiles * dchunks, dev.sm_count, t.max_x_splits),
    };
    let (bi, ci, di) = (b as i64, c as i64, i32_of(d, "D")?);
    let tps = i32_of(sp.tiles_per_split, "tiles per split")?;
    let ns = i32_of(sp.nsplit, "class splits")?;
    // The target record is the forward's (Buf::Target, given): the same target in both passes,
    // and no launch to recompute it.
    let workspace_bytes = 4 * (sp.nsplit * (b * d + 2 * b) + tc as usize)
        + if row_needs(&p).norm_coef { 4 * b } else { 0 };

    if tc {
        // K: the power of two that keeps the dw kernel's 16-bit operand xh r g / K in range.
        bd.alloc(Buf::Scale, Elem::F32, 1);
        bd.launch(
            "fm_grad_scale",
            [1, 1, 1],
            1024,
            0,
            vec![
                Read(Buf::Labels),
                Read(Buf::XNorm),
                g_rows,
                F32(g_scalar),
                Params(p),
                I64(bi),
                Write(Buf::Scale),
            ],
        );
    }
    bd.alloc(Buf::DxhPart, Elem::F32, sp.nsplit * b * d);
    bd.alloc(Buf::ProjPart, Elem::F32, sp.nsplit * b);
    bd.alloc(Buf::DnPart, Elem::F32, sp.nsplit * b);
    // Grid (row_tiles, nsplit, dchunks): each block writes its rows' dims of its split's dxh
    // partial (split * B + row) * D + d and proj/dn partials split * B + row.
    // The gradient kernels take FmGradArgs; what a kernel does not use is null (dw here; the
    // partials and the split fields in the dw launch below).
    let grad_args = GradArgs {
        x: Read(Buf::X),
        w: Read(Buf::W),
        widx: bd.widx,
        labels: Read(Buf::Labels),
        xnorm: Read(Buf::XNorm),
        wnorm: Read(Buf::WNorm),
        tgt: Read(Buf::Target),
        lse: Read(Buf::Lse),
        g_rows,
        scale: Null,
        dxh_part: Write(Buf::DxhPart),
        proj_part: Write(Buf::ProjPart),
        dn_part: Write(Buf::DnPart),
        dw: Null,
        p: Params(p),
        b: I64(bi),
        c: I64(ci),
        g_scalar: F32(g_scalar),
        d: I32(di),
        tiles_per_split: I32(tps),
        nsplit: I32(ns),
        stages: I32(stages as i32),
    };
    bd.launch_struct(
        t.x_kernel,
        grid3(row_tiles, sp.nsplit, dchunks, t.x_kernel)?,
        THREADS,
        smem,
        grad_args.clone(),
    )?;
    // MagFace: its per-row norm-gradient coefficient from the record and the upstream.
    let coef = if row_needs(&p).norm_coef {
        bd.alloc(Buf::NormCoef, Elem::F32, b);
        bd.launch(
            "fm_norm_coef",
            grid_1d(b as u64, 256)?,
            256,
            0,
            vec![
                Read(Buf::Labels),
                Read(Buf::Target),
                g_rows,
                F32(g_scalar),
                I64(bi),
                Write(Buf::NormCoef),
            ],
        );
        Read(Buf::NormCoef)
    } else {
        Null
    };
    bd.alloc(Buf::Dx, Elem::Grad, b * d);
    let finish = out_entry("fm_x_finish", pr.dtype, pr.grad_dtype);
    // One thread per element: the split partials summed in split order, then the normalization
    // backward.
    bd.launch(
        &finish,
        grid_1d((b * d) as u64, 256)?,
        256,
        0,
        vec![
            Read(Buf::X),
            Read(Buf::XNorm),
            Read(Buf::DxhPart),
            Read(Buf::ProjPart),
            Read(Buf::DnPart),
            coef,
            I32(ns),
            I64(bi),
            I32(di),
            Params(p),
            Write(Buf::Dx),
        ],
    );
    let k = p.centers.max(1) as usize;
    bd.alloc(Buf::Dw, Elem::Grad, c * k * d);
    let wk = out_entry(t.w_kernel, pr.dtype, pr.grad_dtype);
    // Grid (ceil(C / w_classes) K, dchunks): each block owns its classes' dims of dw (with
    // sub-centers, of one sub-center k) and loops over the whole batch (no atomics).
    bd.launch_struct(
        &wk,
        grid3(c.div_ceil(t.w_classes) * k, dchunks, 1, &wk)?,
        THREADS,
        smem,
        GradArgs {
            scale: if tc { Read(Buf::Scale) } else { Null }, // fm_grad_w_tc only: K
            dxh_part: Null,
            proj_part: Null,
            dn_part: Null,
            dw: Write(Buf::Dw),
            tiles_per_split: I32(0),
            nsplit: I32(0),
            ..grad_args
        },
    )?;
    Ok(bd.finish(workspace_bytes, tc, false))
}

/// The naive plan's forward intermediates (one plain kernel per step, every intermediate in f32,
/// the cosine product on cuBLAS when loaded); returns the peak workspace bytes.
fn naive_materialize(
    bd: &mut Builder,
    dev: &DeviceFacts,
    p: FmParams,
    shape: Shape,
    forward: bool,
    given: bool,
) -> Result<usize> {
    bd.pooled = false;
    let (b, d, c) = (shape.b, shape.d, shape.c);
    rows_grid(b.max(c))?;
    let (bi, ci, di) = (b as i64, c as i64, i32_of(d, "D")?);
    // Sub-centers: w has C K rows; the cosines of all of them (CosAll, B x C K) reduce to the
    // class maxima (Cos) and their winners (Win) before anything else reads them.
    let k = p.centers.max(1) as usize;
    let wr = c * k;
    row_norms(bd, &p, shape)?;
    // The losses with state: the forward runs the fused plan's per-row steps (the state, the
    // device margins and the target record); the backward reads what the forward saved, so it
    // never updates the state.
    let needs = row_needs(&p);
    let rowm = match (forward, needs.naive_record || needs.dev_margins) {
        (true, true) => row_steps(bd, p, shape, given)?,
        _ if needs.dev_margins => Read(Buf::DevMargins),
        _ => row_margins_arg(given),
    };
    let record = if needs.naive_record {
        Read(Buf::Target)
    } else {
        Null
    };
    for (v, norms, out, rows, on) in [
        (Buf::X, Buf::XNorm, Buf::Xh, b, 1),
        (Buf::W, Buf::WNorm, Buf::Wh, wr, p.normalize_weights),
    ] {
        bd.alloc(out, Elem::F32, rows * d);
        bd.launch(
            "naive_normalize",
            grid_1d((rows * d) as u64, 256)?,
            256,
            0,
            vec![
                Read(v),
                Read(norms),
                I64(rows as i64),
                I32(di),
                I32(on),
                Write(out),
            ],
        );
    }
    let bc = b * c;
    let all = if k > 1 { Buf::CosAll } else { Buf::Cos };
    bd.alloc(all, Elem::F32, b * wr);
    if dev.cublas {
        // Row-major cos (B x C) = xh . wh^T is column-major cos^T (C x B) = wh^T(op T) . xh.
        bd.steps.push(Step::Gemm(gemm(
            GemmOp::T,
            GemmOp::N,
            (wr, b, d),
            (Buf::Wh, d),
            (Buf::Xh, d),
            (all, wr),
            "cosine GEMM",
        )?));
    } else {
        bd.launch(
            "naive_cosine",
            grid_1d((b * wr) as u64, 256)?,
            256,
            0,
            vec![
                Read(Buf::Xh),
                Read(Buf::Wh),
                I64(bi),
                I64(wr as i64),
                I32(di),
                Write(all),
            ],
        );
    }
    if k > 1 {
        bd.alloc(Buf::Cos, Elem::F32, bc);
        bd.alloc(Buf::Win, Elem::F32, bc);
        bd.launch(
            "naive_subcenter_max",
            grid_1d(bc as u64, 256)?,
            256,
            0,
            vec![
                Read(Buf::CosAll),
                I64(bi),
                I64(ci),
                I32(k as i32),
                Write(Buf::Cos),
                Write(Buf::Win),
            ],
        );
    }
    for buf in [Buf::Logits, Buf::Tval, Buf::Dt] {
        bd.alloc(buf, Elem::F32, bc);
    }
    bd.launch(
        "naive_logits",
        grid_1d(bc as u64, 256)?,
        256,
        0,
        vec![
            Read(Buf::Cos),
            Read(Buf::Labels),
            Read(Buf::XNorm),
            rowm,
            record,
            Params(p),
            I64(bi),
            I64(ci),
            Write(Buf::Logits),
            Write(Buf::Tval),
            Write(Buf::Dt),
        ],
    );
    bd.alloc(Buf::Prob, Elem::F32, bc);
    bd.alloc(Buf::Lse, Elem::F32, b);
    bd.alloc(Buf::RowLoss, Elem::F32, b);
    bd.launch(
        "naive_softmax",
        rows_grid(b)?,
        256,
        0,
        vec![
            Read(Buf::Logits),
            Read(Buf::Labels),
            record,
            I64(bi),
            I64(ci),
            Write(Buf::Prob),
            Write(Buf::Lse),
            Write(Buf::RowLoss),
        ],
    );
    // Peak: xh, wh and five B x C buffers (cos, logits, tval, dt, prob) live at once at most;
    // with sub-centers also the B x C K cosines and the B x C winners.
    let sub = if k > 1 { b * wr + bc } else { 0 };
    Ok(4 * (b * d + wr * d + 5 * bc + sub))
}

/// A [`Gemm`] with its sizes checked against cuBLAS's 32-bit ints: `mnk` = (m, n, k), the
/// operands with their leading dimensions.
fn gemm(
    ta: GemmOp,
    tb: GemmOp,
    mnk: (usize, usize, usize),
    a: (Buf, usize),
    b: (Buf, usize),
    c: (Buf, usize),
    what: &'static str,
) -> Result<Gemm> {
    let i = |v: usize, name: &str| {
        i32::try_from(v).map_err(|_| {
            too_large(
                "cuBLAS GEMM",
                format!("{what}: {name} = {v} does not fit cuBLAS's 32-bit sizes"),
            )
        })
    };
    Ok(Gemm {
        ta,
        tb,
        m: i(mnk.0, "m")?,
        n: i(mnk.1, "n")?,
        k: i(mnk.2, "k")?,
        a: a.0,
        lda: i(a.1, "lda")?,
        b: b.0,
        ldb: i(b.1, "ldb")?,
        c: c.0,
        ldc: i(c.1, "ldc")?,
        what,
    })
}

/// The naive backward: the forward's intermediates recomputed, `dc` materialized (in place of the
/// probabilities), two matrix products and the explicit normalization backward.
fn naive_backward(
    mut bd: Builder,
    dev: &DeviceFacts,
    pr: &BackwardProblem,
    g_rows: Arg,
    g_scalar: f32,
) -> Result<LaunchPlan> {
    bd.pooled = false;
    let p = pr.params;
    let shape = pr.shape;
    let (b, d, c) = (shape.b, shape.d, shape.c);
    let (bi, ci, di) = (b as i64, c as i64, i32_of(d, "D")?);
    // The saved norms and lse are recomputed here with the rest: the naive plan is the plain
    // eager baseline (and its recomputation matches the forward's bit for bit).
    naive_materialize(&mut bd, dev, p, shape, false, pr.row_margins)?;
    let needs = row_needs(&p);
    bd.alloc(Buf::Dn, Elem::F32, b);
    bd.launch(
        "naive_dlogits",
        rows_grid(b)?,
        256,
        0,
        vec![
            Write(Buf::Prob),
            Read(Buf::Tval),
            Read(Buf::Dt),
            Read(Buf::Labels),
            Read(Buf::XNorm),
            g_rows,
            if needs.norm_coef {
                Read(Buf::Target)
            } else {
                Null
            },
            F32(g_scalar),
            Params(p),
            I64(bi),
            I64(ci),
            Write(Buf::Dn),
        ],
    );
    // Ignored rows contribute exact zeros to dw, even with non-finite x (docs/MATH.md "Non-finite input").
    bd.launch(
        "naive_mask_rows",
        grid_1d((b * d) as u64, 256)?,
        256,
        0,
        vec![Write(Buf::Xh), Read(Buf::Labels), I64(bi), I32(di)],
    );
    // Sub-centers: dc to the winners only, as a B x C K matrix (DcAll) the products read.
    let k = p.centers.max(1) as usize;
    let wr = c * k;
    let dc = if k > 1 {
        bd.alloc(Buf::DcAll, Elem::F32, b * wr);
        bd.launch(
            "naive_subcenter_scatter",
            grid_1d((b * wr) as u64, 256)?,
            256,
            0,
            vec![
                Read(Buf::Prob),
                Read(Buf::Win),
                I64(bi),
                I64(ci),
                I32(k as i32),
                Write(Buf::DcAll),
            ],
        );
        Buf::DcAll
    } else {
        Buf::Prob
    };
    // dxh = dc . wh (B x D), dwh = dc^T . xh (C K x D).
    for (out, other, rows, inner, trans) in [
        (Buf::Dxh, Buf::Wh, b, wr, false),
        (Buf::Dwh, Buf::Xh, wr, b, true),
    ] {
        bd.alloc(out, Elem::F32, rows * d);
        if dev.cublas {
            // Row-major out (rows x D) = op(dc) . other is column-major out^T (D x rows) =
            // other^T . op(dc)^T; dc is B x C (ld C) both ways.
            let (opa, lda) = if trans {
                (GemmOp::T, rows)
            } else {
                (GemmOp::N, inner)
            };
            bd.steps.push(Step::Gemm(gemm(
                GemmOp::N,
                opa,
                (d, rows, inner),
                (other, d),
                (dc, lda),
                (out, d),
                "gradient GEMM",
            )?));
        } else {
            bd.launch(
                "naive_matmul",
                grid_1d((rows * d) as u64, 256)?,
                256,
                0,
                vec![
                    Read(dc),
                    Read(other),
                    I64(rows as i64),
                    I64(inner as i64),
                    I32(di),
                    I32(trans as i32),
                    Write(out),
                ],
            );
        }
    }
    let name = out_entry("naive_norm_backward", pr.dtype, pr.grad_dtype);
    let dn = if p.normalize_features == 0 || needs.norm_coef {
        Read(Buf::Dn)
    } else {
        Null
    };
    for (dvh, vh, norms, extra, rows, on, out) in [
        (Buf::Dxh, Buf::Xh, Buf::XNorm, dn, b, 1, Buf::Dx),
        (
            Buf::Dwh,
            Buf::Wh,
            Buf::WNorm,
            Null,
            wr,
            p.normalize_weights,
            Buf::Dw,
        ),
    ] {
        bd.alloc(out, Elem::Grad, rows * d);
        bd.launch(
            &name,
            rows_grid(rows)?,
            256,
            0,
            vec![
                Read(dvh),
                Read(vh),
                Read(norms),
                extra,
                I32(di),
                I32(on),
                Write(out),
            ],
        );
    }
    let sub = if k > 1 { 2 * b * wr + b * c } else { 0 };
    let workspace_bytes = 4 * (b * d + wr * d + 5 * b * c + sub) + 4 * (b * d + wr * d + b);
    Ok(bd.finish(workspace_bytes, false, false))
}
