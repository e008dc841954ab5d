// fused-margin: the fused backward on tensor cores (f16 / bf16 inputs), the same contract as
// grad.cu (MATH.md "Backward"; no B x C buffer, no atomics, fixed summation orders).
//
// Both kernels share one main loop. A block owns OWN "own" rows and DCH columns of D of the
// output; it walks "partner" tiles of GT_PN rows. For dx the own rows are x's rows and the
// partners are classes (a class split of them); for dw the own rows are classes and the partners
// are all of x's rows. Per partner tile:
//   1. S = own . partner^T, the raw dot products (m16n8k16 mma.sync, ldmatrix fragments, a
//      3-stage cp.async pipeline over 32-wide steps of D), as in logits_tc.cu;
//   2. the epilogue recomputes the logit and softmax from the saved lse and forms the unit
//      gradient e_ij = (softmax - onehot) dtarget/dc (|softmax - onehot| <= 1, so e fits f16),
//      accumulating proj = sum dc c (and dn for x) in f32; e goes to shared memory in T_IN;
//   3. the partners' D chunk is scaled into shared memory (wh_j for dx; xh_i r_i g_i / K for dw,
//      K a power of two >= max |r_i g_i| from fm_grad_scale, so the 16-bit operand stays <= 1);
//   4. out += e . chunk on tensor cores (ldmatrix.trans for the [partner][d] chunk).
// dx partials are multiplied by r_i g_i and reduced over splits by fm_x_finish (normalize.cu);
// dw is multiplied by K and finished here with the normalization backward.
//
// Two tile shapes, FmGt<OWN> (the host picks by D, src/cuda/fused.rs):
//   FmGt<64>: 64 own rows x 256 columns (the fm_grad_*_tc entries);
//   FmGt<32>: 32 own rows x 512 columns (the *_tc_d512 entries).
// Blocks of one own tile and different D chunks each recompute S, so S costs ceil(D / DCH) times
// its single-pass FLOPs: FmGt<32> recomputes once up to D = 512 (the common embedding width),
// where FmGt<64> recomputes twice; FmGt<64> has the better S tiles when one chunk covers D.
//
// Block: 256 threads = 8 warps. S: warps 2 (own) x 4 (partner), OWN/2 x 16 each. Product: warps
// OWN/32 (own) x 256/OWN (d), 32 x 64 each: 64 f32 accumulators per thread in both shapes.
// Shared memory, dynamic: the S pipeline and the chunk share one union (the pipeline is drained
// before the chunk is written).
// Requires D % 8 == 0 and 16-byte aligned x and w, like the tensor-core forward.
#include "tile.cuh"

#if FM_DTYPE != FM_F32

#define GT_PN 64
#define GT_BK 32
#define GT_STAGES 3
#define GT_LD (GT_BK + 8)     // 80-byte rows: ldmatrix's 8 rows hit 8 distinct 16-byte bank groups
#define GT_ELD (GT_PN + 8)    // 144-byte rows

struct __align__(16) FmU4 { unsigned v[4]; };

template <int OWN>
struct FmGt {
    static_assert(OWN == 32 || OWN == 64, "own tile of 32 or 64 rows");
    static constexpr int MI = OWN / 32;          // S: m16 tiles per warp along own
    static constexpr int PW_D = 256 / OWN;       // product warps along d (OWN / 32 along own)
    static constexpr int DCH = 64 * PW_D;        // columns of D per block
    static constexpr int CLD = DCH + 8;          // chunk rows of 528 / 1040 bytes (16 mod 128)
    struct Pipe {
        unsigned short own[GT_STAGES][OWN][GT_LD];
        unsigned short par[GT_STAGES][GT_PN][GT_LD];
    };
    union Buf {
        Pipe pipe;
        unsigned short chunk[GT_PN][CLD];
    };
    struct Smem {
        Buf u;
        unsigned short es[OWN][GT_ELD];   // e tile, [own][partner]
        float pscale[GT_PN];              // per-partner factor of the chunk
        float red[2][4][OWN];             // cross-warp reductions (proj, dn)
    };
};
// Dynamic shared memory of the kernels; the host passes the same numbers (src/cuda/fused.rs:
// TC_BACKWARD and TC_BACKWARD_D512).
static_assert(sizeof(FmGt<64>::Smem) == 45312, "TC_BACKWARD.smem in src/cuda/fused.rs");
static_assert(sizeof(FmGt<32>::Smem) == 72448, "TC_BACKWARD_D512.smem in src/cuda/fused.rs");
static_assert(FmGt<64>::DCH == 256 && FmGt<32>::DCH == 512, "dchunk in src/cuda/fused.rs");

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
        float v = g == 0.0f ? 0.0f : fabsf(fm_row_scale(p, xnorm[i]) * g);
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

