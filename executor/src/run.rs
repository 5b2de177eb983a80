//! One executor run, from a policy and a model source to a report: the library side of the
//! command line, kept here so that it returns typed errors and can be tested without a process.

use crate::error::{ExecError, Result};
use crate::generate::GenerationOutput;
use crate::models::opt::{OptConfig, OptModel};
use crate::models::CausalLm;
use crate::report::{peak_rss_bytes, RunReport};
use crate::tokenizer::TextTokenizer;
use crate::weights::{ElementType, RandomStore, SafetensorsStore, WeightStore};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use planner::policy::Policy;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Refuses policies this build cannot run on this machine, with the reason and what to do.
///
/// The executor has only the CPU backend so far: GPU placement or a HeteGen split that sends work
/// to a GPU needs the CUDA backend (issue 6); disk tiers and compression need the offloading engine
/// (issue 4).
pub fn check_policy(policy: &Policy, shown: &str) -> Result<()> {
    if policy.needs_gpu() {
        return Err(ExecError::Unsupported(format!(
            "policy {shown} needs a GPU (it places tensors on the GPU or splits linear layers \
             between CPU and GPU), but the executor runs on the cpu backend only so far (the \
             cuda backend is issue 6); use an all-CPU policy (gpu = 0 everywhere, compute.split \
             = 1.0) or run without --policy"
        )));
    }
    let p = &policy.placement;
    for (row, placement) in [
        ("weights", p.weights),
        ("kv_cache", p.kv_cache),
        ("activations", p.activations),
    ] {
        if placement.disk > 0.0 {
            return Err(ExecError::Unsupported(format!(
                "policy {shown}: placement.{row}.disk = {} but disk placement is not supported \
                 yet (issue 4); keep {row} in CPU memory (cpu = 1.0)",
                placement.disk
            )));
        }
    }
    if policy.compression.weights || policy.compression.kv_cache {
        return Err(ExecError::Unsupported(format!(
            "policy {shown}: compression is not supported yet (issue 4); set \
             compression.weights and compression.kv_cache to false"
        )));
    }
    Ok(())
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

/// Opens or generates the weights, checks them against the config, and loads the tokenizer.
/// `show_progress` draws a progress bar on stderr (indicatif hides it when stderr is no terminal).
pub fn load(source: &ModelSource, show_progress: bool) -> Result<Loaded> {
    let started = Instant::now();
    let (model, tokenizer, name) = match source {
        ModelSource::Checkpoint(dir) => {
            let config = OptConfig::from_file(&dir.join("config.json"))?;
            let store = SafetensorsStore::open_dir(dir)?;
            let bar = progress_bar(store.total_bytes(), "reading weights", show_progress);
            store.preload(&|n| bar.inc(n));
            bar.finish_and_clear();
            let tokenizer = TextTokenizer::from_dir(dir, config.spec.bos_token_id)?;
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| dir.display().to_string());
            (OptModel::load(config, Box::new(store))?, tokenizer, name)
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
    Ok(Loaded {
        model,
        tokenizer,
        name,
        dtype,
        load_s: started.elapsed().as_secs_f64(),
    })
}

/// Memory the OS could give this process without swapping (MemAvailable), where it says.
fn available_memory_bytes() -> Option<u64> {
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
    fn policies_needing_gpu_disk_or_compression_are_refused_by_name() {
        let ok = Policy::all_cpu("opt-125m", 8, 4, 2);
        check_policy(&ok, "p.toml").unwrap();

        let mut gpu = ok.clone();
        gpu.placement.weights = planner::policy::Placement::ALL_GPU;
        let e = check_policy(&gpu, "p.toml").unwrap_err().to_string();
        assert!(e.contains("needs a GPU") && e.contains("p.toml"), "{e}");

        let mut disk = ok.clone();
        disk.placement.kv_cache.cpu = 0.5;
        disk.placement.kv_cache.disk = 0.5;
        let e = check_policy(&disk, "p.toml").unwrap_err().to_string();
        assert!(
            e.contains("placement.kv_cache.disk") && e.contains("issue 4"),
            "{e}"
        );

        let mut compressed = ok;
        compressed.compression.weights = true;
        let e = check_policy(&compressed, "p.toml").unwrap_err().to_string();
        assert!(e.contains("compression") && e.contains("issue 4"), "{e}");
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
