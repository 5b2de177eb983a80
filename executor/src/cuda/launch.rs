//! Launch plumbing shared by [`super::CudaBackend`] and [`super::CudaDevice`]: the kernel table,
//! launch shapes, grow-only pinned and device buffers, and the one cuBLAS call both make.
//!
//! Kept in one place so that the two users cannot drift apart on the details that are easy to get
//! wrong (grid limits, which pinned flags the CPU may read, stream-ordered allocation).

use super::kernels::{self, KernelSource};
use super::probe::{describe_driver_error, probe_context, CudaInfo};
use super::CudaError;
use cudarc::cublas::{result::CublasError, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig,
    PinnedHostSlice, ValidAsZeroBits,
};
use std::collections::HashMap;
use std::sync::Arc;

/// Threads per block for the row kernels (layer norm, attention): a multiple of 32, and enough
/// to cover a 128-wide head in one pass.
pub(super) const ROW_THREADS: u32 = 256;
/// Threads per block for the element-wise kernels.
pub(super) const ELEM_THREADS: u32 = 256;
/// Cap on element-wise grid size; the kernels are grid-stride loops, so this bounds only how
/// many blocks are in flight, not what they cover.
pub(super) const MAX_ELEM_BLOCKS: u64 = 65_535;
/// Smallest allocation of any grow-only buffer, in elements: avoids a string of tiny
/// reallocations while a run warms up, and zero-sized allocations.
pub(super) const MIN_CAPACITY: usize = 4096;

/// An opened GPU with what both users need: the context, three streams (copies in, compute,
/// copies out), cuBLAS bound to the compute stream, and every kernel loaded.
pub(super) struct Gpu {
    pub info: CudaInfo,
    pub ctx: Arc<CudaContext>,
    pub h2d: Arc<CudaStream>,
    pub compute: Arc<CudaStream>,
    pub d2h: Arc<CudaStream>,
    pub blas: CudaBlas,
    pub functions: Functions,
}

impl Gpu {
    /// Opens GPU 0: every configuration problem (no driver or device, a missing library, PTX the
    /// driver rejects) is an error here, never a panic.
    pub(super) fn open() -> Result<Gpu, CudaError> {
        let (info, ctx) = probe_context()?;
        let stream = |what: &str| {
            ctx.new_stream()
                .map_err(|e| CudaError::driver(format!("creating the {what} stream"), e))
        };
        let h2d = stream("host-to-device")?;
        let compute = stream("compute")?;
        let d2h = stream("device-to-host")?;
        let blas = CudaBlas::new(compute.clone())
            .map_err(|e| CudaError::blas("creating the cuBLAS handle", e))?;
        let functions = load_functions(&ctx, info.driver_version)?;
        Ok(Gpu {
            info,
            ctx,
            h2d,
            compute,
            d2h,
            blas,
            functions,
        })
    }
}

/// An event for ordering work across streams (`what` names it in the error).
pub(super) fn new_event(ctx: &Arc<CudaContext>, what: &str) -> Result<CudaEvent, CudaError> {
    ctx.new_event(None)
        .map_err(|e| CudaError::driver(format!("creating the {what} event"), e))
}

/// The kernels of every module, looked up once.
pub(super) struct Functions {
    by_name: HashMap<&'static str, CudaFunction>,
}

impl Functions {
    pub(super) fn get(&self, name: &str) -> &CudaFunction {
        // Every name used below is listed in kernels::SOURCES, and `load` checked that each
        // listed name exists in its module, so this lookup cannot miss.
        &self.by_name[name]
    }
}

/// A grow-only page-locked host buffer.
pub(super) struct PinnedBuf<T> {
    buf: Option<PinnedHostSlice<T>>,
    /// 0 for memory the CPU reads, `CU_MEMHOSTALLOC_WRITECOMBINED` for upload staging.
    flags: u32,
}

