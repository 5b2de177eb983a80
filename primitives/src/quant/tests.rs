//! Tests of 4-bit group-wise compression and the kernels that work from it.

use super::group::{quantize_group, GROUP};
use super::linear::{linear_q4_on, Isa};
use super::*;
use crate::kernels::{Matrix, WeightData};
use half::{bf16, f16};

/// Deterministic pseudo-random values in [-amp, amp) plus an offset per "column", so groups have
/// different ranges and minimums.
fn data(n: usize, seed: u64, amp: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            (u - 0.5) * 2.0 * amp + (i % 7) as f32 * 0.01
        })
        .collect()
}

/// The group (index into scales) holding element (o, c) of an [out, in] matrix.
fn group_of(out: usize, inp: usize, o: usize, c: usize) -> usize {
    let full = out / GROUP;
    if o < full * GROUP {
        (o / GROUP) * inp + c
    } else {
        let r = out % GROUP;
        full * inp + (c * r + (o - full * GROUP)) / GROUP
    }
}

/// |a - b| allowed after f32 rounding of `code * scale + min`.
fn slack(v: f32, m: f32) -> f32 {
    4.0 * f32::EPSILON * (v.abs() + m.abs()) + 1e-30
}

const SHAPES: [(usize, usize); 8] = [
    (64, 64),
    (128, 96),
    (100, 3),
    (1, 1),
    (1, 65),
    (63, 5),
    (130, 65),
    (192, 17),
];

#[test]
fn round_trip_error_is_at_most_half_a_step() {
    for (k, &(out, inp)) in SHAPES.iter().enumerate() {
        for amp in [1e-3f32, 0.05, 3.0, 2000.0] {
            let w = data(out * inp, k as u64 + 1, amp);
            let q = QuantizedMatrix::quantize(&w, out, inp).unwrap();
            let d = q.dequantize();
            let (_, scales, mins) = q.parts();
            for o in 0..out {
                for c in 0..inp {
                    let g = group_of(out, inp, o, c);
                    let (s, m) = (scales[g].to_f32(), mins[g].to_f32());
                    let (x, y) = (w[o * inp + c], d[o * inp + c]);
                    assert!(
                        (x - y).abs() <= s / 2.0 + slack(x, m),
                        "{out}x{inp} amp {amp} ({o},{c}): {x} -> {y}, scale {s}"
                    );
                }
            }
        }
    }
}

#[test]
fn constant_groups_have_scale_zero_or_tiny_and_reconstruct() {
    let mut codes = [0u8; 32];
    // Exactly representable in fp16: scale 0, exact reconstruction.
    let (s, m) = quantize_group(&[0.5; 64], &mut codes).unwrap();
    assert_eq!((s.to_f32(), m.to_f32()), (0.0, 0.5));
    assert_eq!(codes, [0u8; 32]);
    let w = vec![0.5f32; 64 * 3];
    let q = QuantizedMatrix::quantize(&w, 64, 3).unwrap();
    assert_eq!(q.dequantize(), w);
    let z = QuantizedMatrix::quantize(&[0.0; 7], 7, 1).unwrap();
    assert_eq!(z.dequantize(), vec![0.0; 7]);
    // Not representable (0.1): the minimum rounds down, a tiny scale covers the gap.
    let (s, m) = quantize_group(&[0.1; 10], &mut codes).unwrap();
    assert!(m.to_f32() <= 0.1 && s.to_f32() < 1e-4, "{s} {m}");
    let q = QuantizedMatrix::quantize(&[0.1; 10], 10, 1).unwrap();
    for v in q.dequantize() {
        assert!((v - 0.1).abs() <= s.to_f32() / 2.0 + slack(0.1, 0.1));
    }
}

#[test]
fn f16_and_bf16_inputs_match_their_widened_values() {
    let (out, inp) = (70, 9);
    let w = data(out * inp, 9, 0.2);
    let h: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
    let b: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let hq = QuantizedMatrix::from_matrix(&Matrix {
        data: WeightData::F16(&h),
        out_features: out,
        in_features: inp,
    })
    .unwrap();
    let hf: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
    assert_eq!(hq, QuantizedMatrix::quantize(&hf, out, inp).unwrap());
    let bq = QuantizedMatrix::from_matrix(&Matrix {
        data: WeightData::Bf16(&b),
        out_features: out,
        in_features: inp,
    })
    .unwrap();
    let bf: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
    assert_eq!(bq, QuantizedMatrix::quantize(&bf, out, inp).unwrap());
    // Parts round trip.
    let (c, s, m) = bq.parts();
    let back = QuantizedMatrix::from_parts(out, inp, c.to_vec(), s.to_vec(), m.to_vec()).unwrap();
    assert_eq!(back, bq);
    assert!(
        QuantizedMatrix::from_parts(out, inp, c.to_vec(), s[1..].to_vec(), m.to_vec()).is_err()
    );
}

