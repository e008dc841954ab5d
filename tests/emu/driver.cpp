// fused-margin: runs a launch plan built by the crate (src/cuda/plan.rs) on the CPU emulator of
// the kernels (fm_emu.hpp), for kernels/all.cu compiled for FM_DTYPE. It knows no launch order,
// tiles or splits: it allocates the buffers the job lists, then runs each launch by entry-point
// name from a table of the kernels, with the grid, block, dynamic shared memory and arguments
// the job gives. tests/emulated_kernels.rs writes the job and reads the buffers back.
//
// Each argument is converted to the kernel's own parameter type (deduced from its signature),
// and the conversion checks the job's argument kind against it: a pointer for a pointer (and a
// buffer of elements of the pointee's size), an i64 for `i64`, an i32 for `int`, an f32 for
// `float`, the option block for `FmParams`, and the argument count. A kernel of a family that
// takes one argument struct (kernels/args.cuh: FmTileArgs, FmGradArgs) gets it filled field by
// field from the job's arguments, with the same conversion per field; the job must name that
// struct, and a positional kernel must be given no struct name. So a plan whose arguments do not
// match a kernel's signature fails here, before the same plan reaches a GPU.
//
// Usage: driver JOB OUT
// JOB (little endian): "FMJ1"; u32 nbuf; per buffer: u32 id, u32 elem_size, u64 len, u8 init
//   (0: data follows, len * elem_size bytes; 1: fill, one elem_size pattern follows; 2: zero);
//   u32 nlaunch; per launch: u16 name length, name, u32 grid[3], u32 block, u32 smem, u16 struct
//   name length (0: positional arguments), struct name, u32 nargs (fields of a struct),
//   per argument u8 kind (0 read, 1 write: u32 buffer id; 2 null; 3 i64; 4 i32; 5 f32;
//   6 FmParams: 80 bytes); u32 nout, u32 ids.
// OUT: the bytes of each listed buffer, in the listed order.
#include "fm_emu.hpp"
#include "all.cu"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace {

[[noreturn]] void fail(const std::string& what) {
    std::fprintf(stderr, "driver: %s\n", what.c_str());
    std::exit(2);
}

struct Reader {
    std::ifstream in;
    template <typename T>
    T get() {
        T v;
        in.read(reinterpret_cast<char*>(&v), sizeof(T));
        if (!in) fail("short job");
        return v;
    }
    void bytes(void* p, size_t n) {
        in.read(reinterpret_cast<char*>(p), (std::streamsize)n);
        if (!in) fail("short job");
    }
};

struct Buffer {
    std::vector<std::uint64_t> words;   // 8-byte aligned storage
    size_t elem = 0, len = 0;
    unsigned char* view = nullptr;      // a region of another buffer (the handle's arena)
    void* data() { return view ? static_cast<void*>(view) : static_cast<void*>(words.data()); }
    size_t bytes() const { return elem * len; }
};
std::map<std::uint32_t, Buffer> g_bufs;

enum Kind : std::uint8_t { READ = 0, WRITE = 1, NUL = 2, I64 = 3, I32 = 4, F32 = 5, PARAMS = 6 };

struct ArgV {
    Kind kind;
    std::uint32_t buf = 0;
    long long i64 = 0;
    int i32 = 0;
    float f32 = 0.0f;
    FmParams params{};
};

struct Call {
    std::string entry;
    std::string packed;   // the argument struct's name, or empty
    std::vector<ArgV> args;

    [[noreturn]] void bad(size_t i, const char* want) const {
        fail(entry + ": argument " + std::to_string(i) + " is not " + want + " (kind " +
             std::to_string((int)args[i].kind) + ")");
    }

