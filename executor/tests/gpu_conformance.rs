//! GPU conformance: the CPU kernels' test cases (primitives/src/kernels/tests.rs) run through the
//! CUDA backend and compared with the CPU backend; the [`Device`] operations run on
//! [`CudaDevice`] and on [`SimDevice`] (the reference semantics) and compared; and the block
//! schedule's GPU tiers (resident weights, the HeteGen split, device KV cache) run on the GPU,
//! through the library and through `executor --device cuda`, giving the CPU run's tokens.
//!
//! Runs wherever a GPU, its driver, cuBLAS and NVRTC are present; elsewhere each test prints
//! "SKIPPED (no GPU): <reason>" and passes, so `cargo test` stays green on the GPU-less CI box and
//! the skip is visible with `--nocapture`. `scripts/gpu-check.sh` runs this file on a GPU machine.
//!
//! Tolerances: both sides accumulate in f32 but in different orders (cuBLAS tiles, block
//! reductions), so results agree to a few f32 ulps times the square root of the reduction length,
//! not bit for bit.

mod common;

use executor::backend::{Backend, CpuBackend};
use executor::cuda::{self, CudaBackend, CudaDevice};
use executor::device::{Device, DeviceBuf, DeviceError, DeviceMatrix};
use executor::kernels::OwnedWeights as Owned;
use executor::sim::SimDevice;
use executor::weights::ElementType;
use half::{bf16, f16};
use std::sync::OnceLock;

/// One backend for the whole file (opening a context and loading modules costs ~0.1-1 s); the
/// backend serialises its own calls.
fn gpu(test: &str) -> Option<&'static CudaBackend> {
    static GPU: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    match GPU.get_or_init(|| CudaBackend::new(0).map_err(|e| e.to_string())) {
        Ok(b) => Some(b),
        Err(reason) => {
            eprintln!("SKIPPED (no GPU): {test}: {reason}");
            None
        }
    }
}

/// Deterministic xorshift, the same generator as the CPU kernel tests.
struct Rng(u64);
impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_f32()).collect()
    }
}

/// Owned weights in one dtype (0 = f32, 1 = f16, 2 = bf16).
fn owned(kind: usize, w: &[f32]) -> Owned {
    match kind {
        0 => Owned::F32(w.to_vec().into()),
        1 => Owned::F16(w.iter().map(|v| f16::from_f32(*v)).collect()),
        _ => Owned::Bf16(w.iter().map(|v| bf16::from_f32(*v)).collect()),
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: [{i}] gpu {g} vs cpu {w} (tol {tol})"
        );
    }
}

fn check_linear(
    gpu: &CudaBackend,
    kind: usize,
    tokens: usize,
    n_in: usize,
    n_out: usize,
    bias: bool,
    seed: u64,
) {
    let mut rng = Rng(seed);
    let x = rng.vec(tokens * n_in);
    let w = owned(kind, &rng.vec(n_out * n_in));
    let b = rng.vec(n_out);
    let b = bias.then_some(&b[..]);
    let m = w.matrix(n_out, n_in);
    let mut want = vec![f32::NAN; tokens * n_out];
    CpuBackend.linear(&x, tokens, &m, b, &mut want);
    let mut got = vec![f32::NAN; tokens * n_out];
    gpu.linear(&x, tokens, &m, b, &mut got);
    let tol = 1e-5 * (n_in as f32).sqrt().max(1.0) * 8.0;
    assert_close(
        &format!("linear dtype {kind} tokens {tokens} in {n_in} out {n_out}"),
        &got,
        &want,
        tol,
    );
}

#[test]
fn linear_matches_cpu_on_every_dtype_and_odd_shape() {
    let Some(g) = gpu("linear_matches_cpu_on_every_dtype_and_odd_shape") else {
        return;
    };
    let shapes = [
        (1, 1, 1),
        (1, 17, 5),
        (1, 33, 7),
        (2, 31, 9),
        (3, 64, 4),
        (5, 100, 13),
        (6, 47, 8),
        (7, 129, 11),
        (13, 250, 70),
        (16, 768, 67),
        (20, 2100, 9),
        (30, 1031, 261),
    ];
    for kind in 0..3 {
        for (n, &(tokens, n_in, n_out)) in shapes.iter().enumerate() {
            check_linear(g, kind, tokens, n_in, n_out, n % 2 == 0, 7 + n as u64);
        }
    }
}

