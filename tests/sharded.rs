//! The class-sharded loss and Partial FC on the CPU reference (module `shard`): 1 to 8 simulated
//! ranks (threads, `shard::run_ranks`) on uneven slices of the classes, with ranks that hold no
//! row's target and ignored rows, equal the unsharded reference for every loss, reduction and
//! option; every rank gets the same bits; reruns give the same bits; one rank gives exactly the
//! unsharded bits; the sampled problem equals the unsharded loss over the sampled classes; bad
//! input on any rank is an error on every rank, never a hang.

mod common;

use common::*;
use fused_margin::cpu::{self, ShardForward, ShardGradients};
use fused_margin::shard::{
    self, ClassShard, Communicator, DwLayout, DxReduce, PartialFc, Rank, Sampled, ShardOptions,
    ThreadComm,
};
use fused_margin::{
    ElasticKind, ElasticMargins, ElasticPlus, ElasticRng, Error, LossState, MarginLoss,
    OverflowPolicy, Reduction, RowInputs, Shape, Upstream,
};

/// The sharded results agree with the unsharded ones to f64 rounding of a reordered sum.
const ATOL: f64 = 1e-12;
const RTOL: f64 = 1e-10;

struct Case {
    shape: Shape,
    k: usize,
    x: Vec<f64>,
    w: Vec<f64>,
    labels: Vec<i32>,
}

/// Labels drawn from the first `c / 3` classes only, so ranks holding the upper classes have no
/// positive; rows 3 and B-1 ignored.
fn case(seed: u64, shape: Shape, k: usize) -> Case {
    let mut r = rng(seed);
    let x = rows(&mut r, shape.b, shape.d, (0.5, 3.0));
    let w = rows(&mut r, shape.c * k, shape.d, (0.5, 2.0));
    let mut labels = labels(&mut r, shape.b, (shape.c / 3).max(1));
    labels[3] = -1;
    labels[shape.b - 1] = -1;
    Case {
        shape,
        k,
        x,
        w,
        labels,
    }
}

/// Uneven slices of `c` classes over `world` ranks from cut points drawn by `seed`.
fn slices(c: usize, world: usize, seed: u64) -> Vec<ClassShard> {
    let mut r = rng(seed);
    let mut cuts: Vec<usize> = Vec::new();
    while cuts.len() + 1 < world {
        let v = rand::Rng::random_range(&mut r, 1..c);
        if !cuts.contains(&v) {
            cuts.push(v);
        }
    }
    cuts.sort_unstable();
    let mut bounds = vec![0];
    bounds.extend(cuts);
    bounds.push(c);
    bounds
        .windows(2)
        .map(|p| ClassShard::new(p[0], p[1] - p[0], c).unwrap())
        .collect()
}

fn w_of<'a>(c: &'a Case, s: &ClassShard) -> &'a [f64] {
    let per = c.k * c.shape.d;
    &c.w[s.class_start * per..(s.class_start + s.num_local) * per]
}

type RankOut = (ShardForward, ShardGradients);

