//! The `executor` command line, run as a process: outputs, the JSON report, policy refusals and
//! error messages (which must never be panics).

mod common;

use common::{expected, fixture};
use std::path::Path;
use std::process::{Command, Output};

fn executor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_executor"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run executor")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs the executor expecting failure; returns stderr, checked to be an error message and not a
/// panic.
fn fails(args: &[&str]) -> String {
    let out = executor(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

fn succeeds(args: &[&str]) -> (String, String) {
    let out = executor(args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{args:?}: {stderr}");
    (stdout, stderr)
}

fn ids_csv(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn write_policy(dir: &Path, edit: impl Fn(&mut planner::policy::Policy)) -> String {
    let mut policy = planner::policy::Policy::all_cpu("opt-125m", 6, 3, 2);
    edit(&mut policy);
    let path = dir.join("policy.toml");
    policy.save(&path).unwrap();
    path.display().to_string()
}

#[test]
fn greedy_batch_of_token_id_prompts_prints_transformers_tokens() {
    let want = expected("opt-tiny-postln");
    let model = fixture("opt-tiny-postln").display().to_string();
    let a = ids_csv(&want.prompt_ids[0]);
    let b = ids_csv(&want.prompt_ids[1]);
    let (stdout, _) = succeeds(&[
        "--model",
        &model,
        "--prompt-ids",
        &a,
        "--prompt-ids",
        &b,
        "--max-new-tokens",
        "16",
        "--quiet",
    ]);
    for (i, greedy) in want.greedy[..2].iter().enumerate() {
        let line = format!("new ids: {}", ids_csv(greedy));
        assert!(
            stdout.contains(&format!("[{i}] prompt")) && stdout.contains(&line),
            "{stdout}"
        );
    }
}

#[test]
fn text_prompts_from_flags_and_file_are_tokenized_and_decoded() {
    let want = expected("opt-tiny-preln");
    let dir = tempfile::tempdir().unwrap();
    let prompt_file = dir.path().join("prompts.txt");
    std::fs::write(&prompt_file, format!("{}\n\n", want.prompts[2])).unwrap();
    let model = fixture("opt-tiny-preln").display().to_string();
    let (stdout, _) = succeeds(&[
        "--model",
        &model,
        "--prompt",
        &want.prompts[0],
        "--prompt-file",
        &prompt_file.display().to_string(),
        "--max-new-tokens",
        "16",
    ]);
    // Prompt 0 of the fixture alone, then prompt 2 from the file.
    assert!(
        stdout.contains(&format!(
            "[0] prompt: {} tokens; new ids: {}",
            want.prompt_ids[0].len(),
            ids_csv(&want.greedy[0])
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("new ids: {}", ids_csv(&want.greedy[2]))),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("[0] text: \"{}", want.prompts[0])),
        "{stdout}"
    );
}

#[test]
fn json_report_has_the_documented_fields() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    let model = fixture("opt-tiny-preln").display().to_string();
    let (_, stderr) = succeeds(&[
        "--model",
        &model,
        "--prompt-ids",
        "2,10,11,12",
        "--prompt-ids",
        "2,13",
        "--max-new-tokens",
        "5",
        "--ignore-eos",
        "--report",
        &report.display().to_string(),
    ]);
    assert!(
        stderr.contains("prefill") && stderr.contains("peak RSS"),
        "{stderr}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["batch_size"], 2);
    assert_eq!(json["prompt_len"], 4);
    assert_eq!(json["new_tokens"], 5);
    assert_eq!(json["generated_tokens"], 10);
    assert_eq!(json["decode_steps"], 4);
    for key in [
        "prefill_s",
        "decode_s",
        "decode_tokens_per_s",
        "total_tokens_per_s",
        "prefill_tokens_per_s",
    ] {
        assert!(json[key].as_f64().unwrap() > 0.0, "{key}: {json}");
    }
    // The fixture's safetensors file holds 218496 bytes of f32 tensors.
    assert_eq!(json["weight_bytes"], 218_496);
    assert!(json["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
}

#[test]
fn random_weights_follow_the_policy_workload() {
    // The fixture's config with random weights; the policy sets batch 2, prompt 6, 3 new tokens.
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), |_| {});
    let report = dir.path().join("r.json");
    let model = fixture("opt-tiny-postln").display().to_string();
    succeeds(&[
        "--policy",
        &policy,
        "--random-weights",
        "--model",
        &model,
        "--dtype",
        "bf16",
        "--ignore-eos",
        "--report",
        &report.display().to_string(),
    ]);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["batch_size"], 2);
    assert_eq!(json["prompt_len"], 6);
    assert_eq!(json["new_tokens"], 3);
    assert_eq!(json["weights_dtype"], "bf16");
}

#[test]
fn random_weights_are_seeded() {
    let run = |seed: &str| {
        succeeds(&[
            "--random-weights",
            "--model",
            &fixture("opt-tiny-preln").display().to_string(),
            "--seed",
            seed,
            "--batch-size",
            "2",
            "--prompt-len",
            "4",
            "--max-new-tokens",
            "6",
            "--ignore-eos",
        ])
        .0
    };
    assert_eq!(run("1"), run("1"));
    assert_ne!(run("1"), run("2"));
}

#[test]
fn builtin_model_with_random_weights_runs() {
    let (stdout, stderr) = succeeds(&[
        "--random-weights",
        "--model-name",
        "opt-125m",
        "--dtype",
        "bf16",
        "--prompt-ids",
        "2,100,200",
        "--max-new-tokens",
        "2",
        "--ignore-eos",
    ]);
    assert!(
        stdout.contains("[0] prompt: 3 tokens; new ids: "),
        "{stdout}"
    );
    assert!(stderr.contains("opt-125m (bf16, cpu)"), "{stderr}");
}

#[test]
fn policies_this_machine_cannot_run_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("opt-tiny-preln").display().to_string();
    let gpu = write_policy(dir.path(), |p| {
        p.placement.weights = planner::policy::Placement::ALL_GPU;
    });
    let e = fails(&["--policy", &gpu, "--model", &model, "--prompt-ids", "2"]);
    assert!(e.contains("GPU") && e.contains("CPU policy"), "{e}");

    let compressed = write_policy(dir.path(), |p| {
        p.compression.kv_cache = true;
        p.placement.kv_cache.cpu = 0.5;
        p.placement.kv_cache.disk = 0.5;
    });
    let e = fails(&[
        "--policy",
        &compressed,
        "--model",
        &model,
        "--prompt-ids",
        "2",
    ]);
    assert!(e.contains("compression"), "{e}");

    let e = fails(&["--policy", "/nonexistent/p.toml", "--model", &model]);
    assert!(e.contains("/nonexistent/p.toml"), "{e}");
}

#[test]
fn a_disk_policy_runs_reports_its_channels_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let offload = tempfile::tempdir().unwrap();
    let model = fixture("opt-tiny-preln").display().to_string();
    let disk = write_policy(dir.path(), |p| {
        p.placement.weights.cpu = 0.5;
        p.placement.weights.disk = 0.5;
        p.placement.kv_cache.cpu = 0.0;
        p.placement.kv_cache.disk = 1.0;
        p.batch.gpu_batch_size = 1;
        p.batch.num_gpu_batches = 2;
    });
    let report = dir.path().join("r.json");
    let (_, stderr) = succeeds(&[
        "--policy",
        &disk,
        "--model",
        &model,
        "--prompt-ids",
        "2,100,7",
        "--prompt-ids",
        "2,9",
        "--max-new-tokens",
        "3",
        "--offload-dir",
        &offload.path().display().to_string(),
        "--report",
        &report.display().to_string(),
    ]);
    assert!(stderr.contains("measured/predicted"), "{stderr}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(json["disk_read_bytes"].as_u64().unwrap() > 0, "{json}");
    assert!(json["disk_write_bytes"].as_u64().unwrap() > 0, "{json}");
    assert_eq!(json["kv_disk_sequences"].as_u64(), Some(2), "{json}");
    assert!(json["predicted_decode_s_per_token"].as_f64().unwrap() > 0.0);
    assert!(json["ratio_throughput"].as_f64().unwrap() > 0.0);
    // The block device under the checkpoint reports its own counters where /sys has them.
    let fixture_dir = fixture("opt-tiny-preln");
    match primitives::storage::BlockDevice::for_path(&fixture_dir) {
        Some(device) => {
            assert_eq!(
                json["disk_device"].as_str(),
                Some(device.name.as_str()),
                "{json}"
            );
            assert!(
                json["device_decode_busy_s"].as_f64().unwrap() >= 0.0,
                "{json}"
            );
            assert!(
                json["device_decode_read_bytes"].as_u64().is_some(),
                "{json}"
            );
            assert!(stderr.contains("disk device"), "{stderr}");
        }
        None => {
            assert!(json["disk_device"].is_null(), "{json}");
            eprintln!("no block device under the fixtures: device counters not checked");
        }
    }
    assert!(std::fs::read_dir(offload.path()).unwrap().next().is_none());
}

#[test]
fn bad_arguments_give_clear_errors() {
    let model = fixture("opt-tiny-preln").display().to_string();
    let e = fails(&["--model", "/nonexistent/model", "--prompt-ids", "2"]);
    assert!(e.contains("/nonexistent/model/config.json"), "{e}");
    let e = fails(&["--model", &model, "--prompt-ids", "2,abc"]);
    assert!(e.contains("'abc' is not a token id"), "{e}");
    let e = fails(&["--model", &model, "--prompt-ids", "2,999"]);
    assert!(e.contains("token id 999"), "{e}");
    let long = ids_csv(&vec![5; 200]);
    let e = fails(&["--model", &model, "--prompt-ids", &long]);
    assert!(
        e.contains("200 tokens") && e.contains("max_position_embeddings"),
        "{e}"
    );
    let e = fails(&["--random-weights", "--model-name", "gpt-9"]);
    assert!(e.contains("unknown model 'gpt-9'"), "{e}");
    // 175 billion random f32 parameters do not fit this (or any test) machine.
    let e = fails(&[
        "--random-weights",
        "--model-name",
        "opt-175b",
        "--dtype",
        "f32",
    ]);
    assert!(e.contains("GiB of memory is available"), "{e}");
    let e = fails(&["--prompt-ids", "2"]);
    assert!(e.contains("--model"), "{e}");
    let e = fails(&[
        "--random-weights",
        "--model-name",
        "opt-125m",
        "--prompt",
        "hello",
    ]);
    assert!(e.contains("needs a tokenizer"), "{e}");
}

#[test]
fn help_shows_examples() {
    let (stdout, _) = succeeds(&["--help"]);
    assert!(
        stdout.contains("Examples:") && stdout.contains("--random-weights"),
        "{stdout}"
    );
    assert!(
        stdout.contains("--prompt-ids") && stdout.contains("--policy"),
        "{stdout}"
    );
}

#[test]
fn a_gpu_policy_runs_on_the_sim_device_and_reports_its_copies() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("opt-tiny-preln").display().to_string();
    let gpu = write_policy(dir.path(), |p| {
        *p = common::gpu_split_policy("opt-tiny-preln")
    });
    let args = |extra: &[&str]| {
        let mut a: Vec<String> = ["--model", &model, "--prompt-ids", "2,100,7", "--prompt-ids"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(["2,9", "--max-new-tokens", "4"].map(String::from));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let plain: Vec<String> = args(&[]);
    let plain: Vec<&str> = plain.iter().map(String::as_str).collect();
    let (want, _) = succeeds(&plain);

    let report = dir.path().join("r.json");
    let report_s = report.display().to_string();
    let on_sim = args(&[
        "--policy",
        &gpu,
        "--device",
        "sim:64MiB",
        "--report",
        &report_s,
    ]);
    let on_sim: Vec<&str> = on_sim.iter().map(String::as_str).collect();
    let (got, stderr) = succeeds(&on_sim);
    assert_eq!(got, want, "tokens on the sim device");
    assert!(stderr.contains("param manager"), "{stderr}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let d = &json["device"];
    assert_eq!(d["device"], "sim", "{json}");
    assert_eq!(d["capacity_bytes"].as_u64(), Some(64 << 20));
    assert!(d["run_transfers"]["h2d_bytes"].as_u64().unwrap() > 0, "{d}");
    assert!(d["param_manager"]["enabled"].as_bool().unwrap());
    // 64 MiB holds the whole fixture: the manager promoted every streamed matrix.
    assert_eq!(d["run_weight_upload_bytes"].as_u64(), Some(0), "{d}");
    assert!(!d["param_manager"]["promoted"]
        .as_array()
        .unwrap()
        .is_empty());

    let off = args(&[
        "--policy",
        &gpu,
        "--device",
        "sim:64MiB",
        "--param-manager",
        "off",
    ]);
    let off: Vec<&str> = off.iter().map(String::as_str).collect();
    let (got, stderr) = succeeds(&off);
    assert_eq!(got, want, "tokens with the parameter manager off");
    assert!(stderr.contains("param manager  off"), "{stderr}");

    let small = args(&[
        "--policy",
        &gpu,
        "--device",
        "sim:4k",
        "--profile",
        "builtin:cpu-2core-24gib",
    ]);
    let small: Vec<&str> = small.iter().map(String::as_str).collect();
    let e = fails(&small);
    assert!(e.contains("sim device out of memory"), "{e}");
    let e = fails(&["--model", &model, "--device", "sim"]);
    assert!(e.contains("only with --policy"), "{e}");
    let bad = args(&["--policy", &gpu, "--device", "tpu"]);
    let bad: Vec<&str> = bad.iter().map(String::as_str).collect();
    let e = fails(&bad);
    assert!(e.contains("expected sim or sim:CAPACITY"), "{e}");
}
