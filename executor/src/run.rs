//! One executor run, from a policy and a model source to a report: the library side of the
//! command line, kept here so that it returns typed errors and can be tested without a process.

use crate::error::{ExecError, Result};
use crate::generate::GenerationOutput;
use crate::models::opt::{OptConfig, OptModel};
use crate::models::CausalLm;
use crate::report::{peak_rss_bytes, RunReport};
use crate::tokenizer::TextTokenizer;
use crate::weights::{ElementType, RandomStore, SafetensorsStore};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use planner::policy::Policy;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Refuses policies this build cannot run, with the reason and what to do.
///
/// GPU placement is checked separately, where the backend is chosen
/// ([`crate::cuda::require_gpu_for`]): on a host without a GPU that refusal names the missing
/// device. Disk placement of weights, KV cache and activations runs through the block schedule
/// ([`crate::schedule`]); 4-bit compression is not wired into it yet.
pub fn check_policy(policy: &Policy, shown: &str) -> Result<()> {
    if policy.compression.kv_cache && policy.placement.kv_cache.disk > 0.0 {
        return Err(ExecError::Unsupported(format!(
            "policy {shown}: compression.kv_cache with placement.kv_cache.disk = {} is not \
             supported (the disk-resident cache is stored in f32); keep the cache in CPU memory \
             or set compression.kv_cache = false",
            policy.placement.kv_cache.disk
        )));
    }
    if policy.compression.weights && policy.placement.weights.disk > 0.0 {
        return Err(ExecError::Unsupported(format!(
            "policy {shown}: compression.weights with placement.weights.disk = {} would need a \
             compressed copy of the checkpoint on disk, which the executor does not write (it \
             reads checkpoints in place); keep the weights in CPU memory or turn compression off",
            policy.placement.weights.disk
        )));
    }
    Ok(())
}

/// Compresses the model's layer matrices to 4 bits for a policy with `compression.weights`
/// (CPU-resident weights only; [`check_policy`] refuses the disk case).
pub fn compress_weights(loaded: &mut Loaded) -> Result<()> {
    let c = crate::schedule::CompressedLayers::from_model(&loaded.model)?;
    loaded.weights.compressed = Some(std::sync::Arc::new(c));
    Ok(())
}

/// The policy as it applies to this run: the prompt length, generation length and block shape
/// actually used, so that the memory plan and the prediction describe the run, not the workload the
/// policy was solved for.
pub fn policy_for_run(
    policy: &Policy,
    prompt_len: usize,
    gen_len: usize,
    gpu_batch_size: usize,
    num_gpu_batches: usize,
) -> Policy {
    let mut p = policy.clone();
    p.workload.prompt_len = prompt_len as u64;
    p.workload.gen_len = gen_len as u64;
    p.batch.gpu_batch_size = gpu_batch_size as u64;
    p.batch.num_gpu_batches = num_gpu_batches as u64;
    p
}

/// Block shape for `prompts` sequences under a policy's (gbs, nb): nb batches of at least gbs
/// sequences, the last possibly partly filled.
pub fn block_shape(
    prompts: usize,
    gpu_batch_size: usize,
    num_gpu_batches: usize,
) -> (usize, usize) {
    let gbs = gpu_batch_size
        .max(1)
        .max(prompts.div_ceil(num_gpu_batches.max(1)));
    (gbs, prompts.div_ceil(gbs).max(1))
}

/// Checks, before loading, that the host has the CPU memory the planner's memory plan gives the
/// policy (the same plan the planner's memory constraints use: one function, in
/// `planner::memory`). Returns the plan's CPU bytes.
pub fn check_memory(model: &planner::model::ModelSpec, policy: &Policy) -> Result<f64> {
    let plan = planner::memory::plan_for_policy(model, policy, false);
    let needed = plan.cpu.total();
    if let Some(available) = available_memory_bytes() {
        if needed > available as f64 {
            let gib = (1u64 << 30) as f64;
            let mut items: Vec<(&str, f64)> =
                plan.cpu.items().into_iter().filter(|i| i.1 > 0.0).collect();
            items.sort_by(|a, b| b.1.total_cmp(&a.1));
            let detail = items
                .iter()
                .take(4)
                .map(|(n, b)| format!("{n} {:.3} GiB", b / gib))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(ExecError::OutOfMemory {
                needed_gib: needed / gib,
                available_gib: available as f64 / gib,
                detail,
            });
        }
    }
    Ok(needed)
}

