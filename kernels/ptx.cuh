// fused-margin: every inline-PTX instruction the kernels use, in one place: f16/bf16/TF32
// conversion, cp.async, ldmatrix and mma.sync (m16n8k16 f16/bf16, m16n8k8 TF32). Each wrapper states the fragment layout it assumes (PTX ISA,
// "Warp-level matrix fragments").
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

#endif  // FM_PTX_CUH
