//! Known values in `tests/data/golden/*.json`, computed by an independent float64 implementation
//! of docs/MATH.md (automatic differentiation, not this crate's code).
use fused_margin::{cpu, GradientMode, MarginLoss, OverflowPolicy, Reduction, Shape, Upstream};
use serde_json::Value;

mod common;
use common::rel;

fn spec_of(v: &Value) -> MarginLoss {
    let s = &v["spec"];
    let f = |k: &str| s[k].as_f64().unwrap();
    MarginLoss::combined(f("m1"), f("m2"), f("m3"))
        .scale(f("s"))
        .normalize_features(s["normalize_features"].as_bool().unwrap())
        .normalize_weights(s["normalize_weights"].as_bool().unwrap())
        .policy(match s["policy"].as_str().unwrap() {
            "monotonic" => OverflowPolicy::Monotonic,
            "fallback" => OverflowPolicy::Fallback,
            "raw" => OverflowPolicy::Raw,
            "easy" => OverflowPolicy::Easy,
            p => panic!("unknown policy {p}"),
        })
        .gradient(match s["gradient"].as_str().unwrap() {
            "full" => GradientMode::Full,
            "detached" => GradientMode::Detached,
            g => panic!("unknown gradient {g}"),
        })
        .lambda(f("lam"))
        .reduction(match s["reduction"].as_str().unwrap() {
            "mean" => Reduction::Mean,
            "sum" => Reduction::Sum,
            "none" => Reduction::None,
            r => panic!("unknown reduction {r}"),
        })
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
    let fwd = cpu::forward(&spec, &x, &w, &labels, shape).unwrap();
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
}
