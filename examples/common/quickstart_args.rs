//! The quickstart's command line (included by path from quickstart.rs, and from
//! tests/quickstart_args.rs, which checks that bad values are refused, not clamped). Expects the
//! includer to have `train` (common/train.rs) at its crate root.

use crate::train::{DeviceChoice, InputDType};
use fused_margin::{ElasticKind, ElasticPlus, MarginLoss};

/// Points of every class held out for the accuracy.
pub const HELD_OUT: usize = 4;

/// The scale every preset but SphereFace gets when `--scale` is not given.
pub const DEFAULT_SCALE: f64 = 30.0;

/// `--help`.
pub const USAGE: &str = "usage: quickstart [options]
  --loss NAME      arcface (default) | cosface | sphereface | nsl | combined, or one with
                   per-row state (every backend): subcenter (K = 3) |
                   adaface | curricular | magface | elastic (ElasticFace-Arc, seeded per step)
  --m1 X --m2 X --m3 X
                   margins of cos(m1*theta + m2) - m3 (default: the preset's)
  --scale S        scale s (default 30; sphereface: 1 with the feature norm, as the paper).
                   Not the presets' 64, which is sized for thousands of classes: the scale a
                   softmax needs grows with ln(classes), and this 300-class problem trains
                   better smaller (held-out accuracy after 20 epochs: s = 16 73.8%,
                   30 70.5%, 64 69.2%)
  --classes N      number of classes, >= 2 (default 300)
  --per-class N    points per class, >= 5, 4 of them held out (default 20)
  --epochs N       epochs, >= 1 (default 20)
  --seed N         data and initialization seed, >= 0 (default 42)
  --device D       auto (default: the GPU when present) | cpu | gpu
  --dtype T        f32 (default) | f16 | bf16: the element type the loss sees
  -h, --help       this text";

/// Command-line options.
#[derive(Debug)]
pub struct Args {
    /// `--loss`.
    pub loss: String,
    /// `--m1`, `--m2`, `--m3` where given.
    pub m: [Option<f64>; 3],
    /// `--scale` where given.
    pub scale: Option<f64>,
    /// `--classes`.
    pub classes: usize,
    /// `--per-class`.
    pub per_class: usize,
    /// `--epochs`.
    pub epochs: usize,
    /// `--seed`.
    pub seed: u64,
    /// `--device`.
    pub device: DeviceChoice,
    /// `--dtype`.
    pub dtype: InputDType,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// `-h` / `--help`.
    Help,
    /// Train with these options (each checked; [`spec_of`] checks the loss options).
    Run(Args),
}

/// A whole number `>= min` for `flag`, or a message naming the flag, the value and the rule.
/// Values out of range are refused rather than clamped: `--epochs -1` training one epoch would
/// hide the typo.
fn count(flag: &str, value: &str, min: usize) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(format!(
            "{flag} needs a whole number >= {min}, got {value:?}"
        )),
    }
}

/// A number for `flag` (range checks are the spec's: [`spec_of`]).
fn number(flag: &str, value: &str) -> Result<f64, String> {
    value
        .parse()
        .map_err(|_| format!("{flag} needs a number, got {value:?}"))
}

/// Parses the options after the program name.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
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
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Ok(Command::Help);
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--loss" => a.loss = v,
            "--m1" => a.m[0] = Some(number(&flag, &v)?),
            "--m2" => a.m[1] = Some(number(&flag, &v)?),
            "--m3" => a.m[2] = Some(number(&flag, &v)?),
            "--scale" => a.scale = Some(number(&flag, &v)?),
            "--classes" => a.classes = count(&flag, &v, 2)?,
            "--per-class" => a.per_class = count(&flag, &v, HELD_OUT + 1)?,
            "--epochs" => a.epochs = count(&flag, &v, 1)?,
            "--seed" => {
                a.seed = v
                    .parse()
                    .map_err(|_| format!("--seed needs a whole number >= 0, got {v:?}"))?
            }
            "--device" => {
                a.device = DeviceChoice::parse(&v)
                    .ok_or_else(|| format!("--device needs auto, cpu or gpu, got {v:?}"))?
            }
            "--dtype" => {
                a.dtype = InputDType::parse(&v)
                    .ok_or_else(|| format!("--dtype needs f32, f16 or bf16, got {v:?}"))?
            }
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(Command::Run(a))
}

/// The preset named by `--loss`, with `--m*` and `--scale` applied, validated (the message names
/// the field and the value, e.g. `s = -1`).
pub fn spec_of(a: &Args) -> Result<MarginLoss, String> {
    let s = DEFAULT_SCALE;
    let mut spec = match a.loss.as_str() {
        "arcface" => MarginLoss::arcface(0.5).scale(s),
        "cosface" => MarginLoss::cosface(0.35).scale(s),
        "sphereface" => MarginLoss::sphereface(4.0),
        "nsl" => MarginLoss::nsl(s),
        "combined" => MarginLoss::combined(1.0, 0.3, 0.2).scale(s),
        "subcenter" => MarginLoss::subcenter(3).scale(s),
        "adaface" => MarginLoss::adaface().scale(s),
        "curricular" => MarginLoss::curricularface().scale(s),
        "magface" => MarginLoss::magface().scale(s),
        "elastic" => MarginLoss::elasticface(ElasticKind::Arc, ElasticPlus::None).scale(s),
        other => {
            return Err(format!(
                "--loss needs arcface, cosface, sphereface, nsl, combined, subcenter, adaface, \
                 curricular, magface or elastic, got {other:?}"
            ))
        }
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
    spec.validate().map_err(|e| match &e {
        // Name the flag that set the field, not only the field.
        fused_margin::Error::InvalidSpec { field, .. } => {
            let flag = match *field {
                "s" => "--scale",
                "m1" => "--m1",
                "m2" => "--m2",
                "m3" => "--m3",
                _ => "--loss",
            };
            format!("{flag}: {e}")
        }
        _ => e.to_string(),
    })?;
    Ok(spec)
}
