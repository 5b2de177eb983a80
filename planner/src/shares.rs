//! The continuous decision variables of the linear program (placement shares and the CPU/GPU split
//! of design section 4.3), the discrete choices fixed around each program (`Scenario`), and affine
//! forms over the shares.
//!
//! Every cost and memory term is written once, as a plain function of [`Shares`]. Those functions
//! are affine in the shares for a fixed scenario, so the solver obtains each term's LP coefficients
//! by evaluating the same function at zero and at each unit vector ([`AffineForm::of`]); there is no
//! second copy of any formula.

use crate::policy::{Compression, Placement, Policy};

/// Where each byte of weights, KV cache and activations lives, and where each non-GPU weight byte is
/// computed. Rows: the five weight shares sum to 1, the three cache shares sum to 1, the three
/// activation shares sum to 1.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Shares {
    /// wg: weights resident on the GPU (computed there).
    pub weights_gpu: f64,
    /// wc_cpu: weights resident in CPU memory, computed on the CPU.
    pub weights_cpu_computed_on_cpu: f64,
    /// wc_gpu: weights resident in CPU memory, copied to the GPU per use and computed there.
    pub weights_cpu_computed_on_gpu: f64,
    /// wd_cpu: weights on disk, read to CPU memory and computed on the CPU.
    pub weights_disk_computed_on_cpu: f64,
    /// wd_gpu: weights on disk, read to CPU memory, copied on to the GPU and computed there.
    pub weights_disk_computed_on_gpu: f64,
    /// cg, cc, cd: KV cache on GPU / CPU / disk.
    pub cache_gpu: f64,
    pub cache_cpu: f64,
    pub cache_disk: f64,
    /// hg, hc, hd: activations (hidden states between layers) on GPU / CPU / disk.
    pub activations_gpu: f64,
    pub activations_cpu: f64,
    pub activations_disk: f64,
}

/// Names of the shares in [`Shares::to_array`] order, as the design notes write them.
pub const SHARE_NAMES: [&str; Shares::COUNT] = [
    "wg", "wc_cpu", "wc_gpu", "wd_cpu", "wd_gpu", "cg", "cc", "cd", "hg", "hc", "hd",
];

/// Indices of the shares that put bytes or work on a GPU; fixed to 0 on a host without one.
pub const GPU_SHARE_INDICES: [usize; 5] = [0, 2, 4, 5, 8];

impl Shares {
    /// Number of continuous placement variables.
    pub const COUNT: usize = 11;

    /// The shares in a fixed order (see [`SHARE_NAMES`]).
    pub fn to_array(&self) -> [f64; Self::COUNT] {
        [
            self.weights_gpu,
            self.weights_cpu_computed_on_cpu,
            self.weights_cpu_computed_on_gpu,
            self.weights_disk_computed_on_cpu,
            self.weights_disk_computed_on_gpu,
            self.cache_gpu,
            self.cache_cpu,
            self.cache_disk,
            self.activations_gpu,
            self.activations_cpu,
            self.activations_disk,
        ]
    }

    /// Inverse of [`Shares::to_array`].
    pub fn from_array(a: [f64; Self::COUNT]) -> Shares {
        Shares {
            weights_gpu: a[0],
            weights_cpu_computed_on_cpu: a[1],
            weights_cpu_computed_on_gpu: a[2],
            weights_disk_computed_on_cpu: a[3],
            weights_disk_computed_on_gpu: a[4],
            cache_gpu: a[5],
            cache_cpu: a[6],
            cache_disk: a[7],
            activations_gpu: a[8],
            activations_cpu: a[9],
            activations_disk: a[10],
        }
    }

    /// The unit vector for share `index` (used to read off LP coefficients).
    pub fn unit(index: usize) -> Shares {
        let mut a = [0.0; Self::COUNT];
        a[index] = 1.0;
        Shares::from_array(a)
    }

    /// wc = wc_cpu + wc_gpu: weights resident in CPU memory.
    pub fn weights_cpu(&self) -> f64 {
        self.weights_cpu_computed_on_cpu + self.weights_cpu_computed_on_gpu
    }

    /// wd = wd_cpu + wd_gpu: weights resident on disk.
    pub fn weights_disk(&self) -> f64 {
        self.weights_disk_computed_on_cpu + self.weights_disk_computed_on_gpu
    }

