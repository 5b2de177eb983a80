//! `executor --policy p.toml`: run a model as the policy says and report what was measured.

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use executor::backend::{Backend, CpuBackend};
use executor::cuda::CudaDevice;
use executor::device::Device;
use executor::generate::{generate, GenerationConfig, Sampling};
use executor::gpu_tier::{GpuPlan, Rates};
use executor::models::opt::OptConfig;
use executor::run::{self, ModelSource, Prompt};
use executor::schedule::{self, BlockPlan};
use executor::sim::SimDevice;
use executor::weights::ElementType;
use planner::policy::Policy;
use planner::profile::Profile;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
}

const EXAMPLES: &str = "\
Examples:
  # Greedy continuation of two text prompts with a Hugging Face OPT checkpoint
  executor --model ~/models/opt-125m --prompt 'The capital of France is' --prompt 'Hello' \\
           --max-new-tokens 32

  # Token-id prompts, sampling, JSON report
  executor --model ~/models/opt-1.3b --prompt-ids 2,100,200 --temperature 0.8 --top-p 0.9 \\
           --sample-seed 7 --report run.json

  # Benchmark a model size without a checkpoint: random bf16 OPT-1.3B, 16 random prompts of
  # 128 tokens, 32 new tokens each (EOS ignored so every run does the same work)
  executor --random-weights --model-name opt-1.3b --dtype bf16 --batch-size 16 \\
           --prompt-len 128 --max-new-tokens 32 --ignore-eos --report bench.json

  # Run a policy written by `planner solve` (CPU and disk tiers): weights partly read from the
  # checkpoint with direct I/O, KV cache and activations in an offload directory; prints the
  # planner's prediction next to the measurements
  executor --model ~/models/opt-6.7b --policy my-policy.toml --offload-dir /mnt/nvme \
           --batch-size 8 --prompt-len 128 --max-new-tokens 32 --report run.json

  # Run a policy with GPU shares (resident weights, the HeteGen split, GPU KV cache) on the
  # simulated device, a CPU-backed GPU stand-in with 256 MiB of memory: same tokens as the CPU
  # run, and the report counts every host<->device copy and what the parameter manager promoted
  executor --model ~/models/opt-125m --policy gpu-policy.toml --device sim:256MiB \\
           --param-manager on --report run.json

  # The same policy on the machine's GPU (GPU 0; its free memory less 1 GiB, or cuda:CAPACITY)
  executor --model ~/models/opt-125m --policy gpu-policy.toml --device cuda --report run.json";

/// Run an OPT model on the CPU, as a planner policy says, and report prefill and decode speed.
#[derive(Debug, Parser)]
#[command(name = "executor", version, after_help = EXAMPLES)]
struct Cli {
    /// Policy file written by `planner solve`. Without it, everything stays in CPU memory. Its
    /// workload (prompt_len, gen_len) and block size are the defaults for random prompts.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,

    /// Hugging Face OPT directory: config.json, model.safetensors (or shards with
    /// model.safetensors.index.json), and optionally tokenizer.json or vocab.json + merges.txt.
    /// With --random-weights, only its config.json is read.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,

    /// Use seeded random weights instead of a checkpoint (for benchmarking model sizes).
    #[arg(long)]
    random_weights: bool,

    /// Built-in configuration for --random-weights (opt-125m ... opt-175b); defaults to the
    /// policy's model.
    #[arg(long, value_name = "NAME")]
    model_name: Option<String>,

    /// Element type of random weights (default: the configuration's, f16 for built-ins).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,

    /// Seed for random weights and random prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// A text prompt (needs the model's tokenizer); repeat for a batch.
    #[arg(long, value_name = "TEXT")]
    prompt: Vec<String>,

    /// A file with one text prompt per line.
    #[arg(long, value_name = "FILE")]
    prompt_file: Option<PathBuf>,

    /// A prompt as comma-separated token ids, e.g. "2,100,200"; repeat for a batch.
    #[arg(long, value_name = "IDS")]
    prompt_ids: Vec<String>,

