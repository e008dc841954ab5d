// fused-margin: the naive plan, eager PyTorch's shape of work: one plain kernel per step, every
// intermediate materialized in f32 (normalized copies, the B x C cosines, logits, softmax, dc).
// It is the benchmarks' baseline and a second implementation for the tests, so it follows
// docs/MATH.md literally (e.g. the normalization backward uses the explicit dot vh . dvh) and shares
// only the margin maths (fm_target) with the fused plan. All offsets are 64-bit.
#include "common.cuh"

// vh_r = v_r / max(|v_r|, eps) when `normalize`, else v_r (in f32). One thread per element.
extern "C" __global__ void FM_ENTRY(naive_normalize)(const T_IN* __restrict__ v, const float* __restrict__ norms,
                                                     i64 rows, int D, int normalize, float* __restrict__ out) {
    i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= rows * D) return;
    float val = fm_to_f32(v[e]);
    out[e] = normalize ? val * fm_inv_norm(norms[e / D]) : val;
}

// Backward only: zeroes the rows of ignored labels (label < 0) of xh before the products, so an
// ignored row contributes exact zeros to dw even when its x is not finite (0 * NaN = NaN in a
// product). One thread per element.
extern "C" __global__ void FM_ENTRY(naive_mask_rows)(float* __restrict__ v, const int* __restrict__ labels,
                                                     i64 rows, int D) {
    i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= rows * D) return;
    if (labels[e / D] < 0) v[e] = 0.0f;
}

// cos[i, j] = xh_i . wh_j. One thread per element (i, j), j fastest.
extern "C" __global__ void FM_ENTRY(naive_cosine)(const float* __restrict__ xh, const float* __restrict__ wh,
                                                  i64 B, i64 C, int D, float* __restrict__ cos) {
    i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= B * C) return;
    i64 i = e / C, j = e % C;
    const float* a = xh + i * D;
    const float* b = wh + j * D;
    float acc = 0.0f;
    for (int k = 0; k < D; ++k) acc = fmaf(a[k], b[k], acc);
    cos[e] = acc;
}

// Sub-center ArcFace: cos[i, j] = max_k all[i, j K + k] and win[i, j] = its k (fm_subcenter_max:
// the lowest k on a tie), from the cosines of all C K rows of w. One thread per (i, j).
extern "C" __global__ void FM_ENTRY(naive_subcenter_max)(const float* __restrict__ all, i64 B, i64 C, int K,
                                                         float* __restrict__ cos, float* __restrict__ win) {
    i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= B * C) return;
    const float* a = all + e * K;   // row i, columns jK .. jK + K - 1: e K = (i C + j) K
    float best = 0.0f;
    int w = 0;
    for (int k = 0; k < K; ++k) fm_subcenter_max(best, w, a[k], k);
    cos[e] = best;
    win[e] = (float)w;
}

// Sub-center ArcFace's backward: out[i, j K + k] = dc[i, j] where k won (win[i, j]), else 0, the
// B x C K operand of the two gradient products (dW reaches the winner only). One thread per
// element of out.
extern "C" __global__ void FM_ENTRY(naive_subcenter_scatter)(const float* __restrict__ dc,
                                                             const float* __restrict__ win, i64 B, i64 C, int K,
                                                             float* __restrict__ out) {
    i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= B * C * K) return;
    const i64 ij = e / K;
    out[e] = (int)win[ij] == (int)(e % K) ? dc[ij] : 0.0f;
}

