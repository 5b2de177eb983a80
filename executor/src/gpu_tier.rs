//! The GPU tiers of the block schedule, on any [`Device`] (design sections 1, 4.3 and 5).
//!
//! - **Weights**: the policy's GPU share of the decoder layers' matrices is resident on the device
//!   (whole matrices, chosen in layer order like the disk share, among the host-resident ones).
//!   Every other matrix is split by the policy's alpha for its kind (HeteGen): output rows
//!   `0..cpu_rows` (`cpu_rows = round(alpha * out)`) are computed on the host from host memory
//!   (the memory map, or the disk tier's staging buffer), while, at the same time
//!   (`rayon::join`), rows `cpu_rows..out` are uploaded into a per-slot staging buffer and
//!   computed on the device. The upload happens once per layer per step, by the first GPU batch
//!   (the others reuse it, as the zig-zag schedule intends), so the copy overlaps the host half
//!   as in HeteGen. The host half is then uploaded and the two halves joined on the device.
//!   alpha = 1 keeps a matrix on the host entirely.
//! - **KV cache**: the policy's GPU share of the block's sequences (whole sequences, spread evenly
//!   over the sequences not on disk) keeps its cache on the device; attention over it runs there.
//! - **Activations**: the policy's GPU share of each batch's hidden rows between two layers (the
//!   rows after the host share, before the disk share) is held on the device.
//! - **Parameter manager** (HeteGen's asynchronous parameter manager): after the policy's buffers
//!   are allocated, device memory left free is filled with more resident matrices, most valuable
//!   first by `g = T_cpu / M_gpu`: the time the matrix costs the host per step when it is not
//!   resident (its disk read when it lives on disk, plus its host half) per byte of device memory
//!   it takes. Ties (alpha = 0 puts no time on the host) go to the larger copy time saved. Here
//!   the promotions are made before the prefill; a GPU implementation makes the same choice and
//!   issues the uploads on its copy stream.
//!
//! Layer norms, residual adds, the embedding and the LM head stay on the host: the model code
//! computes on host slices, so each device product uploads its input and downloads its output.
//! The copy counters therefore show the weights' traffic (what the placement implies) plus these
//! activation copies, reported apart.

use crate::backend::Backend;
use crate::device::{Device, DeviceBuf, DeviceError, DeviceMatrix, TransferStats};
use crate::error::Result;
use crate::kernels::{Matrix, WeightData};
use crate::models::opt::{OptModel, LAYER_MATRICES};
use crate::models::{CausalLm, NewRows, PlacedLinear};
use crate::schedule::WeightPlacement;
use crate::weights::ElementType;
use planner::policy::Split;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// FlexGen's fitted CPU-to-GPU rate (12.89 GiB/s, design section 7): the parameter manager's copy
/// rate when the profile has no GPU.
pub const DEFAULT_H2D_BYTES_PER_S: f64 = 12.89 * (1u64 << 30) as f64;

/// Rates the parameter manager values matrices with (bytes per second).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    /// Host memory bandwidth: a host half of a decode product is bound by it.
    pub cpu_bytes_per_s: f64,
    /// Host-to-device copy rate.
    pub h2d_bytes_per_s: f64,
    /// Disk read rate.
    pub disk_bytes_per_s: f64,
}

impl Rates {
    /// The rates of a hardware profile (its GPU's copy rate, or [`DEFAULT_H2D_BYTES_PER_S`]).
    pub fn from_profile(p: &planner::profile::Profile) -> Rates {
        Rates {
            cpu_bytes_per_s: p.cpu_rates(1, 1).dram_bytes_per_s,
            h2d_bytes_per_s: p
                .gpu_rates()
                .map_or(DEFAULT_H2D_BYTES_PER_S, |g| g.h2d_pinned_bytes_per_s),
            disk_bytes_per_s: p.disk_rates().read_bytes_per_s,
        }
    }
}

/// The policy's GPU shares and the switches of a run on a device.
#[derive(Debug, Clone)]
pub struct GpuPlan {
    /// Share of the decoder layers' matrix bytes resident on the device (`placement.weights.gpu`).
    pub weights: f64,
    /// Share of the block's sequences whose KV cache lives on the device.
    pub kv_cache: f64,
    /// Share of the hidden-state rows held on the device between layers.
    pub activations: f64,
    /// `placement.kv_cache.cpu`, to split the sequences not on disk between host and device.
    pub kv_cache_cpu: f64,
    /// `placement.activations.cpu`, likewise for hidden rows.
    pub activations_cpu: f64,
    /// The HeteGen split ratios (share of a non-resident matrix's output rows computed on the
    /// host), per kind of linear layer.
    pub split: Split,
    /// Fill free device memory with more resident matrices (the parameter manager).
    pub param_manager: bool,
    /// Rates the parameter manager values matrices with.
    pub rates: Rates,
}

