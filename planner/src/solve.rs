//! The policy search: for every enumerated discrete choice (GPU batch size, number of GPU batches,
//! weight and cache compression, CPU delegation) one linear program over the placement shares and
//! the CPU/GPU split (design 4.3), solved with good_lp's pure-Rust microlp backend; the best result
//! becomes the policy.
//!
//! Each program minimizes the block's total time l * t_pre + l * (n - 1) * t_dec (plus constants)
//! subject to, for each stage: t >= ctog, t >= gtoc, t >= dtoc + ctod, t >= (sum over kinds of
//! lin_k) + attention + pointwise, lin_k >= gpu_linear_k, lin_k >= cpu_linear_k; each placement row
//! summing to 1; and the memory plan of every tier within its capacity. All coefficients are read
//! off the cost and memory functions themselves ([`crate::shares::AffineForm`]).

use crate::cost::{self, CostInputs, LayerTerms, Prediction, SolverInfo, Stage};
use crate::memory::{self, MemoryPlan};
use crate::model::ModelSpec;
use crate::policy::{
    Batch, BlockLimits, Compression, Compute, ModelRef, Policy, Provenance, Split, Workload,
    MAX_BATCH, MAX_SEQUENCE_TOKENS,
};
use crate::profile::{Capacities, CapacityOverrides, Profile, GIB};
use crate::shares::{AffineForm, Scenario, Shares, GPU_SHARE_INDICES};
use good_lp::{
    constraint, microlp, variable, Expression, ProblemVariables, ResolutionError, Solution,
    SolverModel, Variable,
};
use serde::{Deserialize, Serialize};
use std::time::Instant;
use thiserror::Error;

/// GPU batch sizes tried by the throughput search (FlexGen's policies use 2, 32 and 48).
pub const GPU_BATCH_SIZES: [u64; 14] = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256];
/// Numbers of GPU batches per block tried by the throughput search.
pub const NUM_GPU_BATCHES: [u64; 10] = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32];
/// Compression settings tried: off, weights only, cache only, both.
pub const COMPRESSION_CHOICES: [Compression; 4] = [
    Compression {
        weights: false,
        kv_cache: false,
    },
    Compression {
        weights: true,
        kv_cache: false,
    },
    Compression {
        weights: false,
        kv_cache: true,
    },
    Compression {
        weights: true,
        kv_cache: true,
    },
];

/// Capacities in the LP are shrunk by this relative margin so that rounding in the solver cannot
/// produce a policy a hair over capacity.
const CAPACITY_MARGIN: f64 = 1e-7;

/// Weight of the secondary objective (total busy time of all channels) that breaks ties between
/// equally fast placements; small enough to move the optimum by under 0.01%.
const TIE_BREAK: f64 = 2e-5;

/// What to optimize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// FlexGen's regime: maximize generated tokens per second over the enumerated block shapes.
    Throughput,
    /// HeteGen's regime: a given batch (one GPU batch), minimize the time to generate.
    Latency,
}

impl Objective {
    /// Name written in policies.
    pub fn name(self) -> &'static str {
        match self {
            Objective::Throughput => "throughput",
            Objective::Latency => "latency",
        }
    }

    /// Parses a policy's `provenance.objective`.
    pub fn from_name(name: &str) -> Option<Objective> {
        match name {
            "throughput" => Some(Objective::Throughput),
            "latency" => Some(Objective::Latency),
            _ => None,
        }
    }
}

/// Everything `planner solve` needs.
#[derive(Debug, Clone)]
pub struct SolveRequest<'a> {
    pub model: &'a ModelSpec,
    /// The Hugging Face config the model came from, recorded in the policy.
    pub model_config: Option<String>,
    pub profile: &'a Profile,
    /// How the policy names its profile: a repository-relative path or `builtin:NAME`.
    pub profile_ref: String,
    pub objective: Objective,
    /// Sequences in the batch for the latency objective.
    pub latency_batch: u64,
    pub prompt_len: u64,
    pub gen_len: u64,
    pub overrides: CapacityOverrides,
    /// Whether 4-bit compression may be chosen (otherwise only uncompressed configurations).
    pub allow_compression: bool,
    /// Block shapes the throughput search may choose from.
    pub block_limits: BlockLimits,
}