impl<T: DeviceRepr + ValidAsZeroBits> PinnedBuf<T> {
    pub(super) fn new(flags: u32) -> Self {
        PinnedBuf { buf: None, flags }
    }

    /// The first `n` elements, reallocating (and dropping the old contents) when smaller.
    ///
    /// A reallocation must never free memory that a copy is still using: `CudaBackend` sizes a
    /// buffer once per operation, before the first copy out of it is enqueued, and every
    /// operation starts by waiting for the copy stream; `CudaDevice` always asks for its full
    /// staging size (so the buffer is allocated once) and waits for the buffer's last copy
    /// before refilling it.
    pub(super) fn ensure(
        &mut self,
        ctx: &Arc<CudaContext>,
        n: usize,
    ) -> Result<&mut [T], CudaError> {
        let have = self.buf.as_ref().map_or(0, |b| b.len());
        if have < n || self.buf.is_none() {
            self.buf = None;
            let cap = grow(have, n);
            // SAFETY: the memory is uninitialised; every caller writes a prefix (staging) or has
            // the GPU write it (downloads) before reading that prefix.
            let b = unsafe { ctx.alloc_pinned_with_flags::<T>(cap, self.flags) }
                .map_err(|e| CudaError::driver(format!("allocating {cap} pinned elements"), e))?;
            self.buf = Some(b);
        }
        match self.buf.as_mut() {
            Some(b) => {
                let s = b
                    .as_mut_slice()
                    .map_err(|e| CudaError::driver("waiting for a pinned buffer", e))?;
                Ok(&mut s[..n])
            }
            None => Err(internal("pinned buffer missing after allocation")),
        }
    }
}

/// A grow-only device buffer, allocated on the compute stream.
pub(super) struct DevBuf<T> {
    buf: Option<CudaSlice<T>>,
}

impl<T: DeviceRepr> DevBuf<T> {
    pub(super) fn new() -> Self {
        DevBuf { buf: None }
    }

    /// Makes room for at least `n` elements. A new allocation is made on the compute stream and
    /// the stream is synchronised, so that the copy stream may write into it at once
    /// (stream-ordered allocations are otherwise valid only in the allocating stream's order).
    pub(super) fn ensure(&mut self, compute: &Arc<CudaStream>, n: usize) -> Result<(), CudaError> {
        let have = self.buf.as_ref().map_or(0, |b| b.len());
        if have < n || self.buf.is_none() {
            self.buf = None;
            let cap = grow(have, n);
            // SAFETY: uninitialised device memory; every use writes before it reads (uploads,
            // kernel outputs), and reads only the prefix that was written.
            let b = unsafe { compute.alloc::<T>(cap) }.map_err(|e| {
                CudaError::driver(
                    format!(
                        "allocating {} MiB on the GPU",
                        (cap * std::mem::size_of::<T>()) >> 20
                    ),
                    e,
                )
            })?;
            compute
                .synchronize()
                .map_err(|e| CudaError::driver("synchronising after an allocation", e))?;
            self.buf = Some(b);
        }
        Ok(())
    }

    pub(super) fn get(&self) -> Result<&CudaSlice<T>, CudaError> {
        self.buf
            .as_ref()
            .ok_or_else(|| internal("device buffer used before it was sized"))
    }

    pub(super) fn get_mut(&mut self) -> Result<&mut CudaSlice<T>, CudaError> {
        self.buf
            .as_mut()
            .ok_or_else(|| internal("device buffer used before it was sized"))
    }
}

pub(super) fn grow(have: usize, need: usize) -> usize {
    need.max(have + have / 2).max(MIN_CAPACITY)
}

pub(super) fn internal(what: &str) -> CudaError {
    CudaError::Shape(format!("internal error: {what}"))
}

