//! The cost model (design section 4): how long the executor takes to run a policy on a machine.
//!
//! Every term is a named function documented under the same name in `docs/cost-model.md`. Each
//! returns seconds for one decoder layer and the whole block (all `nb` GPU batches) in one stage,
//! except [`lm_head`], which is per stage. For a fixed [`Scenario`] every term is affine in the
//! placement shares, which is what lets the solver read LP coefficients off the same functions.
//!
//! How the terms combine follows the executor's schedule (zig-zag block schedule, design 1):
//! - the weights of layer j+1 are prefetched while layer j computes (double buffer), and KV cache and
//!   activations of the next/previous GPU batch are loaded/stored while the current one computes, so
//!   the copy channels overlap compute: a layer's time is the max over channels ([`layer_time`]);
//! - disk reads and disk writes share one device queue, so they add ([`LayerTerms::disk`]);
//! - within one GPU batch, compute is serialized: the CPU and GPU halves of a split linear layer run
//!   at the same time ([`linear_time`] is their max), but linear layers, attention and pointwise
//!   work follow one another, and delegated CPU attention leaves the GPU idle ([`LayerTerms::comp`]);
//! - the LM head runs after the last layer of each stage and overlaps nothing ([`lm_head`]);
//! - pipeline fill (the first layer's weights before any compute) is not modelled.

use crate::memory::{self, LinearKind, MemoryPlan, LINEAR_KINDS};
use crate::model::ModelSpec;
use crate::policy::Policy;
use crate::profile::{CapacityOverrides, CpuRates, DiskRates, GpuRates, Profile, GIB};
use crate::shares::{Scenario, Shares};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Generation stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The prompt: s tokens per sequence at once.
    Prefill,
    /// One new token per sequence against the cache.
    Decode,
}

/// Everything the terms read: the model, the machine's rates, and the scenario.
#[derive(Debug, Clone, Copy)]
pub struct CostInputs<'a> {
    pub model: &'a ModelSpec,
    pub gpu: Option<GpuRates>,
    pub cpu: CpuRates,
    pub disk: DiskRates,
    pub scenario: Scenario,
}