    // Argument i as the kernel's parameter type P, checked against the job's kind.
    template <typename P>
    P as(size_t i) const {
        const ArgV& a = args[i];
        if constexpr (std::is_pointer_v<P>) {
            if (a.kind == NUL) return nullptr;
            if (a.kind != READ && a.kind != WRITE) bad(i, "a buffer");
            auto it = g_bufs.find(a.buf);
            if (it == g_bufs.end()) fail(entry + ": unknown buffer " + std::to_string(a.buf));
            using E = std::remove_cv_t<std::remove_pointer_t<P>>;
            if constexpr (!std::is_void_v<E>) {
                if (it->second.elem != sizeof(E))
                    fail(entry + ": argument " + std::to_string(i) + " has " + std::to_string(it->second.elem) +
                         "-byte elements, the kernel takes " + std::to_string(sizeof(E)));
            }
            if constexpr (!std::is_const_v<std::remove_pointer_t<P>>) {
                if (a.kind != WRITE) bad(i, "a written buffer (the kernel's pointer is not const)");
            }
            return reinterpret_cast<P>(it->second.data());
        } else if constexpr (std::is_same_v<P, long long>) {
            if (a.kind != I64) bad(i, "an i64");
            return a.i64;
        } else if constexpr (std::is_same_v<P, int>) {
            if (a.kind != I32) bad(i, "an i32");
            return a.i32;
        } else if constexpr (std::is_same_v<P, float>) {
            if (a.kind != F32) bad(i, "an f32");
            return a.f32;
        } else if constexpr (std::is_same_v<P, FmParams>) {
            if (a.kind != PARAMS) bad(i, "FmParams");
            return a.params;
        } else {
            static_assert(sizeof(P) == 0, "a kernel parameter type the job format does not carry");
        }
    }
};

// The family argument structs of kernels/args.cuh, filled from the job by their X-macro lists.
template <typename S>
struct ArgStruct {
    static constexpr bool is = false;
};
#define FM_COUNT_FIELD(type, name) +1
#define FM_FILL_FIELD(type, name) s.name = c.template as<decltype(s.name)>(j++);
template <>
struct ArgStruct<FmTileArgs> {
    static constexpr bool is = true;
    static constexpr const char* name = "FmTileArgs";
    static constexpr size_t fields = 0 FM_TILE_ARGS(FM_COUNT_FIELD);
    static FmTileArgs fill(const Call& c) {
        FmTileArgs s{};
        size_t j = 0;
        FM_TILE_ARGS(FM_FILL_FIELD)
        return s;
    }
};
template <typename T_OUT>
struct ArgStruct<FmGradArgs<T_OUT>> {
    static constexpr bool is = true;
    static constexpr const char* name = "FmGradArgs";
    static constexpr size_t fields = 0 FM_GRAD_ARGS(FM_COUNT_FIELD);
    static FmGradArgs<T_OUT> fill(const Call& c) {
        FmGradArgs<T_OUT> s{};
        size_t j = 0;
        FM_GRAD_ARGS(FM_FILL_FIELD)
        return s;
    }
};
#undef FM_COUNT_FIELD
#undef FM_FILL_FIELD

void check_count(const Call& c, size_t want, const char* what) {
    if (c.args.size() != want)
        fail(c.entry + ": " + std::to_string(c.args.size()) + " arguments, the kernel takes " +
             std::to_string(want) + " " + what);
}

template <typename... P, size_t... I>
std::function<void()> bind_impl(void (*k)(P...), const Call& c, std::index_sequence<I...>) {
    auto t = std::make_tuple(c.template as<P>(I)...);
    return [k, t] { std::apply(k, t); };
}

// The kernel bound to the call's arguments (converted once, run by every emulated thread).
template <typename... P>
std::function<void()> bind(void (*k)(P...), const Call& c) {
    if constexpr (sizeof...(P) == 1 && (ArgStruct<P>::is && ...)) {
        using S = std::tuple_element_t<0, std::tuple<P...>>;
        if (c.packed != ArgStruct<S>::name)
            fail(c.entry + ": takes struct " + ArgStruct<S>::name + ", the job gives " +
                 (c.packed.empty() ? std::string("positional arguments") : "struct " + c.packed));
        check_count(c, ArgStruct<S>::fields, "fields");
        const S s = ArgStruct<S>::fill(c);
        return [k, s] { k(s); };
    } else {
        if (!c.packed.empty()) fail(c.entry + ": takes positional arguments, the job gives struct " + c.packed);
        check_count(c, sizeof...(P), "parameters");
        return bind_impl(k, c, std::index_sequence_for<P...>{});
    }
}

using Binder = std::function<std::function<void()>(const Call&)>;
#define FM_K(key, fn) {key, [](const Call& c) { return bind(&fn, c); }}

