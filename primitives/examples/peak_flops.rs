//! Measures the compute ceiling the matrix kernels are judged against: chains of `vdpbf16ps`
//! (bf16 pairs into f32, the prefill kernels' instruction) and of `vfmadd231ps` (f32, the
//! attention kernels'), 512 bits wide, on registers only, on 1 and on every thread. Twelve
//! independent accumulators hide the instructions' latency, so the figure is their throughput.
//! Written in inline assembly because a compiler sees through a loop of intrinsics with
//! constant operands (it hoists the product and keeps only additions).
//!
//! `cargo run --release --example peak_flops -- [iterations]` (default 100 million per thread).
//! On the 2-core Zen 4 of docs/benchmarks.md: 468 GFLOP/s bf16 and 228 GFLOP/s f32 on two
//! threads, one instruction per cycle per core at 3.66 GHz.

/// An instruction's name, its flops per instruction, and the loop that runs it.
#[cfg(target_arch = "x86_64")]
type Chains = (&'static str, u64, fn(u64));

#[cfg(target_arch = "x86_64")]
fn main() {
    use std::time::Instant;
    let iterations: u64 = std::env::args()
        .nth(1)
        .map_or(100_000_000, |a| a.parse().expect("iterations"));
    let detected = std::arch::is_x86_feature_detected!("avx512f");
    let bf16 = detected && std::arch::is_x86_feature_detected!("avx512bf16");
    if !detected {
        println!("no AVX-512 on this CPU: nothing to measure");
        return;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kinds: &[Chains] = &[
        ("vdpbf16ps zmm (bf16 -> f32)", 64, bf16_chains),
        ("vfmadd231ps zmm (f32)", 32, fma_chains),
    ];
    for &(name, flops, chains) in kinds {
        if flops == 64 && !bf16 {
            println!("{name}: not on this CPU");
            continue;
        }
        for n in [1, threads] {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..n {
                    s.spawn(|| chains(iterations));
                }
            });
            let seconds = start.elapsed().as_secs_f64();
            let per_thread = (iterations * 12) as f64 / seconds;
            println!(
                "{name}: {n} thread(s) {:.1} GFLOP/s ({:.2} instructions per ns per thread)",
                per_thread * n as f64 * flops as f64 / 1e9,
                per_thread / 1e9
            );
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("peak_flops measures x86-64 AVX-512 instructions only");
}

/// Defines `$name(iterations)`: twelve independent `$instr zmmN, zmm30, zmm31` per iteration.
/// The caller checks that the CPU has the instruction.
#[cfg(target_arch = "x86_64")]
macro_rules! chains {
    ($name:ident, $instr:literal) => {
        fn $name(iterations: u64) {
            for _ in 0..iterations {
                // SAFETY: only called where the instruction was detected; registers only, every
                // one written declared.
                unsafe {
                    std::arch::asm!(
                        concat!($instr, " zmm0, zmm30, zmm31"),
                        concat!($instr, " zmm1, zmm30, zmm31"),
                        concat!($instr, " zmm2, zmm30, zmm31"),
                        concat!($instr, " zmm3, zmm30, zmm31"),
                        concat!($instr, " zmm4, zmm30, zmm31"),
                        concat!($instr, " zmm5, zmm30, zmm31"),
                        concat!($instr, " zmm6, zmm30, zmm31"),
                        concat!($instr, " zmm7, zmm30, zmm31"),
                        concat!($instr, " zmm8, zmm30, zmm31"),
                        concat!($instr, " zmm9, zmm30, zmm31"),
                        concat!($instr, " zmm10, zmm30, zmm31"),
                        concat!($instr, " zmm11, zmm30, zmm31"),
                        out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                        out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                        out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                        options(nomem, nostack),
                    );
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
chains!(bf16_chains, "vdpbf16ps");
#[cfg(target_arch = "x86_64")]
chains!(fma_chains, "vfmadd231ps");
