//! Classes sharded across ranks (model parallelism over the class dimension) and Partial FC
//! sampling, as insightface's `arcface_torch` trains on millions of identities.
//!
//! A rank holds a contiguous slice of the class weights, [`ClassShard`] (`class_start`,
//! `num_local`: insightface's names), and the embeddings of *every* rank's batch (the caller
//! all-gathers them, as `arcface_torch` does before its head). Each rank computes, for every row
//! of the global batch, the online-softmax statistics of its own classes: the running maximum and
//! sum of exponentials over the classes that are not the row's target, and the target logit where
//! the target is one of its classes. One collective, an all-gather of these (max, sum-exp,
//! target, owned) records, gives every rank every other rank's record; each then merges them in
//! rank order, so all ranks hold the same `lse_i` and `l_i`, bit for bit, and the result does not
//! depend on the collective's internal order (an all-reduce of the maxima then of the sums would
//! take two collectives and an order NCCL does not fix). The records are 32 bytes per row per
//! rank: 256 KB for a global batch of 1,024 rows on 8 ranks, nothing next to the embeddings.
//!
//! The loss needs no other communication, except for the losses whose per-row state reads every
//! row's target cosine (CurricularFace's `t`, ElasticFace+'s order): those first all-reduce the
//! target cosines, each row's value coming from the one rank that owns its class and zeros from
//! the others, a sum that is exact in any order. The backward computes this rank's part of
//! `dL/dx` for every row from the forward's global statistics and its own classes, and reduces it
//! across ranks as [`DxReduce`] asks; `dL/dw` of its classes needs nothing from the others.
//!
//! Collectives go through a [`Communicator`]: [`ThreadComm`] (one thread per simulated rank, in
//! process; the tests and the CPU path) and, with feature `nccl`, `cuda::NcclComm` (NCCL
//! through cudarc). The computation itself is [`crate::cpu::shard_forward`] and
//! [`crate::cpu::shard_backward`] (the f64 reference, every loss), and on the GPU
//! `cuda::FusedMarginLoss::shard_forward` and `shard_backward` (the same records, merged by a
//! kernel in rank order).
//!
//! [`PartialFc`] samples each rank's classes per step: every class that is some row's target,
//! plus random others up to `floor(rate * num_local)`, reproducible from `(seed, step)`; the
//! sharded calls then read the sampled class rows through the index list.

use crate::error::{Error, Result};
use crate::variant::splitmix;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// A rank's slice of the classes: global classes `class_start .. class_start + num_local` of
/// `num_classes`. The ranks' slices must tile `0..num_classes` without overlap (the sharded calls
/// check it across ranks before any work); they need not be equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClassShard {
    /// The first global class of this rank.
    pub class_start: usize,
    /// How many classes this rank holds (its `w` has `num_local` rows, times `K` sub-centers).
    pub num_local: usize,
    /// The global number of classes `C`.
    pub num_classes: usize,
}

impl ClassShard {
    /// A slice of `num_local` classes from `class_start`, of `num_classes`. Errors when the slice
    /// is empty or does not fit.
    pub fn new(class_start: usize, num_local: usize, num_classes: usize) -> Result<Self> {
        if num_local == 0 {
            return Err(Error::InvalidArgument {
                what: "shard",
                detail: format!(
                    "num_local = 0 at class_start = {class_start}: every rank needs a class"
                ),
            });
        }
        match class_start.checked_add(num_local) {
            Some(end) if end <= num_classes => Ok(Self {
                class_start,
                num_local,
                num_classes,
            }),
            _ => Err(Error::InvalidArgument {
                what: "shard",
                detail: format!(
                    "classes {class_start}..{class_start}+{num_local} do not fit in C = \
                     {num_classes}"
                ),
            }),
        }
    }

