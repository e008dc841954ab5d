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
//!
//! The default scale is 30, not the presets' 64: see `--help` (common/quickstart_args.rs). Bad
//! options (`--epochs -1`, `--classes 0`, `--scale 0`) are refused with a message naming the
//! flag and the value, and exit status 2.

use fused_margin::{MarginLoss, Shape, SphereFaceSchedule, Variant};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

#[path = "common/train.rs"]
mod train;
use train::{Adam, Split};
#[path = "common/quickstart_args.rs"]
mod quickstart_args;
use quickstart_args::{Args, Command, HELD_OUT, USAGE};

/// Input dimension of the synthetic data.
const D_IN: usize = 64;
/// Embedding dimension.
const D: usize = 32;
/// Mini-batch size.
const BATCH: usize = 256;
/// Per-coordinate noise around the class centers (the centers are standard normal); large
/// enough that classes overlap in places and the task is not solved by the first step.
const NOISE: f64 = 1.5;

/// The parsed and checked command line, or the process ends: `--help` prints the usage (exit
/// 0); a bad option prints what is wrong with it, naming the flag and the value, then the usage
/// (exit 2).
fn args_and_spec() -> (Args, MarginLoss) {
    fn fail(msg: String) -> ! {
        eprintln!("quickstart: {msg}\n\n{USAGE}");
        std::process::exit(2)
    }
    match quickstart_args::parse(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            println!("{USAGE}");
            std::process::exit(0)
        }
        Ok(Command::Run(args)) => match quickstart_args::spec_of(&args) {
            Ok(spec) => (args, spec),
            Err(msg) => fail(msg),
        },
        Err(msg) => fail(msg),
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

/// Held-out accuracy (%) and the mean angle (degrees) between each held-out embedding and its
/// own class weight (with `k` sub-centers per class, the nearest of them, as the loss).
fn evaluate(test: &Split, we: &[f32], w: &[f32], k: usize) -> (f64, f64) {
    let emb = embed(&test.x, we);
    let (mut correct, mut angle) = (0usize, 0.0f64);
    for (e, &y) in emb.chunks_exact(D).zip(&test.y) {
        let cos: Vec<f64> = w
            .chunks_exact(D * k)
            .map(|centers| {
                centers
                    .chunks_exact(D)
                    .map(|wj| train::cosine(e, wj))
                    .fold(f64::NEG_INFINITY, f64::max)
            })
            .collect();
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
    let (args, spec0) = args_and_spec();
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
    // With sub-centers, K rows per class (class-major).
    let k = spec0.variant.centers();
    let mut w: Vec<f32> = (0..c * k * D)
        .map(|_| train::normal(&mut rng) as f32)
        .collect();
    let mut opt_we = Adam::new(we.len(), 2e-2);
    let mut opt_w = Adam::new(w.len(), 2e-2);

    let (backend, device) = train::Backend::choose(args.device)?;
    println!("device: {device}");
    if spec0.variant != Variant::Plain {
        println!("loss variant: {:?}", spec0.variant);
    }
    // The state a loss carries from step to step (owned here, as a training loop would).
    let mut state = spec0.variant.initial_state();
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
    let (acc0, angle0) = evaluate(&test, &we, &w, k);
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
            // ElasticFace draws new margins every step from (seed, step).
            let inputs = train::step_inputs(&spec, state, args.seed, iter);
            let out = train::loss_and_grads(
                &backend,
                args.dtype,
                &spec,
                &emb,
                &w,
                &yb,
                Shape::new(b, D, c),
                &inputs,
            )?;
            state = out.state;
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
        let (acc, _) = evaluate(&test, &we, &w, k);
        let line = format!("epoch {epoch:>3}: loss {epoch_loss:8.4}, held-out accuracy {acc:5.1}%");
        // A hidden bar (output not a terminal) drops println: print plainly then.
        if bar.is_hidden() {
            println!("{line}");
        } else {
            bar.println(line);
        }
    }
    bar.finish_and_clear();
    let (acc1, angle1) = evaluate(&test, &we, &w, k);
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