#[test]
fn linear_decode_shape_and_buffer_reuse() {
    let Some(g) = gpu("linear_decode_shape_and_buffer_reuse") else {
        return;
    };
    // Large, then small, then large again: grow-only buffers must not leak stale data.
    for kind in 0..3 {
        check_linear(g, kind, 1, 768, 3 * 768 + 5, true, 99);
        check_linear(g, kind, 3, 19, 23, false, 5);
        check_linear(g, kind, 1, 768, 3 * 768 + 5, false, 98);
    }
}

#[test]
fn linear_degenerate_sizes() {
    let Some(g) = gpu("linear_degenerate_sizes") else {
        return;
    };
    let w = owned(0, &[]);
    let mut y = vec![1.0; 6];
    g.linear(&[], 2, &w.matrix(3, 0), Some(&[1.0, 2.0, 3.0]), &mut y);
    assert_eq!(y, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    let mut y: Vec<f32> = vec![];
    g.linear(&[], 0, &owned(0, &[0.5; 6]).matrix(2, 3), None, &mut y);
}

#[test]
fn linear_rejects_wrong_input_length_as_an_error() {
    let Some(g) = gpu("linear_rejects_wrong_input_length_as_an_error") else {
        return;
    };
    let w = owned(0, &[0.0; 6]);
    let r = g.try_linear(&[0.0; 4], 1, &w.matrix(2, 3), None, &mut [0.0; 2]);
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("linear: x must be"), "{msg}");
}

#[test]
fn layer_norm_relu_scale_add_match_cpu() {
    let Some(g) = gpu("layer_norm_relu_scale_add_match_cpu") else {
        return;
    };
    let mut rng = Rng(3);
    for &(rows, width) in &[(1, 1), (3, 17), (2, 768), (70, 1000), (1, 5000)] {
        let x = rng.vec(rows * width);
        let gamma = rng.vec(width);
        let beta = rng.vec(width);
        let mut want = vec![0.0; rows * width];
        CpuBackend.layer_norm(&x, width, &gamma, &beta, 1e-5, &mut want);
        let mut got = vec![f32::NAN; rows * width];
        g.layer_norm(&x, width, &gamma, &beta, 1e-5, &mut got);
        assert_close(&format!("layer_norm {rows}x{width}"), &got, &want, 1e-4);
    }
    let mut a = vec![-1.0, 0.0, 2.5, -0.0, f32::MIN, f32::NAN];
    g.relu_inplace(&mut a);
    assert_eq!(a, [0.0, 0.0, 2.5, 0.0, 0.0, 0.0]);
    let mut acc = vec![1.0, 2.0, 3.0];
    g.add_inplace(&mut acc, &[0.5, -2.0, 1.0]);
    assert_eq!(acc, [1.5, 0.0, 4.0]);
    // Larger than one block of threads, compared exactly: these are single roundings.
    let x = rng.vec(100_003);
    let (mut c, mut d) = (x.clone(), x.clone());
    CpuBackend.scale_inplace(&mut c, 0.125);
    g.scale_inplace(&mut d, 0.125);
    assert_eq!(c, d);
    let (mut c, mut d) = (x.clone(), x.clone());
    CpuBackend.relu_inplace(&mut c);
    g.relu_inplace(&mut d);
    assert_eq!(c, d);
    let y = rng.vec(100_003);
    let (mut c, mut d) = (x.clone(), x);
    CpuBackend.add_inplace(&mut c, &y);
    g.add_inplace(&mut d, &y);
    assert_eq!(c, d);
}

#[allow(clippy::too_many_arguments)]
fn check_attention(
    g: &CudaBackend,
    q_len: usize,
    kv_len: usize,
    nh: usize,
    hd: usize,
    valid: &[bool],
    seed: u64,
) {
    let mut rng = Rng(seed);
    let d = nh * hd;
    let q = rng.vec(q_len * d);
    let k = rng.vec(kv_len * d);
    let v = rng.vec(kv_len * d);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut want = vec![f32::NAN; q_len * d];
    let mut scratch = vec![0.0; kv_len.max(1) * 4];
    CpuBackend.attention(
        &q,
        q_len,
        k[..].into(),
        v[..].into(),
        kv_len,
        valid,
        nh,
        hd,
        scale,
        &mut want,
        &mut scratch,
    );
    let mut got = vec![f32::NAN; q_len * d];
    g.attention(
        &q,
        q_len,
        k[..].into(),
        v[..].into(),
        kv_len,
        valid,
        nh,
        hd,
        scale,
        &mut got,
        &mut scratch,
    );
    assert_close(
        &format!("attention q_len {q_len} kv {kv_len} heads {nh}x{hd}"),
        &got,
        &want,
        2e-5,
    );
}

