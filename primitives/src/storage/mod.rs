//! The disk tier: aligned direct reads of checkpoint files in place, I/O threads, and the offload
//! directory for disk-resident KV cache and activations.
//!
//! Building blocks for the block schedule (design section 5), usable on their own:
//!
//! - [`DirectFile`]: a file read with `O_DIRECT` where the filesystem allows it, buffered with
//!   `posix_fadvise(DONTNEED)` where it does not ([`DirectFile::fallback`] says so and why).
//!   Any byte range is read as its 4 KiB-aligned superset; the wanted bytes are a sub-slice.
//! - [`IoPool`]: I/O threads with a bounded queue; [`IoPool::read`] splits a range into
//!   `request_size` requests served concurrently and returns a [`ReadHandle`]; buffers come from
//!   a bounded [`BufferPool`] and return to it on drop.
//! - [`OffloadDir`]: a unique directory removed on drop and on Ctrl-C/SIGTERM, whose files are
//!   preallocated so a full disk fails early with [`StorageError::NoSpace`].
//! - [`BlockDevice`]: the kernel's counters for the device under a file, so a run can say what
//!   the disk itself did in a stage (bytes read, time busy), not only what its threads timed.
//!
//! See docs/storage-and-compression.md for measured bandwidths.

#![warn(missing_docs)]

mod aligned;
mod device_stat;
mod direct;
mod error;
mod offload;
mod pool;

pub use aligned::{align_down, align_up, AlignedBuf, ALIGN};
pub use device_stat::{BlockDevice, DeviceActivity, DeviceCounters};
pub use direct::{AlignedRead, DirectFile, IoMode};
pub use error::{Result, StorageError};
pub use offload::{cleanup_live_dirs, install_cleanup_handler, OffloadDir, OffloadFile};
pub use pool::{
    BufferPool, IoPool, IoPoolConfig, IoStats, PoolStats, PooledBuf, PooledRead, ReadHandle,
    WriteHandle,
};

#[cfg(test)]
mod tests;
