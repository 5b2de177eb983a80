//! The CUDA kernel sources and their compilation to PTX with NVRTC.
//!
//! Sources live in `.cu` files next to this one and are embedded with `include_str!`, so the
//! binary carries them and compiles them at run time for whatever GPU it finds: no nvcc at build
//! time, no toolkit on the build machine. NVRTC itself needs no GPU, which is what lets CI compile
//! every kernel on a machine without one (see `scripts/nvrtc-env.sh`): a kernel that stops
//! compiling fails the build's tests instead of failing on the first GPU machine.
//!
//! The sources include no CUDA header (f16/bf16 conversions are written with PTX and bit
//! operations in `common.cuh`), so NVRTC needs no include path.

use super::CudaError;
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use std::sync::Mutex;

/// Device helpers shared by every module; prepended to each source before compilation.
pub const COMMON_SOURCE: &str = include_str!("common.cuh");

/// One `.cu` file: its name (for error messages and NVRTC's program name), its text, and the
/// `extern "C"` kernels the backend loads from it.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File name under `executor/src/cuda/`.
    pub name: &'static str,
    /// The file's text (without [`COMMON_SOURCE`]).
    pub source: &'static str,
    /// Kernels the backend looks up in the compiled module; a missing one is a bug caught by the
    /// GPU conformance tests.
    pub functions: &'static [&'static str],
}

/// Every kernel source the backend uses. The PTX test compiles each of them.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "elementwise.cu",
        source: include_str!("elementwise.cu"),
        functions: &[
            "relu_f32",
            "scale_f32",
            "add_f32",
            "fill_rows_f32",
            "widen_f16_f32",
            "widen_bf16_f32",
            "round_f32_bf16",
            "embedding_gather",
            "join_columns_f32",
        ],
    },
    KernelSource {
        name: "layer_norm.cu",
        source: include_str!("layer_norm.cu"),
        functions: &["layer_norm_f32"],
    },
    KernelSource {
        name: "attention.cu",
        source: include_str!("attention.cu"),
        functions: &["attention_f32"],
    },
    KernelSource {
        name: "quant.cu",
        source: include_str!("quant.cu"),
        functions: &["dequant_q4_f32"],
    },
];

/// Environment variable naming extra NVRTC include directories (`:`-separated). The bundled
/// kernels need none; it exists for kernels that will include CUDA headers (the PyPI package
/// `nvidia-cuda-runtime-cu12` ships them under `nvidia/cuda_runtime/include`).
pub const INCLUDE_PATH_VAR: &str = "STRATA_NVRTC_INCLUDE";

/// Environment variable naming a `ptxas` binary (the PyPI package `nvidia-cuda-nvcc-cu12` ships
/// one; `scripts/nvrtc-env.sh DIR --with-ptxas` installs it). When set, the PTX test also
/// assembles every module for real GPU architectures, which checks what NVRTC does not: inline
/// PTX, register and shared-memory limits.
pub const PTXAS_VAR: &str = "STRATA_PTXAS";

/// Whether `libnvrtc` can be loaded. cudarc panics on the first NVRTC call when it cannot, so
/// callers check this first.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the candidate library names and drops the handles; no symbol
    // of the library is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// What to tell someone whose machine has no loadable `libnvrtc`.
pub fn nvrtc_missing_hint() -> String {
    "libnvrtc (CUDA's run-time compiler) could not be loaded: install the CUDA toolkit, or the \
     PyPI package nvidia-cuda-nvrtc-cu12 (scripts/nvrtc-env.sh does it in a venv and prints the \
     LD_LIBRARY_PATH line), and make sure libnvrtc.so.12 is on LD_LIBRARY_PATH"
        .to_string()
}

