//! The memory plan: every buffer the executor holds on each tier, for a given model, scenario and
//! placement. The planner's memory constraints are this plan (read off as affine forms), and the
//! executor allocates and checks its buffers against the same plan, so a policy the planner calls
//! feasible cannot run out of memory in the executor for any buffer listed here.
//!
//! Sizes of individual tensors come from [`crate::model::ModelSpec`]; this module only decides how
//! many of each the executor keeps where.

use crate::model::ModelSpec;
use crate::policy::{Compression, Policy};
use crate::shares::{Scenario, Shares};
use serde::Serialize;

/// The kinds of linear layer in a decoder layer, each with its own split ratio in a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearKind {
    /// Q, K and V projections (h1 -> 3 h1).
    Qkv,
    /// Attention output projection (h1 -> h1).
    OutProj,
    /// FFN up projection (h1 -> h2).
    Fc1,
    /// FFN down projection (h2 -> h1).
    Fc2,
}

/// All kinds, in the order of `[Shares; 4]` arrays.
pub const LINEAR_KINDS: [LinearKind; 4] = [
    LinearKind::Qkv,
    LinearKind::OutProj,
    LinearKind::Fc1,
    LinearKind::Fc2,
];

impl LinearKind {
    /// (input width, output width) of the product.
    pub fn dims(self, model: &ModelSpec) -> (u64, u64) {
        let h1 = model.hidden_size;
        let h2 = model.ffn_dim;
        match self {
            LinearKind::Qkv => (h1, 3 * h1),
            LinearKind::OutProj => (h1, h1),
            LinearKind::Fc1 => (h1, h2),
            LinearKind::Fc2 => (h2, h1),
        }
    }

    /// Name used in policy files (`compute.split.<name>`).
    pub fn name(self) -> &'static str {
        match self {
            LinearKind::Qkv => "qkv",
            LinearKind::OutProj => "out_proj",
            LinearKind::Fc1 => "fc1",
            LinearKind::Fc2 => "fc2",
        }
    }
}

/// Bytes of one linear kind's weights and bias as stored (compressed matrices keep a 16-bit bias).
/// The layer's two LayerNorms are not part of any kind; [`layer_norm_bytes`] covers them.
pub fn linear_weight_bytes(model: &ModelSpec, kind: LinearKind, compressed: bool) -> f64 {
    let (i, o) = kind.dims(model);
    let e = model.dtype.bytes();
    if compressed {
        (crate::model::compressed_bytes(i * o) + o * 2) as f64
    } else {
        ((i * o + o) * e) as f64
    }
}

/// Bytes of one layer's two LayerNorms (weight and bias each), never compressed. They travel with
/// the Q/K/V projection's share.
pub fn layer_norm_bytes(model: &ModelSpec, compressed: bool) -> f64 {
    let e = if compressed { 2 } else { model.dtype.bytes() };
    (4 * model.hidden_size * e) as f64
}

/// Bytes of one decoder layer's weights as stored: [`ModelSpec::layer_weight_bytes`] or
/// [`ModelSpec::layer_weight_bytes_compressed`].
pub fn layer_weight_bytes_stored(model: &ModelSpec, compression: &Compression) -> f64 {
    if compression.weights {
        model.layer_weight_bytes_compressed() as f64
    } else {
        model.layer_weight_bytes(model.dtype) as f64
    }
}

/// KV-cache bytes per layer, per sequence, per position, as stored.
pub fn kv_bytes_per_position(model: &ModelSpec, compression: &Compression) -> f64 {
    if compression.kv_cache {
        model.kv_bytes_per_token_per_layer_compressed() as f64
    } else {
        model.kv_bytes_per_token_per_layer(model.dtype) as f64
    }
}

/// The whole KV cache of a block: l layers x bls sequences x (s + n) positions.
pub fn kv_cache_total_bytes(model: &ModelSpec, sc: &Scenario) -> f64 {
    model.num_layers as f64
        * sc.block_size() as f64
        * (sc.prompt_len + sc.gen_len) as f64
        * kv_bytes_per_position(model, &sc.compression)
}

