//! The launch-plan builder (src/cuda/plan.rs) on the device kinds users have, without a GPU:
//! which kernels it picks for every dtype, alignment and shape, how it splits the classes, what
//! it allocates, and that every plan is well formed (each buffer it names is bound or allocated,
//! written before it is read, and within CUDA's grid limits). The emulated tests run the plans
//! themselves (tests/emulated_kernels.rs). The family argument structs (kernels/args.cuh) are
//! checked here too: their layouts, and that every tile and gradient launch passes one.
use fused_margin::cuda::args::{self, FieldKind, Value, GRAD_ARGS, LAYOUTS, TILE_ARGS};
use fused_margin::cuda::params::FmParams;
use fused_margin::cuda::plan::{
    self, Arg, BackwardProblem, Buf, Choices, DeviceFacts, ForwardProblem, Init, LaunchPlan,
    PlanUpstream, Step,
};
use fused_margin::cuda::{LabelCheck, Plan};
use fused_margin::{DType, MarginLoss, Shape};
use std::collections::HashSet;

const DEVICES: [(&str, DeviceFacts); 5] = [
    ("A100 sm_80", DeviceFacts::A100),
    ("RTX sm_86", DeviceFacts::SM86),
    ("L40 sm_89", DeviceFacts::SM89),
    ("H100 PCIe", DeviceFacts::H100_PCIE),
    (
        "H100/H200 sm_90a",
        DeviceFacts {
            sm90a: true,
            ..DeviceFacts::H100
        },
    ),
];
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn params() -> FmParams {
    FmParams::from_spec(&MarginLoss::arcface(0.5))
}

fn fwd(dev: &DeviceFacts, ch: &Choices, dtype: DType, shape: Shape, aligned: bool) -> LaunchPlan {
    plan::forward(
        dev,
        ch,
        &ForwardProblem {
            dtype,
            shape,
            aligned,
            params: params(),
            mean: true,
            row_margins: false,
        },
    )
    .unwrap_or_else(|e| panic!("{ch:?} {dtype:?} {shape:?}: {e}"))
}

fn bwd(
    dev: &DeviceFacts,
    ch: &Choices,
    dtype: DType,
    shape: Shape,
    aligned: bool,
    fwd_tc: bool,
) -> LaunchPlan {
    plan::backward(
        dev,
        ch,
        &BackwardProblem {
            dtype,
            grad_dtype: DType::F32,
            shape,
            aligned,
            params: params(),
            mean: true,
            upstream: PlanUpstream::Scalar(0.25),
            fwd_tensor_cores: fwd_tc,
            row_margins: false,
        },
    )
    .unwrap_or_else(|e| panic!("{ch:?} {dtype:?} {shape:?}: {e}"))
}

/// The entry of the launch that writes `buf`.
fn writer(p: &LaunchPlan, buf: Buf) -> &str {
    p.launches()
        .find(|l| l.args.contains(&Arg::Write(buf)))
        .map(|l| l.entry.as_str())
        .unwrap_or_else(|| panic!("nothing writes {buf:?}"))
}

/// Every buffer a step names is given (`given`) or allocated; an uninitialized allocation is
/// written before anything reads it; grids are non-empty.
fn well_formed(p: &LaunchPlan, given: &[Buf], what: &str) {
    let allocated: HashSet<Buf> = p.buffers.iter().map(|b| b.buf).collect();
    assert_eq!(
        allocated.len(),
        p.buffers.len(),
        "{what}: a buffer allocated twice"
    );
    // Every allocated buffer is uninitialized: written by a launch before any launch reads it.
    assert!(p.buffers.iter().all(|b| b.init == Init::Uninit), "{what}");
    let mut written: HashSet<Buf> = HashSet::new();
    for st in &p.steps {
        let (reads, writes): (Vec<Buf>, Vec<Buf>) = match st {
            Step::Kernel(l) => {
                // The tile and gradient families take their struct (kernels/args.cuh), every
                // field of its kind; no other kernel takes one.
                let family = l.entry.starts_with("fm_fwd_tiles")
                    || l.entry.starts_with("fm_grad_x")
                    || l.entry.starts_with("fm_grad_w");
                match l.packed {
                    Some(layout) => {
                        assert!(family, "{what}: {} packed as {}", l.entry, layout.name);
                        args::check(&l.entry, layout, &l.args)
                            .unwrap_or_else(|e| panic!("{what}: {e}"));
                    }
                    None => assert!(!family, "{what}: {} positional", l.entry),
                }
                assert!(l.grid.iter().all(|&g| g >= 1), "{what}: {} grid", l.entry);
                assert!(l.block >= 1 && l.block <= 1024, "{what}: {} block", l.entry);
                let r = l
                    .args
                    .iter()
                    .filter_map(|a| match a {
                        Arg::Read(b) => Some(*b),
                        _ => None,
                    })
                    .collect();
                let w = l
                    .args
                    .iter()
                    .filter_map(|a| match a {
                        Arg::Write(b) => Some(*b),
                        _ => None,
                    })
                    .collect();
                (r, w)
            }
            Step::Gemm(g) => (vec![g.a, g.b], vec![g.c]),
            Step::Exchange { send, recv, .. } => (vec![*send], vec![*recv]),
        };
        for b in reads {
            assert!(
                given.contains(&b) && !allocated.contains(&b) || written.contains(&b),
                "{what}: {b:?} read before it is written"
            );
        }
        for b in writes {
            assert!(allocated.contains(&b), "{what}: writes {b:?}, not its own");
            written.insert(b);
        }
    }
}