// One pipeline step: own rows own0.. and partner rows par0.. of columns k0..k0+32 into `stage`
// (OWN * 4 + 256 16-byte chunks: one partner chunk per thread, one own chunk per thread < OWN * 4;
// zero-filled outside the matrices).
template <int OWN>
__device__ __forceinline__ void fm_gt_load(typename FmGt<OWN>::Pipe& sm, int stage, const T_IN* own_m, i64 own0,
                                           i64 n_own, const T_IN* par_m, i64 par0, i64 n_par, int k0, int D) {
    const int tid = threadIdx.x, r = tid >> 2, ch = tid & 3, kc = k0 + ch * 8;
    bool ok;
    if (r < OWN) {
        ok = own0 + r < n_own && kc < D;   // D % 8 == 0: a chunk is wholly inside or outside
        fm_cp_async16(&sm.own[stage][r][ch * 8], ok ? (const void*)(own_m + (own0 + r) * D + kc) : (const void*)own_m,
                      ok);
    }
    ok = par0 + r < n_par && kc < D;
    fm_cp_async16(&sm.par[stage][r][ch * 8], ok ? (const void*)(par_m + (par0 + r) * D + kc) : (const void*)par_m, ok);
}

// S = own . partner^T for one partner tile, into s[mi][ni][4] (warp tile OWN/2 own x 16 partner).
// Leaves the pipeline drained and the block synchronized (the union may be reused).
template <int OWN>
__device__ __forceinline__ void fm_gt_dots(typename FmGt<OWN>::Smem& sm, const T_IN* own_m, i64 own0, i64 n_own,
                                           const T_IN* par_m, i64 par0, i64 n_par, int D,
                                           float s[FmGt<OWN>::MI][2][4]) {
    constexpr int MI = FmGt<OWN>::MI;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = (warp >> 2) * (OWN / 2), wn = (warp & 3) * 16;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < 2; ++ni)
#pragma unroll
            for (int v = 0; v < 4; ++v) s[mi][ni][v] = 0.0f;
    const int ksteps = (D + GT_BK - 1) / GT_BK;
#pragma unroll
    for (int st = 0; st < GT_STAGES - 1; ++st) {
        if (st < ksteps) fm_gt_load<OWN>(sm.u.pipe, st, own_m, own0, n_own, par_m, par0, n_par, st * GT_BK, D);
        fm_cp_async_commit();   // always commit: the group count stays uniform for wait_group
    }
    for (int kt = 0; kt < ksteps; ++kt) {
        fm_cp_async_wait<GT_STAGES - 2>();
        __syncthreads();   // stage kt is visible to all; everyone is done reading stage kt-1
        int nxt = kt + GT_STAGES - 1;
        if (nxt < ksteps)
            fm_gt_load<OWN>(sm.u.pipe, nxt % GT_STAGES, own_m, own0, n_own, par_m, par0, n_par, nxt * GT_BK, D);
        fm_cp_async_commit();
        const int st = kt % GT_STAGES;
#pragma unroll
        for (int kk = 0; kk < GT_BK; kk += 16) {
            unsigned a[MI][4], b[2][2], q[4];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
                fm_ldmatrix_x4(a[mi], &sm.u.pipe.own[st][wm + mi * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
            // Partner rows are [n][k]: lanes 0-7 n 0-7 k 0-7, 8-15 n 0-7 k 8-15, 16-23 n 8-15 k 0-7, ...
            fm_ldmatrix_x4(q, &sm.u.pipe.par[st][wn + (lane & 7) + 8 * (lane >> 4)][kk + 8 * ((lane >> 3) & 1)]);
            b[0][0] = q[0]; b[0][1] = q[1]; b[1][0] = q[2]; b[1][1] = q[3];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < 2; ++ni) fm_mma16816<FM_DTYPE == FM_BF16>(s[mi][ni], a[mi], b[ni]);
        }
    }
    fm_cp_async_wait<0>();
    __syncthreads();
}