impl GpuPlan {
    /// The GPU side of `policy`.
    pub fn from_policy(
        policy: &planner::policy::Policy,
        param_manager: bool,
        rates: Rates,
    ) -> Self {
        let p = &policy.placement;
        GpuPlan {
            weights: p.weights.gpu,
            kv_cache: p.kv_cache.gpu,
            activations: p.activations.gpu,
            kv_cache_cpu: p.kv_cache.cpu,
            activations_cpu: p.activations.cpu,
            split: policy.compute.split,
            param_manager,
            rates,
        }
    }

    /// How many of `n` host-or-device items (sequences, rows) go to the device.
    pub fn device_share(gpu: f64, cpu: f64, n: usize) -> usize {
        if gpu <= 0.0 {
            return 0;
        }
        crate::schedule::split_count(gpu / (gpu + cpu.max(0.0)), n)
    }
}

/// alpha of matrix `i` (q, k, v, out, fc1, fc2) of a layer.
pub fn alpha_for(split: &Split, i: usize) -> f64 {
    match i {
        0..=2 => split.qkv,
        3 => split.out_proj,
        4 => split.fc1,
        _ => split.fc2,
    }
}

/// Where one matrix's product runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixPlace {
    /// Whole on the device for the whole run.
    Resident,
    /// Rows `0..cpu_rows` on the host, the rest uploaded and computed on the device; `cpu_rows`
    /// equal to the row count keeps the matrix on the host.
    Split {
        /// Output rows computed on the host.
        cpu_rows: usize,
    },
}

/// Chooses the device-resident matrices for a weight share `fraction`: walking the matrices in
/// layer order, a host-resident matrix goes to the device while the device share of the bytes
/// seen so far stays within half a matrix of the fraction (the rule the disk share uses).
pub fn place_resident(
    model: &OptModel,
    weights: &WeightPlacement,
    fraction: f64,
) -> Vec<[bool; 6]> {
    let store = model.store();
    let mut out = vec![[false; 6]; model.num_layers()];
    let (mut seen, mut gpu) = (0f64, 0f64);
    for (l, row) in out.iter_mut().enumerate() {
        for (i, id) in model.layer_weight_ids(l).iter().enumerate() {
            let m = store.meta(*id);
            let bytes = (m.shape.iter().product::<usize>() * m.dtype.size()) as f64;
            seen += bytes;
            if fraction > 0.0
                && !weights.on_disk[l][i]
                && gpu + bytes / 2.0 <= fraction * seen + 1e-9
            {
                row[i] = true;
                gpu += bytes;
            }
        }
    }
    out
}

/// A matrix the parameter manager made resident.
#[derive(Debug, Clone, Serialize)]
pub struct Promotion {
    /// Decoder layer.
    pub layer: usize,
    /// Matrix name (`q_proj` ... `fc2`).
    pub matrix: &'static str,
    /// Device bytes it took (matrix and bias).
    pub bytes: u64,
    /// Its value `g = T_cpu / M_gpu`, seconds per step per byte.
    pub g: f64,
    /// Estimated seconds it saves per step: its disk read plus the slower of its host half and
    /// its copy (HeteGen's overlapped form), at the profile's rates.
    pub saved_s_per_step: f64,
}

/// What the parameter manager did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ParamManagerReport {
    /// Whether it was switched on.
    pub enabled: bool,
    /// Device bytes free after the policy's buffers were allocated.
    pub free_bytes: u64,
    /// Matrices made resident, in the order chosen.
    pub promoted: Vec<Promotion>,
    /// Device bytes the promotions took.
    pub promoted_bytes: u64,
    /// Sum of the promotions' estimated saving per step.
    pub estimated_saved_s_per_step: f64,
    /// That saving times the steps run (prefill + decode steps).
    pub estimated_saved_s: f64,
}

