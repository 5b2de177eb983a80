//! The block schedule over CPU and disk: with compression off, every placement and block shape
//! produces the tokens (and logits) of the all-in-memory run; the offload directory is removed
//! after the run; a full disk fails cleanly and leaves nothing behind.

mod common;

use common::fixture;
use executor::backend::CpuBackend;
use executor::generate::{generate, GenerationConfig, GenerationOutput};
use executor::run::{self, ModelSource};
use executor::schedule::{generate_blocks, BlockPlan, ChannelStats};
use proptest::prelude::*;
use std::path::Path;

#[derive(Clone, Copy, Debug)]
struct Shape {
    gbs: usize,
    nb: usize,
    weights: f64,
    kv: f64,
    act: f64,
    cpu_attention: bool,
}

const ALL_CPU: Shape = Shape {
    gbs: 4,
    nb: 1,
    weights: 0.0,
    kv: 0.0,
    act: 0.0,
    cpu_attention: true,
};

fn prompts() -> Vec<Vec<u32>> {
    common::block_prompts()
}

fn config(max_new_tokens: usize) -> GenerationConfig {
    common::greedy(max_new_tokens)
}

fn run_shape(
    model: &Path,
    shape: Shape,
    prompts: &[Vec<u32>],
    parent: &Path,
) -> (GenerationOutput, ChannelStats) {
    let loaded = run::load_placed(
        &ModelSource::Checkpoint(model.to_path_buf()),
        false,
        shape.weights,
    )
    .unwrap();
    let plan = BlockPlan {
        gpu_batch_size: shape.gbs,
        num_gpu_batches: shape.nb,
        weights_disk: shape.weights,
        kv_cache_disk: shape.kv,
        activations_disk: shape.act,
        cpu_attention: shape.cpu_attention,
        offload_parent: parent.to_path_buf(),
        offload_capacity_limit: None,
        compress_kv: false,
    };
    generate_blocks(
        &loaded.model,
        &CpuBackend,
        prompts,
        &config(5),
        &plan,
        &loaded.weights,
    )
    .unwrap()
}

fn reference(model: &Path, prompts: &[Vec<u32>]) -> GenerationOutput {
    let loaded = run::load(&ModelSource::Checkpoint(model.to_path_buf()), false).unwrap();
    generate(&loaded.model, &CpuBackend, prompts, &config(5)).unwrap()
}

fn assert_same(name: &str, shape: Shape, got: &GenerationOutput, want: &GenerationOutput) {
    common::assert_same_run(&format!("{name} {shape:?}"), got, want);
}

fn empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

/// The pre-LN fixture cut to its first decoder layer.
fn one_layer_fixture() -> tempfile::TempDir {
    let dir = common::copy_fixture("opt-tiny-preln");
    let weights = dir.path().join("model.safetensors");
    let kept: Vec<_> = common::read_tensors(&weights)
        .into_iter()
        .filter(|t| !t.name.contains(".layers.") || t.name.contains(".layers.0."))
        .collect();
    common::write_tensors(&weights, &kept);
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["num_hidden_layers"] = 1.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    dir
}

/// With one layer, each GPU batch's cache read is of the layer it wrote at the previous step, so
/// the read must wait for that write (`kv_writes_layer`); with more layers another layer's
/// compute always lies between the two. This pins the tokens of that path; it does not catch a
/// missing wait on its own (with the wait removed it still passed three runs out of three: the
/// fixture's writes of a few KiB finish before the next read is issued).
#[test]
fn one_layer_model_reads_its_own_cache_writes() {
    let model = one_layer_fixture();
    let p = prompts();
    let want = reference(model.path(), &p);
    for (gbs, nb) in [(2, 2), (1, 4), (4, 1)] {
        let shape = Shape {
            gbs,
            nb,
            kv: 1.0,
            act: 0.5,
            ..ALL_CPU
        };
        let parent = tempfile::tempdir().unwrap();
        let (got, stats) = run_shape(model.path(), shape, &p, parent.path());
        assert_same("opt-tiny-preln, 1 layer", shape, &got, &want);
        assert!(
            stats.kv_disk_sequences > 0 && stats.cache.write_bytes > 0,
            "{shape:?}: the cache went to disk"
        );
        assert!(empty(parent.path()), "{shape:?}: offload directory removed");
    }
}

