//! Criterion suite (MATH.md's loss on the GPU and CPU). Groups `{loss}_{dtype}_C{classes}` hold
//! `{variant}/{mode}` for variant in fused, fused_simtbwd (f16/bf16: the SIMT
//! backward instead of the default tensor-core one), fused_hostlabels (f16/bf16: labels checked on the host, one sync per call),
//! fused_wgmma (f16/bf16: the opt-in wgmma forward, sm_90a), fused_tf32 (f32: the opt-in TF32 forward), fused_wide (the 128 x 256 forward
//! tiles), naive and mode in forward, backward, full; `cublas` holds the
//! roof GEMMs; `cpu_reference` the CPU path at the smallest shape. Throughput is reported as
//! elements = useful FLOPs (2*B*C*D per matrix product), so criterion's `elem/s` reads as FLOP/s.
//!
//! GPU timing uses CUDA events around each call with the L2 flushed before it
//! (`benches/common/harness.rs`). Run one group with a filter, e.g. `cargo bench --features bench -- arcface_bf16`.
//! Without a GPU the GPU groups are skipped with a printed reason.
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaStream;
use fused_margin::cuda::{self, CudaElement};
use fused_margin::{cpu, MarginLoss, Shape, Upstream};
use half::bf16;
use std::sync::Arc;
use std::time::Duration;

#[path = "common/harness.rs"]
mod harness;
use harness::{Mode, Tools};

fn gpu_stream() -> Option<Arc<CudaStream>> {
    if cuda::device_available() && cuda::nvrtc_available() {
        return Some(cuda::default_stream(0).expect("open GPU 0"));
    }
    assert!(
        std::env::var("FUSED_MARGIN_REQUIRE_GPU").as_deref() != Ok("1"),
        "FUSED_MARGIN_REQUIRE_GPU=1 but no CUDA device (or libnvrtc) was found"
    );
    eprintln!("GPU benchmark groups skipped: no CUDA device or libnvrtc on this machine");
    None
}

fn gpu_dtype<T: CudaElement>(cr: &mut Criterion, stream: &Arc<CudaStream>, tools: &mut Tools) {
    let dt = T::DTYPE.suffix();
    for &classes in &harness::CLASSES {
        let p = harness::problem::<T>(stream, classes, 1);
        for (name, spec) in harness::losses() {
            let mut group = cr.benchmark_group(format!("{name}_{dt}_C{classes}"));
            group.sample_size(10).sampling_mode(SamplingMode::Flat);
            for (plan_name, gpu) in harness::variants(stream, dt, false) {
                for mode in Mode::ALL {
                    group.throughput(Throughput::Elements(mode.flops(p.shape) as u64));
                    group.bench_function(format!("{plan_name}/{}", mode.name()), |b| {
                        b.iter_custom(|iters| {
                            let ms: f64 = (0..iters)
                                .map(|_| {
                                    harness::time_once(&gpu, &spec, &p, mode, tools).expect("run")
                                })
                                .sum();
                            Duration::from_secs_f64(ms * 1e-3)
                        })
                    });
                }
            }
            group.finish();
        }
    }
}

fn gemm_group<T: CudaElement>(
    cr: &mut Criterion,
    blas: &CudaBlas,
    label: &str,
    stream: &Arc<CudaStream>,
    tools: &mut Tools,
) where
    CudaBlas: cudarc::cublas::Gemm<T>,
{
    let mut group = cr.benchmark_group(format!("cublas_{label}"));
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    let mut shapes = vec![("roof_8192".to_string(), (8192, 8192, 8192))];
    for &c in &harness::CLASSES {
        // The step's forward product: (C x D) . (D x B) in column-major terms.
        shapes.push((format!("C{c}"), (c, harness::B, harness::D)));
    }
    for (label, (m, n, k)) in shapes {
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let ms = harness::gemm_ms::<T>(blas, stream, (m, n, k), tools, iters as usize)
                    .expect("gemm");
                Duration::from_secs_f64(ms * iters as f64 * 1e-3)
            })
        });
    }
    group.finish();
}

fn gpu_benches(cr: &mut Criterion) {
    let Some(stream) = gpu_stream() else { return };
    let mut tools = Tools::new(&stream).expect("benchmark tools");
    if let Ok(blas) = CudaBlas::new(stream.clone()) {
        gemm_group::<bf16>(cr, &blas, "bf16", &stream, &mut tools);
        gemm_group::<f32>(cr, &blas, "f32", &stream, &mut tools);
        if let Some(tf32) = harness::tf32_blas(&stream) {
            gemm_group::<f32>(cr, &tf32, "tf32", &stream, &mut tools);
        }
    } else {
        eprintln!("cuBLAS groups skipped: libcublas not found");
    }
    gpu_dtype::<bf16>(cr, &stream, &mut tools);
    gpu_dtype::<f32>(cr, &stream, &mut tools);
}

/// The CPU reference at the smallest GPU shape (B = 512, D = 512, C = 10,000), f32 inputs.
fn cpu_reference(cr: &mut Criterion) {
    let shape = Shape::new(harness::B, harness::D, harness::CLASSES[0]);
    let x: Vec<f32> = harness::random(shape.b * shape.d, 1);
    let w: Vec<f32> = harness::random(shape.c * shape.d, 2);
    let labels: Vec<i32> = (0..shape.b)
        .map(|i| ((i * 7919) % shape.c) as i32)
        .collect();
    let spec = MarginLoss::arcface(0.5);
    let mut group = cr.benchmark_group("cpu_reference_arcface_f32_C10000");
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(Mode::Forward.flops(shape) as u64));
    group.bench_function("forward", |b| {
        b.iter(|| cpu::forward(&spec, &x, &w, &labels, shape).unwrap())
    });
    group.throughput(Throughput::Elements(Mode::Full.flops(shape) as u64));
    group.bench_function("full", |b| {
        b.iter(|| {
            let f = cpu::forward(&spec, &x, &w, &labels, shape).unwrap();
            cpu::backward(&spec, &f, &x, &w, &labels, shape, Upstream::ONE).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, gpu_benches, cpu_reference);
criterion_main!(benches);