#[test]
fn unrepresentable_values_and_bad_shapes_are_errors() {
    let mut w = data(64 * 4, 1, 1.0);
    w[64 * 2 + 3] = f32::NAN;
    let e = QuantizedMatrix::quantize(&w, 64, 4).unwrap_err();
    assert!(
        matches!(e, QuantError::Unrepresentable { index: 131, .. }),
        "{e}"
    );
    w[131] = 1e6; // beyond fp16
    let e = QuantizedMatrix::quantize(&w, 64, 4).unwrap_err();
    assert!(
        matches!(e, QuantError::Unrepresentable { index: 131, .. }),
        "{e}"
    );
    let e = QuantizedMatrix::quantize(&w, 64, 5).unwrap_err();
    assert!(
        e.to_string()
            .contains("256 values given, shape implies 320"),
        "{e}"
    );
}

/// y = x W^T + b with W given as f32 [out, in], summed in f64; also sum |x| |w| per output,
/// the scale of rounding errors.
#[allow(clippy::type_complexity)]
fn naive(
    x: &[f32],
    tokens: usize,
    w: &[f32],
    out: usize,
    inp: usize,
    bias: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; tokens * out];
    let mut mag = vec![0f32; tokens * out];
    for t in 0..tokens {
        for o in 0..out {
            let mut s = bias.map_or(0.0, |b| b[o] as f64);
            let mut m = 0f64;
            for c in 0..inp {
                let p = x[t * inp + c] as f64 * w[o * inp + c] as f64;
                s += p;
                m += p.abs();
            }
            y[t * out + o] = s as f32;
            mag[t * out + o] = m as f32;
        }
    }
    (y, mag)
}

fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Portable];
    if Isa::detect() != Isa::Portable {
        v.push(Isa::Avx512);
    }
    if Isa::detect() == Isa::Avx512Bf16 {
        v.push(Isa::Avx512Bf16);
    }
    v
}

#[test]
fn linear_q4_matches_dequantize_then_matmul() {
    for (k, &(out, inp)) in SHAPES
        .iter()
        .chain(&[(256, 200), (64, 1), (128, 33)])
        .enumerate()
    {
        let w = data(out * inp, 100 + k as u64, 0.1);
        let q = QuantizedMatrix::quantize(&w, out, inp).unwrap();
        let wd = q.dequantize();
        let bias = data(out, 7, 1.0);
        for tokens in [1usize, 2, 5, 6, 7, 13] {
            let x = data(tokens * inp, 50 + tokens as u64, 1.0);
            for b in [None, Some(&bias[..])] {
                let (want, mag) = naive(&x, tokens, &wd, out, inp, b);
                // x * scale is rounded to bf16 (relative 2^-9) and multiplied by code * scale,
                // which is |w - min| <= 2 max|w|: bound the rounding by sum|x| * 3 max|w| / 512.
                let wmax = wd.iter().fold(0f32, |m, v| m.max(v.abs()));
                let xabs: Vec<f32> = x
                    .chunks(inp)
                    .map(|r| r.iter().map(|v| v.abs()).sum())
                    .collect();
                let mut first: Option<Vec<f32>> = None;
                for isa in isas() {
                    let mut y = vec![f32::NAN; tokens * out];
                    linear_q4_on(isa, &x, tokens, &q, b, &mut y);
                    for (i, (a, e)) in y.iter().zip(&want).enumerate() {
                        let tol = xabs[i / out] * 3.0 * wmax / 512.0 + 1e-5 * (1.0 + e.abs());
                        assert!(
                            (a - e).abs() <= tol,
                            "{isa:?} {out}x{inp} t{tokens} [{i}]: {a} vs {e}"
                        );
                    }
                    // Every instruction set computes the same thing, up to summation order.
                    if let Some(f) = &first {
                        for (i, (a, e)) in y.iter().zip(f).enumerate() {
                            let tol = 1e-5 * (mag[i] + 1.0);
                            assert!(
                                (a - e).abs() <= tol,
                                "{isa:?} vs portable {out}x{inp} t{tokens} [{i}]: {a} vs {e}"
                            );
                        }
                    } else {
                        first = Some(y);
                    }
                }
            }
        }
    }
    // Zero tokens: nothing to do, nothing touched.
    let q = QuantizedMatrix::quantize(&data(64 * 8, 1, 1.0), 64, 8).unwrap();
    linear_q4(&[], 0, &q, None, &mut []);
}

