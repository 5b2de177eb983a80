//! Causal multi-head attention over a KV cache read in place.
//!
//! The cache rows are [kv_len, num_heads * head_dim], so one head's keys are `head_dim`
//! contiguous floats every row: each score is a short contiguous dot product and the weighted
//! sum of values is a contiguous multiply-add per key, which vectorises without copying or
//! transposing the cache. Bodies are written once in plain Rust and compiled for AVX-512, AVX2
//! and the baseline target, and the wrapper picks one at run time.
//!
//! Three schedules: a decode row over a cache of 64 keys or more splits its keys into parts
//! that run in parallel and are merged (`split_keys`); several rows (prefill) run in parallel
//! groups of rows, on AVX-512 over one head's keys and values widened to f32 once per group
//! (`rows_avx512`); what is left (short caches, little scratch) runs row by row, a decode row's
//! heads split between threads.

use super::linear::{Isa, WeightElem as KvElem};
use super::KvRows;
use rayon::prelude::*;
use std::ops::Range;

/// Defines `$run(a, args.., isa)`, which runs `$body::<O, K>` compiled for `isa`: AVX-512 (F/BW/VL
/// with FMA), AVX2 (with FMA and F16C) or plain Rust. The bodies are written once against
/// [`HeadOps`]; this writes the `target_feature` wrappers and the match that picks one.
macro_rules! dispatched {
    ($run:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        fn $run<K: KvElem>(a: &Attn<K>, $($arg: $ty,)* isa: Isa) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
                unsafe fn on_avx512<K: KvElem>(a: &Attn<K>, $($arg: $ty),*) {
                    $body::<avx512::Fma, K>(a, $($arg),*)
                }
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn on_avx2<K: KvElem>(a: &Attn<K>, $($arg: $ty),*) {
                    $body::<avx2::Fma, K>(a, $($arg),*)
                }
                match isa {
                    // SAFETY: `Isa::detect` only reports an instruction set the CPU has.
                    Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => {
                        return unsafe { on_avx512(a, $($arg),*) }
                    }
                    // SAFETY: as above.
                    Isa::Avx2 => return unsafe { on_avx2(a, $($arg),*) },
                    Isa::Portable => {}
                }
            }
            let _ = isa;
            $body::<Plain, K>(a, $($arg),*);
        }
    };
}

/// Geometry and operands shared by every query row.
/// `K` is the cache's element type (f32, f16 or bf16), widened to f32 in registers.
struct Attn<'a, K> {
    q: &'a [f32],
    q_len: usize,
    k: &'a [K],
    v: &'a [K],
    kv_len: usize,
    key_valid: &'a [bool],
    num_heads: usize,
    head_dim: usize,
    scale: f32,
}

/// The operands as the callers hold them: cache rows in their stored type.
pub(crate) struct AttnRows<'a> {
    pub q: &'a [f32],
    pub q_len: usize,
    pub k: KvRows<'a>,
    pub v: KvRows<'a>,
    pub kv_len: usize,
    pub key_valid: &'a [bool],
    pub num_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Runs attention on `isa` over rows of either element type (keys and values of one type).
pub(crate) fn attention_on(a: &AttnRows, out: &mut [f32], scratch: &mut [f32], isa: Isa) {
    fn typed<'a, K>(a: &AttnRows<'a>, k: &'a [K], v: &'a [K]) -> Attn<'a, K> {
        Attn {
            q: a.q,
            q_len: a.q_len,
            k,
            v,
            kv_len: a.kv_len,
            key_valid: a.key_valid,
            num_heads: a.num_heads,
            head_dim: a.head_dim,
            scale: a.scale,
        }
    }
    match (a.k, a.v) {
        (KvRows::F32(k), KvRows::F32(v)) => attention_impl(&typed(a, k, v), out, scratch, isa),
        (KvRows::F16(k), KvRows::F16(v)) => attention_impl(&typed(a, k, v), out, scratch, isa),
        (KvRows::Bf16(k), KvRows::Bf16(v)) => attention_impl(&typed(a, k, v), out, scratch, isa),
        _ => panic!("attention: keys and values must have one element type"),
    }
}

/// Most parts a single query row's keys are cut into (see [`split_keys`]).
const KEY_PARTS: usize = 4;
/// Fewest keys per part: below this the partial outputs and their merge cost more than the
/// streaming they buy.
const MIN_PART_KEYS: usize = 32;

/// How many parts `split_keys` cuts `keys` keys into: a function of the cache length only, so
/// that a decode step gives the same bits on any number of threads.
fn key_parts(keys: usize) -> usize {
    (keys / MIN_PART_KEYS).clamp(1, KEY_PARTS)
}