/// Forward and backward on every rank of `shards` (rank r holds shards[r]).
fn run_sharded(
    spec: &MarginLoss,
    c: &Case,
    shards: &[ClassShard],
    inputs: &RowInputs,
    options: ShardOptions,
    sampled: Option<&[Sampled]>,
    upstream: Upstream,
) -> Vec<RankOut> {
    shard::run_ranks(shards.len(), |comm| {
        let r = comm.rank();
        let rank = Rank {
            comm,
            shard: shards[r],
            sampled: sampled.map(|s| &s[r]),
            options,
        };
        let w = w_of(c, &shards[r]);
        let fwd = cpu::shard_forward(&rank, spec, &c.x, w, &c.labels, c.shape, inputs)
            .unwrap_or_else(|e| panic!("rank {r} forward: {e}"));
        let g = cpu::shard_backward(&rank, spec, &fwd, &c.x, w, &c.labels, upstream)
            .unwrap_or_else(|e| panic!("rank {r} backward: {e}"));
        (fwd, g)
    })
    .unwrap()
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every rank holds the same forward values, bit for bit.
fn ranks_agree(out: &[RankOut]) {
    let f0 = &out[0].0.forward;
    for (r, (f, _)) in out.iter().enumerate() {
        let f = &f.forward;
        assert_eq!(f.loss.to_bits(), f0.loss.to_bits(), "rank {r} loss");
        assert_eq!(bits(&f.row_loss), bits(&f0.row_loss), "rank {r} row_loss");
        assert_eq!(bits(&f.lse), bits(&f0.lse), "rank {r} lse");
        assert_eq!(f.state, f0.state, "rank {r} state");
        assert_eq!(f.rows, f0.rows, "rank {r} per-row values");
    }
}

/// The global dx from the ranks' results under `mode`, and dw concatenated in rank order.
fn assemble(out: &[RankOut], mode: DxReduce, b: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
    let dx = match mode {
        DxReduce::Owner => {
            let mut dx = vec![f64::NAN; b * d];
            for (_, g) in out {
                dx[g.dx_rows.start * d..g.dx_rows.end * d].copy_from_slice(&g.dx);
            }
            dx
        }
        DxReduce::Global => {
            for (r, (_, g)) in out.iter().enumerate() {
                assert_eq!(bits(&g.dx), bits(&out[0].1.dx), "rank {r}'s global dx");
            }
            out[0].1.dx.clone()
        }
        DxReduce::Partial => (0..b * d)
            .map(|k| out.iter().map(|(_, g)| g.dx[k]).sum())
            .collect(),
    };
    let dw = out.iter().flat_map(|(_, g)| g.dw.iter().copied()).collect();
    (dx, dw)
}

fn compare(what: &str, out: &[RankOut], mode: DxReduce, c: &Case, want: &RankRef) {
    ranks_agree(out);
    let f = &out[0].0.forward;
    assert_close(
        &format!("{what} loss"),
        &[f.loss],
        &[want.0.loss],
        ATOL,
        RTOL,
    );
    assert_close(
        &format!("{what} row_loss"),
        &f.row_loss,
        &want.0.row_loss,
        ATOL,
        RTOL,
    );
    assert_close(&format!("{what} lse"), &f.lse, &want.0.lse, ATOL, RTOL);
    assert_eq!(f.counted, want.0.counted, "{what} counted");
    match (f.state, want.0.state) {
        (Some(LossState::AdaFace { mean, std }), Some(LossState::AdaFace { mean: m, std: s })) => {
            assert_close(&format!("{what} state"), &[mean, std], &[m, s], 0.0, 1e-14)
        }
        (Some(LossState::CurricularFace { t }), Some(LossState::CurricularFace { t: t0 })) => {
            assert_close(&format!("{what} t"), &[t], &[t0], 0.0, 1e-14)
        }
        (a, b) => assert_eq!(a, b, "{what} state"),
    }
    for (name, got, want) in [
        ("m2", &f.rows.m2, &want.0.rows.m2),
        ("m3", &f.rows.m3, &want.0.rows.m3),
        ("tau", &f.rows.tau, &want.0.rows.tau),
        ("ce", &f.rows.ce, &want.0.rows.ce),
    ] {
        assert_close(&format!("{what} {name}"), got, want, ATOL, RTOL);
    }
    assert_eq!(f.rows.hard, want.0.rows.hard, "{what} hard negatives");
    let (dx, dw) = assemble(out, mode, c.shape.b, c.shape.d);
    let scale = |v: &[f64]| v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    // Gradients: sums of signed terms, compared relative to their largest entry.
    assert_close(
        &format!("{what} dx"),
        &dx,
        &want.1.dx,
        ATOL + RTOL * scale(&want.1.dx),
        RTOL,
    );
    assert_close(
        &format!("{what} dw"),
        &dw,
        &want.1.dw,
        ATOL + RTOL * scale(&want.1.dw),
        RTOL,
    );
}

type RankRef = (cpu::Forward, cpu::Gradients);

fn reference(spec: &MarginLoss, c: &Case, inputs: &RowInputs, up: Upstream) -> RankRef {
    let f = cpu::forward_with(spec, &c.x, &c.w, &c.labels, c.shape, inputs).unwrap();
    let g = cpu::backward(spec, &f, &c.x, &c.w, &c.labels, c.shape, up).unwrap();
    (f, g)
}

/// Every loss of the crate, with the row inputs it needs.
fn losses() -> Vec<(&'static str, MarginLoss, usize, RowInputs<'static>)> {
    let seeded = RowInputs::with_margins(ElasticMargins::Seeded(ElasticRng {
        seed: 7,
        step: 3,
        row_offset: 0,
    }));
    vec![
        (
            "arcface",
            MarginLoss::arcface(0.5).scale(16.0),
            1,
            RowInputs::default(),
        ),
        (
            "cosface sum",
            MarginLoss::cosface(0.35)
                .scale(16.0)
                .reduction(Reduction::Sum),
            1,
            RowInputs::default(),
        ),
        (
            "sphereface",
            MarginLoss::sphereface(4.0).scale(8.0),
            1,
            RowInputs::default(),
        ),
        (
            "combined fallback",
            MarginLoss::combined(1.1, 0.4, 0.15)
                .scale(16.0)
                .policy(OverflowPolicy::Fallback),
            1,
            RowInputs::default(),
        ),
        (
            "nsl raw features",
            MarginLoss::nsl(2.0).normalize_features(false),
            1,
            RowInputs::default(),
        ),
        (
            "subcenter k3",
            MarginLoss::subcenter(3).scale(16.0),
            3,
            RowInputs::default(),
        ),
        (
            "adaface",
            MarginLoss::adaface().scale(16.0),
            1,
            RowInputs::with_state(LossState::ADAFACE_INIT),
        ),
        (
            "curricularface",
            MarginLoss::curricularface().scale(16.0),
            1,
            RowInputs::with_state(LossState::CurricularFace { t: 0.3 }),
        ),
        (
            "magface",
            MarginLoss::magface().scale(16.0),
            1,
            RowInputs::default(),
        ),
        (
            "elasticface arc",
            MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::None).scale(16.0),
            1,
            seeded,
        ),
        (
            "elasticface+ cos rank",
            MarginLoss::elasticface(ElasticKind::Cos, ElasticPlus::Rank).scale(16.0),
            1,
            seeded,
        ),
    ]
}

