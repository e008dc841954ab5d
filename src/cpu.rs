//! The CPU reference: MATH.md computed in f64 from inputs of any [`Element`] type. It defines
//! correctness for the GPU plans and is fast enough for tests and small training runs
//! (threads over row blocks and class chunks via rayon; the B x C matrix is never stored whole).

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::math::{self, RowMargin};
use crate::shard::{self, ClassShard, Communicator, DwLayout, DxReduce, Rank, Sampled};
use crate::spec::{MarginLoss, Reduction, Shape, Upstream, NORM_EPS};
use crate::variant::{LossState, RowInputs, Variant};
use rayon::prelude::*;
use std::ops::Range;

/// Rows handled together, so each class row of `w` is read once per block, not once per row.
const ROW_BLOCK: usize = 16;
/// Classes handled per backward step; bounds the `B x min(C, CLASS_CHUNK)` scratch of `dc`.
const CLASS_CHUNK: usize = 512;

/// What forward returns and backward consumes (MATH.md step 6: the saved per-row statistics and
/// norms, never a B x C buffer).
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    /// The reduced loss: the mean over counted rows (0 when none count), or the sum; for
    /// `Reduction::None`, the sum of `row_loss` (the per-row values are the result then).
    pub loss: f64,
    /// `l_i = lse_i - z_iy` per row (computed as `softplus(logsumexp_{j != y} z_ij - z_iy)`, free
    /// of the cancellation; the backward's target entry `expm1(-l_i)` reads it); 0 for ignored
    /// rows.
    pub row_loss: Vec<f64>,
    /// `lse_i = logsumexp_j z_ij` per row (for ignored rows: over the plain logits `r_i c_ij`).
    pub lse: Vec<f64>,
    /// `|x_i|` per row (before the `eps` floor).
    pub x_norm: Vec<f64>,
    /// `|w_j|` per class (before the `eps` floor).
    pub w_norm: Vec<f64>,
    /// The number of rows with a label `>= 0`.
    pub counted: usize,
    /// [`Shape::labels_fingerprint`] of the labels (backward checks it: permuted labels too).
    pub labels_fingerprint: u64,
    /// The spec this result was computed with (backward checks it).
    pub spec: MarginLoss,
    /// The shape this result was computed with (backward checks it).
    pub shape: Shape,
    /// A 64-bit fingerprint of every element of `x` and `w` (their bits, in order): backward
    /// checks it, so other inputs are an error even where every row norm is the same.
    pub inputs_fingerprint: u64,
    /// The state out (AdaFace, CurricularFace; `None` for the others): the state in, updated by
    /// this call's counted rows. Pass it to the next call; the backward uses it as it is.
    pub state: Option<LossState>,
    /// The per-row values of the losses with per-row state (empty vectors for the others).
    pub rows: RowValues,
}

/// Per-row values of the losses with per-row or batch state, what the forward decided and the
/// backward reuses. Each vector is empty where the loss has no such value.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RowValues {
    /// The target margins `m2_i` and `m3_i` of each row (AdaFace, MagFace, ElasticFace after the
    /// Plus reordering; ignored rows keep theirs, unused).
    pub m2: Vec<f64>,
    /// See [`m2`](Self::m2).
    pub m3: Vec<f64>,
    /// CurricularFace's hardness threshold `tau_i` (0 for ignored rows).
    pub tau: Vec<f64>,
    /// CurricularFace's number of hard negatives (`c_ij > tau_i`) per row.
    pub hard: Vec<usize>,
    /// MagFace: the cross-entropy part `l_i` of `row_loss` (which adds `lambda_g g(a_i)`).
    pub ce: Vec<f64>,
}

/// Gradients of the loss with respect to `x` (B x D) and `w` (C x D), in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients {
    /// `dloss/dx`, row-major B x D.
    pub dx: Vec<f64>,
    /// `dloss/dw`, row-major C x D.
    pub dw: Vec<f64>,
}

/// Dot product with four independent accumulators, so the compiler can vectorize it
/// (a single f64 accumulator forces strict sequential order).
#[inline]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let (ac, ar) = a.split_at(a.len() - a.len() % 4);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(4).zip(bc.chunks_exact(4)) {
        for k in 0..4 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// Rows converted to f64 and their norms; `unit` rows divided by `max(|v|, eps)` when `normalize`.
struct Prepared {
    unit: Vec<f64>,
    norm: Vec<f64>,
    /// The rows' bits hashed in order (see [`row_hash`]), for [`Forward::inputs_fingerprint`].
    fingerprint: u64,
}

/// A hash of one row's values (their f64 bits: the widening from f32/f16/bf16 is exact, so equal
/// bits here mean equal inputs). Multiply-xorshift per element: a changed element or a swap of
/// two changes the hash; cheap next to the O(C) dot products the row takes part in.
fn row_hash(row: &[f64]) -> u64 {
    let mut h: u64 = 0x243f_6a88_85a3_08d3;
    for e in row {
        h = (h ^ e.to_bits()).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 29;
    }
    h
}

fn prepare<T: Element>(v: &[T], d: usize, normalize: bool) -> Prepared {
    let mut unit: Vec<f64> = v.iter().map(|e| e.to_f64()).collect();
    let (norm, hashes): (Vec<f64>, Vec<u64>) = unit
        .par_chunks_mut(d)
        .map(|row| {
            let h = row_hash(row);
            let n = dot(row, row).sqrt();
            if normalize {
                let inv = 1.0 / n.max(NORM_EPS);
                row.iter_mut().for_each(|e| *e *= inv);
            }
            (n, h)
        })
        .unzip();
    // Rows combined in order (a fixed sequence whatever rayon's split): deterministic.
    let fingerprint = hashes.iter().fold(0x1319_8a2e_0370_7344u64, |acc, &h| {
        (acc.rotate_left(23) ^ h).wrapping_mul(0xbf58_476d_1ce4_e5b9)
    });
    Prepared {
        unit,
        norm,
        fingerprint,
    }
}

/// Adds one logit to a running (max, sum-exp) pair of the online logsumexp, so that the result
/// does not depend on the order of the classes: `-Inf` contributes `exp(-Inf) = 0` (it would
/// otherwise give `exp(-Inf - -Inf) = NaN` while the max is still `-Inf`), and a logit equal to
/// the max (two `+Inf`s included) contributes exactly 1. NaN makes the sum NaN.
#[inline]
fn push_logit(m: &mut f64, s: &mut f64, z: f64) {
    if z == f64::NEG_INFINITY {
        return;
    }
    if z > *m {
        *s = *s * (*m - z).exp() + 1.0;
        *m = z;
    } else if z == *m {
        *s += 1.0;
    } else {
        *s += (z - *m).exp();
    }
}

/// Which classes a call's columns are, and so which rows of `w` it reads.
#[derive(Clone, Copy)]
enum Cols<'a> {
    /// Every class: column `j` is class `j` (the plain call).
    All,
    /// A rank's slice: column `j` is global class `start + j`; `w` holds the slice.
    Range { start: usize },
    /// Partial FC: column `k` is local class `index[k]` of the rank's slice (global class
    /// `start + index[k]`); `w` holds the whole slice and is read through the index.
    Index { start: usize, index: &'a [u32] },
}

