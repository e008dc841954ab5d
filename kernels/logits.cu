// fused-margin: the forward logits tiles with margin injection and online softmax statistics
// (docs/MATH.md steps 2-5; docs/ARCHITECTURE.md "Fused data flow"). Nothing of size B x C is written.
//
// Grid (ceil(B / FM_BM), nsplit): block (rt, split) walks the class tiles of its split, keeps a
// running (max, sum-exp) per row in registers, and writes one partial pair per (row, split).
// The block whose tile holds a row's label also writes that row's target logit z_iy.
// Sub-center ArcFace (p.centers = K > 1): each class tile is K dot tiles, one per sub-center, and
// the epilogue runs on their maximum (fm_subcenter_max); w has C K rows, its norms C K entries.
#include "tile.cuh"

template <bool SC>
__device__ __forceinline__ void fm_fwd_tiles_body(const FmTileArgs& args) {
    FM_TILE_UNPACK
    __shared__ FmTileSmem sm;
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int split = blockIdx.y;
    const i64 row0 = (i64)blockIdx.x * FM_BM;
    i64 ntiles = (C + FM_BN - 1) / FM_BN, t_begin, t_end;
    fm_split_range(ntiles, split, tiles_per_split, t_begin, t_end);

    i64 rows[2] = {row0 + ty, row0 + ty + 16};
    FmRow R[2];
    float run_m[2], run_s[2];
    for (int a = 0; a < 2; ++a) {
        R[a] = fm_row_ctx(p, rows[a], B, labels, xnorm, tgt);
        run_m[a] = FM_NEG_INF;
        run_s[a] = 0.0f;
    }
    const int K = SC ? p.centers : 1;   // the *_sc entry: sub-centers; else the constant 1
    for (i64 t = t_begin; t < t_end; ++t) {
        const i64 col0 = t * FM_BN;
        // The class cosines: with sub-centers the largest of the K tiles of rows jK + k of w.
        float cs[2][2];
        int win[2][2];
        for (int k = 0; k < K; ++k) {
            float acc[2][2];
            fm_dot_tile(x, w + (i64)k * D, row0, col0, B, C, D, (i64)K * D, sm, acc, false, widx);
            for (int a = 0; a < 2; ++a)
                for (int b = 0; b < 2; ++b) {
                    const i64 col = col0 + tx + 16 * b;
                    const float inv_w = col < C ? fm_inv_norm(wnorm[col * K + k]) : 0.0f;
                    fm_subcenter_max(cs[a][b], win[a][b], fm_cos(p, R[a], acc[a][b], inv_w), k);
                }
        }
        for (int a = 0; a < 2; ++a) {
            float z[2];
            for (int b = 0; b < 2; ++b) {
                i64 col = col0 + tx + 16 * b;
                if (col < C && rows[a] < B) {
                    bool tgt = R[a].label == col;
                    FmElem e = fm_elem_c(p, R[a], cs[a][b], tgt);
                    z[b] = tgt ? FM_NEG_INF : e.z;   // the target to zy only (fm_combine_rows)
                    if (tgt) zy[rows[a]] = e.z;
                } else {
                    z[b] = FM_NEG_INF;
                }
            }
            float tm = fm_half_max(fmaxf(z[0], z[1]));
            // Masked elements (-inf) add 0; no branch around the shuffle (all 32 lanes take part).
            float e0 = z[0] == FM_NEG_INF ? 0.0f : expf(z[0] - tm);
            float e1 = z[1] == FM_NEG_INF ? 0.0f : expf(z[1] - tm);
            float ts = fm_half_sum(e0 + e1);
            fm_online_merge(run_m[a], run_s[a], tm, ts);
        }
    }
    if (tx == 0) {
        for (int a = 0; a < 2; ++a) {
            if (rows[a] < B) {
                part_m[rows[a] * nsplit + split] = run_m[a];
                part_s[rows[a] * nsplit + split] = run_s[a];
            }
        }
    }
}

// Four blocks per SM: ptxas otherwise takes 100 registers (two blocks) since the margin maths
// left the tile loop; at 64 f32 does not spill and f16/bf16 spill 4 bytes (scripts/ptxas-report).
extern "C" __global__ void __launch_bounds__(FM_THREADS, 4)
FM_ENTRY(fm_fwd_tiles)(const FmTileArgs args) { fm_fwd_tiles_body<false>(args); }
// Sub-center ArcFace.
extern "C" __global__ void __launch_bounds__(FM_THREADS, 4)
FM_ENTRY(fm_fwd_tiles_sc)(const FmTileArgs args) { fm_fwd_tiles_body<true>(args); }
