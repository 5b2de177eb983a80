//! Model specifications: the shapes of a transformer and every byte size derived from them.
//!
//! Both the planner's cost model and the executor's memory plan read sizes from here, so the two
//! can never disagree about how large a layer, a KV-cache entry or an activation is.

use serde::{Deserialize, Serialize};
use std::path::Path;
use thiserror::Error;

/// Why a model specification could not be built.
#[derive(Debug, Error)]
pub enum ModelError {
    /// `--model NAME` named no built-in configuration.
    #[error("unknown model '{name}': built-in models are {known}; or pass --model-config path/config.json")]
    UnknownModel { name: String, known: String },
    /// The config file could not be read.
    #[error("cannot read model config {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid JSON.
    #[error("model config {path} is not valid JSON: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// The config describes a model family Strata does not run (yet).
    #[error("model config {path}: model_type is '{found}', expected 'opt' (only the OPT family is supported so far)")]
    UnsupportedFamily { path: String, found: String },
    /// A field is missing or has an impossible value.
    #[error("model config {path}: field '{field}' {problem}")]
    BadField {
        path: String,
        field: &'static str,
        problem: String,
    },
}

/// Model family: decides the layer structure the executor builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Meta's OPT: learned positions (offset 2), LayerNorm, ReLU FFN, tied LM head.
    Opt,
}

/// Element type of stored weights; sizes in the cost model follow from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub fn bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
}

/// Bits per value of FlexGen-style 4-bit group-wise quantization: 4 bits per value plus an fp16
/// scale and an fp16 minimum shared by each group of 64 values (4 + 32/64 = 4.5).
pub const COMPRESSED_BITS_PER_VALUE: f64 = 4.5;
/// Values per quantization group (FlexGen's choice).
pub const COMPRESSION_GROUP_SIZE: u64 = 64;

/// The shapes of one model. Everything the planner and executor need to size buffers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Short name, e.g. `opt-6.7b`, used in policy files and reports.
    pub name: String,
    pub family: Family,
    /// Number of decoder layers (l).
    pub num_layers: u64,
    /// Hidden size (h1).
    pub hidden_size: u64,
    /// FFN inner size (h2).
    pub ffn_dim: u64,
    /// Attention heads (nh).
    pub num_heads: u64,
    pub vocab_size: u64,
    /// Learned position table length (without OPT's offset of 2).
    pub max_positions: u64,
    /// Width of the token embedding; differs from `hidden_size` only in opt-350m-style models,
    /// which then have `project_in` / `project_out` matrices.
    pub word_embed_proj_dim: u64,
    /// Pre-LayerNorm (true for every OPT but opt-350m, which is post-LN).
    pub layer_norm_before: bool,
    /// Element type of the weights as stored in the checkpoint.
    pub dtype: DType,
    /// Token ids the tokenizer and generation loop need.
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
}

/// Largest hidden, FFN or head count accepted from a config (2^20; OPT-175B uses 49152).
pub const MAX_WIDTH: u64 = 1 << 20;
/// Largest number of layers accepted from a config.
pub const MAX_LAYERS: u64 = 1 << 12;
/// Largest vocabulary or position table accepted from a config.
pub const MAX_VOCAB: u64 = 1 << 24;

/// OPT's learned position embedding has 2 extra rows at the start (a fairseq legacy).
pub const OPT_POSITION_OFFSET: u64 = 2;

/// The built-in OPT configurations (design section 7).
const BUILTIN_OPT: &[(&str, u64, u64, u64, u64)] = &[
    // name, layers, hidden, heads, ffn
    ("opt-125m", 12, 768, 12, 3072),
    ("opt-350m", 24, 1024, 16, 4096),
    ("opt-1.3b", 24, 2048, 32, 8192),
    ("opt-2.7b", 32, 2560, 32, 10240),
    ("opt-6.7b", 32, 4096, 32, 16384),
    ("opt-13b", 40, 5120, 40, 20480),
    ("opt-30b", 48, 7168, 56, 28672),
    ("opt-66b", 64, 9216, 72, 36864),
    ("opt-175b", 96, 12288, 96, 49152),
];

/// Names accepted by [`ModelSpec::builtin`].
pub fn builtin_names() -> Vec<&'static str> {
    BUILTIN_OPT.iter().map(|m| m.0).collect()
}

