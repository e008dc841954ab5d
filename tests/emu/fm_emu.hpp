// fused-margin: a CPU emulator for the CUDA kernels in kernels/, used by tests/emulated_kernels.rs
// so that the kernels' indexing, fragment layouts, pipelines and edge handling are tested on
// machines without a GPU (CI has none).
//
// What it models:
// - a block's threads as cooperative fibers (ucontext) on one OS thread: __syncthreads and the
//   warp-synchronous instructions (shuffles, ldmatrix, mma.sync) are barriers where fibers switch,
//   so every thread of a block really runs the kernel code, interleaved;
// - blocks run one after another, so `__shared__` variables become function statics;
// - ldmatrix and mma.sync by their PTX ISA definitions (fragment layouts in kernels/ptx.cuh);
// - wgmma (warpgroup-collective: a barrier of the 4 warps) reading shared memory through its
//   matrix descriptors (128-byte swizzled K-major layouts), with dynamic shared memory placed at a
//   shared-window address that is 16- but not 1024-byte aligned, as a kernel must not assume more;
// - when asynchronous work completes, FM_EMU_CP: `eager` (the default: cp.async copies and wgmma
//   at issue), `deferred` (a copy only when cp.async.wait_group retires its group, a wgmma only
//   when wgmma.wait_group retires its group), `wgmma` (copies at issue, wgmma at its wait: a
//   stage refilled while a wgmma may still read it shows only this way) or `copies` (copies at
//   their wait, wgmma at issue: a wgmma issued before its stage's copies landed shows at once). A
//   kernel that reads the accumulators early, reads a stage before its copies landed or refills
//   it too soon then gets wrong results;
// - the async proxy: wgmma may not read shared memory a cp.async wrote until the writing thread
//   has executed fence.proxy.async (plain stores are not tracked), and a wgmma needs a
//   wgmma.fence after the start and after every wgmma.wait_group (both abort otherwise);
// - the order in which the threads of a block run between barriers: FM_EMU_ORDER=forward (the
//   default), reverse, or shuffle:SEED (a new permutation at every scheduling pass), each running
//   every runnable thread once per pass; or greedy / greedy-reverse, which always resume the
//   lowest (highest) runnable thread, so one warp or warpgroup runs as far ahead of the others as
//   its barriers allow (a missing __syncthreads between warpgroups shows there).
// The kernels' results do not depend on thread order or copy timing unless a barrier or a wait is
// missing, so running them under several orders and copy modes and comparing bit for bit is a
// race check (tests/emulated_kernels.rs: `no_races_under_other_schedules`).
// What it does not model: the hardware memory model beyond that, timing, alignment faults,
// register limits. Those are the GPU suite's job (tests/gpu_vs_cpu.rs).
//
// The mma.sync model was checked against the hardware: the v2 tensor-core forward (32-bit LDS
// fragments, commit 6b4624f), which passed the GPU suite on an H200, passes under this emulator,
// and swapping fragment registers in it or in the backward makes the emulated tests fail.
#ifndef FM_EMU_HPP
#define FM_EMU_HPP

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>
#include <ucontext.h>
#include <vector>

// ---- CUDA keywords and built-in variables ------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct fm_uint3 { unsigned x, y, z; };
inline fm_uint3 threadIdx, blockIdx, blockDim, gridDim;

