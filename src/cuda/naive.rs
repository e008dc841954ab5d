//! The naive plan: one plain kernel per step, every intermediate materialized in f32 (eager
//! PyTorch's shape of work), its three matrix products on cuBLAS SGEMM when libcublas loads
//! (as eager frameworks do), else on plain kernels. Backward recomputes the forward's
//! intermediates, then materializes `dc` and runs two matrix products and the explicit
//! normalization backward.

use super::fused::{out_entry, reduce_loss, row_norms, Upstream};
use super::params::FmParams;
use super::{
    arg_or_null, cuda_err, grid_1d, CudaElement, ForwardOut, FusedMarginLoss, GpuForward,
    GpuGradients, Kernels,
};
use crate::error::Result;
use crate::spec::Shape;
use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};

/// cuBLAS operation flags.
enum Op {
    N,
    T,
}

fn blas_err(what: &str, e: cudarc::cublas::result::CublasError) -> crate::Error {
    crate::Error::Cuda {
        context: format!("cuBLAS {what}"),
        detail: format!("{e:?}"),
    }
}

/// A column-major SGEMM configuration `C (m x n) = op(A) (m x k) . op(B) (k x n)`, alpha 1, beta 0;
/// cuBLAS takes 32-bit sizes, so each is checked.
#[allow(clippy::too_many_arguments)]
fn gemm_cfg(
    ta: Op,
    tb: Op,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
) -> Result<GemmConfig<f32>> {
    let i = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| crate::Error::TooLarge {
            what: "cuBLAS GEMM",
            detail: format!("{what} = {v} does not fit cuBLAS's 32-bit sizes"),
        })
    };
    let op = |o: Op| match o {
        Op::N => cublasOperation_t::CUBLAS_OP_N,
        Op::T => cublasOperation_t::CUBLAS_OP_T,
    };
    Ok(GemmConfig {
        transa: op(ta),
        transb: op(tb),
        m: i(m, "m")?,
        n: i(n, "n")?,
        k: i(k, "k")?,
        alpha: 1.0,
        lda: i(lda, "lda")?,
        ldb: i(ldb, "ldb")?,
        beta: 0.0,
        ldc: i(ldc, "ldc")?,
    })
}

/// Threads per block of the row-wise kernels.
const ROW_THREADS: u32 = 256;

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Everything the naive forward materializes.
struct Materialized {
    x_norm: CudaSlice<f32>,
    w_norm: CudaSlice<f32>,
    xh: CudaSlice<f32>,
    wh: CudaSlice<f32>,
    tval: CudaSlice<f32>,
    dt: CudaSlice<f32>,
    prob: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    row_loss: CudaSlice<f32>,
    bytes: usize,
}

fn check_rows(rows: usize) -> Result<()> {
    if rows > i32::MAX as usize {
        return Err(crate::Error::TooLarge {
            what: "launch",
            detail: format!("naive plan: {rows} rows exceed one block per row (2^31 - 1)"),
        });
    }
    Ok(())
}

