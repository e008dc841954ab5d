//! [`NcclComm`]: the sharded loss's [`Communicator`] over NCCL, through cudarc's `nccl` module
//! (feature `nccl` of this crate). NCCL is opened at run time like the other CUDA libraries, so
//! the crate builds, and its CPU path runs, where NCCL is not installed; [`nccl_available`] tells
//! whether it can be used.
//!
//! The collectives of [`Communicator`] take host `f64` buffers (what [`crate::cpu::shard_forward`]
//! and [`crate::cpu::shard_backward`] exchange): each call copies to the communicator's device,
//! runs the NCCL collective on its stream and copies back, synchronizing the stream. NCCL sums
//! `f64` in an order fixed by the world size, topology and algorithm, so reruns on the same
//! machine give the same bits; the sharded loss's own combine runs in rank order after an
//! all-gather, whatever NCCL's order.
//!
//! Ranks: one process or thread per rank, each with its own communicator
//! ([`NcclComm::from_rank`], the id from [`NcclComm::unique_id`] sent to every rank by the
//! caller's launcher), or every rank of one process from [`NcclComm::from_streams`], each then
//! moved to its own thread. Several ranks on one GPU need NCCL 2.30 or newer and
//! `NCCL_MULTI_RANK_GPU_ENABLE=1`.

use crate::error::{Error, Result};
use crate::shard::Communicator;
use cudarc::driver::CudaStream;
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::sync::Arc;

/// The id every rank of a group passes to [`NcclComm::from_rank`] (NCCL's `ncclUniqueId`, 128
/// bytes): made once by one rank, sent to the others by the caller.
#[derive(Clone, Copy)]
pub struct NcclId(pub [std::ffi::c_char; 128]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId(..)")
    }
}

/// The names cudarc opens libnccl by include `libnccl.so` but not NCCL's own soname
/// `libnccl.so.2` (what NVIDIA's `nvidia-nccl-cu*` wheels ship): found alone, it is named in the
/// error so the fix (a `libnccl.so` link beside it) is plain.
const SONAME: &str = "libnccl.so.2";

/// True when libnccl can be opened (feature `dynamic-linking`: linked, so true).
pub fn nccl_available() -> bool {
    #[cfg(not(feature = "dynamic-linking"))]
    {
        // SAFETY: only tries to dlopen libnccl by its known names; no NCCL call is made.
        unsafe { cudarc::nccl::sys::is_culib_present() }
    }
    #[cfg(feature = "dynamic-linking")]
    {
        true
    }
}

fn check_available() -> Result<()> {
    if nccl_available() {
        return Ok(());
    }
    // SAFETY: only tries to dlopen the soname, to make the error precise; no NCCL call is made.
    let soname = unsafe { libloading::Library::new(SONAME) }.is_ok();
    Err(Error::NoDevice {
        reason: if soname {
            format!(
                "{SONAME} loads but cudarc opens libnccl by the name libnccl.so: add a link \
                 libnccl.so -> {SONAME} in a directory of LD_LIBRARY_PATH"
            )
        } else {
            "libnccl (NCCL) was not found: install NCCL (e.g. the nvidia-nccl-cu13 wheel) and put \
             its lib directory, with a libnccl.so link, on LD_LIBRARY_PATH"
                .into()
        },
    })
}

fn nccl_err(op: &'static str, e: cudarc::nccl::result::NcclError) -> Error {
    Error::Collective {
        op,
        detail: format!("NCCL returned {:?}", e.0),
        source: None,
    }
}

/// A rank's NCCL communicator as a [`Communicator`].
pub struct NcclComm {
    comm: Comm,
}

// SAFETY: an NCCL communicator may be used from any thread as long as no two threads use it at
// once (NCCL's thread-safety rule); `NcclComm` is not `Sync` and its methods take `&self` on
// the owning thread only, so moving it to another thread (one thread per rank) is sound. The
// stream it holds is an `Arc<CudaStream>`, itself `Send`.
unsafe impl Send for NcclComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclComm {{ rank: {}, world: {}, device: {} }}",
            self.comm.rank(),
            self.comm.world_size(),
            self.comm.ordinal()
        )
    }
}

impl NcclComm {
    /// A new group id (`ncclGetUniqueId`), made by one rank and sent to the others.
    pub fn unique_id() -> Result<NcclId> {
        check_available()?;
        let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
        Ok(NcclId(*id.internal()))
    }

