// fused-margin: the fused backward (docs/MATH.md "Backward"; docs/ARCHITECTURE.md "Fused data flow"). Each
// kernel recomputes its logits tiles from x, w and the saved lse (no B x C buffer), forms
// dc = r g (softmax - onehot) dtarget/dc in registers, and multiplies it into the gradients:
//   dxh_i = sum_j dc_ij wh_j   (fm_grad_x_partial, then fm_x_finish in normalize.cu)
//   dwh_j = sum_i dc_ij xh_i   (fm_grad_w, which also applies the normalization backward)
// No atomics anywhere: every output element has one owner and a fixed summation order.
#include "tile.cuh"

// Grid (ceil(B / FM_BM), nsplit, ceil(D / FM_DC)). Block (rt, split, dc) owns rows
// [rt*BM, rt*BM + BM) x dims [dc*DC, dc*DC + DC) of the partial dxh of its class split, and
// (for dc == 0) the split's partial proj_i and dn_i. Partials are summed in fm_x_finish.
// SC: sub-centers (p.centers = K rows of w per class; the *_sc entries): each class tile is K
// dot tiles with the winners kept, and K products, each with dc kept where its sub-center won.
// Without SC, K is the constant 1 and the loops fold to the plain kernel.
template <bool SC>
__device__ __forceinline__ void fm_grad_x_partial_body(const FmGradArgs<float>& args) {
    FM_GRAD_UNPACK
    __shared__ FmTileSmem sm;
    __shared__ float dcs[FM_BM][FM_BN + 1];
    __shared__ float wsd[FM_BN][FM_DC];
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int split = blockIdx.y;
    const i64 row0 = (i64)blockIdx.x * FM_BM;
    const int d0 = blockIdx.z * FM_DC;
    i64 ntiles = (C + FM_BN - 1) / FM_BN, t_begin, t_end;
    fm_split_range(ntiles, split, tiles_per_split, t_begin, t_end);

    FmRow R[2];
    for (int a = 0; a < 2; ++a)
        R[a] = fm_load_row(p, row0 + ty + 16 * a, B, labels, xnorm, tgt, lse, g_rows, g_scalar);
    float acc2[2][FM_DC / 16];
    for (int a = 0; a < 2; ++a)
        for (int q = 0; q < FM_DC / 16; ++q) acc2[a][q] = 0.0f;
    float proj[2] = {0.0f, 0.0f}, dn[2] = {0.0f, 0.0f};

    const int K = SC ? p.centers : 1;
    for (i64 t = t_begin; t < t_end; ++t) {
        const i64 col0 = t * FM_BN;
        // The class cosines and their winning sub-centers (the forward's arithmetic).
        float cs[2][2];
        int win[2][2];
        for (int k = 0; k < K; ++k) {
            float acc[2][2];
            fm_dot_tile(x, w + (i64)k * D, row0, col0, B, C, D, (i64)K * D, sm, acc, p.tf32_dots != 0, widx);
            for (int a = 0; a < 2; ++a)
                for (int b = 0; b < 2; ++b) {
                    const i64 col = col0 + tx + 16 * b;
                    const float inv_w = col < C ? fm_inv_norm(wnorm[col * K + k]) : 0.0f;
                    fm_subcenter_max(cs[a][b], win[a][b], fm_cos(p, R[a], acc[a][b], inv_w), k);
                }
        }
        float dcv[2][2];
        for (int a = 0; a < 2; ++a) {
            for (int b = 0; b < 2; ++b) {
                i64 col = col0 + tx + 16 * b;
                float dc = 0.0f;
                if (col < C) {
                    float c, dzt;
                    dc = fm_dc(p, R[a], col, cs[a][b], c, dzt);
                    proj[a] = fmaf(dc, c, proj[a]);
                    dn[a] = fmaf(R[a].m.s, dzt, dn[a]);
                }
                dcv[a][b] = dc;
            }
        }
        // dxh_i += sum_j dc_ij wh_{jK+k*}: one product per sub-center k, dc kept where k won.
        for (int k = 0; k < K; ++k) {
            for (int a = 0; a < 2; ++a)
                for (int b = 0; b < 2; ++b) dcs[ty + 16 * a][tx + 16 * b] = win[a][b] == k ? dcv[a][b] : 0.0f;
            // wh tile: FM_BN classes x FM_DC dims (rows jK + k of w), coalesced along D.
            for (int e = tid; e < FM_BN * FM_DC; e += FM_THREADS) {
                int kc = e / FM_DC, dd = e % FM_DC;
                i64 col = col0 + kc;
                int d = d0 + dd;
                float v = 0.0f;
                if (col < C && d < D) {
                    const i64 wr = col * K + k;   // the column's row of wnorm; of w through widx
                    v = fm_to_f32(w[(fm_wrow(widx, col) * K + k) * D + d]);
                    if (p.normalize_weights) v *= fm_inv_norm(wnorm[wr]);
                }
                wsd[kc][dd] = v;
            }
            __syncthreads();
#pragma unroll 4
            for (int kc = 0; kc < FM_BN; ++kc) {
                float a0 = dcs[ty][kc], a1 = dcs[ty + 16][kc];
#pragma unroll
                for (int q = 0; q < FM_DC / 16; ++q) {
                    float bv = wsd[kc][tx + 16 * q];
                    acc2[0][q] = fmaf(a0, bv, acc2[0][q]);
                    acc2[1][q] = fmaf(a1, bv, acc2[1][q]);
                }
            }
            __syncthreads();
        }
    }
    for (int a = 0; a < 2; ++a) {
        i64 row = row0 + ty + 16 * a;
        if (row >= B) continue;
        float* out = dxh_part + ((i64)split * B + row) * D;
        for (int q = 0; q < FM_DC / 16; ++q) {
            int d = d0 + tx + 16 * q;
            if (d < D) out[d] = acc2[a][q];
        }
    }
    if (blockIdx.z == 0) {
        for (int a = 0; a < 2; ++a) {
            float pr = fm_half_sum(proj[a]), dnv = fm_half_sum(dn[a]);
            i64 row = row0 + ty + 16 * a;
            if (tx == 0 && row < B) {
                proj_part[(i64)split * B + row] = pr;
                dn_part[(i64)split * B + row] = dnv;
            }
        }
    }
}

