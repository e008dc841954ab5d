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
#define FM_POLICY_CLIP FM_G_POLICY_CLIP
// FmParams.variant: the loss with per-row or batch state (docs/MATH.md "Losses with per-row or
// batch state"); its parameters in vp[]:
//   AdaFace:        vp = (m, h, alpha)
//   CurricularFace: vp = (alpha)
//   MagFace:        vp = (l_a, u_a, l_m, u_m, lambda_g)
//   ElasticFace:    vp = (kind: 0 Arc, 1 Cos; plus: 0 none, 1 rank, 2 published)
#define FM_VAR_PLAIN FM_G_VAR_PLAIN
#define FM_VAR_ADAFACE FM_G_VAR_ADAFACE
#define FM_VAR_CURRICULAR FM_G_VAR_CURRICULAR
#define FM_VAR_MAGFACE FM_G_VAR_MAGFACE
#define FM_VAR_ELASTIC FM_G_VAR_ELASTIC
struct FmParams {
    float s;                  // scale
    float m1, m2, m3;         // cos(m1*theta + m2) - m3
    float lambda;             // SphereFace blend, 0 = none
    float fallback_shift;     // m2 * sin(m2), precomputed on the host in f64
    int policy;               // FM_POLICY_*
    int detached;             // 1: dtarget/dc = 1
    int angular;              // m1 != 1 || m2 != 0 (or a per-row angular margin)
    int normalize_features;   // 0: r_i = s*|x_i|
    int normalize_weights;    // 0: wh_j = w_j
    int tf32_dots;            // 1: the SIMT backward rounds its dot-product operands to TF32, to
                              // recompute the logits the TF32 forward (fm_fwd_tiles_tf32) saw
    int variant;              // FM_VAR_*
    float clamp;              // the cosine clamp d of theta = acos(clamp(c, -1 + d, 1 - d)):
                              // 1e-7, AdaFace's e = 1e-3 (a true clamp there)
    float vp[5];              // the variant's parameters (above)
    int centers;              // K, sub-centers per class (1 but for sub-center ArcFace): w has C*K
                              // rows, class j's are jK .. jK + K - 1 (fm_subcenter_max below)
};
static_assert(sizeof(FmParams) == 80, "src/cuda/params.rs: FmParams is 80 bytes");

// Sub-center ArcFace (docs/MATH.md): class j's cosine is the largest of its K sub-centers' (rows
// jK + k of w), the lowest k on a tie; a NaN sub-center wins, so a bad row of w poisons its class
// as it would without sub-centers (cpu.rs Problem::cosine). The tiles and fm_target_rows feed
// k = 0, 1, .., K - 1 in order.
__device__ __forceinline__ void fm_subcenter_max(float& best, int& win, float c, int k) {
    if (k == 0 || c > best || (c != c && best == best)) {
        best = c;
        win = k;
    }
}

// ---- the margin: target(c) and dtarget/dc (docs/MATH.md step 4 and "Backward") --------------------
// Evaluated in double: it runs once per row (at the label), so the cost is nil and the result
// tracks the f64 reference even near the clamp, where acosf would lose digits. dm2 is
// dtarget/dm2 (MagFace's margin depends on |x_i| through m2_i); 0 where the target does not
// depend on m2, and when detached.
struct FmTarget { double value; double deriv; double dm2; };

// ---- the per-row slot: the margins and scale of one row ---------------------------------------
// For the fixed-margin family they are the spec's, the same for every row. The losses whose
// margins vary per row get theirs through fm_row_margin_given below, where the target is formed;
// the tiles take only the scale from fm_row_margin (through fm_row_ctx in tile.cuh). The CPU
// twin is math::RowMargin.
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

