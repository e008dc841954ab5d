//! What benches/loss.rs (criterion) and examples/bench_table.rs (a one-line-per-case table) share:
//! the shapes, inputs, cases, one timed repetition, the memory measurement and the cuBLAS GEMMs
//! used as the roof. Included by path from both.
#![allow(dead_code)]

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaStream};
use fused_margin::cuda::measure::{EventTimer, L2Flush, PoolPeak};
use fused_margin::cuda::{
    CudaElement, F32Precision, FusedMarginLoss, GpuUpstream, LabelCheck, Options, Plan,
};
use fused_margin::{MarginLoss, Result, Shape};
use rayon::prelude::*;
use std::sync::Arc;

/// Batch rows and embedding width of every GPU case (the face-recognition shape).
pub const B: usize = 512;
/// Embedding dimension.
pub const D: usize = 512;
/// Class counts.
pub const CLASSES: [usize; 3] = [10_000, 100_000, 1_000_000];

/// The two losses benchmarked, with their papers' hyper-parameters.
pub fn losses() -> [(&'static str, MarginLoss); 2] {
    [
        ("arcface", MarginLoss::arcface(0.5)),
        ("cosface", MarginLoss::cosface(0.35)),
    ]
}

/// What is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward only.
    Forward,
    /// Backward only (its forward runs untimed first).
    Backward,
    /// Forward then backward.
    Full,
}

impl Mode {
    /// All three.
    pub const ALL: [Mode; 3] = [Mode::Forward, Mode::Backward, Mode::Full];
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Forward => "forward",
            Mode::Backward => "backward",
            Mode::Full => "full",
        }
    }
    /// Useful FLOPs: 2*B*C*D per matrix product (forward one, backward two), whatever a plan
    /// recomputes on top.
    pub fn flops(self, s: Shape) -> f64 {
        let one = 2.0 * s.b as f64 * s.c as f64 * s.d as f64;
        match self {
            Mode::Forward => one,
            Mode::Backward => 2.0 * one,
            Mode::Full => 3.0 * one,
        }
    }
}