#[test]
fn attention_decode_prefill_and_masking() {
    let Some(g) = gpu("attention_decode_prefill_and_masking") else {
        return;
    };
    let all = vec![true; 3000];
    check_attention(g, 1, 37, 3, 20, &all, 1);
    check_attention(g, 1, 1, 2, 64, &all, 2);
    check_attention(g, 9, 9, 2, 17, &all, 3);
    check_attention(g, 40, 40, 4, 33, &all, 4);
    check_attention(g, 5, 12, 2, 16, &all, 5);
    let mut padded = vec![true; 20];
    padded[..4].fill(false);
    check_attention(g, 20, 20, 2, 8, &padded, 6);
    check_attention(g, 1, 20, 2, 8, &padded, 7);
    let holes: Vec<bool> = (0..30).map(|j| j % 3 != 1).collect();
    check_attention(g, 6, 30, 3, 5, &holes, 8);
    // OPT-sized heads and a cache longer than a thread block.
    check_attention(g, 1, 2049, 12, 64, &all, 10);
    check_attention(g, 64, 600, 4, 128, &all, 11);
}

#[test]
fn attention_rows_without_valid_keys_are_zero() {
    let Some(g) = gpu("attention_rows_without_valid_keys_are_zero") else {
        return;
    };
    let none = vec![false; 8];
    check_attention(g, 3, 8, 2, 4, &none, 9);
    let mut out = vec![f32::NAN; 2 * 4];
    let mut scratch = vec![0.0; 8];
    g.attention(
        &[1.0; 8],
        1,
        [1.0; 64][..].into(),
        [1.0; 64][..].into(),
        8,
        &none,
        2,
        4,
        0.5,
        &mut out,
        &mut scratch,
    );
    assert!(out.iter().all(|v| *v == 0.0));
    let late: Vec<bool> = (0..6).map(|j| j >= 3).collect();
    let mut out = vec![f32::NAN; 6 * 2];
    let mut scratch = vec![0.0; 6];
    g.attention(
        &[0.3; 12],
        6,
        [0.2; 12][..].into(),
        [0.7; 12][..].into(),
        6,
        &late,
        1,
        2,
        1.0,
        &mut out,
        &mut scratch,
    );
    assert!(out[..3 * 2].iter().all(|v| *v == 0.0));
    assert!(out[3 * 2..].iter().all(|v| (*v - 0.7).abs() < 1e-6));
}

