//! # fused-margin
//!
//! Margin-softmax losses for face recognition and metric learning — normalized softmax (NSL),
//! SphereFace, CosFace, ArcFace and the combined `cos(m1*theta + m2) - m3` — as one call that
//! normalizes embeddings and class weights, forms the cosine logits, injects the margin at the
//! target, scales, takes the log-softmax and cross-entropy, and returns the gradients for both
//! inputs through the normalization. The contract is `docs/MATH.md` in the repository, summarized
//! here (`norm(v)` is the Euclidean norm of `v`):
//!
//! - normalize: `xh_i = x_i / max(norm(x_i), 1e-12)`, `wh_j = w_j / max(norm(w_j), 1e-12)`;
//! - cosine: `c_ij = xh_i . wh_j`;
//! - row scale: `r_i = s` (or `s * norm(x_i)` without feature normalization);
//! - target: `psi(c) = cos(m1*theta + m2) - m3` with
//!   `theta = acos(clamp(c, -1 + 1e-7, 1 - 1e-7))`;
//! - logits: `z_ij = r_i c_ij` for `j != y_i`, `z_iy = r_i psi(c_iy)`;
//! - loss: `l_i = logsumexp_j z_ij - z_iy`, then mean, sum or none.
//!
//! Backends: [`cpu`] (the f64 reference, always available) and [`cuda`] (NVRTC-compiled kernels
//! through cudarc; needs a GPU at run time, never at build time). Framework entries: `candle`
//! (feature `candle`: an op with autograd on candle tensors, CPU and, with feature `candle-cuda`,
//! CUDA) and [`cuda::raw`] (raw device pointers and a `CUstream`, for any other framework); both
//! are shown in `docs/INTEGRATION.md`. Classes sharded across ranks (model parallelism over the
//! classes) and Partial FC sampling: [`shard`].
//!
//! ```
//! use fused_margin::{cpu, MarginLoss, Shape, Upstream};
//! let spec = MarginLoss::arcface(0.5).scale(64.0);
//! let shape = Shape::new(2, 3, 4);
//! let x = [1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0];
//! let w = [1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
//! let labels = [0, 1];
//! let fwd = cpu::forward(&spec, &x, &w, &labels, shape)?;
//! let grads = cpu::backward(&spec, &fwd, &x, &w, &labels, shape, Upstream::ONE)?;
//! assert!(fwd.loss.is_finite() && grads.dx.len() == 6 && grads.dw.len() == 12);
//! # Ok::<(), fused_margin::Error>(())
//! ```
#![warn(missing_docs)]

// README.md's and docs/INTEGRATION.md's ```rust blocks, compiled and run as doctests so they
// cannot drift from the API. Only with feature `candle`: both files show the candle op, which
// does not exist without it. CI runs `cargo test --release --features candle --doc`, so every block is
// checked there; `cargo test --doc --features candle` runs them alone.
#[cfg(all(doctest, feature = "candle"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(all(doctest, feature = "candle"))]
#[doc = include_str!("../docs/INTEGRATION.md")]
pub struct IntegrationDoctests;

#[cfg(feature = "candle")]
pub mod candle;
pub mod cpu;
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod math;
pub mod shard;
pub mod spec;
pub mod variant;

pub use dtype::{DType, Element};
pub use error::{CudaSource, Error, Result};
pub use spec::{
    GradientMode, MarginLoss, OverflowPolicy, Reduction, Shape, SphereFaceSchedule, Upstream,
};
pub use variant::{
    AdaFace, CurricularFace, ElasticFace, ElasticKind, ElasticMargins, ElasticPlus, ElasticRng,
    LossState, MagFace, RowInputs, Variant,
};
