//! Device discovery and memory queries that never panic on a machine without CUDA.

use cudarc::driver::{CudaContext, DriverError};
use thiserror::Error;

/// Why the CUDA backend cannot run on this machine, each with what to do about it.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum CudaUnavailable {
    /// `libcuda.so` (installed by the NVIDIA driver, not by the toolkit) cannot be loaded.
    #[error(
        "the NVIDIA driver library (libcuda.so.1) was not found: this machine has no NVIDIA \
         driver, or it is not on the loader path. Install the NVIDIA driver (nvidia-smi should \
         list a GPU), or add the directory holding libcuda.so.1 to LD_LIBRARY_PATH"
    )]
    NoDriverLibrary,
    /// The driver loaded but reports no device (`cuInit` says `CUDA_ERROR_NO_DEVICE`, or the
    /// count is zero), e.g. a container started without GPU access.
    #[error(
        "the NVIDIA driver is installed but reports no CUDA device ({detail}); check nvidia-smi, \
         CUDA_VISIBLE_DEVICES, and that a container was started with GPU access"
    )]
    NoDevice {
        /// What the driver said.
        detail: String,
    },
    /// The driver loaded but failed to initialise or to open the device.
    #[error("the CUDA driver failed while {context}: {message}")]
    Driver {
        /// What was being done.
        context: &'static str,
        /// The driver's error code and text.
        message: String,
    },
    /// A CUDA library the backend needs besides the driver (cuBLAS, NVRTC) cannot be loaded.
    #[error("{library} is missing: {hint}")]
    MissingLibrary {
        /// The library's name.
        library: &'static str,
        /// How to install it.
        hint: String,
    },
}

/// What [`probe`] found: enough to report the device and to size GPU placements.
#[derive(Debug, Clone, PartialEq)]
pub struct CudaInfo {
    /// Number of CUDA devices the driver reports.
    pub device_count: usize,
    /// The device the backend uses (always 0 for now).
    pub ordinal: usize,
    /// Marketing name, e.g. "NVIDIA A10".
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Driver API version as CUDA encodes it (12040 = 12.4).
    pub driver_version: i32,
    /// Memory on the device and how much of it is free now.
    pub memory: DeviceMemory,
}

/// Free and total device memory in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes free now (other processes' use included).
    pub free: u64,
    /// Bytes on the device.
    pub total: u64,
    /// Where the numbers came from: "nvml" or "cuMemGetInfo".
    pub source: &'static str,
}

impl std::fmt::Display for CudaInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const GIB: f64 = (1u64 << 30) as f64;
        write!(
            f,
            "GPU {} of {}: {} (sm_{}{}), {:.1} GiB free of {:.1} GiB, driver CUDA {}.{}",
            self.ordinal,
            self.device_count,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.memory.free as f64 / GIB,
            self.memory.total as f64 / GIB,
            self.driver_version / 1000,
            (self.driver_version % 1000) / 10
        )
    }
}

/// Finds the GPU the backend would use and checks every library it needs, without panicking.
///
/// Order matters: cudarc loads libraries lazily and panics inside the first call when one is
/// missing, so presence is checked (by trying to load it) before any call into it.
pub fn probe() -> Result<CudaInfo, CudaUnavailable> {
    probe_context().map(|(info, _)| info)
}