#[test]
fn sharded_equals_unsharded_for_every_loss_and_world_size() {
    // B = 24: divisible by 1, 2, 3, 4, 6 and 8 (DxReduce::Owner); 5 and 7 take Global/Partial.
    for (name, spec, k, inputs) in losses() {
        let c = case(11, Shape::new(24, 10, 37), k);
        let want = reference(&spec, &c, &inputs, Upstream::ONE);
        for world in 1..=8usize {
            let shards = slices(37, world, world as u64);
            for mode in [DxReduce::Owner, DxReduce::Global, DxReduce::Partial] {
                if mode == DxReduce::Owner && 24 % world != 0 {
                    continue;
                }
                let opts = ShardOptions {
                    dx: mode,
                    dw: DwLayout::Sampled,
                };
                let out = run_sharded(&spec, &c, &shards, &inputs, opts, None, Upstream::ONE);
                compare(
                    &format!("{name}, {world} ranks, {mode:?}"),
                    &out,
                    mode,
                    &c,
                    &want,
                );
                if world == 1 {
                    // One rank: the unsharded arithmetic exactly.
                    let f = &out[0].0.forward;
                    assert_eq!(bits(&f.row_loss), bits(&want.0.row_loss), "{name}: 1 rank");
                    assert_eq!(bits(&f.lse), bits(&want.0.lse), "{name}: 1 rank lse");
                    assert_eq!(bits(&out[0].1.dx), bits(&want.1.dx), "{name}: 1 rank dx");
                    assert_eq!(bits(&out[0].1.dw), bits(&want.1.dw), "{name}: 1 rank dw");
                }
            }
        }
    }
}

