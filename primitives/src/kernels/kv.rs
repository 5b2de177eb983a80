//! KV-cache rows in the model's element type.
//!
//! The cache is the largest buffer of a batched run after the weights, and at long contexts the
//! bytes decode attention streams. Holding it in the model's dtype (2 bytes for f16 and bf16
//! checkpoints, as transformers does) halves both against f32 and makes the executor hold the
//! bytes the planner's memory plan counts (`planner::memory::kv_bytes_per_position`). The
//! attention kernel widens the rows to f32 in registers, as the linear kernel does with weights.
//!
//! New keys and values are rounded to the dtype once, before they are stored anywhere
//! ([`KvDtype::round_in_place`]), so a row held in host memory, in a disk slot or in a device
//! buffer (which stays f32) holds the same numbers, and every placement gives the same tokens.

use super::HugePageBuf;
use half::{bf16, f16};
use std::ops::Range;

/// Element type of KV-cache rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// 32-bit floats (f32 checkpoints).
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl KvDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 | KvDtype::Bf16 => 2,
        }
    }

    /// Rounds `x` in place to the nearest value of this type (round to nearest even), so that
    /// the rows a layer attends with are the rows the cache will hold.
    pub fn round_in_place(self, x: &mut [f32]) {
        match self {
            KvDtype::F32 => {}
            KvDtype::F16 => super::elementwise(x, |c| {
                c.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32())
            }),
            KvDtype::Bf16 => super::elementwise(x, |c| c.iter_mut().for_each(round_bf16)),
        }
    }
}

/// Rounds `v` to the nearest bf16 value, ties to even, NaN kept (quieted), exactly as
/// `half::bf16::from_f32(v).to_f32()`, but on the bits with a select, so that a loop of it
/// vectorises (the `half` call is a branchy scalar routine).
#[inline(always)]
fn round_bf16(v: &mut f32) {
    let bits = v.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) & 0xFFFF_0000;
    let nan = (bits & 0x7FFF_FFFF) > 0x7F80_0000;
    *v = f32::from_bits(if nan {
        (bits | 0x0040_0000) & 0xFFFF_0000
    } else {
        rounded
    });
}

/// KV rows read in place, in their stored type.
#[derive(Debug, Clone, Copy)]
pub enum KvRows<'a> {
    /// f32 rows.
    F32(&'a [f32]),
    /// f16 rows.
    F16(&'a [f16]),
    /// bf16 rows.
    Bf16(&'a [bf16]),
}

impl<'a> KvRows<'a> {
    /// Rows of `dtype` over `bytes` (a staging buffer or file slot the cache was read into).
    ///
    /// # Panics
    /// If `bytes` is not aligned to or a multiple of the element size: the executor's buffers
    /// are 4 KiB aligned, so this is a programming error, not bad input.
    pub fn from_bytes(dtype: KvDtype, bytes: &'a [u8]) -> KvRows<'a> {
        match dtype {
            KvDtype::F32 => KvRows::F32(bytemuck::cast_slice(bytes)),
            KvDtype::F16 => KvRows::F16(bytemuck::cast_slice(bytes)),
            KvDtype::Bf16 => KvRows::Bf16(bytemuck::cast_slice(bytes)),
        }
    }

    /// Element type.
    pub fn dtype(&self) -> KvDtype {
        match self {
            KvRows::F32(_) => KvDtype::F32,
            KvRows::F16(_) => KvDtype::F16,
            KvRows::Bf16(_) => KvDtype::Bf16,
        }
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        match self {
            KvRows::F32(v) => v.len(),
            KvRows::F16(v) => v.len(),
            KvRows::Bf16(v) => v.len(),
        }
    }

    /// Whether no element is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `range` (in elements, not bytes).
    pub fn slice(self, range: Range<usize>) -> KvRows<'a> {
        match self {
            KvRows::F32(v) => KvRows::F32(&v[range]),
            KvRows::F16(v) => KvRows::F16(&v[range]),
            KvRows::Bf16(v) => KvRows::Bf16(&v[range]),
        }
    }

    /// The stored bytes, as a file write takes them.
    pub fn as_bytes(self) -> &'a [u8] {
        match self {
            KvRows::F32(v) => bytemuck::cast_slice(v),
            KvRows::F16(v) => bytemuck::cast_slice(v),
            KvRows::Bf16(v) => bytemuck::cast_slice(v),
        }
    }

    /// Widens the rows into `out` (the first `len()` floats), for a consumer that takes f32.
    pub fn widen_into(self, out: &mut [f32]) {
        match self {
            KvRows::F32(v) => out[..v.len()].copy_from_slice(v),
            KvRows::F16(v) => out.iter_mut().zip(v).for_each(|(o, x)| *o = x.to_f32()),
            KvRows::Bf16(v) => out.iter_mut().zip(v).for_each(|(o, x)| *o = x.to_f32()),
        }
    }
}

impl<'a> From<&'a [f32]> for KvRows<'a> {
    fn from(v: &'a [f32]) -> Self {
        KvRows::F32(v)
    }
}

