//! `planner profile`: measures this machine into a [`Profile`].
//!
//! The CPU figures are timed runs of the executor's own kernels (`primitives::kernels`, bf16
//! weights read in place as the executor reads checkpoints), the disk figures are direct reads and
//! writes through the executor's I/O pool on the offload directory, and the GPU figures are cuBLAS
//! products and copies (`primitives::gpu`). Every figure's note says what was run and shows the
//! passes its median came from, so a reader can judge how steady it was.

use crate::profile::{
    CpuProfile, DiskProfile, Figure, GpuProfile, Profile, ProfileHeader, RateCurve, Source, GBPS,
    GIB, TFLOPS,
};
use primitives::measure::{self, Rate};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// How long and where to measure.
#[derive(Debug, Clone)]
pub struct ProfileOptions {
    /// Directory whose filesystem is measured (the offload directory the executor will use).
    pub offload_dir: PathBuf,
    /// Smaller sizes and fewer passes: under 30 s on a 2-core machine.
    pub quick: bool,
    /// The profile's name.
    pub name: String,
}

/// Why the machine could not be measured.
#[derive(Debug, Error)]
pub enum HostError {
    #[error("cannot measure the disk under {dir}: {source}")]
    Disk {
        dir: String,
        #[source]
        source: primitives::storage::StorageError,
    },
    #[error("cannot read the free space of {dir}: {source}")]
    FreeSpace {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

/// Steps of [`measure_profile`], for a progress bar: (what, share of the total time).
pub const STEPS: &[(&str, f64)] = &[
    (
        "CPU: products at prefill and decode shapes, weight streaming, attention (in rounds)",
        0.40,
    ),
    ("disk: direct write, direct read, buffered read", 0.50),
    ("GPU", 0.10),
];

/// The machine's identity as profiles record it: CPU model, the vector instruction set the kernels
/// use, core count, memory (to 0.5 GiB) and GPU name. Policies solved for a profile can tell when
/// they run somewhere else. (The instruction set is there because a cloud "AMD EPYC" with the
/// same core count and memory was a Zen 4 with AVX-512 one day and a Zen 3 without it another,
/// and prefill rates of 0.36 TFLOP/s (the Zen 4 profile, calibrated) against 0.075-0.089
/// measured on the Zen 3.)
pub fn hardware_fingerprint(gpu_name: Option<&str>) -> String {
    let (cpu, cores, memory_gib) = cpu_identity();
    format!(
        "cpu={cpu}; simd={}; cores={cores}; memory_gib={:.1}; gpu={}",
        primitives::kernels::instruction_set(),
        (memory_gib * 2.0).round() / 2.0,
        gpu_name.unwrap_or("none")
    )
}

/// (CPU brand, physical cores, memory in GiB) from sysinfo.
fn cpu_identity() -> (String, usize, f64) {
    use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};
    let sys = System::new_with_specifics(
        RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing())
            .with_memory(MemoryRefreshKind::nothing().with_ram()),
    );
    let brand = sys
        .cpus()
        .first()
        .map(|c| c.brand().trim().to_string())
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = System::physical_core_count().unwrap_or_else(rayon::current_num_threads);
    (brand, cores, sys.total_memory() as f64 / GIB)
}

fn passes_note(rate: &Rate, unit: f64, unit_name: &str) -> String {
    let shown: Vec<String> = rate
        .passes
        .iter()
        .map(|p| format!("{:.3}", p / unit))
        .collect();
    format!(
        "median of {} passes [{}] {unit_name}",
        rate.passes.len(),
        shown.join(", ")
    )
}

fn measured(value: f64, note: String) -> Figure {
    Figure {
        value: round_sig(value, 4),
        source: Source::Measured,
        note,
    }
}