/// What the device tiers held and moved during a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceReport {
    /// The device (`sim`, `cuda`).
    pub device: String,
    /// Its capacity in bytes.
    pub capacity_bytes: u64,
    /// Bytes allocated for the policy's placement (before the parameter manager).
    pub planned_bytes: u64,
    /// Peak bytes allocated.
    pub peak_bytes: u64,
    /// Matrix bytes resident on the device by the policy's weight share.
    pub resident_weight_bytes: u64,
    /// Matrix bytes resident in all (policy share plus promotions).
    pub resident_weight_bytes_total: u64,
    /// Matrix bytes of split matrices uploaded and computed on the device, per step (after the
    /// parameter manager's promotions).
    pub streamed_weight_bytes_per_step: u64,
    /// Matrix bytes of split matrices computed on the host, per step (after promotions).
    pub host_weight_bytes_per_step: u64,
    /// Sequences whose KV cache lived on the device.
    pub kv_sequences: usize,
    /// Copies while setting up (resident weights, biases).
    pub setup_transfers: TransferStats,
    /// Copies during the prefill and decode steps, all kinds.
    pub run_transfers: TransferStats,
    /// Of `run_transfers`, bytes of weights uploaded (split matrices' device rows).
    pub run_weight_upload_bytes: u64,
    /// Of `run_transfers`, bytes of weights uploaded during decode steps only.
    pub decode_weight_upload_bytes: u64,
    /// The parameter manager's choices and estimated saving.
    pub param_manager: ParamManagerReport,
}

/// Input and output widths of the widest product: the work buffers' row width.
fn widest(model: &OptModel) -> usize {
    let s = &model.config().spec;
    s.hidden_size.max(s.ffn_dim) as usize
}

fn dtype_of(d: &WeightData) -> ElementType {
    match d {
        WeightData::Bf16Panels(_) => unreachable!("panels are packed only for runs without a GPU"),
        WeightData::F32(_) => ElementType::F32,
        WeightData::F16(_) => ElementType::F16,
        WeightData::Bf16(_) => ElementType::Bf16,
    }
}

/// Bytes of elements `a..b` of a weight slice.
fn element_bytes<'a>(d: &WeightData<'a>, a: usize, b: usize) -> &'a [u8] {
    match *d {
        WeightData::Bf16Panels(_) => unreachable!("panels are packed only for runs without a GPU"),
        WeightData::F32(s) => bytemuck::cast_slice(&s[a..b]),
        WeightData::F16(s) => bytemuck::cast_slice(&s[a..b]),
        WeightData::Bf16(s) => bytemuck::cast_slice(&s[a..b]),
    }
}

/// Output rows `0..rows` of a matrix, as a matrix.
fn first_rows<'a>(m: &Matrix<'a>, rows: usize) -> Matrix<'a> {
    let n = rows * m.in_features;
    let data = match m.data {
        WeightData::Bf16Panels(_) => unreachable!("panels are packed only for runs without a GPU"),
        WeightData::F32(s) => WeightData::F32(&s[..n]),
        WeightData::F16(s) => WeightData::F16(&s[..n]),
        WeightData::Bf16(s) => WeightData::Bf16(&s[..n]),
    };
    Matrix {
        data,
        out_features: rows,
        in_features: m.in_features,
    }
}

/// Two buffers of `bytes` (named `what` and `what, second`), or neither: the first is given back
/// when the second does not fit.
fn alloc_pair(
    dev: &dyn Device,
    bytes: usize,
    what: &str,
    second: &str,
) -> Result<(DeviceBuf, DeviceBuf), DeviceError> {
    let a = dev.alloc(bytes, what)?;
    match dev.alloc(bytes, &format!("{what}, {second}")) {
        Ok(b) => Ok((a, b)),
        Err(e) => {
            dev.free(a);
            Err(e)
        }
    }
}

/// The shape of the run the device buffers are sized for.
#[derive(Debug, Clone)]
pub struct TierShape {
    /// Most rows a product sees (a GPU batch's prefill: `gbs * padded prompt`).
    pub rows: usize,
    /// Cache positions per sequence.
    pub max_len: usize,
    /// Per GPU batch: sequences whose cache is on the device.
    pub kv_sequences: Vec<usize>,
    /// Most hidden rows of one batch held on the device between layers.
    pub act_rows: usize,
}