/// KV rows written in place, in their stored type.
#[derive(Debug)]
pub enum KvRowsMut<'a> {
    /// f32 rows.
    F32(&'a mut [f32]),
    /// f16 rows.
    F16(&'a mut [f16]),
    /// bf16 rows.
    Bf16(&'a mut [bf16]),
}

impl<'a> KvRowsMut<'a> {
    /// Writable rows of `dtype` over `bytes`; panics as [`KvRows::from_bytes`].
    pub fn from_bytes(dtype: KvDtype, bytes: &'a mut [u8]) -> KvRowsMut<'a> {
        match dtype {
            KvDtype::F32 => KvRowsMut::F32(bytemuck::cast_slice_mut(bytes)),
            KvDtype::F16 => KvRowsMut::F16(bytemuck::cast_slice_mut(bytes)),
            KvDtype::Bf16 => KvRowsMut::Bf16(bytemuck::cast_slice_mut(bytes)),
        }
    }

    /// No rows (a sequence whose cache is not in host memory).
    pub fn empty() -> KvRowsMut<'a> {
        KvRowsMut::F32(&mut [])
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        self.rows().len()
    }

    /// Whether no element is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stores `src` from element `at` on, narrowing to the stored type (exact for values that
    /// went through [`KvDtype::round_in_place`]).
    pub fn write(&mut self, at: usize, src: &[f32]) {
        /// Narrows `src` into `dst` with `f`, on every thread for a prefill's rows (a
        /// sequence's 128 rows of OPT-125m are 98 k values; one thread wrote them while the
        /// other waited), on the calling thread for a decode step's one row.
        fn narrow<T: Send>(dst: &mut [T], src: &[f32], f: impl Fn(f32) -> T + Sync) {
            super::zip_chunks(dst, src, 1 << 16, |d, s| {
                d.iter_mut().zip(s).for_each(|(d, s)| *d = f(*s))
            });
        }
        let n = src.len();
        match self {
            KvRowsMut::F32(v) => v[at..at + n].copy_from_slice(src),
            KvRowsMut::F16(v) => narrow(&mut v[at..at + n], src, f16::from_f32),
            KvRowsMut::Bf16(v) => narrow(&mut v[at..at + n], src, bf16::from_f32),
        }
    }

    /// The rows, read only.
    pub fn rows(&self) -> KvRows<'_> {
        match self {
            KvRowsMut::F32(v) => KvRows::F32(v),
            KvRowsMut::F16(v) => KvRows::F16(v),
            KvRowsMut::Bf16(v) => KvRows::Bf16(v),
        }
    }

    /// The stored bytes, writable (a read from a file fills them).
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            KvRowsMut::F32(v) => bytemuck::cast_slice_mut(v),
            KvRowsMut::F16(v) => bytemuck::cast_slice_mut(v),
            KvRowsMut::Bf16(v) => bytemuck::cast_slice_mut(v),
        }
    }
}

/// An owned buffer of KV rows (one layer's cache, or a staging area), zeroed at allocation.
#[derive(Debug, Clone)]
pub enum KvBuf {
    /// f32 rows.
    F32(HugePageBuf<f32>),
    /// f16 rows.
    F16(HugePageBuf<f16>),
    /// bf16 rows.
    Bf16(HugePageBuf<bf16>),
}

impl KvBuf {
    /// `len` zero elements of `dtype`, on huge pages where the buffer is large enough and
    /// written once here, so no decode step takes page faults on it.
    pub fn zeroed(dtype: KvDtype, len: usize) -> KvBuf {
        match dtype {
            KvDtype::F32 => KvBuf::F32(HugePageBuf::filled(len, 0.0f32)),
            KvDtype::F16 => KvBuf::F16(HugePageBuf::filled(len, f16::ZERO)),
            KvDtype::Bf16 => KvBuf::Bf16(HugePageBuf::filled(len, bf16::ZERO)),
        }
    }

    /// Element type.
    pub fn dtype(&self) -> KvDtype {
        self.all().dtype()
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        self.all().len()
    }

    /// Whether no element is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        (self.len() * self.dtype().size()) as u64
    }

    /// Every element, read only.
    pub fn all(&self) -> KvRows<'_> {
        match self {
            KvBuf::F32(v) => KvRows::F32(v),
            KvBuf::F16(v) => KvRows::F16(v),
            KvBuf::Bf16(v) => KvRows::Bf16(v),
        }
    }

    /// Elements `range`, read only.
    pub fn rows(&self, range: Range<usize>) -> KvRows<'_> {
        self.all().slice(range)
    }

    /// Elements `range`, writable.
    pub fn rows_mut(&mut self, range: Range<usize>) -> KvRowsMut<'_> {
        match self {
            KvBuf::F32(v) => KvRowsMut::F32(&mut v[range]),
            KvBuf::F16(v) => KvRowsMut::F16(&mut v[range]),
            KvBuf::Bf16(v) => KvRowsMut::Bf16(&mut v[range]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounded_values_survive_every_storage_type_exactly() {
        let raw: Vec<f32> = (0..100).map(|i| (i as f32 * 0.377).sin() * 3.1).collect();
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Bf16] {
            let mut x = raw.clone();
            dtype.round_in_place(&mut x);
            if dtype != KvDtype::F32 {
                assert_ne!(x, raw, "{dtype:?} rounding changed nothing");
            }
            let mut buf = KvBuf::zeroed(dtype, 140);
            assert_eq!(buf.bytes(), (140 * dtype.size()) as u64);
            buf.rows_mut(20..140).write(10, &x);
            let mut back = vec![f32::NAN; 100];
            buf.rows(30..130).widen_into(&mut back);
            assert_eq!(back, x, "{dtype:?}");
            // Through bytes, as a disk slot holds them.
            let bytes = buf.rows(30..130).as_bytes().to_vec();
            assert_eq!(bytes.len(), 100 * dtype.size());
            // Backed by u32 so the bytes are aligned for every element type.
            let mut words = vec![0u32; bytes.len() / 4];
            let again: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
            KvRowsMut::from_bytes(dtype, again)
                .as_bytes_mut()
                .copy_from_slice(&bytes);
            let mut widened = vec![0.0; 100];
            KvRows::from_bytes(dtype, bytemuck::cast_slice(&words)).widen_into(&mut widened);
            assert_eq!(widened, x, "{dtype:?} via bytes");
        }
    }
}
