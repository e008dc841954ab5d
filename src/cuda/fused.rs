//! The fused plan (DESIGN.md "Data flow on the GPU"): norms, logits tiles with online softmax
//! statistics per class split, the combine; in backward the tiles are recomputed from the saved
//! logsumexp and multiplied straight into the gradients. Extra memory is
//! `O(B + C + B x nsplit + B x D x nsplit_x)`, never `B x C`.

use super::params::FmParams;
use super::{
    arg_or_null, cuda_err, grid_1d, CudaElement, ForwardOut, FusedMarginLoss, GpuForward,
    GpuGradients, Kernels,
};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::spec::Shape;
use cudarc::driver::{CudaSlice, CudaView, DevicePtr, LaunchConfig, PushKernelArg};

/// Rows per tile (FM_BM in kernels/tile.cuh).
const BM: usize = 32;
/// Classes per tile (FM_BN).
const BN: usize = 32;
/// Rows per tensor-core forward tile (FmTcShape<Op, 2, 4>::BM in kernels/logits_tc.cu).
const TC_BM: usize = 64;
/// Classes per tensor-core forward tile (FmTcShape<Op, 2, 4>::BN).
const TC_BN: usize = 128;
/// Rows and classes per wide tensor-core forward tile (FmTcShape<Op, 4, 8>).
const TC_WIDE: (usize, usize) = (128, 256);
/// Rows and classes per wgmma forward tile (WG_BM, WG_BN in kernels/logits_wg.cu).
const WG_TILE: usize = 128;
/// Dynamic shared memory of a wgmma forward block: 5 stages of 32 KB plus 1 KB to align them to
/// 1024 bytes (WG_SMEM_BYTES, static_assert in logits_wg.cu).
const WG_SMEM_BYTES: u32 = 164_864;
/// Dynamic shared memory of a tensor-core forward block: 3 stages of (rows + classes) rows of 80
/// bytes (32 halves or 16 floats of D, padded), then 4 warps' (max, sum) pairs per row:
/// FmTcShape::SMEM_BYTES.
fn tc_smem_bytes(bm: usize, bn: usize) -> u32 {
    (3 * (bm + bn) * 80 + 32 * bm) as u32
}
/// Gradient columns per backward block (FM_DC).
const DC: usize = 128;
/// Partner rows per tensor-core backward tile (GT_PN in kernels/grad_tc.cu): the dx kernel's
/// class tiles.
const GT_PN: usize = 64;
/// Upper bound on class splits of the tensor-core dx kernel: its partials are
/// `nsplit x B x D` f32 (32 MiB at B = D = 512).
const MAX_TC_X_SPLITS: usize = 32;
/// Threads per tile block (FM_THREADS).
const THREADS: u32 = 256;
/// Blocks per SM the split heuristics aim for.
const BLOCKS_PER_SM: usize = 4;
/// Upper bound on class splits of the backward's dxh (bounds its B x D x nsplit partials).
const MAX_X_SPLITS: usize = 64;
/// Upper bound on class splits of the forward (its partials are only B x nsplit pairs).
const MAX_FWD_SPLITS: usize = 1024;

/// The per-row upstream gradient: a device buffer (reduction none) or one scalar.
pub(crate) struct Upstream<'a> {
    pub g_rows: Option<&'a CudaView<'a, f32>>,
    pub g_scalar: f32,
}

/// How the class tiles are split across blocks: `nsplit` splits of `tiles_per_split` tiles.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Splits {
    pub tiles_per_split: usize,
    pub nsplit: usize,
}

/// Spreads `ntiles` class tiles over enough splits that `other_blocks * nsplit` fills the GPU
/// (BLOCKS_PER_SM blocks per SM), at most `max_splits`; every split is non-empty.
pub(crate) fn splits(
    ntiles: usize,
    other_blocks: usize,
    sm_count: usize,
    max_splits: usize,
) -> Splits {
    let target = BLOCKS_PER_SM * sm_count.max(1);
    let want = target
        .div_ceil(other_blocks.max(1))
        .clamp(1, max_splits.min(ntiles).max(1));
    let tiles_per_split = ntiles.div_ceil(want);
    Splits {
        tiles_per_split,
        nsplit: ntiles.div_ceil(tiles_per_split),
    }
}

