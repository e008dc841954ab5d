//! The class-sharded loss on the GPU (module [`crate::shard`]): one rank's forward and backward
//! on its slice of the class weights, the per-row records combined across ranks through the
//! caller's [`Communicator`] (the plan's exchange step, [`plan::shard_forward`]).

use super::{FusedMarginLoss, LabelCheck};
use crate::cuda::launch::{cuda_err, CudaElement};
use crate::cuda::plan;
use crate::cuda::results::{DeviceUpstream, GpuBackwardRun, GpuForwardOut, GpuSaved, GpuUpstream};
use crate::cuda::{CudaSlice, CudaView, Plan};
use crate::error::{Error, Result};
use crate::shard::{self, ClassShard, Communicator, DwLayout, DxReduce, Rank, Sampled};
use crate::spec::{MarginLoss, Shape};
use crate::variant::RowInputs;
use std::ops::Range;

/// What the sharded path hands the forward: the group, and the local labels' host check.
pub(in crate::cuda) struct ShardCtx<'a> {
    pub comm: &'a dyn Communicator,
    pub world: usize,
    /// (counted rows, fingerprint) of the local labels.
    pub labels: (usize, u64),
    /// Partial FC: the sampled classes on the device and the classes of `w` (`num_local`).
    pub widx: Option<(CudaSlice<i32>, usize)>,
    /// How many of the plan's exchanges have called the communicator (set by the executor).
    pub exchanged: &'a std::cell::Cell<usize>,
}

/// A rank's result of [`FusedMarginLoss::shard_forward`]: the global rows' loss and row losses
/// (the same bits on every rank), what its backward needs, and the rank's labels as the kernels
/// see them (its classes local, another rank's as `num_local`).
#[derive(Debug)]
pub struct GpuShardForward {
    /// The reduced loss over the global batch, 1 f32.
    pub loss: CudaSlice<f32>,
    /// The global rows' losses, B f32.
    pub row_loss: CudaSlice<f32>,
    /// The logsumexp, norms and target record, as a plain forward keeps them (`w_norm`: this
    /// rank's rows).
    pub saved: GpuSaved,
    labels: CudaSlice<i32>,
    /// The global labels' fingerprint (the ranks compare it again in the backward).
    labels_fingerprint: u64,
    /// This rank's classes.
    pub shard: ClassShard,
    /// The sampled classes the call used (Partial FC), if any.
    pub sampled: Option<Sampled>,
    /// The rank and world size of the call.
    pub rank: usize,
    /// See [`rank`](Self::rank).
    pub world_size: usize,
}

impl GpuShardForward {
    /// Copies the loss to the host (synchronizes the stream).
    pub fn loss_host(&self) -> Result<f32> {
        let v = self
            .saved
            .stream
            .clone_dtoh(&self.loss)
            .map_err(|e| cuda_err("copy loss to host", e))?;
        Ok(v[0])
    }

    /// The rank's labels as its kernels read them, B i32.
    pub fn local_labels(&self) -> &CudaSlice<i32> {
        &self.labels
    }
}

/// A rank's result of [`FusedMarginLoss::shard_backward`], in f32.
#[derive(Debug)]
pub struct GpuShardGradients {
    /// `dL/dx` of the global rows `dx_rows`, reduced across ranks as the options asked.
    pub dx: CudaSlice<f32>,
    /// The global rows `dx` holds.
    pub dx_rows: Range<usize>,
    /// `dL/dw` of this rank's rows: all `num_local*K` without sampling; with it the sampled
    /// classes' rows in index order ([`DwLayout::Sampled`]) or all rows with zeros for the
    /// others ([`DwLayout::Full`]).
    pub dw: CudaSlice<f32>,
    /// What ran.
    pub run: GpuBackwardRun,
}

