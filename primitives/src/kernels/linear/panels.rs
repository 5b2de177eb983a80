//! bf16 weights packed once, at load time, into the operand layout of `vdpbf16ps`.
//!
//! A panel is 16 consecutive rows of W stored pair-major: for each pair of consecutive k, one
//! 64-byte line holds those two weights of all 16 rows (row r's pair in lane r, low half the
//! even k). One 512-bit load is then one operand of `vdpbf16ps`, and a product is a sum of outer
//! products (weights x a broadcast input pair): no horizontal sums, no repacking per call, and
//! each panel is one contiguous stream of memory.
//!
//! Why: with W in nn.Linear layout, batched decode (7-24 tokens) runs on dot-product tiles that
//! end in a horizontal sum per output and read each row several times (once per token group),
//! and the compute-bound path repacks W on every call. Measured on the 2-core Zen 4 (12 / 24
//! layers + LM head, interleaved with the dot-product path): 16 tokens OPT-125m 0.81-0.86x the
//! time, OPT-1.3B 0.76x; 8 and 12 tokens 0.79x / 0.77x; 1-4 tokens 0.93-1.00x.
//!
//! The layout is the same size as nn.Linear's when `n_out` is a multiple of 16 and `n_in` even
//! (every OPT matrix); otherwise the last panel and pair are zero padded.

use super::{
    bf16_row_stride, round_rows_to_bf16, with_buffer, Isa, OutPtr, Problem, INPUT_BF16,
    PACK_MIN_TOKENS,
};
use crate::kernels::HugePageBuf;
use half::bf16;
use rayon::prelude::*;

/// Rows per panel: the 16 f32 lanes of one `vdpbf16ps` accumulator.
pub const PANEL_ROWS: usize = 16;

/// Fewest tokens for which the batched-decode kernel prefetches W into L2, `prefetch::distance`
/// ahead (64 KiB unless `STRATA_PREFETCH_BYTES` says otherwise). On the 2-core Zen 4 (OPT-1.3B,
/// 24 layers + head, five interleaved repetitions each), prefetching took 1, 2 and 4 tokens from
/// 0.93-0.96 / 1.00 / 0.98x the dot-product path to 1.01-1.10 / 1.05 / 1.05x, and 8 and 12 tokens
/// from 0.92 / 1.13x to 0.79 / 0.77x (16 tokens OPT-125m: 1.09-1.19x to 0.81-0.86x): a few token
/// streams leave the core idle enough for the hardware prefetchers to keep up. At 16 tokens 16
/// to 256 KiB ahead measured within noise of each other.
const PREFETCH_MIN_TOKENS: usize = 5;

/// Most tokens one pass over a panel takes (accumulators: 24 of the 32 vector registers).
const MAX_PASS_TOKENS: usize = 24;

/// u32 elements of the panels of an `[n_out, n_in]` matrix.
pub fn panels_len(n_out: usize, n_in: usize) -> usize {
    n_out.div_ceil(PANEL_ROWS) * n_in.div_ceil(2) * PANEL_ROWS
}

/// Packs W `[n_out, n_in]` (nn.Linear layout) into panels, on 2 MiB pages as the decode kernels
/// want their weights.
pub fn pack_panels(w: &[bf16], n_out: usize, n_in: usize) -> HugePageBuf<u32> {
    assert_eq!(
        w.len(),
        n_out * n_in,
        "pack_panels: w must hold n_out * n_in elements"
    );
    let pairs = n_in.div_ceil(2);
    let mut out = HugePageBuf::zeroed(panels_len(n_out, n_in));
    if pairs == 0 {
        return out;
    }
    let isa = Isa::detect();
    out.par_chunks_mut(pairs * PANEL_ROWS)
        .enumerate()
        .for_each(|(p, panel)| {
            let rows = p * PANEL_ROWS..((p + 1) * PANEL_ROWS).min(n_out);
            pack_panel_on(isa, w, n_in, rows, panel);
        });
    out
}

