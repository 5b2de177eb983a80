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
//! [`backend`] ([`CudaBackend`]: the host-slice [`Backend`](crate::backend::Backend) operations,
//! uploading and downloading per call), [`device`] ([`CudaDevice`]: the
//! [`Device`](crate::device::Device) trait the block schedule's GPU tiers run on, with a table of
//! device buffers under a capacity), `launch` (kernel table, launch shapes, staging buffers and
//! the cuBLAS call the two share), `probe` (device discovery and free-memory queries), `policy`
//! (the refusal path for policies that need a GPU on a machine without one).

pub mod backend;
pub mod device;
pub mod kernels;
mod launch;
mod policy;
mod probe;

pub use backend::CudaBackend;
pub use device::{CudaDevice, DeviceQ4};
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