/// The device side of one block run (see the module docs).
pub struct GpuTier<'d> {
    dev: &'d dyn Device,
    place: Vec<[MatrixPlace; 6]>,
    resident: Vec<[Option<DeviceBuf>; 6]>,
    bias: Vec<[Option<DeviceBuf>; 6]>,
    staging: Vec<Option<DeviceBuf>>,
    x: DeviceBuf,
    y: DeviceBuf,
    halves: Option<(DeviceBuf, DeviceBuf)>,
    host_half: Mutex<Vec<f32>>,
    /// Per batch, per layer: (K, V) of the batch's device-resident sequences.
    kv: Vec<Vec<Option<(DeviceBuf, DeviceBuf)>>>,
    seq_floats: usize,
    act: Vec<Option<DeviceBuf>>,
    error: Mutex<Option<DeviceError>>,
    weight_uploads: AtomicU64,
    decode_weight_uploads: AtomicU64,
    decoding: AtomicBool,
    /// Copy counters when setup ended (the run's copies are counted from here).
    after_setup: TransferStats,
    report: DeviceReport,
}

impl<'d> GpuTier<'d> {
    /// Allocates the policy's device buffers, uploads the resident weights, then (when switched
    /// on) lets the parameter manager fill the free memory. Fails with the device's
    /// out-of-memory error when the policy's buffers do not fit.
    pub fn new(
        dev: &'d dyn Device,
        model: &OptModel,
        plan: &GpuPlan,
        weights: &WeightPlacement,
        shape: &TierShape,
    ) -> Result<GpuTier<'d>> {
        let store = model.store();
        let layers = model.num_layers();
        let before = dev.transfers();
        let resident_by_policy = place_resident(model, weights, plan.weights);
        let mut report = DeviceReport {
            device: dev.name().to_string(),
            capacity_bytes: dev.capacity_bytes(),
            ..DeviceReport::default()
        };
        let mut place = Vec::with_capacity(layers);
        for (l, resident_row) in resident_by_policy.iter().enumerate() {
            let mut row = [MatrixPlace::Resident; 6];
            for (i, id) in model.layer_weight_ids(l).iter().enumerate() {
                if !resident_row[i] {
                    let out = store.meta(*id).shape[0];
                    let alpha = alpha_for(&plan.split, i);
                    let cpu_rows = ((alpha * out as f64).round() as usize).min(out);
                    row[i] = MatrixPlace::Split { cpu_rows };
                }
            }
            place.push(row);
        }
        let none6 = || -> [Option<DeviceBuf>; 6] { Default::default() };
        // The work buffers; from here on the tier's Drop gives back whatever was allocated.
        let work = shape.rows * widest(model) * 4;
        let (x, y) = alloc_pair(dev, work, "input rows of a device product", "output rows")?;
        let mut tier = GpuTier {
            dev,
            resident: (0..layers).map(|_| none6()).collect(),
            bias: (0..layers).map(|_| none6()).collect(),
            staging: (0..6).map(|_| None).collect(),
            x,
            y,
            halves: None,
            host_half: Mutex::new(Vec::new()),
            kv: Vec::new(),
            seq_floats: shape.max_len * model.kv_width(),
            act: Vec::new(),
            error: Mutex::new(None),
            weight_uploads: AtomicU64::new(0),
            decode_weight_uploads: AtomicU64::new(0),
            decoding: AtomicBool::new(false),
            after_setup: TransferStats::default(),
            place,
            report: DeviceReport::default(),
        };
        // Resident weights (the policy's share), then the device halves' staging and biases.
        let mut staging_bytes = [0usize; 6];
        let mut any_halves = false;
        for l in 0..layers {
            for (i, staged) in staging_bytes.iter_mut().enumerate() {
                match tier.place[l][i] {
                    MatrixPlace::Resident => {
                        report.resident_weight_bytes += tier.make_resident(model, l, i)?;
                    }
                    MatrixPlace::Split { cpu_rows } => {
                        let m = store.meta(model.layer_weight_ids(l)[i]);
                        let (out, inp) = (m.shape[0], m.shape[1]);
                        if cpu_rows < out {
                            let dev_bytes = (out - cpu_rows) * inp * m.dtype.size();
                            *staged = (*staged).max(dev_bytes);
                            tier.upload_bias(model, l, i)?;
                            any_halves |= cpu_rows > 0;
                        }
                    }
                }
            }
        }
        for (i, bytes) in staging_bytes.iter().enumerate() {
            if *bytes > 0 {
                let what = format!("staging for streamed {} rows", LAYER_MATRICES[i]);
                tier.staging[i] = Some(dev.alloc(*bytes, &what)?);
            }
        }
        if any_halves {
            let bytes = shape.rows * widest(model) * 4;
            tier.halves = Some(alloc_pair(
                dev,
                bytes,
                "host half of a split product",
                "device half",
            )?);
            *tier.host_half.lock().unwrap_or_else(|e| e.into_inner()) =
                vec![0.0; shape.rows * widest(model)];
        }
        for &seqs in &shape.kv_sequences {
            // Each buffer goes into the tier as soon as it exists, so that a later failure
            // gives it back.
            tier.kv.push(Vec::with_capacity(layers));
            for l in 0..layers {
                let pair = if seqs > 0 {
                    let bytes = seqs * tier.seq_floats * 4;
                    let what = format!("KV cache of layer {l}");
                    Some(alloc_pair(dev, bytes, &what, "values")?)
                } else {
                    None
                };
                if let Some(batch) = tier.kv.last_mut() {
                    batch.push(pair);
                }
            }
            report.kv_sequences += seqs;
            let act = (shape.act_rows > 0)
                .then(|| {
                    dev.alloc(
                        shape.act_rows * model.kv_width() * 4,
                        "hidden rows held between layers",
                    )
                })
                .transpose()?;
            tier.act.push(act);
        }
        report.planned_bytes = dev.used_bytes();
        report.param_manager.enabled = plan.param_manager;
        report.param_manager.free_bytes = dev.capacity_bytes().saturating_sub(dev.used_bytes());
        tier.report = report;
        if plan.param_manager {
            tier.promote(model, weights, &plan.rates)?;
        }
        // Weights as run (after any promotions): resident, and per step streamed or on the host.
        for l in 0..layers {
            for (i, id) in model.layer_weight_ids(l).iter().enumerate() {
                let m = store.meta(*id);
                let row_bytes = (m.shape[1] * m.dtype.size()) as u64;
                let r = &mut tier.report;
                match tier.place[l][i] {
                    MatrixPlace::Resident => {
                        r.resident_weight_bytes_total += m.shape[0] as u64 * row_bytes;
                    }
                    MatrixPlace::Split { cpu_rows } => {
                        r.host_weight_bytes_per_step += cpu_rows as u64 * row_bytes;
                        r.streamed_weight_bytes_per_step +=
                            (m.shape[0] - cpu_rows) as u64 * row_bytes;
                    }
                }
            }
        }
        tier.after_setup = dev.transfers();
        tier.report.setup_transfers = tier.after_setup.since(&before);
        Ok(tier)
    }

    /// Uploads matrix `i` of layer `l` whole (and its bias); returns the matrix bytes.
    fn make_resident(&mut self, model: &OptModel, l: usize, i: usize) -> Result<u64> {
        let id = model.layer_weight_ids(l)[i];
        let data = model.store().data(id);
        let n = match &data {
            WeightData::Bf16Panels(_) => {
                unreachable!("panels are packed only for runs without a GPU")
            }
            WeightData::F32(s) => s.len(),
            WeightData::F16(s) => s.len(),
            WeightData::Bf16(s) => s.len(),
        };
        let bytes = element_bytes(&data, 0, n);
        let what = format!("resident layer {l} {}", LAYER_MATRICES[i]);
        self.resident[l][i] = Some(self.alloc_with(bytes, &what)?);
        self.place[l][i] = MatrixPlace::Resident;
        self.upload_bias(model, l, i)?;
        Ok(bytes.len() as u64)
    }

    fn upload_bias(&mut self, model: &OptModel, l: usize, i: usize) -> Result<()> {
        if let (Some(b), None) = (model.layer_biases(l)[i], &self.bias[l][i]) {
            let what = format!("bias of layer {l} {}", LAYER_MATRICES[i]);
            self.bias[l][i] = Some(self.alloc_with(bytemuck::cast_slice(b), &what)?);
        }
        Ok(())
    }

    /// A buffer holding a copy of `bytes` (given back if the copy fails).
    fn alloc_with(&self, bytes: &[u8], what: &str) -> Result<DeviceBuf, DeviceError> {
        let buf = self.dev.alloc(bytes.len(), what)?;
        match self.dev.upload(&buf, 0, bytes) {
            Ok(()) => Ok(buf),
            Err(e) => {
                self.dev.free(buf);
                Err(e)
            }
        }
    }

    /// The parameter manager: promotes non-resident matrices into the free device memory, most
    /// valuable first by `g = T_cpu / M_gpu`.
    fn promote(
        &mut self,
        model: &OptModel,
        weights: &WeightPlacement,
        rates: &Rates,
    ) -> Result<()> {
        let store = model.store();
        struct Candidate {
            l: usize,
            i: usize,
            bytes: u64,
            t_cpu: f64,
            saved: f64,
        }
        let mut candidates = Vec::new();
        for l in 0..self.place.len() {
            for i in 0..6 {
                let MatrixPlace::Split { cpu_rows } = self.place[l][i] else {
                    continue;
                };
                let m = store.meta(model.layer_weight_ids(l)[i]);
                let row_bytes = (m.shape[1] * m.dtype.size()) as f64;
                let matrix = m.shape[0] as f64 * row_bytes;
                let disk = if weights.on_disk[l][i] {
                    matrix / rates.disk_bytes_per_s
                } else {
                    0.0
                };
                let host = cpu_rows as f64 * row_bytes / rates.cpu_bytes_per_s;
                let copy = (m.shape[0] - cpu_rows) as f64 * row_bytes / rates.h2d_bytes_per_s;
                let bias = if self.bias[l][i].is_none() {
                    model.layer_biases(l)[i].map_or(0, |b| b.len() * 4)
                } else {
                    0
                };
                candidates.push(Candidate {
                    l,
                    i,
                    bytes: matrix as u64 + bias as u64,
                    t_cpu: disk + host,
                    saved: disk + host.max(copy),
                });
            }
        }
        let g = |c: &Candidate| c.t_cpu / c.bytes.max(1) as f64;
        candidates.sort_by(|a, b| {
            g(b).total_cmp(&g(a))
                .then(b.saved.total_cmp(&a.saved))
                .then((a.l, a.i).cmp(&(b.l, b.i)))
        });
        for c in candidates {
            let free = self
                .dev
                .capacity_bytes()
                .saturating_sub(self.dev.used_bytes());
            if c.bytes > free {
                continue;
            }
            self.make_resident(model, c.l, c.i)?;
            let pm = &mut self.report.param_manager;
            pm.promoted.push(Promotion {
                layer: c.l,
                matrix: LAYER_MATRICES[c.i],
                bytes: c.bytes,
                g: g(&c),
                saved_s_per_step: c.saved,
            });
            pm.promoted_bytes += c.bytes;
            pm.estimated_saved_s_per_step += c.saved;
        }
        Ok(())
    }

    /// Whether matrix `i` of layer `l` is resident on the device (the disk tier then does not
    /// read it).
    pub fn is_resident(&self, l: usize, i: usize) -> bool {
        self.place[l][i] == MatrixPlace::Resident
    }

    /// Marks the following steps as decode steps (for the decode-only weight upload counter).
    pub fn set_decoding(&self) {
        self.decoding.store(true, Ordering::Relaxed);
    }

    /// Uploads rows `cpu_rows..` of a split matrix's host copy into its slot's staging buffer
    /// (counted as weight traffic).
    fn upload_rows(&self, i: usize, dense: &Matrix, cpu_rows: usize) -> Result<(), DeviceError> {
        let inp = dense.in_features;
        let bytes = element_bytes(&dense.data, cpu_rows * inp, dense.out_features * inp);
        let buf = self.staging[i]
            .as_ref()
            .ok_or_else(|| DeviceError::Invalid {
                device: self.dev.name().to_string(),
                message: format!("no staging buffer for {}", LAYER_MATRICES[i]),
            })?;
        self.dev.upload(buf, 0, bytes)?;
        let n = bytes.len() as u64;
        self.weight_uploads.fetch_add(n, Ordering::Relaxed);
        if self.decoding.load(Ordering::Relaxed) {
            self.decode_weight_uploads.fetch_add(n, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The products of layer `l`, for the model's layer function.
    /// Built once per layer per step and shared by the GPU batches, so that a split matrix's
    /// device rows are uploaded once for all of them.
    pub fn layer<'t>(&'t self, be: &'t dyn Backend, l: usize) -> LayerOnDevice<'t, 'd> {
        LayerOnDevice {
            tier: self,
            be,
            l,
            uploaded: Default::default(),
        }
    }

    fn record(&self, e: DeviceError) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    /// The first device failure recorded inside a layer, if any.
    pub fn take_error(&self) -> Result<()> {
        match self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Stores batch `k`'s device share of hidden rows.
    pub fn save_act(&self, k: usize, rows: &[f32]) -> Result<()> {
        if let Some(Some(buf)) = self.act.get(k) {
            self.dev.upload(buf, 0, bytemuck::cast_slice(rows))?;
        }
        Ok(())
    }

    /// Loads batch `k`'s device share of hidden rows into `rows`.
    pub fn load_act(&self, k: usize, rows: &mut [f32]) -> Result<()> {
        if let Some(Some(buf)) = self.act.get(k) {
            self.dev.download(buf, 0, bytemuck::cast_slice_mut(rows))?;
        }
        Ok(())
    }

    /// Appends sequence `local`'s new rows to batch `k`'s device cache of layer `l` and attends
    /// on the device; failures are recorded for [`GpuTier::take_error`].
    pub fn attend(&self, k: usize, l: usize, local: usize, r: &NewRows, out: &mut [f32]) {
        if let Err(e) = self.try_attend(k, l, local, r, out) {
            self.record(e);
        }
    }

    fn try_attend(
        &self,
        k: usize,
        l: usize,
        local: usize,
        r: &NewRows,
        out: &mut [f32],
    ) -> Result<(), DeviceError> {
        let Some(Some((kb, vb))) = self.kv.get(k).and_then(|b| b.get(l)) else {
            return Err(DeviceError::Invalid {
                device: self.dev.name().to_string(),
                message: format!("no device KV cache for batch {k} layer {l}"),
            });
        };
        let width = r.num_heads * r.head_dim;
        let base = local * self.seq_floats * 4;
        let at = base + r.start * width * 4;
        self.dev.upload(kb, at, bytemuck::cast_slice(r.k))?;
        self.dev.upload(vb, at, bytemuck::cast_slice(r.v))?;
        self.dev.upload(&self.x, 0, bytemuck::cast_slice(r.q))?;
        let kv_len = r.start + r.q_len;
        self.dev.attention(
            &self.x,
            r.q_len,
            kb,
            vb,
            base,
            kv_len,
            r.key_valid,
            r.num_heads,
            r.head_dim,
            &self.y,
        )?;
        self.dev.download(&self.y, 0, bytemuck::cast_slice_mut(out))
    }

    /// The report, with the estimated saving over `steps` steps (prefill + decode).
    pub fn finish(mut self, steps: usize) -> DeviceReport {
        let r = &mut self.report;
        r.peak_bytes = self.dev.peak_bytes();
        r.run_transfers = self.dev.transfers().since(&self.after_setup);
        r.run_weight_upload_bytes = self.weight_uploads.load(Ordering::Relaxed);
        r.decode_weight_upload_bytes = self.decode_weight_uploads.load(Ordering::Relaxed);
        r.param_manager.estimated_saved_s =
            r.param_manager.estimated_saved_s_per_step * steps as f64;
        std::mem::take(&mut self.report)
    }
}

impl Drop for GpuTier<'_> {
    fn drop(&mut self) {
        let dev = self.dev;
        let bufs = self
            .resident
            .drain(..)
            .chain(self.bias.drain(..))
            .flatten()
            .chain(self.staging.drain(..))
            .chain(self.act.drain(..))
            .flatten();
        for b in bufs {
            dev.free(b);
        }
        for (k, v) in self.kv.drain(..).flatten().flatten() {
            dev.free(k);
            dev.free(v);
        }
        if let Some((a, b)) = self.halves.take() {
            dev.free(a);
            dev.free(b);
        }
        let x = std::mem::replace(&mut self.x, DeviceBuf::new(usize::MAX, 0));
        let y = std::mem::replace(&mut self.y, DeviceBuf::new(usize::MAX, 0));
        dev.free(x);
        dev.free(y);
    }
}

/// One layer's products on the device, as [`PlacedLinear`].
pub struct LayerOnDevice<'t, 'd> {
    tier: &'t GpuTier<'d>,
    be: &'t dyn Backend,
    l: usize,
    /// Whether each split matrix's device rows are in its staging buffer for this layer.
    uploaded: [AtomicBool; 6],
}

impl PlacedLinear for LayerOnDevice<'_, '_> {
    fn linear(
        &self,
        i: usize,
        x: &[f32],
        rows: usize,
        dense: &Matrix,
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) -> bool {
        if let MatrixPlace::Split { cpu_rows } = self.tier.place[self.l][i] {
            if cpu_rows >= dense.out_features {
                return false;
            }
        }
        // On the device (resident), or split: the host half from host memory while the device
        // half is uploaded (first batch of the layer only) and computed, then joined on the
        // device. Failures are recorded for `GpuTier::take_error`.
        let mut product = || -> Result<(), DeviceError> {
            let (t, l, be) = (self.tier, self.l, self.be);
            let (out, inp) = (dense.out_features, dense.in_features);
            let dev = t.dev;
            dev.upload(&t.x, 0, bytemuck::cast_slice(&x[..rows * inp]))?;
            let missing = |what: &str| DeviceError::Invalid {
                device: dev.name().to_string(),
                message: format!("layer {l} {}: no {what}", LAYER_MATRICES[i]),
            };
            // The device's rows: all of a resident matrix, rows `cpu_rows..` of a split one.
            let (buf, cpu_rows) = match t.place[l][i] {
                MatrixPlace::Resident => (&t.resident[l][i], 0),
                MatrixPlace::Split { cpu_rows } => (&t.staging[i], cpu_rows),
            };
            let m = DeviceMatrix {
                buf: buf.as_ref().ok_or_else(|| missing("weight buffer"))?,
                offset: 0,
                dtype: dtype_of(&dense.data),
                out_features: out - cpu_rows,
                in_features: inp,
                bias: t.bias[l][i].as_ref().map(|b| (b, cpu_rows * 4)),
            };
            // The device half: a split matrix's rows copied over (once per layer), then computed.
            let device_half = |y_dev: &DeviceBuf| {
                let split = matches!(t.place[l][i], MatrixPlace::Split { .. });
                if split && !self.uploaded[i].swap(true, Ordering::Relaxed) {
                    t.upload_rows(i, dense, cpu_rows)?;
                }
                dev.linear(&t.x, rows, &m, y_dev)
            };
            if cpu_rows == 0 {
                device_half(&t.y)?;
            } else {
                let (host_y, dev_y) = t.halves.as_ref().ok_or_else(|| missing("halves"))?;
                let mut host = t.host_half.lock().unwrap_or_else(|p| p.into_inner());
                let host = &mut host[..rows * cpu_rows];
                let hm = first_rows(dense, cpu_rows);
                let host_bias = bias.map(|b| &b[..cpu_rows]);
                // The host half from host memory while the device half is copied and computed.
                let ((), on_device) = rayon::join(
                    || be.linear(x, rows, &hm, host_bias, host),
                    || device_half(dev_y),
                );
                on_device?;
                dev.upload(host_y, 0, bytemuck::cast_slice(host))?;
                dev.join_columns(host_y, cpu_rows, dev_y, out - cpu_rows, rows, &t.y)?;
            }
            dev.download(&t.y, 0, bytemuck::cast_slice_mut(&mut y[..rows * out]))
        };
        if let Err(e) = product() {
            self.tier.record(e);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_alphas_follow_the_policy() {
        // Host-or-device items split by gpu / (gpu + cpu); a share above 0 gets at least one.
        assert_eq!(GpuPlan::device_share(0.0, 1.0, 4), 0);
        assert_eq!(GpuPlan::device_share(0.25, 0.25, 4), 2);
        assert_eq!(GpuPlan::device_share(0.1, 0.9, 4), 1);
        assert_eq!(GpuPlan::device_share(0.5, 0.0, 3), 3);
        let split = Split {
            qkv: 0.1,
            out_proj: 0.2,
            fc1: 0.3,
            fc2: 0.4,
        };
        let alphas: Vec<f64> = (0..6).map(|i| alpha_for(&split, i)).collect();
        assert_eq!(alphas, [0.1, 0.1, 0.1, 0.2, 0.3, 0.4]);
    }

    #[test]
    fn rates_come_from_the_profile_with_flexgens_copy_rate_without_a_gpu() {
        let cpu = planner::profile::Profile::embedded("cpu-2core-24gib").unwrap();
        let r = Rates::from_profile(&cpu);
        assert_eq!(r.h2d_bytes_per_s, DEFAULT_H2D_BYTES_PER_S);
        assert!(r.cpu_bytes_per_s > 1e9 && r.disk_bytes_per_s > 1e8);
    }
}
