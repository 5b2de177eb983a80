//! I/O threads with a bounded request queue, and a bounded pool of aligned buffers.
//!
//! The block schedule overlaps disk reads (next layer's weights, next batch's cache) with compute,
//! so reads are submitted and waited on later. A read of a large range is split into requests of
//! `request_size` bytes that the threads serve concurrently, which keeps several requests in
//! flight at the disk (one 1 MiB direct read at a time leaves an NVMe queue mostly idle).
//! Destination buffers come from a [`BufferPool`] and go back to it when dropped, so a steady
//! stream of reads allocates nothing once the pool is warm.

use super::aligned::{align_down, AlignedBuf, ALIGN};
use super::direct::DirectFile;
use super::error::{Result, StorageError};
use std::ops::{Deref, DerefMut};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Locks a mutex, ignoring poisoning: the protected state here stays consistent even if a thread
/// panicked while holding it (counters and lists only), and the I/O path must not panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How many threads, how deep the queue, how big the requests and buffers.
#[derive(Debug, Clone)]
pub struct IoPoolConfig {
    /// I/O threads. They mostly wait on the disk, so a few more than cores is fine; each one is a
    /// request in flight.
    pub threads: usize,
    /// Requests waiting for a thread before `submit` blocks (backpressure bounds staging memory).
    pub queue_depth: usize,
    /// Bytes per request when a large range is split (rounded to [`ALIGN`]); 1-4 MiB suits disks.
    pub request_size: usize,
    /// Capacity of each pooled buffer; larger reads get a dedicated buffer that is freed after use.
    pub buffer_size: usize,
    /// Pooled buffers at most (the bound on staging memory is `max_buffers * buffer_size`).
    pub max_buffers: usize,
}

impl Default for IoPoolConfig {
    fn default() -> Self {
        IoPoolConfig {
            threads: 4,
            queue_depth: 16,
            request_size: 1 << 20,
            buffer_size: 4 << 20,
            max_buffers: 8,
        }
    }
}

/// Counters of the buffer pool, for tests and reports (steady state: `allocations` stops growing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Pooled buffers allocated so far (at most `max_buffers`).
    pub allocations: u64,
    /// Dedicated buffers allocated for reads larger than `buffer_size`.
    pub oversize_allocations: u64,
    /// Pooled buffers currently free.
    pub free: usize,
}

struct PoolState {
    free: Vec<AlignedBuf>,
    live: usize,
    allocations: u64,
    oversize: u64,
}

struct PoolInner {
    state: Mutex<PoolState>,
    returned: Condvar,
    buffer_size: usize,
    max_buffers: usize,
}

/// A bounded set of equally sized aligned buffers. Cloning shares the pool.
#[derive(Clone)]
pub struct BufferPool {
    inner: Arc<PoolInner>,
}

impl BufferPool {
    /// A pool of at most `max_buffers` buffers of `buffer_size` bytes (rounded up to [`ALIGN`]),
    /// allocated on first use.
    pub fn new(buffer_size: usize, max_buffers: usize) -> BufferPool {
        BufferPool {
            inner: Arc::new(PoolInner {
                state: Mutex::new(PoolState {
                    free: Vec::new(),
                    live: 0,
                    allocations: 0,
                    oversize: 0,
                }),
                returned: Condvar::new(),
                buffer_size: buffer_size.max(1).div_ceil(ALIGN) * ALIGN,
                max_buffers: max_buffers.max(1),
            }),
        }
    }

    /// Capacity of each pooled buffer.
    pub fn buffer_size(&self) -> usize {
        self.inner.buffer_size
    }

