//! `attention_q4`: causal multi-head attention for one sequence over a compressed KV cache.
//!
//! Same semantics as [`crate::kernels::attention`]. Work is split by head (rayon tasks). Decode
//! (one query row) with heads made of whole groups computes from the 4-bit codes directly (see
//! `decode_on_codes`). Otherwise, within a head, keys are taken in tiles of `KEY_TILE` positions
//! whose head slice is dequantized into a small per-thread buffer and then used by every query
//! row, so each cached value is dequantized once per call and the full cache is never widened.

use super::group::{GROUP, GROUP_BYTES};
use super::QuantizedKv;
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use std::cell::RefCell;

/// Positions per dequantized tile: 32 x head_dim floats (16 KiB at head_dim 128) stays in L1.
const KEY_TILE: usize = 32;

#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    tile: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Output pointer shared by head tasks, which write disjoint columns.
struct SendPtr(*mut f32);
// SAFETY: task h writes only out[i, h*hd..(h+1)*hd]; heads are disjoint.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

/// Causal multi-head attention over a compressed cache.
///
/// q: [q_len, nh*hd], the last q_len of the kv_len cached positions; k, v: compressed caches of
/// width nh*hd holding at least kv_len positions; key_valid[j] false masks key j. Query i attends
/// the valid keys 0..=kv_len-q_len+i; a query with no valid key outputs zeros. Scores are
/// q·k * scale. out: [q_len, nh*hd]. Scratch is per thread and reused across calls.
#[allow(clippy::too_many_arguments)]
pub fn attention_q4(
    q: &[f32],
    q_len: usize,
    k: &QuantizedKv,
    v: &QuantizedKv,
    kv_len: usize,
    key_valid: &[bool],
    num_heads: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
) {
    let d = num_heads * head_dim;
    assert!(
        q_len <= kv_len,
        "attention_q4: q_len ({q_len}) must not exceed kv_len ({kv_len})"
    );
    assert_eq!(
        q.len(),
        q_len * d,
        "attention_q4: q must be [q_len, num_heads*head_dim]"
    );
    assert!(
        k.width() == d && v.width() == d && k.len() >= kv_len && v.len() >= kv_len,
        "attention_q4: k and v must hold kv_len positions of num_heads*head_dim"
    );
    assert!(
        key_valid.len() >= kv_len,
        "attention_q4: key_valid shorter than kv_len"
    );
    assert_eq!(
        out.len(),
        q_len * d,
        "attention_q4: out must be [q_len, num_heads*head_dim]"
    );
    if q_len == 0 || d == 0 {
        return;
    }
    let a = Args {
        q,
        q_len,
        k,
        v,
        kv_len,
        key_valid,
        num_heads,
        head_dim,
        scale,
    };
    let op = SendPtr(out.as_mut_ptr());
    let op = &op;
    let simd = simd_available();
    let run = |h: usize| {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let Scratch { scores, tile } = &mut *s;
            scores.resize(q_len * kv_len.max(1), 0.0);
            tile.resize(KEY_TILE * head_dim, 0.0);
            head(&a, h, scores, tile, op.0, simd);
        })
    };
    if num_heads > 1 && q_len * kv_len * d >= 1 << 15 {
        (0..num_heads).into_par_iter().for_each(run);
    } else {
        (0..num_heads).for_each(run);
    }
}

struct Args<'a> {
    q: &'a [f32],
    q_len: usize,
    k: &'a QuantizedKv,
    v: &'a QuantizedKv,
    kv_len: usize,
    key_valid: &'a [bool],
    num_heads: usize,
    head_dim: usize,
    scale: f32,
}

/// Largest head_dim / 64 of the decode fast path (head_dim 256).
const MAX_GROUPS_FAST: usize = 4;