/// Everything forward and backward share: validated inputs in f64.
struct Problem<'a> {
    spec: &'a MarginLoss,
    shape: Shape,
    labels: &'a [i32],
    /// `xh`: unit feature rows (always normalized: the cosine uses the direction; MATH.md step 1/3).
    x: Prepared,
    /// `wh`: unit class rows when `normalize_weights`, else the raw rows.
    w: Prepared,
    /// `r_i`: the row's `s`, or `s*|x_i|` without feature normalization (MATH.md step 3).
    r: Vec<f64>,
    counted: usize,
    /// Sub-centers per class (`w` has `C*k` rows).
    k: usize,
    /// Per-row margins (the losses with per-row margins; empty otherwise).
    rows: Vec<RowMargin>,
    /// CurricularFace: `t` (the state out) and the rows' thresholds.
    curricular: Option<(f64, Vec<f64>)>,
    /// The classes of the columns, and their number (`C` for a plain call).
    cols: Cols<'a>,
    ncols: usize,
}

impl<'a> Problem<'a> {
    /// Checks and prepares the inputs; the per-row state comes later ([`Problem::set_rows`]):
    /// it needs the target cosines, computed from these.
    fn new<T: Element>(
        spec: &'a MarginLoss,
        x: &[T],
        w: &[T],
        labels: &'a [i32],
        shape: Shape,
    ) -> Result<Self> {
        Self::with_cols(spec, x, w, labels, shape, Cols::All)
    }

    /// [`Problem::new`] for a rank's classes (`shape` is the global problem's; `w` holds the
    /// rank's `num_local*K` rows) or its sampled ones.
    fn sharded<T: Element>(
        spec: &'a MarginLoss,
        x: &[T],
        w: &[T],
        labels: &'a [i32],
        shape: Shape,
        shard: &ClassShard,
        sampled: Option<&'a Sampled>,
    ) -> Result<Self> {
        if shard.num_classes != shape.c {
            return Err(Error::InvalidArgument {
                what: "shard",
                detail: format!(
                    "the shard is of C = {} classes, the shape has C = {}",
                    shard.num_classes, shape.c
                ),
            });
        }
        let cols = match sampled {
            None => Cols::Range {
                start: shard.class_start,
            },
            Some(sm) => Cols::Index {
                start: shard.class_start,
                index: &sm.index,
            },
        };
        spec.validate()?;
        let local = Shape {
            c: shard.num_local,
            ..shape
        };
        let k = spec.variant.centers();
        // w holds the rank's rows; the labels are global classes.
        local.check_lengths_with_centers(k, x.len(), w.len(), labels.len())?;
        // The sampled set's checks, and every target of this rank among its columns (the GPU
        // path's mapping; the columns themselves come from `tcol`).
        if sampled.is_some() {
            shard::column_labels(labels, shard, sampled)?;
        }
        Self::with_cols(spec, x, w, labels, shape, cols)
    }

    fn with_cols<T: Element>(
        spec: &'a MarginLoss,
        x: &[T],
        w: &[T],
        labels: &'a [i32],
        shape: Shape,
        cols: Cols<'a>,
    ) -> Result<Self> {
        spec.validate()?;
        let k = spec.variant.centers();
        if let Cols::All = cols {
            // Sub-center: w has C*K rows; the rest of the checks read the class count C.
            shape.check_lengths_with_centers(k, x.len(), w.len(), labels.len())?;
        }
        let counted = shape.check_labels(labels)?;
        let xp = prepare(x, shape.d, true);
        let (wp, ncols) = match cols {
            Cols::All => (prepare(w, shape.d, spec.normalize_weights), shape.c),
            Cols::Range { .. } => (
                prepare(w, shape.d, spec.normalize_weights),
                w.len() / (shape.d * k),
            ),
            Cols::Index { index, .. } => {
                // The reference converts every row it reads to f64 anyway; it converts just the
                // sampled classes' K rows each.
                let rows = k * shape.d;
                let picked: Vec<T> = index
                    .iter()
                    .flat_map(|&j| &w[j as usize * rows..(j as usize + 1) * rows])
                    .copied()
                    .collect();
                (
                    prepare(&picked, shape.d, spec.normalize_weights),
                    index.len(),
                )
            }
        };
        let r = xp
            .norm
            .iter()
            .map(|&n| RowMargin::uniform(spec).row_scale(spec, n))
            .collect();
        Ok(Self {
            spec,
            shape,
            labels,
            x: xp,
            w: wp,
            r,
            counted,
            k,
            rows: Vec::new(),
            curricular: None,
            cols,
            ncols,
        })
    }

    /// The column of row `i`'s target in this call, `None` for an ignored row or (sharded) a
    /// target held by another rank.
    #[inline]
    fn tcol(&self, i: usize) -> Option<usize> {
        let y = usize::try_from(self.labels[i]).ok()?;
        match self.cols {
            Cols::All => Some(y),
            Cols::Range { start } => (y >= start && y - start < self.ncols).then(|| y - start),
            Cols::Index { start, index } => {
                let j = u32::try_from(y.checked_sub(start)?).ok()?;
                index.binary_search(&j).ok()
            }
        }
    }

    /// Whether the per-row state reads every counted row's target cosine.
    fn needs_target_cosines(&self) -> bool {
        match self.spec.variant {
            Variant::CurricularFace(_) => true,
            Variant::ElasticFace(e) => e.plus != crate::variant::ElasticPlus::None,
            _ => false,
        }
    }

    /// Each row's target cosine before any margin where this call holds the target, else 0
    /// (ignored rows; sharded: another rank's class, whose owner gives it).
    fn target_cosines(&self) -> Vec<f64> {
        (0..self.shape.b)
            .into_par_iter()
            .map(|i| self.tcol(i).map_or(0.0, |j| self.cosine(i, j).0))
            .collect()
    }

    /// Row `i`'s margins and scale (the per-row slot).
    fn margin(&self, i: usize) -> RowMargin {
        if self.rows.is_empty() {
            RowMargin::uniform(self.spec)
        } else {
            self.rows[i]
        }
    }

    fn xh(&self, i: usize) -> &[f64] {
        &self.x.unit[i * self.shape.d..(i + 1) * self.shape.d]
    }

    /// Row `j` of `wh` (with sub-centers: row `j*K + k` is sub-center `k` of class `j`).
    fn wh(&self, j: usize) -> &[f64] {
        &self.w.unit[j * self.shape.d..(j + 1) * self.shape.d]
    }

