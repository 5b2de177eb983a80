//! Properties of the policy search: every returned policy fits and has rows summing to 1; the LP's
//! optimum is never worse than a brute-force grid over placements at 5% steps, and never better
//! than the grid's resolution explains.

use planner::cost::{self, CostInputs, Stage};
use planner::memory;
use planner::model::ModelSpec;
use planner::policy::Compression;
use planner::profile::{CapacityOverrides, Profile, GIB};
use planner::shares::{AffineForm, Scenario, Shares};
use planner::solve::{self, Objective, SolveError, SolveRequest};
use proptest::prelude::*;

/// Total time of `shares` under `sc`, or `None` when its memory plan overflows a tier.
fn time_if_fits(
    model: &ModelSpec,
    profile: &Profile,
    caps: &planner::profile::Capacities,
    sc: &Scenario,
    shares: &Shares,
) -> Option<f64> {
    let per_kind = [*shares; 4];
    let plan = memory::plan(model, sc, &per_kind);
    if plan.gpu.total() > caps.gpu_bytes
        || plan.cpu.total() > caps.cpu_bytes
        || plan.disk.total() > caps.disk_bytes
    {
        return None;
    }
    let ci = CostInputs::new(model, profile, *sc);
    Some(cost::total_time(
        &ci,
        &cost::layer_terms(&ci, Stage::Prefill, &per_kind),
        &cost::layer_terms(&ci, Stage::Decode, &per_kind),
    ))
}

/// How much the total time can change when `step` of mass moves within each placement row, among
/// the `free` shares (the others are fixed at 0 in the test): for each stage, (layers x steps of
/// that stage) x the largest, over the channel forms, sum over rows of the spread of the row's
/// coefficients, times `step`.
fn resolution_bound(
    model: &ModelSpec,
    profile: &Profile,
    sc: &Scenario,
    step: f64,
    free: &[usize],
) -> f64 {
    let ci = CostInputs::new(model, profile, *sc);
    let l = model.num_layers as f64;
    let decode_steps = (sc.gen_len - 1) as f64;
    let mut bound = 0.0;
    for (stage, weight) in [(Stage::Prefill, l), (Stage::Decode, l * decode_steps)] {
        let terms = |s: &Shares| cost::layer_terms(&ci, stage, &[*s; 4]);
        let forms = [
            AffineForm::of(|s| terms(s).ctog()),
            AffineForm::of(|s| terms(s).gtoc()),
            AffineForm::of(|s| terms(s).disk()),
            AffineForm::of(|s| {
                let t = terms(s);
                t.comp_besides_linears()
                    + t.gpu_linear.iter().sum::<f64>()
                    + t.cpu_linear.iter().sum::<f64>()
            }),
        ];
        // Moving mass `step` between two shares of one row changes a form by at most step times
        // the spread of that row's coefficients.
        let rows = [0..5, 5..8, 8..11];
        let worst = forms
            .iter()
            .map(|f| {
                rows.iter()
                    .map(|r| {
                        let c: Vec<f64> = r
                            .clone()
                            .filter(|i| free.contains(i))
                            .map(|i| f.coefficients[i])
                            .collect();
                        let hi = c.iter().cloned().fold(f64::MIN, f64::max);
                        let lo = c.iter().cloned().fold(f64::MAX, f64::min);
                        if c.is_empty() {
                            0.0
                        } else {
                            hi - lo
                        }
                    })
                    .sum::<f64>()
            })
            .fold(0.0, f64::max);
        bound += weight * worst * step;
    }
    bound
}

/// All points of the simplex {x_0 + ... + x_{k-1} = 1} on a grid of 1/steps.
fn simplex(k: usize, steps: usize) -> Vec<Vec<f64>> {
    fn rec(k: usize, left: usize, steps: usize, prefix: &mut Vec<f64>, out: &mut Vec<Vec<f64>>) {
        if k == 1 {
            prefix.push(left as f64 / steps as f64);
            out.push(prefix.clone());
            prefix.pop();
            return;
        }
        for i in 0..=left {
            prefix.push(i as f64 / steps as f64);
            rec(k - 1, left - i, steps, prefix, out);
            prefix.pop();
        }
    }
    let mut out = Vec::new();
    rec(k, steps, steps, &mut Vec::new(), &mut out);
    out
}