// Every entry point a plan can name, by its name without the dtype suffix.
const std::map<std::string, Binder>& table() {
    static const std::map<std::string, Binder> t = {
        FM_K("fm_row_norms", FM_ENTRY(fm_row_norms)),
        FM_K("fm_target_rows", FM_ENTRY(fm_target_rows)),
        FM_K("fm_fwd_tiles", FM_ENTRY(fm_fwd_tiles)),
        FM_K("fm_fwd_tiles_sc", FM_ENTRY(fm_fwd_tiles_sc)),
        FM_K("fm_combine_rows", FM_ENTRY(fm_combine_rows)),
        FM_K("fm_shard_stats", FM_ENTRY(fm_shard_stats)),
        FM_K("fm_shard_combine", FM_ENTRY(fm_shard_combine)),
        FM_K("fm_gather_rows", FM_ENTRY(fm_gather_rows)),
        FM_K("fm_shard_cos_out", FM_ENTRY(fm_shard_cos_out)),
        FM_K("fm_shard_cos_in", FM_ENTRY(fm_shard_cos_in)),
        FM_K("fm_reduce_loss", FM_ENTRY(fm_reduce_loss)),
        FM_K("fm_grad_x_partial", FM_ENTRY(fm_grad_x_partial)),
        FM_K("fm_grad_x_partial_sc", FM_ENTRY(fm_grad_x_partial_sc)),
        FM_K("fm_x_finish", FM_ENTRY(fm_x_finish)),
        FM_K("fm_grad_w", FM_ENTRY(fm_grad_w)),
        FM_K("fm_grad_w_sc", FM_ENTRY(fm_grad_w_sc)),
        FM_K("fm_label_status", FM_ENTRY(fm_label_status)),
        FM_K("fm_norm_coef", FM_ENTRY(fm_norm_coef)),
        FM_K("fm_adaface_state", FM_ENTRY(fm_adaface_state)),
        FM_K("fm_curricular_state", FM_ENTRY(fm_curricular_state)),
        FM_K("fm_elastic_plus", FM_ENTRY(fm_elastic_plus)),
        FM_K("naive_normalize", FM_ENTRY(naive_normalize)),
        FM_K("naive_cosine", FM_ENTRY(naive_cosine)),
        FM_K("naive_subcenter_max", FM_ENTRY(naive_subcenter_max)),
        FM_K("naive_subcenter_scatter", FM_ENTRY(naive_subcenter_scatter)),
        FM_K("naive_logits", FM_ENTRY(naive_logits)),
        FM_K("naive_softmax", FM_ENTRY(naive_softmax)),
        FM_K("naive_dlogits", FM_ENTRY(naive_dlogits)),
        FM_K("naive_mask_rows", FM_ENTRY(naive_mask_rows)),
        FM_K("naive_matmul", FM_ENTRY(naive_matmul)),
        FM_K("naive_norm_backward", FM_ENTRY(naive_norm_backward)),
#if FM_DTYPE != FM_F32
        FM_K("fm_x_finish_f32out", FM_ENTRY_F32OUT(fm_x_finish)),
        FM_K("fm_grad_w_f32out", FM_ENTRY_F32OUT(fm_grad_w)),
        FM_K("fm_grad_w_sc_f32out", FM_ENTRY_F32OUT(fm_grad_w_sc)),
        FM_K("naive_norm_backward_f32out", FM_ENTRY_F32OUT(naive_norm_backward)),
        FM_K("fm_fwd_tiles_tc", FM_ENTRY(fm_fwd_tiles_tc)),
        FM_K("fm_fwd_tiles_tc_sc", FM_ENTRY(fm_fwd_tiles_tc_sc)),
        FM_K("fm_fwd_tiles_tc_wide", FM_ENTRY(fm_fwd_tiles_tc_wide)),
        FM_K("fm_fwd_tiles_wg", FM_ENTRY(fm_fwd_tiles_wg)),
        FM_K("fm_fwd_tiles_wg_sc", FM_ENTRY(fm_fwd_tiles_wg_sc)),
        FM_K("fm_grad_scale", FM_ENTRY(fm_grad_scale)),
        FM_K("fm_grad_x_tc", FM_ENTRY(fm_grad_x_tc)),
        FM_K("fm_grad_w_tc", FM_ENTRY(fm_grad_w_tc)),
        FM_K("fm_grad_w_tc_f32out", FM_ENTRY_F32OUT(fm_grad_w_tc)),
        FM_K("fm_grad_x_tc_d512", FM_ENTRY(fm_grad_x_tc_d512)),
        FM_K("fm_grad_w_tc_d512", FM_ENTRY(fm_grad_w_tc_d512)),
        FM_K("fm_grad_w_tc_d512_f32out", FM_ENTRY_F32OUT(fm_grad_w_tc_d512)),
#else
        FM_K("fm_fwd_tiles_tf32", FM_ENTRY(fm_fwd_tiles_tf32)),
        FM_K("fm_fwd_tiles_tf32_sc", FM_ENTRY(fm_fwd_tiles_tf32_sc)),
        FM_K("fm_fwd_tiles_tf32_wide", FM_ENTRY(fm_fwd_tiles_tf32_wide)),
#endif
    };
    return t;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3) fail("usage: driver JOB OUT");
    Reader r{std::ifstream(argv[1], std::ios::binary)};
    if (!r.in) fail("cannot open the job");
    char magic[4];
    r.bytes(magic, 4);
    if (std::memcmp(magic, "FMJ1", 4) != 0) fail("not a job file");
    const auto nbuf = r.get<std::uint32_t>();
    for (std::uint32_t i = 0; i < nbuf; ++i) {
        const auto id = r.get<std::uint32_t>();
        Buffer b;
        b.elem = r.get<std::uint32_t>();
        b.len = (size_t)r.get<std::uint64_t>();
        const auto init = r.get<std::uint8_t>();
        if (init == 3) {
            // A view: `len` elements at a byte offset of an earlier buffer, as the executor carves
            // workspaces from the handle's arena (src/cuda/exec.rs). Map nodes do not move, so the
            // parent's storage stays where the view points.
            const auto parent = r.get<std::uint32_t>();
            const auto off = (size_t)r.get<std::uint64_t>();
            auto it = g_bufs.find(parent);
            if (it == g_bufs.end() || it->second.view) fail("a view of an unknown buffer or of a view");
            if (off % 16 != 0 || off + std::max<size_t>(b.len, 1) * b.elem > it->second.bytes())
                fail("a view outside its buffer or misaligned");
            b.view = static_cast<unsigned char*>(it->second.data()) + off;
            if (!g_bufs.emplace(id, std::move(b)).second) fail("buffer listed twice");
            continue;
        }
        // At least one element, as the GPU allocations are.
        b.words.assign((std::max<size_t>(b.len, 1) * b.elem + 7) / 8, 0);
        auto* p = static_cast<unsigned char*>(b.data());
        if (init == 0) {
            r.bytes(p, b.bytes());
        } else if (init == 1) {
            unsigned char pat[8];
            if (b.elem > 8) fail("fill pattern wider than 8 bytes");
            r.bytes(pat, b.elem);
            for (size_t e = 0; e < b.len; ++e) std::memcpy(p + e * b.elem, pat, b.elem);
        } else if (init != 2) {
            fail("unknown buffer init");
        }
        if (!g_bufs.emplace(id, std::move(b)).second) fail("buffer listed twice");
    }
    const auto nlaunch = r.get<std::uint32_t>();
    for (std::uint32_t l = 0; l < nlaunch; ++l) {
        Call c;
        c.entry.resize(r.get<std::uint16_t>());
        r.bytes(c.entry.data(), c.entry.size());
        fm_uint3 grid{r.get<std::uint32_t>(), r.get<std::uint32_t>(), r.get<std::uint32_t>()};
        const auto block = r.get<std::uint32_t>();
        const auto smem = r.get<std::uint32_t>();
        c.packed.resize(r.get<std::uint16_t>());
        r.bytes(c.packed.data(), c.packed.size());
        const auto nargs = r.get<std::uint32_t>();
        for (std::uint32_t i = 0; i < nargs; ++i) {
            ArgV a;
            a.kind = (Kind)r.get<std::uint8_t>();
            switch (a.kind) {
                case READ:
                case WRITE: a.buf = r.get<std::uint32_t>(); break;
                case NUL: break;
                case I64: a.i64 = r.get<long long>(); break;
                case I32: a.i32 = r.get<int>(); break;
                case F32: a.f32 = r.get<float>(); break;
                case PARAMS: a.params = r.get<FmParams>(); break;
                default: fail("unknown argument kind");
            }
            c.args.push_back(a);
        }
        auto it = table().find(c.entry);
        if (it == table().end()) fail("no kernel " + c.entry + " in this dtype's table");
        fm_emu::launch(grid, fm_uint3{block, 1, 1}, it->second(c), smem);
    }
    std::ofstream out(argv[2], std::ios::binary);
    const auto nout = r.get<std::uint32_t>();
    for (std::uint32_t i = 0; i < nout; ++i) {
        auto it = g_bufs.find(r.get<std::uint32_t>());
        if (it == g_bufs.end()) fail("output of an unknown buffer");
        out.write(static_cast<const char*>(it->second.data()), (std::streamsize)it->second.bytes());
    }
    if (!out) fail("cannot write the output");
    return 0;
}