    /// `c_ij` and the winning sub-center: the largest of class `j`'s `K` cosines, the lowest `k`
    /// on a tie (just `xh_i . wh_j` without sub-centers).
    #[inline]
    fn cosine(&self, i: usize, j: usize) -> (f64, usize) {
        let xh = self.xh(i);
        let mut best = dot(xh, self.wh(j * self.k));
        let mut win = 0;
        for kk in 1..self.k {
            let c = dot(xh, self.wh(j * self.k + kk));
            // A NaN sub-center wins (so a bad row of w poisons its class, as without
            // sub-centers); among numbers the strict > keeps the lowest k on a tie.
            if c > best || (c.is_nan() && !best.is_nan()) {
                best = c;
                win = kk;
            }
        }
        (best, win)
    }

    /// The counted rows' raw norms and target cosines (before any margin), in row order: what
    /// the batch statistics and ElasticFace+'s order read. Empty unless the loss needs them.
    fn batch_inputs(&self, cy: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let counted = (0..self.shape.b).filter(|&i| self.labels[i] >= 0);
        match self.spec.variant {
            Variant::AdaFace(_) => (counted.map(|i| self.x.norm[i]).collect(), Vec::new()),
            Variant::CurricularFace(_) => (Vec::new(), counted.map(|i| cy[i]).collect()),
            _ => (Vec::new(), Vec::new()),
        }
    }

    /// The per-row state of the forward: the state out from the state in and this call's
    /// counted rows, then the rows' margins (AdaFace, MagFace, ElasticFace) or thresholds
    /// (CurricularFace) from it. `cy`: every row's target cosine where
    /// [`Problem::needs_target_cosines`] (else empty). Returns the state out and the values to
    /// save.
    fn set_rows(
        &mut self,
        inputs: &RowInputs<'_>,
        cy: &[f64],
    ) -> Result<(Option<LossState>, RowValues)> {
        let spec = self.spec;
        let b = self.shape.b;
        spec.variant.check_inputs(inputs, b)?;
        let (norms, cos_y) = self.batch_inputs(cy);
        let state = math::state_out(spec, inputs.state, &norms, &cos_y);
        let mut saved = RowValues::default();
        match (spec.variant, state) {
            (Variant::AdaFace(a), Some(LossState::AdaFace { mean, std })) => {
                self.rows = (0..b)
                    .map(|i| {
                        let (_, m2, m3) = math::adaface_row(&a, mean, std, self.x.norm[i]);
                        RowMargin {
                            m2,
                            m3,
                            ..RowMargin::uniform(spec)
                        }
                    })
                    .collect();
            }
            (Variant::MagFace(g), _) => {
                self.rows = (0..b)
                    .map(|i| RowMargin {
                        m2: math::magface_row(&g, self.x.norm[i]).1,
                        ..RowMargin::uniform(spec)
                    })
                    .collect();
            }
            (Variant::ElasticFace(e), _) => {
                // (The target cosines are computed below only when Plus reorders by them.)
                // check_inputs made sure they are there; the error keeps this path panic-free.
                let Some(m) = inputs.margins else {
                    return Err(Error::InvalidArgument {
                        what: "row inputs",
                        detail: "ElasticFace needs its margins".into(),
                    });
                };
                let mut margins = math::elastic_draw(&e, &m, b);
                // The target cosines of every row (ignored rows' entries are never read).
                if e.plus != crate::variant::ElasticPlus::None {
                    math::elastic_plus(e.plus, self.labels, cy, &mut margins);
                }
                self.rows = margins
                    .iter()
                    .map(|&m_i| math::elastic_row(&e, spec.s, m_i))
                    .collect();
            }
            (Variant::CurricularFace(_), Some(LossState::CurricularFace { t })) => {
                let mut it = cos_y.iter();
                let tau = (0..b)
                    .map(|i| match self.labels[i] {
                        y if y >= 0 => math::curricular_tau(spec, *it.next().unwrap_or(&0.0)),
                        _ => 0.0,
                    })
                    .collect();
                self.curricular = Some((t, tau));
            }
            _ => {}
        }
        if !self.rows.is_empty() {
            saved.m2 = self.rows.iter().map(|m| m.m2).collect();
            saved.m3 = self.rows.iter().map(|m| m.m3).collect();
        }
        if let Some((_, tau)) = &self.curricular {
            saved.tau = tau.clone();
        }
        Ok((state, saved))
    }

    /// The backward's per-row state: the forward's, as saved (its margins, thresholds and state
    /// out), checked for length.
    fn restore_rows(&mut self, fwd: &Forward) -> Result<()> {
        let b = self.shape.b;
        let bad = |what: &str, n: usize| {
            Err(Error::ForwardMismatch {
                detail: format!("the forward saved {n} {what} for B = {b} rows"),
            })
        };
        if self.spec.variant.has_row_margins() {
            if fwd.rows.m2.len() != b || fwd.rows.m3.len() != b {
                return bad("row margins", fwd.rows.m2.len().min(fwd.rows.m3.len()));
            }
            self.rows = fwd
                .rows
                .m2
                .iter()
                .zip(&fwd.rows.m3)
                .map(|(&m2, &m3)| RowMargin {
                    m2,
                    m3,
                    ..RowMargin::uniform(self.spec)
                })
                .collect();
        }
        if let Variant::CurricularFace(_) = self.spec.variant {
            let Some(LossState::CurricularFace { t }) = fwd.state else {
                return Err(Error::ForwardMismatch {
                    detail: format!(
                        "a CurricularFace forward saves its t, found {:?}",
                        fwd.state
                    ),
                });
            };
            if fwd.rows.tau.len() != b {
                return bad("thresholds", fwd.rows.tau.len());
            }
            self.curricular = Some((t, fwd.rows.tau.clone()));
        }
        if matches!(self.spec.variant, Variant::MagFace(_)) && fwd.rows.ce.len() != b {
            return bad("cross-entropy values", fwd.rows.ce.len());
        }
        Ok(())
    }

    /// The logit `z_ij` and the value `t_ij` it scales (`c_ij`, `target(c_iy)` at the label,
    /// CurricularFace's `c (t + c)` at a hard negative), with `dt/dc` (MATH.md step 5).
    #[inline]
    fn logit(&self, i: usize, target: bool, c: f64) -> (f64, f64, f64) {
        let (t, dt) = if target {
            let tg = math::target(self.spec, &self.margin(i), c);
            (tg.value, tg.deriv)
        } else if let (Some((t, tau)), true) = (&self.curricular, self.labels[i] >= 0) {
            math::curricular_negative(*t, tau[i], c)
        } else {
            (c, 1.0)
        };
        (self.r[i] * t, t, dt)
    }
}

