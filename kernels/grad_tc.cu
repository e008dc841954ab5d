// fused-margin: the fused backward on tensor cores (f16 / bf16 inputs), the same contract as
// grad.cu (docs/MATH.md "Backward"; no B x C buffer, no atomics, fixed summation orders).
//
// Both kernels share one main loop. A block owns OWN "own" rows and DCH columns of D of the
// output; it walks "partner" tiles of GT_PN rows. For dx the own rows are x's rows and the
// partners are classes (a class split of them); for dw the own rows are classes and the partners
// are all of x's rows. The own rows stay in shared memory for the whole loop, all D columns, and
// each partner tile arrives whole (all D columns) by cp.async into one of `stages` buffers: with
// two, the next tile is in flight while this one's S, epilogue and product run, so no step waits
// on a global load. Per partner tile:
//   1. S = own . partner^T, the raw dot products (m16n8k16 mma.sync, ldmatrix fragments from the
//      resident tiles);
//   2. the epilogue recomputes the logit and softmax from the saved lse and forms the unit
//      gradient e_ij = (softmax - onehot) dtarget/dc, accumulating proj = sum dc c (and dn for x)
//      in f32; e goes to shared memory in T_IN, except the target entries (below);
//   3. out += e' . partner on tensor cores, the partner tile itself the B operand
//      (ldmatrix.trans of the [partner][d] tile), where each partner row carries a factor (wh_j =
//      w_j / |w_j| for dx; xh_i r_i g_i / K for dw, K a power of two >= max |r_i g_i| from
//      fm_grad_scale): bf16 multiplies e by it before rounding (e' = e f, f32's range), f16
//      scales the tile in place after S (e' = e; f16 cannot hold e / |w_j|).
// The target entry e_iy (one per row of x) stays out of the 16-bit product: its dtarget/dc reaches
// m1 sin(m1 theta + m2) / sin(theta), ~1000 at the angle clamp (Raw, or Monotonic with m2 > 0),
// and the normalization backward then cancels most of e_iy wh_y against xh_i proj_i, which is
// formed in f32 from unrounded e and c: rounding e_iy and wh_y (or xh_i) to 16 bits left errors of
// ~0.6 (bf16) there. So e_iy wh_y (dx row i) and e_iy xh_i r_i g_i (dw row y) are added in f32
// by the thread that owns that output element, in a fixed order (O(B D) in all), from the tile as
// given: off the target every e_ij is a probability in [0, 1], which the 16-bit operand holds to
// its precision. In f16 both kernels also scale each e row (a class row for dw, a row of x for dx)
// by a running power of two (fm_grad_w_tc, fm_grad_x_tc).
// dx partials are multiplied by r_i g_i and reduced over splits by fm_x_finish (normalize.cu);
// dw is multiplied by K and finished here with the normalization backward.
//
// Two tile shapes, FmGt<OWN> (the host picks by D, src/cuda/plan.rs):
//   FmGt<64>: 64 own rows x 256 columns (the fm_grad_*_tc entries);
//   FmGt<32>: 32 own rows x 512 columns (the *_tc_d512 entries).
// Blocks of one own tile and different D chunks each recompute S, so S costs ceil(D / DCH) times
// its single-pass FLOPs: FmGt<32> recomputes once up to D = 512 (the common embedding width),
// where FmGt<64> recomputes twice; FmGt<64> has the better S tiles when one chunk covers D.
//
// Block: 256 threads = 8 warps. S: warps 2 (own) x 4 (partner), OWN/2 x 16 each. Product: warps
// OWN/32 (own) x 256/OWN (d), 32 x 64 each: 64 f32 accumulators per thread in both shapes.
// Shared memory, dynamic: FmGt<OWN>::Smem, then the own rows and `stages` partner tiles, each row
// fm_gt_ld(D) elements: 2 ld (OWN + stages GT_PN) bytes beyond the fixed part, 172 KB for FmGt<32>
// at D = 512 with two stages. The host picks 2 stages where the device allows that much, 1 where
// only that fits, and the SIMT kernels beyond (src/cuda/plan.rs: `tc_backward_smem`).
// Requires D % 8 == 0 and 16-byte aligned x and w, like the tensor-core forward.
#include "tile.cuh"

#if FM_DTYPE != FM_F32

#define GT_PN FM_G_GT_PN
#define GT_ELD (GT_PN + 8)    // 144-byte rows

struct __align__(16) FmU4 { unsigned v[4]; };

// Mutation hooks: under the emulator FM_EMU_FAULT may name one wait or barrier of the main loop
// to leave out (tests/emulated_kernels.rs:
// `a_missing_wait_or_barrier_in_the_tensor_core_backward_is_caught`); compiled away elsewhere.
#ifdef FM_EMU
#define FM_GT_KEEP(name) (!fm_emu::fault_is(name))
#else
#define FM_GT_KEEP(name) true
#endif

