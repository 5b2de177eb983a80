//! Strata's primitives: the pieces of work whose speed the cost model is about.
//!
//! [`kernels`] (CPU matrix products and attention over 16-bit weights read in place), [`quant`]
//! (FlexGen's 4-bit group-wise compression and kernels that work from it) and [`storage`] (direct
//! disk reads and writes on I/O threads, the self-removing offload directory). The executor runs
//! them; `planner profile` times them through [`measure`], so a profile measures the code that will
//! run. They live in their own crate because the planner must not depend on the executor (design
//! section 3).

pub mod gpu;
pub mod kernels;
pub mod measure;
pub mod quant;
pub mod storage;
