//! Times decode attention as a batched decode step runs it: one query row per sequence against
//! that sequence's KV cache, for every layer and every sequence of the batch, each cache in its
//! own buffer (`KvBuf`, the executor's cache type; on the heap when under 2 MiB, where the
//! executor keeps a layer's sequences in one huge-page buffer). A step of OPT-1.3B at batch 16
//! and 145 keys reads 456 MB of bf16 keys and values, far more than the last-level cache, so
//! nothing stays cached between calls.
//!
//! The DRAM reference is measured in the same run over the same bytes, as in `kernel_bench`:
//! before every repetition the caches are read once by `kernels::stream_read`; `of_dram` is the
//! median over repetitions of the attention's KV GB/s over the streaming GB/s of the same
//! repetition.
//!
//! With a sixth argument `prefill` every call is a whole prompt instead: `kv_len` query rows
//! against their own `kv_len` keys, causal, as a prefill runs it; `GFLOP/s` counts the
//! multiply-adds of q·k and of the weighted values over the keys each row sees.
//!
//! `cargo run --release --example attention_bench -- [model] [dtype] [kv_len] [batch] [reps]
//! [prefill]`, e.g. `attention_bench opt-1.3b bf16 145 16 7` (the defaults) or
//! `attention_bench opt-125m bf16 128 16 7 prefill`.

use primitives::kernels::{attention, attention_scratch_len, stream_read, KvBuf, KvDtype};
use std::time::Instant;

/// One sequence's keys or values, `[kv_len, heads * head_dim]`, in the executor's own cache
/// type, filled with deterministic values in [-1, 1) (the speed does not depend on them).
fn random_cache(dtype: KvDtype, n: usize, seed: u64) -> KvBuf {
    let values: Vec<f32> = (0..n)
        .map(|i| {
            let h = (i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
        })
        .collect();
    let mut cache = KvBuf::zeroed(dtype, n);
    cache.rows_mut(0..n).write(0, &values);
    cache
}

fn main() {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| "opt-1.3b".into());
    let dtype_name = args.next().unwrap_or_else(|| "bf16".into());
    let dtype = match dtype_name.as_str() {
        "f32" => KvDtype::F32,
        "f16" => KvDtype::F16,
        "bf16" => KvDtype::Bf16,
        other => panic!("dtype must be f32, f16 or bf16, not {other}"),
    };
    let kv_len: usize = args.next().map_or(145, |a| a.parse().expect("kv_len"));
    let batch: usize = args.next().map_or(16, |a| a.parse().expect("batch"));
    let reps: usize = args.next().map_or(7, |a| a.parse().expect("reps"));
    let prefill = args.next().as_deref() == Some("prefill");
    let q_len = if prefill { kv_len } else { 1 };
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
    let caches: Vec<(KvBuf, KvBuf)> = (0..layers * batch)
        .map(|i| {
            let seed = 2 * i as u64;
            (
                random_cache(dtype, kv_len * d, seed),
                random_cache(dtype, kv_len * d, seed + 1),
            )
        })
        .collect();
    let bytes: usize = caches
        .iter()
        .map(|(k, v)| (k.bytes() + v.bytes()) as usize)
        .sum();
    let q: Vec<f32> = (0..q_len * d)
        .map(|i| ((i % 7) as f32 - 3.0) * 0.1)
        .collect();
    let valid = vec![true; kv_len];
    let mut out = vec![0.0f32; q_len * d];
    // Multiply-adds of q·k and p·v over the keys each query row sees, per call.
    let seen: usize = (0..q_len).map(|i| kv_len - q_len + i + 1).sum();
    let flops_per_call = 4.0 * (seen * d) as f64;
    // As the executor sizes it.
    let mut scratch = vec![0.0f32; attention_scratch_len(kv_len, heads, head_dim)];
    println!(
        "{model} {dtype_name}: {layers} layers x {batch} sequences x {kv_len} keys, {:.1} MB of KV per step, {} threads",
        bytes as f64 / 1e6,
        rayon::current_num_threads()
    );
    println!("step_ms_median  step_ms_min  kv_GB/s  dram_GB/s  of_dram  us_per_call  GFLOP/s");
    let mut times = Vec::new();
    let mut dram = Vec::new();
    let mut of_dram = Vec::new();
    for _ in 0..reps {
        let start = Instant::now();
        let mut check = 0.0;
        for (k, v) in &caches {
            check += stream_read(k.all().as_bytes()) + stream_read(v.all().as_bytes());
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
                    q_len,
                    k.all(),
                    v.all(),
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
        "{:14.2}  {:11.2}  {:7.2}  {:9.2}  {:7.3}  {:11.1}  {:7.1}",
        med * 1e3,
        times[0] * 1e3,
        bytes as f64 / med / 1e9,
        dram[reps / 2],
        of_dram[reps / 2],
        med * 1e6 / caches.len() as f64,
        flops_per_call * caches.len() as f64 / med / 1e9,
    );
}