// logits[i, j] = r_i * (j == y_i ? target(c) : c); tval keeps t_ij, dt keeps dtarget/dc (1 off the label).
// tgt (nullable): the target record of fm_target_rows, for CurricularFace's hard negatives
// (c > tau_i: c (t + c), derivative t + 2c).
extern "C" __global__ void FM_ENTRY(naive_logits)(const float* __restrict__ cos, const int* __restrict__ labels,
                                                  const float* __restrict__ xnorm,
                                                  const float* __restrict__ rowm,
                                                  const float* __restrict__ tgt, FmParams p, i64 B, i64 C,
                                                  float* __restrict__ logits, float* __restrict__ tval,
                                                  float* __restrict__ dt) {
    i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= B * C) return;
    i64 i = e / C, j = e % C;
    float c = cos[e];
    float t = c, d = 1.0f;
    const FmMargin m = fm_row_margin_given(p, i, xnorm[i], rowm);
    if (labels[i] == j) {
        FmTarget tg = fm_target(p, m, (double)c);
        t = (float)tg.value;
        d = (float)tg.deriv;
    } else if (tgt != nullptr && p.variant == FM_VAR_CURRICULAR) {
        fm_curricular_negative(c, tgt[fm_tgt_at(FM_TGT_TAU, B, i)], tgt[fm_tgt_t(B)], t, d);
    }
    tval[e] = t;
    dt[e] = d;
    logits[e] = fm_row_scale(p, m, xnorm[i]) * t;
}

// One block per row: max, sum of exp, softmax written out, lse_i and l_i = lse_i - z_iy, plus
// the target record's REG term (MagFace's regularizer) when tgt is not null.
extern "C" __global__ void FM_ENTRY(naive_softmax)(const float* __restrict__ logits, const int* __restrict__ labels,
                                                   const float* __restrict__ tgt, i64 B, i64 C,
                                                   float* __restrict__ prob, float* __restrict__ lse,
                                                   float* __restrict__ row_loss) {
    __shared__ float red[32];
    i64 i = blockIdx.x;
    const float* z = logits + i * C;
    float m = FM_NEG_INF;
    for (i64 j = threadIdx.x; j < C; j += blockDim.x) m = fmaxf(m, z[j]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
    __syncthreads();
    m = FM_NEG_INF;
    for (int k = 0; k < (int)(blockDim.x >> 5); ++k) m = fmaxf(m, red[k]);
    __syncthreads();
    float s = 0.0f;
    for (i64 j = threadIdx.x; j < C; j += blockDim.x) s += expf(z[j] - m);
    s = fm_warp_sum(s);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
    __syncthreads();
    s = 0.0f;
    for (int k = 0; k < (int)(blockDim.x >> 5); ++k) s += red[k];
    float l = m + logf(s);
    for (i64 j = threadIdx.x; j < C; j += blockDim.x) prob[i * C + j] = expf(z[j] - l);
    if (threadIdx.x == 0) {
        lse[i] = l;
        int y = labels[i];
        // y >= C only under LabelCheck::Device (checked on the device, not before the launch).
        const float reg = tgt != nullptr ? tgt[fm_tgt_at(FM_TGT_REG, B, i)] : 0.0f;
        row_loss[i] = y < 0 ? 0.0f : ((i64)y < C ? (l - z[y]) + reg : FM_NAN);
    }
}

// One block per row: dz = g_i (p - onehot); dc = r_i dz dt (in place of prob); dn_i, the
// gradient on |x_i|: s sum_j dz t without feature normalization, plus, with the target record
// (tgt not null: MagFace), dz_iy kc_i + g_i kg_i (its margin's and regularizer's terms).
extern "C" __global__ void FM_ENTRY(naive_dlogits)(float* __restrict__ prob_dc, const float* __restrict__ tval,
                                                   const float* __restrict__ dt, const int* __restrict__ labels,
                                                   const float* __restrict__ xnorm, const float* __restrict__ g_rows,
                                                   const float* __restrict__ tgt, float g_scalar, FmParams p,
                                                   i64 B, i64 C, float* __restrict__ dn) {
    __shared__ float red[32];
    i64 i = blockIdx.x;
    int y = labels[i];
    float g = fm_upstream(g_rows, g_scalar, i, y);
    const FmMargin m = fm_row_margin(p, i, xnorm[i]);
    float r = fm_row_scale(p, m, xnorm[i]);
    const float kc = tgt != nullptr ? tgt[fm_tgt_at(FM_TGT_KC, B, i)] : 0.0f;
    float acc = 0.0f;
    for (i64 j = threadIdx.x; j < C; j += blockDim.x) {
        i64 e = i * C + j;
        if (g == 0.0f) {   // ignored row: exact zeros, whatever its (possibly non-finite) logits
            prob_dc[e] = 0.0f;
            continue;
        }
        float dz = g * (prob_dc[e] - (j == y ? 1.0f : 0.0f));
        if (!p.normalize_features) acc = fmaf(m.s * dz, tval[e], acc);
        if (j == y) acc = fmaf(dz, kc, acc);
        prob_dc[e] = r * dz * dt[e];
    }
    acc = fm_warp_sum(acc);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int k = 0; k < (int)(blockDim.x >> 5); ++k) s += red[k];
        if (tgt != nullptr && g != 0.0f) s = fmaf(g, tgt[fm_tgt_at(FM_TGT_KG, B, i)], s);
        dn[i] = s;
    }
}