namespace fm_emu {

// ---- fibers ---------------------------------------------------------------------------------------
constexpr size_t kStack = 96 * 1024;
enum Wait { kRunnable, kBlockBarrier, kWarpBarrier, kGroupBarrier, kDone };

struct Copy {
    void* dst;
    const void* src;
    bool valid;
    int group;
};

// A wgmma issued by one thread: its share of the warpgroup's product, computed at issue or, when
// deferred, when wgmma.wait_group retires its group.
struct Mma {
    float* d;
    int n;
    unsigned long long da, db;
    int scale_d;
    bool bf16;
    int group;
};

struct Fiber {
    ucontext_t ctx;
    Wait wait = kRunnable;
    unsigned long gen = 0;   // the barrier generation this fiber waits to pass
    std::vector<Copy> pending;   // deferred cp.async copies
    int committed = 0;           // cp.async groups committed so far
    std::vector<Mma> mmas;       // wgmma not yet retired
    std::vector<size_t> unfenced;   // 16-byte chunks of dynamic shared memory its landed copies wrote
    int wg_committed = 0;        // wgmma groups committed so far
    bool wg_fenced = false;      // a wgmma.fence since the start or the last wgmma.wait_group
};

// Scheduling and copy modes, from the environment (read once).
struct Modes {
    int order = 0;   // 0 forward, 1 reverse, 2 shuffle
    bool greedy = false;
    unsigned long long seed = 0;
    bool deferred = false;      // cp.async copies land at their wait
    bool wg_deferred = false;   // wgmma completes at its wait
    Modes() {
        if (const char* o = std::getenv("FM_EMU_ORDER")) {
            if (std::strcmp(o, "reverse") == 0) order = 1;
            else if (std::strcmp(o, "greedy") == 0) greedy = true;
            else if (std::strcmp(o, "greedy-reverse") == 0) { greedy = true; order = 1; }
            else if (std::strncmp(o, "shuffle:", 8) == 0) { order = 2; seed = std::strtoull(o + 8, nullptr, 10); }
            else if (std::strcmp(o, "forward") != 0) { std::fprintf(stderr, "emu: bad FM_EMU_ORDER %s\n", o); std::abort(); }
        }
        if (const char* c = std::getenv("FM_EMU_CP")) {
            if (std::strcmp(c, "deferred") == 0) deferred = wg_deferred = true;
            else if (std::strcmp(c, "wgmma") == 0) wg_deferred = true;
            else if (std::strcmp(c, "copies") == 0) deferred = true;
            else if (std::strcmp(c, "eager") != 0) { std::fprintf(stderr, "emu: bad FM_EMU_CP %s\n", c); std::abort(); }
        }
    }
};
inline Modes g_modes;

// A deliberate fault for the mutation tests: FM_EMU_FAULT names a wait or barrier a kernel leaves
// out where it asks fault_is (kernels/grad_tc.cu: FM_GT_KEEP); empty or unset, none.
inline bool fault_is(const char* name) {
    static const char* f = std::getenv("FM_EMU_FAULT");
    return f && std::strcmp(f, name) == 0;
}

// One barrier per warp (threads >> 5) or warpgroup (threads >> 7): arrivals, threads still
// running, and a generation that a waiting thread watches change.
struct Barriers {
    int shift;
    std::vector<int> count, active;
    std::vector<unsigned long> gen;
    void reset(int nthreads) {
        const int n = ((nthreads - 1) >> shift) + 1;
        count.assign(n, 0);
        gen.assign(n, 0);
        active.assign(n, 0);
        for (int t = 0; t < nthreads; ++t) ++active[t >> shift];
    }
    void release(int i) {
        count[i] = 0;
        ++gen[i];
    }
    // A thread of barrier i exits: it no longer holds up the others waiting there.
    void leave(int i) {
        --active[i];
        if (count[i] > 0 && count[i] == active[i]) release(i);
    }
};

struct Block {
    std::vector<Fiber> fibers;
    std::vector<std::vector<char>> stacks;
    ucontext_t sched;
    int nthreads = 0, active = 0, cur = 0;
    int bar_count = 0;
    unsigned long bar_gen = 0;
    Barriers warps{5};    // the .sync of warp-level instructions
    Barriers groups{7};   // warpgroups (4 warps): wgmma's .sync.aligned
    std::vector<unsigned char> xch;   // per warp, per lane: 64 bytes of exchange space
    std::vector<unsigned char> dyn;   // dynamic shared memory, refilled with 0xff for every block
    // Per 16-byte chunk of `dyn`: written by a landed cp.async whose thread has not yet executed
    // fence.proxy.async (wgmma, in the async proxy, must not read it then).
    std::vector<unsigned char> dirty;
    const std::function<void()>* body = nullptr;
};
inline Block g_block;

inline int lane() { return g_block.cur & 31; }
inline int warp() { return g_block.cur >> 5; }
inline unsigned char* slot(int w, int l) { return &g_block.xch[((size_t)w * 32 + l) * 64]; }

inline void yield() { swapcontext(&g_block.fibers[g_block.cur].ctx, &g_block.sched); }

inline void release_block_barrier() {
    g_block.bar_count = 0;
    ++g_block.bar_gen;
}


inline void syncthreads() {
    Block& b = g_block;
    unsigned long gen = b.bar_gen;
    if (++b.bar_count == b.active) {
        release_block_barrier();
        return;
    }
    b.fibers[b.cur].wait = kBlockBarrier;
    b.fibers[b.cur].gen = gen;
    yield();
}

// The current thread arrives at its barrier of `bs` and waits until every running thread of it
// has arrived.
inline void meet(Barriers& bs, Wait kind) {
    Block& b = g_block;
    const int i = b.cur >> bs.shift;
    unsigned long gen = bs.gen[i];
    if (++bs.count[i] == bs.active[i]) {
        bs.release(i);
        return;
    }
    b.fibers[b.cur].wait = kind;
    b.fibers[b.cur].gen = gen;
    yield();
}

// All active lanes of this warp meet here (the .sync of the warp-level instructions).
inline void warp_sync() { meet(g_block.warps, kWarpBarrier); }

// All active threads of this warpgroup meet here (wgmma's .sync.aligned).
inline void group_sync() { meet(g_block.groups, kGroupBarrier); }

inline void fiber_main() {
    (*g_block.body)();
    Block& b = g_block;
    if (!b.fibers[b.cur].pending.empty()) {
        std::fprintf(stderr, "emu: thread %d of block (%u,%u,%u) exited with cp.async copies not waited for\n",
                     b.cur, blockIdx.x, blockIdx.y, blockIdx.z);
        std::abort();
    }
    if (!b.fibers[b.cur].mmas.empty()) {
        std::fprintf(stderr, "emu: thread %d of block (%u,%u,%u) exited with wgmma not waited for\n", b.cur,
                     blockIdx.x, blockIdx.y, blockIdx.z);
        std::abort();
    }
    b.fibers[b.cur].wait = kDone;
    --b.active;
    // A thread that exits no longer holds up barriers the others wait at.
    if (b.bar_count > 0 && b.bar_count == b.active) release_block_barrier();
    b.warps.leave(b.cur >> b.warps.shift);
    b.groups.leave(b.cur >> b.groups.shift);
    // Returning resumes uc_link (the scheduler).
}

inline bool runnable(const Fiber& f, int tid) {
    switch (f.wait) {
        case kRunnable: return true;
        case kBlockBarrier: return g_block.bar_gen != f.gen;
        case kWarpBarrier: return g_block.warps.gen[tid >> g_block.warps.shift] != f.gen;
        case kGroupBarrier: return g_block.groups.gen[tid >> g_block.groups.shift] != f.gen;
        default: return false;
    }
}

// The block's dynamic shared memory (the launch's `smem_bytes`; 0xff bytes, NaN as floats and
// halves, until written, so a read of an unwritten element shows).
inline unsigned char* dynamic_smem() { return g_block.dyn.data(); }

// The shared-window address of dynamic shared memory's first byte: 16-byte aligned, not 1024 (a
// kernel that needs 1024-byte aligned tiles must align them itself).
constexpr unsigned kDynBase = 0x210;

// cvta.to.shared of a pointer into the block's dynamic shared memory.
inline unsigned smem_addr(const void* p) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    const unsigned char* base = g_block.dyn.data();
    if (c < base || c > base + g_block.dyn.size()) {
        std::fprintf(stderr, "emu: smem_addr of a pointer outside dynamic shared memory (thread %d)\n", g_block.cur);
        std::abort();
    }
    return kDynBase + (unsigned)(c - base);
}

