//! CPU compute kernels for the executor's `cpu` backend.
//!
//! Every kernel works on plain slices so that the model code can hand in weights that live in a
//! memory map (16-bit checkpoints are read in place, never converted whole) and activations that
//! live in buffers it reuses across decode steps. Accumulation is always in f32.

use rayon::prelude::*;

mod attention;
mod kv;
mod linear;
pub(crate) mod memory;

pub use kv::{KvBuf, KvDtype, KvRows, KvRowsMut};
pub use linear::panels::{
    pack_panels, pack_panels_in_place, panel_element, panels_len, PANEL_ROWS,
};
pub use memory::{advise_huge_pages, stream_read, HugePageBuf, HUGE_PAGE_BYTES};

/// The vector instruction set the kernels run on here (`amx`, `avx512bf16`, `avx512`, `avx2`
/// or `portable`): a machine's speed depends on it as much as on its core count, so profiles record
/// it in their hardware fingerprint. `STRATA_CPU_ISA` can lower it (for benchmarks).
pub fn instruction_set() -> &'static str {
    match linear::Isa::detect() {
        linear::Isa::Portable => "portable",
        linear::Isa::Avx2 => "avx2",
        linear::Isa::Avx512 => "avx512",
        linear::Isa::Avx512Bf16 => "avx512bf16",
        linear::Isa::Amx => "amx",
    }
}

/// Whether bf16 matrices should be packed into panels ([`pack_panels`]) for this CPU: on
/// AVX512-BF16 without AMX, where the panel kernels replace the dot-product tiles and the
/// per-call repacking. AMX CPUs keep nn.Linear layout (their tile path repacks from it, and the
/// panel kernels are unmeasured there); AVX2 and portable CPUs have no bf16 products.
pub fn prefers_panels() -> bool {
    linear::Isa::detect() == linear::Isa::Avx512Bf16
}

/// The CPU family of an AMD processor (0x19 for Zen 3 and Zen 4, 0x1A for Zen 5), None on other
/// vendors and architectures: kernel tuning and the embedded profiles differ between these
/// classes, which the instruction set alone does not tell apart.
#[cfg(target_arch = "x86_64")]
pub fn amd_family() -> Option<u32> {
    use std::arch::x86_64::__cpuid;
    // CPUID leaves 0 and 1 exist on every x86-64 CPU.
    let (vendor, signature) = (__cpuid(0), __cpuid(1));
    let amd = vendor.ebx == u32::from_le_bytes(*b"Auth")
        && vendor.edx == u32::from_le_bytes(*b"enti")
        && vendor.ecx == u32::from_le_bytes(*b"cAMD");
    if !amd {
        return None;
    }
    let base = (signature.eax >> 8) & 0xF;
    let extended = (signature.eax >> 20) & 0xFF;
    Some(if base == 0xF { base + extended } else { base })
}

/// Not an x86 CPU, so not an AMD one.
#[cfg(not(target_arch = "x86_64"))]
pub fn amd_family() -> Option<u32> {
    None
}

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
    /// bfloat16 packed by [`pack_panels`] into the operand layout of the AVX512-BF16 kernels
    /// (16-row panels, pairs of k per u32); [`panel_element`] reads one element back.
    Bf16Panels(&'a [u32]),
}

/// Weight elements owned in the dtype they are stored in: tensors copied out of a checkpoint,
/// random weights, and matrices built by tests in each dtype.
/// On whole huge pages ([`HugePageBuf`]) because the decode kernels stream them.
pub enum OwnedWeights {
    F32(HugePageBuf<f32>),
    F16(HugePageBuf<half::f16>),
    Bf16(HugePageBuf<half::bf16>),
    /// See [`WeightData::Bf16Panels`].
    Bf16Panels(HugePageBuf<u32>),
}

