//! The device self-check: the first time a handle's plan would run a fast kernel path (tensor
//! cores, TF32, the wide or wgmma tiles) for a dtype and D, it runs a small problem through that
//! path and through the SIMT kernels on the same device, and compares every output
//! ([`compare`]). On disagreement (or when the fast path fails to run at all) the handle uses the
//! SIMT kernels for that path from then on ([`choices_after`]) and says why, once, on stderr and
//! in [`FusedMarginLoss::self_checks`](super::FusedMarginLoss::self_checks). Off with
//! [`Options::self_check`](super::Options::self_check).
//!
//! Everything here is plain data and plain functions, so the emulated tests run the same problem,
//! plans and comparison on the kernel emulator (with a deliberately broken fast kernel too) as the
//! handle does on a GPU.

use super::plan::{Choices, LaunchPlan};
use crate::dtype::DType;
use crate::spec::{MarginLoss, Shape};

/// The problem: odd B and C (partial tiles everywhere, several class tiles), the caller's D (the
/// backward's tiles depend on it), ArcFace with the fallback policy at s = 30, one ignored row,
/// one row labelled with the last class, values from a fixed generator (reproducible).
#[derive(Debug, Clone, PartialEq)]
pub struct SelfCheckProblem {
    /// The loss.
    pub spec: MarginLoss,
    /// B = 37, C = 300, the caller's D.
    pub shape: Shape,
    /// B x D features (exactly representable in every input dtype: multiples of 1/64 in [-2, 2]).
    pub x: Vec<f64>,
    /// C x D class weights, the same way.
    pub w: Vec<f64>,
    /// B labels, row 5 ignored (-1), row 0 labelled C - 1.
    pub labels: Vec<i32>,
}

/// The problem for `d` columns.
pub fn problem(d: usize) -> SelfCheckProblem {
    let shape = Shape::new(37, d, 300);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // SplitMix64: a fixed sequence, no dependency.
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    // Multiples of 1/64 in [-2, 2]: exact in bf16 (8 significant bits) and f16.
    let mut value = || ((next() % 257) as f64 - 128.0) / 64.0;
    let x: Vec<f64> = (0..shape.b * d).map(|_| value()).collect();
    let w: Vec<f64> = (0..shape.c * d).map(|_| value()).collect();
    let mut labels: Vec<i32> = (0..shape.b)
        .map(|_| (next() % shape.c as u64) as i32)
        .collect();
    labels[0] = shape.c as i32 - 1;
    labels[5] = -1;
    SelfCheckProblem {
        spec: MarginLoss::arcface(0.5).scale(30.0),
        shape,
        x,
        w,
        labels,
    }
}

/// Whether a forward/backward pair runs anything but the SIMT kernels.
pub fn is_fast(fwd: &LaunchPlan, bwd: &LaunchPlan) -> bool {
    fwd.tensor_cores || fwd.wgmma || bwd.tensor_cores
}

/// The SIMT kernels of `ch`: every fast path off, the rest (plan, label check) as chosen.
pub fn reference_choices(ch: &Choices) -> Choices {
    Choices {
        tensor_cores: false,
        tf32: false,
        wide_tiles: false,
        wgmma: false,
        tc_backward: false,
        ..*ch
    }
}

/// What a run of the problem gave, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckOutputs {
    /// The reduced loss.
    pub loss: f64,
    /// Per-row logsumexp.
    pub lse: Vec<f64>,
    /// dloss/dx, B x D.
    pub dx: Vec<f64>,
    /// dloss/dw, C x D.
    pub dw: Vec<f64>,
}

/// docs/MATH.md's bars (loss, gradients) for a path's inputs: each path is within its bar of the
/// f64 reference, so two paths differ by at most the sum of theirs.
fn bars(dtype: DType, tf32: bool) -> (f64, f64) {
    match (dtype, tf32) {
        (DType::F32, false) | (DType::F64, _) => (1e-5, 1e-4),
        (DType::F32, true) | (DType::F16, _) => (1e-3, 5e-3),
        (DType::BF16, _) => (5e-3, 2e-2),
    }
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    num.sqrt() / den.sqrt().max(1e-30)
}

