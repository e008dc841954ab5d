// fused-margin: the combine of per-split softmax statistics into logsumexp and loss
// (docs/MATH.md step 6; docs/ARCHITECTURE.md "Fused data flow"). Fixed summation orders: deterministic.
#include "common.cuh"

// One thread per row: lse_i = M + log(sum_s part_s * exp(part_m - M)) over the splits in order;
// l_i = lse_i - z_iy for counted rows, 0 for ignored ones. A label >= C (possible only under
// LabelCheck::Device, which checks on the device instead of before the launch) gives NaN: no tile
// wrote its z_iy.
extern "C" __global__ void FM_ENTRY(fm_combine_rows)(const float* __restrict__ part_m,
                                                     const float* __restrict__ part_s, int nsplit,
                                                     const float* __restrict__ zy,
                                                     const int* __restrict__ labels, i64 B, i64 C,
                                                     float* __restrict__ lse, float* __restrict__ row_loss) {
    i64 row = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= B) return;
    const float* pm = part_m + row * nsplit;
    const float* ps = part_s + row * nsplit;
    float m = FM_NEG_INF, s = 0.0f;
    for (int k = 0; k < nsplit; ++k) fm_online_merge(m, s, pm[k], ps[k]);
    float l = m + logf(s);
    lse[row] = l;
    const int y = labels[row];
    row_loss[row] = y < 0 ? 0.0f : ((i64)y < C ? l - zy[row] : FM_NAN);
}

// fm_reduce_loss is in labels.cu: it also writes the forward's label status (one block over the
// labels either way).
