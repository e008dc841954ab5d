//! candle training: a small MLP maps points to embeddings, trained end to end through
//! `fused_margin::candle::MarginHead` (ArcFace: the class weights and the fused loss as one candle
//! module) with candle-nn's AdamW, on the examples' seeded clustered Gaussians (the quickstart's
//! dataset).
//!
//! ```text
//! cargo run --release --features candle --example candle_train [-- --epochs N --classes N --seed N --device auto|cpu|gpu]
//! cargo run --release --features candle-cuda --example candle_train     # on a GPU machine (README, "Features")
//! ```
//!
//! The model: `Linear(64 -> 128) -> ReLU -> Linear(128 -> 32)` producing embeddings, plus the
//! head's learned weight row per class (a variable of a candle-nn `VarMap`, built through a
//! `VarBuilder` as candle-nn's layers are), all updated by AdamW from the gradients candle's
//! autograd gets out of the op. With the `candle-cuda` feature and a GPU present the whole model,
//! the loss and its backward run on the GPU (`--device auto`, the default); otherwise on the CPU.
//! Accuracy is on held-out points: the predicted class is the class weight with the highest cosine
//! to the embedding. The run fails if the loss did not fall or the accuracy did not rise.

#[path = "common/train.rs"]
mod train;

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use fused_margin::candle::MarginHead;
use fused_margin::MarginLoss;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

/// Input dimension of the synthetic points.
const D_IN: usize = 64;
/// Hidden width of the MLP.
const HIDDEN: usize = 128;
/// Embedding dimension.
const D: usize = 32;
/// Points of every class held out for the accuracy.
const HELD_OUT: usize = 4;
/// Mini-batch size.
const BATCH: usize = 256;
/// Noise per coordinate around the class centers (as the quickstart).
const NOISE: f64 = 1.5;

struct Args {
    epochs: usize,
    classes: usize,
    per_class: usize,
    seed: u64,
    device: String,
}

fn usage(msg: &str) -> ! {
    eprintln!("{msg}\nusage: candle_train [--epochs N] [--classes N] [--per-class N] [--seed N] [--device auto|cpu|gpu]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        epochs: 15,
        classes: 200,
        per_class: 20,
        seed: 42,
        device: "auto".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let num = |v: &str| -> usize {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{flag} needs a number, got {v}")))
        };
        match flag.as_str() {
            "--epochs" => a.epochs = num(&v).max(1),
            "--classes" => a.classes = num(&v).max(2),
            "--per-class" => a.per_class = num(&v).max(HELD_OUT + 1),
            "--seed" => a.seed = num(&v) as u64,
            "--device" => a.device = v,
            other => usage(&format!("unknown option {other}")),
        }
    }
    a
}

/// The device `--device` asks for: `gpu` needs the `candle-cuda` feature and a device, `auto`
/// takes the GPU when both are there.
fn choose_device(choice: &str) -> candle_core::Result<Device> {
    let gpu_built = cfg!(feature = "candle-cuda");
    let gpu_present = gpu_built && fused_margin::cuda::device_available();
    match choice {
        "cpu" => Ok(Device::Cpu),
        "gpu" if gpu_present => Device::new_cuda(0),
        "gpu" if !gpu_built => usage("--device gpu needs a build with --features candle-cuda"),
        "gpu" => usage("--device gpu: no CUDA device found"),
        "auto" if gpu_present => Device::new_cuda(0),
        "auto" => Ok(Device::Cpu),
        other => usage(&format!("--device needs auto, cpu or gpu, got {other}")),
    }
}