template <int OWN>
struct FmGt {
    static_assert(OWN == 32 || OWN == 64, "own tile of 32 or 64 rows");
    static constexpr int MI = OWN / 32;          // S: m16 tiles per warp along own
    static constexpr int PW_D = 256 / OWN;       // product warps along d (OWN / 32 along own)
    static constexpr int DCH = 64 * PW_D;        // columns of D per block
    // The dw kernel's per-tile view of `red` during its loop: the partial row maxima of |e| (f16
    // scaling), each partner's target entry e_iy and the bit mask of the partners whose target is
    // one of the block's classes.
    struct Tgt {
        float part[4][OWN];
        float e[GT_PN];
        unsigned mask[GT_PN / 32];
    };
    union Red {
        float red[2][4][OWN];   // cross-warp reductions (proj, dn); in the dx loop red[1][0][row]
                                // holds own row's target entry e_iy
        Tgt tgt;
    };
    // The fixed part of the dynamic shared memory. The resident tiles follow it (fm_gt_tiles):
    // own[OWN][ld], then `stages` partner tiles par[GT_PN][ld], ld = fm_gt_ld(D).
    struct Smem {
        unsigned short es[OWN][GT_ELD];   // e tile, [own][partner]
        float pscale[GT_PN];              // per-partner factor of the product
        Red r;
    };
    static_assert(sizeof(Tgt) <= sizeof(float[2][4][OWN]), "Tgt fits in red: Smem keeps its size");
    static_assert(sizeof(Smem) % 16 == 0, "the tiles after Smem stay 16-byte aligned");
};
// The fixed part's size; the host adds the tiles' 2 ld (OWN + stages GT_PN) bytes (geometry.cuh;
// src/cuda/plan.rs: `tc_backward_smem`).
static_assert(sizeof(FmGt<FM_G_GT64_OWN>::Smem) == FM_G_GT64_FIXED_SMEM, "geometry.cuh: FM_G_GT64_FIXED_SMEM");
static_assert(sizeof(FmGt<FM_G_GT32_OWN>::Smem) == FM_G_GT32_FIXED_SMEM, "geometry.cuh: FM_G_GT32_FIXED_SMEM");
static_assert(FmGt<FM_G_GT64_OWN>::DCH == FM_G_GT64_DCH && FmGt<FM_G_GT32_OWN>::DCH == FM_G_GT32_DCH,
              "geometry.cuh: FM_G_GT*_DCH");

// The resident tiles' row stride in elements: D rounded up to 32 (the S loop's steps of 16 read up
// to there; columns D.. are zero-filled), plus 8, so that rows lie 16 or 80 bytes apart mod 128
// and ldmatrix's 8 row addresses hit 8 distinct 16-byte bank groups.
__device__ __forceinline__ int fm_gt_dp(int D) { return (D + 31) / 32 * 32; }
__device__ __forceinline__ int fm_gt_ld(int D) { return fm_gt_dp(D) + 8; }

// ROWS rows of a row-major matrix (D columns) starting at `src`, whole, into dst[ROWS][ld] by
// cp.async (the caller commits). Rows >= n_rows, a row whose `live` is false (the calling thread's
// row: fm_gt_load_row<ROWS>()) and columns D..dp are zero-filled without reading. Each row is
// copied by 256 / ROWS threads, consecutive threads on consecutive 16-byte chunks (64 or 128
// contiguous bytes per row and instruction). Offsets within the tile are 32-bit.
template <int ROWS>
__device__ __forceinline__ int fm_gt_load_row() { return (int)threadIdx.x / (256 / ROWS); }

template <int ROWS>
__device__ __forceinline__ void fm_gt_load_rows(unsigned short* dst, int ld, int dp, const T_IN* src, int n_rows,
                                                int D, bool live, const int* idx = nullptr, i64 base = 0) {
    constexpr int TPR = 256 / ROWS;
    const int r = fm_gt_load_row<ROWS>(), c0 = ((int)threadIdx.x % TPR) * 8;
    const bool row_ok = r < n_rows && live;
    // Rows r of src, or (Partial FC's index) rows idx[base + r] of the matrix src.
    const T_IN* s = src + (row_ok ? (idx != nullptr ? (i64)idx[base + r] * D : (i64)r * D) : 0);
    unsigned short* d = dst + r * ld;
    for (int c = c0; c < dp; c += TPR * 8) {
        const bool ok = row_ok && c < D;   // D % 8 == 0: a chunk is wholly inside or outside
        fm_cp_async16(d + c, ok ? (const void*)(s + c) : (const void*)src, ok);
    }
}

// S = own . partner^T for one partner tile, from the resident tiles, into s[mi][ni][4] (warp tile
// OWN/2 own x 16 partner; m16n8k16 mma.sync over dp columns, ldmatrix fragments).
template <int OWN>
__device__ __forceinline__ void fm_gt_dots(const unsigned short* own, const unsigned short* par, int ld, int dp,
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
    const unsigned short* a_at = own + (wm + (lane & 15)) * ld + (lane >> 4) * 8;
    // Partner rows are [n][k]: lanes 0-7 n 0-7 k 0-7, 8-15 n 0-7 k 8-15, 16-23 n 8-15 k 0-7, ...
    const unsigned short* b_at = par + (wn + (lane & 7) + 8 * (lane >> 4)) * ld + 8 * ((lane >> 3) & 1);
#pragma unroll 2
    for (int k = 0; k < dp; k += 16) {
        unsigned a[MI][4], b[2][2], q[4];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) fm_ldmatrix_x4(a[mi], a_at + mi * 16 * ld + k);
        fm_ldmatrix_x4(q, b_at + k);
        b[0][0] = q[0]; b[0][1] = q[1]; b[1][0] = q[2]; b[1][1] = q[3];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < 2; ++ni) fm_mma16816<FM_DTYPE == FM_BF16>(s[mi][ni], a[mi], b[ni]);
    }
}

// The product warp's tile: own rows wm.. (32) and chunk columns wd.. (64).
template <int OWN>
__device__ __forceinline__ void fm_gt_product_warp(int warp, int& wm, int& wd) {
    wm = (warp / FmGt<OWN>::PW_D) * 32;
    wd = (warp % FmGt<OWN>::PW_D) * 64;
}

