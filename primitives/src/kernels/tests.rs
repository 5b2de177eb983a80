//! Every kernel against a naive reference on random inputs, on every instruction set this CPU
//! has, with sizes that are not multiples of the vector widths or tile sizes.

use super::linear::{linear_on, Isa};
use super::*;
use half::{bf16, f16};

/// Small deterministic generator (xorshift), so failures reproduce without a dependency.
struct Rng(u64);
impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_f32()).collect()
    }
}

use super::OwnedWeights as Owned;

/// Owned weights in one dtype (0 = f32, 1 = f16, 2 = bf16; `check_linear`'s 3, bf16 panels,
/// starts from 2) and their exact values, for the reference.
impl Owned {
    fn new(kind: usize, w: &[f32]) -> Owned {
        match kind {
            0 => Owned::F32(w.to_vec().into()),
            1 => Owned::F16(w.iter().map(|v| f16::from_f32(*v)).collect()),
            _ => Owned::Bf16(w.iter().map(|v| bf16::from_f32(*v)).collect()),
        }
    }
    fn values(&self) -> Vec<f64> {
        match self {
            Owned::F32(d) => d.iter().map(|v| *v as f64).collect(),
            Owned::F16(d) => d.iter().map(|v| v.to_f64()).collect(),
            Owned::Bf16(d) => d.iter().map(|v| v.to_f64()).collect(),
            Owned::Bf16Panels(_) => unreachable!("the reference reads the unpacked bf16 matrix"),
        }
    }
}

fn reference_linear(
    x: &[f32],
    tokens: usize,
    w: &Owned,
    n_out: usize,
    bias: Option<&[f32]>,
) -> Vec<f64> {
    let n_in = x.len() / tokens.max(1);
    let wv = w.values();
    // bf16 weights: the kernel's documented contract rounds the input to bf16 first.
    let xv: Vec<f64> = match w {
        Owned::Bf16(_) => x.iter().map(|v| bf16::from_f32(*v).to_f64()).collect(),
        _ => x.iter().map(|v| *v as f64).collect(),
    };
    let mut y = vec![0.0; tokens * n_out];
    for t in 0..tokens {
        for o in 0..n_out {
            let mut s = bias.map_or(0.0, |b| b[o] as f64);
            for i in 0..n_in {
                s += xv[t * n_in + i] * wv[o * n_in + i];
            }
            y[t * n_out + o] = s;
        }
    }
    y
}

fn check_linear(
    isa: Isa,
    kind: usize,
    tokens: usize,
    n_in: usize,
    n_out: usize,
    with_bias: bool,
    seed: u64,
) {
    let mut rng = Rng(seed);
    let x = rng.vec(tokens * n_in);
    let w = Owned::new(kind.min(2), &rng.vec(n_out * n_in));
    let bias = rng.vec(n_out);
    let bias = with_bias.then_some(&bias[..]);
    let mut y = vec![f32::NAN; tokens * n_out];
    let panels = match (&w, kind) {
        (Owned::Bf16(b), 3) => Some(Owned::Bf16Panels(pack_panels(b, n_out, n_in))),
        _ => None,
    };
    let m = panels.as_ref().unwrap_or(&w).matrix(n_out, n_in);
    linear_on(isa, &x, tokens, &m, bias, &mut y);
    let want = reference_linear(&x, tokens, &w, n_out, bias);
    // f32 accumulation of n_in products of magnitude <= 1: error grows like sqrt(n_in) ulps.
    let tol = 1e-5 * (n_in as f64).sqrt().max(1.0) * 4.0;
    for (i, (got, want)) in y.iter().zip(&want).enumerate() {
        assert!(
            (*got as f64 - want).abs() <= tol * (1.0 + want.abs()),
            "{isa:?} dtype {kind} tokens {tokens} in {n_in} out {n_out}: y[{i}] = {got}, want {want}"
        );
    }
}

