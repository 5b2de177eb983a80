//! [`CudaDevice`]: the [`Device`] trait on one NVIDIA GPU, so that the block schedule's GPU tiers
//! (resident weights, the HeteGen split, device KV cache, the parameter manager) run on a real GPU
//! with the same code path as on [`crate::sim::SimDevice`].
//!
//! - **Buffers**: a table of `CudaSlice<u8>` behind [`DeviceBuf`] handles (ids are table slots,
//!   reused once freed, as the sim device does). Every allocation is checked against the
//!   device's capacity before the driver is asked, so a policy too large for the GPU is an
//!   [`DeviceError::OutOfMemory`] with the numbers, not a driver error halfway through a run.
//!   The default capacity is the GPU's free memory (NVML, else `cuMemGetInfo`) less
//!   [`DEFAULT_CUDA_RESERVE`], which covers what the device allocates for itself outside the
//!   table: the CUDA context's growth, cuBLAS's workspace and this device's scratch (attention
//!   scores, the f16 widening chunk, bf16-rounded inputs, the padding mask).
//! - **Streams**: host-to-device copies on a copy stream, kernels and cuBLAS on a compute
//!   stream, device-to-host copies on a third; work crosses streams only through events (an
//!   upload first waits for the compute work issued before it, since that work may still read
//!   the buffer being overwritten; compute waits for the upload; a download waits for both).
//!   Compute calls return once their work is enqueued: the next download is what waits, so a
//!   split layer's device half runs while the host computes its half.
//! - **Copies** go through pinned staging ([`STAGING_BYTES`] chunks): uploads through two
//!   write-combined buffers used in turn, so the CPU fills one while the DMA engine drains the
//!   other; downloads land in cached pinned memory, which the CPU reads quickly. Every copy is
//!   counted in [`Device::transfers`], as the sim device counts them. The attention padding mask
//!   also crosses (a few bytes per call) but is not counted, as on the sim device, where it
//!   "travels with the call".
//! - **Operations** match the sim device's semantics exactly (layouts, offsets, what a join
//!   does); the arithmetic differs only in summation order: `linear` is one cuBLAS `GemmEx` with
//!   f32 accumulation (f32 weights as they are; bf16 weights with the input rounded to bf16 as the
//!   CPU kernel's contract says; f16 weights widened to f32 in chunks of rows, because the CPU
//!   kernel keeps the input in f32 for them and cuBLAS has no f16-by-f32 product), the bias
//!   added by starting the product from it; `join_columns` and `attention` are NVRTC kernels
//!   (elementwise.cu, attention.cu).
//!
//! A driver failure during an operation is a [`DeviceError::Failed`] with the driver's message,
//! never a panic; every length and offset is checked before memory is touched.

use super::launch::{
    elem_cfg, gemm_rows, new_event, DevBuf, Gpu, PinnedBuf, RowMajorGemm, ROW_THREADS,
};
use super::probe::{device_memory, CudaInfo};
use super::CudaError;
use crate::device::{Device, DeviceBuf, DeviceError, DeviceMatrix, TransferStats};
use crate::weights::ElementType;
use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{
    sys as drv_sys, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchArgs,
    LaunchConfig, PushKernelArg, SyncOnDrop,
};
use std::sync::{Mutex, MutexGuard};

/// Device memory left out of the default capacity (see the module docs): 1 GiB.
pub const DEFAULT_CUDA_RESERVE: u64 = 1 << 30;

/// Size of each pinned staging buffer, and so of each copy's chunks: large enough that a chunk's
/// DMA time dwarfs the per-copy overhead, small enough that two of them cost little pinned memory.
pub const STAGING_BYTES: usize = 32 << 20;

/// f32 elements of the scratch an f16 matrix is widened into, a chunk of rows at a time (32 MiB).
const WIDEN_ELEMS: usize = 8 << 20;

/// The buffer table and the counters.
#[derive(Default)]
struct Table {
    /// Buffers by handle id; `None` once freed, or while taken as an operation's output.
    bufs: Vec<Option<CudaSlice<u8>>>,
    used: u64,
    peak: u64,
    transfers: TransferStats,
}

/// Staging and scratch that the operations reuse (outside the capacity: see the module docs).
struct Scratch {
    /// Upload staging (write-combined: the CPU only writes it), used in turn.
    up: [PinnedBuf<u8>; 2],
    /// Recorded on the copy stream after the copy out of `up[i]`; waited on before refilling it.
    up_done: [CudaEvent; 2],
    /// Download landing area (cached: the CPU reads it).
    down: PinnedBuf<u8>,
    /// The attention mask as bytes, on the host and on the device.
    mask_host: Vec<u8>,
    mask: DevBuf<u8>,
    /// Attention scores, `[q_len * heads, kv_len]`.
    probs: DevBuf<f32>,
    /// f16 weights widened to f32, a chunk of rows at a time.
    wide: DevBuf<f32>,
    /// The input of a bf16 product, rounded to bf16.
    x16: DevBuf<u16>,
    /// Recorded on the copy stream after an upload, waited on by compute.
    uploaded: CudaEvent,
    /// Recorded on compute before an upload or a download, waited on by the copy streams.
    computed: CudaEvent,
}

