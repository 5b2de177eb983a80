//! GPU tiers on the `sim` device: resident weights, the HeteGen split and the parameter manager
//! give the tokens (and logits) of the all-CPU run; the copy counters show what the placement
//! implies; a device too small for the policy is a clear error.

mod common;

use common::{assert_same_run, block_prompts, fixture, greedy};
use executor::backend::CpuBackend;
use executor::device::Device;
use executor::generate::{generate, GenerationOutput};
use executor::gpu_tier::{GpuPlan, Rates};
use executor::run::{self, ModelSource};
use executor::schedule::{generate_blocks_on, BlockPlan, ChannelStats};
use executor::sim::SimDevice;
use planner::policy::Split;
use proptest::prelude::*;

/// A placement over the three tiers (each row's host share is what is left).
#[derive(Clone, Copy, Debug)]
struct Case {
    gbs: usize,
    nb: usize,
    weights_gpu: f64,
    weights_disk: f64,
    kv_gpu: f64,
    kv_disk: f64,
    act_gpu: f64,
    act_disk: f64,
    alpha: f64,
    param_manager: bool,
    cpu_attention: bool,
}

const BASE: Case = Case {
    gbs: 2,
    nb: 2,
    weights_gpu: 0.0,
    weights_disk: 0.0,
    kv_gpu: 0.0,
    kv_disk: 0.0,
    act_gpu: 0.0,
    act_disk: 0.0,
    alpha: 1.0,
    param_manager: false,
    cpu_attention: true,
};

/// Plenty for the fixtures (a few hundred KiB of weights).
const LARGE: u64 = 64 << 20;

const RATES: Rates = Rates {
    cpu_bytes_per_s: 16e9,
    h2d_bytes_per_s: 12e9,
    disk_bytes_per_s: 1e9,
};

fn gpu_plan(c: &Case) -> GpuPlan {
    GpuPlan {
        weights: c.weights_gpu,
        kv_cache: c.kv_gpu,
        activations: c.act_gpu,
        kv_cache_cpu: 1.0 - c.kv_gpu - c.kv_disk,
        activations_cpu: 1.0 - c.act_gpu - c.act_disk,
        split: Split::uniform(c.alpha),
        param_manager: c.param_manager,
        rates: RATES,
    }
}

fn run_case(
    name: &str,
    c: Case,
    dev: &SimDevice,
) -> executor::Result<(GenerationOutput, ChannelStats)> {
    let loaded = run::load_placed(
        &ModelSource::Checkpoint(fixture(name)),
        false,
        c.weights_disk,
    )?;
    let parent = tempfile::tempdir().unwrap();
    let plan = BlockPlan {
        gpu_batch_size: c.gbs,
        num_gpu_batches: c.nb,
        weights_disk: c.weights_disk,
        kv_cache_disk: c.kv_disk,
        activations_disk: c.act_disk,
        cpu_attention: c.cpu_attention,
        offload_parent: parent.path().to_path_buf(),
        offload_capacity_limit: None,
        compress_kv: false,
    };
    let gplan = gpu_plan(&c);
    generate_blocks_on(
        &loaded.model,
        &CpuBackend,
        &block_prompts(),
        &greedy(5),
        &plan,
        &loaded.weights,
        Some((dev as &dyn Device, &gplan)),
    )
}

fn reference(name: &str) -> GenerationOutput {
    let loaded = run::load(&ModelSource::Checkpoint(fixture(name)), false).unwrap();
    generate(&loaded.model, &CpuBackend, &block_prompts(), &greedy(5)).unwrap()
}

/// Matrix bytes of the fixture's decoder layers.
fn layer_bytes(name: &str) -> u64 {
    run::load(&ModelSource::Checkpoint(fixture(name)), false)
        .unwrap()
        .weights
        .layer_bytes
}