// out[mi][nj] += es . par[:, d0 + wd..] (warp tile 32 own x 64 d) on tensor cores, the partner
// tile read in place ([partner][d], ldmatrix.trans). Column blocks at or past dp (a block's chunk
// reaching past D) read the last 16 columns instead: their outputs are never written, and every
// address stays inside the tile. No barrier: the caller's next one orders the buffers' reuse.
template <int OWN>
__device__ __forceinline__ void fm_gt_product(const typename FmGt<OWN>::Smem& sm, const unsigned short* par, int ld,
                                              int dp, int d0, float out[2][8][4]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int wm, wd;
    fm_gt_product_warp<OWN>(warp, wm, wd);
    int col[4];
#pragma unroll
    for (int nb = 0; nb < 4; ++nb) {
        const int c = d0 + wd + nb * 16;
        col[nb] = (c < dp ? c : dp - 16) + (lane >> 4) * 8;
    }
    const unsigned short* b_at = par + (lane & 15) * ld;
#pragma unroll
    for (int kk = 0; kk < GT_PN; kk += 16) {
        unsigned a[2][4], b[8][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
            fm_ldmatrix_x4(a[mi], &sm.es[wm + mi * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
        for (int nb = 0; nb < 4; ++nb) {
            unsigned q[4];
            fm_ldmatrix_x4_trans(q, b_at + kk * ld + col[nb]);
            b[2 * nb][0] = q[0]; b[2 * nb][1] = q[1]; b[2 * nb + 1][0] = q[2]; b[2 * nb + 1][1] = q[3];
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int nj = 0; nj < 8; ++nj) fm_mma16816<FM_DTYPE == FM_BF16>(out[mi][nj], a[mi], b[nj]);
    }
}

// f16 only: the partner tile's rows times sm.pscale[row] (already written and synchronized),
// rounded to T_IN, in place, over the columns d0.. this block's product reads (S is done with the
// tile). A row whose factor is 0 becomes zeros without reading (0 * NaN would poison the product).
// bf16 folds the factor into e instead (see fm_grad_x_tc): f16's range cannot hold e / |w_j|.
template <int OWN>
__device__ __forceinline__ void fm_gt_scale_partner(const typename FmGt<OWN>::Smem& sm, unsigned short* par, int ld,
                                                    int dp, int d0) {
    constexpr int DCH = FmGt<OWN>::DCH;
    const int dend = d0 + DCH < dp ? d0 + DCH : dp;
    const int r = (int)threadIdx.x >> 2;   // 4 threads per row, 16-byte chunks
    const float f = sm.pscale[r];
    unsigned short* row = par + r * ld;
    for (int c = d0 + ((int)threadIdx.x & 3) * 8; c < dend; c += 32) {
        FmU4* at = reinterpret_cast<FmU4*>(row + c);
        FmU4 out;
        if (f != 0.0f) {
            const FmU4 in = *at;
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
        *at = out;
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
        if (t == 0) sm.r.red[slot][warp & 3][wm + (q >> 1) * 16 + g + 8 * (q & 1)] = a;
    }
    __syncthreads();
    float s = 0.0f;
    if (tid_row < OWN)
        for (int k = 0; k < 4; ++k) s += sm.r.red[slot][k][tid_row];
    return s;
}

// Two adjacent 16-bit elements of a resident tile, p[0] and p[1] (p 4-byte aligned), in f32.
__device__ __forceinline__ void fm_gt_pair(const unsigned short* p, float& a, float& b) {
    const unsigned v = *reinterpret_cast<const unsigned*>(p);
    T_IN lo, hi;
    lo.bits = (unsigned short)(v & 0xffffu);
    hi.bits = (unsigned short)(v >> 16);
    a = fm_to_f32(lo);
    b = fm_to_f32(hi);
}

// 2^k as a float, k in [-126, 127] (exact).
__device__ __forceinline__ float fm_gt_pow2(int k) { return __int_as_float((k + 127) << 23); }

// The index of the lowest set bit of m != 0 (its power of two converts to float exactly).
__device__ __forceinline__ int fm_gt_ctz(unsigned m) {
    return (int)(__float_as_uint((float)(m & (0u - m))) >> 23) - 127;
}

// The f16 scale of the dw kernel's e rows: the exponent k of the power of two 2^k with
// max |e| 2^k < 1 for a row whose largest |e| is m, as large as FM_GT_KMAX; m = 0 and non-finite m
// (NaN and Inf propagate through the product by themselves) ask for no smaller k.
#define FM_GT_KMAX 125
__device__ __forceinline__ int fm_gt_exp_for(float m) {
    const int E = (__float_as_int(m) >> 23) & 0xff;   // biased exponent: m < 2^(E - 126)
    if (E == 0xff) return FM_GT_KMAX;
    const int k = 126 - (E > 0 ? E : 1);
    return k > FM_GT_KMAX ? FM_GT_KMAX : (k < -126 ? -126 : k);
}

// The f16 row scales, shared by both kernels (the S layout of fm_gt_dots: row q of a thread is
// wm + (q >> 1) * 16 + g + 8 (q & 1)):
// each S row's largest |e| of the tile, this thread's share mx[q], reduced over the quad into
// tg.part[partner warp][row] (the caller synchronizes before reading it).
template <int OWN>
__device__ __forceinline__ void fm_gt_part_max(typename FmGt<OWN>::Tgt& tg, const float mx[2 * FmGt<OWN>::MI]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = (warp >> 2) * (OWN / 2), g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int q = 0; q < 2 * FmGt<OWN>::MI; ++q) {
        float m = mx[q];
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        if (t == 0) tg.part[warp & 3][wm + (q >> 1) * 16 + g + 8 * (q & 1)] = m;
    }
}

// The row's tile maximum from the 4 partner warps' partials.
template <int OWN>
__device__ __forceinline__ float fm_gt_row_max(const typename FmGt<OWN>::Tgt& tg, int lr) {
    return fmaxf(fmaxf(tg.part[0][lr], tg.part[1][lr]), fmaxf(tg.part[2][lr], tg.part[3][lr]));
}

// es = e 2^k for the S rows: with SCALED each row's k first lowered to what the tile's maximum
// allows (fm_gt_exp_for), then the e kept in s rounded to T_IN into sm.es.
template <int OWN, bool SCALED>
__device__ __forceinline__ void fm_gt_store_es(typename FmGt<OWN>::Smem& sm, const float s[FmGt<OWN>::MI][2][4],
                                               int ks[2 * FmGt<OWN>::MI]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = (warp >> 2) * (OWN / 2), wn = (warp & 3) * 16, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int q = 0; q < 2 * FmGt<OWN>::MI; ++q) {
        const int mi = q >> 1, h = q & 1, lr = wm + mi * 16 + g + 8 * h;
        if (SCALED) {
            const int k = fm_gt_exp_for(fm_gt_row_max<OWN>(sm.r.tgt, lr));
            ks[q] = k < ks[q] ? k : ks[q];
        }
        const float f = fm_gt_pow2(ks[q]);
#pragma unroll
        for (int ni = 0; ni < 2; ++ni) {
            const unsigned pk = (unsigned)fm_from_f32<T_IN>(s[mi][ni][h * 2] * f).bits |
                                ((unsigned)fm_from_f32<T_IN>(s[mi][ni][h * 2 + 1] * f).bits << 16);
            *reinterpret_cast<unsigned*>(&sm.es[lr][wn + ni * 8 + 2 * t]) = pk;
        }
    }
}

// The product rows' k lowered the same way (the same maxima and history as their S rows), their
// f32 accumulators multiplied by the power of two 2^(k_new - k_old) first.
template <int OWN>
__device__ __forceinline__ void fm_gt_lower_product_rows(const typename FmGt<OWN>::Tgt& tg, int kp[4],
                                                         float out[2][8][4]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2;
    int pm, pd;
    fm_gt_product_warp<OWN>(warp, pm, pd);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int mi = q >> 1, h = q & 1, lr = pm + mi * 16 + g + 8 * h;
        const int k = fm_gt_exp_for(fm_gt_row_max<OWN>(tg, lr));
        if (k < kp[q]) {
            const int dk = k - kp[q];
            const float f = fm_gt_pow2(dk < -126 ? -126 : dk);   // past 2^-126: negligible
#pragma unroll
            for (int nj = 0; nj < 8; ++nj) {
                out[mi][nj][h * 2] *= f;
                out[mi][nj][h * 2 + 1] *= f;
            }
            kp[q] = k;
        }
    }
}

// The dx kernel's first k_i for a row whose target entry is e_iy (0 without one): as large as
// FM_GT_KMAX allows with 2^k_i |e_iy| < 2^64, so the f32 target term e_iy 2^k_i wh_y stays far from
// overflow; the tiles' non-target maxima lower it from there (the target needs no headroom in the
// 16-bit operand: it is added in f32).
__device__ __forceinline__ int fm_gt_k_start(float e_target) {
    const int k = fm_gt_exp_for(fabsf(e_target)) + 64;
    return k < FM_GT_KMAX ? k : FM_GT_KMAX;
}

// Grid (ceil(B / OWN), nsplit, ceil(D / DCH)). Block (rt, split, dc) writes rows rt*OWN.. x
// dims dc*DCH.. of split `split`'s partial dxh (already multiplied by r_i g_i), and for dc == 0
// the split's proj_i and dn_i.
//
// The block's x rows stay in shared memory for the whole split (all D columns); its class tiles
// stream through `stages` (2 or 1, the host's pick by shared memory) whole-D buffers by cp.async:
// with 2, tile t + 1 is in flight while tile t's S, epilogue and product run. Per class tile the
// product's B operand is the tile itself: bf16 multiplies e by the class factor 1/|w_j| before
// rounding it into es (bf16 has f32's range), f16 scales the tile in place once S is done
// (fm_gt_scale_partner: f16 cannot hold e / |w_j|).
//
// f16 also scales each row's e by a running power of two 2^k_i, as fm_grad_w_tc does per class
// row: softmax values of a large-C row lie far below f16's normal range (s = 64: most of a
// well-classified row's non-target mass flushed to 0 without it; tests/tc_rounding_model.rs). k_i
// comes from the non-target entries only (the target e_iy is added in f32 at the same scale and
// needs no 16-bit headroom), from at most FM_GT_KMAX and 2^k_i |e_iy| < 2^64 at the start
// (fm_gt_k_start); out 2^-k_i is the unscaled sum.
template <int OWN>
__device__ __forceinline__ void fm_grad_x_tc(const FmGradArgs<float>& args) {
    FM_GRAD_UNPACK
    typedef FmGt<OWN> G;
    constexpr int MI = G::MI;
    constexpr bool FOLD = FM_DTYPE == FM_BF16;
    constexpr bool SCALED = FM_DTYPE == FM_F16;
    FM_DYNAMIC_SMEM(smem_raw);   // sizeof(FmGt<OWN>::Smem) + the tiles, set by the host
    typename G::Smem& sm = *reinterpret_cast<typename G::Smem*>(smem_raw);
    const int dp = fm_gt_dp(D), ld = fm_gt_ld(D);
    unsigned short* own_s = reinterpret_cast<unsigned short*>(smem_raw + sizeof(typename G::Smem));
    unsigned short* par_s = own_s + OWN * ld;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp >> 2) * (OWN / 2), wn = (warp & 3) * 16, g = lane >> 2, t = lane & 3;
    const i64 own0 = (i64)blockIdx.x * OWN;
    const int split = blockIdx.y, d0 = blockIdx.z * G::DCH;
    i64 ntiles = (C + GT_PN - 1) / GT_PN, t_begin, t_end;
    fm_split_range(ntiles, split, tiles_per_split, t_begin, t_end);
    const bool fold_w = FOLD && p.normalize_weights;

    // The own rows, then the first class tile, in one group.
    fm_gt_load_rows<OWN>(own_s, ld, dp, x + own0 * D, (int)(B - own0 < OWN ? B - own0 : OWN), D, true);
    auto load_tile = [&](i64 tile, unsigned short* dst) {
        const i64 par0 = tile * GT_PN;
        fm_gt_load_rows<GT_PN>(dst, ld, dp, widx ? w : w + par0 * D, (int)(C - par0 < GT_PN ? C - par0 : GT_PN), D,
                               true, widx, par0);
    };
    if (t_begin < t_end) load_tile(t_begin, par_s);
    fm_cp_async_commit();

    FmRow R[2 * MI];   // S rows q = mi*2 + h: wm + mi*16 + g + 8h
#pragma unroll
    for (int q = 0; q < 2 * MI; ++q)
        R[q] = fm_load_row(p, own0 + wm + (q >> 1) * 16 + g + 8 * (q & 1), B, labels, xnorm, tgt, lse, g_rows, g_scalar);
    // The product warp's rows (not its S rows when OWN = 32) and their labels, -1 where there is
    // no target term to add (ignored rows, g = 0, a label outside the classes).
    int pm, pd;
    fm_gt_product_warp<OWN>(warp, pm, pd);
    int plab[4];
    // f16: the running exponents k_i of the rows' e scale (fm_grad_x_tc's comment), for the S rows
    // and the product rows (the same rows when OWN = 64, with the same history).
    int ks[2 * MI], kp[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const i64 row = own0 + pm + (q >> 1) * 16 + g + 8 * (q & 1);
        const int lab = row < B ? labels[row] : -1;
        plab[q] = (row < B && lab < C && fm_upstream(g_rows, g_scalar, row, lab) != 0.0f) ? lab : -1;
        kp[q] = SCALED ? fm_gt_k_start(plab[q] >= 0 ? expm1f(-tgt[2 * B + row]) * tgt[2 * row + 1] : 0.0f) : 0;
    }
#pragma unroll
    for (int q = 0; q < 2 * MI; ++q)
        ks[q] = SCALED ? fm_gt_k_start(R[q].g != 0.0f && R[q].label < C ? expm1f(-R[q].ce) * R[q].tdt : 0.0f) : 0;
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
        const int buf = stages == 2 ? (int)((tile - t_begin) & 1) : 0;
        unsigned short* pt = par_s + buf * (GT_PN * ld);
        if (FM_GT_KEEP("gt_wait")) fm_cp_async_wait<0>();
        if (FM_GT_KEEP("gt_sync")) __syncthreads();   // tile `tile` is visible to all; everyone is done with the previous tile
        if (stages == 2 && tile + 1 < t_end) load_tile(tile + 1, par_s + (buf ^ 1) * (GT_PN * ld));
        fm_cp_async_commit();
        const i64 par0 = tile * GT_PN;
        float s[MI][2][4];
        fm_gt_dots<OWN>(own_s, pt, ld, dp, s);
        float mx[2 * MI];   // f16: the row's largest non-target |e| in this tile (this thread's share)
#pragma unroll
        for (int q = 0; q < 2 * MI; ++q) mx[q] = 0.0f;
#pragma unroll
        for (int ni = 0; ni < 2; ++ni) {
            float inv_w[2], fw[2];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                i64 col = par0 + wn + ni * 8 + 2 * t + j;
                inv_w[j] = col < C ? fm_inv_norm(wnorm[col]) : 0.0f;
                fw[j] = fold_w ? inv_w[j] : 1.0f;   // bf16: es = e / |w_j|, the tile stays w
            }
#pragma unroll
            for (int q = 0; q < 2 * MI; ++q) {
                const int mi = q >> 1, h = q & 1, lr = wm + mi * 16 + g + 8 * h;
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    i64 col = par0 + wn + ni * 8 + 2 * t + j;
                    float e = 0.0f;
                    if (col < C && R[q].g != 0.0f) {
                        FmGradElem ge = fm_grad_elem(p, R[q], col, s[mi][ni][h * 2 + j], inv_w[j]);
                        ec[q] = fmaf(ge.e, ge.c, ec[q]);
                        dt[q] += ge.dt;
                        if (col == R[q].label) {
                            sm.r.red[1][0][lr] = ge.e;   // the target: added in f32 below, not in es
                        } else {
                            e = ge.e * fw[j];
                            if (SCALED) mx[q] = fmaxf(mx[q], fabsf(e));
                        }
                    }
                    s[mi][ni][h * 2 + j] = e;   // kept until the scale is known
                }
            }
        }
        if (SCALED) fm_gt_part_max<OWN>(sm.r.tgt, mx);
        if (!FOLD && tid < GT_PN) {
            i64 col = par0 + tid;
            sm.pscale[tid] = (col < C && p.normalize_weights) ? fm_inv_norm(wnorm[col]) : 1.0f;
        }
        if (FM_GT_KEEP("gt_es_sync")) __syncthreads();
        // es = e 2^k_i: the tile's scale per row from the partial maxima (f16; bf16 k_i = 0).
        fm_gt_store_es<OWN, SCALED>(sm, s, ks);
        // The product rows: the same scale (same maxima, same history), the accumulators rescaled.
        if (SCALED) fm_gt_lower_product_rows<OWN>(sm.r.tgt, kp, out);
        // out_i += e_iy 2^k_i wh_y in f32 for the product rows whose target is in this tile,
        // before the tile's product (a fixed order); wh_y from the unrounded w_y / |w_y| (the
        // tile holds w_y as given).
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int y = plab[q];
            if (y < par0 || y >= par0 + GT_PN) continue;
            const int mi = q >> 1, h = q & 1;
            const float ey = sm.r.red[1][0][pm + mi * 16 + g + 8 * h] * fm_gt_pow2(kp[q]);
            const float f = p.normalize_weights ? fm_inv_norm(wnorm[y]) : 1.0f;
            const unsigned short* wy = pt + (int)(y - par0) * ld;
