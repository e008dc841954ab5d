// fused-margin: the launch geometry the host and the kernels share, defined once, here.
// build.rs turns every `#define FM_G_<NAME> <integer>` line of this file into a Rust constant
// `<NAME>` (src/cuda/geometry.rs, generated): the plan builder (src/cuda/plan.rs) sizes grids,
// splits and dynamic shared memory with them, and the kernels' static_asserts hold their own
// structs and templates to the same values. Integers only, one per line, no expressions.
#ifndef FM_GEOMETRY_CUH
#define FM_GEOMETRY_CUH

// SIMT tiles (tile.cuh): rows and classes per tile, threads per block, gradient columns per
// backward block.
#define FM_G_BM 32
#define FM_G_BN 32
#define FM_G_THREADS 256
#define FM_G_DC 128

// Tensor-core forward tiles (logits_tc.cu, FmTcShape<Op, 2, 4> and <Op, 4, 8>) and their dynamic
// shared memory (3 stages of (rows + classes) x 80 bytes, then 32 bytes per row).
#define FM_G_TC_BM 64
#define FM_G_TC_BN 128
#define FM_G_TC_SMEM 48128
#define FM_G_TC_WIDE_BM 128
#define FM_G_TC_WIDE_BN 256
#define FM_G_TC_WIDE_SMEM 96256

// wgmma forward tiles (logits_wg.cu): 5 stages of 32 KB plus 1 KB of alignment.
#define FM_G_WG_BM 128
#define FM_G_WG_BN 128
#define FM_G_WG_SMEM 164864

// Tensor-core backward (grad_tc.cu): partner rows per tile; FmGt<64> (D <= 256) and FmGt<32>
// (D up to 512 per block): own rows, D columns per block, sizeof(FmGt<OWN>::Smem), the fixed part
// of the dynamic shared memory (the resident tiles' 2 ld (OWN + stages PN) bytes follow).
#define FM_G_GT_PN 64
#define FM_G_GT64_OWN 64
#define FM_G_GT64_DCH 256
#define FM_G_GT64_FIXED_SMEM 11520
#define FM_G_GT32_OWN 32
#define FM_G_GT32_DCH 512
#define FM_G_GT32_FIXED_SMEM 5888

// Compile units: all.cu compiled with -DFM_UNIT=<code> holds one unit's entry points (the host
// compiles and loads only the units a plan launches, src/cuda/compile.rs `Unit`); without
// FM_UNIT (or 0) every unit, as nvcc and the emulator build it.
#define FM_G_UNIT_CORE 1
#define FM_G_UNIT_FWD_SIMT 2
#define FM_G_UNIT_FWD_TC 3
#define FM_G_UNIT_FWD_TC_WIDE 4
#define FM_G_UNIT_FWD_WG 5
#define FM_G_UNIT_GRAD_SIMT 6
#define FM_G_UNIT_GRAD_TC64 7
#define FM_G_UNIT_GRAD_TC32 8
#define FM_G_UNIT_NAIVE 9
#define FM_G_UNIT_GRAD_TC64_F32OUT 10
#define FM_G_UNIT_GRAD_TC32_F32OUT 11

// Bytes of the family argument structs (args.cuh), as src/cuda/args.rs packs them: FmTileArgs
// (10 pointers, FmParams of 80 bytes, 2 i64, 3 int, 4 bytes of tail padding) and FmGradArgs
// (14 pointers, FmParams, 2 i64, 1 float, 4 int, 4 bytes of tail padding).
#define FM_G_TILE_ARGS_BYTES 192
#define FM_G_GRAD_ARGS_BYTES 232

// The target record's sections of B floats (common.cuh FM_TGT_*); one float (CurricularFace's
// t) follows them: 8 B + 1 floats.
#define FM_G_TARGET_SECTIONS 8

// The label status record's length (labels.cu).
#define FM_G_STATUS_LEN 6

// FmParams.policy codes (common.cuh; src/cuda/params.rs PolicyCode).
#define FM_G_POLICY_MONOTONIC 0
#define FM_G_POLICY_FALLBACK 1
#define FM_G_POLICY_RAW 2
#define FM_G_POLICY_EASY 3
#define FM_G_POLICY_CLIP 4

// FmParams.variant codes (common.cuh; src/cuda/params.rs VariantCode).
#define FM_G_VAR_PLAIN 0
#define FM_G_VAR_ADAFACE 1
#define FM_G_VAR_CURRICULAR 2
#define FM_G_VAR_MAGFACE 3
#define FM_G_VAR_ELASTIC 4

#endif  // FM_GEOMETRY_CUH