// Grid (ceil(C / FM_BN) K, ceil(D / FM_DC)). Block (ct K + ks, dc) owns classes [ct*BN, ct*BN + BN)
// (their rows jK + ks of dw; K = 1 but for sub-centers) x dims [dc*DC, dc*DC + DC) of dw: it loops over every row tile of the batch, so no other block touches
// its outputs. At the end it applies the normalization backward with
// proj_j = wh_j . dwh_j = sum_i dc_ij c_ij, reduced in a fixed order.
template <typename OUT, bool SC>
__device__ __forceinline__ void fm_grad_w(const FmGradArgs<OUT>& args) {
    FM_GRAD_UNPACK
    __shared__ FmTileSmem sm;
    __shared__ float dcs[FM_BM][FM_BN + 1];
    __shared__ float xsd[FM_BM][FM_DC];
    __shared__ float projs[16][FM_BN];
    __shared__ float xscale[FM_BM];
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    // Sub-centers: block x = class tile * K + ks owns rows jK + ks of dw for the tile's classes j;
    // it forms all K cosines of each (row, class) to find the winner, and keeps dc where ks won.
    const int K = SC ? p.centers : 1, ks = SC ? (int)(blockIdx.x % (unsigned)K) : 0;
    const i64 col0 = (i64)(blockIdx.x / (unsigned)K) * FM_BN;
    const int d0 = blockIdx.y * FM_DC;
    float acc2[2][FM_DC / 16];
    for (int a = 0; a < 2; ++a)
        for (int q = 0; q < FM_DC / 16; ++q) acc2[a][q] = 0.0f;
    float projw[2] = {0.0f, 0.0f};

    for (i64 row0 = 0; row0 < B; row0 += FM_BM) {
        // xh's row factor: 1/max(|x_i|,eps), or 0 for rows past B and rows with g = 0 (ignored),
        // which then contribute exact zeros even when their x is not finite. Visible to all after
        // fm_dot_tile's first barrier; last read before the previous iteration's barriers.
        if (tid < FM_BM) {
            i64 row = row0 + tid;
            bool on = row < B && fm_upstream(g_rows, g_scalar, row, labels[row]) != 0.0f;
            xscale[tid] = on ? fm_inv_norm(xnorm[row]) : 0.0f;
        }
        // The rows' 1/|x_i| only (fm_row_ctx's): the whole row context is loaded after the dots,
        // one row at a time, which keeps it out of the registers live across them.
        float inv_x[2];
        for (int a = 0; a < 2; ++a) {
            const i64 row = row0 + ty + 16 * a;
            inv_x[a] = row < B ? fm_inv_norm(xnorm[row]) : 0.0f;
        }
        float cs[2][2];
        int win[2][2];
        for (int k = 0; k < K; ++k) {
            float acc[2][2];
            fm_dot_tile(x, w + (i64)k * D, row0, col0, B, C, D, (i64)K * D, sm, acc, p.tf32_dots != 0, widx);
            for (int a = 0; a < 2; ++a)
                for (int b = 0; b < 2; ++b) {
                    const i64 col = col0 + tx + 16 * b;
                    const float inv_w = col < C ? fm_inv_norm(wnorm[col * K + k]) : 0.0f;
                    fm_subcenter_max(cs[a][b], win[a][b], fm_cos_x(p, inv_x[a], acc[a][b], inv_w), k);
                }
        }
        for (int a = 0; a < 2; ++a) {
            FmRow R = fm_load_row(p, row0 + ty + 16 * a, B, labels, xnorm, tgt, lse, g_rows, g_scalar);
            for (int b = 0; b < 2; ++b) {
                i64 col = col0 + tx + 16 * b;
                float dc = 0.0f;
                if (col < C && win[a][b] == ks) {
                    float c, dzt;
                    dc = fm_dc(p, R, col, cs[a][b], c, dzt);
                    projw[b] = fmaf(dc, c, projw[b]);
                }
                dcs[ty + 16 * a][tx + 16 * b] = dc;
            }
        }
        // xh tile: FM_BM rows x FM_DC dims, coalesced along D.
        for (int e = tid; e < FM_BM * FM_DC; e += FM_THREADS) {
            int k = e / FM_DC, dd = e % FM_DC;
            i64 row = row0 + k;
            int d = d0 + dd;
            const float f = xscale[k];
            float v = 0.0f;
            if (f != 0.0f && d < D) v = fm_to_f32(x[row * D + d]) * f;
            xsd[k][dd] = v;
        }
        __syncthreads();
#pragma unroll 4
        for (int k = 0; k < FM_BM; ++k) {
            float c0 = dcs[k][ty], c1 = dcs[k][ty + 16];
#pragma unroll
            for (int q = 0; q < FM_DC / 16; ++q) {
                float xv = xsd[k][tx + 16 * q];
                acc2[0][q] = fmaf(c0, xv, acc2[0][q]);
                acc2[1][q] = fmaf(c1, xv, acc2[1][q]);
            }
        }
        __syncthreads();
    }
    projs[ty][tx] = projw[0];
    projs[ty][tx + 16] = projw[1];
    __syncthreads();
    for (int a = 0; a < 2; ++a) {
        int cl = ty + 16 * a;
        i64 col = col0 + cl;
        if (col >= C) continue;
        const i64 wr = col * K + ks;   // the column's row of dw and wnorm
        const i64 wsrc = fm_wrow(widx, col) * K + ks;   // its row of w
        float proj = 0.0f;
        for (int u = 0; u < 16; ++u) proj += projs[u][cl];
        proj = fm_norm_proj(wnorm[wr], proj);
        float inv = fm_inv_norm(wnorm[wr]);
        for (int q = 0; q < FM_DC / 16; ++q) {
            int d = d0 + tx + 16 * q;
            if (d >= D) continue;
            float g = acc2[a][q];
            if (p.normalize_weights) {
                float wh = fm_to_f32(w[wsrc * D + d]) * inv;
                g = (g - wh * proj) * inv;
            }
            dw[wr * D + d] = fm_from_f32<OUT>(g);
        }
    }
}