/// `x` to `digits` significant digits, so files do not carry timing noise in 15 digits.
fn round_sig(x: f64, digits: i32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let scale = 10f64.powi(digits - 1 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

/// Free bytes for an unprivileged user on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> Result<u64, std::io::Error> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Measures this host. `progress(step, fraction_done)` is called as the work proceeds.
pub fn measure_profile(
    opts: &ProfileOptions,
    progress: &mut dyn FnMut(&str, f64),
) -> Result<Profile, HostError> {
    let threads = rayon::current_num_threads();
    // Passes on this 2-core VM spread by +-25% within one run (other tenants), and the median of
    // 7 moved by up to 24% between runs; with 21, two back-to-back runs agreed within 12% on
    // every CPU figure but attention, and with 21 timed in rounds (below) within 6% on every CPU
    // figure (docs/benchmarks.md; slower drifts of the host, 1.2-1.6x, remain).
    let passes = if opts.quick { 3 } else { 21 };
    // Fraction of the whole run done when each step starts (`STEPS`).
    let mut done = 0.0;
    progress(STEPS[0].0, done);
    // One layer's products of a 2048-wide model (OPT-1.3B; wider models have the same shapes
    // scaled), at 256 rows: a GPU batch of 8 prompts of 32 tokens, or 2 of 128.
    let shapes = measure::layer_shapes(2048);
    let pre_rows = crate::profile::PREFILL_ROWS as usize;
    let stream_bytes = if opts.quick { 256 << 20 } else { 1 << 30 };
    // The decode rate by rows: a GPU batch of 2 .. 64 sequences, weights streaming from DRAM.
    let curve_rows = [2usize, 4, 8, 16, 32, 64];
    // 32 sequences: their caches (134 MB of bf16) are four times the 32 MiB last-level cache, as
    // a real decode's are larger than it; with 8 (34 MB, about its size) passes moved 2x inside
    // one run.
    let attention_seqs = 32;
    // All CPU figures in rounds (measure::interleaved), so that the host's slow spells fall on
    // every figure alike. Their buffers (about 3 GiB in a full run) live only in this block, not
    // through the disk measurement.
    let (prefill, curve, stream, plain, attention) = {
        let prefill_chain = measure::LinearChain::new(&shapes, 0);
        let curve_chain = measure::LinearChain::new(&shapes, stream_bytes);
        let stream_chain = measure::LinearChain::new(&[(4096, 2048)], stream_bytes);
        let plain_buffer = measure::DramBuffer::new(stream_bytes);
        let attention_set = measure::AttentionSet::new(attention_seqs, 1, 512, 32, 64);
        let mut benches = vec![prefill_chain.flops_bench(pre_rows)];
        benches.extend(curve_rows.iter().map(|&r| curve_chain.flops_bench(r)));
        benches.push(stream_chain.bytes_bench(1));
        benches.push(plain_buffer.bench());
        benches.push(attention_set.bench());
        let base = done;
        let rates = measure::interleaved(passes, &mut benches, &mut |f| {
            progress(STEPS[0].0, base + f * STEPS[0].1)
        });
        let [prefill, curve @ .., stream, plain, attention] = &rates[..] else {
            unreachable!("one rate per bench");
        };
        (
            prefill.clone(),
            curve.to_vec(),
            stream.clone(),
            plain.clone(),
            attention.clone(),
        )
    };
    done += STEPS[0].1;
    let decode = curve[3].clone();

    progress(STEPS[1].0, done);
    let disk_bytes: u64 = if opts.quick { 512 << 20 } else { 2 << 30 };
    // Each disk pass moves the whole 2 GiB file: with 11 the full profile took 2.2-2.6 minutes
    // here.
    let disk_passes = if opts.quick { 3 } else { 11 };
    let base = done;
    let disk = measure::disk(&opts.offload_dir, disk_bytes, disk_passes, &mut |f| {
        progress(STEPS[1].0, base + f * STEPS[1].1)
    })
    .map_err(|source| HostError::Disk {
        dir: opts.offload_dir.display().to_string(),
        source,
    })?;
    done += STEPS[1].1;
    let free = free_bytes(&opts.offload_dir).map_err(|source| HostError::FreeSpace {
        dir: opts.offload_dir.display().to_string(),
        source,
    })?;

    progress(STEPS[2].0, done);
    let gpu = primitives::gpu::measure_gpu(opts.quick);
    progress("done", 1.0);

    let (brand, cores, memory_gib) = cpu_identity();
    let reserved = (0.1 * memory_gib).max(2.0).min(memory_gib / 2.0);
    let kernel = format!("primitives::kernels::linear, bf16 weights, {threads} threads");
    let cpu = CpuProfile {
        name: format!("{brand}, {cores} cores"),
        cores: measured(cores as f64, "physical cores (sysinfo)".into()),
        memory_gib: measured(memory_gib, "total memory (sysinfo)".into()),
        reserved_gib: Figure {
            value: round_sig(reserved, 3),
            source: Source::Assumed,
            note: "10% of memory, at least 2 GiB: operating system and other processes".into(),
        },
        matmul_prefill_tflops: measured(
            prefill.median / TFLOPS,
            format!(
                "{kernel}, {pre_rows} rows x one layer's products [{}, {}], [{}, {}], [{}, {}]: {}",
                shapes[0].0,
                shapes[0].1,
                shapes[1].0,
                shapes[1].1,
                shapes[2].0,
                shapes[2].1,
                passes_note(&prefill, TFLOPS, "TFLOP/s")
            ),
        ),
        matmul_decode_tflops: measured(
            decode.median / TFLOPS,
            format!(
                "{kernel}, 16 rows x the same shapes over {} MiB of weights (a decode step of a \
                 16-sequence batch, weights streaming from DRAM): {}",
                stream_bytes >> 20,
                passes_note(&decode, TFLOPS, "TFLOP/s")
            ),
        ),
        matmul_decode_by_rows: Some(RateCurve {
            rows: curve_rows.iter().map(|&r| r as f64).collect(),
            tflops: curve
                .iter()
                .map(|r| round_sig(r.median / TFLOPS, 4))
                .collect(),
            source: Source::Measured,
            note: format!(
                "{kernel}, each row count x the same shapes over {} MiB of weights; spread of \
                 the passes around each median: {}",
                stream_bytes >> 20,
                curve
                    .iter()
                    .map(|r| format!("{:.0}%", 100.0 * r.spread()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
        attention_tflops: measured(
            attention.median / TFLOPS,
            format!(
                "primitives::kernels::attention, decode shape as the executor calls it \
                 ({attention_seqs} sequences one after another, 1 query over 512 bf16 cache rows, \
                 32 heads x 64), every key counted: {}",
                passes_note(&attention, TFLOPS, "TFLOP/s")
            ),
        ),
        dram_gbps: measured(
            stream.median / GBPS,
            format!(
                "{kernel}, 1 row x [4096, 2048] over {} MiB of weights (batch-1 decode \
                 streaming): {}; plain reads of the same size reach {:.2} GB/s",
                stream_bytes >> 20,
                passes_note(&stream, GBPS, "GB/s"),
                plain.median / GBPS
            ),
        ),
    };
    let io = format!(
        "{} MiB file in {}, 1 MiB requests, 8 in flight on 4 I/O threads (primitives::storage::IoPool)",
        disk.file_bytes >> 20,
        opts.offload_dir.display(),
    );
    let direct = match &disk.fallback {
        Some(why) => format!("NOT direct ({why})"),
        None => "O_DIRECT".into(),
    };
    let disk_profile = DiskProfile {
        name: format!("filesystem of {}", opts.offload_dir.display()),
        capacity_gib: measured(
            free as f64 * 0.9 / GIB,
            format!("90% of the {:.1} GiB free (statvfs)", free as f64 / GIB),
        ),
        read_gbps: measured(
            disk.read.median / GBPS,
            format!(
                "direct reads, {} MiB file in {}, {} MiB at a time into staging buffers on huge \
                 pages, two in flight, each split into 1 MiB requests on 4 I/O threads \
                 (primitives::storage::IoPool, as the executor reads disk-resident weights): {}",
                disk.file_bytes >> 20,
                opts.offload_dir.display(),
                measure::READ_RANGE >> 20,
                passes_note(&disk.read, GBPS, "GB/s")
            ),
        ),
        write_gbps: measured(
            disk.write.median / GBPS,
            format!(
                "direct writes then sync, {io}, {direct}: {}",
                passes_note(&disk.write, GBPS, "GB/s")
            ),
        ),
        buffered_read_gbps: Some(measured(
            disk.buffered_read.median / GBPS,
            format!(
                "buffered reads after dropping the file's pages (posix_fadvise), as the direct \
                 reads, one pass (later passes are served in part by a cache below the guest's): {}",
                passes_note(&disk.buffered_read, GBPS, "GB/s")
            ),
        )),
    };
    let (gpu_profile, gpu_name, gpu_line) = match gpu {
        Ok(g) => {
            let copy = |r: &Rate, what: &str| {
                measured(
                    r.median / GBPS,
                    format!("{what}: {}", passes_note(r, GBPS, "GB/s")),
                )
            };
            let shape = |s: (usize, usize, usize)| format!("{} rows x [{}, {}]", s.0, s.1, s.2);
            let profile = GpuProfile {
                name: g.name.clone(),
                memory_gib: measured(g.memory_total as f64 / GIB, "cuMemGetInfo total".into()),
                reserved_gib: Figure {
                    value: round_sig(
                        ((g.memory_total - g.memory_free.min(g.memory_total)) as f64 / GIB)
                            .max(1.0),
                        3,
                    ),
                    source: Source::Measured,
                    note: "memory in use when measured (CUDA context, other processes), at least 1 GiB".into(),
                },
                matmul_prefill_tflops: measured(
                    g.matmul_prefill.median / TFLOPS,
                    format!(
                        "cuBLAS f16 product, f32 accumulation, {}: {}",
                        shape(g.prefill_shape),
                        passes_note(&g.matmul_prefill, TFLOPS, "TFLOP/s")
                    ),
                ),
                matmul_decode_tflops: measured(
                    g.matmul_decode.median / TFLOPS,
                    format!(
                        "cuBLAS f16 product, f32 accumulation, {}: {}",
                        shape(g.decode_shape),
                        passes_note(&g.matmul_decode, TFLOPS, "TFLOP/s")
                    ),
                ),
                attention_prefill_tflops: Figure {
                    value: round_sig(g.matmul_prefill.median / TFLOPS, 4),
                    source: Source::Assumed,
                    note: "taken equal to the prefill product rate (not timed separately)".into(),
                },
                attention_decode_tflops: Figure {
                    value: round_sig(g.matmul_decode.median / TFLOPS, 4),
                    source: Source::Assumed,
                    note: "taken equal to the decode product rate; decode attention is bound by hbm_gbps".into(),
                },
                hbm_gbps: copy(&g.hbm, "device-to-device copy, bytes read + written"),
                h2d_pinned_gbps: copy(&g.h2d_pinned, "host-to-device from pinned memory"),
                h2d_pageable_gbps: copy(&g.h2d_pageable, "host-to-device from pageable memory"),
                d2h_pinned_gbps: copy(&g.d2h_pinned, "device-to-host into pinned memory"),
                d2h_pageable_gbps: copy(&g.d2h_pageable, "device-to-host into pageable memory"),
            };
            let line = format!("GPU: {}", g.name);
            (Some(profile), Some(g.name), line)
        }
        Err(why) => (None, None, format!("no GPU section: {why}")),
    };
    Ok(Profile {
        profile: ProfileHeader {
            name: opts.name.clone(),
            description: format!(
                "measured by `planner profile{}` on {}; {gpu_line}",
                if opts.quick { " --quick" } else { "" },
                cpu.name
            ),
            hardware: Some(hardware_fingerprint(gpu_name.as_deref())),
        },
        gpu: gpu_profile,
        cpu,
        disk: disk_profile,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_sig_keeps_four_digits() {
        assert_eq!(round_sig(0.123456, 4), 0.1235);
        assert_eq!(round_sig(16834.7, 4), 16830.0);
        assert_eq!(round_sig(0.0, 4), 0.0);
    }

    #[test]
    fn fingerprint_names_cpu_cores_memory_and_gpu() {
        let f = hardware_fingerprint(None);
        assert!(
            f.starts_with("cpu=")
                && f.contains("; simd=")
                && f.contains("; cores=")
                && f.ends_with("gpu=none"),
            "{f}"
        );
        assert!(hardware_fingerprint(Some("NVIDIA T4")).ends_with("gpu=NVIDIA T4"));
    }

    #[test]
    fn steps_cover_the_whole_run() {
        let total: f64 = STEPS.iter().map(|s| s.1).sum();
        assert!((total - 1.0).abs() < 1e-9);
    }
}
