//! `planner`: solve for a policy, explain a policy, check checked-in policies.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use planner::check;
use planner::cost;
use planner::memory;
use planner::model::{builtin_names, ModelSpec};
use planner::paths;
use planner::policy::Policy;
use planner::profile::{
    check_override, CapacityOverrides, Profile, DEFAULT_PROFILE_NAME, EMBEDDED_PREFIX,
};
use planner::report;
use planner::solve::{self, Objective, SolveRequest};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const ABOUT: &str =
    "Strata planner: chooses where a model's weights, KV cache and activations live \
(GPU / CPU / disk), the batch shape and the CPU/GPU split of every linear layer, by solving a cost \
model as linear programs, and writes the choice as a TOML policy for the executor.";

const AFTER_HELP: &str = "Examples:
  planner solve --model opt-175b
      best-throughput policy on the embedded default profile (t4-flexgen), printed to stdout
  planner solve --model opt-30b --profile profiles/t4-flexgen.toml -o policies/opt-30b.toml
  planner solve --model opt-13b --profile profiles/a10-hetegen.toml --objective latency --batch 1
  planner solve --model-config ~/models/opt-1.3b/config.json --gpu-mem 4 --json
  planner explain policies/opt-30b-t4-flexgen.toml
  planner check policies/
  planner profile --quick -o profiles/this-host.toml
  planner calibrate --profile profiles/this-host.toml --report run1.json --report run2.json -o calibrated.toml

The cost model and every term it uses: docs/cost-model.md.";

#[derive(Parser)]
#[command(name = "planner", version, about = ABOUT, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum ObjectiveArg {
    /// Maximize generated tokens per second (FlexGen's regime; searches block shapes).
    Throughput,
    /// Minimize the time to generate for a fixed batch (HeteGen's regime; see --batch).
    Latency,
}

