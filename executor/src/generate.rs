//! The generation loop: a left-padded batch of prompts, one prefill, then one decode step per new
//! token, greedy or sampled, each sequence stopping at EOS or its token budget.
//!
//! Every buffer (KV cache, activations, logits, sampling scratch, output token lists) is allocated
//! before the prefill; the decode loop allocates nothing.

use crate::backend::Backend;
use crate::error::{ExecError, Result};
use crate::models::{CausalLm, KvCache, Step};
use crate::rng::Rng;
use std::time::Instant;

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (the first one on ties, as `torch.argmax`).
    Greedy,
    /// A random draw after transformers' logits processors, in their order: temperature, then
    /// top-k, then top-p (nucleus).
    Sample {
        /// Logits are divided by it: below 1 sharpens, above 1 flattens the distribution.
        temperature: f32,
        /// Keep only the k most likely tokens (None: all).
        top_k: Option<usize>,
        /// Keep the smallest set of most likely tokens whose probability reaches p (None: all).
        top_p: Option<f32>,
        /// Seed of the draws, so that a run can be repeated exactly.
        seed: u64,
    },
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Token budget of each sequence.
    pub max_new_tokens: usize,
    /// Greedy or sampled.
    pub sampling: Sampling,
    /// Stop a sequence when it produces the model's EOS token (off for benchmarks that need a
    /// fixed number of tokens).
    pub stop_at_eos: bool,
}

/// What a generation produced and how long it took.
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    /// New tokens per sequence, including the EOS that ended it if any.
    pub tokens: Vec<Vec<u32>>,
    /// Logits of each prompt's last token, `[batch, vocab]`.
    pub prefill_logits: Vec<f32>,
    /// Logits of the last forward pass, `[batch, vocab]` (rows of finished sequences are stale).
    pub last_logits: Vec<f32>,
    /// Length of the padded prompts.
    pub padded_prompt_len: usize,
    /// Seconds spent in the prefill forward pass (and choosing the first tokens).
    pub prefill_s: f64,
    /// Seconds spent in decode steps.
    pub decode_s: f64,
    /// Decode steps run.
    pub decode_steps: usize,
    /// Bytes of the KV cache.
    pub kv_cache_bytes: u64,
}

impl GenerationOutput {
    /// Tokens produced by decode steps (every token but each sequence's first).
    pub fn decode_tokens(&self) -> usize {
        self.tokens.iter().map(|t| t.len().saturating_sub(1)).sum()
    }

    /// All new tokens.
    pub fn new_tokens(&self) -> usize {
        self.tokens.iter().map(Vec::len).sum()
    }
}

/// Checks a request against the model before any buffer is allocated.
pub fn check_request<M: CausalLm>(
    model: &M,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<()> {
    if prompts.is_empty() {
        return Err(ExecError::InvalidRequest("no prompts given".into()));
    }
    if cfg.max_new_tokens == 0 {
        return Err(ExecError::InvalidRequest(
            "max_new_tokens must be at least 1".into(),
        ));
    }
    if let Sampling::Sample {
        temperature,
        top_k,
        top_p,
        ..
    } = cfg.sampling
    {
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(ExecError::InvalidRequest(format!(
                "temperature is {temperature}; expected a positive number (use greedy for 0)"
            )));
        }
        if top_k == Some(0) {
            return Err(ExecError::InvalidRequest(
                "top-k is 0; expected at least 1".into(),
            ));
        }
        if let Some(p) = top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ExecError::InvalidRequest(format!(
                    "top-p is {p}; expected a value in (0, 1]"
                )));
            }
        }
    }
    let vocab = model.vocab_size();
    let max_positions = model.max_positions();
    for (index, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(ExecError::InvalidRequest(format!(
                "prompt {index} is empty"
            )));
        }
        if let Some(&id) = p.iter().find(|&&id| id as usize >= vocab) {
            return Err(ExecError::TokenOutOfRange { index, id, vocab });
        }
        // Every prompt token and every generated token but the last is fed to the model.
        let needed = p.len() + cfg.max_new_tokens - 1;
        if needed > max_positions {
            return Err(ExecError::PromptTooLong {
                index,
                prompt_tokens: p.len(),
                new_tokens: cfg.max_new_tokens,
                needed,
                max_positions,
            });
        }
    }
    Ok(())
}

/// A batch of prompts laid out left-padded for the prefill step, with the per-sequence state the
/// decode loop updates in place. Shared by the in-memory loop and the block schedule.
pub(crate) struct PromptLayout {
    /// `[batch, padded]` token ids, `pad` before each prompt.
    pub step_tokens: Vec<u32>,
    /// `[batch, padded]` positions (0 for padding).
    pub step_positions: Vec<u32>,
    /// `[batch, max_len]`: whether each cache position holds a real token.
    pub key_valid: Vec<bool>,
    /// Real tokens so far per sequence: the next token's position.
    pub seen: Vec<u32>,
}

