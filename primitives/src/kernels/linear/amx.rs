//! AMX-BF16 tiles for many-token bf16 products (Intel since Sapphire Rapids).
//!
//! One `tdpbf16ps` multiplies a 16 x 32 bf16 tile by a 32 x 16 one into a 16 x 16 f32 tile:
//! 16,384 operations per instruction against 64 for an AVX-512 `vdpbf16ps`. The A operand is 16
//! input rows (tokens) read from the bf16-rounded input, the B operand 16 rows of W in the
//! pair-interleaved layout that `avx512::pack_bf16` already produces for the vector kernels, and
//! the accumulators are 16 x 16 blocks of y itself, stored into y (no scatter) and loaded back
//! only by later k-slices; the first slice starts them from the bias. For up to 32 tokens
//! `in_place` swaps the roles: W is read in place and only the input is packed.
//!
//! Register use per step: two input tiles (32 tokens) and two W tiles (32 rows) feed four
//! accumulators, so each 1 KiB tile loaded is used twice. Tails (fewer than 32 tokens in the
//! last group, fewer than 32 rows in the last group of a task) are tiles configured with fewer
//! rows or columns, never padding written into y.
//!
//! The tile registers are not known to the compiler, so every instruction is its own `asm!`
//! statement and the tiles keep their contents between them; each call configures the tiles
//! (`ldtilecfg`) on the thread that runs it and releases them (`tilerelease`) before it returns,
//! so the kernel never leaves tile state behind for the OS to save.

use super::Problem;
use std::arch::asm;
use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
use std::ops::Range;

/// Asks Linux for the right to use the AMX tile data state (`ARCH_REQ_XCOMP_PERM` for
/// `XFEATURE_XTILEDATA`), which a process must do before its first tile instruction; false when
/// the kernel refuses or is not Linux, and the caller then uses the AVX-512 paths.
pub(super) fn request_permission() -> bool {
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only changes this process's permission bits.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        r == 0
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// CPUID says the core has AMX-TILE and AMX-BF16.
pub(super) fn cpu_has_amx_bf16() -> bool {
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    let amx_bf16 = leaf7.edx & (1 << 22) != 0;
    let amx_tile = leaf7.edx & (1 << 24) != 0;
    amx_bf16 && amx_tile
}

/// Which tiles of a 2 x 2 block exist: rows of the two A tiles and columns of the two B tiles
/// (each 0..=16; the first of each pair at least 1). Accumulator tmm{2i+j} = A_i B_j is
/// `a_i` x `b_j`. `slice`'s A is tokens and B rows of W; `in_place`'s the other way round.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Block {
    a_lo: usize,
    a_hi: usize,
    b_lo: usize,
    b_hi: usize,
}

/// The 64-byte tile configuration `ldtilecfg` reads.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    /// Palette 1. tmm4/tmm5: A tiles (rows x 32 bf16); tmm6/tmm7: B tiles (16 pairs x columns
    /// u32); tmm0..tmm3: accumulators (f32), tmm{2i+j} = A_i B_j. Absent tiles are unconfigured.
    fn new(b: Block) -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut set = |tmm: usize, rows: usize, colsb: usize| {
            let (rows, colsb) = if rows == 0 || colsb == 0 {
                (0, 0)
            } else {
                (rows, colsb)
            };
            c[16 + 2 * tmm..18 + 2 * tmm].copy_from_slice(&(colsb as u16).to_le_bytes());
            c[48 + tmm] = rows as u8;
        };
        set(0, b.a_lo, 4 * b.b_lo);
        set(1, b.a_lo, 4 * b.b_hi);
        set(2, b.a_hi, 4 * b.b_lo);
        set(3, b.a_hi, 4 * b.b_hi);
        set(4, b.a_lo, 64);
        set(5, b.a_hi, 64);
        set(6, 16, 4 * b.b_lo);
        set(7, 16, 4 * b.b_hi);
        TileConfig(c)
    }

    /// Loads this configuration on the calling thread (which zeroes every tile).
    ///
    /// # Safety
    /// As the kernels: AMX-BF16 and the OS permission.
    unsafe fn load(&self) {
        // SAFETY: 64 aligned bytes of a valid palette-1 configuration.
        unsafe { asm!("ldtilecfg [{}]", in(reg) self.0.as_ptr(), options(nostack, readonly)) };
    }
}