#[test]
fn sharded_per_row_upstream_and_even_split() {
    // Reduction::None with a per-row upstream, insightface's even split (C % W != 0).
    let spec = MarginLoss::arcface(0.5)
        .scale(32.0)
        .reduction(Reduction::None);
    let c = case(5, Shape::new(16, 12, 53), 1);
    let mut r = rng(9);
    let up: Vec<f64> = (0..16).map(|_| normal(&mut r)).collect();
    let want = reference(&spec, &c, &RowInputs::default(), Upstream::PerRow(&up));
    for world in [2, 4, 8] {
        let shards: Vec<ClassShard> = (0..world)
            .map(|r| ClassShard::even(53, world, r).unwrap())
            .collect();
        assert_eq!(shards[0].num_local, 53 / world + 1);
        let out = run_sharded(
            &spec,
            &c,
            &shards,
            &RowInputs::default(),
            ShardOptions::default(),
            None,
            Upstream::PerRow(&up),
        );
        compare(
            &format!("none, {world} ranks"),
            &out,
            DxReduce::Owner,
            &c,
            &want,
        );
    }
}

#[test]
fn sharded_runs_are_bit_identical() {
    for (name, spec, k, inputs) in losses() {
        let c = case(21, Shape::new(16, 8, 29), k);
        let shards = slices(29, 4, 77);
        let run = |mode| {
            let opts = ShardOptions {
                dx: mode,
                dw: DwLayout::Sampled,
            };
            run_sharded(&spec, &c, &shards, &inputs, opts, None, Upstream::ONE)
        };
        let a = run(DxReduce::Owner);
        for _ in 0..3 {
            let b = run(DxReduce::Owner);
            for r in 0..4 {
                assert_eq!(
                    a[r].0, b[r].0,
                    "{name}: rank {r} forward differs between runs"
                );
                assert_eq!(bits(&a[r].1.dx), bits(&b[r].1.dx), "{name}: rank {r} dx");
                assert_eq!(bits(&a[r].1.dw), bits(&b[r].1.dw), "{name}: rank {r} dw");
            }
        }
        // The owner's rows of the all-reduced dx are the reduce-scattered ones, bit for bit.
        let g = run(DxReduce::Global);
        for (r, (_, own)) in a.iter().enumerate() {
            let d = c.shape.d;
            let rows = &own.dx_rows;
            assert_eq!(
                bits(&g[r].1.dx[rows.start * d..rows.end * d]),
                bits(&own.dx),
                "{name}: rank {r} Owner vs Global"
            );
        }
    }
}

/// The unsharded problem over the sampled classes: their rows of `w` in global order, labels
/// remapped to their positions.
fn sampled_problem(c: &Case, sampled: &[Sampled]) -> Case {
    let (w, labels, n) = sampled_reference(&c.w, &c.labels, c.k * c.shape.d, sampled);
    Case {
        shape: Shape::new(c.shape.b, c.shape.d, n),
        k: c.k,
        x: c.x.clone(),
        w,
        labels,
    }
}

