//! Every error path of the CPU API: each is a typed `Error` whose message names the offending
//! field or buffer and its value, returned before any work is done.

use fused_margin::{cpu, Error, MarginLoss, Reduction, Shape, Upstream};
use std::f64::consts::PI;

/// A small valid problem: B=3, D=4, C=5.
fn valid() -> (Shape, Vec<f32>, Vec<f32>, Vec<i32>) {
    let shape = Shape::new(3, 4, 5);
    let x = (0..12).map(|k| (k as f32 * 0.37).sin()).collect();
    let w = (0..20).map(|k| (k as f32 * 0.91).cos()).collect();
    (shape, x, w, vec![0, 4, -1])
}

/// Asserts `spec` is rejected by `validate()` and by forward, as `InvalidSpec` on `field` with
/// `value`, and that the message names both.
fn rejects(spec: MarginLoss, field: &str, value: f64) {
    let err = spec.validate().expect_err("validate accepted a bad spec");
    match &err {
        Error::InvalidSpec {
            field: f, value: v, ..
        } => {
            assert_eq!(*f, field);
            assert!(v.to_bits() == value.to_bits(), "value {v} vs {value}");
        }
        e => panic!("expected InvalidSpec, got {e:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{field} = {value}")),
        "message {msg:?} does not name {field} = {value}"
    );
    let (shape, x, w, labels) = valid();
    // Compared through the message: a NaN field makes `Error: PartialEq` unequal to itself.
    let fwd_err = cpu::forward(&spec, &x, &w, &labels, shape).unwrap_err();
    assert!(matches!(fwd_err, Error::InvalidSpec { .. }), "{fwd_err:?}");
    assert_eq!(fwd_err.to_string(), msg);
}

#[test]
fn scale_must_be_finite_and_positive() {
    for s in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        rejects(MarginLoss::arcface(0.5).scale(s), "s", s);
    }
}

#[test]
fn m1_must_be_in_1_to_16() {
    for m1 in [0.5, 0.999, 16.5, 17.0, f64::NAN, f64::INFINITY] {
        rejects(MarginLoss::sphereface(m1), "m1", m1);
    }
}

#[test]
fn m2_must_be_in_0_to_pi() {
    for m2 in [-0.1, PI, 4.0, f64::NAN] {
        rejects(MarginLoss::arcface(m2), "m2", m2);
    }
}

#[test]
fn m3_must_be_in_0_to_2() {
    for m3 in [-0.01, 2.01, f64::NAN, f64::INFINITY] {
        rejects(MarginLoss::cosface(m3), "m3", m3);
    }
}

#[test]
fn lambda_must_be_finite_and_non_negative() {
    for l in [-1.0, -1e-9, f64::NAN, f64::INFINITY] {
        rejects(MarginLoss::sphereface(4.0).lambda(l), "lambda", l);
    }
}

#[test]
fn range_ends_are_accepted() {
    for spec in [
        MarginLoss::combined(1.0, 0.0, 0.0),
        MarginLoss::combined(16.0, 0.0, 2.0),
        MarginLoss::combined(1.0, PI - 1e-9, 0.0),
        MarginLoss::sphereface(4.0).lambda(0.0),
        MarginLoss::nsl(f64::MIN_POSITIVE),
    ] {
        assert_eq!(spec.validate(), Ok(()), "{spec:?}");
    }
}

#[test]
fn buffer_lengths_must_fit_the_shape() {
    let (shape, x, w, labels) = valid();
    let spec = MarginLoss::arcface(0.5);
    /// (buffer, x, w, labels, expected length, passed length)
    type Case<'a> = (&'static str, &'a [f32], &'a [f32], &'a [i32], usize, usize);
    let cases: [Case; 3] = [
        ("x", &x[..11], &w, &labels, 12, 11),
        ("w", &x, &[w.as_slice(), &[0.5]].concat(), &labels, 20, 21),
        ("labels", &x, &w, &labels[..2], 3, 2),
    ];
    for (what, x, w, l, expected, got) in cases {
        let err = cpu::forward(&spec, x, w, l, shape).unwrap_err();
        assert_eq!(
            err,
            Error::Length {
                what,
                expected,
                got
            }
        );
        let msg = err.to_string();
        assert!(
            msg.contains(what)
                && msg.contains(&expected.to_string())
                && msg.contains(&got.to_string()),
            "{msg}"
        );
    }
    // Backward checks the lengths too.
    let (shape, x, w, labels) = valid();
    let fwd = cpu::forward(&spec, &x, &w, &labels, shape).unwrap();
    let err = cpu::backward(&spec, &fwd, &x[..11], &w, &labels, shape, Upstream::ONE).unwrap_err();
    assert!(matches!(err, Error::Length { what: "x", .. }), "{err:?}");
}

#[test]
fn labels_must_be_below_c() {
    let (shape, x, w, _) = valid();
    let spec = MarginLoss::cosface(0.35);
    let labels = [1, 5, 2]; // 5 == C
    let err = cpu::forward(&spec, &x, &w, &labels, shape).unwrap_err();
    assert_eq!(
        err,
        Error::LabelOutOfRange {
            row: 1,
            label: 5,
            classes: 5
        }
    );
    let msg = err.to_string();
    assert!(msg.contains("label 5") && msg.contains("row 1"), "{msg}");
    // Far out of range too; negative labels are not errors (ignored rows).
    let err = cpu::forward(&spec, &x, &w, &[-1, -100, i32::MAX], shape).unwrap_err();
    assert!(
        matches!(err, Error::LabelOutOfRange { row: 2, .. }),
        "{err:?}"
    );
}