#[test]
fn linear_matches_reference_on_every_path_dtype_and_odd_shape() {
    let shapes = [
        (1, 1, 1),
        (1, 17, 5),
        (1, 33, 7),
        (2, 31, 9),
        (3, 64, 4),
        (5, 100, 13),
        (6, 47, 8),
        (7, 129, 11),
        (13, 250, 70),
        (16, 768, 67),
        (20, 2100, 9),   // more than one k-slice for many tokens
        (30, 1031, 261), // several row tasks, row and k tails, uneven token tiles
        (40, 600, 150),  // AVX2 packed: three k-slices (the last 88), a 6-row panel tail
        (25, 7, 16),     // fewest packed tokens, k shorter than one 8x8 block
        (64, 257, 33),   // one k past a slice, panels of 16, 16 and 1 rows
        (33, 64, 50),    // AMX: a 1-token last group; a task of 18 rows (16 + 2)
        (48, 96, 16),    // AMX: a last group of exactly 16 tokens, one 16-row task
        (100, 320, 97),  // AMX: four groups (the last 4 tokens), a 1-row last task
        (13, 64, 50),    // AMX in place: one half of tokens; tasks of 32 and 18 rows
        (17, 32, 16),    // AMX in place: one token in the second half; one k step
        (32, 96, 33),    // AMX in place: both token halves full; a 1-row last task
    ];
    check_linear_shapes(&shapes, 0, 7);
}

/// `check_linear` on every instruction set and dtype (and bf16 panels) for each (tokens, n_in,
/// n_out); every
/// other shape (starting with shape `bias_from`) has a bias; seeds count up from `seed`.
fn check_linear_shapes(shapes: &[(usize, usize, usize)], bias_from: usize, seed: u64) {
    for isa in Isa::available() {
        for kind in 0..4 {
            for (n, &(tokens, n_in, n_out)) in shapes.iter().enumerate() {
                let bias = n % 2 == bias_from;
                check_linear(isa, kind, tokens, n_in, n_out, bias, seed + n as u64);
            }
        }
    }
}

/// Runs `f` inside rayon pools of each of these sizes (task boundaries move with the count).
fn in_pools(threads: &[usize], f: impl Fn() + Sync) {
    for &n in threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap();
        pool.install(&f);
    }
}

#[test]
fn linear_decode_shape_and_public_entry_point() {
    for kind in 0..3 {
        check_linear(Isa::detect(), kind, 1, 768, 3 * 768 + 5, true, 99);
    }
    let mut rng = Rng(5);
    let x = rng.vec(3 * 19);
    let w = Owned::new(2, &rng.vec(23 * 19));
    let mut y = vec![0.0; 3 * 23];
    linear(&x, 3, &w.matrix(23, 19), None, &mut y);
    let want = reference_linear(&x, 3, &w, 23, None);
    for (g, w) in y.iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 1e-4);
    }
}

#[test]
fn linear_few_token_wide_tiles_tails_and_prefetch_to_the_matrix_end() {
    // 1-2 tokens run 8-row tiles, then a 4-row tile and single rows, on whole rows that are
    // prefetched ahead up to W's last line. Pools of 1, 2 and 3 threads move the task
    // boundaries; the shapes have row tails of every kind and k tails (n_in % 32 != 0).
    let shapes = [
        (1, 40, 15),
        (2, 96, 31),
        (1, 2055, 45),
        (2, 33, 8),
        (1, 5000, 13),
        (2, 64, 3),
        (1, 300, 77),
    ];
    in_pools(&[1, 2, 3], || check_linear_shapes(&shapes, 1, 40));
}