/// The local labels' (counted, fingerprint) for the backward of a sharded forward: each label
/// negative or at most `C` (`C` marks another rank's class).
pub(super) fn local_label_state(
    h: &FusedMarginLoss,
    labels: &CudaView<'_, i32>,
    shape: Shape,
) -> Result<(usize, u64)> {
    let host = h
        .stream
        .clone_dtoh(labels)
        .map_err(|e| cuda_err("copy labels to host for validation", e))?;
    let mut counted = 0;
    for (row, &y) in host.iter().enumerate() {
        if y >= 0 {
            if y as usize > shape.c {
                return Err(Error::LabelOutOfRange {
                    row,
                    label: y as i64,
                    classes: shape.c + 1,
                });
            }
            counted += 1;
        }
    }
    Ok((counted, Shape::labels_fingerprint(&host)))
}

fn fingerprint(parts: &str, more: &[u64]) -> u64 {
    let h = shard::fnv(shard::FNV0, parts.as_bytes());
    more.iter().fold(h, |h, v| shard::fnv(h, &v.to_le_bytes()))
}

impl FusedMarginLoss {
    /// The forward of one rank of a class-sharded call (module [`crate::shard`]), on the GPU:
    /// `x` holds the global batch's embeddings (B x D, the same on every rank), `labels` its B
    /// global labels, `shape` the global `(B, D, C)`, `w` this rank's `num_local*K` class rows.
    /// The fused forward runs on the rank's classes; each row's record (max, sum-exp, target
    /// logit, MagFace's regularizer, owned) goes through `rank.comm` (an all-gather of 5 values
    /// per row per rank, through the host), and every rank merges the records in rank order:
    /// the same loss and row losses, bit for bit, on every rank, deterministic for a fixed world
    /// size. Labels are checked and mapped on the host (one copy of B labels), whatever the
    /// handle's [`LabelCheck`].
    ///
    /// With Partial FC (`rank.sampled`) the kernels read the sampled classes' rows of `w`
    /// through the index (no gathered copy of `w`); every target of this rank must be sampled
    /// ([`crate::shard::PartialFc::sample`] keeps them).
    ///
    /// Runs every loss on the fused plan (CurricularFace and ElasticFace+ first all-gather each
    /// row's target cosine from its owner); the naive plan is [`Error::Unsupported`], before any
    /// collective. Every rank learns of another rank's bad input through the agreement step
    /// ([`Error::Collective`]), and of a failure after it through the exchange it would have
    /// joined.
    #[allow(clippy::too_many_arguments)] // the plain forward's, plus the rank
    pub fn shard_forward<T: CudaElement>(
        &self,
        rank: &Rank<'_>,
        spec: &MarginLoss,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        labels: &CudaView<'_, i32>,
        shape: Shape,
        inputs: &RowInputs<'_>,
    ) -> Result<GpuShardForward> {
        let comm = rank.comm;
        let local = (|| {
            spec.validate()?;
            if self.options.plan != Plan::Fused {
                return Err(Error::Unsupported {
                    detail: "a class-sharded forward runs the fused plan".into(),
                });
            }
            if shape.c != rank.shard.num_classes {
                return Err(Error::InvalidArgument {
                    what: "shard",
                    detail: format!(
                        "the shard is of C = {} classes, the shape has C = {}",
                        rank.shard.num_classes, shape.c
                    ),
                });
            }
            let wshape = Shape {
                c: rank.shard.num_local,
                ..shape
            };
            self.check_inputs(spec, x, w, labels, wshape)?;
            let cols = match rank.sampled {
                None => rank.shard.num_local,
                Some(sm) => {
                    sm.check(&rank.shard)?;
                    if sm.index.is_empty() {
                        // (The CPU path runs a rank without columns; the kernels' grids need one.)
                        return Err(Error::InvalidArgument {
                            what: "sampled",
                            detail: "no class sampled on this rank: raise the rate".into(),
                        });
                    }
                    sm.index.len()
                }
            };
            let lshape = Shape { c: cols, ..shape };
            spec.variant.check_inputs(inputs, shape.b)?;
            // The plan's own refusals, before any collective.
            let probe = plan::ForwardProblem {
                dtype: T::DTYPE,
                shape: lshape,
                aligned: true,
                params: crate::cuda::params::FmParams::from_spec(spec),
                mean: false,
                row_margins: plan::row_margins(spec, inputs, shape.b)?.is_some(),
            };
            let mut ch = self.choices();
            ch.label_check = LabelCheck::Host;
            plan::shard_forward(
                &self.device_facts(),
                &ch,
                &probe,
                comm.world_size(),
                rank.sampled.is_some(),
            )?;
            let host = self
                .stream
                .clone_dtoh(labels)
                .map_err(|e| cuda_err("copy labels to host for validation", e))?;
            let local = shard::column_labels(&host, &rank.shard, rank.sampled)?;
            Ok((host, local, lshape))
        })();
        let fp = local.as_ref().map_err(|_| ()).map(|(host, _, _)| {
            fingerprint(
                &format!("{spec:?}{shape:?}{inputs:?}{:?}", T::DTYPE),
                &[Shape::labels_fingerprint(host), comm.world_size() as u64],
            )
        });
        let agreed = shard::agree(comm, "shard forward", &rank.shard, fp);
        let (host, local, lshape) = local?;
        agreed?;
        let labels_fingerprint = Shape::labels_fingerprint(&host);
        // From here on a failure on this rank alone must not leave the others waiting in the
        // exchange: if it comes before this rank's exchange, this rank still takes part, with
        // records that say it failed (every rank then returns an error).
        let exchanged = std::cell::Cell::new(0usize);
        let run = || -> Result<GpuShardForward> {
            self.shard_forward_run(rank, spec, x, w, &local, lshape, inputs, &exchanged)
                .map(|mut f| {
                    f.labels_fingerprint = labels_fingerprint;
                    f
                })
        };
        let out = run();
        // The plan's exchanges in order: the target cosines (CurricularFace, ElasticFace+), then
        // the records. A rank that failed takes part in the next one it missed, with values
        // that say so; the others then stop there with an error.
        let cosines = matches!(spec.variant, crate::Variant::CurricularFace(_))
            || matches!(spec.variant, crate::Variant::ElasticFace(e) if e.plus != crate::ElasticPlus::None);
        let lens: Vec<usize> = if cosines {
            vec![2 * shape.b, plan::SHARD_REC * shape.b]
        } else {
            vec![plan::SHARD_REC * shape.b]
        };
        if let (Err(_), Some(&n)) = (&out, lens.get(exchanged.get())) {
            let failed = vec![crate::cuda::exec::FAILED_RECORD; n];
            let mut all = vec![0.0; n * comm.world_size()];
            let _ = comm.all_gather(&failed, &mut all);
        }
        out
    }

