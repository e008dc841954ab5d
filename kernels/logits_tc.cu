// fused-margin: the forward logits tiles on tensor cores, the same contract as fm_fwd_tiles in
// logits.cu (MATH.md steps 2-5): per (row, class split) online softmax statistics and the target
// logit z_iy; nothing of size B x C is written. Two operand types share one body:
//   - f16 / bf16 inputs (fm_fwd_tiles_tc): mma.sync m16n8k16, 32-wide k steps, ldmatrix fragments;
//   - f32 inputs through TF32 (fm_fwd_tiles_tf32, opt-in; MATH.md's TF32 bars): mma.sync m16n8k8
//     on operands rounded with cvt.rna.tf32, 16-wide k steps of f32, 32-bit fragment loads.
// Both stage 64 bytes per row and k step, so the shared-memory layout, the copy pattern and the
// epilogue are the same.
//
// Block: 256 threads = 8 warps over a 64-row x 128-class tile, warp grid 2 (rows) x 4 (classes),
// each warp 32 x 32 = 2 x 4 mma.sync.m16n8k16 tiles with f32 accumulators. x and w tiles of
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

#define TC_BM 64
#define TC_BN 128
#define TC_STAGES 3

// 16-bit operands: 32 columns of D per k step, rows padded to 40 halves (80 bytes).
struct FmTcHalf {
    typedef unsigned short E;
    enum { BK = 32, LD = 40, VEC = 8 };
    // One 32-wide k step of the warp's 32 x 32 tile from rows xs (32 of them from wm) and ws.
    __device__ static __forceinline__ void step(float acc[2][4][4], const E (*xs)[LD], const E (*ws)[LD], int wm,
                                                int wn, int lane) {
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned a[2][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) fm_ldmatrix_x4(a[mi], &xs[wm + mi * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
            // Classes are rows of [n][k]: one x4 load gives the fragments of two n8 tiles.
#pragma unroll
            for (int nb = 0; nb < 2; ++nb) {
                unsigned q[4];
                fm_ldmatrix_x4(q, &ws[wn + nb * 16 + (lane & 7) + 8 * (lane >> 4)][kk + 8 * ((lane >> 3) & 1)]);
                b[2 * nb][0] = q[0]; b[2 * nb][1] = q[1]; b[2 * nb + 1][0] = q[2]; b[2 * nb + 1][1] = q[3];
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) fm_mma16816<FM_DTYPE == FM_BF16>(acc[mi][ni], a[mi], b[ni]);
        }
    }
};

// f32 operands through TF32: 16 columns of D per k step, rows padded to 20 floats (80 bytes): the
// 32-bit fragment loads of a warp (row g, column t) hit 32 distinct banks.
struct FmTcTf32 {
    typedef float E;
    enum { BK = 16, LD = 20, VEC = 4 };
    __device__ static __forceinline__ void step(float acc[2][4][4], const E (*xs)[LD], const E (*ws)[LD], int wm,
                                                int wn, int lane) {
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            unsigned a[2][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                const int r = wm + mi * 16 + g;
                a[mi][0] = fm_f32_to_tf32(xs[r][kk + t]);
                a[mi][1] = fm_f32_to_tf32(xs[r + 8][kk + t]);
                a[mi][2] = fm_f32_to_tf32(xs[r][kk + t + 4]);
                a[mi][3] = fm_f32_to_tf32(xs[r + 8][kk + t + 4]);
            }
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int n = wn + ni * 8 + g;
                b[ni][0] = fm_f32_to_tf32(ws[n][kk + t]);
                b[ni][1] = fm_f32_to_tf32(ws[n][kk + t + 4]);
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) fm_mma1688_tf32(acc[mi][ni], a[mi], b[ni]);
        }
    }
};

template <class Op>
struct FmTcSmem {
    typename Op::E xs[TC_STAGES][TC_BM][Op::LD];
    typename Op::E ws[TC_STAGES][TC_BN][Op::LD];
};

