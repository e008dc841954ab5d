// fused-margin: runs the fused plan's kernels (kernels/all.cu, compiled for FM_DTYPE) on the CPU
// emulator (fm_emu.hpp), in the launch order and grids of src/cuda/fused.rs, for one case read
// from a file. tests/emulated_kernels.rs writes the case, runs this and checks the outputs
// against the f64 CPU reference.
//
// Usage: driver IN OUT
// IN (little endian): i64 B, i64 C, i32 D, FmParams (48 bytes), i32 mean, f32 g_scalar,
//   i32 has_g_rows, i32 fwd_tc, i32 bwd_tc, i32 fwd_tiles_per_split, i32 bwd_tiles_per_split,
//   x (B*D of T_IN), w (C*D of T_IN), labels (B i32), g_rows (B f32, when has_g_rows).
// OUT: f32 loss, lse (B f32), row_loss (B f32), dx (B*D f32), dw (C*D f32).
// Every output and workspace is filled with NaN before the launches, so unwritten elements show.
#include "fm_emu.hpp"
#include "all.cu"

#include <fstream>
#include <limits>
#include <string>

namespace {

struct Reader {
    std::ifstream in;
    template <typename T>
    T get() {
        T v;
        in.read(reinterpret_cast<char*>(&v), sizeof(T));
        if (!in) fail("short input");
        return v;
    }
    template <typename T>
    std::vector<T> vec(size_t n) {
        std::vector<T> v(n);
        in.read(reinterpret_cast<char*>(v.data()), (std::streamsize)(n * sizeof(T)));
        if (!in) fail("short input");
        return v;
    }
    [[noreturn]] static void fail(const char* what) {
        std::fprintf(stderr, "driver: %s\n", what);
        std::exit(2);
    }
};

std::vector<float> poisoned(size_t n) { return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()); }

fm_uint3 g3(i64 x, i64 y = 1, i64 z = 1) { return {(unsigned)x, (unsigned)y, (unsigned)z}; }
i64 cdiv(i64 a, i64 b) { return (a + b - 1) / b; }

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3) Reader::fail("usage: driver IN OUT");
    Reader r{std::ifstream(argv[1], std::ios::binary)};
    if (!r.in) Reader::fail("cannot open input");
    const i64 B = r.get<i64>(), C = r.get<i64>();
    const int D = r.get<int>();
    const FmParams p = r.get<FmParams>();
    const int mean = r.get<int>();
    const float g_scalar = r.get<float>();
    const int has_g = r.get<int>(), fwd_tc = r.get<int>(), bwd_tc = r.get<int>();
    const int fwd_tps = r.get<int>(), bwd_tps = r.get<int>();
    auto x = r.vec<T_IN>((size_t)(B * D));
    auto w = r.vec<T_IN>((size_t)(C * D));
    auto labels = r.vec<int>((size_t)B);
    std::vector<float> g_rows;
    if (has_g) g_rows = r.vec<float>((size_t)B);
    const float* g_ptr = has_g ? g_rows.data() : nullptr;
#if FM_DTYPE == FM_F32
    if (fwd_tc || bwd_tc) Reader::fail("tensor-core kernels exist for f16/bf16 only");
