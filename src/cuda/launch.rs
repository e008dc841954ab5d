//! The small pieces every launch uses: the element types the kernels take, a loaded module and
//! its functions ([`Kernels`]), driver errors as [`Error::Cuda`], 1-D grids, the NaN fill of
//! poisoned buffers, and the kernels' option block as bytes.

use super::compile::entry_name;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use cudarc::driver::{
    CudaFunction, CudaModule, CudaStream, CudaViewMut, DeviceRepr, DriverError, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// An input element type the kernels accept: f32, half::f16, half::bf16.
pub trait CudaElement: Element + DeviceRepr + ValidAsZeroBits {}
impl CudaElement for f32 {}
impl CudaElement for half::f16 {}
impl CudaElement for half::bf16 {}

/// One loaded module and the functions fetched from it so far.
pub(crate) struct Kernels {
    module: Arc<CudaModule>,
    dtype: DType,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

impl Kernels {
    /// The module `module`, compiled for inputs of `dtype`, with no function fetched yet.
    pub(crate) fn new(module: Arc<CudaModule>, dtype: DType) -> Self {
        Self {
            module,
            dtype,
            functions: Mutex::new(HashMap::new()),
        }
    }

    /// The entry point `base` for this module's dtype (e.g. `fm_grad_w` -> `fm_grad_w_bf16`).
    pub(crate) fn get(&self, base: &str) -> Result<CudaFunction> {
        self.get_with_smem(base, 0)
    }

    /// `get` for a kernel launched with `smem_bytes` of dynamic shared memory (always the same
    /// for one entry point): on first load the function is allowed that much, which CUDA
    /// requires above 48 KB. Cached with the function, so launches pay no driver call for it.
    pub(crate) fn get_with_smem(&self, base: &str, smem_bytes: u32) -> Result<CudaFunction> {
        let name = entry_name(base, self.dtype);
        let mut fns = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = fns.get(&name) {
            return Ok(f.clone());
        }
        let f = self
            .module
            .load_function(&name)
            .map_err(|e| cuda_err(&format!("load kernel {name}"), e))?;
        if smem_bytes > 0 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes as i32,
            )
            .map_err(|e| cuda_err(&format!("allow {smem_bytes} B of dynamic shared memory for {name}"), e))?;
        }
        fns.insert(name, f.clone());
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