// Copies the x and w chunks of pipeline iteration `it` (class tile t_begin + it / ksteps, columns
// k0 .. k0 + BK of D) into `stage`: 256 + 512 16-byte chunks, 3 per thread.
template <class Op>
__device__ __forceinline__ void fm_tc_load(FmTcSmem<Op>& sm, int stage, i64 it, int ksteps, i64 t_begin,
                                           const T_IN* __restrict__ x, const T_IN* __restrict__ w,
                                           i64 row0, i64 B, i64 C, int D) {
    const int tid = threadIdx.x;
    const i64 col0 = (t_begin + it / ksteps) * TC_BN;
    const int k0 = (int)(it % ksteps) * Op::BK;
    {
        int r = tid >> 2, ch = tid & 3;
        i64 row = row0 + r;
        int kc = k0 + ch * Op::VEC;
        bool ok = row < B && kc < D;   // D % VEC == 0: a chunk is wholly inside or outside
        fm_cp_async16(&sm.xs[stage][r][ch * Op::VEC], ok ? (const void*)(x + row * D + kc) : (const void*)x, ok);
    }
#pragma unroll
    for (int q = 0; q < 2; ++q) {
        int e = tid + q * 256, r = e >> 2, ch = e & 3;
        i64 col = col0 + r;
        int kc = k0 + ch * Op::VEC;
        bool ok = col < C && kc < D;
        fm_cp_async16(&sm.ws[stage][r][ch * Op::VEC], ok ? (const void*)(w + col * D + kc) : (const void*)w, ok);
    }
}

template <class Op>
__device__ __forceinline__ void fm_fwd_tc(const T_IN* __restrict__ x, const T_IN* __restrict__ w,
                                          const int* __restrict__ labels, const float* __restrict__ xnorm,
                                          const float* __restrict__ wnorm, const FmParams& p, i64 B, i64 C, int D,
                                          int tiles_per_split, int nsplit, float* __restrict__ part_m,
                                          float* __restrict__ part_s, float* __restrict__ zy) {
    __shared__ __align__(16) FmTcSmem<Op> sm;
    __shared__ float red_m[4][TC_BM], red_s[4][TC_BM];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp >> 2) * 32, wn = (warp & 3) * 32, g = lane >> 2, t = lane & 3;
    const i64 row0 = (i64)blockIdx.x * TC_BM;
    const int split = blockIdx.y;
    i64 ntiles = (C + TC_BN - 1) / TC_BN, t_begin, t_end;
    fm_split_range(ntiles, split, tiles_per_split, t_begin, t_end);
    const int ksteps = (D + Op::BK - 1) / Op::BK;
    const i64 total = (t_end - t_begin) * ksteps;

    // This thread's 4 rows: q = mi * 2 + h is row wm + mi*16 + g + 8h of the block tile.
    int lab[4];
    float inv_x[4], rs[4], run_m[4], run_s[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        i64 row = row0 + wm + (q >> 1) * 16 + g + 8 * (q & 1);
        bool in = row < B;
        lab[q] = in ? labels[row] : -1;
        float n = in ? xnorm[row] : 0.0f;
        inv_x[q] = fm_inv_norm(n);
        rs[q] = fm_row_scale(p, n);
        run_m[q] = FM_NEG_INF;
        run_s[q] = 0.0f;
    }
    float acc[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int v = 0; v < 4; ++v) acc[mi][ni][v] = 0.0f;