#[test]
fn sampled_equals_the_unsharded_loss_on_the_sampled_classes() {
    let seeded = RowInputs::with_margins(ElasticMargins::Seeded(ElasticRng {
        seed: 1,
        step: 0,
        row_offset: 0,
    }));
    let cases: Vec<(&str, MarginLoss, usize, RowInputs)> = vec![
        (
            "arcface",
            MarginLoss::arcface(0.5).scale(16.0),
            1,
            RowInputs::default(),
        ),
        (
            "subcenter k2",
            MarginLoss::subcenter(2).scale(16.0),
            2,
            RowInputs::default(),
        ),
        (
            "curricularface",
            MarginLoss::curricularface().scale(16.0),
            1,
            RowInputs::with_state(LossState::CURRICULAR_INIT),
        ),
        (
            "elasticface+",
            MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::Rank).scale(16.0),
            1,
            seeded,
        ),
    ];
    let pfc = PartialFc::new(0.2, 42).unwrap();
    for (name, spec, k, inputs) in cases {
        let c = case(31, Shape::new(24, 8, 203), k);
        for world in [1, 3, 4] {
            let shards: Vec<ClassShard> = (0..world)
                .map(|r| ClassShard::even(203, world, r).unwrap())
                .collect();
            for step in [0u64, 5] {
                let sampled: Vec<Sampled> = shards
                    .iter()
                    .map(|s| pfc.sample(s, &c.labels, step).unwrap())
                    .collect();
                let sub = sampled_problem(&c, &sampled);
                let want = reference(&spec, &sub, &inputs, Upstream::ONE);
                for mode in [DxReduce::Owner, DxReduce::Partial] {
                    let opts = ShardOptions {
                        dx: mode,
                        dw: DwLayout::Sampled,
                    };
                    let out = run_sharded(
                        &spec,
                        &c,
                        &shards,
                        &inputs,
                        opts,
                        Some(&sampled),
                        Upstream::ONE,
                    );
                    compare(
                        &format!("{name} sampled, {world} ranks, step {step}, {mode:?}"),
                        &out,
                        mode,
                        &sub,
                        &want,
                    );
                }
                // DwLayout::Full: the sampled rows in place, zeros elsewhere.
                let opts = ShardOptions {
                    dx: DxReduce::Owner,
                    dw: DwLayout::Full,
                };
                let full = run_sharded(
                    &spec,
                    &c,
                    &shards,
                    &inputs,
                    opts,
                    Some(&sampled),
                    Upstream::ONE,
                );
                let compact = run_sharded(
                    &spec,
                    &c,
                    &shards,
                    &inputs,
                    ShardOptions::default(),
                    Some(&sampled),
                    Upstream::ONE,
                );
                let per = k * c.shape.d;
                for r in 0..world {
                    let (dwf, dws) = (&full[r].1.dw, &compact[r].1.dw);
                    assert_eq!(dwf.len(), shards[r].num_local * per);
                    let mut at = 0;
                    for j in 0..shards[r].num_local {
                        let rows = &dwf[j * per..(j + 1) * per];
                        if sampled[r].index.get(at) == Some(&(j as u32)) {
                            assert_eq!(bits(rows), bits(&dws[at * per..(at + 1) * per]));
                            at += 1;
                        } else {
                            assert!(rows.iter().all(|&v| v == 0.0), "{name}: unsampled row {j}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn partial_fc_keeps_positives_and_draws_reproducibly() {
    let c = 1000;
    let shard = ClassShard::even(c, 3, 1).unwrap(); // classes 334..667
    let mut r = rng(3);
    let mut labels = labels(&mut r, 64, c);
    labels[0] = -1;
    let pfc = PartialFc::new(0.1, 9).unwrap();
    let s = pfc.sample(&shard, &labels, 4).unwrap();
    let pos: Vec<usize> = labels.iter().filter_map(|&y| shard.local(y)).collect();
    let mut uniq = pos.clone();
    uniq.sort_unstable();
    uniq.dedup();
    assert_eq!(s.positives, uniq.len());
    assert_eq!(s.index.len(), (0.1f64 * 333.0).floor() as usize);
    assert!(
        s.index.windows(2).all(|p| p[0] < p[1]),
        "ascending, distinct"
    );
    for &j in &pos {
        assert!(
            s.index.binary_search(&(j as u32)).is_ok(),
            "positive {j} kept"
        );
    }
    // Reproducible from (seed, step); another step or seed draws other negatives.
    assert_eq!(s, pfc.sample(&shard, &labels, 4).unwrap());
    assert_ne!(s.index, pfc.sample(&shard, &labels, 5).unwrap().index);
    assert_ne!(
        s.index,
        PartialFc::new(0.1, 10)
            .unwrap()
            .sample(&shard, &labels, 4)
            .unwrap()
            .index
    );
    // A class's key is its global id's: another split of the classes draws the same negatives
    // among the classes both hold, in key order.
    let a = ClassShard::new(0, c, c).unwrap();
    let all = PartialFc::new(1.0, 9)
        .unwrap()
        .sample(&a, &labels, 4)
        .unwrap();
    assert_eq!(all.index.len(), c, "rate 1 keeps every class");
    let key = |g: usize| pfc.key(4, g);
    let chosen: Vec<usize> = s
        .global_classes()
        .filter(|g| !labels.contains(&(*g as i32)))
        .collect();
    let worst = chosen.iter().map(|&g| key(g)).max().unwrap();
    for g in shard.classes() {
        if !labels.contains(&(g as i32)) && !chosen.contains(&g) {
            assert!(
                key(g) > worst,
                "class {g} has a smaller key than a drawn one"
            );
        }
    }
    // More positives than the rate allows: all positives, nothing else.
    let dense: Vec<i32> = (334..400).collect();
    let s2 = pfc.sample(&shard, &dense, 0).unwrap();
    assert_eq!(s2.index, (0u32..66).collect::<Vec<_>>());
    // Frequencies: over 400 steps each negative of a 100-class shard is drawn about
    // 400 * 10 / 100 = 40 times; uniform without replacement.
    let small = ClassShard::new(0, 100, 100).unwrap();
    let mut count = vec![0usize; 100];
    for step in 0..400 {
        for &j in &pfc.sample(&small, &[], step).unwrap().index {
            count[j as usize] += 1;
        }
    }
    assert!(count.iter().all(|&n| (15..=70).contains(&n)), "{count:?}");
    // Errors.
    for bad in [0.0, -0.1, 1.5, f64::NAN] {
        assert!(matches!(
            PartialFc::new(bad, 0),
            Err(Error::InvalidArgument { what: "rate", .. })
        ));
    }
    assert!(matches!(
        pfc.sample(&shard, &[1000], 0),
        Err(Error::LabelOutOfRange {
            row: 0,
            label: 1000,
            ..
        })
    ));
}

#[test]
fn shards_and_ranks_are_checked() {
    assert!(ClassShard::new(0, 0, 5).is_err());
    assert!(ClassShard::new(3, 3, 5).is_err());
    assert!(ClassShard::new(usize::MAX, 2, 5).is_err());
    assert!(ClassShard::even(3, 4, 0).is_err(), "a rank without classes");
    assert!(ClassShard::even(10, 4, 4).is_err());
    let cover: Vec<_> = (0..4)
        .map(|r| ClassShard::even(10, 4, r).unwrap().classes())
        .collect();
    assert_eq!(cover, vec![0..3, 3..6, 6..8, 8..10]);
    assert!(shard::owner_rows(10, 4, 0).is_err());
    assert_eq!(shard::owner_rows(12, 4, 3).unwrap(), 9..12);
}

/// Runs the forward on every rank with per-rank arguments from `setup` and returns each rank's
/// result (an error, never a hang).
fn forward_each(
    world: usize,
    c: &Case,
    setup: impl Fn(usize) -> (ClassShard, Vec<i32>, usize) + Sync,
) -> Vec<Result<ShardForward, Error>> {
    let spec = MarginLoss::arcface(0.5);
    shard::run_ranks(world, |comm| {
        let (sh, labels, extra) = setup(comm.rank());
        let per = c.shape.d;
        let end = ((sh.class_start + sh.num_local) * per + extra).min(c.w.len());
        let w = &c.w[sh.class_start * per..end];
        let rank = Rank {
            comm,
            shard: sh,
            sampled: None,
            options: ShardOptions::default(),
        };
        cpu::shard_forward(
            &rank,
            &spec,
            &c.x,
            w,
            &labels,
            c.shape,
            &RowInputs::default(),
        )
    })
    .unwrap()
}

fn collective(r: &Result<ShardForward, Error>) -> bool {
    matches!(r, Err(Error::Collective { .. }))
}

#[test]
fn bad_input_on_one_rank_is_an_error_on_every_rank() {
    let c = case(2, Shape::new(8, 4, 12), 1);
    let even = |r| ClassShard::even(12, 3, r).unwrap();
    let ok = forward_each(3, &c, |r| (even(r), c.labels.clone(), 0));
    assert!(ok.iter().all(|r| r.is_ok()));
    // Overlapping and gapped slices.
    let over = forward_each(3, &c, |r| {
        let s = if r == 1 {
            ClassShard::new(3, 5, 12).unwrap()
        } else {
            even(r)
        };
        (s, c.labels.clone(), 0)
    });
    assert!(over.iter().all(collective), "{over:?}");
    let gap = forward_each(2, &c, |r| {
        let s = if r == 0 {
            ClassShard::new(0, 5, 12).unwrap()
        } else {
            ClassShard::new(6, 6, 12).unwrap()
        };
        (s, c.labels.clone(), 0)
    });
    assert!(gap.iter().all(collective));
    // One rank's w is too long: its own error there, Collective on the others.
    let len = forward_each(3, &c, |r| {
        (
            even(r),
            c.labels.clone(),
            if r == 2 {
                0
            } else if r == 1 {
                4
            } else {
                0
            },
        )
    });
    assert!(matches!(len[1], Err(Error::Length { .. })), "{:?}", len[1]);
    assert!(collective(&len[0]) && collective(&len[2]));
    // Ranks called with other labels.
    let lab = forward_each(3, &c, |r| {
        let mut l = c.labels.clone();
        if r == 2 {
            l[0] = (l[0] + 1) % 12;
        }
        (even(r), l, 0)
    });
    assert!(lab.iter().all(collective));
    // A label out of range on every rank: each rank's own LabelOutOfRange.
    let oob = forward_each(3, &c, |r| {
        let mut l = c.labels.clone();
        l[1] = 12;
        (even(r), l, 0)
    });
    assert!(oob
        .iter()
        .all(|r| matches!(r, Err(Error::LabelOutOfRange { .. }))));
}

#[test]
fn backward_checks_its_forward_and_the_owner_split() {
    let spec = MarginLoss::cosface(0.35);
    let c = case(4, Shape::new(10, 4, 12), 1);
    let shards: Vec<ClassShard> = (0..4)
        .map(|r| ClassShard::even(12, 4, r).unwrap())
        .collect();
    let res = shard::run_ranks(4, |comm| {
        let r = comm.rank();
        let rank = Rank {
            comm,
            shard: shards[r],
            sampled: None,
            options: ShardOptions::default(),
        };
        let w = w_of(&c, &shards[r]);
        let fwd = cpu::shard_forward(
            &rank,
            &spec,
            &c.x,
            w,
            &c.labels,
            c.shape,
            &RowInputs::default(),
        )
        .unwrap();
        // B = 10 over 4 ranks: Owner cannot split it, on every rank.
        let owner = cpu::shard_backward(&rank, &spec, &fwd, &c.x, w, &c.labels, Upstream::ONE);
        // Rank 0 passes another spec: its ForwardMismatch, the others a Collective error.
        let other = if r == 0 {
            MarginLoss::cosface(0.3)
        } else {
            spec
        };
        let global = Rank {
            options: ShardOptions {
                dx: DxReduce::Global,
                dw: DwLayout::Sampled,
            },
            ..rank
        };
        let mism = cpu::shard_backward(&global, &other, &fwd, &c.x, w, &c.labels, Upstream::ONE);
        // And then a good call still works: the failed ones left the group usable.
        let good = cpu::shard_backward(&global, &spec, &fwd, &c.x, w, &c.labels, Upstream::ONE);
        (owner, mism, good)
    })
    .unwrap();
    for (r, (owner, mism, good)) in res.iter().enumerate() {
        assert!(
            matches!(owner, Err(Error::InvalidArgument { what: "dx", .. })),
            "{owner:?}"
        );
        if r == 0 {
            assert!(
                matches!(mism, Err(Error::ForwardMismatch { .. })),
                "{mism:?}"
            );
        } else {
            assert!(matches!(mism, Err(Error::Collective { .. })), "{mism:?}");
        }
        assert!(good.is_ok());
    }
    // A sampled set drawn for another shard is refused before any work.
    let pfc = PartialFc::new(0.5, 0).unwrap();
    let wrong = pfc.sample(&shards[1], &c.labels, 0).unwrap();
    let r = shard::run_ranks(1, |comm| {
        let one = ClassShard::new(0, 12, 12).unwrap();
        let rank = Rank {
            comm,
            shard: one,
            sampled: Some(&wrong),
            options: ShardOptions::default(),
        };
        cpu::shard_forward(
            &rank,
            &spec,
            &c.x,
            &c.w,
            &c.labels,
            c.shape,
            &RowInputs::default(),
        )
    })
    .unwrap();
    assert!(matches!(
        r[0],
        Err(Error::InvalidArgument {
            what: "sampled",
            ..
        })
    ));
}

#[test]
fn thread_comm_collectives() {
    for world in 1..=8usize {
        let out = shard::run_ranks(world, |comm| {
            let r = comm.rank() as f64;
            let send = [r, r * 10.0, 0.5];
            let mut all = vec![0.0; 3 * world];
            comm.all_gather(&send, &mut all).unwrap();
            let mut sum = vec![r, 1.0];
            comm.all_reduce_sum(&mut sum).unwrap();
            let blocks: Vec<f64> = (0..world * 2).map(|k| r * 100.0 + k as f64).collect();
            let mut mine = vec![0.0; 2];
            comm.reduce_scatter_sum(&blocks, &mut mine).unwrap();
            (all, sum, mine)
        })
        .unwrap();
        let w = world as f64;
        let tri = w * (w - 1.0) / 2.0;
        for (r, (all, sum, mine)) in out.iter().enumerate() {
            for q in 0..world {
                assert_eq!(&all[3 * q..3 * q + 3], &[q as f64, q as f64 * 10.0, 0.5]);
            }
            assert_eq!(sum, &vec![tri, w]);
            let k = 2.0 * r as f64;
            assert_eq!(
                mine,
                &vec![tri * 100.0 + w * k, tri * 100.0 + w * (k + 1.0)]
            );
        }
    }
    // Mismatched lengths and a rank that leaves: errors, not hangs.
    let out = shard::run_ranks(3, |comm| {
        let n = if comm.rank() == 1 { 2 } else { 3 };
        let mut buf = vec![1.0; n];
        comm.all_reduce_sum(&mut buf)
    })
    .unwrap();
    assert!(
        out.iter()
            .all(|r| matches!(r, Err(Error::Collective { .. }))),
        "{out:?}"
    );
    let out = shard::run_ranks(3, |comm| {
        if comm.rank() == 2 {
            return Ok(());
        }
        let mut buf = vec![1.0; 4];
        comm.all_reduce_sum(&mut buf)
    })
    .unwrap();
    assert!(out[0].is_err() && out[1].is_err() && out[2].is_ok());
    assert!(ThreadComm::group(0).is_err());
}
