//! Meta's OPT family, matching Hugging Face transformers' `OPTForCausalLM` (modeling_opt.py).
//!
//! - Learned positions with an offset of 2; a token's position counts only the real tokens before
//!   it (transformers: `cumsum(mask) * mask - 1`), so left padding does not shift positions, and
//!   padding tokens use row 1.
//! - Pre-LayerNorm layers (every OPT but opt-350m), or post-LayerNorm (opt-350m) with
//!   `project_in` / `project_out` between a narrower embedding and the hidden size.
//! - The final LayerNorm exists only in pre-LN models (and not with `_remove_final_layer_norm`).
//! - ReLU FFN, queries scaled by `head_dim^-0.5`, LM head tied to the token embedding.

use super::{CausalLm, KvCache, LayerKv, NewRows, PlacedLinear, Step};
use crate::backend::{attention_scratch_len, Backend};
use crate::error::{ExecError, Result};
use crate::kernels::WeightData;
use crate::kernels::{KvDtype, KvRowsMut, Matrix};
use crate::quant::{attention_q4, linear_q4, QuantError, QuantizedMatrix};
use crate::weights::{add_row, to_f32_vec, ElementType, Init, RandomTensor, TensorId, WeightStore};
use planner::model::{ModelSpec, OPT_POSITION_OFFSET};
use std::path::Path;

/// LayerNorm epsilon of every OPT (torch's `nn.LayerNorm` default; OPT's config has no field).
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// Everything about an OPT model's structure: the planner's [`ModelSpec`] plus the config fields
/// that only change how the executor computes.
#[derive(Debug, Clone, PartialEq)]
pub struct OptConfig {
    /// Shapes, vocabulary and special tokens, shared with the planner's cost model.
    pub spec: ModelSpec,
    /// Linear layers have biases (`enable_bias`, true in every released OPT).
    pub enable_bias: bool,
    /// LayerNorms have weight and bias (`layer_norm_elementwise_affine`).
    pub layer_norm_affine: bool,
    /// The decoder ends with a LayerNorm (pre-LN models without `_remove_final_layer_norm`).
    pub final_layer_norm: bool,
    /// The LM head is the token embedding (`tie_word_embeddings`).
    pub tied_lm_head: bool,
}

impl OptConfig {
    /// A built-in configuration (`opt-125m` ... `opt-175b`).
    pub fn builtin(name: &str) -> Result<OptConfig> {
        Ok(Self::from_spec(ModelSpec::builtin(name)?))
    }

