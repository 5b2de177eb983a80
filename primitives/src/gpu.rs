//! GPU measurements for `planner profile`, through cudarc (CUDA is loaded at run time, so this
//! compiles and returns [`GpuUnavailable`] on a machine without a GPU, never panics).
//!
//! What is timed: cuBLAS f16 products (f32 accumulation) at a prefill shape and a decode shape,
//! device-to-device copies (the HBM side of the roofline), and host-to-device / device-to-host
//! copies from pinned and from pageable host memory. Timings are host wall-clock around work on
//! one stream followed by a synchronize, median of the passes after a warm-up.

use crate::measure::Rate;
use cudarc::cublas::{sys as blas_sys, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaStream, DriverError};
use half::f16;
use std::sync::Arc;
use std::time::Instant;
use thiserror::Error;

/// Why no GPU could be measured; each says what to check.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum GpuUnavailable {
    /// `libcuda.so.1` (installed with the NVIDIA driver) cannot be loaded.
    #[error("no NVIDIA driver library (libcuda.so.1) on this machine: no GPU to measure")]
    NoDriverLibrary,
    /// The driver loaded but reports no device.
    #[error(
        "the NVIDIA driver reports no CUDA device ({0}); check nvidia-smi and CUDA_VISIBLE_DEVICES"
    )]
    NoDevice(String),
    /// cuBLAS could not be loaded.
    #[error("cuBLAS (libcublas.so.12) could not be loaded: install the CUDA libraries or the PyPI package nvidia-cublas-cu12 and put its lib directory on LD_LIBRARY_PATH")]
    NoCublas,
    /// A driver or cuBLAS call failed while measuring.
    #[error("CUDA failed while {0}")]
    Failed(String),
}

/// What [`measure_gpu`] found, rates in FLOP/s and bytes/s.
#[derive(Debug, Clone)]
pub struct GpuMeasurement {
    /// Device name, e.g. "NVIDIA A10".
    pub name: String,
    /// Device memory in bytes, and how much was free.
    pub memory_total: u64,
    pub memory_free: u64,
    /// Shapes the products were timed at: (rows, out, in).
    pub prefill_shape: (usize, usize, usize),
    pub decode_shape: (usize, usize, usize),
    pub matmul_prefill: Rate,
    pub matmul_decode: Rate,
    /// Device-to-device copy, counting bytes read plus bytes written.
    pub hbm: Rate,
    pub h2d_pinned: Rate,
    pub h2d_pageable: Rate,
    pub d2h_pinned: Rate,
    pub d2h_pageable: Rate,
}

fn failed(what: &str) -> impl Fn(DriverError) -> GpuUnavailable + '_ {
    move |e| GpuUnavailable::Failed(format!("{what}: {e:?}"))
}

/// Times `work` (enqueued on `stream`) `passes` times after one warm-up; rate = amount / seconds.
fn timed(
    stream: &Arc<CudaStream>,
    passes: usize,
    amount: f64,
    mut work: impl FnMut() -> Result<(), GpuUnavailable>,
) -> Result<Rate, GpuUnavailable> {
    work()?;
    stream.synchronize().map_err(failed("synchronizing"))?;
    let mut rates = Vec::new();
    for _ in 0..passes.max(1) {
        let start = Instant::now();
        work()?;
        stream.synchronize().map_err(failed("synchronizing"))?;
        rates.push(amount / start.elapsed().as_secs_f64().max(1e-9));
    }
    Ok(Rate::from_passes(rates))
}

/// Rate of cuBLAS f16 products `y[rows, out] = x[rows, inp] W^T` (W row-major `[out, inp]`).
fn gemm_rate(
    stream: &Arc<CudaStream>,
    blas: &CudaBlas,
    (rows, out, inp): (usize, usize, usize),
    passes: usize,
) -> Result<Rate, GpuUnavailable> {
    let w = stream
        .alloc_zeros::<f16>(out * inp)
        .map_err(failed("allocating the weight matrix"))?;
    let x = stream
        .alloc_zeros::<f16>(rows * inp)
        .map_err(failed("allocating the input"))?;
    let mut y = stream
        .alloc_zeros::<f16>(rows * out)
        .map_err(failed("allocating the output"))?;
    let flops = 2.0 * (rows * out * inp) as f64;
    let calls = ((2e12 / flops).ceil() as usize).clamp(1, 200);
    let cfg = GemmConfig {
        transa: blas_sys::cublasOperation_t::CUBLAS_OP_T,
        transb: blas_sys::cublasOperation_t::CUBLAS_OP_N,
        m: out as i32,
        n: rows as i32,
        k: inp as i32,
        alpha: f16::ONE,
        lda: inp as i32,
        ldb: inp as i32,
        beta: f16::ZERO,
        ldc: out as i32,
    };
    timed(stream, passes, flops * calls as f64, || {
        for _ in 0..calls {
            // SAFETY: column-major view of the row-major operands: A = W as [inp, out] transposed
            // (lda = inp), B = x as [inp, rows] (ldb = inp), C = y as [out, rows] (ldc = out);
            // each buffer holds exactly those elements.
            unsafe { blas.gemm(cfg, &w, &x, &mut y) }
                .map_err(|e| GpuUnavailable::Failed(format!("cuBLAS f16 product: {e:?}")))?;
        }
        Ok(())
    })
}

