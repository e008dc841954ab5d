//! Measurement helpers for benchmarks on the caller's stream: CUDA-event timing, an L2 flush
//! between repeats, and the device memory pool's high-water mark (a driver measurement of peak
//! device memory, not a formula).

use super::cuda_err;
use crate::error::{Error, Result};
use cudarc::driver::sys::{self, CUmemPool_attribute, CUmemoryPool};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream};
use std::sync::Arc;

/// Times work on a stream with a pair of CUDA events (GPU time between the two records).
pub struct EventTimer {
    start: CudaEvent,
    end: CudaEvent,
}

impl EventTimer {
    /// Two timing-enabled events on `stream`'s context.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context();
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        Ok(Self {
            start: ctx
                .new_event(flags)
                .map_err(|e| cuda_err("create event", e))?,
            end: ctx
                .new_event(flags)
                .map_err(|e| cuda_err("create event", e))?,
        })
    }

    /// Records the start event, runs `work` (which enqueues on `stream`), records the end event,
    /// waits for it and returns the elapsed GPU time in milliseconds.
    pub fn time_ms(&self, stream: &CudaStream, work: impl FnOnce() -> Result<()>) -> Result<f64> {
        self.start
            .record(stream)
            .map_err(|e| cuda_err("record event", e))?;
        work()?;
        self.end
            .record(stream)
            .map_err(|e| cuda_err("record event", e))?;
        self.end
            .synchronize()
            .map_err(|e| cuda_err("wait for event", e))?;
        let ms = self
            .start
            .elapsed_ms(&self.end)
            .map_err(|e| cuda_err("read event time", e))?;
        Ok(ms as f64)
    }
}

/// Evicts the L2 cache by writing a buffer twice its size, so a repeat does not time warm data.
pub struct L2Flush {
    buf: CudaSlice<u8>,
    stream: Arc<CudaStream>,
}

impl L2Flush {
    /// A flush buffer of twice the device's L2 size (at least 64 MiB).
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let l2 = stream
            .context()
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(|e| cuda_err("query L2 size", e))? as usize;
        let bytes = (2 * l2).max(64 << 20);
        let buf = stream
            .alloc_zeros::<u8>(bytes)
            .map_err(|e| cuda_err("allocate L2 flush buffer", e))?;
        Ok(Self {
            buf,
            stream: stream.clone(),
        })
    }

    /// Enqueues the flush (a memset over the whole buffer) on the stream.
    pub fn flush(&mut self) -> Result<()> {
        self.stream
            .memset_zeros(&mut self.buf)
            .map_err(|e| cuda_err("flush L2", e))
    }
}

/// The device's default memory pool, from which cudarc's stream-ordered allocations come: its
/// `USED_MEM_HIGH` attribute is the driver's own high-water mark of allocated bytes.
pub struct PoolPeak {
    pool: CUmemoryPool,
}

// SAFETY: a CUmemoryPool handle is a driver object usable from any thread of the process.
unsafe impl Send for PoolPeak {}

impl PoolPeak {
    /// The default pool of `stream`'s device; an error when the device has no stream-ordered
    /// allocator (then cudarc allocates synchronously and this measurement does not apply).
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context();
        if !ctx.has_async_alloc() {
            return Err(Error::Unsupported {
                detail: "device has no stream-ordered allocator: pool high-water mark unavailable"
                    .into(),
            });
        }
        ctx.bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        let mut pool: CUmemoryPool = std::ptr::null_mut();
        // SAFETY: writes one pool handle into `pool`; the device handle comes from a live context.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
            .result()
            .map_err(|e| cuda_err("get default memory pool", e))?;
        Ok(Self { pool })
    }

    fn get(&self, attr: CUmemPool_attribute) -> Result<u64> {
        let mut v: u64 = 0;
        // SAFETY: the USED/RESERVED_MEM attributes are cuuint64_t, written into `v`.
        unsafe { sys::cuMemPoolGetAttribute(self.pool, attr, &mut v as *mut u64 as *mut _) }
            .result()
            .map_err(|e| cuda_err("read memory pool attribute", e))?;
        Ok(v)
    }

    /// Bytes currently allocated from the pool.
    pub fn used(&self) -> Result<u64> {
        self.get(CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }

    /// The high-water mark of allocated bytes since the last [`Self::reset`].
    pub fn high(&self) -> Result<u64> {
        self.get(CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }

    /// Keeps freed memory in the pool instead of returning it to the driver at each
    /// synchronization (the pool's release threshold set to the maximum), as a framework's caching
    /// allocator would: repeated calls then do not time page mapping.
    pub fn keep_memory(&self) -> Result<()> {
        let mut max: u64 = u64::MAX;
        // SAFETY: RELEASE_THRESHOLD is a cuuint64_t, passed by pointer.
        unsafe {
            sys::cuMemPoolSetAttribute(
                self.pool,
                CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut max as *mut u64 as *mut _,
            )
        }
        .result()
        .map_err(|e| cuda_err("set memory pool release threshold", e))
    }

    /// Resets the high-water mark to the current usage.
    pub fn reset(&self) -> Result<()> {
        let mut zero: u64 = 0;
        // SAFETY: USED_MEM_HIGH may only be set to 0 (a reset), passed as a cuuint64_t.
        unsafe {
            sys::cuMemPoolSetAttribute(
                self.pool,
                CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut _,
            )
        }
        .result()
        .map_err(|e| cuda_err("reset memory pool high-water mark", e))
    }
}