struct State {
    table: Table,
    scratch: Scratch,
}

/// The [`Device`] trait on one NVIDIA GPU; see the module documentation.
pub struct CudaDevice {
    gpu: Gpu,
    capacity: u64,
    state: Mutex<State>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("info", &self.gpu.info)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// A device address with the guard that keeps its buffer borrowed (and, when cudarc tracks
/// events, records the access on the stream) until the work using it is enqueued.
struct Operand<'a> {
    ptr: u64,
    _guard: SyncOnDrop<'a>,
}

/// `a * b * c` bytes, or an error naming `what` when that overflows.
fn product(what: &str, dims: &[usize]) -> Result<usize, DeviceError> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| invalid(format!("{what}: size {dims:?} overflows")))
}

fn invalid(message: String) -> DeviceError {
    DeviceError::Invalid {
        device: "cuda".into(),
        message,
    }
}

fn failed(context: &str, e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Failed {
        device: "cuda".into(),
        message: format!("{context}: {e}"),
    }
}

fn driver(context: &str, e: cudarc::driver::DriverError) -> DeviceError {
    failed(context, super::probe::describe_driver_error(&e))
}

/// A dimension as cuBLAS's `int`.
fn blas_dim(v: usize) -> Result<i32, DeviceError> {
    i32::try_from(v).map_err(|_| invalid(format!("linear: dimension {v} exceeds cuBLAS's i32")))
}

impl CudaDevice {
    /// Opens GPU 0 with `capacity` bytes for buffers, or, with `None`, its free memory less
    /// [`DEFAULT_CUDA_RESERVE`]; compiles and loads the kernels and sets up streams and cuBLAS.
    ///
    /// Every configuration problem (no driver, no GPU, a missing library, PTX the driver
    /// rejects, a capacity beyond the free memory) is an error here, never a panic, so that
    /// `--device cuda` fails before the run starts.
    pub fn new(capacity: Option<u64>) -> Result<CudaDevice, CudaError> {
        let gpu = Gpu::open()?;
        let free = device_memory(&gpu.ctx)
            .map_err(|e| CudaError::driver("reading free memory", e))?
            .free;
        let capacity = match capacity {
            Some(c) if c > free => {
                return Err(CudaError::Shape(format!(
                    "a device capacity of {c} bytes was asked for, but the GPU has {free} bytes \
                     free"
                )))
            }
            Some(c) => c,
            None => free.saturating_sub(DEFAULT_CUDA_RESERVE),
        };
        let event = |what: &str| new_event(&gpu.ctx, what);
        let wc = drv_sys::CU_MEMHOSTALLOC_WRITECOMBINED;
        let scratch = Scratch {
            up: [PinnedBuf::new(wc), PinnedBuf::new(wc)],
            up_done: [event("staging")?, event("staging")?],
            down: PinnedBuf::new(0),
            mask_host: Vec::new(),
            mask: DevBuf::new(),
            probs: DevBuf::new(),
            wide: DevBuf::new(),
            x16: DevBuf::new(),
            uploaded: event("upload")?,
            computed: event("compute")?,
        };
        Ok(CudaDevice {
            gpu,
            capacity,
            state: Mutex::new(State {
                table: Table::default(),
                scratch,
            }),
        })
    }

    /// The device a `--device` argument names: `cuda` (free memory less the reserve) or
    /// `cuda:CAPACITY` (`cuda:8GiB`); a machine without a usable GPU gets an error that says
    /// what is missing and that `--device sim` runs the same tiers on the CPU.
    pub fn from_arg(text: &str) -> crate::Result<CudaDevice> {
        let bad = |why: String| {
            crate::ExecError::InvalidRequest(format!(
                "--device {text}: {why}; expected cuda or cuda:CAPACITY (e.g. cuda:8GiB)"
            ))
        };
        let capacity = match text.split_once(':') {
            None if text == "cuda" => None,
            Some(("cuda", cap)) => Some(
                crate::device::parse_capacity(cap)
                    .ok_or_else(|| bad(format!("'{cap}' is not a capacity")))?,
            ),
            _ => return Err(bad("unknown device".into())),
        };
        CudaDevice::new(capacity).map_err(|e| {
            crate::ExecError::InvalidRequest(format!(
                "--device {text}: cannot open the GPU: {e} (--device sim runs the GPU tiers on a \
                 simulated device on the CPU)"
            ))
        })
    }

