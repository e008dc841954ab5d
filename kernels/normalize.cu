// fused-margin: row norms and the backward through the L2 normalization (docs/MATH.md steps 1, 3 and
// "Backward": dv = (dvh - vh (vh . dvh)) / |v| where |v| >= eps, dvh / eps below it (the
// derivative of the forward: fm_norm_proj), plus dn * vh without feature norm).
#include "common.cuh"

// an_out[r] = |a_r| for the na rows of a, then bn_out[r] = |b_r| for the nb rows of b (raw, before
// the eps floor): x's and w's norms in one launch. One warp per row, f32 accumulation in a fixed
// order (lane k sums columns k, k + 32, ..., then the warp's butterfly). bidx (nullable):
// Partial FC's index, b's row r is then row bidx[r / K] K + r % K (K rows per class).
extern "C" __global__ void FM_ENTRY(fm_row_norms)(const T_IN* __restrict__ a, i64 na, float* __restrict__ an_out,
                                                  const T_IN* __restrict__ b, i64 nb, float* __restrict__ bn_out,
                                                  int D, const int* __restrict__ bidx, int K) {
    i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= na + nb) return;
    const bool in_a = row < na;
    const i64 br = row - na;
    const T_IN* r = in_a ? a + row * D : b + (bidx != nullptr ? fm_wrow(bidx, br / K) * K + br % K : br) * D;
    float acc = 0.0f;
    for (int k = lane; k < D; k += 32) {
        float e = fm_to_f32(r[k]);
        acc = fmaf(e, e, acc);
    }
    acc = fm_warp_sum(acc);
    if (lane == 0) (in_a ? an_out[row] : bn_out[row - na]) = sqrtf(acc);
}