#[test]
fn every_placement_and_shape_gives_the_in_memory_tokens() {
    let p = prompts();
    let half = Shape {
        weights: 0.5,
        ..ALL_CPU
    };
    let shapes = [
        ("all cpu, 4x1", ALL_CPU),
        ("weights half on disk", half),
        (
            "weights all on disk, 2x2",
            Shape {
                weights: 1.0,
                gbs: 2,
                nb: 2,
                ..ALL_CPU
            },
        ),
        (
            "kv cache on disk, 2x2",
            Shape {
                kv: 1.0,
                gbs: 2,
                nb: 2,
                ..ALL_CPU
            },
        ),
        (
            "kv half on disk, cpu_attention off, 1x4",
            Shape {
                kv: 0.5,
                gbs: 1,
                nb: 4,
                cpu_attention: false,
                ..ALL_CPU
            },
        ),
        (
            "activations on disk, 2x2",
            Shape {
                act: 1.0,
                gbs: 2,
                nb: 2,
                ..ALL_CPU
            },
        ),
        (
            "activations half on disk, 4x1",
            Shape {
                act: 0.5,
                ..ALL_CPU
            },
        ),
        (
            "all on disk, cpu_attention off, 3x2",
            Shape {
                weights: 1.0,
                kv: 1.0,
                act: 1.0,
                gbs: 3,
                nb: 2,
                cpu_attention: false,
            },
        ),
        (
            "all on disk, cpu_attention on, 1x3",
            Shape {
                weights: 0.5,
                kv: 1.0,
                act: 1.0,
                gbs: 1,
                nb: 3,
                cpu_attention: true,
            },
        ),
    ];
    // The f16 checkpoint keeps its KV cache in f16 (2-byte disk slots and staging).
    for name in ["opt-tiny-preln", "opt-tiny-postln", "opt-tiny-preln-f16"] {
        let want = reference(&fixture(name), &p);
        for (label, shape) in shapes {
            let parent = tempfile::tempdir().unwrap();
            let (got, stats) = run_shape(&fixture(name), shape, &p, parent.path());
            assert_same(&format!("{name}: {label}"), shape, &got, &want);
            if shape.weights > 0.0 {
                assert!(stats.weights.read_bytes > 0, "{label}: no weight reads");
            }
            if shape.kv > 0.0 {
                assert!(
                    stats.kv_disk_sequences > 0 && stats.cache.write_bytes > 0,
                    "{label}"
                );
            }
            assert!(
                empty(parent.path()),
                "{label}: offload directory left behind"
            );
        }
    }
}

#[test]
fn three_prompts_in_uneven_blocks() {
    let p: Vec<Vec<u32>> = prompts().into_iter().take(3).collect();
    let want = reference(&fixture("opt-tiny-preln"), &p);
    for (gbs, nb) in [(1, 3), (2, 2), (3, 1)] {
        let shape = Shape {
            gbs,
            nb,
            weights: 0.5,
            kv: 0.5,
            act: 0.5,
            cpu_attention: gbs != 2,
        };
        let parent = tempfile::tempdir().unwrap();
        let (got, _) = run_shape(&fixture("opt-tiny-preln"), shape, &p, parent.path());
        assert_same("3 prompts", shape, &got, &want);
    }
}

#[test]
fn half_the_weights_are_placed_on_disk_within_one_matrix() {
    let loaded = run::load_placed(
        &ModelSource::Checkpoint(fixture("opt-tiny-preln")),
        false,
        0.5,
    )
    .unwrap();
    let w = &loaded.weights;
    let share = w.disk_bytes as f64 / w.layer_bytes as f64;
    assert!((share - 0.5).abs() < 0.1, "disk share {share}");
    let none = run::load(&ModelSource::Checkpoint(fixture("opt-tiny-preln")), false).unwrap();
    assert_eq!(none.weights.disk_bytes, 0);
}

#[test]
fn random_weights_refuse_a_disk_share() {
    let cfg =
        executor::models::opt::OptConfig::from_file(&fixture("opt-tiny-preln").join("config.json"))
            .unwrap();
    let source = ModelSource::Random {
        config: cfg,
        dtype: executor::weights::ElementType::F32,
        seed: 1,
    };
    let e = match run::load_placed(&source, false, 0.25) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("random weights with a disk share must be refused"),
    };
    assert!(
        e.contains("placement.weights.disk") && e.contains("--model"),
        "{e}"
    );
}

#[test]
fn a_full_disk_is_a_clear_error_and_leaves_nothing() {
    let loaded = run::load(&ModelSource::Checkpoint(fixture("opt-tiny-preln")), false).unwrap();
    let parent = tempfile::tempdir().unwrap();
    let plan = BlockPlan {
        gpu_batch_size: 2,
        num_gpu_batches: 2,
        weights_disk: 0.0,
        kv_cache_disk: 1.0,
        activations_disk: 0.0,
        cpu_attention: true,
        offload_parent: parent.path().to_path_buf(),
        offload_capacity_limit: Some(8192),
        compress_kv: false,
    };
    let e = match generate_blocks(
        &loaded.model,
        &CpuBackend,
        &prompts(),
        &config(5),
        &plan,
        &loaded.weights,
    ) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("an 8 KiB offload directory cannot hold the KV cache"),
    };
    assert!(
        e.contains("kv-cache") || e.contains(&parent.path().display().to_string()),
        "{e}"
    );
    assert!(
        empty(parent.path()),
        "offload directory left behind after {e}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]
    #[test]
    fn random_placements_match_the_in_memory_run(
        gbs in 1usize..4,
        nb in 1usize..4,
        w in 0usize..5,
        kv in 0usize..5,
        act in 0usize..5,
        cpu_attention in any::<bool>(),
    ) {
        let p = prompts();
        let want = reference(&fixture("opt-tiny-preln"), &p);
        let shape = Shape {
            gbs,
            nb,
            weights: w as f64 / 4.0,
            kv: kv as f64 / 4.0,
            act: act as f64 / 4.0,
            cpu_attention,
        };
        let parent = tempfile::tempdir().unwrap();
        let (got, _) = run_shape(&fixture("opt-tiny-preln"), shape, &p, parent.path());
        assert_same("proptest", shape, &got, &want);
        prop_assert!(empty(parent.path()));
    }
}