    /// insightface's split of `num_classes` over `world` ranks: `C / W` classes each, the first
    /// `C % W` ranks one more. Errors when `rank >= world` or a rank would have no class
    /// (`C < W`).
    pub fn even(num_classes: usize, world: usize, rank: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(Error::InvalidArgument {
                what: "rank",
                detail: format!("rank {rank} of world size {world}"),
            });
        }
        if num_classes < world {
            return Err(Error::InvalidArgument {
                what: "shard",
                detail: format!(
                    "C = {num_classes} classes over {world} ranks leaves a rank without classes"
                ),
            });
        }
        let (q, r) = (num_classes / world, num_classes % world);
        let num_local = q + usize::from(rank < r);
        let class_start = rank * q + rank.min(r);
        Self::new(class_start, num_local, num_classes)
    }

    /// The global classes of this rank.
    pub fn classes(&self) -> Range<usize> {
        self.class_start..self.class_start + self.num_local
    }

    /// The local index of `label` when this rank holds its class (`None` for other ranks'
    /// classes and for ignored rows' negative labels).
    pub fn local(&self, label: i32) -> Option<usize> {
        let y = usize::try_from(label).ok()?;
        self.classes().contains(&y).then(|| y - self.class_start)
    }
}

/// Collectives over `f64` host buffers among the ranks of one group. Every rank calls the same
/// collectives in the same order with the same lengths (the sharded calls do); an implementation
/// returns an error rather than a wrong result where the lengths disagree.
///
/// Results are deterministic for a fixed world size: [`all_gather`](Self::all_gather) moves data
/// without arithmetic, and the sums of [`ThreadComm`] run in rank order. (NCCL fixes its
/// summation order for a fixed world size, topology and algorithm; the sharded loss itself only
/// sums where exactness does not depend on the order, or in rank order after an all-gather.)
pub trait Communicator {
    /// This rank, `0 .. world_size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world_size(&self) -> usize;
    /// Every rank's `send` (all of equal length `n`), rank `r`'s at `recv[r*n .. (r+1)*n]`;
    /// `recv.len() == world_size() * n`.
    fn all_gather(&self, send: &[f64], recv: &mut [f64]) -> Result<()>;
    /// `buf <- the element-wise sum of every rank's buf`.
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()>;
    /// `send` holds `world_size()` blocks of `n = recv.len()`; rank `r` receives the element-wise
    /// sum over ranks of their block `r`.
    fn reduce_scatter_sum(&self, send: &[f64], recv: &mut [f64]) -> Result<()>;
}

/// What a group of [`ThreadComm`]s shares: one slot per rank and a barrier that can be broken.
struct Shared {
    world: usize,
    state: Mutex<GroupState>,
    turn: Condvar,
}

struct GroupState {
    slots: Vec<Vec<f64>>,
    arrived: usize,
    generation: u64,
    /// Set when a rank leaves the group (its communicator dropped) or fails a local check inside
    /// a collective: every later wait errors instead of blocking for a rank that never comes.
    broken: Option<String>,
}

/// The in-process communicator: one per simulated rank, each used from its own thread
/// ([`ThreadComm::group`], or [`run_ranks`] which also spawns the threads). Collectives copy
/// through shared memory and sum in rank order, so every rank gets the same bits on every run.
///
/// A rank that drops its communicator, or whose arguments are bad inside a collective, breaks the
/// group: the other ranks' current or next collective returns [`Error::Collective`] instead of
/// waiting for it forever.
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ThreadComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ThreadComm {{ rank: {}, world: {} }}",
            self.rank, self.shared.world
        )
    }
}

fn collective_err(op: &'static str, detail: String) -> Error {
    Error::Collective {
        op,
        detail,
        source: None,
    }
}