impl<'a> CostInputs<'a> {
    /// Inputs for `model` on `profile` under `scenario`.
    pub fn new(model: &'a ModelSpec, profile: &Profile, scenario: Scenario) -> CostInputs<'a> {
        CostInputs {
            model,
            gpu: if scenario.has_gpu {
                profile.gpu_rates()
            } else {
                None
            },
            cpu: profile.cpu_rates(
                scenario.gpu_batch_size,
                scenario.gpu_batch_size * scenario.prompt_len,
            ),
            disk: profile.disk_rates(),
            scenario,
        }
    }

    fn bls(&self) -> f64 {
        self.scenario.block_size() as f64
    }
    fn gbs(&self) -> f64 {
        self.scenario.gpu_batch_size as f64
    }
    fn nb(&self) -> f64 {
        self.scenario.num_gpu_batches as f64
    }
    fn elem(&self) -> f64 {
        self.model.dtype.bytes() as f64
    }
    fn h1(&self) -> f64 {
        self.model.hidden_size as f64
    }
    fn kv_stored(&self) -> f64 {
        memory::kv_bytes_per_position(self.model, &self.scenario.compression)
    }
    fn kv_raw(&self) -> f64 {
        self.model.kv_bytes_per_token_per_layer(self.model.dtype) as f64
    }
    fn act_per_token(&self) -> f64 {
        self.model.activation_bytes_per_token(self.model.dtype) as f64
    }
}

/// Roofline: an operation takes as long as its arithmetic or its memory traffic, whichever is
/// longer.
pub fn roofline_time(flops: f64, bytes: f64, flop_rate: f64, byte_rate: f64) -> f64 {
    (flops / flop_rate).max(bytes / byte_rate)
}

/// Tokens per sequence processed in a stage: s in prefill, 1 in decode.
pub fn tokens_per_sequence(sc: &Scenario, stage: Stage) -> f64 {
    match stage {
        Stage::Prefill => sc.prompt_len as f64,
        Stage::Decode => 1.0,
    }
}

/// Average positions a decode step attends to: the k-th of the n - 1 decode steps attends s + k
/// positions, so the average is s + n/2.
pub fn decode_context(sc: &Scenario) -> f64 {
    sc.prompt_len as f64 + sc.gen_len as f64 / 2.0
}

fn kind_weight_bytes(ci: &CostInputs, kind: LinearKind) -> f64 {
    let compressed = ci.scenario.compression.weights;
    memory::linear_weight_bytes(ci.model, kind, compressed)
        + if kind == LinearKind::Qkv {
            memory::layer_norm_bytes(ci.model, compressed)
        } else {
            0.0
        }
}

// ---------------------------------------------------------------------------------------------
// CPU -> GPU (PCIe host-to-device)

/// Non-GPU weights computed on the GPU, copied once per layer per stage for the whole block from
/// pinned host memory (CPU-resident weights live in pinned memory; disk reads land in pinned
/// buffers): sum over kinds of (wc_gpu + wd_gpu)_k * bytes_k / h2d_pinned.
pub fn ctog_weights(ci: &CostInputs, _stage: Stage, per_kind: &[Shares; 4]) -> f64 {
    let Some(gpu) = ci.gpu else { return 0.0 };
    let bytes: f64 = LINEAR_KINDS
        .iter()
        .zip(per_kind)
        .map(|(&k, s)| s.weights_copied_to_gpu() * kind_weight_bytes(ci, k))
        .sum();
    bytes / gpu.h2d_pinned_bytes_per_s
}

/// Without CPU delegation, decode attention runs on the GPU, so the non-GPU cache is copied in:
/// bls * (s + n/2) * kv * (cc / h2d_pageable + cd / h2d_pinned) (CPU-resident cache is pageable,
/// disk-resident cache arrives in pinned staging buffers). Zero in prefill and with delegation.
pub fn ctog_cache(ci: &CostInputs, stage: Stage, s: &Shares) -> f64 {
    let Some(gpu) = ci.gpu else { return 0.0 };
    if stage == Stage::Prefill || ci.scenario.cpu_attention {
        return 0.0;
    }
    let bytes = ci.bls() * decode_context(&ci.scenario) * ci.kv_stored();
    bytes * (s.cache_cpu / gpu.h2d_pageable_bytes_per_s + s.cache_disk / gpu.h2d_pinned_bytes_per_s)
}

/// Hidden states of non-GPU activations loaded for each GPU batch: (hc + hd) * bls * tokens *
/// h1 * e / h2d_pinned.
pub fn ctog_activations(ci: &CostInputs, stage: Stage, s: &Shares) -> f64 {
    let Some(gpu) = ci.gpu else { return 0.0 };
    let bytes = ci.bls() * tokens_per_sequence(&ci.scenario, stage) * ci.act_per_token();
    (s.activations_cpu + s.activations_disk) * bytes / gpu.h2d_pinned_bytes_per_s
}

/// Outputs of the CPU half of each split linear layer, sent to the GPU where the layer's output is
/// assembled: sum over kinds of (wc_cpu + wd_cpu)_k * bls * tokens * out_k * e / h2d_pinned.
pub fn ctog_split_outputs(ci: &CostInputs, stage: Stage, per_kind: &[Shares; 4]) -> f64 {
    let Some(gpu) = ci.gpu else { return 0.0 };
    let rows = ci.bls() * tokens_per_sequence(&ci.scenario, stage);
    let bytes: f64 = LINEAR_KINDS
        .iter()
        .zip(per_kind)
        .map(|(&k, s)| s.linear_share_on_cpu() * rows * k.dims(ci.model).1 as f64 * ci.elem())
        .sum();
    bytes / gpu.h2d_pinned_bytes_per_s
}

/// With CPU delegation in decode, the attention output of the sequences whose cache is off the GPU
/// goes back to the GPU: (cc + cd) * bls * h1 * e / h2d_pinned.
pub fn ctog_attention_outputs(ci: &CostInputs, stage: Stage, s: &Shares) -> f64 {
    let Some(gpu) = ci.gpu else { return 0.0 };
    if stage == Stage::Prefill || !ci.scenario.cpu_attention {
        return 0.0;
    }
    (s.cache_cpu + s.cache_disk) * ci.bls() * ci.h1() * ci.elem() / gpu.h2d_pinned_bytes_per_s
}

// ---------------------------------------------------------------------------------------------
// GPU -> CPU (PCIe device-to-host)

/// KV cache written back to its non-GPU home: in prefill the whole prompt's cache (made on the GPU),
/// in decode without delegation the new position: bls * positions * kv * (cc / d2h_pageable +
/// cd / d2h_pinned). With delegation the decode stage's new K and V travel in
/// [`gtoc_attention_inputs`] instead.
pub fn gtoc_cache(ci: &CostInputs, stage: Stage, s: &Shares) -> f64 {
    let Some(gpu) = ci.gpu else { return 0.0 };
    let positions = match stage {
        Stage::Prefill => ci.scenario.prompt_len as f64,
        Stage::Decode if ci.scenario.cpu_attention => return 0.0,
        Stage::Decode => 1.0,
    };
    let bytes = ci.bls() * positions * ci.kv_stored();
    bytes * (s.cache_cpu / gpu.d2h_pageable_bytes_per_s + s.cache_disk / gpu.d2h_pinned_bytes_per_s)
}

/// Hidden states of non-GPU activations stored after each GPU batch: (hc + hd) * bls * tokens *
/// h1 * e / d2h_pinned.
pub fn gtoc_activations(ci: &CostInputs, stage: Stage, s: &Shares) -> f64 {
    let Some(gpu) = ci.gpu else { return 0.0 };
    let bytes = ci.bls() * tokens_per_sequence(&ci.scenario, stage) * ci.act_per_token();
    (s.activations_cpu + s.activations_disk) * bytes / gpu.d2h_pinned_bytes_per_s
}

/// Inputs of each split linear layer sent to the CPU half: sum over kinds of (wc_cpu + wd_cpu)_k *
/// bls * tokens * in_k * e / d2h_pinned. The whole input is needed whenever the CPU share is above
/// zero; charging it in proportion to the share keeps the program linear and is exact at shares 0
/// and 1 (an under-estimate in between; these copies are small next to the weights).
pub fn gtoc_split_inputs(ci: &CostInputs, stage: Stage, per_kind: &[Shares; 4]) -> f64 {
    let Some(gpu) = ci.gpu else { return 0.0 };
    let rows = ci.bls() * tokens_per_sequence(&ci.scenario, stage);
    let bytes: f64 = LINEAR_KINDS
        .iter()
        .zip(per_kind)
        .map(|(&k, s)| s.linear_share_on_cpu() * rows * k.dims(ci.model).0 as f64 * ci.elem())
        .sum();
    bytes / gpu.d2h_pinned_bytes_per_s
}

/// With CPU delegation in decode, the new query, key and value of the sequences whose cache is off
/// the GPU go to the CPU: (cc + cd) * bls * 3 h1 * e / d2h_pinned.
pub fn gtoc_attention_inputs(ci: &CostInputs, stage: Stage, s: &Shares) -> f64 {
    let Some(gpu) = ci.gpu else { return 0.0 };
    if stage == Stage::Prefill || !ci.scenario.cpu_attention {
        return 0.0;
    }
    (s.cache_cpu + s.cache_disk) * ci.bls() * 3.0 * ci.h1() * ci.elem() / gpu.d2h_pinned_bytes_per_s
}

// ---------------------------------------------------------------------------------------------
// Disk -> CPU and CPU -> disk

/// Disk-resident weights read once per layer per stage: wd * layer_bytes / disk_read.
pub fn dtoc_weights(ci: &CostInputs, _stage: Stage, s: &Shares) -> f64 {
    s.weights_disk() * memory::layer_weight_bytes_stored(ci.model, &ci.scenario.compression)
        / ci.disk.read_bytes_per_s
}

/// Disk-resident cache read in decode: cd * bls * (s + n/2) * kv / disk_read. Zero in prefill.
pub fn dtoc_cache(ci: &CostInputs, stage: Stage, s: &Shares) -> f64 {
    if stage == Stage::Prefill {
        return 0.0;
    }
    s.cache_disk * ci.bls() * decode_context(&ci.scenario) * ci.kv_stored()
        / ci.disk.read_bytes_per_s
}

/// Disk-resident activations read: hd * bls * tokens * h1 * e / disk_read.
pub fn dtoc_activations(ci: &CostInputs, stage: Stage, s: &Shares) -> f64 {
    s.activations_disk * ci.bls() * tokens_per_sequence(&ci.scenario, stage) * ci.act_per_token()
        / ci.disk.read_bytes_per_s
}

/// New KV cache written to disk: cd * bls * positions * kv / disk_write (s positions in prefill,
/// 1 in decode).
pub fn ctod_cache(ci: &CostInputs, stage: Stage, s: &Shares) -> f64 {
    s.cache_disk * ci.bls() * tokens_per_sequence(&ci.scenario, stage) * ci.kv_stored()
        / ci.disk.write_bytes_per_s
}

/// Disk-resident activations written: hd * bls * tokens * h1 * e / disk_write.
pub fn ctod_activations(ci: &CostInputs, stage: Stage, s: &Shares) -> f64 {
    s.activations_disk * ci.bls() * tokens_per_sequence(&ci.scenario, stage) * ci.act_per_token()
        / ci.disk.write_bytes_per_s
}

// ---------------------------------------------------------------------------------------------
// Compute

/// (FLOPs, bytes touched) of one linear kind over one GPU batch in a stage: 2 * rows * in * out
/// FLOPs; bytes = the stored weights (plus, if compressed, writing and reading the dequantized
/// 16-bit matrix) + the input and output rows.
pub fn linear_work(ci: &CostInputs, stage: Stage, kind: LinearKind) -> (f64, f64) {
    let (i, o) = kind.dims(ci.model);
    let (i, o) = (i as f64, o as f64);
    let rows = ci.gbs() * tokens_per_sequence(&ci.scenario, stage);
    let flops = 2.0 * rows * i * o;
    let stored = memory::linear_weight_bytes(ci.model, kind, ci.scenario.compression.weights);
    let dequantized = if ci.scenario.compression.weights {
        2.0 * (i * o + o) * 2.0
    } else {
        0.0
    };
    let bytes = stored + dequantized + rows * (i + o) * ci.elem();
    (flops, bytes)
}

/// GPU half of one linear kind for the block: nb * (wg + wc_gpu + wd_gpu) * roofline(FLOPs, bytes,
/// gpu matmul rate of the stage, hbm). A share of the output columns does that share of the work.
pub fn gpu_linear(ci: &CostInputs, stage: Stage, kind: LinearKind, s: &Shares) -> f64 {
    let Some(gpu) = ci.gpu else { return 0.0 };
    let (flops, bytes) = linear_work(ci, stage, kind);
    let rate = match stage {
        Stage::Prefill => gpu.matmul_prefill_flops,
        Stage::Decode => gpu.matmul_decode_flops,
    };
    ci.nb() * s.linear_share_on_gpu() * roofline_time(flops, bytes, rate, gpu.hbm_bytes_per_s)
}

/// CPU half of one linear kind for the block: nb * (wc_cpu + wd_cpu) * roofline(FLOPs, bytes, cpu
/// matmul rate of the stage, dram). At batch-1 decode the DRAM side binds (HeteGen's observation).
pub fn cpu_linear(ci: &CostInputs, stage: Stage, kind: LinearKind, s: &Shares) -> f64 {
    let (flops, bytes) = linear_work(ci, stage, kind);
    let rate = match stage {
        Stage::Prefill => ci.cpu.matmul_prefill_flops,
        Stage::Decode => ci.cpu.matmul_decode_flops,
    };
    ci.nb() * s.linear_share_on_cpu() * roofline_time(flops, bytes, rate, ci.cpu.dram_bytes_per_s)
}

/// (FLOPs, bytes touched) of attention for one GPU batch in a stage.
/// Prefill (causal, s queries): 2 h1 s (s+1) FLOPs per sequence; bytes = Q, K, V and output
/// (4 s h1 e) + scores written and read (2 nh s^2 e) + quantizing the new cache when compressed.
/// Decode (1 query, s + n/2 positions): 4 h1 (s + n/2) FLOPs per sequence; bytes = the cache read
/// (plus writing and reading its dequantized copy when compressed) + query and output.
pub fn attention_work(ci: &CostInputs, stage: Stage) -> (f64, f64) {
    let m = ci.model;
    let e = ci.elem();
    let h1 = ci.h1();
    let gbs = ci.gbs();
    let compressed = ci.scenario.compression.kv_cache;
    match stage {
        Stage::Prefill => {
            let s = ci.scenario.prompt_len as f64;
            let flops = m.attention_flops_per_layer(1, 1) as f64 * s * (s + 1.0) / 2.0;
            let mut bytes = 4.0 * s * h1 * e + 2.0 * m.num_heads as f64 * s * s * e;
            if compressed {
                bytes += s * (ci.kv_raw() + ci.kv_stored());
            }
            (gbs * flops, gbs * bytes)
        }
        Stage::Decode => {
            let ctx = decode_context(&ci.scenario);
            let flops = m.attention_flops_per_layer(1, 1) as f64 * ctx;
            let mut bytes = ctx * ci.kv_stored() + 2.0 * h1 * e;
            if compressed {
                bytes += 2.0 * ctx * ci.kv_raw();
            }
            (gbs * flops, gbs * bytes)
        }
    }
}

/// Attention on the GPU for the block: nb * share * roofline(attention work, gpu attention rate of
/// the stage, hbm). Prefill: all of it (on a GPU host the prompt's attention runs on the GPU, where
/// its K and V are produced). Decode: share = cg, plus cc + cd without CPU delegation.
pub fn gpu_attention(ci: &CostInputs, stage: Stage, s: &Shares) -> f64 {
    let Some(gpu) = ci.gpu else { return 0.0 };
    let (flops, bytes) = attention_work(ci, stage);
    let (rate, share) = match stage {
        Stage::Prefill => (gpu.attention_prefill_flops, 1.0),
        Stage::Decode => (
            gpu.attention_decode_flops,
            if ci.scenario.cpu_attention {
                s.cache_gpu
            } else {
                1.0
            },
        ),
    };
    ci.nb() * share * roofline_time(flops, bytes, rate, gpu.hbm_bytes_per_s)
}

/// Attention on the CPU for the block: nb * share * roofline(attention work, cpu attention rate,
/// dram). On a host without a GPU, all attention in both stages (share 1); with a GPU, the decode
/// attention over cc + cd when CPU delegation is on.
pub fn cpu_attention(ci: &CostInputs, stage: Stage, s: &Shares) -> f64 {
    let share = if ci.gpu.is_none() {
        1.0
    } else if stage == Stage::Decode && ci.scenario.cpu_attention {
        s.cache_cpu + s.cache_disk
    } else {
        0.0
    };
    let (flops, bytes) = attention_work(ci, stage);
    ci.nb()
        * share
        * roofline_time(
            flops,
            bytes,
            ci.cpu.attention_flops,
            ci.cpu.dram_bytes_per_s,
        )
}

/// Layer norms, residual adds, bias and ReLU for the block, bound by memory bandwidth on the device
/// that holds the hidden state (the GPU when there is one): nb * gbs * tokens * (10 h1 + 2 h2) * e /
/// bandwidth (two norms read and write h1, two residual adds read 2 h1 and write h1, ReLU reads and
/// writes h2).
pub fn pointwise(ci: &CostInputs, stage: Stage) -> f64 {
    let per_token = (10.0 * ci.h1() + 2.0 * ci.model.ffn_dim as f64) * ci.elem();
    let bytes = ci.nb() * ci.gbs() * tokens_per_sequence(&ci.scenario, stage) * per_token;
    let bandwidth = match ci.gpu {
        Some(g) => g.hbm_bytes_per_s,
        None => ci.cpu.dram_bytes_per_s,
    };
    bytes / bandwidth
}

/// Time of one linear kind: its CPU and GPU halves run at the same time, and the layer waits for
/// both: max([`gpu_linear`], [`cpu_linear`]).
pub fn linear_time(gpu_half: f64, cpu_half: f64) -> f64 {
    gpu_half.max(cpu_half)
}

/// The LM head (logits of the last position of each sequence), once per stage for the block, on
/// the GPU if there is one (the embeddings live there), else the CPU: nb * roofline(2 gbs E V,
/// V E e + gbs V 4, matmul rate of the stage, bandwidth) with E the embedding width, V the vocabulary.
/// Runs after the last layer; overlaps nothing.
pub fn lm_head(ci: &CostInputs, stage: Stage) -> f64 {
    let v = ci.model.vocab_size as f64;
    let width = ci.model.word_embed_proj_dim as f64;
    let flops = 2.0 * ci.gbs() * width * v;
    let bytes = v * width * ci.elem() + ci.gbs() * v * 4.0;
    let (rate, bandwidth) = match (ci.gpu, stage) {
        (Some(g), Stage::Prefill) => (g.matmul_prefill_flops, g.hbm_bytes_per_s),
        (Some(g), Stage::Decode) => (g.matmul_decode_flops, g.hbm_bytes_per_s),
        (None, Stage::Prefill) => (ci.cpu.matmul_prefill_flops, ci.cpu.dram_bytes_per_s),
        (None, Stage::Decode) => (ci.cpu.matmul_decode_flops, ci.cpu.dram_bytes_per_s),
    };
    ci.nb() * roofline_time(flops, bytes, rate, bandwidth)
}

// ---------------------------------------------------------------------------------------------
// Combination

/// Every term of one layer in one stage, in seconds for the whole block.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LayerTerms {
    pub ctog_weights: f64,
    pub ctog_cache: f64,
    pub ctog_activations: f64,
    pub ctog_split_outputs: f64,
    pub ctog_attention_outputs: f64,
    pub gtoc_cache: f64,
    pub gtoc_activations: f64,
    pub gtoc_split_inputs: f64,
    pub gtoc_attention_inputs: f64,
    pub dtoc_weights: f64,
    pub dtoc_cache: f64,
    pub dtoc_activations: f64,
    pub ctod_cache: f64,
    pub ctod_activations: f64,
    /// [`gpu_linear`] per kind, in [`LINEAR_KINDS`] order.
    pub gpu_linear: [f64; 4],
    /// [`cpu_linear`] per kind.
    pub cpu_linear: [f64; 4],
    pub gpu_attention: f64,
    pub cpu_attention: f64,
    pub pointwise: f64,
}