/// Hidden states of a whole block at one layer boundary in the prefill stage (the larger stage):
/// bls x s tokens.
pub fn activations_total_bytes(model: &ModelSpec, sc: &Scenario) -> f64 {
    sc.block_size() as f64
        * sc.prompt_len as f64
        * model.activation_bytes_per_token(model.dtype) as f64
}

/// Weights outside the decoder layers (token and position embeddings, final LayerNorm, the tied LM
/// head, opt-350m's projections), kept whole, uncompressed, with the device that computes the head.
pub fn embedding_bytes(model: &ModelSpec) -> f64 {
    (model.params_outside_layers() * model.dtype.bytes()) as f64
}

/// The largest set of temporaries alive at once while one GPU batch runs one layer in the prefill
/// stage: the layer's input and residual hidden states, plus the largest of the Q/K/V output, the
/// FFN inner activation and the attention scores (materialized for the whole batch, all heads, in
/// the compute dtype), plus, with compressed weights, the largest matrix dequantized, plus the f32
/// logits of one GPU batch for the LM head.
pub fn largest_intermediate_bytes(model: &ModelSpec, sc: &Scenario) -> f64 {
    let e = model.dtype.bytes() as f64;
    let h1 = model.hidden_size as f64;
    let h2 = model.ffn_dim as f64;
    let nh = model.num_heads as f64;
    let s = sc.prompt_len as f64;
    let gbs = sc.gpu_batch_size as f64;
    let tokens = gbs * s;
    let temp_width = (3.0 * h1).max(h2).max(nh * s);
    let layer_temps = tokens * e * (2.0 * h1 + temp_width);
    let dequantized = if sc.compression.weights {
        (3.0 * h1 * h1).max(h1 * h2) * e
    } else {
        0.0
    };
    let logits = gbs * model.vocab_size as f64 * 4.0;
    layer_temps + dequantized + logits
}

/// Bytes of the executor's host compute buffers for a block (`OptWorkspace` in
/// executor/src/models/opt.rs, all f32, sized for the prefill of one GPU batch, and the block's
/// logits): seven `[gbs * s, h1]` buffers (hidden, normed, q, k, v, attention output, sublayer
/// output), the FFN's `[gbs * s, h2]`, opt-350m's embedding projection `[gbs * s, e]`, the last
/// positions' two `[gbs, h1]` and one `[gbs, e]`, the attention scratch (`s + n` keys for each of
/// `nh` heads; the executor takes the larger of heads and threads, and OPT has at least 12 heads;
/// plus the partial outputs of a decode row split by keys, `primitives::kernels::attention_partials_len`),
/// three `[bls, vocab]` logit buffers (the step's, the prefill's and the last step's), plus, with
/// compressed weights, the largest matrix dequantized, plus the matrix kernels' converted input
/// ([`kernel_input_scratch_bytes`]). The executor checks its own allocation against this (test
/// `workspace_bytes_are_the_memory_plans` in executor/tests/workspace_plan.rs). Not counted:
/// each worker thread's repacked weight slice (at most 512 KiB per thread; none when the weights
/// are packed into panels, which take nn.Linear's bytes for OPT shapes) and its copy of one
/// head's keys and values widened to f32 for prefill attention, with one tile's scores (about
/// 2.1 MiB per thread at most).
pub fn cpu_workspace_bytes(model: &ModelSpec, sc: &Scenario) -> f64 {
    let h1 = model.hidden_size as f64;
    let h2 = model.ffn_dim as f64;
    let embed = model.word_embed_proj_dim as f64;
    let projection = if model.word_embed_proj_dim != model.hidden_size {
        embed
    } else {
        0.0
    };
    let gbs = sc.gpu_batch_size as f64;
    let rows = gbs * sc.prompt_len as f64;
    let positions = (sc.prompt_len + sc.gen_len) as f64;
    let floats = rows * (7.0 * h1 + h2 + projection)
        + gbs * (2.0 * h1 + embed)
        + positions * model.num_heads as f64
        + primitives::kernels::attention_partials_len(
            model.num_heads as usize,
            model.head_dim() as usize,
        ) as f64
        + 3.0 * sc.block_size() as f64 * model.vocab_size as f64;
    let dequantized = if sc.compression.weights {
        (3.0 * h1 * h1).max(h1 * h2) * model.dtype.bytes() as f64
    } else {
        0.0
    };
    4.0 * floats + dequantized + kernel_input_scratch_bytes(model, sc)
}