impl ModelSpec {
    /// A built-in OPT configuration by name (`opt-125m` ... `opt-175b`), weights in fp16.
    pub fn builtin(name: &str) -> Result<ModelSpec, ModelError> {
        let lower = name.to_ascii_lowercase();
        let &(name, layers, hidden, heads, ffn) = BUILTIN_OPT
            .iter()
            .find(|m| m.0 == lower)
            .ok_or_else(|| ModelError::UnknownModel {
                name: name.to_string(),
                known: builtin_names().join(", "),
            })?;
        let is_350m = name == "opt-350m";
        Ok(ModelSpec {
            name: name.to_string(),
            family: Family::Opt,
            num_layers: layers,
            hidden_size: hidden,
            ffn_dim: ffn,
            num_heads: heads,
            vocab_size: 50272,
            max_positions: 2048,
            word_embed_proj_dim: if is_350m { 512 } else { hidden },
            layer_norm_before: !is_350m,
            dtype: DType::F16,
            bos_token_id: 2,
            eos_token_id: 2,
            pad_token_id: 1,
        })
    }

    /// Reads a Hugging Face `config.json` of an OPT model.
    pub fn from_hf_config(path: &Path) -> Result<ModelSpec, ModelError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: shown.clone(),
            source,
        })?;
        let name = path
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "custom".into());
        Self::from_hf_config_str(&text, &shown, &name)
    }

    /// Parses the text of a Hugging Face `config.json`; `path` is only used in error messages.
    pub fn from_hf_config_str(text: &str, path: &str, name: &str) -> Result<ModelSpec, ModelError> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|source| ModelError::Json {
                path: path.to_string(),
                source,
            })?;
        let model_type = v.get("model_type").and_then(|t| t.as_str()).unwrap_or("");
        if model_type != "opt" {
            return Err(ModelError::UnsupportedFamily {
                path: path.to_string(),
                found: if model_type.is_empty() {
                    "(missing)".into()
                } else {
                    model_type.into()
                },
            });
        }
        let bad = |field: &'static str, problem: String| ModelError::BadField {
            path: path.to_string(),
            field,
            problem,
        };
        let uint = |field: &'static str| -> Result<u64, ModelError> {
            match v.get(field) {
                None => Err(bad(field, "is missing; expected a positive integer".into())),
                Some(x) => match x.as_u64() {
                    Some(n) if n > 0 => Ok(n),
                    _ => Err(bad(field, format!("is {x}; expected a positive integer"))),
                },
            }
        };
        let opt_uint = |field: &'static str, default: u64| -> Result<u64, ModelError> {
            match v.get(field) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(x) => x
                    .as_u64()
                    .ok_or_else(|| bad(field, format!("is {x}; expected a non-negative integer"))),
            }
        };
        // Upper bounds far above any real model keep every size computation well inside u64.
        let bounded = |field: &'static str, max: u64| -> Result<u64, ModelError> {
            let n = uint(field)?;
            if n > max {
                Err(bad(field, format!("is {n}; expected at most {max}")))
            } else {
                Ok(n)
            }
        };
        let hidden_size = bounded("hidden_size", MAX_WIDTH)?;
        let num_heads = bounded("num_attention_heads", MAX_WIDTH)?;
        if hidden_size % num_heads != 0 {
            return Err(bad(
                "num_attention_heads",
                format!("is {num_heads}, which does not divide hidden_size {hidden_size}"),
            ));
        }
        let dtype = match v
            .get("torch_dtype")
            .or_else(|| v.get("dtype"))
            .and_then(|d| d.as_str())
        {
            Some("float32") => DType::F32,
            Some("bfloat16") => DType::Bf16,
            Some("float16") | None => DType::F16,
            Some(other) => {
                return Err(bad(
                    "torch_dtype",
                    format!("is '{other}'; expected float32, float16 or bfloat16"),
                ))
            }
        };
        let activation = v
            .get("activation_function")
            .and_then(|a| a.as_str())
            .unwrap_or("relu");
        if activation != "relu" {
            return Err(bad(
                "activation_function",
                format!("is '{activation}'; only relu (every released OPT) is supported"),
            ));
        }
        let to_u32 = |field: &'static str, default: u64| -> Result<u32, ModelError> {
            let n = opt_uint(field, default)?;
            u32::try_from(n).map_err(|_| bad(field, format!("is {n}; too large for a token id")))
        };
        Ok(ModelSpec {
            name: name.to_string(),
            family: Family::Opt,
            num_layers: bounded("num_hidden_layers", MAX_LAYERS)?,
            hidden_size,
            ffn_dim: bounded("ffn_dim", MAX_WIDTH)?,
            num_heads,
            vocab_size: bounded("vocab_size", MAX_VOCAB)?,
            max_positions: bounded("max_position_embeddings", MAX_VOCAB)?,
            word_embed_proj_dim: {
                let w = opt_uint("word_embed_proj_dim", hidden_size)?;
                if w == 0 || w > MAX_WIDTH {
                    return Err(bad(
                        "word_embed_proj_dim",
                        format!("is {w}; expected 1 to {MAX_WIDTH}"),
                    ));
                }
                w
            },
            layer_norm_before: v
                .get("do_layer_norm_before")
                .and_then(|b| b.as_bool())
                .unwrap_or(true),
            dtype,
            bos_token_id: to_u32("bos_token_id", 2)?,
            eos_token_id: to_u32("eos_token_id", 2)?,
            pad_token_id: to_u32("pad_token_id", 1)?,
        })
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> u64 {
        self.hidden_size / self.num_heads
    }

    /// Whether the model has `project_in` / `project_out` (opt-350m style).
    pub fn has_projections(&self) -> bool {
        self.word_embed_proj_dim != self.hidden_size
    }

    /// Parameters of one decoder layer: q, k, v, out projections (h1 x h1 + bias each), fc1
    /// (h1 x h2 + bias), fc2 (h2 x h1 + bias), two LayerNorms (weight + bias each).
    pub fn params_per_layer(&self) -> u64 {
        let h1 = self.hidden_size;
        let h2 = self.ffn_dim;
        4 * (h1 * h1 + h1) + (h1 * h2 + h2) + (h2 * h1 + h1) + 2 * 2 * h1
    }

    /// Parameters outside the decoder layers: token and position embeddings, the final LayerNorm,
    /// and the projections of opt-350m-style models. The LM head is tied to the token embedding.
    pub fn params_outside_layers(&self) -> u64 {
        let e = self.word_embed_proj_dim;
        let h1 = self.hidden_size;
        let token = self.vocab_size * e;
        let position = (self.max_positions + OPT_POSITION_OFFSET) * h1;
        let final_ln = 2 * h1;
        let projections = if self.has_projections() {
            2 * e * h1
        } else {
            0
        };
        token + position + final_ln + projections
    }

    /// Total parameters.
    pub fn total_params(&self) -> u64 {
        self.num_layers * self.params_per_layer() + self.params_outside_layers()
    }

    /// Bytes of one decoder layer's weights, uncompressed, at `dtype`.
    pub fn layer_weight_bytes(&self, dtype: DType) -> u64 {
        self.params_per_layer() * dtype.bytes()
    }

    /// Bytes of one decoder layer's weights under 4-bit group-wise compression. Only the four
    /// attention projections and the two FFN matrices are quantized; biases and norms stay 16-bit.
    pub fn layer_weight_bytes_compressed(&self) -> u64 {
        let h1 = self.hidden_size;
        let h2 = self.ffn_dim;
        let matrix_values = 4 * h1 * h1 + 2 * h1 * h2;
        let rest = self.params_per_layer() - matrix_values;
        compressed_bytes(matrix_values) + rest * 2
    }

    /// KV-cache bytes for one layer, one sequence, one position (K and V, h1 values each).
    pub fn kv_bytes_per_token_per_layer(&self, dtype: DType) -> u64 {
        2 * self.hidden_size * dtype.bytes()
    }

    /// Compressed KV-cache bytes for one layer, one sequence, one position.
    pub fn kv_bytes_per_token_per_layer_compressed(&self) -> u64 {
        compressed_bytes(2 * self.hidden_size)
    }

    /// Hidden-state bytes for one token at a layer boundary.
    pub fn activation_bytes_per_token(&self, dtype: DType) -> u64 {
        self.hidden_size * dtype.bytes()
    }

    /// FLOPs of one layer's linear products for `tokens` tokens (2 per multiply-add).
    pub fn linear_flops_per_layer(&self, tokens: u64) -> u64 {
        let h1 = self.hidden_size;
        let h2 = self.ffn_dim;
        2 * tokens * (4 * h1 * h1 + 2 * h1 * h2)
    }

    /// FLOPs of one layer's attention scores and weighted sum for `queries` queries of one
    /// sequence, each against `context` cached positions.
    pub fn attention_flops_per_layer(&self, queries: u64, context: u64) -> u64 {
        // Q K^T and P V: 2 * h1 multiply-adds per (query, key) pair each.
        4 * queries * context * self.hidden_size
    }
}