    /// Share of every linear layer's output columns computed on the CPU: wc_cpu + wd_cpu.
    pub fn linear_share_on_cpu(&self) -> f64 {
        self.weights_cpu_computed_on_cpu + self.weights_disk_computed_on_cpu
    }

    /// Share computed on the GPU: wg + wc_gpu + wd_gpu.
    pub fn linear_share_on_gpu(&self) -> f64 {
        self.weights_gpu + self.weights_cpu_computed_on_gpu + self.weights_disk_computed_on_gpu
    }

    /// Share of non-GPU weights copied over PCIe for each use: wc_gpu + wd_gpu.
    pub fn weights_copied_to_gpu(&self) -> f64 {
        self.weights_cpu_computed_on_gpu + self.weights_disk_computed_on_gpu
    }

    /// HeteGen's alpha = (wc_cpu + wd_cpu) / (1 - wg): the CPU's share of the non-GPU weights.
    /// With every weight on the GPU there is nothing to split; alpha is then 0 by convention.
    pub fn alpha(&self) -> f64 {
        let off_gpu = 1.0 - self.weights_gpu;
        if off_gpu <= 1e-12 {
            0.0
        } else {
            (self.linear_share_on_cpu() / off_gpu).clamp(0.0, 1.0)
        }
    }

    /// The shares a policy describes. A policy stores the weight row (wg, wc, wd) and one alpha;
    /// the executor applies alpha to CPU- and disk-resident weights alike, so wc_cpu = alpha * wc
    /// and wd_cpu = alpha * wd. Every term of the cost and memory model depends on the split only
    /// through wc, wd, wc_cpu + wd_cpu and wc_gpu + wd_gpu, so this loses nothing the LP chose.
    pub fn from_policy(policy: &Policy) -> Shares {
        let w = &policy.placement.weights;
        let alpha = policy.compute.split.qkv;
        let c = &policy.placement.kv_cache;
        let h = &policy.placement.activations;
        Shares {
            weights_gpu: w.gpu,
            weights_cpu_computed_on_cpu: alpha * w.cpu,
            weights_cpu_computed_on_gpu: (1.0 - alpha) * w.cpu,
            weights_disk_computed_on_cpu: alpha * w.disk,
            weights_disk_computed_on_gpu: (1.0 - alpha) * w.disk,
            cache_gpu: c.gpu,
            cache_cpu: c.cpu,
            cache_disk: c.disk,
            activations_gpu: h.gpu,
            activations_cpu: h.cpu,
            activations_disk: h.disk,
        }
    }

    /// The three placement rows of a policy (sums of two shares clamped to [0, 1] against
    /// rounding).
    pub fn placement_rows(&self) -> (Placement, Placement, Placement) {
        (
            Placement {
                gpu: self.weights_gpu,
                cpu: self.weights_cpu().clamp(0.0, 1.0),
                disk: self.weights_disk().clamp(0.0, 1.0),
            },
            Placement {
                gpu: self.cache_gpu,
                cpu: self.cache_cpu,
                disk: self.cache_disk,
            },
            Placement {
                gpu: self.activations_gpu,
                cpu: self.activations_cpu,
                disk: self.activations_disk,
            },
        )
    }

    /// Clamps solver noise (tiny negatives, values a hair above 1) and rescales each row to sum
    /// to exactly 1.
    pub fn normalized(&self) -> Shares {
        let mut a = self.to_array();
        for v in a.iter_mut() {
            *v = if v.is_finite() {
                v.clamp(0.0, 1.0)
            } else {
                0.0
            };
            if *v < 1e-12 {
                *v = 0.0;
            }
        }
        for range in [0..5, 5..8, 8..11] {
            let sum: f64 = a[range.clone()].iter().sum();
            if sum > 0.0 {
                for v in &mut a[range] {
                    *v /= sum;
                }
            }
        }
        Shares::from_array(a)
    }
}