#[test]
fn kv_rows_round_trip_and_count_36_bytes_per_group() {
    for (width, positions) in [(32usize, 5usize), (64, 3), (128, 4), (100, 2), (768, 2)] {
        let rows = data(width * positions, width as u64, 2.0);
        let kv = QuantizedKv::from_rows(&rows, width).unwrap();
        assert_eq!(kv.len(), positions);
        // 36 bytes per group of 64 (32 of codes, f16 scale and minimum); the planner's count is
        // checked against this in executor/tests/compressed_sizes.rs.
        assert_eq!(kv.bytes_per_position(), width.div_ceil(64) * 36);
        assert_eq!(kv.bytes(), positions * kv.bytes_per_position());
        let (_, scales, mins) = kv.parts();
        let d = kv.dequantize();
        let gpr = width.div_ceil(64);
        for p in 0..positions {
            for c in 0..width {
                let g = p * gpr + c / 64;
                let (s, m) = (scales[g].to_f32(), mins[g].to_f32());
                let (x, y) = (rows[p * width + c], d[p * width + c]);
                assert!((x - y).abs() <= s / 2.0 + slack(x, m), "w{width} p{p} c{c}");
            }
        }
        // Appending one position at a time gives the same cache; ranges match whole rows.
        let mut inc = QuantizedKv::with_capacity(width, positions);
        for r in rows.chunks(width) {
            inc.push_rows(r).unwrap();
        }
        assert_eq!(inc, kv);
        let mut part = vec![0f32; width / 3];
        kv.dequantize_range(positions - 1, width / 2, &mut part);
        assert_eq!(part, d[(positions - 1) * width + width / 2..][..width / 3]);
    }
    let mut kv = QuantizedKv::with_capacity(64, 2);
    assert!(kv.push_rows(&[0.0; 65]).is_err());
    let mut bad = data(128, 1, 1.0);
    bad[70] = f32::INFINITY;
    let e = kv.push_rows(&bad).unwrap_err();
    assert!(
        matches!(e, QuantError::Unrepresentable { index: 70, .. }),
        "{e}"
    );
    assert_eq!(kv.len(), 0, "a failed append leaves the cache as it was");
    kv.push_rows(&[1.0; 64]).unwrap();
    kv.set_row(0, &[2.0; 64]).unwrap();
    assert_eq!(kv.dequantize(), vec![2.0; 64]);
    assert!(kv.set_row(1, &[2.0; 64]).is_err());
}

#[test]
fn attention_over_compressed_cache_matches_f32_kernel_on_dequantized_data() {
    // (heads, head_dim, kv_len, q_len, left padding)
    let cases = [
        (4usize, 8usize, 9usize, 9usize, 0usize),
        (4, 8, 9, 9, 3),
        (2, 64, 40, 1, 0),
        (2, 64, 70, 70, 5),
        (3, 128, 33, 4, 2),
        (5, 12, 37, 1, 36),
        (1, 64, 3, 3, 3),
        (3, 128, 50, 1, 7),
        (1, 64, 3, 1, 3),
        (2, 256, 33, 1, 0),
    ];
    for (k_, &(nh, hd, kv_len, q_len, pad)) in cases.iter().enumerate() {
        let d = nh * hd;
        let kr = data(kv_len * d, 11 + k_ as u64, 1.5);
        let vr = data(kv_len * d, 21 + k_ as u64, 1.0);
        let q = data(q_len * d, 31 + k_ as u64, 1.0);
        let kq = QuantizedKv::from_rows(&kr, d).unwrap();
        let vq = QuantizedKv::from_rows(&vr, d).unwrap();
        let valid: Vec<bool> = (0..kv_len).map(|j| j >= pad).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let mut want = vec![0f32; q_len * d];
        let mut scratch = vec![0f32; kv_len];
        crate::kernels::attention(
            &q,
            q_len,
            kq.dequantize()[..].into(),
            vq.dequantize()[..].into(),
            kv_len,
            &valid,
            nh,
            hd,
            scale,
            &mut want,
            &mut scratch,
        );
        let mut got = vec![f32::NAN; q_len * d];
        attention_q4(&q, q_len, &kq, &vq, kv_len, &valid, nh, hd, scale, &mut got);
        for (i, (a, e)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - e).abs() <= 1e-5 * (1.0 + e.abs()),
                "case {k_} [{i}]: {a} vs {e}"
            );
        }
        if pad > kv_len - q_len {
            assert!(
                got[..d].iter().all(|&v| v == 0.0),
                "query with no valid key must be zero"
            );
        }
    }
}