// The margin at the target, once per row, before any tile (docs/MATH.md step 4): with
// c_iy = x_i . w_y / (max(|x_i|,eps) max(|w_y|,eps)) (the weight factor only with weight
// normalization), tgt[2 row] = target(c_iy) and tgt[2 row + 1] = dtarget/dc, and the row's
// sections of the target record (common.cuh FM_TGT_*): CurricularFace's threshold, the target
// cosine, MagFace's regularizer and norm-gradient coefficients. The tile kernels of the forward
// and the backward read the record through their row context (FmRow) and evaluate no margin
// maths per element: inlined at each of the 32 to 128 elements a thread holds, fm_target's
// double acos/sin/cos made most of a tensor-core module's code and of its compile time. One warp
// per row, f32 dot; rows past B are not written; rows whose label is not in 0..C get (0, 1) and
// neutral sections, never read as a target. Forward and backward run this same pass, so both
// see the same target. rowm: the per-row margins (fm_row_margin_given), or null. widx: Partial
// FC's index (args.cuh), or null.
extern "C" __global__ void FM_ENTRY(fm_target_rows)(const T_IN* __restrict__ x, const T_IN* __restrict__ w,
                                                    const int* __restrict__ labels,
                                                    const float* __restrict__ xnorm,
                                                    const float* __restrict__ wnorm,
                                                    const float* __restrict__ rowm, FmParams p, i64 B,
                                                    i64 C, int D, const int* __restrict__ widx,
                                                    float* __restrict__ tgt) {
    i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= B) return;
    // CurricularFace's t: 0 until kernels/state.cu writes the state out over it.
    if (row == 0 && lane == 0) tgt[fm_tgt_t(B)] = 0.0f;
    const int y = labels[row];
    if (y < 0 || (i64)y >= C) {
        if (lane == 0) {
            tgt[2 * row] = 0.0f;
            tgt[2 * row + 1] = 1.0f;
            tgt[fm_tgt_at(FM_TGT_TAU, B, row)] = FM_POS_INF;
            tgt[fm_tgt_at(FM_TGT_COSY, B, row)] = 0.0f;
            tgt[fm_tgt_at(FM_TGT_REG, B, row)] = 0.0f;
            tgt[fm_tgt_at(FM_TGT_KC, B, row)] = 0.0f;
            tgt[fm_tgt_at(FM_TGT_KG, B, row)] = 0.0f;
        }
        return;
    }
    const T_IN* xr = x + row * D;
    const float n = xnorm[row];
    // With sub-centers (K = p.centers > 1) the class cosine is the largest of rows yK + k of w
    // (fm_subcenter_max, as in the tiles).
    const int K = p.centers;
    float c = 0.0f;
    int win = 0;
    for (int sc = 0; sc < K; ++sc) {
        const i64 wrow = (i64)y * K + sc;   // the column's row of wnorm; of w through widx
        const T_IN* wr = w + (fm_wrow(widx, y) * K + sc) * D;
        float acc = 0.0f;
        for (int k = lane; k < D; k += 32) acc = fmaf(fm_to_f32(xr[k]), fm_to_f32(wr[k]), acc);
        acc = fm_warp_sum(acc);
        const float cs = acc * fm_inv_norm(n) * (p.normalize_weights ? fm_inv_norm(wnorm[wrow]) : 1.0f);
        fm_subcenter_max(c, win, cs, sc);
    }
    if (lane == 0) {
        const FmMargin m = fm_row_margin_given(p, row, n, rowm);
        const FmTarget t = fm_target(p, m, (double)c);
        tgt[2 * row] = (float)t.value;
        tgt[2 * row + 1] = (float)t.deriv;
        const float tau = p.variant == FM_VAR_CURRICULAR ? fm_curricular_tau(p, c) : FM_POS_INF;
        // MagFace (math::magface_row, magface_reg): row loss + lambda_g g(a), g(a) = a / u_a^2
        // + 1 / a; inside the clamp the norm gradient g_i (r_i q dtarget/dm2 (p_iy - 1) +
        // lambda_g g'(a)), g'(a) = 1 / u_a^2 - 1 / a^2 (fm_norm_coef, naive_dlogits).
        float reg = 0.0f, kc = 0.0f, kg = 0.0f;
        if (p.variant == FM_VAR_MAGFACE) {
            const FmMag g = fm_magface_row(p, n);
            double r, sl;
            fm_magface_reg(p, g.a, r, sl);
            reg = (float)r;
            if (g.live) {
                kc = (float)((double)fm_row_scale(p, m, n) * g.q * t.dm2);
                kg = (float)sl;
            }
        }
        tgt[fm_tgt_at(FM_TGT_TAU, B, row)] = tau;
        tgt[fm_tgt_at(FM_TGT_COSY, B, row)] = c;
        tgt[fm_tgt_at(FM_TGT_REG, B, row)] = reg;
        tgt[fm_tgt_at(FM_TGT_KC, B, row)] = kc;
        tgt[fm_tgt_at(FM_TGT_KG, B, row)] = kg;
    }
}

// MagFace's norm gradient per row (the target record's KC and KG sections): coef_i =
// g_i (kc_i (p_iy - 1) + kg_i), p_iy - 1 = expm1(-l_i) from the forward's l_i; fm_x_finish adds
// coef_i xh_i to dx_i. Rows with g = 0 (ignored) get exact zeros. One thread per row.
extern "C" __global__ void FM_ENTRY(fm_norm_coef)(const int* __restrict__ labels,
                                                  const float* __restrict__ tgt,
                                                  const float* __restrict__ g_rows, float g_scalar,
                                                  i64 B, float* __restrict__ coef) {
    i64 row = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= B) return;
    const float g = fm_upstream(g_rows, g_scalar, row, labels[row]);
    const float ce = tgt[fm_tgt_at(FM_TGT_CE, B, row)];
    const float kc = tgt[fm_tgt_at(FM_TGT_KC, B, row)], kg = tgt[fm_tgt_at(FM_TGT_KG, B, row)];
    coef[row] = g == 0.0f ? 0.0f : g * fmaf(kc, expm1f(-ce), kg);
}

