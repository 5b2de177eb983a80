//! Tests of the disk tier on small files (fast, deterministic).

use super::*;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Arc;

/// Byte `i` of the test pattern: not periodic at any power of two, so misplaced blocks show.
fn pat(i: u64) -> u8 {
    (i.wrapping_mul(2654435761) >> 13) as u8
}

fn make_file(dir: &Path, name: &str, len: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    let data: Vec<u8> = (0..len).map(pat).collect();
    std::fs::File::create(&p).unwrap().write_all(&data).unwrap();
    p
}

fn ranges(len: u64) -> Vec<(u64, usize)> {
    vec![
        (0, 0),
        (0, 1),
        (1, 4095),
        (4095, 2),
        (4096, 4096),
        (5000, 7000),
        (len - 1, 1),
        (0, len as usize),
        (123, (len - 200) as usize),
    ]
}

#[test]
fn unaligned_ranges_read_exactly_direct_and_buffered() {
    let td = tempfile::tempdir().unwrap();
    let len = 3 * 4096 + 123;
    let p = make_file(td.path(), "a.bin", len);
    let direct = DirectFile::open(&p).unwrap();
    let buffered = DirectFile::open_buffered(&p, "test").unwrap();
    assert_eq!(buffered.fallback(), Some("test"));
    for f in [&direct, &buffered] {
        assert_eq!(f.len(), len);
        for (off, n) in ranges(len) {
            let r = f.read_range(off, n).unwrap();
            let want: Vec<u8> = (off..off + n as u64).map(pat).collect();
            assert_eq!(r.bytes(), &want[..], "range {off}+{n} in {:?}", f.mode());
            assert_eq!(r.start as u64, off % ALIGN as u64);
            assert_eq!(r.buf.as_slice().as_ptr() as usize % ALIGN, 0);
        }
    }
}

#[test]
fn reads_into_a_reused_buffer_and_refuse_a_small_one() {
    let td = tempfile::tempdir().unwrap();
    let p = make_file(td.path(), "a.bin", 20_000);
    let f = DirectFile::open(&p).unwrap();
    let mut buf = AlignedBuf::new(8192).unwrap();
    let s = f.read_range_into(4100, 4000, &mut buf).unwrap();
    assert_eq!(s, 4);
    assert_eq!(buf.as_slice()[s], pat(4100));
    let e = f
        .read_range_into(4000, 8000, &mut buf)
        .unwrap_err()
        .to_string();
    assert!(e.contains("a.bin") && e.contains("offset 4000"), "{e}");
}

#[test]
fn tmpfs_either_takes_o_direct_or_says_it_fell_back() {
    // /dev/shm is tmpfs: older kernels refuse O_DIRECT there. Either way reads must be exact.
    let Ok(td) = tempfile::tempdir_in("/dev/shm") else {
        return;
    };
    let p = make_file(td.path(), "t.bin", 10_000);
    let f = DirectFile::open(&p).unwrap();
    if let IoMode::Buffered { reason } = f.mode() {
        assert!(reason.contains("O_DIRECT"), "{reason}");
    }
    let r = f.read_range(17, 9000).unwrap();
    assert!(r
        .bytes()
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pat(17 + i as u64)));
}