/// Why no policy came out.
#[derive(Debug, Error)]
pub enum SolveError {
    /// The model and its smallest working set exceed all tiers together, or one tier's fixed part.
    #[error("cannot fit {model}: needs {needs_gib:.1} GiB, have {have_gib:.1} GiB ({detail})")]
    CannotFit {
        model: String,
        needs_gib: f64,
        have_gib: f64,
        detail: String,
    },
    /// A request that makes no sense (zero lengths, a batch of 0).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The LP solver reported something other than optimal or infeasible.
    #[error("LP solver failed on gbs={gbs} nb={nb}: {message}")]
    Solver { gbs: u64, nb: u64, message: String },
}

/// Result of one linear program.
#[derive(Debug, Clone, Copy)]
pub struct ProgramOptimum {
    pub shares: Shares,
    /// Objective value: the block's total time in seconds.
    pub total_s: f64,
}

/// The discrete configurations a request enumerates, in search order.
pub fn scenarios(req: &SolveRequest) -> Vec<Scenario> {
    let has_gpu = req.profile.has_gpu();
    let shapes: Vec<(u64, u64)> = match req.objective {
        Objective::Throughput => match req.block_limits.fixed {
            Some([g, n]) => vec![(g, n)],
            None => GPU_BATCH_SIZES
                .iter()
                .flat_map(|&g| NUM_GPU_BATCHES.iter().map(move |&n| (g, n)))
                .filter(|&(g, n)| req.block_limits.allows(g, n))
                .collect(),
        },
        Objective::Latency => vec![(req.latency_batch, 1)],
    };
    let delegation: &[bool] = if has_gpu { &[true, false] } else { &[true] };
    let mut out = Vec::new();
    for &(gbs, nb) in &shapes {
        let compressions = if req.allow_compression {
            &COMPRESSION_CHOICES[..]
        } else {
            &COMPRESSION_CHOICES[..1]
        };
        for &compression in compressions {
            for &cpu_attention in delegation {
                out.push(Scenario {
                    prompt_len: req.prompt_len,
                    gen_len: req.gen_len,
                    gpu_batch_size: gbs,
                    num_gpu_batches: nb,
                    compression,
                    cpu_attention,
                    has_gpu,
                });
            }
        }
    }
    out
}

/// Bytes every placement must hold somewhere: weights, KV cache and activation homes, embeddings.
/// Rows sum to 1, so this does not depend on the placement.
pub fn home_bytes(model: &ModelSpec, sc: &Scenario) -> f64 {
    model.num_layers as f64 * memory::layer_weight_bytes_stored(model, &sc.compression)
        + memory::kv_cache_total_bytes(model, sc)
        + memory::activations_total_bytes(model, sc)
        + memory::embedding_bytes(model)
}

fn sample_points() -> [Shares; Shares::COUNT + 1] {
    let mut pts = [Shares::default(); Shares::COUNT + 1];
    for (i, p) in pts.iter_mut().enumerate().skip(1) {
        *p = Shares::unit(i - 1);
    }
    pts
}

fn form_of<T>(samples: &[T; Shares::COUNT + 1], f: impl Fn(&T) -> f64) -> AffineForm {
    let mut at_units = [0.0; Shares::COUNT];
    for (v, s) in at_units.iter_mut().zip(&samples[1..]) {
        *v = f(s);
    }
    AffineForm::from_samples(f(&samples[0]), &at_units)
}

fn expression(form: &AffineForm, x: &[Variable], scale: f64) -> Expression {
    let mut e = Expression::from(form.constant * scale);
    for (c, v) in form.coefficients.iter().zip(x) {
        if *c != 0.0 {
            e.add_mul(c * scale, *v);
        }
    }
    e
}

