// fused-margin: runs the fused plan's kernels (kernels/all.cu, compiled for FM_DTYPE) on the CPU
// emulator (fm_emu.hpp), in the launch order and grids of src/cuda/fused.rs, for one case read
// from a file. tests/emulated_kernels.rs writes the case, runs this and checks the outputs
// against the f64 CPU reference.
//
// Usage: driver IN OUT
// IN (little endian): i64 B, i64 C, i32 D, FmParams (48 bytes), i32 mean, f32 g_scalar,
//   i32 has_g_rows, i32 fwd_tc, i32 bwd_tc, i32 fwd_tiles_per_split, i32 bwd_tiles_per_split,
//   i32 naive (1: the naive plan with its plain kernels, as src/cuda/naive.rs without cuBLAS),
//   i32 device_labels (1: LabelCheck::Device, as src/cuda/mod.rs and labels.rs),
//   x (B*D of T_IN), w (C*D of T_IN), labels (B i32), g_rows (B f32, when has_g_rows),
//   backward labels (B i32, when device_labels: what the backward is called with).
// OUT: f32 loss, lse (B f32), row_loss (B f32), dx (B*D f32), dw (C*D f32), then with
//   device_labels the forward's and the backward's status records (2 x FM_STATUS_LEN i64).
// With device_labels, g_scalar is the caller's upstream (the kernels divide by the counted rows);
// without, it is the per-row value the host computes (1/counted for the mean).
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

// The label status records of LabelCheck::Device, written after the outputs when present.
std::vector<long long> g_status;

void write_out(const char* path, std::initializer_list<const std::vector<float>*> parts) {
    std::ofstream out(path, std::ios::binary);
    for (const auto* v : parts)
        out.write(reinterpret_cast<const char*>(v->data()), (std::streamsize)(v->size() * sizeof(float)));
    out.write(reinterpret_cast<const char*>(g_status.data()), (std::streamsize)(g_status.size() * sizeof(long long)));
    if (!out) Reader::fail("cannot write output");
}