#[test]
fn out_of_range_and_missing_files_name_path_and_offset() {
    let td = tempfile::tempdir().unwrap();
    let p = make_file(td.path(), "small.bin", 100);
    let f = DirectFile::open(&p).unwrap();
    let e = f.read_range(90, 20).unwrap_err().to_string();
    assert!(
        e.contains("small.bin") && e.contains("90..110") && e.contains("100 bytes"),
        "{e}"
    );
    let e = f.read_range(u64::MAX, 2).unwrap_err();
    assert!(matches!(e, StorageError::OutOfRange { .. }));
    let e = DirectFile::open(&td.path().join("nope.bin"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.bin"), "{e}");
}

fn small_pool(threads: usize) -> IoPool {
    IoPool::new(&IoPoolConfig {
        threads,
        queue_depth: 4,
        request_size: 8192,
        buffer_size: 64 * 1024,
        max_buffers: 3,
    })
    .unwrap()
}

#[test]
fn pool_splits_big_reads_and_reuses_buffers() {
    let td = tempfile::tempdir().unwrap();
    let len = 200_003u64;
    let p = make_file(td.path(), "big.bin", len);
    let f = Arc::new(DirectFile::open(&p).unwrap());
    let pool = small_pool(3);
    // Several reads in flight at once (3 pooled buffers), each split into 8 KiB requests.
    for round in 0..5u64 {
        let offs = [round * 7, 60_000 + round * 4097, len - 50_000];
        let hs: Vec<_> = offs
            .iter()
            .map(|&o| (o, pool.read(&f, o, 50_000).unwrap()))
            .collect();
        for (o, h) in hs {
            let r = h.wait().unwrap();
            assert_eq!(r.bytes().len(), 50_000);
            assert!(r
                .bytes()
                .iter()
                .enumerate()
                .all(|(i, &b)| b == pat(o + i as u64)));
        }
    }
    let st = pool.buffers().stats();
    assert_eq!(
        st.allocations, 3,
        "steady state must reuse pooled buffers: {st:?}"
    );
    assert_eq!(st.oversize_allocations, 0);
    // Larger than a pooled buffer: dedicated allocation, still exact.
    let r = pool.read(&f, 3, 150_000).unwrap().wait().unwrap();
    assert_eq!(r.bytes()[149_999], pat(150_002));
    assert_eq!(pool.buffers().stats().oversize_allocations, 1);
    // Dropping a handle without waiting returns its buffer once the requests finish.
    drop(pool.read(&f, 0, 1000).unwrap());
    // The buffered fallback serves the same bytes through the pool.
    let fb = Arc::new(DirectFile::open_buffered(&p, "test").unwrap());
    let r = pool.read(&fb, 4097, 40_000).unwrap().wait().unwrap();
    assert!(r
        .bytes()
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pat(4097 + i as u64)));
    // Dropping the pool with a read in flight finishes it first.
    let h = pool.read(&f, 100, 30_000).unwrap();
    drop(pool);
    assert_eq!(h.wait().unwrap().bytes()[0], pat(100));
}

#[test]
fn pool_errors_carry_path_and_offset() {
    let td = tempfile::tempdir().unwrap();
    let p = make_file(td.path(), "shrinks.bin", 64 * 1024);
    let f = Arc::new(DirectFile::open(&p).unwrap());
    // The file shrinks after it was opened (a checkpoint rewritten underneath us).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(10_000)
        .unwrap();
    let pool = small_pool(2);
    let e = pool.read(&f, 20_000, 30_000).unwrap().wait().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, StorageError::ShortRead { .. }), "{msg}");
    assert!(
        msg.contains("shrinks.bin") && msg.contains("offset"),
        "{msg}"
    );
    let e = pool.read(&f, 60_000, 10_000).err().unwrap().to_string();
    assert!(e.contains("shrinks.bin") && e.contains("60000"), "{e}");
}

#[test]
fn buffer_pool_is_bounded_and_try_get_does_not_wait() {
    let bp = BufferPool::new(4096, 2);
    let a = bp.get(100).unwrap();
    let b = bp.get(4096).unwrap();
    assert!(bp.try_get(1).unwrap().is_none());
    drop(a);
    let c = bp.try_get(1).unwrap().unwrap();
    assert_eq!(c.capacity(), 4096);
    drop((b, c));
    assert_eq!(bp.stats().allocations, 2);
    assert_eq!(bp.stats().free, 2);
}

#[test]
fn offload_files_round_trip_aligned_and_unaligned_writes() {
    let parent = tempfile::tempdir().unwrap();
    let dir = OffloadDir::create(parent.path()).unwrap();
    let path = dir.path().to_path_buf();
    assert!(path.starts_with(parent.path()) && path.is_dir());
    let f = dir.create_file("kv-layer0", 3 * 4096 + 100).unwrap();
    assert_eq!(dir.reserved_bytes(), 4 * 4096);
    // Aligned write from a pooled buffer through the I/O threads.
    let pool = small_pool(2);
    let mut buf = pool.buffers().get(8192).unwrap();
    for (i, b) in buf.as_mut_slice()[..8192].iter_mut().enumerate() {
        *b = pat(i as u64);
    }
    let buf = pool
        .write(f.file(), 4096, buf, 8192)
        .unwrap()
        .wait()
        .unwrap();
    drop(buf);
    // Unaligned writes (read-modify-write of the edge blocks on a direct file).
    f.write_at(4090, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]).unwrap();
    f.write_at(3 * 4096 + 90, &[42; 10]).unwrap();
    let r = f.read_range(4088, 20).unwrap();
    assert_eq!(r.bytes()[..12], [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    let after: Vec<u8> = (4..12).map(pat).collect();
    assert_eq!(r.bytes()[12..], after[..]);
    let r = pool.read(f.file(), 8000, 4000).unwrap().wait().unwrap();
    assert!(r
        .bytes()
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pat(8000 - 4096 + i as u64)));
    assert_eq!(f.read_range(3 * 4096 + 90, 10).unwrap().bytes(), &[42; 10]);
    let e = f.write_at(3 * 4096 + 95, &[0; 10]).unwrap_err().to_string();
    assert!(e.contains("kv-layer0"), "{e}");
    drop(f);
    assert_eq!(dir.reserved_bytes(), 0);
    drop(dir);
    assert!(!path.exists(), "offload directory must be removed on drop");
}

