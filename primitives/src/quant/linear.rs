//! `linear_q4`: y = x W^T + b with W compressed (groups of 64 along the output dimension).
//!
//! For a block of 64 output rows the scale `s[c]` and minimum `m[c]` depend only on the column c,
//! so for token t and row r of the block:
//!
//! ```text
//! y[t, r] = sum_c x[t, c] * (q[r, c] * s[c] + m[c])
//!         = sum_c (x[t, c] * s[c]) * q[r, c]  +  sum_c x[t, c] * m[c]
//! ```
//!
//! The first product runs on the 4-bit codes themselves, converted to f32 in registers (a tile of
//! 64 rows x 1 column per step, never a whole tensor); the scaled input `x * s` is computed once
//! per row block and token, and the minimum term is one dot product per row block and token.
//! Row blocks are the rayon tasks (each streams its own contiguous `32 * in` bytes of codes);
//! tokens are taken 6 at a time so that 24 accumulators (6 tokens x 64 rows) stay in registers
//! while one column's codes are unpacked once for all 6.
//!
//! Three microkernels compute the same sums: portable Rust; AVX-512 FMA (codes widened to f32);
//! and, where the CPU has AVX512-BF16, `vdpbf16ps`, which multiplies two columns per 32-bit lane:
//! the codes 0..15 are exact in bf16 (looked up with `vpermw`) and `x * s` is the other operand.
//! So that all three give the same result (up to f32 summation order), `x * s` is rounded to bf16
//! on every path: a relative error of at most 2^-9 on each `x * s * code` term, far below the
//! 4-bit quantization error itself (half a step of 1/15 of the group's range). The minimum term
//! stays in f32. The bf16 kernel is what makes the product as fast as the bf16 `linear` at 16
//! tokens (see docs/storage-and-compression.md).

use super::group::{dequantize_group, GROUP, GROUP_BYTES};
use super::QuantizedMatrix;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use std::cell::RefCell;

/// Tokens per microkernel pass (6 x 4 accumulators + 4 code vectors + 1 broadcast <= 32 zmm).
const TOK_CHUNK: usize = 6;

/// Per-thread scratch: the block's scales and minimums as f32, and the scaled input.
#[derive(Default)]
struct Scratch {
    sf: Vec<f32>,
    mf: Vec<f32>,
    xs: Vec<f32>,
    /// bf16 pairs (x*s for columns 2k, 2k+1) for the `vdpbf16ps` kernel.
    xsp: Vec<u32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Output pointer shared by the row-block tasks, which write disjoint columns of y.
struct SendPtr(*mut f32);
// SAFETY: every task writes only y[t, rows of its own block]; the blocks are disjoint.
unsafe impl Send for SendPtr {}
// SAFETY: as above; the pointer is only used for disjoint writes.
unsafe impl Sync for SendPtr {}

/// y[t, :] = x[t, :] W^T + bias for t in 0..tokens, with W compressed. x: [tokens, in],
/// y: [tokens, out]. Same contract as [`crate::kernels::linear`]; multithreaded over blocks of 64
/// output rows; AVX-512 when the CPU has it, portable Rust otherwise. Allocates nothing per call
/// once each thread's scratch has grown to the layer's width.
pub fn linear_q4(
    x: &[f32],
    tokens: usize,
    w: &QuantizedMatrix,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    linear_q4_on(Isa::detect(), x, tokens, w, bias, y)
}

/// Instruction set of the microkernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// Plain Rust.
    Portable,
    /// AVX-512 F with FMA.
    Avx512,
    /// As `Avx512`, plus AVX512-BW and `vdpbf16ps`: two columns' codes per 32-bit lane.
    Avx512Bf16,
}

impl Isa {
    /// The best this CPU runs.
    pub(crate) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            if is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512bf16") {
                return Isa::Avx512Bf16;
            }
            return Isa::Avx512;
        }
        Isa::Portable
    }
}