    /// What the probe found when the device was opened.
    pub fn info(&self) -> &CudaInfo {
        &self.gpu.info
    }

    /// Takes the lock and makes the context current on this thread (cuBLAS and raw driver calls
    /// do not do it themselves, and the caller may be a rayon worker that never used it).
    fn begin(&self) -> Result<MutexGuard<'_, State>, DeviceError> {
        // A panic while holding the lock leaves the table consistent (slots are put back before
        // any call that can fail returns) and scratch that every operation rewrites.
        let guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.gpu
            .ctx
            .bind_to_thread()
            .map_err(|e| driver("making the CUDA context current", e))?;
        Ok(guard)
    }

    /// Makes `stream` wait for everything enqueued on compute so far.
    fn after_compute(&self, s: &Scratch, stream: &CudaStream) -> Result<(), DeviceError> {
        s.computed
            .record(&self.gpu.compute)
            .and_then(|_| stream.wait(&s.computed))
            .map_err(|e| driver("ordering copies after compute", e))
    }

    /// Device address of bytes `offset..offset + len` of the table buffer `b`, for reading on
    /// the compute stream; `align` is the element size the operation reads there.
    fn read<'a>(
        &'a self,
        t: &'a Table,
        b: &DeviceBuf,
        offset: usize,
        len: usize,
        align: usize,
        what: &str,
    ) -> Result<Operand<'a>, DeviceError> {
        let slice = t.bufs.get(b.id()).and_then(Option::as_ref).ok_or_else(|| {
            invalid(format!(
                "{what}: buffer {} is not allocated (freed, or the output of the same call)",
                b.id()
            ))
        })?;
        check_range(slice.len(), b, offset, len, align, what)?;
        let (ptr, guard) = slice.device_ptr(&self.gpu.compute);
        Ok(Operand {
            ptr: ptr + offset as u64,
            _guard: guard,
        })
    }

    /// Device address of an operation's output (taken out of the table), for writing on the
    /// compute stream.
    fn write<'a>(
        &'a self,
        slice: &'a mut CudaSlice<u8>,
        b: &DeviceBuf,
        len: usize,
        what: &str,
    ) -> Result<Operand<'a>, DeviceError> {
        check_range(slice.len(), b, 0, len, 4, what)?;
        let (ptr, guard) = slice.device_ptr_mut(&self.gpu.compute);
        Ok(Operand { ptr, _guard: guard })
    }

    /// Runs `f` with the output buffer `y` taken out of the table, so that it may be written
    /// while inputs are read; an output that is also an input is then "not allocated" for the
    /// input lookup (an error, as on the sim device). `y` is put back whatever `f` returns.
    fn with_output<R>(
        &self,
        y: &DeviceBuf,
        f: impl FnOnce(&Table, &mut Scratch, &mut CudaSlice<u8>) -> Result<R, DeviceError>,
    ) -> Result<R, DeviceError> {
        let mut guard = self.begin()?;
        let st = &mut *guard;
        let mut out = st
            .table
            .bufs
            .get_mut(y.id())
            .and_then(Option::take)
            .ok_or_else(|| invalid(format!("output buffer {} is not allocated", y.id())))?;
        let r = f(&st.table, &mut st.scratch, &mut out);
        st.table.bufs[y.id()] = Some(out);
        r
    }

    /// Launches `kernel` with `cfg` on the compute stream, after `args` pushes its arguments.
    ///
    /// # Safety
    ///
    /// `args` must push exactly the kernel's parameters, in order and of their types, and every
    /// address among them must hold the extents the kernel reads and writes for `cfg`.
    unsafe fn launch<'a>(
        &'a self,
        kernel: &str,
        cfg: LaunchConfig,
        args: impl FnOnce(&mut LaunchArgs<'a>),
    ) -> Result<(), DeviceError> {
        let mut b = self
            .gpu
            .compute
            .launch_builder(self.gpu.functions.get(kernel));
        args(&mut b);
        // SAFETY: the caller's contract.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| driver(&format!("launching {kernel}"), e))
    }
}

/// Checks that `offset..offset + len` lies inside handle `b` and its slice (of `slice_len`
/// bytes: a handle from another device could claim more), aligned to `align`.
fn check_range(
    slice_len: usize,
    b: &DeviceBuf,
    offset: usize,
    len: usize,
    align: usize,
    what: &str,
) -> Result<(), DeviceError> {
    let fits = offset
        .checked_add(len)
        .is_some_and(|end| end <= b.bytes() && end <= slice_len);
    if !fits {
        return Err(invalid(format!(
            "{what}: {len} bytes at offset {offset} do not fit buffer {} ({} bytes)",
            b.id(),
            b.bytes()
        )));
    }
    if !offset.is_multiple_of(align) {
        return Err(invalid(format!(
            "{what}: offset {offset} is not a multiple of the element size {align}"
        )));
    }
    Ok(())
}

