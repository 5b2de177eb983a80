//! Timed runs of the primitives: what `planner profile` measures a host with.
//!
//! Every figure comes from the same code the executor runs (the `kernels::linear` product with bf16
//! weights read in place, `kernels::attention`, `storage::IoPool` direct reads and writes), so a
//! profile describes what will run, not a vendor peak. Each function returns a [`Rate`]: the median
//! of several timed passes and the passes themselves, after two untimed warm-up passes. The CPU
//! workloads are also [`Bench`]es, which [`interleaved`] times in rounds against each other.

use crate::kernels::{self, Matrix, WeightData};
use crate::storage::{DirectFile, IoPool, IoPoolConfig, OffloadDir, ReadHandle, StorageError};
use half::bf16;
use rayon::prelude::*;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

const MIB: usize = 1 << 20;

/// A measured rate (per second) with the passes it is the median of.
#[derive(Debug, Clone, PartialEq)]
pub struct Rate {
    /// Median over the passes.
    pub median: f64,
    /// Every timed pass, in order.
    pub passes: Vec<f64>,
}

impl Rate {
    pub(crate) fn from_passes(passes: Vec<f64>) -> Rate {
        let mut sorted = passes.clone();
        sorted.sort_by(f64::total_cmp);
        let median = if sorted.is_empty() {
            0.0
        } else {
            sorted[sorted.len() / 2]
        };
        Rate { median, passes }
    }

    /// Largest relative distance of a pass from the median: how steady the figure was.
    pub fn spread(&self) -> f64 {
        self.passes
            .iter()
            .map(|p| (p / self.median - 1.0).abs())
            .fold(0.0, f64::max)
    }
}

/// One timed workload for [`interleaved`]: every run of `work` does `amount` units (FLOPs or
/// bytes), so a pass's rate is `amount / seconds`.
pub struct Bench<'a> {
    amount: f64,
    work: Box<dyn FnMut() + 'a>,
}

impl<'a> Bench<'a> {
    /// A workload of `amount` units per run of `work`.
    pub fn new(amount: f64, work: impl FnMut() + 'a) -> Bench<'a> {
        Bench {
            amount,
            work: Box::new(work),
        }
    }
}

/// Times several workloads against each other: every bench runs twice untimed, then `passes`
/// rounds time each bench once, in turn. One [`Rate`] per bench, in order. `progress` gets the
/// fraction done after each round.
///
/// Interleaving is what makes the figures of one profile comparable: on a shared VM the host
/// slows and speeds up over tens of seconds, and figures timed one after another each caught a
/// different spell (a decode rate at 8 rows below the one at 4; passes around the curve's
/// medians spread 5-31%); taken in rounds, a slow spell lands on every figure alike and the
/// medians keep their order.
pub fn interleaved(
    passes: usize,
    benches: &mut [Bench],
    progress: &mut dyn FnMut(f64),
) -> Vec<Rate> {
    for b in benches.iter_mut() {
        (b.work)();
        (b.work)();
    }
    let passes = passes.max(1);
    let mut rates = vec![Vec::with_capacity(passes); benches.len()];
    for pass in 0..passes {
        for (b, r) in benches.iter_mut().zip(&mut rates) {
            let start = Instant::now();
            (b.work)();
            r.push(b.amount / start.elapsed().as_secs_f64().max(1e-9));
        }
        progress((pass + 1) as f64 / passes as f64);
    }
    rates.into_iter().map(Rate::from_passes).collect()
}

/// Times one workload (see [`interleaved`]).
fn timed(passes: usize, bench: Bench) -> Rate {
    interleaved(passes, &mut [bench], &mut |_| {}).remove(0)
}

/// Deterministic bf16 values in [-0.5, 0.5): the kernels' speed does not depend on them, but
/// denormals and NaNs must not appear.
/// Held on 2 MiB pages, as the executor holds weights where it can: on 4 KiB pages the rate drifted
/// upward within a run (17 to 36 GB/s over seven passes) as the kernel collapsed pages.
fn bf16_values(n: usize, seed: u32) -> kernels::HugePageBuf<bf16> {
    let mut v = kernels::HugePageBuf::filled(n, bf16::ZERO);
    v.par_iter_mut().enumerate().for_each(|(i, x)| {
        let h = (i as u32 ^ seed).wrapping_mul(0x9E37_79B9).rotate_left(13);
        *x = bf16::from_f32((h >> 8) as f32 / (1u32 << 24) as f32 - 0.5);
    });
    v
}

/// The shapes of one transformer layer's products with hidden size `h`, as `[out, in]`: the
/// attention projections (`[h, h]`), the FFN up (`[4h, h]`) and down (`[h, 4h]`) projections.
pub fn layer_shapes(h: usize) -> [(usize, usize); 3] {
    [(h, h), (4 * h, h), (h, 4 * h)]
}

/// A chain of bf16 matrices cycling through `shapes` (`[out, in]`) until they total about
/// `total_bytes` (at least one of each), multiplied in order by `kernels::linear` as a model's
/// layers are. One chain serves benches at several row counts, so a decode curve reads the same
/// weights at every point.
pub struct LinearChain {
    chain: Vec<(usize, usize, kernels::HugePageBuf<bf16>)>,
    bytes: usize,
}

impl LinearChain {
    /// Allocates and fills the chain (on 2 MiB pages).
    pub fn new(shapes: &[(usize, usize)], total_bytes: usize) -> LinearChain {
        let mut chain: Vec<(usize, usize, kernels::HugePageBuf<bf16>)> = Vec::new();
        let mut bytes = 0;
        while chain.len() < shapes.len() || bytes < total_bytes {
            let (out, inp) = shapes[chain.len() % shapes.len()];
            chain.push((out, inp, bf16_values(out * inp, chain.len() as u32 + 1)));
            bytes += out * inp * 2;
        }
        LinearChain { chain, bytes }
    }