// The product warp's tile: own rows wm.. (32) and chunk columns wd.. (64).
template <int OWN>
__device__ __forceinline__ void fm_gt_product_warp(int warp, int& wm, int& wd) {
    wm = (warp / FmGt<OWN>::PW_D) * 32;
    wd = (warp % FmGt<OWN>::PW_D) * 64;
}

// out[mi][nj] += es . chunk (warp tile 32 own x 64 d), then a barrier so both buffers may be
// overwritten by the next partner tile.
template <int OWN>
__device__ __forceinline__ void fm_gt_product(typename FmGt<OWN>::Smem& sm, float out[2][8][4]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int wm, wd;
    fm_gt_product_warp<OWN>(warp, wm, wd);
#pragma unroll
    for (int kk = 0; kk < GT_PN; kk += 16) {
        unsigned a[2][4], b[8][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
            fm_ldmatrix_x4(a[mi], &sm.es[wm + mi * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
        for (int nb = 0; nb < 4; ++nb) {
            unsigned q[4];
            fm_ldmatrix_x4_trans(q, &sm.u.chunk[kk + (lane & 15)][wd + nb * 16 + (lane >> 4) * 8]);
            b[2 * nb][0] = q[0]; b[2 * nb][1] = q[1]; b[2 * nb + 1][0] = q[2]; b[2 * nb + 1][1] = q[3];
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int nj = 0; nj < 8; ++nj) fm_mma16816<FM_DTYPE == FM_BF16>(out[mi][nj], a[mi], b[nj]);
    }
    __syncthreads();
}

// Fills the chunk: partner rows par0.. (n_par of them) of `m`, columns d0..d0+DCH, each row
// multiplied by sm.pscale[row] (already written and synchronized); zeros outside and for rows
// whose factor is 0. 16-byte loads.
template <int OWN>
__device__ __forceinline__ void fm_gt_fill_chunk(typename FmGt<OWN>::Smem& sm, const T_IN* __restrict__ m, i64 par0,
                                                 i64 n_par, int d0, int D) {
    constexpr int DCH = FmGt<OWN>::DCH;
    for (int e = threadIdx.x; e < GT_PN * (DCH / 8); e += blockDim.x) {
        const int r = e / (DCH / 8), dd = (e % (DCH / 8)) * 8;
        FmU4 out;
        const i64 row = par0 + r;
        const int d = d0 + dd;
        const float f = row < n_par ? sm.pscale[r] : 0.0f;
        // f == 0 (an ignored row) writes zeros without reading: 0 * NaN would poison the product.
        if (f != 0.0f && d < D) {
            FmU4 in = *reinterpret_cast<const FmU4*>(m + row * D + d);
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                T_IN lo, hi;
                lo.bits = (unsigned short)(in.v[h] & 0xffffu);
                hi.bits = (unsigned short)(in.v[h] >> 16);
                unsigned short l2 = fm_from_f32<T_IN>(fm_to_f32(lo) * f).bits;
                unsigned short h2 = fm_from_f32<T_IN>(fm_to_f32(hi) * f).bits;
                out.v[h] = (unsigned)l2 | ((unsigned)h2 << 16);
            }
        } else {
            out.v[0] = out.v[1] = out.v[2] = out.v[3] = 0u;
        }
        *reinterpret_cast<FmU4*>(&sm.u.chunk[r][dd]) = out;
    }
}

// Sums v over the 4 lanes of a quad and the 4 partner warps of the S layout, in a fixed order;
// the result for own row `tid_row` (block-local) is returned to threads with tid_row < OWN.
// `slot` picks a red[] buffer.
template <int OWN>
__device__ __forceinline__ float fm_gt_rowsum(typename FmGt<OWN>::Smem& sm, int slot,
                                              const float v[2 * FmGt<OWN>::MI], int tid_row) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = (warp >> 2) * (OWN / 2), g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int q = 0; q < 2 * FmGt<OWN>::MI; ++q) {
        float a = v[q];
        a += __shfl_xor_sync(0xffffffffu, a, 1);
        a += __shfl_xor_sync(0xffffffffu, a, 2);
        if (t == 0) sm.red[slot][warp & 3][wm + (q >> 1) * 16 + g + 8 * (q & 1)] = a;
    }
    __syncthreads();
    float s = 0.0f;
    if (tid_row < OWN)
        for (int k = 0; k < 4; ++k) s += sm.red[slot][k][tid_row];
    return s;
}

