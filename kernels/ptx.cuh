// fused-margin: every inline-PTX instruction the kernels use, in one place: f16/bf16/TF32
// conversion, cp.async, ldmatrix, mma.sync (m16n8k16 f16/bf16, m16n8k8 TF32) and wgmma (sm_90a).
// Each wrapper states the fragment layout it assumes (PTX ISA, "Warp-level matrix fragments",
// "Asynchronous warpgroup level matrix multiply-accumulate").
//
// Under FM_EMU (tests/emu: the CPU emulator that runs these kernels in the test suite) each
// wrapper calls the emulator's model of the same instruction instead, so the kernels' indexing is
// tested on machines without a GPU. The models follow the PTX ISA's definitions, and the emulator
// is checked against the tensor-core forward, whose layout was verified on an H200.
#ifndef FM_PTX_CUH
#define FM_PTX_CUH

// ---- conversions --------------------------------------------------------------------------------
__device__ __forceinline__ float fm_f16_bits_to_f32(unsigned short bits) {
#ifdef FM_EMU
    return fm_emu::f16_to_f32(bits);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
#endif
}
__device__ __forceinline__ unsigned short fm_f32_to_f16_bits(float v) {   // round to nearest even
#ifdef FM_EMU
    return fm_emu::f32_to_f16(v);
#else
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
#endif
}
__device__ __forceinline__ unsigned short fm_f32_to_bf16_bits(float v) {  // round to nearest even
#ifdef FM_EMU
    return fm_emu::f32_to_bf16(v);
#else
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
#endif
}

// f32 -> TF32 (19 significant bits in a 32-bit register), rounded to nearest, ties away from zero
// (cvt.rna.tf32.f32, sm_80+), as cuBLAS's TF32 mode rounds; mma.sync would otherwise truncate.
// The low 13 bits of the result are not to be relied on: mma.sync ignores them, and any other use
// must clear them (& 0xffffe000).
__device__ __forceinline__ unsigned fm_f32_to_tf32(float v) {
#ifdef FM_EMU
    return fm_emu::f32_to_tf32(v);
#else
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return r;
#endif
}

// ---- cp.async (sm_80+) ----------------------------------------------------------------------------
// 16 bytes global -> shared, bypassing L1; valid = false zero-fills the 16 bytes and reads nothing.
__device__ __forceinline__ void fm_cp_async16(void* smem, const void* gmem, bool valid) {
#ifdef FM_EMU
    fm_emu::cp_async16(smem, gmem, valid);
#else
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    int n = valid ? 16 : 0;   // src-size 0: the 16 bytes are zero-filled, nothing is read
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
#endif
}
__device__ __forceinline__ void fm_cp_async_commit() {
#ifdef FM_EMU
    fm_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void fm_cp_async_wait() {
#ifdef FM_EMU
    fm_emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ---- ldmatrix (sm_75+) ----------------------------------------------------------------------------
// Four 8x8 b16 matrices: lane 8m + r gives the shared address of row r of matrix m (16 bytes,
// 16-byte aligned); lane 4r + c receives in d[m] the pair (row r, columns 2c, 2c+1) of matrix m.
// For an m16k16 A fragment from a row-major [row][k] tile at `tile` with leading dimension ld:
// lane address = tile + (lane & 15) * ld + (lane >> 4) * 8.
__device__ __forceinline__ void fm_ldmatrix_x4(unsigned d[4], const unsigned short* p) {
#ifdef FM_EMU
    fm_emu::ldmatrix_x4(d, p, false);
#else
    unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(s));
#endif
}
// The same with each matrix transposed: lane 4r + c receives (rows 2c, 2c+1; column r). Loads a
// k16 x n16 pair of B fragments from a [k][n] tile (n contiguous): lane address =
// tile + (lane & 15) * ld + (lane >> 4) * 8 gives {d[0], d[1]} for n 0-7 and {d[2], d[3]} for 8-15.
__device__ __forceinline__ void fm_ldmatrix_x4_trans(unsigned d[4], const unsigned short* p) {
#ifdef FM_EMU
    fm_emu::ldmatrix_x4(d, p, true);
#else
    unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(s));
#endif
}