impl ThreadComm {
    /// `world` communicators of one group, rank `r` at index `r`. Move each to its own thread.
    pub fn group(world: usize) -> Result<Vec<ThreadComm>> {
        if world == 0 {
            return Err(Error::InvalidArgument {
                what: "world",
                detail: "a group needs at least one rank".into(),
            });
        }
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(GroupState {
                slots: vec![Vec::new(); world],
                arrived: 0,
                generation: 0,
                broken: None,
            }),
            turn: Condvar::new(),
        });
        Ok((0..world)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
            })
            .collect())
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        // A rank that panicked while holding the lock leaves consistent data (slots are replaced
        // whole), so the poison flag carries nothing to act on.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn break_group(&self, why: String) {
        let mut st = self.lock();
        if st.broken.is_none() {
            st.broken = Some(why);
        }
        drop(st);
        self.shared.turn.notify_all();
    }

    /// Waits until every rank has arrived (a barrier), or errors when the group is broken.
    fn wait(&self, op: &'static str, mut st: MutexGuard<'_, GroupState>) -> Result<()> {
        if let Some(why) = &st.broken {
            return Err(collective_err(op, why.clone()));
        }
        st.arrived += 1;
        if st.arrived == self.shared.world {
            st.arrived = 0;
            st.generation = st.generation.wrapping_add(1);
            drop(st);
            self.shared.turn.notify_all();
            return Ok(());
        }
        let generation = st.generation;
        loop {
            st = self
                .shared
                .turn
                .wait(st)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // Released first: a rank that left after this barrier completed does not undo it.
            if st.generation != generation {
                return Ok(());
            }
            if let Some(why) = &st.broken {
                return Err(collective_err(op, why.clone()));
            }
        }
    }

    /// Puts `data` in this rank's slot and waits for every rank's; then `read` sees all slots
    /// (each checked to have length `n`), and a second barrier keeps the slots until every rank
    /// has read them.
    fn exchange<R>(
        &self,
        op: &'static str,
        data: &[f64],
        read: impl FnOnce(&[Vec<f64>]) -> R,
    ) -> Result<R> {
        let n = data.len();
        let mut st = self.lock();
        st.slots[self.rank].clear();
        st.slots[self.rank].extend_from_slice(data);
        self.wait(op, st)?;
        let st = self.lock();
        // Every rank sees the same slots, so all of them take the same branch here.
        let out = match st.slots.iter().position(|s| s.len() != n) {
            Some(r) => Err(collective_err(
                op,
                format!(
                    "rank {r} passed {} values, rank {} passed {n}",
                    st.slots[r].len(),
                    self.rank
                ),
            )),
            None => Ok(read(&st.slots)),
        };
        self.wait(op, st)?;
        out
    }

    fn check_len(&self, op: &'static str, what: String, ok: bool) -> Result<()> {
        if ok {
            return Ok(());
        }
        let why = format!("rank {}: {what}", self.rank);
        self.break_group(why.clone());
        Err(collective_err(op, why))
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        self.break_group(format!("rank {} left the group", self.rank));
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_gather(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        let n = send.len();
        self.check_len(
            "all_gather",
            format!(
                "recv has {} values for {} ranks of {n}",
                recv.len(),
                self.shared.world
            ),
            Some(recv.len()) == n.checked_mul(self.shared.world),
        )?;
        self.exchange("all_gather", send, |slots| {
            for (dst, src) in recv.chunks_mut(n.max(1)).zip(slots) {
                dst.copy_from_slice(src);
            }
        })
    }

    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        let copy = buf.to_vec();
        self.exchange("all_reduce_sum", &copy, |slots| {
            for (k, b) in buf.iter_mut().enumerate() {
                *b = slots.iter().fold(0.0, |acc, s| acc + s[k]);
            }
        })
    }

    fn reduce_scatter_sum(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        let n = recv.len();
        self.check_len(
            "reduce_scatter_sum",
            format!(
                "send has {} values for {} ranks of {n}",
                send.len(),
                self.shared.world
            ),
            Some(send.len()) == n.checked_mul(self.shared.world),
        )?;
        let at = self.rank * n;
        self.exchange("reduce_scatter_sum", send, |slots| {
            for (k, r) in recv.iter_mut().enumerate() {
                *r = slots.iter().fold(0.0, |acc, s| acc + s[at + k]);
            }
        })
    }
}

/// Runs `f` once per rank of a new [`ThreadComm`] group of `world`, each on its own thread, and
/// returns the results in rank order. A rank that panics breaks the group (the others' pending
/// collectives return errors) and its panic is resumed here after every thread has finished.
pub fn run_ranks<R: Send>(world: usize, f: impl Fn(&ThreadComm) -> R + Sync) -> Result<Vec<R>> {
    let comms = ThreadComm::group(world)?;
    let f = &f;
    let joined: Vec<std::thread::Result<R>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    // The communicator drops (breaking the group) when f returns or unwinds.
                    f(&comm)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut out = Vec::with_capacity(world);
    for r in joined {
        match r {
            Ok(v) => out.push(v),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    Ok(out)
}

/// How the embedding gradient comes back from [`crate::cpu::shard_backward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DxReduce {
    /// Each rank gets the gradient of its own rows, summed over ranks (a reduce-scatter):
    /// rank `r` holds global rows `r*B/W .. (r+1)*B/W`, as `arcface_torch` returns them to the
    /// rank whose backbone produced them. Needs `B` divisible by the world size.
    #[default]
    Owner,
    /// Every rank gets the gradient of every row, summed over ranks (an all-reduce).
    Global,
    /// This rank's part of the gradient of every row, not summed: for a caller whose own
    /// all-gather of the embeddings reduces the gradient in its backward.
    Partial,
}

/// Which rows of `dL/dw` a sampled backward writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DwLayout {
    /// The sampled classes only, in the order of [`Sampled::index`] (`n_sampled*K` rows): what
    /// an optimizer that updates the sampled rows needs.
    #[default]
    Sampled,
    /// Every class of the rank (`num_local*K` rows), zeros for the classes not sampled, as the
    /// autograd scatter of `weight[index]` gives in insightface.
    Full,
}