/// Floats of scratch `split_keys` needs: each part's scores (`num_heads` x part length), its
/// partial output (`num_heads * head_dim`) and its per-head maximum and sum.
fn split_scratch_len(keys: usize, num_heads: usize, head_dim: usize) -> usize {
    let parts = key_parts(keys);
    parts * (num_heads * keys.div_ceil(parts) + num_heads * head_dim + 2 * num_heads)
}

/// Floats a caller adds to `max_len * num_heads` of scores so that a single query row over a
/// cache of up to `max_len` keys can take the key-split path: the parts' outputs, maxima and
/// sums, and the rounding up of their lengths.
pub(crate) fn partials_len(num_heads: usize, head_dim: usize) -> usize {
    KEY_PARTS * (num_heads * head_dim + 3 * num_heads)
}

/// Runs attention. With room in `scratch` for several rows' scores, query rows run in
/// parallel (prefill). A single query row (decode) over a long enough cache is split by keys
/// (`split_keys`); otherwise its heads are split between threads.
fn attention_impl<K: KvElem>(a: &Attn<K>, out: &mut [f32], scratch: &mut [f32], isa: Isa) {
    let d = a.num_heads * a.head_dim;
    if a.q_len == 0 || d == 0 {
        return;
    }
    let slots = scratch.len().checked_div(a.kv_len).unwrap_or(1);
    let work = a.q_len * a.kv_len * d;
    let threads = rayon::current_num_threads().max(1);
    if a.q_len == 1
        && key_parts(a.kv_len) >= 2
        && work >= 1 << 16
        && scratch.len() >= split_scratch_len(a.kv_len, a.num_heads, a.head_dim)
    {
        split_keys(a, out, scratch, isa);
    } else if slots >= 2 && a.q_len >= 2 && work >= 1 << 16 {
        #[cfg(target_arch = "x86_64")]
        if tiled_rows(isa, a.head_dim) && a.num_heads >= 2 * threads {
            // A task per head: every head is the same work, and its keys and values are
            // widened once for all the rows.
            let rows = OutRows(out.as_mut_ptr());
            (0..a.num_heads).into_par_iter().for_each(|h| {
                // SAFETY: `tiled_rows` checked the features and head size; each task writes
                // only its own head's columns of the q_len rows of `out`.
                unsafe { rows_tiled(a, 0, a.q_len, rows, h..h + 1) }
            });
            return;
        }
        // Several groups per thread, so work stealing evens out causal rows (later rows see
        // more keys).
        let groups = slots.min(a.q_len).min(4 * threads);
        let rows_per_group = a.q_len.div_ceil(groups);
        out.par_chunks_mut(rows_per_group * d)
            .zip(scratch.par_chunks_mut(a.kv_len.max(1)))
            .enumerate()
            .for_each(|(g, (o, s))| run_rows(a, g * rows_per_group, o, &mut s[..a.kv_len], isa));
    } else if slots >= 2 && a.q_len == 1 && threads >= 2 && work >= 1 << 16 {
        // One contiguous range of heads per thread, with room for all its heads' scores.
        let groups = threads.min(a.num_heads).min(slots);
        let heads_per_group = a.num_heads.div_ceil(groups);
        let per_group = (slots / groups).min(heads_per_group).max(1) * a.kv_len;
        out.par_chunks_mut(heads_per_group * a.head_dim)
            .zip(scratch.par_chunks_mut(per_group))
            .enumerate()
            .for_each(|(g, (o, s))| run_heads(a, 0, g * heads_per_group, o, s, isa));
    } else if a.q_len >= 2 {
        run_rows(a, 0, out, scratch, isa);
    } else {
        run_heads(a, 0, 0, out, scratch, isa);
    }
}

