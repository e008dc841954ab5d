//! The sharded loss over NCCL (feature `nccl`): `cuda::NcclComm` gives the same bits as the
//! in-process `ThreadComm`. Needs a GPU and libnccl: without them every test prints why and
//! passes; with `FUSED_MARGIN_REQUIRE_NCCL=1` (scripts/gpu-check) a missing one fails instead.
//! World size 1 always; 2 and 4 ranks on the one GPU where NCCL allows several ranks per device
//! (NCCL 2.30+ with `NCCL_MULTI_RANK_GPU_ENABLE=1`, set by scripts/gpu-check).
#![cfg(feature = "nccl")]

mod common;

use common::*;
use fused_margin::cpu;
use fused_margin::cuda::{self, NcclComm};
use fused_margin::shard::{
    self, ClassShard, Communicator, DwLayout, DxReduce, PartialFc, Rank, ShardOptions,
};
use fused_margin::{MarginLoss, RowInputs, Shape, Upstream};

fn ready() -> bool {
    let required = std::env::var("FUSED_MARGIN_REQUIRE_NCCL").as_deref() == Ok("1");
    let why = if !cuda::device_available() {
        Some("no CUDA device/driver")
    } else if !cuda::nccl_available() {
        Some("libnccl cannot be loaded")
    } else {
        None
    };
    match why {
        None => true,
        Some(w) if required => panic!("FUSED_MARGIN_REQUIRE_NCCL=1 but {w}"),
        Some(w) => {
            eprintln!("skipped: {w}");
            false
        }
    }
}

/// One sharded step (forward, backward) on `comm`, rank `comm.rank()` of an even split.
fn step(comm: &dyn Communicator) -> (Vec<u64>, Vec<u64>, Vec<u64>) {
    let (b, d, c) = (16, 8, 41);
    let shape = Shape::new(b, d, c);
    let mut r = rng(5);
    let x = rows(&mut r, b, d, (0.5, 2.0));
    let w = rows(&mut r, c, d, (0.5, 2.0));
    let mut labels = labels(&mut r, b, c);
    labels[2] = -1;
    let world = comm.world_size();
    let sh = ClassShard::even(c, world, comm.rank()).unwrap();
    let sampled = PartialFc::new(0.5, 3)
        .unwrap()
        .sample(&sh, &labels, 1)
        .unwrap();
    let rank = Rank {
        comm,
        shard: sh,
        sampled: Some(&sampled),
        options: ShardOptions {
            dx: DxReduce::Owner,
            dw: DwLayout::Full,
        },
    };
    let wl = &w[sh.class_start * d..(sh.class_start + sh.num_local) * d];
    let spec = MarginLoss::arcface(0.5).scale(16.0);
    let f =
        cpu::shard_forward(&rank, &spec, &x, wl, &labels, shape, &RowInputs::default()).unwrap();
    let g = cpu::shard_backward(&rank, &spec, &f, &x, wl, &labels, Upstream::ONE).unwrap();
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    (bits(&f.forward.row_loss), bits(&g.dx), bits(&g.dw))
}

#[test]
fn nccl_matches_the_thread_communicator() {
    if !ready() {
        return;
    }
    let stream = cuda::default_stream(0).unwrap();
    let one = NcclComm::from_streams(vec![stream.clone()]).unwrap();
    let want = shard::run_ranks(1, |c| step(c)).unwrap();
    assert_eq!(step(&one[0]), want[0], "world size 1");
    drop(one);
    if std::env::var("NCCL_MULTI_RANK_GPU_ENABLE").as_deref() != Ok("1") {
        eprintln!("several ranks on one GPU skipped: NCCL_MULTI_RANK_GPU_ENABLE is not 1");
        return;
    }
    for world in [2usize, 4] {
        let ctx = stream.context();
        let streams = (0..world).map(|_| ctx.new_stream().unwrap()).collect();
        let comms = match NcclComm::from_streams(streams) {
            Ok(c) => c,
            Err(e) => panic!("{world} ranks on one GPU (NCCL 2.30+ needed): {e}"),
        };
        let got: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|c| s.spawn(move || step(&c)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want = shard::run_ranks(world, |c| step(c)).unwrap();
        // Every rank's loss and dw are the thread group's bits; dx went through NCCL's sum.
        for r in 0..world {
            assert_eq!(got[r].0, want[r].0, "rank {r} of {world}: row loss");
            assert_eq!(got[r].2, want[r].2, "rank {r} of {world}: dw");
            let (a, b): (Vec<f64>, Vec<f64>) = (
                got[r].1.iter().map(|&u| f64::from_bits(u)).collect(),
                want[r].1.iter().map(|&u| f64::from_bits(u)).collect(),
            );
            assert_close("dx", &a, &b, 1e-15, 1e-12);
        }
    }
}