/// Decode (one query row) straight from the codes when heads are whole groups (head_dim a
/// multiple of 64, every OPT model): with scale s and minimum m of a group,
/// `q · k = s * (q · codes) + m * sum(q)` and `sum_j p_j v_j = sum_j (p_j s_j) codes_j +
/// sum_j p_j m_j`, so nothing is dequantized; the fp16 scales and minimums of a tile of keys are
/// gathered and converted together (F16C) rather than one by one.
#[inline(always)]
fn decode_on_codes(a: &Args, h: usize, scores: &mut [f32], out: *mut f32) {
    let (hd, d, kv) = (a.head_dim, a.num_heads * a.head_dim, a.kv_len);
    let (ng, g0, gpr) = (hd / GROUP, h * hd / GROUP, d.div_ceil(GROUP));
    let q = &a.q[h * hd..][..hd];
    let mut qsum = [0f32; MAX_GROUPS_FAST];
    for (gi, qs) in qsum.iter_mut().enumerate().take(ng) {
        *qs = q[gi * GROUP..][..GROUP].iter().sum();
    }
    let mut sm16 = [f16::ZERO; 2 * KEY_TILE * MAX_GROUPS_FAST];
    let mut sm = [0f32; 2 * KEY_TILE * MAX_GROUPS_FAST];
    // Gathers the scales and minimums of keys j0..j1 (this head's groups) into sm: scales first.
    let mut load = |kvq: &QuantizedKv, j0: usize, j1: usize, sm: &mut [f32]| -> usize {
        let (_, scales, mins) = kvq.parts();
        let n = (j1 - j0) * ng;
        for j in j0..j1 {
            for gi in 0..ng {
                let g = j * gpr + g0 + gi;
                sm16[(j - j0) * ng + gi] = scales[g];
                sm16[n + (j - j0) * ng + gi] = mins[g];
            }
        }
        sm16[..2 * n].convert_to_f32_slice(&mut sm[..2 * n]);
        n
    };
    let (kc, _, _) = a.k.parts();
    let mut j0 = 0;
    while j0 < kv {
        let j1 = (j0 + KEY_TILE).min(kv);
        let n = load(a.k, j0, j1, &mut sm);
        for (j, sj) in scores.iter_mut().enumerate().take(j1).skip(j0) {
            *sj = if a.key_valid[j] {
                let mut sc = 0.0;
                for gi in 0..ng {
                    let g = j * gpr + g0 + gi;
                    let t = (j - j0) * ng + gi;
                    let c = &kc[g * GROUP_BYTES..][..GROUP_BYTES];
                    sc += sm[t] * dot_codes(&q[gi * GROUP..][..GROUP], c) + sm[n + t] * qsum[gi];
                }
                sc * a.scale
            } else {
                f32::NEG_INFINITY
            };
        }
        j0 = j1;
    }
    let mx = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    // SAFETY: the caller's contract: out has q_len * d = d floats; only head h writes these.
    let o = unsafe { std::slice::from_raw_parts_mut(out.add(h * hd), hd) };
    o.fill(0.0);
    if mx == f32::NEG_INFINITY {
        return;
    }
    let mut sum = 0.0;
    for x in scores.iter_mut() {
        *x = (*x - mx).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    let (vc, _, _) = a.v.parts();
    let mut msum = [0f32; MAX_GROUPS_FAST];
    let mut j0 = 0;
    while j0 < kv {
        let j1 = (j0 + KEY_TILE).min(kv);
        if scores[j0..j1].iter().any(|&p| p != 0.0) {
            let n = load(a.v, j0, j1, &mut sm);
            for (j, &pj) in scores.iter().enumerate().take(j1).skip(j0) {
                let p = pj * inv;
                if p == 0.0 {
                    continue;
                }
                for gi in 0..ng {
                    let g = j * gpr + g0 + gi;
                    let t = (j - j0) * ng + gi;
                    msum[gi] += p * sm[n + t];
                    axpy_codes(
                        &mut o[gi * GROUP..][..GROUP],
                        p * sm[t],
                        &vc[g * GROUP_BYTES..][..GROUP_BYTES],
                    );
                }
            }
        }
        j0 = j1;
    }
    for (gi, m) in msum.iter().enumerate().take(ng) {
        for v in &mut o[gi * GROUP..][..GROUP] {
            *v += m;
        }
    }
}

/// q · codes for one group (64 values, codes as stored: value p in byte p % 32, low nibble for
/// p < 32).
#[inline(always)]
fn dot_codes(q: &[f32], c: &[u8]) -> f32 {
    let (q, c) = (&q[..GROUP], &c[..GROUP_BYTES]);
    let mut acc = [0f32; GROUP_BYTES];
    for k in 0..GROUP_BYTES {
        acc[k] = q[k] * (c[k] & 15) as f32 + q[k + GROUP_BYTES] * (c[k] >> 4) as f32;
    }
    // Tree reduction, which vectorises (a serial sum would not).
    let mut w = GROUP_BYTES / 2;
    while w > 0 {
        for k in 0..w {
            acc[k] += acc[k + w];
        }
        w /= 2;
    }
    acc[0]
}

/// o += a * codes for one group.
#[inline(always)]
fn axpy_codes(o: &mut [f32], a: f32, c: &[u8]) {
    let (lo, hi) = o[..GROUP].split_at_mut(GROUP_BYTES);
    for (k, &b) in c[..GROUP_BYTES].iter().enumerate() {
        lo[k] += a * (b & 15) as f32;
        hi[k] += a * (b >> 4) as f32;
    }
}

/// Dot product with 16 partial sums, so it vectorises (a plain `sum()` is a serial chain).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut p = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..16 {
            p[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = p.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn head(a: &Args, h: usize, scores: &mut [f32], tile: &mut [f32], out: *mut f32, simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: simd is set only when the CPU has AVX-512 F and FMA; `out` contract as below.
        unsafe { head_avx512(a, h, scores, tile, out) };
        return;
    }
    let _ = simd;
    head_body(a, h, scores, tile, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
unsafe fn head_avx512(a: &Args, h: usize, scores: &mut [f32], tile: &mut [f32], out: *mut f32) {
    head_body(a, h, scores, tile, out)
}

/// One head, all query rows: scores tile by tile, softmax per row, then the weighted sum of values
/// tile by tile. `out` points to the [q_len, nh*hd] output, of which only head h's columns are
/// written.
#[inline(always)]
fn head_body(a: &Args, h: usize, scores: &mut [f32], tile: &mut [f32], out: *mut f32) {
    let (hd, d, kv) = (a.head_dim, a.num_heads * a.head_dim, a.kv_len);
    let off = h * hd;
    // Inclusive causal limit of query i.
    let last_key = |i: usize| kv - a.q_len + i;
    if a.q_len == 1 && hd % GROUP == 0 && hd / GROUP <= MAX_GROUPS_FAST {
        return decode_on_codes(a, h, &mut scores[..kv], out);
    }
    // Scores.
    let mut j0 = 0;
    while j0 < kv {
        let j1 = (j0 + KEY_TILE).min(kv);
        for j in j0..j1 {
            a.k.dequantize_range(j, off, &mut tile[(j - j0) * hd..][..hd]);
        }
        for i in 0..a.q_len {
            let qi = &a.q[i * d + off..][..hd];
            let row = &mut scores[i * kv..][..kv];
            for j in j0..j1 {
                row[j] = if j <= last_key(i) && a.key_valid[j] {
                    let kt = &tile[(j - j0) * hd..][..hd];
                    dot(qi, kt) * a.scale
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
        j0 = j1;
    }
    // Softmax per query row (a row with no valid key gets all-zero weights).
    for i in 0..a.q_len {
        let row = &mut scores[i * kv..][..kv];
        let m = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        if m == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        let mut sum = 0.0;
        for x in row.iter_mut() {
            *x = (*x - m).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
    // Weighted values.
    for i in 0..a.q_len {
        // SAFETY: i*d + off + hd <= q_len*d = out.len(); only this head writes these columns.
        let o = unsafe { std::slice::from_raw_parts_mut(out.add(i * d + off), hd) };
        o.fill(0.0);
    }
    let mut j0 = 0;
    while j0 < kv {
        let j1 = (j0 + KEY_TILE).min(kv);
        // Skip tiles no query row gives weight to (masked or beyond every causal limit).
        let used = (0..a.q_len).any(|i| scores[i * kv + j0..i * kv + j1].iter().any(|&p| p != 0.0));
        if used {
            for j in j0..j1 {
                a.v.dequantize_range(j, off, &mut tile[(j - j0) * hd..][..hd]);
            }
            for i in 0..a.q_len {
                // SAFETY: as above.
                let o = unsafe { std::slice::from_raw_parts_mut(out.add(i * d + off), hd) };
                for j in j0..j1 {
                    let p = scores[i * kv + j];
                    if p != 0.0 {
                        for (ov, vv) in o.iter_mut().zip(&tile[(j - j0) * hd..][..hd]) {
                            *ov += p * vv;
                        }
                    }
                }
            }
        }
        j0 = j1;
    }
}
