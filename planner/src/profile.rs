//! Hardware profiles: the measured, fitted or datasheet rates and capacities of one machine.
//!
//! A profile is a TOML file whose field names carry their units (`_gib` = 2^30 bytes, `_gbps` =
//! 10^9 bytes per second, `_tflops` = 10^12 floating-point operations per second). Every figure is
//! an inline table `{ value = ..., source = "measured" | "fitted" | "datasheet" | "assumed", note =
//! "..." }` so a reader can always tell where a number came from. The GPU section is optional: a
//! profile without one describes a CPU-only host.
//!
//! Reading is strict (unknown keys are rejected, every value is range-checked) and every error names
//! the file and the field. A profile's fingerprint (sha256 of a canonical serialization of the parsed
//! contents, so comments and formatting do not change it) ties each policy to the profile it was
//! solved for.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;
use thiserror::Error;

/// Bytes in one GiB (the unit of every `_gib` field).
pub const GIB: f64 = 1073741824.0;
/// Bytes per second in one `_gbps` unit (decimal GB/s, as datasheets state bandwidth).
pub const GBPS: f64 = 1e9;
/// Operations per second in one `_tflops` unit.
pub const TFLOPS: f64 = 1e12;

/// The profile `planner solve` uses when no `--profile` is given.
pub const DEFAULT_PROFILE_NAME: &str = "t4-flexgen";

/// Profiles compiled into the binary, so `planner solve` works on a fresh clone with no files.
/// Their text is the same as the files under `profiles/`.
pub const EMBEDDED_PROFILES: &[(&str, &str)] = &[
    ("t4-flexgen", include_str!("../../profiles/t4-flexgen.toml")),
    (
        "a10-hetegen",
        include_str!("../../profiles/a10-hetegen.toml"),
    ),
    ("h100-pcie", include_str!("../../profiles/h100-pcie.toml")),
    (
        "cpu-2core-24gib",
        include_str!("../../profiles/cpu-2core-24gib.toml"),
    ),
    (
        "cpu-2core-24gib-avx2",
        include_str!("../../profiles/cpu-2core-24gib-avx2.toml"),
    ),
    (
        "cpu-2core-24gib-zen5",
        include_str!("../../profiles/cpu-2core-24gib-zen5.toml"),
    ),
];

/// The embedded CPU profile for a GPU-less host whose kernels run on `isa`
/// (`primitives::kernels::instruction_set`) on a CPU of AMD family `amd_family`
/// (`primitives::kernels::amd_family`), and why. The 2-core development box has been three CPU
/// classes, and one profile mispredicts the others: without AVX-512 its matrix rates are a
/// quarter to a third of Zen 4's (0.084 against 0.362 TFLOP/s at prefill, 0.053 against 0.188 at
/// decode; the Zen 4 profile put the AVX2 host's OPT-6.7B prefill 3.2x too fast), and Zen 5's
/// are 2.0-2.3x Zen 4's (0.833 and 0.381).
pub fn embedded_cpu_profile(isa: &str, amd_family: Option<u32>) -> (&'static str, &'static str) {
    match (isa, amd_family) {
        ("portable" | "avx2", _) => ("cpu-2core-24gib-avx2", "its CPU has no AVX-512"),
        (_, Some(family)) if family >= 0x1A => (
            "cpu-2core-24gib-zen5",
            "its CPU is an AMD Zen 5 or later (family 26+) with AVX-512",
        ),
        _ => ("cpu-2core-24gib", "its CPU has AVX-512"),
    }
}

/// Prefix that names an embedded profile in a policy's `provenance.profile`.
pub const EMBEDDED_PREFIX: &str = "builtin:";

/// Why a profile could not be used.
#[derive(Debug, Error)]
pub enum ProfileError {
    #[error("cannot read profile {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, a missing or unknown key, or a value of the wrong type.
    #[error("profile {path}: {message}")]
    Parse { path: String, message: String },
    /// A value of the right type but outside what is allowed.
    #[error("profile {path}: field '{field}' {problem}")]
    Invalid {
        path: String,
        field: String,
        problem: String,
    },
    /// `builtin:NAME` named no embedded profile.
    #[error("no embedded profile '{name}'; embedded profiles are {known}")]
    UnknownEmbedded { name: String, known: String },
}