    /// The structure every released OPT checkpoint has, for a given spec.
    pub fn from_spec(spec: ModelSpec) -> OptConfig {
        OptConfig {
            final_layer_norm: spec.layer_norm_before,
            spec,
            enable_bias: true,
            layer_norm_affine: true,
            tied_lm_head: true,
        }
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_file(path: &Path) -> Result<OptConfig> {
        let spec = ModelSpec::from_hf_config(path)?;
        let text = std::fs::read_to_string(path).map_err(|e| ExecError::io(path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ExecError::ConfigField {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let flag = |field: &str, default: bool| -> Result<bool> {
            match json.get(field) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(serde_json::Value::Bool(b)) => Ok(*b),
                Some(other) => Err(ExecError::ConfigField {
                    path: path.to_path_buf(),
                    message: format!("field '{field}' is {other}; expected true or false"),
                }),
            }
        };
        let remove_final = flag("_remove_final_layer_norm", false)?;
        Ok(OptConfig {
            final_layer_norm: spec.layer_norm_before && !remove_final,
            enable_bias: flag("enable_bias", true)?,
            layer_norm_affine: flag("layer_norm_elementwise_affine", true)?,
            tied_lm_head: flag("tie_word_embeddings", true)?,
            spec,
        })
    }

    fn dims(&self) -> Dims {
        let s = &self.spec;
        Dims {
            hidden: s.hidden_size as usize,
            ffn: s.ffn_dim as usize,
            heads: s.num_heads as usize,
            head_dim: s.head_dim() as usize,
            vocab: s.vocab_size as usize,
            embed: s.word_embed_proj_dim as usize,
            layers: s.num_layers as usize,
            max_positions: s.max_positions as usize,
        }
    }

    /// Names, shapes and initialisations of every tensor, for [`crate::weights::RandomStore`].
    ///
    /// Scales keep activations and logits in a realistic range: matrices ~ 1/sqrt(fan_in) so each
    /// sublayer's output is O(1), embeddings 0.02 (OPT's init_std), LayerNorms at identity.
    pub fn random_layout(&self) -> Vec<RandomTensor> {
        let d = self.dims();
        let p = PREFIXES[0];
        let mut v = Vec::new();
        let mut push = |name: String, shape: Vec<usize>, init: Init| {
            v.push(RandomTensor { name, shape, init })
        };
        let linear = |fan_in: usize| Init::Uniform {
            std: 1.0 / (fan_in as f32).sqrt(),
        };
        let small = Init::Uniform { std: 0.02 };
        push(
            format!("{p}embed_tokens.weight"),
            vec![d.vocab, d.embed],
            small,
        );
        push(
            format!("{p}embed_positions.weight"),
            vec![d.max_positions + OPT_POSITION_OFFSET as usize, d.hidden],
            small,
        );
        if d.embed != d.hidden {
            push(
                format!("{p}project_in.weight"),
                vec![d.hidden, d.embed],
                linear(d.embed),
            );
            push(
                format!("{p}project_out.weight"),
                vec![d.embed, d.hidden],
                linear(d.hidden),
            );
        }
        let norm = |push: &mut dyn FnMut(String, Vec<usize>, Init), name: String| {
            if self.layer_norm_affine {
                push(
                    format!("{name}.weight"),
                    vec![d.hidden],
                    Init::Constant(1.0),
                );
                push(format!("{name}.bias"), vec![d.hidden], Init::Constant(0.0));
            }
        };
        if self.final_layer_norm {
            norm(&mut push, format!("{p}final_layer_norm"));
        }
        for l in 0..d.layers {
            let lp = format!("{p}layers.{l}.");
            for (name, out, inp) in [
                ("self_attn.q_proj", d.hidden, d.hidden),
                ("self_attn.k_proj", d.hidden, d.hidden),
                ("self_attn.v_proj", d.hidden, d.hidden),
                ("self_attn.out_proj", d.hidden, d.hidden),
                ("fc1", d.ffn, d.hidden),
                ("fc2", d.hidden, d.ffn),
            ] {
                push(format!("{lp}{name}.weight"), vec![out, inp], linear(inp));
                if self.enable_bias {
                    push(format!("{lp}{name}.bias"), vec![out], small);
                }
            }
            norm(&mut push, format!("{lp}self_attn_layer_norm"));
            norm(&mut push, format!("{lp}final_layer_norm"));
        }
        if !self.tied_lm_head {
            push("lm_head.weight".into(), vec![d.vocab, d.embed], small);
        }
        v
    }
}

/// Tensor name prefixes seen in OPT checkpoints: transformers' `OPTForCausalLM`, and Meta's
/// original uploads (`OPTModel` layout).
const PREFIXES: [&str; 2] = ["model.decoder.", "decoder."];

#[derive(Debug, Clone, Copy)]
struct Dims {
    hidden: usize,
    ffn: usize,
    heads: usize,
    head_dim: usize,
    vocab: usize,
    embed: usize,
    layers: usize,
    max_positions: usize,
}

/// A LayerNorm's parameters, widened to f32 at load.
struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

impl Norm {
    /// Normalizes the rows of `x` (each `width` wide) into `y` with OPT's epsilon.
    fn apply(&self, be: &dyn Backend, x: &[f32], width: usize, y: &mut [f32]) {
        be.layer_norm(x, width, &self.gamma, &self.beta, LAYER_NORM_EPS, y);
    }
}

/// A linear layer: its matrix stays in the store, its bias is widened to f32 at load.
struct Linear {
    weight: TensorId,
    bias: Option<Vec<f32>>,
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    attn_norm: Norm,
    fc1: Linear,
    fc2: Linear,
    ffn_norm: Norm,
}

/// An OPT model whose weights live in a [`WeightStore`].
pub struct OptModel {
    config: OptConfig,
    dims: Dims,
    store: Box<dyn WeightStore>,
    embed_tokens: TensorId,
    embed_positions: TensorId,
    project_in: Option<TensorId>,
    project_out: Option<TensorId>,
    final_norm: Option<Norm>,
    lm_head: TensorId,
    layers: Vec<Layer>,
}

/// Resolves tensors by name and checks their shapes against the config.
struct Resolver<'a> {
    store: &'a dyn WeightStore,
    prefix: &'static str,
}

impl Resolver<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<TensorId> {
        let full = if name.starts_with("lm_head") {
            name.to_string()
        } else {
            format!("{}{name}", self.prefix)
        };
        let id = self.store.find(&full)?;
        let meta = self.store.meta(id);
        if meta.shape != shape {
            return Err(ExecError::TensorShape {
                name: full,
                file: meta.origin.clone(),
                expected: shape.to_vec(),
                found: meta.shape.clone(),
            });
        }
        Ok(id)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let id = self.tensor(name, &[len])?;
        Ok(to_f32_vec(&self.store.data(id)))
    }

    fn linear(&self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        Ok(Linear {
            weight: self.tensor(&format!("{name}.weight"), &[out, inp])?,
            bias: if bias {
                Some(self.vector(&format!("{name}.bias"), out)?)
            } else {
                None
            },
        })
    }

    fn norm(&self, name: &str, width: usize, affine: bool) -> Result<Norm> {
        if !affine {
            return Ok(Norm {
                gamma: vec![1.0; width],
                beta: vec![0.0; width],
            });
        }
        Ok(Norm {
            gamma: self.vector(&format!("{name}.weight"), width)?,
            beta: self.vector(&format!("{name}.bias"), width)?,
        })
    }
}

impl OptModel {
    /// Builds the model from a store, checking every tensor's presence, dtype and shape.
    pub fn load(config: OptConfig, store: Box<dyn WeightStore>) -> Result<OptModel> {
        let d = config.dims();
        // Pick the naming scheme from the token embedding; report the transformers name if absent.
        let prefix = PREFIXES
            .iter()
            .find(|p| store.find(&format!("{p}embed_tokens.weight")).is_ok())
            .copied()
            .unwrap_or(PREFIXES[0]);
        let r = Resolver {
            store: store.as_ref(),
            prefix,
        };
        let bias = config.enable_bias;
        let affine = config.layer_norm_affine;
        let embed_tokens = r.tensor("embed_tokens.weight", &[d.vocab, d.embed])?;
        let embed_positions = r.tensor(
            "embed_positions.weight",
            &[d.max_positions + OPT_POSITION_OFFSET as usize, d.hidden],
        )?;
        let (project_in, project_out) = if d.embed != d.hidden {
            (
                Some(r.tensor("project_in.weight", &[d.hidden, d.embed])?),
                Some(r.tensor("project_out.weight", &[d.embed, d.hidden])?),
            )
        } else {
            (None, None)
        };
        let final_norm = if config.final_layer_norm {
            Some(r.norm("final_layer_norm", d.hidden, affine)?)
        } else {
            None
        };
        let lm_head = if config.tied_lm_head {
            embed_tokens
        } else {
            r.tensor("lm_head.weight", &[d.vocab, d.embed])?
        };
        let mut layers = Vec::with_capacity(d.layers);
        for l in 0..d.layers {
            let p = format!("layers.{l}.");
            let h = d.hidden;
            layers.push(Layer {
                q: r.linear(&format!("{p}self_attn.q_proj"), h, h, bias)?,
                k: r.linear(&format!("{p}self_attn.k_proj"), h, h, bias)?,
                v: r.linear(&format!("{p}self_attn.v_proj"), h, h, bias)?,
                out: r.linear(&format!("{p}self_attn.out_proj"), h, h, bias)?,
                attn_norm: r.norm(&format!("{p}self_attn_layer_norm"), h, affine)?,
                fc1: r.linear(&format!("{p}fc1"), d.ffn, h, bias)?,
                fc2: r.linear(&format!("{p}fc2"), h, d.ffn, bias)?,
                ffn_norm: r.norm(&format!("{p}final_layer_norm"), h, affine)?,
            });
        }
        Ok(OptModel {
            config,
            dims: d,
            store,
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            final_norm,
            lm_head,
            layers,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &OptConfig {
        &self.config
    }

    /// The store the weights come from.
    pub fn store(&self) -> &dyn WeightStore {
        self.store.as_ref()
    }

    /// Element type of the weight matrices (the LM head's; checkpoints use one type throughout).
    pub fn matrix_dtype(&self) -> ElementType {
        self.store.meta(self.lm_head).dtype
    }

    fn matrix(&self, id: TensorId) -> Matrix<'_> {
        let meta = self.store.meta(id);
        Matrix {
            data: self.store.data(id),
            out_features: meta.shape[0],
            in_features: meta.shape[1],
        }
    }

    fn matrix_bytes(&self, id: TensorId) -> u64 {
        let m = self.store.meta(id);
        (m.shape.iter().product::<usize>() * m.dtype.size()) as u64
    }
}

/// `len` zeros written now, so that their pages are faulted in while the buffers are set up
/// rather than inside the first (timed) forward pass: `vec![0.0; n]` maps zero pages lazily.
fn touched(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    v.resize(len, 0.0);
    v
}

/// Buffers of one OPT forward pass, sized for the largest step (the prefill).
pub struct OptWorkspace {
    hidden: Vec<f32>,
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    sublayer_out: Vec<f32>,
    ffn: Vec<f32>,
    embed: Vec<f32>,
    last: Vec<f32>,
    last_normed: Vec<f32>,
    last_projected: Vec<f32>,
    scratch: Vec<f32>,
}

impl CausalLm for OptModel {
    type Workspace = OptWorkspace;

    fn vocab_size(&self) -> usize {
        self.dims.vocab
    }

    fn max_positions(&self) -> usize {
        self.dims.max_positions
    }

    fn num_layers(&self) -> usize {
        self.dims.layers
    }

    fn kv_width(&self) -> usize {
        self.dims.hidden
    }

    fn kv_dtype(&self) -> KvDtype {
        self.matrix_dtype().kv_dtype()
    }

    fn eos_token_id(&self) -> u32 {
        self.config.spec.eos_token_id
    }

    fn pad_token_id(&self) -> u32 {
        self.config.spec.pad_token_id
    }

    fn weight_bytes(&self) -> u64 {
        let mut bytes = self.matrix_bytes(self.lm_head);
        for id in [self.project_in, self.project_out].into_iter().flatten() {
            bytes += self.matrix_bytes(id);
        }
        for l in &self.layers {
            for lin in [&l.q, &l.k, &l.v, &l.out, &l.fc1, &l.fc2] {
                bytes += self.matrix_bytes(lin.weight);
                bytes += lin.bias.as_ref().map_or(0, |b| b.len() as u64 * 4);
            }
            bytes += 4 * 4 * self.dims.hidden as u64;
        }
        bytes
    }

    fn workspace(&self, batch: usize, max_new_tokens: usize, max_len: usize) -> OptWorkspace {
        let d = &self.dims;
        let rows = batch * max_new_tokens;
        let has_projection = d.embed != d.hidden;
        OptWorkspace {
            hidden: touched(rows * d.hidden),
            normed: touched(rows * d.hidden),
            q: touched(rows * d.hidden),
            k: touched(rows * d.hidden),
            v: touched(rows * d.hidden),
            attn: touched(rows * d.hidden),
            sublayer_out: touched(rows * d.hidden),
            ffn: touched(rows * d.ffn),
            embed: touched(if has_projection { rows * d.embed } else { 0 }),
            last: touched(batch * d.hidden),
            last_normed: touched(batch * d.hidden),
            last_projected: touched(batch * d.embed),
            scratch: touched(attention_scratch_len(max_len, d.heads, d.head_dim)),
        }
    }

    fn forward(
        &self,
        be: &dyn Backend,
        step: &Step,
        kv: &mut KvCache,
        ws: &mut OptWorkspace,
        logits: &mut [f32],
    ) {
        self.embed(be, step, ws);
        for l in 0..self.dims.layers {
            let mats = self.store_matrices(l);
            self.layer(be, l, &mats, step, &mut CacheLayer { kv, layer: l }, ws);
        }
        self.head(be, step, ws, logits);
    }
}

/// One layer's slice of a [`KvCache`], as [`LayerKv`].
struct CacheLayer<'a> {
    kv: &'a mut KvCache,
    layer: usize,
}

impl LayerKv for CacheLayer<'_> {
    fn rows(&mut self, seq: usize) -> (KvRowsMut<'_>, KvRowsMut<'_>) {
        self.kv.layer_rows_mut(self.layer, seq)
    }
}

/// The six matrices of one decoder layer, wherever their elements are (the memory-mapped
/// checkpoint, or a staging buffer the disk tier read them into).
pub struct LayerMatrices<'a> {
    /// Query projection.
    pub q: Matrix<'a>,
    /// Key projection.
    pub k: Matrix<'a>,
    /// Value projection.
    pub v: Matrix<'a>,
    /// Attention output projection.
    pub out: Matrix<'a>,
    /// FFN up projection.
    pub fc1: Matrix<'a>,
    /// FFN down projection.
    pub fc2: Matrix<'a>,
    /// 4-bit group-wise copies of the six matrices (q, k, v, out, fc1, fc2), used instead of the
    /// dense ones when present (policy `compression.weights`).
    pub compressed: Option<&'a [QuantizedMatrix]>,
    /// Products that run (partly) on a device: the GPU tiers' resident and split matrices.
    pub placed: Option<&'a dyn PlacedLinear>,
}

