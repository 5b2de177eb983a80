//! A weight matrix in nn.Linear layout [out, in], compressed to 4 bits in groups along the output
//! dimension.
//!
//! Layout (all groups 36 bytes: 32 bytes of codes in `codes`, one fp16 in `scales`, one in `mins`):
//!
//! - Full row blocks: rows `64b..64b+64` of column `c` form group `b * in + c`. A row block's codes
//!   are therefore one contiguous run of `32 * in` bytes, streamed column by column by the kernel.
//! - Tail rows (the last `out % 64`, none for any OPT layer matrix): the `r * in` values are taken
//!   column by column (flat index `c * r + j` for row `64 * full_blocks + j`) and cut into groups
//!   of 64, the last one possibly partial. This keeps the total at `ceil(out * in / 64)` groups,
//!   i.e. exactly `planner::model::compressed_bytes(out * in)` bytes, for every shape.

use super::group::{dequantize_group, quantize_group, GROUP, GROUP_BYTES};
use super::QuantError;
use crate::kernels::{Matrix, WeightData};
use half::f16;
use rayon::prelude::*;

/// A compressed [out, in] weight matrix; see the module docs for the layout.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedMatrix {
    out_features: usize,
    in_features: usize,
    codes: Vec<u8>,
    scales: Vec<f16>,
    mins: Vec<f16>,
}

/// Reads element `i` (row-major) of a matrix in any stored dtype and layout as f32.
fn get(m: &Matrix, i: usize) -> f32 {
    match m.data {
        WeightData::F32(d) => d[i],
        WeightData::F16(d) => d[i].to_f32(),
        WeightData::Bf16(d) => d[i].to_f32(),
        WeightData::Bf16Panels(d) => {
            crate::kernels::panel_element(d, m.in_features, i / m.in_features, i % m.in_features)
                .to_f32()
        }
    }
}

/// Elements the matrix holds, in row-major terms (panels that fit the shape hold all of them).
fn len_of(m: &Matrix) -> usize {
    match m.data {
        WeightData::F32(d) => d.len(),
        WeightData::F16(d) => d.len(),
        WeightData::Bf16(d) => d.len(),
        WeightData::Bf16Panels(d) => {
            if d.len() == crate::kernels::panels_len(m.out_features, m.in_features) {
                m.out_features * m.in_features
            } else {
                d.len()
            }
        }
    }
}

impl QuantizedMatrix {
    /// Compresses an f32 [out, in] matrix (row-major).
    pub fn quantize(
        data: &[f32],
        out_features: usize,
        in_features: usize,
    ) -> Result<QuantizedMatrix, QuantError> {
        Self::from_matrix(&Matrix {
            data: WeightData::F32(data),
            out_features,
            in_features,
        })
    }

    /// Compresses a checkpoint matrix in its stored dtype (f32, f16 or bf16), one row block at a
    /// time (the matrix is never widened whole), in parallel over row blocks.
    pub fn from_matrix(m: &Matrix) -> Result<QuantizedMatrix, QuantError> {
        let (out, inp) = (m.out_features, m.in_features);
        let what = || format!("{out}x{inp} weight matrix");
        if len_of(m) != out * inp {
            return Err(QuantError::Shape {
                what: what(),
                found: len_of(m),
                expected: out * inp,
            });
        }
        let full = out / GROUP;
        let tail = out % GROUP;
        let tail_groups = (tail * inp).div_ceil(GROUP);
        let groups = full * inp + tail_groups;
        let mut codes = vec![0u8; groups * GROUP_BYTES];
        let mut scales = vec![f16::ZERO; groups];
        let mut mins = vec![f16::ZERO; groups];
        let bad = |index: usize| QuantError::Unrepresentable {
            what: what(),
            index,
            value: get(m, index),
        };
        // Full row blocks, in parallel: block b owns codes[b*in*32..], scales[b*in..].
        let (codes_full, codes_tail) = codes.split_at_mut(full * inp * GROUP_BYTES);
        let (scales_full, scales_tail) = scales.split_at_mut(full * inp);
        let (mins_full, mins_tail) = mins.split_at_mut(full * inp);
        if inp > 0 {
            codes_full
                .par_chunks_mut(inp * GROUP_BYTES)
                .zip(scales_full.par_chunks_mut(inp))
                .zip(mins_full.par_chunks_mut(inp))
                .enumerate()
                .try_for_each(|(b, ((cb, sb), mb))| {
                    // Widen the 64 rows once, row-major, then gather each column's 64 values.
                    let rows: Vec<f32> = (0..GROUP * inp)
                        .map(|k| get(m, b * GROUP * inp + k))
                        .collect();
                    let mut vals = [0f32; GROUP];
                    for c in 0..inp {
                        for (r, v) in vals.iter_mut().enumerate() {
                            *v = rows[r * inp + c];
                        }
                        let (s, mn) =
                            quantize_group(&vals, &mut cb[c * GROUP_BYTES..][..GROUP_BYTES])
                                .map_err(|r| bad((b * GROUP + r) * inp + c))?;
                        sb[c] = s;
                        mb[c] = mn;
                    }
                    Ok(())
                })?;
        }
        // Tail rows, column-major flattening.
        let base = full * GROUP * inp;
        let n = tail * inp;
        let mut vals = [0f32; GROUP];
        for g in 0..tail_groups {
            let cnt = (n - g * GROUP).min(GROUP);
            for (p, v) in vals[..cnt].iter_mut().enumerate() {
                let f = g * GROUP + p;
                *v = get(m, base + (f % tail) * inp + f / tail);
            }
            let (s, mn) = quantize_group(
                &vals[..cnt],
                &mut codes_tail[g * GROUP_BYTES..][..GROUP_BYTES],
            )
            .map_err(|p| {
                let f = g * GROUP + p;
                bad(base + (f % tail) * inp + f / tail)
            })?;
            scales_tail[g] = s;
            mins_tail[g] = mn;
        }
        Ok(QuantizedMatrix {
            out_features: out,
            in_features: inp,
            codes,
            scales,
            mins,
        })
    }

