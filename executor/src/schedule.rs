//! The zig-zag block schedule over the CPU and disk tiers (design sections 1 and 5).
//!
//! A block of sequences is split into GPU batches (`gbs` sequences each, `nb` batches; the name is
//! FlexGen's, on this host every batch computes on the CPU). For every step (the prefill, then one
//! decode step per token) and every layer, all batches run that layer before the next layer starts,
//! so a layer's disk-resident weights are read once per step for the whole block. While layer j
//! computes, layer j+1's disk weights are read on I/O threads (double buffer); while batch k
//! computes, batch k+1's disk-resident KV cache and activations are read and batch k-1's are
//! written back. Nothing waits for all I/O at once: each read is waited on by the unit that needs
//! it, each write by the next read or write of the same batch.
//!
//! Granularity (documented in docs/executor.md):
//! - weights: whole matrices (q, k, v, out, fc1, fc2 of each layer), the same ones in every layer
//!   plus one more in an evenly spread number of layers, as [`planner::memory::disk_layout`]
//!   chooses for the policy's fraction (so the staging is what the memory plan counts);
//!   embeddings, LM head, biases and LayerNorms stay in CPU memory;
//! - KV cache: whole sequences of the block (all layers, all positions), spread evenly;
//! - activations: the last rows (tokens) of each batch's hidden state between two layers.
//!
//! Counts use [`split_count`]: a fraction above 0 gets at least one item, below 1 keeps at least
//! one item in memory, so every tier the policy names is exercised.
//!
//! With a device ([`generate_blocks_on`]), the GPU tiers of [`crate::gpu_tier`] join in: resident
//! and split matrices through the layer's [`crate::models::PlacedLinear`], device-resident
//! sequences through [`LayerKv::attend`], and the device's share of hidden rows between the
//! host's and the disk's.

use crate::backend::Backend;
use crate::device::Device;
use crate::error::{ExecError, Result};
use crate::generate::{GenerationConfig, GenerationOutput, PromptLayout, Sampler};
use crate::gpu_tier::{DeviceReport, GpuPlan, GpuTier, TierShape};
use crate::kernels::{KvBuf, KvDtype, KvRowsMut, WeightData};
use crate::models::opt::{LayerMatrices, OptModel, OptWorkspace};
use crate::models::{CausalLm, LayerKv, Step};
use crate::quant::QuantizedKv;
use crate::storage::{
    align_down, align_up, DirectFile, IoPool, IoPoolConfig, IoStats, OffloadDir, OffloadFile,
    PooledBuf, ReadHandle, WriteHandle, ALIGN,
};
use crate::weights::{ElementType, TensorId};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What the block schedule needs from a policy, resolved for one run.
#[derive(Debug, Clone)]
pub struct BlockPlan {
    /// Sequences per GPU batch.
    pub gpu_batch_size: usize,
    /// GPU batches per block.
    pub num_gpu_batches: usize,
    /// Share of the decoder layers' matrix bytes read from disk.
    pub weights_disk: f64,
    /// Share of the block's sequences whose KV cache lives in the offload directory.
    pub kv_cache_disk: f64,
    /// Share of each batch's hidden-state rows kept in the offload directory between layers.
    pub activations_disk: f64,
    /// FlexGen's CPU delegation. Here both settings compute on the CPU; on, attention over
    /// disk-resident cache runs in place in the I/O staging buffers; off, those rows are first
    /// copied into a separate compute buffer (the copy a GPU run would make).
    pub cpu_attention: bool,
    /// Parent of the offload directory.
    pub offload_parent: PathBuf,
    /// Cap on the bytes the offload directory may hold (tests use it to simulate a full disk).
    pub offload_capacity_limit: Option<u64>,
    /// Keep the (CPU-resident) KV cache 4-bit compressed and attend with `quant::attention_q4`
    /// (policy `compression.kv_cache`; refused together with a disk share of the cache).
    pub compress_kv: bool,
}

/// `n` items split by `fraction`: how many go to the tier the fraction names. Rounds to nearest,
/// but a fraction above 0 gets at least one item and a fraction below 1 leaves at least one.
pub fn split_count(fraction: f64, n: usize) -> usize {
    if n == 0 || fraction <= 0.0 {
        return 0;
    }
    if fraction >= 1.0 {
        return n;
    }
    let c = (fraction * n as f64).round() as usize;
    if n == 1 {
        return c.min(1);
    }
    c.clamp(1, n - 1)
}

/// Which matrices of each layer are read from disk.
#[derive(Debug, Clone)]
pub struct WeightPlacement {
    /// Per layer, per matrix (q, k, v, out, fc1, fc2): read from disk.
    pub on_disk: Vec<[bool; 6]>,
    /// Matrix bytes placed on disk.
    pub disk_bytes: u64,
    /// Matrix bytes of all decoder layers.
    pub layer_bytes: u64,
    /// 4-bit group-wise copies of every layer's matrices (policy `compression.weights`), held in
    /// CPU memory and used instead of the dense matrices.
    pub compressed: Option<Arc<CompressedLayers>>,
}

/// Every layer's six matrices compressed to 4 bits (groups of 64, asymmetric min/max).
pub struct CompressedLayers {
    /// Per layer: q, k, v, out, fc1, fc2.
    pub layers: Vec<Vec<crate::quant::QuantizedMatrix>>,
}

