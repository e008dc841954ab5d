//! The losses with per-row or batch state on the CPU reference (docs/MATH.md, "Losses with
//! per-row or batch state"): central finite differences of each, the state's contract (updated
//! first, ignored rows excluded, nothing kept between calls), the cases where one reduces to a
//! fixed-margin loss exactly, and the errors for missing, refused or bad inputs. The golden files
//! (tests/golden.rs) pin the values; these tests pin the structure.

mod common;

use common::*;
use fused_margin::{
    cpu, AdaFace, CurricularFace, ElasticFace, ElasticKind, ElasticMargins, ElasticPlus,
    ElasticRng, Error, LossState, MagFace, MarginLoss, OverflowPolicy, Reduction, RowInputs, Shape,
    Upstream, Variant,
};

/// Finite-difference step and tolerances, as tests/cpu_gradcheck.rs (f64 throughout).
const H: f64 = 1e-6;
const RTOL: f64 = 1e-6;
const ATOL_PER_LOSS: f64 = 1e-7;

struct Case {
    shape: Shape,
    x: Vec<f64>,
    w: Vec<f64>,
    labels: Vec<i32>,
}

/// Seeded inputs: feature norms in `x_norms`, `centers` rows per class, the last row ignored.
fn case(seed: u64, shape: Shape, x_norms: (f64, f64), centers: usize) -> Case {
    let mut r = rng(seed);
    let x = rows(&mut r, shape.b, shape.d, x_norms);
    let w = rows(&mut r, shape.c * centers, shape.d, (0.5, 2.0));
    let mut labels = labels(&mut r, shape.b, shape.c);
    labels[shape.b - 1] = -1;
    Case {
        shape,
        x,
        w,
        labels,
    }
}

fn loss(spec: &MarginLoss, c: &Case, x: &[f64], w: &[f64], inputs: &RowInputs) -> f64 {
    cpu::forward_with(spec, x, w, &c.labels, c.shape, inputs)
        .unwrap()
        .loss
}

/// Analytic `dx` and `dw` against central differences of the forward. `through_x` false checks
/// `dw` only: for AdaFace with `h > 0` the margin depends on `|x_i|`, which the contract detaches
/// (MATH.md), so differences in `x` see a dependence the gradient rightly leaves out.
fn gradcheck(spec: MarginLoss, c: &Case, inputs: &RowInputs, through_x: bool) {
    let fwd = cpu::forward_with(&spec, &c.x, &c.w, &c.labels, c.shape, inputs).unwrap();
    let g = cpu::backward(&spec, &fwd, &c.x, &c.w, &c.labels, c.shape, Upstream::ONE).unwrap();
    let atol = ATOL_PER_LOSS * fwd.loss.abs().max(1.0);
    if through_x {
        let fdx = central_diff(&c.x, H, &mut |xp| loss(&spec, c, xp, &c.w, inputs));
        assert_close("dx", &g.dx, &fdx, atol, RTOL);
    }
    let fdw = central_diff(&c.w, H, &mut |wp| loss(&spec, c, &c.x, wp, inputs));
    assert_close("dw", &g.dw, &fdw, atol, RTOL);
    assert!(g.dx.iter().any(|v| v.abs() > 1e-6) && g.dw.iter().any(|v| v.abs() > 1e-6));
}

fn unit(v: &[f64]) -> Vec<f64> {
    let n = norm(v);
    v.iter().map(|e| e / n).collect()
}

/// The gap between each (row, class)'s best and second-best sub-center cosine: differences of
/// `H` must not change a winner.
fn min_winner_gap(c: &Case, k: usize) -> f64 {
    let d = c.shape.d;
    let mut gap = f64::INFINITY;
    for i in 0..c.shape.b {
        let xh = unit(&c.x[i * d..(i + 1) * d]);
        for j in 0..c.shape.c {
            let mut cs: Vec<f64> = (0..k)
                .map(|kk| {
                    let r = (j * k + kk) * d;
                    let wh = unit(&c.w[r..r + d]);
                    xh.iter().zip(&wh).map(|(a, b)| a * b).sum()
                })
                .collect();
            cs.sort_by(|a, b| b.total_cmp(a));
            gap = gap.min(cs[0] - cs[1]);
        }
    }
    gap
}

