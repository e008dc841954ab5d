//! NVRTC compilation of the kernel translation unit, one PTX per (input dtype, compile unit,
//! architecture), cached process-wide (every later handle reuses it) and on disk (every later
//! process does), see [`cache_dir`]. A [`Unit`] is one kernel family (and tile shape): a handle
//! compiles and loads only the units its plans launch, in parallel, so the first call pays for
//! the kernels it runs, not for all of them. The driver's JIT of the PTX to machine code at module load has the driver's own
//! disk cache (`~/.nv/ComputeCache`, `CUDA_CACHE_PATH`). tests/compile_time.rs measures the
//! compile; BENCHMARKS.md, "First call", has the figures.
//!
//! The loss options are kernel arguments, not compile-time constants: only the B target elements
//! read them, so specializing would multiply compiles for no measurable gain.

use super::geometry as g;
use crate::dtype::DType;
use crate::error::{Error, Result};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// The kernel translation unit (kernels/all.cu with every include inlined by build.rs).
pub mod source {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The input dtypes the kernels are built for.
pub const KERNEL_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Every kernel entry point's base name; the real symbol appends `_f32`, `_f16` or `_bf16`
/// (and `_f32out` before it for the f32-gradient variants).
pub const ENTRY_POINTS: [&str; 36] = [
    "fm_fill_u32",
    "fm_fill_u16",
    "fm_row_norms",
    "fm_target_rows",
    "fm_fwd_tiles",
    "fm_fwd_tiles_sc",
    "fm_combine_rows",
    "fm_shard_stats",
    "fm_shard_combine",
    "fm_gather_rows",
    "fm_shard_cos_out",
    "fm_shard_cos_in",
    "fm_reduce_loss",
    "fm_label_status",
    "fm_norm_coef",
    "fm_adaface_state",
    "fm_curricular_state",
    "fm_elastic_plus",
    "fm_grad_x_partial",
    "fm_grad_x_partial_sc",
    "fm_x_finish",
    "fm_x_finish_f32out",
    "fm_grad_w",
    "fm_grad_w_f32out",
    "fm_grad_w_sc",
    "fm_grad_w_sc_f32out",
    "naive_normalize",
    "naive_mask_rows",
    "naive_cosine",
    "naive_subcenter_max",
    "naive_subcenter_scatter",
    "naive_logits",
    "naive_softmax",
    "naive_dlogits",
    "naive_matmul",
    "naive_norm_backward",
];

/// Entry points built only for f16 and bf16 inputs (tensor cores).
pub const HALF_ENTRY_POINTS: [&str; 10] = [
    "fm_fwd_tiles_tc",
    "fm_fwd_tiles_tc_sc",
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
pub const F32_ENTRY_POINTS: [&str; 3] = [
    "fm_fwd_tiles_tf32",
    "fm_fwd_tiles_tf32_sc",
    "fm_fwd_tiles_tf32_wide",
];

/// Entry points built only for f16 and bf16 inputs and only for `sm_90a` (wgmma: the Hopper
/// forward, selected by the benchmark-only kernel override of [`super::Options`]).
pub const SM90A_HALF_ENTRY_POINTS: [&str; 2] = ["fm_fwd_tiles_wg", "fm_fwd_tiles_wg_sc"];

/// A compile unit of kernels/all.cu (`-DFM_UNIT=`, codes in kernels/geometry.cuh): the entry
/// points of one kernel family and tile shape. [`Unit::All`] is the whole translation unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    /// Every entry point (as nvcc and the emulator build it).
    All,
    /// The small kernels every fused plan runs: norms, target rows, combine, loss, labels, x
    /// finish, the tensor-core backward's scale, the poisoning fills.
    Core,
    /// The SIMT forward tiles.
    FwdSimt,
    /// The 64 x 128 tensor-core forward tiles (f16/bf16, and TF32 for f32).
    FwdTc,
    /// The 128 x 256 tensor-core forward tiles (an opt-in).
    FwdTcWide,
    /// The wgmma forward (sm_90a, f16/bf16; an opt-in).
    FwdWg,
    /// The SIMT backward.
    GradSimt,
    /// The tensor-core backward's 64-row tiles (D <= 256), dw in the input dtype.
    GradTc64,
    /// Their dw kernel with f32 gradients (`backward_f32`).
    GradTc64F32Out,
    /// The tensor-core backward's 32-row x 512-column tiles (D > 256), dw in the input dtype.
    GradTc32,
    /// Their dw kernel with f32 gradients.
    GradTc32F32Out,
    /// The naive plan's kernels.
    Naive,
}

impl Unit {
    /// Every unit but [`Unit::All`]: together they hold every entry point once.
    pub const EACH: [Unit; 11] = [
        Unit::Core,
        Unit::FwdSimt,
        Unit::FwdTc,
        Unit::FwdTcWide,
        Unit::FwdWg,
        Unit::GradSimt,
        Unit::GradTc64,
        Unit::GradTc64F32Out,
        Unit::GradTc32,
        Unit::GradTc32F32Out,
        Unit::Naive,
    ];