impl CompressedLayers {
    /// Compresses every layer of `model` from its store (dense pages are read once).
    pub fn from_model(model: &OptModel) -> Result<CompressedLayers> {
        let layers = (0..model.num_layers())
            .map(|l| {
                model.compress_layer(l).map_err(|e| {
                    ExecError::Unsupported(format!("cannot compress layer {l}'s weights: {e}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CompressedLayers { layers })
    }

    /// Bytes of the compressed matrices.
    pub fn bytes(&self) -> u64 {
        self.layers.iter().flatten().map(|m| m.bytes() as u64).sum()
    }
}

impl std::fmt::Debug for CompressedLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CompressedLayers({} bytes)", self.bytes())
    }
}

impl WeightPlacement {
    /// Whether tensor `id` is disk-resident.
    pub fn is_on_disk(&self, model: &OptModel, id: TensorId) -> bool {
        (0..self.on_disk.len()).any(|l| {
            model
                .layer_weight_ids(l)
                .iter()
                .zip(&self.on_disk[l])
                .any(|(t, d)| *d && *t == id)
        })
    }
}

/// Chooses the disk-resident matrices for a fraction with the planner's rule
/// ([`planner::memory::disk_layout`]: the same matrices in every layer, plus one more in some), so
/// the staging buffers are the ones the memory plan counts. Matrices the store cannot read from a
/// file (random weights, misaligned tensors copied out) stay in memory.
pub fn place_weights(model: &OptModel, fraction: f64) -> WeightPlacement {
    let store = model.store();
    let layers = model.num_layers();
    let matrix_bytes = |l: usize| -> [u64; 6] {
        model.layer_weight_ids(l).map(|id| {
            let m = store.meta(id);
            (m.shape.iter().product::<usize>() * m.dtype.size()) as u64
        })
    };
    let sizes = if layers > 0 { matrix_bytes(0) } else { [0; 6] };
    let layout = planner::memory::disk_layout(&sizes, layers, fraction);
    let mut on_disk = vec![[false; 6]; layers];
    let (mut disk, mut total) = (0u64, 0u64);
    for (l, row) in on_disk.iter_mut().enumerate() {
        let ids = model.layer_weight_ids(l);
        for (i, bytes) in matrix_bytes(l).into_iter().enumerate() {
            total += bytes;
            if layout[l][i] && store.file_range(ids[i]).is_some() {
                row[i] = true;
                disk += bytes;
            }
        }
    }
    WeightPlacement {
        on_disk,
        disk_bytes: disk,
        layer_bytes: total,
        compressed: None,
    }
}

/// What the disk and CPU channels did during a block run.
#[derive(Debug, Clone, Default)]
pub struct ChannelStats {
    /// Weight reads (checkpoint files, direct I/O).
    pub weights: IoStats,
    /// KV cache and activation reads and writes (offload directory).
    pub cache: IoStats,
    /// Seconds the compute thread spent computing (embedding, layers, head, sampling).
    pub cpu_compute_s: f64,
    /// The part of `cpu_compute_s` spent in the prefill step (the rest is decode): calibration
    /// fits prefill-shaped and decode-shaped rates separately.
    pub prefill_compute_s: f64,
    /// Seconds the compute thread waited for reads or writes.
    pub io_wait_s: f64,
    /// Bytes of the offload directory's files.
    pub offload_bytes: u64,
    /// The offload directory (removed when the run ends).
    pub offload_dir: Option<PathBuf>,
    /// Matrix bytes read from disk per step (per pass over the layers).
    pub weight_disk_bytes_per_step: u64,
    /// Bytes of the staging buffers for disk-resident weights (all pools, all buffers): the memory
    /// plan's CPU `weight_buffers`.
    pub weight_staging_bytes: u64,
    /// Sequences whose KV cache lived on disk.
    pub kv_disk_sequences: usize,
    /// Lines to print: files that fell back to buffered I/O, and why.
    pub notes: Vec<String>,
    /// What the device tiers held and moved (runs on a device only).
    pub device: Option<DeviceReport>,
    /// The block device under the disk-resident weights and what it did in prefill and in the
    /// decode steps, by the kernel's counters (Linux; `None` without disk weights or `/sys`).
    pub disk_device: Option<DeviceStages>,
}

/// A block device's activity per stage of a run.
#[derive(Debug, Clone)]
pub struct DeviceStages {
    /// Kernel name of the device, e.g. `vda`.
    pub name: String,
    /// From the first layer's reads to the first token.
    pub prefill: primitives::storage::DeviceActivity,
    /// From the first token to the last.
    pub decode: primitives::storage::DeviceActivity,
}

impl ChannelStats {
    /// Disk read bytes and busy seconds, both pools. Busy times of the two pools are added: they
    /// share one disk queue (an upper bound when both had reads in flight at once).
    pub fn disk_read(&self) -> (u64, f64) {
        (
            self.weights.read_bytes + self.cache.read_bytes,
            self.weights.read_busy_s + self.cache.read_busy_s,
        )
    }
}

/// Where a sequence's KV cache lives: index into its batch's CPU home, its disk slot, or its
/// batch's device cache.
#[derive(Debug, Clone, Copy)]
enum SeqPlace {
    Cpu(usize),
    Disk { local: usize, slot: usize },
    Gpu(usize),
}

/// KV rows of one batch at one layer, for the model's layer function.
struct BatchKv<'a> {
    packed: &'a mut [(QuantizedKv, QuantizedKv)],
    seq_floats: usize,
    dtype: KvDtype,
    place: &'a [SeqPlace],
    home_k: &'a mut KvBuf,
    home_v: &'a mut KvBuf,
    staged: &'a mut [PooledBuf],
    stage_k: &'a mut KvBuf,
    stage_v: &'a mut KvBuf,
    in_place: bool,
    /// The device tier, this batch's index and the layer (device-resident sequences).
    gpu: Option<(&'a GpuTier<'a>, usize, usize)>,
}

impl LayerKv for BatchKv<'_> {
    fn compressed(&mut self, seq: usize) -> Option<(&mut QuantizedKv, &mut QuantizedKv)> {
        match self.place[seq] {
            SeqPlace::Cpu(i) => self.packed.get_mut(i).map(|(k, v)| (k, v)),
            SeqPlace::Disk { .. } | SeqPlace::Gpu(_) => None,
        }
    }

    fn attend(&mut self, seq: usize, rows: &crate::models::NewRows, out: &mut [f32]) -> bool {
        match (self.place[seq], self.gpu) {
            (SeqPlace::Gpu(local), Some((tier, batch, layer))) => {
                tier.attend(batch, layer, local, rows, out);
                true
            }
            _ => false,
        }
    }

    fn rows(&mut self, seq: usize) -> (KvRowsMut<'_>, KvRowsMut<'_>) {
        let n = self.seq_floats;
        match self.place[seq] {
            SeqPlace::Cpu(i) => (
                self.home_k.rows_mut(i * n..(i + 1) * n),
                self.home_v.rows_mut(i * n..(i + 1) * n),
            ),
            SeqPlace::Disk { local, .. } if self.in_place => {
                let bytes = n * self.dtype.size();
                let (a, b) = self.staged.split_at_mut(2 * local + 1);
                (
                    KvRowsMut::from_bytes(self.dtype, &mut a[2 * local].as_mut_slice()[..bytes]),
                    KvRowsMut::from_bytes(self.dtype, &mut b[0].as_mut_slice()[..bytes]),
                )
            }
            SeqPlace::Disk { local, .. } => (
                self.stage_k.rows_mut(local * n..(local + 1) * n),
                self.stage_v.rows_mut(local * n..(local + 1) * n),
            ),
            // Device-resident rows are attended through `attend`, never handed to the host.
            SeqPlace::Gpu(_) => (KvRowsMut::empty(), KvRowsMut::empty()),
        }
    }
}

/// One GPU batch's state across the run.
struct Batch {
    /// First sequence of the block in this batch, and how many.
    first: usize,
    len: usize,
    place: Vec<SeqPlace>,
    /// CPU-resident cache per layer: `[cpu sequences, max_len, width]`, in the model's dtype.
    home_k: Vec<KvBuf>,
    home_v: Vec<KvBuf>,
    /// CPU share of the hidden state between layers.
    held: Vec<f32>,
    /// Compressed CPU-resident cache per layer, per CPU sequence (K, V), when `compress_kv`.
    packed: Vec<Vec<(QuantizedKv, QuantizedKv)>>,
    /// Cache writes not yet waited on, all to layer `kv_writes_layer`'s rows: a read of that
    /// layer's cache waits for them, reads of other layers need not (with nb = 2, waiting for
    /// every write before the next unit's reads made each unit wait on the small writes the
    /// other batch had just issued: 16 s of a 35 s OPT-6.7B run, uncounted).
    kv_writes: Vec<WriteHandle>,
    kv_writes_layer: usize,
    /// Activation writes not yet waited on (the batch's next activation read needs them).
    act_writes: Vec<WriteHandle>,
    disk_seqs: usize,
}

/// Sizes the I/O of a run is laid out by.
#[derive(Clone, Copy)]
struct Geometry {
    /// Bytes of one sequence's K (or V) slot of one layer in the KV file (4 KiB multiple).
    kv_slot: usize,
    /// Bytes of one KV row (K or V alone).
    row_bytes: usize,
    /// Disk-resident sequences in the block.
    kv_disk_total: usize,
    /// Bytes of one batch's slot in the activations file.
    act_slot: u64,
    /// Hidden size.
    hidden: usize,
    /// Share of hidden-state rows on disk.
    act_fraction: f64,
}

impl Geometry {
    fn act_rows(&self, rows: usize) -> usize {
        split_count(self.act_fraction, rows)
    }
}

/// Reads issued for one (layer, batch) unit.
struct UnitLoad {
    kv: Vec<ReadHandle>,
    act: Option<ReadHandle>,
}

fn storage_err(e: crate::storage::StorageError) -> ExecError {
    ExecError::Storage(e)
}

fn weight_view<'a>(bytes: &'a [u8], dtype: ElementType, name: &str) -> Result<WeightData<'a>> {
    let bad = || {
        ExecError::Unsupported(format!(
            "tensor '{name}' read from disk is not aligned for its element type"
        ))
    };
    Ok(match dtype {
        ElementType::F32 => WeightData::F32(bytemuck::try_cast_slice(bytes).map_err(|_| bad())?),
        ElementType::F16 => WeightData::F16(bytemuck::try_cast_slice(bytes).map_err(|_| bad())?),
        ElementType::Bf16 => WeightData::Bf16(bytemuck::try_cast_slice(bytes).map_err(|_| bad())?),
    })
}

