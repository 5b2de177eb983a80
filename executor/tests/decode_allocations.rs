//! The decode loop allocates nothing: the number of heap allocations of a whole generation must not
//! grow with the number of decode steps. Counted with a global allocator wrapper (this test binary
//! only), over all threads, so kernel worker threads are included.

mod common;

use executor::backend::CpuBackend;
use executor::generate::{generate, GenerationConfig, Sampling};
use executor::run::{self, ModelSource};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct CountingAllocator;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// The counter is global: the tests of this binary take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn allocations_do_not_grow_with_decode_steps() {
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // One worker: the kernels keep their scratch per thread, and which worker of a larger pool
    // first runs a prefill task (and allocates its scratch there, once) varies from run to run,
    // which would make the counts below differ by a handful for reasons unrelated to decode.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(count_decode_allocations);
}

fn count_decode_allocations() {
    for name in ["opt-tiny-preln", "opt-tiny-postln"] {
        let want = common::expected(name);
        let loaded = run::load(&ModelSource::Checkpoint(common::fixture(name)), false).unwrap();
        let count = |max_new_tokens: usize, sampling: Sampling| {
            let cfg = GenerationConfig {
                max_new_tokens,
                sampling,
                stop_at_eos: false,
            };
            let before = ALLOCATIONS.load(Ordering::Relaxed);
            let out = generate(&loaded.model, &CpuBackend, &want.prompt_ids, &cfg).unwrap();
            let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
            assert_eq!(out.decode_steps, max_new_tokens - 1);
            drop(out);
            allocations
        };
        let sampled = Sampling::Sample {
            temperature: 1.0,
            top_k: Some(40),
            top_p: Some(0.9),
            seed: 3,
        };
        for sampling in [Sampling::Greedy, sampled] {
            // Warm up thread pools and any thread-local kernel scratch at the largest size first.
            count(40, sampling);
            let short = count(4, sampling);
            let long = count(40, sampling);
            assert_eq!(
                short, long,
                "{name} {sampling:?}: {short} allocations for 3 decode steps, {long} for 39"
            );
        }
    }
}

/// In memory, the block schedule allocates all its buffers before the prefill; so do the GPU
/// tiers on the sim device (resident and split weights, device KV cache and hidden rows).
#[test]
fn the_block_schedule_in_memory_allocates_nothing_per_decode_step() {
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    use executor::device::Device;
    use executor::gpu_tier::{GpuPlan, Rates};
    use executor::schedule::{generate_blocks_on, BlockPlan};
    let want = common::expected("opt-tiny-preln");
    let loaded = run::load(
        &ModelSource::Checkpoint(common::fixture("opt-tiny-preln")),
        false,
    )
    .unwrap();
    let mut prompts = want.prompt_ids.clone();
    prompts.push(vec![2, 17, 9]);
    let plan = BlockPlan {
        gpu_batch_size: 1,
        num_gpu_batches: prompts.len(),
        weights_disk: 0.0,
        kv_cache_disk: 0.0,
        activations_disk: 0.0,
        cpu_attention: true,
        offload_parent: std::env::temp_dir(),
        offload_capacity_limit: None,
        compress_kv: false,
    };
    let gpu = GpuPlan {
        weights: 0.5,
        kv_cache: 0.5,
        activations: 0.5,
        kv_cache_cpu: 0.5,
        activations_cpu: 0.5,
        split: planner::policy::Split::uniform(0.3),
        param_manager: false,
        rates: Rates {
            cpu_bytes_per_s: 16e9,
            h2d_bytes_per_s: 12e9,
            disk_bytes_per_s: 1e9,
        },
    };
    let sim = executor::sim::SimDevice::new(64 << 20);
    for device in [None, Some((&sim as &dyn Device, &gpu))] {
        let count = |max_new_tokens: usize| {
            let before = ALLOCATIONS.load(Ordering::Relaxed);
            let (out, stats) = generate_blocks_on(
                &loaded.model,
                &CpuBackend,
                &prompts,
                &common::greedy(max_new_tokens),
                &plan,
                &loaded.weights,
                device,
            )
            .unwrap();
            let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
            drop((out, stats));
            allocations
        };
        count(40);
        let (short, long) = (count(4), count(40));
        let on = if device.is_some() {
            "sim device"
        } else {
            "cpu"
        };
        assert_eq!(
            short, long,
            "{on}: {short} allocations for 3 decode steps, {long} for 39"
        );
    }
}

/// With disk tiers the executor's own buffers are still allocated once, but each I/O request of
/// `storage::IoPool` allocates its completion state and job (an Arc and a Box): the count grows
/// with the requests, not with the data. Bounded here so that a regression (a buffer per step)
/// shows; `--nocapture` prints the figure.
#[test]
fn the_block_schedule_with_disk_allocates_only_per_io_request() {
    use executor::schedule::{generate_blocks, BlockPlan};
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let want = common::expected("opt-tiny-preln");
    let loaded = run::load_placed(
        &ModelSource::Checkpoint(common::fixture("opt-tiny-preln")),
        false,
        0.5,
    )
    .unwrap();
    let parent = tempfile::tempdir().unwrap();
    let plan = BlockPlan {
        gpu_batch_size: 1,
        num_gpu_batches: want.prompt_ids.len(),
        weights_disk: 0.5,
        kv_cache_disk: 1.0,
        activations_disk: 0.5,
        cpu_attention: true,
        offload_parent: parent.path().to_path_buf(),
        offload_capacity_limit: None,
        compress_kv: false,
    };
    let count = |max_new_tokens: usize| {
        let cfg = GenerationConfig {
            max_new_tokens,
            sampling: Sampling::Greedy,
            stop_at_eos: false,
        };
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let (out, _) = generate_blocks(
            &loaded.model,
            &CpuBackend,
            &want.prompt_ids,
            &cfg,
            &plan,
            &loaded.weights,
        )
        .unwrap();
        (
            ALLOCATIONS.load(Ordering::Relaxed) - before,
            out.decode_steps,
        )
    };
    count(10);
    let (short, _) = count(4);
    let (long, steps) = count(20);
    let per_step = (long - short) as f64 / 16.0;
    let batches = want.prompt_ids.len() as f64;
    // Per step and layer (3): up to 6 weight reads, per batch 2 KV reads, 2 KV writes, 1
    // activation read and 1 write; each request a few allocations at most.
    let requests = 3.0 * (6.0 + batches * 6.0);
    eprintln!("{per_step} allocations per decode step ({requests} I/O requests at most)");
    assert!(
        per_step <= 4.0 * requests,
        "{per_step} allocations per step"
    );
    assert_eq!(steps, 19);
}
