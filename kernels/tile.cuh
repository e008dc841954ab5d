// fused-margin: the cosine-logits tile shared by the fused forward and backward kernels.
//
// A block of 256 threads computes the raw dot products of FM_BM rows of x with FM_BN rows of w,
// accumulating over D in chunks of FM_BK through shared memory (f32 accumulation whatever the
// input dtype). Thread (ty, tx) = (tid / 16, tid % 16) owns rows {ty, ty + 16} and columns
// {tx, tx + 16}, so the 16 threads of one row sit in one half-warp and row reductions are
// shuffles. v1 is plain SIMT; the tensor-core version replaces this file, not its callers.
#ifndef FM_TILE_CUH
#define FM_TILE_CUH
#include "common.cuh"

#define FM_BM FM_G_BM
#define FM_BN FM_G_BN
#define FM_BK 32
#define FM_THREADS FM_G_THREADS
#define FM_DC FM_G_DC   // gradient columns (of D) owned by one block in the backward kernels

struct FmTileSmem {
    float xs[FM_BM][FM_BK + 1];   // +1: rows land in different banks
    float ws[FM_BN][FM_BK + 1];
};

// acc[a][b] = x[row0 + ty + 16a] . w[col0 + tx + 16b] (raw, un-normalized; 0 outside the matrix).
// All 64-bit offsets: row * D and col * D can exceed 2^31.
// With `tf32` the operands are rounded to TF32 first (cvt.rna), as the TF32 forward's are: the
// backward then recomputes the forward's logits up to f32 summation order, so the softmax it forms
// from the saved lse is consistent (sums to 1) even for the gradients of tiny losses.
// w's rows are `ldw` elements apart: D, or K D for sub-center k of each class (w offset by k D).
template <typename T>
__device__ __forceinline__ void fm_dot_tile(const T* __restrict__ x, const T* __restrict__ w,
                                            i64 row0, i64 col0, i64 B, i64 C, int D, i64 ldw,
                                            FmTileSmem& sm, float acc[2][2], bool tf32 = false,
                                            const int* widx = nullptr) {
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    acc[0][0] = acc[0][1] = acc[1][0] = acc[1][1] = 0.0f;
    for (int k0 = 0; k0 < D; k0 += FM_BK) {
        // 1024 elements per operand, 4 per thread, consecutive threads on consecutive k (coalesced).
#pragma unroll
        for (int q = 0; q < (FM_BM * FM_BK) / FM_THREADS; ++q) {
            int e = tid + q * FM_THREADS, r = e / FM_BK, k = e % FM_BK;
            i64 row = row0 + r, col = col0 + r;
            bool kin = k0 + k < D;
            float xv = (row < B && kin) ? fm_to_f32(x[row * D + k0 + k]) : 0.0f;
            float wv = (col < C && kin) ? fm_to_f32(w[fm_wrow(widx, col) * ldw + k0 + k]) : 0.0f;
            if (tf32) {   // the low 13 bits of a cvt.rna.tf32 result are not specified: cleared
                xv = __uint_as_float(fm_f32_to_tf32(xv) & 0xffffe000u);
                wv = __uint_as_float(fm_f32_to_tf32(wv) & 0xffffe000u);
            }
            sm.xs[r][k] = xv;
            sm.ws[r][k] = wv;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < FM_BK; ++k) {
            float a0 = sm.xs[ty][k], a1 = sm.xs[ty + 16][k];
            float b0 = sm.ws[tx][k], b1 = sm.ws[tx + 16][k];
            acc[0][0] = fmaf(a0, b0, acc[0][0]);
            acc[0][1] = fmaf(a0, b1, acc[0][1]);
            acc[1][0] = fmaf(a1, b0, acc[1][0]);
            acc[1][1] = fmaf(a1, b1, acc[1][1]);
        }
        __syncthreads();
    }
}

// What one element of the tile contributes, from its raw dot product (docs/MATH.md steps 2-5):
// c = dot / (max(|x_i|,eps) * max(|w_j|,eps)) (the weight factor only with weight normalization),
// t = target(c) at the label, else c (CurricularFace's hard negatives: c (t + c)); z = r_i * t;
// dt = dt/dc (1 off the label). At the label t and dt are the row's (FmRow.tt, .tdt:
// fm_target_rows), so no margin maths runs here.
struct FmElem { float c, t, z, dt; };

// Per-row context of the forward and the backward: label, 1/max(|x_i|,eps), the row's margins
// and r_i (the per-row slot, fm_row_margin), the target t and dtarget/dc at the label (tgt, from
// fm_target_rows), and in the backward the saved lse_i and upstream g_i. Rows past B: label -1
// and zeros (never written, never counted).
// In the backward also l_i, the row's cross-entropy from fm_combine_rows (tgt[2 B + row]).
// CurricularFace's threshold tau_i and t (fm_tgt_tau, fm_tgt_t): +inf and 0 for every other loss,
// so `c > tau` never holds there.
struct FmRow { int label; float inv_x, r, lse, g, tt, tdt, ce, tau, ct; FmMargin m; };

