//! Times `quant::linear_q4` against the bf16 `kernels::linear` at decode and small-batch shapes.
//!
//! `cargo run --release -p executor --example q4_bench -- [tokens,...] [out] [in] [reps]`
//! (defaults: 1,16 4096 4096 21). Eight different matrices are cycled so that weights come from
//! DRAM, as they do in a model whose layers do not fit in cache; medians over `reps` passes.

use executor::kernels::{linear, Matrix, WeightData};
use executor::quant::{linear_q4, QuantizedMatrix};
use half::bf16;
use rayon::prelude::*;
use std::time::Instant;

const MATS: usize = 8;

fn value(i: usize, seed: u64) -> f32 {
    let h = (i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let tokens: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "1,16".into())
        .split(',')
        .map(|t| t.parse().expect("token counts"))
        .collect();
    let out: usize = args.next().map_or(4096, |a| a.parse().expect("out"));
    let inp: usize = args.next().map_or(4096, |a| a.parse().expect("in"));
    let reps: usize = args.next().map_or(21, |a| a.parse().expect("reps"));
    let n = out * inp;
    let w16: Vec<Vec<bf16>> = (0..MATS)
        .map(|m| {
            (0..n)
                .into_par_iter()
                .map(|i| bf16::from_f32(value(i, m as u64)))
                .collect()
        })
        .collect();
    let wq: Vec<QuantizedMatrix> = w16
        .iter()
        .map(|w| {
            QuantizedMatrix::from_matrix(&Matrix {
                data: WeightData::Bf16(w),
                out_features: out,
                in_features: inp,
            })
            .expect("quantize")
        })
        .collect();
    println!(
        "{out}x{inp}: bf16 {:.1} MB, q4 {:.1} MB per matrix; {} threads",
        (n * 2) as f64 / 1e6,
        wq[0].bytes() as f64 / 1e6,
        rayon::current_num_threads()
    );
    for &t in &tokens {
        let x: Vec<f32> = (0..t * inp).map(|i| value(i, 99) * 10.0).collect();
        let mut y = vec![0f32; t * out];
        let mut time = |f: &mut dyn FnMut(usize, &mut [f32])| -> f64 {
            for m in 0..MATS {
                f(m, &mut y); // warm-up
            }
            let v: Vec<f64> = (0..reps)
                .map(|r| {
                    let s = Instant::now();
                    f(r % MATS, &mut y);
                    s.elapsed().as_secs_f64()
                })
                .collect();
            median(v)
        };
        let tb = time(&mut |m, y| {
            let w = Matrix {
                data: WeightData::Bf16(&w16[m]),
                out_features: out,
                in_features: inp,
            };
            linear(&x, t, &w, None, y)
        });
        let tq = time(&mut |m, y| linear_q4(&x, t, &wq[m], None, y));
        let flops = 2.0 * (t * n) as f64;
        println!(
            "tokens {t:>3}: bf16 linear {:>8.3} ms ({:>6.1} GB/s, {:>6.1} GFLOP/s) | linear_q4 {:>8.3} ms ({:>6.1} GB/s, {:>6.1} GFLOP/s) | q4/bf16 time ratio {:.2}",
            tb * 1e3,
            (n * 2) as f64 / tb / 1e9,
            flops / tb / 1e9,
            tq * 1e3,
            wq[0].bytes() as f64 / tq / 1e9,
            flops / tq / 1e9,
            tq / tb
        );
    }
}