    /// With no prompts given: how many random prompts (default: the policy's block size, else 1).
    #[arg(long, value_name = "N")]
    batch_size: Option<usize>,

    /// With no prompts given: tokens per random prompt (default: the policy's prompt_len, else 8).
    #[arg(long, value_name = "N")]
    prompt_len: Option<usize>,

    /// Tokens to generate per sequence (default: the policy's gen_len, else 32).
    #[arg(long, value_name = "N")]
    max_new_tokens: Option<usize>,

    /// Sample with this temperature instead of greedy decoding (0 means greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,

    /// Sample only among the k most likely tokens (implies sampling at temperature 1 unless
    /// --temperature is given).
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,

    /// Sample only among the most likely tokens whose probability adds up to p (nucleus).
    #[arg(long, value_name = "P")]
    top_p: Option<f32>,

    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    sample_seed: u64,

    /// Do not stop at the EOS token: always generate --max-new-tokens (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,

    /// Worker threads for the CPU kernels (default: all cores).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,

    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,

    /// Parent directory of the offload directory for disk-resident KV cache and activations
    /// (a fresh subdirectory is made there and removed at exit, also on Ctrl-C). Default: the
    /// system temporary directory.
    #[arg(long, value_name = "DIR")]
    offload_dir: Option<PathBuf>,

    /// Hardware profile for the planner's prediction printed next to the measurements (a TOML
    /// file, or builtin:NAME). Default on a host without a GPU: builtin:cpu-2core-24gib-avx2 when
    /// the CPU lacks AVX-512, builtin:cpu-2core-24gib-zen5 on AMD Zen 5 or later with AVX-512,
    /// else builtin:cpu-2core-24gib.
    #[arg(long, value_name = "PROFILE")]
    profile: Option<String>,

    /// Run the policy's GPU tiers on a device (needs --policy). `cuda` is GPU 0 (cuBLAS and
    /// NVRTC kernels; capacity: its free memory less 1 GiB, or `cuda:8GiB`); on a machine without
    /// a usable GPU it is refused with the reason. `sim` is a CPU-backed device with its own
    /// memory, counted host<->device copies and a capacity (default 16GiB; `sim:512MiB` sets
    /// it). On either, GPU-resident weights, the HeteGen split, GPU KV cache and activations and
    /// the parameter manager run as the policy says; `sim` gives the CPU run's tokens (its
    /// timings say nothing about a GPU). A policy too large for the capacity is refused with the
    /// numbers. Without --device, a policy that needs a GPU is refused.
    #[arg(long, value_name = "cuda[:CAPACITY]|sim[:CAPACITY]")]
    device: Option<String>,

    /// The parameter manager (with --device): when the device has memory beyond the policy's
    /// buffers, keep more weight matrices resident, most valuable first (CPU time saved per
    /// device byte); the report lists them and the estimated time saved.
    #[arg(long, value_enum, default_value_t = Switch::On, value_name = "on|off")]
    param_manager: Switch,

