// fused-margin: what every kernel shares. Dtype load/store, warp reductions, the loss options, and
// the margin maths (psi, dpsi): the one GPU copy of docs/MATH.md, twin of src/math.rs.
//
// No CUDA headers are included (NVRTC sees no files at run time): f16 and bf16 are carried as raw
// 16-bit patterns and converted with PTX `cvt` (ptx.cuh), exactly (widening) or round-to-nearest-even.
#ifndef FM_COMMON_CUH
#define FM_COMMON_CUH

#include "ptx.cuh"
#include "geometry.cuh"

// The compile unit this translation unit holds (geometry.cuh, FM_G_UNIT_*); 0: all of them.
#ifndef FM_UNIT
#define FM_UNIT 0
#endif
#define FM_IN_UNIT(u) (FM_UNIT == 0 || FM_UNIT == (u))

typedef long long i64;

// ---- element types ----------------------------------------------------------------------------
struct fm_f16 { unsigned short bits; };
struct fm_bf16 { unsigned short bits; };

__device__ __forceinline__ float fm_to_f32(float v) { return v; }
__device__ __forceinline__ float fm_to_f32(fm_f16 v) { return fm_f16_bits_to_f32(v.bits); }
__device__ __forceinline__ float fm_to_f32(fm_bf16 v) {
    return __uint_as_float(((unsigned)v.bits) << 16);   // bf16 is the top half of an f32
}

template <typename T> __device__ __forceinline__ T fm_from_f32(float v);
template <> __device__ __forceinline__ float fm_from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ fm_f16 fm_from_f32<fm_f16>(float v) {
    fm_f16 h;
    h.bits = fm_f32_to_f16_bits(v);
    return h;
}
template <> __device__ __forceinline__ fm_bf16 fm_from_f32<fm_bf16>(float v) {
    fm_bf16 h;
    h.bits = fm_f32_to_bf16_bits(v);
    return h;
}

// The translation unit is compiled once per input dtype: FM_DTYPE selects T_IN and the suffix of
// every entry point (`_f32`, `_f16`, `_bf16`).
#define FM_F32 0
#define FM_F16 1
#define FM_BF16 2
#ifndef FM_DTYPE
#define FM_DTYPE FM_F32
#endif
#if FM_DTYPE == FM_F32
typedef float T_IN;
#define FM_ENTRY(name) name##_f32
#elif FM_DTYPE == FM_F16
typedef fm_f16 T_IN;
#define FM_ENTRY(name) name##_f16
#elif FM_DTYPE == FM_BF16
typedef fm_bf16 T_IN;
#define FM_ENTRY(name) name##_bf16
#else
#error "FM_DTYPE must be FM_F32, FM_F16 or FM_BF16"
#endif
// Gradients in f32 regardless of the input dtype (the "f32 gradients" option).
#define FM_ENTRY_F32OUT(name) FM_ENTRY(name##_f32out)

// ---- constants --------------------------------------------------------------------------------
#define FM_NORM_EPS 1e-12f     // docs/MATH.md step 1: x / max(|x|, eps)
#define FM_THETA_CLAMP 1e-7    // docs/MATH.md step 4: acos(clamp(c, -1 + d, 1 - d))
#define FM_PI 3.14159265358979323846
#define FM_NEG_INF __int_as_float(0xff800000)
#define FM_POS_INF __int_as_float(0x7f800000)
#define FM_NAN __int_as_float(0x7fffffff)