/// Forward pass (MATH.md "Forward"): per-row loss, logsumexp and the reduction.
///
/// `x` is B x D, `w` is C x D (row-major), `labels` has B entries (`0 <= y < C`, negative =
/// ignored). Errors name the bad spec field, length or label.
///
/// # Non-finite and extreme inputs
///
/// NaN and +-Inf in `x` or `w` are not checked and are no error (no check cost): they propagate
/// through IEEE arithmetic as in PyTorch (`F.normalize`, a linear layer, `cross_entropy`), and
/// only what depends on the bad value becomes non-finite. With the default normalizations:
///
/// - a non-finite entry in row `i` of `x` (a counted row) makes `row_loss[i]` and `lse[i]` NaN,
///   hence the mean / sum loss NaN; in [`backward`] row `i` of `dx` and every row of `dw` are
///   non-finite. Every other row's `row_loss`, `lse` and `dx` is bit-identical to a run without
///   the bad value;
/// - a non-finite entry in a class row of `w` makes every counted row's loss, `dx` row and all of
///   `dw` NaN;
/// - a row with a negative label contributes nothing to the loss or `dw` even when non-finite;
///   only its own `dx` row is NaN (`0 * NaN` through the normalization backward).
///
/// Without weight normalization an infinite class entry gives an infinite logit: `+Inf` makes the
/// affected rows' losses non-finite; `-Inf` removes the class from the softmax (`exp(-Inf) = 0`)
/// and leaves the loss finite, but the rows' `dx` is NaN. Non-finite input never yields an
/// all-finite result.
///
/// Zero-norm rows (all zeros, or a norm below `eps = 1e-12`) take the `eps` path of MATH.md
/// (`v / max(|v|, eps)`): finite loss and gradients. A zero feature row has every cosine 0; its
/// `dx` is `dxh / eps` (large, finite) and it adds nothing to `dw`.
///
/// Norms, cosines and the logsumexp are computed in f64 (the logsumexp with a running max that
/// ignores `-Inf` logits, so the class order never matters). Every finite f32 / f16 / bf16 input
/// with a valid spec ([`MarginLoss::validate`]: `s <= 1e6`, margins at their limits) and an
/// upstream within [`check_upstream_value`](crate::spec::check_upstream_value)'s bound
/// (`|g| <= 1e12`) gives finite results, with or without the normalizations: logits are at most
/// `s |x_i| (|w_j| + 36)` (below 1e90 for any f32 entries) and the gradients below 1e140 (the
/// target slope is at most `16 / sin(theta_clamp) < 4e4`, the eps floor multiplies by 1e12),
/// far inside f64's 1.8e308 (`tests/extreme.rs`: `the_accepted_range_gives_finite_results`). f64 inputs whose squared row norm overflows f64
/// (entries beyond ~1e154) are out of range: that row's norm is `+Inf` and it is treated as the
/// zero direction.
///
/// The CPU path has no shared state and no order-dependent parallel reduction: concurrent calls
/// from many threads on shared inputs, and any size of rayon's pool, give bit-identical results.
pub fn forward<T: Element>(
    spec: &MarginLoss,
    x: &[T],
    w: &[T],
    labels: &[i32],
    shape: Shape,
) -> Result<Forward> {
    forward_with(spec, x, w, labels, shape, &RowInputs::default())
}

/// [`forward`] for the losses with per-row or batch state ([`crate::variant`]): `inputs` carries
/// AdaFace's or CurricularFace's state in, or ElasticFace's margins (an error names what is
/// missing or refused). The returned [`Forward::state`] is the state out and
/// [`Forward::rows`] the per-row margins, thresholds and counts used; [`backward`] reads them
/// from the forward (it takes no inputs of its own and never updates the state).
///
/// With sub-centers (`Variant::SubCenter { k }`) `w` has `C*k` rows and the backward's `dw`
/// too. MagFace's `row_loss` (and so the loss) includes the regularizer `lambda_g g(a_i)`.
pub fn forward_with<T: Element>(
    spec: &MarginLoss,
    x: &[T],
    w: &[T],
    labels: &[i32],
    shape: Shape,
    inputs: &RowInputs<'_>,
) -> Result<Forward> {
    forward_core(Problem::new(spec, x, w, labels, shape)?, inputs, None)
}

/// A row's logsumexp and loss from `(m, s)`, the online logsumexp over the other classes, and
/// the target logit `z` (counted rows).
#[inline]
fn finish_row(mut m: f64, mut s: f64, z: f64, counted: bool) -> (f64, f64) {
    // (m, s): the logsumexp over the other classes, lnt. A counted row's loss is
    // l = softplus(lnt - z_y) and lse = z_y + l: `lse - z_y` would cancel for a
    // well-classified row (l ~ 1e-17 beside lse ~ 50 is below f64's resolution of
    // lse). A non-finite z_y or lnt takes the plain route, so NaN and Inf propagate
    // as in PyTorch. The kernels compute the same (fm_combine_rows).
    let lnt = m + s.ln();
    if !counted {
        (lnt, 0.0)
    } else if z.is_finite() && !lnt.is_nan() && lnt != f64::INFINITY {
        // lse from the larger of the two, so that it stays within rounding of
        // max(lnt, z_y) however large they are.
        let d = lnt - z; // finite or -Inf
        let t = (-d.abs()).exp().ln_1p();
        if d > 0.0 {
            (lnt + t, d + t)
        } else {
            (z + t, t)
        }
    } else {
        push_logit(&mut m, &mut s, z);
        let lse = m + s.ln();
        (lse, lse - z)
    }
}

/// Merges another (max, sum-exp) pair into a running one, with [`push_logit`]'s rules: a `-Inf`
/// max adds nothing, an equal max adds the sums, so a single pair merged into the empty one
/// `(-Inf, 0)` comes out bit-identical.
#[inline]
fn merge_pair(m: &mut f64, s: &mut f64, m2: f64, s2: f64) {
    if m2 == f64::NEG_INFINITY {
        return;
    }
    if m2 > *m {
        *s = *s * (*m - m2).exp() + s2;
        *m = m2;
    } else if m2 == *m {
        *s += s2;
    } else {
        *s += s2 * (m2 - *m).exp();
    }
}