/// Held-out accuracy (%): argmax over classes of `cos(embedding, w_j)`.
fn accuracy(mlp: &impl Module, w: &Tensor, x: &Tensor, y: &Tensor) -> candle_core::Result<f64> {
    let unit = |t: &Tensor| -> candle_core::Result<Tensor> {
        t.broadcast_div(&t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
    };
    let cos = unit(&mlp.forward(x)?)?.matmul(&unit(w)?.t()?)?;
    let hits = cos
        .argmax(D::Minus1)?
        .eq(y)?
        .to_dtype(DType::F32)?
        .sum_all()?;
    Ok(100.0 * hits.to_scalar::<f32>()? as f64 / y.dims()[0] as f64)
}

fn main() -> candle_core::Result<()> {
    let args = parse_args();
    let device = choose_device(&args.device)?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let (train, test) = train::clusters(
        &mut rng,
        args.classes,
        args.per_class,
        HELD_OUT,
        D_IN,
        NOISE,
    );
    let (n, c) = (train.y.len(), args.classes);
    let x_train = Tensor::from_vec(train.x.clone(), (n, D_IN), &device)?;
    let y_train: Vec<i64> = train.y.iter().map(|&y| y as i64).collect();
    let x_test = Tensor::from_vec(test.x.clone(), (test.y.len(), D_IN), &device)?;
    let y_test: Vec<u32> = test.y.iter().map(|&y| y as u32).collect();
    let y_test = Tensor::from_vec(y_test, test.y.len(), &device)?;

    // Parameters from the seeded generator (candle's CPU generator cannot be seeded): the two
    // layers (PyTorch's default uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))) and the class weights
    // (standard normal). AdamW updates all of them.
    let mut param = |shape: (usize, usize), scale: f64| -> candle_core::Result<Var> {
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| (scale * train::normal(&mut rng)) as f32)
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &device)?)
    };
    let (w1, b1) = (
        param((HIDDEN, D_IN), 0.5 / (D_IN as f64).sqrt())?,
        param((1, HIDDEN), 0.0)?,
    );
    let (w2, b2) = (
        param((D, HIDDEN), 0.5 / (HIDDEN as f64).sqrt())?,
        param((1, D), 0.0)?,
    );
    let w = param((c, D), 1.0)?;
    // The head owns the class weights as the VarMap's variable "head.weight"; they start from the
    // seeded draw above instead of VarBuilder's (unseedable) initializer, so runs repeat.
    let spec = MarginLoss::arcface(0.5).scale(30.0);
    let mut varmap = VarMap::new();
    let head = MarginHead::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &device).pp("head"),
        c,
        D,
        spec,
    )?;
    varmap.set_one("head.weight", w.as_tensor())?;
    let mlp = candle_nn::seq()
        .add(Linear::new(
            w1.as_tensor().clone(),
            Some(b1.as_tensor().squeeze(0)?),
        ))
        .add(candle_nn::Activation::Relu)
        .add(Linear::new(
            w2.as_tensor().clone(),
            Some(b2.as_tensor().squeeze(0)?),
        ));
    let mut params = vec![w1, b1, w2, b2];
    params.extend(varmap.all_vars());
    let mut opt = AdamW::new(
        params,
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let w = head.weight().clone();

    let where_ = match &device {
        Device::Cpu => "CPU (this crate's f64 reference inside the op)".to_string(),
        other => format!("{:?} (fused kernels on candle's stream)", other.location()),
    };
    println!("device: {where_}");
    println!(
        "ArcFace m = 0.5, s = 30; MLP {D_IN} -> {HIDDEN} -> {D}; {c} classes, {n} train / {} held out; batch {BATCH}; AdamW",
        test.y.len()
    );
    let acc0 = accuracy(&mlp, &w, &x_test, &y_test)?;
    println!("before training: held-out accuracy {acc0:5.1}%");

    let started = std::time::Instant::now();
    let mut order: Vec<usize> = (0..n).collect();
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    for epoch in 1..=args.epochs {
        order.shuffle(&mut rng);
        let (mut sum, mut rows) = (0.0, 0usize);
        for batch in order.chunks(BATCH) {
            let idx: Vec<u32> = batch.iter().map(|&i| i as u32).collect();
            let idx = Tensor::from_vec(idx, batch.len(), &device)?;
            let xb = x_train.index_select(&idx, 0)?;
            let yb: Vec<i64> = batch.iter().map(|&i| y_train[i]).collect();
            let yb = Tensor::from_vec(yb, batch.len(), &device)?;
            let loss = head.forward(&mlp.forward(&xb)?, &yb)?;
            opt.backward_step(&loss)?;
            sum += loss.to_scalar::<f32>()? as f64 * batch.len() as f64;
            rows += batch.len();
        }
        let epoch_loss = sum / rows as f64;
        if epoch == 1 {
            first = epoch_loss;
        }
        last = epoch_loss;
        let acc = accuracy(&mlp, &w, &x_test, &y_test)?;
        println!("epoch {epoch:>3}: loss {epoch_loss:8.4}, held-out accuracy {acc:5.1}%");
    }
    let acc1 = accuracy(&mlp, &w, &x_test, &y_test)?;
    println!("({:.1} s)", started.elapsed().as_secs_f64());
    println!(
        "first loss {first:.4}, last loss {last:.4}, accuracy {acc0:.1}% -> {acc1:.1}% (held-out, {c} classes, chance {:.2}%)",
        100.0 / c as f64
    );
    if !(last < first && acc1 > acc0) {
        return Err(candle_core::Error::Msg(format!(
            "training did not progress: loss {first:.4} -> {last:.4}, accuracy {acc0:.1}% -> {acc1:.1}%"
        )));
    }
    Ok(())
}