/// [`probe`], keeping the opened context for the backend (opening a primary context twice in a
/// row would tear it down and build it again in between).
pub(crate) fn probe_context() -> Result<(CudaInfo, std::sync::Arc<CudaContext>), CudaUnavailable> {
    // SAFETY: is_culib_present only tries to dlopen the candidate names and drops the handles.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaUnavailable::NoDriverLibrary);
    }
    let count = match CudaContext::device_count() {
        Ok(n) => n,
        Err(e)
            if e.0 == cudarc::driver::sys::cudaError_enum::CUDA_ERROR_NO_DEVICE
                || e.0 == cudarc::driver::sys::cudaError_enum::CUDA_ERROR_NOT_FOUND =>
        {
            return Err(CudaUnavailable::NoDevice {
                detail: describe_driver_error(&e),
            })
        }
        Err(e) => {
            return Err(CudaUnavailable::Driver {
                context: "initialising (cuInit) and counting devices",
                message: describe_driver_error(&e),
            })
        }
    };
    if count <= 0 {
        return Err(CudaUnavailable::NoDevice {
            detail: "device count 0".into(),
        });
    }
    // SAFETY: as above, a load attempt only.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(CudaUnavailable::MissingLibrary {
            library: "libcublas",
            hint: "cuBLAS (libcublas.so.12 and libcublasLt.so.12) could not be loaded: install \
                   the CUDA toolkit's libraries or the PyPI package nvidia-cublas-cu12, and put \
                   its lib directory on LD_LIBRARY_PATH"
                .into(),
        });
    }
    if !super::kernels::nvrtc_available() {
        return Err(CudaUnavailable::MissingLibrary {
            library: "libnvrtc",
            hint: super::kernels::nvrtc_missing_hint(),
        });
    }
    let ctx = CudaContext::new(0).map_err(|e| CudaUnavailable::Driver {
        context: "opening device 0",
        message: describe_driver_error(&e),
    })?;
    let info_err = |context: &'static str| {
        move |e: DriverError| CudaUnavailable::Driver {
            context,
            message: describe_driver_error(&e),
        }
    };
    let name = ctx.name().map_err(info_err("reading the device name"))?;
    let compute_capability = ctx
        .compute_capability()
        .map_err(info_err("reading the compute capability"))?;
    let mut driver_version = 0i32;
    // SAFETY: the driver library is loaded and initialised (device_count ran cuInit); the
    // pointer is to a live i32.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) }
        .result()
        .map_err(info_err("reading the driver version"))?;
    let memory = device_memory(&ctx).map_err(info_err("reading free memory"))?;
    let info = CudaInfo {
        device_count: count as usize,
        ordinal: 0,
        name,
        compute_capability,
        driver_version,
        memory,
    };
    Ok((info, ctx))
}

/// Free and total memory of `ctx`'s device: from NVML when it can be loaded (it sees the whole
/// device, other processes included, and costs no context), else from `cuMemGetInfo`.
pub(crate) fn device_memory(
    ctx: &std::sync::Arc<CudaContext>,
) -> Result<DeviceMemory, DriverError> {
    if let Some(m) = ctx.uuid().ok().and_then(|u| nvml_memory(&u)) {
        return Ok(m);
    }
    let (free, total) = ctx.mem_get_info()?;
    Ok(DeviceMemory {
        free: free as u64,
        total: total as u64,
        source: "cuMemGetInfo",
    })
}

/// NVML's view of the device with this CUDA UUID; `None` when NVML is absent or disagrees.
fn nvml_memory(uuid: &cudarc::driver::sys::CUuuid) -> Option<DeviceMemory> {
    let nvml = nvml_wrapper::Nvml::init().ok()?;
    let device = nvml.device_by_uuid(nvml_uuid(uuid)).ok()?;
    let m = device.memory_info().ok()?;
    Some(DeviceMemory {
        free: m.free,
        total: m.total,
        source: "nvml",
    })
}

/// NVML names devices "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"; CUDA gives the 16 raw bytes.
pub(crate) fn nvml_uuid(uuid: &cudarc::driver::sys::CUuuid) -> String {
    let hex: Vec<String> = uuid
        .bytes
        .iter()
        .map(|b| format!("{:02x}", *b as u8))
        .collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        hex[0..4].concat(),
        hex[4..6].concat(),
        hex[6..8].concat(),
        hex[8..10].concat(),
        hex[10..16].concat()
    )
}

/// The error's code and, when the driver can say, its text.
pub(crate) fn describe_driver_error(e: &DriverError) -> String {
    match e.error_string() {
        Ok(s) => format!("{:?} ({})", e.0, s.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_returns_instead_of_panicking() {
        match probe() {
            Ok(info) => eprintln!("probe found {info}"),
            Err(e) => {
                let msg = e.to_string();
                eprintln!("probe: {msg}");
                assert!(!msg.is_empty());
            }
        }
    }

    #[test]
    fn nvml_uuid_format() {
        let mut u = cudarc::driver::sys::CUuuid { bytes: [0; 16] };
        for (i, b) in u.bytes.iter_mut().enumerate() {
            *b = (i * 17) as _;
        }
        assert_eq!(nvml_uuid(&u), "GPU-00112233-4455-6677-8899-aabbccddeeff");
    }
}
