//! The executor library's error type.
//!
//! Every variant names the file, tensor or argument at fault, because the person reading the message
//! usually has a multi-gigabyte checkpoint and no debugger: "which file, which tensor, what was
//! expected" is the whole diagnosis.

use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why loading a model or running a generation failed.
#[derive(Debug, Error)]
pub enum ExecError {
    /// A file could not be opened, read or mapped.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file the checkpoint needs is not there.
    #[error("{what} not found: {path}")]
    MissingFile { what: String, path: PathBuf },
    /// A safetensors file whose header or size is inconsistent (truncated, corrupt, hand-edited).
    #[error("corrupt or truncated safetensors file {path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    /// `model.safetensors.index.json` is malformed or points at tensors that are not there.
    #[error("bad shard index {path}: {message}")]
    ShardIndex { path: PathBuf, message: String },
    /// The model needs a tensor the checkpoint does not have.
    #[error("tensor '{name}' not found in {origin}")]
    MissingTensor { name: String, origin: String },
    /// A tensor is stored in an element type the executor cannot compute with.
    #[error("tensor '{name}' in {file} has dtype {found}; expected F32, F16 or BF16")]
    TensorDType {
        name: String,
        file: String,
        found: String,
    },
    /// A tensor's shape disagrees with config.json.
    #[error("tensor '{name}' in {file} has shape {found:?}; config.json implies {expected:?}")]
    TensorShape {
        name: String,
        file: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// config.json is unreadable, not OPT, or has impossible values.
    #[error(transparent)]
    Config(#[from] planner::model::ModelError),
    /// A config field the planner's model spec does not carry is malformed.
    #[error("model config {path}: {message}")]
    ConfigField { path: PathBuf, message: String },
    /// The policy file is unreadable or invalid.
    #[error(transparent)]
    Policy(#[from] planner::policy::PolicyError),
    /// The tokenizer files exist but cannot be used.
    #[error("cannot load tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// Text could not be turned into tokens, or tokens into text.
    #[error("tokenizer: {0}")]
    Tokenize(String),
    /// A prompt does not fit the model's learned positions.
    #[error("prompt {index} has {prompt_tokens} tokens; with {new_tokens} new tokens it needs {needed} positions, but the model has {max_positions} (max_position_embeddings)")]
    PromptTooLong {
        index: usize,
        prompt_tokens: usize,
        new_tokens: usize,
        needed: usize,
        max_positions: usize,
    },
    /// A token id outside the vocabulary.
    #[error("prompt {index}: token id {id} is outside the vocabulary (vocab_size {vocab})")]
    TokenOutOfRange { index: usize, id: u32, vocab: usize },
    /// The request itself is inconsistent (no prompts, an empty prompt, a bad sampling value).
    #[error("{0}")]
    InvalidRequest(String),
    /// The policy asks for something this build or machine cannot do yet.
    #[error("{0}")]
    Unsupported(String),
}

impl ExecError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: &Path, source: std::io::Error) -> ExecError {
        ExecError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Result alias for the executor library.
pub type Result<T, E = ExecError> = std::result::Result<T, E>;
