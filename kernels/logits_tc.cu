// fused-margin: the forward logits tiles on tensor cores, the same contract as fm_fwd_tiles in
// logits.cu (docs/MATH.md steps 2-5): per (row, class split) online softmax statistics and the target
// logit z_iy; nothing of size B x C is written. Two operand types share one body:
//   - f16 / bf16 inputs (fm_fwd_tiles_tc): mma.sync m16n8k16, 32-wide k steps, ldmatrix fragments;
//   - f32 inputs through TF32 (fm_fwd_tiles_tf32, opt-in; docs/MATH.md's TF32 bars): mma.sync m16n8k8
//     on operands rounded with cvt.rna.tf32, 16-wide k steps of f32, 32-bit fragment loads.
// Both stage 64 bytes per row and k step, so the shared-memory layout, the copy pattern and the
// epilogue are the same.
//
// Block: 256 threads = 8 warps, warp grid 2 (rows) x 4 (classes); each warp holds MI x NI mma
// tiles of 16 x 8 with f32 accumulators: 32 x 32 (the default, a 64-row x 128-class block tile) or
// 64 x 64 ("wide": 128 x 256). x and w tiles of
// 32 columns of D stream through a 3-stage cp.async pipeline (16-byte copies, zero-filled past the
// edges); the (class tile, k step) iterations of a split form one sequence, so the pipeline never
// drains between class tiles. Fragments come from ldmatrix.x4 (one instruction per 16 x 16 A
// fragment or pair of n8 B fragments; v2 used 32-bit LDS, 2 per mma). Shared rows are padded to
// 40 halves (80 bytes): the 8 rows of each 8x8 matrix then hit 8 distinct 16-byte bank groups.
// The norms are applied in the epilogue (no normalized copies); each thread keeps running
// (max, sum-exp) for its 4 rows over its own columns, merged across the block once per split.
//
// Requires 16-byte chunks wholly inside or outside each row (D % 8 == 0 for 16-bit inputs,
// D % 4 == 0 for f32) and 16-byte aligned x and w (checked on the host, which otherwise uses the
// SIMT kernel).
#include "tile.cuh"

#define TC_STAGES 3
#define TC_WARPS_M 2   // warps along rows
#define TC_WARPS_N 4   // warps along classes

// 16-bit operands: 32 columns of D per k step, rows padded to 40 halves (80 bytes).
struct FmTcHalf {
    typedef unsigned short E;
    static constexpr int BK = 32, LD = 40, VEC = 8;
    // One k step of the warp's (16 MI) x (8 NI) tile: rows xs + (wm..) * LD, classes ws + (wn..) * LD.
    template <int MI, int NI>
    __device__ static __forceinline__ void step(float (&acc)[MI][NI][4], const E* xs, const E* ws, int wm, int wn,
                                                int lane) {
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned a[MI][4], b[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
                fm_ldmatrix_x4(a[mi], xs + (wm + mi * 16 + (lane & 15)) * LD + kk + (lane >> 4) * 8);
            // Classes are rows of [n][k]: one x4 load gives the fragments of two n8 tiles.
#pragma unroll
            for (int nb = 0; nb < NI / 2; ++nb) {
                unsigned q[4];
                fm_ldmatrix_x4(q, ws + (wn + nb * 16 + (lane & 7) + 8 * (lane >> 4)) * LD + kk + 8 * ((lane >> 3) & 1));
                b[2 * nb][0] = q[0]; b[2 * nb][1] = q[1]; b[2 * nb + 1][0] = q[2]; b[2 * nb + 1][1] = q[3];
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) fm_mma16816<FM_DTYPE == FM_BF16>(acc[mi][ni], a[mi], b[ni]);
        }
    }
};

// f32 operands through TF32: 16 columns of D per k step, rows padded to 20 floats (80 bytes): the
// 32-bit fragment loads of a warp (row g, column t) hit 32 distinct banks.
struct FmTcTf32 {
    typedef float E;
    static constexpr int BK = 16, LD = 20, VEC = 4;
    template <int MI, int NI>
    __device__ static __forceinline__ void step(float (&acc)[MI][NI][4], const E* xs, const E* ws, int wm, int wn,
                                                int lane) {
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            unsigned a[MI][4], b[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                const E* r0 = xs + (wm + mi * 16 + g) * LD + kk + t;
                a[mi][0] = fm_f32_to_tf32(r0[0]);
                a[mi][1] = fm_f32_to_tf32(r0[8 * LD]);
                a[mi][2] = fm_f32_to_tf32(r0[4]);
                a[mi][3] = fm_f32_to_tf32(r0[8 * LD + 4]);
            }
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
                const E* n0 = ws + (wn + ni * 8 + g) * LD + kk + t;
                b[ni][0] = fm_f32_to_tf32(n0[0]);
                b[ni][1] = fm_f32_to_tf32(n0[4]);
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) fm_mma1688_tf32(acc[mi][ni], a[mi], b[ni]);
        }
    }
};

