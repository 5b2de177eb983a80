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

/// Which parts of a 32-token x 32-row block exist: tokens in the two input tiles, rows of W in
/// the two weight tiles (each 0..=16; the first of each pair at least 1).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Block {
    tokens_lo: usize,
    tokens_hi: usize,
    rows_lo: usize,
    rows_hi: usize,
}

/// The 64-byte tile configuration `ldtilecfg` reads.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    /// Palette 1. tmm4/tmm5: input tiles (tokens x 32 bf16); tmm6/tmm7: W tiles (16 pairs x
    /// rows u32); tmm0..tmm3: y blocks (tokens_lo|hi x rows_lo|hi f32), tmm{2i+j} = A_i B_j.
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
        set(0, b.tokens_lo, 4 * b.rows_lo);
        set(1, b.tokens_lo, 4 * b.rows_hi);
        set(2, b.tokens_hi, 4 * b.rows_lo);
        set(3, b.tokens_hi, 4 * b.rows_hi);
        set(4, b.tokens_lo, 64);
        set(5, b.tokens_hi, 64);
        set(6, 16, 4 * b.rows_lo);
        set(7, 16, 4 * b.rows_hi);
        TileConfig(c)
    }
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
                tokens_lo: tl.min(16),
                tokens_hi: tl.saturating_sub(16),
                rows_lo: nr.min(16),
                rows_hi: nr.saturating_sub(16),
            };
            let (two_t, two_r) = (block.tokens_hi > 0, block.rows_hi > 0);
            // SAFETY (whole block): tiles are used only as configured (the `two_*` flags guard
            // the second tile of each pair); every y block is inside y (tokens t0.., columns
            // r0.. of the configured counts), every input tile reads configured rows of 64 bytes
            // inside the padded rows, every W tile 16 pairs of configured columns inside the
            // packed group.
            unsafe {
                if loaded != Some(block) {
                    let cfg = TileConfig::new(block);
                    asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
                    loaded = Some(block);
                }
                let c00 = p.y.0.add(t0 * p.n_out + r0);
                let c01 = c00.add(16);
                let c10 = c00.add(16 * p.n_out);
                let c11 = c10.add(16);
                // The accumulators start as y (later slices), or as the bias broadcast down the
                // tile's rows (a stride-0 load) or zeros (first slice): y is then written once
                // per slice and never read before the first, which at OPT-125m widths (768) is
                // as much memory traffic as the products' own.
                let (c00_in, c01_in, c10_in, c11_in, in_stride) = match (first, p.bias) {
                    (false, _) => (c00 as *const f32, c01 as _, c10 as _, c11 as _, c_stride),
                    (true, Some(b)) => {
                        let b0 = b.as_ptr().add(r0);
                        (b0, b0.add(16), b0, b0.add(16), 0)
                    }
                    (true, None) => (c00 as *const f32, c01 as _, c10 as _, c11 as _, usize::MAX),
                };
                if in_stride == usize::MAX {
                    asm!("tilezero tmm0", options(nostack, nomem));
                    if two_r {
                        asm!("tilezero tmm1", options(nostack, nomem));
                    }
                    if two_t {
                        asm!("tilezero tmm2", options(nostack, nomem));
                        if two_r {
                            asm!("tilezero tmm3", options(nostack, nomem));
                        }
                    }
                } else {
                    asm!("tileloadd tmm0, [{p} + {s}*1]", p = in(reg) c00_in, s = in(reg) in_stride, options(nostack, readonly));
                    if two_r {
                        asm!("tileloadd tmm1, [{p} + {s}*1]", p = in(reg) c01_in, s = in(reg) in_stride, options(nostack, readonly));
                    }
                    if two_t {
                        asm!("tileloadd tmm2, [{p} + {s}*1]", p = in(reg) c10_in, s = in(reg) in_stride, options(nostack, readonly));
                        if two_r {
                            asm!("tileloadd tmm3, [{p} + {s}*1]", p = in(reg) c11_in, s = in(reg) in_stride, options(nostack, readonly));
                        }
                    }
                }
                let a_lo = p.x.as_ptr().add(t0 * p.x_stride + k0);
                let a_hi = a_lo.add(16 * p.x_stride);
                let b_lo = packed.as_ptr().add(g * pairs * 32);
                let b_hi = b_lo.add(16);
                for s in 0..steps {
                    let (a0, a1) = (a_lo.add(s * 32), a_hi.add(s * 32));
                    let (b0, b1) = (b_lo.add(s * 512), b_hi.add(s * 512));
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
                    asm!(
                        "tileloadd tmm4, [{a} + {sa}*1]",
                        "tileloadd tmm6, [{b} + {sb}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        a = in(reg) a0, sa = in(reg) a_stride, b = in(reg) b0, sb = in(reg) b_stride,
                        options(nostack, readonly)
                    );
                    if two_r {
                        asm!(
                            "tileloadd tmm7, [{b} + {sb}*1]",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            b = in(reg) b1, sb = in(reg) b_stride,
                            options(nostack, readonly)
                        );
                    }
                    if two_t {
                        asm!(
                            "tileloadd tmm5, [{a} + {sa}*1]",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            a = in(reg) a1, sa = in(reg) a_stride,
                            options(nostack, readonly)
                        );
                        if two_r {
                            asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem));
                        }
                    }
                }
                asm!("tilestored [{p} + {s}*1], tmm0", p = in(reg) c00, s = in(reg) c_stride, options(nostack));
                if two_r {
                    asm!("tilestored [{p} + {s}*1], tmm1", p = in(reg) c01, s = in(reg) c_stride, options(nostack));
                }
                if two_t {
                    asm!("tilestored [{p} + {s}*1], tmm2", p = in(reg) c10, s = in(reg) c_stride, options(nostack));
                    if two_r {
                        asm!("tilestored [{p} + {s}*1], tmm3", p = in(reg) c11, s = in(reg) c_stride, options(nostack));
                    }
                }
            }
        }
        t0 += 32;
    }
    // SAFETY: releases this thread's tile state; no tile is read afterwards.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// Palette 1 for `in_place`: tmm0/tmm1 accumulate W rows 0..16 of the task (tokens 0..16 /
