//! Strata: run large language models that do not fit in GPU memory.
//!
//! This root package only hosts the end-to-end tests in `tests/`, which drive the two programs
//! (`planner` and `executor`); the code lives in those crates.