#pragma unroll
    for (int s = 0; s < TC_STAGES - 1; ++s) {
        if (s < total) fm_tc_load<Op>(sm, s, s, ksteps, t_begin, x, w, row0, B, C, D);
        fm_cp_async_commit();   // always commit: the group count stays uniform for wait_group
    }
    for (i64 it = 0; it < total; ++it) {
        fm_cp_async_wait<TC_STAGES - 2>();
        __syncthreads();   // stage `it` is visible to all; everyone is done reading stage it-1
        i64 nxt = it + TC_STAGES - 1;
        if (nxt < total) fm_tc_load<Op>(sm, (int)(nxt % TC_STAGES), nxt, ksteps, t_begin, x, w, row0, B, C, D);
        fm_cp_async_commit();
        const int st = (int)(it % TC_STAGES);
        Op::step(acc, sm.xs[st], sm.ws[st], wm, wn, lane);
        if ((int)(it % ksteps) == ksteps - 1) {
            // Epilogue of class tile `tile`: the accumulators hold raw dot products.
            const i64 col0 = (t_begin + it / ksteps) * TC_BN;
            float inv_w[4][2];
            bool cin[4][2];
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    i64 col = col0 + wn + ni * 8 + t * 2 + j;
                    cin[ni][j] = col < C;
                    inv_w[ni][j] = cin[ni][j] ? fm_inv_norm(wnorm[col]) : 0.0f;
                }
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int mi = q >> 1, h = q & 1;
                const i64 row = row0 + wm + mi * 16 + g + 8 * h;
                float z[8];
                float mx = FM_NEG_INF;
#pragma unroll
                for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        i64 col = col0 + wn + ni * 8 + t * 2 + j;
                        float v = FM_NEG_INF;
                        if (cin[ni][j] && row < B) {
                            bool tgt = lab[q] == col;
                            FmElem e = fm_elem(p, acc[mi][ni][h * 2 + j], inv_x[q], inv_w[ni][j], rs[q], tgt);
                            v = e.z;
                            if (tgt) zy[row] = e.z;
                        }
                        z[ni * 2 + j] = v;
                        mx = fmaxf(mx, v);
                    }
                if (mx != FM_NEG_INF) {
                    float sum = 0.0f;
#pragma unroll
                    for (int e = 0; e < 8; ++e) sum += z[e] == FM_NEG_INF ? 0.0f : expf(z[e] - mx);
                    fm_online_merge(run_m[q], run_s[q], mx, sum);
                }
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                    for (int v = 0; v < 4; ++v) acc[mi][ni][v] = 0.0f;
        }
    }
    fm_cp_async_wait<0>();

    // Merge the 4 lanes of a quad (same rows, other columns), then the 4 class-warps, in order.
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
        for (int o = 1; o <= 2; o <<= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, run_m[q], o);
            float s2 = __shfl_xor_sync(0xffffffffu, run_s[q], o);
            fm_online_merge(run_m[q], run_s[q], m2, s2);
        }
    }
    if (t == 0) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            int r = wm + (q >> 1) * 16 + g + 8 * (q & 1);
            red_m[warp & 3][r] = run_m[q];
            red_s[warp & 3][r] = run_s[q];
        }
    }
    __syncthreads();
    if (tid < TC_BM) {
        i64 row = row0 + tid;
        if (row < B) {
            float m = FM_NEG_INF, s = 0.0f;
            for (int k = 0; k < 4; ++k) fm_online_merge(m, s, red_m[k][tid], red_s[k][tid]);
            part_m[row * nsplit + split] = m;
            part_s[row * nsplit + split] = s;
        }
    }
}

#if FM_DTYPE != FM_F32
extern "C" __global__ void __launch_bounds__(256)
FM_ENTRY(fm_fwd_tiles_tc)(const T_IN* x, const T_IN* w, const int* labels, const float* xnorm, const float* wnorm,
                          FmParams p, i64 B, i64 C, int D, int tiles_per_split, int nsplit, float* part_m,
                          float* part_s, float* zy) {
    fm_fwd_tc<FmTcHalf>(x, w, labels, xnorm, wnorm, p, B, C, D, tiles_per_split, nsplit, part_m, part_s, zy);
}
#else
extern "C" __global__ void __launch_bounds__(256)
FM_ENTRY(fm_fwd_tiles_tf32)(const T_IN* x, const T_IN* w, const int* labels, const float* xnorm, const float* wnorm,
                            FmParams p, i64 B, i64 C, int D, int tiles_per_split, int nsplit, float* part_m,
                            float* part_s, float* zy) {
    fm_fwd_tc<FmTcTf32>(x, w, labels, xnorm, wnorm, p, B, C, D, tiles_per_split, nsplit, part_m, part_s, zy);
}
#endif
