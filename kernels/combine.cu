// fused-margin: the combine of per-split softmax statistics into logsumexp and loss
// (docs/MATH.md step 6; docs/ARCHITECTURE.md "Fused data flow"). Fixed summation orders: deterministic.
#include "common.cuh"

// One thread per row. The tiles leave the target logit out of their (max, sum-exp) pairs, so the
// splits combine, in order, to the logsumexp over the other classes, lnt; then
//   l_i = softplus(lnt - z_iy) = log(1 + exp(lnt - z_iy)),   lse_i = z_iy + l_i,
// free of the cancellation in lse_i - z_iy: a well-classified row (l_i ~ 1e-6 beside lse_i ~ 60)
// keeps l_i to f32's relative precision instead of to ~1e-5 absolute, and so does the backward's
// target entry p_iy - 1 = expm1(-l_i) (tile.cuh: fm_grad_elem), which reads l_i in the target
// record's CE section. A non-finite z_iy or lnt takes the plain route (lse over
// every class, l = lse - z), so NaN and Inf propagate as on the reference. Ignored rows: lse_i =
// lnt, l_i = 0. A label >= C (possible only under LabelCheck::Device, which checks on the device
// instead of before the launch) gives NaN: no tile wrote its z_iy.
// A counted row's loss l and logsumexp ls from the online logsumexp (m, s) over its other
// classes and its target logit z (the split combine's last step, shared by fm_combine_rows and
// fm_shard_combine).
// Row `row`'s nsplit (max, sum-exp) partials of the tiles merged in split order: the
// logsumexp pair over its other classes (this call's).
__device__ __forceinline__ void fm_merge_splits(const float* __restrict__ part_m,
                                                const float* __restrict__ part_s, int nsplit, i64 row,
                                                float& m, float& s) {
    m = FM_NEG_INF;
    s = 0.0f;
    for (int k = 0; k < nsplit; ++k) fm_online_merge(m, s, part_m[row * nsplit + k], part_s[row * nsplit + k]);
}

__device__ __forceinline__ void fm_finish_row(float m, float s, float z, float& l, float& ls) {
    const float lnt = m + logf(s);   // -inf when no other class has a finite logit (C = 1)
    if (fm_finite(z) && lnt == lnt && lnt != FM_POS_INF) {
        const float d = lnt - z;   // finite or -inf
        const float t = log1pf(expf(-fabsf(d)));
        // lse from the larger of the two: within rounding of max(lnt, z_iy) at any size.
        l = d > 0.0f ? d + t : t;
        ls = (d > 0.0f ? lnt : z) + t;
    } else {
        fm_online_merge(m, s, z, 1.0f);
        ls = m + logf(s);
        l = ls - z;
    }
}

extern "C" __global__ void FM_ENTRY(fm_combine_rows)(const float* __restrict__ part_m,
                                                     const float* __restrict__ part_s, int nsplit,
                                                     const float* __restrict__ zy,
                                                     const int* __restrict__ labels, i64 B, i64 C,
                                                     float* __restrict__ lse, float* __restrict__ row_loss,
                                                     float* __restrict__ tgt) {
    i64 row = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= B) return;
    float m, s;
    fm_merge_splits(part_m, part_s, nsplit, row, m, s);
    const int y = labels[row];
    float l = 0.0f, ls = m + logf(s);
    if (y >= 0 && (i64)y >= C) {
        l = FM_NAN;
    } else if (y >= 0) {
        fm_finish_row(m, s, zy[row], l, ls);
    }
    lse[row] = ls;
    // MagFace's regularizer joins the row loss (0 for the other losses and ignored rows); the
    // backward's target entry reads the cross-entropy alone.
    row_loss[row] = l + tgt[fm_tgt_at(FM_TGT_REG, B, row)];
    tgt[fm_tgt_at(FM_TGT_CE, B, row)] = l;
}

// Class-sharded forward (src/shard.rs), the rank's half of the combine: per row its classes'
// online (max, sum-exp) over the non-target classes (the splits merged in order), and, where the
// row's target is one of its classes (0 <= y < C, C this rank's classes; another rank's target
// has y = C, see shard::column_labels), the target logit and MagFace's regularizer. One record of
// FM_SHARD_REC floats per row: (m, s, z, reg, owned); the host all-gathers the records of every
// rank (plan::Step::Exchange). One thread per row.
extern "C" __global__ void FM_ENTRY(fm_shard_stats)(const float* __restrict__ part_m,
                                                    const float* __restrict__ part_s, int nsplit,
                                                    const float* __restrict__ zy,
                                                    const int* __restrict__ labels,
                                                    const float* __restrict__ tgt, i64 B, i64 C,
                                                    float* __restrict__ rec) {
    i64 row = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= B) return;
    float m, s;
    fm_merge_splits(part_m, part_s, nsplit, row, m, s);
    const int y = labels[row];
    const bool owned = y >= 0 && (i64)y < C;
    float* r = rec + FM_SHARD_REC * row;
    r[0] = m;
    r[1] = s;
    r[2] = owned ? zy[row] : 0.0f;
    r[3] = owned ? tgt[fm_tgt_at(FM_TGT_REG, B, row)] : 0.0f;
    r[4] = owned ? 1.0f : 0.0f;
}

