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
        /// The file concerned.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A file the checkpoint needs is not there.
    #[error("{what} not found: {path}")]
    MissingFile {
        /// Which file it is (weights, a shard).
        what: String,
        /// The file concerned.
        path: PathBuf,
    },
    /// A safetensors file whose header or size is inconsistent (truncated, corrupt, hand-edited).
    #[error("corrupt or truncated safetensors file {path}: {message}")]
    Safetensors {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// `model.safetensors.index.json` is malformed or points at tensors that are not there.
    #[error("bad shard index {path}: {message}")]
    ShardIndex {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The model needs a tensor the checkpoint does not have.
    #[error("tensor '{name}' not found in {origin}")]
    MissingTensor {
        /// Full tensor name.
        name: String,
        /// The checkpoint or store searched.
        origin: String,
    },
    /// A tensor is stored in an element type the executor cannot compute with.
    #[error("tensor '{name}' in {file} has dtype {found}; expected F32, F16 or BF16")]
    TensorDType {
        /// Full tensor name.
        name: String,
        /// The file holding the tensor.
        file: String,
        /// What the file holds.
        found: String,
    },
    /// A tensor's shape disagrees with config.json.
    #[error("tensor '{name}' in {file} has shape {found:?}; config.json implies {expected:?}")]
    TensorShape {
        /// Full tensor name.
        name: String,
        /// The file holding the tensor.
        file: String,
        /// What config.json implies.
        expected: Vec<usize>,
        /// What the file holds.
        found: Vec<usize>,
    },
    /// config.json is unreadable, not OPT, or has impossible values.
    #[error(transparent)]
    Config(#[from] planner::model::ModelError),
    /// A config field the planner's model spec does not carry is malformed.
    #[error("model config {path}: {message}")]
    ConfigField {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The policy file is unreadable or invalid.
    #[error(transparent)]
    Policy(#[from] planner::policy::PolicyError),
    /// The tokenizer files exist but cannot be used.
    #[error("cannot load tokenizer {path}: {message}")]
    Tokenizer {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Text could not be turned into tokens, or tokens into text.
    #[error("tokenizer: {0}")]
    Tokenize(String),
    /// A prompt does not fit the model's learned positions.
    #[error("prompt {index} has {prompt_tokens} tokens; with {new_tokens} new tokens it needs {needed} positions, but the model has {max_positions} (max_position_embeddings)")]
    PromptTooLong {
        /// Position of the prompt in the batch, from 0.
        index: usize,
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Tokens to generate.
        new_tokens: usize,
        /// Positions the prompt and generation need.
        needed: usize,
        /// Positions the model has.
        max_positions: usize,
    },
    /// A token id outside the vocabulary.
    #[error("prompt {index}: token id {id} is outside the vocabulary (vocab_size {vocab})")]
    TokenOutOfRange {
        /// Position of the prompt in the batch, from 0.
        index: usize,
        /// The offending token id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// The request itself is inconsistent (no prompts, an empty prompt, a bad sampling value).
    #[error("{0}")]
    InvalidRequest(String),
    /// The policy asks for something this build or machine cannot do yet.
    #[error("{0}")]
    Unsupported(String),
    /// The disk tier failed (the message names the file, offset and sizes).
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    /// A device (the `sim` device, or a GPU) refused an allocation or an operation.
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    /// The host has less memory available than the policy's memory plan needs.
    #[error("the policy needs {needed_gib:.3} GiB of CPU memory ({detail}) but only {available_gib:.3} GiB is available (MemAvailable); move more weights, KV cache or activations to disk, or use a smaller block")]
    OutOfMemory {
        /// GiB the memory plan asks for on the CPU tier.
        needed_gib: f64,
        /// GiB the OS says it can give.
        available_gib: f64,
        /// The plan's largest items.
        detail: String,
    },
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
