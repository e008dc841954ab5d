//! Errors that chain: a failure inside a CUDA library keeps that library's own error as
//! `source()` (a caller can tell out-of-memory from a bad argument by its code), and the crate's
//! own checks have none.
use fused_margin::cuda::{compile_ptx_uncached, nvrtc_available, Unit};
use fused_margin::{CudaSource, DType, Error, MarginLoss, Shape};
use std::error::Error as _;

#[test]
fn driver_errors_keep_their_code() {
    use fused_margin::cuda::cudarc::driver::{sys::cudaError_enum, DriverError};
    let oom = DriverError(cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY);
    let e = Error::driver("allocate 1e12 x f32", oom);
    assert_eq!(e.driver_error(), Some(oom));
    let src = e.source().expect("a driver error has a source");
    assert_eq!(src.downcast_ref::<DriverError>(), Some(&oom));
    // The message still says what was being done and what the driver said.
    let msg = e.to_string();
    assert!(
        msg.contains("allocate 1e12 x f32") && msg.contains("OUT_OF_MEMORY"),
        "{msg}"
    );
    assert!(matches!(
        e,
        Error::Cuda {
            source: Some(CudaSource::Driver(_)),
            ..
        }
    ));
}

#[test]
fn the_crates_own_checks_have_no_source() {
    let e = fused_margin::cpu::forward(
        &MarginLoss::arcface(0.5),
        &[0.0f32; 3],
        &[0.0f32; 4],
        &[0],
        Shape::new(1, 2, 2),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Length { .. }), "{e}");
    assert!(e.source().is_none());
    assert!(e.driver_error().is_none());
}

/// NVRTC's own code comes through: an architecture NVRTC rejects is an `Error::Compile` whose
/// source is the `NvrtcError` (needs libnvrtc; skipped without it).
#[test]
fn nvrtc_errors_keep_their_code() {
    if !nvrtc_available() {
        assert!(
            std::env::var("FUSED_MARGIN_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "FUSED_MARGIN_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded"
        );
        eprintln!("skipped: libnvrtc not found");
        return;
    }
    let e = compile_ptx_uncached(DType::F32, Unit::All, "sm_1").unwrap_err();
    let Error::Compile {
        source: Some(CudaSource::Nvrtc(code)),
        ..
    } = &e
    else {
        panic!("expected Error::Compile with NVRTC's code, got {e:?}");
    };
    let src = e.source().expect("an NVRTC error has a source");
    assert_eq!(
        src.downcast_ref::<fused_margin::cuda::cudarc::nvrtc::result::NvrtcError>(),
        Some(code)
    );
}