fn compare_lp_with_grid(
    model: &ModelSpec,
    profile: &Profile,
    overrides: CapacityOverrides,
    sc: Scenario,
    free: &[usize],
    grid: impl Iterator<Item = Shares>,
) {
    let caps = profile.capacities(&overrides);
    let lp = solve::solve_program(model, profile, &caps, &sc)
        .unwrap()
        .expect("the test scenario is feasible");
    let lp_time = time_if_fits(model, profile, &caps, &sc, &lp.shares)
        .expect("the LP's placement fits its own memory plan");
    let mut best_grid = f64::INFINITY;
    let mut feasible = 0usize;
    for shares in grid {
        if let Some(t) = time_if_fits(model, profile, &caps, &sc, &shares) {
            feasible += 1;
            best_grid = best_grid.min(t);
        }
    }
    assert!(feasible > 0, "no grid point fits");
    // Never worse than the grid (up to the tie-break's 1e-4 relative allowance).
    assert!(
        lp_time <= best_grid * (1.0 + 1e-4),
        "LP {lp_time} s is worse than the grid's {best_grid} s"
    );
    // Never better than two grid steps (0.1 per share) can explain.
    let bound = resolution_bound(model, profile, &sc, 0.1, free);
    assert!(
        best_grid - lp_time <= bound,
        "LP {lp_time} s beats the grid's {best_grid} s by more than the resolution bound {bound} s"
    );
    eprintln!("LP {lp_time:.6} s, grid {best_grid:.6} s, resolution bound {bound:.6} s");
    // The bound must say something: less than the LP's time itself.
    assert!(bound < lp_time, "bound {bound} s vs LP {lp_time} s");
}

#[test]
fn lp_matches_a_five_percent_grid_on_gpu_and_cpu() {
    let model = ModelSpec::builtin("opt-125m").unwrap();
    let profile = Profile::embedded("t4-flexgen").unwrap();
    // A GPU too small for the model: weights, cache and activations must share it with the CPU.
    let overrides = CapacityOverrides {
        gpu_mem_gib: Some(0.25),
        cpu_mem_gib: Some(4.0),
        disk_mem_gib: Some(0.0),
    };
    for cpu_attention in [true, false] {
        let sc = Scenario {
            prompt_len: 64,
            gen_len: 16,
            gpu_batch_size: 8,
            num_gpu_batches: 2,
            compression: Compression::default(),
            cpu_attention,
            has_gpu: true,
        };
        let weights = simplex(3, 20);
        let pairs = simplex(2, 20);
        let grid = weights.iter().flat_map(|w| {
            let pairs = &pairs;
            pairs.iter().flat_map(move |c| {
                pairs.iter().map(move |h| Shares {
                    weights_gpu: w[0],
                    weights_cpu_computed_on_cpu: w[1],
                    weights_cpu_computed_on_gpu: w[2],
                    cache_gpu: c[0],
                    cache_cpu: c[1],
                    activations_gpu: h[0],
                    activations_cpu: h[1],
                    ..Default::default()
                })
            })
        });
        compare_lp_with_grid(
            &model,
            &profile,
            overrides,
            sc,
            &[0, 1, 2, 5, 6, 8, 9],
            grid,
        );
    }
}

#[test]
fn lp_matches_a_five_percent_grid_on_cpu_and_disk() {
    let model = ModelSpec::builtin("opt-125m").unwrap();
    let profile = Profile::embedded("cpu-2core-24gib").unwrap();
    let overrides = CapacityOverrides {
        cpu_mem_gib: Some(0.3),
        disk_mem_gib: Some(10.0),
        ..Default::default()
    };
    let sc = Scenario {
        prompt_len: 64,
        gen_len: 16,
        gpu_batch_size: 8,
        num_gpu_batches: 4,
        compression: Compression::default(),
        cpu_attention: true,
        has_gpu: false,
    };
    let pairs = simplex(2, 20);
    let grid = pairs.iter().flat_map(|w| {
        let pairs = &pairs;
        pairs.iter().flat_map(move |c| {
            pairs.iter().map(move |h| Shares {
                weights_cpu_computed_on_cpu: w[0],
                weights_disk_computed_on_cpu: w[1],
                cache_cpu: c[0],
                cache_disk: c[1],
                activations_cpu: h[0],
                activations_disk: h[1],
                ..Default::default()
            })
        })
    });
    compare_lp_with_grid(&model, &profile, overrides, sc, &[1, 3, 6, 7, 9, 10], grid);
}

#[test]
fn solved_prediction_is_the_cost_model_of_the_written_policy() {
    let model = ModelSpec::builtin("opt-1.3b").unwrap();
    let profile = Profile::embedded("a10-hetegen").unwrap();
    let request = SolveRequest {
        model: &model,
        model_config: None,
        profile: &profile,
        profile_ref: "builtin:a10-hetegen".into(),
        objective: Objective::Throughput,
        latency_batch: 1,
        prompt_len: 128,
        gen_len: 16,
        overrides: CapacityOverrides {
            gpu_mem_gib: Some(1.5),
            ..Default::default()
        },
        allow_compression: true,
        block_limits: Default::default(),
    };
    let policy = solve::solve(&request).unwrap();
    let stored = policy.prediction.clone().unwrap();
    let reparsed = planner::policy::Policy::parse(&policy.to_toml(), "p.toml").unwrap();
    assert_eq!(reparsed, policy, "the written TOML round-trips");
    let again = cost::evaluate(&model, &profile, &reparsed).unwrap();
    assert!((again.total_s - stored.total_s).abs() <= 1e-9 * stored.total_s);
    assert!(again.memory.fits());
}