    /// Print only the generated text/ids and the report table, no progress bars.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run_cli(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Library errors already quote their cause; print a cause only when it adds text.
            let mut message = String::new();
            for cause in e.chain() {
                let text = cause.to_string();
                if !message.contains(&text) {
                    if !message.is_empty() {
                        message.push_str(": ");
                    }
                    message.push_str(&text);
                }
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The device a `--device` argument names: `cuda[:CAPACITY]` opens GPU 0 (an error, not a panic,
/// without one), anything else is the sim device's to accept or refuse.
fn open_device(text: &str) -> executor::Result<Box<dyn Device>> {
    if text == "cuda" || text.starts_with("cuda:") {
        let dev = CudaDevice::from_arg(text)?;
        eprintln!(
            "device: {}; capacity {:.2} GiB",
            dev.info(),
            dev.capacity_bytes() as f64 / (1u64 << 30) as f64
        );
        Ok(Box::new(dev))
    } else {
        Ok(Box::new(SimDevice::from_arg(text)?))
    }
}

/// The hardware profile named by `--profile` (a file or builtin:NAME), or the embedded CPU profile
/// of this GPU-less host, with a note saying so.
fn resolve_profile(name: Option<&str>) -> anyhow::Result<(String, Profile)> {
    Ok(match name {
        Some(name) => match name.strip_prefix("builtin:") {
            Some(b) => (name.to_string(), Profile::embedded(b)?),
            None => (name.to_string(), Profile::load(std::path::Path::new(name))?),
        },
        None => {
            let (name, why) = planner::profile::embedded_cpu_profile(
                primitives::kernels::instruction_set(),
                primitives::kernels::amd_family(),
            );
            eprintln!(
                "note: predicting with the embedded profile builtin:{name} (this host has no GPU \
                 and {why}); pass --profile for another"
            );
            (format!("builtin:{name}"), Profile::embedded(name)?)
        }
    })
}

fn run_cli(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot configure the thread pool")?;
    }

    if cli.policy.is_none()
        && (cli.offload_dir.is_some() || cli.profile.is_some() || cli.device.is_some())
    {
        bail!("--offload-dir, --profile and --device apply only with --policy");
    }
    // Opened before the policy is read, so that a device that cannot be opened (no GPU) is the
    // error reported, whatever the policy.
    let device = cli.device.as_deref().map(open_device).transpose()?;
    let policy = match &cli.policy {
        Some(path) => {
            let policy = Policy::load(path)?;
            run::check_policy(&policy, &path.display().to_string())?;
            // GPU tiers: run on the device when one is named, else refused with the reason (on a
            // host without a GPU, the planner command that gives a CPU policy).
            if device.is_none() {
                let gpu = executor::cuda::require_gpu_for(&policy)?;
                if gpu.is_some() {
                    bail!(
                        "policy {} places work on the GPU: run it with --device cuda (or \
                         --device sim to run the GPU tiers on a simulated device)",
                        path.display()
                    );
                }
            }
            Some(policy)
        }
        None => None,
    };
    // The profile of the prediction; its rates also value matrices for the parameter manager.
    let profile = match &policy {
        Some(_) => Some(resolve_profile(cli.profile.as_deref())?),
        None => None,
    };

    // Read the prompts before loading, which can take long for a large checkpoint.
    let mut prompts: Vec<Prompt> = cli.prompt.iter().cloned().map(Prompt::Text).collect();
    if let Some(file) = &cli.prompt_file {
        prompts.extend(run::read_prompt_file(file)?);
    }
    for ids in &cli.prompt_ids {
        prompts.push(Prompt::Ids(run::parse_prompt_ids(ids)?));
    }
    if cli.model_name.is_some() && !cli.random_weights {
        bail!("--model-name only applies with --random-weights");
    }
    if cli.model.is_some() && cli.model_name.is_some() {
        bail!("give either --model DIR or --model-name NAME, not both");
    }
    let source = if cli.random_weights {
        let config = match (&cli.model, &cli.model_name, &policy) {
            (Some(dir), _, _) => OptConfig::from_file(&dir.join("config.json"))?,
            (None, Some(name), _) => OptConfig::builtin(name)?,
            (None, None, Some(p)) => OptConfig::builtin(&p.model.name)?,
            (None, None, None) => {
                bail!(
                    "--random-weights needs --model-name (e.g. opt-1.3b), --model DIR or --policy"
                )
            }
        };
        let dtype = match cli.dtype {
            Some(DtypeArg::F32) => ElementType::F32,
            Some(DtypeArg::F16) => ElementType::F16,
            Some(DtypeArg::Bf16) => ElementType::Bf16,
            None => config.spec.dtype.into(),
        };
        ModelSource::Random {
            config,
            dtype,
            seed: cli.seed,
        }
    } else {
        match &cli.model {
            Some(dir) => ModelSource::Checkpoint(dir.clone()),
            None => bail!("give --model DIR (a Hugging Face OPT directory) or --random-weights"),
        }
    };
    // The memory plan for the run, checked before loading.
    let spec = match &source {
        ModelSource::Checkpoint(dir) => OptConfig::from_file(&dir.join("config.json"))?.spec,
        ModelSource::Random { config, .. } => config.spec.clone(),
    };
    let max_new_tokens = cli
        .max_new_tokens
        .or(policy.as_ref().map(|p| p.workload.gen_len as usize))
        .unwrap_or(32);
    let planned_shape = policy.as_ref().map(|p| {
        let n = if prompts.is_empty() {
            cli.batch_size.unwrap_or(p.batch.block_size() as usize)
        } else {
            prompts.len()
        };
        let len = prompts
            .iter()
            .map(|pr| match pr {
                Prompt::Ids(ids) => ids.len(),
                Prompt::Text(_) => p.workload.prompt_len as usize,
            })
            .max()
            .or(cli.prompt_len)
            .unwrap_or(p.workload.prompt_len as usize);
        let (gbs, nb) = run::block_shape(
            n,
            p.batch.gpu_batch_size as usize,
            p.batch.num_gpu_batches as usize,
        );
        run::policy_for_run(p, len.max(1), max_new_tokens.max(1), gbs, nb)
    });
    if let Some(p) = &planned_shape {
        run::check_memory(&spec, p)?;
    }
    let weights_disk = policy.as_ref().map_or(0.0, |p| p.placement.weights.disk);
    let mut loaded = run::load_placed(&source, !cli.quiet, weights_disk)?;
    if policy.as_ref().is_some_and(|p| p.compression.weights) {
        run::compress_weights(&mut loaded)?;
    }
    if device.is_none() {
        run::pack_for_cpu(&mut loaded, !cli.quiet);
    }
    if let Some(p) = &policy {
        if p.model.name != loaded.name {
            eprintln!(
                "warning: the policy was solved for model '{}' but the model is '{}'",
                p.model.name, loaded.name
            );
        }
    }

    let workload = policy.as_ref().map(|p| p.workload);
    let prompt_ids = if prompts.is_empty() {
        let batch = cli
            .batch_size
            .or(policy.as_ref().map(|p| p.batch.block_size() as usize))
            .unwrap_or(1);
        let len = cli
            .prompt_len
            .or(workload.map(|w| w.prompt_len as usize))
            .unwrap_or(8);
        if batch == 0 || len == 0 {
            bail!("--batch-size and --prompt-len must be at least 1");
        }
        let spec = &loaded.model.config().spec;
        run::random_prompts(
            batch,
            len,
            spec.vocab_size as usize,
            spec.bos_token_id,
            cli.seed,
        )
    } else {
        if cli.batch_size.is_some() || cli.prompt_len.is_some() {
            bail!("--batch-size and --prompt-len only apply when no prompts are given");
        }
        if let Some(p) = &policy {
            if prompts.len() as u64 != p.batch.block_size() {
                let (gbs, nb) = run::block_shape(
                    prompts.len(),
                    p.batch.gpu_batch_size as usize,
                    p.batch.num_gpu_batches as usize,
                );
                eprintln!(
                    "warning: the policy's block holds {} sequences ({} x {}); running the {} \
                     prompts given as {nb} batches of up to {gbs}",
                    p.batch.block_size(),
                    p.batch.gpu_batch_size,
                    p.batch.num_gpu_batches,
                    prompts.len()
                );
            }
        }
        run::tokenize_prompts(&prompts, loaded.tokenizer.as_ref())?
    };

    if cli.temperature < 0.0 || cli.temperature.is_nan() {
        bail!(
            "--temperature is {}; expected 0 (greedy) or more",
            cli.temperature
        );
    }
    let sampling = if cli.temperature > 0.0 || cli.top_k.is_some() || cli.top_p.is_some() {
        Sampling::Sample {
            temperature: if cli.temperature > 0.0 {
                cli.temperature
            } else {
                1.0
            },
            top_k: cli.top_k,
            top_p: cli.top_p,
            seed: cli.sample_seed,
        }
    } else {
        Sampling::Greedy
    };
    let config = GenerationConfig {
        max_new_tokens,
        sampling,
        stop_at_eos: !cli.ignore_eos,
    };

    let backend = CpuBackend;
    let mut block = None;
    let out = match &policy {
        None => generate(&loaded.model, &backend, &prompt_ids, &config)?,
        Some(p) => {
            let plan = BlockPlan {
                gpu_batch_size: p.batch.gpu_batch_size as usize,
                num_gpu_batches: p.batch.num_gpu_batches as usize,
                weights_disk: p.placement.weights.disk,
                kv_cache_disk: p.placement.kv_cache.disk,
                activations_disk: p.placement.activations.disk,
                cpu_attention: p.compute.cpu_attention,
                offload_parent: cli
                    .offload_dir
                    .clone()
                    .unwrap_or_else(schedule::default_offload_parent),
                offload_capacity_limit: None,
                compress_kv: p.compression.kv_cache,
            };
            let gpu_plan = match (&device, &profile) {
                (Some(_), Some((_, prof))) => Some(GpuPlan::from_policy(
                    p,
                    cli.param_manager == Switch::On,
                    Rates::from_profile(prof),
                )),
                _ => None,
            };
            let device = device
                .as_deref()
                .zip(gpu_plan.as_ref())
                .map(|(d, g)| (d as &dyn Device, g));
            let (out, stats) = schedule::generate_blocks_on(
                &loaded.model,
                &backend,
                &prompt_ids,
                &config,
                &plan,
                &loaded.weights,
                device,
            )?;
            for note in &stats.notes {
                eprintln!("note: {note}");
            }
            block = Some(stats);
            out
        }
    };

    // Write through a handle so that a closed pipe (`executor ... | head`) is an error, not a panic.
    let mut stdout = std::io::stdout().lock();
    for (i, (prompt, new)) in prompt_ids.iter().zip(&out.tokens).enumerate() {
        let ids: Vec<String> = new.iter().map(u32::to_string).collect();
        writeln!(
            stdout,
            "[{i}] prompt: {} tokens; new ids: {}",
            prompt.len(),
            ids.join(",")
        )
        .context("cannot write to stdout")?;
        if let Some(t) = &loaded.tokenizer {
            let all: Vec<u32> = prompt.iter().chain(new).copied().collect();
            writeln!(stdout, "[{i}] text: {:?}", t.decode(&all)?)
                .context("cannot write to stdout")?;
        }
    }
    stdout.flush().context("cannot write to stdout")?;
    drop(stdout);
    let mut report = run::report(&loaded, &out, backend.name());
    if let (Some(p), Some(stats)) = (&policy, &block) {
        let (gbs, nb) = run::block_shape(
            prompt_ids.len(),
            p.batch.gpu_batch_size as usize,
            p.batch.num_gpu_batches as usize,
        );
        let run_policy = run::policy_for_run(p, out.padded_prompt_len, max_new_tokens, gbs, nb);
        let spec = &loaded.model.config().spec;
        let planned = planner::memory::plan_for_policy(spec, &run_policy, device.is_some());
        let Some((profile_name, profile)) = &profile else {
            bail!("internal: a policy run without a profile");
        };
        if let Some(measured_on) = &profile.profile.hardware {
            let gpu = executor::cuda::probe().ok().map(|info| info.name);
            let here = planner::host::hardware_fingerprint(gpu.as_deref());
            if *measured_on != here {
                eprintln!(
                    "warning: profile {profile_name} was measured on [{measured_on}], this host is \
                     [{here}]: the prediction describes the other machine"
                );
            }
        }
        let prediction = match planner::cost::evaluate(spec, profile, &run_policy) {
            Ok(pr) => Some(pr),
            Err(e) => {
                eprintln!("warning: no prediction: {e}");
                None
            }
        };
        run::add_tiers(
            &mut report,
            &cli.policy
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            spec,
            &run_policy,
            stats,
            &planned,
            prediction.as_ref().map(|pr| (profile_name.as_str(), pr)),
        );
    }
    // A closed stderr is not worth failing a finished run for.
    let _ = std::io::stderr().write_all(report.table().as_bytes());
    if let Some(path) = &cli.report {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write report {}", path.display()))?;
    }
    Ok(())
}