fn materialize<T: CudaElement>(
    h: &FusedMarginLoss,
    k: &Kernels,
    p: &FmParams,
    x: &CudaView<'_, T>,
    w: &CudaView<'_, T>,
    labels: &CudaView<'_, i32>,
    shape: Shape,
) -> Result<Materialized> {
    let (b, d, c) = (shape.b, shape.d, shape.c);
    check_rows(b.max(c))?;
    let (bi, ci, di) = (b as i64, c as i64, d as i32);
    let x_norm = row_norms(h, k, x, b, d)?;
    let w_norm = row_norms(h, k, w, c, d)?;

    let normalize = |v: &CudaView<'_, T>,
                     norms: &CudaSlice<f32>,
                     rows: usize,
                     on: bool|
     -> Result<CudaSlice<f32>> {
        let mut out = h.alloc::<f32>(k, rows * d)?;
        let f = k.get("naive_normalize")?;
        let (ri, on) = (rows as i64, on as i32);
        let mut lb = h.stream.launch_builder(&f);
        lb.arg(v)
            .arg(norms)
            .arg(&ri)
            .arg(&di)
            .arg(&on)
            .arg(&mut out);
        // SAFETY: one thread per element < rows*D of `v` (rows*D) and `out` (rows*D), norms[e/D] < rows.
        unsafe { lb.launch(grid_1d((rows * d) as u64, 256)?) }
            .map_err(|e| cuda_err("launch naive_normalize", e))?;
        Ok(out)
    };
    let xh = normalize(x, &x_norm, b, true)?;
    let wh = normalize(w, &w_norm, c, p.normalize_weights != 0)?;

    let bc = b * c;
    let mut cos = h.alloc::<f32>(k, bc)?;
    if let Some(blas) = h.blas() {
        // Row-major cos (B x C) = xh . wh^T is column-major cos^T (C x B) = wh^T(op T) . xh.
        let cfg = gemm_cfg(Op::T, Op::N, c, b, d, d, d, c)?;
        // SAFETY: wh is C x D (ld D), xh is B x D (ld D), cos is B x C (ld C): every access of the
        // (m=C, n=B, k=D) product stays inside the three buffers.
        unsafe { blas.gemm(cfg, &wh, &xh, &mut cos) }.map_err(|e| blas_err("cosine GEMM", e))?;
    } else {
        let f = k.get("naive_cosine")?;
        let mut lb = h.stream.launch_builder(&f);
        lb.arg(&xh)
            .arg(&wh)
            .arg(&bi)
            .arg(&ci)
            .arg(&di)
            .arg(&mut cos);
        // SAFETY: one thread per (i, j) < B*C reads rows i of xh (B*D) and j of wh (C*D), writes cos[e] (B*C).
        unsafe { lb.launch(grid_1d(bc as u64, 256)?) }
            .map_err(|e| cuda_err("launch naive_cosine", e))?;
    }

    let mut logits = h.alloc::<f32>(k, bc)?;
    let mut tval = h.alloc::<f32>(k, bc)?;
    let mut dt = h.alloc::<f32>(k, bc)?;
    let f = k.get("naive_logits")?;
    let mut lb = h.stream.launch_builder(&f);
    lb.arg(&cos)
        .arg(labels)
        .arg(&x_norm)
        .arg(p)
        .arg(&bi)
        .arg(&ci);
    lb.arg(&mut logits).arg(&mut tval).arg(&mut dt);
    // SAFETY: one thread per element < B*C of cos/logits/tval/dt (all B*C), labels/x_norm[i < B].
    unsafe { lb.launch(grid_1d(bc as u64, 256)?) }
        .map_err(|e| cuda_err("launch naive_logits", e))?;
    drop(cos);

    let mut prob = h.alloc::<f32>(k, bc)?;
    let mut lse = h.alloc::<f32>(k, b)?;
    let mut row_loss = h.alloc::<f32>(k, b)?;
    let f = k.get("naive_softmax")?;
    let mut lb = h.stream.launch_builder(&f);
    lb.arg(&logits)
        .arg(labels)
        .arg(&bi)
        .arg(&ci)
        .arg(&mut prob)
        .arg(&mut lse)
        .arg(&mut row_loss);
    // SAFETY: block i < B reads row i of logits (B*C) and labels[i], writes row i of prob (B*C)
    // and lse/row_loss[i] (B).
    unsafe { lb.launch(rows_cfg(b)) }.map_err(|e| cuda_err("launch naive_softmax", e))?;
    drop(logits);

    // Peak: xh, wh and five B x C buffers (cos, logits, tval, dt, prob) live at once at most.
    let bytes = 4 * (b * d + c * d + 5 * bc);
    Ok(Materialized {
        x_norm,
        w_norm,
        xh,
        wh,
        tval,
        dt,
        prob,
        lse,
        row_loss,
        bytes,
    })
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
    let m = materialize(h, k, p, x, w, labels, shape)?;
    let loss = reduce_loss(h, k, &m.row_loss, labels, shape.b, mean)?;
    Ok(ForwardOut {
        loss,
        row_loss: m.row_loss,
        lse: m.lse,
        x_norm: m.x_norm,
        w_norm: m.w_norm,
        workspace_bytes: m.bytes,
        tensor_cores: false,
        wgmma: false,
    })
}

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
    let (bi, ci, di) = (b as i64, c as i64, d as i32);
    let m = materialize(h, k, p, x, w, labels, shape)?;
    let Materialized {
        x_norm,
        w_norm,
        xh,
        wh,
        tval,
        dt,
        prob,
        ..
    } = m;
    let mut dc = prob;
    let mut dn = h.alloc::<f32>(k, b)?;
    let f = k.get("naive_dlogits")?;
    let mut lb = h.stream.launch_builder(&f);
    lb.arg(&mut dc).arg(&tval).arg(&dt).arg(labels).arg(&x_norm);
    arg_or_null(&mut lb, up.g_rows);
    lb.arg(&up.g_scalar).arg(p).arg(&bi).arg(&ci).arg(&mut dn);
    // SAFETY: block i < B rewrites row i of dc (B*C) from tval/dt (B*C), reads labels/x_norm/g_rows[i]
    // (B; g_rows checked == B or null) and writes dn[i] (B).
    unsafe { lb.launch(rows_cfg(b)) }.map_err(|e| cuda_err("launch naive_dlogits", e))?;
    drop((tval, dt));
    // Ignored rows contribute exact zeros to dw, even with non-finite x (README "Reliability").
    let mut xh = xh;
    let f = k.get("naive_mask_rows")?;
    let mut lb = h.stream.launch_builder(&f);
    lb.arg(&mut xh).arg(labels).arg(&bi).arg(&di);
    // SAFETY: one thread per element < B*D of xh (B*D), labels[e / D] < B.
    unsafe { lb.launch(grid_1d((b * d) as u64, 256)?) }
        .map_err(|e| cuda_err("launch naive_mask_rows", e))?;

    let matmul = |a: &CudaSlice<f32>,
                  bm: &CudaSlice<f32>,
                  rows: usize,
                  inner: usize,
                  trans: bool|
     -> Result<CudaSlice<f32>> {
        let mut out = h.alloc::<f32>(k, rows * d)?;
        if let Some(blas) = h.blas() {
            // Row-major out (rows x D) = op(a) . bm is column-major out^T (D x rows) = bm^T . op(a)^T:
            // dxh = dc . wh (a = dc B x C, no trans), dwh = dc^T . xh (a = dc B x C, trans).
            let (opa, lda) = if trans { (Op::T, rows) } else { (Op::N, inner) };
            let cfg = gemm_cfg(Op::N, opa, d, rows, inner, d, lda, d)?;
            // SAFETY: bm is inner x D (ld D); a is the B x C dc (ld C = `lda` in both cases);
            // out is rows x D (ld D): the (m=D, n=rows, k=inner) product stays in bounds.
            unsafe { blas.gemm(cfg, bm, a, &mut out) }.map_err(|e| blas_err("gradient GEMM", e))?;
            return Ok(out);
        }
        let f = k.get("naive_matmul")?;
        let (ri, ii, ti) = (rows as i64, inner as i64, trans as i32);
        let mut lb = h.stream.launch_builder(&f);
        lb.arg(a)
            .arg(bm)
            .arg(&ri)
            .arg(&ii)
            .arg(&di)
            .arg(&ti)
            .arg(&mut out);
        // SAFETY: one thread per output < rows*D; reads a (rows*inner = B*C), b (inner*D) in bounds.
        unsafe { lb.launch(grid_1d((rows * d) as u64, 256)?) }
            .map_err(|e| cuda_err("launch naive_matmul", e))?;
        Ok(out)
    };
    let dxh = matmul(&dc, &wh, b, c, false)?;
    let dwh = matmul(&dc, &xh, c, b, true)?;
    drop(dc);

    let norm_bwd = |dvh: &CudaSlice<f32>,
                    vh: &CudaSlice<f32>,
                    norms: &CudaSlice<f32>,
                    extra: Option<&CudaSlice<f32>>,
                    rows: usize,
                    on: bool|
     -> Result<CudaSlice<O>> {
        let mut out = h.alloc::<O>(k, rows * d)?;
        let name = out_entry::<T, O>("naive_norm_backward");
        let f = k.get(&name)?;
        let on = on as i32;
        let mut lb = h.stream.launch_builder(&f);
        lb.arg(dvh).arg(vh).arg(norms);
        arg_or_null(&mut lb, extra);
        lb.arg(&di).arg(&on).arg(&mut out);
        // SAFETY: block r < rows reads row r of dvh/vh (rows*D), norms/extra[r] (rows) and writes
        // row r of out (rows*D of type O).
        unsafe { lb.launch(rows_cfg(rows)) }.map_err(|e| cuda_err(&format!("launch {name}"), e))?;
        Ok(out)
    };
    let dx = norm_bwd(
        &dxh,
        &xh,
        &x_norm,
        (p.normalize_features == 0).then_some(&dn),
        b,
        true,
    )?;
    let dw = norm_bwd(&dwh, &wh, &w_norm, None, c, p.normalize_weights != 0)?;
    let workspace_bytes = 4 * (b * d + c * d + 5 * b * c) + 4 * (b * d + c * d + b);
    Ok(GpuGradients {
        dx,
        dw,
        workspace_bytes,
        tensor_cores: false,
        label_status: None,
    })
}