pub(crate) fn linear_q4_on(
    isa: Isa,
    x: &[f32],
    tokens: usize,
    w: &QuantizedMatrix,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let (out, inp) = (w.out_features(), w.in_features());
    assert_eq!(
        x.len(),
        tokens * inp,
        "linear_q4: x must be [tokens, in_features]"
    );
    assert_eq!(
        y.len(),
        tokens * out,
        "linear_q4: y must be [tokens, out_features]"
    );
    if let Some(b) = bias {
        assert_eq!(
            b.len(),
            out,
            "linear_q4: bias must have out_features elements"
        );
    }
    if tokens == 0 || out == 0 {
        return;
    }
    let yp = SendPtr(y.as_mut_ptr());
    let yp = &yp;
    (0..w.full_blocks()).into_par_iter().for_each(|b| {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let Scratch { sf, mf, xs, xsp } = &mut *s;
            let (codes, scales, mins) = w.block(b);
            // Slice conversion uses F16C when present (per-element to_f32 would dominate at
            // batch 1: two conversions per column per row block).
            sf.resize(inp, 0.0);
            scales.convert_to_f32_slice(sf);
            mf.resize(inp, 0.0);
            mins.convert_to_f32_slice(mf);
            xs.resize(TOK_CHUNK * inp, 0.0);
            let pairs = inp.div_ceil(2);
            if isa == Isa::Avx512Bf16 {
                xsp.resize(TOK_CHUNK * pairs, 0);
            }
            let mut t0 = 0;
            while t0 < tokens {
                let tc = TOK_CHUNK.min(tokens - t0);
                let mut mterm = [0f32; TOK_CHUNK];
                for t in 0..tc {
                    let xr = &x[(t0 + t) * inp..][..inp];
                    let xs_t = &mut xs[t * inp..][..inp];
                    let xsp_t = if isa == Isa::Avx512Bf16 {
                        &mut xsp[t * pairs..][..pairs]
                    } else {
                        &mut [][..]
                    };
                    mterm[t] = prologue(isa, xr, sf, mf, xs_t, xsp_t);
                }
                let mut acc = [[0f32; GROUP]; TOK_CHUNK];
                if isa == Isa::Avx512Bf16 {
                    kernel_bf16(tc, codes, xsp, inp, &mut acc);
                } else {
                    kernel(isa, tc, codes, xs, inp, &mut acc);
                }
                for t in 0..tc {
                    let row0 = (t0 + t) * out + b * GROUP;
                    for r in 0..GROUP {
                        let bv = bias.map_or(0.0, |bb| bb[b * GROUP + r]);
                        // SAFETY: row0 + r < tokens * out (checked lengths); only this block's
                        // task writes rows b*64..b*64+64 of y.
                        unsafe { *yp.0.add(row0 + r) = acc[t][r] + mterm[t] + bv };
                    }
                }
                t0 += tc;
            }
        })
    });
    tail(x, tokens, w, bias, y);
}