#pragma unroll
            for (int nj = 0; nj < 8; ++nj) {
                const int d = d0 + pd + nj * 8 + 2 * t;
                if (d >= D) continue;
                float a, b;
                fm_gt_pair(wy + d, a, b);
                out[mi][nj][h * 2] = fmaf(ey, a * f, out[mi][nj][h * 2]);
                out[mi][nj][h * 2 + 1] = fmaf(ey, b * f, out[mi][nj][h * 2 + 1]);
            }
        }
        if (!FOLD && p.normalize_weights) {
            if (FM_GT_KEEP("gt_scale_sync")) __syncthreads();   // every target term has read the tile as given
            fm_gt_scale_partner<OWN>(sm, pt, ld, dp, d0);
        }
        if (FM_GT_KEEP("gt_product_sync")) __syncthreads();   // es (and the scaled tile) complete
        fm_gt_product<OWN>(sm, pt, ld, dp, d0, out);
        if (stages == 1 && tile + 1 < t_end) {
            if (FM_GT_KEEP("gt_reload_sync")) __syncthreads();   // the product is done with the one buffer
            load_tile(tile + 1, par_s);
            fm_cp_async_commit();
        }
    }
    fm_cp_async_wait<0>();   // an empty split leaves its own rows' copy in flight

    // dxh_i = r_i g_i * out (rows of ignored labels: g = 0, exact zeros). The product warp's
    // rows differ from its S rows when OWN = 32, so their factors are loaded here.
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int mi = q >> 1, h = q & 1;
        const i64 row = own0 + pm + mi * 16 + g + 8 * h;
        if (row >= B) continue;
        const FmRow Rp = fm_load_row(p, row, B, labels, xnorm, tgt, lse, g_rows, g_scalar);
        const float coef = Rp.g == 0.0f ? 0.0f : Rp.r * Rp.g;
        const float unscale = fm_gt_pow2(-kp[q]);   // f16: out 2^-k_i is the unscaled sum
        float* o = dxh_part + ((i64)split * B + row) * D;