/// Evaluates every term of one layer in `stage`; `per_kind[k]` is the placement with kind k's split.
pub fn layer_terms(ci: &CostInputs, stage: Stage, per_kind: &[Shares; 4]) -> LayerTerms {
    let s = &per_kind[0];
    let mut gpu_linear_by_kind = [0.0; 4];
    let mut cpu_linear_by_kind = [0.0; 4];
    for (i, &k) in LINEAR_KINDS.iter().enumerate() {
        gpu_linear_by_kind[i] = gpu_linear(ci, stage, k, &per_kind[i]);
        cpu_linear_by_kind[i] = cpu_linear(ci, stage, k, &per_kind[i]);
    }
    LayerTerms {
        ctog_weights: ctog_weights(ci, stage, per_kind),
        ctog_cache: ctog_cache(ci, stage, s),
        ctog_activations: ctog_activations(ci, stage, s),
        ctog_split_outputs: ctog_split_outputs(ci, stage, per_kind),
        ctog_attention_outputs: ctog_attention_outputs(ci, stage, s),
        gtoc_cache: gtoc_cache(ci, stage, s),
        gtoc_activations: gtoc_activations(ci, stage, s),
        gtoc_split_inputs: gtoc_split_inputs(ci, stage, per_kind),
        gtoc_attention_inputs: gtoc_attention_inputs(ci, stage, s),
        dtoc_weights: dtoc_weights(ci, stage, s),
        dtoc_cache: dtoc_cache(ci, stage, s),
        dtoc_activations: dtoc_activations(ci, stage, s),
        ctod_cache: ctod_cache(ci, stage, s),
        ctod_activations: ctod_activations(ci, stage, s),
        gpu_linear: gpu_linear_by_kind,
        cpu_linear: cpu_linear_by_kind,
        gpu_attention: gpu_attention(ci, stage, s),
        cpu_attention: cpu_attention(ci, stage, s),
        pointwise: pointwise(ci, stage),
    }
}