// The naive plan with its plain kernels, in the order of src/cuda/naive.rs (materialize, then
// the backward's recompute, dlogits, row mask, products and normalization backward).
void run_naive(const std::vector<T_IN>& x, const std::vector<T_IN>& w, const std::vector<int>& labels,
               const std::vector<int>& blabels, const float* g_ptr, float g_scalar, const FmParams& p, int mean, i64 B, i64 C, int D,
               const char* out_path) {
    auto xnorm = poisoned(B), wnorm = poisoned(C);
    fm_emu::launch(g3(cdiv(B * 32, 256)), g3(256), [&] { FM_ENTRY(fm_row_norms)(x.data(), B, D, xnorm.data()); });
    fm_emu::launch(g3(cdiv(C * 32, 256)), g3(256), [&] { FM_ENTRY(fm_row_norms)(w.data(), C, D, wnorm.data()); });
    auto xh = poisoned(B * D), wh = poisoned(C * D);
    fm_emu::launch(g3(cdiv(B * D, 256)), g3(256), [&] { FM_ENTRY(naive_normalize)(x.data(), xnorm.data(), B, D, 1, xh.data()); });
    fm_emu::launch(g3(cdiv(C * D, 256)), g3(256), [&] {
        FM_ENTRY(naive_normalize)(w.data(), wnorm.data(), C, D, p.normalize_weights, wh.data());
    });
    auto cos = poisoned(B * C), logits = poisoned(B * C), tval = poisoned(B * C), dt = poisoned(B * C);
    fm_emu::launch(g3(cdiv(B * C, 256)), g3(256), [&] { FM_ENTRY(naive_cosine)(xh.data(), wh.data(), B, C, D, cos.data()); });
    fm_emu::launch(g3(cdiv(B * C, 256)), g3(256), [&] {
        FM_ENTRY(naive_logits)(cos.data(), labels.data(), xnorm.data(), p, B, C, logits.data(), tval.data(), dt.data());
    });
    auto prob = poisoned(B * C), lse = poisoned(B), row_loss = poisoned(B), loss = poisoned(1);
    fm_emu::launch(g3(B), g3(256), [&] {
        FM_ENTRY(naive_softmax)(logits.data(), labels.data(), B, C, prob.data(), lse.data(), row_loss.data());
    });
    fm_emu::launch(g3(1), g3(1024), [&] { FM_ENTRY(fm_reduce_loss)(row_loss.data(), labels.data(), B, mean, loss.data()); });
    auto dn = poisoned(B);
    fm_emu::launch(g3(B), g3(256), [&] {
        FM_ENTRY(naive_dlogits)(prob.data(), tval.data(), dt.data(), blabels.data(), xnorm.data(), g_ptr, g_scalar, p, B,
                                C, dn.data());
    });
    fm_emu::launch(g3(cdiv(B * D, 256)), g3(256), [&] { FM_ENTRY(naive_mask_rows)(xh.data(), blabels.data(), B, D); });
    auto dxh = poisoned(B * D), dwh = poisoned(C * D);
    fm_emu::launch(g3(cdiv(B * D, 256)), g3(256), [&] { FM_ENTRY(naive_matmul)(prob.data(), wh.data(), B, C, D, 0, dxh.data()); });
    fm_emu::launch(g3(cdiv(C * D, 256)), g3(256), [&] { FM_ENTRY(naive_matmul)(prob.data(), xh.data(), C, B, D, 1, dwh.data()); });
    auto dx = poisoned(B * D), dw = poisoned(C * D);
    fm_emu::launch(g3(B), g3(256), [&] {
        FM_ENTRY_F32OUT(naive_norm_backward)(dxh.data(), xh.data(), xnorm.data(), p.normalize_features ? nullptr : dn.data(),
                                             D, 1, dx.data());
    });
    fm_emu::launch(g3(C), g3(256), [&] {
        FM_ENTRY_F32OUT(naive_norm_backward)(dwh.data(), wh.data(), wnorm.data(), nullptr, D, p.normalize_weights,
                                             dw.data());
    });
    write_out(out_path, {&loss, &lse, &row_loss, &dx, &dw});
}

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
    const int fwd_tps = r.get<int>(), bwd_tps = r.get<int>(), naive = r.get<int>();
    const int device_labels = r.get<int>();
    auto x = r.vec<T_IN>((size_t)(B * D));
    auto w = r.vec<T_IN>((size_t)(C * D));
    auto labels = r.vec<int>((size_t)B);
    std::vector<float> g_rows;
    if (has_g) g_rows = r.vec<float>((size_t)B);
    const float* g_ptr = has_g ? g_rows.data() : nullptr;
    float g_scalar_b = g_scalar;
    std::vector<int> blabels = labels;
    std::vector<float> g_dev;
    if (device_labels) {
        // mod.rs: the forward's status (in validate), then in backward the status against the
        // forward's and the per-row upstream from it; the backward kernels take that buffer.
        blabels = r.vec<int>((size_t)B);
        g_status.assign(2 * FM_STATUS_LEN, std::numeric_limits<long long>::min());
        long long* sf = g_status.data();
        long long* sb = sf + FM_STATUS_LEN;
        fm_emu::launch(g3(1), g3(1024), [&] { FM_ENTRY(fm_label_status)(labels.data(), B, C, nullptr, sf); });
        fm_emu::launch(g3(1), g3(1024), [&] { FM_ENTRY(fm_label_status)(blabels.data(), B, C, sf, sb); });
        g_dev = poisoned(B);
        fm_emu::launch(g3(cdiv(B, 256)), g3(256), [&] {
            FM_ENTRY(fm_upstream_rows)(blabels.data(), B, sb, g_ptr, g_scalar, mean, g_dev.data());
        });
        g_ptr = g_dev.data();
        g_scalar_b = 0.0f;
    }
#if FM_DTYPE == FM_F32
    if (bwd_tc) Reader::fail("the tensor-core backward exists for f16/bf16 only");