    /// FLOP/s of `rows` input rows through the whole chain (2 rows out in per product), whole
    /// passes over the chain repeated until one timed pass does about 3 GFLOP.
    pub fn flops_bench(&self, rows: usize) -> Bench<'_> {
        let flops: f64 = self
            .chain
            .iter()
            .map(|(out, inp, _)| 2.0 * (rows * out * inp) as f64)
            .sum();
        let repeats = ((3e9 / flops).ceil() as usize).clamp(1, 1000);
        self.bench(rows, repeats, flops * repeats as f64)
    }

    /// Weight bytes/s of one pass of `rows` input rows through the chain.
    pub fn bytes_bench(&self, rows: usize) -> Bench<'_> {
        self.bench(rows, 1, self.bytes as f64)
    }

    fn bench(&self, rows: usize, repeats: usize, amount: f64) -> Bench<'_> {
        let widest_in = self.chain.iter().map(|c| c.1).max().unwrap_or(0);
        let widest_out = self.chain.iter().map(|c| c.0).max().unwrap_or(0);
        let x: Vec<f32> = (0..rows * widest_in)
            .map(|i| (i % 17) as f32 * 0.01)
            .collect();
        let mut y = vec![0.0f32; rows * widest_out];
        Bench::new(amount, move || {
            for _ in 0..repeats {
                for (out, inp, w) in &self.chain {
                    let m = Matrix {
                        data: WeightData::Bf16(w),
                        out_features: *out,
                        in_features: *inp,
                    };
                    kernels::linear(&x[..rows * inp], rows, &m, None, &mut y[..rows * out]);
                }
            }
            std::hint::black_box(&y);
        })
    }
}

/// FLOP/s of `kernels::linear` for `rows` input rows against a [`LinearChain`] of `shapes` and
/// about `total_bytes`. With many rows (a prefill) this is the products' compute rate; with a
/// few rows (a decode step of a GPU batch) and a chain larger than the last-level cache, the
/// rate a decode step gets, weights streaming from DRAM included.
pub fn linear_flops(
    rows: usize,
    shapes: &[(usize, usize)],
    total_bytes: usize,
    passes: usize,
) -> Rate {
    timed(
        passes,
        LinearChain::new(shapes, total_bytes).flops_bench(rows),
    )
}

/// Bytes/s with which a batch-1 `kernels::linear` streams bf16 weights: a chain of `[out, inp]`
/// matrices totalling about `total_bytes` (larger than the last-level cache; at least two),
/// each multiplied by one row, as a batch-1 decode step does. This is the memory side of the
/// CPU roofline as the executor sees it.
pub fn linear_stream_bandwidth(total_bytes: usize, out: usize, inp: usize, passes: usize) -> Rate {
    let chain = LinearChain::new(&[(out, inp)], total_bytes.max(2 * out * inp * 2));
    timed(passes, chain.bytes_bench(1))
}