impl OwnedWeights {
    /// A borrowed view for the kernels.
    pub fn view(&self) -> WeightData<'_> {
        match self {
            OwnedWeights::F32(v) => WeightData::F32(v),
            OwnedWeights::F16(v) => WeightData::F16(v),
            OwnedWeights::Bf16(v) => WeightData::Bf16(v),
            OwnedWeights::Bf16Panels(v) => WeightData::Bf16Panels(v),
        }
    }

    /// The elements as an `[out_features, in_features]` matrix.
    pub fn matrix(&self, out_features: usize, in_features: usize) -> Matrix<'_> {
        Matrix {
            data: self.view(),
            out_features,
            in_features,
        }
    }

    /// The elements' bytes, as a device upload or a file takes them.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            OwnedWeights::F32(v) => bytemuck::cast_slice(v),
            OwnedWeights::F16(v) => bytemuck::cast_slice(v),
            OwnedWeights::Bf16(v) => bytemuck::cast_slice(v),
            OwnedWeights::Bf16Panels(v) => bytemuck::cast_slice(v),
        }
    }

    /// The elements' bytes, for filling the buffer from a file or another buffer.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            OwnedWeights::F32(v) => bytemuck::cast_slice_mut(v),
            OwnedWeights::F16(v) => bytemuck::cast_slice_mut(v),
            OwnedWeights::Bf16(v) => bytemuck::cast_slice_mut(v),
            OwnedWeights::Bf16Panels(v) => bytemuck::cast_slice_mut(v),
        }
    }
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
/// W is read in place in its stored dtype, which is what makes batch-1 decode run at DRAM speed
/// for 16-bit checkpoints. For bf16 weights the input is rounded to bf16 first (as PyTorch does
/// for a bf16 model), so that AVX512-BF16 dot products can be used; f32 and f16 weights see the
/// f32 input unchanged. See `linear.rs` for the blocking.
pub fn linear(x: &[f32], tokens: usize, w: &Matrix, bias: Option<&[f32]>, y: &mut [f32]) {
    linear::linear_on(linear::Isa::detect(), x, tokens, w, bias, y);
}

/// Bytes of the converted input that `linear` keeps on its calling thread, between calls, after
/// a product of `tokens` rows of `n_in` (64 MiB for OPT-6.7B's FFN output at 1024 tokens), so that
/// `planner::memory::cpu_workspace_bytes` can count it. The per-thread repacked weight slices (at
/// most 512 KiB per thread) are not included.
pub fn linear_input_scratch_bytes(tokens: usize, n_in: usize) -> usize {
    linear::input_scratch_bytes(tokens, n_in)
}

/// Layer normalisation over rows of `width` elements (rows = x.len() / width).
///
/// Statistics are computed in f32 with the biased variance, as torch.nn.LayerNorm does.
pub fn layer_norm(x: &[f32], width: usize, gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32]) {
    assert!(
        width > 0 && x.len().is_multiple_of(width),
        "layer_norm: x.len() must be a multiple of width"
    );
    assert_eq!(y.len(), x.len(), "layer_norm: y must have the length of x");
    assert!(
        gamma.len() == width && beta.len() == width,
        "layer_norm: gamma/beta must have width elements"
    );
    let norm_row = |(xr, yr): (&[f32], &mut [f32])| {
        let mean = lane_sum(xr, |v| v) / width as f32;
        let var = lane_sum(xr, |v| (v - mean) * (v - mean)) / width as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for (((yv, xv), g), b) in yr.iter_mut().zip(xr).zip(gamma).zip(beta) {
            *yv = (xv - mean) * inv * g + b;
        }
    };
    if x.len() >= 1 << 16 {
        x.par_chunks(width)
            .zip(y.par_chunks_mut(width))
            .for_each(norm_row);
    } else {
        x.chunks(width).zip(y.chunks_mut(width)).for_each(norm_row);
    }
}

/// The sum of f(v) over x in 16 independent partial sums, added pairwise at the end: a plain
/// `sum` is one chain of dependent additions that the compiler may not reorder, which made the
/// layer norms of a prefill latency bound (3% of OPT-125m's batch-16 prefill on the Zen 4).
#[inline(always)]
pub(crate) fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += f(*v);
        }
    }
    fold16(lanes) + chunks.remainder().iter().map(|v| f(*v)).sum::<f32>()
}

/// Adds 16 lanes pairwise (8 + 4 + 2 + 1 additions on a short dependency chain).
#[inline(always)]
pub(crate) fn fold16(mut lanes: [f32; 16]) -> f32 {
    for width in [8, 4, 2, 1] {
        for l in 0..width {
            lanes[l] += lanes[l + width];
        }
    }
    lanes[0]
}