/// Compiles (once per process) and loads every module into `ctx`, and looks up each kernel.
fn load_functions(ctx: &Arc<CudaContext>, driver_version: i32) -> Result<Functions, CudaError> {
    let mut by_name = HashMap::new();
    for (src, ptx) in kernels::compile_all()? {
        let KernelSource {
            name, functions, ..
        } = src;
        let module = ctx.load_module(ptx).map_err(|e| CudaError::Driver {
            context: format!("loading the PTX of {name}"),
            message: format!(
                "{} (CUDA_ERROR_UNSUPPORTED_PTX_VERSION means libnvrtc is newer than the \
                 driver, which supports CUDA {}.{}: use an NVRTC no newer than the driver)",
                describe_driver_error(&e),
                driver_version / 1000,
                (driver_version % 1000) / 10
            ),
        })?;
        for f in functions {
            let func = module
                .load_function(f)
                .map_err(|e| CudaError::driver(format!("finding kernel {f} in {name}"), e))?;
            by_name.insert(*f, func);
        }
    }
    Ok(Functions { by_name })
}

/// Element-wise launch shape for `n` elements.
pub(super) fn elem_cfg(n: usize) -> LaunchConfig {
    let blocks = (n as u64)
        .div_ceil(ELEM_THREADS as u64)
        .clamp(1, MAX_ELEM_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ELEM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `y[t, r] = sum_c W[r, c] x[t, c] (+ beta * y[t, r])` for row-major `W` (`[out, in]`, the
/// nn.Linear layout), `x` (`[tokens, in]`) and `y` (`[tokens, ldy]`, columns `0..out` written),
/// as one cuBLAS `GemmEx` with f32 accumulation and f32 output.
///
/// cuBLAS is column-major, so the row-major operands are passed as their transposes: `A = W` seen
/// as `[in, out]` and transposed, `B = x` as `[in, tokens]`, `C = y` as `[ldy, tokens]`. `ldy`
/// larger than `out` writes a column block of a wider output (a run of a weight matrix's rows).
pub(super) struct RowMajorGemm {
    /// Rows of `W` computed (`m`).
    pub out: i32,
    /// Rows of `x` (`n`).
    pub tokens: i32,
    /// Columns of `W` and `x` (`k`).
    pub inp: i32,
    /// Device address of `W[0, 0]` and its element type.
    pub w: u64,
    pub w_type: blas_sys::cudaDataType_t,
    /// Device address of `x[0, 0]` and its element type (must equal `w_type`, except that
    /// cuBLAS accepts no mixed pair; callers convert first).
    pub x: u64,
    pub x_type: blas_sys::cudaDataType_t,
    /// Device address of the f32 `y[0, 0]`, and the row stride of `y` in elements.
    pub y: u64,
    pub ldy: i32,
    /// 0 overwrites `y`; 1 adds to it (a bias written there first).
    pub beta: f32,
}

/// Runs `g` on `blas`'s stream.
///
/// # Safety
///
/// Every address must be a live device allocation of the caller's context holding the extents
/// `g` describes (`out * inp` elements of `W`, `tokens * inp` of `x`, `tokens` rows of `ldy`
/// floats of `y`), with `ldy >= out`, and the context must be current on this thread.
pub(super) unsafe fn gemm_rows(blas: &CudaBlas, g: &RowMajorGemm) -> Result<(), CublasError> {
    let alpha = 1.0f32;
    // SAFETY: the caller's contract covers the operands; alpha and beta are host f32 values, which
    // is what CUBLAS_COMPUTE_32F reads through these pointers, and outlive the call.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            blas_sys::cublasOperation_t::CUBLAS_OP_T,
            blas_sys::cublasOperation_t::CUBLAS_OP_N,
            g.out,
            g.tokens,
            g.inp,
            &alpha as *const f32 as *const _,
            g.w as *const _,
            g.w_type,
            g.inp,
            g.x as *const _,
            g.x_type,
            g.inp,
            &g.beta as *const f32 as *const _,
            g.y as *mut _,
            blas_sys::cudaDataType_t::CUDA_R_32F,
            g.ldy,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
}
