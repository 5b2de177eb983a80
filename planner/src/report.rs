//! Human-readable renderings of policies and predictions for `planner solve` and `planner explain`.

use crate::cost::{Prediction, StageBreakdown, TierUse};
use crate::memory::{MemoryPlan, TierBytes};
use crate::policy::Policy;
use crate::profile::GIB;
use std::fmt::Write as _;

fn seconds(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v >= 100.0 {
        format!("{v:.1}")
    } else if v >= 0.01 {
        format!("{v:.4}")
    } else {
        format!("{v:.3e}")
    }
}

/// The policy's decisions: block shape, placement rows, split, delegation, compression.
pub fn decisions(policy: &Policy) -> String {
    let mut w = String::new();
    let b = &policy.batch;
    let _ = writeln!(
        w,
        "model {}, prompt {} tokens, generate {}, objective {}",
        policy.model.name,
        policy.workload.prompt_len,
        policy.workload.gen_len,
        policy.provenance.objective
    );
    let _ = writeln!(
        w,
        "block: {} sequences per GPU batch x {} GPU batches = {} sequences",
        b.gpu_batch_size,
        b.num_gpu_batches,
        b.block_size()
    );
    let _ = writeln!(w, "placement        gpu      cpu     disk");
    for (name, row) in [
        ("weights", policy.placement.weights),
        ("kv_cache", policy.placement.kv_cache),
        ("activations", policy.placement.activations),
    ] {
        let _ = writeln!(
            w,
            "  {name:<11} {:>7.3}  {:>7.3}  {:>7.3}",
            row.gpu, row.cpu, row.disk
        );
    }
    let s = &policy.compute.split;
    let _ = writeln!(
        w,
        "split alpha (CPU share of non-GPU weights): qkv {:.3}, out_proj {:.3}, fc1 {:.3}, fc2 {:.3}",
        s.qkv, s.out_proj, s.fc1, s.fc2
    );
    let _ = writeln!(
        w,
        "cpu attention: {}; compression: weights {}, kv_cache {}",
        if policy.compute.cpu_attention {
            "on"
        } else {
            "off"
        },
        if policy.compression.weights {
            "on"
        } else {
            "off"
        },
        if policy.compression.kv_cache {
            "on"
        } else {
            "off"
        },
    );
    w
}

fn stage_row(w: &mut String, name: &str, s: &StageBreakdown) {
    let _ = writeln!(
        w,
        "{name:<8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}  {}",
        seconds(s.ctog_s),
        seconds(s.gtoc_s),
        seconds(s.dtoc_s),
        seconds(s.ctod_s),
        seconds(s.comp_s),
        seconds(s.gpu_compute_s),
        seconds(s.cpu_compute_s),
        s.binding.name()
    );
}

fn tier_row(w: &mut String, name: &str, t: &TierUse) {
    let pct = if t.capacity_gib > 0.0 {
        format!("{:.1}%", 100.0 * t.peak_gib / t.capacity_gib)
    } else if t.peak_gib > 0.0 {
        "over".into()
    } else {
        "-".into()
    };
    let _ = writeln!(
        w,
        "  {name:<5} {:>12.3} {:>14.3} {:>8}{}",
        t.peak_gib,
        t.capacity_gib,
        pct,
        if t.fits() { "" } else { "  DOES NOT FIT" }
    );
}