/// Where a figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Measured on this machine (or this class of machine), e.g. by `planner profile` or a benchmark.
    Measured,
    /// Fitted to measurements by a cost model (e.g. FlexGen's published constants).
    Fitted,
    /// Taken or derived from a vendor datasheet; real rates are usually lower.
    Datasheet,
    /// A stated assumption with no measurement behind it; the note says why this value.
    Assumed,
}

/// One figure with its provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Figure {
    pub value: f64,
    pub source: Source,
    /// Where exactly the value came from (paper, datasheet line, command).
    pub note: String,
}

/// The GPU of a host, if it has one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuProfile {
    pub name: String,
    /// Device memory.
    pub memory_gib: Figure,
    /// Memory the planner must leave free (CUDA context, allocator slack).
    pub reserved_gib: Figure,
    /// Matrix-product rate at prefill shapes (many rows).
    pub matmul_prefill_tflops: Figure,
    /// Matrix-product rate at decode shapes (one row per sequence).
    pub matmul_decode_tflops: Figure,
    /// Attention (batched products) rate in the prefill stage.
    pub attention_prefill_tflops: Figure,
    /// Attention rate in the decode stage.
    pub attention_decode_tflops: Figure,
    /// Device-memory bandwidth: the roofline's memory side.
    pub hbm_gbps: Figure,
    /// Host-to-device copies from pinned host memory.
    pub h2d_pinned_gbps: Figure,
    /// Host-to-device copies from pageable host memory.
    pub h2d_pageable_gbps: Figure,
    /// Device-to-host copies into pinned host memory.
    pub d2h_pinned_gbps: Figure,
    /// Device-to-host copies into pageable host memory.
    pub d2h_pageable_gbps: Figure,
}

/// The host CPU and its memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuProfile {
    pub name: String,
    /// Physical cores the executor may use.
    pub cores: Figure,
    /// Host memory.
    pub memory_gib: Figure,
    /// Memory the planner must leave free (operating system, other processes).
    pub reserved_gib: Figure,
    /// Matrix-product rate at prefill shapes.
    pub matmul_prefill_tflops: Figure,
    /// Matrix-product rate at decode shapes (a batch of one row per sequence).
    pub matmul_decode_tflops: Figure,
    /// Attention rate (FlexGen's CPU delegation runs here).
    pub attention_tflops: Figure,
    /// DRAM bandwidth: the roofline's memory side.
    pub dram_gbps: Figure,
    /// The decode-shaped rate by rows (sequences per GPU batch), when measured: small batches
    /// run products less efficiently than large ones, which one figure cannot say. Replaces
    /// `matmul_decode_tflops` in the cost model when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matmul_decode_by_rows: Option<RateCurve>,
}

/// A rate measured at several row counts; read between points by interpolating log rate over
/// log rows, and held constant beyond the ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateCurve {
    /// Row counts, increasing.
    pub rows: Vec<f64>,
    /// The rate at each row count.
    pub tflops: Vec<f64>,
    pub source: Source,
    pub note: String,
}

/// Input rows of the products `planner profile` times for `cpu.matmul_prefill_tflops` (a GPU
/// batch of 8 prompts of 32 tokens, or 2 of 128): where the rate-by-rows line of
/// [`Profile::cpu_rates`] reaches that figure.
pub const PREFILL_ROWS: f64 = 256.0;

impl RateCurve {
    /// The rate at `rows`, in TFLOP/s.
    pub fn at(&self, rows: f64) -> f64 {
        let (r, t) = (&self.rows, &self.tflops);
        if rows <= r[0] {
            return t[0];
        }
        for i in 1..r.len() {
            if rows == r[i] {
                return t[i];
            }
            if rows < r[i] {
                let f = (rows.ln() - r[i - 1].ln()) / (r[i].ln() - r[i - 1].ln());
                return (t[i - 1].ln() + f * (t[i].ln() - t[i - 1].ln())).exp();
            }
        }
        t[t.len() - 1]
    }

