//! Quickstart: train a small embedding model with ArcFace on a synthetic dataset, on the CPU.
//!
//! ```text
//! cargo run --release --example quickstart [-- --epochs N --classes N --per-class N --seed N]
//! ```
//!
//! The data: `classes` clusters of `per-class` points in `D_IN = 64` dimensions (seeded Gaussian
//! centers plus Gaussian noise); 4 points of every class are held out. The model: a linear map
//! `W_e` from 64 to `D = 32` dimensions and one weight row per class, both learned with Adam
//! (written out below) through `MarginLoss::arcface(0.5)` at scale 30. The loss and its gradients
//! come from the crate's CPU reference; the gradient on the embeddings is chained back through the
//! linear map by hand. Accuracy is measured on the held-out points: the predicted class is the
//! class weight with the highest cosine to the embedding.

use fused_margin::{cpu, MarginLoss, Shape, Upstream};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

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

/// Command-line options (`--epochs`, `--classes`, `--per-class`, `--seed`).
struct Args {
    epochs: usize,
    classes: usize,
    per_class: usize,
    seed: u64,
    device: DeviceChoice,
}

fn parse_args() -> Args {
    let mut args = Args {
        epochs: 20,
        classes: 300,
        per_class: 20,
        seed: 42,
        device: DeviceChoice::Auto,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage(&format!("{name} needs a number")))
        };
        match flag.as_str() {
            "--epochs" => args.epochs = value("--epochs"),
            "--classes" => args.classes = value("--classes").max(2),
            "--per-class" => args.per_class = value("--per-class").max(HELD_OUT + 1),
            "--seed" => args.seed = value("--seed") as u64,
            "--device" => {
                args.device = match it.next().as_deref() {
                    Some("auto") => DeviceChoice::Auto,
                    Some("cpu") => DeviceChoice::Cpu,
                    Some("gpu") => DeviceChoice::Gpu,
                    _ => usage("--device needs auto, cpu or gpu"),
                }
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown option {other}")),
        }
    }
    args
}

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("{msg}");
    }
    eprintln!(
        "usage: quickstart [--epochs N] [--classes N] [--per-class N] [--seed N] [--device auto|cpu|gpu]"
    );
    std::process::exit(if msg.is_empty() { 0 } else { 2 })
}

/// A standard normal sample (Box-Muller; keeps the example on `rand` alone).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Points (row-major, `D_IN` wide) and their labels.
struct Split {
    x: Vec<f32>,
    y: Vec<i32>,
}

/// Seeded clustered Gaussians: train and held-out splits.
fn synthetic(args: &Args, rng: &mut StdRng) -> (Split, Split) {
    let centers: Vec<f64> = (0..args.classes * D_IN).map(|_| normal(rng)).collect();
    let mut train = Split {
        x: Vec::new(),
        y: Vec::new(),
    };
    let mut test = Split {
        x: Vec::new(),
        y: Vec::new(),
    };
    for class in 0..args.classes {
        let center = &centers[class * D_IN..(class + 1) * D_IN];
        for k in 0..args.per_class {
            let split = if k < HELD_OUT { &mut test } else { &mut train };
            split
                .x
                .extend(center.iter().map(|c| (c + NOISE * normal(rng)) as f32));
            split.y.push(class as i32);
        }
    }
    (train, test)
}

/// Where the loss is computed. The seam for other backends: a CUDA variant goes here, chosen
/// when a GPU is present, and nothing else in the training loop changes.
enum Backend {
    /// The crate's f64 CPU reference on f32 inputs.
    Cpu,
    /// The fused CUDA kernels (f32 inputs, exact f32 arithmetic), on GPU 0.
    Cuda(fused_margin::cuda::FusedMarginLoss),
}

/// Which backend `--device` asks for.
#[derive(Clone, Copy, PartialEq)]
enum DeviceChoice {
    /// The GPU when one is present, else the CPU.
    Auto,
    Cpu,
    Gpu,
}

impl Backend {
    /// Picks the backend and says which device it is.
    fn choose(choice: DeviceChoice) -> fused_margin::Result<(Self, String)> {
        use fused_margin::cuda;
        if choice == DeviceChoice::Cpu
            || (choice == DeviceChoice::Auto && !cuda::device_available())
        {
            return Ok((Backend::Cpu, "CPU (f64 reference)".into()));
        }
        let stream = cuda::default_stream(0)?;
        let name = stream
            .context()
            .name()
            .unwrap_or_else(|_| "CUDA device 0".into());
        let gpu = cuda::FusedMarginLoss::new(stream)?;
        let desc = format!("GPU: {name} ({}, fused kernels)", gpu.arch());
        Ok((Backend::Cuda(gpu), desc))
    }
}

/// The loss and its gradients with respect to the embeddings and the class weights.
struct LossAndGrads {
    loss: f64,
    d_emb: Vec<f32>,
    d_w: Vec<f32>,
}