/// The options of the sharded calls: one plain struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShardOptions {
    /// How `dL/dx` is reduced across ranks.
    pub dx: DxReduce,
    /// Which rows of `dL/dw` are written with sampling (without sampling: every local row).
    pub dw: DwLayout,
}

/// One rank's part in a sharded call: its communicator, its classes, this step's sampled
/// classes (Partial FC; `None` uses every class of the shard) and the options. Every rank of the
/// group passes the same spec, global shape, embeddings, labels, row inputs and options.
#[derive(Clone, Copy)]
pub struct Rank<'a> {
    /// The group's collectives.
    pub comm: &'a dyn Communicator,
    /// This rank's classes; `w` holds their `num_local*K` rows.
    pub shard: ClassShard,
    /// This step's sampled classes of the shard ([`PartialFc::sample`]).
    pub sampled: Option<&'a Sampled>,
    /// How the gradients come back.
    pub options: ShardOptions,
}

impl std::fmt::Debug for Rank<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rank")
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("shard", &self.shard)
            .field("sampled", &self.sampled.map(|s| s.index.len()))
            .field("options", &self.options)
            .finish()
    }
}

/// A 64-bit FNV-1a hash of `bytes` continuing from `h` (what the ranks compare before a call).
pub(crate) fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The FNV-1a offset basis.
pub(crate) const FNV0: u64 = 0xcbf2_9ce4_8422_2325;

/// Before any work, every rank learns whether every other rank accepted its inputs, was called
/// with the same arguments (`local`: a fingerprint of what must agree, or this rank's error) and
/// holds a slice that, with the others', tiles the classes. One all-gather of 6 values per
/// rank; every rank takes the same decision, so none is left waiting in a later collective.
/// A rank whose own inputs failed gets `Ok` here and returns its own error.
pub(crate) fn agree(
    comm: &dyn Communicator,
    op: &'static str,
    shard: &ClassShard,
    local: std::result::Result<u64, ()>,
) -> Result<()> {
    let world = comm.world_size();
    let me = comm.rank();
    if me >= world {
        return Err(Error::InvalidArgument {
            what: "comm",
            detail: format!("rank {me} of world size {world}"),
        });
    }
    let fp = local.unwrap_or(0);
    let send = [
        if local.is_ok() { 1.0 } else { 0.0 },
        shard.class_start as f64,
        shard.num_local as f64,
        shard.num_classes as f64,
        (fp >> 32) as f64,
        (fp & 0xffff_ffff) as f64,
    ];
    let mut all = vec![0.0; 6 * world];
    comm.all_gather(&send, &mut all)?;
    let rec = |r: usize| &all[6 * r..6 * r + 6];
    let fail = |detail: String| {
        Err(Error::Collective {
            op,
            detail,
            source: None,
        })
    };
    if local.is_err() {
        return Ok(());
    }
    if let Some(r) = (0..world).find(|&r| rec(r)[0] == 0.0) {
        return fail(format!(
            "rank {r} rejected its inputs (its call returned the error); this rank (rank {me})              did no work"
        ));
    }
    if let Some(r) = (0..world).find(|&r| rec(r)[4..6] != rec(me)[4..6]) {
        return fail(format!(
            "ranks {me} and {r} were called with other arguments (spec, global shape,              embeddings, labels, row inputs, options or forward): every rank passes the same"
        ));
    }
    let mut slices: Vec<(usize, usize, usize, usize)> = (0..world)
        .map(|r| {
            let v = rec(r);
            (v[1] as usize, v[2] as usize, v[3] as usize, r)
        })
        .collect();
    slices.sort_unstable();
    let c = shard.num_classes;
    let mut next = 0usize;
    for &(start, n, classes, r) in &slices {
        if classes != c {
            return fail(format!(
                "rank {r}'s shard is of C = {classes} classes, rank {me}'s of C = {c}"
            ));
        }
        if start != next {
            return fail(format!(
                "the shards do not tile 0..{c}: rank {r} starts at class {start}, the classes                  before it end at {next} (sorted by class_start: {:?})",
                slices
                    .iter()
                    .map(|&(s, n, _, r)| (r, s..s + n))
                    .collect::<Vec<_>>()
            ));
        }
        next = start + n;
    }
    if next != c {
        return fail(format!("the shards cover classes 0..{next} of C = {c}"));
    }
    Ok(())
}

