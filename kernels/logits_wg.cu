// fused-margin: the forward logits tiles on Hopper's warpgroup tensor-core instruction (wgmma,
// sm_90a), the same contract as fm_fwd_tiles_tc in logits_tc.cu (docs/MATH.md steps 2-5): per (row,
// class split) online softmax statistics and the target logit z_iy; nothing of size B x C is
// written. f16 / bf16 inputs only; built where FM_HAS_WGMMA (kernels/ptx.cuh) is defined.
//
// Why: mma.sync reads its operands from registers that every warp must first load with ldmatrix,
// and on Hopper it runs at a fraction of the tensor cores' rate. wgmma reads both operands straight
// from shared memory (a 64 x 128 x 16 product per instruction and warpgroup) and runs
// asynchronously, so the only per-k work of the threads is the copies.
//
// Block: 256 threads = 2 warpgroups; block tile 128 rows x 128 classes, warpgroup wg owns rows
// 64 wg .. 64 wg + 63 and all 128 classes (64 f32 accumulators per thread). x and w tiles of 64
// columns of D (128 bytes per row: one row of the 128-byte swizzle) stream through a 5-stage
// cp.async pipeline, written in the swizzled K-major layout the descriptors describe
// (kernels/ptx.cuh); each stage is 32 KB and starts on a 1024-byte boundary. Per stage each
// warpgroup issues 4 wgmma (k = 0, 16, 32, 48) and commits them as one group; one group stays in
// flight while the threads pass the next barrier and issue the next copies (wait_group 1), and
// the copies run 3 stages ahead, so a stage is refilled only after the group that read it has
// completed. Before the epilogue of a class tile every group is waited for (wait_group 0). The
// (class tile, k step) iterations of a split form one sequence, as in logits_tc.cu. The epilogue is the mma.sync kernels'
// (tile.cuh: fm_tc_row_epilogue): wgmma's accumulator layout is mma's C fragment per n8 block.
// Each row lives in one warp, so the per-split merge needs only the quad's shuffles.
//
// Requires D % 8 == 0 and 16-byte aligned x and w (checked on the host, as for logits_tc.cu).
#include "tile.cuh"

#if defined(FM_HAS_WGMMA) && FM_DTYPE != FM_F32

#define WG_BM FM_G_WG_BM
#define WG_BN FM_G_WG_BN
#define WG_BK 64          // halves per row and k step: 128 bytes
#define WG_STAGES 5
#define WG_TILE_BYTES (128 * 128)                      // 128 rows x 128 bytes, x or w
#define WG_STAGE_BYTES (2 * WG_TILE_BYTES)             // x tile, then w tile
// Dynamic shared memory: the stages, plus up to 1008 bytes to move their start to a 1024-byte
// boundary (the swizzle pattern is defined on address bits 4-9). geometry.cuh: FM_G_WG_SMEM.
#define WG_SMEM_BYTES (WG_STAGES * WG_STAGE_BYTES + 1024)
static_assert(WG_SMEM_BYTES == FM_G_WG_SMEM, "geometry.cuh: FM_G_WG_SMEM");
// Copies run WG_AHEAD stages ahead: the stage they refill was read by the group before last, which
// wait_group 1 has retired (the last group may still be reading its own stage).
#define WG_AHEAD (WG_STAGES - 2)

