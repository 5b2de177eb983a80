//! The offload directory: where a policy's disk-resident KV cache and activations live.
//!
//! It is a fresh subdirectory of a parent the user chose (policy field or `--offload-dir`), so
//! two runs never share files and removing it cannot touch anything else. It is removed when the
//! [`OffloadDir`] is dropped and, because a long generation is often interrupted, also on
//! Ctrl-C / SIGTERM / SIGHUP: every live directory is in a process-wide registry that the signal
//! handler empties before exiting with status 130. Files are preallocated to their full size
//! when created, so a disk that cannot hold what the policy puts there fails at that moment with
//! the numbers, and the half-made file is removed (nothing is left behind).

use super::aligned::align_up;
use super::direct::DirectFile;
use super::error::{Result, StorageError};
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Directories to remove if the process is interrupted.
static LIVE_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Outcome of installing the signal handler (once per process).
static HANDLER: OnceLock<std::result::Result<(), String>> = OnceLock::new();
/// Distinguishes directories created by one process.
static SEQ: AtomicU64 = AtomicU64::new(0);

fn live_dirs() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    LIVE_DIRS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes every live offload directory now. For programs that install their own Ctrl-C handler
/// (only one handler per process is possible): call this from it before exiting.
pub fn cleanup_live_dirs() {
    let dirs: Vec<PathBuf> = live_dirs().drain(..).collect();
    for d in dirs {
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// Installs (once) the handler for SIGINT, SIGTERM and SIGHUP that removes the live offload
/// directories and exits with status 130. [`OffloadDir::create`] calls it; an error means some
/// other code owns the signals, and then that code must call [`cleanup_live_dirs`].
pub fn install_cleanup_handler() -> Result<()> {
    HANDLER
        .get_or_init(|| {
            // ctrlc runs this on its own thread, not in signal context, so removing files is fine.
            ctrlc::set_handler(|| {
                cleanup_live_dirs();
                std::process::exit(130);
            })
            .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(StorageError::Signal)
}

/// Bytes free for unprivileged users on the filesystem holding `path`.
fn fs_available(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is a plain struct of integers; zeroed is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and st a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// A unique, self-removing directory for disk-resident KV cache and activations.
#[derive(Debug)]
pub struct OffloadDir {
    path: PathBuf,
    limit: Option<u64>,
    reserved: Arc<AtomicU64>,
    signal: Option<String>,
}

impl OffloadDir {
    /// Creates `parent/strata-offload-<pid>-<n>` (the parent must exist) and registers it for
    /// removal on Ctrl-C. If the signal handler cannot be installed the directory is still made;
    /// [`OffloadDir::signal_cleanup`] says why Ctrl-C will not remove it.
    pub fn create(parent: &Path) -> Result<OffloadDir> {
        let signal = install_cleanup_handler().err().map(|e| e.to_string());
        let pid = std::process::id();
        loop {
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let path = parent.join(format!("strata-offload-{pid}-{n}"));
            // Register first: a signal between mkdir and registration would leave it behind.
            live_dirs().push(path.clone());
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    return Ok(OffloadDir {
                        path,
                        limit: None,
                        reserved: Arc::new(AtomicU64::new(0)),
                        signal,
                    })
                }
                Err(e) => {
                    live_dirs().retain(|p| p != &path);
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        continue; // left by a crashed process with our pid; take the next name
                    }
                    return Err(StorageError::Dir {
                        path,
                        what: "cannot create",
                        source: e,
                    });
                }
            }
        }
    }

    /// Caps the bytes this directory may hold, below what the disk has (tests use it to exercise
    /// the full-disk path; a user can use it to protect a shared disk).
    pub fn with_capacity_limit(mut self, bytes: u64) -> OffloadDir {
        self.limit = Some(bytes);
        self
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes held by the files created so far (each rounded up to 4 KiB).
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
    }

    /// `None` when Ctrl-C removes this directory; otherwise why not (to print).
    pub fn signal_cleanup(&self) -> Option<&str> {
        self.signal.as_deref()
    }

    fn no_space(&self, needed: u64, limited: bool) -> StorageError {
        let available = if limited {
            self.limit
                .unwrap_or(0)
                .saturating_sub(self.reserved.load(Ordering::Relaxed))
        } else {
            fs_available(&self.path).unwrap_or(0)
        };
        StorageError::NoSpace {
            dir: self.path.clone(),
            needed,
            available,
            limited,
        }
    }

    /// Creates file `name` of `size` bytes, allocated on disk now (so a full disk fails here, with
    /// the numbers, rather than in the middle of a generation), and opened for direct I/O where
    /// the filesystem allows. On any failure the file is removed.
    pub fn create_file(&self, name: &str, size: u64) -> Result<OffloadFile> {
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return Err(StorageError::BadName { name: name.into() });
        }
        let physical = align_up(size.max(1));
        if let Some(limit) = self.limit {
            // Reserve under the limit atomically so concurrent creations cannot overshoot it.
            let mut cur = self.reserved.load(Ordering::Relaxed);
            loop {
                if cur + physical > limit {
                    return Err(self.no_space(physical, true));
                }
                match self.reserved.compare_exchange(
                    cur,
                    cur + physical,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break,
                    Err(now) => cur = now,
                }
            }
        } else {
            self.reserved.fetch_add(physical, Ordering::Relaxed);
        }
        let path = self.path.join(name);
        let unreserve = || {
            self.reserved.fetch_sub(physical, Ordering::Relaxed);
        };
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => f,
            Err(source) => {
                unreserve();
                return Err(StorageError::Dir {
                    path,
                    what: "cannot create file",
                    source,
                });
            }
        };
        let fail = |e: StorageError| {
            let _ = std::fs::remove_file(&path);
            unreserve();
            e
        };
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: plain syscall on a descriptor we own.
            let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, physical as libc::off_t) };
            if rc == libc::ENOSPC || rc == libc::EFBIG {
                return Err(fail(self.no_space(physical, false)));
            }
            if rc == libc::EOPNOTSUPP || rc == libc::EINVAL {
                // No preallocation on this filesystem: size it sparsely (writes may then hit
                // ENOSPC later, which write_at reports with the same NoSpace error).
                if let Err(source) = file.set_len(physical) {
                    return Err(fail(StorageError::Dir {
                        path: path.clone(),
                        what: "cannot size file",
                        source,
                    }));
                }
            } else if rc != 0 {
                return Err(fail(StorageError::Dir {
                    path: path.clone(),
                    what: "cannot allocate file",
                    source: std::io::Error::from_raw_os_error(rc),
                }));
            }
        }
        drop(file);
        let mut df = match DirectFile::open_rw(&path, true) {
            Ok(f) => f,
            Err(e) => return Err(fail(e)),
        };
        df.set_len_known(physical);
        Ok(OffloadFile {
            file: Arc::new(df),
            dir: self.path.clone(),
            path,
            size,
            physical,
            reserved: self.reserved.clone(),
        })
    }
}

