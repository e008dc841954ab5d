//! What the examples share (included by path from quickstart.rs and boundaries.rs): seeded
//! clustered data, Adam, and the loss call on the CPU reference or the GPU, in f32, f16 or bf16.
#![allow(dead_code)]

use fused_margin::cuda::{self, CudaElement, FusedMarginLoss, GpuUpstream};
use fused_margin::{
    cpu, ElasticMargins, ElasticRng, LossState, MarginLoss, RowInputs, Shape, Upstream, Variant,
};
use half::{bf16, f16};
use rand::{rngs::StdRng, Rng};

/// A standard normal sample (Box-Muller; keeps the examples on `rand` alone).
pub fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Points (row-major, `dim` wide) and their labels.
pub struct Split {
    /// Row-major points.
    pub x: Vec<f32>,
    /// One label per point.
    pub y: Vec<i32>,
}

/// Seeded clustered Gaussians: `classes` standard-normal centers in `dim` dimensions, `per_class`
/// points each with `noise` per coordinate; the last `held_out` points of each class form the
/// second split.
pub fn clusters(
    rng: &mut StdRng,
    classes: usize,
    per_class: usize,
    held_out: usize,
    dim: usize,
    noise: f64,
) -> (Split, Split) {
    let centers: Vec<f64> = (0..classes * dim).map(|_| normal(rng)).collect();
    let mut train = Split {
        x: vec![],
        y: vec![],
    };
    let mut test = Split {
        x: vec![],
        y: vec![],
    };
    for class in 0..classes {
        let center = &centers[class * dim..(class + 1) * dim];
        for k in 0..per_class {
            let split = if k < per_class - held_out {
                &mut train
            } else {
                &mut test
            };
            split
                .x
                .extend(center.iter().map(|c| (c + noise * normal(rng)) as f32));
            split.y.push(class as i32);
        }
    }
    (train, test)
}

/// Adam (Kingma & Ba) for one parameter tensor.
pub struct Adam {
    lr: f32,
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    const B1: f32 = 0.9;
    const B2: f32 = 0.999;
    const EPS: f32 = 1e-8;

    /// Zero moments for `len` parameters, learning rate `lr`.
    pub fn new(len: usize, lr: f32) -> Self {
        Self {
            lr,
            m: vec![0.0; len],
            v: vec![0.0; len],
            t: 0,
        }
    }

    /// One update of `params` with `grads`.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32]) {
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

/// Which device `--device` asks for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DeviceChoice {
    /// The GPU when one is present, else the CPU.
    Auto,
    /// The CPU reference.
    Cpu,
    /// The GPU (an error without one).
    Gpu,
}

impl DeviceChoice {
    /// Parses `auto`, `cpu` or `gpu`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "cpu" => Some(Self::Cpu),
            "gpu" => Some(Self::Gpu),
            _ => None,
        }
    }
}

/// The element type the loss sees (parameters stay f32; embeddings and weights are rounded to it
/// for the loss call, as a mixed-precision model would).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum InputDType {
    /// f32.
    F32,
    /// half::f16.
    F16,
    /// half::bf16.
    BF16,
}

impl InputDType {
    /// Parses `f32`, `f16` or `bf16`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(Self::F32),
            "f16" => Some(Self::F16),
            "bf16" => Some(Self::BF16),
            _ => None,
        }
    }
}

/// Where the loss is computed.
pub enum Backend {
    /// The crate's f64 CPU reference.
    Cpu,
    /// The fused CUDA kernels on GPU 0.
    Cuda(Box<FusedMarginLoss>),
}

impl Backend {
    /// Picks the backend and describes the device.
    pub fn choose(choice: DeviceChoice) -> fused_margin::Result<(Self, String)> {
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
        let gpu = FusedMarginLoss::new(stream)?;
        let desc = format!("GPU: {name} ({}, fused kernels)", gpu.arch());
        Ok((Backend::Cuda(Box::new(gpu)), desc))
    }
}

