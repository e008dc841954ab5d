//! The small pieces every launch uses: the element types the kernels take, the compiled units'
//! modules and their functions ([`Kernels`]), driver errors as [`Error::Cuda`], 1-D grids, the NaN fill of
//! poisoned buffers, and the kernels' option block as bytes.

use super::compile::{compile_ptx, entry_name, Unit};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, CudaViewMut, DeviceRepr, DriverError,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// An input element type the kernels accept: f32, half::f16, half::bf16.
pub trait CudaElement: Element + DeviceRepr + ValidAsZeroBits {}
impl CudaElement for f32 {}
impl CudaElement for half::f16 {}
impl CudaElement for half::bf16 {}

/// The kernels of one input dtype on one device: each compile unit's module, compiled and loaded
/// when a plan first launches one of its entry points, and the functions fetched so far, each
/// with the dynamic shared memory it has been allowed.
pub(crate) struct Kernels {
    ctx: Arc<CudaContext>,
    arch: String,
    dtype: DType,
    modules: Mutex<HashMap<Unit, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, (CudaFunction, u32)>>,
}

impl Kernels {
    /// The kernels of `dtype` for `arch` on `ctx`, with nothing compiled or loaded yet.
    pub(crate) fn new(ctx: Arc<CudaContext>, arch: &str, dtype: DType) -> Self {
        Self {
            ctx,
            arch: arch.to_string(),
            dtype,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        }
    }

    /// The unit of `base`, or an error naming it (a plan that names no entry point is a bug).
    fn unit_of(base: &str) -> Result<Unit> {
        Unit::of(base).ok_or_else(|| Error::InvalidArgument {
            what: "launch plan",
            detail: format!("{base} is no kernel entry point"),
        })
    }

    /// Compiles and loads the units of `bases` that are not loaded yet, one thread per unit: NVRTC
    /// and the driver's JIT at module load are thread-safe, and a first call would otherwise wait
    /// for each unit in turn. Compiled units stay in the process and disk caches
    /// ([`compile_ptx`]) even where a load fails; the first failure in unit order is returned.
    pub(crate) fn prepare<'a>(&self, bases: impl IntoIterator<Item = &'a str>) -> Result<()> {
        let mut want = Vec::new();
        {
            let mods = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            for b in bases {
                let u = Self::unit_of(b)?;
                if !mods.contains_key(&u) && !want.contains(&u) {
                    want.push(u);
                }
            }
        }
        want.sort();
        let build = |u: Unit| -> Result<Arc<CudaModule>> {
            let ptx = compile_ptx(self.dtype, u, &self.arch)?;
            self.ctx
                .load_module(ptx)
                .map_err(|e| cuda_err(&format!("load kernel module {}", u.name()), e))
        };
        let built: Vec<Result<Arc<CudaModule>>> = match want.len() {
            0 => return Ok(()),
            1 => vec![build(want[0])],
            _ => std::thread::scope(|sc| {
                let jobs: Vec<_> = want.iter().map(|&u| sc.spawn(move || build(u))).collect();
                jobs.into_iter()
                    .zip(&want)
                    .map(|(j, u)| {
                        j.join().unwrap_or_else(|_| {
                            Err(Error::Compile {
                                module: format!("fused-margin kernels ({})", u.name()),
                                log: "the compiling thread panicked".into(),
                                source: None,
                            })
                        })
                    })
                    .collect()
            }),
        };
        let mut mods = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        let mut first_err = None;
        for (u, m) in want.into_iter().zip(built) {
            match m {
                // A unit another thread loaded meanwhile keeps its first module.
                Ok(m) => {
                    mods.entry(u).or_insert(m);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The entry point `base` for this module's dtype (e.g. `fm_grad_w` -> `fm_grad_w_bf16`).
    pub(crate) fn get(&self, base: &str) -> Result<CudaFunction> {
        self.get_with_smem(base, 0)
    }

    /// `get` for a kernel launched with `smem_bytes` of dynamic shared memory, which CUDA
    /// requires a function to be allowed above 48 KB. The tensor-core backward's need grows with
    /// D, so the allowance is raised when a launch needs more than the function has (a driver call
    /// then, none on later launches of that size or less).
    pub(crate) fn get_with_smem(&self, base: &str, smem_bytes: u32) -> Result<CudaFunction> {
        let name = entry_name(base, self.dtype);
        let mut fns = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((f, allowed)) = fns.get(&name) {
            if *allowed >= smem_bytes {
                return Ok(f.clone());
            }
        }
        let f = match fns.get(&name) {
            Some((f, _)) => f.clone(),
            None => {
                self.prepare([base])?;
                let unit = Self::unit_of(base)?;
                let module = self
                    .modules
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&unit)
                    .cloned()
                    .ok_or_else(|| Error::InvalidArgument {
                        what: "launch plan",
                        detail: format!("the module of {} was not loaded", unit.name()),
                    })?;
                module
                    .load_function(&name)
                    .map_err(|e| cuda_err(&format!("load kernel {name}"), e))?
            }
        };
        if smem_bytes > 0 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes as i32,
            )
            .map_err(|e| cuda_err(&format!("allow {smem_bytes} B of dynamic shared memory for {name}"), e))?;
        }
        fns.insert(name, (f.clone(), smem_bytes));
        Ok(f)
    }
}

/// A driver error as [`Error::Cuda`], `context` saying what was being done.
pub(crate) fn cuda_err(context: &str, e: DriverError) -> Error {
    Error::driver(context, e)
}

/// A 1-D launch of `n` threads in blocks of `threads`.
pub(crate) fn grid_1d(n: u64, threads: u32) -> Result<LaunchConfig> {
    let blocks = n.div_ceil(threads as u64);
    if blocks > u32::MAX as u64 {
        return Err(Error::TooLarge {
            what: "launch",
            detail: format!("{n} threads need {blocks} blocks of {threads} (> 2^32 - 1)"),
        });
    }
    Ok(LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Fills `s` with NaN on `stream` (the poisoning of [`super::Options::poison`]): a buffer of
/// this crate's (`&mut slice.as_view_mut()`) or an output view of the caller's.
pub(crate) fn fill_nan<O: CudaElement>(
    stream: &Arc<CudaStream>,
    k: &Kernels,
    s: &mut CudaViewMut<'_, O>,
) -> Result<()> {
    let n = s.len() as i64;
    let cfg = grid_1d(n as u64, 256)?;
    match O::DTYPE.size() {
        4 => {
            let f = k.get("fm_fill_u32")?;
            let nan: u32 = 0x7fc0_0000;
            let mut b = stream.launch_builder(&f);
            b.arg(s).arg(&n).arg(&nan);
            // SAFETY: fm_fill_u32(unsigned*, i64 n, unsigned) writes n 4-byte elements of a
            // view of exactly n 4-byte elements.
            unsafe { b.launch(cfg) }.map_err(|e| cuda_err("poison buffer", e))?;
        }
        _ => {
            let f = k.get("fm_fill_u16")?;
            // f16 NaN 0x7e00; bf16 NaN 0x7fc0.
            let nan: u16 = if O::DTYPE == DType::BF16 {
                0x7fc0
            } else {
                0x7e00
            };
            let mut b = stream.launch_builder(&f);
            b.arg(s).arg(&n).arg(&nan);
            // SAFETY: fm_fill_u16(unsigned short*, i64 n, unsigned short) writes n 2-byte
            // elements of a view of exactly n 2-byte elements.
            unsafe { b.launch(cfg) }.map_err(|e| cuda_err("poison buffer", e))?;
        }
    }
    Ok(())
}
