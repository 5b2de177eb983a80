//! Model families. Each family is one file implementing [`CausalLm`]; the generation loop in
//! `generate.rs` drives any of them. OPT is the only family so far; a Llama-family model (RoPE,
//! RMSNorm, SwiGLU, grouped-query attention) is one more file with its own workspace and a KV cache
//! of `num_kv_heads * head_dim` values per position.

pub mod opt;

use crate::backend::Backend;
use crate::kernels::{KvBuf, KvDtype, KvRowsMut};

/// One forward step over a batch whose sequences are left-padded to a common length, so that every
/// sequence's new tokens occupy the same cache positions `start .. start + new_tokens`.
pub struct Step<'a> {
    /// Sequences in the batch.
    pub batch: usize,
    /// New tokens per sequence in this step (the padded prompt length in prefill, 1 in decode).
    pub new_tokens: usize,
    /// Token ids, `[batch, new_tokens]`.
    pub tokens: &'a [u32],
    /// Position in the sequence of each new token, counting only real (non-padding) tokens from 0,
    /// `[batch, new_tokens]`. Padding tokens carry 0 and are marked invalid in `key_valid`.
    pub positions: &'a [u32],
    /// Cache position of the first new token.
    pub start: usize,
    /// Whether each cache position holds a real token (false: left padding), `[batch, max_len]`.
    pub key_valid: &'a [bool],
}

/// Keys and values of every layer for a batch of sequences, preallocated for the whole generation,
/// in the model's element type ([`KvDtype`]: what the memory plan counts).
///
/// Layout per layer: `[batch, max_len, width]`, so one sequence's cache rows are contiguous and the
/// attention kernel reads them in place.
pub struct KvCache {
    keys: Vec<KvBuf>,
    values: Vec<KvBuf>,
    /// Sequences.
    pub batch: usize,
    /// Positions per sequence.
    pub max_len: usize,
    /// Values per position per layer (K or V alone).
    pub width: usize,
}

impl KvCache {
    /// Zeroed cache for `layers` layers of `dtype` elements, on huge pages where the buffers are
    /// large enough, and written once here so that no decode step takes page faults on it.
    pub fn new(
        layers: usize,
        batch: usize,
        max_len: usize,
        width: usize,
        dtype: KvDtype,
    ) -> KvCache {
        let len = batch * max_len * width;
        let zeroed = || KvBuf::zeroed(dtype, len);
        KvCache {
            keys: (0..layers).map(|_| zeroed()).collect(),
            values: (0..layers).map(|_| zeroed()).collect(),
            batch,
            max_len,
            width,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.keys.iter().chain(&self.values).map(KvBuf::bytes).sum()
    }

    /// All `max_len` key and value rows of sequence `seq` in one layer, writable.
    pub fn layer_rows_mut(&mut self, layer: usize, seq: usize) -> (KvRowsMut<'_>, KvRowsMut<'_>) {
        let at = seq * self.max_len * self.width;
        let end = at + self.max_len * self.width;
        (
            self.keys[layer].rows_mut(at..end),
            self.values[layer].rows_mut(at..end),
        )
    }
}

/// One layer's KV cache of a batch, wherever each sequence's rows live: a layer computes against
/// this so that the block schedule can hand it CPU-resident rows in place and disk-resident rows
/// in staging buffers.
pub trait LayerKv {
    /// Key and value rows (`[max_len, width]` each, at least the positions attended) of sequence
    /// `seq` of the batch, in the cache's element type; the layer writes the step's new rows and
    /// reads the first `kv_len`.
    fn rows(&mut self, seq: usize) -> (KvRowsMut<'_>, KvRowsMut<'_>);