/// Measures GPU 0. `quick` uses smaller transfers and fewer passes.
pub fn measure_gpu(quick: bool) -> Result<GpuMeasurement, GpuUnavailable> {
    // SAFETY: only tries to dlopen the driver library's candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(GpuUnavailable::NoDriverLibrary);
    }
    let count =
        CudaContext::device_count().map_err(|e| GpuUnavailable::NoDevice(format!("{e:?}")))?;
    if count <= 0 {
        return Err(GpuUnavailable::NoDevice("device count 0".into()));
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(GpuUnavailable::NoCublas);
    }
    let ctx = CudaContext::new(0).map_err(failed("opening device 0"))?;
    let name = ctx.name().map_err(failed("reading the device name"))?;
    let (free, total) = ctx.mem_get_info().map_err(failed("reading free memory"))?;
    let stream = ctx.default_stream();
    let blas = CudaBlas::new(stream.clone())
        .map_err(|e| GpuUnavailable::Failed(format!("creating a cuBLAS handle: {e:?}")))?;
    let passes = if quick { 3 } else { 7 };
    let prefill_shape = (4096, 8192, 8192);
    let decode_shape = (32, 8192, 8192);
    let matmul_prefill = gemm_rate(&stream, &blas, prefill_shape, passes)?;
    let matmul_decode = gemm_rate(&stream, &blas, decode_shape, passes)?;

    let bytes: usize = if quick { 256 << 20 } else { 1 << 30 };
    let src = stream
        .alloc_zeros::<u8>(bytes)
        .map_err(failed("allocating the copy source"))?;
    let mut dst = stream
        .alloc_zeros::<u8>(bytes)
        .map_err(failed("allocating the copy target"))?;
    let hbm = timed(&stream, passes, 2.0 * bytes as f64, || {
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(failed("device-to-device copy"))
    })?;
    // SAFETY: page-locked host memory of `bytes` u8; it is only used by the copies below.
    let mut pinned = unsafe { ctx.alloc_pinned::<u8>(bytes) }
        .map_err(failed("allocating pinned host memory"))?;
    let mut pageable = vec![0u8; bytes];
    let h2d_pinned = timed(&stream, passes, bytes as f64, || {
        stream
            .memcpy_htod(&pinned, &mut dst)
            .map_err(failed("pinned host-to-device copy"))
    })?;
    let h2d_pageable = timed(&stream, passes, bytes as f64, || {
        stream
            .memcpy_htod(&pageable, &mut dst)
            .map_err(failed("pageable host-to-device copy"))
    })?;
    let d2h_pinned = timed(&stream, passes, bytes as f64, || {
        stream
            .memcpy_dtoh(&src, &mut pinned)
            .map_err(failed("device-to-pinned-host copy"))
    })?;
    let d2h_pageable = timed(&stream, passes, bytes as f64, || {
        stream
            .memcpy_dtoh(&src, &mut pageable)
            .map_err(failed("device-to-pageable-host copy"))
    })?;
    Ok(GpuMeasurement {
        name,
        memory_total: total as u64,
        memory_free: free as u64,
        prefill_shape,
        decode_shape,
        matmul_prefill,
        matmul_decode,
        hbm,
        h2d_pinned,
        h2d_pageable,
        d2h_pinned,
        d2h_pageable,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn measuring_without_a_gpu_returns_a_reason() {
        match super::measure_gpu(true) {
            Ok(m) => eprintln!("measured {}: {:?}", m.name, m.matmul_prefill),
            Err(e) => {
                eprintln!("SKIPPED GPU measurement: {e}");
                assert!(!e.to_string().is_empty());
            }
        }
    }
}