/// The forward on a prepared problem; `comm` for a sharded call, whose statistics are combined
/// across ranks (module [`crate::shard`]).
fn forward_core(
    mut p: Problem<'_>,
    inputs: &RowInputs<'_>,
    comm: Option<&dyn Communicator>,
) -> Result<Forward> {
    // CurricularFace's t and ElasticFace+'s order read every row's target cosine: sharded, its
    // owner gives it and the others zeros, a sum exact in any order.
    let cy = if p.needs_target_cosines() {
        let mut cy = p.target_cosines();
        if let Some(comm) = comm {
            comm.all_reduce_sum(&mut cy)?;
        }
        cy
    } else {
        Vec::new()
    };
    let (state, mut rows) = p.set_rows(inputs, &cy)?;
    drop(cy);
    let p = p;
    let (spec, shape, labels) = (p.spec, p.shape, p.labels);
    let b = shape.b;
    let mut lse = vec![0.0; b];
    let mut row_loss = vec![0.0; b];
    // Sharded: lse and row_loss hold this rank's (m, s) until the combine, zy its target logits.
    let mut zy_all = vec![0.0; if comm.is_some() { b } else { 0 }];
    let mut zy_blocks: Vec<&mut [f64]> = zy_all.chunks_mut(ROW_BLOCK).collect();
    zy_blocks.resize_with(b.div_ceil(ROW_BLOCK), || &mut []);
    // CurricularFace's hard negatives per row (what the forward decided, for inspection),
    // counted in the same pass.
    let curricular_tau = p.curricular.as_ref().map(|(_, tau)| tau);
    let mut hard = vec![0usize; if curricular_tau.is_some() { b } else { 0 }];
    let mut hard_blocks: Vec<&mut [usize]> = hard.chunks_mut(ROW_BLOCK).collect();
    hard_blocks.resize_with(b.div_ceil(ROW_BLOCK), || &mut []);
    let sharded = comm.is_some();
    lse.par_chunks_mut(ROW_BLOCK)
        .zip(row_loss.par_chunks_mut(ROW_BLOCK))
        .zip(hard_blocks.into_par_iter())
        .zip(zy_blocks.into_par_iter())
        .enumerate()
        .for_each(|(blk, (((lse_blk, loss_blk), hard_blk), zy_blk))| {
            let i0 = blk * ROW_BLOCK;
            let rows = lse_blk.len();
            // Online max / sum-exp per row, as the GPU does per class tile.
            let mut m = vec![f64::NEG_INFINITY; rows];
            let mut s = vec![0.0f64; rows];
            let mut zy = vec![0.0f64; rows];
            let tcol: Vec<Option<usize>> = (0..rows).map(|k| p.tcol(i0 + k)).collect();
            for j in 0..p.ncols {
                for k in 0..rows {
                    let i = i0 + k;
                    let cos = p.cosine(i, j).0;
                    let target = tcol[k] == Some(j);
                    let (z, _, _) = p.logit(i, target, cos);
                    if target {
                        zy[k] = z; // kept out of the sum: added below without cancellation
                    } else {
                        push_logit(&mut m[k], &mut s[k], z);
                        if let (Some(tau), true) = (curricular_tau, labels[i] >= 0) {
                            hard_blk[k] += (cos > tau[i]) as usize;
                        }
                    }
                }
            }
            for k in 0..rows {
                if sharded {
                    (lse_blk[k], loss_blk[k], zy_blk[k]) = (m[k], s[k], zy[k]);
                } else {
                    (lse_blk[k], loss_blk[k]) = finish_row(m[k], s[k], zy[k], labels[i0 + k] >= 0);
                }
            }
        });
    if let Some(comm) = comm {
        // One record per row, (max, sum-exp, target logit, owned), gathered from every rank and
        // merged in rank order: every rank gets the same bits.
        let world = comm.world_size();
        let mut send = Vec::with_capacity(4 * b);
        for i in 0..b {
            let owned = if p.tcol(i).is_some() { 1.0 } else { 0.0 };
            send.extend_from_slice(&[lse[i], row_loss[i], zy_all[i], owned]);
        }
        drop(zy_all);
        let mut recv = vec![0.0; 4 * b * world];
        comm.all_gather(&send, &mut recv)?;
        drop(send);
        let mut unowned = None;
        for i in 0..b {
            let (mut m, mut s, mut z, mut owners) = (f64::NEG_INFINITY, 0.0, 0.0, 0);
            for r in 0..world {
                let rec = &recv[4 * (r * b + i)..4 * (r * b + i) + 4];
                merge_pair(&mut m, &mut s, rec[0], rec[1]);
                if rec[3] != 0.0 {
                    z = rec[2];
                    owners += 1;
                }
            }
            let counted = labels[i] >= 0;
            if counted && owners != 1 && unowned.is_none() {
                unowned = Some((i, owners));
            }
            (lse[i], row_loss[i]) = finish_row(m, s, z, counted);
        }
        if let Some((row, owners)) = unowned {
            return Err(Error::Collective {
                op: "shard combine",
                detail: format!(
                    "row {row}'s target class {} is held by {owners} ranks, not one: the \
                     shards do not tile the classes",
                    labels[row]
                ),
                source: None,
            });
        }
        if !hard.is_empty() {
            let mut h: Vec<f64> = hard.iter().map(|&n| n as f64).collect();
            comm.all_reduce_sum(&mut h)?;
            hard.iter_mut().zip(&h).for_each(|(n, &v)| *n = v as usize);
        }
    }
    rows.hard = hard;
    // MagFace: the regularizer joins each counted row's loss; the cross entropy stays apart for
    // the backward's target entry expm1(-l_i).
    if let Variant::MagFace(g) = spec.variant {
        rows.ce = row_loss.clone();
        for (i, l) in row_loss.iter_mut().enumerate() {
            if labels[i] >= 0 {
                let (a, _, _) = math::magface_row(&g, p.x.norm[i]);
                *l += g.lambda_g * math::magface_reg(&g, a).0;
            }
        }
    }
    let total: f64 = row_loss.iter().sum();
    let loss = match spec.reduction {
        Reduction::Mean if p.counted == 0 => 0.0,
        Reduction::Mean => total / p.counted as f64,
        Reduction::Sum | Reduction::None => total,
    };
    Ok(Forward {
        loss,
        row_loss,
        lse,
        x_norm: p.x.norm.clone(),
        w_norm: p.w.norm.clone(),
        counted: p.counted,
        labels_fingerprint: Shape::labels_fingerprint(labels),
        spec: *spec,
        shape,
        inputs_fingerprint: inputs_fingerprint(&p),
        state,
        rows,
    })
}

/// [`Forward::inputs_fingerprint`] of a problem: x's and w's row hashes combined.
fn inputs_fingerprint(p: &Problem<'_>) -> u64 {
    p.x.fingerprint.rotate_left(32) ^ p.w.fingerprint.wrapping_mul(0x94d0_49bb_1331_11eb)
}

/// Backward pass (MATH.md "Backward"): `dx` (B x D) and `dw` (C x D) in f64, from the saved
/// logsumexp of `fwd` (the logits are recomputed, as the fused GPU plan does).
///
/// `upstream` is `Upstream::Scalar` for mean/sum (usually [`Upstream::ONE`]) and
/// `Upstream::PerRow` (B values) for `Reduction::None`. `fwd` must come from [`forward`] with the
/// same spec, shape and inputs: another spec or shape, other labels (a fingerprint of their values
/// and order: permuted labels too), or other `x` / `w` is [`Error::ForwardMismatch`]. Inputs are
/// compared by their row norms (the error names the first row that differs) and by a 64-bit
/// fingerprint of every element's bits, so a change that keeps every row norm (a permuted or
/// rotated row) is caught too; both cost O(B*D + C*D), next to the backward's O(B*C*D). A spec
/// that is itself invalid (a field of `fwd.spec` edited after the forward) is
/// [`Error::InvalidSpec`].
///
/// # Memory
///
/// Besides the inputs and the returned gradients, the backward holds the inputs in f64
/// (`8 * (B*D + C*D)` bytes), the gradient accumulators (`8 * (B*D + C*D)`), one class chunk of
/// `dc` (`8 * B * min(C, 512)`) and per-row and per-class values: at most
/// `8 * (2*B*D + 2*C*D + B*min(C, 512) + 6*B + 3*C)` bytes whatever the ratio of B to C
/// ([`forward`]: `8 * (B*D + C*D + 6*B + 3*C)`; both measured by `tests/memory.rs`). For the
/// losses with state ([`crate::variant`]) read `C` as the `C*K` rows of `w` (sub-centers) in the
/// `C*D` and `3*C` terms, and add `8 * 12*B` bytes of per-row margins and thresholds and, with
/// sub-centers, `B * min(C, 512)` bytes of winners (to both bounds).
pub fn backward<T: Element>(
    spec: &MarginLoss,
    fwd: &Forward,
    x: &[T],
    w: &[T],
    labels: &[i32],
    shape: Shape,
    upstream: Upstream<'_>,
) -> Result<Gradients> {
    check_spec(spec, fwd)?;
    if fwd.shape != shape {
        return Err(Error::ForwardMismatch {
            detail: format!("forward shape {:?}, backward shape {:?}", fwd.shape, shape),
        });
    }
    let mut p = Problem::new(spec, x, w, labels, shape)?;
    p.restore_rows(fwd)?;
    let p = p;
    check_backward(&p, fwd)?;
    let g = upstream.per_row(spec.reduction, labels)?;
    let (dxh, dn, dwh) = grad_core(&p, fwd, &g);
    let dx = finish_dx(&p, dxh, &dn, 0..shape.b);
    let dw = finish_dw(&p, dwh);
    Ok(Gradients { dx, dw })
}