// Three blocks per SM (80 registers, 48 bytes of spills) as before the margin maths left the tile
// loop; without the minimum ptxas takes 113 registers and two blocks. For the GPU benchmarks.
extern "C" __global__ void __launch_bounds__(FM_THREADS, 3)
FM_ENTRY(fm_grad_x_partial)(const FmGradArgs<float> args) {
    fm_grad_x_partial_body<false>(args);
}
// Sub-center ArcFace.
extern "C" __global__ void __launch_bounds__(FM_THREADS, 3)
FM_ENTRY(fm_grad_x_partial_sc)(const FmGradArgs<float> args) {
    fm_grad_x_partial_body<true>(args);
}
extern "C" __global__ void __launch_bounds__(FM_THREADS)
FM_ENTRY(fm_grad_w)(const FmGradArgs<T_IN> args) {
    fm_grad_w<T_IN, false>(args);
}
extern "C" __global__ void __launch_bounds__(FM_THREADS)
FM_ENTRY_F32OUT(fm_grad_w)(const FmGradArgs<float> args) {
    fm_grad_w<float, false>(args);
}
extern "C" __global__ void __launch_bounds__(FM_THREADS)
FM_ENTRY(fm_grad_w_sc)(const FmGradArgs<T_IN> args) {
    fm_grad_w<T_IN, true>(args);
}
extern "C" __global__ void __launch_bounds__(FM_THREADS)
FM_ENTRY_F32OUT(fm_grad_w_sc)(const FmGradArgs<float> args) {
    fm_grad_w<float, true>(args);
}