#[test]
fn subcenter_gradients_go_to_the_winner() {
    for (k, spec) in [
        (3, MarginLoss::subcenter(3).scale(16.0)),
        (
            2,
            MarginLoss::subcenter(2).margins(1.0, 0.0, 0.35).scale(16.0),
        ),
        (
            3,
            MarginLoss::subcenter(3)
                .margins(1.0, 0.3, 0.2)
                .policy(OverflowPolicy::Raw)
                .scale(32.0),
        ),
    ] {
        let c = case(11, Shape::new(6, 7, 5), (0.5, 2.0), k);
        assert!(
            min_winner_gap(&c, k) > 1e-4,
            "redraw: a winner is near a tie"
        );
        gradcheck(spec, &c, &RowInputs::default(), true);
        // Each (row, class) sends dw to one sub-center: with one row counted, at most C of the
        // C*K rows of dw are nonzero.
        let one = Case {
            labels: (0..c.shape.b)
                .map(|i| if i == 0 { c.labels[0] } else { -1 })
                .collect(),
            ..case(11, Shape::new(6, 7, 5), (0.5, 2.0), k)
        };
        let fwd = cpu::forward(&spec, &one.x, &one.w, &one.labels, one.shape).unwrap();
        let g = cpu::backward(
            &spec,
            &fwd,
            &one.x,
            &one.w,
            &one.labels,
            one.shape,
            Upstream::ONE,
        )
        .unwrap();
        let d = one.shape.d;
        let live =
            g.dw.chunks(d)
                .filter(|r| r.iter().any(|v| *v != 0.0))
                .count();
        assert_eq!(live, one.shape.c, "k = {k}: one winner per class");
    }
}

#[test]
fn subcenter_with_one_center_is_the_plain_loss() {
    let c = case(3, Shape::new(5, 6, 7), (0.5, 2.0), 1);
    let plain = MarginLoss::arcface(0.5);
    let sub = MarginLoss::subcenter(1);
    let a = cpu::forward(&plain, &c.x, &c.w, &c.labels, c.shape).unwrap();
    let b = cpu::forward(&sub, &c.x, &c.w, &c.labels, c.shape).unwrap();
    assert_eq!(a.row_loss, b.row_loss);
    let ga = cpu::backward(&plain, &a, &c.x, &c.w, &c.labels, c.shape, Upstream::ONE).unwrap();
    let gb = cpu::backward(&sub, &b, &c.x, &c.w, &c.labels, c.shape, Upstream::ONE).unwrap();
    assert_eq!((ga.dx, ga.dw), (gb.dx, gb.dw));
}

#[test]
fn adaface_gradients() {
    let c = case(5, Shape::new(7, 6, 9), (10.0, 30.0), 1);
    let state = RowInputs::with_state(LossState::AdaFace {
        mean: 18.0,
        std: 5.0,
    });
    // alpha = 0: the state out equals the state in, so the forward is a function of x and w
    // alone and can be differenced.
    let frozen = AdaFace {
        alpha: 0.0,
        ..AdaFace::default()
    };
    let spec = MarginLoss::adaface().variant(Variant::AdaFace(frozen));
    gradcheck(spec, &c, &state, false);
    // h = 0: the margin no longer depends on the norm, so dx can be differenced too.
    let flat = AdaFace { h: 0.0, ..frozen };
    gradcheck(
        MarginLoss::adaface().variant(Variant::AdaFace(flat)),
        &c,
        &state,
        true,
    );
}

#[test]
fn curricular_gradients() {
    let c = case(7, Shape::new(7, 6, 9), (0.5, 2.0), 1);
    let frozen = Variant::CurricularFace(CurricularFace { alpha: 0.0 });
    let state = RowInputs::with_state(LossState::CurricularFace { t: 0.3 });
    let spec = MarginLoss::curricularface().scale(16.0).variant(frozen);
    let fwd = cpu::forward_with(&spec, &c.x, &c.w, &c.labels, c.shape, &state).unwrap();
    // The case must have hard negatives, or the re-weighting is not checked.
    assert!(fwd.rows.hard.iter().sum::<usize>() > 0, "no hard negatives");
    gradcheck(spec, &c, &state, true);
    let cos = MarginLoss::cosface(0.35).scale(16.0).variant(frozen);
    gradcheck(cos, &c, &state, true);
}

