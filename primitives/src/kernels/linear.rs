//! `linear`: y = x W^T + b with W in nn.Linear layout [out, in], read in place in its stored dtype,
//! or packed once into panels.
//!
//! Four schemes, chosen by the weights' layout, the number of tokens and the instruction set:
//!
//! - **Dot products** (every dtype; for bf16 below `PACK_MIN_TOKENS` tokens). The output rows
//!   are split into blocks, one rayon task each, so each thread streams its own contiguous part
//!   of W (good for the hardware prefetcher when bandwidth bound, as in batch-1 decode). Inside a
//!   task, a microkernel computes a 4 rows x 6 tokens tile of y as 24 dot products, loading 4
//!   weight vectors and 6 input vectors per step straight from W's [out, in] layout, so a 16-bit
//!   W is widened in registers only. For 1-2 tokens (bandwidth bound) each thread gets one
//!   contiguous row range; on AVX-512 one token reads it one row at a time (one sequential
//!   stream per thread, `avx512::row_bf16` / `row_fma`), otherwise the tile is 8 rows and W is
//!   prefetched into L2 `PREFETCH_BYTES` ahead (not at 1-2 tokens on Zen 5, see
//!   `prefetch::distance`; up to 24 tokens the AVX-512 tiles prefetch in the first token group,
//!   and the second token group prefetches the next chunk of W, `prefetch::NextChunk`).
//!   For many tokens the reduction dimension is cut into `K_BLOCK` slices so that a tile's
//!   input rows stay in L1 and a task's slice of W in L2.
//! - **Packed outer products** (prefill and large-batch decode, compute bound): bf16 with
//!   AVX512-BF16 from `PACK_MIN_TOKENS` tokens (see `run_packed_bf16`), and every dtype on AVX2
//!   from `AVX2_PACK_MIN_TOKENS` tokens, W widened to f32 panels once per task and the input
//!   packed into groups of 6 tokens (see `run_packed_avx2`). The AVX2 one took prefill products
//!   at OPT-6.7B shapes from 78 to 118 GFLOP/s on the 2-core Zen 3 (1024 tokens, medians of 12).
//! - **Panels** (bf16 weights packed once at load, `WeightData::Bf16Panels`, on AVX512-BF16
//!   CPUs without AMX; see `panels`): W is stored as 16-row panels in the `vdpbf16ps` operand
//!   layout, so products are outer products on every token count. Up to 24 tokens each thread
//!   streams its panels once with every token on each line; from `PACK_MIN_TOKENS` the packed
//!   path's 32 x 12 tile reads the panels in place instead of repacking W per call.
//! - **AMX tiles** (bf16 weights from `AMX_MIN_TOKENS` tokens on CPUs with AMX-BF16): W packed
//!   as for `run_packed_bf16`, the products on 16 x 16 tile accumulators held in y (see `amx`).
//!   On the 2-core Sapphire Rapids class Xeon, OPT-1.3B shapes at 1024 tokens went from 188
//!   GFLOP/s (`vdpbf16ps`) to 1250-1330.
//!
//! bf16 weights use AVX512-BF16 `vdpbf16ps` (32 products per instruction, f32 accumulation) or
//! AMX `tdpbf16ps`. Both need the input in bf16 too, so for bf16 weights the input is rounded to
//! bf16 (round to nearest even) before the product on every path, which is what PyTorch does for
//! a bf16 model; the results are then the same whichever path runs, up to the order of f32
//! additions.

use super::{Matrix, WeightData};
use half::{bf16, f16};
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows of W per microkernel tile.
const TILE_ROWS: usize = 4;
/// Tokens (rows of x) per microkernel tile.
const TILE_TOKENS: usize = 6;
/// Tasks per thread in the few-token (bandwidth-bound) case.
const FEW_TOKEN_TASKS_PER_THREAD: usize = 1;
/// Reduction-dimension slice for multi-token products (elements): 6 bf16 input rows of this
/// length take 24 KiB (L1 is 32 KiB), 64 rows of f32 weights take 512 KiB (L2 is 1 MiB).
const K_BLOCK: usize = 2048;
/// Rows of W per task when there are enough tokens to be compute bound.
const ROW_BLOCK: usize = 64;
/// Rows of W per tile in the bandwidth-bound case (1 or 2 tokens): eight independent row
/// streams and accumulators per thread keep more loads in flight than four.
const WIDE_ROWS: usize = 8;
/// Tiles of at most this many tokens use `WIDE_ROWS` rows (8 x 2 accumulators + 8 weight
/// vectors fit the 32 vector registers; 8 x 3 would not).
const WIDE_MAX_TOKENS: usize = 2;
/// How far ahead of a tile's first byte the few-token kernels prefetch W into L2 (bytes), on
/// CPUs whose hardware prefetchers need the help (see `prefetch::distance`). The hardware
/// prefetchers stop at 4 KiB page boundaries and a thread streams several rows at once, so on
/// its own a Zen 4 core keeps too few DRAM reads in flight; measured there with OPT shapes,
/// 32-64 KiB ahead (a few microseconds of streaming) is what saturates DRAM.
const PREFETCH_BYTES: usize = 64 << 10;
/// Most tokens for which the AVX-512 dot-product tiles prefetch W (in the first token group,
/// and the next chunk in the second, `prefetch::NextChunk`):
/// below `PACK_MIN_TOKENS`, where that path runs batched decode with W streaming from DRAM.
const PREFETCH_MAX_TOKENS: usize = 24;

/// The instruction set a product runs on; chosen at run time so one binary runs everywhere.
///
/// Ordered from least to most capable, so that an override (`STRATA_CPU_ISA`) can only lower it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 with FMA and F16C (Zen 3, Intel since Haswell): 8 lanes; f16 via `vcvtph2ps`, bf16
    /// via a 16-bit shift. Without it a CPU lacking AVX-512 ran the portable loops at ~5% of its
    /// speed (measured on Zen 3: 4.5 GB/s at batch 1, 5 GFLOP/s at 16 tokens).
    Avx2,
    /// AVX-512 F/BW/VL with FMA: f32, f16 (via `vcvtph2ps`) and bf16 (via a 16-bit shift).
    Avx512,
    /// As `Avx512`, plus `vdpbf16ps` for bf16 weights.
    Avx512Bf16,
    /// As `Avx512Bf16`, plus AMX-BF16 tiles for many-token bf16 products (Intel since Sapphire
    /// Rapids), once Linux has granted the process the tile state.
    Amx,
}

impl Isa {
    /// The best instruction set this CPU supports, lowered to `STRATA_CPU_ISA` when that is set
    /// (`portable`, `avx2`, `avx512`, `avx512bf16`, `amx`): benchmarks time the paths side by side in one
    /// run with it. Detected once per process.
    pub(crate) fn detect() -> Isa {
        static CHOSEN: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let best = Isa::supported();
            match std::env::var("STRATA_CPU_ISA")
                .ok()
                .as_deref()
                .map(Isa::parse)
            {
                Some(Some(wanted)) => wanted.min(best),
                _ => best,
            }
        })
    }

    /// Reads an instruction-set name as `STRATA_CPU_ISA` spells it.
    fn parse(name: &str) -> Option<Isa> {
        match name.trim().to_ascii_lowercase().as_str() {
            "portable" => Some(Isa::Portable),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            "avx512bf16" => Some(Isa::Avx512Bf16),
            "amx" => Some(Isa::Amx),
            _ => None,
        }
    }

    /// The best instruction set the CPU has, ignoring any override.
    fn supported() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let fma = is_x86_feature_detected!("fma");
            let base = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && fma;
            if base && is_x86_feature_detected!("avx512bf16") {
                if amx::cpu_has_amx_bf16() && amx::request_permission() {
                    return Isa::Amx;
                }
                return Isa::Avx512Bf16;
            }
            if base {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && fma && is_x86_feature_detected!("f16c") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every instruction set this CPU can run, for tests that compare the paths.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        let best = Isa::supported();
        [
            Isa::Portable,
            Isa::Avx2,
            Isa::Avx512,
            Isa::Avx512Bf16,
            Isa::Amx,
        ]
        .into_iter()
        .filter(|i| *i <= best)
        .collect()
    }
}

thread_local! {
    /// The input converted for the microkernels (bf16 bits, or bf16-rounded f32), kept per
    /// calling thread so decode steps reuse one buffer instead of allocating each call.
    static INPUT_BF16: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    static INPUT_F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Takes a thread-local buffer out of its cell for the duration of `f`, then puts it back.
///
/// Taking (rather than borrowing) makes a nested call on the same thread, which rayon's work
/// stealing can cause, find an empty buffer and allocate instead of panicking on a double borrow.
fn with_buffer<T: Default + Clone, R>(
    cell: &'static std::thread::LocalKey<RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    let mut buf = cell.with(|c| c.take());
    if buf.len() < len {
        // Exact, so that what a thread holds is what `input_scratch_bytes` plans.
        buf.reserve_exact(len - buf.len());
        buf.resize(len, T::default());
    }
    let r = f(&mut buf[..len]);
    cell.with(|c| {
        if c.borrow().len() < buf.len() {
            c.replace(buf);
        }
    });
    r
}

/// Elements from one bf16 input row to the next in the rounded copy the AVX512-BF16 and AMX
/// kernels read: zero padded to a multiple of 32, so the kernels' tails read whole vectors, plus
/// 32 more, because rows 4 KiB apart would all map to the same L1 sets and the kernels read 6 or
/// 12 rows at once.
fn bf16_row_stride(n_in: usize) -> usize {
    n_in.div_ceil(32) * 32 + 32
}

/// Bytes of the converted input `linear` keeps on its calling thread after a product of `tokens`
/// rows of `n_in` (the larger of the paths' layouts: bf16 rows padded for AVX512-BF16 and AMX,
/// plus AMX's pair-interleaved copy of up to 32 tokens; f32 rows in groups of 6 tokens for
/// AVX2), so that the memory plan can count it.
pub(crate) fn input_scratch_bytes(tokens: usize, n_in: usize) -> usize {
    let bf16_rows = tokens * bf16_row_stride(n_in) * 2;
    // `amx::in_place` packs up to 32 tokens once more (the buffer keeps the largest size seen).
    let amx_group = if tokens >= AMX_MIN_TOKENS {
        32 * n_in * 2
    } else {
        0
    };
    let f32_groups = tokens.next_multiple_of(AVX2_TILE_TOKENS) * n_in * 4;
    (bf16_rows + amx_group).max(f32_groups)
}

/// Bytes of converted input the calling thread holds now (tests hold it to `input_scratch_bytes`).
#[cfg(test)]
pub(crate) fn input_scratch_held() -> usize {
    INPUT_BF16.with(|c| c.borrow().capacity() * 2)
        + INPUT_F32.with(|c| c.borrow().capacity() * 4)
        + INPUT_AMX.with(|c| c.borrow().capacity() * 4)
}

/// Output pointer shared by the tasks; each task writes a disjoint range of columns of y.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint (token, column) elements of y, and the borrow of y outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// The shape and operands of one product, shared by all its tasks.
struct Problem<'a, X> {
    /// Input rows, `x_stride` elements apart (in the element type the microkernel reads).
    x: &'a [X],
    x_stride: usize,
    tokens: usize,
    n_in: usize,
    n_out: usize,
    bias: Option<&'a [f32]>,
    y: OutPtr,
}

