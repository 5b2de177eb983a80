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
}

impl RunReport {
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