// ---- the loss options, passed by value to every kernel (layout = src/cuda/params.rs) -----------
// Everything is a run-time value: only the B target elements ever read the margin options, so
// specializing them at compile time would buy nothing and multiply NVRTC compiles.
#define FM_POLICY_MONOTONIC FM_G_POLICY_MONOTONIC
#define FM_POLICY_FALLBACK FM_G_POLICY_FALLBACK
#define FM_POLICY_RAW FM_G_POLICY_RAW
#define FM_POLICY_EASY FM_G_POLICY_EASY
struct FmParams {
    float s;                  // scale
    float m1, m2, m3;         // cos(m1*theta + m2) - m3
    float lambda;             // SphereFace blend, 0 = none
    float fallback_shift;     // m2 * sin(m2), precomputed on the host in f64
    int policy;               // FM_POLICY_*
    int detached;             // 1: dtarget/dc = 1
    int angular;              // m1 != 1 || m2 != 0
    int normalize_features;   // 0: r_i = s*|x_i|
    int normalize_weights;    // 0: wh_j = w_j
    int tf32_dots;            // 1: the SIMT backward rounds its dot-product operands to TF32, to
                              // recompute the logits the TF32 forward (fm_fwd_tiles_tf32) saw
};
static_assert(sizeof(FmParams) == 48, "src/cuda/params.rs: FmParams is 48 bytes");

// ---- the margin: target(c) and dtarget/dc (docs/MATH.md step 4 and "Backward") --------------------
// Evaluated in double: it runs once per row (at the label), so the cost is nil and the result
// tracks the f64 reference even near the clamp, where acosf would lose digits.
struct FmTarget { double value; double deriv; };

// ---- the per-row slot: the margins and scale of one row ---------------------------------------
// For the fixed-margin family they are the spec's, the same for every row. Margins the caller
// gives per row (ElasticFace's) come through fm_row_margin_given below, where the target is
// formed; the tiles take only the scale from fm_row_margin (through fm_row_ctx in tile.cuh). The
// CPU twin is math::RowMargin.
struct FmMargin { float m1, m2, m3, s, fallback_shift; };

__device__ __forceinline__ FmMargin fm_row_margin(const FmParams& p, i64 row, float norm) {
    (void)row;
    (void)norm;
    FmMargin m;
    m.m1 = p.m1;
    m.m2 = p.m2;
    m.m3 = p.m3;
    m.s = p.s;
    m.fallback_shift = p.fallback_shift;   // m2 sin m2, taken in f64 on the host
    return m;
}

// The same with the caller's per-row margins, where given: rowm holds (m2_i, m3_i) per row
// (ElasticFace's drawn margins, docs/MATH.md "Losses with per-row or batch state"); null keeps
// the spec's. Read only where the target is formed (fm_target_rows, naive_logits), never per
// element of a tile. The Fallback shift m2_i sin m2_i is taken in double here, as the host
// takes the spec's.
__device__ __forceinline__ FmMargin fm_row_margin_given(const FmParams& p, i64 row, float norm,
                                                        const float* __restrict__ rowm) {
    FmMargin m = fm_row_margin(p, row, norm);
    if (rowm != nullptr) {
        m.m2 = rowm[2 * row];
        m.m3 = rowm[2 * row + 1];
        m.fallback_shift = (float)((double)m.m2 * sin((double)m.m2));
    }
    return m;
}

__device__ __forceinline__ FmTarget fm_target(const FmParams& p, const FmMargin& m, double c) {
    double psi, dpsi;
    if (p.policy == FM_POLICY_EASY && c <= 0.0) {
        psi = c; dpsi = 1.0;                                   // Easy: no margin where c <= 0
    } else if (!p.angular) {
        psi = c - (double)m.m3; dpsi = 1.0;                    // NSL / CosFace: no acos round trip
    } else {
        double cc = fmin(fmax(c, -1.0 + FM_THETA_CLAMP), 1.0 - FM_THETA_CLAMP);
        double theta = acos(cc);
        double a = (double)m.m1 * theta + (double)m.m2;
        double slope = (double)m.m1 * sin(a) / sin(theta);    // sin(theta) >= 4.5e-4 by the clamp
        if (p.policy == FM_POLICY_FALLBACK && a > FM_PI) {
            psi = c - (double)m.fallback_shift - (double)m.m3; dpsi = 1.0;
        } else if (p.policy == FM_POLICY_MONOTONIC) {
            double k = floor(a / FM_PI);
            double sign = (((long long)k) & 1) ? -1.0 : 1.0;
            psi = sign * cos(a) - 2.0 * k - (double)m.m3;
            dpsi = sign * slope;
        } else {                                               // Raw, Easy (c > 0), Fallback below pi
            psi = cos(a) - (double)m.m3; dpsi = slope;
        }
    }
    if (p.detached) dpsi = 1.0;
    FmTarget t;
    if (p.lambda > 0.0f) {
        double l = (double)p.lambda;
        t.value = (l * c + psi) / (1.0 + l);
        t.deriv = (l + dpsi) / (1.0 + l);
    } else {
        t.value = psi; t.deriv = dpsi;
    }
    return t;
}

