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

use fused_margin::cuda::{compile_ptx_uncached, nvrtc_available, KERNEL_DTYPES};
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
            let ptx = compile_ptx_uncached(dtype, arch).expect("compile");
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

/// The 1-minute load average (Linux), or "?" elsewhere.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}