    /// A buffer of at least `min_len` bytes. Waits while all `max_buffers` are handed out, which
    /// is the backpressure that bounds staging memory: a caller must not wait here while itself
    /// holding every buffer. `min_len` above `buffer_size` gets a dedicated buffer at once.
    pub fn get(&self, min_len: usize) -> Result<PooledBuf> {
        let inner = &self.inner;
        if min_len > inner.buffer_size {
            lock(&inner.state).oversize += 1;
            return Ok(PooledBuf {
                buf: Some(AlignedBuf::new(min_len)?),
                home: None,
            });
        }
        let mut st = lock(&inner.state);
        loop {
            if let Some(b) = st.free.pop() {
                return Ok(PooledBuf {
                    buf: Some(b),
                    home: Some(inner.clone()),
                });
            }
            if st.live < inner.max_buffers {
                st.live += 1;
                st.allocations += 1;
                drop(st);
                return match AlignedBuf::new(inner.buffer_size) {
                    Ok(b) => Ok(PooledBuf {
                        buf: Some(b),
                        home: Some(inner.clone()),
                    }),
                    Err(e) => {
                        lock(&inner.state).live -= 1;
                        Err(e)
                    }
                };
            }
            st = inner.returned.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Like [`BufferPool::get`] but returns `None` instead of waiting.
    pub fn try_get(&self, min_len: usize) -> Result<Option<PooledBuf>> {
        {
            let st = lock(&self.inner.state);
            if min_len <= self.inner.buffer_size
                && st.free.is_empty()
                && st.live >= self.inner.max_buffers
            {
                return Ok(None);
            }
        }
        self.get(min_len).map(Some)
    }

    /// Allocation counters.
    pub fn stats(&self) -> PoolStats {
        let st = lock(&self.inner.state);
        PoolStats {
            allocations: st.allocations,
            oversize_allocations: st.oversize,
            free: st.free.len(),
        }
    }
}

/// An aligned buffer that returns to its [`BufferPool`] when dropped.
pub struct PooledBuf {
    buf: Option<AlignedBuf>,
    home: Option<Arc<PoolInner>>,
}

impl Deref for PooledBuf {
    type Target = AlignedBuf;
    fn deref(&self) -> &AlignedBuf {
        // Invariant: `buf` is Some until drop.
        self.buf.as_ref().expect("PooledBuf used after drop")
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut AlignedBuf {
        self.buf.as_mut().expect("PooledBuf used after drop")
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let (Some(buf), Some(home)) = (self.buf.take(), self.home.take()) {
            lock(&home.state).free.push(buf);
            home.returned.notify_one();
        }
    }
}

impl std::fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PooledBuf({:?})", self.buf)
    }
}

/// The bytes of a completed pooled read: `bytes()` is exactly the requested range.
#[derive(Debug)]
pub struct PooledRead {
    buf: PooledBuf,
    start: usize,
    len: usize,
}

impl PooledRead {
    /// The requested bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf.as_slice()[self.start..self.start + self.len]
    }

    /// The buffer and the position of the requested bytes in it, e.g. to reinterpret them as
    /// 16-bit weights in place (the start is aligned as the range's file offset is).
    pub fn into_parts(self) -> (PooledBuf, usize, usize) {
        (self.buf, self.start, self.len)
    }
}

/// Completion state shared by a handle and the requests it was split into.
struct Pending<T> {
    state: Mutex<PendingState<T>>,
    done: Condvar,
}

struct PendingState<T> {
    remaining: usize,
    error: Option<StorageError>,
    value: Option<T>,
}

impl<T> Pending<T> {
    fn new(parts: usize, value: T) -> Arc<Pending<T>> {
        Arc::new(Pending {
            state: Mutex::new(PendingState {
                remaining: parts,
                error: None,
                value: Some(value),
            }),
            done: Condvar::new(),
        })
    }

    fn finish_part(&self, r: Result<()>) {
        let mut st = lock(&self.state);
        if let Err(e) = r {
            st.error.get_or_insert(e);
        }
        st.remaining -= 1;
        if st.remaining == 0 {
            self.done.notify_all();
        }
    }

    fn wait(&self) -> Result<T> {
        let mut st = lock(&self.state);
        while st.remaining > 0 {
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if let Some(e) = st.error.take() {
            return Err(e);
        }
        st.value.take().ok_or_else(|| StorageError::PoolClosed {
            what: "a request waited on twice".into(),
        })
    }

    fn is_done(&self) -> bool {
        lock(&self.state).remaining == 0
    }
}

/// A submitted read; [`ReadHandle::wait`] gives its bytes. Dropping it without waiting is safe:
/// the buffer goes back to the pool once the in-flight requests finish.
pub struct ReadHandle {
    pending: Arc<Pending<PooledBuf>>,
    start: usize,
    len: usize,
}

impl ReadHandle {
    /// Blocks until every request of the read finished; the first error (naming the file and
    /// offset) if any failed.
    pub fn wait(self) -> Result<PooledRead> {
        let buf = self.pending.wait()?;
        Ok(PooledRead {
            buf,
            start: self.start,
            len: self.len,
        })
    }