/// Where the weights come from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A Hugging Face OPT directory (config.json + safetensors, tokenizer files optional).
    Checkpoint(PathBuf),
    /// Seeded random weights of the given structure.
    Random {
        /// Structure of the model.
        config: OptConfig,
        /// Element type the matrices are generated in.
        dtype: ElementType,
        /// Seed of the weights.
        seed: u64,
    },
}

/// A model ready to run.
pub struct Loaded {
    /// The model, its weights checked against its config.
    pub model: OptModel,
    /// The checkpoint's tokenizer, when it ships one.
    pub tokenizer: Option<TextTokenizer>,
    /// Name for reports (the directory name or the built-in name).
    pub name: String,
    /// Element type of the weight matrices.
    pub dtype: ElementType,
    /// Seconds spent loading.
    pub load_s: f64,
    /// Which matrices are read from disk (none unless a policy puts weights there).
    pub weights: crate::schedule::WeightPlacement,
}

fn progress_bar(total: u64, message: &str, show: bool) -> ProgressBar {
    let target = if show {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(total), target);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// Packs the bf16 matrices held in memory into the CPU kernels' panels when this CPU prefers
/// them ([`crate::kernels::prefers_panels`]), for runs whose products all run on the CPU (no
/// device, no 4-bit copies): batched decode and prefill products then skip the horizontal sums
/// and the per-call repacking. Returns the bytes packed (0 when nothing was).
pub fn pack_for_cpu(loaded: &mut Loaded, show_progress: bool) -> u64 {
    if !crate::kernels::prefers_panels()
        || loaded.dtype != ElementType::Bf16
        || loaded.weights.compressed.is_some()
    {
        return 0;
    }
    let started = Instant::now();
    let total = loaded.model.store().total_bytes() - loaded.weights.disk_bytes;
    let bar = progress_bar(total, "packing weights for the CPU kernels", show_progress);
    let packed = loaded
        .model
        .pack_panels(&loaded.weights.on_disk, &|n| bar.inc(n));
    bar.finish_and_clear();
    loaded.load_s += started.elapsed().as_secs_f64();
    packed
}

/// Opens or generates the weights, checks them against the config, and loads the tokenizer.
/// `show_progress` draws a progress bar on stderr (indicatif hides it when stderr is no terminal).
pub fn load(source: &ModelSource, show_progress: bool) -> Result<Loaded> {
    load_placed(source, show_progress, 0.0)
}

/// [`load`] with a share `weights_disk` of the decoder layers' matrices left on disk: those are
/// never faulted in through the memory map (the block schedule reads them with direct I/O), the
/// rest are. Random weights have no file to read from, so they refuse a disk share.
pub fn load_placed(source: &ModelSource, show_progress: bool, weights_disk: f64) -> Result<Loaded> {
    let started = Instant::now();
    if weights_disk > 0.0 {
        if let ModelSource::Random { .. } = source {
            return Err(ExecError::Unsupported(format!(
                "placement.weights.disk = {weights_disk} needs a checkpoint to read the weights \
                 from (--model DIR); random weights exist only in memory. Write the random \
                 checkpoint once (scripts/bench-offload*.sh does) or keep weights on the CPU"
            )));
        }
    }
    let mut placement = None;
    let (model, tokenizer, name) = match source {
        ModelSource::Checkpoint(dir) => {
            let config = OptConfig::from_file(&dir.join("config.json"))?;
            let store = SafetensorsStore::open_dir(dir)?;
            let model = OptModel::load(config, Box::new(store))?;
            let placed = crate::schedule::place_weights(&model, weights_disk);
            let store = model.store();
            let disk: std::collections::HashSet<usize> = (0..placed.on_disk.len())
                .flat_map(|l| {
                    model
                        .layer_weight_ids(l)
                        .into_iter()
                        .zip(placed.on_disk[l])
                        .filter(|(_, d)| *d)
                        .map(|(id, _)| id.index())
                })
                .collect();
            let bar = progress_bar(
                store.total_bytes() - placed.disk_bytes,
                "reading weights",
                show_progress,
            );
            store.preload_only(&|id| !disk.contains(&id.index()), &|n| bar.inc(n));
            bar.finish_and_clear();
            placement = Some(placed);
            let tokenizer = TextTokenizer::from_dir(dir, model.config().spec.bos_token_id)?;
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| dir.display().to_string());
            (model, tokenizer, name)
        }
        ModelSource::Random {
            config,
            dtype,
            seed,
        } => {
            let layout = config.random_layout();
            let total: u64 = layout
                .iter()
                .map(|t| (t.shape.iter().product::<usize>() * dtype.size()) as u64)
                .sum();
            if let Some(available) = available_memory_bytes() {
                if total > available {
                    let hint = if *dtype == ElementType::F32 {
                        "pick a smaller model or a 16-bit --dtype"
                    } else {
                        "pick a smaller model"
                    };
                    return Err(ExecError::InvalidRequest(format!(
                        "random {} weights of {} take {:.1} GiB but only {:.1} GiB of memory is \
                         available; {hint}",
                        format!("{dtype:?}").to_lowercase(),
                        config.spec.name,
                        total as f64 / (1u64 << 30) as f64,
                        available as f64 / (1u64 << 30) as f64
                    )));
                }
            }
            let bar = progress_bar(total, "generating random weights", show_progress);
            let store = RandomStore::generate(&layout, *dtype, *seed, &|n| bar.inc(n));
            bar.finish_and_clear();
            let name = config.spec.name.clone();
            (OptModel::load(config.clone(), Box::new(store))?, None, name)
        }
    };
    let dtype = model.matrix_dtype();
    let weights = placement.unwrap_or_else(|| crate::schedule::place_weights(&model, 0.0));
    Ok(Loaded {
        model,
        tokenizer,
        name,
        dtype,
        load_s: started.elapsed().as_secs_f64(),
        weights,
    })
}