#[test]
fn capacity_limit_gives_no_space_and_leaves_nothing() {
    let parent = tempfile::tempdir().unwrap();
    let dir = OffloadDir::create(parent.path())
        .unwrap()
        .with_capacity_limit(10 * 4096);
    let a = dir.create_file("a", 6 * 4096).unwrap();
    let e = dir.create_file("b", 5 * 4096).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            StorageError::NoSpace {
                needed: 20480,
                available: 16384,
                limited: true,
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(
        msg.contains("20480 bytes needed") && msg.contains("16384 bytes available"),
        "{msg}"
    );
    assert!(!dir.path().join("b").exists());
    drop(a);
    dir.create_file("b", 5 * 4096).unwrap();
    let p = dir.path().to_path_buf();
    drop(dir);
    assert!(!p.exists());
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
}

#[test]
fn a_file_larger_than_the_disk_gives_no_space_with_the_numbers() {
    let parent = tempfile::tempdir().unwrap();
    let dir = OffloadDir::create(parent.path()).unwrap();
    let huge = 1u64 << 50; // 1 PiB: more than this disk (ENOSPC) or the filesystem allows (EFBIG)
    let e = dir.create_file("kv", huge).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, StorageError::NoSpace { limited: false, .. }),
        "{msg}"
    );
    assert!(msg.contains(&format!("{huge} bytes needed")), "{msg}");
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    assert_eq!(dir.reserved_bytes(), 0);
}

#[test]
fn bad_file_names_are_refused() {
    let parent = tempfile::tempdir().unwrap();
    let dir = OffloadDir::create(parent.path()).unwrap();
    for n in ["", ".", "..", "a/b", "../x"] {
        assert!(
            matches!(dir.create_file(n, 10), Err(StorageError::BadName { .. })),
            "{n}"
        );
    }
    let e = OffloadDir::create(&parent.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing"), "{e}");
}

/// Env var telling [`signal_child`] to run (it is a child process of
/// [`signals_remove_live_offload_dirs`]).
const CHILD_ENV: &str = "STRATA_OFFLOAD_SIGNAL_CHILD";

/// Child side: makes an offload dir with a file in it, says where, then waits to be signalled.
#[test]
#[ignore = "run only as a child process by signals_remove_live_offload_dirs"]
fn signal_child() {
    let Ok(parent) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = OffloadDir::create(Path::new(&parent)).unwrap();
    assert_eq!(dir.signal_cleanup(), None);
    let f = dir.create_file("kv", 64 * 1024).unwrap();
    f.write_at(0, &[7; 4096]).unwrap();
    println!("READY {}", dir.path().display());
    std::io::stdout().flush().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(20));
    // Not reached when the signal handler works; the parent then sees status 0, not 130.
}

#[test]
fn signals_remove_live_offload_dirs() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let parent = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "storage::tests::signal_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, parent.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let dir = loop {
            match lines.next() {
                // libtest prints "test <name> ... " before the child's own output on that line.
                Some(Ok(l)) if l.contains("READY ") => {
                    break std::path::PathBuf::from(&l[l.find("READY ").unwrap() + 6..])
                }
                Some(Ok(_)) => continue,
                _ => {
                    let _ = child.kill();
                    panic!("child ended without making its offload directory");
                }
            }
        };
        assert!(dir.join("kv").is_file());
        // SAFETY: plain kill(2) of our own child process.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("child did not exit after signal {sig}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(130), "signal {sig}");
        assert!(!dir.exists(), "signal {sig} left {} behind", dir.display());
        assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
    }
}

#[test]
fn large_aligned_buffers_are_zeroed_and_start_on_a_huge_page() {
    let mut buf = AlignedBuf::new((5 << 20) + 100).unwrap();
    assert_eq!(buf.capacity() % ALIGN, 0);
    assert!(buf.capacity() >= (5 << 20) + 100);
    assert!(buf.as_slice().iter().all(|b| *b == 0));
    if cfg!(target_os = "linux") {
        assert_eq!(
            buf.as_slice().as_ptr() as usize % crate::kernels::HUGE_PAGE_BYTES,
            0
        );
    }
    let n = buf.capacity();
    buf.as_mut_slice()[n - 1] = 3;
    assert_eq!(buf.as_slice()[n - 1], 3);
    // A direct read lands in it exactly, as in the pools' buffers.
    let td = tempfile::tempdir().unwrap();
    let len: u64 = (3 << 20) + 5;
    let p = make_file(td.path(), "big.bin", len);
    let f = DirectFile::open(&p).unwrap();
    let r = f.read_range(4096, (len - 4096) as usize).unwrap();
    let want: Vec<u8> = (4096..len).map(pat).collect();
    assert_eq!(r.bytes(), &want[..]);
}
