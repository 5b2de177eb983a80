//! Policy files: the planner's decision, written as TOML, read back by the executor and by
//! `planner check`.
//!
//! A policy says where every kind of tensor lives (placement rows over GPU / CPU / disk), the batch
//! shape, where each piece of arithmetic runs, whether to compress, and what the planner predicted.
//! Reading is strict: unknown keys are rejected and every value is checked, and each error names the
//! file, the field and what was expected.

use crate::cost::{Prediction, StageBreakdown, TierUse};
use crate::profile::CapacityOverrides;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;
use thiserror::Error;

/// Longest prompt plus generation a policy may ask for (keeps every size computation far inside
/// u64 and f64 precision).
pub const MAX_SEQUENCE_TOKENS: u64 = 1 << 20;
/// Largest GPU batch size or number of GPU batches a policy may ask for.
pub const MAX_BATCH: u64 = 1 << 16;

/// Tolerance for a placement row to count as summing to 1.
pub const ROW_SUM_TOLERANCE: f64 = 1e-6;

/// Why a policy file could not be used.
#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("cannot read policy {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, a missing or unknown key, or a value of the wrong type.
    #[error("policy {path}: {message}")]
    Parse { path: String, message: String },
    /// A value of the right type but outside what is allowed.
    #[error("policy {path}: field '{field}' {problem}")]
    Invalid {
        path: String,
        field: String,
        problem: String,
    },
    #[error("cannot write policy {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// One placement row: the share of a tensor kind on each tier, summing to 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    pub gpu: f64,
    pub cpu: f64,
    pub disk: f64,
}

impl Placement {
    /// Everything on one tier.
    pub const ALL_CPU: Placement = Placement {
        gpu: 0.0,
        cpu: 1.0,
        disk: 0.0,
    };
    pub const ALL_GPU: Placement = Placement {
        gpu: 1.0,
        cpu: 0.0,
        disk: 0.0,
    };

    fn validate(&self, row: &str) -> Result<(), (String, String)> {
        for (tier, value) in [("gpu", self.gpu), ("cpu", self.cpu), ("disk", self.disk)] {
            if !(0.0..=1.0).contains(&value) || value.is_nan() {
                return Err((
                    format!("placement.{row}.{tier}"),
                    format!("is {value}; expected a fraction in [0, 1]"),
                ));
            }
        }
        let sum = self.gpu + self.cpu + self.disk;
        if (sum - 1.0).abs() > ROW_SUM_TOLERANCE {
            return Err((
                format!("placement.{row}"),
                format!(
                    "sums to {sum} (gpu {} + cpu {} + disk {}); expected the three to sum to 1",
                    self.gpu, self.cpu, self.disk
                ),
            ));
        }
        Ok(())
    }
}

/// Where weights, KV cache and activations live.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placements {
    pub weights: Placement,
    pub kv_cache: Placement,
    pub activations: Placement,
}

/// Which model the policy is for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    /// Built-in name (`opt-6.7b`) or the name derived from a config's folder.
    pub name: String,
    /// Hugging Face config the shapes came from, when not a built-in model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

/// The generation job the policy was solved for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Prompt length s, in tokens.
    pub prompt_len: u64,
    /// Tokens generated per sequence, n.
    pub gen_len: u64,
}

/// FlexGen's block: `gpu_batch_size * num_gpu_batches` sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// Sequences per GPU batch (gbs).
    pub gpu_batch_size: u64,
    /// GPU batches per block (nb).
    pub num_gpu_batches: u64,
}

impl Batch {
    /// Sequences in a block (bls).
    pub fn block_size(&self) -> u64 {
        self.gpu_batch_size * self.num_gpu_batches
    }
}

/// HeteGen split: for each kind of linear layer, the share of output columns of its
/// non-GPU-resident weights that is computed on the CPU (alpha); the rest is copied to the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    /// Q, K and V projections.
    pub qkv: f64,
    /// Attention output projection.
    pub out_proj: f64,
    /// FFN up projection.
    pub fc1: f64,
    /// FFN down projection.
    pub fc2: f64,
}

impl Split {
    /// The same alpha for every kind of linear layer.
    pub fn uniform(alpha: f64) -> Split {
        Split {
            qkv: alpha,
            out_proj: alpha,
            fc1: alpha,
            fc2: alpha,
        }
    }

    fn fields(&self) -> [(&'static str, f64); 4] {
        [
            ("qkv", self.qkv),
            ("out_proj", self.out_proj),
            ("fc1", self.fc1),
            ("fc2", self.fc2),
        ]
    }
}

/// Where arithmetic runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compute {
    /// Attention over CPU- or disk-resident KV cache runs on the CPU (FlexGen's CPU delegation).
    pub cpu_attention: bool,
    /// HeteGen split ratios.
    pub split: Split,
}

