//! Strata planner library: model specs, hardware profiles, the cost model, the LP policy search and
//! policy files. The executor links this library for the shared types and for the predictions it
//! reports next to its measurements; the planner never depends on the executor.

pub mod calibrate;
pub mod check;
pub mod cost;
pub mod host;
pub mod memory;
pub mod model;
pub mod paths;
pub mod policy;
pub mod profile;
pub mod report;
pub mod shares;
pub mod solve;
