//! Compute backends: the operations a transformer layer is made of, behind one trait.
//!
//! Model code (see `models/`) is written once against [`Backend`]; the CPU backend runs the kernels
//! in `kernels/`, and the CUDA backend (issue 6) implements the same operations with cuBLAS and
//! NVRTC kernels. Operations are coarse (a whole matrix product, a whole attention) so that the cost
//! of dynamic dispatch is nil and a device backend can launch one kernel per call.
//!
//! Activations and the KV cache are host `f32` slices for now. When the CUDA backend arrives it
//! will bring its own buffer type; the operation list below is what it must provide.

use crate::kernels::{self, KvRows, Matrix};

/// The operations one decoder layer needs.
pub trait Backend: Send + Sync {
    /// Short name for reports ("cpu").
    fn name(&self) -> &'static str;

    /// `y[t, :] = x[t, :] W^T + bias` for `tokens` rows; `W` in nn.Linear layout `[out, in]`.
    fn linear(&self, x: &[f32], tokens: usize, w: &Matrix, bias: Option<&[f32]>, y: &mut [f32]);

    /// Row-wise LayerNorm of `x` (rows of `width`) into `y`.
    fn layer_norm(
        &self,
        x: &[f32],
        width: usize,
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        y: &mut [f32],
    );

    /// `x = max(x, 0)`.
    fn relu_inplace(&self, x: &mut [f32]);

    /// `x *= factor` (OPT scales queries after the projection, before the scores).
    fn scale_inplace(&self, x: &mut [f32], factor: f32);

    /// `acc += x` (residual connections).
    fn add_inplace(&self, acc: &mut [f32], x: &[f32]);

    /// Causal multi-head attention of one sequence's `q_len` new queries over its first `kv_len`
    /// cache rows (in the cache's element type), skipping keys whose `key_valid` is false. See
    /// [`kernels::attention`].
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &[f32],
        q_len: usize,
        k: KvRows,
        v: KvRows,
        kv_len: usize,
        key_valid: &[bool],
        num_heads: usize,
        head_dim: usize,
        scale: f32,
        out: &mut [f32],
        scratch: &mut [f32],
    );
}

/// Runs every operation on the host CPU with the kernels of `kernels/`.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn linear(&self, x: &[f32], tokens: usize, w: &Matrix, bias: Option<&[f32]>, y: &mut [f32]) {
        kernels::linear(x, tokens, w, bias, y)
    }

    fn layer_norm(
        &self,
        x: &[f32],
        width: usize,
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        y: &mut [f32],
    ) {
        kernels::layer_norm(x, width, gamma, beta, eps, y)
    }

    fn relu_inplace(&self, x: &mut [f32]) {
        kernels::relu_inplace(x)
    }

    fn scale_inplace(&self, x: &mut [f32], factor: f32) {
        kernels::scale_inplace(x, factor)
    }

    fn add_inplace(&self, acc: &mut [f32], x: &[f32]) {
        kernels::add_inplace(acc, x)
    }

    fn attention(
        &self,
        q: &[f32],
        q_len: usize,
        k: KvRows,
        v: KvRows,
        kv_len: usize,
        key_valid: &[bool],
        num_heads: usize,
        head_dim: usize,
        scale: f32,
        out: &mut [f32],
        scratch: &mut [f32],
    ) {
        kernels::attention(
            q, q_len, k, v, kv_len, key_valid, num_heads, head_dim, scale, out, scratch,
        )
    }
}

/// The scratch a backend's attention takes for a cache of `max_len` rows: the CPU kernel's own
/// sizing, so the workspace, the simulated device and `planner profile` all give it the same.
pub use primitives::kernels::attention_scratch_len;