// Copies the x and w chunks of pipeline iteration `it` (class tile t_begin + it / ksteps, columns
// k0 .. k0 + 64 of D) into the stage at shared address `stage`: 256 rows of eight 16-byte chunks,
// chunk c of row r at r * 128 + ((c ^ (r % 8)) * 16) (the 128-byte swizzle). Zero-filled past the
// edges.
// With sub-centers the iterations are (class tile, sub-center, k step): class col's row of w is
// col K + sub (K = 1, a constant, but for sub-centers).
__device__ __forceinline__ void fm_wg_load(unsigned char* stage, i64 it, int ksteps, i64 t_begin,
                                           const T_IN* __restrict__ x, const T_IN* __restrict__ w, i64 row0,
                                           i64 B, i64 C, int D, int K, const int* widx) {
    const i64 kt = it / ksteps;
    const i64 col0 = (t_begin + kt / K) * WG_BN;
    const int sub = (int)(kt % K);
    const int k0 = (int)(it % ksteps) * WG_BK;
#pragma unroll
    for (int q = 0; q < (WG_BM + WG_BN) * 8 / 256; ++q) {
        const int e = threadIdx.x + q * 256, r = e >> 3, ch = e & 7, kc = k0 + ch * 8;
        unsigned char* dst = stage + r * 128 + ((ch ^ (r & 7)) << 4);   // r >= WG_BM: the w tile
        if (r < WG_BM) {
            const i64 row = row0 + r;
            const bool ok = row < B && kc < D;   // D % 8 == 0: a chunk is wholly inside or outside
            fm_cp_async16(dst, ok ? (const void*)(x + row * D + kc) : (const void*)x, ok);
        } else {
            const i64 col = col0 + (r - WG_BM);
            const bool ok = col < C && kc < D;
            fm_cp_async16(dst, ok ? (const void*)(w + (fm_wrow(widx, col) * K + sub) * D + kc) : (const void*)w, ok);
        }
    }
}