#[derive(Subcommand)]
enum Command {
    /// Search for the best policy for a model on a hardware profile.
    #[command(after_help = "Examples:
  planner solve --model opt-175b
  planner solve --model opt-6.7b --profile profiles/t4-flexgen.toml --prompt-len 512 --gen-len 32 -o p.toml
  planner solve --model opt-30b --profile profiles/a10-hetegen.toml --objective latency --batch 1
  planner solve --model opt-1.3b --profile profiles/cpu-2core-24gib.toml --cpu-mem 8
  planner solve --model opt-6.7b --profile profiles/cpu-2core-24gib.toml --cpu-mem 8 --max-block 16
  planner solve --model opt-6.7b --profile profiles/cpu-2core-24gib.toml --cpu-mem 8 --block 8x2

Without --profile the embedded profile t4-flexgen is used, and the output says so.
Embedded profiles can also be named as builtin:NAME (t4-flexgen, a10-hetegen, h100-pcie, cpu-2core-24gib, cpu-2core-24gib-avx2, cpu-2core-24gib-zen5).")]
    Solve {
        /// Built-in model: opt-125m, opt-350m, opt-1.3b, opt-2.7b, opt-6.7b, opt-13b, opt-30b, opt-66b, opt-175b.
        #[arg(
            long,
            conflicts_with = "model_config",
            required_unless_present = "model_config"
        )]
        model: Option<String>,
        /// A Hugging Face OPT config.json instead of a built-in model.
        #[arg(long, value_name = "PATH")]
        model_config: Option<PathBuf>,
        /// Hardware profile TOML (or builtin:NAME). Default: the embedded t4-flexgen profile.
        #[arg(long, value_name = "P")]
        profile: Option<String>,
        /// What to optimize.
        #[arg(long, value_enum, default_value = "throughput")]
        objective: ObjectiveArg,
        /// Sequences in the batch for --objective latency.
        #[arg(long, default_value_t = 1, value_name = "N")]
        batch: u64,
        /// Prompt length in tokens (s).
        #[arg(long, default_value_t = 512)]
        prompt_len: u64,
        /// Tokens to generate per sequence (n).
        #[arg(long, default_value_t = 32)]
        gen_len: u64,
        /// GPU memory the policy may use, in GiB (replaces the profile's memory minus reserve).
        #[arg(long, value_name = "GiB")]
        gpu_mem: Option<f64>,
        /// CPU memory the policy may use, in GiB.
        #[arg(long, value_name = "GiB")]
        cpu_mem: Option<f64>,
        /// Disk space the policy may use, in GiB.
        #[arg(long, value_name = "GiB")]
        disk_mem: Option<f64>,
        /// Never choose 4-bit compression (compare with uncompressed baselines).
        #[arg(long)]
        no_compression: bool,
        /// Only this block shape: GPU batch size x number of GPU batches, e.g. 16x4 (throughput).
        #[arg(long, value_name = "GxN", value_parser = parse_block)]
        block: Option<[u64; 2]>,
        /// At most N sequences per block (gbs x nb), e.g. the requests you have at once.
        #[arg(long, value_name = "N")]
        max_block: Option<u64>,
        /// Write the policy here (commented TOML) instead of printing it.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a policy's predicted per-stage breakdown and memory use on its profile.
    #[command(after_help = "Example:\n  planner explain policies/opt-175b-t4-flexgen.toml --json")]
    Explain {
        /// Policy file.
        policy: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure this machine (CPU kernels, DRAM, disk, GPU when present) into a profile TOML.
    #[command(after_help = "Examples:
  planner profile --quick
      about 15 s on 2 cores; prints the figures (each with how it was measured); without --quick
      about 3 minutes (21 passes per CPU figure, 11 per disk figure over a 2 GiB file)
  planner profile --offload-dir /mnt/nvme -o profiles/my-host.toml
  planner profile --quick -o b.toml --compare a.toml
      a second run next to a first one: flags every figure that moved by more than 15%

The CPU figures time the executor's own kernels (bf16 weights), one pass of each in turn so that a
slow spell of a shared host falls on all of them alike; the disk figures use direct I/O in a
temporary directory under --offload-dir (removed afterwards, also on Ctrl-C). Without a GPU the
profile has no [gpu] section and the output says why.")]
    Profile {
        /// Directory on the disk the executor will offload to (default: the system temp dir).
        #[arg(long, value_name = "DIR")]
        offload_dir: Option<PathBuf>,
        /// Smaller sizes and fewer passes (under 30 s).
        #[arg(long)]
        quick: bool,
        /// Write the profile here.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Profile name (default: the output file's stem, else "this-host").
        #[arg(long)]
        name: Option<String>,
        /// Another profile (file or builtin:NAME) to set every figure beside.
        #[arg(long, value_name = "P")]
        compare: Option<String>,
        /// Print the profile as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Refit a profile's effective rates from executor reports (`executor --policy P --report R.json`).
    #[command(after_help = "Examples:
  planner calibrate --profile profiles/this-host.toml --report a.json --report b.json -o calibrated.toml
  planner calibrate --profile p.toml --report fit1.json --report fit2.json --score held1.json --score held2.json

The disk rates are fitted to the disk's busy time and the CPU rates to the CPU compute seconds of the
prefill and decode steps of each report (docs/cost-model.md, section 9, Calibration). --score sets predicted beside measured
throughput for runs the fit did not see, before and after calibration.")]
    Calibrate {
        /// The profile to start from (file or builtin:NAME).
        #[arg(long, value_name = "P")]
        profile: String,
        /// Executor reports to fit (repeat the flag).
        #[arg(long = "report", value_name = "JSON", required = true)]
        reports: Vec<PathBuf>,
        /// Executor reports to score the fit on (repeat the flag); default: the fitted ones.
        #[arg(long = "score", value_name = "JSON")]
        scores: Vec<PathBuf>,
        /// Write the calibrated profile here.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Name of the calibrated profile (default: the output file's stem).
        #[arg(long)]
        name: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-verify policies (for CI): exits non-zero when a profile's fingerprint changed, a policy no
    /// longer fits, its stored prediction is stale, or a fresh solve beats it by more than 2%.
    #[command(after_help = "Example:\n  planner check policies/")]
    Check {
        /// A policy file or a folder of them.
        #[arg(default_value = "policies")]
        dir: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Solve {
            model,
            model_config,
            profile,
            objective,
            batch,
            prompt_len,
            gen_len,
            gpu_mem,
            cpu_mem,
            disk_mem,
            no_compression,
            block,
            max_block,
            output,
            json,
        } => run_solve(SolveArgs {
            model,
            model_config,
            profile,
            objective: match objective {
                ObjectiveArg::Throughput => Objective::Throughput,
                ObjectiveArg::Latency => Objective::Latency,
            },
            batch,
            prompt_len,
            gen_len,
            gpu_mem,
            cpu_mem,
            disk_mem,
            no_compression,
            block_limits: planner::policy::BlockLimits {
                fixed: block,
                max_sequences: max_block,
            },
            output,
            json,
        })
        .map(|()| true),
        Command::Explain { policy, json } => run_explain(&policy, json).map(|()| true),
        Command::Check { dir, json } => run_check(&dir, json),
        Command::Profile {
            offload_dir,
            quick,
            output,
            name,
            compare,
            json,
        } => run_profile(offload_dir, quick, output, name, compare.as_deref(), json).map(|()| true),
        Command::Calibrate {
            profile,
            reports,
            scores,
            output,
            name,
            json,
        } => run_calibrate(&profile, &reports, &scores, output, name, json).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("planner: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by ": ", skipping a cause whose text the message already ends
/// with (library errors name their cause in their own text, and anyhow would repeat it).
fn error_chain(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !message.ends_with(&text) {
            message = format!("{message}: {text}");
        }
    }
    message
}

struct SolveArgs {
    model: Option<String>,
    model_config: Option<PathBuf>,
    profile: Option<String>,
    objective: Objective,
    batch: u64,
    prompt_len: u64,
    gen_len: u64,
    gpu_mem: Option<f64>,
    cpu_mem: Option<f64>,
    disk_mem: Option<f64>,
    no_compression: bool,
    block_limits: planner::policy::BlockLimits,
    output: Option<PathBuf>,
    json: bool,
}

/// `--block GxN`: two positive numbers around an `x`.
fn parse_block(text: &str) -> std::result::Result<[u64; 2], String> {
    let bad = || {
        format!("'{text}' is not a block shape; expected GxN, e.g. 16x4 (GPU batch size x number of GPU batches)")
    };
    let (g, n) = text.split_once(['x', 'X']).ok_or_else(bad)?;
    let g: u64 = g.trim().parse().map_err(|_| bad())?;
    let n: u64 = n.trim().parse().map_err(|_| bad())?;
    Ok([g, n])
}

/// Loads the profile named on the command line: `(profile, how policies record it, description)`.
fn load_profile(arg: Option<&str>) -> Result<(Profile, String, String)> {
    match arg {
        None => {
            let p = Profile::embedded(DEFAULT_PROFILE_NAME)?;
            Ok((
                p,
                format!("{EMBEDDED_PREFIX}{DEFAULT_PROFILE_NAME}"),
                format!("embedded default profile '{DEFAULT_PROFILE_NAME}' (no --profile given)"),
            ))
        }
        Some(name) if name.starts_with(EMBEDDED_PREFIX) => {
            let bare = &name[EMBEDDED_PREFIX.len()..];
            Ok((
                Profile::embedded(bare)?,
                name.to_string(),
                format!("embedded profile '{bare}'"),
            ))
        }
        Some(path) => {
            let p = Profile::load(Path::new(path))?;
            let recorded = paths::recorded_path(Path::new(path));
            let desc = format!("profile '{}' from {path}", p.profile.name);
            Ok((p, recorded, desc))
        }
    }
}

fn run_solve(a: SolveArgs) -> Result<()> {
    let (model, config_ref) = match (&a.model, &a.model_config) {
        (Some(name), None) => (ModelSpec::builtin(name)?, None),
        (None, Some(path)) => (
            ModelSpec::from_hf_config(path)?,
            Some(paths::recorded_path(path)),
        ),
        _ => bail!(
            "give exactly one of --model NAME ({}) or --model-config PATH",
            builtin_names().join(", ")
        ),
    };
    let overrides = CapacityOverrides {
        gpu_mem_gib: a
            .gpu_mem
            .map(|v| check_override("--gpu-mem", v))
            .transpose()
            .map_err(anyhow::Error::msg)?,
        cpu_mem_gib: a
            .cpu_mem
            .map(|v| check_override("--cpu-mem", v))
            .transpose()
            .map_err(anyhow::Error::msg)?,
        disk_mem_gib: a
            .disk_mem
            .map(|v| check_override("--disk-mem", v))
            .transpose()
            .map_err(anyhow::Error::msg)?,
    };
    let (profile, profile_ref, profile_desc) = load_profile(a.profile.as_deref())?;
    if overrides.gpu_mem_gib.is_some() && !profile.has_gpu() {
        bail!(
            "--gpu-mem given, but profile '{}' has no GPU",
            profile.profile.name
        );
    }
    let request = SolveRequest {
        model: &model,
        model_config: config_ref,
        profile: &profile,
        profile_ref,
        objective: a.objective,
        latency_batch: a.batch,
        prompt_len: a.prompt_len,
        gen_len: a.gen_len,
        overrides,
        allow_compression: !a.no_compression,
        block_limits: a.block_limits,
    };
    let policy = solve::solve(&request)?;
    let prediction = policy
        .prediction
        .clone()
        .context("solver returned no prediction")?;
    if let Some(out) = &a.output {
        policy.save(out)?;
    }
    if a.json {
        let value = serde_json::json!({
            "profile_used": profile_desc,
            "profile": policy.provenance.profile,
            "output": a.output.as_ref().map(|p| p.display().to_string()),
            "policy": policy,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("planner solve: {} using {profile_desc}", model.name);
    if let Some(s) = &prediction.solver {
        println!(
            "searched {} linear programs ({} configurations pruned) in {:.1} ms",
            s.programs_solved, s.programs_pruned, s.solve_ms
        );
    }
    print!("{}", report::decisions(&policy));
    print!("{}", report::prediction_table(&prediction));
    match &a.output {
        Some(out) => println!("wrote {}", out.display()),
        None => {
            println!("\n(policy follows; use -o FILE to write it)\n");
            print!("{}", policy.to_toml());
        }
    }
    Ok(())
}

fn run_explain(path: &Path, json: bool) -> Result<()> {
    let policy = Policy::load(path)?;
    let profile = paths::load_policy_profile(path, &policy.provenance.profile)?;
    let model = paths::load_policy_model(path, &policy.model.name, policy.model.config.as_deref())?;
    let prediction = cost::evaluate(&model, &profile, &policy)?;
    let plan = memory::plan_for_policy(&model, &policy, profile.has_gpu());
    let fingerprint_matches = profile.fingerprint() == policy.provenance.profile_fingerprint;
    if json {
        let value = serde_json::json!({
            "policy": path.display().to_string(),
            "profile": policy.provenance.profile,
            "fingerprint_matches": fingerprint_matches,
            "prediction": prediction,
            "stored_prediction": policy.prediction,
            "memory_plan_bytes": plan,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("policy {}", path.display());
    println!(
        "profile {} ({}; fingerprint {})",
        policy.provenance.profile,
        profile.profile.name,
        if fingerprint_matches {
            "matches"
        } else {
            "CHANGED since the policy was solved"
        }
    );
    print!("{}", report::decisions(&policy));
    print!("{}", report::prediction_table(&prediction));
    print!("{}", report::memory_plan_table(&plan));
    if let Some(stored) = &policy.prediction {
        println!(
            "stored prediction: {:.4} tok/s, {:.3} s total",
            stored.throughput_tok_s, stored.total_s
        );
    }
    Ok(())
}

fn run_check(target: &Path, json: bool) -> Result<bool> {
    let files = check::policy_files(target)
        .with_context(|| format!("cannot list policies in {}", target.display()))?;
    if files.is_empty() {
        bail!("no policy files (*.toml) in {}", target.display());
    }
    let reports: Vec<check::CheckReport> = files.iter().map(|f| check::check_policy(f)).collect();
    let all_ok = reports.iter().all(|r| r.ok);
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(all_ok);
    }
    let show = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.4}"));
    for r in &reports {
        println!(
            "{} {}: stored {} tok/s, evaluated {} tok/s, fresh solve {} tok/s",
            if r.ok { "ok  " } else { "FAIL" },
            r.policy,
            show(r.stored_throughput_tok_s),
            show(r.evaluated_throughput_tok_s),
            show(r.fresh_throughput_tok_s)
        );
        for f in &r.failures {
            println!("     {f}");
        }
    }
    let failed = reports.iter().filter(|r| !r.ok).count();
    println!("{} policies checked, {} failed", reports.len(), failed);
    Ok(all_ok)
}

fn run_profile(
    offload_dir: Option<PathBuf>,
    quick: bool,
    output: Option<PathBuf>,
    name: Option<String>,
    compare: Option<&str>,
    json: bool,
) -> Result<()> {
    let offload_dir = offload_dir.unwrap_or_else(std::env::temp_dir);
    if !offload_dir.is_dir() {
        bail!(
            "--offload-dir {}: not a directory (give a directory on the disk to measure)",
            offload_dir.display()
        );
    }
    // Load the comparison first: a typo should not cost a whole measurement.
    let other = compare.map(|c| load_profile(Some(c))).transpose()?;
    let name = name
        .or_else(|| {
            output
                .as_ref()
                .and_then(|o| o.file_stem())
                .map(|s| s.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "this-host".into());
    let options = planner::host::ProfileOptions {
        offload_dir,
        quick,
        name,
    };
    let bar = indicatif::ProgressBar::new(1000);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let profile = planner::host::measure_profile(&options, &mut |step, done| {
        bar.set_message(step.to_string());
        bar.set_position((done * 1000.0) as u64);
    })?;
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(out) = &output {
        let text = profile.to_toml(&format!(
            "Hardware profile written by `planner profile{}` in {elapsed:.1} s.\n\
             Units are in the field names: _gib = 2^30 bytes, _gbps = 10^9 bytes/s, _tflops = 10^12 FLOP/s.\n\
             Each note says how its figure was measured; `planner calibrate` refits the rates from executor runs.",
            if quick { " --quick" } else { "" }
        ));
        std::fs::write(out, text).with_context(|| format!("cannot write {}", out.display()))?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&profile)?);
        return Ok(());
    }
    println!(
        "planner profile: {} ({:.1} s)",
        profile.profile.hardware.as_deref().unwrap_or("?"),
        elapsed
    );
    println!("{}", profile.profile.description);
    print!(
        "{}",
        report::profile_table(&profile, other.as_ref().map(|o| (&o.0, o.2.as_str())))
    );
    if let Some(out) = &output {
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn run_calibrate(
    profile_arg: &str,
    reports: &[PathBuf],
    scores: &[PathBuf],
    output: Option<PathBuf>,
    name: Option<String>,
    json: bool,
) -> Result<()> {
    use planner::calibrate::{self, ExecutorReport};
    let (base, _, base_desc) = load_profile(Some(profile_arg))?;
    let load = |paths: &[PathBuf]| -> Result<Vec<(String, ExecutorReport)>> {
        paths
            .iter()
            .map(|p| Ok((p.display().to_string(), ExecutorReport::load(p)?)))
            .collect()
    };
    let fit = load(reports)?;
    let held_out = !scores.is_empty();
    let scored = if held_out { load(scores)? } else { fit.clone() };
    let mut cal = calibrate::calibrate(&base, &fit)?;
    if let Some(n) = name.or_else(|| {
        output
            .as_ref()
            .and_then(|o| o.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
    }) {
        cal.profile.profile.name = n;
    }
    let mut rows = Vec::new();
    for (path, r) in &scored {
        let before = calibrate::fidelity(&base, r).with_context(|| format!("report {path}"))?;
        let after =
            calibrate::fidelity(&cal.profile, r).with_context(|| format!("report {path}"))?;
        rows.push((path.clone(), r.policy_as_run.batch, before, after));
    }
    let errors_before: Vec<f64> = rows.iter().map(|r| r.2.error()).collect();
    let errors_after: Vec<f64> = rows.iter().map(|r| r.3.error()).collect();
    let median_before = calibrate::median(&errors_before);
    let median_after = calibrate::median(&errors_after);
    if let Some(out) = &output {
        let text = cal.profile.to_toml(&format!(
            "Calibrated by `planner calibrate` from {} executor reports, starting from {base_desc}.\n\
             Units are in the field names: _gib = 2^30 bytes, _gbps = 10^9 bytes/s, _tflops = 10^12 FLOP/s.",
            fit.len()
        ));
        std::fs::write(out, text).with_context(|| format!("cannot write {}", out.display()))?;
    }
    if json {
        let value = serde_json::json!({
            "profile_used": base_desc,
            "fitted_on": reports.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "scored_on_held_out_runs": held_out,
            "refits": cal.refits.iter().map(|r| serde_json::json!({"figure": r.figure, "before": r.before, "after": r.after})).collect::<Vec<_>>(),
            "runs": rows.iter().map(|(p, _, b, a)| serde_json::json!({
                "report": p,
                "measured_tok_s": b.measured_tok_s,
                "predicted_tok_s_before": b.predicted_tok_s,
                "predicted_tok_s_after": a.predicted_tok_s,
            })).collect::<Vec<_>>(),
            "median_abs_error_before": median_before,
            "median_abs_error_after": median_after,
            "profile": cal.profile,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!(
        "planner calibrate: {} reports fitted, starting from {base_desc}",
        fit.len()
    );
    println!(
        "  {:<28} {:>12} {:>12}  {:>6}",
        "figure", "before", "after", "ratio"
    );
    for r in &cal.refits {
        println!(
            "  {:<28} {:>12.4} {:>12.4}  {:>6.3}",
            r.figure,
            r.before,
            r.after,
            r.after / r.before
        );
    }
    println!(
        "\npredicted / measured throughput on {} runs ({}):",
        rows.len(),
        if held_out {
            "held out of the fit"
        } else {
            "the fitted runs themselves; pass --score for held-out runs"
        }
    );
    println!(
        "  {:<40} {:>7} {:>10} {:>10} {:>7} {:>10} {:>7}",
        "report", "block", "measured", "before", "ratio", "after", "ratio"
    );
    for (path, batch, b, a) in &rows {
        println!(
            "  {:<40} {:>7} {:>10.3} {:>10.3} {:>7.3} {:>10.3} {:>7.3}",
            path,
            format!("{}x{}", batch.gpu_batch_size, batch.num_gpu_batches),
            b.measured_tok_s,
            b.predicted_tok_s,
            b.predicted_tok_s / b.measured_tok_s,
            a.predicted_tok_s,
            a.predicted_tok_s / a.measured_tok_s
        );
    }
    println!(
        "median |predicted / measured - 1|: before {:.1}%, after {:.1}%",
        median_before * 100.0,
        median_after * 100.0
    );
    if let Some(out) = &output {
        println!("wrote {}", out.display());
    }
    Ok(())
}