/// Memory the OS could give this process without swapping (MemAvailable), where it says.
pub fn available_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A prompt as given on the command line.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text, tokenized with the model's tokenizer (BOS first).
    Text(String),
    /// Token ids, used as given.
    Ids(Vec<u32>),
}

/// Parses a comma-separated list of token ids ("2, 100,7").
pub fn parse_prompt_ids(text: &str) -> Result<Vec<u32>> {
    let ids: Result<Vec<u32>> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>().map_err(|_| {
                ExecError::InvalidRequest(format!(
                    "--prompt-ids {text:?}: '{s}' is not a token id (expected comma-separated \
                     non-negative integers)"
                ))
            })
        })
        .collect();
    let ids = ids?;
    if ids.is_empty() {
        return Err(ExecError::InvalidRequest(format!(
            "--prompt-ids {text:?} holds no token ids"
        )));
    }
    Ok(ids)
}

/// Reads a prompt file: one prompt per non-empty line.
pub fn read_prompt_file(path: &Path) -> Result<Vec<Prompt>> {
    let text = std::fs::read_to_string(path).map_err(|e| ExecError::io(path, e))?;
    let prompts: Vec<Prompt> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Prompt::Text(l.to_string()))
        .collect();
    if prompts.is_empty() {
        return Err(ExecError::InvalidRequest(format!(
            "prompt file {} has no non-empty lines",
            path.display()
        )));
    }
    Ok(prompts)
}

/// Turns prompts into token ids, tokenizing text with the model's tokenizer.
pub fn tokenize_prompts(
    prompts: &[Prompt],
    tokenizer: Option<&TextTokenizer>,
) -> Result<Vec<Vec<u32>>> {
    prompts
        .iter()
        .map(|p| match p {
            Prompt::Ids(ids) => Ok(ids.clone()),
            Prompt::Text(text) => match tokenizer {
                Some(t) => t.encode(text),
                None => Err(ExecError::InvalidRequest(format!(
                    "text prompt {text:?} needs a tokenizer, but the model has none \
                     (tokenizer.json, or vocab.json + merges.txt, in the model directory); \
                     pass token ids with --prompt-ids instead"
                ))),
            },
        })
        .collect()
}

/// Seeded random prompts for benchmarks: BOS, then ids drawn from the non-special vocabulary.
pub fn random_prompts(
    batch: usize,
    len: usize,
    vocab: usize,
    bos: u32,
    seed: u64,
) -> Vec<Vec<u32>> {
    let mut rng = crate::rng::Rng::new(crate::rng::mix(seed, 0x70_72_6f_6d_70_74));
    let first_ordinary = 4.min(vocab as u32 - 1);
    (0..batch)
        .map(|_| {
            let mut p = Vec::with_capacity(len);
            p.push(bos);
            while p.len() < len {
                p.push(rng.range_u32(first_ordinary, vocab as u32));
            }
            p
        })
        .collect()
}