/// Bytes of the converted input the matrix kernels keep on the calling thread after a GPU batch's
/// largest product (the prompt's `gbs * s` tokens into the wider of `h1` and `h2`), part of
/// [`cpu_workspace_bytes`]; the kernels' own test holds `linear_input_scratch_bytes` to what they
/// keep.
pub fn kernel_input_scratch_bytes(model: &ModelSpec, sc: &Scenario) -> f64 {
    let tokens = sc.gpu_batch_size * sc.prompt_len;
    let widest_input = model.ffn_dim.max(model.hidden_size);
    primitives::kernels::linear_input_scratch_bytes(tokens as usize, widest_input as usize) as f64
}

/// Bytes pinned for bounce buffers of pageable-to-device copies (two 64 MiB buffers), on hosts with
/// a GPU.
pub const PINNED_BOUNCE_BYTES: f64 = 2.0 * 64.0 * 1048576.0;

/// Bytes one tier holds, by purpose.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct TierBytes {
    /// Home of this tier's share of the decoder layers' weights.
    pub weights_home: f64,
    /// Home of this tier's share of the KV cache (all layers, all positions s + n).
    pub kv_cache_home: f64,
    /// Home of this tier's share of the block's hidden states at a layer boundary.
    pub activations_home: f64,
    /// Embeddings and LM head (on the GPU when there is one, else on the CPU).
    pub embeddings: f64,
    /// Double buffer for the weights of the layer being prefetched while the current one computes:
    /// on the GPU, the GPU-computed share of non-GPU weights (wc_gpu + wd_gpu); on the CPU, the
    /// disk-resident share read ahead (wd_cpu + wd_gpu).
    pub weight_buffers: f64,
    /// Double buffer for one GPU batch's KV cache in flight: on the GPU when attention over non-GPU
    /// cache runs there (no CPU delegation); on the CPU for cache read from and written to disk.
    pub kv_cache_buffers: f64,
    /// Double buffer for one GPU batch's hidden states in flight to or from another tier.
    pub activation_buffers: f64,
    /// Pinned bounce buffers for pageable copies (CPU, GPU hosts only).
    pub pinned_bounce: f64,
    /// Compute buffers: on the GPU one layer's temporaries for one GPU batch
    /// ([`largest_intermediate_bytes`]), on the CPU the executor's workspace
    /// ([`cpu_workspace_bytes`]).
    pub working: f64,
}

impl TierBytes {
    /// Sum over all purposes: the tier's peak.
    pub fn total(&self) -> f64 {
        self.weights_home
            + self.kv_cache_home
            + self.activations_home
            + self.embeddings
            + self.weight_buffers
            + self.kv_cache_buffers
            + self.activation_buffers
            + self.pinned_bounce
            + self.working
    }

    /// (name, bytes) pairs for reports.
    pub fn items(&self) -> [(&'static str, f64); 9] {
        [
            ("weights_home", self.weights_home),
            ("kv_cache_home", self.kv_cache_home),
            ("activations_home", self.activations_home),
            ("embeddings", self.embeddings),
            ("weight_buffers", self.weight_buffers),
            ("kv_cache_buffers", self.kv_cache_buffers),
            ("activation_buffers", self.activation_buffers),
            ("pinned_bounce", self.pinned_bounce),
            ("working", self.working),
        ]
    }
}

/// Bytes on every tier.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct MemoryPlan {
    pub gpu: TierBytes,
    pub cpu: TierBytes,
    pub disk: TierBytes,
}