// Fused plan, last step for x: dxh_i = sum over class splits (fixed order: deterministic) of the
// partial products, then dx_i = (dxh_i - xh_i * proj_i) / max(|x_i|, eps) + dn_i * xh_i, where
// proj_i = xh_i . dxh_i = sum_j dc_ij c_ij and dn_i (only without feature normalization) were
// reduced the same way. One thread per element; rows of ignored labels get exact zeros.
template <typename OUT>
__device__ __forceinline__ void fm_x_finish(const T_IN* __restrict__ x, const float* __restrict__ xnorm,
                                            const float* __restrict__ dxh_part,
                                            const float* __restrict__ proj_part,
                                            const float* __restrict__ dn_part,
                                            const float* __restrict__ coef, int nsplit, i64 B, int D,
                                            FmParams p, OUT* __restrict__ dx) {
    i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= B * D) return;
    i64 row = e / D;
    float dxh = 0.0f, proj = 0.0f, dn = 0.0f;
    for (int s = 0; s < nsplit; ++s) {
        dxh += dxh_part[(i64)s * B * D + e];
        proj += proj_part[(i64)s * B + row];
        dn += dn_part[(i64)s * B + row];
    }
    const float n = xnorm[row];
    float inv = fm_inv_norm(n);
    float xh = fm_to_f32(x[e]) * inv;
    float g = (dxh - xh * fm_norm_proj(n, proj)) * inv;
    if (!p.normalize_features) g += dn * xh;
    if (coef != nullptr) g += coef[row] * xh;   // MagFace: through m2_i and g(a_i) (fm_norm_coef)
    // A row whose norm is not finite (NaN or Inf in it) has xh . dxh = NaN in the normalization
    // backward, so its whole dx row is NaN, as in PyTorch and the CPU reference; proj computed as
    // sum dc c is 0 for an ignored row and would hide that.
    if (!fm_finite(n)) g = FM_NAN;
    dx[e] = fm_from_f32<OUT>(g);
}

extern "C" __global__ void FM_ENTRY(fm_x_finish)(const T_IN* x, const float* xnorm, const float* dxh_part,
                                                 const float* proj_part, const float* dn_part,
                                                 const float* coef, int nsplit, i64 B, int D, FmParams p,
                                                 T_IN* dx) {
    fm_x_finish<T_IN>(x, xnorm, dxh_part, proj_part, dn_part, coef, nsplit, B, D, p, dx);
}
extern "C" __global__ void FM_ENTRY_F32OUT(fm_x_finish)(const T_IN* x, const float* xnorm,
                                                        const float* dxh_part, const float* proj_part,
                                                        const float* dn_part, const float* coef,
                                                        int nsplit, i64 B, int D, FmParams p, float* dx) {
    fm_x_finish<float>(x, xnorm, dxh_part, proj_part, dn_part, coef, nsplit, B, D, p, dx);
}

#if FM_DTYPE != FM_F32
// The tensor-core backward's (grad_tc.cu) scale, here in the core unit so that either of its
// tile shapes' units can use it.
// K = the smallest power of two >= max_i |r_i g_i| over counted rows (1 when none is nonzero);
// written to scale[0]. One block; fixed order (max is order-free anyway).
extern "C" __global__ void FM_ENTRY(fm_grad_scale)(const int* __restrict__ labels,
                                                   const float* __restrict__ xnorm,
                                                   const float* __restrict__ g_rows, float g_scalar,
                                                   FmParams p, i64 B, float* __restrict__ scale) {
    __shared__ float sm[1024];
    float m = 0.0f;
    for (i64 i = threadIdx.x; i < B; i += blockDim.x) {
        float g = fm_upstream(g_rows, g_scalar, i, labels[i]);
        float v = g == 0.0f ? 0.0f : fabsf(fm_row_scale(p, fm_row_margin(p, i, xnorm[i]), xnorm[i]) * g);
        if (fm_finite(v)) m = fmaxf(m, v);   // finite only: non-finite rows propagate by themselves
    }
    sm[threadIdx.x] = m;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) sm[threadIdx.x] = fmaxf(sm[threadIdx.x], sm[threadIdx.x + o]);
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        int e = 0;
        float mx = sm[0];
        if (mx > 0.0f) frexpf(mx, &e);   // mx = f 2^e, f in [0.5, 1): 2^e > mx
        // 2^128 is not a float: K = 2^127 then, and |r g| / K <= 2 still fits f16 and bf16.
        scale[0] = mx > 0.0f ? ldexpf(1.0f, e < 127 ? e : 127) : 1.0f;
    }
}
#endif
