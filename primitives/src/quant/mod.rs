//! 4-bit group-wise compression of weights and KV cache (FlexGen's scheme), and CPU kernels that
//! compute straight from the compressed form.
//!
//! Every group of 64 values is stored as 64 4-bit codes (32 bytes) plus an fp16 scale and an fp16
//! minimum: 36 bytes per 64 values, 4.5 bits per value, exactly
//! [`planner::model::compressed_bytes`] of the tensor, so the planner's memory and I/O terms hold.
//! A value is reconstructed as `code * scale + min` (asymmetric min/max quantization).
//!
//! - Weights ([`QuantizedMatrix`]) are grouped along the output dimension, as FlexGen does: one
//!   group is 64 consecutive output rows of one input column. That makes the scale and minimum
//!   constant along a row block's column, so [`linear_q4`] folds the scale into the input
//!   (`x[c] * scale[c]`, once per column per 64 rows) and the minimum into one dot product per
//!   64 rows, leaving an inner loop of 4-bit codes times `x * scale` (rounded to bf16, so that
//!   AVX512-BF16 `vdpbf16ps` can take two columns per lane) with no per-weight dequantization.
//! - KV cache rows ([`QuantizedKv`]) are grouped along the head dimension: each position's
//!   `num_heads * head_dim` values are cut into groups of 64 consecutive values (one group per 64
//!   of a head's dimensions when `head_dim` is a multiple of 64), so a position is quantized on
//!   its own when it is appended, and [`attention_q4`] dequantizes one head of a tile of
//!   positions at a time.
//!
//! See docs/storage-and-compression.md for the layout, the error bound and measured speed.

#![warn(missing_docs)]

mod attention;
mod group;
mod kv;
mod linear;
mod matrix;

pub use attention::attention_q4;
pub use group::{GROUP, GROUP_BYTES};
pub use kv::QuantizedKv;
pub use linear::linear_q4;
pub use matrix::QuantizedMatrix;

use thiserror::Error;

/// Why a tensor cannot be compressed.
#[derive(Debug, Error, PartialEq)]
pub enum QuantError {
    /// A value the fp16 minimum and scale cannot represent (NaN, infinite, or a group whose
    /// minimum or range exceeds fp16's 65504).
    #[error("{what}: value {value} at element {index} cannot be quantized (fp16 scale and minimum must be finite)")]
    Unrepresentable {
        /// Which tensor.
        what: String,
        /// Flat index of the first offending element.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The data does not have the size the shape says.
    #[error("{what}: {found} values given, shape implies {expected}")]
    Shape {
        /// Which tensor.
        what: String,
        /// Values given.
        found: usize,
        /// Values the shape implies.
        expected: usize,
    },
}

#[cfg(test)]
mod tests;