const FWD_GIVEN: [Buf; 3] = [Buf::X, Buf::W, Buf::Labels];
const BWD_GIVEN: [Buf; 9] = [
    Buf::X,
    Buf::W,
    Buf::Labels,
    Buf::GRows,
    Buf::XNorm,
    Buf::WNorm,
    Buf::Lse,
    Buf::Target,
    Buf::PrevStatus,
];

#[test]
fn forward_kernel_by_dtype_alignment_and_device() {
    let ch = Choices::default();
    for (name, dev) in DEVICES {
        for dtype in DTYPES {
            for d in [64, 100, 130, 512] {
                for aligned in [true, false] {
                    let shape = Shape::new(1000, d, 50_000);
                    let p = fwd(&dev, &ch, dtype, shape, aligned);
                    let what = format!("{name} {dtype:?} D = {d} aligned {aligned}");
                    well_formed(&p, &FWD_GIVEN, &what);
                    // Tensor cores by default for 16-bit inputs with 16-byte rows and aligned
                    // matrices; f32 stays exact (SIMT) unless TF32 is asked for.
                    let tc = dtype != DType::F32 && d % 8 == 0 && aligned;
                    assert_eq!(p.tensor_cores, tc, "{what}");
                    assert!(!p.wgmma, "{what}: wgmma is opt-in");
                    let want = if tc {
                        "fm_fwd_tiles_tc"
                    } else {
                        "fm_fwd_tiles"
                    };
                    assert_eq!(writer(&p, Buf::PartM), want, "{what}");
                }
            }
        }
    }
}

#[test]
fn opt_in_forward_tiles_fall_back_by_shared_memory_and_arch() {
    let shape = Shape::new(4096, 512, 100_000);
    for (name, dev) in DEVICES {
        for dtype in DTYPES {
            let what = format!("{name} {dtype:?}");
            let wide = Choices {
                wide_tiles: true,
                tf32: true,
                ..Choices::default()
            };
            let p = fwd(&dev, &wide, dtype, shape, true);
            // 96,256 bytes: within every listed device's opt-in limit (99 KB or more).
            let want = if dtype == DType::F32 {
                "fm_fwd_tiles_tf32_wide"
            } else {
                "fm_fwd_tiles_tc_wide"
            };
            assert_eq!(writer(&p, Buf::PartM), want, "{what}");
            let wg = Choices {
                wgmma: true,
                ..Choices::default()
            };
            let p = fwd(&dev, &wg, dtype, shape, true);
            let wg_ok = dtype != DType::F32 && dev.sm90a;
            assert_eq!(p.wgmma, wg_ok, "{what}: wgmma only from an sm_90a module");
            let launch = p
                .launches()
                .find(|l| l.args.contains(&Arg::Write(Buf::PartM)))
                .unwrap();
            assert!(launch.smem <= dev.smem_optin, "{what}: shared memory");
            if wg_ok {
                assert_eq!(launch.entry, "fm_fwd_tiles_wg", "{what}");
            }
            // Less shared memory than the wgmma pipeline needs: the mma.sync tiles instead.
            let small = DeviceFacts {
                smem_optin: 101_376,
                ..dev
            };
            assert!(!fwd(&small, &wg, dtype, shape, true).wgmma, "{what}");
        }
    }
}

#[test]
fn tensor_cores_off_and_tf32_on() {
    let dev = DeviceFacts::H100;
    let shape = Shape::new(256, 128, 10_000);
    let off = Choices {
        tensor_cores: false,
        tf32: true,
        tc_backward: true,
        ..Choices::default()
    };
    for dtype in DTYPES {
        let p = fwd(&dev, &off, dtype, shape, true);
        assert!(!p.tensor_cores, "{dtype:?}: tensor cores switched off");
        let b = bwd(&dev, &off, dtype, shape, true, false);
        assert!(
            !b.tensor_cores,
            "{dtype:?}: no tensor-core backward without tensor cores"
        );
    }
    let tf32 = Choices {
        tf32: true,
        ..Choices::default()
    };
    assert_eq!(
        writer(&fwd(&dev, &tf32, DType::F32, shape, true), Buf::PartM),
        "fm_fwd_tiles_tf32"
    );
    // D % 4 != 0: no 16-byte f32 chunks, SIMT.
    let odd = Shape::new(256, 130, 10_000);
    assert!(!fwd(&dev, &tf32, DType::F32, odd, true).tensor_cores);
    // After a TF32 forward the SIMT backward rounds its operands to TF32 as well.
    let b = bwd(&dev, &tf32, DType::F32, shape, true, true);
    let l = b
        .launches()
        .find(|l| l.entry == "fm_grad_x_partial")
        .unwrap();
    let tf32_dots = l
        .args
        .iter()
        .any(|a| matches!(a, Arg::Params(p) if p.tf32_dots == 1));
    assert!(tf32_dots, "tf32_dots after a TF32 forward");
}

