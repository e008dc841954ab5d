// fused-margin: the argument structs of the two large kernel families, defined once, here.
//
// A family's kernels take one struct by value (as FlashAttention's Flash_fwd_params) instead of
// 14 to 18 positional arguments, so a new field is one line here, not an edit of every signature,
// wrapper and launch. Each struct is an X-macro list, F for a field:
//   F(type, name)   pointer fields first, then FmParams, then 8-byte and 4-byte scalars
// so the C layout has no interior padding. The same list is read three times:
//   - here, to declare the struct and FM_<FAMILY>_UNPACK (a local per field, pointers
//     __restrict__: every buffer of a launch is distinct);
//   - by build.rs, which turns it into the Rust field list the plan builder fills by name and the
//     executor packs with C's layout rules (src/cuda/args.rs); the byte sizes below are checked
//     on both sides;
//   - by the emulator driver (tests/emu/driver.cpp), which fills the struct field by field, each
//     converted to the field's own type and checked against the job's argument kind.
// Kernels with up to 11 arguments (row norms, combine, labels, x finish, the naive plan's) keep
// positional parameters.
// Rules for build.rs: one `F(type, name)` per line, types among `const T*`, `T*`, FmParams, i64,
// int, float.
#ifndef FM_ARGS_CUH
#define FM_ARGS_CUH

#include "common.cuh"

// widx (nullable): Partial FC's sampled classes (src/shard.rs): column j of the problem is class
// widx[j] of w (its rows widx[j] K + k); the norms, dw and every other per-class array are by
// column. Null: column j is class j.
// tgt: the per-row target and its slope (fm_target_rows, normalize.cu), read by every tile kernel.
// The forward tile kernels (logits.cu, logits_tc.cu, logits_wg.cu): grid (row tiles, nsplit).
// Block (rt, split) writes part_m/part_s at row * nsplit + split, and zy[row] for a label in its
// split.
#define FM_TILE_ARGS(F)         \
    F(const T_IN*, x)           \
    F(const T_IN*, w)           \
    F(const int*, widx)         \
    F(const int*, labels)       \
    F(const float*, xnorm)      \
    F(const float*, wnorm)      \
    F(const float*, tgt)        \
    F(float*, part_m)           \
    F(float*, part_s)           \
    F(float*, zy)               \
    F(FmParams, p)              \
    F(i64, B)                   \
    F(i64, C)                   \
    F(int, D)                   \
    F(int, tiles_per_split)     \
    F(int, nsplit)

// The gradient kernels (grad.cu, grad_tc.cu). The dx kernels write dxh_part, proj_part and
// dn_part and take dw null; the dw kernels write dw (T_OUT: the input dtype or float) and take
// the three partials null; scale (the tensor-core dw kernels' K) is null elsewhere. g_rows null
// means every row's upstream is g_scalar. stages: the tensor-core kernels' partner buffers (1 or
// 2, sized by the host into the dynamic shared memory; 0 for the SIMT kernels, which ignore it).
#define FM_GRAD_ARGS(F)         \
    F(const T_IN*, x)           \
    F(const T_IN*, w)           \
    F(const int*, widx)         \
    F(const int*, labels)       \
    F(const float*, xnorm)      \
    F(const float*, wnorm)      \
    F(const float*, tgt)        \
    F(const float*, lse)        \
    F(const float*, g_rows)     \
    F(const float*, scale)      \
    F(float*, dxh_part)         \
    F(float*, proj_part)        \
    F(float*, dn_part)          \
    F(T_OUT*, dw)               \
    F(FmParams, p)              \
    F(i64, B)                   \
    F(i64, C)                   \
    F(float, g_scalar)          \
    F(int, D)                   \
    F(int, tiles_per_split)     \
    F(int, nsplit)              \
    F(int, stages)

#define FM_ARGS_FIELD(type, name) type name;
struct FmTileArgs {
    FM_TILE_ARGS(FM_ARGS_FIELD)
};
template <typename T_OUT>
struct FmGradArgs {
    FM_GRAD_ARGS(FM_ARGS_FIELD)
};
#undef FM_ARGS_FIELD

// Sizes as src/cuda/args.rs packs them (geometry.cuh), for every T_OUT.
static_assert(sizeof(FmTileArgs) == FM_G_TILE_ARGS_BYTES, "geometry.cuh: FM_G_TILE_ARGS_BYTES");
static_assert(sizeof(FmGradArgs<float>) == FM_G_GRAD_ARGS_BYTES, "geometry.cuh: FM_G_GRAD_ARGS_BYTES");
static_assert(sizeof(FmGradArgs<T_IN>) == FM_G_GRAD_ARGS_BYTES, "geometry.cuh: FM_G_GRAD_ARGS_BYTES");

// A local per field of the struct named `args` (the kernel's parameter), so kernel bodies read
// as before. Pointers are __restrict__ as the positional parameters were; (void) keeps NVRTC
// quiet about the fields a kernel does not use.
// The field's type comes from the struct (decltype), since T_OUT is not a name in every kernel.
template <typename T>
struct FmArgsLocal { using type = const T; };
template <typename T>
struct FmArgsLocal<T*> { using type = T* __restrict__ const; };
#define FM_ARGS_LOCAL(ty, nm)                                 \
    typename FmArgsLocal<decltype(args.nm)>::type nm = args.nm; \
    (void)nm;
#define FM_TILE_UNPACK FM_TILE_ARGS(FM_ARGS_LOCAL)
#define FM_GRAD_UNPACK FM_GRAD_ARGS(FM_ARGS_LOCAL)

#endif  // FM_ARGS_CUH