impl LayerTerms {
    /// CPU -> GPU channel: the sum of the ctog terms (one PCIe direction, one queue).
    pub fn ctog(&self) -> f64 {
        self.ctog_weights
            + self.ctog_cache
            + self.ctog_activations
            + self.ctog_split_outputs
            + self.ctog_attention_outputs
    }
    /// GPU -> CPU channel (the other PCIe direction, full duplex).
    pub fn gtoc(&self) -> f64 {
        self.gtoc_cache
            + self.gtoc_activations
            + self.gtoc_split_inputs
            + self.gtoc_attention_inputs
    }
    /// Disk reads.
    pub fn dtoc(&self) -> f64 {
        self.dtoc_weights + self.dtoc_cache + self.dtoc_activations
    }
    /// Disk writes.
    pub fn ctod(&self) -> f64 {
        self.ctod_cache + self.ctod_activations
    }
    /// The disk channel: reads and writes share one device, so they are serialized.
    pub fn disk(&self) -> f64 {
        self.dtoc() + self.ctod()
    }
    /// Compute, serialized within a GPU batch: each linear kind's [`linear_time`], then attention
    /// on either device, then pointwise work.
    pub fn comp(&self) -> f64 {
        self.linears() + self.comp_besides_linears()
    }
    /// Sum over kinds of [`linear_time`].
    pub fn linears(&self) -> f64 {
        (0..4)
            .map(|k| linear_time(self.gpu_linear[k], self.cpu_linear[k]))
            .sum()
    }
    /// The affine part of [`LayerTerms::comp`]: attention and pointwise work.
    pub fn comp_besides_linears(&self) -> f64 {
        self.gpu_attention + self.cpu_attention + self.pointwise
    }
    /// GPU busy time (its halves of the linears, its attention, pointwise work on a GPU host).
    pub fn gpu_busy(&self, has_gpu: bool) -> f64 {
        self.gpu_linear.iter().sum::<f64>()
            + self.gpu_attention
            + if has_gpu { self.pointwise } else { 0.0 }
    }
    /// CPU busy time (its halves of the linears, its attention, pointwise work on a CPU host).
    pub fn cpu_busy(&self, has_gpu: bool) -> f64 {
        self.cpu_linear.iter().sum::<f64>()
            + self.cpu_attention
            + if has_gpu { 0.0 } else { self.pointwise }
    }
}