#[test]
fn backward_tiles_by_dtype_and_d() {
    let tc = Choices {
        tc_backward: true,
        ..Choices::default()
    };
    for (name, dev) in DEVICES {
        for dtype in DTYPES {
            for (d, aligned) in [
                (64, true),
                (256, true),
                (264, true),
                (512, true),
                (672, true),
                (680, true),
                (1024, true),
                (2048, true),
                (100, true),
                (64, false),
            ] {
                let shape = Shape::new(512, d, 20_000);
                let what = format!("{name} {dtype:?} D = {d} aligned {aligned}");
                let p = bwd(&dev, &tc, dtype, shape, aligned, true);
                well_formed(&p, &BWD_GIVEN, &what);
                // The tensor-core kernels hold their own rows and 2 partner tiles (else 1) in
                // shared memory with all D columns; where not even 1 fits, SIMT.
                let optin = dev.smem_optin as usize;
                let stages = [2, 1]
                    .into_iter()
                    .find(|&st| plan::tc_backward_smem(d, st) <= optin);
                let on = dtype != DType::F32 && d % 8 == 0 && aligned && stages.is_some();
                assert_eq!(p.tensor_cores, on, "{what}");
                let (x, w) = match (on, d > 256) {
                    (false, _) => ("fm_grad_x_partial", "fm_grad_w_f32out"),
                    (true, false) => ("fm_grad_x_tc", "fm_grad_w_tc_f32out"),
                    (true, true) => ("fm_grad_x_tc_d512", "fm_grad_w_tc_d512_f32out"),
                };
                let w = if dtype == DType::F32 {
                    w.trim_end_matches("_f32out")
                } else {
                    w
                };
                assert_eq!(writer(&p, Buf::DxhPart), x, "{what}");
                assert_eq!(writer(&p, Buf::Dw), w, "{what}");
                assert_eq!(p.spec_of(Buf::Scale).is_some(), on, "{what}: K only on TC");
                // Both gradient kernels get the buffers' shared memory and their count (the
                // last field of FmGradArgs), within the device's limit.
                let want_stages = if on { stages.unwrap() } else { 0 };
                for l in p.launches().filter(|l| l.entry == x || l.entry == w) {
                    let smem = if on {
                        plan::tc_backward_smem(d, want_stages) as u32
                    } else {
                        0
                    };
                    assert_eq!(l.smem, smem, "{what}: {} shared memory", l.entry);
                    assert!(l.smem <= dev.smem_optin, "{what}");
                    assert_eq!(
                        l.args.last(),
                        Some(&Arg::I32(want_stages as i32)),
                        "{what}: {} stages",
                        l.entry
                    );
                }
            }
        }
    }
    // Where the buffers go: on an H100 (227 KB) two stages up to D = 672 (FmGt<32>: 172,288
    // bytes at D = 512), one up to D = 1,152, SIMT past that; on a 99 KB sm_86/89 part one stage
    // up to D = 480.
    let h100 = DeviceFacts::H100.smem_optin as usize;
    assert_eq!(plan::tc_backward_smem(512, 2), 172_288);
    assert_eq!(plan::tc_backward_smem(256, 2), 11_520 + 2 * 264 * 192);
    assert!(plan::tc_backward_smem(672, 2) <= h100 && plan::tc_backward_smem(680, 2) > h100);
    assert!(plan::tc_backward_smem(1152, 1) <= h100 && plan::tc_backward_smem(1160, 1) > h100);
    let sm86 = DeviceFacts::SM86.smem_optin as usize;
    assert!(plan::tc_backward_smem(256, 2) > sm86 && plan::tc_backward_smem(256, 1) <= sm86);
    assert!(plan::tc_backward_smem(480, 1) <= sm86 && plan::tc_backward_smem(488, 1) > sm86);
    // The tensor-core backward is the default; switched off, the backward is SIMT whatever the
    // inputs.
    let on = bwd(
        &DeviceFacts::H100,
        &Choices::default(),
        DType::BF16,
        Shape::new(64, 64, 64),
        true,
        true,
    );
    assert!(on.tensor_cores, "the default");
    let off = Choices {
        tc_backward: false,
        ..Choices::default()
    };
    let p = bwd(
        &DeviceFacts::H100,
        &off,
        DType::BF16,
        Shape::new(64, 64, 64),
        true,
        true,
    );
    assert!(!p.tensor_cores);
}

/// Class splits fill the device ([`plan::BLOCKS_PER_SM`] blocks per SM) within their caps,
/// every split non-empty, and the dx partials they cost stay bounded.
#[test]
fn splits_fill_the_device_within_their_caps() {
    for (name, dev) in DEVICES {
        for (b, c) in [
            (1, 1),
            (7, 3),
            (128, 10_000),
            (512, 1_000_000),
            (65_536, 100),
            (4_096, 10_000_000),
        ] {
            let shape = Shape::new(b, 512, c);
            let what = format!("{name} B = {b} C = {c}");
            let p = fwd(&dev, &Choices::default(), DType::BF16, shape, true);
            let nsplit = p.spec_of(Buf::PartM).unwrap().len / b;
            let ntiles = c.div_ceil(128);
            let row_tiles = b.div_ceil(64);
            assert!(
                (1..=1024.min(ntiles)).contains(&nsplit),
                "{what}: {nsplit} forward splits"
            );
            assert!(
                nsplit == ntiles.min(1024)
                    || row_tiles * nsplit >= plan::BLOCKS_PER_SM * dev.sm_count,
                "{what}: {nsplit} splits x {row_tiles} row tiles leave SMs idle"
            );
            let tc = Choices {
                tc_backward: true,
                ..Choices::default()
            };
            for ch in [Choices::default(), tc] {
                let p = bwd(&dev, &ch, DType::BF16, shape, true, true);
                // The tensor-core dx kernel's cap, or the SIMT one's where its buffers do not
                // fit the device (D = 512 on a 99 KB part).
                let cap = if p.tensor_cores { 32 } else { 64 };
                let parts = p.spec_of(Buf::DxhPart).unwrap().len;
                assert!(parts <= cap * b * 512, "{what}: dx partials {parts}");
                assert_eq!(parts % (b * 512), 0, "{what}");
                well_formed(&p, &BWD_GIVEN, &what);
            }
        }
    }
}