/// FlexGen's 4-bit group-wise compression, per tensor kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Compression {
    pub weights: bool,
    pub kv_cache: bool,
}

/// Where the policy came from: ties it to a profile and a planner version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// Version of the planner that wrote the file.
    pub planner_version: String,
    /// Path of the hardware profile, relative to the repository root when inside it, or the name
    /// of an embedded profile (`builtin:NAME`).
    pub profile: String,
    /// Fingerprint of the profile's contents at solve time.
    pub profile_fingerprint: String,
    /// `throughput` or `latency`.
    pub objective: String,
    /// Capacities given on the command line instead of the profile's (empty when none were).
    #[serde(default, skip_serializing_if = "CapacityOverrides::is_empty")]
    pub capacity_overrides: CapacityOverrides,
    /// Whether the search could choose 4-bit compression (`planner solve --no-compression` sets
    /// false); `planner check` re-solves under the same restriction.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub allow_compression: bool,
    /// Limits on the block shapes the search could choose (`--block`, `--max-block`); `planner
    /// check` re-solves under the same limits.
    #[serde(default, skip_serializing_if = "BlockLimits::is_empty")]
    pub block_limits: BlockLimits,
}

/// Limits on the block shapes (gbs x nb) the throughput search enumerates: a user who has at most
/// so many requests at once, or who wants one shape's best placement to compare with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockLimits {
    /// Only this shape: [gpu_batch_size, num_gpu_batches].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed: Option<[u64; 2]>,
    /// At most this many sequences per block (gbs * nb).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sequences: Option<u64>,
}

impl BlockLimits {
    /// Whether the search is unrestricted.
    pub fn is_empty(&self) -> bool {
        self.fixed.is_none() && self.max_sequences.is_none()
    }

    /// Whether the shape gbs x nb may be chosen.
    pub fn allows(&self, gbs: u64, nb: u64) -> bool {
        self.fixed.is_none_or(|[g, n]| (g, n) == (gbs, nb))
            && self.max_sequences.is_none_or(|m| gbs * nb <= m)
    }
}

fn default_true() -> bool {
    true
}

fn is_true(v: &bool) -> bool {
    *v
}