/// The loss and its gradients with respect to the embeddings and the class weights (f32).
pub struct LossAndGrads {
    /// The state out of a loss with state (AdaFace, CurricularFace): the next call's state in.
    pub state: Option<LossState>,
    /// The reduced loss.
    pub loss: f64,
    /// `dloss/demb`, B x D.
    pub d_emb: Vec<f32>,
    /// `dloss/dw`, C x D.
    pub d_w: Vec<f32>,
}

/// One forward and backward of `spec` on embeddings `emb` (B x D) against class weights `w`
/// (C x D), in `dtype`, with the call's per-row inputs (`RowInputs::default()` for the
/// fixed-margin losses; the GPU runs ElasticFace without Plus and refuses the other losses with
/// state with `Error::Unsupported`).
#[allow(clippy::too_many_arguments)] // the loss call's arguments, one each
pub fn loss_and_grads(
    backend: &Backend,
    dtype: InputDType,
    spec: &MarginLoss,
    emb: &[f32],
    w: &[f32],
    labels: &[i32],
    shape: Shape,
    inputs: &RowInputs,
) -> fused_margin::Result<LossAndGrads> {
    match dtype {
        InputDType::F32 => typed::<f32>(backend, spec, emb, w, labels, shape, inputs),
        InputDType::F16 => typed::<f16>(backend, spec, emb, w, labels, shape, inputs),
        InputDType::BF16 => typed::<bf16>(backend, spec, emb, w, labels, shape, inputs),
    }
}

fn typed<T: CudaElement>(
    backend: &Backend,
    spec: &MarginLoss,
    emb: &[f32],
    w: &[f32],
    labels: &[i32],
    shape: Shape,
    inputs: &RowInputs,
) -> fused_margin::Result<LossAndGrads> {
    let emb: Vec<T> = emb.iter().map(|&v| T::from_f64(v as f64)).collect();
    let w: Vec<T> = w.iter().map(|&v| T::from_f64(v as f64)).collect();
    match backend {
        Backend::Cpu => {
            let fwd = cpu::forward_with(spec, &emb, &w, labels, shape, inputs)?;
            let g = cpu::backward(spec, &fwd, &emb, &w, labels, shape, Upstream::ONE)?;
            Ok(LossAndGrads {
                state: fwd.state,
                loss: fwd.loss,
                d_emb: g.dx.iter().map(|&v| v as f32).collect(),
                d_w: g.dw.iter().map(|&v| v as f32).collect(),
            })
        }
        Backend::Cuda(gpu) => {
            let s = gpu.stream();
            let err = |e| fused_margin::Error::driver("example copy", e);
            let x = s.clone_htod(&emb).map_err(err)?;
            let wd = s.clone_htod(&w).map_err(err)?;
            let l = s.clone_htod(labels).map_err(err)?;
            let (xv, wv, lv) = (x.as_view(), wd.as_view(), l.as_view());
            // The losses with state the GPU plans do not run are Error::Unsupported here.
            let fwd = gpu.forward_with(spec, &xv, &wv, &lv, shape, inputs)?;
            let g = gpu.backward_f32(&fwd, &xv, &wv, &lv, GpuUpstream::ONE)?;
            Ok(LossAndGrads {
                state: None,
                loss: fwd.loss_host()? as f64,
                d_emb: s.clone_dtoh(&g.dx).map_err(err)?,
                d_w: s.clone_dtoh(&g.dw).map_err(err)?,
            })
        }
    }
}

/// A training step's inputs for `spec`: the state carried from the last step, and for
/// ElasticFace margins drawn from (`seed`, `step`).
pub fn step_inputs(
    spec: &MarginLoss,
    state: Option<LossState>,
    seed: u64,
    step: u64,
) -> RowInputs<'static> {
    RowInputs {
        state,
        margins: matches!(spec.variant, Variant::ElasticFace(_)).then_some(ElasticMargins::Seeded(
            ElasticRng {
                seed,
                step,
                row_offset: 0,
            },
        )),
    }
}

/// Cosine of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}