__device__ __forceinline__ FmRow fm_row_ctx(const FmParams& p, i64 row, i64 B, const int* labels,
                                            const float* xnorm, const float* tgt) {
    FmRow R;
    R.lse = 0.0f;
    R.ce = 0.0f;
    R.g = 0.0f;
    if (row < B) {
        R.label = labels[row];
        const float n = xnorm[row];
        R.inv_x = fm_inv_norm(n);
        R.m = fm_row_margin(p, row, n);
        R.r = fm_row_scale(p, R.m, n);
        R.tt = tgt[2 * row];
        R.tdt = tgt[2 * row + 1];
        R.tau = tgt[fm_tgt_at(FM_TGT_TAU, B, row)];
        R.ct = tgt[fm_tgt_t(B)];
    } else {
        R.label = -1; R.inv_x = 0.0f; R.r = 0.0f; R.tt = 0.0f; R.tdt = 1.0f;
        R.tau = FM_POS_INF; R.ct = 0.0f;
        R.m = fm_row_margin(p, row, 0.0f);
    }
    return R;
}

__device__ __forceinline__ FmRow fm_load_row(const FmParams& p, i64 row, i64 B, const int* labels,
                                             const float* xnorm, const float* tgt, const float* lse,
                                             const float* g_rows, float g_scalar) {
    FmRow R = fm_row_ctx(p, row, B, labels, xnorm, tgt);
    if (row < B) {
        R.lse = lse[row];
        R.ce = tgt[fm_tgt_at(FM_TGT_CE, B, row)];
        R.g = fm_upstream(g_rows, g_scalar, row, R.label);
    }
    return R;
}

// c_ij from the raw dot product: dot / (max(|x_i|,eps) max(|w_j|,eps)), the weight factor only
// with weight normalization.
__device__ __forceinline__ float fm_cos_x(const FmParams& p, float inv_x, float dot, float inv_w) {
    return dot * inv_x * (p.normalize_weights ? inv_w : 1.0f);
}
__device__ __forceinline__ float fm_cos(const FmParams& p, const FmRow& R, float dot, float inv_w) {
    return fm_cos_x(p, R.inv_x, dot, inv_w);
}

// An element from its cosine c (fm_cos; with sub-centers the class's, fm_subcenter_max).
__device__ __forceinline__ FmElem fm_elem_c(const FmParams& p, const FmRow& R, float c, bool is_target) {
    FmElem e;
    e.c = c;
    if (is_target) {
        e.t = R.tt;
        e.dt = R.tdt;
    } else {
        fm_curricular_negative(e.c, R.tau, R.ct, e.t, e.dt);   // c itself unless CurricularFace's hard
    }
    e.z = R.r * e.t;
    return e;
}

__device__ __forceinline__ FmElem fm_elem(const FmParams& p, const FmRow& R, float dot, float inv_w,
                                          bool is_target) {
    return fm_elem_c(p, R, fm_cos(p, R, dot, inv_w), is_target);
}

// The backward at one element (docs/MATH.md "Backward") for a unit upstream, from the saved lse:
// d = softmax - onehot, e = d * dtarget/dc, with c (for proj = sum_j dc_ij c_ij = vh . dvh, the
// projection the normalization backward needs) and dt = d * t (for dn = s g sum_j d_ij t_ij
// without feature norm). The real dc_ij = r_i g_i e_ij; the tensor-core backward multiplies by
// r_i g_i outside its products, so the 16-bit operand e stays in range (|d| <= 1).
struct FmGradElem { float e, c, dt; };

__device__ __forceinline__ FmGradElem fm_grad_elem_c(const FmParams& p, const FmRow& R, i64 col, float c) {
    bool tgt = R.label == col;
    FmElem el = fm_elem_c(p, R, c, tgt);
    // softmax - onehot; at the target p_iy - 1 = expm1(-l_i) from the forward's l_i, exact where
    // expf(z - lse) - 1 would cancel (a well-classified row: 1 - p_iy below f32's 2^-24 of lse).
    float d = tgt ? expm1f(-R.ce) : expf(el.z - R.lse);
    FmGradElem q;
    q.e = d * el.dt;
    q.c = el.c;
    q.dt = d * el.t;
    return q;
}

__device__ __forceinline__ FmGradElem fm_grad_elem(const FmParams& p, const FmRow& R, i64 col, float dot,
                                                   float inv_w) {
    return fm_grad_elem_c(p, R, col, fm_cos(p, R, dot, inv_w));
}