#[test]
fn embedding_gather_matches_the_table() {
    let Some(g) = gpu("embedding_gather_matches_the_table") else {
        return;
    };
    let mut rng = Rng(12);
    let (vocab, width) = (50, 33);
    let table = rng.vec(vocab * width);
    let ids = [0u32, 49, 7, 7, 13];
    for kind in 0..3 {
        let owned = owned(kind, &table);
        let m = owned.matrix(vocab, width);
        let mut out = vec![f32::NAN; ids.len() * width];
        g.try_embedding(&ids, &m, &mut out).unwrap();
        for (t, id) in ids.iter().enumerate() {
            for c in 0..width {
                let want = match &owned {
                    Owned::F32(d) => d[*id as usize * width + c],
                    Owned::F16(d) => d[*id as usize * width + c].to_f32(),
                    Owned::Bf16(d) => d[*id as usize * width + c].to_f32(),
                    Owned::Bf16Panels(_) => unreachable!("the tests make nn.Linear layouts"),
                };
                assert_eq!(out[t * width + c], want, "dtype {kind} token {t} col {c}");
            }
        }
    }
    let m = owned(0, &table);
    let err = g
        .try_embedding(&[50], &m.matrix(vocab, width), &mut vec![0.0; width])
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

#[test]
fn device_memory_is_reported() {
    let Some(g) = gpu("device_memory_is_reported") else {
        return;
    };
    let m = g.memory().unwrap();
    eprintln!(
        "{} ; memory via {}: {} free of {}",
        g.info(),
        m.source,
        m.free,
        m.total
    );
    assert!(m.total > 0 && m.free <= m.total);
}

/// Runs on every machine: without a GPU the probe and the refusal path must return errors that
/// say what is missing, not panic.
#[test]
fn without_a_gpu_everything_is_an_error_not_a_panic() {
    match cuda::probe() {
        Ok(info) => eprintln!("GPU present: {info}"),
        Err(e) => {
            let msg = e.to_string();
            eprintln!("no GPU here: {msg}");
            assert!(
                msg.contains("libcuda") || msg.contains("driver") || msg.contains("missing"),
                "{msg}"
            );
            assert!(CudaBackend::new(0).is_err());
            let mut p = planner::policy::Policy::all_cpu("opt-125m", 8, 4, 1);
            p.placement.kv_cache = planner::policy::Placement::ALL_GPU;
            let refusal = cuda::require_gpu_for(&p).unwrap_err().to_string();
            assert!(
                refusal.contains("100% of the KV cache on the GPU"),
                "{refusal}"
            );
            assert!(
                refusal.contains("profiles/cpu-2core-24gib.toml"),
                "{refusal}"
            );
        }
    }
}

/// Median wall time of `f` over 5 runs after one warm-up, in milliseconds.
fn time_ms(mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..5)
        .map(|_| {
            let start = std::time::Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[2]
}

/// Per-operation CPU vs CUDA backend times at OPT-1.3B shapes (h = 2048, 32 heads), printed as
/// a table. Ignored by default (it measures, it does not check); `scripts/gpu-check.sh` runs it
/// with `--ignored`. GPU times include the PCIe copies every trait call makes for now.
#[test]
#[ignore]
fn throughput_table() {
    let Some(g) = gpu("throughput_table") else {
        return;
    };
    let mut rng = Rng(42);
    let h = 2048;
    println!("| op | shape | cpu ms | cuda ms (incl. copies) | cpu/cuda |");
    println!("|---|---|---|---|---|");
    let row = |op: &str, shape: String, cpu: f64, gpu: f64| {
        println!(
            "| {op} | {shape} | {cpu:.3} | {gpu:.3} | {:.2}x |",
            cpu / gpu
        );
    };
    for (kind, name) in [(0, "f32"), (1, "f16"), (2, "bf16")] {
        for &(tokens, n_in, n_out) in &[(1, h, h), (32, h, 4 * h), (512, h, h)] {
            let x = rng.vec(tokens * n_in);
            let w = owned(kind, &rng.vec(n_out * n_in));
            let m = w.matrix(n_out, n_in);
            let b = rng.vec(n_out);
            let mut y = vec![0.0; tokens * n_out];
            let cpu = time_ms(|| CpuBackend.linear(&x, tokens, &m, Some(&b), &mut y));
            let gpu = time_ms(|| g.linear(&x, tokens, &m, Some(&b), &mut y));
            row(
                "linear",
                format!("{tokens}x{n_in}x{n_out} {name}"),
                cpu,
                gpu,
            );
        }
    }
    for &(q_len, kv_len) in &[(1, 512), (1, 2048), (512, 512)] {
        let (nh, hd) = (32, 64);
        let d = nh * hd;
        let q = rng.vec(q_len * d);
        let k = rng.vec(kv_len * d);
        let v = rng.vec(kv_len * d);
        let valid = vec![true; kv_len];
        let mut out = vec![0.0; q_len * d];
        let mut scratch = vec![0.0; executor::backend::attention_scratch_len(kv_len, nh, hd)];
        let s = 1.0 / (hd as f32).sqrt();
        let cpu = time_ms(|| {
            CpuBackend.attention(
                &q,
                q_len,
                k[..].into(),
                v[..].into(),
                kv_len,
                &valid,
                nh,
                hd,
                s,
                &mut out,
                &mut scratch,
            )
        });
        let gpu = time_ms(|| {
            g.attention(
                &q,
                q_len,
                k[..].into(),
                v[..].into(),
                kv_len,
                &valid,
                nh,
                hd,
                s,
                &mut out,
                &mut scratch,
            )
        });
        row(
            "attention",
            format!("q {q_len} kv {kv_len} 32x64"),
            cpu,
            gpu,
        );
    }
    let x = rng.vec(512 * h);
    let (gamma, beta) = (rng.vec(h), rng.vec(h));
    let mut y = vec![0.0; 512 * h];
    let cpu = time_ms(|| CpuBackend.layer_norm(&x, h, &gamma, &beta, 1e-5, &mut y));
    let gpu = time_ms(|| g.layer_norm(&x, h, &gamma, &beta, 1e-5, &mut y));
    row("layer_norm", format!("512x{h}"), cpu, gpu);
}

/// One CUDA device for the comparison tests (its default capacity: free memory less the
/// reserve); the device serialises its own calls.
fn cuda_device(test: &str) -> Option<&'static CudaDevice> {
    static DEV: OnceLock<Result<CudaDevice, String>> = OnceLock::new();
    match DEV.get_or_init(|| CudaDevice::new(None).map_err(|e| e.to_string())) {
        Ok(d) => Some(d),
        Err(reason) => {
            eprintln!("SKIPPED (no GPU): {test}: {reason}");
            None
        }
    }
}

fn dtype_of(w: &Owned) -> ElementType {
    match w {
        Owned::F32(_) => ElementType::F32,
        Owned::F16(_) => ElementType::F16,
        Owned::Bf16(_) => ElementType::Bf16,
        Owned::Bf16Panels(_) => unreachable!("the tests make nn.Linear layouts"),
    }
}

fn upload_f32(dev: &dyn Device, v: &[f32], what: &str) -> DeviceBuf {
    let b = dev.alloc(v.len() * 4, what).unwrap();
    dev.upload(&b, 0, bytemuck::cast_slice(v)).unwrap();
    b
}

fn download_f32(dev: &dyn Device, b: &DeviceBuf, n: usize) -> Vec<f32> {
    let mut v = vec![f32::NAN; n];
    dev.download(b, 0, bytemuck::cast_slice_mut(&mut v))
        .unwrap();
    v
}

/// A split layer as the GPU tiers run it, on `dev`: W (dtype `kind`) uploaded after `pad` rows
/// of padding, its bias after `pad` floats; rows `split..out` on the device at those offsets,
/// rows `0..split` on the host (CPU kernels), uploaded, and the halves joined on the device.
/// Returns the joined output as the host reads it back.
fn split_linear_on(
    dev: &dyn Device,
    kind: usize,
    (rows, inp, out, split): (usize, usize, usize, usize),
    seed: u64,
) -> Vec<f32> {
    let (pad, mut rng) = (3, Rng(seed));
    let x = rng.vec(rows * inp);
    let w = owned(kind, &rng.vec((pad + out) * inp));
    let bias = rng.vec(pad + out);
    let es = dtype_of(&w).size();
    let xb = upload_f32(dev, &x, "x");
    let wb = dev.alloc(w.as_bytes().len(), "w").unwrap();
    dev.upload(&wb, 0, w.as_bytes()).unwrap();
    let bb = upload_f32(dev, &bias, "bias");
    let dev_rows = out - split;
    let yd = dev.alloc(rows * dev_rows * 4, "y_dev").unwrap();
    let dm = DeviceMatrix {
        buf: &wb,
        offset: (pad + split) * inp * es,
        dtype: dtype_of(&w),
        out_features: dev_rows,
        in_features: inp,
        bias: Some((&bb, (pad + split) * 4)),
    };
    dev.linear(&xb, rows, &dm, &yd).unwrap();
    // The host half, with the CPU kernels, over rows pad..pad+split of the same matrix.
    let host_w = owned(kind, &{
        let all = match &w {
            Owned::F32(d) => d.clone(),
            Owned::F16(d) => d.iter().map(|v| v.to_f32()).collect(),
            Owned::Bf16(d) => d.iter().map(|v| v.to_f32()).collect(),
            Owned::Bf16Panels(_) => unreachable!("the tests make nn.Linear layouts"),
        };
        all[pad * inp..(pad + split) * inp].to_vec()
    });
    let mut host = vec![0.0; rows * split];
    CpuBackend.linear(
        &x,
        rows,
        &host_w.matrix(split, inp),
        Some(&bias[pad..pad + split]),
        &mut host,
    );
    let yh = upload_f32(dev, &host, "y_host");
    let y = dev.alloc(rows * out * 4, "y").unwrap();
    dev.join_columns(&yh, split, &yd, dev_rows, rows, &y)
        .unwrap();
    let got = download_f32(dev, &y, rows * out);
    for b in [xb, wb, bb, yd, yh, y] {
        dev.free(b);
    }
    got
}

#[test]
fn device_linear_and_join_match_the_sim_device() {
    let Some(gpu) = cuda_device("device_linear_and_join_match_the_sim_device") else {
        return;
    };
    let sim = SimDevice::new(1 << 30);
    // (rows, in, out, host rows)
    let shapes = [
        (1, 1, 1, 0),
        (1, 17, 5, 2),
        (3, 64, 4, 4),
        (5, 100, 13, 0),
        (7, 129, 11, 6),
        (16, 768, 67, 20),
        (30, 1031, 261, 100),
        (2, 40, 9000, 1),
        // f16 weights are widened 8M elements at a time: 1677 rows of 5000, so two chunks.
        (2, 5000, 1700, 3),
    ];
    for kind in 0..3 {
        for (n, &shape) in shapes.iter().enumerate() {
            let seed = 11 + n as u64;
            let before = (gpu.transfers(), sim.transfers());
            let want = split_linear_on(&sim, kind, shape, seed);
            let got = split_linear_on(gpu, kind, shape, seed);
            let tol = 1e-5 * (shape.1 as f32).sqrt().max(1.0) * 8.0;
            assert_close(
                &format!("split linear dtype {kind} shape {shape:?}"),
                &got,
                &want,
                tol,
            );
            // The same copies, counted the same way.
            assert_eq!(
                gpu.transfers().since(&before.0),
                sim.transfers().since(&before.1),
                "copies of dtype {kind} shape {shape:?}"
            );
        }
    }
    assert_eq!(gpu.used_bytes(), 0, "every buffer freed");
}

/// Attention on `dev` with the KV rows after `pad` rows of other data (kv_offset), a mask with
/// padding at the front and a hole.
fn attention_on(
    dev: &dyn Device,
    (q_len, kv_len, heads, head_dim): (usize, usize, usize, usize),
    seed: u64,
) -> Vec<f32> {
    let (pad, d, mut rng) = (2, heads * head_dim, Rng(seed));
    let q = rng.vec(q_len * d);
    let k = rng.vec((pad + kv_len) * d);
    let v = rng.vec((pad + kv_len) * d);
    let valid: Vec<bool> = (0..kv_len).map(|j| j >= 1 && j % 7 != 3).collect();
    let (qb, kb, vb) = (
        upload_f32(dev, &q, "q"),
        upload_f32(dev, &k, "k"),
        upload_f32(dev, &v, "v"),
    );
    let ob = dev.alloc(q_len * d * 4, "out").unwrap();
    dev.attention(
        &qb,
        q_len,
        &kb,
        &vb,
        pad * d * 4,
        kv_len,
        &valid,
        heads,
        head_dim,
        &ob,
    )
    .unwrap();
    let got = download_f32(dev, &ob, q_len * d);
    for b in [qb, kb, vb, ob] {
        dev.free(b);
    }
    got
}

#[test]
fn device_attention_matches_the_sim_device() {
    let Some(gpu) = cuda_device("device_attention_matches_the_sim_device") else {
        return;
    };
    let sim = SimDevice::new(1 << 30);
    for (n, &shape) in [
        (1, 1, 1, 8),
        (1, 37, 3, 20),
        (5, 12, 2, 16),
        (9, 9, 2, 17),
        (1, 600, 4, 64),
        (16, 300, 12, 64),
    ]
    .iter()
    .enumerate()
    {
        let want = attention_on(&sim, shape, 100 + n as u64);
        let got = attention_on(gpu, shape, 100 + n as u64);
        assert_close(&format!("attention {shape:?}"), &got, &want, 2e-5);
    }
}

#[test]
fn device_limits_and_bad_calls_are_errors() {
    let Some(_) = cuda_device("device_limits_and_bad_calls_are_errors") else {
        return;
    };
    let dev = CudaDevice::new(Some(1 << 20)).unwrap();
    assert_eq!(dev.capacity_bytes(), 1 << 20);
    let a = dev.alloc(600 << 10, "first").unwrap();
    match dev.alloc(500 << 10, "second buffer") {
        Err(e @ DeviceError::OutOfMemory { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("second buffer") && msg.contains(&format!("{}", 600 << 10)),
                "{msg}"
            );
        }
        other => panic!("expected out of memory, got {other:?}"),
    }
    // Zeroed on allocation, copies checked and counted.
    let mut back = [1u8; 16];
    dev.download(&a, 100, &mut back).unwrap();
    assert_eq!(back, [0; 16]);
    dev.upload(&a, 4, &[1, 2, 3, 4]).unwrap();
    let mut back = [0u8; 8];
    dev.download(&a, 0, &mut back).unwrap();
    assert_eq!(back, [0, 0, 0, 0, 1, 2, 3, 4]);
    assert!(dev.upload(&a, (600 << 10) - 2, &[0; 4]).is_err());
    assert!(dev
        .download(&a, 0, &mut vec![0u8; (600 << 10) + 1])
        .is_err());
    let t = dev.transfers();
    assert_eq!((t.h2d_calls, t.d2h_calls, t.h2d_bytes), (1, 2, 4));
    // An output that is also an input, and a misaligned f32 offset, are refused.
    let dm = DeviceMatrix {
        buf: &a,
        offset: 0,
        dtype: ElementType::F32,
        out_features: 2,
        in_features: 2,
        bias: None,
    };
    assert!(dev.linear(&a, 1, &dm, &a).is_err());
    let y = dev.alloc(64, "y").unwrap();
    let odd = DeviceMatrix { offset: 2, ..dm };
    assert!(dev.linear(&a, 1, &odd, &y).is_err());
    // A copy larger than a staging buffer goes through in chunks.
    dev.free(a);
    dev.free(y);
    assert_eq!(dev.used_bytes(), 0);
    let big_dev = CudaDevice::new(Some(200 << 20)).unwrap();
    let n = executor::cuda::device::STAGING_BYTES * 2 + 12345;
    let big = big_dev.alloc(n + 8, "big").unwrap();
    let data: Vec<u8> = (0..n).map(|i| (i * 7 + i / 4099) as u8).collect();
    big_dev.upload(&big, 8, &data).unwrap();
    let mut back = vec![0u8; n];
    big_dev.download(&big, 8, &mut back).unwrap();
    assert!(back == data, "a chunked upload and download round trip");
    big_dev.free(big);
    // Beyond the GPU's free memory: refused when opening, with the numbers.
    let e = CudaDevice::new(Some(u64::MAX / 2)).unwrap_err().to_string();
    assert!(e.contains("free"), "{e}");
}

/// The GPU tiers of the block schedule on the GPU: a split policy with resident weights and
/// the KV cache on the device gives the tokens of the all-CPU run on every fixture (f32 and f16
/// checkpoints, pre- and post-LN).
#[test]
fn block_schedule_on_the_gpu_gives_the_cpu_tokens() {
    use executor::gpu_tier::{GpuPlan, Rates};
    use executor::run::{self, ModelSource};
    use executor::schedule::{generate_blocks_on, BlockPlan};
    let Some(gpu) = cuda_device("block_schedule_on_the_gpu_gives_the_cpu_tokens") else {
        return;
    };
    for name in ["opt-tiny-preln", "opt-tiny-postln", "opt-tiny-preln-f16"] {
        let src = ModelSource::Checkpoint(common::fixture(name));
        let loaded = run::load(&src, false).unwrap();
        let want = executor::generate::generate(
            &loaded.model,
            &CpuBackend,
            &common::block_prompts(),
            &common::greedy(5),
        )
        .unwrap();
        for (alpha, weights_gpu, manager) in
            [(0.3, 0.5, false), (0.0, 0.0, false), (0.5, 0.2, true)]
        {
            let parent = tempfile::tempdir().unwrap();
            let plan = BlockPlan {
                gpu_batch_size: 2,
                num_gpu_batches: 2,
                weights_disk: 0.0,
                kv_cache_disk: 0.0,
                activations_disk: 0.0,
                cpu_attention: false,
                offload_parent: parent.path().to_path_buf(),
                offload_capacity_limit: None,
                compress_kv: false,
            };
            let gplan = GpuPlan {
                weights: weights_gpu,
                kv_cache: 1.0,
                activations: 0.5,
                kv_cache_cpu: 0.0,
                activations_cpu: 0.5,
                split: planner::policy::Split::uniform(alpha),
                param_manager: manager,
                rates: Rates {
                    cpu_bytes_per_s: 16e9,
                    h2d_bytes_per_s: 12e9,
                    disk_bytes_per_s: 1e9,
                },
            };
            let loaded = run::load_placed(&src, false, 0.0).unwrap();
            let (got, _) = generate_blocks_on(
                &loaded.model,
                &CpuBackend,
                &common::block_prompts(),
                &common::greedy(5),
                &plan,
                &loaded.weights,
                Some((gpu as &dyn Device, &gplan)),
            )
            .unwrap();
            let label = format!("{name} alpha {alpha} weights {weights_gpu} manager {manager}");
            // GPU sums in another order than the CPU: tokens equal, logits close.
            let diff = common::assert_same_run_within(&label, &got, &want, 1e-3);
            eprintln!("{label}: same tokens; max prefill logit difference {diff:.2e}");
        }
    }
    assert_eq!(gpu.used_bytes(), 0, "the tier frees its buffers");
}

/// `executor --device cuda` with a split policy prints the tokens of the CPU run; without a GPU
/// the same command is refused with a message and exit status 1 (checked on every machine).
#[test]
fn executor_device_cuda_gives_the_cpu_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::fixture("opt-tiny-preln").display().to_string();
    let policy = common::gpu_split_policy("opt-tiny-preln");
    let path = dir.path().join("policy.toml");
    policy.save(&path).unwrap();
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_executor"));
        cmd.args([
            "--model",
            &model,
            "--prompt-ids",
            "2,100,7",
            "--prompt-ids",
            "2,9",
            "--max-new-tokens",
            "4",
        ]);
        cmd.args(extra);
        cmd.output().expect("run the executor")
    };
    let cpu = run(&[]);
    assert!(cpu.status.success());
    let p = path.display().to_string();
    let gpu = run(&["--policy", &p, "--device", "cuda"]);
    let stderr = String::from_utf8_lossy(&gpu.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if cuda::probe().is_err() {
        eprintln!("SKIPPED (no GPU): executor_device_cuda_gives_the_cpu_tokens: refusal checked");
        assert_eq!(gpu.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("--device cuda") && stderr.contains("--device sim"),
            "{stderr}"
        );
        return;
    }
    assert!(gpu.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&gpu.stdout),
        String::from_utf8_lossy(&cpu.stdout),
        "tokens with --device cuda"
    );
}