    /// The `FM_UNIT` code (kernels/geometry.cuh); 0 for [`Unit::All`].
    fn code(self) -> usize {
        match self {
            Unit::All => 0,
            Unit::Core => g::UNIT_CORE,
            Unit::FwdSimt => g::UNIT_FWD_SIMT,
            Unit::FwdTc => g::UNIT_FWD_TC,
            Unit::FwdTcWide => g::UNIT_FWD_TC_WIDE,
            Unit::FwdWg => g::UNIT_FWD_WG,
            Unit::GradSimt => g::UNIT_GRAD_SIMT,
            Unit::GradTc64 => g::UNIT_GRAD_TC64,
            Unit::GradTc64F32Out => g::UNIT_GRAD_TC64_F32OUT,
            Unit::GradTc32 => g::UNIT_GRAD_TC32,
            Unit::GradTc32F32Out => g::UNIT_GRAD_TC32_F32OUT,
            Unit::Naive => g::UNIT_NAIVE,
        }
    }

    /// A short name for file names and messages.
    pub fn name(self) -> &'static str {
        match self {
            Unit::All => "all",
            Unit::Core => "core",
            Unit::FwdSimt => "fwd_simt",
            Unit::FwdTc => "fwd_tc",
            Unit::FwdTcWide => "fwd_tc_wide",
            Unit::FwdWg => "fwd_wg",
            Unit::GradSimt => "grad_simt",
            Unit::GradTc64 => "grad_tc64",
            Unit::GradTc64F32Out => "grad_tc64_f32out",
            Unit::GradTc32 => "grad_tc32",
            Unit::GradTc32F32Out => "grad_tc32_f32out",
            Unit::Naive => "naive",
        }
    }

    /// The unit that holds entry point `base` (a name of [`ENTRY_POINTS`] and its kin, without
    /// the dtype suffix; an `_f32out` variant lives with its kernel, but for the tensor-core dw
    /// kernels, whose f32 variants are units of their own); `None` for a name that is
    /// no entry point. kernels_compile checks this against the compiled units.
    pub fn of(base: &str) -> Option<Unit> {
        let k = base.strip_suffix("_f32out").unwrap_or(base);
        let f32out = k.len() < base.len();
        Some(match k {
            "fm_fill_u32"
            | "fm_fill_u16"
            | "fm_row_norms"
            | "fm_target_rows"
            | "fm_x_finish"
            | "fm_combine_rows"
            | "fm_shard_stats"
            | "fm_shard_combine"
            | "fm_gather_rows"
            | "fm_shard_cos_out"
            | "fm_shard_cos_in"
            | "fm_reduce_loss"
            | "fm_label_status"
            | "fm_grad_scale"
            | "fm_norm_coef"
            | "fm_adaface_state"
            | "fm_curricular_state"
            | "fm_elastic_plus" => Unit::Core,
            "fm_fwd_tiles" | "fm_fwd_tiles_sc" => Unit::FwdSimt,
            "fm_fwd_tiles_tc"
            | "fm_fwd_tiles_tf32"
            | "fm_fwd_tiles_tc_sc"
            | "fm_fwd_tiles_tf32_sc" => Unit::FwdTc,
            "fm_fwd_tiles_tc_wide" | "fm_fwd_tiles_tf32_wide" => Unit::FwdTcWide,
            "fm_fwd_tiles_wg" | "fm_fwd_tiles_wg_sc" => Unit::FwdWg,
            "fm_grad_x_partial" | "fm_grad_w" | "fm_grad_x_partial_sc" | "fm_grad_w_sc" => {
                Unit::GradSimt
            }
            "fm_grad_w_tc" if f32out => Unit::GradTc64F32Out,
            "fm_grad_w_tc_d512" if f32out => Unit::GradTc32F32Out,
            "fm_grad_x_tc" | "fm_grad_w_tc" => Unit::GradTc64,
            "fm_grad_x_tc_d512" | "fm_grad_w_tc_d512" => Unit::GradTc32,
            n if n.starts_with("naive_") && ENTRY_POINTS.contains(&n) => Unit::Naive,
            _ => return None,
        })
    }
}

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

