//! Drift of 4-bit weight compression (policy `compression.weights`) on the fixture models: the
//! relative error of the prefill logits against the uncompressed run, greedy-token agreement, and
//! the perplexity of a paragraph of text under both. Writes the table of docs/compression.md.
//!
//! cargo run --release -p executor --example compression_drift

use executor::backend::CpuBackend;
use executor::generate::{GenerationConfig, Sampling};
use executor::run::{self, ModelSource};
use executor::schedule::{generate_blocks, BlockPlan, CompressedLayers, WeightPlacement};
use std::path::PathBuf;
use std::sync::Arc;

const TEXT: &str = "The history of computing is a story of machines that grew smaller and faster \
while the problems they were asked to solve grew larger. Early computers filled rooms and were \
programmed by rewiring them; today a phone holds more memory than every computer of 1970 \
together. Language models follow the same path: they are trained on large clusters, and people \
then try to run them on the hardware they have.";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn logits(
    loaded: &run::Loaded,
    weights: &WeightPlacement,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    compress_kv: bool,
) -> (Vec<f32>, Vec<Vec<u32>>) {
    let plan = BlockPlan {
        gpu_batch_size: prompts.len(),
        num_gpu_batches: 1,
        weights_disk: 0.0,
        kv_cache_disk: 0.0,
        activations_disk: 0.0,
        cpu_attention: true,
        offload_parent: std::env::temp_dir(),
        offload_capacity_limit: None,
        compress_kv,
    };
    let cfg = GenerationConfig {
        max_new_tokens: new_tokens,
        sampling: Sampling::Greedy,
        stop_at_eos: false,
    };
    let (out, _) = generate_blocks(&loaded.model, &CpuBackend, prompts, &cfg, &plan, weights)
        .expect("generation");
    (out.prefill_logits, out.tokens)
}

fn log_softmax_at(row: &[f32], index: usize) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    row[index] as f64 - max - sum.ln()
}

fn main() {
    // One matrix product, dense vs 4-bit, on random inputs: the per-product error that the model
    // compounds.
    for name in ["opt-tiny-preln", "opt-tiny-postln"] {
        let loaded = run::load(&ModelSource::Checkpoint(fixture(name)), false).expect("load");
        let q = loaded.model.compress_layer(0).expect("compress");
        let mats = loaded.model.store_matrices(0);
        let w = &mats.fc1;
        let x: Vec<f32> = (0..4 * w.in_features)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let mut yd = vec![0.0; 4 * w.out_features];
        let mut yq = yd.clone();
        executor::kernels::linear(&x, 4, w, None, &mut yd);
        executor::quant::linear_q4(&x, 4, &q[4], None, &mut yq);
        let num: f32 = yd.iter().zip(&yq).map(|(a, b)| (a - b).powi(2)).sum();
        let den: f32 = yd.iter().map(|a| a * a).sum();
        println!(
            "{name}: layer 0 fc1 ({} x {}), one product: relative L2 error {:.4}",
            w.out_features,
            w.in_features,
            (num / den).sqrt()
        );
    }
    println!();
    println!("| fixture | compressed | logits rel. L2 error (mean / max over prefixes) | greedy tokens equal (16 new, 4 prompts) | perplexity dense | perplexity 4-bit | change |");
    println!("|---|---|---|---|---|---|---|");
    for name in ["opt-tiny-preln", "opt-tiny-postln"] {
        let loaded = run::load(&ModelSource::Checkpoint(fixture(name)), false).expect("load");
        let tok = loaded.tokenizer.as_ref().expect("fixture tokenizer");
        let mut ids = tok.encode(TEXT).expect("tokenize");
        // The fixtures have 128 positions: keep 100 tokens of the paragraph.
        ids.truncate(100);
        let vocab = loaded.model.config().spec.vocab_size as usize;
        let dense = loaded.weights.clone();
        let mut q4 = loaded.weights.clone();
        q4.compressed = Some(Arc::new(
            CompressedLayers::from_model(&loaded.model).expect("compress"),
        ));
        // Every prefix as one sequence of a batch: logits for the next token of each.
        let prefixes: Vec<Vec<u32>> = (1..ids.len()).map(|t| ids[..t].to_vec()).collect();
        let prompts: Vec<Vec<u32>> = (0..4).map(|i| ids[..3 + 5 * i].to_vec()).collect();
        let (ld, _) = logits(&loaded, &dense, &prefixes, 1, false);
        let (_, td) = logits(&loaded, &dense, &prompts, 16, false);
        for (what, weights, kv) in [
            ("weights", &q4, false),
            ("KV cache", &dense, true),
            ("both", &q4, true),
        ] {
            let (lq, _) = logits(&loaded, weights, &prefixes, 1, kv);
            let (mut nll_d, mut nll_q, mut errs) = (0.0, 0.0, Vec::new());
            for (p, prefix) in prefixes.iter().enumerate() {
                let next = ids[prefix.len()] as usize;
                let (rd, rq) = (
                    &ld[p * vocab..(p + 1) * vocab],
                    &lq[p * vocab..(p + 1) * vocab],
                );
                nll_d -= log_softmax_at(rd, next);
                nll_q -= log_softmax_at(rq, next);
                let num: f64 = rd
                    .iter()
                    .zip(rq)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum();
                let den: f64 = rd.iter().map(|a| (*a as f64).powi(2)).sum();
                errs.push((num / den).sqrt());
            }
            let n = prefixes.len() as f64;
            let (ppl_d, ppl_q) = ((nll_d / n).exp(), (nll_q / n).exp());
            let mean = errs.iter().sum::<f64>() / n;
            let max = errs.iter().fold(0.0f64, |a, &b| a.max(b));
            let (_, tq) = logits(&loaded, weights, &prompts, 16, kv);
            let same: usize = td
                .iter()
                .zip(&tq)
                .map(|(a, b)| a.iter().zip(b).take_while(|(x, y)| x == y).count())
                .sum();
            println!(
                "| {name} ({} text tokens) | {what} | {mean:.4} / {max:.4} | {same} of {} | {ppl_d:.2} | {ppl_q:.2} | {:+.2}% |",
                ids.len(),
                td.iter().map(Vec::len).sum::<usize>(),
                100.0 * (ppl_q / ppl_d - 1.0)
            );
        }
    }
}