#[test]
fn magface_gradients_through_the_norm() {
    // Norms on both sides of the clamp [10, 110] and inside it (the last row is ignored).
    let mut c = case(9, Shape::new(8, 6, 9), (1.0, 2.0), 1);
    let d = c.shape.d;
    let want = [5.0, 120.0, 30.0, 60.0, 90.0, 15.0, 105.0, 50.0];
    for (row, n) in c.x.chunks_mut(d).zip(want) {
        let k = n / norm(row);
        row.iter_mut().for_each(|v| *v *= k);
    }
    for spec in [
        MarginLoss::magface().scale(16.0),
        MarginLoss::magface()
            .scale(16.0)
            .policy(OverflowPolicy::Fallback),
        MarginLoss::magface().scale(16.0).reduction(Reduction::Sum),
    ] {
        gradcheck(spec, &c, &RowInputs::default(), true);
    }
}

#[test]
fn elastic_gradients() {
    let c = case(13, Shape::new(7, 6, 9), (0.5, 2.0), 1);
    let given = [0.45, 0.52, 0.61, 0.38, 0.5, 0.47, 0.55];
    for (spec, inputs) in [
        (
            MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::None).scale(16.0),
            RowInputs::with_margins(ElasticMargins::Given(&given)),
        ),
        (
            MarginLoss::elasticface(ElasticKind::Cos, ElasticPlus::Rank).scale(16.0),
            RowInputs::with_margins(ElasticMargins::Seeded(ElasticRng {
                seed: 1,
                step: 2,
                row_offset: 3,
            })),
        ),
    ] {
        gradcheck(spec, &c, &inputs, true);
    }
}

#[test]
fn degenerate_parameters_give_the_fixed_margin_losses() {
    let c = case(17, Shape::new(6, 5, 8), (12.0, 40.0), 1);
    let run = |spec: &MarginLoss, inputs: &RowInputs| {
        let f = cpu::forward_with(spec, &c.x, &c.w, &c.labels, c.shape, inputs).unwrap();
        let g = cpu::backward(spec, &f, &c.x, &c.w, &c.labels, c.shape, Upstream::ONE).unwrap();
        (f.row_loss, g.dx, g.dw)
    };
    let plain = |spec: &MarginLoss| run(spec, &RowInputs::default());
    // ElasticFace with every margin 0.5 is ArcFace (Raw); Cos with 0.35 is CosFace.
    let m = [0.5; 6];
    let arc = MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::Rank);
    assert_eq!(
        run(&arc, &RowInputs::with_margins(ElasticMargins::Given(&m))),
        plain(&MarginLoss::arcface(0.5).policy(OverflowPolicy::Raw))
    );
    let m = [0.35; 6];
    let cos = MarginLoss::elasticface(ElasticKind::Cos, ElasticPlus::Published);
    assert_eq!(
        run(&cos, &RowInputs::with_margins(ElasticMargins::Given(&m))),
        plain(&MarginLoss::cosface(0.35))
    );
    // MagFace with l_m = u_m and no regularizer is ArcFace with the same policy.
    let flat = MagFace {
        l_m: 0.5,
        u_m: 0.5,
        lambda_g: 0.0,
        ..MagFace::default()
    };
    assert_eq!(
        plain(&MarginLoss::magface().variant(Variant::MagFace(flat))),
        plain(&MarginLoss::arcface(0.5).policy(OverflowPolicy::Easy))
    );
    // CurricularFace at t = 0 under CosFace, written out: tau_i = c_iy - m3, hard negatives
    // (c > tau) become c (0 + c) = c^2, the target c_iy - m3.
    let cur =
        MarginLoss::cosface(0.35).variant(Variant::CurricularFace(CurricularFace { alpha: 0.0 }));
    let st = RowInputs::with_state(LossState::CurricularFace { t: 0.0 });
    let f = cpu::forward_with(&cur, &c.x, &c.w, &c.labels, c.shape, &st).unwrap();
    let d = c.shape.d;
    for i in 0..c.shape.b {
        let y = c.labels[i];
        if y < 0 {
            continue;
        }
        let xh = unit(&c.x[i * d..(i + 1) * d]);
        let cs: Vec<f64> = (0..c.shape.c)
            .map(|j| {
                let wh = unit(&c.w[j * d..(j + 1) * d]);
                xh.iter().zip(&wh).map(|(a, b)| a * b).sum()
            })
            .collect();
        let cy = cs[y as usize];
        let tau = cy - 0.35;
        assert!((f.rows.tau[i] - tau).abs() < 1e-14);
        // Hard negatives c > tau become c * (0 + c) = c^2.
        let z: Vec<f64> = (0..c.shape.c)
            .map(|j| {
                let v = if j == y as usize {
                    cy - 0.35
                } else if cs[j] > tau {
                    cs[j] * cs[j]
                } else {
                    cs[j]
                };
                64.0 * v
            })
            .collect();
        let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = mx + z.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
        assert!((f.row_loss[i] - (lse - z[y as usize])).abs() < 1e-10 * lse.abs());
    }
}

