//! The papers' picture: 2-D features of a few classes, with the angular margins each loss opens.
//!
//! ```text
//! cargo run --release --features plots --example boundaries [-- --out docs/boundaries.png --epochs N --device auto|cpu|gpu]
//! ```
//!
//! A small MLP (8 -> 32, tanh, -> 2) maps seeded clustered Gaussians of 8 classes to 2-D
//! features; its class weights are 8 vectors in the plane (3 per class for sub-center). It is
//! trained ten times from the same initialization, once per loss: plain softmax (no
//! normalization, no margin), NSL (s = 16), SphereFace (m = 4; with normalized features and
//! s = 16, which trains this small model in a few seconds where the original feature-norm scaling
//! needs its long lambda annealing), CosFace (m = 0.35, s = 16), ArcFace (m = 0.5, s = 16), and
//! the losses with state at s = 16 with their defaults: sub-center ArcFace (K = 3), AdaFace,
//! CurricularFace, MagFace (its norm clamp starts at 10, far above these features' norms, so its
//! margin stays at l_m = 0.45) and ElasticFace-Arc (margins drawn per step). The losses the GPU
//! plans do not run yet train on the CPU reference. Each run is one panel of a PNG (five a row):
//! held-out features as points coloured by class (raw in the plane for softmax, which keeps the
//! feature norm; on the unit circle, with a little radial spread, for the normalized losses,
//! whose decisions depend on the angle alone) and class weight directions as rays. Margins show as
//! empty wedges between the classes.
//!
//! The printed summary measures them: for each pair of neighbouring classes (by mean feature
//! angle), the angular gap between the 2.5 % / 97.5 % angular quantiles of the two classes'
//! held-out features; "mean gap" averages the 8 pairs (negative: the classes overlap). Panel
//! titles need a TrueType font: DejaVu Sans is used when it is found; otherwise the panels have
//! no titles and the summary names them in order.

use fused_margin::{ElasticKind, ElasticPlus, MarginLoss, Shape};
use plotters::prelude::*;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use std::f64::consts::PI;

#[path = "common/train.rs"]
mod train;
use train::{Adam, Backend, DeviceChoice, InputDType, Split};

const CLASSES: usize = 8;
const D_IN: usize = 8;
const HIDDEN: usize = 32;
const PER_CLASS: usize = 300;
const HELD_OUT: usize = 60;
const BATCH: usize = 128;
const NOISE: f64 = 0.55;

/// The MLP: h = tanh(W1 x + b1), e = W2 h + b2 (2-D features), and the class weights (C x 2).
#[derive(Clone)]
struct Model {
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
    /// Class weights, `k` rows per class (sub-centers), class-major.
    w: Vec<f32>,
    k: usize,
}

impl Model {
    fn new(rng: &mut StdRng, k: usize) -> Self {
        let mut g = |n: usize, scale: f64| -> Vec<f32> {
            (0..n)
                .map(|_| (train::normal(rng) * scale) as f32)
                .collect()
        };
        Self {
            w1: g(HIDDEN * D_IN, 1.0 / (D_IN as f64).sqrt()),
            b1: vec![0.0; HIDDEN],
            w2: g(2 * HIDDEN, 1.0 / (HIDDEN as f64).sqrt()),
            b2: vec![0.0; 2],
            w: g(CLASSES * k * 2, 1.0),
            k,
        }
    }

    /// Hidden activations and features of a batch.
    fn forward(&self, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let n = x.len() / D_IN;
        let mut h = vec![0.0f32; n * HIDDEN];
        let mut e = vec![0.0f32; n * 2];
        for i in 0..n {
            let xi = &x[i * D_IN..(i + 1) * D_IN];
            for k in 0..HIDDEN {
                let wk = &self.w1[k * D_IN..(k + 1) * D_IN];
                let s: f32 = wk.iter().zip(xi).map(|(a, b)| a * b).sum::<f32>() + self.b1[k];
                h[i * HIDDEN + k] = s.tanh();
            }
            for o in 0..2 {
                let wo = &self.w2[o * HIDDEN..(o + 1) * HIDDEN];
                let hi = &h[i * HIDDEN..(i + 1) * HIDDEN];
                e[i * 2 + o] = wo.iter().zip(hi).map(|(a, b)| a * b).sum::<f32>() + self.b2[o];
            }
        }
        (h, e)
    }
}

/// One loss to train and draw.
struct Run {
    name: &'static str,
    spec: MarginLoss,
    /// Draw features on the unit circle (normalized losses) instead of raw in the plane.
    on_circle: bool,
}