#[test]
fn the_test_override_sets_the_splits() {
    let ch = Choices {
        tiles_per_split: Some((2, 3)),
        ..Choices::default()
    };
    let shape = Shape::new(40, 64, 1000);
    let p = fwd(&DeviceFacts::H100, &ch, DType::F16, shape, true);
    // 1000 classes in tiles of 128: 8 tiles, 4 splits of 2.
    assert_eq!(p.spec_of(Buf::PartM).unwrap().len, 40 * 4);
    let l = p.launches().find(|l| l.entry == "fm_fwd_tiles_tc").unwrap();
    assert_eq!(l.grid, [1, 4, 1]);
}

#[test]
fn naive_plan_uses_cublas_when_loaded() {
    let ch = Choices {
        plan: Plan::Naive,
        ..Choices::default()
    };
    let shape = Shape::new(30, 20, 50);
    for cublas in [false, true] {
        let dev = DeviceFacts {
            cublas,
            ..DeviceFacts::A100
        };
        for dtype in DTYPES {
            let what = format!("cuBLAS {cublas} {dtype:?}");
            let f = fwd(&dev, &ch, dtype, shape, true);
            let b = bwd(&dev, &ch, dtype, shape, true, false);
            well_formed(&f, &FWD_GIVEN, &what);
            well_formed(&b, &BWD_GIVEN, &what);
            let gemms = |p: &LaunchPlan| {
                p.steps
                    .iter()
                    .filter(|s| matches!(s, Step::Gemm(_)))
                    .count()
            };
            assert_eq!(gemms(&f), cublas as usize, "{what}");
            assert_eq!(gemms(&b), 3 * cublas as usize, "{what}");
            assert!(!f.tensor_cores && !b.tensor_cores);
            // The B x C intermediates the naive plan is the baseline for.
            assert_eq!(f.spec_of(Buf::Prob).unwrap().len, 30 * 50);
        }
    }
}

#[test]
fn device_label_check_folds_into_the_loss_and_feeds_the_backward() {
    let ch = Choices {
        label_check: LabelCheck::Device,
        tc_backward: true,
        ..Choices::default()
    };
    for plan_kind in [Plan::Fused, Plan::Naive] {
        let ch = Choices {
            plan: plan_kind,
            ..ch
        };
        let shape = Shape::new(40, 64, 70);
        let f = fwd(&DeviceFacts::H100, &ch, DType::BF16, shape, true);
        // The forward's status comes from the loss reduction: no launch of its own.
        assert!(f.launches().all(|l| l.entry != "fm_label_status"));
        assert_eq!(writer(&f, Buf::Status), "fm_reduce_loss");
        let host = fwd(
            &DeviceFacts::H100,
            &Choices {
                label_check: LabelCheck::Host,
                ..ch
            },
            DType::BF16,
            shape,
            true,
        );
        assert_eq!(f.launches().count(), host.launches().count());
        assert!(host.spec_of(Buf::Status).is_none());
        let b = bwd(
            &DeviceFacts::H100,
            &ch,
            DType::BF16,
            shape,
            true,
            f.tensor_cores,
        );
        well_formed(&b, &BWD_GIVEN, &format!("{plan_kind:?}"));
        // One launch: the backward's status, compared with the forward's, and the upstream.
        let first = b.launches().next().unwrap();
        assert_eq!(first.entry, "fm_label_status");
        assert!(first.args.contains(&Arg::Read(Buf::PrevStatus)));
        assert!(first.args.contains(&Arg::Write(Buf::Status)));
        assert!(first.args.contains(&Arg::Write(Buf::GDev)));
        assert_eq!(
            b.launches()
                .filter(|l| l.entry == "fm_label_status")
                .count(),
            1
        );
        // Every gradient kernel takes the device's per-row upstream, with a zero scalar.
        for l in b.launches().skip(1) {
            if l.args.contains(&Arg::Read(Buf::GDev)) {
                assert!(l.args.contains(&Arg::F32(0.0)), "{}", l.entry);
            }
        }
        assert!(b.launches().any(|l| l.args.contains(&Arg::Read(Buf::GDev))));
    }
}