// MagFace's row (math::magface_row): a = clip(|x|, l_a, u_a), m2 = l_m + q (a - l_a) with
// q = (u_m - l_m) / (u_a - l_a); live: l_a < |x| < u_a, where the clamp passes the norm's
// gradient. In double, from the f32 parameters.
struct FmMag { double a, m2, q; bool live; };
__device__ __forceinline__ FmMag fm_magface_row(const FmParams& p, float norm) {
    const double la = p.vp[0], ua = p.vp[1], lm = p.vp[2], um = p.vp[3];
    const double n = (double)norm;
    FmMag g;
    g.a = fmin(fmax(n, la), ua);
    g.q = (um - lm) / (ua - la);
    g.m2 = lm + g.q * (g.a - la);
    g.live = n > la && n < ua;
    return g;
}

// MagFace's regularizer g(a) = a / u_a^2 + 1 / a and its slope g'(a) = 1 / u_a^2 - 1 / a^2,
// each times lambda_g (math::magface_reg).
__device__ __forceinline__ void fm_magface_reg(const FmParams& p, double a, double& reg, double& slope) {
    const double ua = p.vp[1], lg = p.vp[4];
    reg = lg * (a / (ua * ua) + 1.0 / a);
    slope = lg * (1.0 / (ua * ua) - 1.0 / (a * a));
}

// CurricularFace's threshold (math::curricular_tau): cos(m1 theta + m2) - m3 with the spec's
// margins and no overflow policy, no gradient; c - m3 without an angular margin.
__device__ __forceinline__ float fm_curricular_tau(const FmParams& p, float c) {
    if (p.m1 == 1.0f && p.m2 == 0.0f) return c - p.m3;
    const double d = (double)p.clamp;
    const double th = acos(fmin(fmax((double)c, -1.0 + d), 1.0 - d));
    return (float)(cos((double)p.m1 * th + (double)p.m2) - (double)p.m3);
}

// CurricularFace's negative (math::curricular_negative): c (t + c) with slope t + 2c where
// c > tau (a hard negative), else c with slope 1. tau = +inf for the other losses.
__device__ __forceinline__ void fm_curricular_negative(float c, float tau, float t, float& v, float& dv) {
    if (c > tau) {
        v = c * (t + c);
        dv = fmaf(2.0f, c, t);
    } else {
        v = c;
        dv = 1.0f;
    }
}

// The row's margins where the target is formed (fm_target_rows, naive_logits): the given
// per-row margins when rowm is not null (2 per row, (m2_i, m3_i): ElasticFace's drawn ones,
// AdaFace's from the batch statistics, written by kernels/state.cu), MagFace's from the raw norm,
// else the spec's. The Fallback shift m2_i sin m2_i is taken in double here, as the host takes
// the spec's.
__device__ __forceinline__ FmMargin fm_row_margin_given(const FmParams& p, i64 row, float norm,
                                                        const float* __restrict__ rowm) {
    FmMargin m = fm_row_margin(p, row, norm);
    bool own = false;
    if (rowm != nullptr) {
        m.m2 = rowm[2 * row];
        m.m3 = rowm[2 * row + 1];
        own = true;
    } else if (p.variant == FM_VAR_MAGFACE) {
        m.m2 = (float)fm_magface_row(p, norm).m2;
        own = true;
    }
    if (own) m.fallback_shift = (float)((double)m.m2 * sin((double)m.m2));
    return m;
}

