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
extern "C" __global__ void FM_ENTRY(fm_combine_rows)(const float* __restrict__ part_m,
                                                     const float* __restrict__ part_s, int nsplit,
                                                     const float* __restrict__ zy,
                                                     const int* __restrict__ labels, i64 B, i64 C,
                                                     float* __restrict__ lse, float* __restrict__ row_loss,
                                                     float* __restrict__ tgt) {
    i64 row = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= B) return;
    const float* pm = part_m + row * nsplit;
    const float* ps = part_s + row * nsplit;
    float m = FM_NEG_INF, s = 0.0f;
    for (int k = 0; k < nsplit; ++k) fm_online_merge(m, s, pm[k], ps[k]);
    const float lnt = m + logf(s);   // -inf when no other class has a finite logit (C = 1)
    const int y = labels[row];
    float l = 0.0f, ls = lnt;
    if (y >= 0 && (i64)y >= C) {
        l = FM_NAN;
    } else if (y >= 0) {
        const float z = zy[row];
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
    lse[row] = ls;
    // MagFace's regularizer joins the row loss (0 for the other losses and ignored rows); the
    // backward's target entry reads the cross-entropy alone.
    row_loss[row] = l + tgt[fm_tgt_at(FM_TGT_REG, B, row)];
    tgt[fm_tgt_at(FM_TGT_CE, B, row)] = l;
}

// fm_reduce_loss is in labels.cu: it also writes the forward's label status (one block over the
// labels either way).