impl<'a, X> Problem<'a, X> {
    fn new(
        x: &'a [X],
        x_stride: usize,
        tokens: usize,
        n_in: usize,
        n_out: usize,
        bias: Option<&'a [f32]>,
        y: OutPtr,
    ) -> Problem<'a, X> {
        Problem {
            x,
            x_stride,
            tokens,
            n_in,
            n_out,
            bias,
            y,
        }
    }
}

/// Computes `linear` on the given instruction set (tests force each path; `linear` detects).
pub(crate) fn linear_on(
    isa: Isa,
    x: &[f32],
    tokens: usize,
    w: &Matrix,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let (n_in, n_out) = (w.in_features, w.out_features);
    assert_eq!(
        x.len(),
        tokens * n_in,
        "linear: x must be [tokens, in_features]"
    );
    assert_eq!(
        y.len(),
        tokens * n_out,
        "linear: y must be [tokens, out_features]"
    );
    let (stored, expected) = match &w.data {
        WeightData::F32(d) => (d.len(), n_out * n_in),
        WeightData::F16(d) => (d.len(), n_out * n_in),
        WeightData::Bf16(d) => (d.len(), n_out * n_in),
        WeightData::Bf16Panels(d) => (d.len(), panels::panels_len(n_out, n_in)),
    };
    assert_eq!(
        stored, expected,
        "linear: weight data must be out_features * in_features (panels: panels_len)"
    );
    if let Some(b) = bias {
        assert_eq!(
            b.len(),
            n_out,
            "linear: bias must have out_features elements"
        );
    }
    if tokens == 0 || n_out == 0 {
        return;
    }
    if n_in == 0 {
        for row in y.chunks_mut(n_out) {
            match bias {
                Some(b) => row.copy_from_slice(b),
                None => row.fill(0.0),
            }
        }
        return;
    }
    let y = OutPtr(y.as_mut_ptr());
    match (&w.data, isa) {
        (WeightData::Bf16Panels(panels), _) => {
            panels::linear_panels(isa, x, tokens, panels, (n_out, n_in), bias, y);
        }
        (WeightData::Bf16(wd), Isa::Avx512Bf16 | Isa::Amx) => {
            let stride = bf16_row_stride(n_in);
            with_buffer(&INPUT_BF16, tokens * stride, |buf| {
                round_rows_to_bf16(isa, x, n_in, buf, stride);
                let p = Problem::new(buf, stride, tokens, n_in, n_out, bias, y);
                let w_bits: &[u16] = bytemuck::cast_slice(wd);
                #[cfg(target_arch = "x86_64")]
                if isa == Isa::Amx && tokens >= AMX_MIN_TOKENS {
                    run_amx(&p, w_bits);
                    return;
                }
                #[cfg(target_arch = "x86_64")]
                if tokens >= PACK_MIN_TOKENS {
                    run_packed_bf16(&p, w_bits);
                    return;
                }
                run_tasks(&p, |p, rows, k0, k1| {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `Isa::Avx512Bf16` and `Isa::Amx` are only chosen when the CPU has
                    // those features.
                    unsafe {
                        avx512::block_bf16_dp(p, w_bits, rows, k0, k1)
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    unreachable!("{rows:?} {k0} {k1}")
                });
            });
        }
        #[cfg(target_arch = "x86_64")]
        (data, Isa::Avx2) if tokens >= AVX2_PACK_MIN_TOKENS => {
            let round = matches!(data, WeightData::Bf16(_));
            let len = tokens.next_multiple_of(AVX2_TILE_TOKENS) * n_in;
            with_buffer(&INPUT_F32, len, |buf| {
                pack_token_groups(x, n_in, round, buf);
                let p = Problem::new(buf, n_in, tokens, n_in, n_out, bias, y);
                match data {
                    WeightData::Bf16(wd) => run_packed_avx2(&p, wd),
                    WeightData::F16(wd) => run_packed_avx2(&p, wd),
                    WeightData::F32(wd) => run_packed_avx2(&p, wd),
                    WeightData::Bf16Panels(_) => unreachable!("panels take their own path"),
                }
            });
        }
        (WeightData::Bf16(wd), _) => {
            with_buffer(&INPUT_F32, x.len(), |buf| {
                for (d, s) in buf.iter_mut().zip(x) {
                    *d = bf16::from_f32(*s).to_f32();
                }
                let p = Problem::new(buf, n_in, tokens, n_in, n_out, bias, y);
                dispatch_f32_input(isa, &p, wd);
            });
        }
        (WeightData::F16(wd), _) => {
            let p = Problem::new(x, n_in, tokens, n_in, n_out, bias, y);
            dispatch_f32_input(isa, &p, wd);
        }
        (WeightData::F32(wd), _) => {
            let p = Problem::new(x, n_in, tokens, n_in, n_out, bias, y);
            dispatch_f32_input(isa, &p, wd);
        }
    }
}

/// Copies x [tokens, n_in] into the AVX2 packed path's token-group layout: groups of
/// `AVX2_TILE_TOKENS` tokens, each stored k-major, so element (t, k) lands at
/// `((t / 6) * n_in + k) * 6 + t % 6` and a tile's broadcasts read one contiguous stream (strided
/// input rows 4n_in bytes apart fall into the same few L1 sets and evict each other). Tokens
/// past the end of the last group are zero. `round` rounds to bf16 first (bf16 weights).
fn pack_token_groups(x: &[f32], n_in: usize, round: bool, out: &mut [f32]) {
    const G: usize = AVX2_TILE_TOKENS;
    let pack_group = |(rows, dst): (&[f32], &mut [f32])| {
        let present = rows.len() / n_in;
        for k in 0..n_in {
            for t in 0..G {
                dst[k * G + t] = if t < present {
                    let v = rows[t * n_in + k];
                    if round {
                        bf16::from_f32(v).to_f32()
                    } else {
                        v
                    }
                } else {
                    0.0
                };
            }
        }
    };
    if x.len() >= 1 << 16 {
        x.par_chunks(G * n_in)
            .zip(out.par_chunks_mut(G * n_in))
            .for_each(pack_group);
    } else {
        x.chunks(G * n_in)
            .zip(out.chunks_mut(G * n_in))
            .for_each(pack_group);
    }
}

/// Runs a product whose input is f32 on the FMA kernels or the portable ones.
fn dispatch_f32_input<W: WeightElem>(isa: Isa, p: &Problem<f32>, w: &[W]) {
    match isa {
        Isa::Portable => run_tasks(p, |p, rows, k0, k1| portable_block(p, w, rows, k0, k1)),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => run_tasks(p, |p, rows, k0, k1| {
            // SAFETY: `Isa::Avx2` is only chosen when the CPU has AVX2, FMA and F16C.
            unsafe { avx2::block_fma(p, w, rows, k0, k1) }
        }),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => run_tasks(p, |p, rows, k0, k1| {
            // SAFETY: the AVX-512 variants are only chosen when the CPU has those features.
            unsafe { avx512::block_fma(p, w, rows, k0, k1) }
        }),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!(),
    }
}

/// Splits the output rows into tasks and the reduction into slices, and runs `block` on each
/// (rows, k-slice); `block` adds its partial sums into y (the first slice stores them with bias).
fn run_tasks<X: Sync>(
    p: &Problem<X>,
    block: impl Fn(&Problem<X>, std::ops::Range<usize>, usize, usize) + Sync,
) {
    let threads = rayon::current_num_threads().max(1);
    let few_tokens = p.tokens <= TILE_TOKENS;
    // Few tokens: memory bound, give each thread one long contiguous stream of W (rows in
    // multiples of the widest tile), which the kernels prefetch along.
    // Many tokens: blocks small enough that a block's slice of W stays in L2.
    let rows_per_task = if few_tokens {
        p.n_out
            .div_ceil(threads * FEW_TOKEN_TASKS_PER_THREAD)
            .next_multiple_of(WIDE_ROWS)
    } else {
        ROW_BLOCK
    };
    let k_block = if few_tokens { p.n_in } else { K_BLOCK };
    let tasks = p.n_out.div_ceil(rows_per_task);
    (0..tasks).into_par_iter().for_each(|task| {
        let rows = task * rows_per_task..((task + 1) * rows_per_task).min(p.n_out);
        let mut k0 = 0;
        while k0 < p.n_in {
            let k1 = (k0 + k_block).min(p.n_in);
            block(p, rows.clone(), k0, k1);
            k0 = k1;
        }
    });
}

thread_local! {
    /// The input pair-interleaved for `amx::in_place` (one group of up to 32 tokens).
    static INPUT_AMX: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Many tokens, bf16 weights, AMX-BF16: as `run_packed_bf16` (tasks of rows, W repacked one
/// k-slice at a time into the same pair-interleaved layout), but the product runs on the AMX
/// tiles, accumulating in y itself (see `amx`).
#[cfg(target_arch = "x86_64")]
fn run_amx(p: &Problem<u16>, w: &[u16]) {
    if amx::in_place_fits(p.tokens, p.n_in) {
        with_buffer(&INPUT_AMX, 16 * p.n_in, |packed| {
            // SAFETY: AMX implies AVX-512; the rows are the input's tokens, k covers whole rows
            // (n_in is a multiple of 32) and the buffer holds 32 rows' pairs.
            unsafe { avx512::pack_bf16(p.x, p.x_stride, 0..p.tokens, 0, p.n_in, packed) };
            let packed: &[u32] = packed;
            (0..p.n_out.div_ceil(32)).into_par_iter().for_each(|task| {
                let rows = task * 32..((task + 1) * 32).min(p.n_out);
                // SAFETY: only on `Isa::Amx`; `in_place_fits`; tasks own disjoint columns.
                unsafe { amx::in_place(p, w, packed, rows) };
            });
        });
        return;
    }
    // SAFETY (of the kernel): only on `Isa::Amx` (CPU features and the OS permission checked),
    // with the slices `run_packed_slices` packs.
    run_packed_slices(p, w, AMX_ROWS, AMX_K, |p, packed, rows, k0, k1| unsafe {
        amx::slice(p, packed, rows, k0, k1)
    });
}

/// The packed paths' outer loop: tasks of `rows_per_task` rows of W, each repacked one
/// `k_slice` at a time by `avx512::pack_bf16` into a per-thread buffer that `kernel` then
/// multiplies the whole input by.
#[cfg(target_arch = "x86_64")]
fn run_packed_slices(
    p: &Problem<u16>,
    w: &[u16],
    rows_per_task: usize,
    k_slice: usize,
    kernel: impl Fn(&Problem<u16>, &[u32], std::ops::Range<usize>, usize, usize) + Sync,
) {
    let tasks = p.n_out.div_ceil(rows_per_task);
    let packed_len = rows_per_task * k_slice / 2;
    (0..tasks).into_par_iter().for_each(|task| {
        let rows = task * rows_per_task..((task + 1) * rows_per_task).min(p.n_out);
        with_buffer(&PACKED, packed_len, |packed| {
            let mut k0 = 0;
            while k0 < p.n_in {
                let k1 = (k0 + k_slice).min(p.n_in);
                // SAFETY: the packed paths run only on AVX-512 CPUs; rows and k0..k1 are inside
                // the problem, k0 is a multiple of 32 (slices are) and the buffer holds one slice.
                unsafe { avx512::pack_bf16(w, p.n_in, rows.clone(), k0, k1, packed) };
                kernel(p, packed, rows.clone(), k0, k1);
                k0 = k1;
            }
        });
    });
}

thread_local! {
    /// A task's slice of W repacked for the outer-product kernel, reused across tasks.
    static PACKED: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Many tokens, bf16 weights, AVX512-BF16: the compute-bound path.
///
/// Each task takes `PACK_ROWS` rows of W and, one `PACK_K` slice at a time, repacks them so that
/// one 512-bit load holds 16 rows x 2 consecutive k (the operand layout of `vdpbf16ps`). The
/// microkernel then multiplies 32 rows by up to 12 tokens as outer products: 2 weight loads and
/// 12 broadcast input pairs feed 24 dot-product instructions, with no horizontal sums, and
/// writes whole vectors of y. The repacking costs a few instructions per weight and is shared
/// by all tokens.
#[cfg(target_arch = "x86_64")]
fn run_packed_bf16(p: &Problem<u16>, w: &[u16]) {
    // SAFETY (of the kernel): this path is only taken on `Isa::Avx512Bf16`, with the slices
    // `run_packed_slices` packs; the input rows are zero padded.
    run_packed_slices(p, w, PACK_ROWS, PACK_K, |p, packed, rows, k0, k1| unsafe {
        avx512::outer_bf16(p, packed, rows, k0, k1)
    });
}

/// One k of a 16-row panel of W widened to f32: the AVX2 outer-product kernel's two weight
/// loads, aligned so that they never straddle a cache line.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct PanelLine([f32; 16]);

thread_local! {
    /// A task's slice of W widened and repacked for the AVX2 outer-product kernel.
    static PACKED_F32: RefCell<Vec<PanelLine>> = const { RefCell::new(Vec::new()) };
}

/// Many tokens on AVX2 (any weight dtype): the compute-bound path, for CPUs without AVX-512.
/// `p.x` is in the token-group layout of `pack_token_groups`.
///
/// Each task takes `AVX2_PACK_ROWS` rows of W and, one `AVX2_PACK_K` slice at a time, widens
/// them to f32 in panels of 16 rows stored k-major (`PanelLine`), transposing 8x8 blocks in
/// registers. The microkernel then multiplies 16 rows by 6 tokens as outer products: 2 aligned
/// weight loads and 6 broadcast inputs feed 12 FMAs, with 12 accumulators (of AVX2's 16
/// registers), no horizontal sums and no widening in the inner loop. The dot-product tiles this
/// replaces spend a load and two widening instructions per weight vector and a horizontal sum
/// per output; the widening here is paid once per weight and shared by all tokens.
#[cfg(target_arch = "x86_64")]
fn run_packed_avx2<W: avx2::Lanes8>(p: &Problem<f32>, w: &[W]) {
    let tasks = p.n_out.div_ceil(AVX2_PACK_ROWS);
    (0..tasks).into_par_iter().for_each(|task| {
        let rows = task * AVX2_PACK_ROWS..((task + 1) * AVX2_PACK_ROWS).min(p.n_out);
        let lines = rows.len().div_ceil(16) * AVX2_PACK_K;
        with_buffer(&PACKED_F32, lines, |packed| {
            let mut k0 = 0;
            while k0 < p.n_in {
                let k1 = (k0 + AVX2_PACK_K).min(p.n_in);
                // SAFETY: this path is only taken on `Isa::Avx2`, which is only chosen when the
                // CPU has AVX2, FMA and F16C; rows and k0..k1 are inside the problem, and
                // `packed` holds a line per k for every 16-row panel.
                unsafe {
                    avx2::pack_panels(w, p.n_in, rows.clone(), k0, k1, packed);
                    avx2::outer_panels(p, packed, rows.clone(), k0, k1);
                }
                k0 = k1;
            }
        });
    });
}

/// Fewest tokens for which AVX2 products take the packed path: the AVX-512 threshold reused; at 25
/// tokens it measured 1.07x the dot-product path (OPT-6.7B shapes), fewer tokens were not timed.
const AVX2_PACK_MIN_TOKENS: usize = 25;
/// Tokens per tile of the AVX2 packed path (and per group of its packed input).
const AVX2_TILE_TOKENS: usize = 6;
/// Rows of W per task of the AVX2 packed path (a multiple of 16): 8 panels of 24 KiB, 192 KiB
/// per k-slice, which stays in Zen 3's 512 KiB L2 while the tokens run over it (256 rows measured
/// the same).
const AVX2_PACK_ROWS: usize = 128;
/// Reduction slice of the AVX2 packed path: a token group's input slice (9 KiB) stays in L1 while
/// the panels stream past it. Measured at OPT-6.7B shapes, 384 beat 256 and 512 (medians of 12).
const AVX2_PACK_K: usize = 384;

/// Fewest tokens for which bf16 products take the packed path. Below, repacking W costs more
/// than the dot-product kernel's horizontal sums: measured at OPT-1.3B shapes (8 layers, median
/// of 3 side-by-side runs), the dot-product path takes 0.78x / 0.83x / 0.86x the CPU time of the
/// packed one at 8 / 16 / 24 tokens, and 0.96-0.98x at 32-64.
const PACK_MIN_TOKENS: usize = 25;

/// Fewest tokens for which bf16 products run on AMX tiles. Measured at OPT-1.3B shapes (4
/// layers, medians of 3, against `STRATA_CPU_ISA=avx512bf16` in the same session): 0.88x the
/// vector paths at 2 tokens, 0.95x at 3, a tie at 4 (1.04x and 0.95x in two sessions), 1.15x at
/// 6, 1.4-1.55x at 8, 2.1x at 12, 1.9-2.2x at 16; up to 10 tokens the tiles stream W at 20-24
/// GB/s, DRAM speed.
const AMX_MIN_TOKENS: usize = 6;
/// Rows of W per task of the AMX path (a multiple of 32). With `AMX_K` measured at OPT-1.3B
/// shapes (1024 tokens): 128 x 2048 gave 950 GFLOP/s before the tile prefetch, 64 x 2048 933,
/// 128 x 4096 985, and slices of 256-1024 640-900 (each slice reloads y's accumulators).
const AMX_ROWS: usize = 128;
/// Reduction slice of the AMX path (a multiple of 32): a task's packed slice of W is 512 KiB,
/// in the 2 MiB L2 of the Sapphire Rapids class cores this path is for.
const AMX_K: usize = 2048;

/// Rows of W per task of the packed path (a multiple of 32).
const PACK_ROWS: usize = 128;
/// Reduction slice of the packed path: 12 input rows of bf16 take 24 KiB (L1), the packed
/// slice of W 256 KiB (L2).
const PACK_K: usize = 1024;

impl<X> Problem<'_, X> {
    /// Stores (first k-slice) or adds a tile's sums into y.
    ///
    /// # Safety
    /// `t0 + T <= tokens`, `r0 + R <= n_out`, and no other thread touches these elements.
    #[inline(always)]
    unsafe fn store<const R: usize, const T: usize>(
        &self,
        sums: &[[f32; T]; R],
        r0: usize,
        t0: usize,
        first: bool,
    ) {
        for (r, row) in sums.iter().enumerate() {
            let b = if first {
                self.bias.map_or(0.0, |b| b[r0 + r])
            } else {
                0.0
            };
            for (t, s) in row.iter().enumerate() {
                // SAFETY: in bounds and exclusive by this function's contract.
                let dst = unsafe { &mut *self.y.0.add((t0 + t) * self.n_out + r0 + r) };
                *dst = if first { s + b } else { *dst + s };
            }
        }
    }
}

/// Rounds rows of `n_in` f32 to bf16 bits, `stride` apart, zero filling each row's padding.
fn round_rows_to_bf16(isa: Isa, x: &[f32], n_in: usize, out: &mut [u16], stride: usize) {
    let convert_row = |(src, dst): (&[f32], &mut [u16])| {
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx512Bf16 {
            // SAFETY: only chosen when the CPU has AVX512-BF16.
            unsafe { avx512::round_to_bf16(src, &mut dst[..n_in]) };
            dst[n_in..].fill(0);
            return;
        }
        let _ = isa;
        for (d, s) in dst.iter_mut().zip(src) {
            *d = bf16::from_f32(*s).to_bits();
        }
        dst[n_in..].fill(0);
    };
    if x.len() >= 1 << 16 {
        x.par_chunks(n_in)
            .zip(out.par_chunks_mut(stride))
            .for_each(convert_row);
    } else {
        x.chunks(n_in)
            .zip(out.chunks_mut(stride))
            .for_each(convert_row);
    }
}

/// A stored weight element that widens exactly to f32.
pub(crate) trait Widen: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;
}
impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}
impl Widen for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}
impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// A weight element every compiled path can read: `Widen` everywhere, plus the AVX-512 loads
/// where those are compiled.
#[cfg(target_arch = "x86_64")]
pub(crate) trait WeightElem: avx512::Lanes16 + avx2::Lanes8 {}
#[cfg(target_arch = "x86_64")]
impl<T: avx512::Lanes16 + avx2::Lanes8> WeightElem for T {}
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait WeightElem: Widen {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: Widen> WeightElem for T {}

/// Portable block: one dot product per (row, token), eight partial sums each so the compiler
/// can vectorise and the additions are not one long dependency chain.
fn portable_block<W: Widen>(
    p: &Problem<f32>,
    w: &[W],
    rows: std::ops::Range<usize>,
    k0: usize,
    k1: usize,
) {
    let first = k0 == 0;
    for t in 0..p.tokens {
        let xr = &p.x[t * p.x_stride + k0..t * p.x_stride + k1];
        for r in rows.clone() {
            let wr = &w[r * p.n_in + k0..r * p.n_in + k1];
            let mut lanes = [0.0f32; 8];
            let mut xc = xr.chunks_exact(8);
            let mut wc = wr.chunks_exact(8);
            for (xs, ws) in (&mut xc).zip(&mut wc) {
                for l in 0..8 {
                    lanes[l] += xs[l] * ws[l].widen();
                }
            }
            let mut sum: f32 = lanes.iter().sum();
            for (a, b) in xc.remainder().iter().zip(wc.remainder()) {
                sum += a * b.widen();
            }
            // SAFETY: r < n_out, t < tokens, and rows belong to this task only.
            unsafe { p.store::<1, 1>(&[[sum]], r, t, first) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod prefetch {
    //! Software prefetch shared by the AVX2 and AVX-512 kernels (`prefetcht1` is baseline SSE).
    use super::{
        Problem, PREFETCH_BYTES, PREFETCH_MAX_TOKENS, ROW_BLOCK, TILE_TOKENS, WIDE_MAX_TOKENS,
    };
    use std::arch::x86_64::*;

    /// The prefetch distance in bytes for a product of `tokens` tokens, 0 for none:
    /// `STRATA_PREFETCH_BYTES` when set (for tuning on a new CPU), else none for 1-2 tokens on
    /// AMD Zen 5 and later, else `PREFETCH_BYTES`. On the 2-core Zen 5 (family 26), OPT-1.3B's
    /// 24 layers + head streamed at 0.93-0.96 of the same repetition's DRAM rate without
    /// software prefetch and at 0.87-0.91 with it at one token on the 8-row tiles (three
    /// interleaved `kernel_bench` pairs; 16 and 256 KiB were no better; one token now runs
    /// `row_bf16`, which needs none), and two tokens took 54-56 ms without against 58-61 with:
    /// its hardware prefetchers keep enough reads in flight for a bandwidth-bound tile. With
    /// more tokens the first token group's loads of W stall (perf puts most samples on them);
    /// prefetching there, three interleaved pairs: 16 tokens 109.6-114.2 -> 103.7-109.4 ms, 24
    /// tokens 137.4-142.8 -> 123.8-128.7 ms, 4 and 8 tokens unchanged within noise.
    pub(super) fn distance(tokens: usize) -> usize {
        static OVERRIDE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
        static ZEN5: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let forced = *OVERRIDE.get_or_init(|| {
            std::env::var("STRATA_PREFETCH_BYTES")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
        });
        if let Some(bytes) = forced {
            return bytes;
        }
        let zen5 = *ZEN5.get_or_init(|| crate::kernels::amd_family().is_some_and(|f| f >= 0x1A));
        if zen5 && tokens <= WIDE_MAX_TOKENS {
            0
        } else {
            PREFETCH_BYTES
        }
    }

    /// Software prefetch of W into L2, [`distance`] ahead of a tile, along the rows in
    /// memory order: a tile over whole rows reads a contiguous range of W, and the ranges of
    /// successive tiles of a task follow each other, so prefetching linearly ahead of the tile
    /// start, as fast as the tile consumes, fetches the next tiles' rows before they are read.
    /// Off when the tile reads part of each row (k-blocked, compute-bound products).
    pub(super) struct Ahead {
        next: *const u8,
        last: *const u8,
        on: bool,
    }

    impl Ahead {
        /// For a tile of a `tokens`-token product starting at `tile` inside `w`, prefetching
        /// only if `on` (the tile reads whole rows, straight from DRAM).
        #[inline(always)]
        pub(super) fn new<W>(w: &[W], tile: *const W, on: bool, tokens: usize) -> Ahead {
            let end = w.as_ptr_range().end as *const u8;
            let distance = distance(tokens);
            Ahead {
                next: (tile as *const u8).wrapping_add(distance),
                // Never past W's last cache line: the hint would fetch someone else's memory.
                last: end.wrapping_sub(64),
                on: on && distance > 0,
            }
        }

        /// Prefetches the next `bytes` (what the tile reads per step) and moves on.
        #[inline(always)]
        pub(super) fn step(&mut self, bytes: usize) {
            if !self.on {
                return;
            }
            let mut off = 0;
            while off < bytes {
                let a = self.next.wrapping_add(off).min(self.last);
                // SAFETY: prefetching is a hint and never faults; `a` lies inside W anyway.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(a as *const i8) };
                off += 64;
            }
            self.next = self.next.wrapping_add(bytes);
        }
    }

    /// Software prefetch of the chunk of W a task reads after the current one, into L2, by
    /// the tiles of the second token group of a batched-decode product (`TILE_TOKENS` + 1 to
    /// `PREFETCH_MAX_TOKENS` tokens). Why: the first token group of a chunk streams W from
    /// DRAM and the later groups compute on it from L2, so without this a core alternates
    /// between waiting on DRAM and computing; prefetched while the second group computes, the
    /// next chunk's first group finds W in L2. The next chunk of a tile's rows is their next
    /// k-slice, or after the last slice the same rows of the next task (`ROW_BLOCK` rows on,
    /// which the same thread usually takes next: rayon splits a range of tasks in halves).
    /// On the 2-core Zen 4, OPT-1.3B's 24 layers + head, seven interleaved `kernel_bench`
    /// pairs at 16 tokens: medians 156 -> 140 ms (12 tokens: 137 -> 116).
    pub(super) struct NextChunk<const R: usize> {
        rows: [*const u8; R],
        last: *const u8,
        on: bool,
    }

    impl<const R: usize> NextChunk<R> {
        /// For a tile of rows starting at `wp` (each at element k0 of its row) over `k0..k1`
        /// of token group `t0` of problem `p`.
        #[inline(always)]
        pub(super) fn new<W, X>(
            p: &Problem<X>,
            w: &[W],
            wp: &[*const W; R],
            t0: usize,
            k0: usize,
            k1: usize,
        ) -> NextChunk<R> {
            let on = t0 == TILE_TOKENS && p.tokens <= PREFETCH_MAX_TOKENS && distance(p.tokens) > 0;
            let offset = if k1 < p.n_in {
                k1 - k0
            } else {
                ROW_BLOCK * p.n_in - k0
            };
            let size = std::mem::size_of::<W>();
            NextChunk {
                rows: std::array::from_fn(|r| (wp[r] as *const u8).wrapping_add(offset * size)),
                // Never past W's last cache line: the hint would fetch someone else's memory.
                last: (w.as_ptr_range().end as *const u8).wrapping_sub(64),
                on,
            }
        }

        /// Prefetches the line `byte` bytes into each row's next chunk; call with the tile's
        /// progress in bytes at every step (only whole lines are fetched).
        #[inline(always)]
        pub(super) fn step(&self, byte: usize) {
            if !self.on || !byte.is_multiple_of(64) {
                return;
            }
            for row in self.rows {
                let a = row.wrapping_add(byte).min(self.last);
                // SAFETY: prefetching is a hint and never faults.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(a as *const i8) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod amx;

pub(crate) mod panels;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    //! The AVX-512 microkernels. Callers must check the CPU features (see `Isa::detect`).

    use super::prefetch::{Ahead, NextChunk};
    use super::{
        Problem, Widen, PREFETCH_MAX_TOKENS, TILE_ROWS, TILE_TOKENS, WIDE_MAX_TOKENS, WIDE_ROWS,
    };
    use half::{bf16, f16};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// A weight type the FMA kernel widens to f32, 16 lanes at a time.
    pub(crate) trait Lanes16: Widen {
        /// Loads 16 elements at `p` as f32.
        ///
        /// # Safety
        /// 16 elements readable at `p`; AVX-512 F/BW/VL available.
        unsafe fn load16(p: *const Self) -> __m512;
        /// Loads the first `n < 16` elements at `p` as f32 and zeros the other lanes.
        ///
        /// # Safety
        /// `n` elements readable at `p`; AVX-512 F/BW/VL available.
        unsafe fn load_tail(p: *const Self, n: usize) -> __m512;
    }

    impl Lanes16 for f32 {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load16(p: *const f32) -> __m512 {
            // SAFETY: caller guarantees 16 readable floats.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load_tail(p: *const f32, n: usize) -> __m512 {
            // SAFETY: masked-off lanes are not accessed (AVX-512 fault suppression).
            unsafe { _mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, p) }
        }
    }

    impl Lanes16 for f16 {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load16(p: *const f16) -> __m512 {
            // SAFETY: caller guarantees 16 readable halves (32 bytes).
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load_tail(p: *const f16, n: usize) -> __m512 {
            // SAFETY: masked-off lanes are not accessed (AVX-512 fault suppression).
            unsafe {
                _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                    ((1u32 << n) - 1) as u16,
                    p as *const i16,
                ))
            }
        }
    }

    impl Lanes16 for bf16 {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load16(p: *const bf16) -> __m512 {
            // SAFETY: caller guarantees 16 readable bf16 (32 bytes). bf16 is the top half of f32.
            unsafe {
                let h = _mm256_loadu_si256(p as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load_tail(p: *const bf16, n: usize) -> __m512 {
            // SAFETY: masked-off lanes are not accessed (AVX-512 fault suppression).
            unsafe {
                let h = _mm256_maskz_loadu_epi16(((1u32 << n) - 1) as u16, p as *const i16);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
    }

    /// Runs `$tile::<[W,] R, T>(p, w, r0, t0, k0, k1)` over a block's rows and tokens, each time
    /// with the widest tile that fits: `WIDE_ROWS` rows for at most `WIDE_MAX_TOKENS` tokens,
    /// else `TILE_ROWS` (then single rows for the last few).
    macro_rules! tiled_block {
        ($tile:ident [$($W:ty)?], $p:expr, $w:expr, $rows:expr, $k0:expr, $k1:expr) => {{
            let (p, w, rows, k0, k1) = ($p, $w, $rows, $k0, $k1);
            let mut t0 = 0;
            while t0 < p.tokens {
                let nt = (p.tokens - t0).min(TILE_TOKENS);
                let mut r0 = rows.start;
                while r0 < rows.end {
                    let nr = rows.end - r0;
                    let rt = if nr >= WIDE_ROWS && nt <= WIDE_MAX_TOKENS {
                        WIDE_ROWS
                    } else if nr >= TILE_ROWS {
                        TILE_ROWS
                    } else {
                        1
                    };
                    // SAFETY: the tile (rt rows from r0, nt tokens from t0) lies inside the
                    // problem and the caller's block; the rest is the caller's contract.
                    unsafe {
                        match (rt, nt) {
                            (WIDE_ROWS, 2) => $tile::<$($W,)? WIDE_ROWS, 2>(p, w, r0, t0, k0, k1),
                            (WIDE_ROWS, _) => $tile::<$($W,)? WIDE_ROWS, 1>(p, w, r0, t0, k0, k1),
                            (TILE_ROWS, 6) => $tile::<$($W,)? TILE_ROWS, 6>(p, w, r0, t0, k0, k1),
                            (TILE_ROWS, 5) => $tile::<$($W,)? TILE_ROWS, 5>(p, w, r0, t0, k0, k1),
                            (TILE_ROWS, 4) => $tile::<$($W,)? TILE_ROWS, 4>(p, w, r0, t0, k0, k1),
                            (TILE_ROWS, 3) => $tile::<$($W,)? TILE_ROWS, 3>(p, w, r0, t0, k0, k1),
                            (TILE_ROWS, 2) => $tile::<$($W,)? TILE_ROWS, 2>(p, w, r0, t0, k0, k1),
                            (TILE_ROWS, _) => $tile::<$($W,)? TILE_ROWS, 1>(p, w, r0, t0, k0, k1),
                            (_, 6) => $tile::<$($W,)? 1, 6>(p, w, r0, t0, k0, k1),
                            (_, 5) => $tile::<$($W,)? 1, 5>(p, w, r0, t0, k0, k1),
                            (_, 4) => $tile::<$($W,)? 1, 4>(p, w, r0, t0, k0, k1),
                            (_, 3) => $tile::<$($W,)? 1, 3>(p, w, r0, t0, k0, k1),
                            (_, 2) => $tile::<$($W,)? 1, 2>(p, w, r0, t0, k0, k1),
                            _ => $tile::<$($W,)? 1, 1>(p, w, r0, t0, k0, k1),
                        }
                    }
                    r0 += rt;
                }
                t0 += nt;
            }
        }};
    }

    /// Runs the FMA microkernel over a task's rows and one k-slice, for every token.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and FMA available; `rows` and `k0..k1` within the problem; the rows
    /// belong to this task only.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    pub(super) unsafe fn block_fma<W: Lanes16>(
        p: &Problem<f32>,
        w: &[W],
        rows: Range<usize>,
        k0: usize,
        k1: usize,
    ) {
        if p.tokens == 1 && k0 == 0 && k1 == p.n_in {
            // SAFETY: whole rows of this task, and the caller's contract.
            rows.for_each(|r| unsafe { row_fma(p, w, r) });
        } else {
            tiled_block!(tile_fma[W], p, w, rows, k0, k1);
        }
    }

    /// As `row_bf16`, with the weights widened to f32 and f32 FMAs (f32 and f16 weights, and
    /// bf16 without AVX512-BF16).
    ///
    /// # Safety
    /// As `block_fma`, and `r < n_out`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn row_fma<W: Lanes16>(p: &Problem<f32>, w: &[W], r: usize) {
        const STEP: usize = 16 * ROW_CHAINS;
        let n = p.n_in;
        let row = &w[r * n..(r + 1) * n];
        let x = p.x.as_ptr();
        let mut acc = [_mm512_setzero_ps(); ROW_CHAINS];
        let mut k = 0;
        // SAFETY (all blocks below): full steps stay inside the row and the input row (n
        // elements each); the tail loads are masked to the elements left.
        while k + STEP <= n {
            for (c, a) in acc.iter_mut().enumerate() {
                let at = k + 16 * c;
                let (wv, xv) =
                    unsafe { (W::load16(row.as_ptr().add(at)), _mm512_loadu_ps(x.add(at))) };
                *a = _mm512_fmadd_ps(wv, xv, *a);
            }
            k += STEP;
        }
        while k < n {
            let left = (n - k).min(16);
            let (wv, xv) = unsafe {
                if left == 16 {
                    (W::load16(row.as_ptr().add(k)), _mm512_loadu_ps(x.add(k)))
                } else {
                    (
                        W::load_tail(row.as_ptr().add(k), left),
                        f32::load_tail(x.add(k), left),
                    )
                }
            };
            acc[0] = _mm512_fmadd_ps(wv, xv, acc[0]);
            k += 16;
        }
        let [a, b, c, d] = acc;
        let sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
        // SAFETY: the row is inside the problem and owned by this task.
        unsafe { p.store(&[[sum]], r, 0, true) };
    }

    /// R rows x T tokens of dot products over k0..k1 with f32 FMAs.
    ///
    /// # Safety
    /// As `block_fma`, and `r0 + R <= n_out`, `t0 + T <= tokens`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn tile_fma<W: Lanes16, const R: usize, const T: usize>(
        p: &Problem<f32>,
        w: &[W],
        r0: usize,
        t0: usize,
        k0: usize,
        k1: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let wp: [*const W; R] = std::array::from_fn(|r| w[(r0 + r) * p.n_in + k0..].as_ptr());
        let xp: [*const f32; T] =
            std::array::from_fn(|t| p.x[(t0 + t) * p.x_stride + k0..].as_ptr());
        let len = k1 - k0;
        let full = len / 16 * 16;
        // Whole rows from DRAM: every tile of a bandwidth-bound product, and the first token
        // group of one with up to `PREFETCH_MAX_TOKENS` (later groups find W in L2).
        let mut ahead = Ahead::new(
            w,
            wp[0],
            len == p.n_in && t0 == 0 && p.tokens <= PREFETCH_MAX_TOKENS,
            p.tokens,
        );
        let next = NextChunk::new(p, w, &wp, t0, k0, k1);
        let mut k = 0;
        while k < full {
            ahead.step(R * 16 * std::mem::size_of::<W>());
            next.step(k * std::mem::size_of::<W>());
            // SAFETY: k + 16 <= len, and every row has len elements from its pointer.
            unsafe {
                let mut wv = [_mm512_setzero_ps(); R];
                for r in 0..R {
                    wv[r] = W::load16(wp[r].add(k));
                }
                for t in 0..T {
                    let xv = _mm512_loadu_ps(xp[t].add(k));
                    for r in 0..R {
                        acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
                    }
                }
            }
            k += 16;
        }
        if k < len {
            let n = len - k;
            // SAFETY: n < 16 elements remain in every row; the masked loads read only those.
            unsafe {
                let mut wv = [_mm512_setzero_ps(); R];
                for r in 0..R {
                    wv[r] = W::load_tail(wp[r].add(k), n);
                }
                for t in 0..T {
                    let xv = f32::load_tail(xp[t].add(k), n);
                    for r in 0..R {
                        acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
                    }
                }
            }
        }
        let mut sums = [[0.0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                sums[r][t] = _mm512_reduce_add_ps(acc[r][t]);
            }
        }
        // SAFETY: the tile is inside the problem and owned by this task.
        unsafe { p.store(&sums, r0, t0, k0 == 0) };
    }

    /// Runs the bf16 dot-product microkernel over a task's rows and one k-slice, for every token.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and BF16 available; `rows` and `k0..k1` within the problem, `k0` a
    /// multiple of 32; the input rows are zero padded to `x_stride >= n_in.next_multiple_of(32)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn block_bf16_dp(
        p: &Problem<u16>,
        w: &[u16],
        rows: Range<usize>,
        k0: usize,
        k1: usize,
    ) {
        if p.tokens == 1 && k0 == 0 && k1 == p.n_in {
            // SAFETY: whole rows of this task, and the caller's contract.
            rows.for_each(|r| unsafe { row_bf16(p, w, r) });
        } else {
            tiled_block!(tile_bf16[], p, w, rows, k0, k1);
        }
    }

    /// Independent accumulators per token in the one-row kernels: enough to hide the latency of
    /// `vdpbf16ps` / `vfmadd` at the rate DRAM delivers one row.
    const ROW_CHAINS: usize = 4;

    /// One output row for one token over the whole of k, bf16 dot products, for one-token
    /// (batch-1 decode) products, which are bandwidth bound: reading W one row after the other
    /// gives each thread a single sequential stream, the pattern of `stream_read` (the DRAM
    /// reference). On the 2-core Zen 5, OPT-1.3B's 24 layers + head at one token read at
    /// 1.00-1.03 of the same repetition's `stream_read` rate this way, against 0.80-0.86 for
    /// 8-row tiles with 64 KiB software prefetch (three interleaved `kernel_bench` pairs; f16
    /// weights on `row_fma`: 0.81-0.97 against 0.79-0.82). At two tokens it was no better than
    /// the tiles (0.71-0.93 against 0.80-0.84), so two tokens stay on those.
    ///
    /// # Safety
    /// As `block_bf16_dp`, `r < n_out`, and the input row zero padded to a multiple of 32
    /// elements (as `linear_on` lays it out).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn row_bf16(p: &Problem<u16>, w: &[u16], r: usize) {
        const STEP: usize = 32 * ROW_CHAINS;
        let n = p.n_in;
        let row = &w[r * n..(r + 1) * n];
        let x = p.x.as_ptr();
        // SAFETY (all blocks below): __m512i and __m512bh are both 64 plain bytes; weight
        // loads stay inside `row` (full steps, then masked tails) and input loads inside the
        // input row, zero padded to a multiple of 32.
        let bh = |v: __m512i| unsafe { std::mem::transmute::<__m512i, __m512bh>(v) };
        let mut acc = [_mm512_setzero_ps(); ROW_CHAINS];
        let mut k = 0;
        while k + STEP <= n {
            for (c, a) in acc.iter_mut().enumerate() {
                let at = k + 32 * c;
                let wv = bh(unsafe { _mm512_loadu_si512(row.as_ptr().add(at) as *const __m512i) });
                let xv = bh(unsafe { _mm512_loadu_si512(x.add(at) as *const __m512i) });
                *a = _mm512_dpbf16_ps(*a, wv, xv);
            }
            k += STEP;
        }
        while k < n {
            let left = (n - k).min(32);
            let mask = if left == 32 {
                u32::MAX
            } else {
                (1u32 << left) - 1
            };
            let wv =
                bh(unsafe { _mm512_maskz_loadu_epi16(mask, row.as_ptr().add(k) as *const i16) });
            let xv = bh(unsafe { _mm512_loadu_si512(x.add(k) as *const __m512i) });
            acc[0] = _mm512_dpbf16_ps(acc[0], wv, xv);
            k += 32;
        }
        let [a, b, c, d] = acc;
        let sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
        // SAFETY: the row is inside the problem and owned by this task.
        unsafe { p.store(&[[sum]], r, 0, true) };
    }

    /// R rows x T tokens of bf16 dot products over k0..k1 (`vdpbf16ps`, f32 accumulation).
    ///
    /// # Safety
    /// As `block_bf16_dp`, and `r0 + R <= n_out`, `t0 + T <= tokens`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn tile_bf16<const R: usize, const T: usize>(
        p: &Problem<u16>,
        w: &[u16],
        r0: usize,
        t0: usize,
        k0: usize,
        k1: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        // SAFETY: an all-zero __m512bh is a valid value (plain bytes).
        let zero: __m512bh =
            unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()) };
        let wp: [*const u16; R] = std::array::from_fn(|r| w[(r0 + r) * p.n_in + k0..].as_ptr());
        let xp: [*const u16; T] =
            std::array::from_fn(|t| p.x[(t0 + t) * p.x_stride + k0..].as_ptr());
        let len = k1 - k0;
        let full = len / 32 * 32;
        // Whole rows from DRAM: every tile of a bandwidth-bound product, and the first token
        // group of one with up to `PREFETCH_MAX_TOKENS` (later groups find W in L2).
        let mut ahead = Ahead::new(
            w,
            wp[0],
            len == p.n_in && t0 == 0 && p.tokens <= PREFETCH_MAX_TOKENS,
            p.tokens,
        );
        let next = NextChunk::new(p, w, &wp, t0, k0, k1);
        let mut k = 0;
        while k < full {
            ahead.step(R * 64);
            next.step(2 * k);
            // SAFETY: k + 32 <= len for the weights; the input rows are at least as long.
            // __m512i and __m512bh are both 64 plain bytes, so the transmutes are bit casts.
            unsafe {
                let mut wv = [zero; R];
                for r in 0..R {
                    wv[r] = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                        wp[r].add(k) as *const __m512i,
                    ));
                }
                for t in 0..T {
                    let xv: __m512bh = std::mem::transmute::<__m512i, __m512bh>(
                        _mm512_loadu_si512(xp[t].add(k) as *const __m512i),
                    );
                    for r in 0..R {
                        acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
                    }
                }
            }
            k += 32;
        }
        if k < len {
            let mask = (1u32 << (len - k)) - 1;
            // SAFETY: the weight loads are masked to the len - k remaining elements; the input
            // rows are zero padded to a multiple of 32, so whole-vector loads stay inside them.
            unsafe {
                let mut wv = [zero; R];
                for r in 0..R {
                    wv[r] = std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(
                        mask,
                        wp[r].add(k) as *const i16,
                    ));
                }
                for t in 0..T {
                    let xv: __m512bh = std::mem::transmute::<__m512i, __m512bh>(
                        _mm512_loadu_si512(xp[t].add(k) as *const __m512i),
                    );
                    for r in 0..R {
                        acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
                    }
                }
            }
        }
        let mut sums = [[0.0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                sums[r][t] = _mm512_reduce_add_ps(acc[r][t]);
            }
        }
        // SAFETY: the tile is inside the problem and owned by this task.
        unsafe { p.store(&sums, r0, t0, k0 == 0) };
    }

    /// Rounds f32 to bf16 bits, nearest even (`vcvtneps2bf16`; it flushes f32 subnormals to 0).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and BF16 available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn round_to_bf16(src: &[f32], dst: &mut [u16]) {
        assert_eq!(src.len(), dst.len());
        let mut s = src.chunks_exact(16);
        let mut d = dst.chunks_exact_mut(16);
        for (sc, dc) in (&mut s).zip(&mut d) {
            // SAFETY: both chunks hold exactly 16 elements; __m256bh is 32 plain bytes.
            unsafe {
                let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(sc.as_ptr()));
                _mm256_storeu_si256(
                    dc.as_mut_ptr() as *mut __m256i,
                    std::mem::transmute::<__m256bh, __m256i>(v),
                );
            }
        }
        for (sv, dv) in s.remainder().iter().zip(d.into_remainder()) {
            *dv = bf16::from_f32(*sv).to_bits();
        }
    }

    /// Repacks W[rows, k0..k1] (bf16 bits) for `outer_bf16`: for each group of 32 rows and each
    /// pair of k, 32 u32 = (row r: w[r][k] | w[r][k+1] << 16), rows beyond `rows` and k beyond
    /// k1 zero filled. 16x16 blocks of u32 pairs are transposed in registers.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL available; rows and k0..k1 inside W; `packed` holds
    /// `rows.len().next_multiple_of(32) * (k1 - k0).next_multiple_of(32) / 2` elements.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn pack_bf16(
        w: &[u16],
        n_in: usize,
        rows: Range<usize>,
        k0: usize,
        k1: usize,
        packed: &mut [u32],
    ) {
        let pairs = (k1 - k0).next_multiple_of(32) / 2;
        let groups = rows.len().div_ceil(32);
        assert!(
            packed.len() >= groups * 32 * pairs,
            "pack_bf16: buffer too small"
        );
        for g in 0..groups {
            for half in 0..2 {
                let r_base = rows.start + g * 32 + half * 16;
                let mut k = k0;
                while k < k1 {
                    let n = (k1 - k).min(32);
                    let mask = if n == 32 { u32::MAX } else { (1u32 << n) - 1 };
                    let mut m = [_mm512_setzero_si512(); 16];
                    for (i, v) in m.iter_mut().enumerate() {
                        let r = r_base + i;
                        if r < rows.end {
                            // SAFETY: row r < n_out and k..k+n inside it; masked lanes unread.
                            *v = unsafe {
                                _mm512_maskz_loadu_epi16(
                                    mask,
                                    w.as_ptr().add(r * n_in + k) as *const i16,
                                )
                            };
                        }
                    }
                    transpose16(&mut m);
                    // m[j] now holds pair j of this 32-k chunk for the 16 rows.
                    let p0 = (k - k0) / 2;
                    for (j, v) in m.iter().enumerate() {
                        let at = (g * pairs + p0 + j) * 32 + half * 16;
                        // SAFETY: at + 16 <= groups * pairs * 32 <= packed.len() (asserted).
                        unsafe {
                            _mm512_storeu_si512(packed.as_mut_ptr().add(at) as *mut __m512i, *v)
                        };
                    }
                    k += 32;
                }
            }
        }
    }

    /// Transposes a 16x16 matrix of u32 held as 16 rows: four rounds, each swapping one bit of
    /// the row index with the same bit of the lane index.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) fn transpose16(m: &mut [__m512i; 16]) {
        for s in 0..4 {
            let bit = 1usize << s;
            let mut lo_idx = [0i32; 16];
            let mut hi_idx = [0i32; 16];
            for l in 0..16 {
                if l & bit == 0 {
                    lo_idx[l] = l as i32;
                    hi_idx[l] = (l + bit) as i32;
                } else {
                    lo_idx[l] = (16 + l - bit) as i32;
                    hi_idx[l] = (16 + l) as i32;
                }
            }
            // SAFETY: the arrays are 16 i32 = 64 bytes.
            let (lo, hi) = unsafe {
                (
                    _mm512_loadu_si512(lo_idx.as_ptr() as *const __m512i),
                    _mm512_loadu_si512(hi_idx.as_ptr() as *const __m512i),
                )
            };
            for i in 0..16 {
                if i & bit == 0 {
                    let (a, b) = (m[i], m[i + bit]);
                    m[i] = _mm512_permutex2var_epi32(a, lo, b);
                    m[i + bit] = _mm512_permutex2var_epi32(a, hi, b);
                }
            }
        }
    }

    /// y[tokens, rows] (+)= x[tokens, k0..k1] W[rows, k0..k1]^T from the packed slice, 32 rows
    /// by up to 12 tokens at a time.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and BF16 available; `packed` made by `pack_bf16` for the same rows and
    /// k0..k1; k0 a multiple of 32; input rows zero padded to a multiple of 32.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn outer_bf16(
        p: &Problem<u16>,
        packed: &[u32],
        rows: Range<usize>,
        k0: usize,
        k1: usize,
    ) {
        let pairs = (k1 - k0).next_multiple_of(32) / 2;
        // SAFETY: the caller's contract; group g's 32 rows are `pairs` lines of 32 u32.
        unsafe {
            outer_tiles(p, rows, k0, pairs, |g| {
                let w0 = packed[g * pairs * 32..(g + 1) * pairs * 32].as_ptr();
                (w0, w0.wrapping_add(16), 32)
            })
        }
    }

    /// As `outer_bf16`, reading W from its panels (`panels::pack_panels`) in place.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and BF16 available; `panels` packed from the problem's W; rows.start a
    /// multiple of 32 and k0 even, both inside the problem; input rows zero padded to a multiple
    /// of 32.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn outer_panels(
        p: &Problem<u16>,
        panels: &[u32],
        rows: Range<usize>,
        k0: usize,
        k1: usize,
    ) {
        use super::panels::PANEL_ROWS;
        let panel_len = p.n_in.div_ceil(2) * PANEL_ROWS;
        let first = rows.start / PANEL_ROWS;
        let last = (rows.end - 1) / PANEL_ROWS;
        let line = |panel: usize| panels[panel * panel_len + k0 / 2 * PANEL_ROWS..].as_ptr();
        // SAFETY: the caller's contract; each panel holds every pair of k, so the slice's pairs
        // are inside it. A group of 16 rows or fewer reads its one panel twice (the second half
        // of the tile is not stored).
        unsafe {
            outer_tiles(p, rows, k0, (k1 - k0).div_ceil(2), |g| {
                let a = first + 2 * g;
                (line(a), line((a + 1).min(last)), PANEL_ROWS)
            })
        }
    }

    /// The tiles of `outer_bf16` and `outer_panels`: every token, in tiles of up to 12, over
    /// each group of 32 rows, whose two 16-row halves `locate(group)` gives as (first line of
    /// the low half, of the high half, u32 from one pair's line to the next).
    ///
    /// # Safety
    /// As `outer_tile` for every group of `rows`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn outer_tiles(
        p: &Problem<u16>,
        rows: Range<usize>,
        k0: usize,
        pairs: usize,
        locate: impl Fn(usize) -> (*const u32, *const u32, usize),
    ) {
        let groups = rows.len().div_ceil(32);
        let mut t0 = 0;
        while t0 < p.tokens {
            let left = p.tokens - t0;
            // Even tiles: 16 tokens run as 8 + 8 rather than 12 + 4.
            let nt = left.div_ceil(left.div_ceil(12));
            for g in 0..groups {
                let (w0, w1, step) = locate(g);
                let r0 = rows.start + g * 32;
                let nr = (rows.end - r0).min(32);
                // SAFETY: tile inside the problem (nt, nr clipped), buffers as required above.
                unsafe {
                    match nt {
                        12 => outer_tile::<12>(p, w0, w1, step, pairs, r0, nr, t0, k0),
                        11 => outer_tile::<11>(p, w0, w1, step, pairs, r0, nr, t0, k0),
                        10 => outer_tile::<10>(p, w0, w1, step, pairs, r0, nr, t0, k0),
                        9 => outer_tile::<9>(p, w0, w1, step, pairs, r0, nr, t0, k0),
                        8 => outer_tile::<8>(p, w0, w1, step, pairs, r0, nr, t0, k0),
                        7 => outer_tile::<7>(p, w0, w1, step, pairs, r0, nr, t0, k0),
                        6 => outer_tile::<6>(p, w0, w1, step, pairs, r0, nr, t0, k0),
                        5 => outer_tile::<5>(p, w0, w1, step, pairs, r0, nr, t0, k0),
                        4 => outer_tile::<4>(p, w0, w1, step, pairs, r0, nr, t0, k0),
                        3 => outer_tile::<3>(p, w0, w1, step, pairs, r0, nr, t0, k0),
                        2 => outer_tile::<2>(p, w0, w1, step, pairs, r0, nr, t0, k0),
                        _ => outer_tile::<1>(p, w0, w1, step, pairs, r0, nr, t0, k0),
                    }
                }
            }
            t0 += nt;
        }
    }

    /// One 32-row x T-token tile over a packed k-slice of `pairs` pairs: rows r0..r0+16 from
    /// `w0`, the next 16 from `w1`, both advancing `step` u32 per pair (32 in a repacked slice,
    /// where the two halves interleave; 16 in two panels).
    ///
    /// # Safety
    /// As `outer_bf16`; `pairs` lines of 16 u32, `step` apart, readable from `w0` and `w1`;
    /// t0 + T <= tokens; nr <= 32 rows from r0 are inside the problem.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn outer_tile<const T: usize>(
        p: &Problem<u16>,
        w0: *const u32,
        w1: *const u32,
        step: usize,
        pairs: usize,
        r0: usize,
        nr: usize,
        t0: usize,
        k0: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; T];
        let mut xp = [std::ptr::null::<u32>(); T];
        for (t, ptr) in xp.iter_mut().enumerate() {
            // The input rows start at multiples of 32 elements, so pairs are 4-byte aligned.
            *ptr = p.x[(t0 + t) * p.x_stride + k0..].as_ptr() as *const u32;
        }
        for q in 0..pairs {
            // SAFETY: q < pairs, so 16 u32 at w0 + q * step and w1 + q * step and one input
            // pair per token (k0 + 2q < the padded row length) are readable. The transmutes
            // reinterpret 64 plain bytes.
            unsafe {
                let lo: __m512bh = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    w0.add(q * step) as *const __m512i,
                ));
                let hi: __m512bh = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    w1.add(q * step) as *const __m512i,
                ));
                for t in 0..T {
                    let xb: __m512bh = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                        *xp[t].add(q) as i32,
                    ));
                    acc[t][0] = _mm512_dpbf16_ps(acc[t][0], lo, xb);
                    acc[t][1] = _mm512_dpbf16_ps(acc[t][1], hi, xb);
                }
            }
        }
        let first = k0 == 0;
        for (t, tile_row) in acc.iter().enumerate() {
            for (h, sums) in tile_row.iter().enumerate() {
                let c0 = h * 16;
                if c0 >= nr {
                    break;
                }
                let n = (nr - c0).min(16);
                let mask: __mmask16 = if n == 16 {
                    0xffff
                } else {
                    ((1u32 << n) - 1) as __mmask16
                };
                // SAFETY: lanes c0..c0+n of row t0+t are inside y (and bias), only those are
                // touched (masked), and this task owns these rows.
                unsafe {
                    let dst = p.y.0.add((t0 + t) * p.n_out + r0 + c0);
                    let base = if first {
                        match p.bias {
                            Some(b) => _mm512_maskz_loadu_ps(mask, b.as_ptr().add(r0 + c0)),
                            None => _mm512_setzero_ps(),
                        }
                    } else {
                        _mm512_maskz_loadu_ps(mask, dst)
                    };
                    _mm512_mask_storeu_ps(dst, mask, _mm512_add_ps(base, *sums));
                }
            }
        }
    }
}