fn runs() -> Vec<Run> {
    vec![
        Run {
            name: "softmax",
            spec: MarginLoss::nsl(1.0)
                .normalize_features(false)
                .normalize_weights(false),
            on_circle: false,
        },
        Run {
            name: "NSL (s=16)",
            spec: MarginLoss::nsl(16.0),
            on_circle: true,
        },
        Run {
            name: "SphereFace (m=4, s=16)",
            spec: MarginLoss::sphereface(4.0)
                .normalize_features(true)
                .scale(16.0),
            on_circle: true,
        },
        Run {
            name: "CosFace (m=0.35, s=16)",
            spec: MarginLoss::cosface(0.35).scale(16.0),
            on_circle: true,
        },
        Run {
            name: "ArcFace (m=0.5, s=16)",
            spec: MarginLoss::arcface(0.5).scale(16.0),
            on_circle: true,
        },
        Run {
            name: "sub-center (K=3, m=0.5)",
            spec: MarginLoss::subcenter(3).scale(16.0),
            on_circle: true,
        },
        Run {
            name: "AdaFace (m=0.4, h=0.333)",
            spec: MarginLoss::adaface().scale(16.0),
            on_circle: true,
        },
        Run {
            name: "CurricularFace (m=0.5)",
            spec: MarginLoss::curricularface().scale(16.0),
            on_circle: true,
        },
        Run {
            name: "MagFace (m 0.45-0.8)",
            spec: MarginLoss::magface().scale(16.0),
            on_circle: true,
        },
        Run {
            name: "ElasticFace-Arc (m=0.5)",
            spec: MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::None).scale(16.0),
            on_circle: true,
        },
    ]
}

struct Opts {
    out: String,
    epochs: usize,
    device: DeviceChoice,
}

fn opts() -> Opts {
    let mut o = Opts {
        out: "docs/boundaries.png".into(),
        epochs: 150,
        device: DeviceChoice::Auto,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let usage = "usage: boundaries [--out FILE.png] [--epochs N] [--device auto|cpu|gpu]";
        if a == "-h" || a == "--help" {
            println!("{usage}");
            std::process::exit(0);
        }
        let v = it.next().unwrap_or_else(|| {
            eprintln!("{a} needs a value\n{usage}");
            std::process::exit(2)
        });
        match a.as_str() {
            "--out" => o.out = v,
            "--epochs" => o.epochs = v.parse().unwrap_or(o.epochs).max(1),
            "--device" => {
                o.device = DeviceChoice::parse(&v).unwrap_or_else(|| {
                    eprintln!("--device needs auto, cpu or gpu");
                    std::process::exit(2)
                })
            }
            _ => {
                eprintln!("unknown option {a}\n{usage}");
                std::process::exit(2)
            }
        }
    }
    o
}

/// Trains `model` with `spec`.
fn fit(
    backend: &Backend,
    spec: &MarginLoss,
    model: &mut Model,
    data: &Split,
    epochs: usize,
    rng: &mut StdRng,
) -> fused_margin::Result<()> {
    let mut opt = [
        Adam::new(model.w1.len(), 1e-2),
        Adam::new(model.b1.len(), 1e-2),
        Adam::new(model.w2.len(), 1e-2),
        Adam::new(model.b2.len(), 1e-2),
        Adam::new(model.w.len(), 1e-2),
    ];
    let n = data.y.len();
    let mut order: Vec<usize> = (0..n).collect();
    // The state a loss carries from step to step, and the step counter ElasticFace draws from.
    let mut state = spec.variant.initial_state();
    let mut step = 0u64;
    for _ in 0..epochs {
        order.shuffle(rng);
        for batch in order.chunks(BATCH) {
            let b = batch.len();
            let x: Vec<f32> = batch
                .iter()
                .flat_map(|&i| data.x[i * D_IN..(i + 1) * D_IN].iter().copied())
                .collect();
            let y: Vec<i32> = batch.iter().map(|&i| data.y[i]).collect();
            let (h, e) = model.forward(&x);
            let inputs = train::step_inputs(spec, state, 11, step);
            let g = train::loss_and_grads(
                backend,
                InputDType::F32,
                spec,
                &e,
                &model.w,
                &y,
                Shape::new(b, 2, CLASSES),
                &inputs,
            )?;
            state = g.state;
            step += 1;
            // Back through e = W2 h + b2 and h = tanh(W1 x + b1).
            let (mut dw1, mut db1) = (vec![0.0f32; HIDDEN * D_IN], vec![0.0f32; HIDDEN]);
            let (mut dw2, mut db2) = (vec![0.0f32; 2 * HIDDEN], vec![0.0f32; 2]);
            for i in 0..b {
                let de = &g.d_emb[i * 2..i * 2 + 2];
                let hi = &h[i * HIDDEN..(i + 1) * HIDDEN];
                let xi = &x[i * D_IN..(i + 1) * D_IN];
                for o in 0..2 {
                    db2[o] += de[o];
                    for k in 0..HIDDEN {
                        dw2[o * HIDDEN + k] += de[o] * hi[k];
                    }
                }
                for k in 0..HIDDEN {
                    let dh = (model.w2[k] * de[0] + model.w2[HIDDEN + k] * de[1])
                        * (1.0 - hi[k] * hi[k]);
                    db1[k] += dh;
                    for (d, &xv) in dw1[k * D_IN..(k + 1) * D_IN].iter_mut().zip(xi) {
                        *d += dh * xv;
                    }
                }
            }
            opt[0].step(&mut model.w1, &dw1);
            opt[1].step(&mut model.b1, &db1);
            opt[2].step(&mut model.w2, &dw2);
            opt[3].step(&mut model.b2, &db2);
            opt[4].step(&mut model.w, &g.d_w);
        }
    }
    Ok(())
}

