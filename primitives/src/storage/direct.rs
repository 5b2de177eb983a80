//! Files read (and, for the offload directory, written) with `O_DIRECT` where the filesystem
//! allows it, and with buffered I/O plus `posix_fadvise(DONTNEED)` where it does not.
//!
//! Direct I/O keeps checkpoint reads out of the page cache: the page cache would otherwise both
//! flatter the disk tier's measured bandwidth and eat the host memory the policy budgeted for
//! weights and KV cache. Every direct transfer uses an [`ALIGN`]-aligned buffer, file offset and
//! length, so an arbitrary byte range is read as its aligned superset and handed out as a
//! sub-slice of the buffer (no second copy).

use super::aligned::{align_down, align_up, AlignedBuf, ALIGN};
use super::error::{Result, StorageError};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// How a [`DirectFile`] moves bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoMode {
    /// `O_DIRECT`: no page cache involved.
    Direct,
    /// Buffered I/O, because direct I/O was refused or not asked for; `reason` says which (the
    /// executor prints it, since measured disk bandwidth means something else in this mode).
    /// Pages read are dropped from the cache with `posix_fadvise(DONTNEED)` after each read.
    Buffered {
        /// Why direct I/O is not used, e.g. "O_DIRECT refused by the filesystem (EINVAL)".
        reason: String,
    },
}

/// An open file on the disk tier: a checkpoint's safetensors file read in place, or a file of the
/// offload directory.
///
/// Shared between I/O threads behind an `Arc`: all operations are positioned (`pread`/`pwrite`)
/// and take `&self`.
#[derive(Debug)]
pub struct DirectFile {
    file: File,
    path: PathBuf,
    len: u64,
    mode: IoMode,
}

/// Bytes of a file range, read as the aligned superset into one aligned buffer.
///
/// `bytes()` is exactly the requested range, borrowed from the buffer at `start`.
#[derive(Debug)]
pub struct AlignedRead {
    /// The buffer holding the aligned superset of the range.
    pub buf: AlignedBuf,
    /// Where the requested bytes begin inside `buf`.
    pub start: usize,
    /// How many bytes were requested.
    pub len: usize,
}

impl AlignedRead {
    /// The requested bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf.as_slice()[self.start..self.start + self.len]
    }
}

/// The `errno` values with which filesystems refuse `O_DIRECT` (tmpfs on older kernels, some
/// FUSE and network filesystems) at open time or on the first aligned transfer.
fn refuses_direct(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
    )
}

impl DirectFile {
    /// Opens `path` for reading, with `O_DIRECT` if the filesystem accepts it (checked by an
    /// aligned probe read, because some filesystems accept the flag at open and refuse the read),
    /// else buffered with the reason recorded in [`DirectFile::mode`].
    pub fn open(path: &Path) -> Result<DirectFile> {
        Self::open_impl(path, false, true)
    }

    /// Opens `path` for buffered reading, e.g. to compare against direct reads or because the
    /// caller knows the file is hot in memory; `reason` is reported by [`DirectFile::fallback`].
    pub fn open_buffered(path: &Path, reason: &str) -> Result<DirectFile> {
        let mut f = Self::open_impl(path, false, false)?;
        f.mode = IoMode::Buffered {
            reason: reason.to_string(),
        };
        Ok(f)
    }

    /// Opens an existing file read-write (the offload directory's files), direct where possible.
    pub(crate) fn open_rw(path: &Path, direct: bool) -> Result<DirectFile> {
        Self::open_impl(path, true, direct)
    }