    /// Rebuilds a matrix from its stored parts (e.g. read back from disk), checking the sizes.
    pub fn from_parts(
        out_features: usize,
        in_features: usize,
        codes: Vec<u8>,
        scales: Vec<f16>,
        mins: Vec<f16>,
    ) -> Result<QuantizedMatrix, QuantError> {
        let groups = Self::groups_for(out_features, in_features);
        for (what, found, expected) in [
            ("codes", codes.len(), groups * GROUP_BYTES),
            ("scales", scales.len(), groups),
            ("mins", mins.len(), groups),
        ] {
            if found != expected {
                return Err(QuantError::Shape {
                    what: format!("{out_features}x{in_features} compressed matrix {what}"),
                    found,
                    expected,
                });
            }
        }
        Ok(QuantizedMatrix {
            out_features,
            in_features,
            codes,
            scales,
            mins,
        })
    }

    /// Groups of a compressed [out, in] matrix: `ceil(out * in / 64)` for every shape.
    pub fn groups_for(out_features: usize, in_features: usize) -> usize {
        (out_features / GROUP) * in_features
            + ((out_features % GROUP) * in_features).div_ceil(GROUP)
    }

    /// Rows (outputs).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Columns (inputs).
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Number of groups.
    pub fn groups(&self) -> usize {
        self.scales.len()
    }

    /// Bytes of the compressed form: 36 per group, equal to
    /// `planner::model::compressed_bytes(out * in)`.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 2 * self.scales.len() + 2 * self.mins.len()
    }

    /// The stored parts (codes, scales, minimums), e.g. to write them to disk.
    pub fn parts(&self) -> (&[u8], &[f16], &[f16]) {
        (&self.codes, &self.scales, &self.mins)
    }

    /// Full row blocks of 64 rows.
    pub(crate) fn full_blocks(&self) -> usize {
        self.out_features / GROUP
    }

    /// Dequantizes the whole matrix to f32 [out, in]: for tests and reference paths only (the
    /// kernels never do this).
    pub fn dequantize(&self) -> Vec<f32> {
        let (out, inp) = (self.out_features, self.in_features);
        let mut w = vec![0f32; out * inp];
        let mut vals = [0f32; GROUP];
        for b in 0..self.full_blocks() {
            for c in 0..inp {
                let g = b * inp + c;
                dequantize_group(
                    &self.codes[g * GROUP_BYTES..][..GROUP_BYTES],
                    self.scales[g],
                    self.mins[g],
                    &mut vals,
                );
                for (r, v) in vals.iter().enumerate() {
                    w[(b * GROUP + r) * inp + c] = *v;
                }
            }
        }
        let (g0, base, tail) = (
            self.full_blocks() * inp,
            self.full_blocks() * GROUP * inp,
            out % GROUP,
        );
        let n = tail * inp;
        for g in 0..n.div_ceil(GROUP) {
            let cnt = (n - g * GROUP).min(GROUP);
            let gg = g0 + g;
            dequantize_group(
                &self.codes[gg * GROUP_BYTES..][..GROUP_BYTES],
                self.scales[gg],
                self.mins[gg],
                &mut vals[..cnt],
            );
            for (p, v) in vals[..cnt].iter().enumerate() {
                let f = g * GROUP + p;
                w[base + (f % tail) * inp + f / tail] = *v;
            }
        }
        w
    }

    /// Codes, scales and minimums of full row block `b` (`in` groups each).
    pub(crate) fn block(&self, b: usize) -> (&[u8], &[f16], &[f16]) {
        let inp = self.in_features;
        (
            &self.codes[b * inp * GROUP_BYTES..][..inp * GROUP_BYTES],
            &self.scales[b * inp..][..inp],
            &self.mins[b * inp..][..inp],
        )
    }

    /// Tail groups (codes, scales, minimums), after the full row blocks.
    pub(crate) fn tail(&self) -> (&[u8], &[f16], &[f16]) {
        let g0 = self.full_blocks() * self.in_features;
        (
            &self.codes[g0 * GROUP_BYTES..],
            &self.scales[g0..],
            &self.mins[g0..],
        )
    }
}