// out[r, d] = sum_k a[k, r] * b[k, d] when trans_a, else sum_k a[r, k] * b[k, d]:
// dxh = dc . wh (a = dc, B x C) and dwh = dc^T . xh (a = dc, trans). One thread per output.
extern "C" __global__ void FM_ENTRY(naive_matmul)(const float* __restrict__ a, const float* __restrict__ b,
                                                  i64 rows, i64 inner, int D, int trans_a,
                                                  float* __restrict__ out) {
    i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= rows * D) return;
    i64 r = e / D;
    int d = (int)(e % D);
    float acc = 0.0f;
    for (i64 k = 0; k < inner; ++k) {
        float av = trans_a ? a[k * rows + r] : a[r * inner + k];
        acc = fmaf(av, b[k * D + d], acc);
    }
    out[e] = acc;
}

// One block per row: dv = (dvh - vh (vh . dvh)) / max(|v|, eps) [+ dn vh] when `normalize`, else dvh;
// no projection term below eps (fm_norm_proj).
template <typename OUT>
__device__ __forceinline__ void naive_norm_backward(const float* __restrict__ dvh, const float* __restrict__ vh,
                                                    const float* __restrict__ norms, const float* __restrict__ dn,
                                                    int D, int normalize, OUT* __restrict__ dv) {
    __shared__ float red[32];
    i64 r = blockIdx.x;
    const float* g = dvh + r * D;
    const float* u = vh + r * D;
    float proj = 0.0f;
    for (int k = threadIdx.x; k < D; k += blockDim.x) proj = fmaf(u[k], g[k], proj);
    proj = fm_warp_sum(proj);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = proj;
    __syncthreads();
    proj = 0.0f;
    for (int k = 0; k < (int)(blockDim.x >> 5); ++k) proj += red[k];
    const float n = norms[r];
    proj = fm_norm_proj(n, proj);
    float inv = fm_inv_norm(n);
    float extra = dn ? dn[r] : 0.0f;
    // A row whose norm is not finite (NaN/Inf in v) gets NaN, as xh . dvh does in PyTorch; the
    // masked vh of an ignored row (naive_mask_rows) would otherwise give 0 here.
    const bool bad = !fm_finite(n);
    for (int k = threadIdx.x; k < D; k += blockDim.x) {
        float v = normalize ? (g[k] - u[k] * proj) * inv + extra * u[k] : g[k];
        if (normalize && bad) v = FM_NAN;
        dv[r * D + k] = fm_from_f32<OUT>(v);
    }
}

extern "C" __global__ void FM_ENTRY(naive_norm_backward)(const float* dvh, const float* vh, const float* norms,
                                                         const float* dn, int D, int normalize, T_IN* dv) {
    naive_norm_backward<T_IN>(dvh, vh, norms, dn, D, normalize, dv);
}
extern "C" __global__ void FM_ENTRY_F32OUT(naive_norm_backward)(const float* dvh, const float* vh,
                                                                const float* norms, const float* dn, int D,
                                                                int normalize, float* dv) {
    naive_norm_backward<float>(dvh, vh, norms, dn, D, normalize, dv);
}