    fn open_impl(path: &Path, write: bool, direct: bool) -> Result<DirectFile> {
        let plain = || {
            OpenOptions::new()
                .read(true)
                .write(write)
                .open(path)
                .map_err(|source| StorageError::Open {
                    path: path.to_path_buf(),
                    source,
                })
        };
        let (file, mut mode) = if direct {
            match OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(libc::O_DIRECT)
                .open(path)
            {
                Ok(f) => (f, IoMode::Direct),
                Err(e) if refuses_direct(&e) => (
                    plain()?,
                    IoMode::Buffered {
                        reason: format!("O_DIRECT refused by the filesystem at open ({e})"),
                    },
                ),
                Err(source) => {
                    return Err(StorageError::Open {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        } else {
            (
                plain()?,
                IoMode::Buffered {
                    reason: "buffered I/O requested".into(),
                },
            )
        };
        let len = file
            .metadata()
            .map_err(|source| StorageError::Open {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let mut f = DirectFile {
            file,
            path: path.to_path_buf(),
            len,
            mode: mode.clone(),
        };
        if mode == IoMode::Direct && len > 0 {
            // Probe: one aligned block. Some filesystems accept the flag and refuse transfers.
            let mut probe = AlignedBuf::new(ALIGN)?;
            if let Err(e) = f.file.read_at(probe.as_mut_slice(), 0) {
                if refuses_direct(&e) {
                    mode = IoMode::Buffered {
                        reason: format!("O_DIRECT refused by the filesystem on read ({e})"),
                    };
                    f.file = plain()?;
                    f.mode = mode;
                } else {
                    return Err(StorageError::Read {
                        path: f.path.clone(),
                        offset: 0,
                        len: ALIGN as u64,
                        source: e,
                    });
                }
            }
        }
        Ok(f)
    }

    /// The file's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size in bytes when it was opened (checkpoint files do not change under us; the
    /// offload directory's files are preallocated to their final size).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Direct or buffered, and why buffered.
    pub fn mode(&self) -> &IoMode {
        &self.mode
    }

    /// `Some(reason)` when this file fell back to (or was opened with) buffered I/O: the line the
    /// executor prints so that a reader of measured disk bandwidth knows what it measured.
    pub fn fallback(&self) -> Option<&str> {
        match &self.mode {
            IoMode::Direct => None,
            IoMode::Buffered { reason } => Some(reason),
        }
    }

    /// Bytes of the aligned superset of `offset..offset+len`, i.e. the buffer capacity that
    /// [`DirectFile::read_range_into`] needs.
    pub fn superset_len(offset: u64, len: usize) -> usize {
        (align_up(offset + len as u64) - align_down(offset)) as usize
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(StorageError::OutOfRange {
                path: self.path.clone(),
                offset,
                len,
                file_len: self.len,
            }),
        }
    }

    /// Reads `offset..offset+len` into a newly allocated aligned buffer. For repeated reads use
    /// [`DirectFile::read_range_into`] with a reused buffer, or the I/O pool.
    pub fn read_range(&self, offset: u64, len: usize) -> Result<AlignedRead> {
        self.check_range(offset, len as u64)?;
        let mut buf = AlignedBuf::new(Self::superset_len(offset, len))?;
        let start = self.read_range_into(offset, len, &mut buf)?;
        Ok(AlignedRead { buf, start, len })
    }

    /// Reads `offset..offset+len` into `buf` (which must hold [`DirectFile::superset_len`] bytes)
    /// and returns where the requested bytes start inside `buf`.
    pub fn read_range_into(&self, offset: u64, len: usize, buf: &mut AlignedBuf) -> Result<usize> {
        self.check_range(offset, len as u64)?;
        let need = Self::superset_len(offset, len);
        if buf.capacity() < need {
            return Err(StorageError::Read {
                path: self.path.clone(),
                offset,
                len: len as u64,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "buffer of {} bytes cannot hold the aligned range of {need} bytes",
                        buf.capacity()
                    ),
                ),
            });
        }
        let aoff = align_down(offset);
        let start = (offset - aoff) as usize;
        // SAFETY: buf is exclusively borrowed and holds at least `need` bytes.
        unsafe { self.read_aligned_raw(aoff, buf.as_mut_ptr(), need, offset, len as u64)? };
        Ok(start)
    }

    /// Reads the aligned block range `aoff..aoff+alen` into `dst`, stopping early only at end of
    /// file; fails unless the bytes `want_off..want_off+want_len` (inside the block range) arrived.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `alen` bytes, [`ALIGN`]-aligned, and not accessed by
    /// anyone else during the call; `aoff` and `alen` must be multiples of [`ALIGN`].
    pub(crate) unsafe fn read_aligned_raw(
        &self,
        aoff: u64,
        dst: *mut u8,
        alen: usize,
        want_off: u64,
        want_len: u64,
    ) -> Result<()> {
        debug_assert!(
            aoff.is_multiple_of(ALIGN as u64)
                && alen.is_multiple_of(ALIGN)
                && (dst as usize).is_multiple_of(ALIGN)
        );
        let mut done = 0usize;
        while done < alen {
            // SAFETY: dst..dst+alen is valid and exclusively ours per the contract.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    dst.add(done) as *mut libc::c_void,
                    alen - done,
                    (aoff + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(StorageError::Read {
                    path: self.path.clone(),
                    offset: aoff + done as u64,
                    len: (alen - done) as u64,
                    source: e,
                });
            }
            if n == 0 {
                break; // end of file
            }
            done += n as usize;
        }
        let need = (want_off + want_len - aoff) as usize;
        if done < need {
            return Err(StorageError::ShortRead {
                path: self.path.clone(),
                offset: want_off,
                wanted: want_len,
                got: (done as u64).saturating_sub(want_off - aoff),
            });
        }
        if let IoMode::Buffered { .. } = self.mode {
            // Drop what we just read from the page cache, so buffered reads neither flatter the
            // measured bandwidth of the next pass nor hold host memory the policy did not plan.
            // SAFETY: plain syscall on our open descriptor; failure only means pages stay cached.
            unsafe {
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    aoff as libc::off_t,
                    done as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset` (the offload directory's files). A direct file takes aligned
    /// transfers as they are; unaligned ones go through an aligned bounce buffer, reading the
    /// partial edge blocks first (read-modify-write), so callers that lay their slots out on
    /// [`ALIGN`] boundaries get the fast path.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let aligned = offset.is_multiple_of(ALIGN as u64)
            && data.len().is_multiple_of(ALIGN)
            && (data.as_ptr() as usize).is_multiple_of(ALIGN);
        if self.mode != IoMode::Direct || aligned {
            return self.pwrite_all(offset, data);
        }
        let aoff = align_down(offset);
        let aend = align_up(offset + data.len() as u64);
        let mut bounce = AlignedBuf::new((aend - aoff) as usize)?;
        let head_partial = aoff < offset;
        let tail_partial = offset + data.len() as u64 != aend;
        if head_partial {
            let n = (self.len - aoff).min(ALIGN as u64);
            // SAFETY: bounce holds at least one block; we have it exclusively.
            unsafe { self.read_aligned_raw(aoff, bounce.as_mut_ptr(), ALIGN, aoff, n)? };
        }
        if tail_partial && (aend - ALIGN as u64 != aoff || !head_partial) {
            let last = aend - ALIGN as u64;
            let n = (self.len - last).min(ALIGN as u64);
            let at = (last - aoff) as usize;
            // SAFETY: `at + ALIGN` is within bounce; exclusive access.
            unsafe { self.read_aligned_raw(last, bounce.as_mut_ptr().add(at), ALIGN, last, n)? };
        }
        let start = (offset - aoff) as usize;
        bounce.as_mut_slice()[start..start + data.len()].copy_from_slice(data);
        // Writing the whole last block may extend past the file's end; the file is preallocated
        // in whole blocks by the offload directory, and a direct write must be whole blocks.
        self.pwrite_all(aoff, bounce.as_slice())
    }

    fn pwrite_all(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, offset)
            .map_err(|source| StorageError::Write {
                path: self.path.clone(),
                offset,
                len: data.len() as u64,
                source,
            })
    }

    /// Records the size after preallocation.
    pub(crate) fn set_len_known(&mut self, len: u64) {
        self.len = len;
    }
}
