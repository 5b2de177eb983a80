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

#[test]
fn allocations_do_not_grow_with_decode_steps() {
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