#[test]
fn state_is_updated_first_over_counted_rows_only() {
    let c = case(19, Shape::new(6, 5, 8), (10.0, 40.0), 1);
    let ada = MarginLoss::adaface();
    let st = RowInputs::with_state(LossState::ADAFACE_INIT);
    let f = cpu::forward_with(&ada, &c.x, &c.w, &c.labels, c.shape, &st).unwrap();
    // An ignored row's features take no part in the statistics.
    let mut x2 = c.x.clone();
    let last = c.shape.b - 1;
    for v in &mut x2[last * c.shape.d..] {
        *v *= 3.0;
    }
    let f2 = cpu::forward_with(&ada, &x2, &c.w, &c.labels, c.shape, &st).unwrap();
    assert_eq!(f.state, f2.state);
    // The op keeps nothing: the same call gives the same state and loss.
    let again = cpu::forward_with(&ada, &c.x, &c.w, &c.labels, c.shape, &st).unwrap();
    assert_eq!((f.state, f.loss), (again.state, again.loss));
    // The state moves, and feeding it back moves it again (a training loop threads it).
    assert_ne!(f.state, Some(LossState::ADAFACE_INIT));
    let next = RowInputs::with_state(f.state.unwrap());
    let f3 = cpu::forward_with(&ada, &c.x, &c.w, &c.labels, c.shape, &next).unwrap();
    assert_ne!(f3.state, f.state);
    // No counted row: the state passes through unchanged, for both stateful losses.
    let none = vec![-1; c.shape.b];
    let f4 = cpu::forward_with(&ada, &c.x, &c.w, &none, c.shape, &st).unwrap();
    assert_eq!(f4.state, Some(LossState::ADAFACE_INIT));
    let cur = MarginLoss::curricularface();
    let t = RowInputs::with_state(LossState::CurricularFace { t: 0.25 });
    let f5 = cpu::forward_with(&cur, &c.x, &c.w, &none, c.shape, &t).unwrap();
    assert_eq!(f5.state, Some(LossState::CurricularFace { t: 0.25 }));
    // One counted row: the mean moves, the deviation (N - 1 divisor) keeps its value.
    let mut one = none.clone();
    one[0] = c.labels[0];
    let f6 = cpu::forward_with(&ada, &c.x, &c.w, &one, c.shape, &st).unwrap();
    match f6.state {
        Some(LossState::AdaFace { mean, std }) => {
            assert_ne!(mean, 20.0);
            assert_eq!(std, 100.0);
        }
        s => panic!("state {s:?}"),
    }
}

#[test]
fn elastic_seeded_margins_depend_on_the_global_row_only() {
    let c = case(23, Shape::new(6, 5, 8), (0.5, 2.0), 1);
    let spec = MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::None);
    let rng = |row_offset| ElasticRng {
        seed: 42,
        step: 9,
        row_offset,
    };
    let all = cpu::forward_with(
        &spec,
        &c.x,
        &c.w,
        &c.labels,
        c.shape,
        &RowInputs::with_margins(ElasticMargins::Seeded(rng(100))),
    )
    .unwrap();
    // The second half of the batch as its own call, offset by 3 rows: the same margins.
    let d = c.shape.d;
    let half = Shape::new(3, d, c.shape.c);
    let tail = cpu::forward_with(
        &spec,
        &c.x[3 * d..],
        &c.w,
        &c.labels[3..],
        half,
        &RowInputs::with_margins(ElasticMargins::Seeded(rng(103))),
    )
    .unwrap();
    assert_eq!(&all.rows.m2[3..], &tail.rows.m2[..]);
    // Another step draws other margins, around m = 0.5 with sigma = 0.05.
    let other = cpu::forward_with(
        &spec,
        &c.x,
        &c.w,
        &c.labels,
        c.shape,
        &RowInputs::with_margins(ElasticMargins::Seeded(ElasticRng {
            step: 10,
            ..rng(100)
        })),
    )
    .unwrap();
    assert_ne!(all.rows.m2, other.rows.m2);
    // Each margin is m + sigma * N(0, 1) of its global row (the normals are pinned by the golden
    // files' rng records).
    for (i, m) in all.rows.m2.iter().enumerate() {
        assert_eq!(*m, 0.5 + 0.05 * rng(100).normal(i), "row {i}");
    }
}