/// Solves the linear program of one scenario. `Ok(None)` when no placement fits.
pub fn solve_program(
    model: &ModelSpec,
    profile: &Profile,
    capacities: &Capacities,
    sc: &Scenario,
) -> Result<Option<ProgramOptimum>, SolveError> {
    let ci = CostInputs::new(model, profile, *sc);
    let points = sample_points();
    let pre: [LayerTerms; Shares::COUNT + 1] =
        points.map(|p| cost::layer_terms(&ci, Stage::Prefill, &[p; 4]));
    let dec: [LayerTerms; Shares::COUNT + 1] =
        points.map(|p| cost::layer_terms(&ci, Stage::Decode, &[p; 4]));
    let mem: [MemoryPlan; Shares::COUNT + 1] = points.map(|p| memory::plan(model, sc, &[p; 4]));

    let mut vars = ProblemVariables::new();
    let x: Vec<Variable> = (0..Shares::COUNT)
        .map(|i| {
            let upper = if !sc.has_gpu && GPU_SHARE_INDICES.contains(&i) {
                0.0
            } else {
                1.0
            };
            vars.add(variable().min(0.0).max(upper))
        })
        .collect();
    let t_pre = vars.add(variable().min(0.0));
    let t_dec = vars.add(variable().min(0.0));
    let lin_pre: Vec<Variable> = (0..4).map(|_| vars.add(variable().min(0.0))).collect();
    let lin_dec: Vec<Variable> = (0..4).map(|_| vars.add(variable().min(0.0))).collect();

    let layers = model.num_layers as f64;
    let steps = sc.gen_len.saturating_sub(1) as f64;
    // Many placements often share the optimal time (a channel that does not bind can carry more or
    // less). Among them prefer the one that keeps every channel least busy: add TIE_BREAK times the
    // sum of all channel times. This moves the optimum by at most 4 * TIE_BREAK relative.
    let mut busy = Expression::from(0.0);
    for (samples, weight) in [(&pre, layers), (&dec, layers * steps)] {
        for form in [
            form_of(samples, |s| s.ctog()),
            form_of(samples, |s| s.gtoc()),
            form_of(samples, |s| s.disk()),
            form_of(samples, |s| s.comp_besides_linears()),
        ] {
            busy += expression(&form, &x, weight * TIE_BREAK);
        }
    }
    for (lin, weight) in [(&lin_pre, layers), (&lin_dec, layers * steps)] {
        for v in lin.iter() {
            busy.add_mul(weight * TIE_BREAK, *v);
        }
    }
    let objective: Expression = layers * t_pre + layers * steps * t_dec + busy;
    let mut lp = vars.minimise(objective).using(microlp);
    lp = lp
        .with(constraint!(x[0] + x[1] + x[2] + x[3] + x[4] == 1.0))
        .with(constraint!(x[5] + x[6] + x[7] == 1.0))
        .with(constraint!(x[8] + x[9] + x[10] == 1.0));
    for (samples, t, lin) in [(&pre, t_pre, &lin_pre), (&dec, t_dec, &lin_dec)] {
        for channel in [
            form_of(samples, |s| s.ctog()),
            form_of(samples, |s| s.gtoc()),
            form_of(samples, |s| s.disk()),
        ] {
            lp = lp.with(expression(&channel, &x, 1.0).leq(t));
        }
        let rest = form_of(samples, |s| s.comp_besides_linears());
        let comp =
            expression(&rest, &x, 1.0) + lin.iter().fold(Expression::from(0.0), |e, v| e + *v);
        lp = lp.with(comp.leq(t));
        for (k, &lin_k) in lin.iter().enumerate() {
            let gpu_half = form_of(samples, |s| s.gpu_linear[k]);
            let cpu_half = form_of(samples, |s| s.cpu_linear[k]);
            lp = lp
                .with(expression(&gpu_half, &x, 1.0).leq(lin_k))
                .with(expression(&cpu_half, &x, 1.0).leq(lin_k));
        }
    }
    let margin = 1.0 - CAPACITY_MARGIN;
    for (form, cap) in [
        (form_of(&mem, |m| m.gpu.total()), capacities.gpu_bytes),
        (form_of(&mem, |m| m.cpu.total()), capacities.cpu_bytes),
        (form_of(&mem, |m| m.disk.total()), capacities.disk_bytes),
    ] {
        // Bytes are scaled to GiB to keep the program well conditioned.
        lp = lp.with(expression(&form, &x, 1.0 / GIB).leq(cap * margin / GIB));
    }
    match lp.solve() {
        Ok(solution) => {
            let mut a = [0.0; Shares::COUNT];
            for (v, var) in a.iter_mut().zip(&x) {
                *v = solution.value(*var);
            }
            let shares = Shares::from_array(a).normalized();
            let per_kind = [shares; 4];
            let total_s = cost::total_time(
                &ci,
                &cost::layer_terms(&ci, Stage::Prefill, &per_kind),
                &cost::layer_terms(&ci, Stage::Decode, &per_kind),
            );
            Ok(Some(ProgramOptimum { shares, total_s }))
        }
        Err(ResolutionError::Infeasible) => Ok(None),
        Err(e) => Err(SolveError::Solver {
            gbs: sc.gpu_batch_size,
            nb: sc.num_gpu_batches,
            message: e.to_string(),
        }),
    }
}

