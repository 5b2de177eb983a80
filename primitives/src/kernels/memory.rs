//! Memory helpers for bandwidth-bound work: buffers on whole huge pages for weights and caches,
//! huge-page advice for file mappings, and the plain streaming read that serves as the DRAM
//! read-bandwidth reference.

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Asks Linux to back `buf` with transparent huge pages (`madvise(MADV_HUGEPAGE)`), best effort.
///
/// Call it before the buffer is first written, so its pages are faulted in as 2 MiB pages. On
/// this machine (THP in `madvise` mode) a plain sequential read of 4 KiB pages streams at about
/// two thirds of the rate it reaches on 2 MiB pages, and so do the decode kernels: per 4 KiB page
/// the hardware prefetchers restart and the TLB misses. Does nothing elsewhere, for buffers
/// smaller than a page, or when the kernel refuses (e.g. a file mapping on a filesystem without
/// huge-page support).
pub fn advise_huge_pages<T>(buf: &[T]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = buf.as_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let (a, b) = (start.next_multiple_of(PAGE), end / PAGE * PAGE);
        if b > a {
            // SAFETY: the range lies inside `buf`'s allocation; MADV_HUGEPAGE changes no contents.
            unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// The size of a transparent huge page on x86-64 and most aarch64 kernels.
pub const HUGE_PAGE_BYTES: usize = 2 << 20;

/// A fixed-length buffer of `T` whose every 2 MiB of the start is a whole huge page: weights and
/// caches that the bandwidth-bound kernels stream.
///
/// Why not a `Vec` with huge-page advice: glibc serves a large allocation with its own mapping,
/// and since Linux 6.12 the kernel aligns an anonymous mapping to 2 MiB only when its length is a
/// multiple of 2 MiB, which malloc's header makes it never is. Such a buffer starts mid-way through
/// a 2 MiB frame, and the frames it only partly covers at either end stay on 4 KiB pages: about
/// 2 MiB of every tensor, 12% of OPT-1.3B's weights (measured from `/proc/self/smaps`), which the
/// decode kernels then stream at about two thirds of the rate. This buffer maps its own memory
/// at a 2 MiB boundary, so only the part past the last full huge page (under 2 MiB, at the end)
/// can be on small pages. Buffers under 2 MiB, and other systems, use the heap.
pub struct HugePageBuf<T> {
    /// Start of the mapping (unused when the elements are on the heap).
    ptr: std::ptr::NonNull<T>,
    len: usize,
    /// Bytes mapped at `ptr` (a whole number of 4 KiB pages), or `None` when the elements live
    /// in `heap` instead.
    mapped: Option<usize>,
    heap: Vec<T>,
}

// SAFETY: the buffer owns its elements exclusively, like a Vec.
unsafe impl<T: Send> Send for HugePageBuf<T> {}
// SAFETY: shared access only hands out `&[T]`.
unsafe impl<T: Sync> Sync for HugePageBuf<T> {}

impl<T: Copy + Send + Sync> HugePageBuf<T> {
    /// `len` copies of `value`, written in parallel (so the pages are faulted in here, as huge
    /// pages where the kernel has them, and not inside a timed loop).
    pub fn filled(len: usize, value: T) -> HugePageBuf<T> {
        Self::build(len, value, true)
    }

    /// `len` zeros, for a buffer its caller overwrites whole (a tensor read from a file): a
    /// fresh mapping is zero already, so unlike [`HugePageBuf::filled`] nothing is written here
    /// and the pages are faulted in by that first write.
    pub fn zeroed(len: usize) -> HugePageBuf<T>
    where
        T: bytemuck::Zeroable,
    {
        Self::build(len, T::zeroed(), false)
    }

    /// A buffer of `len` copies of `value`; `write_mapping` false only where `value` is all zero
    /// bytes, which a fresh mapping holds already.
    fn build(len: usize, value: T, write_mapping: bool) -> HugePageBuf<T> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .expect("buffer size overflows");
        if bytes >= HUGE_PAGE_BYTES && std::mem::align_of::<T>() <= 4096 {
            if let Some((ptr, mapped)) = map_aligned(bytes) {
                let ptr = ptr.cast::<T>();
                if write_mapping {
                    // SAFETY: the mapping holds `bytes` writable bytes at a 2 MiB boundary
                    // (aligned for T); elements are written before anything reads them.
                    let spare = unsafe {
                        std::slice::from_raw_parts_mut(ptr.as_ptr().cast::<MaybeUninit<T>>(), len)
                    };
                    spare
                        .par_chunks_mut(1 << 16)
                        .for_each(|c| c.fill(MaybeUninit::new(value)));
                }
                return HugePageBuf {
                    ptr,
                    len,
                    mapped: Some(mapped),
                    heap: Vec::new(),
                };
            }
        }
        HugePageBuf {
            ptr: std::ptr::NonNull::dangling(),
            len,
            mapped: None,
            heap: vec![value; len],
        }
    }

    /// A copy of `items` in a new buffer.
    pub fn from_slice(items: &[T]) -> HugePageBuf<T> {
        let Some(&first) = items.first() else {
            return HugePageBuf::from(Vec::new());
        };
        let mut buf = HugePageBuf::filled(items.len(), first);
        buf.par_chunks_mut(1 << 16)
            .zip(items.par_chunks(1 << 16))
            .for_each(|(d, s)| d.copy_from_slice(s));
        buf
    }

    /// The same memory as elements of `U` (for repacking in place), when it is a mapping of
    /// this buffer's own and holds a whole number of `U`s; else the buffer back.
    pub(crate) fn try_cast<U: bytemuck::Pod>(self) -> Result<HugePageBuf<U>, HugePageBuf<T>>
    where
        T: bytemuck::Pod,
    {
        let bytes = self.len * std::mem::size_of::<T>();
        let (size, align) = (std::mem::size_of::<U>(), std::mem::align_of::<U>());
        match self.mapped {
            Some(mapped) if size > 0 && bytes.is_multiple_of(size) && align <= 4096 => {
                let cast = HugePageBuf {
                    ptr: self.ptr.cast::<U>(),
                    len: bytes / size,
                    mapped: Some(mapped),
                    heap: Vec::new(),
                };
                // The mapping now belongs to `cast`.
                std::mem::forget(self);
                Ok(cast)
            }
            _ => Err(self),
        }
    }

    /// Whether the elements are in a mapping of this buffer's own, aligned to a huge page
    /// (false for small buffers and where the system offers no such mapping).
    pub fn is_huge_page_aligned(&self) -> bool {
        self.mapped.is_some()
    }
}

/// Maps `bytes` (rounded up to 4 KiB) of zeroed anonymous memory starting at a 2 MiB boundary,
/// advised huge; None if the system refuses. Release it with `unmap(ptr, len)`.
#[cfg(target_os = "linux")]
pub(crate) fn map_aligned(bytes: usize) -> Option<(std::ptr::NonNull<u8>, usize)> {
    const PAGE: usize = 4096;
    let mapped = bytes.next_multiple_of(PAGE);
    let reserve = mapped.checked_add(HUGE_PAGE_BYTES)?;
    // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE_BYTES);
    let (head, tail) = (aligned - start, start + reserve - (aligned + mapped));
    // SAFETY: both ranges are page-aligned parts of the mapping just made, outside the part kept.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + mapped) as *mut libc::c_void, tail);
        }
        // Best effort, as in `advise_huge_pages`.
        libc::madvise(aligned as *mut libc::c_void, mapped, libc::MADV_HUGEPAGE);
    }
    std::ptr::NonNull::new(aligned as *mut u8).map(|p| (p, mapped))
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn map_aligned(_bytes: usize) -> Option<(std::ptr::NonNull<u8>, usize)> {
    None
}

