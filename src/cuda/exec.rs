//! The cudarc executor of a [`LaunchPlan`]: allocates the plan's buffers, binds the caller's,
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
    CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
    SyncOnDrop,
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
}

/// A buffer the executor allocated.
pub(crate) enum Owned<O> {
    F32(CudaSlice<f32>),
    I64(CudaSlice<i64>),
    Grad(CudaSlice<O>),
    /// f32 elements `off..off + len` of the handle's arena.
    Arena {
        off: usize,
    },
}

/// The buffers a plan allocated that the caller asked to keep.
pub(crate) struct Kept<O>(BTreeMap<Buf, Owned<O>>);

impl<O> Kept<O> {
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
    pub(crate) fn i64(&mut self, buf: Buf) -> Result<CudaSlice<i64>> {
        match self.0.remove(&buf) {
            Some(Owned::I64(s)) => Ok(s),
            _ => Err(Self::missing(buf)),
        }
    }
    pub(crate) fn grad(&mut self, buf: Buf) -> Result<CudaSlice<O>> {
        match self.0.remove(&buf) {
            Some(Owned::Grad(s)) => Ok(s),
            _ => Err(Self::missing(buf)),
        }
    }
}

// SAFETY: plain bytes, `#[repr(C)]`: the driver copies the kernel's parameter size (never more
// than the packed struct, args::pack checks it against the kernels' sizeof) from its address.
unsafe impl DeviceRepr for ArgBytes {}

/// Runs `plan`: allocations first (in the plan's order), then the steps. Buffers the plan
/// allocates shadow bound ones of the same role (the naive backward recomputes the norms).
/// Returns the allocated buffers named in `keep`; the others are freed after their last use.
pub(crate) fn execute<T: CudaElement, O: CudaElement>(
    h: &FusedMarginLoss,
    k: &Kernels,
    plan: &LaunchPlan,
    bound: &Bound<'_, T>,
    keep: &[Buf],
) -> Result<Kept<O>> {
    // Every compile unit the plan launches, compiled in parallel before anything is enqueued (the
    // fills poison buffers when the options ask for it).
    let fills = h.options().poison.then_some(["fm_fill_u32", "fm_fill_u16"]);
    k.prepare(
        plan.launches()
            .map(|l| l.entry.as_str())
            .chain(fills.into_iter().flatten()),
    )?;
    let (arena_len, arena_offs) = plan.arena_layout(keep);
    // Held until the plan is enqueued (see the module's documentation).
    let mut arena_slot = h.arena.lock().unwrap_or_else(|p| p.into_inner());
    if arena_len > 0 && arena_slot.as_ref().is_none_or(|a| a.len() < arena_len) {
        // The old arena is freed on the stream, after every launch already enqueued that uses it.
        *arena_slot = None;
        *arena_slot = Some(h.alloc::<f32>(k, arena_len)?);
    } else if arena_len > 0 && h.options().poison {
        if let Some(a) = arena_slot.as_mut() {
            super::launch::fill_nan(&h.stream, k, a)?;
        }
    }
    let mut arena = if arena_len > 0 {
        arena_slot.as_mut()
    } else {
        None
    };
    let mut owned: BTreeMap<Buf, Owned<O>> = BTreeMap::new();
    for s in &plan.buffers {
        if let Some(&(_, off)) = arena_offs.iter().find(|(b, _)| *b == s.buf) {
            owned.insert(s.buf, Owned::Arena { off });
            continue;
        }
        let Init::Uninit = s.init;
        let buf = match s.elem {
            Elem::F32 => Owned::F32(h.alloc::<f32>(k, s.len)?),
            Elem::Grad => Owned::Grad(h.alloc::<O>(k, s.len)?),
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
    for (i, step) in plan.steps.iter().enumerate() {
        match step {
            Step::Kernel(l) => launch(h, k, l, bound, &mut owned, arena.as_deref_mut())?,
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
                    _ => return Err(Kept::<O>::missing(g.c)),
                };
                let (Some(Owned::F32(a)), Some(Owned::F32(b))) = (owned.get(&g.a), owned.get(&g.b))
                else {
                    return Err(Kept::<O>::missing(g.a));
                };
                // SAFETY: the plan builder sized a (m x k or k x m), b and c (m x n) with these
                // leading dimensions (plan.rs: `gemm`), all f32 buffers of this plan.
                unsafe { blas.gemm(cfg, a, b, &mut c) }
                    .map_err(|e| Error::cublas(&format!("cuBLAS {}", g.what), e))?;
                owned.insert(g.c, Owned::F32(c));
            }
        }
        // Workspaces die after their last use (the naive plan's B x C buffers bound its peak).
        let done: Vec<Buf> = owned
            .keys()
            .copied()
            .filter(|b| !keep.contains(b) && last.get(b).copied().flatten().is_none_or(|u| u <= i))
            .collect();
        for b in done {
            owned.remove(&b);
        }
    }
    Ok(Kept(owned))
}

fn written(l: &Launch, buf: Buf) -> bool {
    l.args.contains(&Arg::Write(buf))
}

/// One launch: every buffer argument resolved to its device address through cudarc's
/// `device_ptr`/`device_ptr_mut` (which make the stream wait for earlier work on the buffer and
/// record this launch's read or write when the guards drop after the launch).
fn launch<T: CudaElement, O: CudaElement>(
    h: &FusedMarginLoss,
    k: &Kernels,
    l: &Launch,
    bound: &Bound<'_, T>,
    owned: &mut BTreeMap<Buf, Owned<O>>,
    arena: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    let stream = &h.stream;
    // The launch's own buffers, taken out of the table so that each can be borrowed mutably.
    let mut mine: Vec<(Buf, Owned<O>)> = Vec::new();
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
        // built), 64-bit offsets inside the kernels, the dynamic shared memory each kernel's
        // static_asserts pin, and 16-byte alignment checked before a tensor-core kernel is
        // chosen. The guards make the stream wait for earlier writes and record these accesses.
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