/// A policy from a scenario and its shares (no prediction yet).
pub fn policy_from(req: &SolveRequest, sc: &Scenario, shares: &Shares) -> Policy {
    let (weights, kv_cache, activations) = shares.placement_rows();
    let alpha = if sc.has_gpu { shares.alpha() } else { 1.0 };
    Policy {
        provenance: Provenance {
            planner_version: env!("CARGO_PKG_VERSION").to_string(),
            profile: req.profile_ref.clone(),
            profile_fingerprint: req.profile.fingerprint(),
            objective: req.objective.name().to_string(),
            capacity_overrides: req.overrides,
            allow_compression: req.allow_compression,
            block_limits: req.block_limits,
        },
        model: ModelRef {
            name: req.model.name.clone(),
            config: req.model_config.clone(),
        },
        workload: Workload {
            prompt_len: sc.prompt_len,
            gen_len: sc.gen_len,
        },
        batch: Batch {
            gpu_batch_size: sc.gpu_batch_size,
            num_gpu_batches: sc.num_gpu_batches,
        },
        placement: crate::policy::Placements {
            weights,
            kv_cache,
            activations,
        },
        compute: Compute {
            cpu_attention: sc.cpu_attention,
            split: Split::uniform(alpha),
        },
        compression: sc.compression,
        prediction: None,
    }
}

/// Lower bound on a scenario's total time whatever the placement: the compute every token needs
/// on the fastest device at its roofline (no copies). Used to skip programs that cannot win.
fn scenario_lower_bound(model: &ModelSpec, profile: &Profile, sc: &Scenario) -> f64 {
    let ci = CostInputs::new(model, profile, *sc);
    let layers = model.num_layers as f64;
    let steps = sc.gen_len.saturating_sub(1) as f64;
    let best_linears = |stage: Stage| -> f64 {
        // Everything on the GPU, or everything on the CPU, whichever is faster per kind; a split
        // can at best run both at once: 1 / (1/g + 1/c).
        let all_gpu = Shares {
            weights_gpu: 1.0,
            ..Default::default()
        };
        let all_cpu = Shares {
            weights_cpu_computed_on_cpu: 1.0,
            ..Default::default()
        };
        let g = cost::layer_terms(&ci, stage, &[all_gpu; 4]);
        let c = cost::layer_terms(&ci, stage, &[all_cpu; 4]);
        (0..4)
            .map(|k| {
                let (gk, ck) = (g.gpu_linear[k], c.cpu_linear[k]);
                if sc.has_gpu && gk > 0.0 && ck > 0.0 {
                    gk * ck / (gk + ck)
                } else {
                    ck
                }
            })
            .sum::<f64>()
            + cost::pointwise(&ci, stage)
    };
    layers * best_linears(Stage::Prefill)
        + layers * steps * best_linears(Stage::Decode)
        + cost::lm_head(&ci, Stage::Prefill)
        + steps * cost::lm_head(&ci, Stage::Decode)
}

fn score(objective: Objective, sc: &Scenario, total_s: f64) -> f64 {
    match objective {
        Objective::Throughput => sc.block_size() as f64 * sc.gen_len as f64 / total_s,
        Objective::Latency => -total_s,
    }
}