#endif

    if (naive) {
        run_naive(x, w, labels, blabels, g_ptr, g_scalar_b, p, mean, B, C, D, argv[2]);
        return 0;
    }
    // ---- forward (fused.rs: forward) ----
    auto xnorm = poisoned(B), wnorm = poisoned(C);
    fm_emu::launch(g3(cdiv(B * 32, 256)), g3(256), [&] { FM_ENTRY(fm_row_norms)(x.data(), B, D, xnorm.data()); });
    fm_emu::launch(g3(cdiv(C * 32, 256)), g3(256), [&] { FM_ENTRY(fm_row_norms)(w.data(), C, D, wnorm.data()); });
    // fwd_tc: 0 SIMT, 1 tensor cores (64 x 128 tiles), 2 tensor cores, wide (128 x 256 tiles),
    // 3 wgmma (128 x 128 tiles; f16/bf16 only).
#if FM_DTYPE != FM_F32
    typedef FmTcHalf TcOp;
#else
    typedef FmTcTf32 TcOp;
#endif
#if FM_DTYPE == FM_F32
    if (fwd_tc == 3) Reader::fail("the wgmma forward exists for f16/bf16 only");
#endif
    const i64 bm = fwd_tc >= 2 ? 128 : fwd_tc ? 64 : 32, bn = fwd_tc == 2 ? 256 : fwd_tc ? 128 : 32;
    size_t smem = fwd_tc == 2 ? FmTcShape<TcOp, 4, 8>::SMEM_BYTES : fwd_tc ? FmTcShape<TcOp, 2, 4>::SMEM_BYTES : 0;
#if FM_DTYPE != FM_F32
    if (fwd_tc == 3) smem = WG_SMEM_BYTES;
