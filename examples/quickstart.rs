//! Quickstart: train a small embedding model with a margin loss (ArcFace by default) on a
//! synthetic dataset, on the GPU when one is present, else on the CPU.
//!
//! ```text
//! cargo run --release --example quickstart [-- --help]
//! ```
//!
//! The data: `classes` clusters of `per-class` points in `D_IN = 64` dimensions (seeded Gaussian
//! centers plus Gaussian noise); 4 points of every class are held out. The model: a linear map
//! `W_e` from 64 to `D = 32` dimensions and one weight row per class, both learned with Adam
//! through the chosen loss. The loss and its gradients come from the crate (CPU reference or
//! fused GPU kernels); the gradient on the embeddings is chained back through the linear map by
//! hand. Held-out accuracy: the predicted class is the class weight with the highest cosine. The
//! verification figure at the end: accuracy and the mean angle between a held-out embedding and
//! its own class weight, before and after training.

use fused_margin::{MarginLoss, Shape, SphereFaceSchedule};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

#[path = "common/train.rs"]
mod train;
use train::{Adam, DeviceChoice, InputDType, Split};

/// Input dimension of the synthetic data.
const D_IN: usize = 64;
/// Embedding dimension.
const D: usize = 32;
/// Points of every class held out for the accuracy.
const HELD_OUT: usize = 4;
/// Mini-batch size.
const BATCH: usize = 256;
/// Per-coordinate noise around the class centers (the centers are standard normal); large
/// enough that classes overlap in places and the task is not solved by the first step.
const NOISE: f64 = 1.5;

const USAGE: &str = "usage: quickstart [options]
  --loss NAME      arcface (default) | cosface | sphereface | nsl | combined
  --m1 X --m2 X --m3 X
                   margins of cos(m1*theta + m2) - m3 (default: the preset's)
  --scale S        scale s (default 30; sphereface: 1 with the feature norm, as the paper)
  --classes N      number of classes (default 300)
  --per-class N    points per class, 4 of them held out (default 20)
  --epochs N       epochs (default 20)
  --seed N         data and initialization seed (default 42)
  --device D       auto (default: the GPU when present) | cpu | gpu
  --dtype T        f32 (default) | f16 | bf16: the element type the loss sees
  -h, --help       this text";

/// Command-line options.
struct Args {
    loss: String,
    m: [Option<f64>; 3],
    scale: Option<f64>,
    classes: usize,
    per_class: usize,
    epochs: usize,
    seed: u64,
    device: DeviceChoice,
    dtype: InputDType,
}

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("{msg}\n");
    }
    eprintln!("{USAGE}");
    std::process::exit(if msg.is_empty() { 0 } else { 2 })
}

fn parse_args() -> Args {
    let mut a = Args {
        loss: "arcface".into(),
        m: [None; 3],
        scale: None,
        classes: 300,
        per_class: 20,
        epochs: 20,
        seed: 42,
        device: DeviceChoice::Auto,
        dtype: InputDType::F32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            usage("");
        }
        let v = it
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let num = |v: &str| -> f64 {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{flag} needs a number, got {v}")))
        };
        match flag.as_str() {
            "--loss" => a.loss = v,
            "--m1" => a.m[0] = Some(num(&v)),
            "--m2" => a.m[1] = Some(num(&v)),
            "--m3" => a.m[2] = Some(num(&v)),
            "--scale" => a.scale = Some(num(&v)),
            "--classes" => a.classes = (num(&v) as usize).max(2),
            "--per-class" => a.per_class = (num(&v) as usize).max(HELD_OUT + 1),
            "--epochs" => a.epochs = (num(&v) as usize).max(1),
            "--seed" => a.seed = num(&v) as u64,
            "--device" => {
                a.device = DeviceChoice::parse(&v)
                    .unwrap_or_else(|| usage("--device needs auto, cpu or gpu"))
            }
            "--dtype" => {
                a.dtype =
                    InputDType::parse(&v).unwrap_or_else(|| usage("--dtype needs f32, f16 or bf16"))
            }
            other => usage(&format!("unknown option {other}")),
        }
    }
    a
}

/// The preset named by `--loss`, with `--m*` and `--scale` applied; validated.
fn spec_of(a: &Args) -> MarginLoss {
    let mut spec = match a.loss.as_str() {
        "arcface" => MarginLoss::arcface(0.5).scale(30.0),
        "cosface" => MarginLoss::cosface(0.35).scale(30.0),
        "sphereface" => MarginLoss::sphereface(4.0),
        "nsl" => MarginLoss::nsl(30.0),
        "combined" => MarginLoss::combined(1.0, 0.3, 0.2).scale(30.0),
        other => usage(&format!("unknown loss {other}")),
    };
    let [m1, m2, m3] = a.m;
    spec = spec.margins(
        m1.unwrap_or(spec.m1),
        m2.unwrap_or(spec.m2),
        m3.unwrap_or(spec.m3),
    );
    if let Some(s) = a.scale {
        spec = spec.scale(s);
    }
    if let Err(e) = spec.validate() {
        usage(&e.to_string());
    }
    spec
}

/// `emb = x W_e^T` for a batch: `x` is `n x D_IN`, `we` is `D x D_IN`, the result `n x D`.
fn embed(x: &[f32], we: &[f32]) -> Vec<f32> {
    x.chunks_exact(D_IN)
        .flat_map(|xi| {
            we.chunks_exact(D_IN)
                .map(move |wr| xi.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>())
        })
        .collect()
}