/// One forward and backward of the margin loss on a batch of embeddings (`B x D`) against the
/// class weights (`C x D`).
fn loss_and_grads(
    backend: &Backend,
    spec: &MarginLoss,
    emb: &[f32],
    w: &[f32],
    labels: &[i32],
    shape: Shape,
) -> fused_margin::Result<LossAndGrads> {
    match backend {
        Backend::Cpu => {
            let fwd = cpu::forward(spec, emb, w, labels, shape)?;
            let g = cpu::backward(spec, &fwd, emb, w, labels, shape, Upstream::ONE)?;
            Ok(LossAndGrads {
                loss: fwd.loss,
                d_emb: g.dx.iter().map(|&v| v as f32).collect(),
                d_w: g.dw.iter().map(|&v| v as f32).collect(),
            })
        }
        Backend::Cuda(gpu) => {
            use fused_margin::cuda::GpuUpstream;
            let s = gpu.stream();
            let err = |e| fused_margin::Error::Cuda {
                context: "quickstart copy".into(),
                detail: format!("{e:?}"),
            };
            let x = s.clone_htod(emb).map_err(err)?;
            let wd = s.clone_htod(w).map_err(err)?;
            let l = s.clone_htod(labels).map_err(err)?;
            let (xv, wv, lv) = (x.as_view(), wd.as_view(), l.as_view());
            let fwd = gpu.forward(spec, &xv, &wv, &lv, shape)?;
            let g = gpu.backward(spec, &fwd, &xv, &wv, &lv, GpuUpstream::ONE)?;
            Ok(LossAndGrads {
                loss: fwd.loss_host()? as f64,
                d_emb: s.clone_dtoh(&g.dx).map_err(err)?,
                d_w: s.clone_dtoh(&g.dw).map_err(err)?,
            })
        }
    }
}

/// Adam (Kingma & Ba) for one parameter tensor.
struct Adam {
    lr: f32,
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    const B1: f32 = 0.9;
    const B2: f32 = 0.999;
    const EPS: f32 = 1e-8;

    fn new(len: usize, lr: f32) -> Self {
        Self {
            lr,
            m: vec![0.0; len],
            v: vec![0.0; len],
            t: 0,
        }
    }

    fn step(&mut self, params: &mut [f32], grads: &[f32]) {
        self.t += 1;
        // Bias corrections for the zero-initialized moments.
        let c1 = 1.0 - Self::B1.powi(self.t);
        let c2 = 1.0 - Self::B2.powi(self.t);
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            *m = Self::B1 * *m + (1.0 - Self::B1) * g;
            *v = Self::B2 * *v + (1.0 - Self::B2) * g * g;
            *p -= self.lr * (*m / c1) / ((*v / c2).sqrt() + Self::EPS);
        }
    }
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

/// Held-out accuracy: the predicted class is the weight row with the highest cosine.
fn accuracy(test: &Split, we: &[f32], w: &[f32]) -> f64 {
    let emb = embed(&test.x, we);
    let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
    let w_norm: Vec<f32> = w.chunks_exact(D).map(norm).collect();
    let correct = emb
        .chunks_exact(D)
        .zip(&test.y)
        .filter(|(e, &y)| {
            let (best, _) = w.chunks_exact(D).zip(&w_norm).enumerate().fold(
                (0, f32::NEG_INFINITY),
                |(bj, bc), (j, (wj, n))| {
                    let c = e.iter().zip(wj).map(|(a, b)| a * b).sum::<f32>() / n;
                    if c > bc {
                        (j, c)
                    } else {
                        (bj, bc)
                    }
                },
            );
            best == y as usize
        })
        .count();
    100.0 * correct as f64 / test.y.len() as f64
}

fn main() -> fused_margin::Result<()> {
    let args = parse_args();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let (train, test) = synthetic(&args, &mut rng);
    let n = train.y.len();
    let c = args.classes;

    // Parameters: the linear map (D x D_IN, scaled so embeddings start with unit-ish variance)
    // and the class weights (C x D).
    let mut we: Vec<f32> = (0..D * D_IN)
        .map(|_| (normal(&mut rng) / (D_IN as f64).sqrt()) as f32)
        .collect();
    let mut w: Vec<f32> = (0..c * D).map(|_| normal(&mut rng) as f32).collect();
    let mut opt_we = Adam::new(we.len(), 2e-2);
    let mut opt_w = Adam::new(w.len(), 2e-2);

    // ArcFace as in the paper (m = 0.5, Fallback past theta > pi - m); s = 30 rather than 64
    // suits the small embedding dimension and class count.
    let spec = MarginLoss::arcface(0.5).scale(30.0);
    let (backend, device) = Backend::choose(args.device)?;
    println!("device: {device}");
    println!(
        "ArcFace(m = 0.5, s = 30) on {c} classes x {} points (D_in = {D_IN} -> D = {D}), {} train / {} held out, batch {BATCH}, Adam",
        args.per_class,
        n,
        test.y.len()
    );

    let started = std::time::Instant::now();
    let mut order: Vec<usize> = (0..n).collect();
    let (mut first, mut last) = (f64::NAN, f64::NAN);
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
            let out = loss_and_grads(&backend, &spec, &emb, &w, &yb, Shape::new(b, D, c))?;
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
        }
        let epoch_loss = sum / rows as f64;
        if epoch == 1 {
            first = epoch_loss;
        }
        last = epoch_loss;
        println!(
            "epoch {epoch:>3}: loss {epoch_loss:8.4}, held-out accuracy {:5.1}%",
            accuracy(&test, &we, &w)
        );
    }
    println!("({:.1} s)", started.elapsed().as_secs_f64());
    println!(
        "first loss {first:.4}, last loss {last:.4}, accuracy {:.1}% (held-out, {c} classes, chance {:.2}%)",
        accuracy(&test, &we, &w),
        100.0 / c as f64
    );
    Ok(())
}
