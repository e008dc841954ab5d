//! Thread safety and determinism of the CPU reference (the GPU side is in `tests/gpu_vs_cpu.rs`):
//! many threads calling `cpu::forward` / `cpu::backward` at once on shared inputs get results
//! bit-identical to a single-threaded run, whatever the size of rayon's pool inside the calls.
//!
//! The CPU path has no shared state (every call owns its buffers) and no order-dependent
//! parallel reduction (each output element is summed by one task in a fixed order), so this is
//! exact equality, not a tolerance.
//!
//! The GPU handle's `Send + Sync` is asserted at compile time next to its definition
//! (`src/cuda/handle.rs`, the `assert_send_sync::<FusedMarginLoss>()` and `GpuForward` block); the
//! GPU tests of sharing one handle across threads and streams need a GPU
//! (`tests/gpu_vs_cpu.rs`, `deterministic_across_streams_and_threads`).

use fused_margin::{cpu, Error, MarginLoss, OverflowPolicy, Reduction, Shape, Upstream};
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::Barrier;

// The CPU API's values cross threads: keep them Send + Sync.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<cpu::Forward>();
    assert_send_sync::<cpu::Gradients>();
    assert_send_sync::<MarginLoss>();
    assert_send_sync::<Shape>();
    assert_send_sync::<Upstream<'static>>();
    assert_send_sync::<Error>();
};

/// B > the CPU's 16-row blocks (and not a multiple), C > two of its 512-class backward chunks.
const SHAPE: Shape = Shape {
    b: 37,
    d: 24,
    c: 1100,
};

struct Inputs {
    x: Vec<f32>,
    w: Vec<f32>,
    labels: Vec<i32>,
    up: Vec<f64>,
}

fn inputs() -> Inputs {
    let mut r = StdRng::seed_from_u64(77);
    let x = (0..SHAPE.b * SHAPE.d)
        .map(|_| r.random_range(-1.0f32..1.0))
        .collect();
    let w = (0..SHAPE.c * SHAPE.d)
        .map(|_| r.random_range(-1.0f32..1.0))
        .collect();
    let mut labels: Vec<i32> = (0..SHAPE.b)
        .map(|_| r.random_range(0..SHAPE.c as i32))
        .collect();
    labels[5] = -1;
    labels[20] = -100;
    let up = (0..SHAPE.b).map(|_| r.random_range(-1.0..2.0)).collect();
    Inputs { x, w, labels, up }
}

fn specs() -> Vec<MarginLoss> {
    vec![
        MarginLoss::arcface(0.5),
        MarginLoss::cosface(0.35).reduction(Reduction::Sum),
        MarginLoss::sphereface(4.0).lambda(5.0),
        MarginLoss::combined(1.0, 0.3, 0.2)
            .policy(OverflowPolicy::Raw)
            .reduction(Reduction::None),
    ]
}

/// Every output of one forward + backward as bit patterns.
type Bits = Vec<u64>;

fn bits<'a>(parts: impl IntoIterator<Item = &'a [f64]>) -> Bits {
    parts
        .into_iter()
        .flat_map(|p| p.iter().map(|v| v.to_bits()))
        .collect()
}

/// Forward and backward of `spec` on `inp` (f32, or the same values rounded to bf16).
fn once(spec: &MarginLoss, inp: &Inputs, as_bf16: bool) -> Bits {
    let up = match spec.reduction {
        Reduction::None => Upstream::PerRow(&inp.up),
        _ => Upstream::ONE,
    };
    let (fwd, g) = if as_bf16 {
        let x: Vec<bf16> = inp.x.iter().map(|&v| bf16::from_f32(v)).collect();
        let w: Vec<bf16> = inp.w.iter().map(|&v| bf16::from_f32(v)).collect();
        let fwd = cpu::forward(spec, &x, &w, &inp.labels, SHAPE).unwrap();
        let g = cpu::backward(spec, &fwd, &x, &w, &inp.labels, SHAPE, up).unwrap();
        (fwd, g)
    } else {
        let fwd = cpu::forward(spec, &inp.x, &inp.w, &inp.labels, SHAPE).unwrap();
        let g = cpu::backward(spec, &fwd, &inp.x, &inp.w, &inp.labels, SHAPE, up).unwrap();
        (fwd, g)
    };
    bits([
        std::slice::from_ref(&fwd.loss),
        &fwd.row_loss,
        &fwd.lse,
        &fwd.x_norm,
        &fwd.w_norm,
        &g.dx,
        &g.dw,
    ])
}

/// The single-threaded results: every spec, f32 and bf16, on a one-thread rayon pool.
fn reference(inp: &Inputs) -> Vec<Bits> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| {
        specs()
            .iter()
            .flat_map(|s| [once(s, inp, false), once(s, inp, true)])
            .collect()
    })
}

#[test]
fn rayon_pool_size_does_not_change_a_bit() {
    let inp = inputs();
    let want = reference(&inp);
    for threads in [2, 3, 8] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let got: Vec<Bits> = pool.install(|| {
            specs()
                .iter()
                .flat_map(|s| [once(s, &inp, false), once(s, &inp, true)])
                .collect()
        });
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g == w,
                "{threads} rayon threads: result {k} differs from 1 thread"
            );
        }
    }
}

#[test]
fn concurrent_callers_on_shared_inputs_match_one_thread() {
    let inp = inputs();
    let want = reference(&inp);
    let specs = specs();
    let callers = 12;
    let rounds = 3;
    let start = Barrier::new(callers);
    // Each caller starts at a different spec and dtype so different calls overlap; all share
    // `inp` (borrowed, not copied) and the global rayon pool.
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..callers)
            .map(|t| {
                let (inp, specs, want, start) = (&inp, &specs, &want, &start);
                scope.spawn(move || {
                    start.wait();
                    let n = specs.len() * 2;
                    for round in 0..rounds {
                        for k in 0..n {
                            let idx = (k + t + round) % n;
                            let got = once(&specs[idx / 2], inp, idx % 2 == 1);
                            assert!(
                                got == want[idx],
                                "caller {t}, round {round}: result {idx} ({:?}, bf16 {}) differs \
                                 from the single-threaded run",
                                specs[idx / 2],
                                idx % 2 == 1
                            );
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("a caller thread panicked");
        }
    });
}

#[test]
fn results_cross_threads() {
    // A forward made on one thread, its backward on another (Forward is Send), with the inputs
    // shared by reference: the same bits as on one thread.
    let inp = inputs();
    let spec = MarginLoss::arcface(0.5);
    let fwd = std::thread::scope(|s| {
        s.spawn(|| cpu::forward(&spec, &inp.x, &inp.w, &inp.labels, SHAPE).unwrap())
            .join()
            .unwrap()
    });
    let g = std::thread::scope(|s| {
        s.spawn(|| {
            cpu::backward(
                &spec,
                &fwd,
                &inp.x,
                &inp.w,
                &inp.labels,
                SHAPE,
                Upstream::ONE,
            )
            .unwrap()
        })
        .join()
        .unwrap()
    });
    let here = cpu::forward(&spec, &inp.x, &inp.w, &inp.labels, SHAPE).unwrap();
    let g_here = cpu::backward(
        &spec,
        &here,
        &inp.x,
        &inp.w,
        &inp.labels,
        SHAPE,
        Upstream::ONE,
    )
    .unwrap();
    assert_eq!(fwd, here);
    assert_eq!(
        bits([&g.dx[..], &g.dw[..]]),
        bits([&g_here.dx[..], &g_here.dw[..]])
    );
}
