//! The memory plan's CPU compute buffers (`planner::memory::cpu_workspace_bytes`) must be what the
//! executor allocates for them: its workspace (`OptWorkspace`), the block's three logit
//! buffers and the matrix kernels' converted input. The planner cannot see the executor, so the
//! check lives here.

mod common;

use common::fixture;
use executor::models::CausalLm;
use executor::run::{self, ModelSource};
use planner::memory::cpu_workspace_bytes;
use planner::policy::Compression;
use planner::shares::Scenario;

#[test]
fn workspace_bytes_are_the_memory_plans() {
    // The post-LN fixture has opt-350m's embedding projection (16 wide against 32).
    for name in ["opt-tiny-preln", "opt-tiny-postln"] {
        let loaded = run::load(&ModelSource::Checkpoint(fixture(name)), false).unwrap();
        let model = &loaded.model;
        let spec = &model.config().spec;
        for (gbs, nb, s, n) in [(1, 1, 7, 5), (4, 2, 20, 9), (3, 3, 64, 32)] {
            let sc = Scenario {
                prompt_len: s,
                gen_len: n,
                gpu_batch_size: gbs,
                num_gpu_batches: nb,
                compression: Compression::default(),
                cpu_attention: true,
                has_gpu: false,
            };
            // As the block schedule sizes it: the padded prompt, a cache of s + n - 1 positions.
            let ws = model.workspace(gbs as usize, s as usize, (s + n - 1) as usize);
            let logits = 3 * (gbs * nb) as usize * model.vocab_size() * 4;
            // The kernels' converted input is theirs, not the workspace's; primitives' test
            // `linear_input_scratch_is_what_the_plan_counts` holds that figure to what they keep.
            let kernel_input = planner::memory::kernel_input_scratch_bytes(spec, &sc);
            let allocated = (ws.bytes() + logits as u64) as f64 + kernel_input;
            let planned = cpu_workspace_bytes(spec, &sc);
            // The plan counts s + n scratch positions per head, the executor s + n - 1 for each of
            // max(heads, threads): equal up to one position per head when threads <= heads.
            let slack = 4.0 * spec.num_heads as f64;
            assert!(
                planned >= allocated && planned - allocated <= slack,
                "{name} gbs {gbs} nb {nb} s {s} n {n}: planned {planned}, allocated {allocated}"
            );
        }
    }
}