/// Bytes that `values` values take under 4-bit group-wise compression, rounded up to whole groups.
pub fn compressed_bytes(values: u64) -> u64 {
    let groups = values.div_ceil(COMPRESSION_GROUP_SIZE);
    // 32 bytes of 4-bit data + 2 bytes scale + 2 bytes minimum per group of 64 values.
    groups * (COMPRESSION_GROUP_SIZE / 2 + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_opt_sizes_match_published_parameter_counts() {
        // Published sizes are rounded names; check within 2%.
        for (name, billions) in [
            ("opt-125m", 0.125),
            ("opt-1.3b", 1.3),
            ("opt-6.7b", 6.7),
            ("opt-30b", 30.0),
            ("opt-175b", 175.0),
        ] {
            let m = ModelSpec::builtin(name).unwrap();
            let got = m.total_params() as f64 / 1e9;
            assert!(
                (got / billions - 1.0).abs() < 0.02,
                "{name}: {got} B parameters"
            );
        }
    }

    #[test]
    fn opt_350m_is_post_ln_with_projections() {
        let m = ModelSpec::builtin("opt-350m").unwrap();
        assert!(!m.layer_norm_before);
        assert!(m.has_projections());
        assert_eq!(m.word_embed_proj_dim, 512);
    }

    #[test]
    fn layer_bytes_follow_design_formula() {
        let m = ModelSpec::builtin("opt-6.7b").unwrap();
        let (h1, h2) = (4096u64, 16384u64);
        let matrices = 2 * (4 * h1 * h1 + 2 * h1 * h2);
        let biases_norms = 2 * (4 * h1 + h2 + h1 + 4 * h1);
        assert_eq!(m.layer_weight_bytes(DType::F16), matrices + biases_norms);
        assert_eq!(m.kv_bytes_per_token_per_layer(DType::F16), 4 * h1);
        assert_eq!(m.activation_bytes_per_token(DType::F16), 2 * h1);
    }

    #[test]
    fn compression_is_four_and_a_half_bits() {
        assert_eq!(compressed_bytes(64), 36);
        assert_eq!(compressed_bytes(65), 72);
        let bits = compressed_bytes(64 * 1000) as f64 * 8.0 / (64.0 * 1000.0);
        assert_eq!(bits, COMPRESSED_BITS_PER_VALUE);
    }

    #[test]
    fn unknown_model_lists_the_known_ones() {
        let e = ModelSpec::builtin("gpt-9").unwrap_err().to_string();
        assert!(e.contains("opt-175b") && e.contains("gpt-9"), "{e}");
    }

    #[test]
    fn hf_config_is_parsed_and_checked() {
        let cfg = r#"{"model_type":"opt","hidden_size":64,"ffn_dim":256,"num_hidden_layers":2,
            "num_attention_heads":4,"vocab_size":100,"max_position_embeddings":64,
            "do_layer_norm_before":false,"word_embed_proj_dim":32,"torch_dtype":"float32"}"#;
        let m = ModelSpec::from_hf_config_str(cfg, "x/config.json", "tiny").unwrap();
        assert_eq!(m.head_dim(), 16);
        assert!(m.has_projections() && !m.layer_norm_before);
        assert_eq!(m.dtype, DType::F32);

        let llama = r#"{"model_type":"llama","hidden_size":64}"#;
        let e = ModelSpec::from_hf_config_str(llama, "x/config.json", "t").unwrap_err();
        assert!(e.to_string().contains("model_type is 'llama'"), "{e}");

        let huge = cfg.replace("\"hidden_size\":64", "\"hidden_size\":1099511627776");
        let e = ModelSpec::from_hf_config_str(&huge, "x/config.json", "t").unwrap_err();
        assert!(
            e.to_string()
                .contains("'hidden_size' is 1099511627776; expected at most"),
            "{e}"
        );

        let missing = r#"{"model_type":"opt","hidden_size":64}"#;
        let e = ModelSpec::from_hf_config_str(missing, "x/config.json", "t").unwrap_err();
        assert!(
            e.to_string().contains("'num_attention_heads' is missing"),
            "{e}"
        );
    }
}