/// A 4-bit compressed weight matrix held on the device: the three parts of a
/// [`crate::quant::QuantizedMatrix`] (`parts()`), each uploaded as it is into a device buffer
/// (codes from byte 0, scales and minimums as f16 bits from byte 0).
#[derive(Debug, Clone, Copy)]
pub struct DeviceQ4<'a> {
    /// 32 bytes of 4-bit codes per group.
    pub codes: &'a DeviceBuf,
    /// One f16 scale per group.
    pub scales: &'a DeviceBuf,
    /// One f16 minimum per group.
    pub mins: &'a DeviceBuf,
    /// Rows (outputs) of the whole matrix.
    pub out_features: usize,
    /// Columns (inputs).
    pub in_features: usize,
}

impl CudaDevice {
    /// Expands rows `row0..row0 + rows` of a compressed matrix into `out` as f32 `[rows, in]`
    /// from offset 0, bit for bit as [`crate::quant::QuantizedMatrix::dequantize`] gives them
    /// (the `dequant_q4_f32` kernel), so that compressed weights, 4.5 bits per value over PCIe,
    /// can be multiplied by cuBLAS on the device. A run of rows is what the device half of a
    /// split layer needs.
    ///
    /// Not part of [`Device`] yet: the block schedule refuses compression together with a
    /// device, and the sim device has no counterpart.
    pub fn dequantize_q4(
        &self,
        q: &DeviceQ4,
        row0: usize,
        rows: usize,
        out: &DeviceBuf,
    ) -> Result<(), DeviceError> {
        let (n_out, n_in) = (q.out_features, q.in_features);
        if row0.checked_add(rows).is_none_or(|end| end > n_out) {
            return Err(invalid(format!(
                "dequantize_q4: rows {row0}..{row0}+{rows} outside a matrix of {n_out} rows"
            )));
        }
        let groups = crate::quant::QuantizedMatrix::groups_for(n_out, n_in);
        let code_bytes = product("dequantize_q4 codes", &[groups, crate::quant::GROUP_BYTES])?;
        let half_bytes = product("dequantize_q4 scales", &[groups, 2])?;
        let out_bytes = product("dequantize_q4 output", &[rows, n_in, 4])?;
        self.with_output(out, |t, _, os| {
            let co = self.read(t, q.codes, 0, code_bytes, 1, "dequantize_q4 codes")?;
            let so = self.read(t, q.scales, 0, half_bytes, 2, "dequantize_q4 scales")?;
            let mo = self.read(t, q.mins, 0, half_bytes, 2, "dequantize_q4 minimums")?;
            let oo = self.write(os, out, out_bytes, "dequantize_q4 output")?;
            if out_bytes == 0 {
                return Ok(());
            }
            let (o, i, r0, r) = (n_out as u64, n_in as u64, row0 as u64, rows as u64);
            // SAFETY: dequant_q4_f32(float* out, const u8* codes, const u16* scales,
            // const u16* mins, u64 out_features, u64 in_features, u64 row0, u64 rows) writes
            // rows*in floats (checked) and reads groups_for(out, in) groups of codes, scales and
            // minimums (checked): every group index it forms for rows inside the matrix is below
            // that count.
            unsafe {
                self.launch("dequant_q4_f32", elem_cfg(rows * n_in), |l| {
                    l.arg(&oo.ptr)
                        .arg(&co.ptr)
                        .arg(&so.ptr)
                        .arg(&mo.ptr)
                        .arg(&o)
                        .arg(&i)
                        .arg(&r0)
                        .arg(&r);
                })
            }
        })
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // The pinned staging and the buffers are freed after this: no copy or kernel may still
        // use them. Errors cannot be reported from a drop, and the context reports them on its
        // next use.
        let _ = self.gpu.ctx.bind_to_thread();
        let _ = self.gpu.h2d.synchronize();
        let _ = self.gpu.compute.synchronize();
        let _ = self.gpu.d2h.synchronize();
    }
}

