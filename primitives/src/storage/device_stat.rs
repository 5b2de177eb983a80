//! The kernel's own counters for the block device under a file (Linux `/sys/dev/block/M:m/stat`).
//!
//! The executor's I/O threads time their own reads, but on a virtual disk whose speed moves by
//! minute and by block range, a bandwidth probed before a run is no bound on what the run gets.
//! The block layer's counters, read at the start and end of a stage, say what the device did in
//! that stage: bytes read and the time it had requests in flight (`io_ticks`), whoever sent them.

use std::path::{Path, PathBuf};

/// The block device holding a file, found from the file's `st_dev`.
#[derive(Debug, Clone)]
pub struct BlockDevice {
    /// Kernel name, e.g. `vda` or `nvme0n1p2` (from the device's `uevent`).
    pub name: String,
    stat: PathBuf,
}

/// One reading of a device's cumulative counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCounters {
    /// Read requests completed (after merging).
    pub reads: u64,
    /// Bytes read (sectors of 512 bytes).
    pub read_bytes: u64,
    /// Milliseconds with at least one request in flight (reads or writes).
    pub busy_ms: u64,
}

/// What a device did between two readings.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DeviceActivity {
    /// Read requests completed.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Seconds with requests in flight.
    pub busy_s: f64,
}

impl BlockDevice {
    /// The device under `path`, or `None` where there is none to read (not Linux, a file system
    /// without a block device such as tmpfs or overlayfs, or no `/sys`).
    pub fn for_path(path: &Path) -> Option<BlockDevice> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(path).ok()?.dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let dir = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let name = std::fs::read_to_string(dir.join("uevent"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("DEVNAME=").map(str::to_string))?;
        let device = BlockDevice {
            name,
            stat: dir.join("stat"),
        };
        device.sample().map(|_| device)
    }

    /// Reads the counters now; `None` if the file cannot be read or parsed.
    pub fn sample(&self) -> Option<DeviceCounters> {
        parse_stat(&std::fs::read_to_string(&self.stat).ok()?)
    }
}

impl DeviceCounters {
    /// The activity from `earlier` to `self` (counters that went backwards count as zero).
    pub fn since(&self, earlier: &DeviceCounters) -> DeviceActivity {
        DeviceActivity {
            reads: self.reads.saturating_sub(earlier.reads),
            read_bytes: self.read_bytes.saturating_sub(earlier.read_bytes),
            busy_s: self.busy_ms.saturating_sub(earlier.busy_ms) as f64 / 1e3,
        }
    }
}

/// Parses a `stat` line (Documentation/block/stat.rst): field 1 reads completed, field 3 sectors
/// read, field 10 io_ticks in ms.
fn parse_stat(text: &str) -> Option<DeviceCounters> {
    let f: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    (f.len() >= 10).then(|| DeviceCounters {
        reads: f[0],
        read_bytes: f[2] * 512,
        busy_ms: f[9],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_and_differences_do_not_underflow() {
        // A real line from the development VM's /sys/block/vda/stat.
        let line = "  123 4 2048 50 7 0 56 9 0 1500 60 0 0 0 0 0 0\n";
        let c = parse_stat(line).unwrap();
        assert_eq!((c.reads, c.read_bytes, c.busy_ms), (123, 2048 * 512, 1500));
        let later = DeviceCounters {
            reads: 130,
            read_bytes: c.read_bytes + 4096,
            busy_ms: 2000,
        };
        let a = later.since(&c);
        assert_eq!((a.reads, a.read_bytes), (7, 4096));
        assert!((a.busy_s - 0.5).abs() < 1e-12);
        assert_eq!(c.since(&later).read_bytes, 0);
        assert!(parse_stat("1 2 3").is_none());
        assert!(parse_stat("a b c d e f g h i j").is_none());
    }

    #[test]
    fn the_device_under_a_file_is_found_or_absent_without_error() {
        // On Linux with a block-backed temp dir this finds a device whose counters read back;
        // elsewhere (tmpfs, containers without /sys) it is None. Neither may panic.
        let dir = std::env::temp_dir();
        if let Some(d) = BlockDevice::for_path(&dir) {
            assert!(!d.name.is_empty());
            let a = d.sample().unwrap();
            let b = d.sample().unwrap();
            assert!(b.busy_ms >= a.busy_ms && b.read_bytes >= a.read_bytes);
        } else {
            eprintln!("no block device under {}: skipped", dir.display());
        }
    }
}
