//! The loss specification: presets, setters, defaults, the SphereFace schedule, and the per-row
//! upstream gradient (MATH.md steps 4 and 6, "Backward").

use fused_margin::{
    GradientMode, MarginLoss, OverflowPolicy, Reduction, Shape, SphereFaceSchedule, Upstream,
};

#[test]
fn presets_carry_the_papers_hyper_parameters() {
    let base = |m: &MarginLoss| {
        assert!(m.normalize_weights);
        assert_eq!(m.policy, None);
        assert_eq!(m.gradient, GradientMode::Full);
        assert_eq!(m.lambda, 0.0);
        assert_eq!(m.reduction, Reduction::Mean);
    };
    let nsl = MarginLoss::nsl(16.0);
    assert_eq!((nsl.m1, nsl.m2, nsl.m3, nsl.s), (1.0, 0.0, 0.0, 16.0));
    assert!(nsl.normalize_features);
    base(&nsl);
    let cos = MarginLoss::cosface(0.35);
    assert_eq!((cos.m1, cos.m2, cos.m3, cos.s), (1.0, 0.0, 0.35, 64.0));
    assert!(cos.normalize_features);
    base(&cos);
    let arc = MarginLoss::arcface(0.5);
    assert_eq!((arc.m1, arc.m2, arc.m3, arc.s), (1.0, 0.5, 0.0, 64.0));
    assert!(arc.normalize_features);
    base(&arc);
    // SphereFace: feature norm as the scale (s = 1, features not normalized).
    let sph = MarginLoss::sphereface(4.0);
    assert_eq!((sph.m1, sph.m2, sph.m3, sph.s), (4.0, 0.0, 0.0, 1.0));
    assert!(!sph.normalize_features);
    base(&sph);
    let comb = MarginLoss::combined(1.0, 0.3, 0.2);
    assert_eq!((comb.m1, comb.m2, comb.m3, comb.s), (1.0, 0.3, 0.2, 64.0));
    assert!(comb.normalize_features);
    base(&comb);
    assert_eq!(MarginLoss::default(), MarginLoss::arcface(0.5));
    for m in [nsl, cos, arc, sph, comb] {
        assert_eq!(m.validate(), Ok(()), "{m:?}");
    }
}

#[test]
fn setters_change_only_their_field() {
    let a = MarginLoss::arcface(0.5);
    let b = a
        .scale(30.0)
        .margins(1.35, 0.1, 0.05)
        .normalize_features(false)
        .normalize_weights(false)
        .policy(OverflowPolicy::Raw)
        .gradient(GradientMode::Detached)
        .lambda(5.0)
        .reduction(Reduction::None);
    assert_eq!(
        b,
        MarginLoss {
            m1: 1.35,
            m2: 0.1,
            m3: 0.05,
            s: 30.0,
            normalize_features: false,
            normalize_weights: false,
            policy: Some(OverflowPolicy::Raw),
            gradient: GradientMode::Detached,
            lambda: 5.0,
            reduction: Reduction::None,
            variant: fused_margin::Variant::Plain,
        }
    );
    // One setter alone leaves the rest as the preset had them.
    assert_eq!(
        a.lambda(2.0),
        MarginLoss {
            lambda: 2.0,
            ..MarginLoss::arcface(0.5)
        }
    );
}

#[test]
fn effective_policy_defaults_follow_m1() {
    // Monotonic when m1 != 1 ...
    assert_eq!(
        MarginLoss::sphereface(4.0).effective_policy(),
        OverflowPolicy::Monotonic
    );
    assert_eq!(
        MarginLoss::combined(1.35, 0.0, 0.0).effective_policy(),
        OverflowPolicy::Monotonic
    );
    // ... Fallback when m1 == 1.
    for m in [
        MarginLoss::nsl(16.0),
        MarginLoss::cosface(0.35),
        MarginLoss::arcface(0.5),
        MarginLoss::combined(1.0, 0.3, 0.2),
    ] {
        assert_eq!(m.effective_policy(), OverflowPolicy::Fallback, "{m:?}");
    }
    // An explicit policy wins either way.
    for p in [
        OverflowPolicy::Monotonic,
        OverflowPolicy::Fallback,
        OverflowPolicy::Raw,
        OverflowPolicy::Easy,
    ] {
        assert_eq!(MarginLoss::sphereface(4.0).policy(p).effective_policy(), p);
        assert_eq!(MarginLoss::arcface(0.5).policy(p).effective_policy(), p);
    }
}

#[test]
fn angular_margin_means_m1_not_1_or_m2_not_0() {
    assert!(!MarginLoss::nsl(16.0).has_angular_margin());
    assert!(!MarginLoss::cosface(0.35).has_angular_margin());
    assert!(MarginLoss::arcface(0.5).has_angular_margin());
    assert!(MarginLoss::sphereface(4.0).has_angular_margin());
    assert!(MarginLoss::combined(1.0, 0.3, 0.2).has_angular_margin());
    assert!(!MarginLoss::arcface(0.0).has_angular_margin());
}

