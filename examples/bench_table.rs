//! A quick look at speed and memory on the GPU: one line per case (loss, dtype, C, variant, mode),
//! with the median time of a few repetitions (CUDA events, L2 flushed before each), achieved
//! TFLOP/s of the useful matrix products (2*B*C*D each), the fraction of the cuBLAS bf16 roof
//! measured in the same run, the fused/naive ratio, and the measured peak device memory of
//! forward + backward. The criterion suite (`cargo bench --features bench`) is the full measurement.
//!
//! `cargo run --release --example bench_table -- [--reps N] [--classes 10000,100000] [--dtypes f32,bf16] [--losses arcface] [--with-simt]`
//!
//! The fused/row column is the default fused time over the row's time (fused_simtbwd: with the SIMT
//! backward instead of the default tensor-core one; naive; simt: the fused plan without tensor cores).
use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaStream;
use fused_margin::cuda::{self, CudaElement, Plan};
use half::bf16;
use std::sync::Arc;

#[path = "../benches/common/harness.rs"]
mod harness;
use harness::{Mode, Tools};

struct Opts {
    reps: usize,
    classes: Vec<usize>,
    dtypes: Vec<String>,
    losses: Vec<String>,
    simt: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        reps: 5,
        classes: harness::CLASSES.to_vec(),
        dtypes: vec!["bf16".into(), "f32".into()],
        losses: vec!["arcface".into(), "cosface".into()],
        simt: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--with-simt" {
            o.simt = true;
            continue;
        }
        let v = it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        let list = || v.split(',').map(str::to_string).collect::<Vec<_>>();
        match a.as_str() {
            "--reps" => o.reps = v.parse().expect("--reps N"),
            "--classes" => {
                o.classes = list()
                    .iter()
                    .map(|c| c.parse().expect("class count"))
                    .collect()
            }
            "--dtypes" => o.dtypes = list(),
            "--losses" => o.losses = list(),
            _ => panic!("unknown option {a} (see the file's header)"),
        }
    }
    o
}

fn cases<T: CudaElement>(o: &Opts, stream: &Arc<CudaStream>, tools: &mut Tools, roof: f64) {
    let dt = T::DTYPE.suffix();
    if !o.dtypes.iter().any(|d| d == dt) {
        return;
    }
    for &c in &o.classes {
        let p = harness::problem::<T>(stream, c, 1);
        for (name, spec) in harness::losses() {
            if !o.losses.iter().any(|l| l == name) {
                continue;
            }
            let mut fused_ms = [0.0; 3];
            // harness::variants: "fused" is the default handle; the others are compared with it.
            for (label, gpu) in harness::variants(stream, dt, o.simt) {
                let mem = harness::peak_bytes(&gpu, &spec, &p, tools).expect("memory");
                let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
                let mem = mem.map_or("n/a".to_string(), |(peak, grads)| {
                    format!("{:.1}/{:.1}", mib(peak), mib(grads))
                });
                for (i, mode) in Mode::ALL.into_iter().enumerate() {
                    let ms = harness::median_ms(&gpu, &spec, &p, mode, tools, o.reps).expect("run");
                    let tf = harness::tflops(mode.flops(p.shape), ms);
                    let ratio = match label {
                        "fused" => {
                            fused_ms[i] = ms;
                            String::from("-")
                        }
                        _ => format!("{:.2}", fused_ms[i] / ms),
                    };
                    println!(
                        "{name:8} {dt:5} {c:>8} {:11} {:9} {ms:10.3} {tf:8.2} {:7.1}% {ratio:>8} {mem:>12}",
                        label,
                        mode.name(),
                        100.0 * tf / roof
                    );
                }
            }
        }
    }
}

fn main() {
    let o = opts();
    if !cuda::device_available() {
        println!("bench_table: no CUDA device on this machine; nothing to measure");
        return;
    }
    let stream = cuda::default_stream(0).expect("GPU 0");
    let ctx = stream.context();
    let mut tools = Tools::new(&stream).expect("tools");
    let mut ver = 0i32;
    // SAFETY: writes the driver's CUDA version into `ver`.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut ver) };
    println!(
        "device: {} ({:?}), CUDA driver API {}.{}, B = {}, D = {}",
        ctx.name().unwrap_or_default(),
        ctx.compute_capability().unwrap_or((0, 0)),
        ver / 1000,
        (ver % 1000) / 10,
        harness::B,
        harness::D
    );
    let gpu = harness::handle(&stream, Plan::Naive);
    println!(
        "naive plan matrix products on cuBLAS: {}",
        gpu.device_facts().cublas
    );
    let mut roof = f64::NAN;
    if let Ok(blas) = CudaBlas::new(stream.clone()) {
        let r = o.reps.max(3);
        let ms = harness::gemm_ms::<bf16>(&blas, &stream, (8192, 8192, 8192), &mut tools, r)
            .expect("gemm");
        roof = harness::tflops(2.0 * 8192f64.powi(3), ms);
        let ms32 = harness::gemm_ms::<f32>(&blas, &stream, (8192, 8192, 8192), &mut tools, r)
            .expect("gemm");
        println!("roof: cuBLAS bf16 GEMM 8192^3 {ms:.3} ms = {roof:.1} TFLOP/s; f32 (no TF32) {ms32:.3} ms = {:.1} TFLOP/s", harness::tflops(2.0 * 8192f64.powi(3), ms32));
        let tf32 = harness::tf32_blas(&stream);
        if let Some(t) = &tf32 {
            let mst = harness::gemm_ms::<f32>(t, &stream, (8192, 8192, 8192), &mut tools, r)
                .expect("gemm");
            println!(
                "roof: cuBLAS TF32 GEMM 8192^3 {mst:.3} ms = {:.1} TFLOP/s",
                harness::tflops(2.0 * 8192f64.powi(3), mst)
            );
        }
        for &c in &o.classes {
            let fl = 2.0 * (c * harness::B * harness::D) as f64;
            let b = harness::gemm_ms::<bf16>(
                &blas,
                &stream,
                (c, harness::B, harness::D),
                &mut tools,
                r,
            )
            .expect("gemm");
            let f =
                harness::gemm_ms::<f32>(&blas, &stream, (c, harness::B, harness::D), &mut tools, r)
                    .expect("gemm");
            let t = tf32.as_ref().map_or(f64::NAN, |t| {
                harness::gemm_ms::<f32>(t, &stream, (c, harness::B, harness::D), &mut tools, r)
                    .expect("gemm")
            });
            println!(
                "one GEMM of the step's shape, C = {c}: bf16 {b:.3} ms ({:.1} TFLOP/s), f32 {f:.3} ms ({:.1} TFLOP/s), TF32 {t:.3} ms ({:.1} TFLOP/s)",
                harness::tflops(fl, b),
                harness::tflops(fl, f),
                harness::tflops(fl, t)
            );
        }
    } else {
        println!("libcublas not found: no roof");
    }
    println!(
        "{:8} {:5} {:>8} {:11} {:9} {:>10} {:>8} {:>8} {:>8} {:>12}",
        "loss",
        "dtype",
        "C",
        "plan",
        "mode",
        "ms",
        "TFLOP/s",
        "%roof",
        "fused/row",
        "peak/grads MiB"
    );
    cases::<bf16>(&o, &stream, &mut tools, roof);
    cases::<f32>(&o, &stream, &mut tools, roof);
}
