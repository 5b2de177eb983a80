//! Helpers shared by the end-to-end tests: where the repository and the two programs are.

use std::path::{Path, PathBuf};

/// The repository root (the `strata` package's manifest directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A workspace binary built in the same target directory as the running test: `cargo test
/// --workspace` builds `planner` and `executor` for their own CLI tests.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in <target>/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo test --workspace`, which builds both programs",
        path.display()
    );
    path
}
