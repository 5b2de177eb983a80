//! CPU compute kernels for the executor's `cpu` backend.
//!
//! Every kernel works on plain slices so that the model code can hand in weights that live in a
//! memory map (16-bit checkpoints are read in place, never converted whole) and activations that
//! live in buffers it reuses across decode steps. Accumulation is always in f32.

use rayon::prelude::*;

/// Borrowed weight elements in the dtype the checkpoint stores them in.
///
/// Kept as an enum (rather than a generic) so that the model code can pick the dtype at run time
/// from a checkpoint header without monomorphising every layer three times.
pub enum WeightData<'a> {
    /// 32-bit floats, used by f32 checkpoints and by tests.
    F32(&'a [f32]),
    /// IEEE half precision, widened to f32 on the fly.
    F16(&'a [half::f16]),
    /// bfloat16, widened to f32 on the fly.
    Bf16(&'a [half::bf16]),
}

/// Weight matrix in nn.Linear layout: row-major [out_features, in_features].
///
/// This is the layout Hugging Face checkpoints store, so a matrix can point straight into a
/// memory-mapped safetensors file.
pub struct Matrix<'a> {
    /// The `out_features * in_features` elements, row `o` holding the weights of output `o`.
    pub data: WeightData<'a>,
    /// Number of rows (outputs).
    pub out_features: usize,
    /// Number of columns (inputs).
    pub in_features: usize,
}

/// y[t, :] = x[t, :] W^T + bias, for t in 0..tokens. x: [tokens, in], y: [tokens, out].
///
/// Multithreaded (rayon), f32 accumulation, no allocation per call beyond thread-local scratch.
pub fn linear(x: &[f32], tokens: usize, w: &Matrix, bias: Option<&[f32]>, y: &mut [f32]) {
    let (n_in, n_out) = (w.in_features, w.out_features);
    assert_eq!(
        x.len(),
        tokens * n_in,
        "linear: x must be [tokens, in_features]"
    );
    assert_eq!(
        y.len(),
        tokens * n_out,
        "linear: y must be [tokens, out_features]"
    );
    if let Some(b) = bias {
        assert_eq!(
            b.len(),
            n_out,
            "linear: bias must have out_features elements"
        );
    }
    let weight = |o: usize, i: usize| -> f32 {
        match &w.data {
            WeightData::F32(d) => d[o * n_in + i],
            WeightData::F16(d) => d[o * n_in + i].to_f32(),
            WeightData::Bf16(d) => d[o * n_in + i].to_f32(),
        }
    };
    y.par_chunks_mut(n_out.max(1))
        .enumerate()
        .for_each(|(t, yr)| {
            let xr = &x[t * n_in..(t + 1) * n_in];
            for (o, yo) in yr.iter_mut().enumerate() {
                let mut acc = 0.0f32;
                for (i, xi) in xr.iter().enumerate() {
                    acc += xi * weight(o, i);
                }
                *yo = acc + bias.map_or(0.0, |b| b[o]);
            }
        });
}

/// Layer normalisation over rows of `width` elements (rows = x.len() / width).
///
/// Statistics are computed in f32 with the biased variance, as torch.nn.LayerNorm does.
pub fn layer_norm(x: &[f32], width: usize, gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32]) {
    assert!(
        width > 0 && x.len() % width == 0,
        "layer_norm: x.len() must be a multiple of width"
    );
    assert_eq!(y.len(), x.len(), "layer_norm: y must have the length of x");
    assert!(
        gamma.len() == width && beta.len() == width,
        "layer_norm: gamma/beta must have width elements"
    );
    for (xr, yr) in x.chunks(width).zip(y.chunks_mut(width)) {
        let mean = xr.iter().sum::<f32>() / width as f32;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for i in 0..width {
            yr[i] = (xr[i] - mean) * inv * gamma[i] + beta[i];
        }
    }
}

/// max(x, 0) in place: OPT's FFN activation, applied to the up-projection's output buffer.
pub fn relu_inplace(x: &mut [f32]) {
    for v in x {
        *v = v.max(0.0);
    }
}

/// acc += x, elementwise: the residual connections.
pub fn add_inplace(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len(), "add_inplace: lengths differ");
    for (a, b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}

/// Causal multi-head attention for one sequence.
///
/// q: [q_len, nh*hd]; k, v: the cache rows [kv_len, nh*hd] (row stride nh*hd), the q rows being
/// the last q_len positions. key_valid[j] false masks key j (left padding). Query i attends keys
/// 0..=kv_len-q_len+i that are valid; a query with no valid key outputs zeros. Scores are
/// q·k * scale. out: [q_len, nh*hd]. scratch: at least kv_len f32 per thread (caller-owned).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    q_len: usize,
    k: &[f32],
    v: &[f32],
    kv_len: usize,
    key_valid: &[bool],
    num_heads: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    let d = num_heads * head_dim;
    assert!(q_len <= kv_len, "attention: q_len must not exceed kv_len");
    assert_eq!(
        q.len(),
        q_len * d,
        "attention: q must be [q_len, num_heads*head_dim]"
    );
    assert!(
        k.len() >= kv_len * d && v.len() >= kv_len * d,
        "attention: k/v shorter than kv_len rows"
    );
    assert!(
        key_valid.len() >= kv_len,
        "attention: key_valid shorter than kv_len"
    );
    assert_eq!(
        out.len(),
        q_len * d,
        "attention: out must be [q_len, num_heads*head_dim]"
    );
    assert!(
        scratch.len() >= kv_len,
        "attention: scratch needs kv_len floats"
    );
    let p = &mut scratch[..kv_len];
    for i in 0..q_len {
        let last = kv_len - q_len + i;
        for h in 0..num_heads {
            let qv = &q[i * d + h * head_dim..i * d + (h + 1) * head_dim];
            let mut max = f32::NEG_INFINITY;
            for j in 0..=last {
                if !key_valid[j] {
                    continue;
                }
                let kr = &k[j * d + h * head_dim..j * d + (h + 1) * head_dim];
                let s = qv.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale;
                p[j] = s;
                max = max.max(s);
            }
            let o = &mut out[i * d + h * head_dim..i * d + (h + 1) * head_dim];
            o.fill(0.0);
            if max == f32::NEG_INFINITY {
                continue;
            }
            let mut sum = 0.0;
            for j in 0..=last {
                if key_valid[j] {
                    p[j] = (p[j] - max).exp();
                    sum += p[j];
                }
            }
            for j in 0..=last {
                if key_valid[j] {
                    let wgt = p[j] / sum;
                    let vr = &v[j * d + h * head_dim..j * d + (h + 1) * head_dim];
                    for (oo, vv) in o.iter_mut().zip(vr) {
                        *oo += wgt * vv;
                    }
                }
            }
        }
    }
}
