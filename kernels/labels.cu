// fused-margin: the label check on the device (LabelCheck::Device; src/cuda/plan.rs launches it), so a call
// needs no synchronous copy of the labels to the host. The host reads the status only when the
// caller reads a result (GpuForward::check, loss_host, GpuGradients::check).
#include "common.cuh"

// The status record, 6 x i64; src/cuda/labels.rs reads the same layout.
//   [0] counted rows (label >= 0)
//   [1] the first row whose label is >= C, or -1 when every label is in range
//   [2] that row's label (0 when none)
//   [3] the order-sensitive fingerprint of the labels (bits of a u64)
//   [4] 1 when `prev` was given and its counted or fingerprint differ from these labels'
//   [5] prev's counted (0 without prev)
#define FM_STATUS_LEN FM_G_STATUS_LEN

// A 64-bit mix of (row, label) (splitmix64's finalizer). The fingerprint is the wrapping sum of
// the mixes over rows: order-sensitive because the row is mixed in, and a sum, so the parallel
// reduction gives the same bits in any order.
__device__ __forceinline__ unsigned long long fm_label_mix(i64 row, int label) {
    unsigned long long z = ((unsigned long long)row << 32) ^ (unsigned long long)(unsigned)label;
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// One block of 1024 threads over the B labels. `prev` (nullable) is the forward's status, given by
// the backward to detect labels that are not the forward's (docs/MATH.md: backward takes the forward's
// labels).
extern "C" __global__ void FM_ENTRY(fm_label_status)(const int* __restrict__ labels, i64 B, i64 C,
                                                     const long long* __restrict__ prev,
                                                     long long* __restrict__ status) {
    __shared__ long long scount[1024];
    __shared__ long long sbad[1024];
    __shared__ unsigned long long sfp[1024];
    long long cnt = 0, bad = B;  // B: none found
    unsigned long long fp = 0;
    for (i64 i = threadIdx.x; i < B; i += blockDim.x) {
        int y = labels[i];
        cnt += y >= 0;
        if (y >= 0 && (i64)y >= C && i < bad) bad = i;
        fp += fm_label_mix(i, y);
    }
    scount[threadIdx.x] = cnt;
    sbad[threadIdx.x] = bad;
    sfp[threadIdx.x] = fp;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) {
            scount[threadIdx.x] += scount[threadIdx.x + o];
            const long long other = sbad[threadIdx.x + o];
            if (other < sbad[threadIdx.x]) sbad[threadIdx.x] = other;
            sfp[threadIdx.x] += sfp[threadIdx.x + o];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        const long long n = scount[0], first = sbad[0];
        const unsigned long long f = sfp[0];
        status[0] = n;
        status[1] = first < B ? first : -1;
        status[2] = first < B ? (long long)labels[first] : 0;
        status[3] = (long long)f;
        status[4] = prev ? (prev[0] != n || (unsigned long long)prev[3] != f) : 0;
        status[5] = prev ? prev[0] : 0;
    }
}

// One thread per row: the per-row upstream g_i of the backward from the device status, as
// spec::scalar_upstream_per_row does on the host: g_in[i] when given (Reduction::None), else
// g_scalar / counted for the mean (0 when no row counts) or g_scalar for the sum; 0 for ignored
// rows. When the status reports an out-of-range label or labels that are not the forward's, every
// counted row gets NaN, so the gradients cannot be mistaken for valid ones before
// GpuGradients::check reports the error.
extern "C" __global__ void FM_ENTRY(fm_upstream_rows)(const int* __restrict__ labels, i64 B,
                                                      const long long* __restrict__ status,
                                                      const float* __restrict__ g_in, float g_scalar,
                                                      int mean, float* __restrict__ g_out) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B) return;
    const long long n = status[0];
    const bool poisoned = status[1] >= 0 || status[4] != 0;
    float g;
    if (g_in) g = g_in[i];
    else if (mean) g = n > 0 ? (float)((double)g_scalar / (double)n) : 0.0f;
    else g = g_scalar;
    if (poisoned) g = FM_NAN;
    g_out[i] = labels[i] >= 0 ? g : 0.0f;
}
