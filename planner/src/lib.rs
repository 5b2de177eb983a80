//! Strata planner library: model specs, hardware profiles, the cost model, the LP policy search and
//! policy files. The executor links this library for the shared types and for the predictions it
//! reports next to its measurements; the planner never depends on the executor.

pub mod model;
pub mod policy;
pub mod cost;
pub mod memory;
pub mod profile;
pub mod shares;
pub mod solve;
pub mod check;
pub mod paths;
pub mod report;