/// 4-bit compressed weights expanded on the GPU equal `primitives::quant`'s dequantization bit
/// for bit, for whole matrices and for runs of rows (full blocks and the tail).
#[test]
fn compressed_weights_expand_on_the_gpu_as_on_the_cpu() {
    let Some(gpu) = cuda_device("compressed_weights_expand_on_the_gpu_as_on_the_cpu") else {
        return;
    };
    for (n, &(out, inp, row0, rows)) in [
        (64, 5, 0, 64),
        (130, 7, 0, 130),
        (130, 7, 100, 30),
        (3, 3, 0, 3),
        (768, 768, 300, 468),
        (200, 33, 64, 136),
    ]
    .iter()
    .enumerate()
    {
        let data = Rng(500 + n as u64).vec(out * inp);
        let q = executor::quant::QuantizedMatrix::quantize(&data, out, inp).unwrap();
        let want = q.dequantize();
        let (codes, scales, mins) = q.parts();
        let up = |bytes: &[u8], what: &str| {
            let b = gpu.alloc(bytes.len(), what).unwrap();
            gpu.upload(&b, 0, bytes).unwrap();
            b
        };
        let (cb, sb, mb) = (
            up(codes, "codes"),
            up(bytemuck::cast_slice(scales), "scales"),
            up(bytemuck::cast_slice(mins), "mins"),
        );
        let ob = gpu.alloc(rows * inp * 4, "expanded").unwrap();
        let dq = cuda::DeviceQ4 {
            codes: &cb,
            scales: &sb,
            mins: &mb,
            out_features: out,
            in_features: inp,
        };
        gpu.dequantize_q4(&dq, row0, rows, &ob).unwrap();
        let got = download_f32(gpu, &ob, rows * inp);
        let want = &want[row0 * inp..(row0 + rows) * inp];
        let same = got
            .iter()
            .zip(want)
            .all(|(g, w)| g.to_bits() == w.to_bits());
        assert!(
            same,
            "dequantized rows {row0}..+{rows} of {out}x{inp} differ"
        );
        assert!(gpu.dequantize_q4(&dq, row0, out + 1, &ob).is_err());
        for b in [cb, sb, mb, ob] {
            gpu.free(b);
        }
    }
}