/// A disk-resident matrix: its checkpoint file, offset and length.
type DiskRange = (Arc<DirectFile>, u64, usize);

/// Everything the block run holds for the disk tier.
struct DiskTier {
    /// One pool per matrix slot (q, k, v, out, fc1, fc2), each with two buffers of that slot's
    /// disk-resident matrix: staging is `planner::memory::disk_staging_bytes`. The pools
    /// share one busy clock.
    weight_pools: Vec<Option<IoPool>>,
    cache_pool: Option<IoPool>,
    files: HashMap<PathBuf, Arc<DirectFile>>,
    /// Per layer, per matrix: (file, offset, len) of disk-resident matrices.
    ranges: Vec<[Option<DiskRange>; 6]>,
    kv_file: Option<OffloadFile>,
    act_file: Option<OffloadFile>,
    _dir: Option<OffloadDir>,
}

/// Runs generation for `prompts` as one block under `plan`. Same outputs as
/// [`crate::generate::generate`] over the same prompts (the invariant the tests check), different
/// memory and I/O.
pub fn generate_blocks(
    model: &OptModel,
    backend: &dyn Backend,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    plan: &BlockPlan,
    weights: &WeightPlacement,
) -> Result<(GenerationOutput, ChannelStats)> {
    generate_blocks_on(model, backend, prompts, cfg, plan, weights, None)
}