#[test]
fn split_and_resident_weights_give_the_cpu_tokens_with_the_manager_off_and_on() {
    for name in ["opt-tiny-preln", "opt-tiny-postln", "opt-tiny-preln-f16"] {
        let want = reference(name);
        let total = layer_bytes(name);
        for alpha in [0.0, 0.3, 0.7, 1.0] {
            for weights_gpu in [0.0, 0.5, 1.0] {
                let c = Case {
                    alpha,
                    weights_gpu,
                    ..BASE
                };
                let dev = SimDevice::new(LARGE);
                let (got, stats) = run_case(name, c, &dev).unwrap();
                assert_same_run(&format!("{name} {c:?}"), &got, &want);
                let d = stats.device.unwrap();
                if weights_gpu == 0.0 && alpha < 1.0 {
                    assert!(d.streamed_weight_bytes_per_step > 0, "{c:?}");
                }
                if weights_gpu == 1.0 {
                    assert_eq!(d.streamed_weight_bytes_per_step, 0, "{c:?}");
                    assert_eq!(d.host_weight_bytes_per_step, 0, "{c:?}");
                }
                // Everything allocated was given back.
                assert_eq!(dev.used_bytes(), 0, "{c:?}");

                // The parameter manager with room for a third of the model beyond the plan.
                let on = Case {
                    param_manager: true,
                    ..c
                };
                let dev = SimDevice::new(d.planned_bytes + total / 3);
                let (got, stats) = run_case(name, on, &dev).unwrap();
                assert_same_run(&format!("{name} {on:?}"), &got, &want);
                let pm = stats.device.unwrap().param_manager;
                if weights_gpu < 1.0 {
                    assert!(!pm.promoted.is_empty(), "{on:?}");
                }
            }
        }
    }
}

#[test]
fn every_tier_at_once_gives_the_cpu_tokens() {
    let want = reference("opt-tiny-preln");
    let cases = [
        Case {
            weights_gpu: 0.25,
            weights_disk: 0.5,
            kv_gpu: 0.5,
            kv_disk: 0.25,
            act_gpu: 0.5,
            act_disk: 0.25,
            alpha: 0.3,
            ..BASE
        },
        Case {
            gbs: 1,
            nb: 4,
            kv_gpu: 1.0,
            act_gpu: 1.0,
            alpha: 0.7,
            ..BASE
        },
        Case {
            gbs: 4,
            nb: 1,
            weights_disk: 1.0,
            kv_gpu: 0.5,
            act_gpu: 0.5,
            alpha: 0.0,
            ..BASE
        },
        Case {
            gbs: 3,
            nb: 2,
            weights_gpu: 0.5,
            weights_disk: 0.5,
            kv_gpu: 0.5,
            kv_disk: 0.5,
            act_gpu: 0.5,
            act_disk: 0.5,
            alpha: 0.3,
            param_manager: true,
            cpu_attention: true,
        },
    ];
    for c in cases {
        for cpu_attention in [true, false] {
            let c = Case { cpu_attention, ..c };
            let dev = SimDevice::new(LARGE);
            let (got, stats) = run_case("opt-tiny-preln", c, &dev).unwrap();
            assert_same_run(&format!("{c:?}"), &got, &want);
            let d = stats.device.unwrap();
            if c.kv_gpu > 0.0 {
                assert!(d.kv_sequences > 0, "{c:?}");
            }
        }
    }
}