#[test]
fn sphereface_schedule_original_defaults() {
    let s = SphereFaceSchedule::default();
    assert_eq!(
        (s.base, s.gamma, s.power, s.lambda_min),
        (1000.0, 0.12, 1.0, 5.0)
    );
    // lambda = max(5, 1000 * (1 + 0.12 iter)^-1)
    for iter in [0u64, 1, 10, 100, 500, 1000, 1658, 1659, 5000, 1_000_000] {
        let want = (1000.0 / (1.0 + 0.12 * iter as f64)).max(5.0);
        let got = s.lambda_at(iter).unwrap();
        assert!(
            (got - want).abs() <= 1e-12 * want,
            "iter {iter}: {got} vs {want}"
        );
    }
    assert_eq!(s.lambda_at(0), Ok(1000.0));
    // The floor takes over between iterations 1658 and 1659 (1000/(1 + 0.12 i) = 5 at i = 1658.3).
    assert!(s.lambda_at(1658).unwrap() > 5.0);
    assert_eq!(s.lambda_at(1659), Ok(5.0));
    assert_eq!(s.lambda_at(u64::MAX), Ok(5.0));
}

#[test]
fn sphereface_schedule_custom_power() {
    let s = SphereFaceSchedule {
        base: 100.0,
        gamma: 0.5,
        power: 2.0,
        lambda_min: 0.0,
    };
    // 100 * (1 + 0.5*4)^-2 = 100/9
    assert!((s.lambda_at(4).unwrap() - 100.0 / 9.0).abs() < 1e-12);
    let mut prev = f64::INFINITY;
    for iter in 0..1000 {
        let l = s.lambda_at(iter).unwrap();
        assert!(l <= prev && l >= 0.0);
        prev = l;
    }
}

#[test]
fn labels_count_the_rows_that_are_not_ignored() {
    let shape = Shape::new(5, 2, 3);
    assert_eq!(shape.check_labels(&[0, -1, 2, -100, 1]), Ok(3));
    assert_eq!(shape.check_labels(&[-1; 5]), Ok(0));
    assert!(shape.check_labels(&[0, 3, 0, 0, 0]).is_err());
}

#[test]
fn per_row_upstream_follows_the_reduction() {
    let labels = [0, -1, 2, 1, -100];
    // Mean: dL/N on counted rows (N = 3), 0 on ignored ones.
    let g = Upstream::Scalar(1.5)
        .per_row(Reduction::Mean, &labels)
        .unwrap();
    assert_eq!(g, vec![0.5, 0.0, 0.5, 0.5, 0.0]);
    // Sum: dL on counted rows.
    let g = Upstream::Scalar(1.5)
        .per_row(Reduction::Sum, &labels)
        .unwrap();
    assert_eq!(g, vec![1.5, 0.0, 1.5, 1.5, 0.0]);
    // None: the given values, ignored rows zeroed.
    let v = [1.0, 2.0, 3.0, 4.0, 5.0];
    let g = Upstream::PerRow(&v)
        .per_row(Reduction::None, &labels)
        .unwrap();
    assert_eq!(g, vec![1.0, 0.0, 3.0, 4.0, 0.0]);
    // Mean with nothing counted: zero, not NaN.
    let g = Upstream::ONE.per_row(Reduction::Mean, &[-1, -1]).unwrap();
    assert_eq!(g, vec![0.0, 0.0]);
}

#[test]
fn sphereface_schedule_rejects_bad_fields() {
    // NaN anywhere used to give lambda_min silently through max().
    let ok = SphereFaceSchedule::default();
    for (field, s) in [
        (
            "schedule.gamma",
            SphereFaceSchedule {
                gamma: f64::NAN,
                ..ok
            },
        ),
        (
            "schedule.base",
            SphereFaceSchedule {
                base: f64::NAN,
                ..ok
            },
        ),
        ("schedule.power", SphereFaceSchedule { power: -1.0, ..ok }),
        (
            "schedule.lambda_min",
            SphereFaceSchedule {
                lambda_min: f64::INFINITY,
                ..ok
            },
        ),
    ] {
        match s.lambda_at(3) {
            Err(fused_margin::Error::InvalidSpec { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
        assert!(s.validate().is_err());
    }
    assert_eq!(ok.validate(), Ok(()));
}

#[test]
fn scale_is_bounded() {
    // s = 1e300 or f64::MAX overflowed the logits (infinite or NaN loss) although validate()
    // accepted them.
    for s in [1e300, f64::MAX, 1e6 * (1.0 + 1e-15), f64::INFINITY] {
        match MarginLoss::arcface(0.5).scale(s).validate() {
            Err(fused_margin::Error::InvalidSpec { field: "s", .. }) => {}
            other => panic!("s = {s}: {other:?}"),
        }
    }
    assert_eq!(
        MarginLoss::arcface(0.5)
            .scale(fused_margin::spec::S_MAX)
            .validate(),
        Ok(())
    );
}

#[test]
fn upstream_values_are_bounded_and_ignored_rows_unchecked() {
    let labels = [0, -1, 2];
    for v in [1e308, -1e13, f64::NAN, f64::INFINITY] {
        assert!(
            Upstream::Scalar(v)
                .per_row(Reduction::Sum, &labels)
                .is_err(),
            "{v}"
        );
        let per = [1.0, 1.0, v];
        assert!(
            Upstream::PerRow(&per)
                .per_row(Reduction::None, &labels)
                .is_err(),
            "{v} on a counted row"
        );
        // Row 1 is ignored: its value is never read, so it is not checked.
        let per = [1.0, v, 1.0];
        assert_eq!(
            Upstream::PerRow(&per).per_row(Reduction::None, &labels),
            Ok(vec![1.0, 0.0, 1.0]),
            "{v} on an ignored row"
        );
    }
    assert!(Upstream::Scalar(1e12)
        .per_row(Reduction::Sum, &labels)
        .is_ok());
}
