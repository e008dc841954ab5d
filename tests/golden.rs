//! Known values in `tests/data/golden/*.json`, computed by an independent float64 implementation
//! of docs/MATH.md (automatic differentiation, not this crate's code).
use fused_margin::{
    cpu, AdaFace, CurricularFace, ElasticFace, ElasticKind, ElasticMargins, ElasticPlus,
    ElasticRng, GradientMode, LossState, MagFace, MarginLoss, OverflowPolicy, Reduction, RowInputs,
    Shape, Upstream, Variant,
};
use serde_json::Value;

mod common;
use common::rel;

fn spec_of(v: &Value) -> MarginLoss {
    let s = &v["spec"];
    let f = |k: &str| s[k].as_f64().unwrap();
    let (m1, m2, m3) = match s["loss"].as_str() {
        // Those three set their margins per row: the spec's stay neutral.
        Some("adaface" | "magface" | "elasticface") => (1.0, 0.0, 0.0),
        _ => (f("m1"), f("m2"), f("m3")),
    };
    let variant = match s["loss"].as_str() {
        None => Variant::Plain,
        Some("subcenter") => Variant::SubCenter {
            k: s["K"].as_u64().unwrap() as usize,
        },
        Some("adaface") => Variant::AdaFace(AdaFace {
            m: f("m"),
            h: f("h"),
            alpha: f("t_alpha"),
        }),
        Some("curricularface") => Variant::CurricularFace(CurricularFace { alpha: f("alpha") }),
        Some("magface") => Variant::MagFace(MagFace {
            l_a: f("l_a"),
            u_a: f("u_a"),
            l_m: f("l_m"),
            u_m: f("u_m"),
            lambda_g: f("lambda_g"),
        }),
        Some("elasticface") => Variant::ElasticFace(ElasticFace {
            kind: match s["variant"].as_str().unwrap() {
                "arc" => ElasticKind::Arc,
                "cos" => ElasticKind::Cos,
                k => panic!("unknown ElasticFace variant {k}"),
            },
            m: f("m"),
            sigma: f("std"),
            plus: match s["plus"].as_str().unwrap() {
                "none" => ElasticPlus::None,
                "rank" => ElasticPlus::Rank,
                "published" => ElasticPlus::Published,
                p => panic!("unknown plus {p}"),
            },
        }),
        Some(l) => panic!("unknown loss {l}"),
    };
    MarginLoss::combined(m1, m2, m3)
        .scale(f("s"))
        .normalize_features(s["normalize_features"].as_bool().unwrap())
        .normalize_weights(s["normalize_weights"].as_bool().unwrap())
        .policy(match s["policy"].as_str().unwrap() {
            "monotonic" => OverflowPolicy::Monotonic,
            "fallback" => OverflowPolicy::Fallback,
            "raw" => OverflowPolicy::Raw,
            "easy" => OverflowPolicy::Easy,
            "clip" => OverflowPolicy::Clip,
            p => panic!("unknown policy {p}"),
        })
        .gradient(match s["gradient"].as_str().unwrap() {
            "full" => GradientMode::Full,
            "detached" => GradientMode::Detached,
            g => panic!("unknown gradient {g}"),
        })
        .lambda(s["lam"].as_f64().unwrap_or(0.0))
        .reduction(match s["reduction"].as_str().unwrap() {
            "mean" => Reduction::Mean,
            "sum" => Reduction::Sum,
            "none" => Reduction::None,
            r => panic!("unknown reduction {r}"),
        })
        .variant(variant)
}

/// The state in of a golden case (AdaFace's mean and std, CurricularFace's t).
fn state_of(v: &Value) -> Option<LossState> {
    let s = &v["state_in"];
    if s.is_null() {
        None
    } else if let Some(t) = s["t"].as_f64() {
        Some(LossState::CurricularFace { t })
    } else {
        Some(LossState::AdaFace {
            mean: s["mean"].as_f64().unwrap(),
            std: s["std"].as_f64().unwrap(),
        })
    }
}