/// Builds the report of a finished generation.
pub fn report(loaded: &Loaded, out: &GenerationOutput, backend: &str) -> RunReport {
    let batch = out.tokens.len();
    let per_s = |n: f64, s: f64| if s > 0.0 { n / s } else { 0.0 };
    let weight_bytes_per_step = loaded.model.weight_bytes();
    RunReport {
        model: loaded.name.clone(),
        backend: backend.to_string(),
        weights_dtype: format!("{:?}", loaded.dtype).to_lowercase(),
        threads: rayon::current_num_threads(),
        batch_size: batch,
        prompt_len: out.padded_prompt_len,
        new_tokens: out.tokens.iter().map(Vec::len).max().unwrap_or(0),
        generated_tokens: out.new_tokens(),
        load_s: loaded.load_s,
        prefill_s: out.prefill_s,
        decode_s: out.decode_s,
        decode_steps: out.decode_steps,
        prefill_tokens_per_s: per_s((batch * out.padded_prompt_len) as f64, out.prefill_s),
        decode_tokens_per_s: per_s(out.decode_tokens() as f64, out.decode_s),
        total_tokens_per_s: per_s(out.new_tokens() as f64, out.prefill_s + out.decode_s),
        weight_bytes: loaded.model.store().total_bytes(),
        weight_bytes_per_step,
        decode_weight_bandwidth_bytes_per_s: per_s(
            (weight_bytes_per_step as usize * out.decode_steps) as f64,
            out.decode_s,
        ),
        kv_cache_bytes: out.kv_cache_bytes,
        peak_rss_bytes: peak_rss_bytes(),
        decode_s_per_token: if out.decode_steps > 0 {
            out.decode_s / out.decode_steps as f64
        } else {
            0.0
        },
        tiers: Default::default(),
    }
}

