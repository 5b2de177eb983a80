//! `planner check`: keeps checked-in policies honest. A policy fails when its profile's fingerprint
//! changed, when it no longer fits its profile's memory, when its stored prediction no longer
//! matches what the cost model says, or when a fresh solve beats its stored prediction by more than
//! [`IMPROVEMENT_TOLERANCE`].

use crate::cost::{self, Prediction};
use crate::paths;
use crate::policy::Policy;
use crate::solve::{self, Objective, SolveRequest};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// A fresh solve may beat a stored prediction by this relative margin before the policy fails
/// (and a re-evaluation may differ by as much before the stored prediction counts as stale).
pub const IMPROVEMENT_TOLERANCE: f64 = 0.02;

/// The verdict on one policy file.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub policy: String,
    pub ok: bool,
    /// Each reason the policy fails, with both numbers where there are two.
    pub failures: Vec<String>,
    /// Throughput (tok/s) as stored, as the cost model gives it now, and from a fresh solve.
    pub stored_throughput_tok_s: Option<f64>,
    pub evaluated_throughput_tok_s: Option<f64>,
    pub fresh_throughput_tok_s: Option<f64>,
    /// Total time (s) as stored, evaluated now, and from a fresh solve.
    pub stored_total_s: Option<f64>,
    pub evaluated_total_s: Option<f64>,
    pub fresh_total_s: Option<f64>,
}

fn relative_gap(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(f64::MIN_POSITIVE)
}

/// Checks one policy file.
pub fn check_policy(path: &Path) -> CheckReport {
    let mut report = CheckReport {
        policy: path.display().to_string(),
        ok: false,
        failures: Vec::new(),
        stored_throughput_tok_s: None,
        evaluated_throughput_tok_s: None,
        fresh_throughput_tok_s: None,
        stored_total_s: None,
        evaluated_total_s: None,
        fresh_total_s: None,
    };
    if let Err(message) = check_into(path, &mut report) {
        report.failures.push(message);
    }
    report.ok = report.failures.is_empty();
    report
}

fn check_into(path: &Path, report: &mut CheckReport) -> Result<(), String> {
    let policy = Policy::load(path).map_err(|e| e.to_string())?;
    let profile =
        paths::load_policy_profile(path, &policy.provenance.profile).map_err(|e| e.to_string())?;
    let fingerprint = profile.fingerprint();
    if fingerprint != policy.provenance.profile_fingerprint {
        report.failures.push(format!(
            "profile {} changed: policy was solved for fingerprint {}, the profile's is now {}; re-solve the policy",
            policy.provenance.profile, policy.provenance.profile_fingerprint, fingerprint
        ));
    }
    let model = paths::load_policy_model(path, &policy.model.name, policy.model.config.as_deref())
        .map_err(|e| e.to_string())?;
    let evaluated = cost::evaluate(&model, &profile, &policy).map_err(|e| e.to_string())?;
    report.evaluated_throughput_tok_s = Some(evaluated.throughput_tok_s);
    report.evaluated_total_s = Some(evaluated.total_s);
    for (tier, use_) in [
        ("GPU", evaluated.memory.gpu),
        ("CPU", evaluated.memory.cpu),
        ("disk", evaluated.memory.disk),
    ] {
        if !use_.fits() {
            report.failures.push(format!(
                "no longer fits: {tier} needs {:.3} GiB, capacity is {:.3} GiB",
                use_.peak_gib, use_.capacity_gib
            ));
        }
    }
    let stored: Prediction = match &policy.prediction {
        Some(p) => p.clone(),
        None => {
            report
                .failures
                .push("no [prediction] section: re-solve the policy with planner solve".into());
            evaluated.clone()
        }
    };
    report.stored_throughput_tok_s = Some(stored.throughput_tok_s);
    report.stored_total_s = Some(stored.total_s);
    if policy.prediction.is_some() {
        let gap = relative_gap(evaluated.total_s, stored.total_s);
        if gap > IMPROVEMENT_TOLERANCE {
            report.failures.push(format!(
                "stale prediction: stored {:.4} tok/s ({:.3} s total), the cost model now gives {:.4} tok/s ({:.3} s); re-solve the policy",
                stored.throughput_tok_s, stored.total_s, evaluated.throughput_tok_s, evaluated.total_s
            ));
        }
    }
    let objective = Objective::from_name(&policy.provenance.objective)
        .ok_or_else(|| format!("unknown objective '{}'", policy.provenance.objective))?;
    let request = SolveRequest {
        model: &model,
        model_config: policy.model.config.clone(),
        profile: &profile,
        profile_ref: policy.provenance.profile.clone(),
        objective,
        latency_batch: policy.batch.gpu_batch_size,
        prompt_len: policy.workload.prompt_len,
        gen_len: policy.workload.gen_len,
        overrides: policy.provenance.capacity_overrides,
        allow_compression: policy.provenance.allow_compression,
        block_limits: policy.provenance.block_limits,
    };
    let fresh = solve::solve(&request).map_err(|e| format!("fresh solve failed: {e}"))?;
    let fresh_pred = fresh
        .prediction
        .as_ref()
        .ok_or("fresh solve returned no prediction")?;
    report.fresh_throughput_tok_s = Some(fresh_pred.throughput_tok_s);
    report.fresh_total_s = Some(fresh_pred.total_s);
    let better = match objective {
        Objective::Throughput => {
            fresh_pred.throughput_tok_s > stored.throughput_tok_s * (1.0 + IMPROVEMENT_TOLERANCE)
        }
        Objective::Latency => fresh_pred.total_s * (1.0 + IMPROVEMENT_TOLERANCE) < stored.total_s,
    };
    if better {
        report.failures.push(format!(
            "a fresh solve is more than {:.0}% better: {:.4} tok/s ({:.3} s total) against the stored {:.4} tok/s ({:.3} s); re-solve the policy",
            IMPROVEMENT_TOLERANCE * 100.0,
            fresh_pred.throughput_tok_s,
            fresh_pred.total_s,
            stored.throughput_tok_s,
            stored.total_s
        ));
    }
    Ok(())
}

/// The `*.toml` files of a directory, sorted, or the file itself when `target` is a file.
pub fn policy_files(target: &Path) -> std::io::Result<Vec<PathBuf>> {
    if target.is_file() {
        return Ok(vec![target.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(target)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}