// The other half, on every rank: the `world` ranks' records (rank-major, as gathered) merged in
// rank order, so every rank computes the same bits; the target logit and regularizer from the
// rank that owns the row's target. Counted rows (y >= 0: a local label, or C for another rank's
// class) get l_i, lse_i, the row loss with MagFace's regularizer, and the target record's CE
// section (read by the backward); ignored rows lse_i over the plain logits and l_i = 0. A counted
// row that no rank, or several, own (shards that do not tile the classes, which the host's
// agreement step rules out) gets NaN.
extern "C" __global__ void FM_ENTRY(fm_shard_combine)(const float* __restrict__ rec_all, int world,
                                                      const int* __restrict__ labels, i64 B,
                                                      float* __restrict__ lse, float* __restrict__ row_loss,
                                                      float* __restrict__ tgt) {
    i64 row = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= B) return;
    float m = FM_NEG_INF, s = 0.0f, z = 0.0f, reg = 0.0f;
    int owners = 0;
    for (int r = 0; r < world; ++r) {
        const float* q = rec_all + ((i64)r * B + row) * FM_SHARD_REC;
        fm_online_merge(m, s, q[0], q[1]);
        if (q[4] != 0.0f) {
            z = q[2];
            reg = q[3];
            ++owners;
        }
    }
    float l = 0.0f, ls = m + logf(s);
    if (labels[row] >= 0) {
        if (owners == 1) {
            fm_finish_row(m, s, z, l, ls);
        } else {
            l = ls = FM_NAN;
        }
    }
    lse[row] = ls;
    row_loss[row] = l + reg;
    tgt[fm_tgt_at(FM_TGT_CE, B, row)] = l;
}

// Class-sharded CurricularFace and ElasticFace+ (plan::shard_forward), whose state reads every
// counted row's target cosine: each rank's (c_iy, owned) per row from its target record (the
// COSY section, fm_target_rows), all-gathered (plan::Step::Exchange), then every rank writes
// the owner's cosine into the COSY section of the rows whose target another rank holds (y = C)
// and, for CurricularFace, their threshold tau_i = target(c_iy) (the TAU section), so the state
// kernels and the tiles see every row's values. One thread per row.
extern "C" __global__ void FM_ENTRY(fm_shard_cos_out)(const int* __restrict__ labels,
                                                      const float* __restrict__ tgt, i64 B, i64 C,
                                                      float* __restrict__ rec) {
    i64 row = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= B) return;
    const int y = labels[row];
    const bool owned = y >= 0 && (i64)y < C;
    rec[2 * row] = owned ? tgt[fm_tgt_at(FM_TGT_COSY, B, row)] : 0.0f;
    rec[2 * row + 1] = owned ? 1.0f : 0.0f;
}

extern "C" __global__ void FM_ENTRY(fm_shard_cos_in)(const float* __restrict__ rec_all, int world,
                                                     const int* __restrict__ labels, FmParams p, i64 B,
                                                     i64 C, float* __restrict__ tgt) {
    i64 row = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= B) return;
    if (labels[row] < 0 || (i64)labels[row] < C) return;   // ignored, or this rank's own target
    float c = FM_NAN;   // no owner (shards that do not tile the classes): NaN, as in combine
    for (int r = 0; r < world; ++r) {
        const float* q = rec_all + ((i64)r * B + row) * 2;
        if (q[1] != 0.0f) c = q[0];
    }
    tgt[fm_tgt_at(FM_TGT_COSY, B, row)] = c;
    if (p.variant == FM_VAR_CURRICULAR) tgt[fm_tgt_at(FM_TGT_TAU, B, row)] = fm_curricular_tau(p, c);
}

// Partial FC's dw in the rank's full layout (plan::full_dw): class r's `per` = K D values from
// row inv[r] of the sampled rows' dw, or zeros where inv[r] < 0 (not sampled). Writes dst whole.
// One thread per element.
extern "C" __global__ void FM_ENTRY(fm_gather_rows)(const float* __restrict__ src, const int* __restrict__ inv,
                                                    i64 n, int per, float* __restrict__ dst) {
    i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n * per) return;
    const int j = inv[e / per];
    dst[e] = j >= 0 ? src[(i64)j * per + e % per] : 0.0f;
}

// fm_reduce_loss is in labels.cu: it also writes the forward's label status (one block over the
// labels either way).
