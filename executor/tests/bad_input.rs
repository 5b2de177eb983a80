//! Bad input gets a clear error that names the file or tensor at fault, never a panic. Each test
//! builds a damaged copy of a fixture in a temporary directory.

mod common;

use common::{copy_fixture, fixture, read_tensors, write_tensors};
use executor::backend::CpuBackend;
use executor::generate::{generate, GenerationConfig, Sampling};
use executor::run::{self, ModelSource};
use executor::ExecError;
use std::path::Path;

const Q_PROJ: &str = "model.decoder.layers.1.self_attn.q_proj.weight";

fn load_err(dir: &Path) -> String {
    match run::load(&ModelSource::Checkpoint(dir.to_path_buf()), false) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn rewrite_weights(dir: &Path, edit: impl Fn(&mut Vec<common::OwnedTensor>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = read_tensors(&path);
    edit(&mut tensors);
    write_tensors(&path, &tensors);
}

#[test]
fn missing_weights_file_is_named() {
    let dir = copy_fixture("opt-tiny-preln");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("not found"),
        "{e}"
    );
    assert!(e.contains(&dir.path().display().to_string()), "{e}");
}

#[test]
fn missing_config_is_named() {
    let dir = copy_fixture("opt-tiny-preln");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn missing_shard_is_named() {
    let dir = copy_fixture("opt-tiny-preln");
    let index = serde_json::json!({"weight_map": {Q_PROJ: "model-00002-of-00002.safetensors"}});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

#[test]
fn truncated_safetensors_file_is_named() {
    let dir = copy_fixture("opt-tiny-preln");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("corrupt or truncated safetensors file"), "{e}");
    assert!(e.contains(&path.display().to_string()), "{e}");

    // Cut inside the 8-byte length prefix as well.
    std::fs::write(&path, &bytes[..5]).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains(&path.display().to_string()), "{e}");
}

#[test]
fn corrupt_safetensors_header_is_named() {
    let dir = copy_fixture("opt-tiny-preln");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    for b in &mut bytes[8..40] {
        *b = b'#';
    }
    std::fs::write(&path, &bytes).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("corrupt or truncated safetensors file") && e.contains("JSON"),
        "{e}"
    );
    assert!(e.contains(&path.display().to_string()), "{e}");

    // A header length far beyond the file.
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("corrupt or truncated safetensors file"), "{e}");
}

#[test]
fn tensor_with_wrong_shape_is_named_with_both_shapes() {
    let dir = copy_fixture("opt-tiny-preln");
    rewrite_weights(dir.path(), |tensors| {
        let t = tensors.iter_mut().find(|t| t.name == Q_PROJ).unwrap();
        // Same bytes, other shape: [32, 32] -> [16, 64].
        t.shape = vec![16, 64];
    });
    let e = load_err(dir.path());
    assert!(e.contains(Q_PROJ), "{e}");
    assert!(e.contains("[16, 64]") && e.contains("[32, 32]"), "{e}");
}

#[test]
fn tensor_with_wrong_dtype_is_named() {
    let dir = copy_fixture("opt-tiny-preln");
    rewrite_weights(dir.path(), |tensors| {
        let t = tensors.iter_mut().find(|t| t.name == Q_PROJ).unwrap();
        t.dtype = safetensors::Dtype::I32;
    });
    let e = load_err(dir.path());
    assert!(e.contains(Q_PROJ) && e.contains("I32"), "{e}");
    assert!(e.contains("expected F32, F16 or BF16"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("opt-tiny-postln");
    rewrite_weights(dir.path(), |tensors| {
        tensors.retain(|t| t.name != "model.decoder.project_out.weight")
    });
    let e = load_err(dir.path());
    assert!(
        e.contains("tensor 'model.decoder.project_out.weight' not found"),
        "{e}"
    );
}

#[test]
fn config_that_is_not_opt_is_refused() {
    let dir = copy_fixture("opt-tiny-preln");
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("\"model_type\": \"opt\"", "\"model_type\": \"llama\""),
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model_type is 'llama'"), "{e}");
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn malformed_config_flag_is_named() {
    let dir = copy_fixture("opt-tiny-preln");
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("\"enable_bias\": true", "\"enable_bias\": \"yes\""),
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("enable_bias") && e.contains("config.json"),
        "{e}"
    );
}

#[test]
fn prompt_longer_than_the_positions_is_refused() {
    let loaded = run::load(&ModelSource::Checkpoint(fixture("opt-tiny-preln")), false).unwrap();
    let cfg = |n| GenerationConfig {
        max_new_tokens: n,
        sampling: Sampling::Greedy,
        stop_at_eos: true,
    };
    // The fixture has 128 positions.
    let long = vec![5u32; 129];
    let err = generate(&loaded.model, &CpuBackend, &[vec![2, 3], long], &cfg(1)).unwrap_err();
    assert!(
        matches!(
            err,
            ExecError::PromptTooLong {
                index: 1,
                prompt_tokens: 129,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("max_position_embeddings"), "{err}");

    // Fits alone, but not with the new tokens: 120 + 10 - 1 > 128.
    let err = generate(&loaded.model, &CpuBackend, &[vec![5u32; 120]], &cfg(10)).unwrap_err();
    assert!(err.to_string().contains("needs 129 positions"), "{err}");
    // Exactly at the limit is fine: 120 + 9 - 1 = 128.
    generate(&loaded.model, &CpuBackend, &[vec![5u32; 120]], &cfg(9)).unwrap();
}

#[test]
fn token_outside_the_vocabulary_and_empty_requests_are_refused() {
    let loaded = run::load(&ModelSource::Checkpoint(fixture("opt-tiny-preln")), false).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 2,
        sampling: Sampling::Greedy,
        stop_at_eos: true,
    };
    let err = generate(&loaded.model, &CpuBackend, &[vec![2, 384]], &cfg).unwrap_err();
    assert!(err.to_string().contains("token id 384"), "{err}");
    let err = generate(&loaded.model, &CpuBackend, &[vec![]], &cfg).unwrap_err();
    assert!(err.to_string().contains("prompt 0 is empty"), "{err}");
    let err = generate(&loaded.model, &CpuBackend, &[], &cfg).unwrap_err();
    assert!(err.to_string().contains("no prompts"), "{err}");
    let bad_sampling = GenerationConfig {
        sampling: Sampling::Sample {
            temperature: 1.0,
            top_k: None,
            top_p: Some(1.5),
            seed: 0,
        },
        ..cfg
    };
    let err = generate(&loaded.model, &CpuBackend, &[vec![2]], &bad_sampling).unwrap_err();
    assert!(err.to_string().contains("top-p is 1.5"), "{err}");
}
