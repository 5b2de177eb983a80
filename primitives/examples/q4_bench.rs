//! Times `quant::linear_q4` against the bf16 `kernels::linear` at decode and small-batch shapes.
//!
//! `cargo run --release -p primitives --example q4_bench -- [tokens,...] [out] [in] [reps]`
//! (defaults: 1,16 4096 4096 21). Eight different matrices are cycled so that weights come from
//! DRAM, as they do in a model whose layers do not fit in cache; medians over `reps` calls of
//! each kernel, interleaved.
//! Then one decode step of attention (1 query, OPT-6.7B heads: 32 x 128) over an f32 cache with
//! `kernels::attention` and over the compressed cache with `quant::attention_q4`.

use half::bf16;
use primitives::kernels::{attention, linear, Matrix, WeightData};
use primitives::quant::{attention_q4, linear_q4, QuantizedKv, QuantizedMatrix};
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
        let bf16_call = |m: usize, y: &mut [f32]| {
            let w = Matrix {
                data: WeightData::Bf16(&w16[m]),
                out_features: out,
                in_features: inp,
            };
            linear(&x, t, &w, None, y)
        };
        let q4_call = |m: usize, y: &mut [f32]| linear_q4(&x, t, &wq[m], None, y);
        for m in 0..MATS {
            bf16_call(m, &mut y); // warm-up
            q4_call(m, &mut y);
        }
        // Interleaved, so that load from other processes hits both kernels alike.
        let (mut vb, mut vq) = (Vec::new(), Vec::new());
        for r in 0..reps {
            let s = Instant::now();
            bf16_call(r % MATS, &mut y);
            vb.push(s.elapsed().as_secs_f64());
            let s = Instant::now();
            q4_call(r % MATS, &mut y);
            vq.push(s.elapsed().as_secs_f64());
        }
        let (tb, tq) = (median(vb), median(vq));
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
    let (nh, hd) = (32usize, 128usize);
    let d = nh * hd;
    for kv_len in [512usize, 2048] {
        let k: Vec<f32> = (0..kv_len * d).map(|i| value(i, 5) * 20.0).collect();
        let v: Vec<f32> = (0..kv_len * d).map(|i| value(i, 6) * 20.0).collect();
        let kq = QuantizedKv::from_rows(&k, d).expect("quantize k");
        let vq = QuantizedKv::from_rows(&v, d).expect("quantize v");
        let q: Vec<f32> = (0..d).map(|i| value(i, 7) * 20.0).collect();
        let valid = vec![true; kv_len];
        let mut out = vec![0f32; d];
        let mut scratch = vec![0f32; kv_len];
        let scale = 1.0 / (hd as f32).sqrt();
        let mut time = |f: &mut dyn FnMut(&mut [f32])| -> f64 {
            f(&mut out);
            median(
                (0..reps)
                    .map(|_| {
                        let s = Instant::now();
                        f(&mut out);
                        s.elapsed().as_secs_f64()
                    })
                    .collect(),
            )
        };
        let tf = time(&mut |o| {
            attention(
                &q,
                1,
                k[..].into(),
                v[..].into(),
                kv_len,
                &valid,
                nh,
                hd,
                scale,
                o,
                &mut scratch,
            )
        });
        let tq = time(&mut |o| attention_q4(&q, 1, &kq, &vq, kv_len, &valid, nh, hd, scale, o));
        println!(
            "attention, 1 query, {nh}x{hd}, kv_len {kv_len}: f32 cache {:.3} ms ({:.1} MB) | compressed cache {:.3} ms ({:.1} MB) | ratio {:.2}",
            tf * 1e3,
            (2 * kv_len * d * 4) as f64 / 1e6,
            tq * 1e3,
            (kq.bytes() + vq.bytes()) as f64 / 1e6,
            tq / tf
        );
    }
}