/// Query rows `first..` (as many as `out` holds), every head, with `p` (at least kv_len
/// floats) for one row's scores: on AVX-512 with 64- or 128-wide heads head by head over the
/// cache widened to f32 once for all the rows (`rows_avx512`), else row by row.
fn run_rows<K: KvElem>(a: &Attn<K>, first: usize, out: &mut [f32], p: &mut [f32], isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    if tiled_rows(isa, a.head_dim) {
        let n_rows = out.len() / (a.num_heads * a.head_dim);
        // SAFETY: `tiled_rows` checked; `out` holds the n_rows rows and nothing else writes it.
        return unsafe { rows_tiled(a, first, n_rows, OutRows(out.as_mut_ptr()), 0..a.num_heads) };
    }
    let d = a.num_heads * a.head_dim;
    for (r, orow) in out.chunks_mut(d).enumerate() {
        run_heads(a, first + r, 0, orow, p, isa);
    }
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// `rows_avx512`'s working copy of one head: its keys widened to f32 and transposed
    /// (`[head_dim, keys]`), its values widened (`[keys, head_dim]`) and one tile's scores
    /// (`[TILE_ROWS, keys]`), kept per thread and grown to the longest prompt seen: at most
    /// (2 x 128 + 8) x 2048 floats, about 2.1 MiB.
    static WIDE_KV: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Query rows per tile of `rows_avx512`: 8 rows x 32 keys of scores are 16 accumulators, and
/// each pair of key vectors loaded serves 16 FMAs.
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: usize = 8;

/// Whether `rows_avx512` serves heads of `head_dim` on `isa`.
#[cfg(target_arch = "x86_64")]
fn tiled_rows(isa: Isa, head_dim: usize) -> bool {
    matches!(isa, Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx) && matches!(head_dim, 64 | 128)
}

/// Output rows that several tasks write at once, each its own heads' columns.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct OutRows(*mut f32);
// SAFETY: tasks write disjoint (row, head) blocks, and the borrow of the rows outlives them.
#[cfg(target_arch = "x86_64")]
unsafe impl Send for OutRows {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for OutRows {}

/// `rows_avx512` for 64- or 128-wide heads.
///
/// # Safety
/// As `rows_avx512`; `tiled_rows(isa, a.head_dim)` holds for the detected `isa`.
#[cfg(target_arch = "x86_64")]
unsafe fn rows_tiled<K: KvElem>(
    a: &Attn<K>,
    first: usize,
    n_rows: usize,
    out: OutRows,
    heads: Range<usize>,
) {
    // SAFETY: the caller's contract.
    match a.head_dim {
        64 => unsafe { rows_avx512::<K, 4>(a, first, n_rows, out, heads) },
        _ => unsafe { rows_avx512::<K, 8>(a, first, n_rows, out, heads) },
    }
}

/// Several query rows (prefill), as small matrix products. For each head, its keys up to the
/// last row are widened to f32 and transposed 16 x 16 at a time into `[head_dim, keys]`, its
/// values widened into `[keys, head_dim]`; then tiles of 8 rows take their scores as outer
/// products (a broadcast query element times 32 keys of one transposed row, 16 accumulators,
/// no horizontal sums), their softmax row by row, and their outputs as outer products again
/// (a broadcast weight times a value row, `16 / C` rows x `C` vectors at a time). Why: row by
/// row, each score was a dot product with its own horizontal sum and each value row was
/// loaded once per query row; prefill attention took 9% of OPT-125m's batch-16 prefill on the
/// 2-core Zen 4 that way (94 of 1030 ms).
///
/// Writes rows `first..first + n_rows` of heads `heads`, row `first` at `out.0` and rows
/// `num_heads * head_dim` floats apart.
///
/// # Safety
/// AVX-512 F/BW/VL and FMA available; `head_dim == 16 * C`, C <= 8; `out.0` valid for the
/// rows, and no other thread touches those rows' columns of `heads` meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
unsafe fn rows_avx512<K: KvElem, const C: usize>(
    a: &Attn<K>,
    first: usize,
    n_rows: usize,
    out: OutRows,
    heads: Range<usize>,
) {
    let hd = a.head_dim;
    debug_assert_eq!(hd, 16 * C);
    if n_rows == 0 {
        return;
    }
    // Row i sees keys 0..=offset + i; the last row sees `keys`.
    let offset = a.kv_len - a.q_len;
    let keys = offset + first + n_rows;
    // Transposed rows padded to whole 32-key blocks (zeros past `keys`).
    let stride = keys.next_multiple_of(32);
    WIDE_KV.with(|buf| {
        let mut buf = buf.borrow_mut();
        let need = 2 * hd * stride + TILE_ROWS * stride;
        if buf.len() < need {
            buf.resize(need, 0.0);
        }
        let (kt, rest) = buf.split_at_mut(hd * stride);
        let (vf, sc) = rest.split_at_mut(stride * hd);
        for h in heads {
            // SAFETY: the caller's features; the buffers hold what the helper writes.
            unsafe { widen_head::<K, C>(a, h, keys, stride, kt, vf) };
            let mut r0 = 0;
            while r0 < n_rows {
                let rows = (n_rows - r0).min(TILE_ROWS);
                let tile = RowTile {
                    first: first + r0,
                    rows,
                    offset,
                    head: h,
                    stride,
                };
                let d = a.num_heads * hd;
                // SAFETY: as above; the tile's rows are among the caller's.
                unsafe { row_tile::<K, C>(a, &tile, kt, vf, sc, out.0.wrapping_add(r0 * d)) };
                r0 += rows;
            }
        }
    });
}

/// Where a tile of `rows_avx512` sits: query rows `first..first + rows` of head `head`, row i
/// seeing keys `0..=offset + i`, the transposed keys and the scores `stride` floats a row.
#[cfg(target_arch = "x86_64")]
struct RowTile {
    first: usize,
    rows: usize,
    offset: usize,
    head: usize,
    stride: usize,
}

/// Widens head `h`'s first `keys` keys into `kt` (`[hd, stride]`, transposed 16 x 16 in
/// registers, zeros from `keys` to `stride`) and its values into `vf` (`[keys, hd]`).
///
/// # Safety
/// AVX-512 F/BW/VL available; `hd == 16 * C`; `keys <= kv_len`; `kt` holds `hd * stride` and
/// `vf` `keys * hd` floats; `stride` a multiple of 16 and at least `keys`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
unsafe fn widen_head<K: KvElem, const C: usize>(
    a: &Attn<K>,
    h: usize,
    keys: usize,
    stride: usize,
    kt: &mut [f32],
    vf: &mut [f32],
) {
    use std::arch::x86_64::*;
    let hd = 16 * C;
    let d = a.num_heads * hd;
    // SAFETY (every load and store below): key rows j < keys <= kv_len of the cache, head h's
    // 16 C floats of each; kt rows of `stride` floats, vf rows of hd floats, as sized above.
    for j in 0..keys {
        for c in 0..C {
            unsafe {
                _mm512_storeu_ps(
                    vf.as_mut_ptr().add(j * hd + 16 * c),
                    K::load16(a.v.as_ptr().add(j * d + h * hd + 16 * c)),
                )
            };
        }
    }
    for jb in (0..stride).step_by(16) {
        for c in 0..C {
            let mut m = [_mm512_setzero_si512(); 16];
            for (l, row) in m.iter_mut().enumerate() {
                let j = jb + l;
                if j < keys {
                    *row = _mm512_castps_si512(unsafe {
                        K::load16(a.k.as_ptr().add(j * d + h * hd + 16 * c))
                    });
                }
            }
            super::linear::avx512::transpose16(&mut m);
            for (l, col) in m.iter().enumerate() {
                unsafe {
                    _mm512_storeu_ps(
                        kt.as_mut_ptr().add((16 * c + l) * stride + jb),
                        _mm512_castsi512_ps(*col),
                    )
                };
            }
        }
    }
}

/// One tile of `rows_avx512`: scores, softmax and weighted values of up to `TILE_ROWS` query
/// rows of one head, written from `out` (the tile's first row; rows `num_heads * head_dim`
/// floats apart).
///
/// # Safety
/// As `widen_head`, with `kt` and `vf` filled for at least the tile's last row's keys, `sc`
/// holding `TILE_ROWS * stride` floats, and the tile's rows of the head writable at `out` by
/// this thread alone.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
unsafe fn row_tile<K: KvElem, const C: usize>(
    a: &Attn<K>,
    t: &RowTile,
    kt: &[f32],
    vf: &[f32],
    sc: &mut [f32],
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let hd = 16 * C;
    let d = a.num_heads * hd;
    let stride = t.stride;
    // Keys the tile's last row sees, and that rounded up to whole 32-key blocks.
    let n_last = t.offset + t.first + t.rows;
    let n_blocks = n_last.next_multiple_of(32);
    // The tile's query rows of this head, contiguous; rows past the tile repeat its last row
    // (their results are dropped) so that every tile is full width.
    let mut qt = [0.0f32; TILE_ROWS * 128];
    for r in 0..TILE_ROWS {
        let i = t.first + r.min(t.rows - 1);
        let src = &a.q[i * d + t.head * hd..i * d + (t.head + 1) * hd];
        qt[r * hd..(r + 1) * hd].copy_from_slice(src);
    }
    // Scores: 8 rows x 32 keys per step of the head dimension.
    let (qp, kp, sp) = (qt.as_ptr(), kt.as_ptr(), sc.as_mut_ptr());
    let scale = _mm512_set1_ps(a.scale);
    for jb in (0..n_blocks).step_by(32) {
        let mut acc = [[_mm512_setzero_ps(); 2]; TILE_ROWS];
        for x in 0..hd {
            // SAFETY: transposed row x has `stride >= n_blocks` floats; qt holds 8 rows of hd.
            let (k0, k1) = unsafe {
                (
                    _mm512_loadu_ps(kp.add(x * stride + jb)),
                    _mm512_loadu_ps(kp.add(x * stride + jb + 16)),
                )
            };
            for (r, ar) in acc.iter_mut().enumerate() {
                let qv = _mm512_set1_ps(unsafe { *qp.add(r * hd + x) });
                ar[0] = _mm512_fmadd_ps(qv, k0, ar[0]);
                ar[1] = _mm512_fmadd_ps(qv, k1, ar[1]);
            }
        }
        for (r, ar) in acc.iter().enumerate() {
            // SAFETY: score rows of `stride >= n_blocks` floats, TILE_ROWS of them.
            unsafe {
                _mm512_storeu_ps(sp.add(r * stride + jb), _mm512_mul_ps(ar[0], scale));
                _mm512_storeu_ps(sp.add(r * stride + jb + 16), _mm512_mul_ps(ar[1], scale));
            }
        }
    }
    // Softmax row by row over the keys each row sees (masked keys -inf, later keys weight 0).
    let mut inv = [0.0f32; TILE_ROWS];
    for (r, inv_r) in inv.iter_mut().enumerate().take(t.rows) {
        let n = t.offset + t.first + r + 1;
        let row = &mut sc[r * stride..r * stride + n_blocks];
        for (p, &valid) in row[..n].iter_mut().zip(&a.key_valid[..n]) {
            if !valid {
                *p = f32::NEG_INFINITY;
            }
        }
        row[n..].fill(0.0);
        *inv_r = exp_from_max(&mut row[..n]).map_or(0.0, |(_, total)| 1.0 / total);
    }
    // Outputs: 16 / C rows x C vectors of accumulators per value row.
    let group = 16 / C;
    let vp = vf.as_ptr();
    let mut r0 = 0;
    while r0 < t.rows {
        let mut acc = [[_mm512_setzero_ps(); C]; 4];
        for j in 0..n_last {
            // SAFETY: value rows j < n_last <= keys, hd floats each.
            let v: [__m512; C] =
                std::array::from_fn(|c| unsafe { _mm512_loadu_ps(vp.add(j * hd + 16 * c)) });
            for (g, ag) in acc.iter_mut().enumerate().take(group) {
                // Rows past the tile read row r0's weights; their sums are dropped.
                let r = if r0 + g < t.rows { r0 + g } else { r0 };
                let w = _mm512_set1_ps(unsafe { *sp.add(r * stride + j) });
                for c in 0..C {
                    ag[c] = _mm512_fmadd_ps(w, v[c], ag[c]);
                }
            }
        }
        for (g, ag) in acc.iter().enumerate().take(group.min(t.rows - r0)) {
            let r = r0 + g;
            let f = _mm512_set1_ps(inv[r]);
            for (c, v) in ag.iter().enumerate() {
                // SAFETY: row r of the tile, hd floats at its head: this thread's (contract).
                unsafe {
                    _mm512_storeu_ps(out.add(r * d + t.head * hd + 16 * c), _mm512_mul_ps(*v, f))
                };
            }
        }
        r0 += group;
    }
}

/// One query row (decode) with its keys cut into [`key_parts`] contiguous ranges, run in
/// parallel: each part scores its keys for every head, takes a softmax relative to its own
/// maximum and sums its values; the parts are then merged by rescaling to the overall maximum
/// (as in flash-decoding's split-KV). Why: a part reads whole cache rows, one contiguous run
/// of memory per thread, which the hardware prefetchers follow; split by heads instead, each
/// thread reads part of every row and restarts the prefetchers at every one (measured on the
/// 2-core Zen 4: OPT-1.3B's 24 layers x 16 sequences at 145 keys, 95-110 us per call split by
/// heads, see docs/benchmarks.md).
fn split_keys<K: KvElem>(a: &Attn<K>, out: &mut [f32], scratch: &mut [f32], isa: Isa) {
    let (nh, hd) = (a.num_heads, a.head_dim);
    let d = nh * hd;
    let keys = a.kv_len;
    let parts = key_parts(keys);
    let per = keys.div_ceil(parts);
    let (scores, rest) = scratch.split_at_mut(parts * nh * per);
    let (partial, rest) = rest.split_at_mut(parts * d);
    let stats = &mut rest[..parts * 2 * nh];
    scores
        .par_chunks_mut(nh * per)
        .zip(partial.par_chunks_mut(d))
        .zip(stats.par_chunks_mut(2 * nh))
        .enumerate()
        .for_each(|(p, ((s, o), st))| {
            let range = p * per..((p + 1) * per).min(keys);
            run_part(a, range, s, o, st, isa);
        });
    // Merge: out_h = sum_p o_ph e^(m_ph - m_h) / sum_p l_ph e^(m_ph - m_h), m_h = max_p m_ph.
    for (h, oh) in out.chunks_exact_mut(hd).enumerate().take(nh) {
        let max = (0..parts).fold(f32::NEG_INFINITY, |m, p| m.max(stats[p * 2 * nh + 2 * h]));
        oh.fill(0.0);
        if max == f32::NEG_INFINITY {
            continue; // no valid key: zeros
        }
        let weight = |p: usize| exp_nonpositive(stats[p * 2 * nh + 2 * h] - max);
        let total: f32 = (0..parts)
            .map(|p| stats[p * 2 * nh + 2 * h + 1] * weight(p))
            .sum();
        for p in 0..parts {
            let f = weight(p) / total;
            if f != 0.0 {
                let src = &partial[p * d + h * hd..p * d + (h + 1) * hd];
                for (o, x) in oh.iter_mut().zip(src) {
                    *o += f * x;
                }
            }
        }
    }
}

// `run_part`: `part_body` on the best instruction set `isa` allows.
dispatched!(run_part, part_body, (keys: Range<usize>, s: &mut [f32], o: &mut [f32], st: &mut [f32]));

/// One part of [`split_keys`]: the single query row against keys `keys`, every head. Scores
/// go to `s` (`[num_heads, keys.len()]`), then become e^(score - part maximum); the unnormalised
/// weighted sum of values goes to `o` (`[num_heads * head_dim]`) and each head's maximum and sum
/// of weights to `st` (`[num_heads, 2]`; maximum -inf and sum 0 when none of the keys is valid).
#[inline(always)]
fn part_body<O: HeadOps, K: KvElem>(
    a: &Attn<K>,
    keys: Range<usize>,
    s: &mut [f32],
    o: &mut [f32],
    st: &mut [f32],
) {
    let (nh, hd) = (a.num_heads, a.head_dim);
    let d = nh * hd;
    let n = keys.len();
    let s = &mut s[..nh * n];
    let q = &a.q[..d];
    for (c, j) in keys.clone().enumerate() {
        let krow = &a.k[j * d..(j + 1) * d];
        for (h, (kh, qh)) in krow.chunks_exact(hd).zip(q.chunks_exact(hd)).enumerate() {
            s[h * n + c] = if a.key_valid[j] {
                // SAFETY: callers pick `O` for the CPU features they checked.
                unsafe { O::dot(qh, kh) * a.scale }
            } else {
                f32::NEG_INFINITY
            };
        }
    }
    for (sh, sth) in s.chunks_exact_mut(n).zip(st.chunks_exact_mut(2)) {
        let (max, total) = exp_from_max(sh).unwrap_or((f32::NEG_INFINITY, 0.0));
        sth.copy_from_slice(&[max, total]);
    }
    o.fill(0.0);
    for (c, j) in keys.enumerate() {
        add_weighted_row::<O, K>(o, &a.v[j * d..(j + 1) * d], hd, |h| s[h * n + c]);
    }
}

// `run_heads`: `heads_body` on the best instruction set `isa` allows.
dispatched!(run_heads, heads_body, (i: usize, h0: usize, out: &mut [f32], p: &mut [f32]));

/// Adds one cache row's values, head by head (`hd` wide), into `out` with head `h`'s weight
/// `weight(h)`, skipping zero weights (masked or underflowed keys): the value step of the
/// key-split and head-split schedules.
#[inline(always)]
fn add_weighted_row<O: HeadOps, K: KvElem>(
    out: &mut [f32],
    vrow: &[K],
    hd: usize,
    weight: impl Fn(usize) -> f32,
) {
    for (h, (oh, vh)) in out
        .chunks_exact_mut(hd)
        .zip(vrow.chunks_exact(hd))
        .enumerate()
    {
        let w = weight(h);
        if w != 0.0 {
            // SAFETY: callers pick `O` for the CPU features they checked.
            unsafe { O::axpy(w, vh, oh) };
        }
    }
}

/// The per-head vector operations: a score and a weighted value update over `head_dim` floats.
trait HeadOps {
    /// a · b, with `b` a cache row widened to f32.
    ///
    /// # Safety
    /// The implementation's CPU features are available.
    unsafe fn dot<K: KvElem>(a: &[f32], b: &[K]) -> f32;
    /// y += w * x.
    ///
    /// # Safety
    /// As `dot`.
    unsafe fn axpy<K: KvElem>(w: f32, x: &[K], y: &mut [f32]);
}

/// Plain Rust, any CPU.
struct Plain;

impl HeadOps for Plain {
    #[inline(always)]
    unsafe fn dot<K: KvElem>(a: &[f32], b: &[K]) -> f32 {
        dot(a, b)
    }
    #[inline(always)]
    unsafe fn axpy<K: KvElem>(w: f32, x: &[K], y: &mut [f32]) {
        for (o, v) in y.iter_mut().zip(x) {
            *o += w * v.widen();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! AVX-512 head operations: the compiler vectorises `dot`'s 16 lanes only 4 wide and
    //! without FMA, which made decode attention compute bound at ~3 GFLOP/s.
    use super::KvElem;
    use std::arch::x86_64::*;

    pub(super) struct Fma;

    impl super::HeadOps for Fma {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
        unsafe fn dot<K: KvElem>(a: &[f32], b: &[K]) -> f32 {
            let n = a.len().min(b.len());
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            // Two accumulators in registers (an array indexed by k spills to the stack).
            let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut k = 0;
            // SAFETY: every load reads k..k+16 <= n, or is masked to the n - k remaining floats.
            unsafe {
                while k + 32 <= n {
                    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(k)), K::load16(pb.add(k)), acc0);
                    acc1 = _mm512_fmadd_ps(
                        _mm512_loadu_ps(pa.add(k + 16)),
                        K::load16(pb.add(k + 16)),
                        acc1,
                    );
                    k += 32;
                }
                if k + 16 <= n {
                    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(k)), K::load16(pb.add(k)), acc0);
                    k += 16;
                }
                if k < n {
                    let m = ((1u32 << (n - k)) - 1) as __mmask16;
                    acc1 = _mm512_fmadd_ps(
                        _mm512_maskz_loadu_ps(m, pa.add(k)),
                        K::load_tail(pb.add(k), n - k),
                        acc1,
                    );
                }
            }
            _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
        unsafe fn axpy<K: KvElem>(w: f32, x: &[K], y: &mut [f32]) {
            let n = x.len().min(y.len());
            let (px, py) = (x.as_ptr(), y.as_mut_ptr());
            let wv = _mm512_set1_ps(w);
            let mut k = 0;
            // SAFETY: as in `dot`; the stores touch only y's first n floats.
            unsafe {
                while k + 16 <= n {
                    let r = _mm512_fmadd_ps(wv, K::load16(px.add(k)), _mm512_loadu_ps(py.add(k)));
                    _mm512_storeu_ps(py.add(k), r);
                    k += 16;
                }
                if k < n {
                    let m = ((1u32 << (n - k)) - 1) as __mmask16;
                    let r = _mm512_fmadd_ps(
                        wv,
                        K::load_tail(px.add(k), n - k),
                        _mm512_maskz_loadu_ps(m, py.add(k)),
                    );
                    _mm512_mask_storeu_ps(py.add(k), m, r);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2 head operations (8 lanes, FMA), for CPUs without AVX-512.
    use super::KvElem;
    use std::arch::x86_64::*;

    pub(super) struct Fma;

    impl super::HeadOps for Fma {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn dot<K: KvElem>(a: &[f32], b: &[K]) -> f32 {
            let n = a.len().min(b.len());
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut k = 0;
            // SAFETY: every load reads k..k+8 <= n; the tail is added one float at a time.
            unsafe {
                while k + 16 <= n {
                    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(k)), K::load8(pb.add(k)), acc0);
                    acc1 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(k + 8)),
                        K::load8(pb.add(k + 8)),
                        acc1,
                    );
                    k += 16;
                }
                if k + 8 <= n {
                    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(k)), K::load8(pb.add(k)), acc0);
                    k += 8;
                }
            }
            // SAFETY: this function's features include AVX2.
            let mut s = unsafe { super::super::linear::reduce_add_avx2(_mm256_add_ps(acc0, acc1)) };
            while k < n {
                s += a[k] * b[k].widen();
                k += 1;
            }
            s
        }

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn axpy<K: KvElem>(w: f32, x: &[K], y: &mut [f32]) {
            let n = x.len().min(y.len());
            let (px, py) = (x.as_ptr(), y.as_mut_ptr());
            let wv = _mm256_set1_ps(w);
            let mut k = 0;
            // SAFETY: as in `dot`; the stores touch only y's first n floats.
            unsafe {
                while k + 8 <= n {
                    let r = _mm256_fmadd_ps(wv, K::load8(px.add(k)), _mm256_loadu_ps(py.add(k)));
                    _mm256_storeu_ps(py.add(k), r);
                    k += 8;
                }
            }
            while k < n {
                y[k] += w * x[k].widen();
                k += 1;
            }
        }
    }
}