/// The executor's buffers for `model` under `scenario` with placement `shares` (split per linear
/// kind: `per_kind[k]` gives the weight split of kind k; the LP uses the same shares for all kinds).
/// Affine in the shares for a fixed scenario.
pub fn plan(model: &ModelSpec, sc: &Scenario, per_kind: &[Shares; 4]) -> MemoryPlan {
    let layers = model.num_layers as f64;
    let placement = &per_kind[0];
    let weights_layer = layer_weight_bytes_stored(model, &sc.compression);
    let kv_total = kv_cache_total_bytes(model, sc);
    let act_total = activations_total_bytes(model, sc);
    let kv_pos = kv_bytes_per_position(model, &sc.compression);
    let gbs = sc.gpu_batch_size as f64;
    let positions = (sc.prompt_len + sc.gen_len) as f64;
    let kv_one_batch = gbs * positions * kv_pos;
    let act_one_batch =
        gbs * sc.prompt_len as f64 * model.activation_bytes_per_token(model.dtype) as f64;
    let working = largest_intermediate_bytes(model, sc);

    // Bytes of one layer's weights copied to the GPU for each use, summed over linear kinds with
    // each kind's own split; the LayerNorms go with the Q/K/V projection.
    let copied_to_gpu: f64 = LINEAR_KINDS
        .iter()
        .zip(per_kind)
        .map(|(&kind, s)| {
            let bytes = linear_weight_bytes(model, kind, sc.compression.weights)
                + if kind == LinearKind::Qkv {
                    layer_norm_bytes(model, sc.compression.weights)
                } else {
                    0.0
                };
            s.weights_copied_to_gpu() * bytes
        })
        .sum();

    let non_gpu_cache = placement.cache_cpu + placement.cache_disk;
    let gpu = TierBytes {
        weights_home: placement.weights_gpu * layers * weights_layer,
        kv_cache_home: placement.cache_gpu * kv_total,
        activations_home: placement.activations_gpu * act_total,
        embeddings: if sc.has_gpu {
            embedding_bytes(model)
        } else {
            0.0
        },
        weight_buffers: 2.0 * copied_to_gpu,
        kv_cache_buffers: if sc.has_gpu && !sc.cpu_attention {
            2.0 * non_gpu_cache * kv_one_batch
        } else {
            0.0
        },
        activation_buffers: 2.0
            * (placement.activations_cpu + placement.activations_disk)
            * act_one_batch
            * if sc.has_gpu { 1.0 } else { 0.0 },
        pinned_bounce: 0.0,
        working: if sc.has_gpu { working } else { 0.0 },
    };
    let cpu = TierBytes {
        weights_home: placement.weights_cpu() * layers * weights_layer,
        kv_cache_home: placement.cache_cpu * kv_total,
        activations_home: placement.activations_cpu * act_total,
        embeddings: if sc.has_gpu {
            0.0
        } else {
            embedding_bytes(model)
        },
        weight_buffers: 2.0 * placement.weights_disk() * weights_layer,
        kv_cache_buffers: 2.0 * placement.cache_disk * kv_one_batch,
        activation_buffers: 2.0 * placement.activations_disk * act_one_batch,
        pinned_bounce: if sc.has_gpu { PINNED_BOUNCE_BYTES } else { 0.0 },
        working: cpu_workspace_bytes(model, sc),
    };
    let disk = TierBytes {
        weights_home: placement.weights_disk() * layers * weights_layer,
        kv_cache_home: placement.cache_disk * kv_total,
        activations_home: placement.activations_disk * act_total,
        ..TierBytes::default()
    };
    MemoryPlan { gpu, cpu, disk }
}

/// The plan for a policy, with each linear kind's own split ratio.
pub fn plan_for_policy(model: &ModelSpec, policy: &Policy, has_gpu: bool) -> MemoryPlan {
    let sc = Scenario::from_policy(policy, has_gpu);
    plan_placed(
        model,
        &sc,
        &crate::cost::per_kind_shares(policy),
        policy.placement.weights.disk,
    )
}