#pragma unroll
        for (int nj = 0; nj < 8; ++nj)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                int d = d0 + pd + nj * 8 + 2 * t + j;
                if (d < D) o[d] = coef * (out[mi][nj][h * 2 + j] * unscale);
            }
    }
    if (blockIdx.z == 0) {
        float pr = fm_gt_rowsum<OWN>(sm, 0, ec, tid);
        float dn = fm_gt_rowsum<OWN>(sm, 1, dt, tid);
        if (tid < OWN && own0 + tid < B) {
            FmRow Ro = fm_load_row(p, own0 + tid, B, labels, xnorm, tgt, lse, g_rows, g_scalar);
            const float coef = Ro.g == 0.0f ? 0.0f : Ro.r * Ro.g;
            proj_part[(i64)split * B + own0 + tid] = coef * pr;
            dn_part[(i64)split * B + own0 + tid] = Ro.m.s * Ro.g * dn;
        }
    }
}

// Grid (ceil(C / OWN), ceil(D / DCH)). Block (ct, dc) owns classes ct*OWN.. x dims dc*DCH.. of
// dw and loops over every row tile of the batch. scale[0] = K from fm_grad_scale. The block's
// class rows stay in shared memory; the row tiles stream through `stages` whole-D buffers as in
// fm_grad_x_tc, rows that contribute nothing (ignored, g = 0) zero-filled without reading (their
// x may be non-finite, and 0 * NaN would poison the product). The product's B operand is the
// tile itself: bf16 multiplies e by the row factor xh_i r_i g_i / K = r_i g_i / (K |x_i|) before
// rounding it into es, f16 scales the tile in place (fm_gt_scale_partner).
//
// f16 keeps 11 significant bits only down to 2^-14 and nothing below 2^-24, while a class row's
// probabilities e_ij can all lie far below that (s = 64, many classes: a class never near any row;
// a zero-norm class row has c = 0, so e_ij = exp(-lse_i), and its dw = dwh / eps dominates dw).
// So in f16 each class row j carries a running power of two 2^k_j: a tile's e_ij are stored as
// e_ij 2^k_j with k_j the largest exponent (at most FM_GT_KMAX) for which every |e_ij 2^k_j| < 1
// so far, the target entries (added in f32 at the same scale) included. When a tile lowers k_j the
// row's f32 accumulators are multiplied by the power of two 2^(k_new - k_old) first, as the online
// softmax rescales its sum; at the end out 2^-k_j is the unscaled sum. Powers of two are exact,
// and the accumulated terms keep the precision they had. bf16 has f32's exponent range: k_j = 0.
template <int OWN, typename OUT>
__device__ __forceinline__ void fm_grad_w_tc(const FmGradArgs<OUT>& args) {
    FM_GRAD_UNPACK
    typedef FmGt<OWN> G;
    constexpr int MI = G::MI;
    constexpr bool SCALED = FM_DTYPE == FM_F16;
    constexpr bool FOLD = FM_DTYPE == FM_BF16;
    FM_DYNAMIC_SMEM(smem_raw);   // sizeof(FmGt<OWN>::Smem) + the tiles, set by the host
    typename G::Smem& sm = *reinterpret_cast<typename G::Smem*>(smem_raw);
    typename G::Tgt& tg = sm.r.tgt;
    const int dp = fm_gt_dp(D), ld = fm_gt_ld(D);
    unsigned short* own_s = reinterpret_cast<unsigned short*>(smem_raw + sizeof(typename G::Smem));
    unsigned short* par_s = own_s + OWN * ld;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp >> 2) * (OWN / 2), wn = (warp & 3) * 16, g = lane >> 2, t = lane & 3;
    const i64 own0 = (i64)blockIdx.x * OWN;
    const int d0 = blockIdx.y * G::DCH;
    const float K = scale[0], inv_K = 1.0f / K;
    int pm, pd;
    fm_gt_product_warp<OWN>(warp, pm, pd);

    // The class rows, then the first row tile, in one group. Whether the calling thread's load row
    // of the next tile contributes is fetched a tile ahead (nlab, ng: plain loads whose latency
    // the tile in between hides), so issuing a tile's copies never waits on a label.
    fm_gt_load_rows<OWN>(own_s, ld, dp, widx ? w : w + own0 * D, (int)(C - own0 < OWN ? C - own0 : OWN), D, true,
                         widx, own0);
    const int lrow = fm_gt_load_row<GT_PN>();
    int nlab;
    float ng;
    auto fetch = [&](i64 par0) {
        const i64 row = par0 + lrow;
        nlab = row < B ? labels[row] : -1;
        ng = row < B && g_rows ? g_rows[row] : g_scalar;
    };
    auto load_tile = [&](i64 par0, unsigned short* dst) {
        const bool live = nlab >= 0 && ng != 0.0f;   // as fm_upstream(..) != 0: the row counts
        fm_gt_load_rows<GT_PN>(dst, ld, dp, x + par0 * D, (int)(B - par0 < GT_PN ? B - par0 : GT_PN), D, live);
    };
    fetch(0);
    load_tile(0, par_s);
    fm_cp_async_commit();
    fetch(GT_PN);

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
    // Scale exponents k_j of the S rows and of the product rows (the same rows when OWN = 64).
    int ks[2 * MI], kp[4];
