//! Whether the CUDA libraries can be used, under either of cudarc's linking modes.
//!
//! This crate asks cudarc for `fallback-dynamic-loading`: libcuda, libnvrtc and libcublas are then
//! opened at run time, a missing library makes cudarc panic on first use, and
//! `cudarc::*::sys::is_culib_present` exists to check first. When another crate in the build turns
//! on cudarc's `dynamic-linking` (candle's `cuda` feature does), cudarc links the libraries at
//! build time instead and no longer has `is_culib_present`: a process that started has them. The
//! feature `dynamic-linking` of this crate (implied by `candle-cuda`) selects the second reading.

/// True when libcuda (the driver library) is available.
pub(crate) fn driver_present() -> bool {
    #[cfg(not(feature = "dynamic-linking"))]
    {
        // SAFETY: only tries to dlopen libcuda by its known names; no driver call is made.
        unsafe { cudarc::driver::sys::is_culib_present() }
    }
    #[cfg(feature = "dynamic-linking")]
    {
        // Linked at build time: the process could not have started without it.
        true
    }
}

/// True when libnvrtc is available.
pub(crate) fn nvrtc_present() -> bool {
    #[cfg(not(feature = "dynamic-linking"))]
    {
        // SAFETY: only tries to dlopen libnvrtc by its known names; no NVRTC call is made.
        unsafe { cudarc::nvrtc::sys::is_culib_present() }
    }
    #[cfg(feature = "dynamic-linking")]
    {
        true
    }
}

/// True when libcublas is available.
pub(crate) fn cublas_present() -> bool {
    #[cfg(not(feature = "dynamic-linking"))]
    {
        // SAFETY: only tries to dlopen libcublas by its known names; no cuBLAS call is made.
        unsafe { cudarc::cublas::sys::is_culib_present() }
    }
    #[cfg(feature = "dynamic-linking")]
    {
        true
    }
}