/// The best policy for a request, with its prediction and the solver's statistics.
pub fn solve(req: &SolveRequest) -> Result<Policy, SolveError> {
    let started = Instant::now();
    if req.prompt_len == 0 {
        return Err(SolveError::Invalid(
            "--prompt-len must be at least 1".into(),
        ));
    }
    if req.gen_len == 0 {
        return Err(SolveError::Invalid("--gen-len must be at least 1".into()));
    }
    if req.objective == Objective::Latency && req.latency_batch == 0 {
        return Err(SolveError::Invalid("--batch must be at least 1".into()));
    }
    if req.prompt_len.saturating_add(req.gen_len) > MAX_SEQUENCE_TOKENS {
        return Err(SolveError::Invalid(format!(
            "--prompt-len + --gen-len is {}; at most {MAX_SEQUENCE_TOKENS} tokens are supported",
            req.prompt_len.saturating_add(req.gen_len)
        )));
    }
    let limits = req.block_limits;
    if !limits.is_empty() && req.objective == Objective::Latency {
        return Err(SolveError::Invalid(
            "--block and --max-block apply to --objective throughput; latency uses --batch".into(),
        ));
    }
    if let Some([g, n]) = limits.fixed {
        if g == 0 || n == 0 || g > MAX_BATCH || n > MAX_BATCH {
            return Err(SolveError::Invalid(format!(
                "--block {g}x{n}: both numbers must be between 1 and {MAX_BATCH}"
            )));
        }
    }
    if limits.max_sequences == Some(0) {
        return Err(SolveError::Invalid("--max-block must be at least 1".into()));
    }
    if !limits.is_empty()
        && !GPU_BATCH_SIZES
            .iter()
            .any(|&g| NUM_GPU_BATCHES.iter().any(|&n| limits.allows(g, n)))
        && limits.fixed.is_none()
    {
        return Err(SolveError::Invalid(format!(
            "--max-block {}: no enumerated block shape is that small",
            limits.max_sequences.unwrap_or(0)
        )));
    }
    if req.latency_batch > MAX_BATCH {
        return Err(SolveError::Invalid(format!(
            "--batch is {}; at most {MAX_BATCH}",
            req.latency_batch
        )));
    }
    let caps = req.profile.capacities(&req.overrides);
    let have = caps.gpu_bytes + caps.cpu_bytes + caps.disk_bytes;
    let mut all = scenarios(req);
    // Try larger blocks first: they usually win on throughput, which makes bound pruning effective.
    if req.objective == Objective::Throughput {
        all.sort_by_key(|sc| std::cmp::Reverse(sc.block_size()));
    }
    let mut best: Option<(Scenario, ProgramOptimum, f64)> = None;
    let (mut solved, mut pruned) = (0u64, 0u64);
    for sc in &all {
        if home_bytes(req.model, sc) > have {
            pruned += 1;
            continue;
        }
        if let Some((_, _, best_score)) = &best {
            let bound = score(
                req.objective,
                sc,
                scenario_lower_bound(req.model, req.profile, sc),
            );
            if bound <= *best_score {
                pruned += 1;
                continue;
            }
        }
        solved += 1;
        if let Some(opt) = solve_program(req.model, req.profile, &caps, sc)? {
            let s = score(req.objective, sc, opt.total_s);
            if best.as_ref().is_none_or(|(_, _, b)| s > *b * (1.0 + 1e-9)) {
                best = Some((*sc, opt, s));
            }
        }
    }
    let Some((sc, mut opt, _)) = best else {
        return Err(cannot_fit(req, &caps, all.first().copied()));
    };
    // The program stages 2 x wd x W for disk-resident weights; the executor stages whole
    // matrices ([`memory::plan_placed`]), a little more. When that pushes the pick over the CPU's
    // capacity, solve the same scenario again with the capacity lowered by the excess.
    let mut lowered = caps;
    for attempt in 0..=4 {
        let policy = policy_from(req, &sc, &opt.shares);
        let placed = memory::plan_for_policy(req.model, &policy, sc.has_gpu);
        let excess = placed.cpu.total() - caps.cpu_bytes * (1.0 - CAPACITY_MARGIN);
        if excess <= 0.0 {
            break;
        }
        if attempt == 4 {
            // Never hand out a pick that does not fit.
            return Err(cannot_fit(req, &caps, Some(sc)));
        }
        lowered.cpu_bytes -= excess;
        match solve_program(req.model, req.profile, &lowered, &sc)? {
            Some(o) => opt = o,
            None => return Err(cannot_fit(req, &caps, Some(sc))),
        }
    }
    let mut policy = policy_from(req, &sc, &opt.shares);
    let mut prediction: Prediction = cost::evaluate(req.model, req.profile, &policy)
        .map_err(|e| SolveError::Invalid(e.to_string()))?;
    prediction.solver = Some(SolverInfo {
        status: "optimal".into(),
        solve_ms: started.elapsed().as_secs_f64() * 1e3,
        programs_solved: solved,
        programs_pruned: pruned,
    });
    policy.prediction = Some(prediction);
    Ok(policy)
}