/// Angle of a 2-D point in [0, 2 pi).
fn angle(p: &[f32]) -> f64 {
    (p[1] as f64).atan2(p[0] as f64).rem_euclid(2.0 * PI)
}

/// Wraps an angle difference to (-pi, pi].
fn wrap(a: f64) -> f64 {
    let r = a.rem_euclid(2.0 * PI);
    if r > PI {
        r - 2.0 * PI
    } else {
        r
    }
}

/// The cosine of feature `p` with class `j`: the nearest of its `k` sub-centers, as the loss.
fn class_cosine(model: &Model, p: &[f32], j: usize) -> f64 {
    (0..model.k)
        .map(|s| {
            let r = (j * model.k + s) * 2;
            train::cosine(p, &model.w[r..r + 2])
        })
        .fold(f64::NEG_INFINITY, f64::max)
}

/// Held-out accuracy (%, nearest class weight by cosine) and the mean angular gap (degrees)
/// between neighbouring classes (see the file's header).
fn measure(model: &Model, test: &Split) -> (f64, f64) {
    let (_, e) = model.forward(&test.x);
    let correct = e
        .chunks_exact(2)
        .zip(&test.y)
        .filter(|(p, &y)| {
            let best = (0..CLASSES)
                .max_by(|&i, &j| class_cosine(model, p, i).total_cmp(&class_cosine(model, p, j)))
                .unwrap_or(0);
            best == y as usize
        })
        .count();
    // Per class: circular mean angle and the 2.5 % / 97.5 % quantiles of the deviations from it.
    let mut arcs: Vec<(f64, f64, f64)> = (0..CLASSES)
        .map(|c| {
            let pts: Vec<f64> = e
                .chunks_exact(2)
                .zip(&test.y)
                .filter(|(_, &y)| y as usize == c)
                .map(|(p, _)| angle(p))
                .collect();
            let (s, co) = pts
                .iter()
                .fold((0.0, 0.0), |(s, co), a| (s + a.sin(), co + a.cos()));
            let mean = s.atan2(co).rem_euclid(2.0 * PI);
            let mut dev: Vec<f64> = pts.iter().map(|a| wrap(a - mean)).collect();
            dev.sort_by(|a, b| a.total_cmp(b));
            let q = |f: f64| dev[((dev.len() - 1) as f64 * f).round() as usize];
            (mean, q(0.025), q(0.975))
        })
        .collect();
    arcs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let gaps: f64 = (0..CLASSES)
        .map(|i| {
            let (ma, _, hia) = arcs[i];
            let (mb, lob, _) = arcs[(i + 1) % CLASSES];
            // From the upper edge of class a to the lower edge of the next class b, counterclockwise.
            let span = (mb - ma).rem_euclid(2.0 * PI);
            span + lob - hia
        })
        .sum();
    (
        100.0 * correct as f64 / test.y.len() as f64,
        (gaps / CLASSES as f64).to_degrees(),
    )
}

const PALETTE: [RGBColor; CLASSES] = [
    RGBColor(228, 26, 28),
    RGBColor(55, 126, 184),
    RGBColor(77, 175, 74),
    RGBColor(152, 78, 163),
    RGBColor(255, 127, 0),
    RGBColor(166, 86, 40),
    RGBColor(247, 129, 191),
    RGBColor(60, 60, 60),
];