// ---- mma.sync m16n8k16, f32 accumulate (sm_80+) -----------------------------------------------------
// d += a . b with g = lane / 4, t = lane % 4 (pairs: low 16 bits = lower index):
//   a[0] = A(g, 2t..2t+1)  a[1] = A(g+8, 2t..)  a[2] = A(g, 2t+8..)  a[3] = A(g+8, 2t+8..)
//   b[0] = B(k 2t..2t+1, n g)  b[1] = B(k 2t+8.., n g)
//   d[0] = D(g, 2t)  d[1] = D(g, 2t+1)  d[2] = D(g+8, 2t)  d[3] = D(g+8, 2t+1)
// `bf16` selects bf16 inputs, else f16.
template <bool BF16>
__device__ __forceinline__ void fm_mma16816(float d[4], const unsigned a[4], const unsigned b[2]) {
#ifdef FM_EMU
    fm_emu::mma16816(d, a, b, BF16);
#else
    if (BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#endif
}

// ---- mma.sync m16n8k8 TF32, f32 accumulate (sm_80+) --------------------------------------------------
// d += a . b with g = lane / 4, t = lane % 4, one TF32 value per register:
//   a[0] = A(g, t)  a[1] = A(g+8, t)  a[2] = A(g, t+4)  a[3] = A(g+8, t+4)
//   b[0] = B(k t, n g)  b[1] = B(k t+4, n g)      d as for m16n8k16.
__device__ __forceinline__ void fm_mma1688_tf32(float d[4], const unsigned a[4], const unsigned b[2]) {
#ifdef FM_EMU
    fm_emu::mma1688_tf32(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// ---- wgmma (sm_90a: H100 / H200) --------------------------------------------------------------------
// Built only where the architecture has it (NVRTC --gpu-architecture=sm_90a defines
// __CUDA_ARCH_FEAT_SM90_ALL) and in the emulator. The forward that uses it (logits_wg.cu) reads
// both operands from shared memory through 64-bit matrix descriptors (PTX ISA, "Matrix Descriptor
// Format"): start address >> 4 in bits 0-13, leading byte offset >> 4 in bits 16-29 (unused for
// swizzled K-major layouts: 1), stride byte offset >> 4 in bits 32-45, base offset in bits
// 49-51 (0: every tile starts on a 1024-byte boundary), swizzle in bits 62-63 (1: 128-byte).
// The 128-byte swizzled K-major layout: row r of a tile (64 halves = 128 bytes of K) at
// tile + r * 128, its 16-byte chunk c at chunk position c ^ (r % 8); 8-row groups 1024 bytes apart
// (the stride byte offset). A k16 step inside the row advances the start address by 32 bytes.
#if defined(FM_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define FM_HAS_WGMMA 1

// The address of a shared-memory pointer in the shared window (what descriptors and the swizzle
// are defined on).
__device__ __forceinline__ unsigned fm_smem_addr(const void* p) {
#ifdef FM_EMU
    return fm_emu::smem_addr(p);
#else
    return (unsigned)__cvta_generic_to_shared(p);
#endif
}

// The descriptor of a 128-byte-swizzled K-major tile starting at shared address `saddr`.
__device__ __forceinline__ unsigned long long fm_wgmma_desc_sw128(unsigned saddr) {
    return (unsigned long long)((saddr & 0x3FFFFu) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) |
           (1ull << 62);
}

// Orders this thread's earlier generic-proxy writes to shared memory (cp.async, st.shared) before
// later reads by wgmma (async proxy), as the PTX ISA requires; then a barrier publishes them.
__device__ __forceinline__ void fm_fence_proxy_async() {
#ifdef FM_EMU
    fm_emu::fence_proxy_async();
#else
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// A compiler-level fence on the 64 accumulators (no instruction): keeps the compiler from moving
// their reads and writes across the wgmma issue and wait asm, as CUTLASS's
// warpgroup_fence_operand does. The "memory" clobbers of those asm statements order memory only.
__device__ __forceinline__ void fm_wgmma_acc_fence(float d[64]) {
#ifdef FM_EMU
    (void)d;
#else
    asm volatile("" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) :: "memory");
#endif
}

// wgmma.fence: before the first wgmma of a sequence and after registers it uses were touched.
__device__ __forceinline__ void fm_wgmma_fence() {
#ifdef FM_EMU
    fm_emu::wgmma_fence();
#else
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void fm_wgmma_commit() {
#ifdef FM_EMU
    fm_emu::wgmma_commit();
#else
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most N committed wgmma groups of this warpgroup are pending; only then may the
// accumulators be read or the shared memory they read be overwritten.
template <int N>
__device__ __forceinline__ void fm_wgmma_wait() {
#ifdef FM_EMU
    fm_emu::wgmma_wait(N);
#else
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// wgmma.mma_async m64n128k16, f32 accumulate, A and B K-major from descriptors:
// D[m][n] (+)= sum_k A[m][k] B[n][k] over the warpgroup's 64 x 128 tile; scale_d = 0 drops the old
// D. Thread t of the warpgroup (warp w = t / 32, g = lane / 4, c = lane % 4) holds
//   d[4 j + 2 h + i] = D(16 w + g + 8 h, 8 j + 2 c + i),  j < 16, h, i < 2
// (the mma.sync C-fragment layout per n8 block). `bf16` selects bf16 inputs, else f16.
template <bool BF16>
__device__ __forceinline__ void fm_wgmma_m64n128k16(float d[64], unsigned long long desc_a, unsigned long long desc_b,
                                                    int scale_d) {
#ifdef FM_EMU
    fm_emu::wgmma_m64nk16(d, 128, desc_a, desc_b, scale_d, BF16);
#else
    if (BF16) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
            "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, "
            "%64, %65, p, 1, 1, 0, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "l"(desc_a), "l"(desc_b), "r"(scale_d)
            : "memory");
    } else {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
            "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, "
            "%64, %65, p, 1, 1, 0, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "l"(desc_a), "l"(desc_b), "r"(scale_d)
            : "memory");
    }
#endif
}
#endif  // FM_HAS_WGMMA

#endif  // FM_PTX_CUH