/// Time of one layer in one stage: every channel overlaps the others, so the slowest binds:
/// max(ctog, gtoc, dtoc + ctod, comp).
pub fn layer_time(t: &LayerTerms) -> f64 {
    t.ctog().max(t.gtoc()).max(t.disk()).max(t.comp())
}

/// Which channel binds a layer's time.
pub fn binding_channel(t: &LayerTerms) -> Channel {
    let mut best = (Channel::Comp, t.comp());
    for (c, v) in [
        (Channel::Ctog, t.ctog()),
        (Channel::Gtoc, t.gtoc()),
        (Channel::Disk, t.disk()),
    ] {
        if v > best.1 {
            best = (c, v);
        }
    }
    best.0
}

/// The channels whose max is a layer's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// CPU -> GPU copies.
    Ctog,
    /// GPU -> CPU copies.
    Gtoc,
    /// Disk reads plus disk writes (one device).
    Disk,
    /// Compute.
    Comp,
}

impl Channel {
    /// Name as written in policies and reports.
    pub fn name(self) -> &'static str {
        match self {
            Channel::Ctog => "ctog",
            Channel::Gtoc => "gtoc",
            Channel::Disk => "disk",
            Channel::Comp => "comp",
        }
    }
}

/// Prefill time: l layers plus the LM head.
pub fn prefill_time(ci: &CostInputs, pre: &LayerTerms) -> f64 {
    ci.model.num_layers as f64 * layer_time(pre) + lm_head(ci, Stage::Prefill)
}

/// One decode step for the whole block: l layers plus the LM head.
pub fn decode_step_time(ci: &CostInputs, dec: &LayerTerms) -> f64 {
    ci.model.num_layers as f64 * layer_time(dec) + lm_head(ci, Stage::Decode)
}

/// Total time for the block: prefill plus n - 1 decode steps (the prefill emits the first token).
pub fn total_time(ci: &CostInputs, pre: &LayerTerms, dec: &LayerTerms) -> f64 {
    prefill_time(ci, pre) + ci.scenario.gen_len.saturating_sub(1) as f64 * decode_step_time(ci, dec)
}

/// Generation throughput: bls * n tokens over the total time (FlexGen's definition).
pub fn throughput(ci: &CostInputs, total_s: f64) -> f64 {
    ci.bls() * ci.scenario.gen_len as f64 / total_s
}

/// Physical lower bound for the policy: as if every channel overlapped every other across all
/// layers and stages, the busiest channel's total time, max over channels of (l * ch_prefill +
/// l * (n - 1) * ch_decode), with the LM heads counted as compute. The gap to [`total_time`] is
/// what imperfect overlap costs.
pub fn physical_lower_bound(ci: &CostInputs, pre: &LayerTerms, dec: &LayerTerms) -> f64 {
    let l = ci.model.num_layers as f64;
    let steps = ci.scenario.gen_len.saturating_sub(1) as f64;
    let total = |f: &dyn Fn(&LayerTerms) -> f64| l * f(pre) + l * steps * f(dec);
    let comp =
        total(&|t| t.comp()) + lm_head(ci, Stage::Prefill) + steps * lm_head(ci, Stage::Decode);
    comp.max(total(&|t| t.ctog()))
        .max(total(&|t| t.gtoc()))
        .max(total(&|t| t.disk()))
}

// ---------------------------------------------------------------------------------------------
// Evaluating a policy

/// Why a policy could not be evaluated.
#[derive(Debug, Error)]
pub enum CostError {
    /// The policy puts something on a GPU, the profile has none.
    #[error("policy needs a GPU (placement.*.gpu > 0 or compute.split < 1) but profile '{profile}' has no [gpu] section")]
    NeedsGpu { profile: String },
}

/// Per-kind placement of a policy: kind k's CPU share of non-GPU weights is compute.split.<k>.
pub fn per_kind_shares(policy: &Policy) -> [Shares; 4] {
    let split = policy.compute.split;
    let mut out = [Shares::from_policy(policy); 4];
    for (s, alpha) in out
        .iter_mut()
        .zip([split.qkv, split.out_proj, split.fc1, split.fc2])
    {
        let w = &policy.placement.weights;
        s.weights_cpu_computed_on_cpu = alpha * w.cpu;
        s.weights_cpu_computed_on_gpu = (1.0 - alpha) * w.cpu;
        s.weights_disk_computed_on_cpu = alpha * w.disk;
        s.weights_disk_computed_on_gpu = (1.0 - alpha) * w.disk;
    }
    out
}

/// One stage's channel times (seconds per layer, whole block) and the binding channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageBreakdown {
    pub ctog_s: f64,
    pub gtoc_s: f64,
    pub dtoc_s: f64,
    pub ctod_s: f64,
    pub comp_s: f64,
    /// GPU and CPU busy time inside `comp_s` (they overlap only within split linear layers).
    pub gpu_compute_s: f64,
    pub cpu_compute_s: f64,
    /// max(ctog, gtoc, dtoc + ctod, comp).
    pub layer_s: f64,
    /// ctog, gtoc, disk or comp.
    pub binding: Channel,
}

/// Peak bytes on one tier against what may be used, in GiB.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierUse {
    pub peak_gib: f64,
    pub capacity_gib: f64,
}

impl TierUse {
    /// Whether the peak fits (with a relative tolerance for solver rounding).
    pub fn fits(&self) -> bool {
        self.peak_gib <= self.capacity_gib * (1.0 + 1e-6) + 1e-9
    }
}

/// Memory per tier.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryUse {
    pub gpu: TierUse,
    pub cpu: TierUse,
    pub disk: TierUse,
}

impl MemoryUse {
    /// Whether every tier fits.
    pub fn fits(&self) -> bool {
        self.gpu.fits() && self.cpu.fits() && self.disk.fits()
    }
}

/// How the solver produced the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SolverInfo {
    /// `optimal` (best over the enumerated configurations).
    pub status: String,
    /// Wall-clock time of the whole search.
    pub solve_ms: f64,
    /// Linear programs solved.
    pub programs_solved: u64,
    /// Configurations skipped because their homes alone exceed all tiers or their lower bound
    /// cannot beat the best found.
    pub programs_pruned: u64,
}