/// Explains why nothing fits, naming the bytes needed against the bytes available.
fn cannot_fit(req: &SolveRequest, caps: &Capacities, any: Option<Scenario>) -> SolveError {
    let model = req.model.name.clone();
    let Some(first) = any else {
        return SolveError::Invalid("no configuration to try".into());
    };
    // The smallest configuration: one sequence (or the latency batch), both compressions on.
    let smallest = Scenario {
        gpu_batch_size: match req.objective {
            Objective::Throughput => 1,
            Objective::Latency => req.latency_batch,
        },
        num_gpu_batches: 1,
        compression: Compression {
            weights: req.allow_compression,
            kv_cache: req.allow_compression,
        },
        cpu_attention: true,
        ..first
    };
    let have = caps.gpu_bytes + caps.cpu_bytes + caps.disk_bytes;
    let needs = home_bytes(req.model, &smallest);
    if needs > have {
        return SolveError::CannotFit {
            model,
            needs_gib: needs / GIB,
            have_gib: have / GIB,
            detail: format!(
                "weights, KV cache and activations{} with {} sequence(s) exceed GPU + CPU + disk together",
                if req.allow_compression { " at 4-bit compression" } else { "" },
                smallest.gpu_batch_size
            ),
        };
    }
    // A tier whose fixed buffers alone overflow it.
    let fixed = memory::plan(req.model, &smallest, &[Shares::default(); 4]);
    for (tier, bytes, cap) in [
        ("GPU", fixed.gpu.total(), caps.gpu_bytes),
        ("CPU", fixed.cpu.total(), caps.cpu_bytes),
    ] {
        if bytes > cap {
            return SolveError::CannotFit {
                model,
                needs_gib: bytes / GIB,
                have_gib: cap / GIB,
                detail: format!(
                    "the {tier} alone must hold the embeddings and one batch's working buffers"
                ),
            };
        }
    }
    SolveError::CannotFit {
        model,
        needs_gib: needs / GIB,
        have_gib: have / GIB,
        detail: "no placement fits every tier's capacity with its staging buffers".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(
        model: &'a ModelSpec,
        profile: &'a Profile,
        objective: Objective,
    ) -> SolveRequest<'a> {
        SolveRequest {
            model,
            model_config: None,
            profile,
            profile_ref: "builtin:test".into(),
            objective,
            latency_batch: 4,
            prompt_len: 64,
            gen_len: 8,
            overrides: CapacityOverrides {
                gpu_mem_gib: Some(0.4),
                cpu_mem_gib: Some(2.0),
                disk_mem_gib: Some(20.0),
            },
            allow_compression: true,
            block_limits: Default::default(),
        }
    }

    #[test]
    fn block_limits_restrict_the_shapes_and_are_recorded() {
        let model = ModelSpec::builtin("opt-125m").unwrap();
        let profile = Profile::embedded("t4-flexgen").unwrap();
        let mut req = request(&model, &profile, Objective::Throughput);
        let free = solve(&req).unwrap();
        assert!(free.batch.gpu_batch_size * free.batch.num_gpu_batches > 16);
        req.block_limits.max_sequences = Some(16);
        let capped = solve(&req).unwrap();
        assert!(capped.batch.gpu_batch_size * capped.batch.num_gpu_batches <= 16);
        req.block_limits = BlockLimits {
            fixed: Some([3, 5]),
            max_sequences: None,
        };
        let fixed = solve(&req).unwrap();
        assert_eq!(
            (fixed.batch.gpu_batch_size, fixed.batch.num_gpu_batches),
            (3, 5)
        );
        // Written and read back with the limits, so `planner check` re-solves under them.
        let back = Policy::parse(&fixed.to_toml(), "fixed.toml").unwrap();
        assert_eq!(back.provenance.block_limits, req.block_limits);
        assert_eq!(back, fixed);
        // Nonsense limits are errors, not panics.
        req.block_limits.fixed = Some([0, 2]);
        assert!(matches!(solve(&req), Err(SolveError::Invalid(_))));
        req.block_limits = BlockLimits {
            fixed: None,
            max_sequences: Some(0),
        };
        assert!(matches!(solve(&req), Err(SolveError::Invalid(_))));
        let mut latency = request(&model, &profile, Objective::Latency);
        latency.block_limits.max_sequences = Some(4);
        assert!(matches!(solve(&latency), Err(SolveError::Invalid(_))));
    }

    /// Pruning (homes over capacity, compute-only lower bound) never discards the best scenario:
    /// the pruned search finds the same optimum as solving every program.
    #[test]
    fn pruned_search_finds_the_exhaustive_optimum() {
        let model = ModelSpec::builtin("opt-125m").unwrap();
        for profile_name in ["t4-flexgen", "cpu-2core-24gib"] {
            let profile = Profile::embedded(profile_name).unwrap();
            for objective in [Objective::Throughput, Objective::Latency] {
                let mut req = request(&model, &profile, objective);
                if !profile.has_gpu() {
                    req.overrides.gpu_mem_gib = None;
                }
                let caps = profile.capacities(&req.overrides);
                let mut best = f64::NEG_INFINITY;
                for sc in scenarios(&req) {
                    if let Some(opt) = solve_program(&model, &profile, &caps, &sc).unwrap() {
                        best = best.max(score(objective, &sc, opt.total_s));
                    }
                }
                let policy = solve(&req).unwrap();
                let pred = policy.prediction.unwrap();
                let found = match objective {
                    Objective::Throughput => pred.throughput_tok_s,
                    Objective::Latency => -pred.total_s,
                };
                assert!(
                    (found - best).abs() <= 1e-6 * best.abs(),
                    "{profile_name} {objective:?}: pruned {found}, exhaustive {best}"
                );
                let info = pred.solver.unwrap();
                if objective == Objective::Throughput {
                    assert!(info.programs_pruned > 0, "pruning never triggered");
                }
            }
        }
    }

    #[test]
    fn enumerated_sets_are_bounded_and_documented_sizes() {
        let model = ModelSpec::builtin("opt-125m").unwrap();
        let gpu = Profile::embedded("t4-flexgen").unwrap();
        let cpu = Profile::embedded("cpu-2core-24gib").unwrap();
        assert_eq!(
            scenarios(&request(&model, &gpu, Objective::Throughput)).len(),
            14 * 10 * 4 * 2
        );
        assert_eq!(
            scenarios(&request(&model, &cpu, Objective::Throughput)).len(),
            14 * 10 * 4
        );
        let mut no_compression = request(&model, &gpu, Objective::Latency);
        no_compression.allow_compression = false;
        let latency = scenarios(&no_compression);
        assert_eq!(latency.len(), 2);
        assert!(latency
            .iter()
            .all(|s| s.gpu_batch_size == 4 && s.num_gpu_batches == 1));
    }

    #[test]
    fn invalid_requests_are_errors_not_panics() {
        let model = ModelSpec::builtin("opt-125m").unwrap();
        let profile = Profile::embedded("t4-flexgen").unwrap();
        let mut req = request(&model, &profile, Objective::Latency);
        req.latency_batch = 0;
        assert!(matches!(solve(&req), Err(SolveError::Invalid(_))));
        req.latency_batch = 1;
        req.prompt_len = u64::MAX;
        assert!(matches!(solve(&req), Err(SolveError::Invalid(_))));
    }
}