#[test]
fn panels_hold_every_element_and_every_token_count_runs_to_the_matrix_end() {
    // Packing: element (r, k) reads back, zero padding past odd n_in and partial panels.
    let mut rng = Rng(11);
    for (n_out, n_in) in [(1, 1), (16, 2), (17, 3), (33, 64), (40, 101)] {
        let w: Vec<bf16> = rng
            .vec(n_out * n_in)
            .iter()
            .map(|v| bf16::from_f32(*v))
            .collect();
        let packed = pack_panels(&w, n_out, n_in);
        assert_eq!(packed.len(), panels_len(n_out, n_in));
        for r in 0..n_out {
            for k in 0..n_in {
                assert_eq!(
                    panel_element(&packed, n_in, r, k),
                    w[r * n_in + k],
                    "({r}, {k})"
                );
            }
        }
    }
    // In place: a mapped buffer (over 2 MiB) is reused, a heap one, a partial last panel and an
    // odd n_in are packed into new memory; all equal `pack_panels`.
    for (n_out, n_in) in [(1024, 1030), (64, 48), (40, 100), (32, 101)] {
        let w: Vec<bf16> = rng
            .vec(n_out * n_in)
            .iter()
            .map(|v| bf16::from_f32(*v))
            .collect();
        let buf = HugePageBuf::from_slice(&w);
        let mapped = buf.is_huge_page_aligned();
        let at = buf.as_ptr() as usize;
        let packed = pack_panels_in_place(buf, n_out, n_in);
        assert_eq!(
            &packed[..],
            &pack_panels(&w, n_out, n_in)[..],
            "{n_out} x {n_in}"
        );
        let reused = packed.as_ptr() as usize == at;
        assert_eq!(
            reused,
            mapped && n_out % 16 == 0 && n_in % 2 == 0,
            "{n_out} x {n_in}"
        );
    }
    // Products: every decode pass width (1-24 tokens, split evenly above), the compute-bound
    // path from 25, panel tails (n_out % 16) and odd n_in, in pools that move the task
    // boundaries, with prefetch clamped at the last panel's last line.
    let shapes = [
        (1, 40, 15),
        (2, 97, 31),
        (3, 64, 16),
        (5, 33, 47),
        (8, 300, 20),
        (16, 768, 67),
        (24, 129, 33),
        (25, 65, 17),
        (49, 2100, 40),
    ];
    in_pools(&[1, 2, 3], || {
        for isa in Isa::available() {
            for (n, &(tokens, n_in, n_out)) in shapes.iter().enumerate() {
                check_linear(isa, 3, tokens, n_in, n_out, n % 2 == 0, 60 + n as u64);
            }
        }
    });
}

#[test]
fn huge_page_advice_and_stream_read() {
    let v = vec![7u16; 3 << 20];
    assert!(v.len() == 3 << 20 && v.iter().all(|x| *x == 7));
    advise_huge_pages(&v[1..5]);
    let ones: Vec<f32> = vec![1.0; 1001];
    let bytes: &[u8] = bytemuck::cast_slice(&ones);
    assert_eq!(stream_read(bytes), 1001.0);
    assert_eq!(stream_read(&bytes[1..]), 1000.0); // the aligned words only
}