/// Adds a block run's channels, memory and the planner's prediction to a report.
pub fn add_tiers(
    report: &mut RunReport,
    shown: &str,
    spec: &planner::model::ModelSpec,
    policy: &Policy,
    stats: &crate::schedule::ChannelStats,
    planned: &planner::memory::MemoryPlan,
    prediction: Option<(&str, &planner::cost::Prediction)>,
) {
    let layers = spec.num_layers;
    let (read_bytes, read_busy) = stats.disk_read();
    let t = &mut report.tiers;
    t.policy = Some(shown.to_string());
    t.model_spec = Some(spec.clone());
    t.gpu_batch_size = policy.batch.gpu_batch_size as usize;
    t.num_gpu_batches = policy.batch.num_gpu_batches as usize;
    t.cpu_attention = Some(policy.compute.cpu_attention);
    t.weights_disk_bytes_per_step = stats.weight_disk_bytes_per_step;
    t.weight_staging_bytes = stats.weight_staging_bytes;
    t.kv_disk_sequences = stats.kv_disk_sequences;
    t.disk_read_bytes = read_bytes;
    t.disk_read_busy_s = read_busy;
    t.disk_write_bytes = stats.cache.write_bytes;
    t.disk_write_busy_s = stats.cache.write_busy_s;
    if let Some(d) = &stats.disk_device {
        t.disk_device = Some(d.name.clone());
        t.device_prefill_read_bytes = Some(d.prefill.read_bytes);
        t.device_prefill_busy_s = Some(d.prefill.busy_s);
        t.device_decode_read_bytes = Some(d.decode.read_bytes);
        t.device_decode_busy_s = Some(d.decode.busy_s);
    }
    t.cpu_compute_busy_s = stats.cpu_compute_s;
    t.io_wait_s = stats.io_wait_s;
    t.prefill_compute_s = stats.prefill_compute_s;
    t.decode_compute_s = stats.cpu_compute_s - stats.prefill_compute_s;
    t.policy_as_run = Some(policy.clone());
    t.offload_dir_bytes = stats.offload_bytes;
    t.planned_cpu_bytes = Some(planned.cpu.total());
    if let Some(d) = &stats.device {
        t.device = Some(d.clone());
        t.planned_gpu_bytes = Some(planned.gpu.total());
    }
    t.planned_disk_bytes = Some(planned.disk.total());
    if let Some((name, p)) = prediction {
        let ratio = |m: f64, p: f64| (p > 0.0 && m > 0.0).then(|| m / p);
        t.profile = Some(name.to_string());
        t.predicted_prefill_s = Some(p.prefill_s);
        t.predicted_decode_s_per_token = Some(p.decode_s_per_token);
        t.predicted_total_tokens_per_s = Some(p.throughput_tok_s);
        t.predicted_decode_disk_s = Some((p.decode.dtoc_s + p.decode.ctod_s) * layers as f64);
        t.ratio_prefill = ratio(report.prefill_s, p.prefill_s);
        t.ratio_decode_per_token = ratio(report.decode_s_per_token, p.decode_s_per_token);
        t.ratio_throughput = ratio(report.total_tokens_per_s, p.throughput_tok_s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_ids_parse_and_reject_garbage() {
        assert_eq!(parse_prompt_ids("2, 100,7").unwrap(), vec![2, 100, 7]);
        let e = parse_prompt_ids("2,x").unwrap_err().to_string();
        assert!(e.contains("'x' is not a token id"), "{e}");
        assert!(parse_prompt_ids(" , ").is_err());
        assert!(parse_prompt_ids("-1").is_err());
    }

    #[test]
    fn only_compression_is_refused_by_check_policy() {
        let ok = Policy::all_cpu("opt-125m", 8, 4, 2);
        check_policy(&ok, "p.toml").unwrap();
        let mut disk = ok.clone();
        disk.placement.kv_cache.cpu = 0.5;
        disk.placement.kv_cache.disk = 0.5;
        check_policy(&disk, "p.toml").unwrap();
        let mut compressed = ok;
        compressed.compression.weights = true;
        check_policy(&compressed, "p.toml").unwrap();
        compressed.placement.weights.cpu = 0.5;
        compressed.placement.weights.disk = 0.5;
        let e = check_policy(&compressed, "p.toml").unwrap_err().to_string();
        assert!(
            e.contains("compression.weights") && e.contains("p.toml"),
            "{e}"
        );
        let mut kv = Policy::all_cpu("opt-125m", 8, 4, 2);
        kv.compression.kv_cache = true;
        check_policy(&kv, "p.toml").unwrap();
        kv.placement.kv_cache.cpu = 0.5;
        kv.placement.kv_cache.disk = 0.5;
        let e = check_policy(&kv, "p.toml").unwrap_err().to_string();
        assert!(e.contains("compression.kv_cache"), "{e}");
    }

    #[test]
    fn a_plan_larger_than_the_host_is_refused_with_the_numbers() {
        let spec = planner::model::ModelSpec::builtin("opt-175b").unwrap();
        let policy = Policy::all_cpu("opt-175b", 512, 32, 8);
        let e = check_memory(&spec, &policy).unwrap_err().to_string();
        assert!(
            e.contains("GiB of CPU memory")
                && e.contains("weights_home")
                && e.contains("available"),
            "{e}"
        );
        let small = planner::model::ModelSpec::builtin("opt-125m").unwrap();
        let policy = Policy::all_cpu("opt-125m", 8, 4, 1);
        assert!(check_memory(&small, &policy).unwrap() > 0.0);
    }

    #[test]
    fn block_shape_covers_every_prompt() {
        assert_eq!(block_shape(4, 2, 2), (2, 2));
        assert_eq!(block_shape(3, 2, 2), (2, 2));
        assert_eq!(block_shape(3, 1, 3), (1, 3));
        assert_eq!(block_shape(5, 1, 2), (3, 2));
        assert_eq!(block_shape(1, 4, 2), (4, 1));
    }

    #[test]
    fn random_prompts_start_with_bos_and_avoid_special_tokens() {
        let p = random_prompts(3, 10, 50, 2, 1);
        assert_eq!(p.len(), 3);
        for row in &p {
            assert_eq!(row.len(), 10);
            assert_eq!(row[0], 2);
            assert!(row[1..].iter().all(|&t| (4..50).contains(&t)));
        }
        assert_ne!(p[0], p[1]);
        assert_eq!(p, random_prompts(3, 10, 50, 2, 1));
    }
}
