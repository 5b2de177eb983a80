//! End to end through both programs: `planner solve` writes a policy for a fixture model under a
//! CPU budget that forces part of the model onto disk, `planner explain` reads it back, and
//! `executor --policy` runs it and must produce exactly transformers' greedy tokens while
//! reporting the planner's prediction next to its measurements; `planner calibrate` then refits
//! the profile from one run's report and scores it on the other.
//!
//! The binaries are the ones `cargo test --workspace` builds for the planner's and executor's own
//! CLI tests, next to this test's executable.

mod common;

use common::{binary, repo_root};
use std::process::{Command, Output};

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        cmd,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The fixture's prompts and transformers' greedy continuations.
fn expected(fixture: &str) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let path = repo_root()
        .join("tests/fixtures")
        .join(fixture)
        .join("expected.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let ids = |key: &str| -> Vec<Vec<u32>> {
        json[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect()
    };
    (ids("prompt_ids"), ids("greedy"))
}

/// Parses the executor's `[i] prompt: N tokens; new ids: a,b,c` lines.
fn generated_ids(stdout: &str) -> Vec<Vec<u32>> {
    stdout
        .lines()
        .filter_map(|line| line.split_once("new ids: "))
        .map(|(_, ids)| ids.split(',').map(|t| t.trim().parse().unwrap()).collect())
        .collect()
}

fn placement_row(policy: &str, row: &str) -> (f64, f64, f64) {
    let value: toml::Table = toml::from_str(policy).unwrap();
    let r = &value["placement"][row];
    let get = |tier: &str| r[tier].as_float().unwrap();
    (get("gpu"), get("cpu"), get("disk"))
}

#[test]
fn solved_policies_run_and_give_transformers_tokens() {
    let root = repo_root();
    let (prompts, greedy) = expected("opt-tiny-preln");
    let new_tokens = greedy[0].len();
    let work = tempfile::tempdir().unwrap();

    // A roomy budget (everything in memory) and one far too small for the model, which
    // pushes weights and cache to disk.
    for (label, cpu_mem_gib) in [("roomy", "1"), ("tight", "0.00023")] {
        let policy_path = work.path().join(format!("{label}.toml"));
        run(Command::new(binary("planner"))
            .current_dir(&root)
            .args(["solve", "--model-config"])
            .arg(root.join("tests/fixtures/opt-tiny-preln/config.json"))
            .args(["--profile", "profiles/cpu-2core-24gib.toml"])
            .args(["--prompt-len", "20", "--gen-len", &new_tokens.to_string()])
            .args(["--cpu-mem", cpu_mem_gib, "--no-compression", "-o"])
            .arg(&policy_path));
        let policy = std::fs::read_to_string(&policy_path).unwrap();
        let (w_gpu, _, w_disk) = placement_row(&policy, "weights");
        let (kv_gpu, _, kv_disk) = placement_row(&policy, "kv_cache");
        assert_eq!((w_gpu, kv_gpu), (0.0, 0.0), "no GPU in this profile");
        if label == "roomy" {
            assert_eq!((w_disk, kv_disk), (0.0, 0.0), "{label}: {policy}");
        } else {
            assert!(
                w_disk + kv_disk > 0.0,
                "{label}: nothing on disk:\n{policy}"
            );
        }

        run(Command::new(binary("planner"))
            .current_dir(&root)
            .arg("explain")
            .arg(&policy_path));

        let report_path = work.path().join(format!("{label}.json"));
        let mut exec = Command::new(binary("executor"));
        exec.current_dir(&root)
            .arg("--model")
            .arg(root.join("tests/fixtures/opt-tiny-preln"))
            .arg("--policy")
            .arg(&policy_path)
            .args(["--max-new-tokens", &new_tokens.to_string()])
            .args(["--ignore-eos", "--quiet", "--offload-dir"])
            .arg(work.path())
            .arg("--report")
            .arg(&report_path);
        for prompt in &prompts {
            let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
            exec.args(["--prompt-ids", &ids.join(",")]);
        }
        let out = run(&mut exec);
        let got = generated_ids(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(got, greedy, "{label}: tokens differ from transformers'");

        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
        for field in ["predicted_prefill_s", "ratio_throughput", "disk_read_bytes"] {
            assert!(!report[field].is_null(), "{label}: report lacks {field}");
        }
        if label == "tight" {
            let read = report["disk_read_bytes"].as_u64().unwrap();
            let written = report["disk_write_bytes"].as_u64().unwrap();
            assert!(read + written > 0, "{label}: a disk policy moved no bytes");
        }
    }
    // The offload directories are gone; only the policies and reports remain.
    for entry in std::fs::read_dir(work.path()).unwrap() {
        let path = entry.unwrap().path();
        assert!(path.is_file(), "left behind: {}", path.display());
    }

    // The reports close the loop: calibrate on one run, score on the other, solve with the result.
    let calibrated = work.path().join("calibrated.toml");
    let out = run(Command::new(binary("planner"))
        .current_dir(&root)
        .args([
            "calibrate",
            "--profile",
            "profiles/cpu-2core-24gib.toml",
            "--report",
        ])
        .arg(work.path().join("roomy.json"))
        .arg("--score")
        .arg(work.path().join("tight.json"))
        .arg("-o")
        .arg(&calibrated));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cpu.dram_gbps") && text.contains("held out of the fit"),
        "{text}"
    );
    assert!(text.contains("median |predicted / measured - 1|"), "{text}");
    run(Command::new(binary("planner"))
        .current_dir(&root)
        .args(["solve", "--model-config"])
        .arg(root.join("tests/fixtures/opt-tiny-preln/config.json"))
        .arg("--profile")
        .arg(&calibrated)
        .args(["--prompt-len", "20", "--gen-len", "4"]));
}