/// Query row `i`, heads `h0..` (as many as `out` holds, `head_dim` floats each): scores into
/// `p`, softmax over the valid causal keys, then the probability-weighted sum of values into
/// `out` (zeros when no key is valid).
///
/// When `p` has room for the scores of several heads, they are done together key by key, so
/// that each cache row is read as one contiguous run of those heads (one head alone reads
/// `head_dim` floats every `num_heads * head_dim`). Every score, softmax and sum is computed in
/// the same order either way, so the result does not depend on how many heads go together.
///
/// Masked keys get a score of -inf, which the exponential maps to exactly 0, so the softmax
/// loops run without branches and vectorise; the value loop skips zero weights.
#[inline(always)]
fn heads_body<O: HeadOps, K: KvElem>(
    a: &Attn<K>,
    i: usize,
    h0: usize,
    out: &mut [f32],
    p: &mut [f32],
) {
    let (hd, d) = (a.head_dim, a.num_heads * a.head_dim);
    let last = a.kv_len - a.q_len + i; // the newest key this query may see
    let keys = last + 1;
    let valid = &a.key_valid[..keys];
    let together = (p.len() / keys).max(1);
    for (c, oc) in out.chunks_mut(together * hd).enumerate() {
        let hc = h0 + c * together; // first head of this chunk
        let n = oc.len() / hd;
        let p = &mut p[..n * keys];
        let q = &a.q[i * d + hc * hd..i * d + (hc + n) * hd];
        // Scores, key-major: p[h * keys + j].
        for j in 0..keys {
            let krow = &a.k[j * d + hc * hd..j * d + (hc + n) * hd];
            for (h, (kh, qh)) in krow.chunks_exact(hd).zip(q.chunks_exact(hd)).enumerate() {
                p[h * keys + j] = if valid[j] {
                    // SAFETY: callers pick `O` for the CPU features they checked.
                    unsafe { O::dot(qh, kh) * a.scale }
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
        // Softmax per head; a head with no valid key gets weights 0 (output zeros).
        for ph in p.chunks_exact_mut(keys) {
            if let Some((_, total)) = exp_from_max(ph) {
                let inv = 1.0 / total;
                for pj in ph.iter_mut() {
                    *pj *= inv;
                }
            }
        }
        oc.fill(0.0);
        // Weighted values, key-major as well.
        for j in 0..keys {
            let vrow = &a.v[j * d + hc * hd..j * d + (hc + n) * hd];
            add_weighted_row::<O, K>(oc, vrow, hd, |h| p[h * keys + j]);
        }
    }
}

/// Replaces scores by e^(score - max) and returns (max, sum of those), the unnormalised
/// softmax every schedule takes; `None`, with the scores set to 0, when every score is -inf
/// (no valid key). The exponential maps masked keys (-inf) to exactly 0.
#[inline(always)]
fn exp_from_max(p: &mut [f32]) -> Option<(f32, f32)> {
    let max = lane_max(p);
    if max == f32::NEG_INFINITY {
        p.fill(0.0);
        return None;
    }
    for x in p.iter_mut() {
        *x = exp_nonpositive(*x - max);
    }
    Some((max, sum(p)))
}

/// The largest of `x` (-inf when empty) in 16 independent lanes: `f32::max` in one chain is a
/// scalar compare per element that does not vectorise (its NaN rule), which made the maximum
/// about a tenth of prefill attention. Scores are never NaN, and the maximum of a set is the
/// same whatever the order.
#[inline(always)]
fn lane_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l = if *v > *l { *v } else { *l };
        }
    }
    let tail = chunks.remainder().iter();
    lanes
        .into_iter()
        .chain(tail.copied())
        .fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m })
}