/// [`generate_blocks`] with GPU tiers on `device` as `gpu` says (see [`crate::gpu_tier`]): the
/// policy's GPU share of weights resident there, the rest split between host and device by alpha,
/// the GPU shares of KV cache and activations held there. Same tokens as the all-CPU run.
#[allow(clippy::too_many_arguments)]
pub fn generate_blocks_on(
    model: &OptModel,
    backend: &dyn Backend,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    plan: &BlockPlan,
    weights: &WeightPlacement,
    device: Option<(&dyn Device, &GpuPlan)>,
) -> Result<(GenerationOutput, ChannelStats)> {
    crate::generate::check_request(model, prompts, cfg)?;
    if device.is_some() && (plan.compress_kv || weights.compressed.is_some()) {
        return Err(ExecError::Unsupported(
            "4-bit compression together with GPU tiers is not supported by the executor yet; \
             turn compression off or run without a device"
                .into(),
        ));
    }
    // On a rayon worker, as generate does: kernels called from outside the pool inject their jobs
    // through rayon's global queue, which allocates.
    rayon::scope(|_| run_block(model, backend, prompts, cfg, plan, weights, device))
}

fn run_block(
    model: &OptModel,
    backend: &dyn Backend,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    plan: &BlockPlan,
    weights: &WeightPlacement,
    device: Option<(&dyn Device, &GpuPlan)>,
) -> Result<(GenerationOutput, ChannelStats)> {
    let vocab = model.vocab_size();
    let bls = prompts.len();
    let nb_asked = plan.num_gpu_batches.max(1);
    let gbs = plan.gpu_batch_size.max(1).max(bls.div_ceil(nb_asked));
    let nb = bls.div_ceil(gbs);
    let padded = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_len = padded + cfg.max_new_tokens - 1;
    let layers = model.num_layers();
    let width = model.kv_width();
    let hidden = model.config().spec.hidden_size as usize;
    let pad = model.pad_token_id();
    let eos = model.eos_token_id();
    let mut stats = ChannelStats::default();

    // KV cache placement: whole sequences, spread evenly over the block.
    let kv_disk_total = split_count(plan.kv_cache_disk, bls);
    if plan.compress_kv && kv_disk_total > 0 {
        return Err(ExecError::Unsupported(format!(
            "compression.kv_cache with placement.kv_cache.disk = {} is not supported: the \
             disk-resident cache is stored uncompressed; keep the cache in CPU memory or turn \
             KV compression off",
            plan.kv_cache_disk
        )));
    }
    let on_disk_seq = |g: usize| (g + 1) * kv_disk_total / bls > g * kv_disk_total / bls;
    // Of the sequences not on disk, the device's share (spread evenly over them).
    let kv_host_total = bls - kv_disk_total;
    let kv_gpu_total = device.map_or(0, |(_, g)| {
        GpuPlan::device_share(g.kv_cache, g.kv_cache_cpu, kv_host_total)
    });
    let on_gpu_seq =
        |j: usize| (j + 1) * kv_gpu_total / kv_host_total > j * kv_gpu_total / kv_host_total;
    let mut host_index = 0;
    let mut kv_gpu_per_batch = Vec::with_capacity(nb_asked);
    let seq_floats = max_len * width;
    let kv_dtype = model.kv_dtype();
    let kv_size = kv_dtype.size();
    let kv_slot = align_up((seq_floats * kv_size) as u64) as usize;
    // A batch's CPU-resident cache of one layer (empty when compressed: `packed` holds it).
    let home = |cpu: usize| {
        KvBuf::zeroed(
            kv_dtype,
            if plan.compress_kv {
                0
            } else {
                cpu * seq_floats
            },
        )
    };
    let mut batches: Vec<Batch> = Vec::with_capacity(nb);
    let mut slot = 0;
    for k in 0..nb {
        let first = k * gbs;
        let len = gbs.min(bls - first);
        let mut place = Vec::with_capacity(len);
        let (mut cpu, mut disk, mut gpu) = (0, 0, 0);
        for g in first..first + len {
            if on_disk_seq(g) {
                place.push(SeqPlace::Disk { local: disk, slot });
                disk += 1;
                slot += 1;
            } else {
                host_index += 1;
                if on_gpu_seq(host_index - 1) {
                    place.push(SeqPlace::Gpu(gpu));
                    gpu += 1;
                } else {
                    place.push(SeqPlace::Cpu(cpu));
                    cpu += 1;
                }
            }
        }
        batches.push(Batch {
            first,
            len,
            place,
            home_k: (0..layers).map(|_| home(cpu)).collect(),
            home_v: (0..layers).map(|_| home(cpu)).collect(),
            packed: (0..layers)
                .map(|_| {
                    if plan.compress_kv {
                        (0..cpu)
                            .map(|_| {
                                (
                                    QuantizedKv::with_capacity(width, max_len),
                                    QuantizedKv::with_capacity(width, max_len),
                                )
                            })
                            .collect()
                    } else {
                        Vec::new()
                    }
                })
                .collect(),
            held: Vec::new(),
            kv_writes: Vec::with_capacity(2 * disk),
            kv_writes_layer: 0,
            act_writes: Vec::with_capacity(1),
            disk_seqs: disk,
        });
        kv_gpu_per_batch.push(gpu);
    }
    stats.kv_disk_sequences = kv_disk_total;
    let max_disk_per_batch = batches.iter().map(|b| b.disk_seqs).max().unwrap_or(0);

    // Activations: the last rows of each batch's hidden state, per stage.
    let act_rows = |rows: usize| split_count(plan.activations_disk, rows);
    let prefill_rows = gbs * padded;
    let cpu_rows = (prefill_rows - act_rows(prefill_rows)).max(gbs - act_rows(gbs));
    for b in &mut batches {
        b.held = vec![0.0; cpu_rows * hidden];
    }
    let act_slot = align_up((act_rows(prefill_rows).max(act_rows(gbs)) * hidden * 4) as u64);
    // The device's share of the rows not on disk sits between the host's and the disk's.
    let gpu_act_rows = |rows: usize| {
        device.map_or(0, |(_, g)| {
            GpuPlan::device_share(g.activations, g.activations_cpu, rows - act_rows(rows))
        })
    };

    // The device tier: resident weights, staging for split matrices, KV and hidden rows.
    let gpu_tier = match device {
        Some((dev, gplan)) => Some(GpuTier::new(
            dev,
            model,
            gplan,
            weights,
            &TierShape {
                rows: prefill_rows,
                max_len,
                kv_sequences: kv_gpu_per_batch.clone(),
                act_rows: gpu_act_rows(prefill_rows).max(gpu_act_rows(gbs)),
            },
        )?),
        None => None,
    };
    let resident = |l: usize, i: usize| gpu_tier.as_ref().is_some_and(|t| t.is_resident(l, i));

    // The disk tier: checkpoint files for weights, the offload directory for cache and hidden
    // states.
    let store = model.store();
    let mut tier = DiskTier {
        weight_pools: Vec::new(),
        cache_pool: None,
        files: HashMap::new(),
        ranges: Vec::with_capacity(layers),
        kv_file: None,
        act_file: None,
        _dir: None,
    };
    let mut max_read = [0usize; 6];
    for l in 0..layers {
        let ids = model.layer_weight_ids(l);
        let mut row: [Option<DiskRange>; 6] = Default::default();
        for i in 0..6 {
            if !weights.on_disk[l][i] || resident(l, i) {
                continue;
            }
            let Some((path, offset, len)) = store.file_range(ids[i]) else {
                continue;
            };
            let file = match tier.files.get(path) {
                Some(f) => f.clone(),
                None => {
                    let f = Arc::new(DirectFile::open(path).map_err(storage_err)?);
                    if let Some(reason) = f.fallback() {
                        stats.notes.push(format!(
                            "weights in {} are read with buffered I/O: {reason}",
                            path.display()
                        ));
                    }
                    tier.files.insert(path.to_path_buf(), f.clone());
                    f
                }
            };
            max_read[i] = max_read[i].max(DirectFile::superset_len(offset, len));
            row[i] = Some((file, offset, len));
        }
        tier.ranges.push(row);
    }
    // Every checkpoint shard normally sits on one device; the first one found is the one counted.
    let disk_device = tier
        .files
        .keys()
        .find_map(|path| primitives::storage::BlockDevice::for_path(path));
    stats.weight_disk_bytes_per_step = tier
        .ranges
        .iter()
        .flatten()
        .flatten()
        .map(|r| r.2 as u64)
        .sum();
    for &size in max_read.iter() {
        if size == 0 {
            tier.weight_pools.push(None);
            continue;
        }
        // Four threads per pool: a large matrix is split into 1 MiB requests, and the disk needs
        // several in flight (two measured ~0.7 GB/s on this host's disk, four ~1.3 GB/s).
        // The queue holds a whole matrix's requests, so submitting a prefetch never blocks the
        // compute thread while the disk works through the previous one.
        let config = IoPoolConfig {
            threads: 4,
            queue_depth: size.div_ceil(1 << 20) + 4,
            request_size: 1 << 20,
            buffer_size: size,
            // Two layers in flight: the one computing and the one being prefetched.
            max_buffers: 2,
        };
        stats.weight_staging_bytes += (config.max_buffers * config.buffer_size) as u64;
        let first = tier.weight_pools.iter().flatten().next();
        let pool = match first {
            Some(p) => IoPool::new_sharing_stats(&config, p),
            None => IoPool::new(&config),
        }
        .map_err(storage_err)?;
        tier.weight_pools.push(Some(pool));
    }
    let needs_dir = kv_disk_total > 0 || act_slot > 0;
    if needs_dir {
        std::fs::create_dir_all(&plan.offload_parent)
            .map_err(|e| ExecError::io(&plan.offload_parent, e))?;
        let mut dir = OffloadDir::create(&plan.offload_parent).map_err(storage_err)?;
        if let Some(limit) = plan.offload_capacity_limit {
            dir = dir.with_capacity_limit(limit);
        }
        if let Some(why) = dir.signal_cleanup() {
            stats.notes.push(format!(
                "offload directory {} will not be removed on Ctrl-C: {why}",
                dir.path().display()
            ));
        }
        stats.offload_dir = Some(dir.path().to_path_buf());
        if kv_disk_total > 0 {
            let size = (layers * kv_disk_total * 2 * kv_slot) as u64;
            let f = dir.create_file("kv-cache", size).map_err(storage_err)?;
            if let Some(reason) = f.fallback() {
                stats
                    .notes
                    .push(format!("KV cache files use buffered I/O: {reason}"));
            }
            tier.kv_file = Some(f);
        }
        if act_slot > 0 {
            let f = dir
                .create_file("activations", nb as u64 * act_slot)
                .map_err(storage_err)?;
            tier.act_file = Some(f);
        }
        stats.offload_bytes = dir.reserved_bytes();
        // Per unit: 2 reads per disk sequence + 1 activation read, for the unit computing and the
        // next; writes hold their buffers until the batch's next read or write, so up to one
        // unit's worth per batch.
        let per_unit = 2 * max_disk_per_batch + 1;
        tier.cache_pool = Some(
            IoPool::new(&IoPoolConfig {
                threads: 2,
                queue_depth: 32,
                request_size: 1 << 20,
                buffer_size: kv_slot.max(act_slot as usize).max(ALIGN),
                max_buffers: (nb + 2) * per_unit + 2,
            })
            .map_err(storage_err)?,
        );
        tier._dir = Some(dir);
    }

    let geo = Geometry {
        kv_slot,
        row_bytes: width * kv_size,
        kv_disk_total,
        act_slot,
        hidden,
        act_fraction: plan.activations_disk,
    };

    // Compute buffers.
    let mut ws: OptWorkspace = model.workspace(gbs, padded, max_len);
    let stage_len = if plan.cpu_attention {
        0
    } else {
        max_disk_per_batch * seq_floats
    };
    let mut stage_k = KvBuf::zeroed(kv_dtype, stage_len);
    let mut stage_v = KvBuf::zeroed(kv_dtype, stage_len);
    let mut staged: Vec<PooledBuf> = Vec::with_capacity(2 * max_disk_per_batch);
    let mut logits = vec![0.0f32; bls * vocab];
    let mut sampler = Sampler::new(cfg.sampling, vocab);
    let mut tokens_out: Vec<Vec<u32>> = (0..bls)
        .map(|_| Vec::with_capacity(cfg.max_new_tokens))
        .collect();
    let mut finished = vec![false; bls];
    let mut current = UnitLoad {
        kv: Vec::with_capacity(2 * max_disk_per_batch),
        act: None,
    };
    let mut next = UnitLoad {
        kv: Vec::with_capacity(2 * max_disk_per_batch),
        act: None,
    };
    let mut weights_now: Vec<Option<crate::storage::PooledRead>> = (0..6).map(|_| None).collect();
    let mut weights_next: Vec<Option<ReadHandle>> = (0..6).map(|_| None).collect();

    let PromptLayout {
        mut step_tokens,
        mut step_positions,
        mut key_valid,
        mut seen,
    } = PromptLayout::new(prompts, padded, max_len, pad);

    let mut prefill_s = 0.0;
    let mut prefill_logits = Vec::new();
    let mut steps = 0;
    let mut position = 0;
    let started = Instant::now();
    let device_at_start = disk_device.as_ref().and_then(|d| d.sample());
    let mut device_at_first_token = None;
    let mut first = true;
    submit_weights(&tier, 0, &mut weights_next)?;
    loop {
        if !first {
            if finished.iter().all(|f| *f) {
                break;
            }
            for b in 0..bls {
                step_tokens[b] = if finished[b] {
                    pad
                } else {
                    *tokens_out[b].last().unwrap_or(&pad)
                };
                step_positions[b] = seen[b];
                key_valid[b * max_len + position] = !finished[b];
                seen[b] += 1;
            }
        }
        let t_new = if first { padded } else { 1 };
        // Whether this step is the last (then the next step's first layer is not prefetched).
        let final_step =
            (0..bls).all(|b| finished[b] || tokens_out[b].len() + 1 >= cfg.max_new_tokens);
        let start = position;
        let kv_len = start + t_new;

        // Loads of unit (0, 0) for this step. Submitting counts as waiting on I/O: it waits for
        // earlier writes it depends on, for free staging buffers and for room in the queue.
        let wait = Instant::now();
        submit_unit(
            &tier,
            &mut batches,
            &mut next,
            0,
            0,
            start,
            t_new,
            false,
            geo,
        )?;
        stats.io_wait_s += wait.elapsed().as_secs_f64();
        for l in 0..layers {
            // This layer's weights (prefetched), then the next layer's (or the next step's first).
            let wait = Instant::now();
            for i in 0..6 {
                weights_now[i] = match weights_next[i].take() {
                    Some(h) => Some(h.wait().map_err(storage_err)?),
                    None => None,
                };
            }
            if l + 1 < layers || !final_step {
                submit_weights(&tier, (l + 1) % layers, &mut weights_next)?;
            }
            stats.io_wait_s += wait.elapsed().as_secs_f64();
            let ids = model.layer_weight_ids(l);
            let on_device = gpu_tier.as_ref().map(|t| t.layer(backend, l));
            let mut mats: LayerMatrices = model.store_matrices(l);
            mats.compressed = weights.compressed.as_ref().map(|c| c.layers[l].as_slice());
            mats.placed = on_device
                .as_ref()
                .map(|d| d as &dyn crate::models::PlacedLinear);
            {
                let slots: [&mut crate::kernels::Matrix; 6] = [
                    &mut mats.q,
                    &mut mats.k,
                    &mut mats.v,
                    &mut mats.out,
                    &mut mats.fc1,
                    &mut mats.fc2,
                ];
                for (i, m) in slots.into_iter().enumerate() {
                    if let Some(r) = &weights_now[i] {
                        let meta = store.meta(ids[i]);
                        *m = model
                            .matrix_over(ids[i], weight_view(r.bytes(), meta.dtype, &meta.name)?);
                    }
                }
            }

            for k in 0..nb {
                std::mem::swap(&mut current, &mut next);
                // Prefetch the next unit while this one computes.
                let (nl, nk) = if k + 1 < nb { (l, k + 1) } else { (l + 1, 0) };
                let wait = Instant::now();
                if nl < layers {
                    submit_unit(
                        &tier,
                        &mut batches,
                        &mut next,
                        nl,
                        nk,
                        start,
                        t_new,
                        nk == k,
                        geo,
                    )?;
                }
                stats.io_wait_s += wait.elapsed().as_secs_f64();
                let batch = &mut batches[k];
                let blen = batch.len;
                let rows = blen * t_new;
                let disk_rows = if l > 0 { act_rows(rows) } else { 0 };
                let g0 = batch.first;
                let step = Step {
                    batch: blen,
                    new_tokens: t_new,
                    tokens: &step_tokens[g0 * t_new..(g0 + blen) * t_new],
                    positions: &step_positions[g0 * t_new..(g0 + blen) * t_new],
                    start,
                    key_valid: &key_valid[g0 * max_len..(g0 + blen) * max_len],
                };

                // Wait for this unit's cache and activation reads.
                let wait = Instant::now();
                staged.clear();
                for h in current.kv.drain(..) {
                    let (buf, _, _) = h.wait().map_err(storage_err)?.into_parts();
                    staged.push(buf);
                }
                let act = match current.act.take() {
                    Some(h) => Some(h.wait().map_err(storage_err)?),
                    None => None,
                };
                stats.io_wait_s += wait.elapsed().as_secs_f64();

                let compute = Instant::now();
                if l == 0 {
                    model.embed(backend, &step, &mut ws);
                } else {
                    let host_part = (rows - disk_rows) * hidden;
                    let cpu_part = host_part - gpu_act_rows(rows) * hidden;
                    let h = ws.hidden_mut();
                    h[..cpu_part].copy_from_slice(&batch.held[..cpu_part]);
                    if let (Some(t), true) = (&gpu_tier, cpu_part < host_part) {
                        t.load_act(k, &mut h[cpu_part..host_part])?;
                    }
                    if let Some(a) = &act {
                        let src: &[f32] = bytemuck::cast_slice(a.bytes());
                        h[host_part..rows * hidden].copy_from_slice(&src[..disk_rows * hidden]);
                    }
                }
                drop(act);
                if !plan.cpu_attention {
                    // Move the disk-resident rows into the compute buffer.
                    for d in 0..batch.disk_seqs {
                        let (n, bytes) = (start * width, start * width * kv_size);
                        let at = d * seq_floats;
                        stage_k
                            .rows_mut(at..at + n)
                            .as_bytes_mut()
                            .copy_from_slice(&staged[2 * d].as_slice()[..bytes]);
                        stage_v
                            .rows_mut(at..at + n)
                            .as_bytes_mut()
                            .copy_from_slice(&staged[2 * d + 1].as_slice()[..bytes]);
                    }
                }
                {
                    let mut kv = BatchKv {
                        packed: &mut batch.packed[l],
                        seq_floats,
                        dtype: kv_dtype,
                        place: &batch.place,
                        home_k: &mut batch.home_k[l],
                        home_v: &mut batch.home_v[l],
                        staged: &mut staged,
                        stage_k: &mut stage_k,
                        stage_v: &mut stage_v,
                        in_place: plan.cpu_attention,
                        gpu: gpu_tier.as_ref().map(|t| (t, k, l)),
                    };
                    model.layer(backend, l, &mats, &step, &mut kv, &mut ws);
                }
                if let Some(t) = &gpu_tier {
                    t.take_error()?;
                }
                let last_layer = l + 1 == layers;
                if last_layer {
                    model.head(
                        backend,
                        &step,
                        &mut ws,
                        &mut logits[g0 * vocab..(g0 + blen) * vocab],
                    );
                }
                stats.cpu_compute_s += compute.elapsed().as_secs_f64();

                // Write back: the new KV rows of disk-resident sequences, and the disk share of
                // the hidden state.
                // The batch's previous writes first: each batch holds at most one unit's writes,
                // which is what the pool's buffer count allows for. Issuing the new ones (free
                // buffers, room in the queue) is waiting on I/O too; the copies are a few KiB.
                let wait = Instant::now();
                for w in batch.kv_writes.drain(..).chain(batch.act_writes.drain(..)) {
                    w.wait().map_err(storage_err)?;
                }
                batch.kv_writes_layer = l;
                if let (Some(pool), Some(file)) = (&tier.cache_pool, &tier.kv_file) {
                    let a = align_down((start * width * kv_size) as u64) as usize;
                    let e = align_up((kv_len * width * kv_size) as u64) as usize;
                    for p in batch.place.iter() {
                        let SeqPlace::Disk { local, slot } = *p else {
                            continue;
                        };
                        for kind in 0..2 {
                            let mut out = pool.buffers().get(e - a).map_err(storage_err)?;
                            let dst = &mut out.as_mut_slice()[..e - a];
                            if plan.cpu_attention {
                                dst.copy_from_slice(&staged[2 * local + kind].as_slice()[a..e]);
                            } else {
                                let src = if kind == 0 { &stage_k } else { &stage_v };
                                let bytes = src
                                    .rows(local * seq_floats..(local + 1) * seq_floats)
                                    .as_bytes();
                                let avail = bytes.len().min(e) - a;
                                dst[..avail].copy_from_slice(&bytes[a..a + avail]);
                            }
                            let off =
                                (((l * kv_disk_total + slot) * 2 + kind) * kv_slot + a) as u64;
                            batch.kv_writes.push(
                                pool.write(file.file(), off, out, e - a)
                                    .map_err(storage_err)?,
                            );
                        }
                    }
                }
                staged.clear();
                stats.io_wait_s += wait.elapsed().as_secs_f64();
                if !last_layer {
                    let next_rows = act_rows(rows);
                    let host_part = (rows - next_rows) * hidden;
                    let cpu_part = host_part - gpu_act_rows(rows) * hidden;
                    let h = ws.hidden_mut();
                    batch.held[..cpu_part].copy_from_slice(&h[..cpu_part]);
                    if let (Some(t), true) = (&gpu_tier, cpu_part < host_part) {
                        t.save_act(k, &h[cpu_part..host_part])?;
                    }
                    if next_rows > 0 {
                        if let (Some(pool), Some(file)) = (&tier.cache_pool, &tier.act_file) {
                            let bytes: &[u8] = bytemuck::cast_slice(&h[host_part..rows * hidden]);
                            let len = align_up(bytes.len() as u64) as usize;
                            let wait = Instant::now();
                            let mut out = pool.buffers().get(len).map_err(storage_err)?;
                            out.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
                            batch.act_writes.push(
                                pool.write(file.file(), k as u64 * act_slot, out, len)
                                    .map_err(storage_err)?,
                            );
                            stats.io_wait_s += wait.elapsed().as_secs_f64();
                        }
                    }
                }
                // With one batch the next unit's activations are the ones just written.
                if nb == 1 && nl < layers && act_rows(rows) > 0 {
                    let wait = Instant::now();
                    submit_act(&tier, &mut batches[0], &mut next, 0, rows, geo)?;
                    stats.io_wait_s += wait.elapsed().as_secs_f64();
                }
            }
            for w in weights_now.iter_mut() {
                *w = None;
            }
        }

        // Choose each sequence's next token.
        let compute = Instant::now();
        for b in 0..bls {
            if finished[b] {
                continue;
            }
            let next_token = sampler.choose(&logits[b * vocab..(b + 1) * vocab]);
            tokens_out[b].push(next_token);
            finished[b] =
                (cfg.stop_at_eos && next_token == eos) || tokens_out[b].len() >= cfg.max_new_tokens;
        }
        stats.cpu_compute_s += compute.elapsed().as_secs_f64();
        position += t_new;
        if first {
            prefill_logits = logits.clone();
            prefill_s = started.elapsed().as_secs_f64();
            device_at_first_token = disk_device.as_ref().and_then(|d| d.sample());
            stats.prefill_compute_s = stats.cpu_compute_s;
            first = false;
            if let Some(t) = &gpu_tier {
                t.set_decoding();
            }
        } else {
            steps += 1;
        }
    }
    let decode_s = started.elapsed().as_secs_f64() - prefill_s;
    let device_at_end = disk_device.as_ref().and_then(|d| d.sample());
    if let (Some(d), Some(a), Some(b), Some(c)) = (
        &disk_device,
        device_at_start,
        device_at_first_token,
        device_at_end,
    ) {
        stats.disk_device = Some(DeviceStages {
            name: d.name.clone(),
            prefill: b.since(&a),
            decode: c.since(&b),
        });
    }
    // Drain outstanding writes so that errors surface and the statistics are complete.
    for b in &mut batches {
        for w in b.kv_writes.drain(..).chain(b.act_writes.drain(..)) {
            w.wait().map_err(storage_err)?;
        }
    }
    for w in weights_next.iter_mut() {
        if let Some(h) = w.take() {
            let _ = h.wait();
        }
    }
    if let Some(p) = tier.weight_pools.iter().flatten().next() {
        stats.weights = p.stats();
    }
    if let Some(p) = &tier.cache_pool {
        stats.cache = p.stats();
    }
    let kv_cache_bytes = batches
        .iter()
        .map(|b| {
            b.home_k
                .iter()
                .chain(&b.home_v)
                .map(KvBuf::bytes)
                .sum::<u64>()
        })
        .sum::<u64>()
        + (layers * kv_disk_total * 2 * kv_slot) as u64
        // The device cache is f32 (see `gpu_tier`).
        + (layers * kv_gpu_total * 2 * seq_floats * 4) as u64;
    stats.device = gpu_tier.map(|t| t.finish(steps + 1));
    Ok((
        GenerationOutput {
            tokens: tokens_out,
            prefill_logits,
            last_logits: logits,
            padded_prompt_len: padded,
            prefill_s,
            decode_s,
            decode_steps: steps,
            kv_cache_bytes,
        },
        stats,
    ))
}