    /// The rate at `rows` on the curve extended by one more point, (`end_rows`, `end_tflops`),
    /// past its last row count: log-log between the two, flat beyond `end_rows`.
    pub fn at_extended(&self, rows: f64, end_rows: f64, end_tflops: f64) -> f64 {
        let (last_rows, last) = (
            self.rows[self.rows.len() - 1],
            self.tflops[self.tflops.len() - 1],
        );
        if rows <= last_rows || end_rows <= last_rows {
            return self.at(rows);
        }
        if rows >= end_rows {
            return end_tflops;
        }
        let f = (rows.ln() - last_rows.ln()) / (end_rows.ln() - last_rows.ln());
        (last.ln() + f * (end_tflops.ln() - last.ln())).exp()
    }

    /// Why the curve is unusable, if it is.
    fn problem(&self) -> Option<String> {
        if self.rows.is_empty() || self.rows.len() != self.tflops.len() {
            return Some(format!(
                "has {} rows and {} rates; expected the same number, at least one",
                self.rows.len(),
                self.tflops.len()
            ));
        }
        if self.rows.windows(2).any(|w| w[0] >= w[1]) || self.rows[0] < 1.0 {
            return Some("rows must increase, starting at 1 or more".into());
        }
        if self.tflops.iter().any(|t| !(t.is_finite() && *t > 0.0)) {
            return Some("every rate must be a finite number > 0".into());
        }
        None
    }
}

/// The disk that holds offloaded tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskProfile {
    pub name: String,
    /// Space the planner may use for offloaded tensors.
    pub capacity_gib: Figure,
    /// Sequential read bandwidth (direct I/O).
    pub read_gbps: Figure,
    /// Sequential write bandwidth (direct I/O).
    pub write_gbps: Figure,
    /// Reads through the page cache from a cold cache (what a runtime without direct I/O gets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffered_read_gbps: Option<Figure>,
}

/// Name and description of a profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileHeader {
    pub name: String,
    pub description: String,
    /// What hardware the figures were measured on (CPU model, cores, memory, GPU), as
    /// [`crate::host::hardware_fingerprint`] writes it, so a run elsewhere can say so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<String>,
}

/// A hardware profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub profile: ProfileHeader,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuProfile>,
    pub cpu: CpuProfile,
    pub disk: DiskProfile,
}

/// Rates in base units (bytes per second, operations per second) used by the cost model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuRates {
    pub matmul_prefill_flops: f64,
    pub matmul_decode_flops: f64,
    pub attention_prefill_flops: f64,
    pub attention_decode_flops: f64,
    pub hbm_bytes_per_s: f64,
    pub h2d_pinned_bytes_per_s: f64,
    pub h2d_pageable_bytes_per_s: f64,
    pub d2h_pinned_bytes_per_s: f64,
    pub d2h_pageable_bytes_per_s: f64,
}

/// CPU rates in base units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuRates {
    pub matmul_prefill_flops: f64,
    pub matmul_decode_flops: f64,
    pub attention_flops: f64,
    pub dram_bytes_per_s: f64,
}

/// Disk rates in base units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiskRates {
    pub read_bytes_per_s: f64,
    pub write_bytes_per_s: f64,
}

/// Usable bytes on each tier (total minus reserve, or a command-line override).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Capacities {
    pub gpu_bytes: f64,
    pub cpu_bytes: f64,
    pub disk_bytes: f64,
}

/// Command-line replacements for a tier's usable memory, in GiB.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_mem_gib: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_mem_gib: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mem_gib: Option<f64>,
}

impl CapacityOverrides {
    /// Whether no tier is overridden.
    pub fn is_empty(&self) -> bool {
        self.gpu_mem_gib.is_none() && self.cpu_mem_gib.is_none() && self.disk_mem_gib.is_none()
    }
}