fn request_strategy() -> impl Strategy<Value = (usize, Option<f64>, f64, f64, bool, u64, u64, u64)>
{
    (
        0usize..3,
        prop_oneof![Just(None), (0.2f64..4.0).prop_map(Some)],
        0.3f64..16.0,
        0.0f64..40.0,
        any::<bool>(),
        1u64..8,
        16u64..512,
        1u64..64,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn every_returned_policy_fits_and_its_rows_sum_to_one(
        (model_index, gpu_gib, cpu_gib, disk_gib, latency, batch, prompt_len, gen_len) in request_strategy()
    ) {
        let name = ["opt-125m", "opt-350m", "opt-1.3b"][model_index];
        let model = ModelSpec::builtin(name).unwrap();
        let profile = Profile::embedded(if gpu_gib.is_some() { "t4-flexgen" } else { "cpu-2core-24gib" }).unwrap();
        let overrides = CapacityOverrides {
            gpu_mem_gib: gpu_gib,
            cpu_mem_gib: Some(cpu_gib),
            disk_mem_gib: Some(disk_gib),
        };
        let request = SolveRequest {
            model: &model,
            model_config: None,
            profile: &profile,
            profile_ref: "builtin:test".into(),
            objective: if latency { Objective::Latency } else { Objective::Throughput },
            latency_batch: batch,
            prompt_len,
            gen_len,
            overrides,
            allow_compression: true,
            block_limits: Default::default(),
        };
        match solve::solve(&request) {
            Ok(policy) => {
                policy.validate("solved").unwrap();
                let caps = profile.capacities(&overrides);
                let plan = memory::plan_for_policy(&model, &policy, profile.has_gpu());
                let slack = 1.0 + 1e-6;
                prop_assert!(plan.gpu.total() <= caps.gpu_bytes * slack, "gpu {} > {}", plan.gpu.total(), caps.gpu_bytes);
                prop_assert!(plan.cpu.total() <= caps.cpu_bytes * slack, "cpu {} > {}", plan.cpu.total(), caps.cpu_bytes);
                prop_assert!(plan.disk.total() <= caps.disk_bytes * slack, "disk {} > {}", plan.disk.total(), caps.disk_bytes);
                for row in [policy.placement.weights, policy.placement.kv_cache, policy.placement.activations] {
                    prop_assert!((row.gpu + row.cpu + row.disk - 1.0).abs() < 1e-9);
                    if gpu_gib.is_none() {
                        prop_assert_eq!(row.gpu, 0.0);
                    }
                }
                if gpu_gib.is_none() {
                    prop_assert!(!policy.needs_gpu());
                }
                let prediction = policy.prediction.as_ref().unwrap();
                prop_assert!(prediction.memory.fits());
                prop_assert!(prediction.throughput_tok_s.is_finite() && prediction.throughput_tok_s > 0.0);
            }
            Err(SolveError::CannotFit { needs_gib, have_gib, .. }) => {
                prop_assert!(needs_gib > 0.0 && have_gib >= 0.0);
            }
            Err(other) => prop_assert!(false, "unexpected error: {other}"),
        }
    }
}

#[test]
fn a_model_larger_than_every_tier_cannot_fit() {
    let model = ModelSpec::builtin("opt-175b").unwrap();
    let profile = Profile::embedded("cpu-2core-24gib").unwrap();
    let request = SolveRequest {
        model: &model,
        model_config: None,
        profile: &profile,
        profile_ref: "builtin:cpu-2core-24gib".into(),
        objective: Objective::Throughput,
        latency_batch: 1,
        prompt_len: 512,
        gen_len: 32,
        overrides: CapacityOverrides::default(),
        allow_compression: true,
        block_limits: Default::default(),
    };
    let e = solve::solve(&request).unwrap_err().to_string();
    // 175B parameters at 4.5 bits are about 92 GiB; the box has 20.4 + 60 GiB.
    assert!(e.starts_with("cannot fit opt-175b: needs "), "{e}");
    assert!(e.contains("GiB, have 80.4 GiB"), "{e}");
    let needs: f64 = e["cannot fit opt-175b: needs ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((90.0..100.0).contains(&needs), "{e}");
    let _ = GIB;
}
