//! The run report: what was measured, as a table for people and as JSON for scripts.

use serde::Serialize;
use std::fmt::Write as _;

/// Measurements of one run. Field names carry their units; `docs/executor.md` describes each.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Model name (checkpoint directory or built-in configuration).
    pub model: String,
    /// Backend that computed (`cpu`).
    pub backend: String,
    /// Element type of the weight matrices (`f32`, `f16`, `bf16`).
    pub weights_dtype: String,
    /// Worker threads of the CPU kernels.
    pub threads: usize,
    /// Sequences in the batch.
    pub batch_size: usize,
    /// Padded prompt length (the longest prompt).
    pub prompt_len: usize,
    /// New tokens of the longest continuation.
    pub new_tokens: usize,
    /// New tokens over all sequences.
    pub generated_tokens: usize,
    /// Seconds to open, check and fault in (or generate) the weights.
    pub load_s: f64,
    /// Seconds of the prefill pass, including choosing each sequence's first token.
    pub prefill_s: f64,
    /// Seconds of all decode steps.
    pub decode_s: f64,
    /// Decode steps run.
    pub decode_steps: usize,
    /// Prompt tokens (padding included, as computed) per second of prefill.
    pub prefill_tokens_per_s: f64,
    /// Tokens produced by decode steps per second of decode.
    pub decode_tokens_per_s: f64,
    /// All new tokens per second of prefill + decode (FlexGen's generation throughput).
    pub total_tokens_per_s: f64,
    /// Bytes of all weights held by the weight store.
    pub weight_bytes: u64,
    /// Bytes of weights read in full by every forward pass (all matrices, the LM head, biases and
    /// norms; not the embedding tables, of which only rows are read).
    pub weight_bytes_per_step: u64,
    /// Weight bytes read per decode step divided by the mean decode step time.
    pub decode_weight_bandwidth_bytes_per_s: f64,
    /// Bytes of the preallocated KV cache.
    pub kv_cache_bytes: u64,
    /// High-water mark of resident memory (VmHWM), when the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    /// Seconds per decode step (decode_s / decode_steps), the figure the planner predicts.
    pub decode_s_per_token: f64,
    /// Tiers, channels and the planner's prediction (policy runs only; zeros and nulls otherwise).
    #[serde(flatten)]
    pub tiers: TierReport,
}

/// What a policy run measured per tier and channel, next to the planner's prediction.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TierReport {
    /// Policy file the run followed.
    pub policy: Option<String>,
    /// Sequences per GPU batch and GPU batches in the block, as run.
    pub gpu_batch_size: usize,
    /// GPU batches in the block, as run.
    pub num_gpu_batches: usize,
    /// The policy's CPU delegation flag.
    pub cpu_attention: Option<bool>,
    /// Matrix bytes read from disk per step (the policy's weight disk share, at tensor
    /// granularity).
    pub weights_disk_bytes_per_step: u64,
    /// Bytes of the staging buffers for disk-resident weights (the plan's CPU `weight_buffers`).
    pub weight_staging_bytes: u64,
    /// Sequences whose KV cache lived in the offload directory.
    pub kv_disk_sequences: usize,
    /// Bytes read from disk (weights, KV cache, activations), as transferred.
    pub disk_read_bytes: u64,
    /// Seconds with disk reads in flight (weights and offload pools added).
    pub disk_read_busy_s: f64,
    /// Bytes written to the offload directory.
    pub disk_write_bytes: u64,
    /// Seconds with disk writes in flight.
    pub disk_write_busy_s: f64,
    /// The block device under the disk-resident weights (Linux), whose own counters follow: what
    /// the disk did whoever asked, so decode can be set against the rate the disk gave the run.
    pub disk_device: Option<String>,
    /// Bytes the device read during prefill.
    pub device_prefill_read_bytes: Option<u64>,
    /// Seconds the device had requests in flight during prefill.
    pub device_prefill_busy_s: Option<f64>,
    /// Bytes the device read during the decode steps.
    pub device_decode_read_bytes: Option<u64>,
    /// Seconds the device had requests in flight during the decode steps.
    pub device_decode_busy_s: Option<f64>,
    /// Seconds the compute thread computed (all layers, head, sampling).
    pub cpu_compute_busy_s: f64,
    /// Seconds the compute thread waited on I/O (what overlap did not hide).
    pub io_wait_s: f64,
    /// The part of `cpu_compute_busy_s` in the prefill step.
    pub prefill_compute_s: f64,
    /// The part of `cpu_compute_busy_s` in the decode steps.
    pub decode_compute_s: f64,
    /// The model's shapes and the policy as run (workload and block shape of this run): what
    /// `planner calibrate` needs to evaluate the cost model for the run.
    pub model_spec: Option<planner::model::ModelSpec>,
    pub policy_as_run: Option<planner::policy::Policy>,
    /// Peak bytes of the offload directory's files (disk tier, besides the checkpoint).
    pub offload_dir_bytes: u64,
    /// CPU bytes of the planner's memory plan for this run's policy, checked against MemAvailable.
    pub planned_cpu_bytes: Option<f64>,
    /// Disk bytes of the memory plan.
    pub planned_disk_bytes: Option<f64>,
    /// Profile the prediction used.
    pub profile: Option<String>,
    /// Predicted prefill seconds for the block.
    pub predicted_prefill_s: Option<f64>,
    /// Predicted seconds per decode step for the block.
    pub predicted_decode_s_per_token: Option<f64>,
    /// Predicted generation throughput (all new tokens / (prefill + decode)).
    pub predicted_total_tokens_per_s: Option<f64>,
    /// Predicted disk read seconds per decode step (dtoc x layers).
    pub predicted_decode_disk_s: Option<f64>,
    /// Measured / predicted prefill time.
    pub ratio_prefill: Option<f64>,
    /// Measured / predicted decode time per step.
    pub ratio_decode_per_token: Option<f64>,
    /// Measured / predicted throughput.
    pub ratio_throughput: Option<f64>,
    /// GPU bytes of the planner's memory plan for this run's policy (runs on a device only).
    pub planned_gpu_bytes: Option<f64>,
    /// What the device tiers held and moved, and the parameter manager's choices (runs on a
    /// device, `--device sim`, only).
    pub device: Option<crate::gpu_tier::DeviceReport>,
}

