//! The cudarc executor of a [`LaunchPlan`]: allocates the plan's buffers, binds the caller's
//! (inputs, saved buffers, and the output views the results are written into: [`Out`]),
//! launches every step in order on the handle's stream, frees each workspace after its last use
//! and hands back the buffers the caller keeps. It decides nothing: what runs is the plan's.
//!
//! Workspaces of a pooled plan ([`LaunchPlan::pooled`]: the fused ones) are carved from the
//! handle's arena, one f32 device buffer kept between calls and grown to the largest plan seen, so
//! a step allocates only its outputs after the first call of a shape. The arena's lock is held
//! while the plan is enqueued: two threads sharing a handle enqueue whole plans one after the
//! other on the one stream, and stream order keeps one plan's workspace writes after the previous
//! plan's reads.

use super::args::{self, ArgBytes, Value};
use super::plan::{Arg, Buf, Elem, GemmOp, Init, Launch, LaunchPlan, Step};
use super::{cuda_err, CudaElement, FusedMarginLoss, Kernels};
use crate::error::{Error, Result};
use cudarc::cublas::{sys::cublasOperation_t, Gemm as _, GemmConfig};
use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg, SyncOnDrop,
};
use std::collections::BTreeMap;

/// The caller's buffers a plan may name: the inputs and, for a backward, what the forward saved.
pub(crate) struct Bound<'a, T> {
    pub x: &'a CudaView<'a, T>,
    pub w: &'a CudaView<'a, T>,
    pub labels: &'a CudaView<'a, i32>,
    pub g_rows: Option<&'a CudaView<'a, f32>>,
    /// The forward's saved f32 buffers ([`Buf::XNorm`], [`Buf::WNorm`], [`Buf::Lse`]).
    pub saved: Vec<(Buf, &'a CudaSlice<f32>)>,
    pub prev_status: Option<&'a CudaSlice<i64>>,
    /// The caller's state in ([`Buf::StateIn`]: f64 bit patterns).
    pub state_in: Option<&'a CudaSlice<i64>>,
    /// The group's collectives, for a class-sharded plan's [`Step::Exchange`].
    pub comm: Option<&'a dyn crate::shard::Communicator>,
    /// The i32 buffers the caller binds by role (Partial FC's [`Buf::WIdx`], [`Buf::WInv`]).
    pub ints: Vec<(Buf, &'a CudaSlice<i32>)>,
    /// How many [`Step::Exchange`]s have called the communicator: a sharded call that fails
    /// before one still takes part in it (`handle/sharded.rs`), so no rank waits.
    pub exchanged: Option<&'a std::cell::Cell<usize>>,
}

/// An output view the plan's buffer of that role is bound to instead of being allocated: the
/// caller's (`*_into`) or one the handle allocated for a result it returns. Its kernels write it
/// in place; nothing is copied afterwards.
pub(crate) enum Out<'v, O> {
    /// An f32 output ([`Buf::Loss`], [`Buf::RowLoss`]).
    F32(CudaViewMut<'v, f32>),
    /// A gradient ([`Buf::Dx`], [`Buf::Dw`]) of the gradient dtype.
    Grad(CudaViewMut<'v, O>),
}

impl<O> Out<'_, O> {
    fn elem(&self) -> Elem {
        match self {
            Out::F32(_) => Elem::F32,
            Out::Grad(_) => Elem::Grad,
        }
    }
    fn len(&self) -> usize {
        match self {
            Out::F32(v) => v.len(),
            Out::Grad(v) => v.len(),
        }
    }
}

/// A buffer's name in errors about an output view.
pub(crate) fn out_name(buf: Buf) -> &'static str {
    match buf {
        Buf::Loss => "loss",
        Buf::RowLoss => "row_loss",
        Buf::Dx => "dx",
        Buf::Dw => "dw",
        _ => "output",
    }
}