/// Index of the largest value, the first on ties; NaN never wins (0 when nothing is larger
/// than -inf). Greedy decoding takes it over the whole vocabulary for every sequence and step:
/// a loop with a branch per value took 0.7 ms of each 18 ms OPT-125m batch-16 step on the
/// 2-core Zen 4. Here sixteen lanes each keep their best value and its index (a compare and
/// two blends per vector, on AVX-512 where the CPU has it), then the lanes are merged, the
/// smaller index winning ties.
pub fn argmax(values: &[f32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if linear::Isa::detect() >= linear::Isa::Avx512 {
        // SAFETY: the CPU has AVX-512 F/BW/VL.
        return unsafe { argmax_avx512(values) };
    }
    argmax_lanes(values)
}

/// [`argmax`] on AVX-512: a greater-than mask per 16 values and two masked moves.
///
/// # Safety
/// AVX-512 F/BW/VL available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn argmax_avx512(values: &[f32]) -> u32 {
    use std::arch::x86_64::*;
    let mut best_value = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut best = _mm512_setzero_si512();
    let mut index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let step = _mm512_set1_epi32(16);
    let mut chunks = values.chunks_exact(16);
    for chunk in &mut chunks {
        // SAFETY: a chunk is 16 floats.
        let v = unsafe { _mm512_loadu_ps(chunk.as_ptr()) };
        // Ordered compare: false for NaN, so NaN never wins.
        let take = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, best_value);
        best_value = _mm512_mask_mov_ps(best_value, take, v);
        best = _mm512_mask_mov_epi32(best, take, index);
        index = _mm512_add_epi32(index, step);
    }
    let (mut lane_value, mut lane_index) = ([0.0f32; 16], [0u32; 16]);
    // SAFETY: 16 floats and 16 u32 of room.
    unsafe {
        _mm512_storeu_ps(lane_value.as_mut_ptr(), best_value);
        _mm512_storeu_si512(lane_index.as_mut_ptr() as *mut __m512i, best);
    }
    merge_lanes(&lane_value, &lane_index, values, chunks.remainder())
}

/// [`argmax`]'s portable body: the same sixteen lanes in plain Rust.
fn argmax_lanes(values: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut best_value = [f32::NEG_INFINITY; LANES];
    let mut best = [0u32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for (c, chunk) in (&mut chunks).enumerate() {
        let base = (c * LANES) as u32;
        for l in 0..LANES {
            let take = chunk[l] > best_value[l];
            best_value[l] = if take { chunk[l] } else { best_value[l] };
            best[l] = if take { base + l as u32 } else { best[l] };
        }
    }
    merge_lanes(&best_value, &best, values, chunks.remainder())
}

/// The lanes' winner (the smaller index on ties), then the values past the last whole 16.
fn merge_lanes(best_value: &[f32; 16], best: &[u32; 16], values: &[f32], tail: &[f32]) -> u32 {
    let mut winner = 0u32;
    let mut winner_value = f32::NEG_INFINITY;
    for (&v, &i) in best_value.iter().zip(best) {
        if v > winner_value || (v == winner_value && v > f32::NEG_INFINITY && i < winner) {
            winner = i;
            winner_value = v;
        }
    }
    let tail_start = values.len() - tail.len();
    for (i, &v) in tail.iter().enumerate() {
        if v > winner_value {
            winner = (tail_start + i) as u32;
            winner_value = v;
        }
    }
    winner
}

/// Elementwise passes over at least this many floats (1 MiB) are split between threads
/// (prefill activations: OPT-125m's batch-16 prompt is 1.5 M floats a hidden-sized buffer);
/// shorter ones, a decode step's (OPT-1.3B's batch-16 FFN activation is 131 k floats), run on
/// the calling thread, where a fork-join would cost about what it saves.
const ELEMENTWISE_PARALLEL: usize = 1 << 18;
/// Floats per task of a parallel elementwise pass (64 KiB).
const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// Runs `f` over `x` in chunks, on every thread when `x` is long. Why: each of these passes
/// read and wrote a prefill's activations on one thread while the other waited (relu, the
/// residual adds, the query scale and the KV rounding: about 3% of OPT-125m's batch-16 prefill
/// on the 2-core Zen 4).
fn elementwise(x: &mut [f32], f: impl Fn(&mut [f32]) + Sync) {
    if x.len() >= ELEMENTWISE_PARALLEL {
        x.par_chunks_mut(ELEMENTWISE_CHUNK).for_each(&f);
    } else {
        f(x);
    }
}

/// Runs `f` over matching chunks of `dst` and `src` (the same length), on every thread when
/// they are at least `parallel_from` long: the two-operand form of [`elementwise`].
fn zip_chunks<T: Send>(
    dst: &mut [T],
    src: &[f32],
    parallel_from: usize,
    f: impl Fn(&mut [T], &[f32]) + Sync,
) {
    if src.len() >= parallel_from {
        dst.par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(src.par_chunks(ELEMENTWISE_CHUNK))
            .for_each(|(d, s)| f(d, s));
    } else {
        f(dst, src);
    }
}

/// max(x, 0) in place (NaN becomes 0, as `f32::max` gives): OPT's FFN activation, applied to
/// the up-projection's output buffer. Written as a compare and select, which vectorises
/// (`f32::max` in a loop did not).
pub fn relu_inplace(x: &mut [f32]) {
    elementwise(x, |c| {
        for v in c {
            *v = if *v > 0.0 { *v } else { 0.0 };
        }
    });
}

/// x *= factor in place: OPT scales the queries after their projection.
pub fn scale_inplace(x: &mut [f32], factor: f32) {
    elementwise(x, |c| c.iter_mut().for_each(|v| *v *= factor));
}

/// acc += x, elementwise: the residual connections.
pub fn add_inplace(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len(), "add_inplace: lengths differ");
    zip_chunks(acc, x, ELEMENTWISE_PARALLEL, |a, b| {
        a.iter_mut().zip(b).for_each(|(a, b)| *a += b)
    });
}