#pragma unroll
    for (int q = 0; q < 2 * MI; ++q) ks[q] = SCALED ? FM_GT_KMAX : 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) kp[q] = SCALED ? FM_GT_KMAX : 0;

    for (i64 par0 = 0; par0 < B; par0 += GT_PN) {
        const int buf = stages == 2 ? (int)((par0 / GT_PN) & 1) : 0;
        unsigned short* pt = par_s + buf * (GT_PN * ld);
        if (FM_GT_KEEP("gt_wait")) fm_cp_async_wait<0>();
        if (FM_GT_KEEP("gt_sync")) __syncthreads();   // this tile is visible to all; everyone is done with the previous tile
        if (stages == 2 && par0 + GT_PN < B) {
            load_tile(par0 + GT_PN, par_s + (buf ^ 1) * (GT_PN * ld));
            fetch(par0 + 2 * GT_PN);
        }
        fm_cp_async_commit();
        float s[MI][2][4];
        fm_gt_dots<OWN>(own_s, pt, ld, dp, s);
        float mx[2 * MI];   // f16: the row's largest |e| in this tile (this thread's share)
#pragma unroll
        for (int q = 0; q < 2 * MI; ++q) mx[q] = 0.0f;
#pragma unroll
        for (int ni = 0; ni < 2; ++ni) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int pl = wn + ni * 8 + 2 * t + j;
                const FmRow R = fm_load_row(p, par0 + pl, B, labels, xnorm, tgt, lse, g_rows, g_scalar);
                const float coef = R.g == 0.0f ? 0.0f : R.r * R.g;
                // bf16: the row factor xh_i r_i g_i / K of the product goes into e (as pscale).
                const float fx = FOLD ? (R.g == 0.0f ? 0.0f : R.inv_x * coef * inv_K) : 1.0f;
                // A zero x row's tile row is exactly zero, so its e_ij (up to ~1: its logits are
                // all 0) contribute nothing to dwh; left in the scale's maximum they would set k_j
                // and flush every other partner's tiny e_ij (the ones that make up dwh_j). So they
                // are left out of the maximum and, when finite, stored as 0 (exact: 0 * e = 0);
                // a non-finite e is kept so that it propagates as on the reference.
                const bool zero_x = SCALED && par0 + pl < B && xnorm[par0 + pl] == 0.0f;
#pragma unroll
                for (int q = 0; q < 2 * MI; ++q) {
                    const int mi = q >> 1, h = q & 1;
                    const i64 col = own0 + wm + mi * 16 + g + 8 * h;
                    float e = 0.0f;
                    if (col < C && R.g != 0.0f) {
                        FmGradElem ge = fm_grad_elem(p, R, col, s[mi][ni][h * 2 + j], inv_w[q]);
                        pj[q] = fmaf(coef * ge.e, ge.c, pj[q]);
                        if (zero_x && fm_finite(ge.e)) ge.e = 0.0f;
                        if (SCALED) mx[q] = fmaxf(mx[q], fabsf(ge.e));
                        if (R.label == col)
                            tg.e[pl] = ge.e;   // the target: added in f32 below, not in es
                        else
                            e = ge.e * fx;
                    }
                    s[mi][ni][h * 2 + j] = e;   // e kept until the scale is known
                }
            }
        }
        if (SCALED) fm_gt_part_max<OWN>(sm.r.tgt, mx);
        if (tid < GT_PN) {   // warps 0 and 1 whole: one partner row per thread
            const FmRow R = fm_load_row(p, par0 + tid, B, labels, xnorm, tgt, lse, g_rows, g_scalar);
            sm.pscale[tid] = R.g == 0.0f ? 0.0f : R.inv_x * (R.r * R.g) * inv_K;
            // Bit `lane` of mask[warp]: this partner row's target is one of the block's classes.
            const bool hit = R.g != 0.0f && R.label >= own0 && R.label < own0 + OWN && R.label < C;
            unsigned m = hit ? 1u << lane : 0u;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) m |= __shfl_xor_sync(0xffffffffu, m, o);
            if (lane == 0) tg.mask[warp] = m;
        }
        if (FM_GT_KEEP("gt_es_sync")) __syncthreads();
        // The tile's scale per row from the partial maxima, then es = e 2^k.
        fm_gt_store_es<OWN, SCALED>(sm, s, ks);
        // The product rows: the same scale (same maxima, same history), the accumulators rescaled.
        if (SCALED) fm_gt_lower_product_rows<OWN>(sm.r.tgt, kp, out);
        // out_j += e_iy 2^k_j xh_i r_i g_i / K in f32 for the partners i whose target y = j is a
        // product row, in increasing i, before the tile's product (a fixed order). xh_i r_i g_i / K
        // from the unrounded x_i (the tile holds x_i as given) and the row factor.