    /// [`Self::shard_forward`] after the agreement: the labels and index to the device, the
    /// sharded plan.
    #[allow(clippy::too_many_arguments)]
    fn shard_forward_run<T: CudaElement>(
        &self,
        rank: &Rank<'_>,
        spec: &MarginLoss,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        local: &[i32],
        lshape: Shape,
        inputs: &RowInputs<'_>,
        exchanged: &std::cell::Cell<usize>,
    ) -> Result<GpuShardForward> {
        let comm = rank.comm;
        let counted = local.iter().filter(|&&y| y >= 0).count();
        let dev_labels = self
            .stream
            .clone_htod(local)
            .map_err(|e| cuda_err("copy the rank's labels", e))?;
        let widx = match rank.sampled {
            Some(sm) => {
                let idx: Vec<i32> = sm.index.iter().map(|&j| j as i32).collect();
                let dev = self
                    .stream
                    .clone_htod(&idx)
                    .map_err(|e| cuda_err("copy the sampled classes", e))?;
                Some((dev, rank.shard.num_local))
            }
            None => None,
        };
        let ctx = ShardCtx {
            comm,
            world: comm.world_size(),
            labels: (counted, Shape::labels_fingerprint(local)),
            widx,
            exchanged,
        };
        let mut saved = self.forward_impl(
            spec,
            x,
            w,
            &dev_labels.as_view(),
            lshape,
            GpuForwardOut::default(),
            None,
            inputs,
            Some(ctx),
        )?;
        match (saved.loss.take(), saved.row_loss.take()) {
            (Some(loss), Some(row_loss)) => Ok(GpuShardForward {
                loss,
                row_loss,
                saved,
                labels: dev_labels,
                labels_fingerprint: 0,
                shard: rank.shard,
                sampled: rank.sampled.cloned(),
                rank: comm.rank(),
                world_size: comm.world_size(),
            }),
            _ => Err(Error::InvalidArgument {
                what: "launch plan",
                detail: "the sharded forward kept no loss or no row losses".into(),
            }),
        }
    }