fn grid(x: usize, y: usize, z: usize, what: &str) -> Result<LaunchConfig> {
    if x > u32::MAX as usize / 2 || y > 65535 || z > 65535 {
        return Err(Error::TooLarge {
            what: "launch",
            detail: format!(
                "{what}: grid ({x}, {y}, {z}) exceeds CUDA's limits (2^31-1, 65535, 65535)"
            ),
        });
    }
    Ok(LaunchConfig {
        grid_dim: (x as u32, y as u32, z as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Whether the tensor-core kernels may run on these inputs: tensor cores on, 16-byte cp.async
/// chunks wholly inside each row (D % 8 == 0 for 16-bit inputs, D % 4 == 0 for f32) and both
/// matrices 16-byte aligned. Otherwise the SIMT kernels run.
fn tc_eligible<T: CudaElement>(
    h: &FusedMarginLoss,
    x: &CudaView<'_, T>,
    w: &CudaView<'_, T>,
    d: usize,
) -> bool {
    let vec = 16 / std::mem::size_of::<T>();
    h.tensor_cores && d % vec == 0 && aligned16(h, x) && aligned16(h, w)
}

/// One block of `threads` threads (the fixed-order reductions).
pub(crate) fn one_block(threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// True when the view's device address is 16-byte aligned (cp.async's 16-byte copies need it).
fn aligned16<T: CudaElement>(h: &FusedMarginLoss, v: &CudaView<'_, T>) -> bool {
    let (ptr, _record) = v.device_ptr(&h.stream);
    ptr % 16 == 0
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::TooLarge {
        what: "shape",
        detail: format!("{what} = {v} does not fit i32"),
    })
}

/// Row norms of a `rows x d` matrix: one warp per row.
pub(crate) fn row_norms<T: CudaElement>(
    h: &FusedMarginLoss,
    k: &Kernels,
    v: &CudaView<'_, T>,
    rows: usize,
    d: usize,
) -> Result<CudaSlice<f32>> {
    let mut out = h.alloc::<f32>(k, rows)?;
    let f = k.get("fm_row_norms")?;
    let (rows_i, d_i) = (rows as i64, i32_of(d, "D")?);
    let mut b = h.stream.launch_builder(&f);
    b.arg(v).arg(&rows_i).arg(&d_i).arg(&mut out);
    // SAFETY: fm_row_norms(const T*, i64 rows, int D, float*) reads rows*D elements of `v`
    // (length checked == rows*D by validate) and writes `rows` floats of `out` (allocated rows).
    unsafe { b.launch(grid_1d(rows as u64 * 32, THREADS)?) }
        .map_err(|e| cuda_err("launch fm_row_norms", e))?;
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<T: CudaElement>(
    h: &FusedMarginLoss,
    k: &Kernels,
    p: &FmParams,
    x: &CudaView<'_, T>,
    w: &CudaView<'_, T>,
    labels: &CudaView<'_, i32>,
    shape: Shape,
    mean: bool,
) -> Result<ForwardOut> {
    let (b, d, c) = (shape.b, shape.d, shape.c);
    let x_norm = row_norms(h, k, x, b, d)?;
    let w_norm = row_norms(h, k, w, c, d)?;

    // Tensor cores (kernels/logits_tc.cu) for f16/bf16 when the 16-byte cp.async copies are
    // legal: D % 8 == 0 and both matrices 16-byte aligned. Otherwise the SIMT tiles.
    // f32 inputs take the TF32 variant of the same kernel when opted in (16-byte chunks of 4
    // floats: D % 4 == 0).
    // Tile shapes come from the device too: each needs its dynamic shared memory within what a
    // block of this device may opt into, else the next smaller shape runs.
    let half = T::DTYPE != DType::F32;
    let tensor_cores = (half || h.tf32) && tc_eligible(h, x, w, d);
    let wgmma = tensor_cores && half && h.wgmma_enabled() && WG_SMEM_BYTES <= h.smem_optin;
    let wide = tensor_cores && h.wide_tiles && tc_smem_bytes(TC_WIDE.0, TC_WIDE.1) <= h.smem_optin;
    let (bm, bn, name) = match (tensor_cores, half, wide) {
        _ if wgmma => (WG_TILE, WG_TILE, "fm_fwd_tiles_wg"),
        (true, true, false) => (TC_BM, TC_BN, "fm_fwd_tiles_tc"),
        (true, true, true) => (TC_WIDE.0, TC_WIDE.1, "fm_fwd_tiles_tc_wide"),
        (true, false, false) => (TC_BM, TC_BN, "fm_fwd_tiles_tf32"),
        (true, false, true) => (TC_WIDE.0, TC_WIDE.1, "fm_fwd_tiles_tf32_wide"),
        (false, _, _) => (BM, BN, "fm_fwd_tiles"),
    };
    // The tensor-core kernels take their pipeline in dynamic shared memory (96 KB for the wide
    // tiles: above the 48 KB default; get_with_smem opts the function in once).
    let smem = match (wgmma, tensor_cores) {
        (true, _) => WG_SMEM_BYTES,
        (false, true) => tc_smem_bytes(bm, bn),
        (false, false) => 0,
    };
    let row_tiles = b.div_ceil(bm);
    let ntiles = c.div_ceil(bn);
    let sp = splits(ntiles, row_tiles, h.sm_count as usize, MAX_FWD_SPLITS);
    let mut part_m = h.alloc::<f32>(k, b * sp.nsplit)?;
    let mut part_s = h.alloc::<f32>(k, b * sp.nsplit)?;
    let mut zy = h.alloc::<f32>(k, b)?;
    let workspace_bytes = 4 * (2 * b * sp.nsplit + b);

    let (bi, ci, di) = (b as i64, c as i64, i32_of(d, "D")?);
    let (tps, ns) = (
        i32_of(sp.tiles_per_split, "tiles per split")?,
        sp.nsplit as i32,
    );
    let f = k.get_with_smem(name, smem)?;
    let mut lb = h.stream.launch_builder(&f);
    lb.arg(x)
        .arg(w)
        .arg(labels)
        .arg(&x_norm)
        .arg(&w_norm)
        .arg(p);
    lb.arg(&bi).arg(&ci).arg(&di).arg(&tps).arg(&ns);
    lb.arg(&mut part_m).arg(&mut part_s).arg(&mut zy);
    // SAFETY: all six kernels take the same arguments. Grid (row_tiles, nsplit) over tiles of
    // (bm, bn): every block reads rows < B of x (B*D), classes < C of w (C*D) and of w_norm (C),
    // rows < B of labels/x_norm, and writes part_m/part_s at row*nsplit + split < B*nsplit
    // (allocated B*nsplit) and zy[row] < B. All offsets 64-bit. The tensor-core kernels' 16-byte
    // copies need D % 8 == 0 (16-bit inputs) or D % 4 == 0 (f32) and 16-byte aligned x and w,
    // checked above; chunks past B, C or D are zero-filled without reading. The dynamic shared
    // memory is what the kernel's FmTcShape<Op, MI, NI>::SMEM_BYTES asks for (tc_smem_bytes;
    // static_asserts in logits_tc.cu hold the two to the same formula), or WG_SMEM_BYTES for the
    // wgmma kernel (static_assert in logits_wg.cu), which exists only in an sm_90a module
    // (wgmma_enabled).
    let cfg = LaunchConfig {
        shared_mem_bytes: smem,
        ..grid(row_tiles, sp.nsplit, 1, name)?
    };
    unsafe { lb.launch(cfg) }.map_err(|e| cuda_err(&format!("launch {name}"), e))?;

    let mut lse = h.alloc::<f32>(k, b)?;
    let mut row_loss = h.alloc::<f32>(k, b)?;
    let f = k.get("fm_combine_rows")?;
    let mut lb = h.stream.launch_builder(&f);
    lb.arg(&part_m)
        .arg(&part_s)
        .arg(&ns)
        .arg(&zy)
        .arg(labels)
        .arg(&bi)
        .arg(&ci);
    lb.arg(&mut lse).arg(&mut row_loss);
    // SAFETY: one thread per row < B reads nsplit partials of its row (B*nsplit allocated),
    // labels[row] (B), zy[row] (B; only for a label in 0..C) and writes lse/row_loss[row] (B).
    unsafe { lb.launch(grid_1d(b as u64, 256)?) }
        .map_err(|e| cuda_err("launch fm_combine_rows", e))?;

    let loss = reduce_loss(h, k, &row_loss, labels, b, mean)?;
    Ok(ForwardOut {
        loss,
        row_loss,
        lse,
        x_norm,
        w_norm,
        workspace_bytes,
        tensor_cores,
        wgmma,
    })
}

/// The reduction of per-row losses into the loss (one block, fixed order). Shared by both plans.
pub(crate) fn reduce_loss(
    h: &FusedMarginLoss,
    k: &Kernels,
    row_loss: &CudaSlice<f32>,
    labels: &CudaView<'_, i32>,
    b: usize,
    mean: bool,
) -> Result<CudaSlice<f32>> {
    let mut loss = h.alloc::<f32>(k, 1)?;
    let mean = mean as i32;
    let bi = b as i64;
    let f = k.get("fm_reduce_loss")?;
    let mut lb = h.stream.launch_builder(&f);
    lb.arg(row_loss)
        .arg(labels)
        .arg(&bi)
        .arg(&mean)
        .arg(&mut loss);
    // SAFETY: one block of 1024 threads reads B row losses and labels and writes loss[0].
    unsafe { lb.launch(one_block(1024)) }.map_err(|e| cuda_err("launch fm_reduce_loss", e))?;
    Ok(loss)
}

/// The entry point writing gradients of type `O` from inputs `T`.
pub(crate) fn out_entry<T: CudaElement, O: CudaElement>(base: &str) -> String {
    if O::DTYPE == DType::F32 && T::DTYPE != DType::F32 {
        format!("{base}_f32out")
    } else {
        base.to_string()
    }
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
    smem: u32,
}

const SIMT_BACKWARD: BackwardTiles = BackwardTiles {
    rows: BM,
    classes: BN,
    w_classes: BN,
    dchunk: DC,
    max_x_splits: MAX_X_SPLITS,
    x_kernel: "fm_grad_x_partial",
    w_kernel: "fm_grad_w",
    smem: 0,
};

/// The tensor-core backward, FmGt<64> of kernels/grad_tc.cu: 64 own rows (or classes) x 256
/// columns of D per block. For D <= 256, where one chunk covers D.
const TC_BACKWARD: BackwardTiles = BackwardTiles {
    rows: 64,
    classes: GT_PN,
    w_classes: 64,
    dchunk: 256,
    max_x_splits: MAX_TC_X_SPLITS,
    x_kernel: "fm_grad_x_tc",
    w_kernel: "fm_grad_w_tc",
    smem: 45312, // sizeof(FmGt<64>::Smem), static_assert in grad_tc.cu
};

/// FmGt<32>: 32 own rows x 512 columns per block, so up to D = 512 each block recomputes its
/// logits once, where TC_BACKWARD's two D chunks recompute them twice (fewer FLOPs: about
/// 4 instead of 6 matrix products of the step's size for the backward at D = 512).
const TC_BACKWARD_D512: BackwardTiles = BackwardTiles {
    rows: 32,
    classes: GT_PN,
    w_classes: 32,
    dchunk: 512,
    max_x_splits: MAX_TC_X_SPLITS,
    x_kernel: "fm_grad_x_tc_d512",
    w_kernel: "fm_grad_w_tc_d512",
    smem: 72448, // sizeof(FmGt<32>::Smem), static_assert in grad_tc.cu
};

/// The backward: the dx partials per class split, finished by fm_x_finish, then dw. The
/// tensor-core kernels (opt-in, f16/bf16, same conditions as the tensor-core forward) also take
/// K from fm_grad_scale, the power of two that keeps their 16-bit operand xh r g / K in range.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: CudaElement, O: CudaElement>(
    h: &FusedMarginLoss,
    k: &Kernels,
    p: &FmParams,
    fwd: &GpuForward,
    x: &CudaView<'_, T>,
    w: &CudaView<'_, T>,
    labels: &CudaView<'_, i32>,
    up: &Upstream<'_>,
) -> Result<GpuGradients<O>> {
    let shape = fwd.shape;
    let (b, d, c) = (shape.b, shape.d, shape.c);
    // After a TF32 forward the SIMT backward recomputes the logits from TF32-rounded operands, so
    // its softmax is consistent with the saved lse.
    let mut p = *p;
    p.tf32_dots = (fwd.tensor_cores && T::DTYPE == DType::F32) as i32;
    let p = &p;
    let tc = h.tc_backward && T::DTYPE != DType::F32 && tc_eligible(h, x, w, d);
    // The 32 x 512 tiles for D > 256 when the device gives a block their 72 KB of shared memory.
    let d512 = d > TC_BACKWARD.dchunk && TC_BACKWARD_D512.smem <= h.smem_optin;
    let t = match (tc, d512) {
        (false, _) => &SIMT_BACKWARD,
        (true, false) => &TC_BACKWARD,
        (true, true) => &TC_BACKWARD_D512,
    };
    let row_tiles = b.div_ceil(t.rows);
    let ntiles = c.div_ceil(t.classes);
    let dchunks = d.div_ceil(t.dchunk);
    let sp = splits(
        ntiles,
        row_tiles * dchunks,
        h.sm_count as usize,
        t.max_x_splits,
    );
    let mut dxh_part = h.alloc::<f32>(k, sp.nsplit * b * d)?;
    let mut proj_part = h.alloc::<f32>(k, sp.nsplit * b)?;
    let mut dn_part = h.alloc::<f32>(k, sp.nsplit * b)?;
    let workspace_bytes = 4 * (sp.nsplit * (b * d + 2 * b) + tc as usize);

    let (bi, ci, di) = (b as i64, c as i64, i32_of(d, "D")?);
    let (tps, ns) = (
        i32_of(sp.tiles_per_split, "tiles per split")?,
        sp.nsplit as i32,
    );

    let scale = if tc {
        let mut scale = h.alloc::<f32>(k, 1)?;
        let f = k.get("fm_grad_scale")?;
        let mut lb = h.stream.launch_builder(&f);
        lb.arg(labels).arg(&fwd.x_norm);
        arg_or_null(&mut lb, up.g_rows);
        lb.arg(&up.g_scalar).arg(p).arg(&bi).arg(&mut scale);
        // SAFETY: one block of 1024 threads reads rows < B of labels, x_norm and g_rows (length
        // checked == B, or null) and writes scale[0] (allocated 1).
        unsafe { lb.launch(one_block(1024)) }.map_err(|e| cuda_err("launch fm_grad_scale", e))?;
        Some(scale)
    } else {
        None
    };

    let f = k.get_with_smem(t.x_kernel, t.smem)?;
    let mut lb = h.stream.launch_builder(&f);
    lb.arg(x)
        .arg(w)
        .arg(labels)
        .arg(&fwd.x_norm)
        .arg(&fwd.w_norm)
        .arg(&fwd.lse);
    arg_or_null(&mut lb, up.g_rows);
    lb.arg(&up.g_scalar)
        .arg(p)
        .arg(&bi)
        .arg(&ci)
        .arg(&di)
        .arg(&tps)
        .arg(&ns);
    lb.arg(&mut dxh_part).arg(&mut proj_part).arg(&mut dn_part);
    // SAFETY: both kernels take these arguments. Grid (row_tiles, nsplit, dchunks) over tiles of
    // t.rows rows, t.classes classes and t.dchunk columns: reads rows < B of x (B*D) and of
    // labels/x_norm/lse/g_rows (B; g_rows length checked == B or null), classes < C of w (C*D)
    // and w_norm (C); writes dxh_part at (split*B + row)*D + d < nsplit*B*D and proj/dn_part at
    // split*B + row < nsplit*B. The tensor-core kernel's 16-byte loads need D % 8 == 0 and 16-byte
    // aligned x, w (tc_eligible); chunks past B, C or D are zero-filled without reading. Its
    // dynamic shared memory is t.smem = sizeof(FmGt<OWN>::Smem) (static_asserts in grad_tc.cu).
    let cfg = LaunchConfig {
        shared_mem_bytes: t.smem,
        ..grid(row_tiles, sp.nsplit, dchunks, t.x_kernel)?
    };
    unsafe { lb.launch(cfg) }.map_err(|e| cuda_err(&format!("launch {}", t.x_kernel), e))?;

    let mut dx = h.alloc::<O>(k, b * d)?;
    let name = out_entry::<T, O>("fm_x_finish");
    let f = k.get(&name)?;
    let mut lb = h.stream.launch_builder(&f);
    lb.arg(x)
        .arg(&fwd.x_norm)
        .arg(&dxh_part)
        .arg(&proj_part)
        .arg(&dn_part)
        .arg(&ns);
    lb.arg(&bi).arg(&di).arg(p).arg(&mut dx);
    // SAFETY: one thread per element e < B*D: reads x[e], x_norm[e/D], nsplit partials at
    // s*B*D + e and s*B + row (all allocated nsplit*...), writes dx[e] (B*D of type O).
    unsafe { lb.launch(grid_1d((b * d) as u64, 256)?) }
        .map_err(|e| cuda_err(&format!("launch {name}"), e))?;

    let mut dw = h.alloc::<O>(k, c * d)?;
    let name = out_entry::<T, O>(t.w_kernel);
    let f = k.get_with_smem(&name, t.smem)?;
    let mut lb = h.stream.launch_builder(&f);
    lb.arg(x)
        .arg(w)
        .arg(labels)
        .arg(&fwd.x_norm)
        .arg(&fwd.w_norm)
        .arg(&fwd.lse);
    arg_or_null(&mut lb, up.g_rows);
    lb.arg(&up.g_scalar);
    if let Some(scale) = &scale {
        lb.arg(scale); // fm_grad_w_tc only: K
    }
    lb.arg(p).arg(&bi).arg(&ci).arg(&di).arg(&mut dw);
    // SAFETY: grid (ceil(C / t.w_classes), dchunks): each block reads all rows of x (B*D) and
    // labels/x_norm/lse/g_rows (B), scale[0] (tensor cores), its classes < C of w/w_norm, and
    // writes dw[col*D + d] for its own classes < C and dims < D only (C*D of type O allocated).
    // Loads and shared memory as for the dx kernel above.
    let cfg = LaunchConfig {
        shared_mem_bytes: t.smem,
        ..grid(c.div_ceil(t.w_classes), dchunks, 1, &name)?
    };
    unsafe { lb.launch(cfg) }.map_err(|e| cuda_err(&format!("launch {name}"), e))?;

    Ok(GpuGradients {
        dx,
        dw,
        workspace_bytes,
        tensor_cores: tc,
        label_status: None,
    })
}
