//! The refusal path: a policy that needs a GPU, on a machine that has none, is stopped before any
//! work with a message that names what the policy puts on the GPU, what is missing, and what to
//! run instead.

use super::{CudaBackend, CudaError};
use planner::policy::Policy;
use thiserror::Error;

/// A policy needs a GPU and none can be used here.
#[derive(Debug, Error)]
#[error(
    "the policy {placement}, but no usable GPU was found: {reason}. \
     To run on this machine, use a CPU policy: run without --policy, or make one with \
     `planner solve --model <model> --profile profiles/cpu-2core-24gib.toml -o cpu.toml` \
     (gpu = 0 everywhere, compute.split = 1.0)"
)]
pub struct GpuRequired {
    /// What the policy puts on the GPU, in words (see [`gpu_placement_summary`]).
    pub placement: String,
    /// Why the GPU cannot be used.
    #[source]
    pub reason: CudaError,
}

/// In words, what `policy` places or computes on the GPU, e.g. "places 20% of the weights and
/// 100% of the KV cache on the GPU".
pub fn gpu_placement_summary(policy: &Policy) -> String {
    let p = &policy.placement;
    let mut parts = Vec::new();
    for (what, share) in [
        ("the weights", p.weights.gpu),
        ("the KV cache", p.kv_cache.gpu),
        ("the activations", p.activations.gpu),
    ] {
        if share > 0.0 {
            parts.push(format!("{}% of {what}", trim_percent(share)));
        }
    }
    let s = policy.compute.split;
    let split_on_gpu = p.weights.gpu < 1.0
        && [s.qkv, s.out_proj, s.fc1, s.fc2]
            .iter()
            .any(|alpha| *alpha < 1.0);
    let mut out = String::new();
    if !parts.is_empty() {
        out = format!("places {} on the GPU", join_words(&parts));
    }
    if split_on_gpu {
        if !out.is_empty() {
            out.push_str(" and ");
        }
        out.push_str(&format!(
            "computes part of each linear layer on the GPU (split alpha qkv {}, out_proj {}, \
             fc1 {}, fc2 {}; alpha = 1 would keep it all on the CPU)",
            s.qkv, s.out_proj, s.fc1, s.fc2
        ));
    }
    if out.is_empty() {
        out = "uses the GPU".into();
    }
    out
}

fn trim_percent(share: f64) -> String {
    let pct = share * 100.0;
    if (pct - pct.round()).abs() < 1e-9 {
        format!("{}", pct.round() as i64)
    } else {
        format!("{pct:.1}")
    }
}

fn join_words(parts: &[String]) -> String {
    match parts {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// The executor's check before a run: `Ok(None)` for a policy that needs no GPU (run on the CPU
/// backend), `Ok(Some(backend))` when it needs one and one works, and [`GpuRequired`] otherwise.
///
/// Opening the backend (not just probing) is part of the check, so that a driver too old for the
/// kernels' PTX, or a missing cuBLAS, is reported here and not halfway through a run.
pub fn require_gpu_for(policy: &Policy) -> Result<Option<CudaBackend>, GpuRequired> {
    if !policy.needs_gpu() {
        return Ok(None);
    }
    CudaBackend::new(0).map(Some).map_err(|reason| GpuRequired {
        placement: gpu_placement_summary(policy),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use planner::policy::{Placement, Split};

    #[test]
    fn cpu_policy_needs_no_gpu() {
        let p = Policy::all_cpu("opt-125m", 8, 4, 1);
        assert!(matches!(require_gpu_for(&p), Ok(None)));
    }

    #[test]
    fn summary_names_what_is_on_the_gpu() {
        let mut p = Policy::all_cpu("opt-125m", 8, 4, 1);
        p.placement.weights = Placement {
            gpu: 0.2,
            cpu: 0.8,
            disk: 0.0,
        };
        p.placement.kv_cache = Placement::ALL_GPU;
        assert_eq!(
            gpu_placement_summary(&p),
            "places 20% of the weights and 100% of the KV cache on the GPU"
        );
        let mut q = Policy::all_cpu("opt-125m", 8, 4, 1);
        q.compute.split = Split::uniform(0.3);
        let s = gpu_placement_summary(&q);
        assert!(
            s.starts_with("computes part of each linear layer on the GPU"),
            "{s}"
        );
    }

    #[test]
    fn gpu_policy_without_gpu_is_refused_with_a_cpu_alternative() {
        let mut p = Policy::all_cpu("opt-125m", 8, 4, 1);
        p.placement.weights = Placement::ALL_GPU;
        match require_gpu_for(&p) {
            Ok(Some(b)) => eprintln!("a GPU is present ({}); refusal not exercised", b.info()),
            Ok(None) => panic!("a GPU policy must not fall back to the CPU silently"),
            Err(e) => {
                let msg = e.to_string();
                eprintln!("refusal message: {msg}");
                assert!(
                    msg.contains("places 100% of the weights on the GPU"),
                    "{msg}"
                );
                assert!(
                    msg.contains(
                        "planner solve --model <model> --profile profiles/cpu-2core-24gib.toml"
                    ),
                    "{msg}"
                );
            }
        }
    }
}