/// Uniform values in [-1, 1) from a counter-based hash (splitmix64): fast in parallel, seeded,
/// never zeros.
pub fn random<T: CudaElement>(n: usize, seed: u64) -> Vec<T> {
    (0..n)
        .into_par_iter()
        .map(|i| {
            let mut z = seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(i as u64)
                .wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            T::from_f64((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
        })
        .collect()
}

/// One problem's device inputs.
pub struct Problem<T> {
    /// B x D x C.
    pub shape: Shape,
    /// Embeddings.
    pub x: CudaSlice<T>,
    /// Class weights.
    pub w: CudaSlice<T>,
    /// Labels in 0..C.
    pub labels: CudaSlice<i32>,
}

/// Random inputs for `c` classes on the device.
pub fn problem<T: CudaElement>(stream: &Arc<CudaStream>, c: usize, seed: u64) -> Problem<T> {
    let shape = Shape::new(B, D, c);
    let labels: Vec<i32> = (0..B)
        .map(|i| ((i * 7919 + seed as usize) % c) as i32)
        .collect();
    Problem {
        shape,
        x: stream
            .clone_htod(&random::<T>(B * D, seed))
            .expect("upload x"),
        w: stream
            .clone_htod(&random::<T>(c * D, seed + 1))
            .expect("upload w"),
        labels: stream.clone_htod(&labels).expect("upload labels"),
    }
}

/// Timer, L2 flush and pool for one stream.
pub struct Tools {
    /// Event pair.
    pub timer: EventTimer,
    /// L2 eviction.
    pub flush: L2Flush,
    /// Default memory pool (None when the device allocates synchronously).
    pub pool: Option<PoolPeak>,
}

impl Tools {
    /// Sets the pool to keep freed memory (as a caching allocator would) and builds the tools.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let pool = PoolPeak::new(stream).ok();
        if let Some(p) = &pool {
            p.keep_memory()?;
        }
        Ok(Self {
            timer: EventTimer::new(stream)?,
            flush: L2Flush::new(stream)?,
            pool,
        })
    }
}

/// One repetition of `mode`, in GPU milliseconds between two events, after an L2 flush. Host
/// work inside the call (validation, launches) is on the timeline as the GPU sees it; results
/// are freed inside the timed region (stream-ordered, as a caller's would be).
pub fn time_once<T: CudaElement>(
    gpu: &FusedMarginLoss,
    spec: &MarginLoss,
    p: &Problem<T>,
    mode: Mode,
    tools: &mut Tools,
) -> Result<f64> {
    let (x, w, l) = (p.x.as_view(), p.w.as_view(), p.labels.as_view());
    let s = gpu.stream().clone();
    let pre = match mode {
        Mode::Backward => Some(gpu.forward(spec, &x, &w, &l, p.shape)?),
        _ => None,
    };
    tools.flush.flush()?;
    tools.timer.time_ms(&s, || {
        match (mode, &pre) {
            (Mode::Forward, _) => drop(gpu.forward(spec, &x, &w, &l, p.shape)?),
            (Mode::Backward, Some(f)) => drop(gpu.backward(f, &x, &w, &l, GpuUpstream::ONE)?),
            _ => {
                let f = gpu.forward(spec, &x, &w, &l, p.shape)?;
                drop(gpu.backward(&f, &x, &w, &l, GpuUpstream::ONE)?);
            }
        }
        Ok(())
    })
}

/// Median of `reps` repetitions (ms).
pub fn median_ms<T: CudaElement>(
    gpu: &FusedMarginLoss,
    spec: &MarginLoss,
    p: &Problem<T>,
    mode: Mode,
    tools: &mut Tools,
    reps: usize,
) -> Result<f64> {
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| time_once(gpu, spec, p, mode, tools))
        .collect::<Result<_>>()?;
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

/// Peak device memory of one forward + backward above the inputs, measured as the memory pool's
/// high-water mark above the usage before the call, and the gradients' bytes. The gradients are
/// included in the peak when they are live at that moment (the fused plan: its workspace is still
/// held when they are allocated); the naive plan peaks while materializing, before they exist.
/// The forward's saved state (norms, lse) counts: it lives until backward ends.
pub fn peak_bytes<T: CudaElement>(
    gpu: &FusedMarginLoss,
    spec: &MarginLoss,
    p: &Problem<T>,
    tools: &Tools,
) -> Result<Option<(u64, u64)>> {
    let Some(pool) = &tools.pool else {
        return Ok(None);
    };
    let (x, w, l) = (p.x.as_view(), p.w.as_view(), p.labels.as_view());
    let s = gpu.stream();
    s.synchronize()
        .map_err(|e| fused_margin::Error::driver("sync", e))?;
    let base = pool.used()?;
    pool.reset()?;
    let grads_bytes;
    {
        let f = gpu.forward(spec, &x, &w, &l, p.shape)?;
        let g = gpu.backward(&f, &x, &w, &l, GpuUpstream::ONE)?;
        grads_bytes = (g.dx.len() + g.dw.len()) * std::mem::size_of::<T>();
        s.synchronize()
            .map_err(|e| fused_margin::Error::driver("sync", e))?;
    }
    Ok(Some((
        pool.high()?.saturating_sub(base),
        grads_bytes as u64,
    )))
}

/// A handle for `plan` on `stream`.
pub fn handle(stream: &Arc<CudaStream>, plan: Plan) -> FusedMarginLoss {
    handle_with(stream, plan, |_| {})
}

/// A handle for `plan` on `stream` with the default options changed by `set` (`Options` is
/// `#[non_exhaustive]`: built from the default, field by field).
pub fn handle_with(
    stream: &Arc<CudaStream>,
    plan: Plan,
    set: impl FnOnce(&mut Options),
) -> FusedMarginLoss {
    let mut o = Options::default();
    o.plan = plan;
    set(&mut o);
    FusedMarginLoss::with_options(stream.clone(), o).expect("handle")
}

/// The measured configurations for input dtype `dt`, by label: "fused" (the default handle:
/// tensor cores forward and backward for f16/bf16), "fused_simtbwd" (the SIMT backward
/// instead; f16/bf16 only), "fused_hostlabels" (the default with
/// `LabelCheck::Host`: one synchronous label copy per call, as before the device check was the default; f16/bf16 only), "fused_wgmma" (the
/// opt-in wgmma forward on sm_90a; f16/bf16 only), "fused_tf32" (f32 through the opt-in TF32 forward),
/// "fused_wide" (the 128 x 256 forward tiles; TF32 for f32), "naive" (the eager baseline), and with `simt` "simt" (the fused plan with tensor cores off;
/// f16/bf16 only).
pub fn variants(
    stream: &Arc<CudaStream>,
    dt: &str,
    simt: bool,
) -> Vec<(&'static str, FusedMarginLoss)> {
    let half = dt != "f32";
    let fused = |set: fn(&mut Options)| handle_with(stream, Plan::Fused, set);
    let mut v = vec![("fused", handle(stream, Plan::Fused))];
    if half {
        v.push(("fused_simtbwd", fused(|o| o.tensor_core_backward = false)));
        v.push((
            "fused_hostlabels",
            fused(|o| o.label_check = LabelCheck::Host),
        ));
        // Benchmark-only kernel candidates go through the hidden override.
        v.push(("fused_wgmma", fused(|o| o.kernel_override.wgmma = true)));
    }
    if !half {
        v.push((
            "fused_tf32",
            fused(|o| o.f32_precision = F32Precision::Tf32),
        ));
    }
    // The wide forward tiles: for f32 through TF32 (the SIMT f32 path has no wide variant).
    v.push((
        "fused_wide",
        handle_with(stream, Plan::Fused, |o| {
            o.kernel_override.wide_forward_tiles = true;
            if !half {
                o.f32_precision = F32Precision::Tf32;
            }
        }),
    ));
    v.push(("naive", handle(stream, Plan::Naive)));
    if half && simt {
        v.push(("simt", fused(|o| o.tensor_cores = false)));
    }
    v
}

/// A cuBLAS handle whose f32 GEMMs run on TF32 tensor cores (`CUBLAS_TF32_TENSOR_OP_MATH`): the
/// roof for the TF32 opt-in. None when libcublas is missing or refuses the mode.
pub fn tf32_blas(stream: &Arc<CudaStream>) -> Option<CudaBlas> {
    use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode, cublasStatus_t};
    let blas = CudaBlas::new(stream.clone()).ok()?;
    // SAFETY: the handle is valid for the life of `blas`; the call only sets its math mode.
    let st = unsafe { cublasSetMathMode(*blas.handle(), cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH) };
    (st == cublasStatus_t::CUBLAS_STATUS_SUCCESS).then_some(blas)
}