    /// Whether the read has finished (successfully or not), without blocking.
    pub fn is_done(&self) -> bool {
        self.pending.is_done()
    }
}

/// A submitted write; [`WriteHandle::wait`] gives the buffer back for reuse.
pub struct WriteHandle {
    pending: Arc<Pending<PooledBuf>>,
}

impl WriteHandle {
    /// Blocks until the write finished; the buffer, or the error naming file and offset.
    pub fn wait(self) -> Result<PooledBuf> {
        self.pending.wait()
    }

    /// Whether the write has finished, without blocking.
    pub fn is_done(&self) -> bool {
        self.pending.is_done()
    }
}

/// Pointer into a buffer owned by a `Pending` that outlives every request using it.
struct SendPtr(*mut u8);
// SAFETY: each request writes a disjoint part of the buffer, which is kept alive by the Arc the
// request holds; nobody reads it until all requests completed (Pending::wait).
unsafe impl Send for SendPtr {}

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Bytes moved and busy time of an [`IoPool`], for the executor's per-channel report.
///
/// Busy time is the union of the intervals during which at least one request of that kind was
/// being served (not the sum over threads), i.e. how long the disk had reads (writes) in flight.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct IoStats {
    /// Bytes read from files (aligned supersets, as transferred).
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Seconds during which at least one read was in flight.
    pub read_busy_s: f64,
    /// Seconds during which at least one write was in flight.
    pub write_busy_s: f64,
}

/// One kind's in-flight count and busy-interval accumulator.
#[derive(Default)]
struct BusyClock {
    in_flight: usize,
    since: Option<std::time::Instant>,
    busy_s: f64,
    bytes: u64,
}

impl BusyClock {
    fn start(&mut self) {
        if self.in_flight == 0 {
            self.since = Some(std::time::Instant::now());
        }
        self.in_flight += 1;
    }

    fn stop(&mut self, bytes: u64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.bytes += bytes;
        if self.in_flight == 0 {
            if let Some(t) = self.since.take() {
                self.busy_s += t.elapsed().as_secs_f64();
            }
        }
    }

    fn busy_now(&self) -> f64 {
        self.busy_s + self.since.map_or(0.0, |t| t.elapsed().as_secs_f64())
    }
}

#[derive(Default)]
struct Clocks {
    read: BusyClock,
    write: BusyClock,
}

/// A few I/O threads serving a bounded queue of read and write requests.
pub struct IoPool {
    tx: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    buffers: BufferPool,
    request_size: usize,
    clocks: Arc<Mutex<Clocks>>,
}

impl IoPool {
    /// Starts `config.threads` I/O threads.
    pub fn new(config: &IoPoolConfig) -> Result<IoPool> {
        let (tx, rx) = sync_channel::<Job>(config.queue_depth.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::new();
        for i in 0..config.threads.max(1) {
            let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
            let w = std::thread::Builder::new()
                .name(format!("strata-io-{i}"))
                .spawn(move || loop {
                    let job = lock(&rx).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => break,
                    }
                })
                .map_err(|e| StorageError::PoolClosed {
                    what: format!("starting I/O thread {i}: {e}"),
                })?;
            workers.push(w);
        }
        Ok(IoPool {
            tx: Some(tx),
            workers,
            buffers: BufferPool::new(config.buffer_size, config.max_buffers),
            request_size: (config.request_size.max(ALIGN) / ALIGN) * ALIGN,
            clocks: Arc::new(Mutex::new(Clocks::default())),
        })
    }

    /// Starts a pool whose [`IoPool::stats`] are shared with `other` (one clock for both), so that
    /// several pools over one disk (e.g. one per buffer size) report the disk's busy time once.
    pub fn new_sharing_stats(config: &IoPoolConfig, other: &IoPool) -> Result<IoPool> {
        let mut pool = IoPool::new(config)?;
        pool.clocks = other.clocks.clone();
        Ok(pool)
    }

    /// Bytes moved and busy time so far.
    pub fn stats(&self) -> IoStats {
        let c = lock(&self.clocks);
        IoStats {
            read_bytes: c.read.bytes,
            write_bytes: c.write.bytes,
            read_busy_s: c.read.busy_now(),
            write_busy_s: c.write.busy_now(),
        }
    }