impl RunReport {
    /// What the block device under the weights did in decode, by its own counters: bytes read,
    /// time busy against the decode time, and the rate while busy (the rate the disk gave this
    /// run, to set a decode step's disk bytes against).
    pub fn disk_device_line(&self) -> Option<String> {
        let t = &self.tiers;
        let (name, bytes, busy) = (
            t.disk_device.as_ref()?,
            t.device_decode_read_bytes?,
            t.device_decode_busy_s?,
        );
        let share = if self.decode_s > 0.0 {
            format!("{:.0}%", 100.0 * busy / self.decode_s)
        } else {
            "-".into()
        };
        let rate = if busy > 0.0 {
            format!("{:.2} GB/s while busy", bytes as f64 / busy / 1e9)
        } else {
            "idle".into()
        };
        Some(format!(
            "{name}: decode read {:.3} GiB, busy {busy:.3} s of {:.3} s ({share}), {rate}",
            bytes as f64 / (1u64 << 30) as f64,
            self.decode_s
        ))
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let rows: Vec<(&str, String)> = vec![
            (
                "model",
                format!("{} ({}, {})", self.model, self.weights_dtype, self.backend),
            ),
            (
                "batch x prompt",
                format!("{} x {}", self.batch_size, self.prompt_len),
            ),
            (
                "new tokens",
                format!(
                    "{} per sequence, {} total",
                    self.new_tokens, self.generated_tokens
                ),
            ),
            ("load", format!("{:.3} s", self.load_s)),
            (
                "prefill",
                format!(
                    "{:.3} s  ({:.1} tokens/s)",
                    self.prefill_s, self.prefill_tokens_per_s
                ),
            ),
            (
                "decode",
                format!(
                    "{:.3} s  ({:.2} tokens/s, {} steps)",
                    self.decode_s, self.decode_tokens_per_s, self.decode_steps
                ),
            ),
            (
                "total throughput",
                format!("{:.2} tokens/s", self.total_tokens_per_s),
            ),
            (
                "weights",
                format!(
                    "{:.3} GiB ({:.3} GiB read per step)",
                    gib(self.weight_bytes),
                    gib(self.weight_bytes_per_step)
                ),
            ),
            (
                "decode bandwidth",
                format!(
                    "{:.2} GB/s of weights",
                    self.decode_weight_bandwidth_bytes_per_s / 1e9
                ),
            ),
            ("KV cache", format!("{:.3} GiB", gib(self.kv_cache_bytes))),
            (
                "peak RSS",
                self.peak_rss_bytes
                    .map_or("unknown".into(), |b| format!("{:.3} GiB", gib(b))),
            ),
            ("threads", self.threads.to_string()),
        ];
        let t = &self.tiers;
        let mut rows = rows;
        if let Some(policy) = &t.policy {
            let opt =
                |v: Option<f64>, unit: &str| v.map_or("-".into(), |v| format!("{v:.4}{unit}"));
            rows.extend([
                ("policy", policy.clone()),
                (
                    "block",
                    format!(
                        "{} x {} (gbs x nb), cpu_attention {}",
                        t.gpu_batch_size,
                        t.num_gpu_batches,
                        t.cpu_attention.unwrap_or(false)
                    ),
                ),
                (
                    "disk read",
                    format!(
                        "{:.3} GiB, busy {:.3} s",
                        gib(t.disk_read_bytes),
                        t.disk_read_busy_s
                    ),
                ),
                (
                    "disk write",
                    format!(
                        "{:.3} GiB, busy {:.3} s",
                        gib(t.disk_write_bytes),
                        t.disk_write_busy_s
                    ),
                ),
                (
                    "cpu compute",
                    format!(
                        "busy {:.3} s (waited on I/O {:.3} s)",
                        t.cpu_compute_busy_s, t.io_wait_s
                    ),
                ),
                (
                    "peak memory",
                    format!(
                        "cpu {} (plan {}), disk offload dir {:.3} GiB",
                        self.peak_rss_bytes
                            .map_or("unknown".into(), |b| format!("{:.3} GiB RSS", gib(b))),
                        t.planned_cpu_bytes.map_or("-".into(), |b| format!(
                            "{:.3} GiB",
                            b / (1u64 << 30) as f64
                        )),
                        gib(t.offload_dir_bytes)
                    ),
                ),
                (
                    "predicted",
                    format!(
                        "prefill {}, decode {}/token, {} tokens/s ({})",
                        opt(t.predicted_prefill_s, " s"),
                        opt(t.predicted_decode_s_per_token, " s"),
                        opt(t.predicted_total_tokens_per_s, ""),
                        t.profile.as_deref().unwrap_or("no profile")
                    ),
                ),
                (
                    "measured/predicted",
                    format!(
                        "prefill {}, decode/token {}, throughput {}",
                        opt(t.ratio_prefill, ""),
                        opt(t.ratio_decode_per_token, ""),
                        opt(t.ratio_throughput, "")
                    ),
                ),
            ]);
            if let Some(line) = self.disk_device_line() {
                rows.push(("disk device", line));
            }
        }
        if let Some(d) = &t.device {
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            let pm = &d.param_manager;
            rows.extend([
                (
                    "device",
                    format!(
                        "{}: {:.3} MiB of {:.3} MiB peak (plan {:.3} MiB; planner {})",
                        d.device,
                        mib(d.peak_bytes),
                        mib(d.capacity_bytes),
                        mib(d.planned_bytes),
                        t.planned_gpu_bytes.map_or("-".into(), |b| format!(
                            "{:.3} MiB",
                            b / (1u64 << 20) as f64
                        ))
                    ),
                ),
                (
                    "device weights",
                    format!(
                        "{:.3} MiB resident ({:.3} MiB by the policy), per step {:.3} MiB \
                         streamed + {:.3} MiB on the host",
                        mib(d.resident_weight_bytes_total),
                        mib(d.resident_weight_bytes),
                        mib(d.streamed_weight_bytes_per_step),
                        mib(d.host_weight_bytes_per_step)
                    ),
                ),
                (
                    "device copies",
                    format!(
                        "h2d {:.3} MiB in {} calls ({:.3} MiB weights, {:.3} MiB in decode), \
                         d2h {:.3} MiB in {} calls; setup h2d {:.3} MiB",
                        mib(d.run_transfers.h2d_bytes),
                        d.run_transfers.h2d_calls,
                        mib(d.run_weight_upload_bytes),
                        mib(d.decode_weight_upload_bytes),
                        mib(d.run_transfers.d2h_bytes),
                        d.run_transfers.d2h_calls,
                        mib(d.setup_transfers.h2d_bytes)
                    ),
                ),
                (
                    "param manager",
                    if pm.enabled {
                        format!(
                            "{} matrices promoted ({:.3} MiB of {:.3} MiB free), est. saved \
                             {:.4} s/step, {:.4} s in all",
                            pm.promoted.len(),
                            mib(pm.promoted_bytes),
                            mib(pm.free_bytes),
                            pm.estimated_saved_s_per_step,
                            pm.estimated_saved_s
                        )
                    } else {
                        "off".into()
                    },
                ),
            ]);
        }
        for (k, v) in rows {
            let _ = writeln!(s, "{k:>18}  {v}");
        }
        s
    }
}

/// Peak resident set size of this process in bytes (VmHWM in /proc/self/status), if available.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut parts = line.split_whitespace().skip(1);
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => Some(value * 1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm_is_read_in_kibibytes() {
        let status = "Name:\texecutor\nVmPeak:\t  200 kB\nVmHWM:\t    1536 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(1536 * 1024));
        assert_eq!(parse_vm_hwm("VmRSS: 1 kB"), None);
    }

    #[test]
    fn this_process_has_a_peak_rss_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap() > 1 << 20);
        }
    }
}