/// [`plan`] for a concrete disk share of the weights: the CPU's staging for disk-resident weights
/// is what the executor allocates for the matrices [`disk_layout`] puts on disk
/// ([`disk_staging_bytes`]) instead of the linear program's 2 x wd x W, which whole matrices can
/// exceed by up to two of the smallest matrix. Policies are checked, evaluated and run against
/// this plan; the solver re-solves when the rounding pushes its pick over a capacity.
pub fn plan_placed(
    model: &ModelSpec,
    sc: &Scenario,
    per_kind: &[Shares; 4],
    weights_disk: f64,
) -> MemoryPlan {
    let mut p = plan(model, sc, per_kind);
    if !sc.compression.weights {
        let sizes = layer_matrix_bytes(model);
        let layout = disk_layout(&sizes, model.num_layers as usize, weights_disk);
        p.cpu.weight_buffers = disk_staging_bytes(&layout, &sizes) as f64;
    }
    p
}

/// Bytes of one decoder layer's matrices as the checkpoint stores them, in the executor's order
/// (q, k, v, out, fc1, fc2); biases and norms are held in memory and never read from disk.
pub fn layer_matrix_bytes(model: &ModelSpec) -> [u64; 6] {
    let (h1, h2, e) = (model.hidden_size, model.ffn_dim, model.dtype.bytes());
    let square = h1 * h1 * e;
    [square, square, square, square, h1 * h2 * e, h2 * h1 * e]
}

/// Which matrices of each decoder layer the executor reads from disk for a disk share `fraction`
/// of the layers' matrix bytes (`matrix_bytes`: one layer's matrices, in order). Every layer holds
/// the same set A (the most bytes not above its share) and an evenly spread number of layers also
/// hold the smallest matrix outside A, so the total is within half of that matrix of the share and
/// the staging ([`disk_staging_bytes`]: two buffers per matrix slot ever on disk) is at most
/// 2 x (fraction x layer + that matrix). Walking the layers with one running total instead would
/// put every slot on disk somewhere and stage two whole layers. A fraction above 0 puts at least
/// one matrix on disk, below 1 keeps at least one in memory.
pub fn disk_layout(matrix_bytes: &[u64], layers: usize, fraction: f64) -> Vec<Vec<bool>> {
    let n = matrix_bytes.len();
    if fraction <= 0.0 || layers == 0 || n == 0 {
        return vec![vec![false; n]; layers];
    }
    if fraction >= 1.0 {
        return vec![vec![true; n]; layers];
    }
    let layer_total: u64 = matrix_bytes.iter().sum();
    let share = fraction * layer_total as f64;
    let bytes_of = |mask: usize| -> u64 {
        (0..n)
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| matrix_bytes[i])
            .sum()
    };
    // The smallest matrix outside a set, and its bytes.
    let extra_of = |mask: usize| {
        (0..n)
            .filter(|i| mask & (1 << i) == 0)
            .min_by_key(|&i| matrix_bytes[i])
    };
    let extra_bytes = |mask: usize| extra_of(mask).map_or(0, |j| matrix_bytes[j]);
    // A: the subset with the most bytes not above the share; among equals, the one that leaves
    // the smallest matrix outside (fc1 rather than the four projections for a third of an OPT
    // layer), so the layers that take one more stage the least.
    let (mut base, mut base_bytes) = (0usize, 0u64);
    for mask in 1..(1usize << n) {
        let b = bytes_of(mask);
        if b as f64 > share * (1.0 + 1e-12) {
            continue;
        }
        if b > base_bytes || (b == base_bytes && extra_bytes(mask) < extra_bytes(base)) {
            (base, base_bytes) = (mask, b);
        }
    }
    // The smallest matrix outside A, held by as many layers as the rest of the share asks.
    let extra = extra_of(base);
    let mut with_extra = match extra {
        Some(j) if matrix_bytes[j] > 0 => {
            let per_layer = (share - base_bytes as f64).max(0.0) / matrix_bytes[j] as f64;
            ((per_layer * layers as f64).round() as usize).min(layers)
        }
        _ => 0,
    };
    if base == 0 && with_extra == 0 {
        with_extra = 1;
    }
    let full = (1usize << n) - 1;
    if let Some(j) = extra {
        if base | (1 << j) == full && with_extra == layers {
            with_extra = layers - 1;
        }
    }
    (0..layers)
        .map(|l| {
            let extra_here = (l + 1) * with_extra / layers > l * with_extra / layers;
            (0..n)
                .map(|i| base & (1 << i) != 0 || (extra_here && extra == Some(i)))
                .collect()
        })
        .collect()
}