impl PromptLayout {
    /// Lays out `prompts` right-aligned in `padded` columns, with room for `max_len` positions.
    pub(crate) fn new(prompts: &[Vec<u32>], padded: usize, max_len: usize, pad: u32) -> Self {
        let batch = prompts.len();
        let mut layout = PromptLayout {
            step_tokens: vec![pad; batch * padded],
            step_positions: vec![0; batch * padded],
            key_valid: vec![false; batch * max_len],
            seen: vec![0; batch],
        };
        for (b, prompt) in prompts.iter().enumerate() {
            let offset = padded - prompt.len();
            for (i, &id) in prompt.iter().enumerate() {
                layout.step_tokens[b * padded + offset + i] = id;
                layout.step_positions[b * padded + offset + i] = i as u32;
                layout.key_valid[b * max_len + offset + i] = true;
            }
            layout.seen[b] = prompt.len() as u32;
        }
        layout
    }
}

/// Generates continuations of `prompts` (token ids) as one batch.
pub fn generate<M: CausalLm>(
    model: &M,
    backend: &dyn Backend,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<GenerationOutput> {
    check_request(model, prompts, cfg)?;
    // Run the loop on a rayon worker thread. Parallel kernels called from outside the pool inject
    // each job through rayon's global queue, which allocates a block every 63 jobs and wakes a
    // sleeping worker per call; from a worker, jobs go onto its own deque.
    rayon::scope(|_| generate_in_pool(model, backend, prompts, cfg))
}

fn generate_in_pool<M: CausalLm>(
    model: &M,
    backend: &dyn Backend,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<GenerationOutput> {
    let batch = prompts.len();
    let vocab = model.vocab_size();
    let padded = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_len = padded + cfg.max_new_tokens - 1;
    let pad = model.pad_token_id();
    let eos = model.eos_token_id();

    // All buffers, for prefill and decode alike.
    let mut kv = KvCache::new(
        model.num_layers(),
        batch,
        max_len,
        model.kv_width(),
        model.kv_dtype(),
    );
    let mut ws = model.workspace(batch, padded, max_len);
    let mut logits = vec![0.0f32; batch * vocab];
    let mut sampler = Sampler::new(cfg.sampling, vocab);
    let mut tokens_out: Vec<Vec<u32>> = (0..batch)
        .map(|_| Vec::with_capacity(cfg.max_new_tokens))
        .collect();
    let mut finished = vec![false; batch];
    // Prefill: the left-padded prompts.
    let started = Instant::now();
    let PromptLayout {
        mut step_tokens,
        mut step_positions,
        mut key_valid,
        mut seen,
    } = PromptLayout::new(prompts, padded, max_len, pad);
    model.forward(
        backend,
        &Step {
            batch,
            new_tokens: padded,
            tokens: &step_tokens,
            positions: &step_positions,
            start: 0,
            key_valid: &key_valid,
        },
        &mut kv,
        &mut ws,
        &mut logits,
    );
    for b in 0..batch {
        let next = sampler.choose(&logits[b * vocab..(b + 1) * vocab]);
        tokens_out[b].push(next);
        finished[b] = (cfg.stop_at_eos && next == eos) || cfg.max_new_tokens == 1;
    }
    let prefill_logits = logits.clone();
    let prefill_s = started.elapsed().as_secs_f64();

    // Decode: one token per unfinished sequence per step.
    let started = Instant::now();
    let mut steps = 0;
    let mut position = padded;
    while finished.iter().any(|f| !f) {
        for b in 0..batch {
            // Finished sequences are fed padding and their outputs ignored; the batch keeps its
            // shape so no buffer changes size.
            step_tokens[b] = if finished[b] {
                pad
            } else {
                *tokens_out[b].last().unwrap_or(&pad)
            };
            step_positions[b] = seen[b];
            key_valid[b * max_len + position] = !finished[b];
            seen[b] += 1;
        }
        model.forward(
            backend,
            &Step {
                batch,
                new_tokens: 1,
                tokens: &step_tokens[..batch],
                positions: &step_positions[..batch],
                start: position,
                key_valid: &key_valid,
            },
            &mut kv,
            &mut ws,
            &mut logits,
        );
        position += 1;
        steps += 1;
        for b in 0..batch {
            if finished[b] {
                continue;
            }
            let next = sampler.choose(&logits[b * vocab..(b + 1) * vocab]);
            tokens_out[b].push(next);
            finished[b] =
                (cfg.stop_at_eos && next == eos) || tokens_out[b].len() >= cfg.max_new_tokens;
        }
    }
    let decode_s = started.elapsed().as_secs_f64();

    Ok(GenerationOutput {
        tokens: tokens_out,
        prefill_logits,
        last_logits: logits,
        padded_prompt_len: padded,
        prefill_s,
        decode_s,
        decode_steps: steps,
        kv_cache_bytes: kv.bytes(),
    })
}

/// Chooses tokens from logits; owns its scratch so that choosing allocates nothing.
pub struct Sampler {
    sampling: Sampling,
    rng: Rng,
    /// Candidate token ids, best first after filtering.
    order: Vec<u32>,
    /// Probabilities of the candidates in `order`.
    probs: Vec<f32>,
}

impl Sampler {
    /// A sampler for a vocabulary of `vocab` tokens.
    pub fn new(sampling: Sampling, vocab: usize) -> Sampler {
        let seed = match sampling {
            Sampling::Sample { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        Sampler {
            sampling,
            rng: Rng::new(seed),
            order: Vec::with_capacity(vocab),
            probs: Vec::with_capacity(vocab),
        }
    }

    /// The next token for one sequence's logits.
    pub fn choose(&mut self, logits: &[f32]) -> u32 {
        match self.sampling {
            Sampling::Greedy => argmax(logits),
            Sampling::Sample {
                temperature,
                top_k,
                top_p,
                ..
            } => self.sample(logits, temperature, top_k, top_p),
        }
    }

    fn sample(
        &mut self,
        logits: &[f32],
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
    ) -> u32 {
        let by_logit_desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        self.order.clear();
        self.order.extend(0..logits.len() as u32);
        let mut keep = logits.len();
        if let Some(k) = top_k.filter(|&k| k < logits.len()) {
            self.order.select_nth_unstable_by(k - 1, by_logit_desc);
            keep = k;
        }
        let candidates = &mut self.order[..keep];
        if top_p.is_some() {
            candidates.sort_unstable_by(by_logit_desc);
        }
        // Softmax over the candidates at this temperature.
        let max = candidates
            .iter()
            .map(|&i| logits[i as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        self.probs.clear();
        let mut total = 0.0f64;
        for &i in candidates.iter() {
            let p = ((logits[i as usize] - max) / temperature).exp();
            self.probs.push(p);
            total += p as f64;
        }
        if let Some(p) = top_p {
            // Smallest prefix (candidates are sorted) whose mass reaches p; at least one token.
            let mut cumulative = 0.0f64;
            let mut cut = keep;
            for (n, &q) in self.probs.iter().enumerate() {
                cumulative += q as f64 / total;
                if cumulative >= p as f64 {
                    cut = n + 1;
                    break;
                }
            }
            keep = cut;
            total = self.probs[..keep].iter().map(|&q| q as f64).sum();
        }
        let mut target = self.rng.next_f64() * total;
        for n in 0..keep {
            target -= self.probs[n] as f64;
            if target < 0.0 {
                return self.order[n];
            }
        }
        self.order[keep - 1]
    }
}

/// Index of the largest value, the first on ties; NaN never wins.
pub use crate::kernels::argmax;

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_k: Option<usize>, top_p: Option<f32>) -> Sampler {
        Sampler::new(
            Sampling::Sample {
                temperature,
                top_k,
                top_p,
                seed: 42,
            },
            8,
        )
    }

    fn histogram(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<usize> {
        let mut h = vec![0; logits.len()];
        for _ in 0..n {
            h[s.choose(logits) as usize] += 1;
        }
        h
    }

    #[test]
    fn argmax_takes_the_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5]), 1);
    }

    #[test]
    fn sampling_follows_the_softmax() {
        let logits = [0.0, 1.0f32.ln(), 2.0f32.ln(), 3.0f32.ln()];
        // Probabilities 1/7, 1/7, 2/7, 3/7.
        let h = histogram(&mut sampler(1.0, None, None), &logits, 70_000);
        for (count, expected) in h.iter().zip([10_000, 10_000, 20_000, 30_000]) {
            assert!((*count as i64 - expected).abs() < 800, "{h:?}");
        }
    }

    #[test]
    fn top_k_and_top_p_drop_the_tail() {
        let logits = [0.0, 1.0f32.ln(), 2.0f32.ln(), 3.0f32.ln()];
        let h = histogram(&mut sampler(1.0, Some(2), None), &logits, 10_000);
        assert_eq!((h[0], h[1]), (0, 0), "{h:?}");
        assert!(h[2] > 3000 && h[3] > 5000, "{h:?}");
        // p = 0.5: 3/7 < 0.5 so tokens 3 and 2 are kept (5/7), nothing else.
        let h = histogram(&mut sampler(1.0, None, Some(0.5)), &logits, 10_000);
        assert_eq!((h[0], h[1]), (0, 0), "{h:?}");
        // p small: only the best token.
        let h = histogram(&mut sampler(1.0, None, Some(0.1)), &logits, 1_000);
        assert_eq!(h[3], 1_000, "{h:?}");
    }

    #[test]
    fn low_temperature_approaches_greedy_and_seed_reproduces() {
        let logits = [0.1, 0.3, 0.2, 0.0];
        let h = histogram(&mut sampler(0.01, None, None), &logits, 1_000);
        assert_eq!(h[1], 1_000, "{h:?}");
        let a: Vec<u32> = {
            let mut s = sampler(1.0, None, None);
            (0..20).map(|_| s.choose(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = sampler(1.0, None, None);
            (0..20).map(|_| s.choose(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().any(|&t| t != a[0]), "{a:?}");
    }
}