#[test]
fn compressed_weights_run_and_stay_near_the_dense_logits() {
    let p = prompts();
    let mut loaded = run::load(&ModelSource::Checkpoint(fixture("opt-tiny-preln")), false).unwrap();
    let want = generate(&loaded.model, &CpuBackend, &p, &config(3)).unwrap();
    run::compress_weights(&mut loaded).unwrap();
    let parent = tempfile::tempdir().unwrap();
    let plan = BlockPlan {
        gpu_batch_size: 2,
        num_gpu_batches: 2,
        weights_disk: 0.0,
        kv_cache_disk: 1.0,
        activations_disk: 0.0,
        cpu_attention: false,
        offload_parent: parent.path().to_path_buf(),
        offload_capacity_limit: None,
        compress_kv: false,
    };
    let (got, _) = generate_blocks(
        &loaded.model,
        &CpuBackend,
        &p,
        &config(3),
        &plan,
        &loaded.weights,
    )
    .unwrap();
    let rel = relative_l2(&got.prefill_logits, &want.prefill_logits);
    // 4-bit weights change the logits (about 9% per product on these random fixtures, compounded
    // over 3 layers; docs/compression.md), but not beyond recognition.
    assert!(rel > 1e-4 && rel < 1.5, "relative drift {rel}");
    assert!(got.tokens.iter().all(|t| t.len() == 3));
}

#[test]
fn a_compressed_kv_cache_runs_and_stays_near_the_dense_logits() {
    let p = prompts();
    let loaded = run::load(&ModelSource::Checkpoint(fixture("opt-tiny-preln")), false).unwrap();
    let want = generate(&loaded.model, &CpuBackend, &p, &config(3)).unwrap();
    let parent = tempfile::tempdir().unwrap();
    let mut plan = BlockPlan {
        gpu_batch_size: 2,
        num_gpu_batches: 2,
        weights_disk: 0.0,
        kv_cache_disk: 0.0,
        activations_disk: 1.0,
        cpu_attention: true,
        offload_parent: parent.path().to_path_buf(),
        offload_capacity_limit: None,
        compress_kv: true,
    };
    let (got, _) = generate_blocks(
        &loaded.model,
        &CpuBackend,
        &p,
        &config(3),
        &plan,
        &loaded.weights,
    )
    .unwrap();
    let rel = relative_l2(&got.prefill_logits, &want.prefill_logits);
    assert!(rel > 1e-5 && rel < 1.5, "relative drift {rel}");
    assert!(got.tokens.iter().all(|t| t.len() == 3));
    plan.kv_cache_disk = 0.5;
    let e = match generate_blocks(
        &loaded.model,
        &CpuBackend,
        &p,
        &config(3),
        &plan,
        &loaded.weights,
    ) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a compressed cache on disk must be refused"),
    };
    assert!(e.contains("compression.kv_cache"), "{e}");
}

/// ||got - want|| / ||want||: how far compressed logits drifted from the dense ones.
fn relative_l2(got: &[f32], want: &[f32]) -> f32 {
    let num: f32 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f32 = want.iter().map(|a| a * a).sum();
    (num / den).sqrt()
}

#[test]
fn weight_staging_is_the_memory_plans() {
    // Two buffers per matrix slot ever on disk, as `planner::memory::disk_staging_bytes` counts,
    // up to the 4 KiB alignment of each direct read (at most 8 KiB per buffer).
    let name = "opt-tiny-preln";
    let dir = tempfile::tempdir().unwrap();
    let loaded = run::load(&ModelSource::Checkpoint(fixture(name)), false).unwrap();
    let spec = &loaded.model.config().spec;
    let sizes = planner::memory::layer_matrix_bytes(spec);
    for weights in [0.2, 0.5, 0.75, 0.9] {
        let shape = Shape { weights, ..ALL_CPU };
        let (_, stats) = run_shape(&fixture(name), shape, &prompts(), dir.path());
        let layout = planner::memory::disk_layout(&sizes, spec.num_layers as usize, weights);
        let planned = planner::memory::disk_staging_bytes(&layout, &sizes);
        let staged = stats.weight_staging_bytes;
        assert!(
            staged >= planned && staged - planned <= 12 * 8192,
            "weights {weights}: staged {staged} bytes, planned {planned}"
        );
    }
}
