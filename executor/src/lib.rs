//! Strata executor library: runs a model exactly as a planner policy says.
//!
//! Layout: [`weights`] (where tensors come from: a memory-mapped checkpoint or random weights),
//! [`models`] (one file per model family, written against [`backend::Backend`]), [`kernels`] (the
//! CPU backend's arithmetic), [`generate`] (batching, KV cache, sampling), [`run`] (policy checks and
//! the end-to-end run the command line drives), [`report`] (what a run measured), [`schedule`]
//! (the block schedule over CPU and disk), [`gpu_tier`] (its GPU tiers on a [`device::Device`],
//! such as the CPU-backed [`sim`] device).

pub mod backend;
pub mod cuda;
pub mod device;
pub mod error;
pub mod generate;
pub mod gpu_tier;
pub mod models;
pub mod report;
pub mod rng;
pub mod run;
pub mod schedule;
pub mod sim;
pub mod tokenizer;
pub mod weights;

/// The CPU kernels, compression and disk I/O live in the `primitives` crate (shared with
/// `planner profile`); re-exported so executor code and users keep one path.
pub use primitives::{kernels, quant, storage};

pub use error::{ExecError, Result};