#[test]
fn copy_counters_show_the_placement() {
    let name = "opt-tiny-preln";
    let total = layer_bytes(name);
    let steps = 5; // prefill + 4 decode steps

    // All weights resident: uploaded once at setup, never during the run.
    let dev = SimDevice::new(LARGE);
    let c = Case {
        weights_gpu: 1.0,
        alpha: 0.0,
        ..BASE
    };
    let d = run_case(name, c, &dev).unwrap().1.device.unwrap();
    assert_eq!(d.resident_weight_bytes, total);
    assert_eq!(d.run_weight_upload_bytes, 0);
    assert_eq!(d.decode_weight_upload_bytes, 0);
    assert!(d.setup_transfers.h2d_bytes >= total);
    // Activations still cross for each device product.
    assert!(d.run_transfers.h2d_calls > 0 && d.run_transfers.d2h_calls > 0);

    // Nothing resident, alpha 0: every matrix streamed whole, once per layer per step (not per
    // GPU batch).
    let dev = SimDevice::new(LARGE);
    let c = Case { alpha: 0.0, ..BASE };
    let d = run_case(name, c, &dev).unwrap().1.device.unwrap();
    assert_eq!(d.resident_weight_bytes, 0);
    assert_eq!(d.streamed_weight_bytes_per_step, total);
    assert_eq!(d.run_weight_upload_bytes, steps * total);
    assert_eq!(d.decode_weight_upload_bytes, (steps - 1) * total);
    // Setup uploads only the biases of the device rows.
    assert!(d.setup_transfers.h2d_bytes < total / 10);

    // alpha 1, no GPU share of anything: the device is never used.
    let dev = SimDevice::new(LARGE);
    let d = run_case(name, BASE, &dev).unwrap().1.device.unwrap();
    assert_eq!(d.run_transfers, Default::default());
    assert_eq!(d.host_weight_bytes_per_step, total);

    // alpha 0.3: the device share of the rows is streamed, the host share is not.
    let dev = SimDevice::new(LARGE);
    let c = Case { alpha: 0.3, ..BASE };
    let d = run_case(name, c, &dev).unwrap().1.device.unwrap();
    assert_eq!(
        d.streamed_weight_bytes_per_step + d.host_weight_bytes_per_step,
        total
    );
    let host_share = d.host_weight_bytes_per_step as f64 / total as f64;
    assert!((host_share - 0.3).abs() < 0.05, "host share {host_share}");
    assert_eq!(
        d.run_weight_upload_bytes,
        steps * d.streamed_weight_bytes_per_step
    );
}

#[test]
fn a_device_too_small_for_the_policy_is_a_clear_error() {
    let c = Case {
        weights_gpu: 1.0,
        kv_gpu: 1.0,
        ..BASE
    };
    // Too small for the first work buffer, for the second, and for the weights.
    for capacity in [4096, 10_000, 64 << 10] {
        let dev = SimDevice::new(capacity);
        let e = match run_case("opt-tiny-preln", c, &dev) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{capacity} bytes cannot hold the fixture's weights"),
        };
        assert!(
            e.contains("sim device out of memory")
                && e.contains(&format!("of {capacity} bytes in use")),
            "{e}"
        );
        assert_eq!(dev.used_bytes(), 0, "buffers left allocated after {e}");
    }
    // Every capacity below the plan fails at some allocation, and gives back what it took.
    let c = Case {
        weights_gpu: 0.5,
        kv_gpu: 0.5,
        act_gpu: 0.5,
        alpha: 0.3,
        ..BASE
    };
    let planned = {
        let dev = SimDevice::new(LARGE);
        run_case("opt-tiny-preln", c, &dev)
            .unwrap()
            .1
            .device
            .unwrap()
            .planned_bytes
    };
    let mut messages = std::collections::BTreeSet::new();
    for k in 0..48 {
        let capacity = planned * k / 48;
        let dev = SimDevice::new(capacity);
        let e = run_case("opt-tiny-preln", c, &dev)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("sim device out of memory"), "{e}");
        assert_eq!(dev.used_bytes(), 0, "buffers left allocated after {e}");
        messages.insert(e.split(" (").next().unwrap().to_string());
    }
    // The sweep failed at several different buffers.
    assert!(messages.len() >= 4, "{messages:?}");
    let dev = SimDevice::new(planned);
    run_case("opt-tiny-preln", c, &dev).unwrap();
}

