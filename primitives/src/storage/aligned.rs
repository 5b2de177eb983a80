//! Page-aligned heap buffers, the only memory `O_DIRECT` transfers may use.

use super::error::{Result, StorageError};
use std::alloc::Layout;
use std::ptr::NonNull;

/// Alignment of every direct transfer: buffer address, file offset and length. 4 KiB covers the
/// logical block size of every disk and filesystem the executor targets (512 B or 4 KiB).
pub const ALIGN: usize = 4096;

/// Rounds `x` down to a multiple of [`ALIGN`].
pub fn align_down(x: u64) -> u64 {
    x & !(ALIGN as u64 - 1)
}

/// Rounds `x` up to a multiple of [`ALIGN`].
pub fn align_up(x: u64) -> u64 {
    x.div_ceil(ALIGN as u64) * ALIGN as u64
}

/// A zero-initialised buffer whose address and capacity are multiples of [`ALIGN`].
///
/// Owned and `Send`, so it can be filled on an I/O thread and read on a compute thread. The
/// capacity is fixed at allocation; pools hand the same buffers out again instead of allocating.
/// Buffers of 2 MiB or more are mapped at a 2 MiB boundary with huge-page advice, as
/// `kernels::HugePageBuf` is. Direct reads hand the device the buffer's pages, and on the Zen 5
/// development VM the disk read OPT-6.7B's disk-resident weights at 3.45-3.50 GB/s into such
/// buffers against 1.96-2.57 GB/s into heap buffers on 4 KiB pages (decode 1.60 against 2.3-3.0 s
/// per step, three interleaved pairs); the decode kernels, which read the weights straight out of
/// these buffers, also computed the step in 0.91-1.00x the time.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    /// Whether `ptr` is a mapping of its own (`kernels::memory::map_aligned`), not a heap block.
    mapped: bool,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); no interior mutability.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates at least `bytes` bytes (rounded up to [`ALIGN`], at least one page), zeroed so
    /// that no stale heap contents can ever be read back.
    pub fn new(bytes: usize) -> Result<AlignedBuf> {
        let cap = (bytes.max(1)).div_ceil(ALIGN) * ALIGN;
        if cap >= crate::kernels::HUGE_PAGE_BYTES {
            if let Some((ptr, mapped)) = crate::kernels::memory::map_aligned(cap) {
                debug_assert_eq!(mapped, cap);
                // Anonymous mappings are zero-filled by the kernel.
                return Ok(AlignedBuf {
                    ptr,
                    cap,
                    mapped: true,
                });
            }
        }
        let layout =
            Layout::from_size_align(cap, ALIGN).map_err(|_| StorageError::Alloc { bytes })?;
        // SAFETY: the layout has non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(StorageError::Alloc { bytes })?;
        Ok(AlignedBuf {
            ptr,
            cap,
            mapped: false,
        })
    }

    /// Bytes the buffer holds (a multiple of [`ALIGN`]).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The whole buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to cap initialised (zeroed at allocation) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.cap) }
    }

    /// The whole buffer, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }

    /// Raw pointer for the I/O threads, which fill disjoint parts of one buffer concurrently.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: mapped in new() with exactly this start and length, released once.
            unsafe { crate::kernels::memory::unmap(self.ptr, self.cap) };
            return;
        }
        // SAFETY: allocated in new() with exactly this layout (cap was validated there).
        unsafe {
            std::alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, ALIGN),
            )
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.cap)
    }
}