/// `seqs` sequences' bf16 KV caches and one query block, for [`AttentionSet::bench`].
pub struct AttentionSet {
    seqs: usize,
    q_len: usize,
    kv_len: usize,
    heads: usize,
    head_dim: usize,
    q: Vec<f32>,
    kv: Vec<kernels::HugePageBuf<bf16>>,
}

impl AttentionSet {
    /// Fills the caches (on 2 MiB pages, as the executor's KV cache is).
    pub fn new(
        seqs: usize,
        q_len: usize,
        kv_len: usize,
        heads: usize,
        head_dim: usize,
    ) -> AttentionSet {
        let d = heads * head_dim;
        let q: Vec<f32> = (0..q_len * d).map(|i| (i % 11) as f32 * 0.01).collect();
        let kv: Vec<kernels::HugePageBuf<bf16>> = (0..2 * seqs)
            .map(|s| {
                let mut v = kernels::HugePageBuf::filled(kv_len * d, bf16::ZERO);
                v.iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| *x = bf16::from_f32(((i + s) % 19) as f32 * 0.01));
                v
            })
            .collect();
        AttentionSet {
            seqs,
            q_len,
            kv_len,
            heads,
            head_dim,
            q,
            kv,
        }
    }

    /// FLOP/s of `kernels::attention` over every sequence in turn (one call each, as the executor
    /// makes), counting every key as the roofline does: 4 q_len kv_len heads head_dim per
    /// sequence (scores and weighted sum).
    pub fn bench(&self) -> Bench<'_> {
        let d = self.heads * self.head_dim;
        let valid = vec![true; self.kv_len];
        let mut out = vec![0.0f32; self.q_len * d];
        // Sized as the executor sizes it, so the kernel takes the executor's schedule.
        let mut scratch =
            vec![0.0f32; kernels::attention_scratch_len(self.kv_len, self.heads, self.head_dim)];
        let flops = 4.0 * (self.seqs * self.q_len * self.kv_len * d) as f64;
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        // Enough rounds that a pass takes tens of milliseconds: a single round of a few
        // milliseconds moved by 1.8x between two runs on an idle machine.
        let rounds = ((5e8 / flops).ceil() as usize).clamp(1, 1000);
        Bench::new(flops * rounds as f64, move || {
            for s in (0..self.seqs).cycle().take(self.seqs * rounds) {
                kernels::attention(
                    &self.q,
                    self.q_len,
                    kernels::KvRows::Bf16(&self.kv[2 * s]),
                    kernels::KvRows::Bf16(&self.kv[2 * s + 1]),
                    self.kv_len,
                    &valid,
                    self.heads,
                    self.head_dim,
                    scale,
                    &mut out,
                    &mut scratch,
                );
            }
            std::hint::black_box(&out);
        })
    }
}

/// FLOP/s of `kernels::attention` for `seqs` sequences, `q_len` new queries over `kv_len` cached
/// positions, `heads` x `head_dim` (see [`AttentionSet::bench`]). The cache rows are bf16, as the
/// executor holds them for bf16 checkpoints.
pub fn attention_flops(
    seqs: usize,
    q_len: usize,
    kv_len: usize,
    heads: usize,
    head_dim: usize,
    passes: usize,
) -> Rate {
    timed(
        passes,
        AttentionSet::new(seqs, q_len, kv_len, heads, head_dim).bench(),
    )
}

/// A buffer of `bytes` for plain reads, for [`DramBuffer::bench`].
pub struct DramBuffer(kernels::HugePageBuf<u8>);

impl DramBuffer {
    /// Allocates and writes the buffer (on 2 MiB pages, written in parallel).
    pub fn new(bytes: usize) -> DramBuffer {
        DramBuffer(kernels::HugePageBuf::filled(bytes, 1u8))
    }

    /// Bytes/s of plain reads by every worker thread (`kernels::stream_read`: each thread sums a
    /// contiguous part), the reference the `dram_bandwidth` and `kernel_bench` examples use too.
    pub fn bench(&self) -> Bench<'_> {
        let buf = &self.0;
        Bench::new(buf.len() as f64, move || {
            std::hint::black_box(kernels::stream_read(buf));
        })
    }
}

/// Bytes/s of plain reads by every worker thread over a buffer of `bytes` (each thread sums a
/// contiguous part): the DRAM read ceiling, for comparison with [`linear_stream_bandwidth`].
pub fn dram_read_bandwidth(bytes: usize, passes: usize) -> Rate {
    timed(passes, DramBuffer::new(bytes).bench())
}