/// Registers DejaVu Sans for the titles when it is installed; false otherwise.
fn font() -> bool {
    for path in [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ] {
        if let Ok(bytes) = std::fs::read(path) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

fn draw(
    out: &str,
    panels: &[(String, Model, bool)],
    test: &Split,
) -> Result<(), Box<dyn std::error::Error>> {
    let titles = font();
    let size = 320u32;
    // Five panels a row.
    let cols = panels.len().min(5);
    let rows = panels.len().div_ceil(cols);
    let root = BitMapBackend::new(out, (size * cols as u32, (size + 24) * rows as u32))
        .into_drawing_area();
    root.fill(&WHITE)?;
    for (area, (title, model, on_circle)) in root.split_evenly((rows, cols)).iter().zip(panels) {
        let (_, e) = model.forward(&test.x);
        let pts: Vec<(f64, f64, usize, usize)> = e
            .chunks_exact(2)
            .zip(&test.y)
            .enumerate()
            .map(|(i, (p, &y))| (p[0] as f64, p[1] as f64, y as usize, i))
            .collect();
        // Raw panels: scale to the 98th percentile norm so outliers do not shrink the picture.
        let mut norms: Vec<f64> = pts.iter().map(|p| p.0.hypot(p.1)).collect();
        norms.sort_by(|a, b| a.total_cmp(b));
        let scale = if *on_circle {
            1.0
        } else {
            norms[(norms.len() * 98) / 100].max(1e-9)
        };
        let mut builder = ChartBuilder::on(area);
        builder.margin(6);
        if titles {
            builder.caption(title.as_str(), ("sans-serif", 15));
        }
        let mut chart = builder.build_cartesian_2d(-1.45f64..1.45f64, -1.45f64..1.45f64)?;
        let circle: Vec<(f64, f64)> = (0..=200)
            .map(|k| {
                let a = 2.0 * PI * k as f64 / 200.0;
                (a.cos(), a.sin())
            })
            .collect();
        chart.draw_series(LineSeries::new(circle, BLACK.mix(0.25)))?;
        chart.draw_series(pts.iter().map(|&(x, y, c, i)| {
            let (px, py) = if *on_circle {
                // On the circle, spread radially by sample so dense arcs stay readable.
                let r = 0.82 + 0.3 * ((i * 37) % 100) as f64 / 100.0;
                let a = y.atan2(x);
                (r * a.cos(), r * a.sin())
            } else {
                (x / scale, y / scale)
            };
            Circle::new((px, py), 2, PALETTE[c].mix(0.7).filled())
        }))?;
        // Every weight row, coloured by its class (sub-centers: K rays a class).
        for (r, wc) in model.w.chunks_exact(2).enumerate() {
            let c = r / model.k;
            let (wx, wy) = (wc[0] as f64, wc[1] as f64);
            let n = wx.hypot(wy).max(1e-12);
            chart.draw_series(LineSeries::new(
                vec![(0.0, 0.0), (1.4 * wx / n, 1.4 * wy / n)],
                PALETTE[c].stroke_width(2),
            ))?;
        }
    }
    root.present()?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let o = opts();
    let (backend, device) = Backend::choose(o.device)?;
    println!("device: {device}");
    // The losses the GPU plans do not run yet train on the CPU reference.
    let started = std::time::Instant::now();
    let mut panels = Vec::new();
    let mut data_rng = StdRng::seed_from_u64(7);
    let (train_split, test) =
        train::clusters(&mut data_rng, CLASSES, PER_CLASS, HELD_OUT, D_IN, NOISE);
    for run in runs() {
        // Same initialization and batch order for every loss: only the loss differs.
        let mut rng = StdRng::seed_from_u64(11);
        let mut model = Model::new(&mut rng, run.spec.variant.centers());
        fit(
            &backend,
            &run.spec,
            &mut model,
            &train_split,
            o.epochs,
            &mut rng,
        )?;
        let (acc, gap) = measure(&model, &test);
        println!(
            "{:24} held-out accuracy {acc:5.1}%, mean inter-class angular gap {gap:6.1} deg",
            run.name
        );
        panels.push((
            format!("{}: gap {gap:.0} deg", run.name),
            model,
            run.on_circle,
        ));
    }
    if let Some(dir) = std::path::Path::new(&o.out).parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    draw(&o.out, &panels, &test)?;
    println!("wrote {} ({:.1} s)", o.out, started.elapsed().as_secs_f64());
    Ok(())
}