/// Zeroes the block's accumulators.
///
/// # Safety
/// `b` is the loaded configuration.
#[inline(always)]
unsafe fn zero_acc(b: Block) {
    // SAFETY: only configured tiles are touched.
    unsafe {
        asm!("tilezero tmm0", options(nostack, nomem));
        if b.b_hi > 0 {
            asm!("tilezero tmm1", options(nostack, nomem));
        }
        if b.a_hi > 0 {
            asm!("tilezero tmm2", options(nostack, nomem));
            if b.b_hi > 0 {
                asm!("tilezero tmm3", options(nostack, nomem));
            }
        }
    }
}

/// Loads the block's accumulators tmm{2i+j} from `c[2i+j]`, rows `stride` bytes apart (0: one
/// row broadcast down the tile).
///
/// # Safety
/// `b` is the loaded configuration; each pointer has the configured rows x columns readable.
#[inline(always)]
unsafe fn load_acc(b: Block, c: [*const f32; 4], stride: usize) {
    // SAFETY: by the contract.
    unsafe {
        asm!("tileloadd tmm0, [{p} + {s}*1]", p = in(reg) c[0], s = in(reg) stride, options(nostack, readonly));
        if b.b_hi > 0 {
            asm!("tileloadd tmm1, [{p} + {s}*1]", p = in(reg) c[1], s = in(reg) stride, options(nostack, readonly));
        }
        if b.a_hi > 0 {
            asm!("tileloadd tmm2, [{p} + {s}*1]", p = in(reg) c[2], s = in(reg) stride, options(nostack, readonly));
            if b.b_hi > 0 {
                asm!("tileloadd tmm3, [{p} + {s}*1]", p = in(reg) c[3], s = in(reg) stride, options(nostack, readonly));
            }
        }
    }
}

/// Stores the block's accumulators tmm{2i+j} to `c[2i+j]`, rows `stride` bytes apart.
///
/// # Safety
/// `b` is the loaded configuration; each pointer has the configured rows x columns writable.
#[inline(always)]
unsafe fn store_acc(b: Block, c: [*mut f32; 4], stride: usize) {
    // SAFETY: by the contract.
    unsafe {
        asm!("tilestored [{p} + {s}*1], tmm0", p = in(reg) c[0], s = in(reg) stride, options(nostack));
        if b.b_hi > 0 {
            asm!("tilestored [{p} + {s}*1], tmm1", p = in(reg) c[1], s = in(reg) stride, options(nostack));
        }
        if b.a_hi > 0 {
            asm!("tilestored [{p} + {s}*1], tmm2", p = in(reg) c[2], s = in(reg) stride, options(nostack));
            if b.b_hi > 0 {
                asm!("tilestored [{p} + {s}*1], tmm3", p = in(reg) c[3], s = in(reg) stride, options(nostack));
            }
        }
    }
}

/// One k step of 32: loads the A tiles at `a[i]` (rows `sa` bytes apart) and the B tiles at
/// `b[j]` (16 pair rows `sb` bytes apart) and adds every existing product A_i B_j.
///
/// # Safety
/// `blk` is the loaded configuration; each pointer has its configured tile readable.
#[inline(always)]
unsafe fn step<A, B>(blk: Block, a: [*const A; 2], sa: usize, b: [*const B; 2], sb: usize) {
    // SAFETY: by the contract.
    unsafe {
        asm!(
            "tileloadd tmm4, [{a} + {sa}*1]",
            "tileloadd tmm6, [{b} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            a = in(reg) a[0], sa = in(reg) sa, b = in(reg) b[0], sb = in(reg) sb,
            options(nostack, readonly)
        );
        if blk.b_hi > 0 {
            asm!(
                "tileloadd tmm7, [{b} + {sb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                b = in(reg) b[1], sb = in(reg) sb,
                options(nostack, readonly)
            );
        }
        if blk.a_hi > 0 {
            asm!(
                "tileloadd tmm5, [{a} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                a = in(reg) a[1], sa = in(reg) sa,
                options(nostack, readonly)
            );
            if blk.b_hi > 0 {
                asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem));
            }
        }
    }
}