// Row scale r_i (docs/MATH.md step 3) with the row's scale; `norm` is the raw |x_i|.
__device__ __forceinline__ float fm_row_scale(const FmParams& p, const FmMargin& m, float norm) {
    return p.normalize_features ? m.s : m.s * norm;
}

// False for NaN and +-Inf: v * 0 is exactly 0 for every finite v and NaN otherwise.
__device__ __forceinline__ bool fm_finite(float v) { return v * 0.0f == 0.0f; }

// 1 / max(|v|, eps). Written as a comparison, not fmaxf: fmaxf(NaN, eps) is eps, which would turn
// a NaN row into huge finite values instead of propagating NaN (docs/MATH.md "Non-finite input").
__device__ __forceinline__ float fm_inv_norm(float norm) {
    return 1.0f / (norm < FM_NORM_EPS ? FM_NORM_EPS : norm);
}

// The projection term of the normalization backward dv = (dvh - vh proj) / max(|v|, eps), with
// proj = vh . dvh: kept where |v| >= eps; 0 below eps, where vh = v / eps is linear in v and the
// derivative of the forward is dv = dvh / eps (docs/MATH.md "Backward", as F.normalize's
// autograd). A NaN norm keeps proj, so a non-finite row stays NaN.
__device__ __forceinline__ float fm_norm_proj(float norm, float proj) {
    return norm < FM_NORM_EPS ? 0.0f : proj;
}

// Per-row upstream g_i: the per-row buffer when given, else the scalar; 0 for ignored rows.
__device__ __forceinline__ float fm_upstream(const float* g_rows, float g_scalar, i64 row, int label) {
    if (label < 0) return 0.0f;
    return g_rows ? g_rows[row] : g_scalar;
}

// ---- reductions ---------------------------------------------------------------------------------
__device__ __forceinline__ float fm_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum / max over the 16 lanes of a half-warp (the tile kernels put one row's 16 column-threads
// in a half-warp).
__device__ __forceinline__ float fm_half_sum(float v) {
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float fm_half_max(float v) {
    for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Merges two (max, sum-exp) pairs of the online softmax; an empty side has max = -inf, sum = 0.
// A NaN on either side makes the result NaN (fmaxf alone would drop it).
__device__ __forceinline__ void fm_online_merge(float& m, float& s, float m2, float s2) {
    if (m2 != m2 || s2 != s2 || m != m || s != s) {
        m = s = FM_NAN;
        return;
    }
    float mx = fmaxf(m, m2);
    if (mx == FM_NEG_INF) return;
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

// Dynamic shared memory of a kernel (size set at launch); a pointer in the CPU emulator.
#ifdef FM_EMU
#define FM_DYNAMIC_SMEM(name) unsigned char* name = fm_emu::dynamic_smem()
#else
#define FM_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// ---- poisoning (tests): fill a buffer with a bit pattern (NaN) so unwritten elements show ----
#if FM_IN_UNIT(FM_G_UNIT_CORE)
extern "C" __global__ void FM_ENTRY(fm_fill_u32)(unsigned* __restrict__ p, i64 n, unsigned v) {
    i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e < n) p[e] = v;
}
extern "C" __global__ void FM_ENTRY(fm_fill_u16)(unsigned short* __restrict__ p, i64 n, unsigned short v) {
    i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e < n) p[e] = v;
}
#endif

#endif  // FM_COMMON_CUH