/// Submits the reads of layer `l`'s disk-resident matrices into `out`.
fn submit_weights(tier: &DiskTier, l: usize, out: &mut [Option<ReadHandle>]) -> Result<()> {
    for (i, r) in tier.ranges[l].iter().enumerate() {
        if let (Some((file, offset, len)), Some(Some(pool))) = (r, tier.weight_pools.get(i)) {
            out[i] = Some(pool.read(file, *offset, *len).map_err(storage_err)?);
        }
    }
    Ok(())
}

/// Submits the cache (and, unless `defer_act`, activation) reads of unit (`l`, `k`).
#[allow(clippy::too_many_arguments)]
fn submit_unit(
    tier: &DiskTier,
    batches: &mut [Batch],
    out: &mut UnitLoad,
    l: usize,
    k: usize,
    start: usize,
    t_new: usize,
    defer_act: bool,
    geo: Geometry,
) -> Result<()> {
    let batch = &mut batches[k];
    // A read must see the batch's earlier writes to the same rows.
    if batch.kv_writes_layer == l {
        for w in batch.kv_writes.drain(..) {
            w.wait().map_err(storage_err)?;
        }
    }
    out.kv.clear();
    if let (Some(pool), Some(file)) = (&tier.cache_pool, &tier.kv_file) {
        for p in &batch.place {
            let SeqPlace::Disk { slot, .. } = *p else {
                continue;
            };
            for kind in 0..2 {
                let off = (((l * geo.kv_disk_total + slot) * 2 + kind) * geo.kv_slot) as u64;
                out.kv.push(
                    pool.read(file.file(), off, start * geo.row_bytes)
                        .map_err(storage_err)?,
                );
            }
        }
    }
    out.act = None;
    if l > 0 && !defer_act {
        submit_act(tier, batch, out, k, batch.len * t_new, geo)?;
    }
    Ok(())
}

/// Submits the read of batch `k`'s disk-resident hidden rows.
fn submit_act(
    tier: &DiskTier,
    batch: &mut Batch,
    out: &mut UnitLoad,
    k: usize,
    rows: usize,
    geo: Geometry,
) -> Result<()> {
    let n = geo.act_rows(rows);
    if n == 0 {
        return Ok(());
    }
    for w in batch.act_writes.drain(..) {
        w.wait().map_err(storage_err)?;
    }
    if let (Some(pool), Some(file)) = (&tier.cache_pool, &tier.act_file) {
        out.act = Some(
            pool.read(file.file(), k as u64 * geo.act_slot, n * geo.hidden * 4)
                .map_err(storage_err)?,
        );
    }
    Ok(())
}

/// The offload directory's parent when neither the policy nor `--offload-dir` names one.
pub fn default_offload_parent() -> PathBuf {
    std::env::temp_dir()
}

/// Whether `path` is usable as an offload parent (exists or can be created).
pub fn check_offload_parent(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| ExecError::io(path, e))
}