#pragma unroll
        for (int wd = 0; wd < GT_PN / 32; ++wd) {
            unsigned m = tg.mask[wd];
            while (m) {
                const int i = wd * 32 + fm_gt_ctz(m);
                m &= m - 1u;
                const int lr = labels[par0 + i] - (int)own0;
                const float ei = tg.e[i] * sm.pscale[i];
                const unsigned short* xr = pt + i * ld;
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const int mi = q >> 1, h = q & 1;
                    if (lr != pm + mi * 16 + g + 8 * h) continue;
                    const float f = ei * fm_gt_pow2(kp[q]);
#pragma unroll
                    for (int nj = 0; nj < 8; ++nj) {
                        const int d = d0 + pd + nj * 8 + 2 * t;
                        if (d >= D) continue;
                        float a, b;
                        fm_gt_pair(xr + d, a, b);
                        out[mi][nj][h * 2] = fmaf(f, a, out[mi][nj][h * 2]);
                        out[mi][nj][h * 2 + 1] = fmaf(f, b, out[mi][nj][h * 2 + 1]);
                    }
                }
            }
        }
        if (!FOLD) {
            if (FM_GT_KEEP("gt_scale_sync")) __syncthreads();   // every target term has read the tile as given
            fm_gt_scale_partner<OWN>(sm, pt, ld, dp, d0);
        }
        if (FM_GT_KEEP("gt_product_sync")) __syncthreads();   // es (and the scaled tile) complete
        fm_gt_product<OWN>(sm, pt, ld, dp, d0, out);
        if (stages == 1 && par0 + GT_PN < B) {
            if (FM_GT_KEEP("gt_reload_sync")) __syncthreads();   // the product is done with the one buffer
            load_tile(par0 + GT_PN, par_s);
            fm_cp_async_commit();
            fetch(par0 + 2 * GT_PN);
        }
    }

    // dwh_j = K 2^-k_j out. With weight normalization the forward is wh_j = w_j / max(|w_j|, eps):
    // dw_j = (dwh_j - wh_j proj_j) / |w_j| where |w_j| >= eps, and dwh_j / eps below it (the
    // derivative of w_j / eps, linear there; no projection term), as F.normalize's autograd.
    // w_j is read from the resident class rows.
    float pr = fm_gt_rowsum<OWN>(sm, 0, pj, tid);
    if (tid < OWN) sm.r.red[1][0][tid] = pr;   // slot 1 is free: broadcast proj_j to all threads
    __syncthreads();
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int mi = q >> 1, h = q & 1, lr = pm + mi * 16 + g + 8 * h;
        const i64 col = own0 + lr;
        if (col >= C) continue;
        const float proj = sm.r.red[1][0][lr];
        const float nw = wnorm[col];
        const float iw = fm_inv_norm(nw);
        const float unscale = fm_gt_pow2(-kp[q]);
        const unsigned short* wr = own_s + lr * ld;
