//! Times the executor's `linear` kernel over a whole OPT layer stack at the real shapes, so the
//! kernels can be judged (GB/s against DRAM bandwidth, GFLOP/s against peak) without a model.
//!
//! Every layer gets its own weights, as in the model, so nothing stays in cache between layers:
//! q, k, v, out (h x h), fc1 (ffn x h), fc2 (h x ffn), and the tied LM head (vocab x h) once
//! (for at most 16 tokens: prefill only needs the last position's logits). The weights are on
//! 2 MiB pages, as the executor's in-memory weights are.
//!
//! The DRAM reference is measured in the same run over the same bytes: before every repetition
//! the weight buffers are read once by `kernels::stream_read` (what `dram_bandwidth` times).
//! `dram_GB/s` is that rate (median) and `of_dram` the median over repetitions of the kernel's
//! GB/s divided by the streaming GB/s of the same repetition: at 1 token, how close the GEMV
//! comes to DRAM speed.
//!
//! `cargo run --release --example kernel_bench -- [model] [dtype] [tokens,...] [layers] [reps]`
//! e.g. `kernel_bench opt-1.3b bf16 1,16 24 7`; layers defaults to the model's, reps to 5;
//! after them, `nohead` leaves the LM head out and `panels` packs bf16 weights into the panels
//! the executor uses on AVX512-BF16 CPUs without AMX (`kernels::pack_panels`; the default is
//! nn.Linear layout), e.g. `kernel_bench opt-125m bf16 16 12 7 panels`.

use half::{bf16, f16};
use primitives::kernels::{
    linear, pack_panels_in_place, stream_read, HugePageBuf, Matrix, WeightData,
};
use rayon::prelude::*;
use std::time::Instant;

/// Owned weights of one linear layer in the benchmarked dtype.
enum Weights {
    F32(HugePageBuf<f32>),
    F16(HugePageBuf<f16>),
    Bf16(HugePageBuf<bf16>),
    Panels(HugePageBuf<u32>),
}

impl Weights {
    fn random(dtype: &str, n: usize, seed: u64) -> Weights {
        // Cheap deterministic values in [-0.05, 0.05): the kernel's speed does not depend on them.
        let value = |i: usize| {
            let h = (i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        };
        // On 2 MiB pages, as the executor's in-memory weights are.
        fn fill<T: Copy + Send + Sync>(
            n: usize,
            zero: T,
            f: impl Fn(usize) -> T + Sync,
        ) -> HugePageBuf<T> {
            let mut v = HugePageBuf::filled(n, zero);
            v.par_iter_mut().enumerate().for_each(|(i, x)| *x = f(i));
            v
        }
        match dtype {
            "f32" => Weights::F32(fill(n, 0.0, value)),
            "f16" => Weights::F16(fill(n, f16::ZERO, |i| f16::from_f32(value(i)))),
            "bf16" => Weights::Bf16(fill(n, bf16::ZERO, |i| bf16::from_f32(value(i)))),
            other => panic!("dtype must be f32, f16 or bf16, not {other}"),
        }
    }

    fn matrix(&self, out_features: usize, in_features: usize) -> Matrix<'_> {
        let data = match self {
            Weights::F32(d) => WeightData::F32(d),
            Weights::F16(d) => WeightData::F16(d),
            Weights::Bf16(d) => WeightData::Bf16(d),
            Weights::Panels(d) => WeightData::Bf16Panels(d),
        };
        Matrix {
            data,
            out_features,
            in_features,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Weights::F32(d) => bytemuck::cast_slice(d),
            Weights::F16(d) => bytemuck::cast_slice(d),
            Weights::Bf16(d) => bytemuck::cast_slice(d),
            Weights::Panels(d) => bytemuck::cast_slice(d),
        }
    }