impl Profile {
    /// Reads and validates a profile file.
    pub fn load(path: &Path) -> Result<Profile, ProfileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// An embedded profile by name (without the `builtin:` prefix).
    pub fn embedded(name: &str) -> Result<Profile, ProfileError> {
        let (_, text) = EMBEDDED_PROFILES
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| ProfileError::UnknownEmbedded {
                name: name.to_string(),
                known: EMBEDDED_PROFILES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        Self::parse(text, &format!("{EMBEDDED_PREFIX}{name}"))
    }

    /// Parses and validates profile text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &str) -> Result<Profile, ProfileError> {
        let profile: Profile = toml::from_str(text).map_err(|e| ProfileError::Parse {
            path: path.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        profile.validate(path)?;
        Ok(profile)
    }

    /// Checks that every figure is a finite number in its allowed range.
    pub fn validate(&self, path: &str) -> Result<(), ProfileError> {
        let c = &self.cpu;
        // Reserves and the disk's capacity may be 0; every rate and size must be positive.
        let all = self.figures();
        let checks = all.iter().map(|(field, fig)| {
            let zero_ok = field.ends_with("reserved_gib") || field == "disk.capacity_gib";
            (format!("{field}.value"), fig, zero_ok)
        });
        for (field, fig, zero_ok) in checks {
            let v = fig.value;
            let ok = v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0));
            if !ok {
                return Err(ProfileError::Invalid {
                    path: path.to_string(),
                    field,
                    problem: format!(
                        "is {v}; expected a finite number {}",
                        if zero_ok { ">= 0" } else { "> 0" }
                    ),
                });
            }
        }
        let invalid = |field: &str, problem: String| ProfileError::Invalid {
            path: path.to_string(),
            field: field.to_string(),
            problem,
        };
        if let Some(problem) = c
            .matmul_decode_by_rows
            .as_ref()
            .and_then(RateCurve::problem)
        {
            return Err(invalid("cpu.matmul_decode_by_rows", problem));
        }
        if let Some(g) = &self.gpu {
            if g.reserved_gib.value >= g.memory_gib.value {
                return Err(invalid(
                    "gpu.reserved_gib.value",
                    format!(
                        "is {}; expected less than gpu.memory_gib ({})",
                        g.reserved_gib.value, g.memory_gib.value
                    ),
                ));
            }
        }
        if c.reserved_gib.value >= c.memory_gib.value {
            return Err(invalid(
                "cpu.reserved_gib.value",
                format!(
                    "is {}; expected less than cpu.memory_gib ({})",
                    c.reserved_gib.value, c.memory_gib.value
                ),
            ));
        }
        if c.cores.value.fract() != 0.0 {
            return Err(invalid(
                "cpu.cores.value",
                format!("is {}; expected a whole number of cores", c.cores.value),
            ));
        }
        Ok(())
    }

    /// Whether the host has a GPU.
    pub fn has_gpu(&self) -> bool {
        self.gpu.is_some()
    }

    /// GPU rates in base units, if there is a GPU.
    pub fn gpu_rates(&self) -> Option<GpuRates> {
        self.gpu.as_ref().map(|g| GpuRates {
            matmul_prefill_flops: g.matmul_prefill_tflops.value * TFLOPS,
            matmul_decode_flops: g.matmul_decode_tflops.value * TFLOPS,
            attention_prefill_flops: g.attention_prefill_tflops.value * TFLOPS,
            attention_decode_flops: g.attention_decode_tflops.value * TFLOPS,
            hbm_bytes_per_s: g.hbm_gbps.value * GBPS,
            h2d_pinned_bytes_per_s: g.h2d_pinned_gbps.value * GBPS,
            h2d_pageable_bytes_per_s: g.h2d_pageable_gbps.value * GBPS,
            d2h_pinned_bytes_per_s: g.d2h_pinned_gbps.value * GBPS,
            d2h_pageable_bytes_per_s: g.d2h_pageable_gbps.value * GBPS,
        })
    }

