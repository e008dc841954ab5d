//! NVRTC compilation of the kernel translation unit, one PTX per (input dtype, architecture),
//! cached process-wide: every later handle reuses it, but nothing is kept on disk. The first
//! compile is slow: for `sm_90`, 32 s (f32) to 53 s (bf16) with NVRTC 13.0 on one core of a
//! 2-core AMD EPYC machine (tests/compile_time.rs measures it; README, "Usage (GPU)"), before the
//! driver's JIT of the PTX at module load.
//!
//! The loss options are kernel arguments, not compile-time constants: only the B target elements
//! read them, so specializing would multiply compiles for no measurable gain.

use crate::dtype::DType;
use crate::error::{Error, Result};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The kernel translation unit (kernels/all.cu with every include inlined by build.rs).
pub mod source {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The input dtypes the kernels are built for.
pub const KERNEL_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Every kernel entry point's base name; the real symbol appends `_f32`, `_f16` or `_bf16`
/// (and `_f32out` before it for the f32-gradient variants).
pub const ENTRY_POINTS: [&str; 21] = [
    "fm_fill_u32",
    "fm_fill_u16",
    "fm_row_norms",
    "fm_fwd_tiles",
    "fm_combine_rows",
    "fm_reduce_loss",
    "fm_label_status",
    "fm_upstream_rows",
    "fm_grad_x_partial",
    "fm_x_finish",
    "fm_x_finish_f32out",
    "fm_grad_w",
    "fm_grad_w_f32out",
    "naive_normalize",
    "naive_mask_rows",
    "naive_cosine",
    "naive_logits",
    "naive_softmax",
    "naive_dlogits",
    "naive_matmul",
    "naive_norm_backward",
];

/// Entry points built only for f16 and bf16 inputs (tensor cores).
pub const HALF_ENTRY_POINTS: [&str; 9] = [
    "fm_fwd_tiles_tc",
    "fm_fwd_tiles_tc_wide",
    "fm_grad_scale",
    "fm_grad_x_tc",
    "fm_grad_w_tc",
    "fm_grad_w_tc_f32out",
    "fm_grad_x_tc_d512",
    "fm_grad_w_tc_d512",
    "fm_grad_w_tc_d512_f32out",
];

/// Entry points built only for f32 inputs (the TF32 tensor-core forward).
pub const F32_ENTRY_POINTS: [&str; 2] = ["fm_fwd_tiles_tf32", "fm_fwd_tiles_tf32_wide"];

/// Entry points built only for f16 and bf16 inputs and only for `sm_90a` (wgmma: the Hopper
/// forward, selected by the benchmark-only kernel override of [`super::Options`]).
pub const SM90A_HALF_ENTRY_POINTS: [&str; 1] = ["fm_fwd_tiles_wg"];

/// True when libnvrtc can be loaded (cudarc panics on first use otherwise).
pub fn nvrtc_available() -> bool {
    super::libs::nvrtc_present()
}

fn dtype_define(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("-DFM_DTYPE=0"),
        DType::F16 => Ok("-DFM_DTYPE=1"),
        DType::BF16 => Ok("-DFM_DTYPE=2"),
        DType::F64 => Err(Error::Unsupported {
            detail: "f64 inputs run on the CPU reference only; the GPU kernels take f32, f16, bf16"
                .into(),
        }),
    }
}

/// Compiles the kernels for `dtype` and `arch` (e.g. `"sm_90"`), without caching. Works without
/// a GPU (only libnvrtc is needed). Accurate maths: no fast-math flags.
pub fn compile_ptx_uncached(dtype: DType, arch: &str) -> Result<Ptx> {
    let module = format!("fused-margin kernels ({}, {arch})", dtype.suffix());
    // The dtype first: an f64 request is wrong on every machine, and saying "libnvrtc not found"
    // to it would send the caller after the wrong problem.
    let define = dtype_define(dtype)?;
    if !nvrtc_available() {
        return Err(Error::Compile {
            module,
            log: "libnvrtc not found (install CUDA or `pip install nvidia-cuda-nvrtc` and put its lib/ on LD_LIBRARY_PATH)".into(),
        });
    }
    let opts = CompileOptions {
        options: vec![
            define.to_string(),
            format!("--gpu-architecture={arch}"),
            "--std=c++17".into(),
        ],
        name: Some(format!("fused_margin_{}.cu", dtype.suffix())),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source::KERNELS_CU, opts).map_err(|e| Error::Compile {
        module,
        log: match e {
            CompileError::CompileError { log, options, .. } => {
                format!("options {options:?}\n{}", log.to_string_lossy())
            }
            other => format!("{other:?}"),
        },
    })
}

/// Compiles (once per process) and returns the PTX for `dtype` and `arch`.
pub fn compile_ptx(dtype: DType, arch: &str) -> Result<Ptx> {
    static CACHE: OnceLock<Mutex<HashMap<(DType, String), Ptx>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (dtype, arch.to_string());
    if let Some(p) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(p.clone());
    }
    // Compile outside the lock: other dtypes need not wait. A racing duplicate compile is harmless.
    let ptx = compile_ptx_uncached(dtype, arch)?;
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, ptx.clone());
    Ok(ptx)
}

/// The symbol of `base` for `dtype`: `fm_grad_w` + bf16 -> `fm_grad_w_bf16`.
pub fn entry_name(base: &str, dtype: DType) -> String {
    format!("{base}_{}", dtype.suffix())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f64 is refused for what it is, with or without libnvrtc on the machine (the error used to
    /// be "libnvrtc not found" where NVRTC was missing).
    #[test]
    fn f64_is_unsupported_whether_or_not_nvrtc_is_present() {
        for result in [
            compile_ptx_uncached(DType::F64, "sm_90"),
            compile_ptx(DType::F64, "sm_80"),
        ] {
            match result {
                Err(Error::Unsupported { detail }) => {
                    assert!(
                        detail.contains("f64"),
                        "detail {detail:?} does not name f64"
                    )
                }
                Err(other) => panic!("expected Error::Unsupported for f64, got {other}"),
                Ok(_) => panic!("expected Error::Unsupported for f64, got PTX"),
            }
        }
    }
}