// dc = r g e at one element, with c and dz * t = g d t. Rows with g = 0 (ignored) give exact zeros.
// `cos`: the element's cosine (fm_cos, or the sub-center maximum).
__device__ __forceinline__ float fm_dc(const FmParams& p, const FmRow& R, i64 col, float cos, float& c,
                                       float& dzt) {
    if (R.g == 0.0f) { c = 0.0f; dzt = 0.0f; return 0.0f; }
    FmGradElem q = fm_grad_elem_c(p, R, col, cos);
    c = q.c;
    dzt = R.g * q.dt;
    return R.r * (R.g * q.e);
}

// The class range [t_begin, t_end) of tiles that split `split` of `nsplit` covers.
__device__ __forceinline__ void fm_split_range(i64 ntiles, int split, int tiles_per_split,
                                               i64& t_begin, i64& t_end) {
    t_begin = (i64)split * tiles_per_split;
    t_end = t_begin + tiles_per_split;
    if (t_end > ntiles) t_end = ntiles;
}


// ---- the tensor-core forwards' epilogue (logits_tc.cu, logits_wg.cu) ------------------------------
// Their accumulators share mma's C-fragment layout: per n8 block ni, a thread holds rows g and g+8
// (h = 0, 1) at columns 2t and 2t+1 (j = 0, 1) in acc[ni][h * 2 + j].

// 1 / max(|w_r|, eps) and "inside C" for the thread's columns col = col_base + ni * 8 + j, whose
// rows of w are r = col K + sub (K = 1, sub = 0 but for sub-centers).
template <int NI>
__device__ __forceinline__ void fm_tc_col_factors(const float* __restrict__ wnorm, i64 C, i64 col_base,
                                                  float (&inv_w)[NI][2], bool (&cin)[NI][2], int K = 1,
                                                  int sub = 0) {
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const i64 col = col_base + ni * 8 + j;
            cin[ni][j] = col < C;
            inv_w[ni][j] = cin[ni][j] ? fm_inv_norm(wnorm[col * K + sub]) : 0.0f;
        }
}

// Sub-centers in the tensor-core forwards: the cosines of sub-center `sub`'s accumulators (raw
// dots of rows col K + sub) merged into the running class maxima `best` (fm_subcenter_max, k in
// order), for the thread's rows h = 0, 1 of one m16 block. After the last sub-center the
// epilogue runs on `best` with unit factors (fm_tc_unit_row), so its c is best exactly.
template <int NI>
__device__ __forceinline__ void fm_tc_subcenter_merge(const FmParams& p, const float (&acc)[NI][4],
                                                      float (&best)[NI][4], const float (&inv_w)[NI][2],
                                                      const FmRow& R0, const FmRow& R1, int sub) {
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int v = 0; v < 4; ++v) {
            int won;
            fm_subcenter_max(best[ni][v], won, fm_cos(p, v < 2 ? R0 : R1, acc[ni][v], inv_w[ni][v & 1]), sub);
            (void)won;
        }
}

// A row context whose 1/|x_i| is 1: the epilogue's c = dot * 1 * 1 is then the cosine it is given.
__device__ __forceinline__ FmRow fm_tc_unit_row(FmRow R) {
    R.inv_x = 1.0f;
    return R;
}

// One row's share of a class tile (docs/MATH.md steps 2-5): the logits z of its 2 NI columns from the
// raw dot products, z_iy written when the label is among them, and the tile's (max, sum-exp) of
// the other columns merged into the row's running pair.
template <int NI>
__device__ __forceinline__ void fm_tc_row_epilogue(const FmParams& p, const float (&acc)[NI][4], int h, i64 row,
                                                   i64 B, i64 col_base, const bool (&cin)[NI][2],
                                                   const float (&inv_w)[NI][2], const FmRow& R,
                                                   float* __restrict__ zy, float& run_m, float& run_s) {
    float z[2 * NI];
    float mx = FM_NEG_INF;
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const i64 col = col_base + ni * 8 + j;
            float v = FM_NEG_INF;
            if (cin[ni][j] && row < B) {
                const bool tgt = R.label == col;
                FmElem e = fm_elem(p, R, acc[ni][h * 2 + j], inv_w[ni][j], tgt);
                // The target goes to zy only: fm_combine_rows adds it to the other classes'
                // logsumexp without cancellation.
                v = tgt ? FM_NEG_INF : e.z;
                if (tgt) zy[row] = e.z;
            }
            z[ni * 2 + j] = v;
            mx = fmaxf(mx, v);
        }
    float sum = 0.0f;
#pragma unroll
    for (int e = 0; e < 2 * NI; ++e) sum += z[e] == FM_NEG_INF ? 0.0f : expf(z[e] - mx);
    // A NaN logit makes sum NaN (fmaxf skipped it in mx): merged as NaN, never dropped.
    fm_online_merge(run_m, run_s, sum != sum ? sum : mx, sum);
}

#endif  // FM_TILE_CUH