/// Checks output bindings `(role, element type, length)` against `plan` before anything is
/// allocated or launched: each role is one the plan allocates, once, with that element type and
/// exactly that length (the plan's length is what its grids write). The handle checks the
/// caller's views against the shape first, with the same error; this holds the executor to the
/// plan it runs.
pub(crate) fn check_outputs(plan: &LaunchPlan, outs: &[(Buf, Elem, usize)]) -> Result<()> {
    for (k, &(buf, elem, len)) in outs.iter().enumerate() {
        let what = out_name(buf);
        if outs[..k].iter().any(|o| o.0 == buf) {
            return Err(Error::InvalidArgument {
                what,
                detail: format!("{buf:?} is bound twice"),
            });
        }
        let Some(spec) = plan.spec_of(buf) else {
            return Err(Error::InvalidArgument {
                what,
                detail: format!("the plan has no {buf:?} to write into the view"),
            });
        };
        if spec.elem != elem {
            return Err(Error::InvalidArgument {
                what,
                detail: format!(
                    "the plan's {buf:?} is {:?}, the view's elements are {elem:?}",
                    spec.elem
                ),
            });
        }
        if spec.len != len {
            return Err(Error::Length {
                what,
                expected: spec.len,
                got: len,
            });
        }
    }
    Ok(())
}

/// The buffers kept out of the arena: those the result keeps and those bound to output views.
pub(crate) fn unpooled(keep: &[Buf], bound: &[Buf]) -> Vec<Buf> {
    keep.iter().chain(bound).copied().collect()
}

/// A buffer the executor allocated, or an output view bound in its place.
pub(crate) enum Owned<'v, O> {
    F32(CudaSlice<f32>),
    I64(CudaSlice<i64>),
    Grad(CudaSlice<O>),
    /// f32 elements `off..off + len` of the handle's arena.
    Arena {
        off: usize,
    },
    /// An output view ([`Out`]).
    View(Out<'v, O>),
}

/// The buffers a plan allocated that the caller asked to keep.
pub(crate) struct Kept<'v, O>(BTreeMap<Buf, Owned<'v, O>>);

impl<O> Kept<'_, O> {
    fn missing(buf: Buf) -> Error {
        Error::InvalidArgument {
            what: "launch plan",
            detail: format!("the plan produced no {buf:?} of the expected type"),
        }
    }
    pub(crate) fn f32(&mut self, buf: Buf) -> Result<CudaSlice<f32>> {
        match self.0.remove(&buf) {
            Some(Owned::F32(s)) => Ok(s),
            _ => Err(Self::missing(buf)),
        }
    }
    /// `buf` if the plan made it (the fused plan's target record; the naive plan has none).
    pub(crate) fn f32_if_any(&mut self, buf: Buf) -> Option<CudaSlice<f32>> {
        match self.0.remove(&buf) {
            Some(Owned::F32(s)) => Some(s),
            _ => None,
        }
    }
    /// An i64 `buf` if the plan made it (a loss's state out).
    pub(crate) fn i64_if_any(&mut self, buf: Buf) -> Option<CudaSlice<i64>> {
        match self.0.remove(&buf) {
            Some(Owned::I64(s)) => Some(s),
            _ => None,
        }
    }
    pub(crate) fn i64(&mut self, buf: Buf) -> Result<CudaSlice<i64>> {
        match self.0.remove(&buf) {
            Some(Owned::I64(s)) => Ok(s),
            _ => Err(Self::missing(buf)),
        }
    }
}

// SAFETY: plain bytes, `#[repr(C)]`: the driver copies the kernel's parameter size (never more
// than the packed struct, args::pack checks it against the kernels' sizeof) from its address.
unsafe impl DeviceRepr for ArgBytes {}