/// The backward's spec is valid and the forward's: an invalid spec is named as such, before it
/// is compared with the forward's.
fn check_spec(spec: &MarginLoss, fwd: &Forward) -> Result<()> {
    spec.validate()?;
    fwd.spec.validate()?;
    if fwd.spec != *spec {
        return Err(Error::ForwardMismatch {
            detail: format!("forward spec {:?}, backward spec {:?}", fwd.spec, spec),
        });
    }
    Ok(())
}

/// The backward's checks of `fwd` against the recomputed problem: the same inputs and labels.
fn check_backward(p: &Problem<'_>, fwd: &Forward) -> Result<()> {
    let (shape, labels) = (p.shape, p.labels);
    if fwd.lse.len() != shape.b || fwd.row_loss.len() != shape.b || fwd.counted != p.counted {
        return Err(Error::ForwardMismatch {
            detail: format!(
                "forward counted {} rows with {} lse and {} row-loss values, these labels count                  {} of B = {}",
                fwd.counted,
                fwd.lse.len(),
                fwd.row_loss.len(),
                p.counted,
                shape.b
            ),
        });
    }
    if fwd.labels_fingerprint != Shape::labels_fingerprint(labels) {
        return Err(Error::ForwardMismatch {
            detail: format!(
                "labels differ from the forward's (both count {} of B = {} rows: other values or \
                 another order)",
                p.counted, shape.b
            ),
        });
    }
    // A forward of other `x` or `w` (same spec and shape) would give silently wrong gradients: its
    // lse belongs to other logits. The norms were just recomputed, so comparing them with the
    // saved ones (bitwise: the same inputs give the same bits, NaN included) costs O(B + C).
    for (what, saved, now) in [("x", &fwd.x_norm, &p.x.norm), ("w", &fwd.w_norm, &p.w.norm)] {
        if saved.len() != now.len() {
            return Err(Error::ForwardMismatch {
                detail: format!(
                    "forward saved {} norms of {what}, these inputs have {} rows",
                    saved.len(),
                    now.len()
                ),
            });
        }
        if let Some(row) = (0..now.len()).find(|&k| saved[k].to_bits() != now[k].to_bits()) {
            return Err(Error::ForwardMismatch {
                detail: format!(
                    "{what} differs from the forward's: row {row} has norm {} here, {} at forward",
                    now[row], saved[row]
                ),
            });
        }
    }
    if fwd.inputs_fingerprint != inputs_fingerprint(p) {
        return Err(Error::ForwardMismatch {
            detail: "x or w differs from the forward's (every row norm is the same, the values \
                     are not: a permuted, rotated or otherwise edited row)"
                .into(),
        });
    }
    Ok(())
}

/// `dxh` (B x D), `dn` (B) and `dwh` (the call's `ncols*K` rows x D) before the normalization's
/// backward: over this call's columns only (sharded: one rank's part of `dxh` and `dn`).
fn grad_core(p: &Problem<'_>, fwd: &Forward, g: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let spec = p.spec;
    let (b, d, c) = (p.shape.b, p.shape.d, p.ncols);

    // dxh_i = sum_j dc_ij wh_j; dn_i = d loss / d|x_i| from the row scale (s * sum_j dz_ij t_ij,
    // only without feature normalization) and MagFace's norm-dependent margin and regularizer.
    let mut dxh = vec![0.0f64; b * d];
    let mut dn = vec![0.0f64; b];
    let k = p.k;
    let mut dwh = vec![0.0f64; c * k * d];
    // MagFace's target entry reads the cross entropy alone (row_loss adds the regularizer).
    let ce = if fwd.rows.ce.is_empty() {
        &fwd.row_loss
    } else {
        &fwd.rows.ce
    };
    // One class chunk of dc at a time: B x min(C, CLASS_CHUNK) values, so a large batch with few
    // classes allocates by its real width (B = 500,000 with C = 1 asked for 2 GB at a fixed 512).
    let chunk = CLASS_CHUNK.min(c).max(1);
    let mut dc = vec![0.0f64; b * chunk];
    // With sub-centers, the winner of each (row, class) of the chunk: dc goes to it alone.
    let mut win = vec![0u8; if k > 1 { b * chunk } else { 0 }];
    for j0 in (0..c).step_by(chunk) {
        let cols = chunk.min(c - j0);
        // dc for this class chunk, row blocks in parallel; each block owns its rows of dxh and dn.
        let win_blocks: Vec<&mut [u8]> = if k > 1 {
            win.chunks_mut(ROW_BLOCK * chunk).collect()
        } else {
            (0..b.div_ceil(ROW_BLOCK)).map(|_| &mut [][..]).collect()
        };
        dc.par_chunks_mut(ROW_BLOCK * chunk)
            .zip(dxh.par_chunks_mut(ROW_BLOCK * d))
            .zip(dn.par_chunks_mut(ROW_BLOCK))
            .zip(win_blocks.into_par_iter())
            .enumerate()
            .for_each(|(blk, (((dc_blk, dxh_blk), dn_blk), win_blk))| {
                let i0 = blk * ROW_BLOCK;
                for (r, dn_i) in dn_blk.iter_mut().enumerate() {
                    let i = i0 + r;
                    let tcol = p.tcol(i);
                    let row = &mut dc_blk[r * chunk..r * chunk + cols];
                    if g[i] == 0.0 {
                        row.fill(0.0);
                        continue;
                    }
                    let dxh_i = &mut dxh_blk[r * d..(r + 1) * d];
                    let s_i = p.margin(i).s;
                    for (jj, dc_ij) in row.iter_mut().enumerate() {
                        let j = j0 + jj;
                        let (cos, kw) = p.cosine(i, j);
                        if k > 1 {
                            win_blk[r * chunk + jj] = kw as u8;
                        }
                        let wj = p.wh(j * k + kw);
                        let target = tcol == Some(j);
                        let (z, t, dt) = p.logit(i, target, cos);
                        // softmax - onehot; at the target p_y - 1 = expm1(-l_i) from the forward's
                        // l_i, exact where exp(z - lse) - 1 would cancel.
                        let dz = if target {
                            g[i] * (-ce[i]).exp_m1()
                        } else {
                            g[i] * (z - fwd.lse[i]).exp()
                        };
                        if !spec.normalize_features {
                            *dn_i += s_i * dz * t;
                        }
                        if let (Variant::MagFace(mg), true) = (spec.variant, target) {
                            // m2_i = l_m + q (a_i - l_a) with a_i the clamped norm: inside the
                            // clamp, dz_iy r_i dtarget/dm2 q and the regularizer's
                            // g_i lambda_g g'(a_i) reach |x_i|.
                            let (a, _, live) = math::magface_row(&mg, p.x.norm[i]);
                            if live {
                                let dm2 = math::target_dm2(spec, &p.margin(i), cos);
                                *dn_i += dz * p.r[i] * dm2 * math::magface_slope(&mg)
                                    + g[i] * mg.lambda_g * math::magface_reg(&mg, a).1;
                            }
                        }
                        *dc_ij = p.r[i] * dz * dt;
                        for (a, wv) in dxh_i.iter_mut().zip(wj) {
                            *a += *dc_ij * wv;
                        }
                    }
                }
            });
        // dwh_j = sum_i dc_ij xh_i (to the winning sub-center); each class owns its K rows.
        dwh[j0 * k * d..(j0 + cols) * k * d]
            .par_chunks_mut(k * d)
            .enumerate()
            .for_each(|(jj, dwh_j)| {
                for i in 0..b {
                    let v = dc[i * chunk + jj];
                    if v != 0.0 {
                        let kw = if k > 1 {
                            win[i * chunk + jj] as usize
                        } else {
                            0
                        };
                        for (a, xv) in dwh_j[kw * d..(kw + 1) * d].iter_mut().zip(p.xh(i)) {
                            *a += v * xv;
                        }
                    }
                }
            });
    }

    (dxh, dn, dwh)
}