/// The discrete choices around one linear program: workload, batch shape, compression and CPU
/// delegation, and whether the host has a GPU at all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scenario {
    /// Prompt length s.
    pub prompt_len: u64,
    /// Generated tokens n.
    pub gen_len: u64,
    /// Sequences per GPU batch (gbs).
    pub gpu_batch_size: u64,
    /// GPU batches per block (nb).
    pub num_gpu_batches: u64,
    pub compression: Compression,
    /// FlexGen's CPU delegation: decode attention over non-GPU cache runs on the CPU.
    pub cpu_attention: bool,
    /// Whether the host has a GPU; without one every GPU share is 0 and all work is on the CPU.
    pub has_gpu: bool,
}

impl Scenario {
    /// The scenario a policy describes on a host with or without a GPU.
    pub fn from_policy(policy: &Policy, has_gpu: bool) -> Scenario {
        Scenario {
            prompt_len: policy.workload.prompt_len,
            gen_len: policy.workload.gen_len,
            gpu_batch_size: policy.batch.gpu_batch_size,
            num_gpu_batches: policy.batch.num_gpu_batches,
            compression: policy.compression,
            cpu_attention: policy.compute.cpu_attention,
            has_gpu,
        }
    }

    /// Sequences in a block: bls = gbs * nb.
    pub fn block_size(&self) -> u64 {
        self.gpu_batch_size * self.num_gpu_batches
    }
}

/// A function of the shares written as constant + sum of coefficient * share.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AffineForm {
    pub constant: f64,
    pub coefficients: [f64; Shares::COUNT],
}

impl AffineForm {
    /// Reads the affine form of `f` by evaluating it at zero and at each unit vector. Only valid
    /// for functions that are affine in the shares, which every cost and memory term is for a
    /// fixed scenario (tests check it at random points).
    pub fn of(f: impl Fn(&Shares) -> f64) -> AffineForm {
        let constant = f(&Shares::default());
        let mut coefficients = [0.0; Shares::COUNT];
        for (i, c) in coefficients.iter_mut().enumerate() {
            *c = f(&Shares::unit(i)) - constant;
        }
        AffineForm {
            constant,
            coefficients,
        }
    }

    /// The affine form of a function known by its value at zero and at each unit vector (the same
    /// reading as [`AffineForm::of`], for values already computed).
    pub fn from_samples(at_zero: f64, at_units: &[f64; Shares::COUNT]) -> AffineForm {
        let mut coefficients = [0.0; Shares::COUNT];
        for (c, v) in coefficients.iter_mut().zip(at_units) {
            *c = v - at_zero;
        }
        AffineForm {
            constant: at_zero,
            coefficients,
        }
    }

    /// Value at `shares`.
    pub fn at(&self, shares: &Shares) -> f64 {
        self.constant
            + self
                .coefficients
                .iter()
                .zip(shares.to_array())
                .map(|(c, s)| c * s)
                .sum::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_is_cpu_share_of_non_gpu_weights() {
        let s = Shares {
            weights_gpu: 0.2,
            weights_cpu_computed_on_cpu: 0.3,
            weights_cpu_computed_on_gpu: 0.1,
            weights_disk_computed_on_cpu: 0.1,
            weights_disk_computed_on_gpu: 0.3,
            ..Default::default()
        };
        assert!((s.alpha() - 0.4 / 0.8).abs() < 1e-12);
        assert!((s.linear_share_on_gpu() - 0.6).abs() < 1e-12);
    }

    #[test]
    fn affine_form_reproduces_an_affine_function() {
        let f = |s: &Shares| 3.0 + 2.0 * s.weights_gpu - 5.0 * s.cache_disk;
        let form = AffineForm::of(f);
        let s = Shares {
            weights_gpu: 0.25,
            cache_disk: 0.5,
            ..Default::default()
        };
        assert!((form.at(&s) - f(&s)).abs() < 1e-12);
        assert_eq!(form.constant, 3.0);
    }

    #[test]
    fn normalized_rows_sum_to_one() {
        let s = Shares {
            weights_gpu: 0.5000001,
            weights_cpu_computed_on_cpu: 0.5,
            cache_cpu: 1.0,
            activations_cpu: 0.9999999,
            activations_disk: -1e-15,
            ..Default::default()
        }
        .normalized();
        let a = s.to_array();
        assert!((a[0..5].iter().sum::<f64>() - 1.0).abs() < 1e-15);
        assert_eq!(s.activations_disk, 0.0);
        assert_eq!(s.activations_cpu, 1.0);
    }
}