/// Held-out accuracy (%) and the mean angle (degrees) between each held-out embedding and its
/// own class weight.
fn evaluate(test: &Split, we: &[f32], w: &[f32]) -> (f64, f64) {
    let emb = embed(&test.x, we);
    let (mut correct, mut angle) = (0usize, 0.0f64);
    for (e, &y) in emb.chunks_exact(D).zip(&test.y) {
        let cos: Vec<f64> = w.chunks_exact(D).map(|wj| train::cosine(e, wj)).collect();
        let best = (0..cos.len())
            .max_by(|&i, &j| cos[i].total_cmp(&cos[j]))
            .unwrap_or(0);
        correct += (best == y as usize) as usize;
        angle += cos[y as usize].clamp(-1.0, 1.0).acos().to_degrees();
    }
    let n = test.y.len() as f64;
    (100.0 * correct as f64 / n, angle / n)
}

fn main() -> fused_margin::Result<()> {
    let args = parse_args();
    let spec0 = spec_of(&args);
    let mut rng = StdRng::seed_from_u64(args.seed);
    let (train, test) = train::clusters(
        &mut rng,
        args.classes,
        args.per_class,
        HELD_OUT,
        D_IN,
        NOISE,
    );
    let n = train.y.len();
    let c = args.classes;

    // Parameters: the linear map (D x D_IN, scaled so embeddings start with unit-ish variance)
    // and the class weights (C x D).
    let mut we: Vec<f32> = (0..D * D_IN)
        .map(|_| (train::normal(&mut rng) / (D_IN as f64).sqrt()) as f32)
        .collect();
    let mut w: Vec<f32> = (0..c * D).map(|_| train::normal(&mut rng) as f32).collect();
    let mut opt_we = Adam::new(we.len(), 2e-2);
    let mut opt_w = Adam::new(w.len(), 2e-2);

    let (backend, device) = train::Backend::choose(args.device)?;
    println!("device: {device}");
    println!(
        "{} (m1 = {}, m2 = {}, m3 = {}, s = {}{}) on {c} classes x {} points (D_in = {D_IN} -> D = {D}), {} train / {} held out, batch {BATCH}, Adam, {:?} inputs",
        args.loss,
        spec0.m1,
        spec0.m2,
        spec0.m3,
        spec0.s,
        if spec0.normalize_features { "" } else { " x |x|" },
        args.per_class,
        n,
        test.y.len(),
        args.dtype
    );
    let (acc0, angle0) = evaluate(&test, &we, &w);
    // SphereFace trains with its original annealing: the target starts as the plain cosine and
    // the margin fades in (lambda from 1000 down to 5).
    let schedule = (args.loss == "sphereface").then(SphereFaceSchedule::default);

    let batches = n.div_ceil(BATCH);
    let bar = ProgressBar::new((args.epochs * batches) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} batches, epoch {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let mut order: Vec<usize> = (0..n).collect();
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    let mut iter = 0u64;
    for epoch in 1..=args.epochs {
        order.shuffle(&mut rng);
        let (mut sum, mut rows) = (0.0, 0usize);
        for batch in order.chunks(BATCH) {
            let b = batch.len();
            let xb: Vec<f32> = batch
                .iter()
                .flat_map(|&i| train.x[i * D_IN..(i + 1) * D_IN].iter().copied())
                .collect();
            let yb: Vec<i32> = batch.iter().map(|&i| train.y[i]).collect();
            let emb = embed(&xb, &we);
            let spec = match &schedule {
                Some(s) => spec0.lambda(s.lambda_at(iter)?),
                None => spec0,
            };
            let out = train::loss_and_grads(
                &backend,
                args.dtype,
                &spec,
                &emb,
                &w,
                &yb,
                Shape::new(b, D, c),
            )?;
            // Chain rule through emb = x W_e^T: dW_e = d_emb^T x (D x D_IN).
            let mut d_we = vec![0.0f32; D * D_IN];
            for (de, xi) in out.d_emb.chunks_exact(D).zip(xb.chunks_exact(D_IN)) {
                for (row, &g) in d_we.chunks_exact_mut(D_IN).zip(de) {
                    for (a, &xv) in row.iter_mut().zip(xi) {
                        *a += g * xv;
                    }
                }
            }
            opt_we.step(&mut we, &d_we);
            opt_w.step(&mut w, &out.d_w);
            sum += out.loss * b as f64;
            rows += b;
            iter += 1;
            bar.set_message(format!("{epoch}/{}", args.epochs));
            bar.inc(1);
        }
        let epoch_loss = sum / rows as f64;
        if epoch == 1 {
            first = epoch_loss;
        }
        last = epoch_loss;
        let (acc, _) = evaluate(&test, &we, &w);
        let line = format!("epoch {epoch:>3}: loss {epoch_loss:8.4}, held-out accuracy {acc:5.1}%");
        // A hidden bar (output not a terminal) drops println: print plainly then.
        if bar.is_hidden() {
            println!("{line}");
        } else {
            bar.println(line);
        }
    }
    bar.finish_and_clear();
    let (acc1, angle1) = evaluate(&test, &we, &w);
    println!("({:.1} s)", started.elapsed().as_secs_f64());
    println!("verification (held-out):  before training   after training");
    println!("  accuracy                {acc0:14.1}%  {acc1:14.1}%");
    println!("  mean target angle       {angle0:13.1} deg  {angle1:12.1} deg");
    println!(
        "first loss {first:.4}, last loss {last:.4}, accuracy {acc1:.1}% (held-out, {c} classes, chance {:.2}%)",
        100.0 / c as f64
    );
    Ok(())
}