#[test]
fn linear_degenerate_sizes() {
    let w = Owned::new(0, &[]);
    let mut y = vec![1.0; 6];
    linear(&[], 2, &w.matrix(3, 0), Some(&[1.0, 2.0, 3.0]), &mut y);
    assert_eq!(y, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    let mut y: Vec<f32> = vec![];
    linear(&[], 0, &Owned::new(0, &[0.5; 6]).matrix(2, 3), None, &mut y);
}

#[test]
#[should_panic(expected = "linear: x must be")]
fn linear_rejects_wrong_input_length() {
    let w = Owned::new(0, &[0.0; 6]);
    linear(&[0.0; 4], 1, &w.matrix(2, 3), None, &mut [0.0; 2]);
}

#[test]
fn layer_norm_relu_add_match_reference() {
    let mut rng = Rng(3);
    for &(rows, width) in &[(1, 1), (3, 17), (2, 768), (70, 1000)] {
        let x = rng.vec(rows * width);
        let gamma = rng.vec(width);
        let beta = rng.vec(width);
        let mut y = vec![0.0; rows * width];
        layer_norm(&x, width, &gamma, &beta, 1e-5, &mut y);
        for r in 0..rows {
            let xr: Vec<f64> = x[r * width..(r + 1) * width]
                .iter()
                .map(|v| *v as f64)
                .collect();
            let mean = xr.iter().sum::<f64>() / width as f64;
            let var = xr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / width as f64;
            for i in 0..width {
                let want = (xr[i] - mean) / (var + 1e-5).sqrt() * gamma[i] as f64 + beta[i] as f64;
                let got = y[r * width + i] as f64;
                assert!(
                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "row {r} col {i}: {got} vs {want}"
                );
            }
        }
    }
    let mut a = vec![-1.0, 0.0, 2.5, -0.0, f32::MIN];
    relu_inplace(&mut a);
    assert_eq!(a, [0.0, 0.0, 2.5, 0.0, 0.0]);
    let mut acc = vec![1.0, 2.0, 3.0];
    add_inplace(&mut acc, &[0.5, -2.0, 1.0]);
    assert_eq!(acc, [1.5, 0.0, 4.0]);
}

/// Straightforward attention in f64 with the documented masking rules.
#[allow(clippy::too_many_arguments)]
fn reference_attention(
    q: &[f32],
    q_len: usize,
    k: &[f32],
    v: &[f32],
    kv_len: usize,
    valid: &[bool],
    nh: usize,
    hd: usize,
    scale: f32,
) -> Vec<f64> {
    let d = nh * hd;
    let mut out = vec![0.0; q_len * d];
    for i in 0..q_len {
        for h in 0..nh {
            let keys: Vec<usize> = (0..=kv_len - q_len + i).filter(|&j| valid[j]).collect();
            let scores: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    (0..hd)
                        .map(|c| q[i * d + h * hd + c] as f64 * k[j * d + h * hd + c] as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (n, &j) in keys.iter().enumerate() {
                for c in 0..hd {
                    out[i * d + h * hd + c] += e[n] / sum * v[j * d + h * hd + c] as f64;
                }
            }
        }
    }
    out
}

fn check_attention(
    q_len: usize,
    kv_len: usize,
    nh: usize,
    hd: usize,
    valid: &[bool],
    slots: usize,
    seed: u64,
) {
    check_attention_scratch(q_len, kv_len, nh, hd, valid, slots * kv_len.max(1), seed);
}

/// As `check_attention`, with `scratch_len` floats of scratch; returns every output (per
/// element type and instruction set, in that order) so callers can compare runs bit for bit.
fn check_attention_scratch(
    q_len: usize,
    kv_len: usize,
    nh: usize,
    hd: usize,
    valid: &[bool],
    scratch_len: usize,
    seed: u64,
) -> Vec<Vec<f32>> {
    let mut outputs = Vec::new();
    let mut rng = Rng(seed);
    let d = nh * hd;
    let q = rng.vec(q_len * d);
    let k = rng.vec(kv_len * d);
    let v = rng.vec(kv_len * d);
    let scale = 1.0 / (hd as f32).sqrt();
    // The cache in each element type: the kernel must give the f64 reference over the rounded
    // rows, whatever type it widens them from.
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Bf16] {
        let (mut kr, mut vr) = (k.clone(), v.clone());
        dtype.round_in_place(&mut kr);
        dtype.round_in_place(&mut vr);
        let want = reference_attention(&q, q_len, &kr, &vr, kv_len, valid, nh, hd, scale);
        let (mut kb, mut vb) = (
            KvBuf::zeroed(dtype, kr.len()),
            KvBuf::zeroed(dtype, vr.len()),
        );
        kb.rows_mut(0..kr.len()).write(0, &kr);
        vb.rows_mut(0..vr.len()).write(0, &vr);
        for isa in Isa::available() {
            let mut out = vec![f32::NAN; q_len * d];
            let mut scratch = vec![0.0; scratch_len];
            let a = attention::AttnRows {
                q: &q,
                q_len,
                k: kb.all(),
                v: vb.all(),
                kv_len,
                key_valid: valid,
                num_heads: nh,
                head_dim: hd,
                scale,
            };
            attention::attention_on(&a, &mut out, &mut scratch, isa);
            for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() < 1e-5,
                    "q_len {q_len} kv {kv_len} {isa:?} {dtype:?}: out[{i}] = {g}, want {w}"
                );
            }
            outputs.push(out);
        }
    }
    outputs
}

#[test]
fn attention_decode_prefill_and_masking() {
    let all = vec![true; 300];
    // Decode: one query against the whole cache, odd head sizes.
    check_attention(1, 37, 3, 20, &all, 1, 1);
    check_attention(1, 1, 2, 64, &all, 1, 2);
    // Prefill: causal, serial and parallel over query rows.
    check_attention(9, 9, 2, 17, &all, 1, 3);
    check_attention(40, 40, 4, 33, &all, 3, 4);
    // q_len > 1 inside a longer cache (chunked prefill / several new tokens).
    check_attention(5, 12, 2, 16, &all, 2, 5);
    // Left padding: the first 4 keys are padding.
    let mut padded = vec![true; 20];
    padded[..4].fill(false);
    check_attention(20, 20, 2, 8, &padded, 4, 6);
    check_attention(1, 20, 2, 8, &padded, 1, 7);
    // Holes in the middle as well.
    let holes: Vec<bool> = (0..30).map(|j| j % 3 != 1).collect();
    check_attention(6, 30, 3, 5, &holes, 2, 8);
}