/// Per row block and token: the scaled input `x * s` rounded to bf16 (as f32 in `xs`, or as
/// bf16 pairs in `xsp` for the `vdpbf16ps` kernel, which then leaves `xs` alone), and returns the
/// minimum term `x · m`. Runs once per 64 output rows per token, so it must vectorise: at batch 1
/// a scalar version of it took longer than the product itself.
fn prologue(isa: Isa, xr: &[f32], sf: &[f32], mf: &[f32], xs: &mut [f32], xsp: &mut [u32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        // SAFETY: isa is not Portable only when the CPU has AVX-512 F and FMA.
        return unsafe { prologue_avx512(isa, xr, sf, mf, xs, xsp) };
    }
    prologue_body(isa, xr, sf, mf, xs, xsp)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
unsafe fn prologue_avx512(
    isa: Isa,
    xr: &[f32],
    sf: &[f32],
    mf: &[f32],
    xs: &mut [f32],
    xsp: &mut [u32],
) -> f32 {
    prologue_body(isa, xr, sf, mf, xs, xsp)
}

#[inline(always)]
fn prologue_body(
    isa: Isa,
    xr: &[f32],
    sf: &[f32],
    mf: &[f32],
    xs: &mut [f32],
    xsp: &mut [u32],
) -> f32 {
    let n = xr.len();
    let (sf, mf) = (&sf[..n], &mf[..n]);
    if isa == Isa::Avx512Bf16 {
        let half = n / 2;
        let (xp, sp) = (&xr[..2 * half], &sf[..2 * half]);
        for (k, d) in xsp[..half].iter_mut().enumerate() {
            let lo = round_bf16(xp[2 * k] * sp[2 * k]) >> 16;
            let hi = round_bf16(xp[2 * k + 1] * sp[2 * k + 1]);
            *d = lo | hi;
        }
        if n % 2 == 1 {
            xsp[half] = round_bf16(xr[n - 1] * sf[n - 1]) >> 16;
        }
    } else {
        for ((d, &xv), &sv) in xs[..n].iter_mut().zip(xr).zip(sf) {
            *d = f32::from_bits(round_bf16(xv * sv));
        }
    }
    dot(xr, mf)
}

/// f32 bits rounded to the nearest bf16 (ties to even), low 16 bits cleared. Branch-free so the
/// per-block loop vectorises (inputs are finite: they are activations times fp16 scales).
#[inline(always)]
fn round_bf16(v: f32) -> u32 {
    let b = v.to_bits();
    b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums so the compiler vectorises the reduction.
    let mut p = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            p[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = p.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// The last `out % 64` rows: groups run column-major over the tail, so each value is
/// dequantized once (a 64-value tile) and added into its row for every token. Serial: at most
/// 63 rows.
fn tail(x: &[f32], tokens: usize, w: &QuantizedMatrix, bias: Option<&[f32]>, y: &mut [f32]) {
    let (out, inp) = (w.out_features(), w.in_features());
    let r = out % GROUP;
    if r == 0 {
        return;
    }
    let row0 = w.full_blocks() * GROUP;
    for t in 0..tokens {
        for j in 0..r {
            y[t * out + row0 + j] = bias.map_or(0.0, |b| b[row0 + j]);
        }
    }
    let (codes, scales, mins) = w.tail();
    let n = r * inp;
    let mut vals = [0f32; GROUP];
    for g in 0..scales.len() {
        let cnt = (n - g * GROUP).min(GROUP);
        dequantize_group(
            &codes[g * GROUP_BYTES..][..GROUP_BYTES],
            scales[g],
            mins[g],
            &mut vals[..cnt],
        );
        for (p, &wv) in vals[..cnt].iter().enumerate() {
            let f = g * GROUP + p;
            let (c, j) = (f / r, f % r);
            for t in 0..tokens {
                y[t * out + row0 + j] += x[t * inp + c] * wv;
            }
        }
    }
}

/// acc[t][r] = sum_c xs[t * inp + c] * q[r, c] for t < tc, over one row block's codes.
fn kernel(
    isa: Isa,
    tc: usize,
    codes: &[u8],
    xs: &[f32],
    inp: usize,
    acc: &mut [[f32; GROUP]; TOK_CHUNK],
) {
    debug_assert!(codes.len() == inp * GROUP_BYTES && xs.len() >= tc * inp);
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        // SAFETY: Isa::Avx512 is only chosen when the CPU has AVX-512 F and FMA; lengths checked
        // by the debug assertion above and guaranteed by the caller.
        unsafe {
            match tc {
                1 => avx512::kernel::<1>(codes, xs, inp, acc),
                2 => avx512::kernel::<2>(codes, xs, inp, acc),
                3 => avx512::kernel::<3>(codes, xs, inp, acc),
                4 => avx512::kernel::<4>(codes, xs, inp, acc),
                5 => avx512::kernel::<5>(codes, xs, inp, acc),
                _ => avx512::kernel::<6>(codes, xs, inp, acc),
            }
        }
        return;
    }
    let _ = isa;
    let mut q = [0f32; GROUP];
    for c in 0..inp {
        let cb = &codes[c * GROUP_BYTES..][..GROUP_BYTES];
        for k in 0..GROUP_BYTES {
            q[k] = (cb[k] & 15) as f32;
            q[k + GROUP_BYTES] = (cb[k] >> 4) as f32;
        }
        for (t, a) in acc.iter_mut().enumerate().take(tc) {
            let s = xs[t * inp + c];
            for (av, qv) in a.iter_mut().zip(&q) {
                *av += s * qv;
            }
        }
    }
}

/// The `vdpbf16ps` microkernel: acc[t][r] = sum over column pairs of xsp[t] · codes.
fn kernel_bf16(
    tc: usize,
    codes: &[u8],
    xsp: &[u32],
    inp: usize,
    acc: &mut [[f32; GROUP]; TOK_CHUNK],
) {
    debug_assert!(codes.len() == inp * GROUP_BYTES && xsp.len() >= tc * inp.div_ceil(2));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: only called with Isa::Avx512Bf16, chosen when the CPU has AVX-512 F/BW/BF16.
    unsafe {
        match tc {
            1 => avx512::kernel_bf16::<1>(codes, xsp, inp, acc),
            2 => avx512::kernel_bf16::<2>(codes, xsp, inp, acc),
            3 => avx512::kernel_bf16::<3>(codes, xsp, inp, acc),
            4 => avx512::kernel_bf16::<4>(codes, xsp, inp, acc),
            5 => avx512::kernel_bf16::<5>(codes, xsp, inp, acc),
            _ => avx512::kernel_bf16::<6>(codes, xsp, inp, acc),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("Isa::Avx512Bf16 is only detected on x86_64");
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{GROUP, GROUP_BYTES, TOK_CHUNK};
    use std::arch::x86_64::*;

    /// The microkernel for T tokens: per column, 32 bytes of codes become four vectors of 16 f32
    /// (rows 0-15, 16-31, 32-47, 48-63) and are multiplied into 4*T accumulators.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F and FMA; `codes` must hold `inp * 32` bytes and `xs` at least
    /// `T * inp` floats.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn kernel<const T: usize>(
        codes: &[u8],
        xs: &[f32],
        inp: usize,
        acc: &mut [[f32; GROUP]; TOK_CHUNK],
    ) {
        let mut a = [[_mm512_setzero_ps(); 4]; T];
        let mask = _mm512_set1_epi32(15);
        let cp = codes.as_ptr();
        let xp = xs.as_ptr();
        for c in 0..inp {
            // SAFETY: c * 32 + 32 <= codes.len(); unaligned 16-byte loads.
            let (lo, hi) = unsafe {
                let p = cp.add(c * GROUP_BYTES);
                (
                    _mm_loadu_si128(p as *const __m128i),
                    _mm_loadu_si128(p.add(16) as *const __m128i),
                )
            };
            let i0 = _mm512_cvtepu8_epi32(lo);
            let i1 = _mm512_cvtepu8_epi32(hi);
            let q = [
                _mm512_cvtepi32_ps(_mm512_and_si512(i0, mask)),
                _mm512_cvtepi32_ps(_mm512_and_si512(i1, mask)),
                _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(i0)),
                _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(i1)),
            ];
            for (t, at) in a.iter_mut().enumerate() {
                // SAFETY: t * inp + c < T * inp <= xs.len().
                let s = _mm512_set1_ps(unsafe { *xp.add(t * inp + c) });
                for (ak, qk) in at.iter_mut().zip(&q) {
                    *ak = _mm512_fmadd_ps(s, *qk, *ak);
                }
            }
        }
        for (t, at) in a.iter().enumerate() {
            for (k, ak) in at.iter().enumerate() {
                // SAFETY: acc[t] has 64 floats; k * 16 + 16 <= 64.
                unsafe { _mm512_storeu_ps(acc[t].as_mut_ptr().add(k * 16), *ak) };
            }
        }
    }

    /// bf16 value of i & 15, for i in 0..32: `vpermw` looks up 16-bit codes with their low 5 bits,
    /// so a byte holding two codes can index it directly for its low code.
    const fn lut() -> [u16; 32] {
        let mut t = [0u16; 32];
        let mut i = 0;
        while i < 32 {
            // Small integers are exact in bf16: the upper half of the f32 bits.
            t[i] = ((i & 15) as f32).to_bits().wrapping_shr(16) as u16;
            i += 1;
        }
        t
    }
    static LUT: [u16; 32] = lut();

    /// The microkernel for T tokens with `vdpbf16ps`: per pair of columns (c, c+1), the two
    /// columns' 32-byte code runs are interleaved bytewise, widened to 16 bits, and mapped to
    /// bf16 through a 32-entry table, giving four vectors of 16 rows x (column c, column c+1)
    /// pairs (12 instructions for 64 rows x 2 columns); each token's (x*s)[c], (x*s)[c+1] bf16
    /// pair is broadcast and multiplied in.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/BF16; `codes` must hold `inp * 32` bytes and `xsp` at
    /// least `T * ceil(inp / 2)` pairs.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2")]
    pub(super) unsafe fn kernel_bf16<const T: usize>(
        codes: &[u8],
        xsp: &[u32],
        inp: usize,
        acc: &mut [[f32; GROUP]; TOK_CHUNK],
    ) {
        let pairs = inp.div_ceil(2);
        let mut a = [[_mm512_setzero_ps(); 4]; T];
        // SAFETY: LUT has 32 u16 = 64 bytes.
        let lut = unsafe { _mm512_loadu_si512(LUT.as_ptr() as *const __m512i) };
        let cp = codes.as_ptr();
        let xp = xsp.as_ptr();
        for k in 0..pairs {
            let c0 = 2 * k;
            // An odd last column pairs with itself; its partner's input is 0.
            let c1 = if c0 + 1 < inp { c0 + 1 } else { c0 };
            // SAFETY: c0, c1 < inp, so both 32-byte runs are inside `codes`.
            let (ca, cb) = unsafe {
                (
                    _mm256_loadu_si256(cp.add(c0 * GROUP_BYTES) as *const __m256i),
                    _mm256_loadu_si256(cp.add(c1 * GROUP_BYTES) as *const __m256i),
                )
            };
            // Interleave the two columns bytewise. AVX2 unpacks work per 128-bit half, so `lo`
            // holds code bytes 0..8 and 16..24 (rows 0..8 and 16..24 in the low nibbles, 32..40
            // and 48..56 in the high ones) and `hi` bytes 8..16 and 24..32; the accumulators are
            // put back in row order once, at the end.
            let lo = _mm512_cvtepu8_epi16(_mm256_unpacklo_epi8(ca, cb));
            let hi = _mm512_cvtepu8_epi16(_mm256_unpackhi_epi8(ca, cb));
            // SAFETY: __m512i and __m512bh are both 64 plain bytes (bit casts).
            let w: [__m512bh; 4] = unsafe {
                [
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_permutexvar_epi16(lo, lut)),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_permutexvar_epi16(hi, lut)),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_permutexvar_epi16(
                        _mm512_srli_epi16::<4>(lo),
                        lut,
                    )),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_permutexvar_epi16(
                        _mm512_srli_epi16::<4>(hi),
                        lut,
                    )),
                ]
            };
            for (t, at) in a.iter_mut().enumerate() {
                // SAFETY: t * pairs + k < T * pairs <= xsp.len(); bit cast as above.
                let s: __m512bh = unsafe {
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                        *xp.add(t * pairs + k) as i32,
                    ))
                };
                for (aq, wq) in at.iter_mut().zip(&w) {
                    *aq = _mm512_dpbf16_ps(*aq, *wq, s);
                }
            }
        }
        for (t, at) in a.iter().enumerate() {
            // at[0] holds rows 0..8 and 16..24, at[1] 8..16 and 24..32, at[2] 32..40 and 48..56,
            // at[3] 40..48 and 56..64: regroup 128-bit quarters into row order.
            let rows = [
                _mm512_shuffle_f32x4::<0x44>(at[0], at[1]),
                _mm512_shuffle_f32x4::<0xEE>(at[0], at[1]),
                _mm512_shuffle_f32x4::<0x44>(at[2], at[3]),
                _mm512_shuffle_f32x4::<0xEE>(at[2], at[3]),
            ];
            for (q, rq) in rows.iter().enumerate() {
                // SAFETY: acc[t] has 64 floats; q * 16 + 16 <= 64.
                unsafe { _mm512_storeu_ps(acc[t].as_mut_ptr().add(q * 16), *rq) };
            }
        }
    }
}