/// What [`disk`] measured on one directory.
#[derive(Debug, Clone)]
pub struct DiskMeasurement {
    /// Direct (page-cache-free) writes, 1 MiB requests, 8 in flight on 4 threads, ending with a sync.
    pub write: Rate,
    /// Direct reads as the executor reads disk-resident weights: into [`READ_RANGE`] staging
    /// buffers on huge pages, two in flight, each split into 1 MiB requests on 4 threads.
    pub read: Rate,
    /// Buffered reads of the same file with its pages dropped first (what a runtime reading through
    /// the page cache gets on a cold cache): one pass, see [`disk`].
    pub buffered_read: Rate,
    /// Why direct I/O was not used, when the filesystem refused it.
    pub fallback: Option<String>,
    /// Size of the test file.
    pub file_bytes: u64,
}

fn io_pool(window: usize) -> Result<IoPool, StorageError> {
    IoPool::new(&IoPoolConfig {
        threads: 4,
        queue_depth: window,
        request_size: MIB,
        buffer_size: MIB,
        max_buffers: window + 2,
    })
}

/// Bytes per read of [`disk`]'s read passes: the size of one staging buffer, as the executor's
/// are a matrix's disk-resident part (tens to hundreds of MiB for OPT-6.7B and up). Being 2 MiB or
/// more, the buffers are on huge pages (`storage::AlignedBuf`), as the executor's are, and that
/// matters to direct I/O: each request's pages are what the device is handed. On the Zen 5
/// development VM, OPT-6.7B with 40% of its weights on disk decoded at 2.3-3.0 s per step with its
/// staging buffers on 4 KiB pages and at 1.60 s on huge pages, the device reading at 1.96-2.57 and
/// 3.45-3.50 GB/s (three interleaved pairs); 1 MiB reads into 1 MiB heap buffers, as this
/// measurement did before, got 1.6-1.7 GB/s there, and so did `fio`.
pub const READ_RANGE: usize = 32 * MIB;

/// Reads all of `file`, [`READ_RANGE`] at a time with two ranges in flight (the one being used
/// and the one being fetched, as the executor's weight pools run), each split into 1 MiB requests.
fn read_all(file: &Arc<DirectFile>) -> Result<(), StorageError> {
    const IN_FLIGHT: usize = 2;
    let pool = IoPool::new(&IoPoolConfig {
        threads: 4,
        queue_depth: IN_FLIGHT * READ_RANGE / MIB + 4,
        request_size: MIB,
        buffer_size: READ_RANGE,
        max_buffers: IN_FLIGHT + 1,
    })?;
    let size = file.len() as usize;
    let mut in_flight: VecDeque<ReadHandle> = VecDeque::new();
    let mut offset = 0usize;
    while offset < size || !in_flight.is_empty() {
        while offset < size && in_flight.len() < IN_FLIGHT {
            in_flight.push_back(pool.read(file, offset as u64, READ_RANGE.min(size - offset))?);
            offset += READ_RANGE;
        }
        if let Some(h) = in_flight.pop_front() {
            std::hint::black_box(h.wait()?.bytes().first().copied());
        }
    }
    Ok(())
}