#endif

    // ---- forward (fused.rs: forward) ----
    auto xnorm = poisoned(B), wnorm = poisoned(C);
    fm_emu::launch(g3(cdiv(B * 32, 256)), g3(256), [&] { FM_ENTRY(fm_row_norms)(x.data(), B, D, xnorm.data()); });
    fm_emu::launch(g3(cdiv(C * 32, 256)), g3(256), [&] { FM_ENTRY(fm_row_norms)(w.data(), C, D, wnorm.data()); });
    const i64 bm = fwd_tc ? 64 : 32, bn = fwd_tc ? 128 : 32;
    const i64 ntiles = cdiv(C, bn);
    const int nsplit = (int)cdiv(ntiles, fwd_tps);
    auto part_m = poisoned(B * nsplit), part_s = poisoned(B * nsplit), zy = poisoned(B);
    fm_emu::launch(g3(cdiv(B, bm), nsplit), g3(256), [&] {
#if FM_DTYPE != FM_F32
        if (fwd_tc) {
            FM_ENTRY(fm_fwd_tiles_tc)(x.data(), w.data(), labels.data(), xnorm.data(), wnorm.data(), p, B, C, D,
                                      fwd_tps, nsplit, part_m.data(), part_s.data(), zy.data());
            return;
        }
#endif
        FM_ENTRY(fm_fwd_tiles)(x.data(), w.data(), labels.data(), xnorm.data(), wnorm.data(), p, B, C, D, fwd_tps,
                               nsplit, part_m.data(), part_s.data(), zy.data());
    });
    auto lse = poisoned(B), row_loss = poisoned(B), loss = poisoned(1);
    fm_emu::launch(g3(cdiv(B, 256)), g3(256), [&] {
        FM_ENTRY(fm_combine_rows)(part_m.data(), part_s.data(), nsplit, zy.data(), labels.data(), B, lse.data(),
                                  row_loss.data());
    });
    fm_emu::launch(g3(1), g3(1024), [&] { FM_ENTRY(fm_reduce_loss)(row_loss.data(), labels.data(), B, mean, loss.data()); });

    // ---- backward (fused.rs: backward / backward_tc) ----
    auto dx = poisoned(B * D), dw = poisoned(C * D);
    if (!bwd_tc) {
        const i64 ntl = cdiv(C, 32);
        const int ns = (int)cdiv(ntl, bwd_tps);
        const i64 dchunks = cdiv(D, 128);
        auto dxh_part = poisoned(ns * B * D), proj_part = poisoned(ns * B), dn_part = poisoned(ns * B);
        fm_emu::launch(g3(cdiv(B, 32), ns, dchunks), g3(256), [&] {
            FM_ENTRY(fm_grad_x_partial)(x.data(), w.data(), labels.data(), xnorm.data(), wnorm.data(), lse.data(),
                                        g_ptr, g_scalar, p, B, C, D, bwd_tps, ns, dxh_part.data(),
                                        proj_part.data(), dn_part.data());
        });
        fm_emu::launch(g3(cdiv(B * D, 256)), g3(256), [&] {
            FM_ENTRY_F32OUT(fm_x_finish)(x.data(), xnorm.data(), dxh_part.data(), proj_part.data(), dn_part.data(),
                                         ns, B, D, p, dx.data());
        });
        fm_emu::launch(g3(ntl, dchunks), g3(256), [&] {
            FM_ENTRY_F32OUT(fm_grad_w)(x.data(), w.data(), labels.data(), xnorm.data(), wnorm.data(), lse.data(),
                                       g_ptr, g_scalar, p, B, C, D, dw.data());
        });
    } else {
#if FM_DTYPE != FM_F32
        const i64 ntl = cdiv(C, GT_PN);
        const int ns = (int)cdiv(ntl, bwd_tps);
        const i64 dchunks = cdiv(D, GT_DCH);
        auto scale = poisoned(1);
        fm_emu::launch(g3(1), g3(1024), [&] {
            FM_ENTRY(fm_grad_scale)(labels.data(), xnorm.data(), g_ptr, g_scalar, p, B, scale.data());
        });
        auto dxh_part = poisoned(ns * B * D), proj_part = poisoned(ns * B), dn_part = poisoned(ns * B);
        fm_emu::launch(g3(cdiv(B, GT_OWN), ns, dchunks), g3(256), [&] {
            FM_ENTRY(fm_grad_x_tc)(x.data(), w.data(), labels.data(), xnorm.data(), wnorm.data(), lse.data(), g_ptr,
                                   g_scalar, p, B, C, D, bwd_tps, ns, dxh_part.data(), proj_part.data(),
                                   dn_part.data());
        });
        fm_emu::launch(g3(cdiv(B * D, 256)), g3(256), [&] {
            FM_ENTRY_F32OUT(fm_x_finish)(x.data(), xnorm.data(), dxh_part.data(), proj_part.data(), dn_part.data(),
                                         ns, B, D, p, dx.data());
        });
        fm_emu::launch(g3(cdiv(C, GT_OWN), dchunks), g3(256), [&] {
            FM_ENTRY_F32OUT(fm_grad_w_tc)(x.data(), w.data(), labels.data(), xnorm.data(), wnorm.data(),
                                          lse.data(), g_ptr, g_scalar, scale.data(), p, B, C, D, dw.data());
        });
#endif
    }

    std::ofstream out(argv[2], std::ios::binary);
    auto put = [&](const std::vector<float>& v) {
        out.write(reinterpret_cast<const char*>(v.data()), (std::streamsize)(v.size() * sizeof(float)));
    };
    put(loss);
    put(lse);
    put(row_loss);
    put(dx);
    put(dw);
    if (!out) Reader::fail("cannot write output");
    return 0;
}