/// Ok for an input dtype the kernels are built for, the typed error for f64.
pub(crate) fn check_dtype(dtype: DType) -> Result<()> {
    dtype_define(dtype).map(|_| ())
}

/// Compiles the kernels of `unit` for `dtype` and `arch` (e.g. `"sm_90"`), without caching.
/// Works without a GPU (only libnvrtc is needed). Accurate maths: no fast-math flags.
pub fn compile_ptx_uncached(dtype: DType, unit: Unit, arch: &str) -> Result<Ptx> {
    let module = format!(
        "fused-margin kernels ({}, {}, {arch})",
        dtype.suffix(),
        unit.name()
    );
    // The dtype first: an f64 request is wrong on every machine, and saying "libnvrtc not found"
    // to it would send the caller after the wrong problem.
    let define = dtype_define(dtype)?;
    if !nvrtc_available() {
        return Err(Error::Compile {
            module,
            log: "libnvrtc not found (install CUDA or `pip install nvidia-cuda-nvrtc` and put its lib/ on LD_LIBRARY_PATH)".into(),
            source: None,
        });
    }
    let opts = CompileOptions {
        options: vec![
            define.to_string(),
            format!("-DFM_UNIT={}", unit.code()),
            format!("--gpu-architecture={arch}"),
            "--std=c++17".into(),
        ],
        name: Some(format!(
            "fused_margin_{}_{}.cu",
            dtype.suffix(),
            unit.name()
        )),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source::KERNELS_CU, opts).map_err(|e| {
        let code = match &e {
            CompileError::CreationError(c)
            | CompileError::CompileError { nvrtc: c, .. }
            | CompileError::GetLogError(c)
            | CompileError::GetPtxError(c)
            | CompileError::DestroyError(c) => *c,
        };
        Error::Compile {
            module,
            log: match e {
                CompileError::CompileError { log, options, .. } => {
                    format!("options {options:?}\n{}", log.to_string_lossy())
                }
                other => format!("{other:?}"),
            },
            source: Some(crate::error::CudaSource::Nvrtc(code)),
        }
    })
}

/// The directory of the on-disk PTX cache: `$FUSED_MARGIN_CACHE_DIR` if set (empty or `off`:
/// no disk cache), else `$XDG_CACHE_HOME/fused-margin`, else `$HOME/.cache/fused-margin`.
/// A missing, unwritable or read-only directory costs nothing but the cache: the kernels are
/// compiled as without it, and a cache file that does not match (another source, options or
/// NVRTC, a torn write) is ignored and replaced.
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("FUSED_MARGIN_CACHE_DIR") {
        Some(d) if d.is_empty() || d == "off" => None,
        Some(d) => Some(PathBuf::from(d)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|d| d.join("fused-margin")),
    }
}

/// FNV-1a, 64 bits: a stable hash (std's is not promised stable across releases) for cache keys.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x0100_0000_01b3); // part separator
    }
    h
}

/// libnvrtc's version, part of the cache key (PTX from another NVRTC may not suit this driver).
fn nvrtc_version() -> (i32, i32) {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: called only after nvrtc_available() found the library; nvrtcVersion writes two
    // ints through the pointers it is given, which point at live locals.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return (-1, -1);
    }
    (major, minor)
}