impl Device for CudaDevice {
    fn name(&self) -> &str {
        "cuda"
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    fn used_bytes(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .table
            .used
    }

    fn peak_bytes(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .table
            .peak
    }

    fn alloc(&self, bytes: usize, what: &str) -> Result<DeviceBuf, DeviceError> {
        let mut guard = self.begin()?;
        let t = &mut guard.table;
        let requested = bytes as u64;
        let oom = |t: &Table| DeviceError::OutOfMemory {
            device: "cuda".into(),
            what: what.to_string(),
            requested,
            in_use: t.used,
            capacity: self.capacity,
        };
        if t.used.saturating_add(requested) > self.capacity {
            return Err(oom(t));
        }
        // Zeroed as the trait promises (a memset on the compute stream; copies wait for compute
        // before they start). One byte at least: the driver refuses empty allocations.
        let slice = match self.gpu.compute.alloc_zeros::<u8>(bytes.max(1)) {
            Ok(s) => s,
            Err(e) if e.0 == drv_sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => return Err(oom(t)),
            Err(e) => return Err(driver(&format!("allocating {what} ({bytes} bytes)"), e)),
        };
        t.used += requested;
        t.peak = t.peak.max(t.used);
        // Freed slots are reused: a handle is consumed by `free`, so no stale one can name it.
        let id = match t.bufs.iter().position(Option::is_none) {
            Some(id) => {
                t.bufs[id] = Some(slice);
                id
            }
            None => {
                t.bufs.push(Some(slice));
                t.bufs.len() - 1
            }
        };
        Ok(DeviceBuf::new(id, bytes))
    }

    fn free(&self, buf: DeviceBuf) {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Dropping the slice frees it in the compute stream's order (it was allocated there):
        // after the kernels that read it, and after the uploads into it, which compute waits for.
        // Downloads from it have finished, since a download returns only when its copy is done.
        if let Some(slice) = guard.table.bufs.get_mut(buf.id()).and_then(Option::take) {
            let _ = self.gpu.ctx.bind_to_thread();
            drop(slice);
            guard.table.used = guard.table.used.saturating_sub(buf.bytes() as u64);
        }
    }

    fn upload(&self, dst: &DeviceBuf, offset: usize, src: &[u8]) -> Result<(), DeviceError> {
        let mut guard = self.begin()?;
        let State { table, scratch } = &mut *guard;
        let slice = table
            .bufs
            .get_mut(dst.id())
            .and_then(Option::as_mut)
            .ok_or_else(|| invalid(format!("upload: buffer {} is freed", dst.id())))?;
        check_range(slice.len(), dst, offset, src.len(), 1, "upload")?;
        // Work issued before may still read this buffer (a staging buffer reused by the next
        // layer): the copy waits for it.
        self.after_compute(scratch, &self.gpu.h2d)?;
        for (i, chunk) in src.chunks(STAGING_BYTES).enumerate() {
            let j = i % 2;
            // The copy out of this staging buffer two chunks ago must be done before refilling.
            scratch.up_done[j]
                .synchronize()
                .map_err(|e| driver("waiting for a staging buffer", e))?;
            // Allocated whole on first use, so that it is never reallocated afterwards.
            let staged = &mut scratch.up[j]
                .ensure(&self.gpu.ctx, STAGING_BYTES)
                .map_err(|e| failed("allocating pinned staging", e))?[..chunk.len()];
            staged.copy_from_slice(chunk);
            let at = offset + i * STAGING_BYTES;
            let mut view = slice.slice_mut(at..at + chunk.len());
            self.gpu
                .h2d
                .memcpy_htod(&*staged, &mut view)
                .map_err(|e| driver(&format!("uploading {} bytes", chunk.len()), e))?;
            scratch.up_done[j]
                .record(&self.gpu.h2d)
                .map_err(|e| driver("recording a staging copy", e))?;
        }
        scratch
            .uploaded
            .record(&self.gpu.h2d)
            .and_then(|_| self.gpu.compute.wait(&scratch.uploaded))
            .map_err(|e| driver("ordering an upload before compute", e))?;
        table.transfers.h2d_bytes += src.len() as u64;
        table.transfers.h2d_calls += 1;
        Ok(())
    }

    fn download(&self, src: &DeviceBuf, offset: usize, dst: &mut [u8]) -> Result<(), DeviceError> {
        let mut guard = self.begin()?;
        let State { table, scratch } = &mut *guard;
        let slice = table
            .bufs
            .get(src.id())
            .and_then(Option::as_ref)
            .ok_or_else(|| invalid(format!("download: buffer {} is freed", src.id())))?;
        check_range(slice.len(), src, offset, dst.len(), 1, "download")?;
        // After the kernels that wrote it and the uploads into it.
        self.after_compute(scratch, &self.gpu.d2h)?;
        scratch
            .uploaded
            .record(&self.gpu.h2d)
            .and_then(|_| self.gpu.d2h.wait(&scratch.uploaded))
            .map_err(|e| driver("ordering uploads before a download", e))?;
        for (i, chunk) in dst.chunks_mut(STAGING_BYTES).enumerate() {
            let at = offset + i * STAGING_BYTES;
            let landing = &mut scratch
                .down
                .ensure(&self.gpu.ctx, STAGING_BYTES)
                .map_err(|e| failed("allocating the pinned landing buffer", e))?[..chunk.len()];
            self.gpu
                .d2h
                .memcpy_dtoh(&slice.slice(at..at + chunk.len()), landing)
                .map_err(|e| driver(&format!("downloading {} bytes", chunk.len()), e))?;
            self.gpu
                .d2h
                .synchronize()
                .map_err(|e| driver("waiting for a download", e))?;
            chunk.copy_from_slice(landing);
        }
        table.transfers.d2h_bytes += dst.len() as u64;
        table.transfers.d2h_calls += 1;
        Ok(())
    }

    fn linear(
        &self,
        x: &DeviceBuf,
        rows: usize,
        w: &DeviceMatrix,
        y: &DeviceBuf,
    ) -> Result<(), DeviceError> {
        let (out, inp) = (w.out_features, w.in_features);
        let esize = w.dtype.size();
        let x_bytes = product("linear input", &[rows, inp, 4])?;
        let w_bytes = product("linear weights", &[out, inp, esize])?;
        let y_bytes = product("linear output", &[rows, out, 4])?;
        self.with_output(y, |t, s, ys| {
            let xo = self.read(t, x, 0, x_bytes, 4, "linear input")?;
            let wo = self.read(t, w.buf, w.offset, w_bytes, esize, "linear weights")?;
            let bo = match w.bias {
                Some((b, off)) => Some(self.read(t, b, off, out * 4, 4, "linear bias")?),
                None => None,
            };
            if rows == 0 || out == 0 {
                return Ok(());
            }
            // Scratch is sized (grown, rarely) before any work of this call is enqueued.
            match w.dtype {
                ElementType::Bf16 => s
                    .x16
                    .ensure(&self.gpu.compute, rows * inp)
                    .map_err(|e| failed("allocating the bf16 input scratch", e))?,
                ElementType::F16 if inp > 0 => s
                    .wide
                    .ensure(&self.gpu.compute, (WIDEN_ELEMS / inp).clamp(1, out) * inp)
                    .map_err(|e| failed("allocating the f16 widening scratch", e))?,
                _ => {}
            }
            let yo = self.write(ys, y, y_bytes, "linear output")?;
            // y starts as the bias rows (the GEMM adds to it: beta = 1) or is overwritten.
            let beta = match &bo {
                Some(b) => {
                    let (r, c) = (rows as u64, out as u64);
                    // SAFETY: fill_rows_f32(float* y, const float* bias, u64 rows, u64 cols)
                    // writes rows*cols floats of y (y_bytes checked) and reads cols floats of the
                    // bias (out * 4 bytes checked).
                    unsafe {
                        self.launch("fill_rows_f32", elem_cfg(rows * out), |l| {
                            l.arg(&yo.ptr).arg(&b.ptr).arg(&r).arg(&c);
                        })
                    }?;
                    1.0f32
                }
                None => 0.0f32,
            };
            if inp == 0 {
                // An empty sum: y is the bias, or zeros.
                if bo.is_none() {
                    // SAFETY: y_bytes bytes from yo.ptr lie in the output buffer (checked).
                    unsafe {
                        cudarc::driver::result::memset_d8_async(
                            yo.ptr,
                            0,
                            y_bytes,
                            self.gpu.compute.cu_stream(),
                        )
                    }
                    .map_err(|e| driver("zeroing a linear output", e))?;
                }
                return Ok(());
            }
            let (m, n, k) = (blas_dim(out)?, blas_dim(rows)?, blas_dim(inp)?);
            let gemm = |g: RowMajorGemm| {
                // SAFETY: every address was range-checked above for the extents g describes
                // (W: out*inp elements at its offset or the widened chunk, x: rows*inp, y: rows
                // rows of `out` floats); the guards keep the buffers alive until this is
                // enqueued, and begin() made the context current.
                unsafe { gemm_rows(&self.gpu.blas, &g) }
                    .map_err(|e| failed("cuBLAS GemmEx", format!("{e:?}")))
            };
            let f32_t = blas_sys::cudaDataType_t::CUDA_R_32F;
            match w.dtype {
                ElementType::F32 => gemm(RowMajorGemm {
                    out: m,
                    tokens: n,
                    inp: k,
                    w: wo.ptr,
                    w_type: f32_t,
                    x: xo.ptr,
                    x_type: f32_t,
                    y: yo.ptr,
                    ldy: m,
                    beta,
                }),
                ElementType::Bf16 => {
                    let dx16 = s.x16.get().map_err(|e| failed("bf16 scratch", e))?;
                    let (x16, _g) = dx16.device_ptr(&self.gpu.compute);
                    let n_x = (rows * inp) as u64;
                    // SAFETY: round_f32_bf16(u16* out, const float* in, u64 n): the scratch
                    // holds rows*inp u16 (ensured above), x rows*inp floats (checked).
                    unsafe {
                        self.launch("round_f32_bf16", elem_cfg(rows * inp), |l| {
                            l.arg(&x16).arg(&xo.ptr).arg(&n_x);
                        })
                    }?;
                    let bf16_t = blas_sys::cudaDataType_t::CUDA_R_16BF;
                    gemm(RowMajorGemm {
                        out: m,
                        tokens: n,
                        inp: k,
                        w: wo.ptr,
                        w_type: bf16_t,
                        x: x16,
                        x_type: bf16_t,
                        y: yo.ptr,
                        ldy: m,
                        beta,
                    })
                }
                ElementType::F16 => {
                    let chunk = (WIDEN_ELEMS / inp).clamp(1, out);
                    let dwide = s.wide.get().map_err(|e| failed("f16 scratch", e))?;
                    let (wide, _g) = dwide.device_ptr(&self.gpu.compute);
                    let mut r0 = 0;
                    while r0 < out {
                        let r1 = (r0 + chunk).min(out);
                        let n_w = ((r1 - r0) * inp) as u64;
                        let src = wo.ptr + (r0 * inp * 2) as u64;
                        // SAFETY: widen_f16_f32(float* out, const u16* in, u64 n): rows r0..r1
                        // of W lie inside the checked weight range, and the scratch holds
                        // chunk*inp >= n floats (ensured above).
                        unsafe {
                            self.launch("widen_f16_f32", elem_cfg((r1 - r0) * inp), |l| {
                                l.arg(&wide).arg(&src).arg(&n_w);
                            })
                        }?;
                        // Rows r0..r1 of W give columns r0..r1 of y: start r0 floats in, with
                        // y's full row stride.
                        gemm(RowMajorGemm {
                            out: blas_dim(r1 - r0)?,
                            tokens: n,
                            inp: k,
                            w: wide,
                            w_type: f32_t,
                            x: xo.ptr,
                            x_type: f32_t,
                            y: yo.ptr + (r0 * 4) as u64,
                            ldy: m,
                            beta,
                        })?;
                        r0 = r1;
                    }
                    Ok(())
                }
            }
        })
    }

    fn join_columns(
        &self,
        a: &DeviceBuf,
        width_a: usize,
        b: &DeviceBuf,
        width_b: usize,
        rows: usize,
        y: &DeviceBuf,
    ) -> Result<(), DeviceError> {
        let a_bytes = product("join_columns input", &[rows, width_a, 4])?;
        let b_bytes = product("join_columns input", &[rows, width_b, 4])?;
        let y_bytes = a_bytes
            .checked_add(b_bytes)
            .ok_or_else(|| invalid("join_columns: size overflows".into()))?;
        self.with_output(y, |t, _, ys| {
            let ao = self.read(t, a, 0, a_bytes, 4, "join_columns input")?;
            let bo = self.read(t, b, 0, b_bytes, 4, "join_columns input")?;
            let yo = self.write(ys, y, y_bytes, "join_columns output")?;
            if y_bytes == 0 {
                return Ok(());
            }
            let (wa, wb, r) = (width_a as u64, width_b as u64, rows as u64);
            // SAFETY: join_columns_f32(float* y, const float* a, u64 wa, const float* b, u64 wb,
            // u64 rows) reads rows*wa and rows*wb floats and writes rows*(wa+wb): the three
            // ranges checked above.
            unsafe {
                self.launch("join_columns_f32", elem_cfg(y_bytes / 4), |l| {
                    l.arg(&yo.ptr)
                        .arg(&ao.ptr)
                        .arg(&wa)
                        .arg(&bo.ptr)
                        .arg(&wb)
                        .arg(&r);
                })
            }
        })
    }

    fn attention(
        &self,
        q: &DeviceBuf,
        q_len: usize,
        k: &DeviceBuf,
        v: &DeviceBuf,
        kv_offset: usize,
        kv_len: usize,
        key_valid: &[bool],
        num_heads: usize,
        head_dim: usize,
        out: &DeviceBuf,
    ) -> Result<(), DeviceError> {
        if let Some(problem) = crate::device::attention_call_problem(q_len, kv_len, key_valid.len())
        {
            return Err(invalid(problem));
        }
        let d = num_heads
            .checked_mul(head_dim)
            .ok_or_else(|| invalid("attention: heads * head_dim overflows".into()))?;
        let q_bytes = product("attention queries", &[q_len, d, 4])?;
        let kv_bytes = product("attention keys", &[kv_len, d, 4])?;
        let probs = product("attention scores", &[q_len, num_heads, kv_len])?;
        let (gx, gy) = match (u32::try_from(q_len), u32::try_from(num_heads)) {
            (Ok(a), Ok(b)) if a <= i32::MAX as u32 && b <= 65_535 => (a, b),
            _ => {
                return Err(invalid(format!(
                    "attention: a grid of {q_len} queries x {num_heads} heads is too large"
                )))
            }
        };
        self.with_output(out, |t, s, os| {
            let qo = self.read(t, q, 0, q_bytes, 4, "attention queries")?;
            let ko = self.read(t, k, kv_offset, kv_bytes, 4, "attention keys")?;
            let vo = self.read(t, v, kv_offset, kv_bytes, 4, "attention values")?;
            if q_len == 0 || d == 0 {
                return Ok(());
            }
            s.probs
                .ensure(&self.gpu.compute, probs)
                .and_then(|_| s.mask.ensure(&self.gpu.compute, kv_len))
                .map_err(|e| failed("allocating attention scratch", e))?;
            s.mask_host.clear();
            s.mask_host
                .extend(key_valid[..kv_len].iter().map(|&b| u8::from(b)));
            {
                let dmask = s.mask.get_mut().map_err(|e| failed("mask scratch", e))?;
                // From pageable memory, on the compute stream: the driver has read the host
                // bytes when the call returns, so mask_host may be rewritten by the next call,
                // and the kernel below sees the copy in stream order.
                self.gpu
                    .compute
                    .memcpy_htod(&s.mask_host[..], &mut dmask.slice_mut(..kv_len))
                    .map_err(|e| driver("copying the attention mask", e))?;
            }
            let oo = self.write(os, out, q_bytes, "attention output")?;
            let dmask = s.mask.get().map_err(|e| failed("mask scratch", e))?;
            let (mask, _gm) = dmask.device_ptr(&self.gpu.compute);
            let dprobs = s.probs.get_mut().map_err(|e| failed("score scratch", e))?;
            let (pr, _gp) = dprobs.device_ptr_mut(&self.gpu.compute);
            let (ql, kl, nh, hd, scale) = (
                q_len as u64,
                kv_len as u64,
                num_heads as u64,
                head_dim as u64,
                1.0f32,
            );
            let cfg = LaunchConfig {
                grid_dim: (gx, gy, 1),
                block_dim: (ROW_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: attention_f32(const float* q, const float* k, const float* v,
            // const u8* key_valid, float* out, float* probs, u64 q_len, u64 kv_len,
            // u64 num_heads, u64 head_dim, float scale): q and out hold q_len*d floats, k and v
            // kv_len*d from kv_offset (all checked), the mask kv_len bytes and probs
            // q_len*num_heads*kv_len floats (ensured); q_len <= kv_len was checked.
            unsafe {
                self.launch("attention_f32", cfg, |l| {
                    l.arg(&qo.ptr)
                        .arg(&ko.ptr)
                        .arg(&vo.ptr)
                        .arg(&mask)
                        .arg(&oo.ptr)
                        .arg(&pr)
                        .arg(&ql)
                        .arg(&kl)
                        .arg(&nh)
                        .arg(&hd)
                        .arg(&scale);
                })
            }
        })
    }

    fn transfers(&self) -> TransferStats {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .table
            .transfers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_arguments_parse_or_say_what_is_accepted() {
        for bad in ["cuda:lots", "cudax", "cuda:1:2"] {
            let e = CudaDevice::from_arg(bad).err().unwrap().to_string();
            assert!(e.contains("expected cuda or cuda:CAPACITY"), "{e}");
        }
        // Without a GPU, opening is an error that points at the sim device, not a panic.
        match CudaDevice::from_arg("cuda") {
            Ok(d) => eprintln!("a GPU is present: {}", d.info()),
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.contains("cannot open the GPU") && e.contains("--device sim"),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn ranges_are_checked_against_the_handle_the_slice_and_alignment() {
        let b = DeviceBuf::new(3, 100);
        assert!(check_range(100, &b, 0, 100, 4, "x").is_ok());
        assert!(check_range(128, &b, 96, 4, 4, "x").is_ok());
        assert!(check_range(100, &b, 0, 0, 4, "x").is_ok());
        // Past the handle, past the slice, an overflowing end, a misaligned offset.
        assert!(check_range(128, &b, 97, 4, 1, "x").is_err());
        assert!(check_range(50, &b, 40, 20, 4, "x").is_err());
        assert!(check_range(100, &b, usize::MAX, 2, 1, "x").is_err());
        let e = check_range(100, &b, 2, 4, 4, "linear weights").unwrap_err();
        assert!(e.to_string().contains("linear weights: offset 2"), "{e}");
        let e = check_range(100, &b, 90, 20, 1, "upload").unwrap_err();
        assert!(
            e.to_string().contains("do not fit buffer 3 (100 bytes)"),
            "{e}"
        );
    }

    #[test]
    fn sizes_that_overflow_are_errors() {
        assert!(product("x", &[usize::MAX, 2]).is_err());
        assert_eq!(product("x", &[3, 5, 4]).unwrap(), 60);
        assert!(blas_dim(1 << 40).is_err());
    }
}
