//! The CUDA backend: the [`Backend`](crate::backend::Backend) operations on an NVIDIA GPU, with
//! cuBLAS for matrix products and NVRTC-compiled kernels (the `.cu` files beside this one) for
//! the rest.
//!
//! Nothing here is linked against CUDA: cudarc loads `libcuda`, `libcublas` and `libnvrtc` when
//! they are first used, so the executor builds and runs on machines without a GPU or a toolkit.
//! That loading *panics* inside cudarc when a library is absent, so every entry point goes
//! through [`probe`] first, which checks each library's presence before calling into it and
//! turns every missing piece into a [`CudaUnavailable`] that says what is missing and what to do.
//!
//! Layout: [`kernels`] (the kernel sources and their NVRTC compilation, usable without a GPU),
//! [`backend`] ([`CudaBackend`]: streams, pinned staging, grow-only device buffers), `probe`
//! (device discovery and free-memory queries), `policy` (the refusal path for policies that
//! need a GPU on a machine without one).
//!
//! Not yet here: an implementation of [`crate::device::Device`], the trait the block schedule's
//! GPU tiers run on (today only [`crate::sim::SimDevice`] implements it). It needs a handle table
//! of `CudaSlice<u8>` with a capacity from NVML's free memory, the copies on the copy streams
//! ordered by events, cuBLAS over a row range of a weight buffer (the device half of a split
//! layer), attention over a device KV buffer at an offset, and one NVRTC kernel for
//! `join_columns`; the per-call grow-only buffers of [`CudaBackend`] do not fit that shape, so it
//! was left for a machine where it can be tested (`--device cuda` is refused with this reason).

pub mod backend;
pub mod kernels;
mod policy;
mod probe;

pub use backend::CudaBackend;
pub use policy::{gpu_placement_summary, require_gpu_for, GpuRequired};
pub use probe::{probe, CudaInfo, CudaUnavailable, DeviceMemory};

use thiserror::Error;

/// Why a CUDA operation failed on a machine where the GPU was found.
///
/// Kept apart from [`CudaUnavailable`] because the remedies differ: an unavailable GPU is a
/// configuration matter (install a driver, pick a CPU policy), while these are faults during
/// work (out of memory, a kernel the driver rejects, a shape the caller got wrong).
#[derive(Debug, Error)]
pub enum CudaError {
    /// No usable GPU, driver or CUDA library on this machine.
    #[error(transparent)]
    Unavailable(#[from] CudaUnavailable),
    /// A CUDA driver call failed (allocation, copy, launch, module load).
    #[error("CUDA driver call failed while {context}: {message}")]
    Driver {
        /// What the backend was doing.
        context: String,
        /// The driver's error code and text.
        message: String,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS failed while {context}: {message}")]
    Blas {
        /// What the backend was doing.
        context: String,
        /// The cuBLAS status.
        message: String,
    },
    /// NVRTC rejected a kernel source; `log` is the compiler's own report.
    #[error("NVRTC could not compile kernel source {source_name}: {message}\n{log}")]
    Compile {
        /// The `.cu` file (or test source) that failed.
        source_name: String,
        /// The NVRTC status.
        message: String,
        /// The compiler log, with line numbers into the source.
        log: String,
    },
    /// Operands whose lengths do not match the shapes the call describes.
    #[error("cuda backend: {0}")]
    Shape(String),
}

impl CudaError {
    /// Wraps a driver error with what the backend was doing, since the bare code
    /// (`CUDA_ERROR_OUT_OF_MEMORY`) does not say which buffer or kernel it was about.
    pub(crate) fn driver(context: impl Into<String>, e: cudarc::driver::DriverError) -> CudaError {
        CudaError::Driver {
            context: context.into(),
            message: probe::describe_driver_error(&e),
        }
    }

    /// Wraps a cuBLAS status with what the backend was doing.
    pub(crate) fn blas(
        context: impl Into<String>,
        e: cudarc::cublas::result::CublasError,
    ) -> CudaError {
        CudaError::Blas {
            context: context.into(),
            message: format!("{e:?}"),
        }
    }
}