/// Partial FC (An et al., "Partial FC", ICCV 2021 workshops; insightface's `PartialFC_V2`): each
/// step, each rank keeps the classes that are some row's target and random others, so that it
/// uses `max(floor(rate * num_local), positives)` classes.
///
/// The negatives are the ones with the smallest keys `splitmix(splitmix(splitmix(seed) ^ step) ^
/// class)` of the global class id: reproducible from `(seed, step)` whatever the threads, and a
/// class's key does not depend on how the classes are sharded. (insightface draws `torch.rand`
/// per local class and keeps the top `floor(rate * num_local)`, positives forced in: the same
/// distribution, uniform without replacement, another generator.)
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PartialFc {
    /// The fraction of each rank's classes kept per step, `0 < rate <= 1` (insightface: 0.1 to
    /// 0.3; 1 keeps every class).
    pub rate: f64,
    /// The seed of the negative draw.
    pub seed: u64,
}

/// A step's sampled classes of one rank ([`PartialFc::sample`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sampled {
    /// The kept local classes (`0 .. num_local`), ascending: column `k` of the sampled problem is
    /// local class `index[k]`, global class `class_start + index[k]`.
    pub index: Vec<u32>,
    /// How many of them are some row's target.
    pub positives: usize,
    /// The shard they were drawn from.
    pub shard: ClassShard,
    /// The step they were drawn for.
    pub step: u64,
}

impl Sampled {
    /// The global class ids of the kept classes, ascending.
    pub fn global_classes(&self) -> impl Iterator<Item = usize> + '_ {
        self.index
            .iter()
            .map(|&j| self.shard.class_start + j as usize)
    }

    /// Ok when this set fits `shard`: drawn for it, its index strictly ascending local classes
    /// (what [`PartialFc::sample`] makes; a set built by hand is held to it too).
    pub fn check(&self, shard: &ClassShard) -> Result<()> {
        let bad = |detail: String| {
            Err(Error::InvalidArgument {
                what: "sampled",
                detail,
            })
        };
        if self.shard != *shard {
            return bad(format!(
                "drawn for shard {:?}, this rank holds {shard:?}",
                self.shard
            ));
        }
        if self.index.windows(2).any(|p| p[0] >= p[1])
            || self.index.iter().any(|&j| j as usize >= shard.num_local)
        {
            return bad(format!(
                "the index must be strictly ascending local classes below {}",
                shard.num_local
            ));
        }
        Ok(())
    }

    /// The column of global `label` in the sampled problem, when it was kept.
    pub fn column(&self, label: i32) -> Option<usize> {
        let j = u32::try_from(self.shard.local(label)?).ok()?;
        self.index.binary_search(&j).ok()
    }
}

impl PartialFc {
    /// The sampling rule with `rate` and `seed`; errors unless `0 < rate <= 1`.
    pub fn new(rate: f64, seed: u64) -> Result<Self> {
        let s = Self { rate, seed };
        s.validate()?;
        Ok(s)
    }

    /// Checks the rate.
    pub fn validate(&self) -> Result<()> {
        if self.rate.is_finite() && self.rate > 0.0 && self.rate <= 1.0 {
            Ok(())
        } else {
            Err(Error::InvalidArgument {
                what: "rate",
                detail: format!(
                    "Partial FC's sample rate is {}, must be in (0, 1]",
                    self.rate
                ),
            })
        }
    }

    /// The key of global class `class` at `step`: the smallest keys are drawn.
    pub fn key(&self, step: u64, class: usize) -> u64 {
        splitmix(splitmix(splitmix(self.seed) ^ step) ^ class as u64)
    }