/// The state out a golden case expects, as the same type.
fn state_expected(v: &Value, like: Option<LossState>) -> Option<LossState> {
    let s = &v["expected"]["state"];
    match like {
        None => {
            assert!(s.is_null());
            None
        }
        Some(LossState::CurricularFace { .. }) => Some(LossState::CurricularFace {
            t: s["t"].as_f64().unwrap(),
        }),
        Some(LossState::AdaFace { .. }) => Some(LossState::AdaFace {
            mean: s["mean"].as_f64().unwrap(),
            std: s["std"].as_f64().unwrap(),
        }),
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1e-3)
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_f64().unwrap())
        .collect()
}

fn check(name: &str, json: &str) {
    let v: Value = serde_json::from_str(json).unwrap();
    let spec = spec_of(&v);
    let shape = Shape::new(
        v["B"].as_u64().unwrap() as usize,
        v["D"].as_u64().unwrap() as usize,
        v["C"].as_u64().unwrap() as usize,
    );
    let x = floats(&v["x"]);
    let w = floats(&v["w"]);
    let labels: Vec<i32> = v["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_i64().unwrap() as i32)
        .collect();
    let e = &v["expected"];
    let margins_in = (!v["margins_in"].is_null()).then(|| floats(&v["margins_in"]));
    let rng = &v["spec"]["rng"];
    let inputs = RowInputs {
        state: state_of(&v),
        margins: match (&margins_in, rng.is_null()) {
            (Some(m), _) => Some(ElasticMargins::Given(m)),
            (None, false) => Some(ElasticMargins::Seeded(ElasticRng {
                seed: rng["seed"].as_u64().unwrap(),
                step: rng["step"].as_u64().unwrap(),
                row_offset: rng["row_offset"].as_u64().unwrap(),
            })),
            (None, true) => None,
        },
    };
    let fwd = cpu::forward_with(&spec, &x, &w, &labels, shape, &inputs).unwrap();
    check_rows(name, &v, &spec, &fwd, &inputs);
    let row_loss = floats(&e["row_loss"]);
    assert!(
        rel(&fwd.row_loss, &row_loss) < 1e-9,
        "{name}: row_loss {:?} vs {:?}",
        fwd.row_loss,
        row_loss
    );
    if spec.reduction == Reduction::None {
        assert!(
            rel(&fwd.row_loss, &floats(&e["loss"])) < 1e-9,
            "{name}: loss"
        );
    } else {
        let l = e["loss"].as_f64().unwrap();
        assert!(
            (fwd.loss - l).abs() <= 1e-9 * l.abs().max(1e-300),
            "{name}: loss {} vs {l}",
            fwd.loss
        );
    }
    let lse = floats(&e["lse"]);
    for (i, &y) in labels.iter().enumerate() {
        if y >= 0 {
            assert!(
                (fwd.lse[i] - lse[i]).abs() < 1e-9 * lse[i].abs().max(1.0),
                "{name}: lse[{i}]"
            );
        }
    }
    let up_vals;
    let up = if v["upstream"].is_null() {
        Upstream::ONE
    } else {
        up_vals = floats(&v["upstream"]);
        Upstream::PerRow(&up_vals)
    };
    let g = cpu::backward(&spec, &fwd, &x, &w, &labels, shape, up).unwrap();
    let (dx, dw) = (floats(&e["dx"]), floats(&e["dw"]));
    assert!(rel(&g.dx, &dx) < 1e-9, "{name}: dx rel {}", rel(&g.dx, &dx));
    assert!(rel(&g.dw, &dw) < 1e-9, "{name}: dw rel {}", rel(&g.dw, &dw));
}

/// The state out and the per-row values a stateful case records (`expected.row`, `expected.rng`).
fn check_rows(name: &str, v: &Value, spec: &MarginLoss, fwd: &cpu::Forward, inputs: &RowInputs) {
    let want = state_expected(v, inputs.state);
    match (fwd.state, want) {
        (None, None) => {}
        (Some(LossState::AdaFace { mean, std }), Some(LossState::AdaFace { mean: m, std: s })) => {
            assert!(
                close(mean, m) && close(std, s),
                "{name}: state {:?} vs {want:?}",
                fwd.state
            )
        }
        (Some(LossState::CurricularFace { t }), Some(LossState::CurricularFace { t: u })) => {
            assert!(close(t, u), "{name}: t {t} vs {u}")
        }
        (got, want) => panic!("{name}: state {got:?}, expected {want:?}"),
    }
    // The generator's words and normal values, row by row (global row numbers).
    if let Some(ElasticMargins::Seeded(rng)) = inputs.margins {
        for (i, r) in v["expected"]["rng"].as_array().unwrap().iter().enumerate() {
            let g = r["row"].as_u64().unwrap();
            assert_eq!(g, rng.row_offset + i as u64, "{name}: rng row {i}");
            let hex = |k: &str| u64::from_str_radix(&r[k].as_str().unwrap()[2..], 16).unwrap();
            assert_eq!(
                rng.words(g),
                (hex("h0"), hex("h1")),
                "{name}: rng words of row {g}"
            );
            let n = r["normal"].as_f64().unwrap();
            assert!(close(rng.normal(i), n), "{name}: normal of row {g}");
        }
    }
    let row = &v["expected"]["row"];
    let all = |got: &[f64], key: &str| {
        let want = floats(&row[key]);
        assert_eq!(got.len(), want.len(), "{name}: {key} length");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(close(*g, *w), "{name}: {key}[{i}] {g} vs {w}");
        }
    };
    match spec.variant {
        Variant::AdaFace(_) => {
            all(&fwd.rows.m2, "m2");
            all(&fwd.rows.m3, "m3");
        }
        Variant::MagFace(_) => all(&fwd.rows.m2, "m2"),
        Variant::ElasticFace(e) => {
            let m = match e.kind {
                ElasticKind::Arc => &fwd.rows.m2,
                ElasticKind::Cos => &fwd.rows.m3,
            };
            all(m, "margin");
        }
        Variant::CurricularFace(_) => {
            let labels = v["labels"].as_array().unwrap();
            let tau = floats(&row["tau"]);
            let hard: Vec<usize> = row["hard"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h.as_u64().unwrap() as usize)
                .collect();
            for (i, l) in labels.iter().enumerate() {
                if l.as_i64().unwrap() >= 0 {
                    assert!(close(fwd.rows.tau[i], tau[i]), "{name}: tau[{i}]");
                    assert_eq!(fwd.rows.hard[i], hard[i], "{name}: hard[{i}]");
                }
            }
        }
        _ => {}
    }
}