#[test]
fn zero_dimensions_are_rejected() {
    let spec = MarginLoss::arcface(0.5);
    for (shape, dim) in [
        (Shape::new(0, 4, 5), "B"),
        (Shape::new(3, 0, 5), "D"),
        (Shape::new(3, 4, 0), "C"),
    ] {
        let x = vec![0.5f32; shape.b * shape.d];
        let w = vec![0.5f32; shape.c * shape.d];
        let labels = vec![0; shape.b];
        let err = cpu::forward(&spec, &x, &w, &labels, shape).unwrap_err();
        assert_eq!(err, Error::EmptyDimension { dim });
        assert!(err.to_string().contains(&format!("{dim} = 0")));
    }
}

#[test]
fn shapes_beyond_the_index_types_are_rejected() {
    let too_many_classes = Shape::new(2, 1, i32::MAX as usize + 1);
    assert!(matches!(
        too_many_classes.validate(),
        Err(Error::TooLarge { .. })
    ));
    let overflow = Shape::new(usize::MAX / 2, 3, 1);
    let err = overflow.validate().unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
    assert!(err.to_string().contains("B*D"), "{err}");
}

#[test]
fn upstream_must_fit_the_reduction() {
    let (shape, x, w, labels) = valid();
    let mean = MarginLoss::arcface(0.5);
    let fwd = cpu::forward(&mean, &x, &w, &labels, shape).unwrap();
    let back = |spec: &MarginLoss, fwd: &cpu::Forward, up: Upstream<'_>| {
        cpu::backward(spec, fwd, &x, &w, &labels, shape, up).unwrap_err()
    };
    // Per-row values for a mean.
    let err = back(&mean, &fwd, Upstream::PerRow(&[1.0, 1.0, 1.0]));
    assert!(matches!(err, Error::Upstream { .. }), "{err:?}");
    assert!(err.to_string().contains("Mean"), "{err}");
    // Non-finite scalars.
    for v in [f64::NAN, f64::INFINITY] {
        let err = back(&mean, &fwd, Upstream::Scalar(v));
        assert!(matches!(err, Error::Upstream { .. }), "{err:?}");
        assert!(err.to_string().contains(&v.to_string()), "{err}");
    }
    let sum = mean.reduction(Reduction::Sum);
    let fwd_sum = cpu::forward(&sum, &x, &w, &labels, shape).unwrap();
    let err = back(&sum, &fwd_sum, Upstream::PerRow(&[1.0, 1.0, 1.0]));
    assert!(matches!(err, Error::Upstream { .. }), "{err:?}");

    let none = mean.reduction(Reduction::None);
    let fwd_none = cpu::forward(&none, &x, &w, &labels, shape).unwrap();
    // A scalar for reduction none.
    let err = back(&none, &fwd_none, Upstream::ONE);
    assert!(matches!(err, Error::Upstream { .. }), "{err:?}");
    assert!(err.to_string().contains("B = 3"), "{err}");
    // The wrong number of rows.
    let err = back(&none, &fwd_none, Upstream::PerRow(&[1.0, 1.0]));
    assert_eq!(
        err,
        Error::Length {
            what: "upstream",
            expected: 3,
            got: 2
        }
    );
    // A non-finite row value, named by row.
    let err = back(&none, &fwd_none, Upstream::PerRow(&[1.0, f64::NAN, 1.0]));
    assert!(matches!(err, Error::Upstream { .. }), "{err:?}");
    assert!(err.to_string().contains("row 1"), "{err}");
}

#[test]
fn backward_rejects_a_forward_from_elsewhere() {
    let (shape, x, w, labels) = valid();
    let spec = MarginLoss::arcface(0.5);
    let fwd = cpu::forward(&spec, &x, &w, &labels, shape).unwrap();
    // Another spec (a different margin, a different reduction).
    for other in [
        MarginLoss::arcface(0.4),
        spec.reduction(Reduction::Sum),
        spec.policy(fused_margin::OverflowPolicy::Raw),
    ] {
        let err = cpu::backward(&other, &fwd, &x, &w, &labels, shape, Upstream::ONE).unwrap_err();
        assert!(matches!(err, Error::ForwardMismatch { .. }), "{err:?}");
    }
    // A forward made for another shape (B=2, C=4) handed to a backward on B=3, C=5.
    let fwd_small = cpu::forward(&spec, &x[..8], &w[..16], &[0, 3], Shape::new(2, 4, 4)).unwrap();
    let err = cpu::backward(&spec, &fwd_small, &x, &w, &labels, shape, Upstream::ONE).unwrap_err();
    assert!(matches!(err, Error::ForwardMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("shape"), "{err}");
    // The same spec and shape but labels that count a different number of rows.
    let err = cpu::backward(&spec, &fwd, &x, &w, &[0, -1, -1], shape, Upstream::ONE).unwrap_err();
    assert!(matches!(err, Error::ForwardMismatch { .. }), "{err:?}");
}