#pragma unroll
        for (int nj = 0; nj < 8; ++nj)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                int d = d0 + pd + nj * 8 + 2 * t + j;
                if (d >= D) continue;
                float gv = K * (out[mi][nj][h * 2 + j] * unscale);
                if (p.normalize_weights) {
                    T_IN wv;
                    wv.bits = wr[d];
                    const float wh = fm_to_f32(wv) * iw;
                    gv = (gv - wh * fm_norm_proj(nw, proj)) * iw;
                }
#if defined(FM_EMU) && defined(FM_EMU_FAULT_TC_DW)
                gv *= 1.1f;   // a deliberately broken kernel for the self-check's test; emulator only
#endif
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
        const FmGradArgs<float> args) {                                                                              \
        fm_grad_x_tc<OWN>(args);                                                                                     \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(256, 1) FM_ENTRY(fm_grad_w_tc##SUFFIX)(                               \
        const FmGradArgs<T_IN> args) {                                                                               \
        fm_grad_w_tc<OWN, T_IN>(args);                                                                               \
    }
#define FM_GT_ENTRIES_F32OUT(SUFFIX, OWN)                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 1) FM_ENTRY_F32OUT(fm_grad_w_tc##SUFFIX)(                        \
        const FmGradArgs<float> args) {                                                                              \
        fm_grad_w_tc<OWN, float>(args);                                                                              \
    }

// One unit per tile shape and dw dtype (a plan launches one shape, and `backward` the 16-bit dw,
// `backward_f32` the f32 one): each is compiled only when launched.
#if FM_IN_UNIT(FM_G_UNIT_GRAD_TC64)
FM_GT_ENTRIES(, 64)
#endif
#if FM_IN_UNIT(FM_G_UNIT_GRAD_TC64_F32OUT)
FM_GT_ENTRIES_F32OUT(, 64)
#endif
#if FM_IN_UNIT(FM_G_UNIT_GRAD_TC32)
FM_GT_ENTRIES(_d512, 32)
#endif
#if FM_IN_UNIT(FM_G_UNIT_GRAD_TC32_F32OUT)
FM_GT_ENTRIES_F32OUT(_d512, 32)
#endif

#endif  // FM_DTYPE != FM_F32