/// Floats of attention scratch beyond `num_heads` scores per key that a single query row needs
/// to be split by keys (see [`attention`]): the parts' partial outputs and statistics. Callers
/// that size scratch for a cache of `max_len` keys add this to `max_len * num_heads`.
pub fn attention_partials_len(num_heads: usize, head_dim: usize) -> usize {
    attention::partials_len(num_heads, head_dim)
}

/// The scratch (f32 count) with which [`attention`] takes its fastest path for any query
/// length over a cache of up to `max_len` keys: the scores of the larger of the thread count
/// and the head count of rows (parallel prefill rows, or every head of a decode row), plus the
/// partials of a decode row split by keys. The executor sizes its workspace with this, and
/// `planner profile` times attention with it, so both run the same schedule.
pub fn attention_scratch_len(max_len: usize, num_heads: usize, head_dim: usize) -> usize {
    max_len * rayon::current_num_threads().max(num_heads).max(1)
        + attention_partials_len(num_heads, head_dim)
}

/// Causal multi-head attention for one sequence.
///
/// q: [q_len, nh*hd]; k, v: the cache rows [kv_len, nh*hd] (row stride nh*hd) in the cache's
/// element type (both the same; an f32 slice converts with `.into()`), the q rows being
/// the last q_len positions. key_valid[j] false masks key j (left padding). Query i attends keys
/// 0..=kv_len-q_len+i that are valid; a query with no valid key outputs zeros. Scores are
/// q·k * scale. out: [q_len, nh*hd]. scratch: at least kv_len f32 (caller-owned, so the decode
/// loop allocates nothing). Given room for several rows (n * kv_len floats, n >= 2), query rows
/// run on up to n threads: useful for prefill of a single sequence; a caller that already runs
/// sequences in parallel passes kv_len floats per sequence. A single query row runs fastest
/// with `nh * kv_len + attention_partials_len(nh, hd)` floats: its keys are then split into
/// contiguous parts that run in parallel and are merged (how the parts fall depends on kv_len
/// only, never on the thread count).
#[allow(clippy::too_many_arguments)]
pub fn attention(
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
    let d = num_heads * head_dim;
    assert!(
        q_len <= kv_len,
        "attention: q_len ({q_len}) must not exceed kv_len ({kv_len})"
    );
    assert_eq!(
        q.len(),
        q_len * d,
        "attention: q must be [q_len, num_heads*head_dim]"
    );
    assert!(
        k.len() >= kv_len * d && v.len() >= kv_len * d,
        "attention: k and v must hold kv_len rows of num_heads*head_dim"
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
        "attention: scratch needs at least kv_len floats"
    );
    let a = attention::AttnRows {
        q,
        q_len,
        k,
        v,
        kv_len,
        key_valid,
        num_heads,
        head_dim,
        scale,
    };
    attention::attention_on(&a, out, scratch, linear::Isa::detect());
}

#[cfg(test)]
mod tests;
