//! The class-sharded loss through the GPU handle (`FusedMarginLoss::shard_forward`,
//! `shard_backward`): 1, 2 and 3 simulated ranks (threads, `shard::ThreadComm`), each with its
//! own handle on the one GPU and its slice of the classes, against the unsharded CPU reference
//! with MATH.md's bars; every rank's loss the same bits. Without a GPU every test prints why and
//! passes; with `FUSED_MARGIN_REQUIRE_GPU=1` (scripts/gpu-check) a missing device fails instead.
use fused_margin::cuda::{self, FusedMarginLoss, GpuUpstream, Options};
use fused_margin::shard::{
    self, ClassShard, Communicator as _, DwLayout, DxReduce, Rank, ShardOptions,
};
use fused_margin::{cpu, LossState, MarginLoss, Reduction, RowInputs, Shape, Upstream};
use half::bf16;

mod common;
use common::{bars, margin_inputs, rel};

fn gpu() -> bool {
    let required = std::env::var("FUSED_MARGIN_REQUIRE_GPU").as_deref() == Ok("1");
    if cuda::device_available() && cuda::nvrtc_available() {
        return true;
    }
    assert!(
        !required,
        "FUSED_MARGIN_REQUIRE_GPU=1 but no usable CUDA device"
    );
    eprintln!("skipped: no CUDA device or libnvrtc");
    false
}

#[test]
fn sharded_handle_matches_the_reference() {
    if !gpu() {
        return;
    }
    let shape = Shape::new(48, 64, 1001);
    let mut inp = margin_inputs(shape, 77);
    // Targets in the first third: the upper ranks hold none.
    inp.labels
        .iter_mut()
        .filter(|l| **l >= 0)
        .for_each(|l| *l %= 333);
    let x: Vec<bf16> = inp.x.iter().map(|&v| bf16::from_f64(v)).collect();
    let w: Vec<bf16> = inp.w.iter().map(|&v| bf16::from_f64(v)).collect();
    let (lbar, gbar) = bars(fused_margin::DType::BF16);
    for (spec, state) in [
        (MarginLoss::arcface(0.5), None),
        (MarginLoss::cosface(0.35).reduction(Reduction::Sum), None),
        (MarginLoss::adaface(), Some(LossState::ADAFACE_INIT)),
        (
            MarginLoss::curricularface(),
            Some(LossState::CurricularFace { t: 0.3 }),
        ),
    ] {
        let inputs = RowInputs {
            state,
            margins: None,
        };
        let f = cpu::forward_with(&spec, &x, &w, &inp.labels, shape, &inputs).unwrap();
        let g = cpu::backward(&spec, &f, &x, &w, &inp.labels, shape, Upstream::ONE).unwrap();
        for world in [1usize, 2, 3] {
            for dx_mode in [DxReduce::Owner, DxReduce::Partial] {
                let out = shard::run_ranks(world, |comm| {
                    let stream = cuda::default_stream(0).unwrap();
                    let mut o = Options::default();
                    o.poison = true;
                    let gpu = FusedMarginLoss::with_options(stream.clone(), o).unwrap();
                    let sh = ClassShard::even(shape.c, world, comm.rank()).unwrap();
                    let rank = Rank {
                        comm,
                        shard: sh,
                        sampled: None,
                        options: ShardOptions {
                            dx: dx_mode,
                            dw: DwLayout::Sampled,
                        },
                    };
                    let xd = stream.clone_htod(&x).unwrap();
                    let wd = stream
                        .clone_htod(
                            &w[sh.class_start * shape.d..(sh.class_start + sh.num_local) * shape.d],
                        )
                        .unwrap();
                    let ld = stream.clone_htod(&inp.labels).unwrap();
                    let fwd = gpu
                        .shard_forward(
                            &rank,
                            &spec,
                            &xd.as_view(),
                            &wd.as_view(),
                            &ld.as_view(),
                            shape,
                            &inputs,
                        )
                        .unwrap();
                    let gr = gpu
                        .shard_backward(&rank, &fwd, &xd.as_view(), &wd.as_view(), GpuUpstream::ONE)
                        .unwrap();
                    let host = |v: &cuda::CudaSlice<f32>| -> Vec<f64> {
                        stream
                            .clone_dtoh(v)
                            .unwrap()
                            .into_iter()
                            .map(f64::from)
                            .collect()
                    };
                    (
                        fwd.loss_host().unwrap(),
                        host(&fwd.row_loss),
                        host(&gr.dx),
                        gr.dx_rows.clone(),
                        host(&gr.dw),
                    )
                })
                .unwrap();
                let what = format!("{spec:?}, {world} ranks, {dx_mode:?}");
                for o in &out {
                    assert_eq!(
                        o.0.to_bits(),
                        out[0].0.to_bits(),
                        "{what}: loss differs by rank"
                    );
                    assert_eq!(o.1, out[0].1, "{what}: row losses differ by rank");
                }
                assert!(
                    ((out[0].0 as f64) - f.loss).abs() <= lbar * f.loss.abs(),
                    "{what}: loss {} vs {}",
                    out[0].0,
                    f.loss
                );
                assert!(rel(&out[0].1, &f.row_loss) <= lbar, "{what}: row loss");
                let (b, d) = (shape.b, shape.d);
                let dx: Vec<f64> = match dx_mode {
                    DxReduce::Partial => (0..b * d)
                        .map(|e| out.iter().map(|o| o.2[e]).sum())
                        .collect(),
                    _ => {
                        let mut dx = vec![f64::NAN; b * d];
                        for o in &out {
                            dx[o.3.start * d..o.3.end * d].copy_from_slice(&o.2);
                        }
                        dx
                    }
                };
                let dw: Vec<f64> = out.iter().flat_map(|o| o.4.iter().copied()).collect();
                assert!(
                    rel(&dx, &g.dx) <= gbar,
                    "{what}: dx rel {:e}",
                    rel(&dx, &g.dx)
                );
                assert!(
                    rel(&dw, &g.dw) <= gbar,
                    "{what}: dw rel {:e}",
                    rel(&dw, &g.dw)
                );
            }
        }
    }
}

#[test]
fn sharded_handle_refuses_the_naive_plan() {
    if !gpu() {
        return;
    }
    let shape = Shape::new(8, 16, 20);
    let out = shard::run_ranks(2, |comm| {
        let stream = cuda::default_stream(0).unwrap();
        let mut o = Options::default();
        o.plan = cuda::Plan::Naive;
        let gpu = FusedMarginLoss::with_options(stream.clone(), o).unwrap();
        let sh = ClassShard::even(20, 2, comm.rank()).unwrap();
        let rank = Rank {
            comm,
            shard: sh,
            sampled: None,
            options: ShardOptions::default(),
        };
        let x = stream.clone_htod(&vec![bf16::ONE; 8 * 16]).unwrap();
        let w = stream.clone_htod(&vec![bf16::ONE; 10 * 16]).unwrap();
        let l = stream.clone_htod(&[0i32, 1, 2, 3, 11, 12, 13, -1]).unwrap();
        let spec = MarginLoss::arcface(0.5);
        let inputs = RowInputs::default();
        gpu.shard_forward(
            &rank,
            &spec,
            &x.as_view(),
            &w.as_view(),
            &l.as_view(),
            shape,
            &inputs,
        )
        .err()
    })
    .unwrap();
    assert!(out
        .iter()
        .all(|e| matches!(e, Some(fused_margin::Error::Unsupported { .. }))));
}
