//! The `planner` binary as a user runs it: solve, explain, check, and their errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn planner(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_planner"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("planner runs")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn profile(name: &str) -> String {
    repo_root()
        .join("profiles")
        .join(format!("{name}.toml"))
        .display()
        .to_string()
}

#[test]
fn solve_without_profile_says_which_embedded_profile_it_used() {
    let o = planner(&["solve", "--model", "opt-175b"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("embedded default profile 't4-flexgen'"), "{t}");
    assert!(t.contains("profile = \"builtin:t4-flexgen\""), "{t}");
    assert!(t.contains("throughput"), "{t}");
}

#[test]
fn help_teaches_with_examples() {
    let o = planner(&["--help"]);
    let t = text(&o);
    assert!(o.status.success());
    assert!(
        t.contains("Examples:") && t.contains("planner solve --model opt-175b"),
        "{t}"
    );
    let o = planner(&["solve", "--help"]);
    assert!(text(&o).contains("--objective") && text(&o).contains("--gpu-mem"));
}

#[test]
fn too_large_a_model_cannot_fit_and_says_by_how_much() {
    let o = planner(&[
        "solve",
        "--model",
        "opt-175b",
        "--profile",
        &profile("cpu-2core-24gib"),
    ]);
    let t = text(&o);
    assert!(!o.status.success());
    assert!(
        t.contains("cannot fit opt-175b: needs ") && t.contains("GiB, have 80.4 GiB"),
        "{t}"
    );
    assert!(!t.contains("panicked"), "{t}");
}

#[test]
fn cpu_only_profile_puts_nothing_on_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.toml");
    let o = planner(&[
        "solve",
        "--model",
        "opt-125m",
        "--profile",
        &profile("cpu-2core-24gib"),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let p = planner::policy::Policy::load(&out).unwrap();
    for row in [
        p.placement.weights,
        p.placement.kv_cache,
        p.placement.activations,
    ] {
        assert_eq!(row.gpu, 0.0);
    }
    assert!(!p.needs_gpu());
    assert_eq!(
        p.compute.split.fc1, 1.0,
        "every linear layer computed on the CPU"
    );
    let pred = p.prediction.unwrap();
    assert_eq!(pred.memory.gpu.peak_gib, 0.0);
    assert_eq!(pred.prefill.ctog_s + pred.decode.gtoc_s, 0.0);
}

#[test]
fn json_output_is_json() {
    let o = planner(&[
        "solve",
        "--model",
        "opt-1.3b",
        "--profile",
        &profile("a10-hetegen"),
        "--objective",
        "latency",
        "--batch",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["policy"]["batch"]["gpu_batch_size"], 2);
    assert_eq!(v["policy"]["provenance"]["objective"], "latency");
    assert!(
        v["policy"]["prediction"]["decode_s_per_token"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

#[test]
fn malformed_profile_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text_in = std::fs::read_to_string(profile("a10-hetegen"))
        .unwrap()
        .replace("hbm_gbps = { value = 600.0", "hbm_gbps = { value = -600.0");
    std::fs::write(&bad, text_in).unwrap();
    let o = planner(&[
        "solve",
        "--model",
        "opt-125m",
        "--profile",
        bad.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(!o.status.success());
    assert!(
        t.contains("bad.toml") && t.contains("gpu.hbm_gbps.value") && t.contains("> 0"),
        "{t}"
    );
}

fn solved_policy(dir: &Path, extra: &[&str]) -> PathBuf {
    let out = dir.join("p.toml");
    let mut args = vec![
        "solve",
        "--model",
        "opt-125m",
        "--profile",
        "profiles/t4-flexgen.toml",
        "--prompt-len",
        "128",
        "--gen-len",
        "8",
        "-o",
    ];
    args.push(out.to_str().unwrap());
    args.extend_from_slice(extra);
    let o = planner(&args);
    assert!(o.status.success(), "{}", text(&o));
    out
}

#[test]
fn malformed_policy_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = solved_policy(dir.path(), &[]);
    let good = std::fs::read_to_string(&path).unwrap();

    std::fs::write(&path, good.replace("[batch]", "[batch]\nmicro_batches = 4")).unwrap();
    let t = text(&planner(&["explain", path.to_str().unwrap()]));
    assert!(t.contains("p.toml") && t.contains("micro_batches"), "{t}");

    let broken = good.replacen(
        "[placement.kv_cache]\ngpu = ",
        "[placement.kv_cache]\ngpu = 0.5 + ",
        1,
    );
    std::fs::write(&path, &broken).unwrap();
    let o = planner(&["explain", path.to_str().unwrap()]);
    assert!(!o.status.success());

    let mut p = planner::policy::Policy::parse(&good, "p").unwrap();
    p.placement.activations.cpu += 0.25;
    std::fs::write(&path, p.to_toml()).unwrap();
    let t = text(&planner(&["explain", path.to_str().unwrap()]));
    assert!(
        t.contains("placement.activations") && t.contains("sum to 1"),
        "{t}"
    );
}

#[test]
fn explain_shows_channels_binding_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = solved_policy(dir.path(), &[]);
    let o = planner(&["explain", path.to_str().unwrap()]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for needle in [
        "ctog",
        "gtoc",
        "dtoc",
        "ctod",
        "comp",
        "binding",
        "prefill",
        "decode",
        "capacity GiB",
        "fingerprint matches",
    ] {
        assert!(t.contains(needle), "missing {needle}: {t}");
    }
    let o = planner(&["explain", path.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["prediction"]["decode"]["binding"].is_string());
    assert!(v["memory_plan_bytes"]["gpu"]["working"].as_f64().unwrap() > 0.0);
}

#[test]
fn check_passes_a_fresh_policy_and_fails_on_each_kind_of_drift() {
    let dir = tempfile::tempdir().unwrap();
    let path = solved_policy(dir.path(), &[]);
    let p = path.to_str().unwrap();
    let o = planner(&["check", p]);
    assert!(o.status.success(), "{}", text(&o));

    // The profile changed: copy it, solve against the copy, then edit the copy.
    let prof = dir.path().join("prof.toml");
    std::fs::copy(profile("t4-flexgen"), &prof).unwrap();
    let out2 = dir.path().join("q.toml");
    let o = planner(&[
        "solve",
        "--model",
        "opt-125m",
        "--profile",
        prof.to_str().unwrap(),
        "--prompt-len",
        "128",
        "--gen-len",
        "8",
        "-o",
        out2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let edited = std::fs::read_to_string(&prof)
        .unwrap()
        .replace("value = 320.0", "value = 300.0");
    std::fs::write(&prof, edited).unwrap();
    let o = planner(&["check", out2.to_str().unwrap()]);
    let t = text(&o);
    assert!(!o.status.success());
    assert!(
        t.contains("changed: policy was solved for fingerprint sha256:")
            && t.contains("the profile's is now sha256:"),
        "{t}"
    );

    // A fresh solve is better: a valid policy with a much smaller block, its prediction its own.
    let worse = dir.path().join("worse.toml");
    let mut policy = planner::policy::Policy::load(&path).unwrap();
    policy.batch.gpu_batch_size = 1;
    policy.batch.num_gpu_batches = 1;
    let model = planner::model::ModelSpec::builtin("opt-125m").unwrap();
    let t4 = planner::profile::Profile::load(Path::new(&profile("t4-flexgen"))).unwrap();
    policy.prediction = Some(planner::cost::evaluate(&model, &t4, &policy).unwrap());
    policy.save(&worse).unwrap();
    let o = planner(&["check", worse.to_str().unwrap()]);
    let t = text(&o);
    assert!(!o.status.success());
    assert!(
        t.contains("a fresh solve is more than 2% better") && t.contains("against the stored"),
        "{t}"
    );

    // A stale prediction: the stored numbers are not what the cost model gives.
    let mut stale = policy.clone();
    if let Some(pred) = stale.prediction.as_mut() {
        pred.total_s *= 0.5;
    }
    stale.save(&worse).unwrap();
    let t = text(&planner(&["check", worse.to_str().unwrap()]));
    assert!(t.contains("stale prediction"), "{t}");

    // No longer fits: same policy, but the GPU override shrinks below what it uses.
    let fits = solved_policy(dir.path(), &["--gpu-mem", "1"]);
    let shrunk = std::fs::read_to_string(&fits)
        .unwrap()
        .replace("gpu_mem_gib = 1.0", "gpu_mem_gib = 0.05");
    std::fs::write(&fits, shrunk).unwrap();
    let o = planner(&["check", fits.to_str().unwrap(), "--json"]);
    assert!(!o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let failures = v[0]["failures"].to_string();
    assert!(failures.contains("no longer fits: GPU needs"), "{failures}");
}

#[test]
fn checked_in_policies_pass() {
    let o = planner(&["check", "policies"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let count = std::fs::read_dir(repo_root().join("policies"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "toml")
        })
        .count();
    assert!(count >= 5);
    assert!(
        t.contains(&format!("{count} policies checked, 0 failed")),
        "{t}"
    );
}

#[test]
fn model_config_is_recorded_and_resolved_by_explain() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("tiny-opt");
    std::fs::create_dir(&model_dir).unwrap();
    let cfg = model_dir.join("config.json");
    std::fs::write(
        &cfg,
        r#"{"model_type":"opt","hidden_size":256,"ffn_dim":1024,"num_hidden_layers":4,
            "num_attention_heads":4,"vocab_size":1000,"max_position_embeddings":512}"#,
    )
    .unwrap();
    let out = dir.path().join("p.toml");
    let o = planner(&[
        "solve",
        "--model-config",
        cfg.to_str().unwrap(),
        "--profile",
        "profiles/a10-hetegen.toml",
        "--objective",
        "latency",
        "--prompt-len",
        "64",
        "--gen-len",
        "8",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let p = planner::policy::Policy::load(&out).unwrap();
    assert_eq!(p.model.name, "tiny-opt");
    assert!(p
        .model
        .config
        .as_deref()
        .unwrap()
        .ends_with("tiny-opt/config.json"));
    assert_eq!(p.provenance.profile, "profiles/a10-hetegen.toml");
    let o = planner(&["explain", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let o = planner(&["check", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn profile_quick_measures_this_host_and_writes_a_profile_that_solves() {
    let td = tempfile::tempdir().unwrap();
    let out = td.path().join("this-host.toml");
    let first = td.path().join("first.toml");
    let offload = td.path().display().to_string();
    let o = planner(&[
        "profile",
        "--quick",
        "--offload-dir",
        &offload,
        "-o",
        first.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = planner(&[
        "profile",
        "--quick",
        "--offload-dir",
        &offload,
        "-o",
        out.to_str().unwrap(),
        "--compare",
        first.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("cpu.dram_gbps") && t.contains("figures compared"),
        "{t}"
    );
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(written.contains("name = \"this-host\"") && written.contains("hardware = "));
    // Either a GPU was measured or the output says why there is no [gpu] section.
    assert!(
        t.contains("no GPU section") || written.contains("[gpu]"),
        "{t}"
    );
    // The disk test file is gone; only the two profiles remain.
    assert_eq!(std::fs::read_dir(td.path()).unwrap().count(), 2);
    // The measured profile is usable as it is.
    let o = planner(&[
        "solve",
        "--model",
        "opt-125m",
        "--profile",
        out.to_str().unwrap(),
        "--prompt-len",
        "32",
        "--gen-len",
        "8",
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn profile_with_a_missing_offload_dir_or_comparison_fails_before_measuring() {
    let o = planner(&["profile", "--quick", "--offload-dir", "/no/such/dir"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("--offload-dir /no/such/dir: not a directory"),
        "{}",
        text(&o)
    );
    let o = planner(&["profile", "--quick", "--compare", "/no/such/profile.toml"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("cannot read profile /no/such/profile.toml"),
        "{}",
        text(&o)
    );
}
