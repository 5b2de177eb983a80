//! [`CudaBackend`]: the executor's operations on one NVIDIA GPU.
//!
//! The [`Backend`] trait still hands over host `f32` slices, so every call uploads its operands,
//! computes on the GPU and downloads the result. The plumbing is the one the offloading engine
//! (issue 4) will drive with device-resident tensors:
//!
//! - three streams: host-to-device copies, compute (kernels and cuBLAS), device-to-host copies.
//!   Work crosses streams only through events (`uploaded` on the copy stream, waited on by
//!   compute; `computed` on compute, waited on by the download stream), so a later prefetch of
//!   the next layer's weights can run on the copy stream while this layer computes.
//! - pinned host staging: uploads go through write-combined pinned memory (fast for the DMA
//!   engine, written once by the CPU), downloads land in ordinary cached pinned memory
//!   (`alloc_pinned_with_flags(n, 0)`): the CPU reads those, and reading write-combined memory
//!   is an order of magnitude slower.
//! - grow-only buffers, host and device: a decode step reuses the previous step's allocations;
//!   nothing is allocated per call once the largest shape has been seen.
//! - kernels compiled once per process by NVRTC ([`super::kernels::compile_all`]) and loaded once
//!   per backend; a call only launches.
//!
//! Calls are serialised by one mutex (they share the staging and scratch buffers). The trait's
//! methods cannot return errors, so a CUDA failure *during* an operation (the GPU was found and
//! opened, then a copy or launch failed) panics with the driver's message; every failure that a
//! machine's configuration can cause (no driver, no device, a missing library, kernels the
//! driver rejects) is reported by [`CudaBackend::new`] instead. The `try_*` methods return those
//! run-time failures as values for callers that can handle them.