/// The per-stage breakdown: each channel's time, the binding one, totals, memory per tier.
pub fn prediction_table(p: &Prediction) -> String {
    let mut w = String::new();
    let _ = writeln!(
        w,
        "per layer, whole block (seconds); disk = dtoc + ctod on one device; comp = serialized compute"
    );
    let _ = writeln!(
        w,
        "stage          ctog       gtoc       dtoc       ctod       comp   gpu-busy   cpu-busy  binding"
    );
    stage_row(&mut w, "prefill", &p.prefill);
    stage_row(&mut w, "decode", &p.decode);
    let _ = writeln!(
        w,
        "prefill {} s, decode {} s per token step, total {} s",
        seconds(p.prefill_s),
        seconds(p.decode_s_per_token),
        seconds(p.total_s)
    );
    let _ = writeln!(
        w,
        "throughput {:.4} tok/s (physical lower bound on time {} s: at most {:.4} tok/s with perfect overlap)",
        p.throughput_tok_s,
        seconds(p.lower_bound_s),
        p.lower_bound_throughput_tok_s
    );
    let _ = writeln!(w, "memory      peak GiB   capacity GiB     used");
    tier_row(&mut w, "gpu", &p.memory.gpu);
    tier_row(&mut w, "cpu", &p.memory.cpu);
    tier_row(&mut w, "disk", &p.memory.disk);
    w
}

/// Each tier's buffers by purpose (only those that are not empty).
pub fn memory_plan_table(plan: &MemoryPlan) -> String {
    let mut w = String::new();
    let _ = writeln!(w, "memory plan (GiB):");
    for (tier, t) in [("gpu", &plan.gpu), ("cpu", &plan.cpu), ("disk", &plan.disk)] {
        let items: Vec<String> = nonzero_items(t)
            .into_iter()
            .map(|(n, b)| format!("{n} {:.3}", b / GIB))
            .collect();
        let _ = writeln!(
            w,
            "  {tier:<5} {}",
            if items.is_empty() {
                "-".to_string()
            } else {
                items.join(", ")
            }
        );
    }
    w
}

fn nonzero_items(t: &TierBytes) -> Vec<(&'static str, f64)> {
    t.items().into_iter().filter(|(_, b)| *b > 0.0).collect()
}

/// Figures whose values differ by more than this share are flagged by [`profile_table`]: the
/// repeatability asked of `planner profile` (two runs on one machine).
pub const PROFILE_AGREEMENT: f64 = 0.15;

/// Every figure of `profile` with its source, and, given another profile (and how to name it),
/// that profile's value and the ratio, flagging differences over [`PROFILE_AGREEMENT`].
pub fn profile_table(
    profile: &crate::profile::Profile,
    other: Option<(&crate::profile::Profile, &str)>,
) -> String {
    let mut s = String::new();
    let others: Vec<(String, crate::profile::Figure)> =
        other.map(|(o, _)| o.figures()).unwrap_or_default();
    match other {
        Some((_, name)) => {
            let _ = writeln!(
                s,
                "  {:<28} {:>12} {:>12}  {:>6}  source (compared with {name})",
                "figure", "this run", "other", "ratio"
            );
        }
        None => {
            let _ = writeln!(s, "  {:<28} {:>12}  source", "figure", "value");
        }
    }
    let mut flagged = 0;
    let mut compared = 0;
    for (name, fig) in profile.figures() {
        let source = format!("{:?}", fig.source).to_lowercase();
        match (other, others.iter().find(|(n, _)| *n == name)) {
            (Some(_), Some((_, o))) => {
                let ratio = fig.value / o.value;
                let off = (ratio - 1.0).abs() > PROFILE_AGREEMENT;
                compared += 1;
                flagged += off as usize;
                let _ = writeln!(
                    s,
                    "  {:<28} {:>12.4} {:>12.4}  {:>6.3}  {source}{}",
                    name,
                    fig.value,
                    o.value,
                    ratio,
                    if off {
                        "  <-- differs by more than 15%"
                    } else {
                        ""
                    }
                );
            }
            (Some(_), None) => {
                let _ = writeln!(
                    s,
                    "  {:<28} {:>12.4} {:>12}  {:>6}  {source}",
                    name, fig.value, "-", "-"
                );
            }
            (None, _) => {
                let _ = writeln!(s, "  {:<28} {:>12.4}  {source}", name, fig.value);
            }
        }
    }
    if other.is_some() {
        let _ = writeln!(
            s,
            "{compared} figures compared, {flagged} differ by more than {:.0}%",
            PROFILE_AGREEMENT * 100.0
        );
    }
    s
}