#[test]
fn subcenter_ties_and_nan_centers() {
    let mut c = case(31, Shape::new(4, 5, 3), (0.5, 2.0), 3);
    let d = c.shape.d;
    // Sub-center 2 of every class a copy of sub-center 0: a tie; the gradient goes to k = 0.
    for j in 0..c.shape.c {
        let src: Vec<f64> = c.w[(j * 3) * d..(j * 3 + 1) * d].to_vec();
        c.w[(j * 3 + 2) * d..(j * 3 + 3) * d].copy_from_slice(&src);
    }
    let spec = MarginLoss::subcenter(3);
    let f = cpu::forward(&spec, &c.x, &c.w, &c.labels, c.shape).unwrap();
    let g = cpu::backward(&spec, &f, &c.x, &c.w, &c.labels, c.shape, Upstream::ONE).unwrap();
    for j in 0..c.shape.c {
        let copy = &g.dw[(j * 3 + 2) * d..(j * 3 + 3) * d];
        assert!(
            copy.iter().all(|v| *v == 0.0),
            "class {j}: the tied copy got gradient"
        );
    }
    // A NaN in sub-center 1 of a class poisons every counted row, as a NaN class row does.
    let mut bad = c.w.clone();
    bad[(3 + 1) * d] = f64::NAN;
    let f = cpu::forward(&spec, &c.x, &bad, &c.labels, c.shape).unwrap();
    for (i, l) in f.row_loss.iter().enumerate() {
        assert_eq!(l.is_nan(), c.labels[i] >= 0, "row {i}: {l}");
    }
}

#[test]
fn magface_gradients_with_raw_features_and_the_lambda_blend() {
    let mut c = case(37, Shape::new(7, 6, 9), (1.0, 2.0), 1);
    let d = c.shape.d;
    for (row, n) in
        c.x.chunks_mut(d)
            .zip([5.0, 20.0, 40.0, 60.0, 80.0, 120.0, 30.0])
    {
        let k = n / norm(row);
        row.iter_mut().for_each(|v| *v *= k);
    }
    // Raw features: r_i = s |x_i| adds its own norm term to MagFace's.
    gradcheck(
        MarginLoss::magface().scale(0.3).normalize_features(false),
        &c,
        &RowInputs::default(),
        true,
    );
    gradcheck(
        MarginLoss::magface().scale(16.0).lambda(2.0),
        &c,
        &RowInputs::default(),
        true,
    );
    // Detached: the margin's norm term goes, the regularizer's stays. Against Full, dx differs
    // only along each counted row's own direction (both terms are multiples of xh_i).
    let full = MarginLoss::magface()
        .scale(16.0)
        .policy(OverflowPolicy::Raw);
    let det = full.gradient(fused_margin::GradientMode::Detached);
    let run = |s: &MarginLoss| {
        let f = cpu::forward(s, &c.x, &c.w, &c.labels, c.shape).unwrap();
        cpu::backward(s, &f, &c.x, &c.w, &c.labels, c.shape, Upstream::ONE).unwrap()
    };
    let (gf, gd) = (run(&full), run(&det));
    let mut moved = 0;
    for i in 0..c.shape.b {
        let xh = unit(&c.x[i * d..(i + 1) * d]);
        let diff: Vec<f64> = (0..d)
            .map(|k| gf.dx[i * d + k] - gd.dx[i * d + k])
            .collect();
        // The part through the normalization is orthogonal to xh_i (in both), so what lies
        // along xh_i is the norm terms alone: Full minus Detached is the margin's.
        let along: f64 = xh.iter().zip(&diff).map(|(a, b)| a * b).sum();
        moved += (along.abs() > 1e-9) as usize;
    }
    // The counted rows inside the clamp (norms 20, 40, 60, 80) change along xh; the clamped
    // ones (5, 120) and the ignored last row do not.
    assert_eq!(moved, 4);
}