// Block tile of the kernel with MI x NI fragments per warp: BM rows x BN classes; shared memory
// (dynamic) holds TC_STAGES stages of x rows then w rows, LD elements each.
template <class Op, int MI, int NI>
struct FmTcShape {
    static constexpr int BM = TC_WARPS_M * 16 * MI, BN = TC_WARPS_N * 8 * NI;
    static constexpr int STAGE_X = BM * Op::LD, STAGE_W = BN * Op::LD;
    static constexpr int PIPE_BYTES = TC_STAGES * (STAGE_X + STAGE_W) * (int)sizeof(typename Op::E);
    // The pipeline, then the cross-warp (max, sum) pairs: red_m and red_s, TC_WARPS_N x BM each.
    static constexpr int SMEM_BYTES = PIPE_BYTES + 2 * TC_WARPS_N * BM * (int)sizeof(float);
};

// The host takes tile shapes and dynamic shared memory from geometry.cuh; both operand types and
// both tile shapes must match it.
static_assert(FmTcShape<FmTcHalf, 2, 4>::SMEM_BYTES == FM_G_TC_SMEM, "geometry.cuh: FM_G_TC_SMEM");
static_assert(FmTcShape<FmTcHalf, 4, 8>::SMEM_BYTES == FM_G_TC_WIDE_SMEM, "geometry.cuh: FM_G_TC_WIDE_SMEM");
static_assert(FmTcShape<FmTcTf32, 2, 4>::SMEM_BYTES == FM_G_TC_SMEM, "geometry.cuh: FM_G_TC_SMEM, TF32");
static_assert(FmTcShape<FmTcTf32, 4, 8>::SMEM_BYTES == FM_G_TC_WIDE_SMEM, "geometry.cuh: FM_G_TC_WIDE_SMEM, TF32");
static_assert(FmTcShape<FmTcHalf, 2, 4>::BM == FM_G_TC_BM && FmTcShape<FmTcHalf, 2, 4>::BN == FM_G_TC_BN,
              "geometry.cuh: FM_G_TC_BM, FM_G_TC_BN");
static_assert(FmTcShape<FmTcHalf, 4, 8>::BM == FM_G_TC_WIDE_BM && FmTcShape<FmTcHalf, 4, 8>::BN == FM_G_TC_WIDE_BN,
              "geometry.cuh: FM_G_TC_WIDE_BM, FM_G_TC_WIDE_BN");

// Copies the x and w chunks of pipeline iteration `it` (class tile t_begin + it / (K ksteps),
// sub-center (it / ksteps) % K, columns k0 .. k0 + BK of D) into `stage`: (BM + BN) rows of four
// 16-byte chunks. Class col's rows of w are col K + sub (K = 1, a constant, but for sub-centers).
template <class Op, int MI, int NI>
__device__ __forceinline__ void fm_tc_load(typename Op::E* xs, typename Op::E* ws, int stage, i64 it, int ksteps,
                                           i64 t_begin, const T_IN* __restrict__ x, const T_IN* __restrict__ w,
                                           i64 row0, i64 B, i64 C, int D, int K, const int* widx) {
    typedef FmTcShape<Op, MI, NI> S;
    const i64 kt = it / ksteps;   // (class tile, sub-center) pairs so far
    const i64 col0 = (t_begin + kt / K) * S::BN;
    const int sub = (int)(kt % K);
    const int k0 = (int)(it % ksteps) * Op::BK;
#pragma unroll
    for (int q = 0; q < (S::BM + S::BN) * 4 / 256; ++q) {
        const int e = threadIdx.x + q * 256, r = e >> 2, ch = e & 3, kc = k0 + ch * Op::VEC;
        if (r < S::BM) {
            const i64 row = row0 + r;
            const bool ok = row < B && kc < D;   // D % VEC == 0: a chunk is wholly inside or outside
            fm_cp_async16(xs + stage * S::STAGE_X + r * Op::LD + ch * Op::VEC,
                          ok ? (const void*)(x + row * D + kc) : (const void*)x, ok);
        } else {
            const i64 col = col0 + (r - S::BM);
            const bool ok = col < C && kc < D;
            fm_cp_async16(ws + stage * S::STAGE_W + (r - S::BM) * Op::LD + ch * Op::VEC,
                          ok ? (const void*)(w + (fm_wrow(widx, col) * K + sub) * D + kc) : (const void*)w, ok);
        }
    }
}