#[test]
fn bad_problems_are_typed_errors() {
    let dev = DeviceFacts::H100;
    let ch = Choices::default();
    let p = ForwardProblem {
        dtype: DType::F64,
        shape: Shape::new(2, 2, 2),
        aligned: true,
        params: params(),
        mean: true,
        row_margins: false,
    };
    assert!(matches!(
        plan::forward(&dev, &ch, &p),
        Err(fused_margin::Error::Unsupported { .. })
    ));
    // More row tiles than a grid holds.
    let huge = ForwardProblem {
        dtype: DType::F32,
        shape: Shape::new(1 << 37, 4, 4),
        ..p
    };
    assert!(matches!(
        plan::forward(&dev, &ch, &huge),
        Err(fused_margin::Error::TooLarge { .. })
    ));
    let b = BackwardProblem {
        dtype: DType::BF16,
        grad_dtype: DType::F16,
        shape: Shape::new(2, 8, 2),
        aligned: true,
        params: params(),
        mean: true,
        upstream: PlanUpstream::PerRow,
        fwd_tensor_cores: true,
        row_margins: false,
    };
    assert!(matches!(
        plan::backward(&dev, &ch, &b),
        Err(fused_margin::Error::Unsupported { .. })
    ));
}

/// The 64-bit sizes reach the kernels as i64 where B*C or C*D exceed 2^31.
#[test]
fn huge_shapes_take_64_bit_sizes() {
    let shape = Shape::new(100_000, 512, 10_000_000);
    let p = fwd(
        &DeviceFacts::H100,
        &Choices::default(),
        DType::BF16,
        shape,
        true,
    );
    let l = p.launches().find(|l| l.entry == "fm_fwd_tiles_tc").unwrap();
    assert!(l.args.contains(&Arg::I64(10_000_000)) && l.args.contains(&Arg::I64(100_000)));
    well_formed(&p, &FWD_GIVEN, "huge");
}

/// The argument structs' layouts as C lays them out: the sizes the kernels' static_asserts pin
/// (geometry.cuh), the offsets of the first fields after the pointers, and no interior padding.
#[test]
fn argument_struct_layouts() {
    for l in LAYOUTS {
        let (offs, size) = l.offsets();
        assert_eq!(
            size, l.bytes,
            "{}: packed size against geometry.cuh",
            l.name
        );
        let used: usize = l
            .fields
            .iter()
            .map(|f| match f.kind {
                FieldKind::ConstPtr | FieldKind::MutPtr | FieldKind::I64 => 8,
                FieldKind::Params => std::mem::size_of::<FmParams>(),
                FieldKind::I32 | FieldKind::F32 => 4,
            })
            .sum();
        assert!(
            size - used < 8,
            "{}: {} bytes of padding",
            l.name,
            size - used
        );
        let first = offs[1..].iter().zip(&offs).all(|(b, a)| b > a);
        assert!(first, "{}: offsets increase", l.name);
    }
    let at = |l: &args::Layout, name: &str| {
        let i = l.fields.iter().position(|f| f.name == name).unwrap();
        l.offsets().0[i]
    };
    // 10 pointers, then FmParams (80 bytes), then B at 160.
    assert_eq!((at(&TILE_ARGS, "p"), at(&TILE_ARGS, "B")), (80, 160));
    assert_eq!((TILE_ARGS.bytes, GRAD_ARGS.bytes), (192, 232));
    // 14 pointers, FmParams, B, C, then g_scalar at 208.
    assert_eq!(
        (at(&GRAD_ARGS, "p"), at(&GRAD_ARGS, "g_scalar")),
        (112, 208)
    );
}

/// A plan whose arguments do not fit a struct is a typed error, not a launch; packing puts
/// each value at its field's offset.
#[test]
fn argument_structs_are_checked_and_packed() {
    let p = fwd(
        &DeviceFacts::H100,
        &Choices::default(),
        DType::BF16,
        Shape::new(40, 24, 300),
        true,
    );
    let l = p.launches().find(|l| l.packed.is_some()).unwrap();
    let layout = l.packed.unwrap();
    assert_eq!(layout.name, "FmTileArgs");
    let mut short = l.args.clone();
    short.pop();
    assert!(
        args::check(&l.entry, layout, &short).is_err(),
        "a field missing"
    );
    let mut swapped = l.args.clone();
    swapped[0] = Arg::Write(Buf::X); // x is `const T_IN*`
    let e = args::check(&l.entry, layout, &swapped).unwrap_err();
    assert!(e.to_string().contains("FmTileArgs.x"), "{e}");
    let values: Vec<Value> = l
        .args
        .iter()
        .enumerate()
        .map(|(i, a)| match *a {
            Arg::Read(_) | Arg::Write(_) | Arg::Null => Value::Ptr(0x1000 + 8 * i as u64),
            Arg::I64(v) => Value::I64(v),
            Arg::I32(v) => Value::I32(v),
            Arg::F32(v) => Value::F32(v),
            Arg::Params(v) => Value::Params(v),
        })
        .collect();
    let bytes = args::pack(&l.entry, layout, &values).unwrap();
    let word = |at: usize| i64::from_ne_bytes(bytes.0[at..at + 8].try_into().unwrap());
    assert_eq!(word(8), 0x1008, "w is the second pointer");
    assert_eq!((word(160), word(168)), (40, 300), "B and C");
    let int = |at: usize| i32::from_ne_bytes(bytes.0[at..at + 4].try_into().unwrap());
    assert_eq!(int(176), 24, "D");
    assert!(args::pack(&l.entry, layout, &values[1..]).is_err());
    let mut wrong = values.clone();
    wrong[0] = Value::I32(1); // x is a pointer
    let e = args::pack(&l.entry, layout, &wrong)
        .err()
        .expect("a pointer field given an i32");
    assert!(e.to_string().contains("FmTileArgs.x"), "{e}");
}