#[test]
fn elastic_plus_orders_count_only_the_counted_rows() {
    use fused_margin::math::elastic_plus;
    // Rows 0..5, row 2 ignored. Counted rows p = 0, 1, 3, 4 (positions 0..4) with target
    // cosines 0.1, 0.9, 0.5, 0.3 and margins 0.40, 0.10, 0.30, 0.20.
    let labels = [0, 1, -1, 2, 3];
    let cos_y = [0.1, 0.9, 7.0, 0.5, 0.3];
    let drawn = [0.40, 0.10, 9.0, 0.30, 0.20];
    // By cosine, largest first: positions 1, 2, 3, 0 (pi). Sorted margins: 0.1, 0.2, 0.3, 0.4.
    let mut rank = drawn;
    elastic_plus(ElasticPlus::Rank, &labels, &cos_y, &mut rank);
    // Rank: the k-th largest cosine gets the k-th smallest margin.
    assert_eq!(rank, [0.40, 0.10, 9.0, 0.20, 0.30]);
    let mut published = drawn;
    elastic_plus(ElasticPlus::Published, &labels, &cos_y, &mut published);
    // Published: position p gets sorted[pi(p)] = sorted[1, 2, 3, 0].
    assert_eq!(published, [0.20, 0.30, 9.0, 0.40, 0.10]);
    // Mismatched lengths leave the margins as they are (no panic).
    let mut short = drawn;
    elastic_plus(ElasticPlus::Rank, &labels, &cos_y[..3], &mut short);
    assert_eq!(short, drawn);
}

#[test]
fn adaface_clamp_is_a_true_clamp_under_every_policy() {
    use fused_margin::math::{psi, RowMargin};
    let m = RowMargin {
        m1: 1.0,
        m2: 0.4,
        m3: 0.3,
        s: 64.0,
    };
    for policy in [
        OverflowPolicy::Clip,
        OverflowPolicy::Raw,
        OverflowPolicy::Fallback,
        OverflowPolicy::Monotonic,
    ] {
        let spec = MarginLoss::adaface().policy(policy);
        // Beyond 1 - 1e-3 and -1 + 1e-3 psi is constant in c: slope 0, the clamped value.
        for (c, edge) in [(0.9995, 0.999), (-0.9995, -0.999)] {
            let (v, dv) = psi(&spec, &m, c);
            let (ve, _) = psi(&spec, &m, edge);
            assert_eq!(dv, 0.0, "{policy:?} at {c}");
            assert!((v - ve).abs() < 1e-12, "{policy:?} at {c}: {v} vs {ve}");
        }
        // Inside, the slope is the angle's.
        assert!(psi(&spec, &m, 0.3).1 != 0.0, "{policy:?}");
    }
}

#[test]
fn missing_refused_and_bad_inputs_are_errors() {
    let c = case(29, Shape::new(4, 5, 6), (10.0, 30.0), 1);
    let f = |spec: &MarginLoss, inputs: &RowInputs| {
        cpu::forward_with(spec, &c.x, &c.w, &c.labels, c.shape, inputs).unwrap_err()
    };
    let arg = |e: Error| {
        matches!(
            e,
            Error::InvalidArgument {
                what: "row inputs",
                ..
            }
        )
    };
    // A stateful loss without its state, or with the other loss's.
    assert!(arg(f(&MarginLoss::adaface(), &RowInputs::default())));
    assert!(arg(f(
        &MarginLoss::adaface(),
        &RowInputs::with_state(LossState::CURRICULAR_INIT)
    )));
    assert!(arg(f(&MarginLoss::curricularface(), &RowInputs::default())));
    // cpu::forward is forward_with no inputs: the same error.
    assert!(arg(cpu::forward(
        &MarginLoss::adaface(),
        &c.x,
        &c.w,
        &c.labels,
        c.shape
    )
    .unwrap_err()));
    // A state or margins the loss would ignore.
    assert!(arg(f(
        &MarginLoss::arcface(0.5),
        &RowInputs::with_state(LossState::ADAFACE_INIT)
    )));
    let m = [0.5; 4];
    assert!(arg(f(
        &MarginLoss::magface(),
        &RowInputs::with_margins(ElasticMargins::Given(&m))
    )));
    let elastic = MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::None);
    assert!(arg(f(&elastic, &RowInputs::default())));
    // Margins of the wrong count, or non-finite.
    let short = [0.5; 3];
    assert!(matches!(
        f(
            &elastic,
            &RowInputs::with_margins(ElasticMargins::Given(&short))
        ),
        Error::Length {
            what: "margins",
            expected: 4,
            got: 3
        }
    ));
    let nan = [0.5, f64::NAN, 0.5, 0.5];
    assert!(matches!(
        f(&elastic, &RowInputs::with_margins(ElasticMargins::Given(&nan))),
        Error::InvalidArgument { what: "margins", detail } if detail.contains("margin 1")
    ));
    let huge = [0.5, 0.5, 17.0, 0.5];
    assert!(matches!(
        f(&elastic, &RowInputs::with_margins(ElasticMargins::Given(&huge))),
        Error::InvalidArgument { what: "margins", detail } if detail.contains("margin 2")
    ));
    // A non-finite state.
    let bad = RowInputs::with_state(LossState::AdaFace {
        mean: f64::INFINITY,
        std: 1.0,
    });
    assert!(matches!(
        f(&MarginLoss::adaface(), &bad),
        Error::InvalidSpec {
            field: "state.mean",
            ..
        }
    ));
    // Sub-center weights of the wrong length name C*K*D.
    assert!(matches!(
        cpu::forward(&MarginLoss::subcenter(3), &c.x, &c.w, &c.labels, c.shape).unwrap_err(),
        Error::Length {
            expected: 90,
            got: 30,
            ..
        }
    ));
}