/// Names of the six matrices of a layer, in the order of [`OptModel::layer_weight_ids`].
pub const LAYER_MATRICES: [&str; 6] = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"];

impl OptModel {
    /// Repacks the matrices the CPU multiplies into the kernels' panels (see
    /// [`crate::kernels::pack_panels`]): every layer matrix not marked in `on_disk` (those are
    /// read from the file with direct I/O in nn.Linear layout), the LM head (also the tied
    /// embedding table, which reads rows back from the panels) and opt-350m's projections. Only
    /// bf16 matrices are packed. Returns the bytes packed; `progress` receives them as they are.
    pub fn pack_panels(&mut self, on_disk: &[[bool; 6]], progress: &(dyn Fn(u64) + Sync)) -> u64 {
        let ids = self.matrix_ids(on_disk);
        self.store.pack_panels(&ids, progress)
    }

    /// Every matrix a linear product reads (layer matrices except those marked in `on_disk`, the
    /// LM head, the projections), each once, in store order.
    fn matrix_ids(&self, on_disk: &[[bool; 6]]) -> Vec<TensorId> {
        let mut ids: Vec<TensorId> = (0..self.layers.len())
            .flat_map(|l| {
                let disk = on_disk.get(l).copied().unwrap_or([false; 6]);
                self.layer_weight_ids(l)
                    .into_iter()
                    .zip(disk)
                    .filter(|(_, d)| !d)
                    .map(|(id, _)| id)
            })
            .collect();
        ids.extend(
            [Some(self.lm_head), self.project_in, self.project_out]
                .into_iter()
                .flatten(),
        );
        ids.sort_by_key(|id| id.index());
        ids.dedup();
        ids
    }

