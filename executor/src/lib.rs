//! Strata executor library: runs a model exactly as a planner policy says.
pub mod kernels;