#[test]
fn attention_decode_splits_heads_between_threads() {
    // One query row with room for several heads' scores: heads go to threads in contiguous
    // ranges and are scored together key by key. Pools of 2 and 3 threads, head counts that do
    // not divide evenly, scratch for fewer heads than a range holds, masked keys, and a cache
    // long enough (work >= 2^16) to take the parallel path.
    let mut padded = vec![true; 300];
    padded[..5].fill(false);
    padded[100..103].fill(false);
    let none = vec![false; 300];
    in_pools(&[2, 3], || {
        for (n, &(kv_len, nh, hd, slots)) in [
            (257, 12, 64, 12),
            (300, 7, 40, 7),
            (300, 7, 40, 2),
            (200, 32, 64, 32),
            (129, 5, 100, 64),
        ]
        .iter()
        .enumerate()
        {
            check_attention(1, kv_len, nh, hd, &padded, slots, 60 + n as u64);
        }
        check_attention(1, 300, 4, 64, &none, 4, 70);
    });
    // Sequential, with scratch for several heads at once.
    check_attention(1, 50, 6, 16, &padded, 4, 71);
    check_attention(3, 50, 6, 16, &padded, 4, 72);
}

#[test]
fn attention_prefill_over_widened_heads() {
    // Several query rows with 64- and 128-wide heads take the tiled path on AVX-512 (every
    // path is checked against the reference): row counts that are not a multiple of the 8-row
    // tiles, key counts that are not a multiple of the 32-key blocks, rows inside a longer
    // cache, left padding, holes, early rows with no valid key, a task per head (at least two
    // heads per thread), parallel groups of rows (scratch for several rows) and one sequential
    // group.
    let mut padded = vec![true; 300];
    padded[..6].fill(false);
    padded[50..53].fill(false);
    let late: Vec<bool> = (0..40).map(|j| j >= 9).collect();
    for (n, &(q_len, kv_len, nh, hd, slots, valid)) in [
        (37, 37, 3, 64, 4, &padded[..]),
        (13, 50, 2, 64, 3, &padded[..]),
        (21, 21, 2, 128, 1, &padded[..]),
        (40, 40, 2, 64, 2, &late[..]),
        (2, 2, 1, 64, 1, &padded[..]),
        (33, 40, 5, 64, 3, &padded[..]),
        (17, 17, 4, 128, 2, &late[..]),
    ]
    .iter()
    .enumerate()
    {
        in_pools(&[1, 2], || {
            check_attention(q_len, kv_len, nh, hd, valid, slots, 90 + n as u64);
        });
    }
}

#[test]
fn attention_decode_splits_keys_into_parts() {
    // One query row with scratch for the key-split path (`nh * kv_len` scores plus the
    // partials, as the executor sizes it): 2, 3 and 4 parts, a last part shorter than the
    // others, a first part with no valid key (its maximum is -inf and must weigh nothing in
    // the merge), holes, and every key masked (zeros). The parts depend on kv_len only, so
    // pools of 1, 2 and 3 threads must give the same bits.
    let mut padded = vec![true; 300];
    padded[..40].fill(false);
    padded[150..153].fill(false);
    let none = vec![false; 300];
    let cases: [(usize, usize, usize, &[bool]); 6] = [
        (64, 4, 64, &padded),
        (100, 12, 64, &padded),
        (257, 7, 40, &padded),
        (300, 32, 16, &padded),
        (130, 3, 100, &padded),
        (200, 4, 64, &none),
    ];
    for (n, &(kv_len, nh, hd, valid)) in cases.iter().enumerate() {
        let scratch = nh * kv_len + super::attention_partials_len(nh, hd);
        let runs: Vec<Vec<Vec<f32>>> = [1, 2, 3]
            .iter()
            .map(|&threads| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    check_attention_scratch(1, kv_len, nh, hd, valid, scratch, 80 + n as u64)
                })
            })
            .collect();
        for (threads, run) in [2, 3].iter().zip(&runs[1..]) {
            for (a, b) in run.iter().zip(&runs[0]) {
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "kv {kv_len} nh {nh}: {threads} threads differ from one"
                );
            }
        }
    }
}