impl Drop for OffloadDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!(
                    "warning: could not remove offload directory {}: {e}",
                    self.path.display()
                );
            }
        }
        live_dirs().retain(|p| p != &self.path);
    }
}

/// A preallocated file in an [`OffloadDir`]: a slot for one kind of disk-resident tensor.
///
/// Removed (and its space released to the directory's limit) when dropped.
#[derive(Debug)]
pub struct OffloadFile {
    file: Arc<DirectFile>,
    dir: PathBuf,
    path: PathBuf,
    size: u64,
    physical: u64,
    reserved: Arc<AtomicU64>,
}

impl OffloadFile {
    /// The underlying file, to hand to [`super::IoPool::read`] / [`super::IoPool::write`].
    pub fn file(&self) -> &Arc<DirectFile> {
        &self.file
    }

    /// The size asked for at creation (the file on disk is rounded up to 4 KiB).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `Some(reason)` if this file uses buffered instead of direct I/O.
    pub fn fallback(&self) -> Option<&str> {
        self.file.fallback()
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(StorageError::OutOfRange {
                path: self.path.clone(),
                offset,
                len,
                file_len: self.size,
            }),
        }
    }

    /// Writes `data` at `offset`; fastest when offset, length and address are 4 KiB-aligned.
    /// A full disk (possible only where preallocation is unsupported) is reported as
    /// [`StorageError::NoSpace`] naming the directory.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        self.file.write_at(offset, data).map_err(|e| match e {
            StorageError::Write { ref source, .. }
                if source.raw_os_error() == Some(libc::ENOSPC) =>
            {
                StorageError::NoSpace {
                    dir: self.dir.clone(),
                    needed: data.len() as u64,
                    available: fs_available(&self.dir).unwrap_or(0),
                    limited: false,
                }
            }
            other => other,
        })
    }

    /// Reads `offset..offset+len` (see [`DirectFile::read_range`]).
    pub fn read_range(&self, offset: u64, len: usize) -> Result<super::AlignedRead> {
        self.check(offset, len as u64)?;
        self.file.read_range(offset, len)
    }
}

impl Drop for OffloadFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        self.reserved.fetch_sub(self.physical, Ordering::Relaxed);
    }
}
