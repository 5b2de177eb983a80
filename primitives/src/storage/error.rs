//! Errors of the disk tier.
//!
//! Every variant names the file or directory, and for reads and writes the byte offset and length,
//! because a failure deep inside a multi-gigabyte checkpoint is only diagnosable with "which file,
//! where, how much".

use std::path::PathBuf;
use thiserror::Error;

/// Why a disk-tier operation failed.
#[derive(Debug, Error)]
pub enum StorageError {
    /// A file could not be opened or created.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A read failed at the OS level.
    #[error("read of {len} bytes at offset {offset} of {path} failed: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A write failed at the OS level.
    #[error("write of {len} bytes at offset {offset} of {path} failed: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// First byte written.
        offset: u64,
        /// Bytes written.
        len: u64,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A byte range that does not lie inside the file (a checkpoint header pointing past the end,
    /// or a truncated file).
    #[error("range {offset}..{end} is outside {path}, which has {file_len} bytes", end = offset.saturating_add(*len))]
    OutOfRange {
        /// The file.
        path: PathBuf,
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The file's size.
        file_len: u64,
    },
    /// The file ended before the requested range did (it shrank after it was opened).
    #[error("short read at offset {offset} of {path}: wanted {wanted} bytes, the file gave {got}")]
    ShortRead {
        /// The file.
        path: PathBuf,
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        wanted: u64,
        /// Bytes read before end of file.
        got: u64,
    },
    /// An aligned buffer could not be allocated.
    #[error("cannot allocate an aligned buffer of {bytes} bytes")]
    Alloc {
        /// Size asked for.
        bytes: usize,
    },
    /// The offload directory's disk (or its configured capacity limit) cannot hold what the policy
    /// puts there. Nothing was left behind: the file that needed the space was removed.
    #[error(
        "not enough space in offload directory {dir}: {needed} bytes needed, {available} bytes available{limit}",
        limit = if *limited { " under the configured capacity limit" } else { "" }
    )]
    NoSpace {
        /// The offload directory.
        dir: PathBuf,
        /// Bytes the failing allocation needed.
        needed: u64,
        /// Bytes that were free (on the filesystem or under the limit).
        available: u64,
        /// Whether the limit was a configured capacity rather than the filesystem.
        limited: bool,
    },
    /// The offload directory or one of its files could not be created or removed.
    #[error("offload directory {path}: {what}: {source}")]
    Dir {
        /// The directory or file.
        path: PathBuf,
        /// The operation that failed.
        what: &'static str,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A file name for the offload directory that would escape it or is empty.
    #[error("bad offload file name {name:?}: must be a plain non-empty file name")]
    BadName {
        /// The name given.
        name: String,
    },
    /// The I/O pool's workers are gone (the pool was shut down or a worker panicked).
    #[error("the I/O thread pool is shut down; {what} was not done")]
    PoolClosed {
        /// What the request was.
        what: String,
    },
    /// The Ctrl-C handler could not be installed (another handler owns the signals).
    #[error("cannot install the offload-directory cleanup signal handler: {0}")]
    Signal(String),
}

/// Shorthand for disk-tier results.
pub type Result<T> = std::result::Result<T, StorageError>;