#[test]
fn invalid_parameters_name_their_field() {
    let field = |spec: MarginLoss| match spec.validate() {
        Err(Error::InvalidSpec { field, .. }) => field,
        r => panic!("{spec:?}: {r:?}"),
    };
    assert_eq!(field(MarginLoss::subcenter(0)), "subcenter.k");
    assert_eq!(field(MarginLoss::subcenter(65)), "subcenter.k");
    let ada = |a: AdaFace| MarginLoss::adaface().variant(Variant::AdaFace(a));
    assert_eq!(
        field(ada(AdaFace {
            m: f64::NAN,
            ..AdaFace::default()
        })),
        "adaface.m"
    );
    assert_eq!(
        field(ada(AdaFace {
            alpha: 1.5,
            ..AdaFace::default()
        })),
        "adaface.alpha"
    );
    let mag = |g: MagFace| MarginLoss::magface().variant(Variant::MagFace(g));
    assert_eq!(
        field(mag(MagFace {
            u_a: 5.0,
            ..MagFace::default()
        })),
        "magface.u_a"
    );
    assert_eq!(
        field(mag(MagFace {
            u_m: 0.1,
            ..MagFace::default()
        })),
        "magface.u_m"
    );
    let el =
        |e: ElasticFace| MarginLoss::elasticface(e.kind, e.plus).variant(Variant::ElasticFace(e));
    assert_eq!(
        field(el(ElasticFace {
            kind: ElasticKind::Cos,
            m: 2.5,
            sigma: 0.05,
            plus: ElasticPlus::None
        })),
        "elasticface.m"
    );
    // The per-row-margin losses keep the spec's margins neutral; Clip is AdaFace's alone.
    assert_eq!(field(MarginLoss::adaface().margins(1.0, 0.5, 0.0)), "m2");
    assert_eq!(field(MarginLoss::magface().margins(1.0, 0.0, 0.2)), "m3");
    assert_eq!(
        field(MarginLoss::arcface(0.5).policy(OverflowPolicy::Clip)),
        "policy"
    );
    for ok in [
        MarginLoss::subcenter(3),
        MarginLoss::adaface(),
        MarginLoss::curricularface(),
        MarginLoss::magface(),
        MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::Rank),
        MarginLoss::elasticface(ElasticKind::Cos, ElasticPlus::Published),
    ] {
        ok.validate().unwrap();
    }
}