/// The plan builder's default choices are the handle's default options.
#[test]
fn default_choices_are_the_default_options() {
    let o = fused_margin::cuda::Options::default();
    let c = Choices::default();
    assert_eq!(c.plan, o.plan);
    assert_eq!(c.tensor_cores, o.tensor_cores);
    assert_eq!(c.tc_backward, o.tensor_core_backward);
    assert_eq!(c.label_check, o.label_check);
    assert_eq!(
        c.tf32,
        o.f32_precision == fused_margin::cuda::F32Precision::Tf32
    );
    assert_eq!(
        (c.wide_tiles, c.wgmma),
        (
            o.kernel_override.wide_forward_tiles,
            o.kernel_override.wgmma
        )
    );
}

/// The workspace arena (src/cuda/exec.rs): the fused plans pool every f32 workspace at disjoint,
/// 256-byte aligned offsets and never an output; the naive plan (B x C workspaces) pools nothing;
/// a later call of the same shape fits the arena the first one sized.
#[test]
fn fused_workspaces_share_one_arena_and_outputs_stay_apart() {
    let dev = DeviceFacts::H100;
    for dtype in DTYPES {
        for (b, d, c) in [(37, 72, 301), (512, 512, 100_000)] {
            let shape = Shape::new(b, d, c);
            for plan_kind in [Plan::Fused, Plan::Naive] {
                let ch = Choices {
                    plan: plan_kind,
                    ..Choices::default()
                };
                let f = fwd(&dev, &ch, dtype, shape, true);
                let g = bwd(&dev, &ch, dtype, shape, true, f.tensor_cores);
                let what = format!("{plan_kind:?} {dtype:?} {shape:?}");
                assert_eq!(f.pooled, plan_kind == Plan::Fused, "{what}");
                assert_eq!(g.pooled, plan_kind == Plan::Fused, "{what}");
                let mut need = 0;
                for (p, keep) in [
                    (&f, &plan::FORWARD_OUTPUTS[..]),
                    (&g, &plan::BACKWARD_OUTPUTS[..]),
                ] {
                    let (len, offs) = p.arena_layout(keep);
                    need = need.max(len);
                    if !p.pooled {
                        assert_eq!((len, offs.len()), (0, 0), "{what}");
                        continue;
                    }
                    let mut regions: Vec<(usize, usize)> = Vec::new();
                    for &(buf, off) in &offs {
                        assert!(!keep.contains(&buf), "{what}: output {buf:?} pooled");
                        assert_eq!(off % plan::ARENA_ALIGN, 0, "{what}: {buf:?} at {off}");
                        let spec = p.spec_of(buf).unwrap();
                        assert_eq!(spec.elem, plan::Elem::F32, "{what}: {buf:?}");
                        regions.push((off, off + spec.len.max(1)));
                    }
                    regions.sort();
                    for w in regions.windows(2) {
                        assert!(w[0].1 <= w[1].0, "{what}: overlapping {w:?}");
                    }
                    assert!(regions.last().is_none_or(|r| r.1 <= len), "{what}");
                    // Every workspace of the plan is pooled (the fused plans have f32 ones only).
                    let workspaces = p.buffers.iter().filter(|s| !keep.contains(&s.buf)).count();
                    assert_eq!(offs.len(), workspaces, "{what}");
                    // The arena is the plan's stated workspace, rounded up per buffer.
                    assert!(len * 4 >= p.workspace_bytes, "{what}");
                    assert!(len * 4 <= p.workspace_bytes + 256 * offs.len(), "{what}");
                }
                // The same shape again needs no more.
                let f2 = fwd(&dev, &ch, dtype, shape, true);
                assert!(f2.arena_layout(&plan::FORWARD_OUTPUTS).0 <= need, "{what}");
            }
        }
    }
}