#[test]
fn attention_rows_without_valid_keys_are_zero() {
    // Every key masked.
    let none = vec![false; 8];
    check_attention(3, 8, 2, 4, &none, 1, 9);
    let mut out = vec![f32::NAN; 2 * 4];
    let mut scratch = vec![0.0; 8];
    attention(
        &[1.0; 8],
        1,
        [1.0; 64][..].into(),
        [1.0; 64][..].into(),
        8,
        &none,
        2,
        4,
        0.5,
        &mut out,
        &mut scratch,
    );
    assert!(out.iter().all(|v| *v == 0.0));
    // Only later keys valid: early causal rows see none of them and must output zeros.
    let late: Vec<bool> = (0..6).map(|j| j >= 3).collect();
    let mut out = vec![f32::NAN; 6 * 2];
    let mut scratch = vec![0.0; 6];
    attention(
        &[0.3; 12],
        6,
        [0.2; 12][..].into(),
        [0.7; 12][..].into(),
        6,
        &late,
        1,
        2,
        1.0,
        &mut out,
        &mut scratch,
    );
    assert!(out[..3 * 2].iter().all(|v| *v == 0.0));
    assert!(out[3 * 2..].iter().all(|v| (*v - 0.7).abs() < 1e-6));
}

#[test]
fn linear_input_scratch_is_what_the_plan_counts() {
    // On a fresh thread (its buffers empty), products of growing size on every path: the thread
    // then holds the converted input of the largest, which must not exceed its planned bytes.
    for isa in Isa::available() {
        std::thread::spawn(move || {
            let mut rng = Rng(3);
            let mut largest = 0;
            for &(tokens, n_in) in &[(1, 64), (5, 100), (30, 257), (64, 100), (25, 7)] {
                for kind in 0..3 {
                    let x = rng.vec(tokens * n_in);
                    let w = Owned::new(kind, &rng.vec(9 * n_in));
                    let mut y = vec![0.0; tokens * 9];
                    linear_on(isa, &x, tokens, &w.matrix(9, n_in), None, &mut y);
                }
                largest = largest.max(super::linear::input_scratch_bytes(tokens, n_in));
                let held = super::linear::input_scratch_held();
                assert!(
                    held <= largest,
                    "{isa:?}: thread holds {held} bytes of converted input, plan {largest}"
                );
            }
        })
        .join()
        .unwrap();
    }
}

#[test]
fn huge_page_buffers_start_on_a_huge_page_and_free_their_memory() {
    // Large enough for a mapping of its own: starts at a 2 MiB boundary on Linux.
    let len = (3 << 20) / 2 + 5;
    let mut big = HugePageBuf::filled(len, 7u16);
    assert!(big.len() == len && big.iter().all(|x| *x == 7));
    if cfg!(target_os = "linux") {
        assert!(big.is_huge_page_aligned());
        assert_eq!(big.as_ptr() as usize % HUGE_PAGE_BYTES, 0);
    }
    big[len - 1] = 9;
    let copy = big.clone();
    assert_eq!(copy[len - 1], 9);
    assert_eq!(&copy[..len - 1], &big[..len - 1]);
    // Small ones stay on the heap and behave the same.
    let small = HugePageBuf::from_slice(&[1.0f32, 2.0, 3.0]);
    assert!(!small.is_huge_page_aligned());
    assert_eq!(&*small, &[1.0, 2.0, 3.0]);
    assert!(HugePageBuf::filled(0, 0u8).is_empty());
    // Dropping unmaps each buffer once (an unmap of someone else's pages would crash here).
    for _ in 0..64 {
        drop(HugePageBuf::filled(HUGE_PAGE_BYTES, 1u8));
    }
}

#[test]
fn zeroed_huge_page_buffers_read_zero_mapped_or_not() {
    let len = (3 << 20) / 4 + 3;
    let mut big = HugePageBuf::<f32>::zeroed(len);
    assert!(big.len() == len && big.iter().all(|x| *x == 0.0));
    if cfg!(target_os = "linux") {
        assert!(big.is_huge_page_aligned());
    }
    big[len - 1] = 2.5;
    assert_eq!(big[len - 1], 2.5);
    let small = HugePageBuf::<u16>::zeroed(9);
    assert!(!small.is_huge_page_aligned());
    assert_eq!(&*small, &[0u16; 9]);
}