// Grid (ceil(B / OWN), nsplit, ceil(D / DCH)). Block (rt, split, dc) writes rows rt*OWN.. x
// dims dc*DCH.. of split `split`'s partial dxh (already multiplied by r_i g_i), and for dc == 0
// the split's proj_i and dn_i.
template <int OWN>
__device__ __forceinline__ void fm_grad_x_tc(const T_IN* __restrict__ x, const T_IN* __restrict__ w,
                                             const int* __restrict__ labels, const float* __restrict__ xnorm,
                                             const float* __restrict__ wnorm, const float* __restrict__ lse,
                                             const float* __restrict__ g_rows, float g_scalar, const FmParams& p,
                                             i64 B, i64 C, int D, int tiles_per_split, int nsplit,
                                             float* __restrict__ dxh_part, float* __restrict__ proj_part,
                                             float* __restrict__ dn_part) {
    typedef FmGt<OWN> G;
    constexpr int MI = G::MI;
    FM_DYNAMIC_SMEM(smem_raw);   // sizeof(FmGt<OWN>::Smem), set by the host
    typename G::Smem& sm = *reinterpret_cast<typename G::Smem*>(smem_raw);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp >> 2) * (OWN / 2), wn = (warp & 3) * 16, g = lane >> 2, t = lane & 3;
    const i64 own0 = (i64)blockIdx.x * OWN;
    const int split = blockIdx.y, d0 = blockIdx.z * G::DCH;
    i64 ntiles = (C + GT_PN - 1) / GT_PN, t_begin, t_end;
    fm_split_range(ntiles, split, tiles_per_split, t_begin, t_end);

    FmRow R[2 * MI];   // S rows q = mi*2 + h: wm + mi*16 + g + 8h
#pragma unroll
    for (int q = 0; q < 2 * MI; ++q)
        R[q] = fm_load_row(p, own0 + wm + (q >> 1) * 16 + g + 8 * (q & 1), B, labels, xnorm, lse, g_rows, g_scalar);
    float out[2][8][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int nj = 0; nj < 8; ++nj)
#pragma unroll
            for (int v = 0; v < 4; ++v) out[mi][nj][v] = 0.0f;
    float ec[2 * MI], dt[2 * MI];
#pragma unroll
    for (int q = 0; q < 2 * MI; ++q) ec[q] = dt[q] = 0.0f;

    for (i64 tile = t_begin; tile < t_end; ++tile) {
        const i64 par0 = tile * GT_PN;
        float s[MI][2][4];
        fm_gt_dots<OWN>(sm, x, own0, B, w, par0, C, D, s);
#pragma unroll
        for (int ni = 0; ni < 2; ++ni) {
            float inv_w[2];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                i64 col = par0 + wn + ni * 8 + 2 * t + j;
                inv_w[j] = col < C ? fm_inv_norm(wnorm[col]) : 0.0f;
            }
#pragma unroll
            for (int q = 0; q < 2 * MI; ++q) {
                const int mi = q >> 1, h = q & 1;
                float e2[2];
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    i64 col = par0 + wn + ni * 8 + 2 * t + j;
                    e2[j] = 0.0f;
                    if (col < C && R[q].g != 0.0f) {
                        FmGradElem ge = fm_grad_elem(p, R[q], col, s[mi][ni][h * 2 + j], inv_w[j]);
                        e2[j] = ge.e;
                        ec[q] = fmaf(ge.e, ge.c, ec[q]);
                        dt[q] += ge.dt;
                    }
                }
                unsigned pk = (unsigned)fm_from_f32<T_IN>(e2[0]).bits | ((unsigned)fm_from_f32<T_IN>(e2[1]).bits << 16);
                *reinterpret_cast<unsigned*>(&sm.es[wm + mi * 16 + g + 8 * h][wn + ni * 8 + 2 * t]) = pk;
            }
        }
        if (tid < GT_PN) {
            i64 col = par0 + tid;
            sm.pscale[tid] = (col < C && p.normalize_weights) ? fm_inv_norm(wnorm[col]) : 1.0f;
        }
        __syncthreads();
        fm_gt_fill_chunk<OWN>(sm, w, par0, C, d0, D);
        __syncthreads();
        fm_gt_product<OWN>(sm, out);
    }

    // dxh_i = r_i g_i * out (rows of ignored labels: g = 0, exact zeros). The product warp's
    // rows differ from its S rows when OWN = 32, so their factors are loaded here.
    int pm, pd;
    fm_gt_product_warp<OWN>(warp, pm, pd);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int mi = q >> 1, h = q & 1;
        const i64 row = own0 + pm + mi * 16 + g + 8 * h;
        if (row >= B) continue;
        const FmRow Rp = fm_load_row(p, row, B, labels, xnorm, lse, g_rows, g_scalar);
        const float coef = Rp.g == 0.0f ? 0.0f : Rp.r * Rp.g;
        float* o = dxh_part + ((i64)split * B + row) * D;