    /// The backward of [`Self::shard_forward`] on one rank, gradients in f32: this rank's part
    /// of `dL/dx` for every row (its classes' terms, through the normalization), reduced across
    /// ranks as `rank.options.dx` asks ([`DxReduce::Owner`]: a reduce-scatter, rank `r` gets
    /// rows `r*B/W .. (r+1)*B/W`; `Global`: an all-reduce; `Partial`: none), each through the
    /// host in f64; and `dL/dw` of its rows (with Partial FC, as `rank.options.dw` asks: the
    /// sampled rows, or the full slice by `fm_gather_rows`). `upstream` as for
    /// [`Self::backward`] (the global rows'; the same on every rank).
    pub fn shard_backward<T: CudaElement>(
        &self,
        rank: &Rank<'_>,
        fwd: &GpuShardForward,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        upstream: GpuUpstream<'_>,
    ) -> Result<GpuShardGradients> {
        let comm = rank.comm;
        let (world, me) = (comm.world_size(), comm.rank());
        let opts = rank.options;
        let shape = fwd.saved.shape;
        let local = (|| {
            if fwd.sampled.as_ref() != rank.sampled {
                return Err(Error::ForwardMismatch {
                    detail: format!(
                        "the forward ran with {} sampled classes, this backward with {}",
                        fwd.sampled.as_ref().map_or(0, |s| s.index.len()),
                        rank.sampled.map_or(0, |s| s.index.len())
                    ),
                });
            }
            if fwd.shard != rank.shard || (fwd.rank, fwd.world_size) != (me, world) {
                return Err(Error::ForwardMismatch {
                    detail: format!(
                        "the forward ran on {:?} as rank {} of {}, this backward on {:?} as rank \
                         {me} of {world}",
                        fwd.shard, fwd.rank, fwd.world_size, rank.shard
                    ),
                });
            }
            match opts.dx {
                DxReduce::Owner => shard::owner_rows(shape.b, world, me),
                DxReduce::Global | DxReduce::Partial => Ok(0..shape.b),
            }
        })();
        let up = match upstream {
            DeviceUpstream::Scalar(v) => v.to_bits() as u64,
            DeviceUpstream::PerRow(v) => v.len() as u64 | 1 << 40,
        };
        // The global problem's (the saved shape is this rank's columns).
        let global = (shape.b, shape.d, rank.shard.num_classes);
        let fp = local.as_ref().map_err(|_| ()).map(|_| {
            fingerprint(
                &format!("{:?}{opts:?}{global:?}", fwd.saved.spec),
                &[up, fwd.labels_fingerprint],
            )
        });
        let agreed = shard::agree(comm, "shard backward", &rank.shard, fp);
        let rows = local?;
        agreed?;
        let labels = fwd.labels.as_view();
        let (b, d) = (shape.b, shape.d);
        let to_host = |v: &CudaSlice<f32>| -> Result<Vec<f64>> {
            let h = self
                .stream
                .clone_dtoh(v)
                .map_err(|e| cuda_err("copy dx to the host for its reduction", e))?;
            Ok(h.into_iter().map(f64::from).collect())
        };
        let to_dev = |v: &[f64]| -> Result<CudaSlice<f32>> {
            let n: Vec<f32> = v.iter().map(|&e| e as f32).collect();
            self.stream
                .clone_htod(&n)
                .map_err(|e| cuda_err("copy the reduced dx", e))
        };
        let work = (|| {
            let g = self.backward_owned::<T, f32>(&fwd.saved, x, w, &labels, upstream, None)?;
            let host = match opts.dx {
                DxReduce::Partial => None,
                DxReduce::Global | DxReduce::Owner => Some(to_host(&g.dx)?),
            };
            Ok::<_, Error>((g, host))
        })();
        if opts.dx != DxReduce::Partial {
            // Every rank says whether it has its part of dx before the reduction, so a failure
            // on one rank is an error on all of them, not a wait.
            let mut failed = [if work.is_ok() { 0.0 } else { 1.0 }];
            comm.all_reduce_sum(&mut failed)?;
            if failed[0] > 0.0 && work.is_ok() {
                return Err(Error::Collective {
                    op: "shard backward",
                    detail: format!(
                        "{} rank(s) failed before the dx reduction; this rank (rank {me}) stops",
                        failed[0]
                    ),
                    source: None,
                });
            }
        }
        let (g, host) = work?;
        let dx = match (opts.dx, host) {
            (DxReduce::Global, Some(mut host)) => {
                comm.all_reduce_sum(&mut host)?;
                to_dev(&host)?
            }
            (DxReduce::Owner, Some(host)) => {
                let mut mine = vec![0.0; rows.len() * d];
                debug_assert_eq!(host.len(), b * d);
                comm.reduce_scatter_sum(&host, &mut mine)?;
                to_dev(&mine)?
            }
            _ => g.dx,
        };
        let dw = match (rank.sampled, opts.dw) {
            (Some(sm), DwLayout::Full) => self.full_dw(sm, &rank.shard, fwd, (x, w), &g.dw)?,
            _ => g.dw,
        };
        Ok(GpuShardGradients {
            dx,
            dx_rows: rows,
            dw,
            run: g.run,
        })
    }

