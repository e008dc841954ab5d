//! Criterion benches. This first version times the CPU reference only; the GPU groups (fused vs
//! naive, forward / backward / full, several C) arrive with the benchmark issue.
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use fused_margin::{cpu, MarginLoss, Shape, Upstream};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn cpu_reference(cr: &mut Criterion) {
    let shape = Shape::new(64, 128, 1000);
    let mut rng = StdRng::seed_from_u64(7);
    let x: Vec<f32> = (0..shape.b * shape.d)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let w: Vec<f32> = (0..shape.c * shape.d)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let labels: Vec<i32> = (0..shape.b)
        .map(|_| rng.random_range(0..shape.c as i32))
        .collect();
    let spec = MarginLoss::arcface(0.5);
    let mut group = cr.benchmark_group("cpu_reference");
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    group.bench_function("arcface_f32_B64_D128_C1000_full", |bch| {
        bch.iter(|| {
            let fwd = cpu::forward(&spec, &x, &w, &labels, shape).unwrap();
            cpu::backward(&spec, &fwd, &x, &w, &labels, shape, Upstream::ONE).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, cpu_reference);
criterion_main!(benches);