// Runs `body` for every thread of every block of the grid, blocks in order, with `smem_bytes` of
// dynamic shared memory per block.
inline void launch(fm_uint3 grid, fm_uint3 block, const std::function<void()>& body, size_t smem_bytes = 0) {
    Block& b = g_block;
    int n = (int)(block.x * block.y * block.z);
    if (n <= 0 || n > 1024) {
        std::fprintf(stderr, "emu: bad block size %d\n", n);
        std::abort();
    }
    if ((int)b.stacks.size() < n) b.stacks.resize(n, std::vector<char>(kStack));
    gridDim = grid;
    blockDim = block;
    b.body = &body;
    int nwarps = (n + 31) / 32;
    b.xch.assign((size_t)nwarps * 32 * 64, 0);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = {bx, by, bz};
                b.dyn.assign(smem_bytes, 0xff);
                b.dirty.assign(smem_bytes / 16 + 1, 0);
                b.fibers.assign(n, Fiber());
                b.nthreads = b.active = n;
                b.bar_count = 0;
                b.bar_gen = 0;
                b.warps.reset(n);
                b.groups.reset(n);
                for (int t = 0; t < n; ++t) {
                    Fiber& f = b.fibers[t];
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = b.stacks[t].data();
                    f.ctx.uc_stack.ss_size = kStack;
                    f.ctx.uc_link = &b.sched;
                    makecontext(&f.ctx, fiber_main, 0);
                }
                std::vector<int> order(n);
                while (b.active > 0) {
                    bool progressed = false;
                    for (int k = 0; k < n; ++k) order[k] = g_modes.order == 1 ? n - 1 - k : k;
                    if (g_modes.order == 2)
                        for (int k = n - 1; k > 0; --k) {   // Fisher-Yates with a 64-bit LCG
                            g_modes.seed = g_modes.seed * 6364136223846793005ULL + 1442695040888963407ULL;
                            std::swap(order[k], order[(int)((g_modes.seed >> 33) % (unsigned long long)(k + 1))]);
                        }
                    for (int k = 0; k < n; ++k) {
                        const int t = order[k];
                        Fiber& f = b.fibers[t];
                        if (!runnable(f, t)) continue;
                        f.wait = kRunnable;
                        b.cur = t;
                        threadIdx = {(unsigned)(t % block.x), (unsigned)((t / block.x) % block.y),
                                     (unsigned)(t / (block.x * block.y))};
                        swapcontext(&b.sched, &f.ctx);
                        progressed = true;
                        if (g_modes.greedy) break;   // start again from the first thread in order
                    }
                    if (!progressed) {
                        std::fprintf(stderr, "emu: deadlock in block (%u,%u,%u)\n", bx, by, bz);
                        std::abort();
                    }
                }
            }
}