/// Sub-center ArcFace (K = 3): the `*_sc` instantiations on every forward path (no wide tiles,
/// which have none), the SIMT backward whatever is asked (its dW grid one block row per
/// sub-center), w's norms and dW of C K rows, and the naive plan's B x C K intermediates with
/// cuBLAS and without.
#[test]
fn subcenter_picks_its_instantiations() {
    let k = 3;
    let p = FmParams::from_spec(&MarginLoss::subcenter(k));
    assert_eq!(p.centers, 3);
    assert_eq!(params().centers, 1);
    let shape = Shape::new(200, 64, 1_000);
    let run = |dev: &DeviceFacts, ch: &Choices, dtype: DType| {
        let f = plan::forward(
            dev,
            ch,
            &ForwardProblem {
                dtype,
                shape,
                aligned: true,
                params: p,
                mean: true,
                row_margins: false,
            },
        )
        .unwrap();
        let b = plan::backward(
            dev,
            ch,
            &BackwardProblem {
                dtype,
                grad_dtype: DType::F32,
                shape,
                aligned: true,
                params: p,
                mean: true,
                upstream: PlanUpstream::Scalar(0.25),
                fwd_tensor_cores: f.tensor_cores,
                row_margins: false,
            },
        )
        .unwrap();
        (f, b)
    };
    for (name, dev) in DEVICES {
        for dtype in DTYPES {
            for ch in [
                Choices::default(),
                Choices {
                    wide_tiles: true,
                    tf32: true,
                    tc_backward: true,
                    ..Choices::default()
                },
                Choices {
                    wgmma: true,
                    tc_backward: true,
                    ..Choices::default()
                },
                Choices {
                    tensor_cores: false,
                    ..Choices::default()
                },
            ] {
                let what = format!("{name} {dtype:?} {ch:?}");
                let (f, b) = run(&dev, &ch, dtype);
                well_formed(&f, &FWD_GIVEN, &what);
                well_formed(&b, &BWD_GIVEN, &what);
                let half = dtype != DType::F32;
                let want = match (f.tensor_cores, f.wgmma, half) {
                    (false, _, _) => "fm_fwd_tiles_sc",
                    (true, true, _) => "fm_fwd_tiles_wg_sc",
                    (true, false, true) => "fm_fwd_tiles_tc_sc",
                    (true, false, false) => "fm_fwd_tiles_tf32_sc",
                };
                assert_eq!(writer(&f, Buf::PartM), want, "{what}");
                assert_eq!(f.wgmma, ch.wgmma && half && dev.sm90a, "{what}");
                assert_eq!(
                    f.tensor_cores,
                    ch.tensor_cores && (half || ch.tf32),
                    "{what}"
                );
                assert!(!b.tensor_cores, "{what}: the SIMT backward");
                assert_eq!(writer(&b, Buf::DxhPart), "fm_grad_x_partial_sc", "{what}");
                let wk = b
                    .launches()
                    .find(|l| l.args.contains(&Arg::Write(Buf::Dw)))
                    .unwrap();
                assert!(wk.entry.starts_with("fm_grad_w_sc"), "{what}: {}", wk.entry);
                assert_eq!(wk.grid[0] as usize, 1_000usize.div_ceil(32) * k, "{what}");
                assert_eq!(b.spec_of(Buf::Dw).unwrap().len, 1_000 * k * 64, "{what}");
                assert_eq!(f.spec_of(Buf::WNorm).unwrap().len, 1_000 * k, "{what}");
            }
        }
    }
    for cublas in [false, true] {
        let dev = DeviceFacts {
            cublas,
            ..DeviceFacts::A100
        };
        let ch = Choices {
            plan: Plan::Naive,
            ..Choices::default()
        };
        let what = format!("naive, cuBLAS {cublas}");
        let (f, b) = run(&dev, &ch, DType::BF16);
        well_formed(&f, &FWD_GIVEN, &what);
        well_formed(&b, &BWD_GIVEN, &what);
        assert_eq!(
            f.spec_of(Buf::CosAll).unwrap().len,
            200 * 1_000 * k,
            "{what}"
        );
        assert_eq!(f.spec_of(Buf::Cos).unwrap().len, 200 * 1_000, "{what}");
        assert_eq!(writer(&f, Buf::Win), "naive_subcenter_max", "{what}");
        assert_eq!(writer(&b, Buf::DcAll), "naive_subcenter_scatter", "{what}");
        assert_eq!(b.spec_of(Buf::Wh).unwrap().len, 1_000 * k * 64, "{what}");
        assert_eq!(b.spec_of(Buf::Dw).unwrap().len, 1_000 * k * 64, "{what}");
    }
}

