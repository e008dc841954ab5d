// fused-margin: the batch steps of the losses with per-row or batch state (docs/MATH.md "Losses
// with per-row or batch state"): AdaFace's norm statistics and margins, CurricularFace's t,
// ElasticFace+'s reordering of the drawn margins by target cosine. Each is one block of 1024
// threads over the call's B rows, in a fixed order (strided per-thread sums in f64, then a fixed
// tree): the state out is bit-identical from run to run. The state is the caller's, carried in
// f64 (an i64 buffer of the host's f64 bit patterns, src/cuda/plan.rs Buf::StateIn/StateOut):
// AdaFace (mean, std), CurricularFace (t). Counted rows: label >= 0. The CPU twins are
// math::adaface_update / adaface_row, curricular_update and elastic_plus.
#include "common.cuh"

#define FM_STATE_THREADS 1024

// The sum over the block of one f64 per thread, in a fixed tree; every thread gets it.
__device__ __forceinline__ double fm_block_sum(double v, double* red) {
    __syncthreads();   // red may still be read by a previous call
    red[threadIdx.x] = v;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o];
        __syncthreads();
    }
    return red[0];
}

// clip(v, lo, hi) that keeps NaN (fmin/fmax would drop it: one NaN counted row poisons the
// batch statistics, as on the reference).
__device__ __forceinline__ double fm_clip_nan(double v, double lo, double hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

// AdaFace: n_i = clip(|x_i|, e, 100) over the N counted rows; mu <- alpha mean(n) + (1 - alpha)
// mu and, with N >= 2, sigma <- alpha sd(n) + (1 - alpha) sigma (divisor N - 1, as torch.std);
// no counted row keeps the state. Then every row's margins from the updated state:
// z_i = clip(h (n_i - mu) / (sigma + e), -1, 1), rowm = (m2_i = -m z_i, m3_i = m (1 + z_i)),
// read by fm_target_rows (fm_row_margin_given). z, mu and sigma are constants of the backward.
// state_in, state_out: (mu, sigma).
extern "C" __global__ void FM_ENTRY(fm_adaface_state)(const int* __restrict__ labels,
                                                      const float* __restrict__ xnorm, i64 B,
                                                      const double* __restrict__ state_in, FmParams p,
                                                      double* __restrict__ state_out,
                                                      float* __restrict__ rowm) {
    __shared__ double red[FM_STATE_THREADS];
    const double e = (double)p.clamp, m = p.vp[0], h = p.vp[1], alpha = p.vp[2];
    double s = 0.0, cnt = 0.0;
    for (i64 i = threadIdx.x; i < B; i += blockDim.x) {
        if (labels[i] < 0) continue;
        s += fm_clip_nan((double)xnorm[i], e, 100.0);
        cnt += 1.0;
    }
    const double n_rows = fm_block_sum(cnt, red);
    const double mu_b = fm_block_sum(s, red) / n_rows;
    double v = 0.0;
    for (i64 i = threadIdx.x; i < B; i += blockDim.x) {
        if (labels[i] < 0) continue;
        const double d = fm_clip_nan((double)xnorm[i], e, 100.0) - mu_b;
        v += d * d;
    }
    const double ss = fm_block_sum(v, red);
    double mu = state_in[0], sigma = state_in[1];
    if (n_rows > 0.0) mu = alpha * mu_b + (1.0 - alpha) * mu;
    if (n_rows >= 2.0) sigma = alpha * sqrt(ss / (n_rows - 1.0)) + (1.0 - alpha) * sigma;
    if (threadIdx.x == 0) {
        state_out[0] = mu;
        state_out[1] = sigma;
    }
    for (i64 i = threadIdx.x; i < B; i += blockDim.x) {
        const double n = fm_clip_nan((double)xnorm[i], e, 100.0);
        const double z = fm_clip_nan(h * (n - mu) / (sigma + e), -1.0, 1.0);
        rowm[2 * i] = (float)(-m * z);
        rowm[2 * i + 1] = (float)(m * (1.0 + z));
    }
}

// CurricularFace: t <- alpha mean(c_iy) + (1 - alpha) t over the counted rows, with the target
// cosines before the margin (the target record's COSY section, fm_target_rows); no counted row
// keeps t. The state out goes to state_out and, in f32, to the record's t, which the tiles read
// (FmRow.ct) for the hard negatives c (t + c). state_in, state_out: (t).
extern "C" __global__ void FM_ENTRY(fm_curricular_state)(const int* __restrict__ labels, i64 B,
                                                         const double* __restrict__ state_in,
                                                         FmParams p, double* __restrict__ state_out,
                                                         float* __restrict__ tgt) {
    __shared__ double red[FM_STATE_THREADS];
    const double alpha = p.vp[0];
    double s = 0.0, cnt = 0.0;
    for (i64 i = threadIdx.x; i < B; i += blockDim.x) {
        if (labels[i] < 0) continue;
        s += (double)tgt[fm_tgt_at(FM_TGT_COSY, B, i)];
        cnt += 1.0;
    }
    const double n_rows = fm_block_sum(cnt, red);
    const double mean = fm_block_sum(s, red) / n_rows;
    double t = state_in[0];
    if (n_rows > 0.0) t = alpha * mean + (1.0 - alpha) * t;
    if (threadIdx.x == 0) {
        state_out[0] = t;
        tgt[fm_tgt_t(B)] = (float)t;
    }
}

// Whether counted row l (cosine cl) ranks before row j (cj) in ElasticFace+'s descending order:
// larger first, ties to the lower row; a NaN ranks first (as f64::total_cmp orders a positive
// NaN), so the ranks are a permutation whatever the cosines and every scratch slot is written.
__device__ __forceinline__ bool fm_ranks_before(float cl, i64 l, float cj, i64 j) {
    const bool ln = cl != cl, jn = cj != cj;
    if (ln != jn) return ln;
    if (!ln && cl != cj) return cl > cj;
    return l < j;
}

// ElasticFace+ (math::elastic_plus): the counted rows, numbered p in row order, ranked by their
// target cosine (the record's COSY section), largest first, ties to the lower row: pi(k) is the
// one of rank k; their drawn margins sorted ascending: sorted[k]. Rank (vp[1] = 1): row pi(k)
// takes sorted[k]; Published (vp[1] = 2, fdbtrs/ElasticFace's indexing): row p takes
// sorted[pi(p)]. Ignored rows keep their drawn margin. drawn and rowm hold (m2_i, m3_i) per row;
// the margin is m2 (Arc, vp[0] = 0) or m3 (Cos). scratch: 2 B floats (sorted, then pi as ints).
// Ranks by counting, O(B^2 / 1024) per thread: B = 8,192 is 65,536 compares a thread.
extern "C" __global__ void FM_ENTRY(fm_elastic_plus)(const int* __restrict__ labels, i64 B,
                                                     const float* __restrict__ tgt,
                                                     const float* __restrict__ drawn, FmParams p,
                                                     float* __restrict__ scratch,
                                                     float* __restrict__ rowm) {
    const int side = p.vp[0] == 0.0f ? 0 : 1;
    const bool published = p.vp[1] == 2.0f;
    float* sorted = scratch;
    int* pi = reinterpret_cast<int*>(scratch + B);
    const float* cy = tgt + fm_tgt_at(FM_TGT_COSY, B, 0);
    // Pass 1, per counted row j: its position among the counted rows, its margin's ascending rank
    // (ties by row) and its cosine's descending rank (ties by row, lower first).
    for (i64 j = threadIdx.x; j < B; j += blockDim.x) {
        if (labels[j] < 0) continue;
        const float mj = drawn[2 * j + side], cj = cy[j];
        int pos = 0, rm = 0, rc = 0;
        for (i64 l = 0; l < B; ++l) {
            if (labels[l] < 0) continue;
            const float ml = drawn[2 * l + side], cl = cy[l];
            pos += l < j;
            rm += ml < mj || (ml == mj && l < j);
            rc += fm_ranks_before(cl, l, cj, j);
        }
        sorted[rm] = mj;
        pi[rc] = pos;
    }
    __syncthreads();   // block-wide: the scratch writes above are visible to every thread now
    for (i64 i = threadIdx.x; i < B; i += blockDim.x) {
        float mi = drawn[2 * i + side];
        if (labels[i] >= 0) {
            const float ci = cy[i];
            int pos = 0, rc = 0;
            for (i64 l = 0; l < B; ++l) {
                if (labels[l] < 0) continue;
                const float cl = cy[l];
                pos += l < i;
                rc += fm_ranks_before(cl, l, ci, i);
            }
            mi = published ? sorted[pi[pos]] : sorted[rc];
        }
        rowm[2 * i] = side == 0 ? mi : 0.0f;
        rowm[2 * i + 1] = side == 0 ? 0.0f : mi;
    }
}
