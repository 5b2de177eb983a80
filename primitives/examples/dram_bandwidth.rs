//! Measures this machine's DRAM read bandwidth: the ceiling for batch-1 decode, which streams
//! every weight byte once per token.
//!
//! All threads (rayon's pool) each stream a contiguous part of a buffer much larger than the
//! last-level cache and sum it (`primitives::kernels::stream_read`), so the loads cannot be
//! optimised away. The buffer is advised to use 2 MiB pages, as the executor's in-memory weights
//! are (pass `4k` to measure ordinary pages: usually slower here, by up to a third). The median
//! of several passes is printed, in GB/s (10^9 bytes), as `dram_read_gb_s <value>` for scripts.
//!
//! `cargo run --release --example dram_bandwidth -- [MiB, default 1024] [passes, default 9] [huge|4k]`

use primitives::kernels::{stream_read, HugePageBuf};
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args
        .next()
        .map_or(1024, |a| a.parse().expect("size in MiB"));
    let passes: usize = args
        .next()
        .map_or(9, |a| a.parse().expect("number of passes"));
    let huge = args.next().as_deref() != Some("4k");
    let len = mib << 20;
    // Written in parallel (the pages are really mapped before timing).
    let (huge_buf, small_buf);
    let buf: &[u8] = if huge {
        huge_buf = HugePageBuf::filled(len, 1u8);
        &huge_buf
    } else {
        let mut v = vec![0u8; len];
        v.fill(1);
        small_buf = v;
        &small_buf
    };
    let threads = rayon::current_num_threads();
    let mut rates = Vec::new();
    let mut check = 0.0f64;
    for _ in 0..passes {
        let start = Instant::now();
        check += stream_read(buf) as f64;
        let secs = start.elapsed().as_secs_f64();
        rates.push(len as f64 / secs / 1e9);
    }
    rates.sort_by(f64::total_cmp);
    eprintln!(
        "{mib} MiB ({} pages) x {passes} passes on {threads} threads: min {:.2} median {:.2} max {:.2} GB/s (checksum {check:.3e})",
        if huge { "2 MiB" } else { "4 KiB" },
        rates[0],
        rates[passes / 2],
        rates[passes - 1]
    );
    println!("dram_read_gb_s {:.3}", rates[passes / 2]);
}