    /// CPU rates in base units for products of `decode_rows` input rows in a decode step (a GPU
    /// batch's sequences) and `prefill_rows` in the prefill (its sequences x the prompt).
    ///
    /// With a `matmul_decode_by_rows` curve, both product rates are read from one rate-by-rows
    /// line: the curve, then on to `matmul_prefill_tflops` at [`PREFILL_ROWS`] (see
    /// [`RateCurve::at_extended`]). A 1 x 32-token prefill runs its products at 32 rows, nearer
    /// the curve's 32-row rate than the 256-row one (predicted 0.61 s against 1.17 s measured
    /// with the 256-row rate). Without the curve: the two figures as they are.
    pub fn cpu_rates(&self, decode_rows: u64, prefill_rows: u64) -> CpuRates {
        let c = &self.cpu;
        let prefill = c.matmul_prefill_tflops.value;
        let (decode_tflops, prefill_tflops) = match &c.matmul_decode_by_rows {
            Some(curve) => (
                curve.at_extended(decode_rows as f64, PREFILL_ROWS, prefill),
                curve.at_extended(prefill_rows as f64, PREFILL_ROWS, prefill),
            ),
            None => (c.matmul_decode_tflops.value, prefill),
        };
        CpuRates {
            matmul_prefill_flops: prefill_tflops * TFLOPS,
            matmul_decode_flops: decode_tflops * TFLOPS,
            attention_flops: c.attention_tflops.value * TFLOPS,
            dram_bytes_per_s: c.dram_gbps.value * GBPS,
        }
    }

    /// Disk rates in base units.
    pub fn disk_rates(&self) -> DiskRates {
        DiskRates {
            read_bytes_per_s: self.disk.read_gbps.value * GBPS,
            write_bytes_per_s: self.disk.write_gbps.value * GBPS,
        }
    }

    /// Usable bytes per tier: memory minus reserve, unless overridden on the command line.
    pub fn capacities(&self, overrides: &CapacityOverrides) -> Capacities {
        let gpu_gib = match (&self.gpu, overrides.gpu_mem_gib) {
            (None, _) => 0.0,
            (Some(_), Some(v)) => v,
            (Some(g), None) => g.memory_gib.value - g.reserved_gib.value,
        };
        let cpu_gib = overrides
            .cpu_mem_gib
            .unwrap_or(self.cpu.memory_gib.value - self.cpu.reserved_gib.value);
        let disk_gib = overrides
            .disk_mem_gib
            .unwrap_or(self.disk.capacity_gib.value);
        Capacities {
            gpu_bytes: gpu_gib * GIB,
            cpu_bytes: cpu_gib * GIB,
            disk_bytes: disk_gib * GIB,
        }
    }

    /// Fingerprint of the parsed contents: `sha256:` and the hex digest of a canonical JSON
    /// serialization. Comments, key order and number formatting in the file do not change it;
    /// any changed value, source or note does.
    pub fn fingerprint(&self) -> String {
        let canonical = serde_json::to_string(self).expect("a profile always serializes to JSON");
        let digest = Sha256::digest(canonical.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }
}

impl GpuProfile {
    /// Every figure with its field name, in file order.
    pub fn named_figures(&self) -> [(&'static str, &Figure); 11] {
        [
            ("memory_gib", &self.memory_gib),
            ("reserved_gib", &self.reserved_gib),
            ("matmul_prefill_tflops", &self.matmul_prefill_tflops),
            ("matmul_decode_tflops", &self.matmul_decode_tflops),
            ("attention_prefill_tflops", &self.attention_prefill_tflops),
            ("attention_decode_tflops", &self.attention_decode_tflops),
            ("hbm_gbps", &self.hbm_gbps),
            ("h2d_pinned_gbps", &self.h2d_pinned_gbps),
            ("h2d_pageable_gbps", &self.h2d_pageable_gbps),
            ("d2h_pinned_gbps", &self.d2h_pinned_gbps),
            ("d2h_pageable_gbps", &self.d2h_pageable_gbps),
        ]
    }
}

impl CpuProfile {
    /// Every figure with its field name, in file order.
    pub fn named_figures(&self) -> [(&'static str, &Figure); 7] {
        [
            ("cores", &self.cores),
            ("memory_gib", &self.memory_gib),
            ("reserved_gib", &self.reserved_gib),
            ("matmul_prefill_tflops", &self.matmul_prefill_tflops),
            ("matmul_decode_tflops", &self.matmul_decode_tflops),
            ("attention_tflops", &self.attention_tflops),
            ("dram_gbps", &self.dram_gbps),
        ]
    }
}

impl DiskProfile {
    /// Every figure with its field name, in file order (the optional one when present).
    pub fn named_figures(&self) -> Vec<(&'static str, &Figure)> {
        let mut v = vec![
            ("capacity_gib", &self.capacity_gib),
            ("read_gbps", &self.read_gbps),
            ("write_gbps", &self.write_gbps),
        ];
        if let Some(f) = &self.buffered_read_gbps {
            v.push(("buffered_read_gbps", f));
        }
        v
    }
}

/// One section of a profile file: its name, the name of its device, its figures by field name.
type Section<'a> = (&'static str, &'a str, Vec<(&'static str, &'a Figure)>);

impl Profile {
    /// Each section's name, the name of its device and its figures, in file order.
    fn sections(&self) -> Vec<Section<'_>> {
        let mut v = Vec::new();
        if let Some(g) = &self.gpu {
            v.push(("gpu", g.name.as_str(), g.named_figures().to_vec()));
        }
        v.push((
            "cpu",
            self.cpu.name.as_str(),
            self.cpu.named_figures().to_vec(),
        ));
        v.push(("disk", self.disk.name.as_str(), self.disk.named_figures()));
        v
    }

