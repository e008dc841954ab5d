//! The CPU path's memory is bounded by the problem, as `cpu::forward` and `cpu::backward`
//! document: a counting allocator (this binary's global allocator) records the peak of live heap
//! bytes during each call and the test compares it with the stated formula. A large batch with
//! one class used to allocate `B * 512` f64 of backward scratch whatever C was (B = 500,000,
//! D = C = 1: 2 GB for 2 MB of input).

use fused_margin::{
    cpu, ElasticKind, ElasticMargins, ElasticPlus, ElasticRng, LossState, MarginLoss, RowInputs,
    Shape, Upstream, Variant,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to the system allocator with the caller's layout; the counters
// are only statistics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Serializes the tests of this binary: the counters are global.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Peak heap bytes allocated above the level at entry while `f` runs.
fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let r = f();
    (r, PEAK.load(Ordering::SeqCst) - base)
}

/// The documented bounds (bytes), plus a fixed allowance for rayon's per-task bookkeeping.
fn forward_bound(s: Shape) -> usize {
    8 * (s.b * s.d + s.c * s.d + 6 * s.b + 3 * s.c) + (1 << 20)
}
fn backward_bound(s: Shape) -> usize {
    8 * (2 * s.b * s.d + 2 * s.c * s.d + s.b * s.c.min(512) + 6 * s.b + 3 * s.c) + (1 << 20)
}

fn check(shape: Shape) {
    check_loss(shape, &MarginLoss::cosface(0.35), &RowInputs::default());
}

/// The bounds of a loss with state: `C` read as `w`'s `C*K` rows, plus `12*B` values of
/// per-row margins and thresholds and, with sub-centers, `B * min(C, 512)` bytes of winners.
fn check_loss(shape: Shape, spec: &MarginLoss, inputs: &RowInputs) {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let k = spec.variant.centers();
    let x: Vec<f32> = (0..shape.b * shape.d)
        .map(|k| 0.5 + (k % 7) as f32 * 0.1)
        .collect();
    let w: Vec<f32> = (0..shape.c * k * shape.d)
        .map(|k| 1.0 - (k % 5) as f32 * 0.1)
        .collect();
    let labels: Vec<i32> = (0..shape.b).map(|i| (i % shape.c) as i32).collect();
    let rows = Shape::new(shape.b, shape.d, shape.c * k);
    let extra = if spec.variant == Variant::Plain {
        0
    } else {
        8 * 12 * shape.b + if k > 1 { shape.b * shape.c.min(512) } else { 0 }
    };
    let (fwd, pf) =
        peak_during(|| cpu::forward_with(spec, &x, &w, &labels, shape, inputs).unwrap());
    assert!(fwd.loss.is_finite());
    let bound = forward_bound(rows) + extra;
    assert!(pf <= bound, "{shape:?}: forward peak {pf} B > {bound} B");
    let (g, pb) =
        peak_during(|| cpu::backward(spec, &fwd, &x, &w, &labels, shape, Upstream::ONE).unwrap());
    assert!(g.dx.iter().chain(&g.dw).all(|v| v.is_finite()));
    let bound = backward_bound(rows) + extra;
    assert!(pb <= bound, "{shape:?}: backward peak {pb} B > {bound} B");
}

#[test]
fn the_losses_with_state_stay_within_the_formula() {
    for shape in [Shape::new(20_000, 8, 3), Shape::new(3, 64, 20_000)] {
        check_loss(shape, &MarginLoss::subcenter(3), &RowInputs::default());
        check_loss(
            shape,
            &MarginLoss::adaface(),
            &RowInputs::with_state(LossState::ADAFACE_INIT),
        );
        check_loss(
            shape,
            &MarginLoss::curricularface(),
            &RowInputs::with_state(LossState::CURRICULAR_INIT),
        );
        check_loss(shape, &MarginLoss::magface(), &RowInputs::default());
        let rng = ElasticRng {
            seed: 1,
            step: 2,
            row_offset: 0,
        };
        check_loss(
            shape,
            &MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::Rank),
            &RowInputs::with_margins(ElasticMargins::Seeded(rng)),
        );
    }
}

#[test]
fn a_large_batch_with_one_class_allocates_by_its_size() {
    // 500,000 x 1 inputs: the backward's bound is ~40 MB; a fixed 512-class chunk was 2 GB.
    check(Shape::new(500_000, 1, 1));
}

#[test]
fn wide_and_tall_problems_stay_within_the_formula() {
    check(Shape::new(3, 64, 20_000));
    check(Shape::new(20_000, 8, 3));
    check(Shape::new(700, 33, 1100));
}

/// The sharded calls (`cpu::shard_forward`, `shard_backward`) on `world` in-process ranks: each
/// rank within the plain bounds for its own classes plus what `shard_forward` and
/// `shard_backward` document for the exchange (the records, the reduction of dx, and the
/// in-process communicator's copy of each send); the peak is the sum over the ranks, which run
/// at once.
#[test]
fn sharded_calls_stay_within_the_formula() {
    use fused_margin::shard::{self, ClassShard, Communicator, Rank, ShardOptions};
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    for (shape, world) in [
        (Shape::new(3_000, 16, 900), 3),
        (Shape::new(40, 64, 20_000), 4),
    ] {
        let (b, d, c) = (shape.b, shape.d, shape.c);
        let x: Vec<f32> = (0..b * d).map(|k| 0.5 + (k % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..c * d).map(|k| 1.0 - (k % 5) as f32 * 0.1).collect();
        let labels: Vec<i32> = (0..b).map(|i| (i % c) as i32).collect();
        let spec = MarginLoss::arcface(0.5);
        let ((), peak) = peak_during(|| {
            shard::run_ranks(world, |comm| {
                let sh = ClassShard::even(c, world, comm.rank()).unwrap();
                let rank = Rank {
                    comm,
                    shard: sh,
                    sampled: None,
                    options: ShardOptions::default(),
                };
                let wl = &w[sh.class_start * d..(sh.class_start + sh.num_local) * d];
                let f =
                    cpu::shard_forward(&rank, &spec, &x, wl, &labels, shape, &RowInputs::default())
                        .unwrap();
                let g =
                    cpu::shard_backward(&rank, &spec, &f, &x, wl, &labels, Upstream::ONE).unwrap();
                assert!(g.dx.iter().chain(&g.dw).all(|v| v.is_finite()));
            })
            .unwrap();
        });
        let local = Shape::new(b, d, c.div_ceil(world));
        let exchange = 8 * (4 * b * (world + 2) + b) + 8 * (2 * b + b / world) * (d + 1);
        let bound = world * (backward_bound(local) + exchange);
        assert!(
            peak <= bound,
            "{shape:?} on {world} ranks: peak {peak} B > {bound} B"
        );
    }
}