/// What identifies one compile: the source, the options, NVRTC's version and this crate's. The
/// whole key is stored in the file and compared on read, so a hash collision cannot load the
/// wrong PTX.
fn cache_key(dtype: DType, unit: Unit, arch: &str) -> Result<String> {
    let (major, minor) = nvrtc_version();
    let src = source::KERNELS_CU.as_bytes();
    Ok(format!(
        "fused-margin {} kernels {:016x} len {} {} -DFM_UNIT={} --gpu-architecture={arch} --std=c++17 nvrtc {major}.{minor}",
        env!("CARGO_PKG_VERSION"),
        fnv1a(&[src]),
        src.len(),
        dtype_define(dtype)?,
        unit.code(),
    ))
}

fn cache_file(dir: &Path, key: &str, dtype: DType, unit: Unit, arch: &str) -> PathBuf {
    dir.join(format!(
        "kernels-{}-{}-{arch}-{:016x}.ptx",
        dtype.suffix(),
        unit.name(),
        fnv1a(&[key.as_bytes()])
    ))
}

/// The cached PTX of `key` in `dir`, if a file there holds exactly it (first line: the key).
fn cache_read(dir: &Path, key: &str, dtype: DType, unit: Unit, arch: &str) -> Option<Ptx> {
    let text = std::fs::read_to_string(cache_file(dir, key, dtype, unit, arch)).ok()?;
    let (head, ptx) = text.split_once('\n')?;
    let body = ptx.strip_suffix("\n// fused-margin: end of cached PTX\n")?;
    // A NUL would make cudarc's module load panic (it builds a C string from the text).
    (head.strip_prefix("// ")? == key && !body.contains('\0')).then(|| Ptx::from_src(body))
}

/// Stores `ptx` under `key` in `dir`: written to a temporary name, then renamed, so a reader never
/// sees half a file. Every failure is ignored (the cache is an optimization).
fn cache_write(dir: &Path, key: &str, dtype: DType, unit: Unit, arch: &str, ptx: &Ptx) {
    let file = cache_file(dir, key, dtype, unit, arch);
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    let text = format!(
        "// {key}\n{}\n// fused-margin: end of cached PTX\n",
        ptx.to_src()
    );
    let ok = std::fs::create_dir_all(dir).is_ok()
        && std::fs::write(&tmp, text).is_ok()
        && std::fs::rename(&tmp, &file).is_ok();
    if !ok {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// How [`compile_ptx_in`] got its PTX.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PtxSource {
    /// Read from the disk cache.
    Disk,
    /// Compiled by NVRTC (and stored, where the cache directory allows).
    Compiled,
}

/// The PTX of `unit` for `dtype` and `arch` through the disk cache in `dir` (`None`: no disk
/// cache), and where it came from. Not cached in memory; [`compile_ptx`] is this plus the process
/// cache.
pub fn compile_ptx_in(
    dir: Option<&Path>,
    dtype: DType,
    unit: Unit,
    arch: &str,
) -> Result<(Ptx, PtxSource)> {
    dtype_define(dtype)?;
    if let (Some(dir), true) = (dir, nvrtc_available()) {
        let key = cache_key(dtype, unit, arch)?;
        if let Some(ptx) = cache_read(dir, &key, dtype, unit, arch) {
            return Ok((ptx, PtxSource::Disk));
        }
        let ptx = compile_ptx_uncached(dtype, unit, arch)?;
        cache_write(dir, &key, dtype, unit, arch, &ptx);
        return Ok((ptx, PtxSource::Compiled));
    }
    Ok((
        compile_ptx_uncached(dtype, unit, arch)?,
        PtxSource::Compiled,
    ))
}

/// Compiles (once per process, and once per machine through the disk cache of [`cache_dir`])
/// and returns the PTX of `unit` for `dtype` and `arch`.
pub fn compile_ptx(dtype: DType, unit: Unit, arch: &str) -> Result<Ptx> {
    type Cache = Mutex<HashMap<(DType, Unit, String), Ptx>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (dtype, unit, arch.to_string());
    if let Some(p) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(p.clone());
    }
    // Compile outside the lock: other units need not wait. A racing duplicate compile is harmless.
    let (ptx, _) = compile_ptx_in(cache_dir().as_deref(), dtype, unit, arch)?;
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
            compile_ptx_uncached(DType::F64, Unit::All, "sm_90"),
            compile_ptx(DType::F64, Unit::Core, "sm_80"),
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
