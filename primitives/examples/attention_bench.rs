//! Times decode attention as a batched decode step runs it: one query row per sequence against
//! that sequence's KV cache, for every layer and every sequence of the batch, each cache on its
//! own 2 MiB pages so that nothing stays in cache between calls (a step of OPT-1.3B at batch 16
//! and 145 keys reads 456 MB of bf16 keys and values).
//!
//! The DRAM reference is measured in the same run over the same bytes, as in `kernel_bench`:
//! before every repetition the caches are read once by `kernels::stream_read`; `of_dram` is the
//! median over repetitions of the attention's KV GB/s over the streaming GB/s of the same
//! repetition.
//!
//! `cargo run --release --example attention_bench -- [model] [dtype] [kv_len] [batch] [reps]`
//! e.g. `attention_bench opt-1.3b bf16 145 16 7` (the defaults).

use half::{bf16, f16};
use primitives::kernels::{attention, stream_read, HugePageBuf, KvRows};
use std::time::Instant;

/// One sequence's keys or values in the benchmarked dtype, `[max_len, heads * head_dim]`.
enum Cache {
    F32(HugePageBuf<f32>),
    F16(HugePageBuf<f16>),
    Bf16(HugePageBuf<bf16>),
}

impl Cache {
    fn random(dtype: &str, n: usize, seed: u64) -> Cache {
        // Deterministic values in [-1, 1): the kernel's speed does not depend on them.
        let value = |i: usize| {
            let h = (i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
        };
        fn fill<T: Copy + Send + Sync>(
            n: usize,
            zero: T,
            f: impl Fn(usize) -> T,
        ) -> HugePageBuf<T> {
            let mut v = HugePageBuf::filled(n, zero);
            v.iter_mut().enumerate().for_each(|(i, x)| *x = f(i));
            v
        }
        match dtype {
            "f32" => Cache::F32(fill(n, 0.0, value)),
            "f16" => Cache::F16(fill(n, f16::ZERO, |i| f16::from_f32(value(i)))),
            "bf16" => Cache::Bf16(fill(n, bf16::ZERO, |i| bf16::from_f32(value(i)))),
            other => panic!("dtype must be f32, f16 or bf16, not {other}"),
        }
    }

    fn rows(&self) -> KvRows<'_> {
        match self {
            Cache::F32(c) => KvRows::F32(c),
            Cache::F16(c) => KvRows::F16(c),
            Cache::Bf16(c) => KvRows::Bf16(c),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Cache::F32(c) => bytemuck::cast_slice(c),
            Cache::F16(c) => bytemuck::cast_slice(c),
            Cache::Bf16(c) => bytemuck::cast_slice(c),
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| "opt-1.3b".into());
    let dtype = args.next().unwrap_or_else(|| "bf16".into());
    let kv_len: usize = args.next().map_or(145, |a| a.parse().expect("kv_len"));
    let batch: usize = args.next().map_or(16, |a| a.parse().expect("batch"));
    let reps: usize = args.next().map_or(7, |a| a.parse().expect("reps"));
    let (layers, heads) = match model.as_str() {
        "opt-125m" => (12, 12),
        "opt-350m" => (24, 16),
        "opt-1.3b" => (24, 32),
        "opt-2.7b" => (32, 32),
        "opt-6.7b" => (32, 32),
        other => panic!("unknown model {other}"),
    };
    let head_dim = 64;
    let d = heads * head_dim;
    // Exactly kv_len rows per cache, so the streaming reference reads the bytes attention reads.
    let caches: Vec<(Cache, Cache)> = (0..layers * batch)
        .map(|i| {
            let seed = 2 * i as u64;
            (
                Cache::random(&dtype, kv_len * d, seed),
                Cache::random(&dtype, kv_len * d, seed + 1),
            )
        })
        .collect();
    let bytes: usize = caches
        .iter()
        .map(|(k, v)| k.as_bytes().len() + v.as_bytes().len())
        .sum();
    let q: Vec<f32> = (0..d).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
    let valid = vec![true; kv_len];
    let mut out = vec![0.0f32; d];
    // As the executor sizes it.
    let mut scratch =
        vec![0.0f32; primitives::kernels::attention_scratch_len(kv_len, heads, head_dim)];
    println!(
        "{model} {dtype}: {layers} layers x {batch} sequences x {kv_len} keys, {:.1} MB of KV per step, {} threads",
        bytes as f64 / 1e6,
        rayon::current_num_threads()
    );
    println!("step_ms_median  step_ms_min  kv_GB/s  dram_GB/s  of_dram  us_per_call");
    let mut times = Vec::new();
    let mut dram = Vec::new();
    let mut of_dram = Vec::new();
    for _ in 0..reps {
        let start = Instant::now();
        let mut check = 0.0;
        for (k, v) in &caches {
            check += stream_read(k.as_bytes()) + stream_read(v.as_bytes());
        }
        std::hint::black_box(check);
        dram.push(bytes as f64 / start.elapsed().as_secs_f64() / 1e9);
        // On a pool thread, as the executor's generation loop runs (`executor::generate`): a
        // parallel call from outside the pool goes through rayon's global queue instead.
        let start = Instant::now();
        rayon::scope(|_| {
            for (k, v) in &caches {
                attention(
                    &q,
                    1,
                    k.rows(),
                    v.rows(),
                    kv_len,
                    &valid,
                    heads,
                    head_dim,
                    1.0,
                    &mut out,
                    &mut scratch,
                );
                std::hint::black_box(&out);
            }
        });
        times.push(start.elapsed().as_secs_f64());
        of_dram.push(bytes as f64 / times[times.len() - 1] / 1e9 / dram[dram.len() - 1]);
    }
    for v in [&mut times, &mut dram, &mut of_dram] {
        v.sort_by(f64::total_cmp);
    }
    let med = times[reps / 2];
    println!(
        "{:14.2}  {:11.2}  {:7.2}  {:9.2}  {:7.3}  {:11.1}",
        med * 1e3,
        times[0] * 1e3,
        bytes as f64 / med / 1e9,
        dram[reps / 2],
        of_dram[reps / 2],
        med * 1e6 / caches.len() as f64,
    );
}