#pragma unroll
        for (int nj = 0; nj < 8; ++nj)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                int d = d0 + pd + nj * 8 + 2 * t + j;
                if (d < D) o[d] = coef * out[mi][nj][h * 2 + j];
            }
    }
    if (blockIdx.z == 0) {
        float pr = fm_gt_rowsum<OWN>(sm, 0, ec, tid);
        float dn = fm_gt_rowsum<OWN>(sm, 1, dt, tid);
        if (tid < OWN && own0 + tid < B) {
            FmRow Ro = fm_load_row(p, own0 + tid, B, labels, xnorm, lse, g_rows, g_scalar);
            const float coef = Ro.g == 0.0f ? 0.0f : Ro.r * Ro.g;
            proj_part[(i64)split * B + own0 + tid] = coef * pr;
            dn_part[(i64)split * B + own0 + tid] = p.s * Ro.g * dn;
        }
    }
}

// Grid (ceil(C / OWN), ceil(D / DCH)). Block (ct, dc) owns classes ct*OWN.. x dims dc*DCH.. of
// dw and loops over every row tile of the batch. scale[0] = K from fm_grad_scale.
template <int OWN, typename OUT>
__device__ __forceinline__ void fm_grad_w_tc(const T_IN* __restrict__ x, const T_IN* __restrict__ w,
                                             const int* __restrict__ labels, const float* __restrict__ xnorm,
                                             const float* __restrict__ wnorm, const float* __restrict__ lse,
                                             const float* __restrict__ g_rows, float g_scalar,
                                             const float* __restrict__ scale, const FmParams& p, i64 B, i64 C,
                                             int D, OUT* __restrict__ dw) {
    typedef FmGt<OWN> G;
    constexpr int MI = G::MI;
    FM_DYNAMIC_SMEM(smem_raw);   // sizeof(FmGt<OWN>::Smem), set by the host
    typename G::Smem& sm = *reinterpret_cast<typename G::Smem*>(smem_raw);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp >> 2) * (OWN / 2), wn = (warp & 3) * 16, g = lane >> 2, t = lane & 3;
    const i64 own0 = (i64)blockIdx.x * OWN;
    const int d0 = blockIdx.y * G::DCH;
    const float K = scale[0], inv_K = 1.0f / K;

    float inv_w[2 * MI];   // S classes q = mi*2 + h
#pragma unroll
    for (int q = 0; q < 2 * MI; ++q) {
        i64 col = own0 + wm + (q >> 1) * 16 + g + 8 * (q & 1);
        inv_w[q] = col < C ? fm_inv_norm(wnorm[col]) : 0.0f;
    }
    float out[2][8][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int nj = 0; nj < 8; ++nj)
#pragma unroll
            for (int v = 0; v < 4; ++v) out[mi][nj][v] = 0.0f;
    float pj[2 * MI];
