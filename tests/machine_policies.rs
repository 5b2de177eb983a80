//! The policies checked in for this class of machine (`policies/*-cpu-2core-24gib*.toml`, solved
//! on `profiles/cpu-2core-24gib.toml`) run with the executor: each policy's placement, block shape
//! and offloading (weights read from the checkpoint with direct I/O, KV cache and activations in an
//! offload directory) on the small fixture checkpoint `tests/fixtures/opt-tiny-preln` with short
//! random prompts, so CI catches a policy the executor can no longer run. `planner check policies/` verifies them against the
//! planner separately.

mod common;

use common::{binary, repo_root};
use std::path::PathBuf;
use std::process::Command;

#[test]
fn this_machines_policies_run_on_a_small_model() {
    let root = repo_root();
    let mut policies: Vec<PathBuf> = std::fs::read_dir(root.join("policies"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "toml")
                && p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .contains("cpu-2core-24gib")
        })
        .collect();
    policies.sort();
    assert!(
        !policies.is_empty(),
        "no policies for this class of machine in policies/ (*-cpu-2core-24gib*.toml)"
    );
    let work = tempfile::tempdir().unwrap();
    for policy in &policies {
        let text = std::fs::read_to_string(policy).unwrap();
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        assert!(
            parsed["provenance"]["profile"]
                .as_str()
                .unwrap()
                .contains("cpu-2core-24gib"),
            "{}: not solved on the cpu-2core-24gib profile",
            policy.display()
        );
        let report = work.path().join("report.json");
        let out = Command::new(binary("executor"))
            .current_dir(&root)
            .arg("--policy")
            .arg(policy)
            .arg("--model")
            .arg(root.join("tests/fixtures/opt-tiny-preln"))
            .args(["--prompt-len", "8", "--max-new-tokens", "3", "--ignore-eos"])
            .args(["--quiet", "--offload-dir"])
            .arg(work.path())
            .arg("--report")
            .arg(&report)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} failed:\n{}",
            policy.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let gbs = parsed["batch"]["gpu_batch_size"].as_integer().unwrap();
        let nb = parsed["batch"]["num_gpu_batches"].as_integer().unwrap();
        assert_eq!(
            json["batch_size"].as_i64().unwrap(),
            gbs * nb,
            "{}: the block size as run",
            policy.display()
        );
        assert!(!json["predicted_total_tokens_per_s"].is_null());
        eprintln!(
            "{}: ran {}x{} on the fixture, {:.1} tok/s, {} disk bytes read",
            policy.display(),
            gbs,
            nb,
            json["total_tokens_per_s"].as_f64().unwrap(),
            json["disk_read_bytes"].as_u64().unwrap()
        );
    }
    // Offload directories are removed; only the last report remains.
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 1);
}