/// Releases a mapping made by [`map_aligned`].
///
/// # Safety
/// `ptr` and `len` are exactly what `map_aligned` returned, and nothing refers to the memory.
pub(crate) unsafe fn unmap(ptr: std::ptr::NonNull<u8>, len: usize) {
    #[cfg(target_os = "linux")]
    // SAFETY: the caller's contract.
    unsafe {
        libc::munmap(ptr.as_ptr().cast(), len);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

impl<T> Drop for HugePageBuf<T> {
    fn drop(&mut self) {
        if let Some(mapped) = self.mapped {
            // SAFETY: the mapping was made by `map_aligned` with this start and length and is
            // released once; the elements are Copy, so nothing needs dropping.
            unsafe { unmap(self.ptr.cast(), mapped) };
        }
    }
}

impl<T> std::ops::Deref for HugePageBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        if self.mapped.is_none() {
            return &self.heap;
        }
        // SAFETY: the mapping at `ptr` holds `len` initialised elements while the buffer lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> std::ops::DerefMut for HugePageBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        if self.mapped.is_none() {
            return &mut self.heap;
        }
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy + Send + Sync> Clone for HugePageBuf<T> {
    fn clone(&self) -> Self {
        HugePageBuf::from_slice(self)
    }
}

/// Keeps a small vector as it is; moves a large one onto huge pages (one copy).
impl<T: Copy + Send + Sync> From<Vec<T>> for HugePageBuf<T> {
    fn from(v: Vec<T>) -> Self {
        if std::mem::size_of_val(v.as_slice()) >= HUGE_PAGE_BYTES {
            return HugePageBuf::from_slice(&v);
        }
        HugePageBuf {
            ptr: std::ptr::NonNull::dangling(),
            len: v.len(),
            mapped: None,
            heap: v,
        }
    }
}

impl<T: Copy + Send + Sync> FromIterator<T> for HugePageBuf<T> {
    fn from_iter<I: IntoIterator<Item = T>>(items: I) -> Self {
        HugePageBuf::from(items.into_iter().collect::<Vec<T>>())
    }
}

impl<T> std::fmt::Debug for HugePageBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HugePageBuf")
            .field("len", &self.len)
            .field("huge_page_aligned", &self.mapped.is_some())
            .finish()
    }
}

/// Reads every (4-byte aligned) word of `buf` once on all of rayon's threads (each a contiguous part, summed as
/// f32 with the widest loads the CPU has: 512-bit, else 256-bit) and returns the sum, so that the reads cannot
/// be optimised away. Timed over a buffer much larger than the last-level cache, this is the
/// DRAM read bandwidth the bandwidth-bound kernels are measured against: one sequential stream
/// per thread, the simplest pattern for the hardware to serve.
pub fn stream_read(buf: &[u8]) -> f32 {
    // The aligned middle: at most 3 bytes at either end are left out.
    let (_, floats, _) = bytemuck::pod_align_to::<u8, f32>(buf);
    let part = floats.len().div_ceil(rayon::current_num_threads()).max(16);
    floats.par_chunks(part).map(sum).sum()
}

/// Sums a slice with the widest loads this CPU has.
fn sum(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected.
        return unsafe { sum_avx512(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the feature was just detected.
        return unsafe { sum_avx2(x) };
    }
    sum_body(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(x: &[f32]) -> f32 {
    sum_body(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512(x: &[f32]) -> f32 {
    sum_body(x)
}

/// 64 independent lanes (four 512-bit accumulators), so the loop is limited by loads only.
#[inline(always)]
fn sum_body(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 64];
    let mut chunks = x.chunks_exact(64);
    for c in &mut chunks {
        for l in 0..64 {
            lanes[l] += c[l];
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}
