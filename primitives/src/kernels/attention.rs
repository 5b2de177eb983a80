//! Causal multi-head attention over a KV cache read in place.
//!
//! The cache rows are [kv_len, num_heads * head_dim], so one head's keys are `head_dim`
//! contiguous floats every row: each score is a short contiguous dot product and the weighted
//! sum of values is a contiguous multiply-add per key, which vectorises without copying or
//! transposing the cache. Bodies are written once in plain Rust and compiled twice, for AVX-512
//! and for the baseline target, and the wrapper picks one at run time.

use rayon::prelude::*;

/// Geometry and operands shared by every query row.
pub(crate) struct Attn<'a> {
    pub q: &'a [f32],
    pub q_len: usize,
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub kv_len: usize,
    pub key_valid: &'a [bool],
    pub num_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Runs attention; with room in `scratch` for several rows' scores, query rows run in parallel.
pub(crate) fn attention_impl(a: &Attn, out: &mut [f32], scratch: &mut [f32], simd: bool) {
    let d = a.num_heads * a.head_dim;
    if a.q_len == 0 || d == 0 {
        return;
    }
    let slots = scratch.len().checked_div(a.kv_len).unwrap_or(1);
    let work = a.q_len * a.kv_len * d;
    if slots >= 2 && a.q_len >= 2 && work >= 1 << 16 {
        // Several groups per thread, so work stealing evens out causal rows (later rows see
        // more keys).
        let groups = slots
            .min(a.q_len)
            .min(4 * rayon::current_num_threads().max(1));
        let rows_per_group = a.q_len.div_ceil(groups);
        out.par_chunks_mut(rows_per_group * d)
            .zip(scratch.par_chunks_mut(a.kv_len.max(1)))
            .enumerate()
            .for_each(|(g, (o, s))| {
                let first = g * rows_per_group;
                for (r, orow) in o.chunks_mut(d).enumerate() {
                    run_row(a, first + r, orow, &mut s[..a.kv_len], simd);
                }
            });
    } else {
        for (i, orow) in out.chunks_mut(d).enumerate() {
            run_row(a, i, orow, &mut scratch[..a.kv_len], simd);
        }
    }
}

fn run_row(a: &Attn, i: usize, out: &mut [f32], p: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only set when the CPU has AVX-512 F and FMA.
        unsafe { row_avx512(a, i, out, p) };
        return;
    }
    let _ = simd;
    row_body(a, i, out, p);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
unsafe fn row_avx512(a: &Attn, i: usize, out: &mut [f32], p: &mut [f32]) {
    row_body(a, i, out, p)
}

/// One query row, every head: scores into `p`, softmax over the valid causal keys, then the
/// probability-weighted sum of values into `out` (zeros when no key is valid).
///
/// Masked keys get a score of -inf, which the exponential maps to exactly 0, so the softmax
/// loops run without branches and vectorise; the value loop skips zero weights.
#[inline(always)]
fn row_body(a: &Attn, i: usize, out: &mut [f32], p: &mut [f32]) {
    let (hd, d) = (a.head_dim, a.num_heads * a.head_dim);
    let last = a.kv_len - a.q_len + i; // the newest key this query may see
    let valid = &a.key_valid[..=last];
    let p = &mut p[..=last];
    for h in 0..a.num_heads {
        let qh = &a.q[i * d + h * hd..i * d + (h + 1) * hd];
        let oh = &mut out[h * hd..(h + 1) * hd];
        let mut max = f32::NEG_INFINITY;
        for (j, pj) in p.iter_mut().enumerate() {
            *pj = if valid[j] {
                let s = dot(qh, &a.k[j * d + h * hd..j * d + (h + 1) * hd]) * a.scale;
                max = max.max(s);
                s
            } else {
                f32::NEG_INFINITY
            };
        }
        oh.fill(0.0);
        if max == f32::NEG_INFINITY {
            continue;
        }
        for pj in p.iter_mut() {
            *pj = exp_nonpositive(*pj - max);
        }
        let inv = 1.0 / sum(p);
        for (j, pj) in p.iter().enumerate() {
            if *pj != 0.0 {
                let vh = &a.v[j * d + h * hd..j * d + (h + 1) * hd];
                let wgt = pj * inv;
                for (o, x) in oh.iter_mut().zip(vh) {
                    *o += wgt * x;
                }
            }
        }
    }
}

/// e^x for x <= 0 (and -inf, giving 0), about 2e-7 relative error, in plain arithmetic so that
/// loops calling it vectorise (libm's `exp` does not).
///
/// x = n ln 2 + r with integer n and |r| <= ln 2 / 2 (Cody-Waite: ln 2 split in two parts so
/// that r is exact enough), e^r by its Taylor series to degree 6 (truncation error below 2e-7),
/// and 2^n built in the exponent bits.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_145_75; // few mantissa bits, so n * LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    let clamped = x.max(-87.0);
    let shifted = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = (clamped - n * LN2_HI) - n * LN2_LO;
    let poly = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        poly * scale
    }
}

/// Sum with 16 independent partial sums, folded as a tree.
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for l in 0..16 {
            lanes[l] += c[l];
        }
    }
    fold16(lanes) + chunks.remainder().iter().sum::<f32>()
}

/// Dot product with 16 independent partial sums (one vector register under AVX-512), folded
/// as a tree rather than added lane by lane.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut ac = a.chunks_exact(16);
    let mut bc = b.chunks_exact(16);
    for (x, y) in (&mut ac).zip(&mut bc) {
        for l in 0..16 {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut s = fold16(lanes);
    for (x, y) in ac.remainder().iter().zip(bc.remainder()) {
        s += x * y;
    }
    s
}

/// Adds 16 lanes pairwise (8 + 4 + 2 + 1 additions on a short dependency chain).
#[inline(always)]
fn fold16(mut lanes: [f32; 16]) -> f32 {
    for width in [8, 4, 2, 1] {
        for l in 0..width {
            lanes[l] += lanes[l + width];
        }
    }
    lanes[0]
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_nonpositive_is_accurate_and_exact_at_the_ends() {
        assert_eq!(super::exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp_nonpositive(-100.0), 0.0);
        assert!((super::exp_nonpositive(0.0) - 1.0).abs() < 1e-7);
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = super::exp_nonpositive(x) as f64;
            assert!(
                (got - want).abs() <= 3e-7 * want,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
    }
}
