//! Model parallelism over the classes with Partial FC, as insightface's `arcface_torch` trains
//! on millions of identities, here on 4 simulated ranks (threads) of one machine:
//!
//! ```text
//! cargo run --release --example sharded_train [-- --ranks 4 --rate 0.2 --steps 600 --classes 2000]
//! ```
//!
//! Each rank holds a replica of the embedding model (a linear map from 64 to 32 dimensions, data
//! parallel: its gradient is all-reduced) and one slice of the class weights (model parallel:
//! `ClassShard::even`). A step: each rank embeds its 64 rows of the global batch, the embeddings
//! and labels are all-gathered, each rank samples its classes (every positive plus random
//! negatives, `rate` of its slice: `PartialFc`), `cpu::shard_forward` combines the per-row
//! softmax statistics across ranks (one all-gather of 32 bytes per row per rank), and
//! `cpu::shard_backward` returns each rank the gradient of its own rows (a reduce-scatter) and the
//! gradient of its sampled class rows (scattered into its slice, zeros elsewhere, as insightface's
//! autograd does). The collectives go through `shard::ThreadComm`; `cuda::NcclComm` (feature
//! `nccl`) is the same trait over NCCL for real ranks. The loss runs on the f64 CPU reference.
//!
//! The data: seeded Gaussian clusters, 2 points of every class held out. The figure at the end:
//! held-out accuracy (the nearest class weight by cosine, searched over every rank's classes,
//! each rank its best then a gather) before and after, and the step loss. Bad options are refused
//! with a message naming the flag and the value, and exit status 2.

use fused_margin::cpu;
use fused_margin::shard::{
    self, ClassShard, Communicator, DwLayout, DxReduce, PartialFc, Rank, ShardOptions,
};
use fused_margin::{MarginLoss, RowInputs, Shape, Upstream};
use rand::{rngs::StdRng, SeedableRng};
use std::time::Instant;

#[path = "common/train.rs"]
mod train;
use train::{Adam, Split};

const D_IN: usize = 64;
const D: usize = 32;
/// Rows per rank per step (the global batch is `ranks` times this).
const ROWS_PER_RANK: usize = 64;
const PER_CLASS: usize = 10;
const HELD_OUT: usize = 2;
const NOISE: f64 = 1.0;

const USAGE: &str = "usage: sharded_train [--ranks N (1-16, default 4)] [--rate R (0 < R <= 1, \
default 0.2)] [--steps N (default 600)] [--classes N (>= ranks, default 2000)] [--seed N]";

struct Args {
    ranks: usize,
    rate: f64,
    steps: usize,
    classes: usize,
    seed: u64,
}

fn fail(msg: String) -> ! {
    eprintln!("sharded_train: {msg}\n\n{USAGE}");
    std::process::exit(2)
}

/// The value of `flag`, or the process ends naming both.
fn value<T: std::str::FromStr>(flag: &str, v: &str) -> T {
    v.parse()
        .unwrap_or_else(|_| fail(format!("{flag} {v}: not a valid value")))
}