    /// The 4-bit compressed key and value caches of sequence `seq`, when the cache is compressed
    /// (policy `compression.kv_cache`): the layer appends the step's rows to them and attends with
    /// `quant::attention_q4` instead of using [`LayerKv::rows`].
    fn compressed(
        &mut self,
        seq: usize,
    ) -> Option<(
        &mut crate::quant::QuantizedKv,
        &mut crate::quant::QuantizedKv,
    )> {
        let _ = seq;
        None
    }

    /// Appends the step's rows of sequence `seq` to a cache that lives on a device and attends
    /// there, writing `[q_len, width]` to `out`; returns false when the sequence's cache is in
    /// host memory (the layer then uses [`LayerKv::rows`]). Device failures are recorded by the
    /// implementation and surface after the layer (the layer itself cannot fail).
    fn attend(&mut self, seq: usize, rows: &NewRows, out: &mut [f32]) -> bool {
        let _ = (seq, rows, out);
        false
    }
}

/// Where a layer's matrix products run when some of them are not plain host products: the GPU
/// tiers put whole matrices on a device, or split a matrix's output rows between the host and
/// the device (HeteGen). The model calls it for each of the six matrices (q, k, v, out, fc1,
/// fc2) before falling back to the backend.
pub trait PlacedLinear {
    /// Computes `y = x W^T + bias` for matrix `i` of the layer over `rows` rows, `dense` being
    /// its host copy (which the host share of a split reads); returns false to leave the product
    /// to the backend. Device failures are recorded by the implementation and surface after the
    /// layer.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        i: usize,
        x: &[f32],
        rows: usize,
        dense: &crate::kernels::Matrix,
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) -> bool;
}

/// One sequence's attention inputs for a cache that lives on a device (see
/// [`LayerKv::attend`]): the step's query, key and value rows and where they go.
pub struct NewRows<'a> {
    /// Queries, `[q_len, width]` (already scaled).
    pub q: &'a [f32],
    /// The step's keys and values, `[q_len, width]` each, already rounded to the cache's
    /// element type (so a device cache held in f32 holds the same numbers as the host's).
    pub k: &'a [f32],
    /// See `k`.
    pub v: &'a [f32],
    /// Cache position of the first new row.
    pub start: usize,
    /// New rows (queries).
    pub q_len: usize,
    /// Whether each of the first `start + q_len` cache positions holds a real token.
    pub key_valid: &'a [bool],
    /// Attention heads.
    pub num_heads: usize,
    /// Values per head.
    pub head_dim: usize,
}

/// A decoder-only language model the generation loop can drive.
pub trait CausalLm: Send + Sync {
    /// Buffers one forward pass needs, allocated once per generation.
    type Workspace;

    /// Vocabulary size (rows of the logits).
    fn vocab_size(&self) -> usize;
    /// Longest sequence the model's positions allow.
    fn max_positions(&self) -> usize;
    /// Decoder layers.
    fn num_layers(&self) -> usize;
    /// KV-cache values per position per layer (K or V alone).
    fn kv_width(&self) -> usize;
    /// Element type of the KV cache: the checkpoint's dtype, as transformers keeps it.
    fn kv_dtype(&self) -> KvDtype;
    /// Token that ends a sequence.
    fn eos_token_id(&self) -> u32;
    /// Token fed in place of real tokens (left padding, finished sequences).
    fn pad_token_id(&self) -> u32;
    /// Bytes of weights the model reads per forward pass (every matrix once).
    fn weight_bytes(&self) -> u64;

    /// Buffers for steps of up to `batch * max_new_tokens` tokens over a cache of `max_len`.
    fn workspace(&self, batch: usize, max_new_tokens: usize, max_len: usize) -> Self::Workspace;

    /// Runs `step`, appends its keys and values to `kv`, and writes the logits of each sequence's
    /// last new token to `logits` (`[batch, vocab]`). Allocates nothing.
    fn forward(
        &self,
        backend: &dyn Backend,
        step: &Step,
        kv: &mut KvCache,
        ws: &mut Self::Workspace,
        logits: &mut [f32],
    );
}