/// 16..32), tmm2/tmm3 rows 16..32; tmm4/tmm5 hold the two W tiles (rows x 32 bf16), tmm6/tmm7
/// the two input tiles (16 pairs x 16 tokens). `rows_lo` is 1..=16, `rows_hi` 0..=16.
fn in_place_config(rows_lo: usize, rows_hi: usize) -> TileConfig {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut set = |tmm: usize, rows: usize| {
        let colsb: u16 = if rows == 0 { 0 } else { 64 };
        c[16 + 2 * tmm..18 + 2 * tmm].copy_from_slice(&colsb.to_le_bytes());
        c[48 + tmm] = rows as u8;
    };
    for (tmm, rows) in [rows_lo, rows_lo, rows_hi, rows_hi, rows_lo, rows_hi, 16, 16]
        .into_iter()
        .enumerate()
    {
        set(tmm, rows);
    }
    TileConfig(c)
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
    let two_t = p.tokens > 16;
    let cfg = in_place_config(rows_lo, rows_hi);
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
    // SAFETY (whole block): tiles are used only as configured (`rows_hi`, `two_t` guard the
    // second of each pair); W tiles read rows_lo / rows_hi rows of 64 bytes inside the task's
    // rows of W (k + 32 <= n_in); input tiles read 16 pairs of 128 bytes inside `packed`; the
    // stores write the 1 KiB blocks of `sums`.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
        if rows_hi > 0 {
            asm!("tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        }
        let mut k = 0;
        while k < n_in {
            let (a0, a1) = (a_lo.add(k), a_hi.add(k));
            let b0 = b_lo.add(k / 2 * 32);
            let b1 = b0.add(16);
            asm!(
                "tileloadd tmm4, [{a} + {s}*1]",
                "tileloadd tmm6, [{x} + {t}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                a = in(reg) a0, s = in(reg) w_stride, x = in(reg) b0, t = in(reg) x_stride,
                options(nostack, readonly)
            );
            if two_t {
                asm!(
                    "tileloadd tmm7, [{x} + {t}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    x = in(reg) b1, t = in(reg) x_stride,
                    options(nostack, readonly)
                );
            }
            if rows_hi > 0 {
                asm!(
                    "tileloadd tmm5, [{a} + {s}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    a = in(reg) a1, s = in(reg) w_stride,
                    options(nostack, readonly)
                );
                if two_t {
                    asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem));
                }
            }
            k += 32;
        }
        let base = sums.as_mut_ptr() as *mut f32;
        let out = |i: usize| base.add(i * 256);
        asm!("tilestored [{p} + {s}*1], tmm0", p = in(reg) out(0), s = in(reg) 64usize, options(nostack));
        if two_t {
            asm!("tilestored [{p} + {s}*1], tmm1", p = in(reg) out(1), s = in(reg) 64usize, options(nostack));
        }
        if rows_hi > 0 {
            asm!("tilestored [{p} + {s}*1], tmm2", p = in(reg) out(2), s = in(reg) 64usize, options(nostack));
            if two_t {
                asm!("tilestored [{p} + {s}*1], tmm3", p = in(reg) out(3), s = in(reg) 64usize, options(nostack));
            }
        }
        asm!("tilerelease", options(nostack, nomem));
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