/// Compares the fast path's outputs with the SIMT kernels' on the same device: each output must be
/// as finite as the SIMT one and within the sum of the two paths' bars (normwise). The error says
/// which output and by how much.
pub fn compare(
    dtype: DType,
    fast_tf32: bool,
    fast: &CheckOutputs,
    simt: &CheckOutputs,
) -> Result<(), String> {
    let (fl, fg) = bars(dtype, fast_tf32);
    let (sl, sg) = bars(dtype, false);
    let outputs: [(&str, &[f64], &[f64], f64); 4] = [
        (
            "loss",
            std::slice::from_ref(&fast.loss),
            std::slice::from_ref(&simt.loss),
            fl + sl,
        ),
        ("lse", &fast.lse, &simt.lse, fl + sl),
        ("dx", &fast.dx, &simt.dx, fg + sg),
        ("dw", &fast.dw, &simt.dw, fg + sg),
    ];
    for (name, a, b, bar) in outputs {
        if a.len() != b.len() {
            return Err(format!(
                "{name}: {} values, the SIMT kernels gave {}",
                a.len(),
                b.len()
            ));
        }
        if let Some(i) = (0..a.len()).find(|&i| !a[i].is_finite() && b[i].is_finite()) {
            return Err(format!(
                "{name}[{i}] = {}, the SIMT kernels give {}",
                a[i], b[i]
            ));
        }
        let e = rel(a, b);
        if e > bar || e.is_nan() {
            return Err(format!(
                "{name} differs from the SIMT kernels' by {e:.3e} (normwise; allowed {bar:.1e})"
            ));
        }
    }
    Ok(())
}

/// The outcome of one self-check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The fast path agreed with the SIMT kernels: it is used.
    Passed,
    /// It did not, or failed to run: the SIMT kernels are used instead. The text says why.
    Failed(String),
}

/// One self-check as a handle records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfCheckReport {
    /// The input dtype.
    pub dtype: DType,
    /// D of the calls it covers.
    pub d: usize,
    /// The fast path's kernels (forward then backward).
    pub kernels: Vec<String>,
    /// What it found.
    pub outcome: Outcome,
}

/// The choices a handle uses after `outcome` for a call that asked for `ch`.
pub fn choices_after(outcome: &Outcome, ch: &Choices) -> Choices {
    match outcome {
        Outcome::Passed => *ch,
        Outcome::Failed(_) => reference_choices(ch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outputs(scale: f64) -> CheckOutputs {
        CheckOutputs {
            loss: 2.0 * scale,
            lse: vec![1.0 * scale, 3.0],
            dx: vec![0.5 * scale, -0.25, 0.125],
            dw: vec![1.0, 2.0 * scale],
        }
    }

    #[test]
    fn compare_accepts_within_the_bars_and_names_what_is_off() {
        let s = outputs(1.0);
        assert_eq!(compare(DType::BF16, false, &s, &s), Ok(()));
        // 1e-3 relative: inside bf16's allowance, outside f32's.
        let near = outputs(1.0 + 1e-3);
        assert_eq!(compare(DType::BF16, false, &near, &s), Ok(()));
        let e = compare(DType::F32, false, &near, &s).unwrap_err();
        assert!(e.starts_with("loss"), "{e}");
        let mut nan = s.clone();
        nan.dw[1] = f64::NAN;
        let e = compare(DType::BF16, false, &nan, &s).unwrap_err();
        assert!(e.starts_with("dw[1]"), "{e}");
        let mut short = s.clone();
        short.dx.pop();
        assert!(compare(DType::F16, false, &short, &s)
            .unwrap_err()
            .starts_with("dx"));
        // Non-finite on both sides also fails (inf - inf is NaN): the problem's inputs are
        // finite, so every correct output is.
        let mut both = s.clone();
        both.lse[0] = f64::INFINITY;
        assert!(compare(DType::F16, false, &both, &both).is_err());
    }

    #[test]
    fn the_problem_is_fixed_and_exact_in_16_bits() {
        let (a, b) = (problem(72), problem(72));
        assert_eq!(a, b);
        assert_eq!((a.shape.b, a.shape.d, a.shape.c), (37, 72, 300));
        assert!(a
            .x
            .iter()
            .chain(&a.w)
            .all(|v| (v * 64.0).fract() == 0.0 && v.abs() <= 2.0));
        assert_eq!((a.labels[0], a.labels[5]), (299, -1));
        assert!(a.labels.iter().all(|&l| l < 300));
        let fast = Choices {
            tc_backward: true,
            ..Choices::default()
        };
        let simt = reference_choices(&fast);
        assert!(!simt.tensor_cores && !simt.tc_backward && !simt.tf32);
        assert_eq!(choices_after(&Outcome::Failed("x".into()), &fast), simt);
        assert_eq!(choices_after(&Outcome::Passed, &fast), fast);
    }
}