// psi(c), dpsi/dc and dpsi/dm2 with the row's margins, then the gradient mode and the lambda
// blend (math::psi_parts and math::target). The cosine clamp is p.clamp; for AdaFace
// (e = 1e-3) it is a true clamp, with no slope outside it, under every policy.
__device__ __forceinline__ FmTarget fm_target(const FmParams& p, const FmMargin& m, double c) {
    double psi, dpsi, dm2 = 0.0;
    if (p.policy == FM_POLICY_EASY && c <= 0.0) {
        psi = c; dpsi = 1.0;                                   // Easy: no margin where c <= 0
    } else if (!p.angular) {
        psi = c - (double)m.m3; dpsi = 1.0;                    // NSL / CosFace: no acos round trip
    } else {
        const double d = (double)p.clamp;
        const bool ada = p.variant == FM_VAR_ADAFACE;
        const double cc = fmin(fmax(c, -1.0 + d), 1.0 - d);
        const bool live = !ada || (c > -1.0 + d && c < 1.0 - d);
        double theta = acos(cc);
        double a = (double)m.m1 * theta + (double)m.m2;
        // sin(theta) >= 4.5e-4 by the clamp
        double slope = live ? (double)m.m1 * sin(a) / sin(theta) : 0.0;
        if (p.policy == FM_POLICY_FALLBACK && a > FM_PI) {
            const double m2 = (double)m.m2;
            psi = (ada ? cc : c) - (double)m.fallback_shift - (double)m.m3;
            dpsi = (!ada || live) ? 1.0 : 0.0;
            dm2 = -(sin(m2) + m2 * cos(m2));
        } else if (p.policy == FM_POLICY_MONOTONIC) {
            double k = floor(a / FM_PI);
            double sign = (((long long)k) & 1) ? -1.0 : 1.0;
            psi = sign * cos(a) - 2.0 * k - (double)m.m3;
            dpsi = sign * slope;
            dm2 = -sign * sin(a);
        } else if (p.policy == FM_POLICY_CLIP) {               // AdaFace: theta' = clip(a, e, pi - e)
            const bool inside = a > d && a < FM_PI - d;
            psi = cos(fmin(fmax(a, d), FM_PI - d)) - (double)m.m3;
            dpsi = inside ? slope : 0.0;
            dm2 = inside ? -sin(a) : 0.0;
        } else {                                               // Raw, Easy (c > 0), Fallback below pi
            psi = cos(a) - (double)m.m3; dpsi = slope;
            dm2 = -sin(a);
        }
    }
    if (p.detached) { dpsi = 1.0; dm2 = 0.0; }
    FmTarget t;
    const double l = (double)p.lambda;
    if (p.lambda > 0.0f) {
        t.value = (l * c + psi) / (1.0 + l);
        t.deriv = (l + dpsi) / (1.0 + l);
    } else {
        t.value = psi; t.deriv = dpsi;
    }
    t.dm2 = dm2 / (1.0 + l);
    return t;
}

// ---- the target record (fm_target_rows; src/cuda/plan.rs Buf::Target) --------------------------
// The per-row values the forward forms once per row and the tiles and the backward read, in
// sections of B floats after the (target, dtarget/dc) pairs of [0, 2B):
//   CE    l_i, the row's cross-entropy (fm_combine_rows)
//   TAU   CurricularFace's hardness threshold tau_i (+inf for every other loss and ignored rows)
//   COSY  c_iy, the target cosine before the margin (0 where the label is not in 0..C)
//   REG   the row loss's extra term: MagFace's lambda_g g(a_i) on counted rows, else 0
//   KC    MagFace's r_i q dtarget/dm2 where l_a < |x_i| < u_a, else 0: the norm gradient's
//         coefficient of g_i (p_iy - 1)
//   KG    MagFace's lambda_g g'(a_i) there, else 0: its coefficient of g_i
// then one float, CurricularFace's t (the state out; 0 for the others): FM_TGT_LEN(B) = 8 B + 1.
// The class of column `col`: widx[col] with Partial FC's index (kernels/args.cuh), else col.
__device__ __forceinline__ i64 fm_wrow(const int* widx, i64 col) {
    return widx != nullptr ? (i64)widx[col] : col;
}

// Floats per row of a class-sharded forward's record (combine.cu: fm_shard_stats).
#define FM_SHARD_REC 5
#define FM_TGT_CE 2
#define FM_TGT_TAU 3
#define FM_TGT_COSY 4
#define FM_TGT_REG 5
#define FM_TGT_KC 6
#define FM_TGT_KG 7
__device__ __forceinline__ i64 fm_tgt_at(int section, i64 B, i64 row) { return (i64)section * B + row; }
__device__ __forceinline__ i64 fm_tgt_t(i64 B) { return 8 * B; }

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