// ---- warp-level instructions -----------------------------------------------------------------------
template <typename T>
inline T shfl(T v, int src) {
    static_assert(sizeof(T) <= 64, "exchange slot is 64 bytes");
    int w = warp();
    std::memcpy(slot(w, lane()), &v, sizeof(T));
    warp_sync();
    T r;
    std::memcpy(&r, slot(w, src & 31), sizeof(T));
    warp_sync();
    return r;
}

inline unsigned short lo16(unsigned v) { return (unsigned short)(v & 0xffff); }
inline unsigned short hi16(unsigned v) { return (unsigned short)(v >> 16); }

inline float f16_to_f32(unsigned short bits) {
    _Float16 h;
    std::memcpy(&h, &bits, 2);
    return (float)h;
}
inline unsigned short f32_to_f16(float v) {
    _Float16 h = (_Float16)v;   // IEEE round to nearest even
    unsigned short bits;
    std::memcpy(&bits, &h, 2);
    return bits;
}
inline unsigned short f32_to_bf16(float v) {
    unsigned u;
    std::memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40);   // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);   // round to nearest even
    return (unsigned short)(u >> 16);
}
inline float bf16_to_f32(unsigned short bits) {
    unsigned u = (unsigned)bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 (see kernels/ptx.cuh for the layout).
// 16-byte alignment, which the hardware requires of every ldmatrix row and cp.async address.
inline void check_aligned16(const void* p, const char* what) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
        std::fprintf(stderr, "emu: %s address %p is not 16-byte aligned (thread %d)\n", what, p, g_block.cur);
        std::abort();
    }
}