/// [`pack_panels`] into W's own memory where the panels are the same size (`n_out` a multiple
/// of 16, `n_in` even: every OPT matrix) and W is a mapping of its own, else into a new buffer.
/// Why: a model's weights then take their memory once, and no new pages are faulted in (which
/// costs more than the packing in a VM: 0.8 s of 1.0 for OPT-125m's 250 MB on the 2-core box).
pub fn pack_panels_in_place(w: HugePageBuf<bf16>, n_out: usize, n_in: usize) -> HugePageBuf<u32> {
    assert_eq!(
        w.len(),
        n_out * n_in,
        "pack_panels: w must hold n_out * n_in elements"
    );
    if !n_out.is_multiple_of(PANEL_ROWS) || !n_in.is_multiple_of(2) || n_in == 0 {
        return pack_panels(&w, n_out, n_in);
    }
    let mut out = match w.try_cast::<u32>() {
        Ok(cast) => cast,
        Err(w) => return pack_panels(&w, n_out, n_in),
    };
    let isa = Isa::detect();
    // Panel p takes exactly the bytes of rows 16p..16p+16: copy them out, pack them back.
    out.par_chunks_mut(n_in / 2 * PANEL_ROWS).for_each_init(
        Vec::new,
        |rows: &mut Vec<bf16>, panel| {
            rows.clear();
            rows.extend_from_slice(bytemuck::cast_slice(panel));
            pack_panel_on(isa, rows, n_in, 0..PANEL_ROWS, panel);
        },
    );
    out
}

/// One panel of `pack_panels` (rows `rows`, at most 16, of W `[.., n_in]`; `panel` one panel
/// long), transposed in registers on AVX-512.
fn pack_panel_on(
    isa: Isa,
    w: &[bf16],
    n_in: usize,
    rows: std::ops::Range<usize>,
    panel: &mut [u32],
) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512 {
        // SAFETY: AVX-512 F/BW/VL checked; the rest is this function's contract, which
        // `avx512::pack_panel` asserts.
        unsafe { avx512::pack_panel(w, n_in, rows, panel) };
        return;
    }
    let _ = isa;
    pack_panel(w, n_in, rows, panel);
}

/// One panel of `pack_panels` with plain loops (`avx512::pack_panel` transposes in registers).
fn pack_panel(w: &[bf16], n_in: usize, rows: std::ops::Range<usize>, panel: &mut [u32]) {
    for (lane, r) in rows.enumerate() {
        let src = &w[r * n_in..(r + 1) * n_in];
        for (q, pair) in src.chunks(2).enumerate() {
            let lo = pair[0].to_bits() as u32;
            let hi = pair.get(1).map_or(0, |v| v.to_bits() as u32);
            panel[q * PANEL_ROWS + lane] = lo | hi << 16;
        }
    }
}

/// Element (row, k) of panels packed from a matrix with `n_in` inputs.
#[inline]
pub fn panel_element(panels: &[u32], n_in: usize, row: usize, k: usize) -> bf16 {
    let pairs = n_in.div_ceil(2);
    let word = panels[((row / PANEL_ROWS) * pairs + k / 2) * PANEL_ROWS + row % PANEL_ROWS];
    bf16::from_bits((word >> (16 * (k % 2))) as u16)
}

/// `linear` for panels: y[tokens, n_out] = x W^T + bias.
pub(super) fn linear_panels(
    isa: Isa,
    x: &[f32],
    tokens: usize,
    panels: &[u32],
    (n_out, n_in): (usize, usize),
    bias: Option<&[f32]>,
    y: OutPtr,
) {
    let stride = bf16_row_stride(n_in);
    with_buffer(&INPUT_BF16, tokens * stride, |buf| {
        round_rows_to_bf16(isa, x, n_in, buf, stride);
        let p = Problem::new(buf, stride, tokens, n_in, n_out, bias, y);
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx512Bf16 {
            if tokens >= PACK_MIN_TOKENS {
                run_compute_bound(&p, panels);
            } else {
                run_decode(&p, panels);
            }
            return;
        }
        portable(&p, panels);
    });
}

/// Plain loops for CPUs without AVX512-BF16 (the executor packs only where it has it; tests
/// run this to hold the vector kernels to it).
fn portable(p: &Problem<u16>, panels: &[u32]) {
    for t in 0..p.tokens {
        let x = &p.x[t * p.x_stride..t * p.x_stride + p.n_in];
        for r in 0..p.n_out {
            let mut lanes = [0.0f32; 8];
            for (k, xv) in x.iter().enumerate() {
                let w = panel_element(panels, p.n_in, r, k).to_f32();
                lanes[k % 8] += bf16::from_bits(*xv).to_f32() * w;
            }
            let sum: f32 = lanes.iter().sum();
            // SAFETY: r < n_out and t < tokens; this loop is the only writer.
            unsafe { p.store::<1, 1>(&[[sum]], r, t, true) };
        }
    }
}

