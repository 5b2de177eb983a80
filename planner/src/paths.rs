//! How policies name files: profile and model-config paths are stored relative to the repository
//! root, so a policy checked into `policies/` resolves the same way from any clone.

use crate::model::{ModelError, ModelSpec};
use crate::profile::{Profile, ProfileError, EMBEDDED_PREFIX};
use std::path::{Path, PathBuf};

/// The nearest ancestor of `start` (a file or directory) that holds a `.git` entry: the repository
/// root. `None` outside a repository.
pub fn repository_root(start: &Path) -> Option<PathBuf> {
    let absolute = std::fs::canonicalize(start).ok()?;
    absolute
        .ancestors()
        .find(|dir| dir.join(".git").exists())
        .map(Path::to_path_buf)
}

/// How a policy should record `path`: relative to the repository root when the file is inside one
/// (with `/` separators), otherwise absolute.
pub fn recorded_path(path: &Path) -> String {
    let absolute = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if let Some(root) = repository_root(&absolute) {
        if let Ok(rel) = absolute.strip_prefix(&root) {
            return rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
        }
    }
    absolute.display().to_string()
}

/// Finds a path recorded in a policy: absolute paths as they are; relative ones against each
/// ancestor of the policy's directory in turn (the repository root is one of them), then against
/// the current directory.
pub fn resolve_recorded(policy_path: &Path, recorded: &str) -> Option<PathBuf> {
    let rec = Path::new(recorded);
    if rec.is_absolute() {
        return rec.exists().then(|| rec.to_path_buf());
    }
    let policy_abs = std::fs::canonicalize(policy_path).ok();
    if let Some(abs) = policy_abs {
        for dir in abs.ancestors().skip(1) {
            let candidate = dir.join(rec);
            if candidate.exists() {
                return Some(candidate);
            }
        }
    }
    rec.exists().then(|| rec.to_path_buf())
}

/// Why a policy's profile or model could not be found.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("policy {policy}: profile '{profile}' not found relative to the policy's folders or the current directory")]
    ProfileMissing { policy: String, profile: String },
    #[error("policy {policy}: model config '{config}' not found relative to the policy's folders or the current directory")]
    ConfigMissing { policy: String, config: String },
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Loads the profile a policy names (`builtin:NAME` or a recorded path).
pub fn load_policy_profile(policy_path: &Path, recorded: &str) -> Result<Profile, ReferenceError> {
    if let Some(name) = recorded.strip_prefix(EMBEDDED_PREFIX) {
        return Ok(Profile::embedded(name)?);
    }
    let path =
        resolve_recorded(policy_path, recorded).ok_or_else(|| ReferenceError::ProfileMissing {
            policy: policy_path.display().to_string(),
            profile: recorded.to_string(),
        })?;
    Ok(Profile::load(&path)?)
}

/// Loads the model a policy names: its recorded config, or the built-in of that name.
pub fn load_policy_model(
    policy_path: &Path,
    name: &str,
    config: Option<&str>,
) -> Result<ModelSpec, ReferenceError> {
    match config {
        None => Ok(ModelSpec::builtin(name)?),
        Some(c) => {
            let path =
                resolve_recorded(policy_path, c).ok_or_else(|| ReferenceError::ConfigMissing {
                    policy: policy_path.display().to_string(),
                    config: c.to_string(),
                })?;
            let mut model = ModelSpec::from_hf_config(&path)?;
            model.name = name.to_string();
            Ok(model)
        }
    }
}
