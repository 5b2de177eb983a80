//! Measures this machine's DRAM read bandwidth: the ceiling for batch-1 decode, which streams
//! every weight byte once per token.
//!
//! All threads (rayon's pool) each stream a contiguous part of a buffer much larger than the
//! last-level cache and sum it, so the loads cannot be optimised away. The median of several
//! passes is printed, in GB/s (10^9 bytes), as `dram_read_gb_s <value>` for scripts to parse.
//!
//! `cargo run --release --example dram_bandwidth -- [MiB, default 1024] [passes, default 9]`

use rayon::prelude::*;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args
        .next()
        .map_or(1024, |a| a.parse().expect("size in MiB"));
    let passes: usize = args
        .next()
        .map_or(9, |a| a.parse().expect("number of passes"));
    let len = mib * (1 << 20) / 4;
    // Written in parallel so every page is really mapped before timing.
    let mut buf = vec![0.0f32; len];
    buf.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(i, c)| c.fill(i as f32 * 1e-9));
    let threads = rayon::current_num_threads();
    let part = len.div_ceil(threads);
    let mut rates = Vec::new();
    let mut check = 0.0f64;
    for _ in 0..passes {
        let start = Instant::now();
        let total: f64 = buf.par_chunks(part).map(sum).sum();
        let secs = start.elapsed().as_secs_f64();
        check += total;
        rates.push((len * 4) as f64 / secs / 1e9);
    }
    rates.sort_by(f64::total_cmp);
    eprintln!(
        "{mib} MiB x {passes} passes on {threads} threads: min {:.2} median {:.2} max {:.2} GB/s (checksum {check:.3})",
        rates[0],
        rates[passes / 2],
        rates[passes - 1]
    );
    println!("dram_read_gb_s {:.3}", rates[passes / 2]);
}

/// Sums a slice with the widest loads this CPU has.
fn sum(x: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected.
        return unsafe { sum_avx512(x) };
    }
    sum_body(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512(x: &[f32]) -> f64 {
    sum_body(x)
}

/// 64 independent lanes (four 512-bit accumulators), so the loop is limited by loads only.
#[inline(always)]
fn sum_body(x: &[f32]) -> f64 {
    let mut lanes = [0.0f32; 64];
    let mut chunks = x.chunks_exact(64);
    for c in &mut chunks {
        for l in 0..64 {
            lanes[l] += c[l];
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    lanes.iter().map(|v| *v as f64).sum::<f64>() + tail as f64
}
