//! Misuse of the CPU API that must be a typed error and that `tests/bad_input.rs` does not
//! cover: a forward result handed to backward with other `x` or `w` (same spec,
//! shape and labels). Its saved lse belongs to other logits, so the gradients would be silently
//! wrong; backward compares the row norms it recomputes with the forward's saved ones. Labels
//! that differ from the forward's (other values, or the same values in another order) are caught
//! by an order-sensitive fingerprint.
//!
//! (Labels on another device or stream are a GPU-only misuse: `tests/gpu_vs_cpu.rs` and
//! `tests/raw_entry.rs`.)

use fused_margin::{cpu, Error, MarginLoss, Shape, Upstream};
use half::f16;

fn valid() -> (Shape, Vec<f32>, Vec<f32>, Vec<i32>) {
    let shape = Shape::new(3, 4, 5);
    let x = (0..12).map(|k| (k as f32 * 0.37).sin()).collect();
    let w = (0..20).map(|k| (k as f32 * 0.91).cos()).collect();
    (shape, x, w, vec![0, 4, -1])
}

fn mismatch(e: Error) -> String {
    match e {
        Error::ForwardMismatch { detail } => detail,
        e => panic!("expected ForwardMismatch, got {e:?}"),
    }
}

#[test]
fn backward_rejects_other_features() {
    let (shape, x, w, labels) = valid();
    let spec = MarginLoss::arcface(0.5);
    let fwd = cpu::forward(&spec, &x, &w, &labels, shape).unwrap();
    // One entry changed (row 1), and the whole batch rescaled.
    let mut x2 = x.clone();
    x2[5] += 0.25;
    let d =
        mismatch(cpu::backward(&spec, &fwd, &x2, &w, &labels, shape, Upstream::ONE).unwrap_err());
    assert!(d.contains("x differs") && d.contains("row 1"), "{d}");
    let x3: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
    let d =
        mismatch(cpu::backward(&spec, &fwd, &x3, &w, &labels, shape, Upstream::ONE).unwrap_err());
    assert!(d.contains("row 0"), "{d}");
    // Even in an ignored row: the forward saw other inputs.
    let mut x4 = x.clone();
    x4[8] = 3.0;
    let d =
        mismatch(cpu::backward(&spec, &fwd, &x4, &w, &labels, shape, Upstream::ONE).unwrap_err());
    assert!(d.contains("row 2"), "{d}");
}

#[test]
fn backward_rejects_other_class_weights() {
    let (shape, x, w, labels) = valid();
    for spec in [
        MarginLoss::cosface(0.35),
        MarginLoss::cosface(0.35).normalize_weights(false),
    ] {
        let fwd = cpu::forward(&spec, &x, &w, &labels, shape).unwrap();
        let mut w2 = w.clone();
        w2[19] = -w2[19] + 0.5; // class 4
        let err = cpu::backward(&spec, &fwd, &x, &w2, &labels, shape, Upstream::ONE).unwrap_err();
        let d = mismatch(err.clone());
        assert!(d.contains("w differs") && d.contains("row 4"), "{d}");
        assert!(err.to_string().contains("does not match"), "{err}");
    }
}

#[test]
fn the_same_values_pass_whatever_their_type() {
    // The check is on values, not buffers: a forward on f16 inputs and a backward on the same
    // values widened to f32 (or copied) is fine, and so is a NaN row seen by both.
    let (shape, x, w, labels) = valid();
    let spec = MarginLoss::arcface(0.5);
    let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
    let fwd = cpu::forward(&spec, &xh, &wh, &labels, shape).unwrap();
    let xf: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
    let wf: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
    let a = cpu::backward(&spec, &fwd, &xh, &wh, &labels, shape, Upstream::ONE).unwrap();
    let b = cpu::backward(&spec, &fwd, &xf, &wf, &labels, shape, Upstream::ONE).unwrap();
    assert_eq!(a, b);

    let mut xn = x.clone();
    xn[4] = f32::NAN;
    let fwd = cpu::forward(&spec, &xn, &w, &labels, shape).unwrap();
    let g = cpu::backward(&spec, &fwd, &xn.clone(), &w, &labels, shape, Upstream::ONE).unwrap();
    assert!(g.dx[4..8].iter().any(|v| v.is_nan()));
}

#[test]
fn backward_rejects_permuted_or_changed_labels() {
    let (shape, x, w, labels) = valid();
    let spec = MarginLoss::arcface(0.5);
    let fwd = cpu::forward(&spec, &x, &w, &labels, shape).unwrap();
    // Same count and same sum, other order: only an order-sensitive fingerprint sees it.
    for other in [
        vec![4, 0, -1],
        vec![-1, 4, 0],
        vec![1, 3, -1],
        vec![0, 4, -2],
    ] {
        let r = cpu::backward(&spec, &fwd, &x, &w, &other, shape, Upstream::ONE);
        if other == [0, 4, -2] {
            // -1 and -2 both mean "ignored" but are other values: still rejected.
            let d = mismatch(r.unwrap_err());
            assert!(d.contains("labels differ"), "{d}");
            continue;
        }
        let d = mismatch(r.unwrap_err());
        assert!(
            d.contains("labels differ") && d.contains("another order"),
            "{other:?}: {d}"
        );
    }
    // The same labels pass.
    assert!(cpu::backward(&spec, &fwd, &x, &w, &labels, shape, Upstream::ONE).is_ok());
    assert_ne!(
        Shape::labels_fingerprint(&[1, 2]),
        Shape::labels_fingerprint(&[2, 1])
    );
}

#[test]
fn backward_rejects_other_inputs_with_the_same_row_norms() {
    // A row permuted within itself (or rotated) keeps its norm: the norm comparison alone let
    // such an x through and gave dx off by orders of magnitude. The fingerprint of the elements
    // catches it.
    let (shape, x, w, labels) = valid();
    let spec = MarginLoss::arcface(0.5);
    let fwd = cpu::forward(&spec, &x, &w, &labels, shape).unwrap();
    let mut x2 = x.clone();
    x2.swap(4, 5); // row 1, same norm
    let d =
        mismatch(cpu::backward(&spec, &fwd, &x2, &w, &labels, shape, Upstream::ONE).unwrap_err());
    assert!(d.contains("x or w differs"), "{d}");
    let mut w2 = w.clone();
    w2.swap(0, 1); // class 0, same norm
    let d =
        mismatch(cpu::backward(&spec, &fwd, &x, &w2, &labels, shape, Upstream::ONE).unwrap_err());
    assert!(d.contains("x or w differs"), "{d}");
    // x's rows swapped with each other: every norm moves, the first differing row is named.
    let mut x3 = x.clone();
    x3[..8].rotate_left(4);
    assert!(cpu::backward(&spec, &fwd, &x3, &w, &labels, shape, Upstream::ONE).is_err());
}

#[test]
fn an_edited_invalid_spec_is_named_as_invalid() {
    // A forward whose spec was edited to NaN reported ForwardMismatch with two identical-looking
    // specs; the bad field is what the caller needs to see.
    let (shape, x, w, labels) = valid();
    let spec = MarginLoss::arcface(0.5);
    let mut fwd = cpu::forward(&spec, &x, &w, &labels, shape).unwrap();
    fwd.spec.m2 = f64::NAN;
    let bad = fwd.spec;
    for s in [spec, bad] {
        match cpu::backward(&s, &fwd, &x, &w, &labels, shape, Upstream::ONE) {
            Err(Error::InvalidSpec { field: "m2", .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