#endif
    const i64 ntiles = cdiv(C, bn);
    const int nsplit = (int)cdiv(ntiles, fwd_tps);
    auto part_m = poisoned(B * nsplit), part_s = poisoned(B * nsplit), zy = poisoned(B);
    // Under device_labels zy starts at 0, as the GPU's allocation does (not poisoned): a row whose
    // label is >= C has no z_iy written, and the combine must give NaN without reading it.
    if (device_labels) std::fill(zy.begin(), zy.end(), 0.0f);
    fm_emu::launch(g3(cdiv(B, bm), nsplit), g3(256), [&] {
        if (fwd_tc) {   // f16/bf16: fm_fwd_tiles_tc[_wide], fm_fwd_tiles_wg; f32: the TF32 kernels
#if FM_DTYPE != FM_F32
            auto k = fwd_tc == 3   ? FM_ENTRY(fm_fwd_tiles_wg)
                     : fwd_tc == 2 ? FM_ENTRY(fm_fwd_tiles_tc_wide)
                                   : FM_ENTRY(fm_fwd_tiles_tc);
#else
            auto k = fwd_tc == 2 ? FM_ENTRY(fm_fwd_tiles_tf32_wide) : FM_ENTRY(fm_fwd_tiles_tf32);
#endif
            k(x.data(), w.data(), labels.data(), xnorm.data(), wnorm.data(), p, B, C, D, fwd_tps, nsplit,
              part_m.data(), part_s.data(), zy.data());
            return;
        }
        FM_ENTRY(fm_fwd_tiles)(x.data(), w.data(), labels.data(), xnorm.data(), wnorm.data(), p, B, C, D, fwd_tps,
                               nsplit, part_m.data(), part_s.data(), zy.data());
    }, smem);
    auto lse = poisoned(B), row_loss = poisoned(B), loss = poisoned(1);
    fm_emu::launch(g3(cdiv(B, 256)), g3(256), [&] {
        FM_ENTRY(fm_combine_rows)(part_m.data(), part_s.data(), nsplit, zy.data(), labels.data(), B, C, lse.data(),
                                  row_loss.data());
    });
    fm_emu::launch(g3(1), g3(1024), [&] { FM_ENTRY(fm_reduce_loss)(row_loss.data(), labels.data(), B, mean, loss.data()); });

    // ---- backward (fused.rs: backward / backward_tc) ----
    auto dx = poisoned(B * D), dw = poisoned(C * D);
    FmParams pb = p;   // after the TF32 forward the SIMT backward recomputes with TF32 operands
    pb.tf32_dots = (FM_DTYPE == FM_F32 && fwd_tc != 0) ? 1 : 0;
    if (!bwd_tc) {
        const i64 ntl = cdiv(C, 32);
        const int ns = (int)cdiv(ntl, bwd_tps);
        const i64 dchunks = cdiv(D, 128);
        auto dxh_part = poisoned(ns * B * D), proj_part = poisoned(ns * B), dn_part = poisoned(ns * B);
        fm_emu::launch(g3(cdiv(B, 32), ns, dchunks), g3(256), [&] {
            FM_ENTRY(fm_grad_x_partial)(x.data(), w.data(), blabels.data(), xnorm.data(), wnorm.data(), lse.data(),
                                        g_ptr, g_scalar_b, pb, B, C, D, bwd_tps, ns, dxh_part.data(),
                                        proj_part.data(), dn_part.data());
        });
        fm_emu::launch(g3(cdiv(B * D, 256)), g3(256), [&] {
            FM_ENTRY_F32OUT(fm_x_finish)(x.data(), xnorm.data(), dxh_part.data(), proj_part.data(), dn_part.data(),
                                         ns, B, D, pb, dx.data());
        });
        fm_emu::launch(g3(ntl, dchunks), g3(256), [&] {
            FM_ENTRY_F32OUT(fm_grad_w)(x.data(), w.data(), blabels.data(), xnorm.data(), wnorm.data(), lse.data(),
                                       g_ptr, g_scalar_b, pb, B, C, D, dw.data());
        });
    } else {
#if FM_DTYPE != FM_F32
        // fused.rs: FmGt<64> (fm_grad_*_tc) for D <= 256, else FmGt<32> (fm_grad_*_tc_d512).
        const bool d512 = D > FmGt<64>::DCH;
        const i64 own = d512 ? 32 : 64, dch = d512 ? FmGt<32>::DCH : FmGt<64>::DCH;
        const size_t gsmem = d512 ? sizeof(FmGt<32>::Smem) : sizeof(FmGt<64>::Smem);
        const i64 ntl = cdiv(C, GT_PN);
        const int ns = (int)cdiv(ntl, bwd_tps);
        const i64 dchunks = cdiv(D, dch);
        auto scale = poisoned(1);
        fm_emu::launch(g3(1), g3(1024), [&] {
            FM_ENTRY(fm_grad_scale)(blabels.data(), xnorm.data(), g_ptr, g_scalar_b, p, B, scale.data());
        });
        auto dxh_part = poisoned(ns * B * D), proj_part = poisoned(ns * B), dn_part = poisoned(ns * B);
        fm_emu::launch(g3(cdiv(B, own), ns, dchunks), g3(256), [&] {
            auto k = d512 ? FM_ENTRY(fm_grad_x_tc_d512) : FM_ENTRY(fm_grad_x_tc);
            k(x.data(), w.data(), blabels.data(), xnorm.data(), wnorm.data(), lse.data(), g_ptr, g_scalar_b, p, B, C,
              D, bwd_tps, ns, dxh_part.data(), proj_part.data(), dn_part.data());
        }, gsmem);
        fm_emu::launch(g3(cdiv(B * D, 256)), g3(256), [&] {
            FM_ENTRY_F32OUT(fm_x_finish)(x.data(), xnorm.data(), dxh_part.data(), proj_part.data(), dn_part.data(),
                                         ns, B, D, p, dx.data());
        });
        fm_emu::launch(g3(cdiv(C, own), dchunks), g3(256), [&] {
            auto k = d512 ? FM_ENTRY_F32OUT(fm_grad_w_tc_d512) : FM_ENTRY_F32OUT(fm_grad_w_tc);
            k(x.data(), w.data(), blabels.data(), xnorm.data(), wnorm.data(), lse.data(), g_ptr, g_scalar_b,
              scale.data(), p, B, C, D, dw.data());
        }, gsmem);
#endif
    }

    write_out(argv[2], {&loss, &lse, &row_loss, &dx, &dw});
    return 0;
}