// SC: sub-centers (p.centers = K >= 1 rows of w per class): K pipeline passes per class tile, their
// cosines merged into `best`, the epilogue on best. A separate instantiation: best doubles the
// accumulator registers, which the plain kernels do not pay.
template <class Op, int MI, int NI, bool SC>
__device__ __forceinline__ void fm_fwd_tc(const FmTileArgs& args) {
    FM_TILE_UNPACK
    typedef FmTcShape<Op, MI, NI> S;
    FM_DYNAMIC_SMEM(smem);   // S::SMEM_BYTES, set by the host
    typename Op::E* xs = reinterpret_cast<typename Op::E*>(smem);
    typename Op::E* ws = xs + TC_STAGES * S::STAGE_X;
    float (*red_m)[S::BM] = reinterpret_cast<float (*)[S::BM]>(smem + S::PIPE_BYTES);
    float (*red_s)[S::BM] = red_m + TC_WARPS_N;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp / TC_WARPS_N) * 16 * MI, wn = (warp % TC_WARPS_N) * 8 * NI, g = lane >> 2, t = lane & 3;
    const i64 row0 = (i64)blockIdx.x * S::BM;
    const int split = blockIdx.y;
    i64 ntiles = (C + S::BN - 1) / S::BN, t_begin, t_end;
    fm_split_range(ntiles, split, tiles_per_split, t_begin, t_end);
    const int ksteps = (D + Op::BK - 1) / Op::BK;
    const int K = SC ? p.centers : 1;
    const i64 total = (t_end - t_begin) * K * ksteps;

    // This thread's 2 MI rows: q = mi * 2 + h is row wm + mi*16 + g + 8h of the block tile.
    FmRow R[2 * MI];
    float run_m[2 * MI], run_s[2 * MI];
#pragma unroll
    for (int q = 0; q < 2 * MI; ++q) {
        R[q] = fm_row_ctx(p, row0 + wm + (q >> 1) * 16 + g + 8 * (q & 1), B, labels, xnorm, tgt);
        run_m[q] = FM_NEG_INF;
        run_s[q] = 0.0f;
    }
    float acc[MI][NI][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int v = 0; v < 4; ++v) acc[mi][ni][v] = 0.0f;
    float best[SC ? MI : 1][SC ? NI : 1][4];   // the class maxima over the sub-centers so far

