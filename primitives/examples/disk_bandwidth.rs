//! Measures the disk tier on this machine: direct writes and reads through `storage::IoPool` with
//! 1 MiB requests, and buffered reads for contrast, on a file of a few GiB.
//!
//! `cargo run --release -p primitives --example disk_bandwidth -- [parent_dir] [GiB] [reps]`
//! (defaults: the system temp dir, 2, 3). The file lives in an `OffloadDir`, so it is removed at
//! the end and on Ctrl-C. Before each buffered pass the page cache is dropped
//! (`/proc/sys/vm/drop_caches`, needs root; the output says whether it worked); buffered reads
//! also drop their own pages with `posix_fadvise(DONTNEED)`, so neither mode is served from memory.
//!
//! Reads land in 1 MiB buffers on 4 KiB pages: this tool compares request patterns. The executor
//! reads into large staging buffers on huge pages, which the Zen 5 development VM's disk served
//! about twice as fast (see `primitives::measure::READ_RANGE`); `planner profile` measures that way.

use primitives::storage::{DirectFile, IoPool, IoPoolConfig, OffloadDir, ReadHandle};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

const MIB: usize = 1 << 20;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn drop_caches() -> bool {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

fn pool(threads: usize, window: usize) -> IoPool {
    IoPool::new(&IoPoolConfig {
        threads,
        queue_depth: window,
        request_size: MIB,
        buffer_size: MIB,
        max_buffers: window + 2,
    })
    .expect("I/O pool")
}

/// Reads the whole file in 1 MiB requests, `window` in flight; returns GB/s.
fn read_pass(f: &Arc<DirectFile>, threads: usize, window: usize) -> f64 {
    let p = pool(threads, window);
    let size = f.len() as usize;
    let t = Instant::now();
    let mut q: VecDeque<ReadHandle> = VecDeque::new();
    let mut sum = 0u64;
    let mut off = 0usize;
    while off < size || !q.is_empty() {
        while off < size && q.len() < window {
            q.push_back(p.read(f, off as u64, MIB.min(size - off)).expect("submit"));
            off += MIB;
        }
        let r = q.pop_front().unwrap().wait().expect("read");
        sum += r.bytes()[r.bytes().len() - 1] as u64;
    }
    let s = t.elapsed().as_secs_f64();
    std::hint::black_box(sum);
    size as f64 / s / 1e9
}

fn main() {
    let mut args = std::env::args().skip(1);
    let parent = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let gib: usize = args.next().map_or(2, |a| a.parse().expect("GiB"));
    let reps: usize = args.next().map_or(3, |a| a.parse().expect("reps"));
    let size = gib << 30;

    let dir = OffloadDir::create(&parent).expect("offload dir");
    if let Some(why) = dir.signal_cleanup() {
        println!(
            "note: Ctrl-C will not remove {}: {why}",
            dir.path().display()
        );
    }
    let file = dir.create_file("bandwidth.bin", size as u64).expect("file");
    println!(
        "file {} ({gib} GiB), writes: {}",
        file.path().display(),
        file.fallback().unwrap_or("O_DIRECT")
    );

    // Write it once, 1 MiB direct writes through the pool, 8 in flight.
    let p = pool(4, 8);
    let t = Instant::now();
    let mut q = VecDeque::new();
    let mut off = 0usize;
    while off < size || !q.is_empty() {
        while off < size && q.len() < 8 {
            let mut b = p.buffers().get(MIB).expect("buffer");
            b.as_mut_slice().fill((off / MIB) as u8);
            q.push_back(p.write(file.file(), off as u64, b, MIB).expect("submit"));
            off += MIB;
        }
        drop(q.pop_front().unwrap().wait().expect("write"));
    }
    // SAFETY: plain fsync-like barrier so the write figure includes reaching the disk.
    unsafe { libc::sync() };
    println!(
        "direct write, 1 MiB requests, 4 threads, 8 in flight: {:.2} GB/s",
        size as f64 / t.elapsed().as_secs_f64() / 1e9
    );
    drop(p);

    let direct = Arc::new(DirectFile::open(file.path()).expect("open"));
    println!("reads: {}", direct.fallback().unwrap_or("O_DIRECT"));
    for (threads, window) in [(1, 1), (2, 4), (4, 8)] {
        let v: Vec<f64> = (0..reps)
            .map(|_| read_pass(&direct, threads, window))
            .collect();
        println!(
            "direct read, 1 MiB requests, {threads} threads, {window} in flight: median {:.2} GB/s {:?}",
            median(v.clone()),
            v.iter().map(|x| (x * 100.0).round() / 100.0).collect::<Vec<_>>()
        );
    }
    let buffered = Arc::new(DirectFile::open_buffered(file.path(), "contrast").expect("open"));
    let mut dropped = true;
    let v: Vec<f64> = (0..reps)
        .map(|_| {
            dropped &= drop_caches();
            read_pass(&buffered, 4, 8)
        })
        .collect();
    println!(
        "buffered read (+fadvise DONTNEED), 1 MiB requests, 4 threads, 8 in flight, caches dropped: {}: median {:.2} GB/s {:?}",
        if dropped { "yes" } else { "NO (not permitted)" },
        median(v.clone()),
        v.iter().map(|x| (x * 100.0).round() / 100.0).collect::<Vec<_>>()
    );
}