use super::launch::{
    elem_cfg, gemm_rows, new_event, DevBuf, Gpu, PinnedBuf, RowMajorGemm, ROW_THREADS,
};
use super::probe::{device_memory, CudaInfo, DeviceMemory};
use super::CudaError;
use crate::backend::Backend;
use crate::kernels::{KvRows, Matrix, WeightData};
use cudarc::cublas::{sys as blas_sys, Gemm, GemmConfig};
use cudarc::driver::{CudaEvent, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use std::sync::{Mutex, MutexGuard};

/// Everything one operation touches, behind the backend's mutex.
struct Scratch {
    /// Upload staging, write-combined (the CPU only writes it).
    up_f32: PinnedBuf<f32>,
    up_u16: PinnedBuf<u16>,
    up_u8: PinnedBuf<u8>,
    up_u32: PinnedBuf<u32>,
    /// Download landing area, cached (the CPU reads it).
    down_f32: PinnedBuf<f32>,
    /// Device operands, named by role.
    x: DevBuf<f32>,
    y: DevBuf<f32>,
    w: DevBuf<f32>,
    w16: DevBuf<u16>,
    x16: DevBuf<u16>,
    bias: DevBuf<f32>,
    k: DevBuf<f32>,
    v: DevBuf<f32>,
    probs: DevBuf<f32>,
    mask: DevBuf<u8>,
    ids: DevBuf<u32>,
    /// Recorded on the copy stream after an operation's uploads.
    uploaded: CudaEvent,
    /// Recorded on the compute stream after an operation's kernels.
    computed: CudaEvent,
}

/// The executor's operations on one NVIDIA GPU; see the module documentation.
pub struct CudaBackend {
    gpu: Gpu,
    scratch: Mutex<Scratch>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("info", &self.gpu.info)
            .finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal` (only 0 for now), compiles and loads every kernel, and sets up the
    /// streams and cuBLAS: every configuration problem surfaces here, as an error that says what
    /// is missing, never as a panic.
    pub fn new(ordinal: usize) -> Result<CudaBackend, CudaError> {
        if ordinal != 0 {
            return Err(CudaError::Shape(format!(
                "only GPU 0 is supported for now (asked for GPU {ordinal})"
            )));
        }
        let gpu = Gpu::open()?;
        let event = |what: &str| new_event(&gpu.ctx, what);
        let wc = cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED;
        let scratch = Scratch {
            up_f32: PinnedBuf::new(wc),
            up_u16: PinnedBuf::new(wc),
            up_u8: PinnedBuf::new(wc),
            up_u32: PinnedBuf::new(wc),
            down_f32: PinnedBuf::new(0),
            x: DevBuf::new(),
            y: DevBuf::new(),
            w: DevBuf::new(),
            w16: DevBuf::new(),
            x16: DevBuf::new(),
            bias: DevBuf::new(),
            k: DevBuf::new(),
            v: DevBuf::new(),
            probs: DevBuf::new(),
            mask: DevBuf::new(),
            ids: DevBuf::new(),
            uploaded: event("upload")?,
            computed: event("compute")?,
        };
        Ok(CudaBackend {
            gpu,
            scratch: Mutex::new(scratch),
        })
    }

    /// What [`probe`](super::probe) found when the backend was opened.
    pub fn info(&self) -> &CudaInfo {
        &self.gpu.info
    }

    /// Free and total device memory now (NVML when available, else `cuMemGetInfo`): what the
    /// parameter manager will read to decide how much more it may keep resident.
    pub fn memory(&self) -> Result<DeviceMemory, CudaError> {
        device_memory(&self.gpu.ctx).map_err(|e| CudaError::driver("reading free memory", e))
    }

    /// Takes the scratch lock and waits until no copy from a staging buffer is in flight, so
    /// the operation may rewrite (or regrow) staging.
    fn begin(&self) -> Result<MutexGuard<'_, Scratch>, CudaError> {
        // A panic while holding the lock leaves only scratch contents behind, which every
        // operation overwrites before use.
        let guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        // cuBLAS and the raw device pointers below do not make the context current themselves,
        // and the calling thread (a rayon worker, say) may never have used it.
        self.gpu
            .ctx
            .bind_to_thread()
            .map_err(|e| CudaError::driver("making the CUDA context current", e))?;
        self.gpu
            .h2d
            .synchronize()
            .map_err(|e| CudaError::driver("waiting for earlier uploads", e))?;
        Ok(guard)
    }

    /// Enqueues a copy of `src` (a slice of pinned staging) into the front of `dst` on the copy
    /// stream.
    fn upload<T: DeviceRepr>(
        &self,
        what: &str,
        src: &[T],
        dst: &mut DevBuf<T>,
    ) -> Result<(), CudaError> {
        dst.ensure(&self.gpu.compute, src.len())?;
        let d = dst.get_mut()?;
        self.gpu
            .h2d
            .memcpy_htod(src, &mut d.slice_mut(..src.len()))
            .map_err(|e| CudaError::driver(format!("uploading {what}"), e))
    }

    /// Orders everything enqueued on the copy stream before what compute enqueues next.
    fn uploads_done(&self, uploaded: &CudaEvent) -> Result<(), CudaError> {
        uploaded
            .record(&self.gpu.h2d)
            .and_then(|_| self.gpu.compute.wait(uploaded))
            .map_err(|e| CudaError::driver("ordering uploads before compute", e))
    }

    /// Copies the first `dst.len()` floats of `src` to `dst` once everything enqueued on compute
    /// is done: through the pinned landing buffer, on the download stream, then waits.
    fn download(
        &self,
        computed: &CudaEvent,
        src: &DevBuf<f32>,
        landing: &mut PinnedBuf<f32>,
        dst: &mut [f32],
    ) -> Result<(), CudaError> {
        let n = dst.len();
        computed
            .record(&self.gpu.compute)
            .and_then(|_| self.gpu.d2h.wait(computed))
            .map_err(|e| CudaError::driver("ordering compute before the download", e))?;
        let src = src.get()?.slice(..n);
        let host = landing.ensure(&self.gpu.ctx, n)?;
        self.gpu
            .d2h
            .memcpy_dtoh(&src, host)
            .map_err(|e| CudaError::driver("copying a result to the host", e))?;
        self.gpu
            .d2h
            .synchronize()
            .map_err(|e| CudaError::driver("waiting for a result", e))?;
        dst.copy_from_slice(host);
        Ok(())
    }

    /// `y = x W^T + bias`; see [`Backend::linear`]. f32 and f16 weights are widened to f32 on the
    /// GPU and multiplied with SGEMM (the input stays f32, as on the CPU); bf16 weights meet the
    /// input rounded to bf16 (the CPU backend's documented contract) in a bf16 x bf16 GEMM with
    /// f32 accumulation and f32 output.
    pub fn try_linear(
        &self,
        x: &[f32],
        tokens: usize,
        w: &Matrix,
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) -> Result<(), CudaError> {
        let (n_in, n_out) = (w.in_features, w.out_features);
        let w_len = match &w.data {
            WeightData::F32(d) => d.len(),
            WeightData::F16(d) => d.len(),
            WeightData::Bf16(d) => d.len(),
            WeightData::Bf16Panels(_) => return Err(panels_refused()),
        };
        check(x.len() == tokens * n_in, || {
            format!(
                "linear: x must be [tokens={tokens}, in={n_in}], has {}",
                x.len()
            )
        })?;
        check(y.len() == tokens * n_out, || {
            format!(
                "linear: y must be [tokens={tokens}, out={n_out}], has {}",
                y.len()
            )
        })?;
        check(w_len == n_in * n_out, || {
            format!("linear: W must be [out={n_out}, in={n_in}], has {w_len} elements")
        })?;
        if let Some(b) = bias {
            check(b.len() == n_out, || {
                format!("linear: bias must have {n_out} elements, has {}", b.len())
            })?;
        }
        if tokens == 0 || n_out == 0 {
            return Ok(());
        }
        if n_in == 0 {
            for row in y.chunks_mut(n_out) {
                match bias {
                    Some(b) => row.copy_from_slice(b),
                    None => row.fill(0.0),
                }
            }
            return Ok(());
        }
        let dim = |v: usize| {
            i32::try_from(v).map_err(|_| {
                CudaError::Shape(format!("linear: dimension {v} exceeds cuBLAS's i32"))
            })
        };
        let (m, n, k) = (dim(n_out)?, dim(tokens)?, dim(n_in)?);
        let mut guard = self.begin()?;
        let s = &mut *guard;

        // Uploads: x, the bias and f32 weights through one f32 staging area (sized once, so
        // that no copy in flight loses its source to a reallocation); 16-bit weights as bits.
        let bias_len = bias.map_or(0, |b| b.len());
        let w32_len = match &w.data {
            WeightData::F32(d) => d.len(),
            _ => 0,
        };
        let staged = s
            .up_f32
            .ensure(&self.gpu.ctx, x.len() + bias_len + w32_len)?;
        let (sx, rest) = staged.split_at_mut(x.len());
        let (sb, sw) = rest.split_at_mut(bias_len);
        sx.copy_from_slice(x);
        self.upload("x", sx, &mut s.x)?;
        if let Some(b) = bias {
            sb.copy_from_slice(b);
            self.upload("the bias", sb, &mut s.bias)?;
        }
        match &w.data {
            WeightData::Bf16Panels(_) => unreachable!("refused by the length check above"),
            WeightData::F32(d) => {
                sw.copy_from_slice(d);
                self.upload("W", sw, &mut s.w)?;
            }
            WeightData::F16(d) => {
                let st = s.up_u16.ensure(&self.gpu.ctx, d.len())?;
                st.copy_from_slice(bytemuck::cast_slice(d));
                self.upload("f16 W", st, &mut s.w16)?;
            }
            WeightData::Bf16(d) => {
                let st = s.up_u16.ensure(&self.gpu.ctx, d.len())?;
                st.copy_from_slice(bytemuck::cast_slice(d));
                self.upload("bf16 W", st, &mut s.w16)?;
            }
        }
        self.uploads_done(&s.uploaded)?;

        // y starts as the bias rows (GEMM beta = 1) or is overwritten (beta = 0).
        let y_len = tokens * n_out;
        s.y.ensure(&self.gpu.compute, y_len)?;
        let beta = match bias {
            Some(_) => {
                let (rows, cols) = (tokens as u64, n_out as u64);
                let db = s.bias.get()?;
                let dy = s.y.get_mut()?;
                // SAFETY: fill_rows_f32(float* y, const float* bias, u64 rows, u64 cols) writes
                // rows*cols = y_len floats of y and reads cols floats of bias (uploaded above).
                unsafe {
                    self.gpu
                        .compute
                        .launch_builder(self.gpu.functions.get("fill_rows_f32"))
                        .arg(dy)
                        .arg(db)
                        .arg(&rows)
                        .arg(&cols)
                        .launch(elem_cfg(y_len))
                }
                .map_err(|e| CudaError::driver("launching fill_rows_f32", e))?;
                1.0f32
            }
            None => 0.0f32,
        };
        let w_elems = n_in * n_out;
        match &w.data {
            WeightData::Bf16Panels(_) => unreachable!("refused by the length check above"),
            WeightData::F32(_) | WeightData::F16(_) => {
                if let WeightData::F16(_) = &w.data {
                    s.w.ensure(&self.gpu.compute, w_elems)?;
                    let n_w = w_elems as u64;
                    let src = s.w16.get()?;
                    let dw = s.w.get_mut()?;
                    // SAFETY: widen_f16_f32(float* out, const u16* in, u64 n) with n = W's
                    // element count, within both buffers.
                    unsafe {
                        self.gpu
                            .compute
                            .launch_builder(self.gpu.functions.get("widen_f16_f32"))
                            .arg(dw)
                            .arg(src)
                            .arg(&n_w)
                            .launch(elem_cfg(w_elems))
                    }
                    .map_err(|e| CudaError::driver("launching widen_f16_f32", e))?;
                }
                let cfg = GemmConfig {
                    transa: blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    transb: blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    m,
                    n,
                    k,
                    alpha: 1.0f32,
                    lda: k,
                    ldb: k,
                    beta,
                    ldc: m,
                };
                let dw = s.w.get()?.slice(..w_elems);
                let dx = s.x.get()?.slice(..x.len());
                let mut dy = s.y.get_mut()?.slice_mut(..y_len);
                // SAFETY: the row-major operands seen column-major: A = W as [k=in, m=out],
                // lda = in, transposed; B = x as [k=in, n=tokens], ldb = in; C = y as
                // [m=out, n=tokens], ldc = out. Each view holds exactly those elements.
                unsafe { self.gpu.blas.gemm(cfg, &dw, &dx, &mut dy) }
                    .map_err(|e| CudaError::blas("SGEMM for linear", e))?;
            }
            WeightData::Bf16(_) => {
                s.x16.ensure(&self.gpu.compute, x.len())?;
                let n_x = x.len() as u64;
                {
                    let dx = s.x.get()?;
                    let dx16 = s.x16.get_mut()?;
                    // SAFETY: round_f32_bf16(u16* out, const float* in, u64 n), n = x.len().
                    unsafe {
                        self.gpu
                            .compute
                            .launch_builder(self.gpu.functions.get("round_f32_bf16"))
                            .arg(dx16)
                            .arg(dx)
                            .arg(&n_x)
                            .launch(elem_cfg(x.len()))
                    }
                    .map_err(|e| CudaError::driver("launching round_f32_bf16", e))?;
                }
                let dw16 = s.w16.get()?;
                let dx16 = s.x16.get()?;
                let dy = s.y.get_mut()?;
                let (a_ptr, _ra) = dw16.device_ptr(&self.gpu.compute);
                let (b_ptr, _rb) = dx16.device_ptr(&self.gpu.compute);
                let (c_ptr, _rc) = dy.device_ptr_mut(&self.gpu.compute);
                let g = RowMajorGemm {
                    out: m,
                    tokens: n,
                    inp: k,
                    w: a_ptr,
                    w_type: blas_sys::cudaDataType_t::CUDA_R_16BF,
                    x: b_ptr,
                    x_type: blas_sys::cudaDataType_t::CUDA_R_16BF,
                    y: c_ptr,
                    ldy: m,
                    beta,
                };
                // SAFETY: same geometry as the SGEMM above, with W and x as bf16 and y as f32;
                // the scratch buffers hold at least those extents (sized above). The device
                // pointers stay valid while their guards (_ra, _rb, _rc) live, and the guards
                // record the reads and the write on the compute stream; begin() made the context
                // current.
                unsafe { gemm_rows(&self.gpu.blas, &g) }
                    .map_err(|e| CudaError::blas("bf16 GemmEx for linear", e))?;
            }
        }
        self.download(&s.computed, &s.y, &mut s.down_f32, y)
    }

    /// Row-wise LayerNorm; see [`Backend::layer_norm`].
    pub fn try_layer_norm(
        &self,
        x: &[f32],
        width: usize,
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        y: &mut [f32],
    ) -> Result<(), CudaError> {
        check(width > 0 && x.len().is_multiple_of(width), || {
            format!(
                "layer_norm: x.len() ({}) must be a multiple of width ({width})",
                x.len()
            )
        })?;
        check(y.len() == x.len(), || {
            "layer_norm: y must have the length of x".into()
        })?;
        check(gamma.len() == width && beta.len() == width, || {
            "layer_norm: gamma/beta must have width elements".into()
        })?;
        let rows = x.len() / width;
        if rows == 0 {
            return Ok(());
        }
        let grid = u32::try_from(rows)
            .map_err(|_| CudaError::Shape(format!("layer_norm: {rows} rows is too many")))?;
        let mut guard = self.begin()?;
        let s = &mut *guard;
        // x into `x`; gamma then beta into `bias`.
        let staged = s.up_f32.ensure(&self.gpu.ctx, x.len() + 2 * width)?;
        let (sx, sgb) = staged.split_at_mut(x.len());
        sx.copy_from_slice(x);
        sgb[..width].copy_from_slice(gamma);
        sgb[width..].copy_from_slice(beta);
        self.upload("x", sx, &mut s.x)?;
        self.upload("gamma and beta", sgb, &mut s.bias)?;
        self.uploads_done(&s.uploaded)?;
        s.y.ensure(&self.gpu.compute, x.len())?;
        let dx = s.x.get()?;
        let dgb = s.bias.get()?;
        let gamma_d = dgb.slice(..width);
        let beta_d = dgb.slice(width..2 * width);
        let dy = s.y.get_mut()?;
        let width_u = width as u64;
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: layer_norm_f32(const float* x, float* y, const float* gamma,
        // const float* beta, u64 width, float eps): one block per row; x and y hold
        // rows * width floats, gamma and beta width each.
        unsafe {
            self.gpu
                .compute
                .launch_builder(self.gpu.functions.get("layer_norm_f32"))
                .arg(dx)
                .arg(dy)
                .arg(&gamma_d)
                .arg(&beta_d)
                .arg(&width_u)
                .arg(&eps)
                .launch(cfg)
        }
        .map_err(|e| CudaError::driver("launching layer_norm_f32", e))?;
        self.download(&s.computed, &s.y, &mut s.down_f32, y)
    }

    /// Runs one in-place element-wise kernel over `x`: `relu_f32`, `scale_f32` (with `factor`)
    /// or `add_f32` (with `other` as the addend).
    fn try_elementwise(
        &self,
        kernel: &'static str,
        x: &mut [f32],
        other: Option<&[f32]>,
        factor: f32,
    ) -> Result<(), CudaError> {
        if let Some(o) = other {
            check(o.len() == x.len(), || format!("{kernel}: lengths differ"))?;
        }
        let n = x.len();
        if n == 0 {
            return Ok(());
        }
        let mut guard = self.begin()?;
        let s = &mut *guard;
        let other_len = other.map_or(0, |o| o.len());
        let staged = s.up_f32.ensure(&self.gpu.ctx, n + other_len)?;
        let (sx, so) = staged.split_at_mut(n);
        sx.copy_from_slice(x);
        self.upload("x", sx, &mut s.y)?;
        if let Some(o) = other {
            so.copy_from_slice(o);
            self.upload("the addend", so, &mut s.x)?;
        }
        self.uploads_done(&s.uploaded)?;
        let n_u = n as u64;
        let f = self.gpu.functions.get(kernel);
        let dy = s.y.get_mut()?;
        let mut b = self.gpu.compute.launch_builder(f);
        b.arg(dy);
        if other.is_some() {
            b.arg(s.x.get()?);
        } else if kernel == "scale_f32" {
            b.arg(&factor);
        }
        b.arg(&n_u);
        // SAFETY: relu_f32(float* x, u64 n), scale_f32(float* x, float factor, u64 n) and
        // add_f32(float* acc, const float* x, u64 n) get the arguments pushed above in that
        // order; every buffer holds n floats.
        unsafe { b.launch(elem_cfg(n)) }
            .map_err(|e| CudaError::driver(format!("launching {kernel}"), e))?;
        drop(b);
        self.download(&s.computed, &s.y, &mut s.down_f32, x)
    }

    /// `x = max(x, 0)` on the GPU.
    pub fn try_relu_inplace(&self, x: &mut [f32]) -> Result<(), CudaError> {
        self.try_elementwise("relu_f32", x, None, 0.0)
    }

    /// `x *= factor` on the GPU.
    pub fn try_scale_inplace(&self, x: &mut [f32], factor: f32) -> Result<(), CudaError> {
        self.try_elementwise("scale_f32", x, None, factor)
    }

    /// `acc += x` on the GPU.
    pub fn try_add_inplace(&self, acc: &mut [f32], x: &[f32]) -> Result<(), CudaError> {
        self.try_elementwise("add_f32", acc, Some(x), 0.0)
    }

    /// Causal attention; see [`Backend::attention`]. The GPU keeps its own score scratch, so the
    /// caller's `scratch` is not needed here.
    #[allow(clippy::too_many_arguments)]
    pub fn try_attention(
        &self,
        q: &[f32],
        q_len: usize,
        k: KvRows,
        v: KvRows,
        kv_len: usize,
        key_valid: &[bool],
        num_heads: usize,
        head_dim: usize,
        scale: f32,
        out: &mut [f32],
    ) -> Result<(), CudaError> {
        let d = num_heads * head_dim;
        check(q_len <= kv_len, || {
            format!("attention: q_len ({q_len}) must not exceed kv_len ({kv_len})")
        })?;
        check(q.len() == q_len * d, || {
            "attention: q must be [q_len, num_heads*head_dim]".into()
        })?;
        check(k.len() >= kv_len * d && v.len() >= kv_len * d, || {
            "attention: k and v must hold kv_len rows of num_heads*head_dim".into()
        })?;
        check(key_valid.len() >= kv_len, || {
            "attention: key_valid shorter than kv_len".into()
        })?;
        check(out.len() == q_len * d, || {
            "attention: out must be [q_len, num_heads*head_dim]".into()
        })?;
        if q_len == 0 || d == 0 {
            return Ok(());
        }
        let (gx, gy) = match (u32::try_from(q_len), u32::try_from(num_heads)) {
            (Ok(a), Ok(b)) if b <= 65_535 => (a, b),
            _ => {
                return Err(CudaError::Shape(format!(
                    "attention: a grid of {q_len} queries x {num_heads} heads is too large"
                )))
            }
        };
        let kv = kv_len * d;
        let mut guard = self.begin()?;
        let s = &mut *guard;
        let staged = s.up_f32.ensure(&self.gpu.ctx, q.len() + 2 * kv)?;
        let (sq, skv) = staged.split_at_mut(q.len());
        let (sk, sv) = skv.split_at_mut(kv);
        sq.copy_from_slice(q);
        // Widened on the host while staging: the kernel reads f32 rows.
        k.slice(0..kv).widen_into(sk);
        v.slice(0..kv).widen_into(sv);
        self.upload("q", sq, &mut s.x)?;
        self.upload("the key cache", sk, &mut s.k)?;
        self.upload("the value cache", sv, &mut s.v)?;
        let mask = s.up_u8.ensure(&self.gpu.ctx, kv_len)?;
        for (m, valid) in mask.iter_mut().zip(key_valid) {
            *m = u8::from(*valid);
        }
        self.upload("key_valid", mask, &mut s.mask)?;
        self.uploads_done(&s.uploaded)?;
        s.y.ensure(&self.gpu.compute, out.len())?;
        s.probs
            .ensure(&self.gpu.compute, q_len * num_heads * kv_len)?;
        let (ql, kl, nh, hd) = (
            q_len as u64,
            kv_len as u64,
            num_heads as u64,
            head_dim as u64,
        );
        let cfg = LaunchConfig {
            grid_dim: (gx, gy, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (dq, dk, dv, dm) = (s.x.get()?, s.k.get()?, s.v.get()?, s.mask.get()?);
        let dout = s.y.get_mut()?;
        let dp = s.probs.get_mut()?;
        // SAFETY: attention_f32(const float* q, const float* k, const float* v,
        // const u8* key_valid, float* out, float* probs, u64 q_len, u64 kv_len, u64 num_heads,
        // u64 head_dim, float scale): q and out hold q_len*d floats, k and v kv_len*d, the mask
        // kv_len bytes, probs q_len*num_heads*kv_len floats; q_len <= kv_len was checked.
        unsafe {
            self.gpu
                .compute
                .launch_builder(self.gpu.functions.get("attention_f32"))
                .arg(dq)
                .arg(dk)
                .arg(dv)
                .arg(dm)
                .arg(dout)
                .arg(dp)
                .arg(&ql)
                .arg(&kl)
                .arg(&nh)
                .arg(&hd)
                .arg(&scale)
                .launch(cfg)
        }
        .map_err(|e| CudaError::driver("launching attention_f32", e))?;
        self.download(&s.computed, &s.y, &mut s.down_f32, out)
    }

    /// Embedding lookup: `out[t, :] = table[ids[t], :]` widened to f32, with `table` an
    /// `[vocab, width]` matrix in the checkpoint's dtype (`out_features` = vocab). For the
    /// offloading engine, which will keep the table resident; an id outside the table is an
    /// error.
    pub fn try_embedding(
        &self,
        ids: &[u32],
        table: &Matrix,
        out: &mut [f32],
    ) -> Result<(), CudaError> {
        let (vocab, width) = (table.out_features, table.in_features);
        let (t_len, dtype) = match &table.data {
            WeightData::F32(d) => (d.len(), 0i32),
            WeightData::F16(d) => (d.len(), 1),
            WeightData::Bf16(d) => (d.len(), 2),
            WeightData::Bf16Panels(_) => return Err(panels_refused()),
        };
        check(t_len == vocab * width, || {
            format!("embedding: table must be [vocab={vocab}, width={width}], has {t_len}")
        })?;
        check(out.len() == ids.len() * width, || {
            format!(
                "embedding: out must be [tokens={}, width={width}]",
                ids.len()
            )
        })?;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(CudaError::Shape(format!(
                "embedding: token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        if out.is_empty() {
            return Ok(());
        }
        let mut guard = self.begin()?;
        let s = &mut *guard;
        let staged_ids = s.up_u32.ensure(&self.gpu.ctx, ids.len())?;
        staged_ids.copy_from_slice(ids);
        self.upload("token ids", staged_ids, &mut s.ids)?;
        match &table.data {
            WeightData::Bf16Panels(_) => unreachable!("refused by the length check above"),
            WeightData::F32(d) => {
                let st = s.up_f32.ensure(&self.gpu.ctx, d.len())?;
                st.copy_from_slice(d);
                self.upload("the embedding table", st, &mut s.w)?;
            }
            WeightData::F16(d) => {
                let st = s.up_u16.ensure(&self.gpu.ctx, d.len())?;
                st.copy_from_slice(bytemuck::cast_slice(d));
                self.upload("the embedding table", st, &mut s.w16)?;
            }
            WeightData::Bf16(d) => {
                let st = s.up_u16.ensure(&self.gpu.ctx, d.len())?;
                st.copy_from_slice(bytemuck::cast_slice(d));
                self.upload("the embedding table", st, &mut s.w16)?;
            }
        }
        self.uploads_done(&s.uploaded)?;
        s.y.ensure(&self.gpu.compute, out.len())?;
        let (tokens, width_u, vocab_u) = (ids.len() as u64, width as u64, vocab as u64);
        let dids = s.ids.get()?;
        let dout = s.y.get_mut()?;
        let mut b = self
            .gpu
            .compute
            .launch_builder(self.gpu.functions.get("embedding_gather"));
        b.arg(dout);
        if dtype == 0 {
            b.arg(s.w.get()?);
        } else {
            b.arg(s.w16.get()?);
        }
        b.arg(dids)
            .arg(&tokens)
            .arg(&width_u)
            .arg(&vocab_u)
            .arg(&dtype);
        // SAFETY: embedding_gather(float* out, const void* table, const unsigned* ids,
        // u64 tokens, u64 width, u64 vocab, int dtype): out holds tokens*width floats, the table
        // vocab*width elements of the dtype `dtype` names, ids `tokens` entries, each < vocab.
        unsafe { b.launch(elem_cfg(out.len())) }
            .map_err(|e| CudaError::driver("launching embedding_gather", e))?;
        drop(b);
        self.download(&s.computed, &s.y, &mut s.down_f32, out)
    }
}

/// The error for weights packed into the CPU kernels' panels: the device kernels take the
/// nn.Linear layout (the executor packs only for runs without a device).
fn panels_refused() -> CudaError {
    CudaError::Shape(
        "weights packed into CPU panels cannot go to the GPU, which takes the nn.Linear layout"
            .into(),
    )
}

fn check(ok: bool, message: impl FnOnce() -> String) -> Result<(), CudaError> {
    if ok {
        Ok(())
    } else {
        Err(CudaError::Shape(message()))
    }
}

/// Panics with the CUDA failure: the trait cannot return it (see the module documentation).
fn or_die(op: &str, r: Result<(), CudaError>) {
    if let Err(e) = r {
        panic!("cuda backend: {op} failed: {e}");
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn linear(&self, x: &[f32], tokens: usize, w: &Matrix, bias: Option<&[f32]>, y: &mut [f32]) {
        or_die("linear", self.try_linear(x, tokens, w, bias, y))
    }

    fn layer_norm(
        &self,
        x: &[f32],
        width: usize,
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        y: &mut [f32],
    ) {
        or_die(
            "layer_norm",
            self.try_layer_norm(x, width, gamma, beta, eps, y),
        )
    }

    fn relu_inplace(&self, x: &mut [f32]) {
        or_die("relu", self.try_relu_inplace(x))
    }

    fn scale_inplace(&self, x: &mut [f32], factor: f32) {
        or_die("scale", self.try_scale_inplace(x, factor))
    }

    fn add_inplace(&self, acc: &mut [f32], x: &[f32]) {
        or_die("add", self.try_add_inplace(acc, x))
    }

    fn attention(
        &self,
        q: &[f32],
        q_len: usize,
        k: KvRows,
        v: KvRows,
        kv_len: usize,
        key_valid: &[bool],
        num_heads: usize,
        head_dim: usize,
        scale: f32,
        out: &mut [f32],
        _scratch: &mut [f32],
    ) {
        or_die(
            "attention",
            self.try_attention(
                q, q_len, k, v, kv_len, key_valid, num_heads, head_dim, scale, out,
            ),
        )
    }
}