#[test]
fn the_parameter_manager_fills_free_memory_most_valuable_first() {
    let name = "opt-tiny-preln";
    let want = reference(name);
    let total = layer_bytes(name);
    // Weights half on disk, alpha 0.7: disk-resident matrices cost the host their read, so they
    // come first.
    let c = Case {
        weights_disk: 0.5,
        alpha: 0.7,
        ..BASE
    };
    let off = {
        let dev = SimDevice::new(LARGE);
        let (got, stats) = run_case(name, c, &dev).unwrap();
        assert_same_run("manager off", &got, &want);
        stats
    };
    let d_off = off.device.unwrap();
    assert!(d_off.param_manager.promoted.is_empty());
    assert!(off.weight_disk_bytes_per_step > 0);

    // Room for about a third of the model beyond the plan.
    let on = Case {
        param_manager: true,
        ..c
    };
    let dev = SimDevice::new(d_off.planned_bytes + total / 3);
    let (got, stats) = run_case(name, on, &dev).unwrap();
    assert_same_run("manager on, a third free", &got, &want);
    let d = stats.device.unwrap();
    let pm = &d.param_manager;
    assert!(pm.enabled && !pm.promoted.is_empty());
    assert!(pm.promoted_bytes <= total / 3 + 1);
    assert!(pm.estimated_saved_s_per_step > 0.0);
    assert!((pm.estimated_saved_s - 5.0 * pm.estimated_saved_s_per_step).abs() < 1e-12);
    assert!(pm.promoted.windows(2).all(|w| w[0].g >= w[1].g));
    assert!(d.peak_bytes <= dev.capacity_bytes());
    // A third of the model fits in the disk half: every promotion is a disk-resident matrix
    // (its read makes it the most valuable), which is then no longer read from disk.
    assert_eq!(
        off.weight_disk_bytes_per_step - stats.weight_disk_bytes_per_step,
        pm.promoted_bytes
    );
    assert!(d.streamed_weight_bytes_per_step < d_off.streamed_weight_bytes_per_step);
    assert!(d.run_weight_upload_bytes < d_off.run_weight_upload_bytes);

    // Room for everything: every matrix resident, no weight uploads and no disk reads.
    let dev = SimDevice::new(LARGE);
    let (got, stats) = run_case(name, on, &dev).unwrap();
    assert_same_run("manager on, room for all", &got, &want);
    let d = stats.device.unwrap();
    assert_eq!(d.resident_weight_bytes_total, total);
    assert_eq!(
        d.streamed_weight_bytes_per_step + d.host_weight_bytes_per_step,
        0
    );
    assert_eq!(d.run_weight_upload_bytes, 0);
    assert_eq!(stats.weight_disk_bytes_per_step, 0);
    assert_eq!(stats.weights.read_bytes, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]
    #[test]
    fn random_splits_and_shares_match_the_cpu_run(
        alpha in 0usize..11,
        w in 0usize..5,
        kv in 0usize..5,
        act in 0usize..5,
        manager in any::<bool>(),
    ) {
        let want = reference("opt-tiny-preln");
        let c = Case {
            alpha: alpha as f64 / 10.0,
            weights_gpu: w as f64 / 4.0,
            kv_gpu: kv as f64 / 4.0,
            act_gpu: act as f64 / 4.0,
            param_manager: manager,
            ..BASE
        };
        let dev = SimDevice::new(LARGE);
        let (got, _) = run_case("opt-tiny-preln", c, &dev).unwrap();
        assert_same_run(&format!("{c:?}"), &got, &want);
    }
}

#[test]
fn the_resident_share_is_within_a_matrix_and_avoids_disk_matrices() {
    for (gpu, disk) in [(0.5, 0.0), (0.25, 0.5), (0.5, 0.5), (1.0, 0.0)] {
        let loaded = run::load_placed(
            &ModelSource::Checkpoint(fixture("opt-tiny-preln")),
            false,
            disk,
        )
        .unwrap();
        let w = &loaded.weights;
        let resident = executor::gpu_tier::place_resident(&loaded.model, w, gpu);
        let store = loaded.model.store();
        let mut bytes = 0u64;
        let mut largest = 0u64;
        for (l, row) in resident.iter().enumerate() {
            for (i, id) in loaded.model.layer_weight_ids(l).iter().enumerate() {
                let m = store.meta(*id);
                let b = (m.shape.iter().product::<usize>() * m.dtype.size()) as u64;
                largest = largest.max(b);
                if row[i] {
                    assert!(
                        !w.on_disk[l][i],
                        "layer {l} matrix {i} both resident and on disk"
                    );
                    bytes += b;
                }
            }
        }
        let want = gpu * w.layer_bytes as f64;
        assert!(
            (bytes as f64 - want).abs() <= largest as f64,
            "gpu {gpu} disk {disk}: {bytes} resident, want {want}"
        );
    }
}
