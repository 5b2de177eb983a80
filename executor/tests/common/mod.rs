//! Helpers shared by the executor's integration tests: fixture paths, the reference outputs written
//! by tests/fixtures/make_opt_fixture.py, and rewriting safetensors files into corrupted copies.

#![allow(dead_code)]

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

/// Directory of a committed fixture (`opt-tiny-preln`, `opt-tiny-postln`, `opt-tiny-preln-f16`).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// transformers' outputs for a fixture.
pub struct Expected {
    pub prompts: Vec<String>,
    pub prompt_ids: Vec<Vec<u32>>,
    pub last_logits: Vec<Vec<f32>>,
    pub max_new_tokens: usize,
    pub greedy: Vec<Vec<u32>>,
    pub last_step_logits: Vec<Option<Vec<f32>>>,
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Reads `expected.json` of a fixture.
pub fn expected(name: &str) -> Expected {
    let path = fixture(name).join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let list = |key: &str| v[key].as_array().unwrap().clone();
    Expected {
        prompts: list("prompts")
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect(),
        prompt_ids: list("prompt_ids").iter().map(ids).collect(),
        last_logits: list("last_logits").iter().map(floats).collect(),
        max_new_tokens: v["max_new_tokens"].as_u64().unwrap() as usize,
        greedy: list("greedy").iter().map(ids).collect(),
        last_step_logits: list("last_step_logits")
            .iter()
            .map(|x| if x.is_null() { None } else { Some(floats(x)) })
            .collect(),
    }
}

/// Largest |got - want| / max(|want|, 1) over a row, and the row's normwise relative error
/// max|got - want| / max|want|.
pub fn relative_errors(got: &[f32], want: &[f32]) -> (f64, f64) {
    assert_eq!(got.len(), want.len());
    let mut elementwise = 0.0f64;
    let mut max_diff = 0.0f64;
    let mut max_want = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        let diff = (g as f64 - w as f64).abs();
        elementwise = elementwise.max(diff / (w as f64).abs().max(1.0));
        max_diff = max_diff.max(diff);
        max_want = max_want.max((w as f64).abs());
    }
    (elementwise, max_diff / max_want)
}

/// One tensor of a safetensors file, owned, for rewriting.
pub struct OwnedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// All tensors of a safetensors file.
pub fn read_tensors(path: &Path) -> Vec<OwnedTensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<OwnedTensor> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| OwnedTensor {
            name,
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            data: view.data().to_vec(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Writes tensors as a safetensors file.
pub fn write_tensors(path: &Path, tensors: &[OwnedTensor]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Copies a fixture directory into a fresh temporary directory.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// Four prompts of different lengths (the fixture's three, then a fourth): left padding inside
/// and across GPU batches, for the block schedule's tests.
pub fn block_prompts() -> Vec<Vec<u32>> {
    let mut p = expected("opt-tiny-preln").prompt_ids.clone();
    p.push(vec![2, 100, 7, 31, 300, 5]);
    p.push(vec![2, 55]);
    p.truncate(4);
    p
}

/// Greedy decoding of `max_new_tokens` tokens that does not stop at EOS (every run does the same
/// steps).
pub fn greedy(max_new_tokens: usize) -> executor::generate::GenerationConfig {
    executor::generate::GenerationConfig {
        max_new_tokens,
        sampling: executor::generate::Sampling::Greedy,
        stop_at_eos: false,
    }
}

/// The invariant of every placement: the tokens of the in-memory run, and prefill logits within
/// 1e-4 (the arithmetic per sequence is the same; only the row count of the products differs).
pub fn assert_same_run(
    label: &str,
    got: &executor::generate::GenerationOutput,
    want: &executor::generate::GenerationOutput,
) {
    assert_same_run_within(label, got, want, 1e-4);
}

/// [`assert_same_run`] with prefill logits within `tol` (a GPU sums in another order than the
/// CPU); returns the largest difference.
pub fn assert_same_run_within(
    label: &str,
    got: &executor::generate::GenerationOutput,
    want: &executor::generate::GenerationOutput,
    tol: f32,
) -> f32 {
    assert_eq!(got.tokens, want.tokens, "{label}: tokens");
    let diff = got
        .prefill_logits
        .iter()
        .zip(&want.prefill_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < tol, "{label}: prefill logits differ by {diff}");
    diff
}

/// The GPU policy the device tests run on a fixture: half the weights resident, the KV cache on
/// the device, the rest of each linear layer split with alpha 0.3 (block of 3 batches of 6).
pub fn gpu_split_policy(model: &str) -> planner::policy::Policy {
    let mut p = planner::policy::Policy::all_cpu(model, 6, 3, 2);
    p.placement.weights = planner::policy::Placement {
        gpu: 0.5,
        cpu: 0.5,
        disk: 0.0,
    };
    p.placement.kv_cache = planner::policy::Placement::ALL_GPU;
    p.compute.split = planner::policy::Split::uniform(0.3);
    p
}