    /// The sampled rows' `dw` in the rank's full layout ([`plan::full_dw`]; `fm_gather_rows` of
    /// the call's dtype unit, which `xw` and the forward's labels bind as any plan's inputs).
    fn full_dw<T: CudaElement>(
        &self,
        sm: &Sampled,
        sh: &ClassShard,
        fwd: &GpuShardForward,
        xw: (&CudaView<'_, T>, &CudaView<'_, T>),
        dw: &CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>> {
        let k = fwd.saved.spec.variant.centers();
        let mut inv = vec![-1i32; sh.num_local];
        for (col, &j) in sm.index.iter().enumerate() {
            inv[j as usize] = col as i32;
        }
        let inv = self
            .stream
            .clone_htod(&inv)
            .map_err(|e| cuda_err("copy the inverse index", e))?;
        let lp = plan::full_dw(sh.num_local, k, fwd.saved.shape.d)?;
        let kern = self.kernels(T::DTYPE)?;
        let labels = fwd.labels.as_view();
        let bound = crate::cuda::exec::Bound {
            x: xw.0,
            w: xw.1,
            labels: &labels,
            g_rows: None,
            saved: vec![(plan::Buf::Dw, dw)],
            prev_status: None,
            state_in: None,
            comm: None,
            ints: vec![(plan::Buf::WInv, &inv)],
            exchanged: None,
        };
        let mut kept = crate::cuda::exec::execute::<T, f32>(
            self,
            &kern,
            &lp,
            &bound,
            Vec::new(),
            &[plan::Buf::DwFull],
        )?;
        kept.f32(plan::Buf::DwFull)
    }
}