/// What the cost model predicts for a policy on a profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prediction {
    /// Generated tokens per second over the whole run (bls * n / total).
    pub throughput_tok_s: f64,
    /// Prefill time for the block.
    pub prefill_s: f64,
    /// One decode step for the whole block (time per generated token of every sequence).
    pub decode_s_per_token: f64,
    /// Prefill plus n - 1 decode steps.
    pub total_s: f64,
    /// [`physical_lower_bound`] and the throughput it allows.
    pub lower_bound_s: f64,
    pub lower_bound_throughput_tok_s: f64,
    pub prefill: StageBreakdown,
    pub decode: StageBreakdown,
    pub memory: MemoryUse,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solver: Option<SolverInfo>,
}

fn breakdown(t: &LayerTerms, has_gpu: bool) -> StageBreakdown {
    StageBreakdown {
        ctog_s: t.ctog(),
        gtoc_s: t.gtoc(),
        dtoc_s: t.dtoc(),
        ctod_s: t.ctod(),
        comp_s: t.comp(),
        gpu_compute_s: t.gpu_busy(has_gpu),
        cpu_compute_s: t.cpu_busy(has_gpu),
        layer_s: layer_time(t),
        binding: binding_channel(t),
    }
}

/// Memory use of a plan against capacities from the profile and the policy's recorded overrides.
pub fn memory_use(
    plan: &MemoryPlan,
    profile: &Profile,
    overrides: &CapacityOverrides,
) -> MemoryUse {
    let cap = profile.capacities(overrides);
    MemoryUse {
        gpu: TierUse {
            peak_gib: plan.gpu.total() / GIB,
            capacity_gib: cap.gpu_bytes / GIB,
        },
        cpu: TierUse {
            peak_gib: plan.cpu.total() / GIB,
            capacity_gib: cap.cpu_bytes / GIB,
        },
        disk: TierUse {
            peak_gib: plan.disk.total() / GIB,
            capacity_gib: cap.disk_bytes / GIB,
        },
    }
}

/// Predicts what running `policy` for `model` on `profile` takes: the executor prints this next to
/// its measurements. Capacities are the profile's, with the overrides recorded in the policy.
pub fn evaluate(
    model: &ModelSpec,
    profile: &Profile,
    policy: &Policy,
) -> Result<Prediction, CostError> {
    if policy.needs_gpu() && !profile.has_gpu() {
        return Err(CostError::NeedsGpu {
            profile: profile.profile.name.clone(),
        });
    }
    let has_gpu = profile.has_gpu();
    let scenario = Scenario::from_policy(policy, has_gpu);
    let ci = CostInputs::new(model, profile, scenario);
    let per_kind = per_kind_shares(policy);
    let pre = layer_terms(&ci, Stage::Prefill, &per_kind);
    let dec = layer_terms(&ci, Stage::Decode, &per_kind);
    let total_s = total_time(&ci, &pre, &dec);
    let lower_bound_s = physical_lower_bound(&ci, &pre, &dec);
    let plan = memory::plan_placed(model, &scenario, &per_kind, policy.placement.weights.disk);
    Ok(Prediction {
        throughput_tok_s: throughput(&ci, total_s),
        prefill_s: prefill_time(&ci, &pre),
        decode_s_per_token: decode_step_time(&ci, &dec),
        total_s,
        lower_bound_s,
        lower_bound_throughput_tok_s: throughput(&ci, lower_bound_s),
        prefill: breakdown(&pre, has_gpu),
        decode: breakdown(&dec, has_gpu),
        memory: memory_use(&plan, profile, &policy.provenance.capacity_overrides),
        solver: None,
    })
}

#[cfg(test)]
mod tests {
    //! Each term against a value computed by hand for a tiny model (h1 = 64, h2 = 256, 4 heads,
    //! 2 layers, vocabulary 100, fp16) on a machine with round-number rates, s = 8, n = 4,
    //! gbs = 2, nb = 3 (bls = 6). Layer weights: qkv 64*192+192 = 12480 values, out_proj 4160,
    //! fc1 16640, fc2 16448, LayerNorms 256: 49984 values = 99968 bytes; KV 256 bytes per position;
    //! hidden state 128 bytes per token.
    use super::*;
    use crate::policy::Compression;
    use crate::profile::{CpuProfile, DiskProfile, Figure, GpuProfile, ProfileHeader, Source};

    fn fig(value: f64) -> Figure {
        Figure {
            value,
            source: Source::Assumed,
            note: "test".into(),
        }
    }

    fn machine() -> Profile {
        Profile {
            profile: ProfileHeader {
                name: "test".into(),
                description: "round numbers".into(),
                hardware: None,
            },
            gpu: Some(GpuProfile {
                name: "g".into(),
                memory_gib: fig(16.0),
                reserved_gib: fig(0.0),
                matmul_prefill_tflops: fig(10.0),
                matmul_decode_tflops: fig(1.0),
                attention_prefill_tflops: fig(5.0),
                attention_decode_tflops: fig(0.1),
                hbm_gbps: fig(100.0),
                h2d_pinned_gbps: fig(10.0),
                h2d_pageable_gbps: fig(5.0),
                d2h_pinned_gbps: fig(8.0),
                d2h_pageable_gbps: fig(4.0),
            }),
            cpu: CpuProfile {
                name: "c".into(),
                cores: fig(4.0),
                memory_gib: fig(64.0),
                reserved_gib: fig(0.0),
                matmul_prefill_tflops: fig(1.0),
                matmul_decode_tflops: fig(0.5),
                attention_tflops: fig(0.05),
                dram_gbps: fig(20.0),
                matmul_decode_by_rows: None,
            },
            disk: DiskProfile {
                name: "d".into(),
                capacity_gib: fig(100.0),
                read_gbps: fig(1.0),
                write_gbps: fig(0.5),
                buffered_read_gbps: None,
            },
        }
    }