/// Runs `plan`: the output views checked against it ([`check_outputs`]), allocations (in the
/// plan's order, each role in `outs` bound to its view instead), then the steps. Buffers the
/// plan allocates shadow bound inputs of the same role (the naive backward recomputes the norms).
/// Returns the allocated buffers named in `keep`; the others are freed after their last use.
/// With [`Options::poison`](super::Options::poison) the output views are filled with NaN first,
/// as allocated buffers are.
pub(crate) fn execute<'v, T: CudaElement, O: CudaElement>(
    h: &FusedMarginLoss,
    k: &Kernels,
    plan: &LaunchPlan,
    bound: &Bound<'_, T>,
    outs: Vec<(Buf, Out<'v, O>)>,
    keep: &[Buf],
) -> Result<Kept<'v, O>> {
    let shapes: Vec<(Buf, Elem, usize)> =
        outs.iter().map(|(b, o)| (*b, o.elem(), o.len())).collect();
    check_outputs(plan, &shapes)?;
    // Every compile unit the plan launches, compiled in parallel before anything is enqueued (the
    // fills poison buffers when the options ask for it).
    let fills = h.options().poison.then_some(["fm_fill_u32", "fm_fill_u16"]);
    k.prepare(
        plan.launches()
            .map(|l| l.entry.as_str())
            .chain(fills.into_iter().flatten()),
    )?;
    let bound_roles: Vec<Buf> = outs.iter().map(|(b, _)| *b).collect();
    let (arena_len, arena_offs) = plan.arena_layout(&unpooled(keep, &bound_roles));
    let mut views: BTreeMap<Buf, Out<'v, O>> = outs.into_iter().collect();
    // Held until the plan is enqueued (see the module's documentation).
    let mut arena_slot = h.arena.lock().unwrap_or_else(|p| p.into_inner());
    if arena_len > 0 && arena_slot.as_ref().is_none_or(|a| a.len() < arena_len) {
        // The old arena is freed on the stream, after every launch already enqueued that uses it.
        *arena_slot = None;
        *arena_slot = Some(h.alloc::<f32>(k, arena_len)?);
    } else if arena_len > 0 && h.options().poison {
        if let Some(a) = arena_slot.as_mut() {
            super::launch::fill_nan(&h.stream, k, &mut a.as_view_mut())?;
        }
    }
    let mut arena = if arena_len > 0 {
        arena_slot.as_mut()
    } else {
        None
    };
    let mut owned: BTreeMap<Buf, Owned<'v, O>> = BTreeMap::new();
    for s in &plan.buffers {
        if let Some(mut view) = views.remove(&s.buf) {
            if h.options().poison {
                match &mut view {
                    Out::F32(v) => super::launch::fill_nan(&h.stream, k, v)?,
                    Out::Grad(v) => super::launch::fill_nan(&h.stream, k, v)?,
                }
            }
            owned.insert(s.buf, Owned::View(view));
            continue;
        }
        if let Some(&(_, off)) = arena_offs.iter().find(|(b, _)| *b == s.buf) {
            owned.insert(s.buf, Owned::Arena { off });
            continue;
        }
        let Init::Uninit = s.init;
        let buf = match s.elem {
            Elem::F32 => Owned::F32(h.alloc::<f32>(k, s.len)?),
            Elem::Grad => Owned::Grad(h.alloc::<O>(k, s.len)?),
            // (An I64 role is never bound to a view: check_outputs holds views to F32 and Grad.)
            // The status record, written whole by its kernel; i64 has no NaN to poison with.
            // SAFETY: uninitialized device memory of a type with no invalid bit patterns, which
            // fm_label_status writes whole before anything reads it.
            Elem::I64 => Owned::I64(
                unsafe { h.stream.alloc::<i64>(s.len.max(1)) }
                    .map_err(|e| cuda_err(&format!("allocate {:?}", s.buf), e))?,
            ),
        };
        owned.insert(s.buf, buf);
    }
    // Each allocated buffer's last step, found once (not per step: this is host time per call).
    let last: BTreeMap<Buf, Option<usize>> = plan
        .buffers
        .iter()
        .map(|b| (b.buf, plan.last_use(b.buf)))
        .collect();
    // Every view names one of the plan's buffers (check_outputs), so each was bound above.
    if let Some(b) = views.keys().next() {
        return Err(Error::InvalidArgument {
            what: out_name(*b),
            detail: format!("the plan has no {b:?} to write into the view"),
        });
    }
    for (i, step) in plan.steps.iter().enumerate() {
        match step {
            Step::Kernel(l) => launch(h, k, l, bound, &mut owned, arena.as_deref_mut())?,
            Step::Exchange { send, recv, flag } => {
                exchange(h, bound, &mut owned, *send, *recv, *flag)?
            }
            Step::Gemm(g) => {
                let blas = h.blas().ok_or_else(|| Error::Unsupported {
                    detail: "the plan has a cuBLAS step but cuBLAS is not loaded".into(),
                })?;
                let op = |o: GemmOp| match o {
                    GemmOp::N => cublasOperation_t::CUBLAS_OP_N,
                    GemmOp::T => cublasOperation_t::CUBLAS_OP_T,
                };
                let cfg = GemmConfig {
                    transa: op(g.ta),
                    transb: op(g.tb),
                    m: g.m,
                    n: g.n,
                    k: g.k,
                    alpha: 1.0f32,
                    lda: g.lda,
                    ldb: g.ldb,
                    beta: 0.0,
                    ldc: g.ldc,
                };
                let mut c = match owned.remove(&g.c) {
                    Some(Owned::F32(s)) => s,
                    _ => return Err(Kept::<'_, O>::missing(g.c)),
                };
                let (Some(Owned::F32(a)), Some(Owned::F32(b))) = (owned.get(&g.a), owned.get(&g.b))
                else {
                    return Err(Kept::<'_, O>::missing(g.a));
                };
                // SAFETY: the plan builder sized a (m x k or k x m), b and c (m x n) with these
                // leading dimensions (plan.rs: `gemm`), all f32 buffers of this plan.
                unsafe { blas.gemm(cfg, a, b, &mut c) }
                    .map_err(|e| Error::cublas(&format!("cuBLAS {}", g.what), e))?;
                owned.insert(g.c, Owned::F32(c));
            }
        }
        // Workspaces die after their last use (the naive plan's B x C buffers bound its peak);
        // a view is let go after its last use too (its memory is not this call's to free).
        let done: Vec<Buf> = owned
            .iter()
            .filter(|(b, o)| {
                (matches!(o, Owned::View(_)) || !keep.contains(b))
                    && last.get(b).copied().flatten().is_none_or(|u| u <= i)
            })
            .map(|(b, _)| *b)
            .collect();
        for b in done {
            owned.remove(&b);
        }
    }
    owned.retain(|_, o| !matches!(o, Owned::View(_)));
    Ok(Kept(owned))
}

/// A class-sharded plan's all-gather: `send` (f32) to the host, every rank's through the
/// caller's communicator (f64: f32 values widen and narrow back exactly), rank-major into
/// `recv`. Both buffers are the executor's own (the handle keeps them out of the arena).
fn exchange<O: CudaElement, T>(
    h: &FusedMarginLoss,
    bound: &Bound<'_, T>,
    owned: &mut BTreeMap<Buf, Owned<'_, O>>,
    send: Buf,
    recv: Buf,
    flag: usize,
) -> Result<()> {
    let comm = bound.comm.ok_or_else(|| Error::InvalidArgument {
        what: "launch plan",
        detail: "a sharded plan's exchange step needs the group's communicator".into(),
    })?;
    let host = match owned.get(&send) {
        Some(Owned::F32(s)) => h
            .stream
            .clone_dtoh(s)
            .map_err(|e| cuda_err("copy the shard records to the host", e))?,
        _ => return Err(Kept::<'_, O>::missing(send)),
    };
    h.stream
        .synchronize()
        .map_err(|e| cuda_err("synchronize before the exchange", e))?;
    let wide: Vec<f64> = host.iter().map(|&v| v as f64).collect();
    let mut all = vec![0.0f64; wide.len() * comm.world_size()];
    if let Some(done) = bound.exchanged {
        done.set(done.get() + 1);
    }
    comm.all_gather(&wide, &mut all)?;
    // A rank that failed before its exchange sends owned = -1 (FAILED_RECORD), never a record's.
    let n = wide.len();
    if let Some(r) =
        (0..comm.world_size()).find(|&r| flag < n && all[r * n + flag] == FAILED_RECORD)
    {
        return Err(Error::Collective {
            op: "exchange",
            detail: format!(
                "rank {r} failed before the exchange (its call returned the error); this rank \
                 (rank {}) stops",
                comm.rank()
            ),
            source: None,
        });
    }
    let narrow: Vec<f32> = all.iter().map(|&v| v as f32).collect();
    match owned.get_mut(&recv) {
        Some(Owned::F32(r)) if r.len() == narrow.len() => h
            .stream
            .memcpy_htod(&narrow, r)
            .map_err(|e| cuda_err("copy the gathered shard records", e)),
        Some(Owned::F32(r)) => Err(Error::Collective {
            op: "exchange",
            detail: format!(
                "the plan holds {} floats for {} gathered",
                r.len(),
                narrow.len()
            ),
            source: None,
        }),
        _ => Err(Kept::<'_, O>::missing(recv)),
    }
}

/// The `owned` value a failed rank's records carry in the exchange (a real record has 0 or 1).
pub(crate) const FAILED_RECORD: f64 = -1.0;

fn written(l: &Launch, buf: Buf) -> bool {
    l.args.contains(&Arg::Write(buf))
}

/// One launch: every buffer argument resolved to its device address through cudarc's
/// `device_ptr`/`device_ptr_mut` (which make the stream wait for earlier work on the buffer and
/// record this launch's read or write when the guards drop after the launch).
fn launch<'v, T: CudaElement, O: CudaElement>(
    h: &FusedMarginLoss,
    k: &Kernels,
    l: &Launch,
    bound: &Bound<'_, T>,
    owned: &mut BTreeMap<Buf, Owned<'v, O>>,
    arena: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    let stream = &h.stream;
    // The launch's own buffers, taken out of the table so that each can be borrowed mutably.
    let mut mine: Vec<(Buf, Owned<'v, O>)> = Vec::new();
    for a in &l.args {
        if let Arg::Read(b) | Arg::Write(b) = a {
            if !mine.iter().any(|(m, _)| m == b) {
                if let Some(o) = owned.remove(b) {
                    mine.push((*b, o));
                }
            }
        }
    }
    let result = (|| {
        let mut addr: BTreeMap<Buf, u64> = BTreeMap::new();
        let mut guards: Vec<SyncOnDrop<'_>> = Vec::new();
        // The arena once per launch (one guard: a write when any of its workspaces is written).
        let arena_base = match arena {
            Some(a) if mine.iter().any(|(_, o)| matches!(o, Owned::Arena { .. })) => {
                let w = mine
                    .iter()
                    .any(|(b, o)| matches!(o, Owned::Arena { .. }) && written(l, *b));
                let (p, g) = if w {
                    a.device_ptr_mut(stream)
                } else {
                    a.device_ptr(stream)
                };
                guards.push(g);
                Some(p)
            }
            _ => None,
        };
        for (b, o) in mine.iter_mut() {
            let w = written(l, *b);
            let (p, g) = match (o, w) {
                (Owned::F32(s), true) => s.device_ptr_mut(stream),
                (Owned::F32(s), false) => s.device_ptr(stream),
                (Owned::I64(s), true) => s.device_ptr_mut(stream),
                (Owned::I64(s), false) => s.device_ptr(stream),
                (Owned::Grad(s), true) => s.device_ptr_mut(stream),
                (Owned::Grad(s), false) => s.device_ptr(stream),
                (Owned::View(Out::F32(v)), true) => v.device_ptr_mut(stream),
                (Owned::View(Out::F32(v)), false) => v.device_ptr(stream),
                (Owned::View(Out::Grad(v)), true) => v.device_ptr_mut(stream),
                (Owned::View(Out::Grad(v)), false) => v.device_ptr(stream),
                (Owned::Arena { off }, _) => {
                    let base = arena_base.ok_or_else(|| Error::InvalidArgument {
                        what: "launch plan",
                        detail: format!("{} names the arena's {b:?} without an arena", l.entry),
                    })?;
                    addr.insert(*b, base + (*off * 4) as u64);
                    continue;
                }
            };
            addr.insert(*b, p);
            guards.push(g);
        }
        let mut vals = Vec::with_capacity(l.args.len());
        for a in &l.args {
            vals.push(match *a {
                Arg::Read(b) | Arg::Write(b) => {
                    if let Some(p) = addr.get(&b) {
                        Value::Ptr(*p)
                    } else {
                        if matches!(a, Arg::Write(_)) {
                            return Err(Error::InvalidArgument {
                                what: "launch plan",
                                detail: format!("{} writes the caller's {b:?}", l.entry),
                            });
                        }
                        let (p, g) = bound_ptr(bound, b, stream, &l.entry)?;
                        guards.push(g);
                        Value::Ptr(p)
                    }
                }
                Arg::Null => Value::Ptr(0),
                Arg::I64(v) => Value::I64(v),
                Arg::I32(v) => Value::I32(v),
                Arg::F32(v) => Value::F32(v),
                Arg::Params(p) => Value::Params(p),
            });
        }
        // A family kernel takes its fields as one struct, laid out as the kernels declare it.
        let block: Option<ArgBytes> = match l.packed {
            Some(layout) => Some(args::pack(&l.entry, layout, &vals)?),
            None => None,
        };
        let f = k.get_with_smem(&l.entry, l.smem)?;
        let mut lb = stream.launch_builder(&f);
        match &block {
            Some(bytes) => {
                lb.arg(bytes);
            }
            None => {
                for v in &vals {
                    match v {
                        Value::Ptr(p) => lb.arg(p),
                        Value::I64(p) => lb.arg(p),
                        Value::I32(p) => lb.arg(p),
                        Value::F32(p) => lb.arg(p),
                        Value::Params(p) => lb.arg(p),
                    };
                }
            }
        }
        let cfg = LaunchConfig {
            grid_dim: (l.grid[0], l.grid[1], l.grid[2]),
            block_dim: (l.block, 1, 1),
            shared_mem_bytes: l.smem,
        };
        // SAFETY: the plan builder (plan.rs) made this launch: the entry's parameters in order
        // (the emulated tests run every plan through the same kernels and check each launch's
        // argument kinds against the kernel's signature), every buffer allocated or bound with
        // the length its grid reads and writes (the bounds are stated where each launch is
        // built; an output view has exactly the plan's length, checked by check_outputs, and
        // needs only its element alignment: the kernels store loss, row losses, dx and dw one
        // element at a time), 64-bit offsets inside the kernels, the dynamic shared memory each
        // kernel's static_asserts pin, and 16-byte alignment checked before a tensor-core
        // kernel is chosen. The guards make the stream wait for earlier writes and record these accesses.
        unsafe { lb.launch(cfg) }.map_err(|e| cuda_err(&format!("launch {}", l.entry), e))?;
        drop(guards);
        Ok(())
    })();
    for (b, o) in mine {
        owned.insert(b, o);
    }
    result
}

/// The device address of a caller's buffer and its read guard.
fn bound_ptr<'a, T: CudaElement>(
    bound: &'a Bound<'a, T>,
    b: Buf,
    stream: &'a std::sync::Arc<cudarc::driver::CudaStream>,
    entry: &str,
) -> Result<(u64, SyncOnDrop<'a>)> {
    Ok(match b {
        Buf::X => bound.x.device_ptr(stream),
        Buf::W => bound.w.device_ptr(stream),
        Buf::Labels => bound.labels.device_ptr(stream),
        Buf::GRows => match bound.g_rows {
            Some(g) => g.device_ptr(stream),
            None => return Err(unbound(b, entry)),
        },
        Buf::PrevStatus => match bound.prev_status {
            Some(s) => s.device_ptr(stream),
            None => return Err(unbound(b, entry)),
        },
        Buf::StateIn => match bound.state_in {
            Some(s) => s.device_ptr(stream),
            None => return Err(unbound(b, entry)),
        },
        Buf::WIdx | Buf::WInv => match bound.ints.iter().find(|(r, _)| *r == b) {
            Some((_, s)) => s.device_ptr(stream),
            None => return Err(unbound(b, entry)),
        },
        _ => match bound.saved.iter().find(|(r, _)| *r == b) {
            Some((_, s)) => s.device_ptr(stream),
            None => return Err(unbound(b, entry)),
        },
    })
}

fn unbound(b: Buf, entry: &str) -> Error {
    Error::InvalidArgument {
        what: "launch plan",
        detail: format!("{entry} reads {b:?}, which is neither allocated nor given"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::params::FmParams;
    use crate::cuda::plan::{self, Choices, DeviceFacts, ForwardProblem};
    use crate::dtype::DType;
    use crate::spec::{MarginLoss, Shape};

    fn forward_plan(ch: &Choices, shape: Shape) -> LaunchPlan {
        plan::forward(
            &DeviceFacts::H100,
            ch,
            &ForwardProblem {
                dtype: DType::BF16,
                shape,
                aligned: true,
                params: FmParams::from_spec(&MarginLoss::arcface(0.5)),
                mean: true,
                row_margins: false,
            },
        )
        .unwrap()
    }

    fn backward_plan(shape: Shape) -> LaunchPlan {
        plan::backward(
            &DeviceFacts::H100,
            &Choices::default(),
            &plan::BackwardProblem {
                dtype: DType::BF16,
                grad_dtype: DType::BF16,
                shape,
                aligned: true,
                params: FmParams::from_spec(&MarginLoss::arcface(0.5)),
                mean: true,
                upstream: plan::PlanUpstream::Scalar(1.0),
                fwd_tensor_cores: true,
                row_margins: false,
            },
        )
        .unwrap()
    }

    #[test]
    fn views_of_the_plans_lengths_and_types_bind() {
        let shape = Shape::new(5, 24, 300);
        for ch in [
            Choices::default(),
            Choices {
                plan: crate::cuda::Plan::Naive,
                ..Choices::default()
            },
        ] {
            let f = forward_plan(&ch, shape);
            check_outputs(
                &f,
                &[(Buf::Loss, Elem::F32, 1), (Buf::RowLoss, Elem::F32, 5)],
            )
            .unwrap();
            check_outputs(&f, &[(Buf::RowLoss, Elem::F32, 5)]).unwrap();
        }
        let b = backward_plan(shape);
        check_outputs(
            &b,
            &[
                (Buf::Dx, Elem::Grad, 5 * 24),
                (Buf::Dw, Elem::Grad, 300 * 24),
            ],
        )
        .unwrap();
    }

    #[test]
    fn a_view_of_another_length_type_or_role_is_refused() {
        let shape = Shape::new(5, 24, 300);
        let f = forward_plan(&Choices::default(), shape);
        assert_eq!(
            check_outputs(&f, &[(Buf::RowLoss, Elem::F32, 4)]),
            Err(Error::Length {
                what: "row_loss",
                expected: 5,
                got: 4
            })
        );
        let b = backward_plan(shape);
        assert_eq!(
            check_outputs(
                &b,
                &[
                    (Buf::Dx, Elem::Grad, 120),
                    (Buf::Dw, Elem::Grad, 300 * 24 + 1)
                ]
            ),
            Err(Error::Length {
                what: "dw",
                expected: 300 * 24,
                got: 300 * 24 + 1
            })
        );
        let what = |r: Result<()>| match r {
            Err(Error::InvalidArgument { what, detail }) => (what, detail),
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        // A gradient view where the plan writes f32, a role the plan does not have, one twice.
        let (w, d) = what(check_outputs(&b, &[(Buf::Dx, Elem::F32, 120)]));
        assert!(w == "dx" && d.contains("Grad"), "{w}: {d}");
        let (w, d) = what(check_outputs(&f, &[(Buf::Dx, Elem::Grad, 120)]));
        assert!(w == "dx" && d.contains("no Dx"), "{w}: {d}");
        let (w, d) = what(check_outputs(
            &f,
            &[(Buf::Loss, Elem::F32, 1), (Buf::Loss, Elem::F32, 1)],
        ));
        assert!(w == "loss" && d.contains("twice"), "{w}: {d}");
    }

    #[test]
    fn bound_outputs_stay_out_of_the_arena() {
        // The forward's saved buffers only: a loss left to the plan is a workspace of the arena;
        // bound to a view, it is not (the view is the caller's memory).
        let saved = [Buf::Lse, Buf::XNorm, Buf::WNorm, Buf::Target, Buf::Status];
        let f = forward_plan(&Choices::default(), Shape::new(5, 24, 300));
        let (_, free) = f.arena_layout(&saved);
        assert!(free.iter().any(|(b, _)| *b == Buf::Loss));
        let (len, offs) = f.arena_layout(&unpooled(&saved, &[Buf::Loss, Buf::RowLoss]));
        assert!(offs
            .iter()
            .all(|(b, _)| !matches!(b, Buf::Loss | Buf::RowLoss)));
        // Exactly the arena the handle's forward uses (plan::FORWARD_OUTPUTS keeps both).
        assert_eq!((len, offs), f.arena_layout(&plan::FORWARD_OUTPUTS));
    }
}