    /// This process's rank `rank` of `world` (`ncclCommInitRank`), its collectives on `stream`.
    /// Blocks until every rank has joined.
    pub fn from_rank(
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
        id: NcclId,
    ) -> Result<Self> {
        check_available()?;
        if world == 0 || rank >= world || i32::try_from(world).is_err() {
            return Err(Error::InvalidArgument {
                what: "rank",
                detail: format!("rank {rank} of world size {world}"),
            });
        }
        let comm = Comm::from_rank(stream, rank, world, Id::uninit(id.0))
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok(Self { comm })
    }

    /// One communicator per stream, rank `r` on `streams[r]`, for a process that drives every
    /// rank (`ncclCommInitAll`); move each to its own thread before calling collectives. Streams
    /// of one device give several ranks on one GPU (NCCL 2.30+, `NCCL_MULTI_RANK_GPU_ENABLE=1`).
    pub fn from_streams(streams: Vec<Arc<CudaStream>>) -> Result<Vec<Self>> {
        check_available()?;
        if streams.is_empty() || i32::try_from(streams.len()).is_err() {
            return Err(Error::InvalidArgument {
                what: "streams",
                detail: format!("{} streams for one group", streams.len()),
            });
        }
        let comms = Comm::from_devices(streams).map_err(|e| nccl_err("ncclCommInitAll", e))?;
        Ok(comms.into_iter().map(|comm| Self { comm }).collect())
    }

    /// cudarc's communicator, for the caller's own collectives (the embeddings' all-gather).
    pub fn comm(&self) -> &Comm {
        &self.comm
    }

    /// Copies `host` to the device, runs `op` on the copy (and a receive buffer of `n_out`),
    /// and copies the result to `out`; synchronizes the communicator's stream.
    fn staged(
        &self,
        name: &'static str,
        host: &[f64],
        out: &mut [f64],
        op: impl FnOnce(
            &Comm,
            &cudarc::driver::CudaSlice<f64>,
            &mut cudarc::driver::CudaSlice<f64>,
        ) -> std::result::Result<
            cudarc::nccl::result::NcclStatus,
            cudarc::nccl::result::NcclError,
        >,
    ) -> Result<()> {
        let stream = self.comm.stream();
        let drv = |what: &'static str| move |e| Error::driver(what, e);
        let send = stream
            .clone_htod(host)
            .map_err(drv("copy to the NCCL buffer"))?;
        let mut recv = stream
            .alloc_zeros::<f64>(out.len())
            .map_err(drv("allocate the NCCL buffer"))?;
        op(&self.comm, &send, &mut recv).map_err(|e| nccl_err(name, e))?;
        stream
            .memcpy_dtoh(&recv, out)
            .map_err(drv("copy from the NCCL buffer"))?;
        stream
            .synchronize()
            .map_err(drv("synchronize the NCCL stream"))
    }

    fn check(&self, op: &'static str, ok: bool, detail: impl FnOnce() -> String) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(Error::Collective {
                op,
                detail: detail(),
                source: None,
            })
        }
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_gather(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        let w = self.world_size();
        self.check(
            "all_gather",
            Some(recv.len()) == send.len().checked_mul(w),
            || {
                format!(
                    "recv has {} values for {w} ranks of {}",
                    recv.len(),
                    send.len()
                )
            },
        )?;
        if send.is_empty() {
            return Ok(());
        }
        self.staged("ncclAllGather", send, recv, |c, s, r| c.all_gather(s, r))
    }

    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let host = buf.to_vec();
        self.staged("ncclAllReduce", &host, buf, |c, s, r| {
            c.all_reduce(s, r, &ReduceOp::Sum)
        })
    }

    fn reduce_scatter_sum(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        let w = self.world_size();
        self.check(
            "reduce_scatter_sum",
            Some(send.len()) == recv.len().checked_mul(w),
            || {
                format!(
                    "send has {} values for {w} ranks of {}",
                    send.len(),
                    recv.len()
                )
            },
        )?;
        if recv.is_empty() {
            return Ok(());
        }
        self.staged("ncclReduceScatter", send, recv, |c, s, r| {
            c.reduce_scatter(s, r, &ReduceOp::Sum)
        })
    }
}