    /// Tensor ids of layer `l`'s matrices: q, k, v, out, fc1, fc2 (biases and norms are held in
    /// CPU memory as f32 by the model and are not part of any tier's placement).
    pub fn layer_weight_ids(&self, l: usize) -> [TensorId; 6] {
        let x = &self.layers[l];
        [
            x.q.weight,
            x.k.weight,
            x.v.weight,
            x.out.weight,
            x.fc1.weight,
            x.fc2.weight,
        ]
    }

    /// Biases of layer `l`'s matrices (f32, held in host memory), in the order of
    /// [`OptModel::layer_weight_ids`]: the GPU tiers copy the device share of them.
    pub fn layer_biases(&self, l: usize) -> [Option<&[f32]>; 6] {
        let x = &self.layers[l];
        [&x.q, &x.k, &x.v, &x.out, &x.fc1, &x.fc2].map(|lin| lin.bias.as_deref())
    }

    /// Layer `l`'s matrices read from the store in place.
    pub fn store_matrices(&self, l: usize) -> LayerMatrices<'_> {
        let ids = self.layer_weight_ids(l);
        LayerMatrices {
            q: self.matrix(ids[0]),
            k: self.matrix(ids[1]),
            v: self.matrix(ids[2]),
            out: self.matrix(ids[3]),
            fc1: self.matrix(ids[4]),
            fc2: self.matrix(ids[5]),
            compressed: None,
            placed: None,
        }
    }

    /// 4-bit group-wise copies of layer `l`'s six matrices, compressed from the store.
    pub fn compress_layer(
        &self,
        l: usize,
    ) -> std::result::Result<Vec<QuantizedMatrix>, QuantError> {
        self.layer_weight_ids(l)
            .iter()
            .map(|id| QuantizedMatrix::from_matrix(&self.matrix(*id)))
            .collect()
    }

    /// A matrix of tensor `id`'s shape over elements held elsewhere (a staging buffer).
    pub fn matrix_over<'a>(&self, id: TensorId, data: WeightData<'a>) -> Matrix<'a> {
        let meta = self.store.meta(id);
        Matrix {
            data,
            out_features: meta.shape[0],
            in_features: meta.shape[1],
        }
    }

    /// Token and position embeddings of `step` into the workspace's hidden state.
    pub fn embed(&self, be: &dyn Backend, step: &Step, ws: &mut OptWorkspace) {
        let d = &self.dims;
        let (h, t_new, batch) = (d.hidden, step.new_tokens, step.batch);
        let rows = batch * t_new;
        let max_len = step.key_valid.len() / batch.max(1);
        // Token embeddings (projected up in opt-350m-style models), then learned positions.
        let tokens = self.store.data(self.embed_tokens);
        if let Some(project_in) = self.project_in {
            let e = d.embed;
            let embed = &mut ws.embed[..rows * e];
            embed.fill(0.0);
            for (r, row) in embed.chunks_exact_mut(e).enumerate() {
                add_row(&tokens, step.tokens[r] as usize, e, row);
            }
            be.linear(
                embed,
                rows,
                &self.matrix(project_in),
                None,
                &mut ws.hidden[..rows * h],
            );
        } else {
            let hidden = &mut ws.hidden[..rows * h];
            hidden.fill(0.0);
            for (r, row) in hidden.chunks_exact_mut(h).enumerate() {
                add_row(&tokens, step.tokens[r] as usize, h, row);
            }
        }
        let positions = self.store.data(self.embed_positions);
        for (r, row) in ws.hidden[..rows * h].chunks_exact_mut(h).enumerate() {
            let (b, t) = (r / t_new, r % t_new);
            let valid = step.key_valid[b * max_len + step.start + t];
            // transformers: position = cumsum(mask) * mask - 1, plus the offset 2; padding -> 1.
            let row_index = if valid {
                step.positions[r] as usize + OPT_POSITION_OFFSET as usize
            } else {
                OPT_POSITION_OFFSET as usize - 1
            };
            add_row(&positions, row_index, h, row);
        }
    }

    /// Decoder layer `l` over the workspace's hidden state, with matrices `mats`, appending the
    /// step's keys and values to `kv` and attending over them.
    pub fn layer(
        &self,
        be: &dyn Backend,
        l: usize,
        mats: &LayerMatrices,
        step: &Step,
        kv: &mut dyn LayerKv,
        ws: &mut OptWorkspace,
    ) {
        let d = &self.dims;
        let (h, t_new, batch) = (d.hidden, step.new_tokens, step.batch);
        let rows = batch * t_new;
        let max_len = step.key_valid.len() / batch.max(1);
        let pre_ln = self.config.spec.layer_norm_before;
        let kv_len = step.start + t_new;
        let scale = (d.head_dim as f32).powf(-0.5);
        let layer = &self.layers[l];
        {
            // Self-attention.
            let x: &[f32] = if pre_ln {
                layer
                    .attn_norm
                    .apply(be, &ws.hidden[..rows * h], h, &mut ws.normed[..rows * h]);
                &ws.normed[..rows * h]
            } else {
                &ws.hidden[..rows * h]
            };
            for (i, (lin, lin_m, out)) in [
                (&layer.q, &mats.q, &mut ws.q),
                (&layer.k, &mats.k, &mut ws.k),
                (&layer.v, &mats.v, &mut ws.v),
            ]
            .into_iter()
            .enumerate()
            {
                let y = &mut out[..rows * h];
                linear_any(be, x, rows, lin_m, mats, i, lin.bias.as_deref(), y);
            }
            // As transformers: q_proj(x) * head_dim^-0.5, then unscaled scores.
            be.scale_inplace(&mut ws.q[..rows * h], scale);
            // Keys and values as the cache holds them (the model's dtype), before any copy.
            let kv_dtype = self.kv_dtype();
            kv_dtype.round_in_place(&mut ws.k[..rows * h]);
            kv_dtype.round_in_place(&mut ws.v[..rows * h]);
            let seq_rows = t_new * h;
            for b in 0..batch {
                let span = b * seq_rows..(b + 1) * seq_rows;
                let valid = &step.key_valid[b * max_len..b * max_len + kv_len];
                let out = &mut ws.attn[b * seq_rows..(b + 1) * seq_rows];
                let q = &ws.q[span.clone()];
                if let Some((keys, values)) = kv.compressed(b) {
                    // Rows are a whole number of `width` values, so appending cannot fail.
                    let pushed = keys
                        .push_rows(&ws.k[span.clone()])
                        .and_then(|_| values.push_rows(&ws.v[span]));
                    debug_assert!(pushed.is_ok(), "KV rows of the wrong width");
                    attention_q4(
                        q, t_new, keys, values, kv_len, valid, d.heads, d.head_dim, 1.0, out,
                    );
                    continue;
                }
                let rows_in = NewRows {
                    q,
                    k: &ws.k[span.clone()],
                    v: &ws.v[span.clone()],
                    start: step.start,
                    q_len: t_new,
                    key_valid: valid,
                    num_heads: d.heads,
                    head_dim: d.head_dim,
                };
                if kv.attend(b, &rows_in, out) {
                    continue;
                }
                let (mut keys, mut values) = kv.rows(b);
                let at = step.start * h;
                keys.write(at, &ws.k[span.clone()]);
                values.write(at, &ws.v[span]);
                be.attention(
                    q,
                    t_new,
                    keys.rows().slice(0..kv_len * h),
                    values.rows().slice(0..kv_len * h),
                    kv_len,
                    valid,
                    d.heads,
                    d.head_dim,
                    1.0,
                    out,
                    &mut ws.scratch,
                );
            }
            linear_any(
                be,
                &ws.attn[..rows * h],
                rows,
                &mats.out,
                mats,
                3,
                layer.out.bias.as_deref(),
                &mut ws.sublayer_out[..rows * h],
            );
            be.add_inplace(&mut ws.hidden[..rows * h], &ws.sublayer_out[..rows * h]);
            if !pre_ln {
                layer
                    .attn_norm
                    .apply(be, &ws.hidden[..rows * h], h, &mut ws.normed[..rows * h]);
                std::mem::swap(&mut ws.hidden, &mut ws.normed);
            }

            // Feed-forward.
            let x: &[f32] = if pre_ln {
                layer
                    .ffn_norm
                    .apply(be, &ws.hidden[..rows * h], h, &mut ws.normed[..rows * h]);
                &ws.normed[..rows * h]
            } else {
                &ws.hidden[..rows * h]
            };
            let ffn = &mut ws.ffn[..rows * d.ffn];
            linear_any(
                be,
                x,
                rows,
                &mats.fc1,
                mats,
                4,
                layer.fc1.bias.as_deref(),
                ffn,
            );
            be.relu_inplace(ffn);
            linear_any(
                be,
                ffn,
                rows,
                &mats.fc2,
                mats,
                5,
                layer.fc2.bias.as_deref(),
                &mut ws.sublayer_out[..rows * h],
            );
            be.add_inplace(&mut ws.hidden[..rows * h], &ws.sublayer_out[..rows * h]);
            if !pre_ln {
                layer
                    .ffn_norm
                    .apply(be, &ws.hidden[..rows * h], h, &mut ws.normed[..rows * h]);
                std::mem::swap(&mut ws.hidden, &mut ws.normed);
            }
        }
    }

    /// Final LayerNorm, projection and LM head of each sequence's last new token into `logits`
    /// (`[batch, vocab]`).
    pub fn head(&self, be: &dyn Backend, step: &Step, ws: &mut OptWorkspace, logits: &mut [f32]) {
        let d = &self.dims;
        let (h, t_new, batch) = (d.hidden, step.new_tokens, step.batch);
        // Only each sequence's last token needs logits.
        for b in 0..batch {
            let row = (b * t_new + t_new - 1) * h;
            ws.last[b * h..(b + 1) * h].copy_from_slice(&ws.hidden[row..row + h]);
        }
        let mut x: &[f32] = &ws.last[..batch * h];
        if let Some(n) = &self.final_norm {
            n.apply(be, x, h, &mut ws.last_normed[..batch * h]);
            x = &ws.last_normed[..batch * h];
        }
        if let Some(project_out) = self.project_out {
            be.linear(
                x,
                batch,
                &self.matrix(project_out),
                None,
                &mut ws.last_projected[..batch * d.embed],
            );
            x = &ws.last_projected[..batch * d.embed];
        }
        be.linear(
            x,
            batch,
            &self.matrix(self.lm_head),
            None,
            &mut logits[..batch * d.vocab],
        );
    }
}