/// e^x for x <= 0 (and -inf, giving 0), about 2e-7 relative error, in plain arithmetic so that
/// loops calling it vectorise (libm's `exp` does not).
///
/// x = n ln 2 + r with integer n and |r| <= ln 2 / 2 (Cody-Waite: ln 2 split in two parts so
/// that r is exact enough), e^r by its Taylor series to degree 6 (truncation error below 2e-7),
/// and 2^n built in the exponent bits.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_145_75; // few mantissa bits, so n * LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    let clamped = x.max(-87.0);
    let shifted = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = (clamped - n * LN2_HI) - n * LN2_LO;
    let poly = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        poly * scale
    }
}

/// Sum with 16 independent partial sums, folded as a tree.
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    super::lane_sum(x, |v| v)
}

/// Dot product with 16 independent partial sums (one vector register under AVX-512), folded
/// as a tree rather than added lane by lane.
#[inline(always)]
fn dot<K: KvElem>(a: &[f32], b: &[K]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut ac = a.chunks_exact(16);
    let mut bc = b.chunks_exact(16);
    for (x, y) in (&mut ac).zip(&mut bc) {
        for l in 0..16 {
            lanes[l] += x[l] * y[l].widen();
        }
    }
    let mut s = super::fold16(lanes);
    for (x, y) in ac.remainder().iter().zip(bc.remainder()) {
        s += x * y.widen();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_nonpositive_is_accurate_and_exact_at_the_ends() {
        assert_eq!(super::exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp_nonpositive(-100.0), 0.0);
        assert!((super::exp_nonpositive(0.0) - 1.0).abs() < 1e-7);
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = super::exp_nonpositive(x) as f64;
            assert!(
                (got - want).abs() <= 3e-7 * want,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
    }
}
