//! A compressed KV cache for one sequence and one of K or V: positions x (num_heads * head_dim)
//! values, each position quantized on its own in groups of 64 consecutive values (along the head
//! dimension), so appending a decode step never touches earlier positions.
//!
//! Bytes per position: `ceil(width / 64) * 36`, which is `planner::model::compressed_bytes(width)`
//! exactly; for K and V together that equals the planner's `compressed_bytes(2 * width)` whenever
//! `width` is a multiple of 64 (every OPT model; the tiny test fixtures with width 32 pad each
//! position to one group).

use super::group::{code, dequantize_group, quantize_group, GROUP, GROUP_BYTES};
use super::QuantError;
use half::f16;

/// Compressed cache rows; see the module docs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantizedKv {
    width: usize,
    groups_per_row: usize,
    len: usize,
    codes: Vec<u8>,
    scales: Vec<f16>,
    mins: Vec<f16>,
}

impl QuantizedKv {
    /// An empty cache of rows of `width` values, with room for `capacity` positions allocated
    /// up front (so a decode loop that stays within it never reallocates).
    pub fn with_capacity(width: usize, capacity: usize) -> QuantizedKv {
        let gpr = width.div_ceil(GROUP);
        QuantizedKv {
            width,
            groups_per_row: gpr,
            len: 0,
            codes: Vec::with_capacity(capacity * gpr * GROUP_BYTES),
            scales: Vec::with_capacity(capacity * gpr),
            mins: Vec::with_capacity(capacity * gpr),
        }
    }

    /// Compresses a [positions, width] block.
    pub fn from_rows(rows: &[f32], width: usize) -> Result<QuantizedKv, QuantError> {
        let positions = rows.len().checked_div(width).unwrap_or(0);
        let mut kv = QuantizedKv::with_capacity(width, positions);
        kv.push_rows(rows)?;
        Ok(kv)
    }

    /// Appends positions (`rows` is [n, width]): the prefill block or one decode step.
    pub fn push_rows(&mut self, rows: &[f32]) -> Result<(), QuantError> {
        if self.width == 0 || !rows.len().is_multiple_of(self.width) {
            return Err(QuantError::Shape {
                what: format!("KV rows of width {}", self.width),
                found: rows.len(),
                expected: rows.len().div_ceil(self.width.max(1)) * self.width.max(1),
            });
        }
        let n = rows.len() / self.width;
        let gpr = self.groups_per_row;
        let start = self.len;
        self.codes.resize((start + n) * gpr * GROUP_BYTES, 0);
        self.scales.resize((start + n) * gpr, f16::ZERO);
        self.mins.resize((start + n) * gpr, f16::ZERO);
        for (i, row) in rows.chunks_exact(self.width).enumerate() {
            if let Err(e) = self.quantize_row(start + i, row) {
                self.truncate(start);
                return Err(match e {
                    QuantError::Unrepresentable { what, index, value } => {
                        QuantError::Unrepresentable {
                            what,
                            index: i * self.width + index,
                            value,
                        }
                    }
                    other => other,
                });
            }
        }
        self.len = start + n;
        Ok(())
    }

    /// Overwrites position `pos` (< len) with `row` (width values).
    pub fn set_row(&mut self, pos: usize, row: &[f32]) -> Result<(), QuantError> {
        if pos >= self.len || row.len() != self.width {
            return Err(QuantError::Shape {
                what: format!("KV row {pos} of a cache with {} positions", self.len),
                found: row.len(),
                expected: self.width,
            });
        }
        self.quantize_row(pos, row)
    }

    fn quantize_row(&mut self, pos: usize, row: &[f32]) -> Result<(), QuantError> {
        let gpr = self.groups_per_row;
        for g in 0..gpr {
            let vals = &row[g * GROUP..row.len().min(g * GROUP + GROUP)];
            let gi = pos * gpr + g;
            let (s, m) = quantize_group(vals, &mut self.codes[gi * GROUP_BYTES..][..GROUP_BYTES])
                .map_err(|p| QuantError::Unrepresentable {
                what: format!("KV position {pos}"),
                index: g * GROUP + p,
                value: vals[p],
            })?;
            self.scales[gi] = s;
            self.mins[gi] = m;
        }
        Ok(())
    }

    /// Drops positions from `len` on.
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.codes.len() / (self.groups_per_row * GROUP_BYTES).max(1));
        self.len = self.len.min(len);
        self.codes
            .truncate(self.len * self.groups_per_row * GROUP_BYTES);
        self.scales.truncate(self.len * self.groups_per_row);
        self.mins.truncate(self.len * self.groups_per_row);
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Values per position (num_heads * head_dim).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Compressed bytes per position: `planner::model::compressed_bytes(width)`.
    pub fn bytes_per_position(&self) -> usize {
        self.groups_per_row * (GROUP_BYTES + 4)
    }

    /// Compressed bytes held.
    pub fn bytes(&self) -> usize {
        self.len * self.bytes_per_position()
    }

    /// The stored parts (codes, scales, minimums) of the held positions, position-major, e.g. to
    /// write them to the offload directory.
    pub fn parts(&self) -> (&[u8], &[f16], &[f16]) {
        (&self.codes, &self.scales, &self.mins)
    }

    /// Writes values `start..start + out.len()` of position `pos`, reconstructed: one head's
    /// slice when `start = h * head_dim` and `out.len() = head_dim`.
    #[inline]
    pub fn dequantize_range(&self, pos: usize, start: usize, out: &mut [f32]) {
        assert!(
            pos < self.len && start + out.len() <= self.width,
            "dequantize_range out of bounds"
        );
        let gpr = self.groups_per_row;
        let end = start + out.len();
        let mut i = start;
        while i < end {
            let g = i / GROUP;
            let gi = pos * gpr + g;
            let ge = ((g + 1) * GROUP).min(end);
            let codes = &self.codes[gi * GROUP_BYTES..][..GROUP_BYTES];
            let dst = &mut out[i - start..ge - start];
            if i == g * GROUP {
                dequantize_group(codes, self.scales[gi], self.mins[gi], dst);
            } else {
                let (s, m) = (self.scales[gi].to_f32(), self.mins[gi].to_f32());
                for (k, d) in dst.iter_mut().enumerate() {
                    *d = code(codes, i - g * GROUP + k) as f32 * s + m;
                }
            }
            i = ge;
        }
    }

    /// The whole cache as f32 [len, width]: for tests and reference paths.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len * self.width];
        for (p, row) in out
            .chunks_exact_mut(self.width.max(1))
            .enumerate()
            .take(self.len)
        {
            self.dequantize_range(p, 0, row);
        }
        out
    }
}