/// Sum of the 8 lanes of an AVX2 vector (the attention kernel's reduction too).
///
/// # Safety
/// AVX2 available.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn reduce_add_avx2(v: std::arch::x86_64::__m256) -> f32 {
    avx2::reduce_add(v)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The AVX2 + FMA + F16C microkernels, for x86 CPUs without AVX-512 (Zen 3, Intel client
    //! cores). AVX2 has 16 vector registers, not 32, so the tiles are smaller than AVX-512's:
    //! 8 rows x 1 token (8 accumulators + 8 weight vectors) for batch-1 decode, 4 rows x 2 tokens
    //! for two, and 4 rows x 3 tokens (12 accumulators + 4 weight vectors, the input read as a
    //! memory operand of the FMA) when compute bound. Callers must check the CPU features.

    use super::prefetch::Ahead;
    use super::{PanelLine, Problem, Widen, AVX2_TILE_TOKENS, TILE_TOKENS};
    use half::{bf16, f16};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// A weight type the FMA kernel widens to f32, 8 lanes at a time.
    pub(crate) trait Lanes8: Widen {
        /// Loads 8 elements at `p` as f32.
        ///
        /// # Safety
        /// 8 elements readable at `p`; AVX2 and F16C available.
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Lanes8 for f32 {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load8(p: *const f32) -> __m256 {
            // SAFETY: caller guarantees 8 readable floats.
            unsafe { _mm256_loadu_ps(p) }
        }
    }

    impl Lanes8 for f16 {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load8(p: *const f16) -> __m256 {
            // SAFETY: caller guarantees 8 readable halves (16 bytes).
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
        }
    }

    impl Lanes8 for bf16 {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load8(p: *const bf16) -> __m256 {
            // SAFETY: caller guarantees 8 readable bf16 (16 bytes). bf16 is the top half of f32.
            unsafe {
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        }
    }

    /// The first `n < 8` elements at `p` widened to f32, the other lanes zero.
    ///
    /// # Safety
    /// `n` elements readable at `p`; AVX2 available.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_tail<W: Widen>(p: *const W, n: usize) -> __m256 {
        let mut lanes = [0.0f32; 8];
        for (i, lane) in lanes.iter_mut().enumerate().take(n) {
            // SAFETY: i < n elements are readable.
            *lane = unsafe { *p.add(i) }.widen();
        }
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_loadu_ps(lanes.as_ptr()) }
    }

    /// Sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn reduce_add(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Runs the FMA microkernel over a task's rows and one k-slice, for every token, each time
    /// with the widest tile that fits (see the module comment).
    ///
    /// # Safety
    /// AVX2, FMA and F16C available; `rows` and `k0..k1` within the problem; the rows belong to
    /// this task only.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn block_fma<W: Lanes8>(
        p: &Problem<f32>,
        w: &[W],
        rows: Range<usize>,
        k0: usize,
        k1: usize,
    ) {
        let mut t0 = 0;
        while t0 < p.tokens {
            let nt = (p.tokens - t0).min(6);
            let mut r0 = rows.start;
            while r0 < rows.end {
                let nr = rows.end - r0;
                let rt = if nr >= 8 && nt == 1 {
                    8
                } else if nr >= 4 && nt == 2 {
                    4
                } else if nr >= 2 && nt >= 3 {
                    2
                } else {
                    1
                };
                // SAFETY: the tile (rt rows from r0, nt tokens from t0) lies inside the problem
                // and the caller's block; the rest is the caller's contract.
                unsafe {
                    match (rt, nt) {
                        (8, _) => tile_fma::<W, 8, 1>(p, w, r0, t0, k0, k1),
                        (4, _) => tile_fma::<W, 4, 2>(p, w, r0, t0, k0, k1),
                        (2, 6) => tile_fma::<W, 2, 6>(p, w, r0, t0, k0, k1),
                        (2, 5) => tile_fma::<W, 2, 5>(p, w, r0, t0, k0, k1),
                        (2, 4) => tile_fma::<W, 2, 4>(p, w, r0, t0, k0, k1),
                        (2, _) => tile_fma::<W, 2, 3>(p, w, r0, t0, k0, k1),
                        (_, 6) => tile_fma::<W, 1, 6>(p, w, r0, t0, k0, k1),
                        (_, 5) => tile_fma::<W, 1, 5>(p, w, r0, t0, k0, k1),
                        (_, 4) => tile_fma::<W, 1, 4>(p, w, r0, t0, k0, k1),
                        (_, 3) => tile_fma::<W, 1, 3>(p, w, r0, t0, k0, k1),
                        (_, 2) => tile_fma::<W, 1, 2>(p, w, r0, t0, k0, k1),
                        _ => tile_fma::<W, 1, 1>(p, w, r0, t0, k0, k1),
                    }
                }
                r0 += rt;
            }
            t0 += nt;
        }
    }

    /// R rows x T tokens of dot products over k0..k1 with f32 FMAs, 8 lanes per step.
    ///
    /// # Safety
    /// As `block_fma`, and `r0 + R <= n_out`, `t0 + T <= tokens`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_fma<W: Lanes8, const R: usize, const T: usize>(
        p: &Problem<f32>,
        w: &[W],
        r0: usize,
        t0: usize,
        k0: usize,
        k1: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let wp: [*const W; R] = std::array::from_fn(|r| w[(r0 + r) * p.n_in + k0..].as_ptr());
        let xp: [*const f32; T] =
            std::array::from_fn(|t| p.x[(t0 + t) * p.x_stride + k0..].as_ptr());
        let len = k1 - k0;
        let full = len / 8 * 8;
        let mut ahead = Ahead::new(w, wp[0], len == p.n_in && p.tokens <= TILE_TOKENS, p.tokens);
        let mut k = 0;
        while k < full {
            ahead.step(R * 8 * std::mem::size_of::<W>());
            // SAFETY: k + 8 <= len, and every row has len elements from its pointer.
            unsafe {
                let mut wv = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    wv[r] = W::load8(wp[r].add(k));
                }
                for t in 0..T {
                    let xv = _mm256_loadu_ps(xp[t].add(k));
                    for r in 0..R {
                        acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
                    }
                }
            }
            k += 8;
        }
        if k < len {
            let n = len - k;
            // SAFETY: n < 8 elements remain in every row; the tail loads read only those.
            unsafe {
                let mut wv = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    wv[r] = load_tail(wp[r].add(k), n);
                }
                for t in 0..T {
                    let xv = load_tail(xp[t].add(k), n);
                    for r in 0..R {
                        acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
                    }
                }
            }
        }
        let mut sums = [[0.0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                sums[r][t] = reduce_add(acc[r][t]);
            }
        }
        // SAFETY: the tile is inside the problem and owned by this task.
        unsafe { p.store(&sums, r0, t0, k0 == 0) };
    }
    /// Widens rows `rows` x k0..k1 of W into 16-row panels, k-major: line
    /// `g * (k1 - k0) + (k - k0)` holds W[16g + i, k] in lane i for the panel's 16 rows, rows past
    /// the end zero. 8x8 blocks are loaded row-wise and transposed in registers.
    ///
    /// # Safety
    /// AVX2, FMA and F16C available; rows and k0..k1 inside W (`n_in` elements per row);
    /// `packed` holds at least `rows.len().div_ceil(16) * (k1 - k0)` lines.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn pack_panels<W: Lanes8>(
        w: &[W],
        n_in: usize,
        rows: Range<usize>,
        k0: usize,
        k1: usize,
        packed: &mut [PanelLine],
    ) {
        let kc = k1 - k0;
        let panels = rows.len().div_ceil(16);
        assert!(packed.len() >= panels * kc, "pack_panels: buffer too small");
        for g in 0..panels {
            for half in 0..2 {
                let r_base = rows.start + g * 16 + half * 8;
                let mut k = k0;
                while k < k1 {
                    let n = (k1 - k).min(8);
                    let mut m = [_mm256_setzero_ps(); 8];
                    for (i, v) in m.iter_mut().enumerate() {
                        let r = r_base + i;
                        if r < rows.end {
                            // SAFETY: row r < n_out and k..k+n inside it.
                            let src = unsafe { w.as_ptr().add(r * n_in + k) };
                            *v = unsafe {
                                if n == 8 {
                                    W::load8(src)
                                } else {
                                    load_tail(src, n)
                                }
                            };
                        }
                    }
                    transpose8(&mut m);
                    // m[j] now holds k + j for the 8 rows.
                    for (j, v) in m.iter().enumerate().take(n) {
                        let line = g * kc + (k - k0) + j;
                        // SAFETY: line < panels * kc <= packed.len() (asserted); lanes
                        // half*8..half*8+8 of one 16-float line.
                        unsafe { _mm256_store_ps(packed[line].0.as_mut_ptr().add(half * 8), *v) };
                    }
                    k += 8;
                }
            }
        }
    }

    /// Transposes an 8x8 matrix of f32 held as 8 rows (unpack pairs, shuffle quads, swap
    /// 128-bit halves).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn transpose8(m: &mut [__m256; 8]) {
        let t0 = _mm256_unpacklo_ps(m[0], m[1]);
        let t1 = _mm256_unpackhi_ps(m[0], m[1]);
        let t2 = _mm256_unpacklo_ps(m[2], m[3]);
        let t3 = _mm256_unpackhi_ps(m[2], m[3]);
        let t4 = _mm256_unpacklo_ps(m[4], m[5]);
        let t5 = _mm256_unpackhi_ps(m[4], m[5]);
        let t6 = _mm256_unpacklo_ps(m[6], m[7]);
        let t7 = _mm256_unpackhi_ps(m[6], m[7]);
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        m[0] = _mm256_permute2f128_ps::<0x20>(s0, s4);
        m[1] = _mm256_permute2f128_ps::<0x20>(s1, s5);
        m[2] = _mm256_permute2f128_ps::<0x20>(s2, s6);
        m[3] = _mm256_permute2f128_ps::<0x20>(s3, s7);
        m[4] = _mm256_permute2f128_ps::<0x31>(s0, s4);
        m[5] = _mm256_permute2f128_ps::<0x31>(s1, s5);
        m[6] = _mm256_permute2f128_ps::<0x31>(s2, s6);
        m[7] = _mm256_permute2f128_ps::<0x31>(s3, s7);
    }

    /// y[tokens, rows] (+)= x[tokens, k0..k1] W[rows, k0..k1]^T from the packed panels, 16 rows
    /// by one token group (6, fewer in the last) at a time; for each group all panels run, so
    /// the group's slice of x (6 KiB) stays in L1 while the panels come from L2.
    ///
    /// # Safety
    /// AVX2, FMA and F16C available; `packed` made by `pack_panels` for the same rows and
    /// k0..k1; the rows belong to this task only.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn outer_panels(
        p: &Problem<f32>,
        packed: &[PanelLine],
        rows: Range<usize>,
        k0: usize,
        k1: usize,
    ) {
        let kc = k1 - k0;
        let panels = rows.len().div_ceil(16);
        let mut t0 = 0;
        while t0 < p.tokens {
            let nt = (p.tokens - t0).min(AVX2_TILE_TOKENS);
            for g in 0..panels {
                let lines = &packed[g * kc..(g + 1) * kc];
                let r0 = rows.start + g * 16;
                let nr = (rows.end - r0).min(16);
                // SAFETY: tile inside the problem (nt, nr clipped); the rest as required above.
                unsafe {
                    match nt {
                        6 => outer_tile::<6>(p, lines, r0, nr, t0, k0),
                        5 => outer_tile::<5>(p, lines, r0, nr, t0, k0),
                        4 => outer_tile::<4>(p, lines, r0, nr, t0, k0),
                        3 => outer_tile::<3>(p, lines, r0, nr, t0, k0),
                        2 => outer_tile::<2>(p, lines, r0, nr, t0, k0),
                        _ => outer_tile::<1>(p, lines, r0, nr, t0, k0),
                    }
                }
            }
            t0 += nt;
        }
    }

    /// One 16-row x T-token tile over a panel's k-slice (`lines.len()` values of k).
    ///
    /// # Safety
    /// As `outer_panels`; t0 + T <= tokens; nr <= 16 rows from r0 inside the problem.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn outer_tile<const T: usize>(
        p: &Problem<f32>,
        lines: &[PanelLine],
        r0: usize,
        nr: usize,
        t0: usize,
        k0: usize,
    ) {
        const G: usize = AVX2_TILE_TOKENS;
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        // t0 is a multiple of G (tiles are whole groups but the last).
        let xg = p.x[(t0 / G * p.n_in + k0) * G..].as_ptr();
        // The tile of y is read back after the k loop; fetch it into L1 behind the loop (every
        // k-slice revisits y, which has usually left the caches since).
        for t in 0..T {
            let row = p.y.0.wrapping_add((t0 + t) * p.n_out + r0) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(row);
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(60));
        }
        for (k, line) in lines.iter().enumerate() {
            // SAFETY: a line is 64 aligned bytes; k < k1 - k0, so the group's G values at k0 + k
            // are inside the packed input.
            unsafe {
                let w0 = _mm256_load_ps(line.0.as_ptr());
                let w1 = _mm256_load_ps(line.0.as_ptr().add(8));
                let xk = xg.add(k * G);
                for (t, a) in acc.iter_mut().enumerate() {
                    let xb = _mm256_broadcast_ss(&*xk.add(t));
                    a[0] = _mm256_fmadd_ps(w0, xb, a[0]);
                    a[1] = _mm256_fmadd_ps(w1, xb, a[1]);
                }
            }
        }
        let first = k0 == 0;
        for (t, sums) in acc.iter().enumerate() {
            // SAFETY: row t0 + t of y has n_out >= r0 + nr elements; this task owns the rows.
            let dst = unsafe { p.y.0.add((t0 + t) * p.n_out + r0) };
            if nr == 16 {
                for (h, s) in sums.iter().enumerate() {
                    // SAFETY: 8 floats of y (and bias) at r0 + 8h, inside the row.
                    unsafe {
                        let d = dst.add(h * 8);
                        let base = if first {
                            match p.bias {
                                Some(b) => _mm256_loadu_ps(b.as_ptr().add(r0 + h * 8)),
                                None => _mm256_setzero_ps(),
                            }
                        } else {
                            _mm256_loadu_ps(d)
                        };
                        _mm256_storeu_ps(d, _mm256_add_ps(base, *s));
                    }
                }
            } else {
                let mut lanes = [0.0f32; 16];
                // SAFETY: 16 floats fit `lanes`.
                unsafe {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), sums[0]);
                    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), sums[1]);
                }
                for (i, v) in lanes.iter().enumerate().take(nr) {
                    // SAFETY: i < nr, so element r0 + i is inside the row; owned by this task.
                    unsafe {
                        let d = &mut *dst.add(i);
                        *d = if first {
                            v + p.bias.map_or(0.0, |b| b[r0 + i])
                        } else {
                            *d + v
                        };
                    }
                }
            }
        }
    }
}