    /// The pool's buffers, e.g. to fill one and [`IoPool::write`] it.
    pub fn buffers(&self) -> &BufferPool {
        &self.buffers
    }

    /// Bytes per request.
    pub fn request_size(&self) -> usize {
        self.request_size
    }

    fn submit(&self, job: Job, what: impl FnOnce() -> String) -> Result<()> {
        match self.tx.as_ref().map(|tx| tx.send(job)) {
            Some(Ok(())) => Ok(()),
            _ => Err(StorageError::PoolClosed { what: what() }),
        }
    }

    /// Reads `offset..offset+len` of `file` in the background, split into `request_size`
    /// requests. Blocks only while the buffer pool is exhausted or the queue is full.
    pub fn read(&self, file: &Arc<DirectFile>, offset: u64, len: usize) -> Result<ReadHandle> {
        let end = offset.checked_add(len as u64).filter(|&e| e <= file.len());
        if end.is_none() {
            return Err(StorageError::OutOfRange {
                path: file.path().to_path_buf(),
                offset,
                len: len as u64,
                file_len: file.len(),
            });
        }
        let alen = DirectFile::superset_len(offset, len);
        let aoff = align_down(offset);
        let mut buf = self.buffers.get(alen)?;
        let base = buf.as_mut_ptr();
        let parts = alen.div_ceil(self.request_size).max(1);
        let pending = Pending::new(parts, buf);
        for p in 0..parts {
            let lo = p * self.request_size;
            let hi = (lo + self.request_size).min(alen);
            // The part of the wanted range inside this request (the last request may run past
            // the end of the file, which is fine as long as the wanted bytes arrive).
            let want_lo = (aoff + lo as u64).max(offset);
            let want_hi = (aoff + hi as u64).min(offset + len as u64);
            let (f, pd) = (file.clone(), pending.clone());
            let clocks = self.clocks.clone();
            // SAFETY: lo < alen <= the buffer's capacity.
            let ptr = SendPtr(unsafe { base.add(lo) });
            let job: Job = Box::new(move || {
                let ptr = ptr;
                lock(&clocks).read.start();
                // SAFETY: [ptr, ptr + hi - lo) is this request's disjoint, aligned part of a buffer
                // kept alive by `pd`; no one reads it before all parts finish.
                let r = unsafe {
                    f.read_aligned_raw(
                        aoff + lo as u64,
                        ptr.0,
                        hi - lo,
                        want_lo,
                        want_hi.saturating_sub(want_lo),
                    )
                };
                lock(&clocks).read.stop((hi - lo) as u64);
                pd.finish_part(r);
            });
            if let Err(e) = self.submit(job, || {
                format!("read at offset {offset} of {}", file.path().display())
            }) {
                // Account for the parts never submitted so the handle (if anyone waited) ends.
                for _ in p..parts {
                    pending.finish_part(Ok(()));
                }
                return Err(e);
            }
        }
        Ok(ReadHandle {
            pending,
            start: (offset - aoff) as usize,
            len,
        })
    }

    /// Writes the first `len` bytes of `buf` at `offset` of `file` in the background.
    pub fn write(
        &self,
        file: &Arc<DirectFile>,
        offset: u64,
        buf: PooledBuf,
        len: usize,
    ) -> Result<WriteHandle> {
        let len = len.min(buf.capacity());
        let pending = Pending::new(1, buf);
        let (f, pd) = (file.clone(), pending.clone());
        let clocks = self.clocks.clone();
        let job: Job = Box::new(move || {
            lock(&clocks).write.start();
            // Take the buffer out while writing so that `is_done` never waits on the disk.
            let b = lock(&pd.state).value.take();
            let r = match b.as_ref() {
                Some(b) => f.write_at(offset, &b.as_slice()[..len]),
                None => Ok(()),
            };
            lock(&pd.state).value = b;
            lock(&clocks).write.stop(len as u64);
            pd.finish_part(r);
        });
        self.submit(job, || {
            format!("write at offset {offset} of {}", file.path().display())
        })?;
        Ok(WriteHandle { pending })
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        // Closing the queue ends the workers once queued requests are done.
        self.tx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
