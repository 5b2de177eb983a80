//! bf16 matrices packed into the CPU kernels' panels (`run::pack_for_cpu`) give the tokens of
//! the run in nn.Linear layout, and logits within f32 summation order: random weights of both
//! OPT variants through `generate`, and a bf16 checkpoint with half the layer matrices on disk (those stay in
//! nn.Linear layout, read with direct I/O) through the block schedule.

mod common;

use common::fixture;
use executor::backend::CpuBackend;
use executor::generate::generate;
use executor::kernels::prefers_panels;
use executor::models::opt::OptConfig;
use executor::run::{self, ModelSource};
use executor::schedule::{generate_blocks, BlockPlan};
use executor::weights::ElementType;
use half::bf16;
use safetensors::Dtype;

/// Logits of a bf16 model summed in another order: far below the bf16 rounding of the
/// activations, far above nothing.
const TOLERANCE: f32 = 1e-3;

fn skip_without_panels(packed: u64) -> bool {
    if prefers_panels() {
        assert!(packed > 0, "this CPU prefers panels but nothing was packed");
        return false;
    }
    assert_eq!(packed, 0, "packed on a CPU that does not prefer panels");
    eprintln!("skipped: this CPU does not use panels (no AVX512-BF16, or AMX)");
    true
}

#[test]
fn packed_random_weights_run_as_the_unpacked_ones() {
    // Pre-LN, and post-LN with project_in / project_out (packed too) around a narrower tied
    // embedding.
    for name in ["opt-tiny-preln", "opt-tiny-postln"] {
        let config = OptConfig::from_file(&fixture(name).join("config.json")).unwrap();
        let source = ModelSource::Random {
            config,
            dtype: ElementType::Bf16,
            seed: 3,
        };
        let prompts = common::block_prompts();
        let plain = run::load(&source, false).unwrap();
        let want = generate(&plain.model, &CpuBackend, &prompts, &common::greedy(6)).unwrap();
        let mut packed = run::load(&source, false).unwrap();
        if skip_without_panels(run::pack_for_cpu(&mut packed, false)) {
            return;
        }
        let got = generate(&packed.model, &CpuBackend, &prompts, &common::greedy(6)).unwrap();
        let diff = common::assert_same_run_within(name, &got, &want, TOLERANCE);
        eprintln!("{name}: largest prefill logit difference {diff}");
    }
}

/// The pre-LN fixture with every tensor rounded to bf16.
fn bf16_fixture() -> tempfile::TempDir {
    let dir = common::copy_fixture("opt-tiny-preln");
    let weights = dir.path().join("model.safetensors");
    let tensors: Vec<common::OwnedTensor> = common::read_tensors(&weights)
        .into_iter()
        .map(|t| {
            assert_eq!(t.dtype, Dtype::F32, "{}", t.name);
            let data = t
                .data
                .chunks_exact(4)
                .flat_map(|b| {
                    let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    bf16::from_f32(v).to_le_bytes()
                })
                .collect();
            common::OwnedTensor {
                dtype: Dtype::BF16,
                data,
                ..t
            }
        })
        .collect();
    common::write_tensors(&weights, &tensors);
    dir
}

#[test]
fn packed_bf16_checkpoint_with_weights_on_disk_runs_as_in_memory() {
    let model = bf16_fixture();
    let source = ModelSource::Checkpoint(model.path().to_path_buf());
    let prompts = common::block_prompts();
    let plain = run::load(&source, false).unwrap();
    let want = generate(&plain.model, &CpuBackend, &prompts, &common::greedy(5)).unwrap();
    let mut loaded = run::load_placed(&source, false, 0.5).unwrap();
    let on_disk = loaded.weights.disk_bytes;
    assert!(on_disk > 0, "half the layer matrices are on disk");
    let packed = run::pack_for_cpu(&mut loaded, false);
    if skip_without_panels(packed) {
        return;
    }
    // The matrices on disk are not packed (the rest of the bytes not on disk are vectors and
    // position embeddings, also left as they are).
    let total = loaded.model.store().total_bytes();
    assert!(packed < total - on_disk, "{packed} of {total} - {on_disk}");
    let parent = tempfile::tempdir().unwrap();
    let plan = BlockPlan {
        gpu_batch_size: 2,
        num_gpu_batches: 2,
        weights_disk: 0.5,
        kv_cache_disk: 0.0,
        activations_disk: 0.0,
        cpu_attention: true,
        offload_parent: parent.path().to_path_buf(),
        offload_capacity_limit: None,
        compress_kv: false,
    };
    let (got, stats) = generate_blocks(
        &loaded.model,
        &CpuBackend,
        &prompts,
        &common::greedy(5),
        &plan,
        &loaded.weights,
    )
    .unwrap();
    assert!(stats.weights.read_bytes > 0, "matrices were read from disk");
    common::assert_same_run_within("bf16 checkpoint, half on disk", &got, &want, TOLERANCE);
}