    fn tiny() -> ModelSpec {
        let cfg = r#"{"model_type":"opt","hidden_size":64,"ffn_dim":256,"num_hidden_layers":2,
            "num_attention_heads":4,"vocab_size":100,"max_position_embeddings":64}"#;
        ModelSpec::from_hf_config_str(cfg, "tiny/config.json", "tiny").unwrap()
    }

    fn scenario(cpu_attention: bool, has_gpu: bool) -> Scenario {
        Scenario {
            prompt_len: 8,
            gen_len: 4,
            gpu_batch_size: 2,
            num_gpu_batches: 3,
            compression: Compression::default(),
            cpu_attention,
            has_gpu,
        }
    }

    fn close(got: f64, want: f64) {
        assert!(
            (got - want).abs() <= 1e-9 * want.abs().max(1e-30),
            "got {got:e}, want {want:e}"
        );
    }

    fn with(f: impl FnOnce(&mut Shares)) -> [Shares; 4] {
        let mut s = Shares::default();
        f(&mut s);
        [s; 4]
    }

    #[test]
    fn roofline_takes_the_slower_side() {
        close(roofline_time(2e9, 1e9, 1e12, 1e11), 1e-2);
        close(roofline_time(2e9, 1e6, 1e12, 1e11), 2e-3);
    }

    #[test]
    fn copy_terms_match_hand_values() {
        let (m, p) = (tiny(), machine());
        let ci = CostInputs::new(&m, &p, scenario(false, true));
        let dele = CostInputs::new(&m, &p, scenario(true, true));
        use Stage::*;
        // 0.5 * 99968 B / 10 GB/s
        let s = with(|s| s.weights_cpu_computed_on_gpu = 0.5);
        close(ctog_weights(&ci, Decode, &s), 4.9984e-6);
        // 6 seq * (8 + 4/2) pos * 256 B = 15360 B; 0.5 / 5 GB/s + 0.5 / 10 GB/s
        let s = with(|s| {
            s.cache_cpu = 0.5;
            s.cache_disk = 0.5
        });
        close(ctog_cache(&ci, Decode, &s[0]), 2.304e-6);
        close(ctog_cache(&ci, Prefill, &s[0]), 0.0);
        close(ctog_cache(&dele, Decode, &s[0]), 0.0);
        // 6 * 8 tokens * 128 B / 10 GB/s
        let s = with(|s| s.activations_cpu = 1.0);
        close(ctog_activations(&ci, Prefill, &s[0]), 6.144e-7);
        // 48 rows * (192 + 64 + 256 + 64) outputs * 2 B / 10 GB/s
        let s = with(|s| s.weights_cpu_computed_on_cpu = 1.0);
        close(ctog_split_outputs(&ci, Prefill, &s), 5.5296e-6);
        // 6 rows * (64 + 64 + 64 + 256) inputs * 2 B / 8 GB/s
        close(gtoc_split_inputs(&ci, Decode, &s), 6.72e-7);
        // 6 * 64 * 2 B / 10 GB/s
        let s = with(|s| s.cache_cpu = 1.0);
        close(ctog_attention_outputs(&dele, Decode, &s[0]), 7.68e-8);
        close(ctog_attention_outputs(&ci, Decode, &s[0]), 0.0);
        // 6 * 8 * 256 B / 4 GB/s (pageable)
        close(gtoc_cache(&ci, Prefill, &s[0]), 3.072e-6);
        // decode without delegation: one new position, 6 * 256 / 4 GB/s
        close(gtoc_cache(&ci, Decode, &s[0]), 3.84e-7);
        close(gtoc_cache(&dele, Decode, &s[0]), 0.0);
        // 6 * 128 B / 8 GB/s
        let s = with(|s| s.activations_disk = 1.0);
        close(gtoc_activations(&ci, Decode, &s[0]), 9.6e-8);
        // 6 * 128 B / 1 GB/s; 6 * 8 * 128 B / 1 GB/s; writes at 0.5 GB/s
        close(dtoc_activations(&ci, Prefill, &s[0]), 6.144e-6);
        close(ctod_activations(&ci, Decode, &s[0]), 1.536e-6);
        // 6 * 3 * 64 * 2 B / 8 GB/s
        let s = with(|s| s.cache_disk = 1.0);
        close(gtoc_attention_inputs(&dele, Decode, &s[0]), 2.88e-7);
        // 6 * 10 * 256 B / 1 GB/s
        close(dtoc_cache(&ci, Decode, &s[0]), 1.536e-5);
        close(dtoc_cache(&ci, Prefill, &s[0]), 0.0);
        // 6 * 8 * 256 B / 0.5 GB/s; decode: 6 * 256 / 0.5 GB/s
        close(ctod_cache(&ci, Prefill, &s[0]), 2.4576e-5);
        close(ctod_cache(&ci, Decode, &s[0]), 3.072e-6);
        // 99968 B / 1 GB/s
        let s = with(|s| s.weights_disk_computed_on_cpu = 1.0);
        close(dtoc_weights(&ci, Prefill, &s[0]), 9.9968e-5);
    }

    #[test]
    fn compute_terms_match_hand_values() {
        let (m, p) = (tiny(), machine());
        let ci = CostInputs::new(&m, &p, scenario(true, true));
        use Stage::*;
        // fc1 prefill, 16 rows: 524288 FLOP / 10 TFLOPS = 5.2e-8 s; bytes 33280 + 16*320*2 =
        // 43520 / 100 GB/s = 4.352e-7 s (memory-bound); times nb = 3.
        let s = with(|s| s.weights_gpu = 1.0);
        close(gpu_linear(&ci, Prefill, LinearKind::Fc1, &s[0]), 1.3056e-6);
        close(cpu_linear(&ci, Prefill, LinearKind::Fc1, &s[0]), 0.0);
        // qkv decode on the CPU, 2 rows: 49152 FLOP / 0.5 TFLOPS = 9.8e-8; bytes 24960 + 2*256*2 =
        // 25984 / 20 GB/s = 1.2992e-6; times 3.
        let s = with(|s| s.weights_disk_computed_on_cpu = 1.0);
        close(cpu_linear(&ci, Decode, LinearKind::Qkv, &s[0]), 3.8976e-6);
        // Prefill attention on the GPU: per sequence 4*64*(8*9/2) = 9216 FLOP and 4*8*64*2 +
        // 2*4*64*2 = 5120 B; 2 sequences: 10240 B / 100 GB/s = 1.024e-7 (memory-bound); times 3.
        close(gpu_attention(&ci, Prefill, &Shares::default()), 3.072e-7);
        // Delegated decode attention over CPU cache: per sequence 4*64*10 = 2560 FLOP,
        // 10*256 + 2*64*2 = 2816 B; 2 sequences: 5632 B / 20 GB/s = 2.816e-7; times 3.
        let s = with(|s| s.cache_cpu = 1.0);
        close(cpu_attention(&ci, Decode, &s[0]), 8.448e-7);
        close(gpu_attention(&ci, Decode, &s[0]), 0.0);
        // Pointwise prefill: (10*64 + 2*256)*2 = 2304 B per token, 48 tokens / 100 GB/s.
        close(pointwise(&ci, Prefill), 1.10592e-6);
        // LM head decode: 2*2*64*100 = 25600 FLOP / 1 TFLOPS = 2.56e-8; bytes 100*64*2 + 2*100*4 =
        // 13600 / 100 GB/s = 1.36e-7; times 3.
        close(lm_head(&ci, Decode), 4.08e-7);
        close(linear_time(2.0, 3.0), 3.0);
    }

    #[test]
    fn compressed_terms_match_hand_values() {
        let (m, p) = (tiny(), machine());
        let sc = Scenario {
            compression: Compression {
                weights: true,
                kv_cache: true,
            },
            ..scenario(true, true)
        };
        let ci = CostInputs::new(&m, &p, sc);
        // fc1: 16384 values in 256 groups of 36 B = 9216 B + 256 biases * 2 B = 9728 B stored;
        // dequantized 16640 values * 2 B written and read = 66560 B; rows 16 * 320 * 2 = 10240 B.
        // 86528 B / 100 GB/s = 8.6528e-7 s per GPU batch (memory-bound), times 3.
        let s = with(|s| s.weights_gpu = 1.0);
        close(
            gpu_linear(&ci, Stage::Prefill, LinearKind::Fc1, &s[0]),
            2.59584e-6,
        );
        // KV: 128 values per position = 2 groups * 36 B = 72 B. 6 * 10 * 72 B / 1 GB/s.
        let s = with(|s| s.cache_disk = 1.0);
        close(dtoc_cache(&ci, Stage::Decode, &s[0]), 4.32e-6);
        // Weights read from disk: 4 compressed matrices (12288 + 4096 + 16384 + 16384 values =
        // 768 groups * 36 B = 27648 B) + 16-bit biases and norms (576 + 256 values * 2 B = 1664 B).
        let s = with(|s| s.weights_disk_computed_on_gpu = 1.0);
        close(dtoc_weights(&ci, Stage::Decode, &s[0]), 29312e-9);
    }

    #[test]
    fn cpu_host_runs_everything_on_the_cpu() {
        let (m, mut p) = (tiny(), machine());
        p.gpu = None;
        let ci = CostInputs::new(&m, &p, scenario(true, false));
        let s = with(|s| {
            s.weights_cpu_computed_on_cpu = 1.0;
            s.cache_cpu = 1.0;
            s.activations_cpu = 1.0
        });
        let t = layer_terms(&ci, Stage::Prefill, &s);
        assert_eq!(t.ctog() + t.gtoc() + t.gpu_busy(false), 0.0);
        // Prefill attention on the CPU: 2 sequences * 9216 FLOP / 0.05 TFLOPS = 3.6864e-7 s
        // against 10240 B / 20 GB/s = 5.12e-7 s; times 3.
        close(t.cpu_attention, 1.536e-6);
        // Pointwise on the CPU: 48 tokens * 2304 B / 20 GB/s.
        close(t.pointwise, 5.5296e-6);
    }

    #[test]
    fn channels_combine_as_the_executor_schedules_them() {
        let t = LayerTerms {
            ctog_weights: 1.0,
            ctog_cache: 0.5,
            gtoc_cache: 0.7,
            dtoc_weights: 0.9,
            ctod_cache: 0.8,
            gpu_linear: [0.1, 0.2, 0.0, 0.0],
            cpu_linear: [0.3, 0.1, 0.0, 0.0],
            gpu_attention: 0.05,
            cpu_attention: 0.05,
            pointwise: 0.1,
            ..Default::default()
        };
        close(t.ctog(), 1.5);
        close(t.disk(), 1.7); // reads and writes share the disk
        close(t.comp(), 0.3 + 0.2 + 0.2); // per-kind max, then serialized
        close(layer_time(&t), 1.7);
        assert_eq!(binding_channel(&t), Channel::Disk);
    }

    #[test]
    fn totals_and_throughput_follow_the_definitions() {
        let (m, p) = (tiny(), machine());
        let ci = CostInputs::new(&m, &p, scenario(true, true));
        let pre = LayerTerms {
            ctog_weights: 1.0,
            ..Default::default()
        };
        let dec = LayerTerms {
            pointwise: 0.25,
            ..Default::default()
        };
        let head_pre = lm_head(&ci, Stage::Prefill);
        let head_dec = lm_head(&ci, Stage::Decode);
        // 2 layers; 3 decode steps after the prefill.
        let total = total_time(&ci, &pre, &dec);
        close(total, 2.0 + head_pre + 3.0 * (0.5 + head_dec));
        close(throughput(&ci, total), 6.0 * 4.0 / total);
        // Perfect overlap: ctog busy 2 s, compute 1.5 s + heads.
        close(
            physical_lower_bound(&ci, &pre, &dec),
            2.0f64.max(1.5 + head_pre + 3.0 * head_dec),
        );
    }

    #[test]
    fn every_term_is_affine_in_the_shares() {
        let m = ModelSpec::builtin("opt-1.3b").unwrap();
        let p = machine();
        let point = Shares::from_array([0.1, 0.2, 0.3, 0.15, 0.25, 0.3, 0.3, 0.4, 0.5, 0.25, 0.25]);
        for (cpu_attention, has_gpu) in [(true, true), (false, true), (true, false)] {
            for compression in [
                Compression::default(),
                Compression {
                    weights: true,
                    kv_cache: true,
                },
            ] {
                let sc = Scenario {
                    compression,
                    ..scenario(cpu_attention, has_gpu)
                };
                let ci = CostInputs::new(&m, &p, sc);
                for stage in [Stage::Prefill, Stage::Decode] {
                    let f = |s: &Shares| {
                        let t = layer_terms(&ci, stage, &[*s; 4]);
                        [
                            t.ctog(),
                            t.gtoc(),
                            t.disk(),
                            t.comp_besides_linears(),
                            t.gpu_linear[2],
                            t.cpu_linear[3],
                        ]
                    };
                    for i in 0..6 {
                        let form = crate::shares::AffineForm::of(|s| f(s)[i]);
                        let exact = f(&point)[i];
                        assert!(
                            (form.at(&point) - exact).abs() <= 1e-9 * exact.abs().max(1e-12),
                            "term {i} not affine"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn policy_needing_a_gpu_is_refused_on_a_cpu_host() {
        let m = ModelSpec::builtin("opt-125m").unwrap();
        let mut p = machine();
        p.gpu = None;
        let mut policy = Policy::all_cpu("opt-125m", 8, 4, 1);
        policy.placement.weights = crate::policy::Placement::ALL_GPU;
        let e = evaluate(&m, &p, &policy).unwrap_err().to_string();
        assert!(e.contains("needs a GPU"), "{e}");
        policy.placement.weights = crate::policy::Placement::ALL_CPU;
        assert!(evaluate(&m, &p, &policy).is_ok());
    }
}