    /// The classes of `shard` kept at `step` for the global batch's `labels` (negative labels
    /// ignored): every local class that is a target, then the negatives with the smallest keys
    /// up to `floor(rate * num_local)` classes in all. O(`num_local` + B log B).
    pub fn sample(&self, shard: &ClassShard, labels: &[i32], step: u64) -> Result<Sampled> {
        self.validate()?;
        if u32::try_from(shard.num_local).is_err() {
            return Err(Error::TooLarge {
                what: "shard",
                detail: format!(
                    "num_local = {} classes on one rank; Partial FC indexes them with u32",
                    shard.num_local
                ),
            });
        }
        for (row, &label) in labels.iter().enumerate() {
            if label >= 0 && label as usize >= shard.num_classes {
                return Err(Error::LabelOutOfRange {
                    row,
                    label: label as i64,
                    classes: shard.num_classes,
                });
            }
        }
        let n = shard.num_local;
        let mut positive: Vec<u32> = labels
            .iter()
            .filter_map(|&y| shard.local(y).map(|j| j as u32))
            .collect();
        positive.sort_unstable();
        positive.dedup();
        let want = ((self.rate * n as f64).floor() as usize).min(n);
        let positives = positive.len();
        let index = if want <= positives {
            positive
        } else {
            // The negatives with the smallest keys: one selection over the non-positive
            // classes, ties (equal 64-bit keys) to the lower class.
            let mut is_pos = vec![false; n];
            positive.iter().for_each(|&j| is_pos[j as usize] = true);
            let mut keyed: Vec<(u64, u32)> = (0..n)
                .filter(|&j| !is_pos[j])
                .map(|j| (self.key(step, shard.class_start + j), j as u32))
                .collect();
            let extra = want - positives;
            if extra < keyed.len() {
                keyed.select_nth_unstable(extra);
                keyed.truncate(extra);
            }
            let mut index = positive;
            index.extend(keyed.iter().map(|&(_, j)| j));
            index.sort_unstable();
            index
        };
        Ok(Sampled {
            index,
            positives,
            shard: *shard,
            step,
        })
    }
}

/// A rank's labels as its columns see them, from the global ones: its own classes as their
/// columns (`y - class_start`, or with Partial FC the class's position in `sampled.index`),
/// another rank's as the number of columns (a counted row whose target is elsewhere: no column
/// matches it; on the GPU `fm_target_rows` writes it a neutral record), ignored rows as they are.
/// Errors name a label outside `0..num_classes`, a target of this rank that was not sampled, and
/// a sampled set that is not [`Sampled::check`]'s.
pub fn column_labels(
    labels: &[i32],
    shard: &ClassShard,
    sampled: Option<&Sampled>,
) -> Result<Vec<i32>> {
    if let Some(sm) = sampled {
        sm.check(shard)?;
    }
    let cols = sampled.map_or(shard.num_local, |s| s.index.len());
    let remote = i32::try_from(cols).map_err(|_| Error::TooLarge {
        what: "shard",
        detail: format!("{cols} classes on one rank must be < 2^31"),
    })?;
    labels
        .iter()
        .enumerate()
        .map(|(row, &y)| {
            if y < 0 {
                return Ok(y);
            }
            if y as usize >= shard.num_classes {
                return Err(Error::LabelOutOfRange {
                    row,
                    label: y as i64,
                    classes: shard.num_classes,
                });
            }
            match (shard.local(y), sampled) {
                (None, _) => Ok(remote),
                (Some(j), None) => Ok(j as i32),
                (Some(_), Some(s)) => {
                    s.column(y)
                        .map(|c| c as i32)
                        .ok_or_else(|| Error::InvalidArgument {
                            what: "sampled",
                            detail: format!(
                                "row {row}'s target {y} is this rank's but not among the sampled \
                                 classes (Partial FC keeps every positive)"
                            ),
                        })
                }
            }
        })
        .collect()
}

/// The rows of the global batch that rank `rank` owns under [`DxReduce::Owner`]; errors unless
/// `world` divides `b`.
pub fn owner_rows(b: usize, world: usize, rank: usize) -> Result<Range<usize>> {
    if world == 0 || rank >= world {
        return Err(Error::InvalidArgument {
            what: "rank",
            detail: format!("rank {rank} of world size {world}"),
        });
    }
    if b % world != 0 {
        return Err(Error::InvalidArgument {
            what: "dx",
            detail: format!(
                "DxReduce::Owner splits the global batch evenly: B = {b} is not divisible by \
                 the world size {world} (use DxReduce::Global or Partial)"
            ),
        });
    }
    let n = b / world;
    Ok(rank * n..(rank + 1) * n)
}
