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

// The status record of `labels` by one block of 1024 threads (fixed reduction order: the
// fingerprint is a wrapping sum, the rest are count and min), written whole by thread 0. `prev`
// (nullable) is the forward's status, given by the backward to detect labels that are not the
// forward's (docs/MATH.md: backward takes the forward's labels). Every thread returns with
// `n` = counted rows and `poisoned` = a bad label or a mismatch, for the caller's next loop.
__device__ __forceinline__ void fm_label_scan(const int* __restrict__ labels, i64 B, i64 C,
                                              const long long* __restrict__ prev,
                                              long long* __restrict__ status, long long& n_out,
                                              bool& poisoned) {
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
    const long long n = scount[0], first = sbad[0];
    const unsigned long long f = sfp[0];
    const bool mismatch = prev && (prev[0] != n || (unsigned long long)prev[3] != f);
    if (threadIdx.x == 0) {
        status[0] = n;
        status[1] = first < B ? first : -1;
        status[2] = first < B ? (long long)labels[first] : 0;
        status[3] = (long long)f;
        status[4] = mismatch;
        status[5] = prev ? prev[0] : 0;
    }
    n_out = n;
    poisoned = first < B || mismatch;
}

// The backward's label status (LabelCheck::Device), one block of 1024 threads, and in the same
// launch the per-row upstream g_i of the gradient kernels, as spec::scalar_upstream_per_row does
// on the host: g_in[i] when given (Reduction::None), else g_scalar / counted for the mean (0 when
// no row counts) or g_scalar for the sum; 0 for ignored rows. When the status reports an
// out-of-range label or labels that are not the forward's, every counted row gets NaN, so the
// gradients cannot be mistaken for valid ones before GpuGradients::check reports the error.
// One block is enough: the row loop is B loads and stores, against the B x C x D of the backward.
extern "C" __global__ void FM_ENTRY(fm_label_status)(const int* __restrict__ labels, i64 B, i64 C,
                                                     const long long* __restrict__ prev,
                                                     long long* __restrict__ status,
                                                     const float* __restrict__ g_in, float g_scalar,
                                                     int mean, float* __restrict__ g_out) {
    long long n;
    bool poisoned;
    fm_label_scan(labels, B, C, prev, status, n, poisoned);
    float gs;
    if (mean) gs = n > 0 ? (float)((double)g_scalar / (double)n) : 0.0f;
    else gs = g_scalar;
    for (i64 i = threadIdx.x; i < B; i += blockDim.x) {
        float g = g_in ? g_in[i] : gs;
        if (poisoned) g = FM_NAN;
        g_out[i] = labels[i] >= 0 ? g : 0.0f;
    }
}

// One block of 1024 threads: loss = sum_i l_i (or its mean over counted rows; 0 when none count).
// Each thread sums a fixed strided subset in f64, then a fixed tree: the result is bit-identical
// from run to run. mean != 0 selects the mean. With `status` (LabelCheck::Device) the same launch
// writes the forward's label status (fm_label_scan), the count shared with the mean.
extern "C" __global__ void FM_ENTRY(fm_reduce_loss)(const float* __restrict__ row_loss,
                                                    const int* __restrict__ labels, i64 B, i64 C,
                                                    int mean, float* __restrict__ loss,
                                                    long long* __restrict__ status) {
    __shared__ double ssum[1024];
    __shared__ long long scount[1024];
    double acc = 0.0;
    long long cnt = 0;
    for (i64 i = threadIdx.x; i < B; i += blockDim.x) {
        acc += (double)row_loss[i];
        cnt += labels[i] >= 0;
    }
    ssum[threadIdx.x] = acc;
    scount[threadIdx.x] = cnt;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) {
            ssum[threadIdx.x] += ssum[threadIdx.x + o];
            scount[threadIdx.x] += scount[threadIdx.x + o];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        double total = ssum[0];
        long long n = scount[0];
        loss[0] = mean ? (n > 0 ? (float)(total / (double)n) : 0.0f) : (float)total;
    }
    if (status) {
        long long n;
        bool poisoned;
        fm_label_scan(labels, B, C, nullptr, status, n, poisoned);
    }
}