macro_rules! golden {
    // Embedded at compile time, so the test binary also runs where the sources are not (GPU bundle).
    ($($t:ident => $n:literal),* $(,)?) => { $( #[test] fn $t() {
        check($n, include_str!(concat!("data/golden/", $n, ".json")));
    } )* };
}

golden! {
    all_ignored => "all_ignored",
    arcface_detached => "arcface_detached",
    arcface_easy => "arcface_easy",
    arcface_fallback => "arcface_fallback",
    arcface_monotonic => "arcface_monotonic",
    arcface_none => "arcface_none",
    arcface_raw => "arcface_raw",
    arcface_sum => "arcface_sum",
    combined => "combined",
    cosface => "cosface",
    cosface_easy => "cosface_easy",
    nsl => "nsl",
    plain_softmax => "plain_softmax",
    sphereface_detached => "sphereface_detached",
    sphereface_m1_7_normalized => "sphereface_m1.7_normalized",
    sphereface_m4_lambda5 => "sphereface_m4_lambda5",
    sphereface_m4_nolambda => "sphereface_m4_nolambda",
    subcenter_k3_arcface => "subcenter_k3_arcface",
    subcenter_k2_cosface => "subcenter_k2_cosface",
    subcenter_k3_insightface_raw => "subcenter_k3_insightface_raw",
    adaface_default => "adaface_default",
    adaface_midtrain => "adaface_midtrain",
    adaface_h0 => "adaface_h0",
    adaface_cvlface_detached_raw => "adaface_cvlface_detached_raw",
    curricularface_first_step => "curricularface_first_step",
    curricularface_t05 => "curricularface_t05",
    curricularface_cosface_none => "curricularface_cosface_none",
    magface_default => "magface_default",
    magface_clamped => "magface_clamped",
    magface_fallback_lambda35 => "magface_fallback_lambda35",
    elasticface_arc_given_margins => "elasticface_arc_given_margins",
    elasticface_cos_seeded => "elasticface_cos_seeded",
    elasticface_arc_plus_rank_seeded => "elasticface_arc_plus_rank_seeded",
    elasticface_cos_plus_published => "elasticface_cos_plus_published",
}