/// Few tokens (decode): each thread streams one contiguous range of panels once, every token
/// of the pass on each line of W as it arrives.
#[cfg(target_arch = "x86_64")]
fn run_decode(p: &Problem<u16>, panels: &[u32]) {
    let n_panels = p.n_out.div_ceil(PANEL_ROWS);
    let threads = rayon::current_num_threads().max(1);
    let per_task = n_panels.div_ceil(threads);
    let prefetch = if p.tokens >= PREFETCH_MIN_TOKENS {
        super::prefetch::distance(p.tokens)
    } else {
        0
    };
    (0..n_panels.div_ceil(per_task))
        .into_par_iter()
        .for_each(|task| {
            let range = task * per_task..((task + 1) * per_task).min(n_panels);
            // SAFETY: AVX512-BF16 checked by the caller; panels and rows inside the problem,
            // each panel's outputs written by this task only.
            unsafe { avx512::decode(p, panels, range, prefetch) };
        });
}

/// Many tokens (prefill): tasks of `PACK_ROWS` rows, one `PACK_K` slice of k at a time, as the
/// repacking path (`run_packed_bf16`) but reading the panels in place.
#[cfg(target_arch = "x86_64")]
fn run_compute_bound(p: &Problem<u16>, panels: &[u32]) {
    use super::{PACK_K, PACK_ROWS};
    let tasks = p.n_out.div_ceil(PACK_ROWS);
    (0..tasks).into_par_iter().for_each(|task| {
        let rows = task * PACK_ROWS..((task + 1) * PACK_ROWS).min(p.n_out);
        let mut k0 = 0;
        while k0 < p.n_in {
            let k1 = (k0 + PACK_K).min(p.n_in);
            // SAFETY: AVX512-BF16 checked by the caller; rows start at a multiple of 32 (a
            // multiple of PACK_ROWS), k0 a multiple of PACK_K (even), both inside the problem.
            unsafe { super::avx512::outer_panels(p, panels, rows.clone(), k0, k1) };
            k0 = k1;
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Problem, MAX_PASS_TOKENS, PANEL_ROWS};
    use half::bf16;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// One panel of `pack_panels`: 32 k of the (up to) 16 rows at a time, as a 16 x 16 matrix of
    /// u32 pairs transposed in registers, so that each output line is one store.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL available; `rows` (at most 16) inside W `[.., n_in]`; `panel` holds
    /// `n_in.div_ceil(2) * 16` u32.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn pack_panel(
        w: &[bf16],
        n_in: usize,
        rows: Range<usize>,
        panel: &mut [u32],
    ) {
        let pairs = n_in.div_ceil(2);
        assert!(rows.len() <= PANEL_ROWS && panel.len() == pairs * PANEL_ROWS);
        assert!(rows.end * n_in <= w.len(), "pack_panel: rows outside W");
        let mut k = 0;
        while k < n_in {
            let n = (n_in - k).min(32);
            let mask = if n == 32 { u32::MAX } else { (1u32 << n) - 1 };
            let mut m = [_mm512_setzero_si512(); 16];
            for (v, r) in m.iter_mut().zip(rows.clone()) {
                // SAFETY: row r is inside W and k..k+n inside the row; masked lanes unread.
                *v = unsafe {
                    _mm512_maskz_loadu_epi16(mask, w.as_ptr().add(r * n_in + k) as *const i16)
                };
            }
            super::super::avx512::transpose16(&mut m);
            // m[j] holds pair k/2 + j of the 16 rows; pairs past the end of k are not stored.
            for (j, v) in m.iter().enumerate().take(n.div_ceil(2)) {
                let at = (k / 2 + j) * PANEL_ROWS;
                // SAFETY: at + 16 <= pairs * 16 = panel.len().
                unsafe { _mm512_storeu_si512(panel.as_mut_ptr().add(at) as *mut __m512i, *v) };
            }
            k += 32;
        }
    }

    /// Every panel of `range` for every token, in passes of up to `MAX_PASS_TOKENS` tokens,
    /// prefetching `prefetch` bytes ahead (0: none).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and BF16 available; `range` inside the problem's panels; input rows zero
    /// padded to a multiple of 32 elements.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn decode(
        p: &Problem<u16>,
        panels: &[u32],
        range: Range<usize>,
        prefetch: usize,
    ) {
        // Fewer tokens than the latency of `vdpbf16ps` needs chains: k split over C accumulators.
        macro_rules! pass {
            ($nt:expr, $panel:expr, $t0:expr; $($t:literal => $c:literal),*) => {
                match $nt {
                    // SAFETY: the caller's contract; $t0 + $t <= tokens.
                    $($t => unsafe { tile::<$t, $c>(p, panels, $panel, $t0, prefetch) },)*
                    _ => unreachable!("passes hold 1 to {MAX_PASS_TOKENS} tokens"),
                }
            };
        }
        for panel in range {
            let mut t0 = 0;
            while t0 < p.tokens {
                let left = p.tokens - t0;
                let nt = left.div_ceil(left.div_ceil(MAX_PASS_TOKENS));
                pass!(nt, panel, t0; 1 => 4, 2 => 4, 3 => 2, 4 => 2, 5 => 2, 6 => 1, 7 => 1,
                    8 => 1, 9 => 1, 10 => 1, 11 => 1, 12 => 1, 13 => 1, 14 => 1, 15 => 1,
                    16 => 1, 17 => 1, 18 => 1, 19 => 1, 20 => 1, 21 => 1, 22 => 1, 23 => 1,
                    24 => 1);
                t0 += nt;
            }
        }
    }

    /// One panel for tokens t0..t0+T over the whole of k, C accumulator chains per token.
    ///
    /// # Safety
    /// As `decode`, and t0 + T <= tokens.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn tile<const T: usize, const C: usize>(
        p: &Problem<u16>,
        panels: &[u32],
        panel: usize,
        t0: usize,
        prefetch: usize,
    ) {
        let pairs = p.n_in.div_ceil(2);
        let mut acc = [[_mm512_setzero_ps(); T]; C];
        // The input rows start at multiples of 32 elements, so pairs are 4-byte aligned.
        let xp: [*const u32; T] =
            std::array::from_fn(|t| p.x[(t0 + t) * p.x_stride..].as_ptr() as *const u32);
        let wp = panels[panel * pairs * PANEL_ROWS..].as_ptr();
        // Never past the last line: the hint would fetch someone else's memory.
        let last = panels.as_ptr_range().end.wrapping_sub(PANEL_ROWS) as *const u8;
        // SAFETY (all blocks below): q < pairs, so the 16 u32 at wp + 16q are inside this panel
        // and pair q of each input row inside its zero-padded row; the transmutes reinterpret
        // 64 plain bytes; prefetching is a hint and never faults.
        let step = |acc: &mut [__m512; T], q: usize| unsafe {
            if prefetch > 0 {
                let ahead = (wp.add(q * PANEL_ROWS) as *const u8).wrapping_add(prefetch);
                _mm_prefetch::<_MM_HINT_T1>(ahead.min(last) as *const i8);
            }
            let w: __m512bh = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                wp.add(q * PANEL_ROWS) as *const __m512i,
            ));
            for (t, a) in acc.iter_mut().enumerate() {
                let xb: __m512bh = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    *xp[t].add(q) as i32,
                ));
                *a = _mm512_dpbf16_ps(*a, w, xb);
            }
        };
        let mut q = 0;
        while q + C <= pairs {
            for (c, chain) in acc.iter_mut().enumerate() {
                step(chain, q + c);
            }
            q += C;
        }
        while q < pairs {
            step(&mut acc[0], q);
            q += 1;
        }
        let r0 = panel * PANEL_ROWS;
        let n = (p.n_out - r0).min(PANEL_ROWS);
        let mask = (((1u32 << n) - 1) & 0xffff) as __mmask16;
        for t in 0..T {
            let mut sum = acc[0][t];
            for chain in &acc[1..] {
                sum = _mm512_add_ps(sum, chain[t]);
            }
            // SAFETY: lanes r0..r0+n of row t0+t are inside y and the bias, only those are
            // touched (masked), and this task owns this panel's outputs.
            unsafe {
                let bias = match p.bias {
                    Some(b) => _mm512_maskz_loadu_ps(mask, b.as_ptr().add(r0)),
                    None => _mm512_setzero_ps(),
                };
                let dst = p.y.0.add((t0 + t) * p.n_out + r0);
                _mm512_mask_storeu_ps(dst, mask, _mm512_add_ps(sum, bias));
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn vector_packing_equals_the_plain_loops() {
        if Isa::detect() < Isa::Avx512 {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        for (rows, n_in) in [(16usize, 64usize), (16, 33), (5, 1), (16, 100), (1, 31)] {
            let w: Vec<bf16> = (0..rows * n_in)
                .map(|i| bf16::from_bits((i as u16).wrapping_mul(40503) | 1))
                .collect();
            let len = n_in.div_ceil(2) * PANEL_ROWS;
            let (mut plain, mut vector) = (vec![7u32; len], vec![7u32; len]);
            // Lanes past `rows` stay as the caller zeroed them (here 7) in both.
            pack_panel(&w, n_in, 0..rows, &mut plain);
            // SAFETY: AVX-512 checked above; rows inside w, panel one panel long.
            unsafe { avx512::pack_panel(&w, n_in, 0..rows, &mut vector) };
            let mask_unset = |v: &[u32]| -> Vec<u32> {
                v.iter()
                    .enumerate()
                    .map(|(i, x)| if i % PANEL_ROWS < rows { *x } else { 0 })
                    .collect()
            };
            assert_eq!(mask_unset(&plain), mask_unset(&vector), "{rows} x {n_in}");
        }
    }
}