#pragma unroll
    for (int q = 0; q < 2 * MI; ++q) pj[q] = 0.0f;

    for (i64 par0 = 0; par0 < B; par0 += GT_PN) {
        float s[MI][2][4];
        fm_gt_dots<OWN>(sm, w, own0, C, x, par0, B, D, s);
#pragma unroll
        for (int ni = 0; ni < 2; ++ni) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const i64 row = par0 + wn + ni * 8 + 2 * t + j;
                const FmRow R = fm_load_row(p, row, B, labels, xnorm, lse, g_rows, g_scalar);
                const float coef = R.g == 0.0f ? 0.0f : R.r * R.g;
#pragma unroll
                for (int q = 0; q < 2 * MI; ++q) {
                    const int mi = q >> 1, h = q & 1;
                    const i64 col = own0 + wm + mi * 16 + g + 8 * h;
                    float e = 0.0f;
                    if (col < C && R.g != 0.0f) {
                        FmGradElem ge = fm_grad_elem(p, R, col, s[mi][ni][h * 2 + j], inv_w[q]);
                        e = ge.e;
                        pj[q] = fmaf(coef * ge.e, ge.c, pj[q]);
                    }
                    sm.es[wm + mi * 16 + g + 8 * h][wn + ni * 8 + 2 * t + j] = fm_from_f32<T_IN>(e).bits;
                }
            }
        }
        if (tid < GT_PN) {
            const FmRow R = fm_load_row(p, par0 + tid, B, labels, xnorm, lse, g_rows, g_scalar);
            sm.pscale[tid] = R.g == 0.0f ? 0.0f : R.inv_x * (R.r * R.g) * inv_K;
        }
        __syncthreads();
        fm_gt_fill_chunk<OWN>(sm, x, par0, B, d0, D);
        __syncthreads();
        fm_gt_product<OWN>(sm, out);
    }

    // dwh_j = K * out; with weight normalization dw_j = (dwh_j - wh_j proj_j) / max(|w_j|, eps).
    float pr = fm_gt_rowsum<OWN>(sm, 0, pj, tid);
    if (tid < OWN) sm.red[1][0][tid] = pr;   // slot 1 is free: broadcast proj_j to all threads
    __syncthreads();
    int pm, pd;
    fm_gt_product_warp<OWN>(warp, pm, pd);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int mi = q >> 1, h = q & 1, lr = pm + mi * 16 + g + 8 * h;
        const i64 col = own0 + lr;
        if (col >= C) continue;
        const float proj = sm.red[1][0][lr];
        const float iw = fm_inv_norm(wnorm[col]);
#pragma unroll
        for (int nj = 0; nj < 8; ++nj)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                int d = d0 + pd + nj * 8 + 2 * t + j;
                if (d >= D) continue;
                float gv = K * out[mi][nj][h * 2 + j];
                if (p.normalize_weights) {
                    float wh = fm_to_f32(w[col * D + d]) * iw;
                    gv = (gv - wh * proj) * iw;
                }
                dw[col * D + d] = fm_from_f32<OUT>(gv);
            }
    }
}

// Entry points: FmGt<64> as fm_grad_*_tc, FmGt<32> as fm_grad_*_tc_d512; dw in T_IN or f32.
// One block per SM is what the launch bounds promise ptxas: without the minimum, ptxas held the
// FmGt<32> dw kernel to 128 registers (two blocks per SM) and spilled ~300 bytes; with it, 148
// registers and no spills (scripts/ptxas-report). Which occupancy is faster is for the GPU
// benchmarks to show.
#define FM_GT_ENTRIES(SUFFIX, OWN)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256, 1) FM_ENTRY(fm_grad_x_tc##SUFFIX)(                               \
        const T_IN* x, const T_IN* w, const int* labels, const float* xnorm, const float* wnorm, const float* lse,   \
        const float* g_rows, float g_scalar, FmParams p, i64 B, i64 C, int D, int tiles_per_split, int nsplit,      \
        float* dxh_part, float* proj_part, float* dn_part) {                                                         \
        fm_grad_x_tc<OWN>(x, w, labels, xnorm, wnorm, lse, g_rows, g_scalar, p, B, C, D, tiles_per_split, nsplit,   \
                          dxh_part, proj_part, dn_part);                                                             \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(256, 1) FM_ENTRY(fm_grad_w_tc##SUFFIX)(                               \
        const T_IN* x, const T_IN* w, const int* labels, const float* xnorm, const float* wnorm, const float* lse,   \
        const float* g_rows, float g_scalar, const float* scale, FmParams p, i64 B, i64 C, int D, T_IN* dw) {       \
        fm_grad_w_tc<OWN, T_IN>(x, w, labels, xnorm, wnorm, lse, g_rows, g_scalar, scale, p, B, C, D, dw);          \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(256, 1) FM_ENTRY_F32OUT(fm_grad_w_tc##SUFFIX)(                        \
        const T_IN* x, const T_IN* w, const int* labels, const float* xnorm, const float* wnorm, const float* lse,   \
        const float* g_rows, float g_scalar, const float* scale, FmParams p, i64 B, i64 C, int D, float* dw) {      \
        fm_grad_w_tc<OWN, float>(x, w, labels, xnorm, wnorm, lse, g_rows, g_scalar, scale, p, B, C, D, dw);         \
    }

FM_GT_ENTRIES(, 64)
FM_GT_ENTRIES(_d512, 32)

#endif  // FM_DTYPE != FM_F32
