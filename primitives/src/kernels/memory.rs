//! Memory helpers for bandwidth-bound work: huge-page advice for large weight buffers, and the
//! plain streaming read that serves as the DRAM read-bandwidth reference.

use rayon::prelude::*;

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

/// A vector of `len` copies of `value` whose pages are advised huge before they are written.
pub fn huge_page_vec<T: Copy + Send + Sync>(len: usize, value: T) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(len);
    // SAFETY: the spare capacity is only advised here, not read.
    advise_huge_pages(unsafe { std::slice::from_raw_parts(v.as_ptr(), len) });
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(1 << 16)
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(value)));
    // SAFETY: all `len` elements were just initialised.
    unsafe { v.set_len(len) };
    v
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