/// Drops `file`'s pages from the page cache, so a buffered read has to go to the disk.
fn drop_pages(file: &Path) {
    if let Ok(f) = std::fs::File::open(file) {
        use std::os::unix::io::AsRawFd;
        // SAFETY: fadvise on an open descriptor; failure only leaves pages cached.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

/// Measures the disk under `parent`: writes a `bytes` file in a self-removing offload directory
/// (also removed on Ctrl-C), reads it back with direct I/O `passes` times, then once buffered.
/// `progress` gets a fraction in [0, 1] as the work proceeds.
///
/// The buffered read is timed once: dropping the guest's page cache does not empty a cache
/// below it. On the development VM the first buffered pass ran at 0.60-0.64 GB/s in three runs
/// (as the direct reads), and the next six at 1.1-2.4 GB/s, in no order, as parts of the file came
/// from the virtual disk's host-side cache: their median moved by 1.33x between two runs, while
/// the first pass is the cold figure the profile means.
pub fn disk(
    parent: &Path,
    bytes: u64,
    passes: usize,
    progress: &mut dyn FnMut(f64),
) -> Result<DiskMeasurement, StorageError> {
    let size = (bytes as usize).div_ceil(MIB).max(1) * MIB;
    let dir = OffloadDir::create(parent)?;
    let file = dir.create_file("disk-profile.bin", size as u64)?;
    let fallback = file.fallback().map(str::to_string);
    let steps = (2 + 2 * passes) as f64;

    let mut write_rates = Vec::new();
    for pass in 0..passes.max(1) {
        let pool = io_pool(8)?;
        let start = Instant::now();
        let mut in_flight = VecDeque::new();
        let mut offset = 0usize;
        while offset < size || !in_flight.is_empty() {
            while offset < size && in_flight.len() < 8 {
                let mut buf = pool.buffers().get(MIB)?;
                buf.as_mut_slice().fill((offset / MIB + pass) as u8);
                in_flight.push_back(pool.write(file.file(), offset as u64, buf, MIB)?);
                offset += MIB;
            }
            if let Some(h) = in_flight.pop_front() {
                drop(h.wait()?);
            }
        }
        // SAFETY: sync(2) has no preconditions; the figure includes reaching the device.
        unsafe { libc::sync() };
        write_rates.push(size as f64 / start.elapsed().as_secs_f64());
        progress((pass + 1) as f64 / steps);
    }
    let direct = Arc::new(DirectFile::open(file.path())?);
    let mut read_rates = Vec::new();
    for pass in 0..passes.max(1) {
        let start = Instant::now();
        read_all(&direct)?;
        read_rates.push(size as f64 / start.elapsed().as_secs_f64());
        progress((1 + passes + pass) as f64 / steps);
    }
    let buffered = Arc::new(DirectFile::open_buffered(
        file.path(),
        "buffered read for the profile",
    )?);
    drop_pages(file.path());
    let start = Instant::now();
    read_all(&buffered)?;
    let buffered_rates = vec![size as f64 / start.elapsed().as_secs_f64()];
    progress(1.0);
    drop_pages(file.path());
    Ok(DiskMeasurement {
        write: Rate::from_passes(write_rates),
        read: Rate::from_passes(read_rates),
        buffered_read: Rate::from_passes(buffered_rates),
        fallback,
        file_bytes: size as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_positive_medians_of_their_passes() {
        let r = Rate::from_passes(vec![3.0, 1.0, 2.0]);
        assert_eq!(r.median, 2.0);
        assert!((r.spread() - 0.5).abs() < 1e-12);
        // Tiny shapes: this checks the plumbing (no panics, finite positive rates), not speed.
        for rate in [
            linear_flops(2, &layer_shapes(16), 3000, 2),
            linear_stream_bandwidth(1 << 16, 32, 64, 2),
            attention_flops(2, 1, 8, 2, 4, 2),
            dram_read_bandwidth(1 << 16, 2),
        ] {
            assert_eq!(rate.passes.len(), 2);
            assert!(rate.median.is_finite() && rate.median > 0.0, "{rate:?}");
        }
    }

    #[test]
    fn interleaved_benches_run_in_rounds() {
        use std::cell::RefCell;
        let order = RefCell::new(Vec::new());
        let mut benches = [
            Bench::new(1.0, || order.borrow_mut().push('a')),
            Bench::new(2.0, || order.borrow_mut().push('b')),
        ];
        let mut seen = Vec::new();
        let rates = interleaved(3, &mut benches, &mut |f| seen.push(f));
        drop(benches);
        // Two warm-up runs each, then one timed run of each bench per round.
        assert_eq!(order.into_inner().iter().collect::<String>(), "aabbababab");
        assert_eq!(seen, [1.0 / 3.0, 2.0 / 3.0, 1.0]);
        assert!(rates.iter().all(|r| r.passes.len() == 3 && r.median > 0.0));
    }

    #[test]
    fn disk_measurement_writes_reads_and_removes_its_file() {
        let td = tempfile::tempdir().unwrap();
        let mut seen = Vec::new();
        let m = disk(td.path(), 3 * MIB as u64, 1, &mut |f| seen.push(f)).unwrap();
        assert_eq!(m.file_bytes, 3 * MIB as u64);
        for r in [&m.write, &m.read, &m.buffered_read] {
            assert!(r.median > 0.0 && r.median.is_finite());
        }
        assert!(seen.windows(2).all(|w| w[0] <= w[1]) && *seen.last().unwrap() <= 1.0);
        // The offload directory (and the file in it) is gone.
        assert_eq!(std::fs::read_dir(td.path()).unwrap().count(), 0);
    }
}
