//! One quantization group: up to 64 values as 4-bit codes, an fp16 scale and an fp16 minimum.
//!
//! Code layout inside a group's 32 bytes: value `p` (0..64) is in byte `p % 32`, in the low nibble
//! for `p < 32` and the high nibble for `p >= 32`. Widening bytes 0..16 to 32-bit lanes then gives
//! values 0..16 (low nibbles) and 32..48 (high nibbles) with one mask and one shift, and bytes
//! 16..32 give 16..32 and 48..64: no shuffles in the kernels.
//!
//! The stored minimum is rounded *down* to fp16 and the scale *up*, so that every value of the
//! group lies in `[min, min + 15 * scale]` with the stored numbers, which is what makes the error
//! bound `|x - dequant(x)| <= scale / 2` hold after fp16 rounding (up to f32 rounding of `code *
//! scale + min`).

use half::f16;

/// Values per group.
pub const GROUP: usize = 64;
/// Bytes of 4-bit codes per group.
pub const GROUP_BYTES: usize = GROUP / 2;

/// The largest fp16 value not above `x`.
fn f16_down(x: f64) -> f16 {
    let h = f16::from_f64(x);
    if h.to_f64() > x {
        step(h, false)
    } else {
        h
    }
}

/// The smallest fp16 value not below `x`.
fn f16_up(x: f64) -> f16 {
    let h = f16::from_f64(x);
    if h.to_f64() < x {
        step(h, true)
    } else {
        h
    }
}

/// The next fp16 value up (`up`) or down, for finite `h`.
fn step(h: f16, up: bool) -> f16 {
    let b = h.to_bits();
    let is_zero = b & 0x7fff == 0;
    let negative = b & 0x8000 != 0;
    let bits = match (is_zero, negative, up) {
        (true, _, true) => 0x0001,
        (true, _, false) => 0x8001,
        (false, false, true) | (false, true, false) => b + 1,
        (false, false, false) | (false, true, true) => b - 1,
    };
    f16::from_bits(bits)
}

/// Quantizes `vals` (1..=64 values; codes of missing values are 0) into `codes` and returns
/// (scale, min), or the index of the first value that cannot be represented.
pub(crate) fn quantize_group(vals: &[f32], codes: &mut [u8]) -> Result<(f16, f16), usize> {
    debug_assert!(!vals.is_empty() && vals.len() <= GROUP && codes.len() == GROUP_BYTES);
    let mut mn = f32::INFINITY;
    let mut mx = f32::NEG_INFINITY;
    for (i, &v) in vals.iter().enumerate() {
        if !v.is_finite() {
            return Err(i);
        }
        mn = mn.min(v);
        mx = mx.max(v);
    }
    let min = f16_down(mn as f64);
    if !min.is_finite() {
        return Err(vals.iter().position(|&v| v == mn).unwrap_or(0));
    }
    let minf = min.to_f64();
    let mut scale = f16_up((mx as f64 - minf) / 15.0);
    while minf + 15.0 * scale.to_f64() < mx as f64 && scale.is_finite() {
        scale = step(scale, true);
    }
    if !scale.is_finite() {
        return Err(vals.iter().position(|&v| v == mx).unwrap_or(0));
    }
    codes.fill(0);
    let (s, m) = (scale.to_f32(), min.to_f32());
    if s > 0.0 {
        let inv = 1.0 / s;
        for (p, &v) in vals.iter().enumerate() {
            // Rounding (v - m) * inv can land one code off where (v - m) / s sits at x.5; pick the
            // code whose reconstruction is nearest, which is what the error bound is about.
            let mut q = ((v - m) * inv).round().clamp(0.0, 15.0);
            let err = |q: f32| (q * s + m - v).abs();
            if q > 0.0 && err(q - 1.0) < err(q) {
                q -= 1.0;
            } else if q < 15.0 && err(q + 1.0) < err(q) {
                q += 1.0;
            }
            let q = q as u8;
            codes[p % GROUP_BYTES] |= if p < GROUP_BYTES { q } else { q << 4 };
        }
    }
    Ok((scale, min))
}

/// The 4-bit code of value `p` of a group.
#[inline]
pub(crate) fn code(codes: &[u8], p: usize) -> u8 {
    let b = codes[p % GROUP_BYTES];
    if p < GROUP_BYTES {
        b & 15
    } else {
        b >> 4
    }
}

/// Writes the first `out.len()` (<= 64) values of a group, reconstructed.
#[inline]
pub(crate) fn dequantize_group(codes: &[u8], scale: f16, min: f16, out: &mut [f32]) {
    let (s, m) = (scale.to_f32(), min.to_f32());
    let n = out.len();
    let (lo, hi) = out.split_at_mut(n.min(GROUP_BYTES));
    for (o, &b) in lo.iter_mut().zip(codes) {
        *o = (b & 15) as f32 * s + m;
    }
    for (o, &b) in hi.iter_mut().zip(codes) {
        *o = (b >> 4) as f32 * s + m;
    }
}
