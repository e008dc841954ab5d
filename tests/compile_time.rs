//! How long NVRTC takes to compile the kernels: the number README's "Usage (GPU)" quotes for the
//! first call. A measurement, not a check, so it is `#[ignore]`d; run it with
//!
//! ```text
//! LD_LIBRARY_PATH=<dir with libnvrtc.so.13> cargo test --release --test compile_time -- --ignored --nocapture
//! ```
//!
//! It compiles each dtype's translation unit once for `sm_90` (the first of the process also pays
//! for loading libnvrtc), then for `sm_90a` (adds the `wgmma` forward), and prints the machine's
//! load average around each compile: NVRTC runs on one core, so other work on the machine
//! lengthens it. The driver's JIT of the
//! PTX to machine code at module load, on the first launch, comes on top and needs a GPU.

use fused_margin::cuda::{compile_ptx_uncached, nvrtc_available, Unit, KERNEL_DTYPES};
use std::time::Instant;

#[test]
#[ignore = "a timing: run with --ignored --nocapture"]
fn nvrtc_compile_time_per_dtype() {
    if !nvrtc_available() {
        eprintln!("skipped: libnvrtc not found (put its lib/ on LD_LIBRARY_PATH)");
        return;
    }
    for arch in ["sm_90", "sm_90a"] {
        for dtype in KERNEL_DTYPES {
            let before = load_average();
            let t = Instant::now();
            let ptx = compile_ptx_uncached(dtype, Unit::All, arch).expect("compile");
            let secs = t.elapsed().as_secs_f64();
            println!(
                "{arch} {:>4}: {secs:.1} s ({} bytes of PTX; load average {before} before, {} after)",
                dtype.suffix(),
                ptx.to_src().len(),
                load_average()
            );
        }
    }
}

/// NVRTC per compile unit (`Unit`: what a first call compiles is the units its plans launch, in
/// parallel), for sm_90. With `FM_PTX_DIR` set, each unit's PTX is written there as
/// `<dtype>-<unit>.ptx`, for timing ptxas on it (the proxy for the driver's JIT; BENCHMARKS.md,
/// "First call").
#[test]
#[ignore = "a timing: run with --ignored --nocapture"]
fn nvrtc_compile_time_per_unit() {
    if !nvrtc_available() {
        eprintln!("skipped: libnvrtc not found (put its lib/ on LD_LIBRARY_PATH)");
        return;
    }
    let dir = std::env::var_os("FM_PTX_DIR").map(std::path::PathBuf::from);
    for dtype in KERNEL_DTYPES {
        for unit in Unit::EACH {
            let t = Instant::now();
            let ptx = compile_ptx_uncached(dtype, unit, "sm_90").expect("compile");
            let secs = t.elapsed().as_secs_f64();
            let src = ptx.to_src();
            println!(
                "sm_90 {:>4} {:>16}: {secs:.2} s ({} bytes of PTX; load average {})",
                dtype.suffix(),
                unit.name(),
                src.len(),
                load_average()
            );
            if let Some(d) = &dir {
                std::fs::create_dir_all(d).unwrap();
                let f = d.join(format!("{}-{}.ptx", dtype.suffix(), unit.name()));
                std::fs::write(f, src).unwrap();
            }
        }
    }
}

/// What the first call of a default f16/bf16 handle compiles, as `Kernels::prepare` does it: the
/// units of the default plan at D = 512 (core, the tensor-core forward, the 32 x 512 backward)
/// and of the self-check's SIMT reference (its forward and backward), one thread each; the wall
/// time of the five, then of the three alone (with the self-check off).
#[test]
#[ignore = "a timing: run with --ignored --nocapture"]
fn nvrtc_first_call_units_in_parallel() {
    if !nvrtc_available() {
        eprintln!("skipped: libnvrtc not found (put its lib/ on LD_LIBRARY_PATH)");
        return;
    }
    let fast = [Unit::Core, Unit::FwdTc, Unit::GradTc32];
    let simt = [Unit::FwdSimt, Unit::GradSimt];
    // libnvrtc's one-time load first, so that it is not charged to the first set.
    compile_ptx_uncached(fused_margin::DType::F32, Unit::FwdWg, "sm_90").expect("compile");
    for dtype in [fused_margin::DType::BF16, fused_margin::DType::F16] {
        for (what, units) in [
            ("default plan + self-check", [&fast[..], &simt[..]].concat()),
            ("default plan, self-check off", fast.to_vec()),
        ] {
            let t = Instant::now();
            std::thread::scope(|sc| {
                for &u in &units {
                    sc.spawn(move || compile_ptx_uncached(dtype, u, "sm_90").expect("compile"));
                }
            });
            println!(
                "{:>4} {what} ({} units, {} threads on {} cores): {:.2} s wall",
                dtype.suffix(),
                units.len(),
                units.len(),
                std::thread::available_parallelism().map_or(0, |n| n.get()),
                t.elapsed().as_secs_f64()
            );
        }
    }
}

/// The 1-minute load average (Linux), or "?" elsewhere.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}