#pragma unroll
    for (int s = 0; s < TC_STAGES - 1; ++s) {
        if (s < total) fm_tc_load<Op, MI, NI>(xs, ws, s, s, ksteps, t_begin, x, w, row0, B, C, D, K, widx);
        fm_cp_async_commit();   // always commit: the group count stays uniform for wait_group
    }
    for (i64 it = 0; it < total; ++it) {
        fm_cp_async_wait<TC_STAGES - 2>();
        __syncthreads();   // stage `it` is visible to all; everyone is done reading stage it-1
        i64 nxt = it + TC_STAGES - 1;
        if (nxt < total)
            fm_tc_load<Op, MI, NI>(xs, ws, (int)(nxt % TC_STAGES), nxt, ksteps, t_begin, x, w, row0, B, C, D, K,
                                   widx);
        fm_cp_async_commit();
        const int st = (int)(it % TC_STAGES);
        Op::template step<MI, NI>(acc, xs + st * S::STAGE_X, ws + st * S::STAGE_W, wm, wn, lane);
        if ((int)(it % ksteps) == ksteps - 1) {
            // Epilogue of class tile `tile`: the accumulators hold raw dot products.
            const i64 kt = it / ksteps;
            const i64 col0 = (t_begin + kt / K) * S::BN;
            float inv_w[NI][2];
            bool cin[NI][2];
            if constexpr (SC) {
                // Sub-center `sub` of the class tile: its cosines into best; the epilogue after the last.
                const int sub = (int)(kt % K);
                fm_tc_col_factors<NI>(wnorm, C, col0 + wn + 2 * t, inv_w, cin, K, sub);
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
                    fm_tc_subcenter_merge<NI>(p, acc[mi], best[mi], inv_w, R[2 * mi], R[2 * mi + 1], sub);
                if (sub == K - 1) {
#pragma unroll
                    for (int ni = 0; ni < NI; ++ni) inv_w[ni][0] = inv_w[ni][1] = 1.0f;
#pragma unroll
                    for (int q = 0; q < 2 * MI; ++q) {
                        const int mi = q >> 1, h = q & 1;
                        fm_tc_row_epilogue<NI>(p, best[mi], h, row0 + wm + mi * 16 + g + 8 * h, B,
                                               col0 + wn + 2 * t, cin, inv_w, fm_tc_unit_row(R[q]), zy, run_m[q],
                                               run_s[q]);
                    }
                }
            } else {
                fm_tc_col_factors<NI>(wnorm, C, col0 + wn + 2 * t, inv_w, cin);
#pragma unroll
                for (int q = 0; q < 2 * MI; ++q) {
                    const int mi = q >> 1, h = q & 1;
                    fm_tc_row_epilogue<NI>(p, acc[mi], h, row0 + wm + mi * 16 + g + 8 * h, B, col0 + wn + 2 * t,
                                           cin, inv_w, R[q], zy, run_m[q], run_s[q]);
                }
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                    for (int v = 0; v < 4; ++v) acc[mi][ni][v] = 0.0f;
        }
    }
    fm_cp_async_wait<0>();

    // Merge the 4 lanes of a quad (same rows, other columns), then the class-warps, in order.
#pragma unroll
    for (int q = 0; q < 2 * MI; ++q) {
#pragma unroll
        for (int o = 1; o <= 2; o <<= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, run_m[q], o);
            float s2 = __shfl_xor_sync(0xffffffffu, run_s[q], o);
            fm_online_merge(run_m[q], run_s[q], m2, s2);
        }
    }
    if (t == 0) {
#pragma unroll
        for (int q = 0; q < 2 * MI; ++q) {
            int r = wm + (q >> 1) * 16 + g + 8 * (q & 1);
            red_m[warp % TC_WARPS_N][r] = run_m[q];
            red_s[warp % TC_WARPS_N][r] = run_s[q];
        }
    }
    __syncthreads();
    if (tid < S::BM) {
        i64 row = row0 + tid;
        if (row < B) {
            float m = FM_NEG_INF, s = 0.0f;
            for (int k = 0; k < TC_WARPS_N; ++k) fm_online_merge(m, s, red_m[k][tid], red_s[k][tid]);
            part_m[row * nsplit + split] = m;
            part_s[row * nsplit + split] = s;
        }
    }
}

// Entry points: the 64 x 128 tile (warps of 32 x 32, "narrow", the default) and the 128 x 256 tile
// (warps of 64 x 64, "wide": four times the work per fragment load, 92 KB of shared memory; a
// candidate until measured). Dynamic shared memory: FmTcShape::SMEM_BYTES, set by the host.
// The *_sc entries: sub-center ArcFace on the narrow tiles (the plan never pairs it with wide ones).
#define FM_TC_ENTRY(name, Op, MI, NI, SC)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
    FM_ENTRY(name)(const FmTileArgs args) { fm_fwd_tc<Op, MI, NI, SC>(args); }
// The narrow tiles are unit FWD_TC, the wide ones FWD_TC_WIDE (compiled only when asked for).
#if FM_DTYPE != FM_F32
#if FM_IN_UNIT(FM_G_UNIT_FWD_TC)
FM_TC_ENTRY(fm_fwd_tiles_tc, FmTcHalf, 2, 4, false)
FM_TC_ENTRY(fm_fwd_tiles_tc_sc, FmTcHalf, 2, 4, true)
#endif
#if FM_IN_UNIT(FM_G_UNIT_FWD_TC_WIDE)
FM_TC_ENTRY(fm_fwd_tiles_tc_wide, FmTcHalf, 4, 8, false)
#endif
#else
#if FM_IN_UNIT(FM_G_UNIT_FWD_TC)
FM_TC_ENTRY(fm_fwd_tiles_tf32, FmTcTf32, 2, 4, false)
FM_TC_ENTRY(fm_fwd_tiles_tf32_sc, FmTcTf32, 2, 4, true)
#endif
#if FM_IN_UNIT(FM_G_UNIT_FWD_TC_WIDE)
FM_TC_ENTRY(fm_fwd_tiles_tf32_wide, FmTcTf32, 4, 8, false)
#endif
#endif