/// Times one cuBLAS GEMM `C (m x n) = A (m x k) . B (k x n)` in bf16 (f32 accumulation) or f32,
/// median of `reps`, in ms (L2 flushed before each).
pub fn gemm_ms<T: CudaElement>(
    blas: &CudaBlas,
    stream: &Arc<CudaStream>,
    (m, n, k): (usize, usize, usize),
    tools: &mut Tools,
    reps: usize,
) -> Result<f64>
where
    CudaBlas: Gemm<T>,
{
    let a = stream
        .clone_htod(&random::<T>(m * k, 11))
        .expect("upload A");
    let b = stream
        .clone_htod(&random::<T>(k * n, 12))
        .expect("upload B");
    let mut c = stream.alloc_zeros::<T>(m * n).expect("alloc C");
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        alpha: T::from_f64(1.0),
        lda: m as i32,
        ldb: k as i32,
        beta: T::from_f64(0.0),
        ldc: m as i32,
    };
    let mut t = Vec::new();
    for _ in 0..reps.max(1) {
        tools.flush.flush()?;
        t.push(tools.timer.time_ms(stream, || {
            // SAFETY: A is m x k (ld m), B is k x n (ld k), C is m x n (ld m), all allocated so.
            unsafe { blas.gemm(cfg, &a, &b, &mut c) }
                .map_err(|e| fused_margin::Error::cublas("cuBLAS GEMM", e))
        })?);
    }
    t.sort_by(|x, y| x.total_cmp(y));
    Ok(t[t.len() / 2])
}

/// TFLOP/s of `flops` in `ms`.
pub fn tflops(flops: f64, ms: f64) -> f64 {
    flops / (ms * 1e-3) / 1e12
}