/// Bytes of the executor's staging for disk-resident weights under `layout`: two buffers (the
/// layer computing, the layer being read) for every matrix slot that is on disk in any layer,
/// each the size of that slot's matrix.
pub fn disk_staging_bytes(layout: &[Vec<bool>], matrix_bytes: &[u64]) -> u64 {
    matrix_bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| layout.iter().any(|row| row[*i]))
        .map(|(_, b)| 2 * b)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shares::AffineForm;

    fn scenario(has_gpu: bool) -> Scenario {
        Scenario {
            prompt_len: 512,
            gen_len: 32,
            gpu_batch_size: 8,
            num_gpu_batches: 2,
            compression: Compression::default(),
            cpu_attention: true,
            has_gpu,
        }
    }

    #[test]
    fn homes_add_up_to_the_whole_model_whatever_the_placement() {
        let m = ModelSpec::builtin("opt-1.3b").unwrap();
        let sc = scenario(true);
        let s = Shares {
            weights_gpu: 0.2,
            weights_cpu_computed_on_gpu: 0.3,
            weights_disk_computed_on_cpu: 0.5,
            cache_gpu: 0.1,
            cache_cpu: 0.6,
            cache_disk: 0.3,
            activations_cpu: 1.0,
            ..Default::default()
        };
        let p = plan(&m, &sc, &[s; 4]);
        let weights = p.gpu.weights_home + p.cpu.weights_home + p.disk.weights_home;
        assert!((weights - (24 * m.layer_weight_bytes(m.dtype)) as f64).abs() < 1.0);
        let kv = p.gpu.kv_cache_home + p.cpu.kv_cache_home + p.disk.kv_cache_home;
        // 24 layers x 16 sequences x 544 positions x 2 h1 x 2 bytes
        assert!((kv - 24.0 * 16.0 * 544.0 * 2.0 * 2048.0 * 2.0).abs() < 1.0);
        // Double buffers: 0.3 of a layer copied to the GPU, 0.5 of a layer read from disk.
        let w = m.layer_weight_bytes(m.dtype) as f64;
        assert!((p.gpu.weight_buffers - 2.0 * 0.3 * w).abs() < 1.0);
        assert!((p.cpu.weight_buffers - 2.0 * 0.5 * w).abs() < 1.0);
        // Disk-resident cache is staged one GPU batch at a time, double-buffered.
        let kv_batch = 8.0 * 544.0 * 4.0 * 2048.0;
        assert!((p.cpu.kv_cache_buffers - 2.0 * 0.3 * kv_batch).abs() < 1.0);
    }

    #[test]
    fn largest_intermediate_matches_hand_count() {
        let m = ModelSpec::builtin("opt-125m").unwrap();
        let sc = Scenario {
            gpu_batch_size: 2,
            prompt_len: 16,
            ..scenario(true)
        };
        // tokens 32; widths: 3*768 = 2304, ffn 3072, heads*s = 12*16 = 192 -> 3072
        let expected = 32.0 * 2.0 * (2.0 * 768.0 + 3072.0) + 2.0 * 50272.0 * 4.0;
        assert_eq!(largest_intermediate_bytes(&m, &sc), expected);
    }

    #[test]
    fn cpu_host_puts_nothing_on_the_gpu() {
        let m = ModelSpec::builtin("opt-125m").unwrap();
        let s = Shares {
            weights_cpu_computed_on_cpu: 1.0,
            cache_cpu: 1.0,
            activations_cpu: 1.0,
            ..Default::default()
        };
        let p = plan(&m, &scenario(false), &[s; 4]);
        assert_eq!(p.gpu.total(), 0.0);
        assert!(p.cpu.embeddings > 0.0);
    }

    #[test]
    fn plan_is_affine_in_the_shares() {
        let m = ModelSpec::builtin("opt-6.7b").unwrap();
        for has_gpu in [true, false] {
            let sc = Scenario {
                cpu_attention: !has_gpu,
                ..scenario(has_gpu)
            };
            let f = |s: &Shares| {
                let p = plan(&m, &sc, &[*s; 4]);
                p.gpu.total() + 3.0 * p.cpu.total() + 7.0 * p.disk.total()
            };
            let form = AffineForm::of(f);
            let point =
                Shares::from_array([0.1, 0.2, 0.3, 0.15, 0.25, 0.3, 0.3, 0.4, 0.5, 0.25, 0.25]);
            let exact = f(&point);
            assert!((form.at(&point) - exact).abs() <= 1e-9 * exact.abs());
        }
    }

    #[test]
    fn disk_layout_meets_the_share_and_stages_little_more_than_it() {
        for name in ["opt-125m", "opt-6.7b", "opt-175b"] {
            let m = ModelSpec::builtin(name).unwrap();
            let sizes = layer_matrix_bytes(&m);
            let layers = m.num_layers as usize;
            let layer: u64 = sizes.iter().sum();
            let smallest = *sizes.iter().min().unwrap() as f64;
            for step in 0..=100 {
                let f = step as f64 / 100.0;
                let layout = disk_layout(&sizes, layers, f);
                let on_disk: u64 = layout
                    .iter()
                    .flat_map(|row| row.iter().zip(&sizes).filter(|(d, _)| **d))
                    .map(|(_, b)| b)
                    .sum();
                let target = f * (layers as u64 * layer) as f64;
                // Rounding misses by at most half the smallest matrix; the at-least-one rules
                // can move one whole smallest matrix.
                assert!(
                    (on_disk as f64 - target).abs() <= smallest,
                    "{name} f={f}: {on_disk} on disk for a share of {target}"
                );
                let staging = disk_staging_bytes(&layout, &sizes) as f64;
                assert!(
                    staging <= 2.0 * (f * layer as f64 + smallest) + 1.0,
                    "{name} f={f}: staging {staging} for layer {layer}"
                );
                assert_eq!(f > 0.0, on_disk > 0, "{name} f={f}");
                assert_eq!(f < 1.0, on_disk < layers as u64 * layer, "{name} f={f}");
            }
        }
    }

    #[test]
    fn a_share_that_whole_matrices_meet_is_the_same_set_in_every_layer() {
        // 3/4 of an OPT layer is fc1 + fc2 + one projection: staging is exactly 2 x 3/4 x layer.
        let m = ModelSpec::builtin("opt-6.7b").unwrap();
        let sizes = layer_matrix_bytes(&m);
        let layout = disk_layout(&sizes, 32, 0.75);
        assert!(layout.iter().all(|row| *row == layout[0]));
        let layer: u64 = sizes.iter().sum();
        assert_eq!(disk_staging_bytes(&layout, &sizes), 2 * layer * 3 / 4);
    }

    #[test]
    fn the_placed_plan_counts_the_executors_staging() {
        let m = ModelSpec::builtin("opt-6.7b").unwrap();
        let sc = scenario(false);
        let s = Shares {
            weights_cpu_computed_on_cpu: 0.4,
            weights_disk_computed_on_cpu: 0.6,
            cache_cpu: 1.0,
            activations_cpu: 1.0,
            ..Default::default()
        };
        let placed = plan_placed(&m, &sc, &[s; 4], 0.6);
        let sizes = layer_matrix_bytes(&m);
        let layout = disk_layout(&sizes, 32, 0.6);
        assert_eq!(
            placed.cpu.weight_buffers,
            disk_staging_bytes(&layout, &sizes) as f64
        );
        let affine = plan(&m, &sc, &[s; 4]);
        assert_eq!(placed.cpu.weights_home, affine.cpu.weights_home);
    }
}