/// Random parameters of every loss (within their documented ranges) on random inputs: finite
/// results, a non-negative loss, the reductions' arithmetic, the state finite and moving toward
/// the batch, and the gradients orthogonal to their unit rows where the normalization alone
/// carries them (every loss but MagFace, whose margin and regularizer also reach `|x_i|`).
#[test]
fn random_parameters_keep_the_invariants() {
    use rand::Rng;
    let mut r = rng(2026);
    for case_no in 0..240 {
        let kind = case_no % 6;
        let shape = Shape::new(
            r.random_range(2..10),
            r.random_range(2..9),
            r.random_range(2..14),
        );
        let k = if kind == 0 { r.random_range(1..5) } else { 1 };
        let c = case(r.random(), shape, (0.5, 60.0), k);
        let s = r.random_range(1.0..64.0);
        let reduction = [Reduction::Mean, Reduction::Sum][r.random_range(0..2)];
        let margins: Vec<f64> = (0..shape.b).map(|_| r.random_range(0.0..0.8)).collect();
        let (spec, inputs) = match kind {
            0 => (
                MarginLoss::subcenter(k).margins(
                    1.0,
                    r.random_range(0.0..0.8),
                    r.random_range(0.0..0.4),
                ),
                RowInputs::default(),
            ),
            1 => (
                MarginLoss::adaface().variant(Variant::AdaFace(AdaFace {
                    m: r.random_range(0.0..0.8),
                    h: r.random_range(0.0..1.0),
                    alpha: r.random_range(0.0..1.0),
                })),
                RowInputs::with_state(LossState::AdaFace {
                    mean: r.random_range(0.0..50.0),
                    std: r.random_range(0.0..100.0),
                }),
            ),
            2 => (
                MarginLoss::curricularface()
                    .margins(1.0, r.random_range(0.0..0.8), 0.0)
                    .variant(Variant::CurricularFace(CurricularFace {
                        alpha: r.random_range(0.0..1.0),
                    })),
                RowInputs::with_state(LossState::CurricularFace {
                    t: r.random_range(-0.5..1.0),
                }),
            ),
            3 => {
                let l_a = r.random_range(1.0..20.0);
                let l_m = r.random_range(0.0..0.6);
                (
                    MarginLoss::magface().variant(Variant::MagFace(MagFace {
                        l_a,
                        u_a: l_a + r.random_range(1.0..100.0),
                        l_m,
                        u_m: l_m + r.random_range(0.0..0.4),
                        lambda_g: r.random_range(0.0..40.0),
                    })),
                    RowInputs::default(),
                )
            }
            4 => (
                MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::Rank),
                RowInputs::with_margins(ElasticMargins::Given(&margins)),
            ),
            _ => (
                MarginLoss::elasticface(ElasticKind::Cos, ElasticPlus::Published),
                RowInputs::with_margins(ElasticMargins::Seeded(ElasticRng {
                    seed: r.random(),
                    step: r.random(),
                    row_offset: r.random_range(0..1000),
                })),
            ),
        };
        let spec = spec.scale(s).reduction(reduction);
        let what = format!("case {case_no}: {spec:?}");
        let f = cpu::forward_with(&spec, &c.x, &c.w, &c.labels, shape, &inputs).unwrap();
        let g = cpu::backward(&spec, &f, &c.x, &c.w, &c.labels, shape, Upstream::ONE).unwrap();
        assert!(
            f.loss.is_finite() && f.loss >= 0.0,
            "{what}: loss {}",
            f.loss
        );
        assert!(
            f.row_loss.iter().all(|l| l.is_finite() && *l >= 0.0),
            "{what}"
        );
        let total: f64 = f.row_loss.iter().sum();
        let want = match reduction {
            Reduction::Mean => total / f.counted.max(1) as f64,
            _ => total,
        };
        assert!(
            (f.loss - want).abs() <= 1e-12 * want.abs().max(1.0),
            "{what}"
        );
        assert!(g.dx.iter().chain(&g.dw).all(|v| v.is_finite()), "{what}");
        assert_eq!(g.dw.len(), shape.c * k * shape.d, "{what}");
        match f.state {
            Some(LossState::AdaFace { mean, std }) => {
                assert!(mean.is_finite() && std.is_finite() && std >= 0.0, "{what}")
            }
            Some(LossState::CurricularFace { t }) => assert!(t.is_finite(), "{what}"),
            None => {}
        }
        let d = shape.d;
        let orth = |v: &[f64], g: &[f64]| {
            let u = unit(v);
            let p: f64 = u.iter().zip(g).map(|(a, b)| a * b).sum();
            p.abs() <= 1e-9 * norm(g).max(1e-300)
        };
        if kind != 3 {
            for i in 0..shape.b {
                let (xi, gi) = (&c.x[i * d..(i + 1) * d], &g.dx[i * d..(i + 1) * d]);
                assert!(orth(xi, gi), "{what}: dx row {i} along x");
            }
        }
        for j in 0..shape.c * k {
            let (wj, gj) = (&c.w[j * d..(j + 1) * d], &g.dw[j * d..(j + 1) * d]);
            assert!(orth(wj, gj), "{what}: dw row {j} along w");
        }
    }
}