    /// The profile as TOML in the shipped files' style (one inline table per figure), under
    /// `comment` (each line written as a `#` comment). Reading it back gives the same profile.
    pub fn to_toml(&self, comment: &str) -> String {
        fn quoted(s: &str) -> String {
            toml::Value::String(s.to_string()).to_string()
        }
        let mut out = String::new();
        for line in comment.lines() {
            out.push_str(&format!("# {line}\n").replace("# \n", "#\n"));
        }
        out.push_str("\n[profile]\n");
        out.push_str(&format!("name = {}\n", quoted(&self.profile.name)));
        out.push_str(&format!(
            "description = {}\n",
            quoted(&self.profile.description)
        ));
        if let Some(h) = &self.profile.hardware {
            out.push_str(&format!("hardware = {}\n", quoted(h)));
        }
        fn source_name(s: Source) -> &'static str {
            match s {
                Source::Measured => "measured",
                Source::Fitted => "fitted",
                Source::Datasheet => "datasheet",
                Source::Assumed => "assumed",
            }
        }
        fn floats(v: &[f64]) -> String {
            let items: Vec<String> = v
                .iter()
                .map(|x| toml::Value::Float(*x).to_string())
                .collect();
            format!("[{}]", items.join(", "))
        }
        for (section, device, figures) in self.sections() {
            out.push_str(&format!("\n[{section}]\nname = {}\n", quoted(device)));
            for (name, f) in figures {
                out.push_str(&format!(
                    "{name} = {{ value = {}, source = \"{}\", note = {} }}\n",
                    toml::Value::Float(f.value),
                    source_name(f.source),
                    quoted(&f.note)
                ));
            }
            if let (Some(c), "cpu") = (&self.cpu.matmul_decode_by_rows, section) {
                out.push_str(&format!(
                    "matmul_decode_by_rows = {{ rows = {}, tflops = {}, source = \"{}\", note = {} }}\n",
                    floats(&c.rows),
                    floats(&c.tflops),
                    source_name(c.source),
                    quoted(&c.note)
                ));
            }
        }
        out
    }