/// Back through the normalization, the derivative of vh = v / max(|v|, eps):
/// dv = (dvh - vh (vh . dvh)) / |v| where |v| >= eps; dv = dvh / eps where |v| < eps (vh is
/// then v / eps, linear in v: no projection term). Written in place over the accumulators.
fn unnormalize(dvh: &mut [f64], vh: &[f64], norm: f64) {
    if norm < NORM_EPS {
        dvh.iter_mut().for_each(|a| *a /= NORM_EPS);
    } else {
        let proj = dot(vh, dvh);
        let inv = 1.0 / norm;
        for (a, v) in dvh.iter_mut().zip(vh) {
            *a = (*a - v * proj) * inv;
        }
    }
}

/// `dx` of the global rows `rows` from their `dxh` and `dn` (in place over `dxh`).
fn finish_dx(p: &Problem<'_>, dxh: Vec<f64>, dn: &[f64], rows: Range<usize>) -> Vec<f64> {
    let (spec, d) = (p.spec, p.shape.d);
    let mut dx = dxh;
    dx.par_chunks_mut(d)
        .zip(rows.into_par_iter())
        .enumerate()
        .for_each(|(k, (dx_i, i))| {
            let xh = p.xh(i);
            unnormalize(dx_i, xh, p.x.norm[i]);
            if !spec.normalize_features || matches!(spec.variant, Variant::MagFace(_)) {
                // Through |x_i| (the row scale s|x_i|, MagFace's margin and regularizer):
                // d|x_i|/dx_i = xh_i.
                for (a, v) in dx_i.iter_mut().zip(xh) {
                    *a += dn[k] * v;
                }
            }
        });
    dx
}

/// `dw` of the call's rows from `dwh` (in place).
fn finish_dw(p: &Problem<'_>, dwh: Vec<f64>) -> Vec<f64> {
    let mut dw = dwh;
    if p.spec.normalize_weights {
        dw.par_chunks_mut(p.shape.d)
            .enumerate()
            .for_each(|(j, dw_j)| unnormalize(dw_j, p.wh(j), p.w.norm[j]));
    }
    dw
}

/// What [`shard_forward`] returns on each rank: the global rows' results (every rank holds the
/// same `loss`, `row_loss`, `lse`, state and per-row values, bit for bit) and what the backward
/// must find again. [`Forward::w_norm`] holds the norms of this rank's rows of `w` that the call
/// used (the sampled ones with Partial FC); [`Forward::shape`] is the global shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardForward {
    /// The global rows' results.
    pub forward: Forward,
    /// This rank's classes.
    pub shard: ClassShard,
    /// The sampled classes the call used, if any.
    pub sampled: Option<Sampled>,
    /// The rank and world size of the call.
    pub rank: usize,
    /// See [`rank`](Self::rank).
    pub world_size: usize,
}

/// What [`shard_backward`] returns on each rank.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardGradients {
    /// `dL/dx` of the global rows `dx_rows` (row-major), reduced as
    /// [`ShardOptions::dx`](crate::shard::ShardOptions::dx) asked.
    pub dx: Vec<f64>,
    /// The global rows `dx` holds: this rank's `r*B/W .. (r+1)*B/W` for
    /// [`DxReduce::Owner`], `0..B` otherwise.
    pub dx_rows: Range<usize>,
    /// `dL/dw` of this rank's rows: all `num_local*K` without sampling; with it, the sampled
    /// classes' rows in index order ([`DwLayout::Sampled`]) or all rows with zeros for the others
    /// ([`DwLayout::Full`]).
    pub dw: Vec<f64>,
}

/// A fingerprint of `v`'s values' bits.
fn f64_fingerprint(h: u64, v: &[f64]) -> u64 {
    v.iter()
        .fold(h, |h, x| shard::fnv(h, &x.to_bits().to_le_bytes()))
}

