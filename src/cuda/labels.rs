//! Where the labels are checked: on the device with no synchronization ([`LabelCheck::Device`],
//! the default; kernels/labels.cu), the error then reported when a result is read, or on the
//! host before any launch ([`LabelCheck::Host`]).

use super::cuda_err;
use crate::error::{Error, Result};
use crate::spec::Shape;
use cudarc::driver::{CudaSlice, CudaStream};
use std::sync::Arc;

/// How a [`FusedMarginLoss`](super::FusedMarginLoss) checks the labels (each must be `< C`, or
/// negative to ignore its row) and finds the number of counted rows that the mean reduction
/// divides by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LabelCheck {
    /// Copy the B labels to the host and check them before any launch: a bad label is an
    /// [`Error::LabelOutOfRange`] from `forward`/`backward` themselves. The copy synchronizes the
    /// stream once per call, which stalls the host until the GPU has finished earlier work: at
    /// small C that wait is a large part of the step. For debugging, or where a call must fail
    /// by itself on a bad label.
    Host,
    /// Check the labels on the device (one extra small kernel; no copy, no synchronization), so
    /// the host can queue the forward, the backward and the rest of a training step without
    /// waiting. A bad label cannot fail the call that launched the kernels; instead:
    /// - reading a result on the host ([`super::GpuSaved::check`], `loss_host`, `row_loss_host`,
    ///   `lse_host`, `counted`, and [`super::GpuBackwardRun::check`]) returns the same
    ///   [`Error::LabelOutOfRange`] (first bad row, its label, C), and labels passed to backward
    ///   that are not the forward's (another count, values or order) give
    ///   [`Error::ForwardMismatch`] there;
    /// - until then the device results are poisoned, never plausible: a row with a label `>= C`
    ///   has a NaN row loss (so the reduced loss is NaN), and after a bad label or a label
    ///   mismatch every gradient element of a counted row's contributions is NaN.
    ///
    /// Kernels never index memory with an unchecked label, so bad labels are memory-safe.
    ///
    /// The default, as PyTorch's device-side asserts are.
    #[default]
    Device,
}

/// The forward's record of its labels, for the backward to compare with.
#[derive(Debug)]
pub(crate) enum LabelState {
    /// Checked on the host: counted rows and [`Shape::labels_fingerprint`].
    Host { counted: usize, fingerprint: u64 },
    /// Checked on the device: the status record of kernels/labels.cu.
    Device(CudaSlice<i64>),
}

// The status record's length (FM_STATUS_LEN in kernels/labels.cu).
use super::plan::STATUS_LEN;

/// Copies a status record to the host (synchronizes `stream`) and turns it into the error it
/// reports, if any.
pub(crate) fn read_status(
    stream: &Arc<CudaStream>,
    status: &CudaSlice<i64>,
    shape: Shape,
) -> Result<StatusRecord> {
    let v = stream
        .clone_dtoh(status)
        .map_err(|e| cuda_err("copy the label status to the host", e))?;
    let rec = StatusRecord::from_slice(&v)?;
    rec.check(shape)?;
    Ok(rec)
}

/// The host's view of kernels/labels.cu's status record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StatusRecord {
    pub counted: usize,
    bad_row: i64,
    bad_label: i64,
    mismatch: bool,
    prev_counted: usize,
}

impl StatusRecord {
    fn from_slice(v: &[i64]) -> Result<Self> {
        match v {
            &[counted, bad_row, bad_label, _fingerprint, mismatch, prev_counted] => Ok(Self {
                counted: counted.max(0) as usize,
                bad_row,
                bad_label,
                mismatch: mismatch != 0,
                prev_counted: prev_counted.max(0) as usize,
            }),
            _ => Err(Error::InvalidArgument {
                what: "label status",
                detail: format!("{} values, expected {STATUS_LEN}", v.len()),
            }),
        }
    }

    /// The error the record reports: an out-of-range label first, then a label mismatch.
    fn check(&self, shape: Shape) -> Result<()> {
        if self.bad_row >= 0 {
            return Err(Error::LabelOutOfRange {
                row: self.bad_row as usize,
                label: self.bad_label,
                classes: shape.c,
            });
        }
        if self.mismatch {
            return Err(Error::ForwardMismatch {
                detail: format!(
                    "labels differ from the forward's (counted {} vs {} of B = {}; same count \
                     means other values or another order; found on the device)",
                    self.prev_counted, self.counted, shape.b
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_records_map_to_typed_errors() {
        let shape = Shape::new(4, 8, 10);
        let ok = StatusRecord::from_slice(&[3, -1, 0, 77, 0, 0]).unwrap();
        assert_eq!(ok.check(shape).map(|_| ok.counted).unwrap(), 3);
        let bad = StatusRecord::from_slice(&[4, 2, 12, 77, 0, 0]).unwrap();
        match bad.check(shape) {
            Err(Error::LabelOutOfRange {
                row: 2,
                label: 12,
                classes: 10,
            }) => {}
            other => panic!("expected LabelOutOfRange, got {other:?}"),
        }
        let mismatch = StatusRecord::from_slice(&[3, -1, 0, 5, 1, 2]).unwrap();
        match mismatch.check(shape) {
            Err(Error::ForwardMismatch { detail }) => {
                assert!(detail.contains("counted 2 vs 3"), "{detail}")
            }
            other => panic!("expected ForwardMismatch, got {other:?}"),
        }
        assert!(StatusRecord::from_slice(&[1, 2]).is_err());
    }
}