#[test]
fn argmax_is_the_first_largest_across_lanes_and_tail() {
    // Against a one-value loop, on lengths around the 16 lanes, with the largest value often
    // tied (in different lanes and in the tail), and NaNs and infinities mixed in; through the
    // detected instruction set and the portable body.
    let plain = |v: &[f32]| {
        let (mut best, mut best_value) = (0, f32::NEG_INFINITY);
        for (i, &x) in v.iter().enumerate() {
            if x > best_value {
                (best, best_value) = (i as u32, x);
            }
        }
        best
    };
    assert_eq!(super::argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    assert_eq!(super::argmax(&[]), 0);
    assert_eq!(super::argmax(&[f32::NAN; 40]), 0);
    assert_eq!(super::argmax(&[f32::NEG_INFINITY; 40]), 0);
    let mut rng = Rng(17);
    for len in [1, 2, 15, 16, 17, 31, 32, 33, 100, 50_272] {
        for trial in 0..20 {
            let values: Vec<f32> = rng
                .vec(len)
                .into_iter()
                .map(|x| {
                    let r = ((x + 1.0) * 25.0) as u32;
                    match r {
                        0 => f32::NAN,
                        1 => f32::NEG_INFINITY,
                        // Few distinct values, so that the largest is often tied.
                        r => (r % (3 + trial)) as f32 - 1.0,
                    }
                })
                .collect();
            let want = plain(&values);
            assert_eq!(super::argmax(&values), want, "len {len} trial {trial}");
            assert_eq!(
                super::argmax_lanes(&values),
                want,
                "portable, len {len} trial {trial}"
            );
        }
    }
}

#[test]
fn kv_rounding_is_the_half_crates_bit_for_bit() {
    // Round to nearest even on the bits must give exactly `half`'s conversion: ties both
    // ways, values that round up into the next binade or to infinity, subnormals, zeros,
    // infinities and NaNs (quieted, payload kept in the top bits), on a slice long enough to
    // be split between threads.
    let mut values: Vec<f32> = [
        0.0,
        -0.0,
        1.0,
        f32::from_bits(0x3F80_8000), // tie, even below: stays
        f32::from_bits(0x3F81_8000), // tie, odd below: rounds up
        f32::from_bits(0x3F80_8001),
        f32::from_bits(0x3FFF_FFFF), // rounds into the next binade
        f32::MAX,                    // rounds to infinity
        f32::MIN_POSITIVE,
        f32::from_bits(0x0000_8001), // subnormal
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7F80_0001), // signalling NaN, low payload
        f32::from_bits(0xFFC1_2345),
    ]
    .to_vec();
    let mut rng = Rng(23);
    values.extend(rng.vec(1 << 19).into_iter().map(|x| x * 1e3));
    values.extend((0..1000u32).map(|i| f32::from_bits(i.wrapping_mul(0x9E37_79B9))));
    for (dtype, want) in [
        (
            KvDtype::Bf16,
            values
                .iter()
                .map(|v| half::bf16::from_f32(*v).to_f32())
                .collect::<Vec<f32>>(),
        ),
        (
            KvDtype::F16,
            values
                .iter()
                .map(|v| half::f16::from_f32(*v).to_f32())
                .collect(),
        ),
    ] {
        let mut got = values.clone();
        dtype.round_in_place(&mut got);
        // Writing unrounded values into a cache of the type narrows them the same way.
        let mut cache = KvBuf::zeroed(dtype, values.len());
        cache.rows_mut(0..values.len()).write(0, &values);
        let mut stored = vec![0.0f32; values.len()];
        cache.all().widen_into(&mut stored);
        assert!(
            stored
                .iter()
                .zip(&want)
                .all(|(s, w)| s.to_bits() == w.to_bits()),
            "{dtype:?}: the cache's narrowing differs from half's"
        );
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{dtype:?} {:#010x}: got {:#010x}, want {:#010x} (at {i})",
                values[i].to_bits(),
                g.to_bits(),
                w.to_bits()
            );
        }
    }
}

#[test]
fn elementwise_passes_match_plain_loops() {
    // Short (one thread) and long (split between threads) slices, NaN into relu.
    for len in [5, 1 << 19] {
        let x: Vec<f32> = Rng(len as u64).vec(len);
        let mut r = x.clone();
        r[0] = f32::NAN;
        super::relu_inplace(&mut r);
        assert_eq!(r[0], 0.0);
        assert!(r[1..].iter().zip(&x[1..]).all(|(g, v)| *g == v.max(0.0)));
        let mut s = x.clone();
        super::scale_inplace(&mut s, 0.125);
        assert!(s.iter().zip(&x).all(|(g, v)| *g == v * 0.125));
        let mut a = x.clone();
        super::add_inplace(&mut a, &s);
        assert!(a
            .iter()
            .zip(x.iter().zip(&s))
            .all(|(g, (v, w))| *g == v + w));
    }
}