/// The forward of a class-sharded problem on one rank (module [`crate::shard`]): `x` holds the
/// embeddings of the global batch (B x D, identical on every rank), `labels` its B global labels,
/// `shape` the global `(B, D, C)`, `w` this rank's `num_local*K` class rows (`K` sub-centers;
/// with Partial FC the call reads only the sampled classes' rows, through the index). Every rank
/// of the group calls it with the same spec, x, labels, shape and inputs; the results agree
/// across ranks bit for bit, are deterministic for a fixed world size, and equal [`forward_with`]
/// on the whole `w` (the sampled classes' rows, with sampling) to within f64 rounding (the
/// partial sums are added in another order; one rank gives the same bits).
///
/// Communication: one all-gather of 6 values per rank (the ranks' agreement: inputs accepted,
/// same arguments, the slices tile `0..C`), one all-gather of 4 f64 per row per rank (the
/// per-row records), and for CurricularFace and ElasticFace+ one all-reduce of B target cosines
/// (CurricularFace also of B hard-negative counts). Memory beyond [`forward_with`]'s for this
/// rank's classes: `8 * (4*B*(W + 2) + B)` bytes (the records sent and received, the target
/// logits, and [`crate::shard::ThreadComm`]'s copy of the send; `tests/memory.rs`).
///
/// Errors: any error of [`forward_with`] for this rank's inputs (its `w` length is
/// `num_local*K*D`), a sampled set not drawn for this shard or not keeping a positive, and
/// [`Error::Collective`] on every other rank when one rank's inputs fail, the ranks' arguments
/// differ, or the shards do not tile the classes; all before any work.
pub fn shard_forward<T: Element>(
    rank: &Rank<'_>,
    spec: &MarginLoss,
    x: &[T],
    w: &[T],
    labels: &[i32],
    shape: Shape,
    inputs: &RowInputs<'_>,
) -> Result<ShardForward> {
    let comm = rank.comm;
    let local = Problem::sharded(spec, x, w, labels, shape, &rank.shard, rank.sampled);
    let fp = local.as_ref().map_err(|_| ()).map(|p| {
        let mut h = shard::fnv(
            shard::FNV0,
            format!("{spec:?}{shape:?}{inputs:?}").as_bytes(),
        );
        h = shard::fnv(h, &Shape::labels_fingerprint(labels).to_le_bytes());
        h = shard::fnv(h, &p.x.fingerprint.to_le_bytes());
        shard::fnv(h, &(comm.world_size() as u64).to_le_bytes())
    });
    let agreed = shard::agree(comm, "shard forward", &rank.shard, fp);
    let p = local?;
    agreed?;
    let forward = forward_core(p, inputs, Some(comm))?;
    Ok(ShardForward {
        forward,
        shard: rank.shard,
        sampled: rank.sampled.cloned(),
        rank: comm.rank(),
        world_size: comm.world_size(),
    })
}

/// The backward of [`shard_forward`] on one rank: this rank's classes' part of `dL/dx` for every
/// row, reduced across ranks as `rank.options.dx` asks, and `dL/dw` of its rows
/// (`rank.options.dw` with sampling). `upstream` as for [`backward`] (the global rows'). Every
/// rank passes the same spec, x, labels, upstream and options and its own forward result, `w`
/// and rank; the checks of [`backward`] apply to each rank's inputs, and a rank whose checks
/// fail makes every other rank return [`Error::Collective`] before any work.
///
/// Communication: the agreement (6 values per rank), then for [`DxReduce::Owner`] one
/// reduce-scatter of `B*(D + 1)` f64, for [`DxReduce::Global`] one all-reduce of as many, for
/// [`DxReduce::Partial`] none. Memory as [`backward`]'s for this rank's classes, plus
/// `8 * (2*B + B/W)*(D + 1)` bytes for the reduction (the send, this rank's rows received, and
/// [`crate::shard::ThreadComm`]'s copy of the send; `tests/memory.rs`).
pub fn shard_backward<T: Element>(
    rank: &Rank<'_>,
    spec: &MarginLoss,
    fwd: &ShardForward,
    x: &[T],
    w: &[T],
    labels: &[i32],
    upstream: Upstream<'_>,
) -> Result<ShardGradients> {
    let comm = rank.comm;
    let (world, me) = (comm.world_size(), comm.rank());
    let opts = rank.options;
    let local = (|| {
        check_spec(spec, &fwd.forward)?;
        if fwd.shard != rank.shard || fwd.sampled.as_ref() != rank.sampled {
            return Err(Error::ForwardMismatch {
                detail: format!(
                    "the forward ran on shard {:?} with {} sampled classes, this backward on \
                     {:?} with {}",
                    fwd.shard,
                    fwd.sampled.as_ref().map_or(0, |s| s.index.len()),
                    rank.shard,
                    rank.sampled.map_or(0, |s| s.index.len())
                ),
            });
        }
        if (fwd.rank, fwd.world_size) != (me, world) {
            return Err(Error::ForwardMismatch {
                detail: format!(
                    "the forward ran as rank {} of {}, this backward as rank {me} of {world}",
                    fwd.rank, fwd.world_size
                ),
            });
        }
        let shape = fwd.forward.shape;
        let mut p = Problem::sharded(spec, x, w, labels, shape, &rank.shard, rank.sampled)?;
        p.restore_rows(&fwd.forward)?;
        check_backward(&p, &fwd.forward)?;
        let g = upstream.per_row(spec.reduction, labels)?;
        let rows = match opts.dx {
            DxReduce::Owner => shard::owner_rows(shape.b, world, me)?,
            DxReduce::Global | DxReduce::Partial => 0..shape.b,
        };
        Ok((p, g, rows))
    })();
    let fp = local.as_ref().map_err(|_| ()).map(|(p, g, _)| {
        let mut h = shard::fnv(shard::FNV0, format!("{spec:?}{opts:?}").as_bytes());
        h = shard::fnv(h, &Shape::labels_fingerprint(labels).to_le_bytes());
        h = shard::fnv(h, &p.x.fingerprint.to_le_bytes());
        h = f64_fingerprint(h, g);
        f64_fingerprint(h, &fwd.forward.lse)
    });
    let agreed = shard::agree(comm, "shard backward", &rank.shard, fp);
    let (p, g, rows) = local?;
    agreed?;
    let (b, d) = (p.shape.b, p.shape.d);
    let (dxh, dn, dwh) = grad_core(&p, &fwd.forward, &g);
    let dx = match opts.dx {
        DxReduce::Partial => finish_dx(&p, dxh, &dn, rows.clone()),
        DxReduce::Global => {
            // One all-reduce of (dxh, dn); every rank then finishes every row.
            let mut buf = dxh;
            buf.extend_from_slice(&dn);
            drop(dn);
            comm.all_reduce_sum(&mut buf)?;
            let dn = buf.split_off(b * d);
            finish_dx(&p, buf, &dn, rows.clone())
        }
        DxReduce::Owner => {
            // Block r of the send: rank r's rows of dxh, then of dn; one reduce-scatter.
            let n = rows.len();
            let mut send = Vec::with_capacity(b * (d + 1));
            for r in 0..world {
                send.extend_from_slice(&dxh[r * n * d..(r + 1) * n * d]);
                send.extend_from_slice(&dn[r * n..(r + 1) * n]);
            }
            drop((dxh, dn));
            let mut recv = vec![0.0; n * (d + 1)];
            comm.reduce_scatter_sum(&send, &mut recv)?;
            drop(send);
            let dn = recv.split_off(n * d);
            finish_dx(&p, recv, &dn, rows.clone())
        }
    };
    let mut dw = finish_dw(&p, dwh);
    if let (Some(sm), DwLayout::Full) = (rank.sampled, opts.dw) {
        let per = p.k * d;
        let mut full = vec![0.0; rank.shard.num_local * per];
        for (col, &j) in sm.index.iter().enumerate() {
            full[j as usize * per..(j as usize + 1) * per]
                .copy_from_slice(&dw[col * per..(col + 1) * per]);
        }
        dw = full;
    }
    Ok(ShardGradients {
        dx,
        dx_rows: rows,
        dw,
    })
}