inline void ldmatrix_x4(unsigned d[4], const unsigned short* p, bool trans) {
    check_aligned16(p, "ldmatrix");
    int w = warp(), l = lane();
    std::memcpy(slot(w, l), &p, sizeof(p));
    warp_sync();
    const int r = l >> 2, c = l & 3;
    for (int m = 0; m < 4; ++m) {
        unsigned short e0, e1;
        if (!trans) {
            const unsigned short* row;
            std::memcpy(&row, slot(w, 8 * m + r), sizeof(row));
            e0 = row[2 * c];
            e1 = row[2 * c + 1];
        } else {
            const unsigned short *r0, *r1;
            std::memcpy(&r0, slot(w, 8 * m + 2 * c), sizeof(r0));
            std::memcpy(&r1, slot(w, 8 * m + 2 * c + 1), sizeof(r1));
            e0 = r0[r];
            e1 = r1[r];
        }
        d[m] = (unsigned)e0 | ((unsigned)e1 << 16);
    }
    warp_sync();
}

// The end of both mma.sync models: lane l's C fragment (rows g, g+8; columns 2t, 2t+1) plus
// A . B over k < kdim from the gathered operands, written after the warp's second barrier (every
// lane has read the exchange slots by then).
template <class FA, class FB>
inline void mma_finish(float d[4], int kdim, FA A, FB Bm) {
    const int l = lane(), g = l >> 2, t = l & 3;
    float out[4];
    for (int v = 0; v < 4; ++v) {
        int row = g + 8 * (v >> 1), col = 2 * t + (v & 1);
        float acc = d[v];
        for (int k = 0; k < kdim; ++k) acc += A(row, k) * Bm(k, col);   // products exact in f32
        out[v] = acc;
    }
    warp_sync();
    for (int v = 0; v < 4; ++v) d[v] = out[v];
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: every lane's fragments are gathered into the
// full A (16x16) and B (16x8), and each lane computes its four D elements.
inline void mma16816(float d[4], const unsigned a[4], const unsigned b[2], bool bf16) {
    int w = warp(), l = lane();
    unsigned mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    std::memcpy(slot(w, l), mine, sizeof(mine));
    warp_sync();
    auto val = [&](unsigned short bits) { return bf16 ? bf16_to_f32(bits) : f16_to_f32(bits); };
    auto A = [&](int row, int k) {
        const unsigned* f = (const unsigned*)slot(w, (row & 7) * 4 + ((k & 7) >> 1));
        unsigned v = f[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
        return val((k & 1) ? hi16(v) : lo16(v));
    };
    auto Bm = [&](int k, int n) {
        const unsigned* f = (const unsigned*)slot(w, n * 4 + ((k & 7) >> 1));
        unsigned v = f[4 + (k >= 8 ? 1 : 0)];
        return val((k & 1) ? hi16(v) : lo16(v));
    };
    mma_finish(d, 16, A, Bm);
}

// cvt.rna.tf32.f32: keep 10 mantissa bits, round half away from zero; NaN and Inf unchanged. The
// low 13 bits of the result are not specified, so the model fills them with junk (the input's
// bits, inverted): a kernel that uses the register as an f32 without clearing them gets wrong
// values here, as it might on hardware.
inline unsigned f32_to_tf32(float v) {
    unsigned u;
    std::memcpy(&u, &v, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) return u;
    unsigned r = (u + 0x1000u) & 0xffffe000u;   // half of the 13 dropped bits: ties go up in magnitude
    return r | (~u & 0x1fffu);
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (layout in kernels/ptx.cuh). The hardware
// reads only the top 19 bits of each operand register.
inline void mma1688_tf32(float d[4], const unsigned a[4], const unsigned b[2]) {
    int w = warp(), l = lane();
    unsigned mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    std::memcpy(slot(w, l), mine, sizeof(mine));
    warp_sync();
    auto val = [](unsigned bits) {
        bits &= 0xffffe000u;
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
    };
    auto A = [&](int row, int k) {
        const unsigned* f = (const unsigned*)slot(w, (row & 7) * 4 + (k & 3));
        return val(f[(row >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0)]);
    };
    auto Bm = [&](int k, int n) {
        const unsigned* f = (const unsigned*)slot(w, n * 4 + (k & 3));
        return val(f[4 + (k >= 4 ? 1 : 0)]);
    };
    mma_finish(d, 8, A, Bm);
}

// ---- wgmma (kernels/ptx.cuh) ------------------------------------------------------------------------
// Element (r, k) of a K-major operand tile described by `desc`: 128-byte swizzle only (what the
// kernels use; anything else aborts). Logical address start + (r / 8) * SBO + (r % 8) * 128 + 2k,
// then the swizzle on the shared address: bits 4-6 ^= bits 7-9.
inline float wgmma_operand(unsigned long long desc, int r, int k, bool bf16) {
    const unsigned start = (unsigned)(desc & 0x3FFFu) << 4;
    const unsigned sbo = (unsigned)((desc >> 32) & 0x3FFFu) << 4;
    const unsigned base_offset = (unsigned)((desc >> 49) & 7u), swizzle = (unsigned)(desc >> 62);
    if (swizzle != 1 || base_offset != 0) {
        std::fprintf(stderr, "emu: wgmma descriptor %llx: only 128-byte swizzle, base offset 0 is modelled\n", desc);
        std::abort();
    }
    const unsigned l = start + (unsigned)(r >> 3) * sbo + (unsigned)(r & 7) * 128 + 2u * (unsigned)k;
    const unsigned phys = l ^ ((l >> 3) & 0x70u);
    if (phys < kDynBase || phys + 2 > kDynBase + g_block.dyn.size()) {
        std::fprintf(stderr, "emu: wgmma reads shared address %#x outside dynamic shared memory\n", phys);
        std::abort();
    }
    if (g_block.dirty[(phys - kDynBase) / 16]) {
        std::fprintf(stderr,
                     "emu: wgmma reads shared address %#x, written by cp.async without a fence.proxy.async by "
                     "the writing thread before the wgmma (PTX ISA: async proxy)\n",
                     phys);
        std::abort();
    }
    unsigned short bits;
    std::memcpy(&bits, g_block.dyn.data() + (phys - kDynBase), 2);
    return bf16 ? bf16_to_f32(bits) : f16_to_f32(bits);
}

// One thread's share of D (+)= A . B^T for the warpgroup's m64 x n tile:
// d[4 j + 2 h + i] = D(16 (warp % 4) + g + 8 h, 8 j + 2 c + i).
inline void wgmma_compute(const Mma& m, int tid) {
    const int w = (tid >> 5) & 3, g = (tid & 31) >> 2, c = tid & 3;
    for (int e = 0; e < m.n / 2; ++e) {
        const int row = 16 * w + g + 8 * ((e >> 1) & 1), col = 8 * (e >> 2) + 2 * c + (e & 1);
        float acc = m.scale_d ? m.d[e] : 0.0f;
        for (int k = 0; k < 16; ++k)
            acc += wgmma_operand(m.da, row, k, m.bf16) * wgmma_operand(m.db, col, k, m.bf16);   // exact products
        m.d[e] = acc;
    }
}

// wgmma.fence. The model requires one before the first wgmma after the start and after every
// wgmma.wait_group (after which a kernel may touch the accumulators): the PTX ISA's rule, as far
// as the emulator can see register accesses.
inline void wgmma_fence() {
    group_sync();
    g_block.fibers[g_block.cur].wg_fenced = true;
}

// wgmma.mma_async m64nNk16 with both operands from descriptors. The descriptors and scale-d must
// be the same in every thread of the warpgroup (checked).
inline void wgmma_m64nk16(float* d, int n, unsigned long long da, unsigned long long db, int scale_d, bool bf16) {
    Block& b = g_block;
    const int q = b.cur >> 7;
    if (!b.fibers[b.cur].wg_fenced) {
        std::fprintf(stderr, "emu: wgmma without a wgmma.fence since the start or the last wait (thread %d)\n", b.cur);
        std::abort();
    }
    unsigned long long mine[3] = {da, db, (unsigned long long)scale_d};
    std::memcpy(slot(warp(), lane()), mine, sizeof(mine));
    group_sync();
    unsigned long long lead[3];
    std::memcpy(lead, slot(q * 4, 0), sizeof(lead));
    if (std::memcmp(lead, mine, sizeof(mine)) != 0) {
        std::fprintf(stderr, "emu: wgmma operands differ across the warpgroup (thread %d)\n", b.cur);
        std::abort();
    }
    group_sync();
    Fiber& f = b.fibers[b.cur];
    Mma m{d, n, da, db, scale_d, bf16, f.wg_committed};
    if (g_modes.wg_deferred)
        f.mmas.push_back(m);
    else
        wgmma_compute(m, b.cur);
}

inline void wgmma_commit() {
    group_sync();
    ++g_block.fibers[g_block.cur].wg_committed;
}

// wgmma.wait_group n: every wgmma group but the n most recently committed has completed.
inline void wgmma_wait(int n) {
    group_sync();
    Fiber& f = g_block.fibers[g_block.cur];
    f.wg_fenced = false;
    std::vector<Mma> keep;
    for (const Mma& m : f.mmas) {
        if (m.group < f.wg_committed - n)
            wgmma_compute(m, g_block.cur);
        else
            keep.push_back(m);
    }
    f.mmas.swap(keep);
}

// A landed cp.async: the copy, and (into dynamic shared memory) the chunk marked as written by the
// generic proxy until its thread's next fence.proxy.async.
inline void copy16(void* smem, const void* gmem, bool valid) {
    if (valid)
        std::memcpy(smem, gmem, 16);
    else
        std::memset(smem, 0, 16);
    Block& b = g_block;
    const unsigned char* c = static_cast<const unsigned char*>(smem);
    if (c >= b.dyn.data() && c < b.dyn.data() + b.dyn.size()) {
        const size_t chunk = (size_t)(c - b.dyn.data()) / 16;
        b.dirty[chunk] = 1;
        b.fibers[b.cur].unfenced.push_back(chunk);
    }
}

// fence.proxy.async.shared::cta: this thread's landed copies become visible to the async proxy.
inline void fence_proxy_async() {
    Fiber& f = g_block.fibers[g_block.cur];
    for (size_t chunk : f.unfenced) g_block.dirty[chunk] = 0;
    f.unfenced.clear();
}
inline void cp_async16(void* smem, const void* gmem, bool valid) {
    check_aligned16(smem, "cp.async shared");
    if (valid) check_aligned16(gmem, "cp.async global");
    if (!g_modes.deferred) {
        copy16(smem, gmem, valid);
        return;
    }
    Fiber& f = g_block.fibers[g_block.cur];
    f.pending.push_back({smem, gmem, valid, f.committed});
}
inline void cp_async_commit() { ++g_block.fibers[g_block.cur].committed; }
// cp.async.wait_group n: every group but the n most recently committed has landed.
inline void cp_async_wait(int n) {
    Fiber& f = g_block.fibers[g_block.cur];
    std::vector<Copy> keep;
    for (const Copy& c : f.pending) {
        if (c.group < f.committed - n)
            copy16(c.dst, c.src, c.valid);
        else
            keep.push_back(c);
    }
    f.pending.swap(keep);
}

}  // namespace fm_emu

// ---- CUDA intrinsics ------------------------------------------------------------------------------
inline void __syncthreads() { fm_emu::syncthreads(); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int o) { return fm_emu::shfl(v, fm_emu::lane() ^ o); }
template <typename T>
inline T __shfl_sync(unsigned, T v, int src) { return fm_emu::shfl(v, src); }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float v) { unsigned u; std::memcpy(&u, &v, 4); return u; }
inline int __float_as_int(float v) { int u; std::memcpy(&u, &v, 4); return u; }

#endif  // FM_EMU_HPP