/// Compiles one source (with [`COMMON_SOURCE`] in front) to PTX.
///
/// Returns [`CudaError::Unavailable`] when libnvrtc cannot be loaded and
/// [`CudaError::Compile`] with the compiler log when the source is wrong; never panics.
pub fn compile(name: &str, source: &str) -> Result<Ptx, CudaError> {
    if !nvrtc_available() {
        return Err(super::CudaUnavailable::MissingLibrary {
            library: "libnvrtc",
            hint: nvrtc_missing_hint(),
        }
        .into());
    }
    let text = format!("{COMMON_SOURCE}\n#line 1 \"{name}\"\n{source}");
    if text.contains('\0') {
        // NVRTC takes a C string; cudarc would panic on an interior NUL.
        return Err(CudaError::Compile {
            source_name: name.to_string(),
            message: "source contains a NUL byte".into(),
            log: String::new(),
        });
    }
    let include_paths = std::env::var(INCLUDE_PATH_VAR)
        .map(|v| {
            v.split(':')
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let opts = CompileOptions {
        name: Some(name.replace('\0', "")),
        include_paths,
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(text, opts).map_err(|e| compile_error(name, e))
}

fn compile_error(name: &str, e: CompileError) -> CudaError {
    let (message, log) = match e {
        CompileError::CompileError { nvrtc, log, .. } => {
            (format!("{nvrtc:?}"), log.to_string_lossy().into_owned())
        }
        other => (format!("{other:?}"), String::new()),
    };
    CudaError::Compile {
        source_name: name.to_string(),
        message,
        log,
    }
}

/// Compiled PTX of every source in [`SOURCES`], in the same order.
///
/// Compiled once per process and cached (NVRTC takes tens to hundreds of milliseconds per
/// source); failures are not cached, so a later call after fixing the environment retries.
pub fn compile_all() -> Result<Vec<(KernelSource, Ptx)>, CudaError> {
    static CACHE: Mutex<Option<Vec<(KernelSource, Ptx)>>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(done) = cache.as_ref() {
        return Ok(done.clone());
    }
    let mut out = Vec::with_capacity(SOURCES.len());
    for src in SOURCES {
        out.push((*src, compile(src.name, src.source)?));
    }
    *cache = Some(out.clone());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prints why the test did nothing, visibly (run with --nocapture, or see the captured
    /// output of a failing neighbour), and says whether to go on.
    fn nvrtc_or_skip(test: &str) -> bool {
        if nvrtc_available() {
            return true;
        }
        eprintln!("SKIPPED: {test}: {}", nvrtc_missing_hint());
        false
    }

    #[test]
    fn every_kernel_source_compiles_to_ptx() {
        if !nvrtc_or_skip("every_kernel_source_compiles_to_ptx") {
            return;
        }
        for src in SOURCES {
            let ptx = match compile(src.name, src.source) {
                Ok(p) => p.to_src(),
                Err(e) => panic!("{e}"),
            };
            for f in src.functions {
                assert!(
                    ptx.contains(&format!(".entry {f}(")),
                    "{}: kernel {f} missing from the PTX",
                    src.name
                );
            }
            eprintln!(
                "compiled {} to PTX ({} bytes, kernels {:?})",
                src.name,
                ptx.len(),
                src.functions
            );
        }
        assert_eq!(compile_all().map(|v| v.len()).ok(), Some(SOURCES.len()));
        assemble_with_ptxas();
    }

    /// With `STRATA_PTXAS` set, assembles every module's PTX for Volta, Ampere and Hopper.
    fn assemble_with_ptxas() {
        let Ok(ptxas) = std::env::var(PTXAS_VAR) else {
            eprintln!("note: {PTXAS_VAR} is not set, so the PTX was not assembled to SASS");
            return;
        };
        let dir = tempfile::tempdir().expect("temporary directory");
        for src in SOURCES {
            let ptx = compile(src.name, src.source)
                .expect("compiled above")
                .to_src();
            let file = dir.path().join(src.name.replace(".cu", ".ptx"));
            std::fs::write(&file, ptx).expect("write PTX");
            for arch in ["sm_70", "sm_80", "sm_90"] {
                let out = std::process::Command::new(&ptxas)
                    .arg(format!("-arch={arch}"))
                    .arg("-o")
                    .arg(dir.path().join("out.cubin"))
                    .arg(&file)
                    .output()
                    .unwrap_or_else(|e| panic!("cannot run {ptxas}: {e}"));
                assert!(
                    out.status.success(),
                    "ptxas -arch={arch} rejected {}: {}",
                    src.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            eprintln!("ptxas assembled {} for sm_70, sm_80, sm_90", src.name);
        }
    }

    /// The inline-PTX line in common.cuh and its software stand-in for the CPU emulation.
    const HALF_ASM: &str = r#"asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));"#;
    const HALF_EMU: &str = "f = emu_half_to_float(h);";

    /// Runs every kernel's logic on the CPU (emu/emu.h: threads, barriers, warp shuffles) against
    /// straightforward references, so that reductions, masking and rounding are tested on
    /// machines without a GPU; the 4-bit dequantization is checked bit for bit against
    /// `primitives::quant` on random matrices ([`write_dequant_cases`]). Needs a C++20 compiler (`c++`, or `CXX`); skipped without one.
    #[test]
    fn kernel_logic_on_a_cpu_emulation() {
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let dir = tempfile::tempdir().expect("temporary directory");
        let d = dir.path();
        let probe_src = d.join("probe.cpp");
        std::fs::write(
            &probe_src,
            "#include <barrier>\nint main() { std::barrier<> b(1); }\n",
        )
        .expect("write probe");
        let probe = std::process::Command::new(&cxx)
            .args(["-std=c++20", "-pthread", "-o"])
            .arg(d.join("probe"))
            .arg(&probe_src)
            .output();
        if !matches!(&probe, Ok(o) if o.status.success()) {
            eprintln!("SKIPPED: kernel_logic_on_a_cpu_emulation: no C++20 compiler ({cxx})");
            return;
        }
        assert!(
            COMMON_SOURCE.contains(HALF_ASM),
            "common.cuh no longer has the inline PTX the emulation replaces; update HALF_ASM"
        );
        let mut kernels = String::from("#include \"emu.h\"\n");
        kernels.push_str(&COMMON_SOURCE.replace(HALF_ASM, HALF_EMU));
        for src in SOURCES {
            kernels.push_str(&format!("\n// ---- {}\n{}", src.name, src.source));
        }
        std::fs::write(d.join("kernels.cpp"), kernels).expect("write kernels.cpp");
        std::fs::write(d.join("emu.h"), include_str!("emu/emu.h")).expect("write emu.h");
        std::fs::write(d.join("emu_test.cpp"), include_str!("emu/emu_test.cpp"))
            .expect("write emu_test.cpp");
        let build = std::process::Command::new(&cxx)
            .args([
                "-std=c++20",
                "-O1",
                "-ffp-contract=off",
                "-pthread",
                "-w",
                "-o",
            ])
            .arg(d.join("emu_test"))
            .arg(d.join("emu_test.cpp"))
            .output()
            .expect("run the C++ compiler");
        assert!(
            build.status.success(),
            "the kernels do not build under the CPU emulation:\n{}",
            String::from_utf8_lossy(&build.stderr)
        );
        let cases = write_dequant_cases(d);
        let run = std::process::Command::new(d.join("emu_test"))
            .args(&cases)
            .output()
            .expect("run the emulation");
        let out = String::from_utf8_lossy(&run.stdout);
        eprintln!("{}", out.trim_end());
        assert!(
            run.status.success(),
            "emulated kernels disagree with the references"
        );
    }

    /// Writes the dequantization cases emu_test.cpp reads (layout in its `test_dequant_file`):
    /// random matrices compressed by `primitives::quant`, with full row blocks, tail rows, a
    /// matrix that is all tail, constant groups (scale 0) and row ranges that start inside a
    /// block or in the tail, as the device half of a split would. Returns the file paths.
    fn write_dequant_cases(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        use crate::quant::QuantizedMatrix;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        // (out, in, row0, rows)
        let shapes = [
            (64, 5, 0, 64),
            (128, 3, 0, 128),
            (128, 9, 40, 70),
            (130, 7, 0, 130),
            (130, 7, 100, 30),
            (3, 3, 0, 3),
            (200, 33, 64, 136),
            (70, 1, 65, 5),
            (192, 17, 150, 42),
        ];
        let mut paths = Vec::new();
        for (n, &(out, inp, row0, rows)) in shapes.iter().enumerate() {
            // Columns of different magnitudes and offsets; every fifth column constant.
            let data: Vec<f32> = (0..out * inp)
                .map(|i| {
                    let c = i % inp;
                    if c % 5 == 4 {
                        0.25 * c as f32
                    } else {
                        rnd() * (1.0 + c as f32) + 0.1 * c as f32
                    }
                })
                .collect();
            let q = QuantizedMatrix::quantize(&data, out, inp).expect("finite values quantize");
            let full = q.dequantize();
            let (codes, scales, mins) = q.parts();
            let mut bytes = Vec::new();
            for v in [out, inp, row0, rows, q.groups()] {
                bytes.extend_from_slice(&(v as u64).to_le_bytes());
            }
            bytes.extend_from_slice(codes);
            for h in scales.iter().chain(mins) {
                bytes.extend_from_slice(&h.to_bits().to_le_bytes());
            }
            for v in &full[row0 * inp..(row0 + rows) * inp] {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            let path = dir.join(format!("q4_{n}.bin"));
            std::fs::write(&path, bytes).expect("write a dequantization case");
            paths.push(path);
        }
        paths
    }

    #[test]
    fn a_syntax_error_is_an_err_with_the_compiler_log() {
        if !nvrtc_or_skip("a_syntax_error_is_an_err_with_the_compiler_log") {
            return;
        }
        let broken = "extern \"C\" __global__ void broken(float* x) { x[0] = 1.0f  }";
        match compile("broken.cu", broken) {
            Err(CudaError::Compile {
                source_name, log, ..
            }) => {
                assert_eq!(source_name, "broken.cu");
                assert!(log.contains("broken.cu"), "log names the file: {log}");
                assert!(log.contains("error"), "log has the error: {log}");
            }
            other => panic!("expected a compile error, got {other:?}"),
        }
        let undefined = "extern \"C\" __global__ void k(float* x) { x[0] = no_such_fn(); }";
        assert!(matches!(
            compile("undefined.cu", undefined),
            Err(CudaError::Compile { .. })
        ));
    }

    #[test]
    fn missing_nvrtc_is_an_err_not_a_panic() {
        // On a machine with libnvrtc this checks the success path instead; either way, no panic.
        let r = compile("tiny.cu", "extern \"C\" __global__ void k() {}");
        if nvrtc_available() {
            assert!(r.is_ok(), "{r:?}");
        } else {
            let msg = r.unwrap_err().to_string();
            assert!(msg.contains("libnvrtc"), "{msg}");
            assert!(msg.contains("nvidia-cuda-nvrtc-cu12"), "{msg}");
        }
    }
}