/// Releases this thread's tile state.
///
/// # Safety
/// No tile is read afterwards.
unsafe fn release() {
    // SAFETY: by the contract.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// y[.., rows] (+)= x[.., k0..k1] W[rows, k0..k1]^T for every token, on the tiles, from a slice
/// of W packed by `avx512::pack_bf16` (groups of 32 rows, `(k1 - k0)` rounded up to 32, two k
/// per u32). The first slice (k0 = 0) starts from the bias or zeros and overwrites y; later ones
/// add to what y holds.
///
/// # Safety
/// The CPU has AMX-BF16 and `request_permission` succeeded; `p.x` holds every token's row of
/// bf16 bits `p.x_stride` apart, zero padded to a multiple of 32 past `n_in` (k0 is a multiple
/// of 32); `packed` is the slice as described; `rows` inside 0..n_out; no other thread touches
/// these columns of y.
pub(super) unsafe fn slice(
    p: &Problem<u16>,
    packed: &[u32],
    rows: Range<usize>,
    k0: usize,
    k1: usize,
) {
    let pairs = (k1 - k0).next_multiple_of(32) / 2;
    let steps = pairs / 16;
    let groups = rows.len().div_ceil(32);
    let first = k0 == 0;
    assert!(
        packed.len() >= groups * pairs * 32,
        "amx::slice: packed slice too small"
    );
    assert!(p.x.len() >= (p.tokens - 1) * p.x_stride + k0 + steps * 32);
    let a_stride = p.x_stride * 2;
    let c_stride = p.n_out * 4;
    let b_stride = 128usize;
    let mut loaded: Option<Block> = None;
    let mut t0 = 0;
    while t0 < p.tokens {
        let tl = (p.tokens - t0).min(32);
        for g in 0..groups {
            let r0 = rows.start + g * 32;
            let nr = (rows.end - r0).min(32);
            let block = Block {
                a_lo: tl.min(16),
                a_hi: tl.saturating_sub(16),
                b_lo: nr.min(16),
                b_hi: nr.saturating_sub(16),
            };
            // SAFETY (whole block): the helpers touch only the configured tiles; every y block
            // is inside y (tokens t0.., columns r0.. of the configured counts), every input tile
            // reads configured rows of 64 bytes inside the padded rows, every W tile 16 pairs of
            // configured columns inside the packed group.
            unsafe {
                if loaded != Some(block) {
                    TileConfig::new(block).load();
                    loaded = Some(block);
                }
                let c00 = p.y.0.add(t0 * p.n_out + r0);
                let c = [
                    c00,
                    c00.add(16),
                    c00.add(16 * p.n_out),
                    c00.add(16 * p.n_out + 16),
                ];
                // The accumulators start as y (later slices), or as the bias broadcast down the
                // tile's rows (a stride-0 load) or zeros (first slice): y is then written once
                // per slice and never read before the first, which at OPT-125m widths (768) is
                // as much memory traffic as the products' own.
                match (first, p.bias) {
                    (false, _) => load_acc(block, c.map(|c| c as *const f32), c_stride),
                    (true, Some(b)) => {
                        let b0 = b.as_ptr().add(r0);
                        load_acc(block, [b0, b0.add(16), b0, b0.add(16)], 0);
                    }
                    (true, None) => zero_acc(block),
                }
                let a_lo = p.x.as_ptr().add(t0 * p.x_stride + k0);
                let a_hi = a_lo.add(16 * p.x_stride);
                let b_lo = packed.as_ptr().add(g * pairs * 32);
                let b_hi = b_lo.add(16);
                for s in 0..steps {
                    // The next step's tiles into L1: a tile load cannot start before the
                    // products reading its register are done (tiles are not renamed), so a load
                    // that misses L1 stalls the tile unit. Measured at OPT-1.3B shapes, this
                    // took 1024 tokens from 950 to 1250-1330 GFLOP/s; nearly all of it is the
                    // input rows (32 streams a row apart), the W tiles are contiguous. Past
                    // the slice's end the addresses are only prefetched, never read.
                    let next_b = b_lo.add((s + 1) * 512) as *const i8;
                    let next_a = a_lo.add((s + 1) * 32) as *const i8;
                    for line in 0..32 {
                        _mm_prefetch::<_MM_HINT_T0>(next_b.wrapping_add(line * 64));
                        _mm_prefetch::<_MM_HINT_T0>(next_a.wrapping_add(line * a_stride));
                    }
                    step(
                        block,
                        [a_lo.add(s * 32), a_hi.add(s * 32)],
                        a_stride,
                        [b_lo.add(s * 512), b_hi.add(s * 512)],
                        b_stride,
                    );
                }
                store_acc(block, c, c_stride);
            }
        }
        t0 += 32;
    }
    // SAFETY: no tile is read afterwards.
    unsafe { release() };
}

/// Whether `in_place` can run a product: W rows are read 32 bf16 (64 bytes) at a time where
/// they lie, so the reduction must be a multiple of 32 (every OPT and Llama width is), and the
/// input must be one group of at most 32 tokens.
pub(super) fn in_place_fits(tokens: usize, n_in: usize) -> bool {
    tokens <= 32 && n_in.is_multiple_of(32) && n_in > 0
}
/// y[.., rows] = x W[rows]^T (+ bias) for at most 32 rows and one group of at most 32 tokens,
/// over the whole reduction, with W read in place as the A operand and the input, packed once
/// by the caller (`avx512::pack_bf16` over the token rows: 32 u32 per pair of k), as B. The
/// accumulators hold y^T and are written out by a scalar scatter. For few tokens the product is
/// bound by streaming W from DRAM, and repacking W (as `slice` needs) cost a third of the rate
/// (measured at 16 tokens, OPT-1.3B shapes: 13 GB/s against 19 in place).
///
/// # Safety
/// As `slice`, and `in_place_fits(p.tokens, p.n_in)`; `rows` at most 32 long; `packed` holds
/// `16 * n_in` elements (32 tokens, zero past `p.tokens`).
pub(super) unsafe fn in_place(p: &Problem<u16>, w: &[u16], packed: &[u32], rows: Range<usize>) {
    let n_in = p.n_in;
    assert!(rows.len() <= 32 && !rows.is_empty() && rows.end <= p.n_out);
    assert!(packed.len() >= 16 * n_in && w.len() >= p.n_out * n_in);
    let rows_lo = rows.len().min(16);
    let rows_hi = rows.len() - rows_lo;
    // A: W rows (rows_lo + rows_hi); B: the two token halves, 16 columns each (the packed
    // input is zero past the last token).
    let block = Block {
        a_lo: rows_lo,
        a_hi: rows_hi,
        b_lo: 16,
        b_hi: if p.tokens > 16 { 16 } else { 0 },
    };
    let w_stride = n_in * 2;
    let x_stride = 128usize;
    let a_lo = w[rows.start * n_in..].as_ptr();
    let a_hi = if rows_hi > 0 {
        w[(rows.start + 16) * n_in..].as_ptr()
    } else {
        a_lo
    };
    let b_lo = packed.as_ptr();
    let mut sums = [[[0f32; 16]; 16]; 4];
    // SAFETY (whole block): the helpers touch only the configured tiles; W tiles read rows_lo /
    // rows_hi rows of 64 bytes inside the task's rows of W (k + 32 <= n_in); input tiles read
    // 16 pairs of 128 bytes inside `packed`; the stores write the 1 KiB blocks of `sums`.
    unsafe {
        TileConfig::new(block).load();
        zero_acc(block);
        let mut k = 0;
        while k < n_in {
            let b0 = b_lo.add(k / 2 * 32);
            step(
                block,
                [a_lo.add(k), a_hi.add(k)],
                w_stride,
                [b0, b0.add(16)],
                x_stride,
            );
            k += 32;
        }
        let base = sums.as_mut_ptr() as *mut f32;
        store_acc(block, [0, 1, 2, 3].map(|i| base.add(i * 256)), 64);
        release();
    }
    // sums[2 * (row / 16) + token / 16][row % 16][token % 16]
    for (i, r) in rows.enumerate() {
        let b = p.bias.map_or(0.0, |b| b[r]);
        for t in 0..p.tokens {
            let s = sums[2 * (i / 16) + t / 16][i % 16][t % 16];
            // SAFETY: (t, r) is inside y and this task's column.
            unsafe { *p.y.0.add(t * p.n_out + r) = s + b };
        }
    }
}