/// The class-sharded forward: the fused forward's tiles, then this rank's records, the exchange,
/// the combine in rank order and the loss, in that order; its records sized for the world; the
/// host label check only; the naive plan, CurricularFace and ElasticFace+ refused.
#[test]
fn sharded_forward_plans() {
    use fused_margin::cuda::LabelCheck;
    use fused_margin::{ElasticKind, ElasticPlus};
    let host = Choices {
        label_check: LabelCheck::Host,
        ..Choices::default()
    };
    let problem = |spec: &MarginLoss, row_margins| ForwardProblem {
        dtype: DType::BF16,
        shape: Shape::new(1024, 512, 250_000),
        aligned: true,
        params: FmParams::from_spec(spec),
        mean: true,
        row_margins,
    };
    for (name, dev) in DEVICES {
        for world in [1, 2, 8] {
            let p = plan::shard_forward(
                &dev,
                &host,
                &problem(&MarginLoss::arcface(0.5), false),
                world,
                false,
            )
            .unwrap();
            let what = format!("{name}, {world} ranks");
            well_formed(&p, &FWD_GIVEN, &what);
            let order: Vec<String> = p
                .steps
                .iter()
                .map(|s| match s {
                    Step::Kernel(l) => l.entry.clone(),
                    Step::Exchange { send, recv, .. } => format!("exchange {send:?} -> {recv:?}"),
                    Step::Gemm(_) => "gemm".into(),
                })
                .collect();
            let tail: Vec<&str> = order[order.len() - 4..]
                .iter()
                .map(|s| s.as_str())
                .collect();
            assert_eq!(
                tail,
                [
                    "fm_shard_stats",
                    "exchange ShardRec -> ShardAll",
                    "fm_shard_combine",
                    "fm_reduce_loss"
                ],
                "{what}"
            );
            assert!(!order.iter().any(|e| e == "fm_combine_rows"), "{what}");
            assert_eq!(
                p.spec_of(Buf::ShardRec).unwrap().len,
                1024 * plan::SHARD_REC
            );
            assert_eq!(
                p.spec_of(Buf::ShardAll).unwrap().len,
                1024 * plan::SHARD_REC * world
            );
            // The tiles are the plain forward's on this rank's classes.
            let plain =
                plan::forward(&dev, &host, &problem(&MarginLoss::arcface(0.5), false)).unwrap();
            assert_eq!(writer(&p, Buf::PartM), writer(&plain, Buf::PartM), "{what}");
        }
    }
    let dev = DeviceFacts::H100;
    let refused = |ch: &Choices, spec: &MarginLoss, rm| {
        matches!(
            plan::shard_forward(&dev, ch, &problem(spec, rm), 4, false),
            Err(fused_margin::Error::Unsupported { .. })
        )
    };
    assert!(
        refused(&Choices::default(), &MarginLoss::arcface(0.5), false),
        "device labels"
    );
    let naive = Choices {
        plan: fused_margin::cuda::Plan::Naive,
        ..host
    };
    assert!(refused(&naive, &MarginLoss::arcface(0.5), false));
    // CurricularFace and ElasticFace+ exchange the target cosines first, before their state.
    for (spec, rm, state_kernel) in [
        (MarginLoss::curricularface(), false, "fm_curricular_state"),
        (
            MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::Rank),
            true,
            "fm_elastic_plus",
        ),
    ] {
        let p = plan::shard_forward(&dev, &host, &problem(&spec, rm), 4, false).unwrap();
        let order: Vec<String> = p
            .steps
            .iter()
            .map(|s| match s {
                Step::Kernel(l) => l.entry.clone(),
                Step::Exchange { send, .. } => format!("exchange {send:?}"),
                Step::Gemm(_) => "gemm".into(),
            })
            .collect();
        let at = |e: &str| {
            order
                .iter()
                .position(|o| o == e)
                .unwrap_or_else(|| panic!("{e}: {order:?}"))
        };
        assert!(at("fm_target_rows") < at("fm_shard_cos_out"));
        assert!(at("fm_shard_cos_out") < at("exchange ShardCos"));
        assert!(at("exchange ShardCos") < at("fm_shard_cos_in"));
        assert!(at("fm_shard_cos_in") < at(state_kernel));
        assert!(at(state_kernel) < at("exchange ShardRec"));
        let given = [Buf::X, Buf::W, Buf::Labels, Buf::StateIn, Buf::RowMargins];
        well_formed(&p, &given, "sharded cosines");
    }
    assert!(!refused(
        &host,
        &MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::None),
        true
    ));
    assert!(!refused(&host, &MarginLoss::magface(), false));
    // Partial FC: every launch that reads w reads it through the index, forward and backward,
    // on every kernel family the builder picks.
    for (name, dev) in DEVICES {
        for (dtype, d) in [(DType::BF16, 512), (DType::F32, 100), (DType::F16, 64)] {
            let pr = ForwardProblem {
                dtype,
                shape: Shape::new(256, d, 20_000),
                ..problem(&MarginLoss::arcface(0.5), false)
            };
            let f = plan::shard_forward(&dev, &host, &pr, 4, true).unwrap();
            let b = plan::shard_backward(
                &dev,
                &host,
                &BackwardProblem {
                    dtype,
                    grad_dtype: DType::F32,
                    shape: pr.shape,
                    aligned: true,
                    params: params(),
                    mean: true,
                    upstream: PlanUpstream::Scalar(0.5),
                    fwd_tensor_cores: f.tensor_cores,
                    row_margins: false,
                },
                true,
            )
            .unwrap();
            for p in [&f, &b] {
                let mut readers = 0;
                for l in p.launches() {
                    if l.args.contains(&Arg::Read(Buf::W)) {
                        readers += 1;
                        assert!(
                            l.args.contains(&Arg::Read(Buf::WIdx)),
                            "{name} {dtype:?}: {} reads w without the index",
                            l.entry
                        );
                    }
                }
                assert!(readers >= 2, "{name} {dtype:?}");
            }
            // Without sampling no launch names the index.
            let plain = plan::shard_forward(&dev, &host, &pr, 4, false).unwrap();
            assert!(plain
                .launches()
                .all(|l| !l.args.contains(&Arg::Read(Buf::WIdx))));
        }
    }
    let full = plan::full_dw(1000, 2, 64).unwrap();
    well_formed(&full, &[Buf::Dw, Buf::WInv], "full_dw");
    assert_eq!(full.spec_of(Buf::DwFull).unwrap().len, 1000 * 2 * 64);
    // The labels a rank's kernels see: local indices, another rank's class as num_local.
    let sh = fused_margin::shard::ClassShard::new(10, 5, 30).unwrap();
    assert_eq!(
        fused_margin::shard::column_labels(&[-1, 9, 10, 14, 15, 29], &sh, None).unwrap(),
        vec![-1, 5, 0, 4, 5, 5]
    );
    assert!(matches!(
        fused_margin::shard::column_labels(&[30], &sh, None),
        Err(fused_margin::Error::LabelOutOfRange {
            row: 0,
            label: 30,
            classes: 30
        })
    ));
}