/// Matrix `i` of a layer: on the device when the GPU tiers place it there, else the compressed
/// copy through `linear_q4` when there is one, else the dense matrix through the backend.
#[allow(clippy::too_many_arguments)]
fn linear_any(
    be: &dyn Backend,
    x: &[f32],
    rows: usize,
    dense: &Matrix,
    mats: &LayerMatrices,
    i: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    if let Some(p) = mats.placed {
        if p.linear(i, x, rows, dense, bias, y) {
            return;
        }
    }
    match mats.compressed {
        Some(q) => linear_q4(x, rows, &q[i], bias, y),
        None => be.linear(x, rows, dense, bias, y),
    }
}

impl OptWorkspace {
    /// Bytes allocated (`planner::memory::cpu_workspace_bytes` plans them).
    pub fn bytes(&self) -> u64 {
        [
            &self.hidden,
            &self.normed,
            &self.q,
            &self.k,
            &self.v,
            &self.attn,
            &self.sublayer_out,
            &self.ffn,
            &self.embed,
            &self.last,
            &self.last_normed,
            &self.last_projected,
            &self.scratch,
        ]
        .iter()
        .map(|b| (b.capacity() * 4) as u64)
        .sum()
    }

    /// The hidden state of the step's rows (`[batch * new_tokens, hidden]` at the front): the
    /// block schedule saves it between layers and restores it for each GPU batch.
    pub fn hidden_mut(&mut self) -> &mut [f32] {
        &mut self.hidden
    }
}