    /// Every figure with its dotted field name (`cpu.dram_gbps`), in file order, and each point
    /// of the decode-rate curve as `cpu.matmul_decode_by_rows.ROWS`: what `planner profile
    /// --compare` walks over.
    pub fn figures(&self) -> Vec<(String, Figure)> {
        let mut v: Vec<(String, Figure)> = self
            .sections()
            .into_iter()
            .flat_map(|(section, _, figures)| {
                figures
                    .into_iter()
                    .map(move |(name, f)| (format!("{section}.{name}"), f.clone()))
            })
            .collect();
        if let Some(c) = &self.cpu.matmul_decode_by_rows {
            for (r, t) in c.rows.iter().zip(&c.tflops) {
                v.push((
                    format!("cpu.matmul_decode_by_rows.{r}"),
                    Figure {
                        value: *t,
                        source: c.source,
                        note: c.note.clone(),
                    },
                ));
            }
        }
        v
    }
}

/// Validates a command-line capacity override.
pub fn check_override(flag: &str, gib: f64) -> Result<f64, String> {
    if gib.is_finite() && gib >= 0.0 {
        Ok(gib)
    } else {
        Err(format!("{flag} is {gib}; expected a number of GiB >= 0"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_predict_with_the_profile_of_their_cpu_class() {
        for family in [None, Some(0x19), Some(0x1A)] {
            for isa in ["portable", "avx2"] {
                assert_eq!(embedded_cpu_profile(isa, family).0, "cpu-2core-24gib-avx2");
            }
        }
        for isa in ["avx512", "avx512bf16", "amx"] {
            // Intel, and AMD Zen 4 (family 25).
            assert_eq!(embedded_cpu_profile(isa, None).0, "cpu-2core-24gib");
            assert_eq!(embedded_cpu_profile(isa, Some(0x19)).0, "cpu-2core-24gib");
            assert_eq!(
                embedded_cpu_profile(isa, Some(0x1A)).0,
                "cpu-2core-24gib-zen5"
            );
        }
        // Every name is embedded, whichever this host picks.
        for (isa, family) in [("avx2", None), ("avx512", None), ("avx512bf16", Some(0x1A))] {
            Profile::embedded(embedded_cpu_profile(isa, family).0).unwrap();
        }
    }

    #[test]
    fn every_embedded_profile_parses() {
        for (name, _) in EMBEDDED_PROFILES {
            let p = Profile::embedded(name).unwrap();
            assert_eq!(&p.profile.name, name);
        }
        assert!(Profile::embedded(DEFAULT_PROFILE_NAME).is_ok());
    }

    #[test]
    fn cpu_only_profile_has_no_gpu() {
        let p = Profile::embedded("cpu-2core-24gib").unwrap();
        assert!(!p.has_gpu());
        assert_eq!(p.capacities(&CapacityOverrides::default()).gpu_bytes, 0.0);
    }

    #[test]
    fn unknown_key_is_named() {
        let text = EMBEDDED_PROFILES[0]
            .1
            .replace("[disk]", "[disk]\nspin_rpm = 7200");
        let e = Profile::parse(&text, "x.toml").unwrap_err().to_string();
        assert!(e.contains("x.toml") && e.contains("spin_rpm"), "{e}");
    }

    #[test]
    fn negative_rate_is_named() {
        let mut p = Profile::embedded("a10-hetegen").unwrap();
        p.cpu.dram_gbps.value = -1.0;
        let e = p.validate("x.toml").unwrap_err().to_string();
        assert!(
            e.contains("cpu.dram_gbps.value") && e.contains("> 0"),
            "{e}"
        );
    }

    #[test]
    fn bad_source_is_rejected() {
        let text =
            EMBEDDED_PROFILES[0]
                .1
                .replacen("source = \"datasheet\"", "source = \"rumour\"", 1);
        let e = Profile::parse(&text, "x.toml").unwrap_err().to_string();
        assert!(e.contains("rumour"), "{e}");
    }

    #[test]
    fn fingerprint_ignores_comments_but_not_values() {
        let text = EMBEDDED_PROFILES[0].1;
        let a = Profile::parse(text, "a").unwrap().fingerprint();
        let b = Profile::parse(&format!("# another comment\n{text}"), "b")
            .unwrap()
            .fingerprint();
        assert_eq!(a, b);
        let mut p = Profile::parse(text, "a").unwrap();
        p.disk.read_gbps.value *= 1.01;
        assert_ne!(a, p.fingerprint());
    }

    #[test]
    fn written_toml_reads_back_to_the_same_profile() {
        for (name, _) in EMBEDDED_PROFILES {
            let mut p = Profile::embedded(name).unwrap();
            p.profile.hardware = Some("cpu=Test \"quoted\" CPU; cores=2".into());
            p.disk.buffered_read_gbps = Some(Figure {
                value: 0.5,
                source: Source::Measured,
                note: "a note with \"quotes\"\nand a newline".into(),
            });
            p.cpu.matmul_decode_by_rows = Some(RateCurve {
                rows: vec![2.0, 16.0, 64.0],
                tflops: vec![0.05, 0.12, 0.2],
                source: Source::Measured,
                note: "curve".into(),
            });
            let text = p.to_toml("first line\n\nsecond line");
            let back = Profile::parse(&text, "written").unwrap();
            assert_eq!(back, p, "{text}");
            assert!(text.starts_with("# first line\n#\n# second line\n"));
        }
    }

    #[test]
    fn decode_rate_by_rows_interpolates_and_replaces_the_single_figure() {
        let curve = RateCurve {
            rows: vec![2.0, 8.0, 32.0],
            tflops: vec![0.04, 0.1, 0.16],
            source: Source::Measured,
            note: String::new(),
        };
        assert_eq!(curve.at(1.0), 0.04);
        assert_eq!(curve.at(8.0), 0.1);
        assert_eq!(curve.at(100.0), 0.16);
        // Log-log: 4 rows is halfway between 2 and 8.
        assert!((curve.at(4.0) - (0.04f64 * 0.1).sqrt()).abs() < 1e-12);
        let mut p = Profile::embedded("cpu-2core-24gib").unwrap();
        p.cpu.matmul_decode_by_rows = None;
        let single = p.cpu_rates(8, 8).matmul_decode_flops;
        assert_eq!(single, p.cpu.matmul_decode_tflops.value * TFLOPS);
        // Without the curve the prefill figure stands for every prefill.
        let prefill = p.cpu.matmul_prefill_tflops.value * TFLOPS;
        assert_eq!(p.cpu_rates(8, 8).matmul_prefill_flops, prefill);
        p.cpu.matmul_decode_by_rows = Some(curve.clone());
        assert!((p.cpu_rates(8, 8).matmul_decode_flops - 0.1 * TFLOPS).abs() < 1.0);
        // With it, one line by rows: the curve, then log-log on to the prefill figure at
        // PREFILL_ROWS, flat beyond; a prefill of few rows gets the curve's rate.
        let at = |rows: u64| p.cpu_rates(rows, rows);
        assert!((at(8).matmul_prefill_flops - 0.1 * TFLOPS).abs() < 1.0);
        assert_eq!(at(512).matmul_prefill_flops, prefill);
        assert_eq!(at(256).matmul_decode_flops, prefill);
        let mid = (0.16f64 * p.cpu.matmul_prefill_tflops.value).sqrt() * TFLOPS;
        let between = (32.0f64 * PREFILL_ROWS).sqrt() as u64; // halfway in log rows: 90.5
        assert!((at(between).matmul_prefill_flops / mid - 1.0).abs() < 0.01);
        p.validate("x").unwrap();
        let mut bad = p.clone();
        bad.cpu.matmul_decode_by_rows = Some(RateCurve {
            rows: vec![8.0, 2.0],
            tflops: vec![0.1, 0.2],
            ..curve
        });
        let e = bad.validate("x.toml").unwrap_err().to_string();
        assert!(
            e.contains("cpu.matmul_decode_by_rows") && e.contains("increase"),
            "{e}"
        );
    }

    #[test]
    fn optional_fields_leave_old_fingerprints_alone() {
        // Policies record profile fingerprints; fields added later must not change those of
        // profiles that do not use them.
        let p = Profile::embedded("t4-flexgen").unwrap();
        let text = serde_json::to_string(&p).unwrap();
        assert!(!text.contains("hardware") && !text.contains("buffered_read_gbps"));
        assert!(!text.contains("matmul_decode_by_rows"));
    }

    #[test]
    fn overrides_replace_usable_memory() {
        let p = Profile::embedded("t4-flexgen").unwrap();
        let c = p.capacities(&CapacityOverrides {
            gpu_mem_gib: Some(2.0),
            ..Default::default()
        });
        assert_eq!(c.gpu_bytes, 2.0 * GIB);
        let g = p.gpu.as_ref().unwrap();
        let plain = p.capacities(&CapacityOverrides::default());
        assert_eq!(
            plain.gpu_bytes,
            (g.memory_gib.value - g.reserved_gib.value) * GIB
        );
    }
}