    fn bytes(&self) -> usize {
        self.as_bytes().len()
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| "opt-1.3b".into());
    let dtype = args.next().unwrap_or_else(|| "bf16".into());
    let tokens: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "1,16".into())
        .split(',')
        .map(|t| t.parse().expect("token counts"))
        .collect();
    let (all_layers, h) = match model.as_str() {
        "opt-125m" => (12, 768),
        "opt-350m" => (24, 1024),
        "opt-1.3b" => (24, 2048),
        "opt-2.7b" => (32, 2560),
        "opt-6.7b" => (32, 4096),
        other => panic!("unknown model {other}"),
    };
    let layers: usize = args
        .next()
        .map_or(all_layers, |a| a.parse().expect("layers"));
    let reps: usize = args.next().map_or(5, |a| a.parse().expect("reps"));
    // "nohead" leaves the LM head out, to time the layers' products alone; "panels" packs.
    let flags: Vec<String> = args.collect();
    let with_head = !flags.iter().any(|f| f == "nohead");
    let panels = flags.iter().any(|f| f == "panels");
    if panels && dtype != "bf16" {
        panic!("panels hold bf16 weights only");
    }
    // Into panels, in the weights' own memory, as the executor packs them.
    let layout = |w: Weights, (o, n): (usize, usize)| match w {
        Weights::Bf16(b) if panels => Weights::Panels(pack_panels_in_place(b, o, n)),
        other => other,
    };
    let (ffn, vocab) = (4 * h, 50272);
    // (out, in) of each product in one layer.
    let shapes = [(h, h), (h, h), (h, h), (h, h), (ffn, h), (h, ffn)];
    let stack: Vec<Vec<Weights>> = (0..layers)
        .map(|l| {
            shapes
                .iter()
                .enumerate()
                .map(|(i, &(o, n))| {
                    layout(Weights::random(&dtype, o * n, (l * 8 + i) as u64), (o, n))
                })
                .collect()
        })
        .collect();
    let head = layout(Weights::random(&dtype, vocab * h, 1 << 20), (vocab, h));
    let bias = vec![0.01f32; ffn.max(vocab)];
    let layer_bytes: usize = stack.iter().flatten().map(Weights::bytes).sum();
    let bytes = layer_bytes + if with_head { head.bytes() } else { 0 };
    let macs_per_token = layers * (4 * h * h + 2 * h * ffn) + vocab * h;
    println!(
        "{model} {dtype}{}, {layers} layers{}: {:.1} MB of weights, {} threads",
        if panels { " in panels" } else { "" },
        if with_head { " + LM head" } else { "" },
        bytes as f64 / 1e6,
        rayon::current_num_threads()
    );
    // On a shared machine wall time includes time the threads waited for a core; CPU time does
    // not, so the rates are also given per second of CPU time per thread ("cpu" columns).
    // Before each repetition the same weight bytes are read by a plain streaming sum
    // (`stream_read`, what `dram_bandwidth` measures): `dram_GB/s` is its median, `of_dram` the
    // median over repetitions of (kernel GB/s / streaming GB/s of the same repetition), so
    // that both see the same load.
    println!(
        "tokens  median_ms  min_ms  weight_GB/s  GFLOP/s  cpu_ms  cpu_GB/s  cpu_GFLOP/s  dram_GB/s  of_dram"
    );
    for &t in &tokens {
        let head_tokens = match (with_head, t > 64) {
            (false, _) => 0,
            (true, true) => 16,
            (true, false) => t,
        };
        let x = vec![0.1f32; t * ffn];
        let mut y = vec![0.0f32; t * ffn.max(vocab)];
        let mut times = Vec::new();
        let mut cpu_times = Vec::new();
        let mut dram = Vec::new();
        let mut of_dram = Vec::new();
        for _ in 0..reps {
            let start = Instant::now();
            let mut check = 0.0;
            for w in stack.iter().flatten().chain(with_head.then_some(&head)) {
                check += stream_read(w.as_bytes());
            }
            std::hint::black_box(check);
            dram.push(bytes as f64 / start.elapsed().as_secs_f64() / 1e9);
            let cpu_start = cpu_seconds();
            let start = Instant::now();
            for layer in &stack {
                for (w, &(o, n)) in layer.iter().zip(&shapes) {
                    linear(
                        &x[..t * n],
                        t,
                        &w.matrix(o, n),
                        Some(&bias[..o]),
                        &mut y[..t * o],
                    );
                }
            }
            // Prefill needs logits for the last position of each sequence only, so at prefill
            // sizes the head sees one token per sequence (a batch of 16 prompts).
            linear(
                &x[..head_tokens * h],
                head_tokens,
                &head.matrix(vocab, h),
                None,
                &mut y[..head_tokens * vocab],
            );
            times.push(start.elapsed().as_secs_f64());
            cpu_times.push((cpu_seconds() - cpu_start) / rayon::current_num_threads() as f64);
            of_dram.push(bytes as f64 / times[times.len() - 1] / 1e9 / dram[dram.len() - 1]);
        }
        for v in [&mut times, &mut cpu_times, &mut dram, &mut of_dram] {
            v.sort_by(f64::total_cmp);
        }
        let med = times[reps / 2];
        let cpu = cpu_times[reps / 2];
        let flops = 2.0 * (macs_per_token - vocab * h) as f64 * t as f64
            + 2.0 * (vocab * h * head_tokens) as f64;
        println!(
            "{t:6}  {:9.2}  {:6.2}  {:11.2}  {:7.1}  {:6.1}  {:8.2}  {:11.1}  {:9.2}  {:7.3}",
            med * 1e3,
            times[0] * 1e3,
            bytes as f64 / med / 1e9,
            flops / med / 1e9,
            cpu * 1e3,
            bytes as f64 / cpu / 1e9,
            flops / cpu / 1e9,
            dram[reps / 2],
            of_dram[reps / 2],
        );
    }
}

/// CPU time of all this process's threads so far, in seconds (Linux; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e9
}