// SC: sub-centers (p.centers = K rows of w per class): K passes per class tile, their cosines
// merged into `best` (64 more registers, so a separate instantiation), the epilogue on best.
template <bool SC>
__device__ __forceinline__ void fm_fwd_wg(const FmTileArgs& args) {
    FM_TILE_UNPACK
    FM_DYNAMIC_SMEM(wg_smem);   // WG_SMEM_BYTES, set by the host
    unsigned char* smem = wg_smem + ((1024u - (fm_smem_addr(wg_smem) & 1023u)) & 1023u);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
    const int g = lane >> 2, t = lane & 3;
    const int wrow = wg * 64 + (warp & 3) * 16;   // the warp's first row in the block tile
    const i64 row0 = (i64)blockIdx.x * WG_BM;
    const int split = blockIdx.y;
    i64 ntiles = (C + WG_BN - 1) / WG_BN, t_begin, t_end;
    fm_split_range(ntiles, split, tiles_per_split, t_begin, t_end);
    const int ksteps = (D + WG_BK - 1) / WG_BK;
    const int K = SC ? p.centers : 1;
    const i64 total = t_end > t_begin ? (t_end - t_begin) * K * ksteps : 0;

    // This thread's 2 rows: h = 0, 1 is row wrow + g + 8h of the block tile.
    FmRow R[2];
    float run_m[2], run_s[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        R[h] = fm_row_ctx(p, row0 + wrow + g + 8 * h, B, labels, xnorm, tgt);
        run_m[h] = FM_NEG_INF;
        run_s[h] = 0.0f;
    }
    float acc[1][16][4];   // [the warp's m16 block][n8 block][C-fragment element]
    float best[SC ? 16 : 1][4];   // sub-centers: the class maxima so far

#pragma unroll
    for (int s = 0; s < WG_AHEAD; ++s) {
        if (s < total) fm_wg_load(smem + s * WG_STAGE_BYTES, s, ksteps, t_begin, x, w, row0, B, C, D, K, widx);
        fm_cp_async_commit();   // always commit: the group count stays uniform for wait_group
    }
    // Class tiles outer (then sub-centers), k steps inner: the inner loop keeps one wgmma group in flight
    // (wait_group 1) and only the tile's end waits for all (wait_group 0). Written as one flat loop
    // with a per-iteration choice of wait, ptxas injected a full wait into every iteration (info
    // C7517) to reach the accumulators the epilogue branch uses.
    i64 it = 0;   // the pipeline iteration: ((tile - t_begin) * K + sub) * ksteps + ks
    for (i64 tile = t_begin; tile < t_end; ++tile) {
        for (int sub = 0; sub < K; ++sub) {
            for (int ks = 0; ks < ksteps; ++ks, ++it) {
                // WG_AHEAD + it copy groups are committed; the oldest it + 1 (this stage's) have landed.
                fm_cp_async_wait<WG_AHEAD - 1>();
                fm_fence_proxy_async();   // this thread's copies of stage `it`, before wgmma reads them
                __syncthreads();          // everyone's copies landed; both warpgroups retired group it-2
                const i64 nxt = it + WG_AHEAD;   // refills the stage of it-2
                if (nxt < total)
                    fm_wg_load(smem + (int)(nxt % WG_STAGES) * WG_STAGE_BYTES, nxt, ksteps, t_begin, x, w, row0, B, C,
                               D, K, widx);
                fm_cp_async_commit();

                const unsigned st = fm_smem_addr(smem + (int)(it % WG_STAGES) * WG_STAGE_BYTES);
                const unsigned xa = st + wg * 64 * 128, wa = st + WG_TILE_BYTES;
                fm_wgmma_acc_fence(&acc[0][0][0]);
                fm_wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < WG_BK / 16; ++kk)   // scale-d 0 first: a new tile drops the old sums
                    fm_wgmma_m64n128k16<FM_DTYPE == FM_BF16>(&acc[0][0][0], fm_wgmma_desc_sw128(xa + kk * 32),
                                                             fm_wgmma_desc_sw128(wa + kk * 32),
                                                             ks == 0 && kk == 0 ? 0 : 1);
                fm_wgmma_commit();
                fm_wgmma_wait<1>();   // group it-1 is done: its stage may be refilled after the barrier
                fm_wgmma_acc_fence(&acc[0][0][0]);
            }
            fm_wgmma_wait<0>();
            fm_wgmma_acc_fence(&acc[0][0][0]);

            // Epilogue of the class tile: the accumulators hold raw dot products.
            const i64 col0 = tile * WG_BN;
            float inv_w[16][2];
            bool cin[16][2];
            if constexpr (SC) {
                // Sub-center `sub`: its cosines into best; the epilogue after the last, on best.
                fm_tc_col_factors<16>(wnorm, C, col0 + 2 * t, inv_w, cin, K, sub);
                fm_tc_subcenter_merge<16>(p, acc[0], best, inv_w, R[0], R[1], sub);
                if (sub == K - 1) {
#pragma unroll
                    for (int ni = 0; ni < 16; ++ni) inv_w[ni][0] = inv_w[ni][1] = 1.0f;
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        fm_tc_row_epilogue<16>(p, best, h, row0 + wrow + g + 8 * h, B, col0 + 2 * t, cin, inv_w,
                                               fm_tc_unit_row(R[h]), zy, run_m[h], run_s[h]);
                }
            } else {
                fm_tc_col_factors<16>(wnorm, C, col0 + 2 * t, inv_w, cin);
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    fm_tc_row_epilogue<16>(p, acc[0], h, row0 + wrow + g + 8 * h, B, col0 + 2 * t, cin, inv_w, R[h],
                                           zy, run_m[h], run_s[h]);
            }
        }
    }
    fm_cp_async_wait<0>();

    // Merge the 4 lanes of a quad (same rows, other columns); one warp holds each row.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int o = 1; o <= 2; o <<= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, run_m[h], o);
            const float s2 = __shfl_xor_sync(0xffffffffu, run_s[h], o);
            fm_online_merge(run_m[h], run_s[h], m2, s2);
        }
        const i64 row = row0 + wrow + g + 8 * h;
        if (t == 0 && row < B) {
            part_m[row * nsplit + split] = run_m[h];
            part_s[row * nsplit + split] = run_s[h];
        }
    }
}

extern "C" __global__ void __launch_bounds__(256, 1)
FM_ENTRY(fm_fwd_tiles_wg)(const FmTileArgs args) { fm_fwd_wg<false>(args); }
// Sub-center ArcFace.
extern "C" __global__ void __launch_bounds__(256, 1)
FM_ENTRY(fm_fwd_tiles_wg_sc)(const FmTileArgs args) { fm_fwd_wg<true>(args); }

#endif  // FM_HAS_WGMMA && FM_DTYPE != FM_F32