fn parse() -> Args {
    let mut a = Args {
        ranks: 4,
        rate: 0.2,
        steps: 600,
        classes: 2000,
        seed: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let Some(v) = it.next() else {
            fail(format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--ranks" => a.ranks = value(&flag, &v),
            "--rate" => a.rate = value(&flag, &v),
            "--steps" => a.steps = value(&flag, &v),
            "--classes" => a.classes = value(&flag, &v),
            "--seed" => a.seed = value(&flag, &v),
            _ => fail(format!("unknown flag {flag}")),
        }
    }
    if !(1..=16).contains(&a.ranks) {
        fail(format!("--ranks {}: must be 1 to 16", a.ranks));
    }
    if let Err(e) = PartialFc::new(a.rate, 0) {
        fail(format!("--rate {}: {e}", a.rate));
    }
    if a.classes < a.ranks || a.classes > 1_000_000 {
        fail(format!(
            "--classes {}: must be at least --ranks ({}) and at most 1,000,000",
            a.classes, a.ranks
        ));
    }
    a
}

/// `emb = x W_e` for the rows of `x` (n x D_IN), W_e D_IN x D.
fn embed(x: &[f32], we: &[f32]) -> Vec<f32> {
    x.chunks(D_IN)
        .flat_map(|row| (0..D).map(move |k| (0..D_IN).map(|i| row[i] * we[i * D + k]).sum::<f32>()))
        .collect()
}

/// Held-out accuracy: each rank's best class by cosine for every test embedding, gathered.
fn accuracy(comm: &dyn Communicator, test: &Split, we: &[f32], w: &[f32], sh: &ClassShard) -> f64 {
    let emb = embed(&test.x, we);
    let n = test.y.len();
    let mut best = Vec::with_capacity(2 * n);
    for e in emb.chunks(D) {
        let (mut bc, mut bj) = (f64::NEG_INFINITY, 0usize);
        for (j, wj) in w.chunks(D).enumerate() {
            let c = train::cosine(e, wj);
            if c > bc {
                (bc, bj) = (c, sh.class_start + j);
            }
        }
        best.extend_from_slice(&[bc, bj as f64]);
    }
    let mut all = vec![0.0; 2 * n * comm.world_size()];
    comm.all_gather(&best, &mut all).expect("gather");
    let mut right = 0;
    for (i, &y) in test.y.iter().enumerate() {
        let (mut bc, mut bj) = (f64::NEG_INFINITY, 0.0);
        for r in 0..comm.world_size() {
            let rec = &all[2 * (r * n + i)..2 * (r * n + i) + 2];
            if rec[0] > bc {
                (bc, bj) = (rec[0], rec[1]);
            }
        }
        right += usize::from(bj as i32 == y);
    }
    right as f64 / n as f64
}

fn main() {
    let a = parse();
    let mut rng = StdRng::seed_from_u64(a.seed);
    let (train_set, test_set) =
        train::clusters(&mut rng, a.classes, PER_CLASS, HELD_OUT, D_IN, NOISE);
    let we0: Vec<f32> = (0..D_IN * D)
        .map(|_| (train::normal(&mut rng) / (D_IN as f64).sqrt()) as f32)
        .collect();
    let w0: Vec<f32> = (0..a.classes * D)
        .map(|_| train::normal(&mut rng) as f32)
        .collect();
    let spec = MarginLoss::arcface(0.5).scale(30.0);
    let pfc = PartialFc::new(a.rate, a.seed).expect("rate checked");
    let b = ROWS_PER_RANK * a.ranks;
    let shape = Shape::new(b, D, a.classes);
    let n_train = train_set.y.len();
    println!(
        "sharded_train: {} ranks (threads), {} classes ({} to {} per rank), Partial FC rate {}, \
         global batch {b}, ArcFace m = 0.5, s = 30, CPU f64 reference",
        a.ranks,
        a.classes,
        a.classes / a.ranks,
        a.classes.div_ceil(a.ranks),
        a.rate
    );
    let started = Instant::now();
    let results = shard::run_ranks(a.ranks, |comm| {
        let r = comm.rank();
        let sh = ClassShard::even(a.classes, a.ranks, r).expect("classes >= ranks");
        let mut we = we0.clone();
        let mut w = w0[sh.class_start * D..(sh.class_start + sh.num_local) * D].to_vec();
        let mut opt_we = Adam::new(we.len(), 2e-2);
        let mut opt_w = Adam::new(w.len(), 2e-2);
        let before = accuracy(comm, &test_set, &we, &w, &sh);
        let mut losses = Vec::new();
        let mut sampled_sizes = Vec::new();
        for step in 0..a.steps {
            // This rank's rows of the global batch: a fixed stride through the training set.
            let rows: Vec<usize> = (0..ROWS_PER_RANK)
                .map(|k| ((step * b + r * ROWS_PER_RANK + k) * 7919) % n_train)
                .collect();
            let xr: Vec<f32> = rows
                .iter()
                .flat_map(|&i| train_set.x[i * D_IN..(i + 1) * D_IN].iter().copied())
                .collect();
            let emb = embed(&xr, &we);
            // All-gather of the embeddings and labels (arcface_torch's AllGather).
            let mut send: Vec<f64> = emb.iter().map(|&v| v as f64).collect();
            send.extend(rows.iter().map(|&i| train_set.y[i] as f64));
            let mut all = vec![0.0; send.len() * a.ranks];
            comm.all_gather(&send, &mut all).expect("all-gather");
            let per = ROWS_PER_RANK * (D + 1);
            let x: Vec<f64> = (0..a.ranks)
                .flat_map(|q| all[q * per..q * per + ROWS_PER_RANK * D].iter().copied())
                .collect();
            let labels: Vec<i32> = (0..a.ranks)
                .flat_map(|q| {
                    all[q * per + ROWS_PER_RANK * D..(q + 1) * per]
                        .iter()
                        .map(|&v| v as i32)
                })
                .collect();
            let sampled = pfc
                .sample(&sh, &labels, step as u64)
                .expect("labels in range");
            sampled_sizes.push(sampled.index.len());
            let rank = Rank {
                comm,
                shard: sh,
                sampled: Some(&sampled),
                options: ShardOptions {
                    dx: DxReduce::Owner,
                    dw: DwLayout::Full,
                },
            };
            let wf: Vec<f64> = w.iter().map(|&v| v as f64).collect();
            let fwd =
                cpu::shard_forward(&rank, &spec, &x, &wf, &labels, shape, &RowInputs::default())
                    .expect("forward");
            let g = cpu::shard_backward(&rank, &spec, &fwd, &x, &wf, &labels, Upstream::ONE)
                .expect("backward");
            losses.push(fwd.forward.loss);
            // d W_e = x_r^T d emb_r on this rank's rows, summed over ranks (data parallel).
            let mut dwe = vec![0.0f64; D_IN * D];
            for (row, demb) in xr.chunks(D_IN).zip(g.dx.chunks(D)) {
                for i in 0..D_IN {
                    for k in 0..D {
                        dwe[i * D + k] += row[i] as f64 * demb[k];
                    }
                }
            }
            comm.all_reduce_sum(&mut dwe).expect("all-reduce");
            let dwe: Vec<f32> = dwe.iter().map(|&v| v as f32).collect();
            opt_we.step(&mut we, &dwe);
            let dw: Vec<f32> = g.dw.iter().map(|&v| v as f32).collect();
            opt_w.step(&mut w, &dw);
            if r == 0 && (step % 50 == 0 || step + 1 == a.steps) {
                println!(
                    "step {step:4}  loss {:.4}  rank 0 kept {} of {} classes",
                    fwd.forward.loss,
                    sampled.index.len(),
                    sh.num_local
                );
            }
        }
        let after = accuracy(comm, &test_set, &we, &w, &sh);
        (before, after, losses, sampled_sizes)
    })
    .expect("ranks");
    let (before, after, losses, _) = &results[0];
    // Every rank computed the same loss at every step, bit for bit.
    for (r, res) in results.iter().enumerate() {
        assert_eq!(
            res.2.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
            losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
            "rank {r}'s losses"
        );
    }
    let kept: usize = results.iter().map(|r| r.3.iter().sum::<usize>()).sum();
    println!(
        "held-out accuracy {:.1} % -> {:.1} % ({} test points); loss {:.3} -> {:.3}; \
         {:.1} % of the classes sampled per step on average; {:.1} s",
        100.0 * before,
        100.0 * after,
        test_set.y.len(),
        losses.first().copied().unwrap_or(0.0),
        losses.last().copied().unwrap_or(0.0),
        100.0 * kept as f64 / (a.steps.max(1) * a.classes) as f64,
        started.elapsed().as_secs_f64()
    );
}