/// A complete policy file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub provenance: Provenance,
    pub model: ModelRef,
    pub workload: Workload,
    pub batch: Batch,
    pub placement: Placements,
    pub compute: Compute,
    #[serde(default)]
    pub compression: Compression,
    /// What the planner predicted; absent in hand-written policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<Prediction>,
}

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses and validates policy text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &str) -> Result<Policy, PolicyError> {
        let policy: Policy = toml::from_str(text).map_err(|e| PolicyError::Parse {
            path: path.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        policy.validate(path)?;
        Ok(policy)
    }

    /// Checks every value is in range; `path` is only used in error messages.
    pub fn validate(&self, path: &str) -> Result<(), PolicyError> {
        let invalid = |field: String, problem: String| PolicyError::Invalid {
            path: path.to_string(),
            field,
            problem,
        };
        for (row, placement) in [
            ("weights", &self.placement.weights),
            ("kv_cache", &self.placement.kv_cache),
            ("activations", &self.placement.activations),
        ] {
            placement.validate(row).map_err(|(f, p)| invalid(f, p))?;
        }
        if self.batch.gpu_batch_size < 1 {
            return Err(invalid(
                "batch.gpu_batch_size".into(),
                "is 0; expected at least 1".into(),
            ));
        }
        if self.batch.num_gpu_batches < 1 {
            return Err(invalid(
                "batch.num_gpu_batches".into(),
                "is 0; expected at least 1".into(),
            ));
        }
        if self.workload.prompt_len < 1 {
            return Err(invalid(
                "workload.prompt_len".into(),
                "is 0; expected at least 1".into(),
            ));
        }
        for (field, value) in [
            ("batch.gpu_batch_size", self.batch.gpu_batch_size),
            ("batch.num_gpu_batches", self.batch.num_gpu_batches),
        ] {
            if value > MAX_BATCH {
                return Err(invalid(
                    field.into(),
                    format!("is {value}; expected at most {MAX_BATCH}"),
                ));
            }
        }
        let tokens = self
            .workload
            .prompt_len
            .saturating_add(self.workload.gen_len);
        if tokens > MAX_SEQUENCE_TOKENS {
            return Err(invalid(
                "workload".into(),
                format!("prompt_len + gen_len is {tokens}; expected at most {MAX_SEQUENCE_TOKENS}"),
            ));
        }
        if !matches!(self.provenance.objective.as_str(), "throughput" | "latency") {
            return Err(invalid(
                "provenance.objective".into(),
                format!(
                    "is '{}'; expected 'throughput' or 'latency'",
                    self.provenance.objective
                ),
            ));
        }
        for (field, value) in [
            (
                "gpu_mem_gib",
                self.provenance.capacity_overrides.gpu_mem_gib,
            ),
            (
                "cpu_mem_gib",
                self.provenance.capacity_overrides.cpu_mem_gib,
            ),
            (
                "disk_mem_gib",
                self.provenance.capacity_overrides.disk_mem_gib,
            ),
        ] {
            if let Some(v) = value {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(invalid(
                        format!("provenance.capacity_overrides.{field}"),
                        format!("is {v}; expected a number of GiB >= 0"),
                    ));
                }
            }
        }
        for (kind, alpha) in self.compute.split.fields() {
            if !(0.0..=1.0).contains(&alpha) || alpha.is_nan() {
                return Err(invalid(
                    format!("compute.split.{kind}"),
                    format!("is {alpha}; expected a fraction in [0, 1]"),
                ));
            }
        }
        Ok(())
    }

    /// Writes the policy as commented TOML (see [`Policy::to_toml`]).
    pub fn save(&self, path: &Path) -> Result<(), PolicyError> {
        std::fs::write(path, self.to_toml()).map_err(|source| PolicyError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    /// The policy as TOML with a comment explaining each section. Parsing the text gives back an
    /// equal policy (floats are written with enough digits to round-trip).
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        let p = &self.provenance;
        line(
            w,
            "# Strata policy: where every tensor lives, how the batch is shaped and where the",
        );
        line(
            w,
            "# arithmetic runs, for one model, workload and machine. Written by `planner solve`;",
        );
        line(
            w,
            "# read by `executor --policy` and re-verified by `planner check`.",
        );
        line(w, "");
        line(w, "# Where this policy came from: the planner version, the hardware profile it was solved");
        line(w, "# for (a path relative to the repository root, or builtin:NAME for an embedded one), the");
        line(w, "# sha256 of that profile's parsed contents, and the objective (throughput or latency).");
        line(w, "[provenance]");
        kv_str(w, "planner_version", &p.planner_version);
        kv_str(w, "profile", &p.profile);
        kv_str(w, "profile_fingerprint", &p.profile_fingerprint);
        kv_str(w, "objective", &p.objective);
        if !p.allow_compression {
            line(
                w,
                "# Solved with --no-compression: the search never considered 4-bit compression.",
            );
            kv_bool(w, "allow_compression", false);
        }
        if !p.capacity_overrides.is_empty() {
            line(w, "");
            line(w, "# Usable memory per tier given on the command line instead of the profile's, in GiB.");
            line(w, "[provenance.capacity_overrides]");
            let c = &p.capacity_overrides;
            for (k, v) in [
                ("gpu_mem_gib", c.gpu_mem_gib),
                ("cpu_mem_gib", c.cpu_mem_gib),
                ("disk_mem_gib", c.disk_mem_gib),
            ] {
                if let Some(v) = v {
                    kv_f64(w, k, v);
                }
            }
        }
        let b = &p.block_limits;
        if !b.is_empty() {
            line(w, "");
            line(
                w,
                "# Block shapes the search was limited to (--block GxN, --max-block N).",
            );
            line(w, "[provenance.block_limits]");
            if let Some([g, n]) = b.fixed {
                line(w, &format!("fixed = [{g}, {n}]"));
            }
            if let Some(m) = b.max_sequences {
                line(w, &format!("max_sequences = {m}"));
            }
        }
        line(w, "");
        line(
            w,
            "# The model: a built-in name, or the Hugging Face config.json its shapes came from.",
        );
        line(w, "[model]");
        kv_str(w, "name", &self.model.name);
        if let Some(c) = &self.model.config {
            kv_str(w, "config", c);
        }
        line(w, "");
        line(
            w,
            "# The job: prompt length s and tokens generated per sequence n.",
        );
        line(w, "[workload]");
        kv_int(w, "prompt_len", self.workload.prompt_len);
        kv_int(w, "gen_len", self.workload.gen_len);
        line(w, "");
        line(w, "# FlexGen's block: gpu_batch_size sequences per GPU batch, num_gpu_batches GPU batches;");
        line(
            w,
            "# each layer runs over all of them before the next layer (zig-zag block schedule).",
        );
        line(w, "[batch]");
        kv_int(w, "gpu_batch_size", self.batch.gpu_batch_size);
        kv_int(w, "num_gpu_batches", self.batch.num_gpu_batches);
        line(w, "");
        line(
            w,
            "# Share of each tensor kind on GPU / CPU / disk; each row sums to 1.",
        );
        for (name, row, what) in [
            ("weights", &self.placement.weights, "decoder-layer weights"),
            ("kv_cache", &self.placement.kv_cache, "KV cache"),
            (
                "activations",
                &self.placement.activations,
                "hidden states between layers",
            ),
        ] {
            line(w, &format!("# {what}"));
            line(w, &format!("[placement.{name}]"));
            kv_f64(w, "gpu", row.gpu);
            kv_f64(w, "cpu", row.cpu);
            kv_f64(w, "disk", row.disk);
        }
        line(w, "");
        line(w, "# Where arithmetic runs. cpu_attention: decode attention over cache that is not on the");
        line(w, "# GPU runs on the CPU (FlexGen's CPU delegation).");
        line(w, "[compute]");
        kv_bool(w, "cpu_attention", self.compute.cpu_attention);
        line(w, "");
        line(w, "# HeteGen split, per kind of linear layer: the share (alpha) of the output columns of its");
        line(w, "# non-GPU weights computed on the CPU from CPU memory; the rest is copied to the GPU and");
        line(w, "# computed there. alpha = (wc_cpu + wd_cpu) / (1 - wg).");
        line(w, "[compute.split]");
        for (k, v) in self.compute.split.fields() {
            kv_f64(w, k, v);
        }
        line(w, "");
        line(
            w,
            "# FlexGen's 4-bit group-wise compression (groups of 64, 4.5 bits per value).",
        );
        line(w, "[compression]");
        kv_bool(w, "weights", self.compression.weights);
        kv_bool(w, "kv_cache", self.compression.kv_cache);
        if let Some(pred) = &self.prediction {
            write_prediction(w, pred);
        }
        out
    }

    /// Whether running this policy needs a GPU.
    pub fn needs_gpu(&self) -> bool {
        let p = &self.placement;
        let split_uses_gpu = self.placement.weights.gpu < 1.0
            && self.compute.split.fields().iter().any(|(_, a)| *a < 1.0);
        p.weights.gpu > 0.0 || p.kv_cache.gpu > 0.0 || p.activations.gpu > 0.0 || split_uses_gpu
    }

    /// A policy that keeps everything in CPU memory and computes on the CPU: the executor's
    /// default when no policy file is given.
    pub fn all_cpu(model: &str, prompt_len: u64, gen_len: u64, batch: u64) -> Policy {
        Policy {
            provenance: Provenance {
                planner_version: env!("CARGO_PKG_VERSION").to_string(),
                profile: "none".into(),
                profile_fingerprint: "none".into(),
                objective: "throughput".into(),
                capacity_overrides: CapacityOverrides::default(),
                allow_compression: true,
                block_limits: BlockLimits::default(),
            },
            model: ModelRef {
                name: model.to_string(),
                config: None,
            },
            workload: Workload {
                prompt_len,
                gen_len,
            },
            batch: Batch {
                gpu_batch_size: batch.max(1),
                num_gpu_batches: 1,
            },
            placement: Placements {
                weights: Placement::ALL_CPU,
                kv_cache: Placement::ALL_CPU,
                activations: Placement::ALL_CPU,
            },
            compute: Compute {
                cpu_attention: true,
                split: Split::uniform(1.0),
            },
            compression: Compression::default(),
            prediction: None,
        }
    }
}

fn line(w: &mut String, text: &str) {
    w.push_str(text);
    w.push('\n');
}

fn kv_str(w: &mut String, key: &str, v: &str) {
    let _ = writeln!(w, "{key} = {}", toml::Value::String(v.to_string()));
}

fn kv_f64(w: &mut String, key: &str, v: f64) {
    let _ = writeln!(w, "{key} = {}", toml::Value::Float(v));
}

fn kv_int(w: &mut String, key: &str, v: u64) {
    let _ = writeln!(w, "{key} = {v}");
}

fn kv_bool(w: &mut String, key: &str, v: bool) {
    let _ = writeln!(w, "{key} = {v}");
}

fn write_stage(w: &mut String, table: &str, s: &StageBreakdown) {
    line(w, &format!("[{table}]"));
    kv_f64(w, "ctog_s", s.ctog_s);
    kv_f64(w, "gtoc_s", s.gtoc_s);
    kv_f64(w, "dtoc_s", s.dtoc_s);
    kv_f64(w, "ctod_s", s.ctod_s);
    kv_f64(w, "comp_s", s.comp_s);
    kv_f64(w, "gpu_compute_s", s.gpu_compute_s);
    kv_f64(w, "cpu_compute_s", s.cpu_compute_s);
    kv_f64(w, "layer_s", s.layer_s);
    kv_str(w, "binding", s.binding.name());
}

fn write_tier(w: &mut String, table: &str, t: &TierUse) {
    line(w, &format!("[{table}]"));
    kv_f64(w, "peak_gib", t.peak_gib);
    kv_f64(w, "capacity_gib", t.capacity_gib);
}

fn write_prediction(w: &mut String, p: &Prediction) {
    line(w, "");
    line(
        w,
        "# What the cost model predicts for this policy (docs/cost-model.md). Times in seconds for",
    );
    line(
        w,
        "# the whole block: throughput = bls * n / total; decode_s_per_token is one decode step;",
    );
    line(
        w,
        "# lower_bound_s assumes every channel overlapped every other over the whole run.",
    );
    line(w, "[prediction]");
    kv_f64(w, "throughput_tok_s", p.throughput_tok_s);
    kv_f64(w, "prefill_s", p.prefill_s);
    kv_f64(w, "decode_s_per_token", p.decode_s_per_token);
    kv_f64(w, "total_s", p.total_s);
    kv_f64(w, "lower_bound_s", p.lower_bound_s);
    kv_f64(
        w,
        "lower_bound_throughput_tok_s",
        p.lower_bound_throughput_tok_s,
    );
    line(w, "");
    line(
        w,
        "# Per layer, whole block: time of each channel (ctog = CPU->GPU, gtoc = GPU->CPU, dtoc =",
    );
    line(w, "# disk->CPU, ctod = CPU->disk, comp = compute), the layer's time max(ctog, gtoc, dtoc + ctod,");
    line(w, "# comp) and the channel that binds it.");
    write_stage(w, "prediction.prefill", &p.prefill);
    line(w, "");
    write_stage(w, "prediction.decode", &p.decode);
    line(w, "");
    line(
        w,
        "# Peak memory per tier (the executor's buffer plan) against the usable capacity, in GiB.",
    );
    write_tier(w, "prediction.memory.gpu", &p.memory.gpu);
    write_tier(w, "prediction.memory.cpu", &p.memory.cpu);
    write_tier(w, "prediction.memory.disk", &p.memory.disk);
    if let Some(s) = &p.solver {
        line(w, "");
        line(
            w,
            "# How the search went: LPs solved, configurations pruned, wall-clock time.",
        );
        line(w, "[prediction.solver]");
        kv_str(w, "status", &s.status);
        kv_f64(w, "solve_ms", s.solve_ms);
        kv_int(w, "programs_solved", s.programs_solved);
        kv_int(w, "programs_pruned", s.programs_pruned);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> String {
        toml::to_string(&Policy::all_cpu("opt-125m", 8, 4, 2)).unwrap()
    }

    #[test]
    fn round_trips() {
        let text = sample();
        let p = Policy::parse(&text, "p.toml").unwrap();
        assert_eq!(p, Policy::all_cpu("opt-125m", 8, 4, 2));
        assert!(!p.needs_gpu());
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let text = sample().replace("[batch]", "[batch]\nbogus_knob = 3");
        let e = Policy::parse(&text, "p.toml").unwrap_err().to_string();
        assert!(e.contains("p.toml") && e.contains("bogus_knob"), "{e}");
    }

    #[test]
    fn row_that_does_not_sum_to_one_names_the_row() {
        let mut p = Policy::all_cpu("opt-125m", 8, 4, 2);
        p.placement.kv_cache.disk = 0.5;
        let e = p.validate("p.toml").unwrap_err().to_string();
        assert!(
            e.contains("placement.kv_cache") && e.contains("sum to 1"),
            "{e}"
        );
    }

    #[test]
    fn fraction_out_of_range_names_the_field() {
        let mut p = Policy::all_cpu("opt-125m", 8, 4, 2);
        p.compute.split.fc1 = 1.5;
        let e = p.validate("p.toml").unwrap_err().to_string();
        assert!(
            e.contains("compute.split.fc1") && e.contains("[0, 1]"),
            "{e}"
        );
    }

    #[test]
    fn zero_batch_is_rejected() {
        let text = sample().replace("gpu_batch_size = 2", "gpu_batch_size = 0");
        let e = Policy::parse(&text, "p.toml").unwrap_err().to_string();
        assert!(e.contains("batch.gpu_batch_size"), "{e}");
    }
}
