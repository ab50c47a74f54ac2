//! config.json as Hugging Face writes it, in both shapes found on the hub:
//! transformers 4.x (`rope_theta`, `rope_scaling`, `torch_dtype` at the top
//! level) and transformers 5 (`rope_parameters: {rope_theta, rope_type, ...}`,
//! `dtype`). `model_type` picks the architecture.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::bert::BertConfig;
use super::distilbert::DistilBertConfig;
use super::gpt2::Gpt2Config;
use super::gpt_neox::GptNeoXConfig;
use super::layers::{RopeConfig, RopeScaling};
use super::llama::{LlamaConfig, LlamaFlavor};
use crate::{Error, Result};

/// The `model_type`s this version loads.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gpt_neox",
    "bert",
    "distilbert",
];

/// A parsed config.json.
#[derive(Debug, Clone)]
pub enum ArchConfig {
    Gpt2(Gpt2Config),
    Llama(LlamaConfig),
    GptNeoX(GptNeoXConfig),
    Bert(BertConfig),
    DistilBert(DistilBertConfig),
}

impl ArchConfig {
    /// Reads `path` (a config.json).
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Msg(format!(
                "{}: missing (a model directory needs config.json)",
                path.display()
            )));
        }
        let raw: Value = crate::io::read_json(path)?;
        Self::from_value(&raw, path)
    }

    /// Parses a config.json already read; `path` names it in errors.
    pub fn from_value(raw: &Value, path: &Path) -> Result<Self> {
        let model_type = raw["model_type"].as_str().unwrap_or("(none)");
        let bad = |message: String| Error::Parse {
            path: path.to_path_buf(),
            message,
        };
        Ok(match model_type {
            "gpt2" => Self::Gpt2(parse(raw, path)?),
            "llama" | "mistral" | "qwen2" | "qwen3" => {
                let mut cfg: LlamaConfig = parse(raw, path)?;
                cfg.flavor = match model_type {
                    "qwen2" => LlamaFlavor::Qwen2,
                    "qwen3" => LlamaFlavor::Qwen3,
                    "mistral" => LlamaFlavor::Mistral,
                    _ => LlamaFlavor::Llama,
                };
                cfg.rope = RopeConfig::parse(raw, "rope_theta", 10_000.0, None, 1.0, path)?;
                Self::Llama(cfg)
            }
            "gpt_neox" => {
                let mut cfg: GptNeoXConfig = parse(raw, path)?;
                cfg.rope = RopeConfig::parse(
                    raw,
                    "rotary_emb_base",
                    10_000.0,
                    Some("rotary_pct"),
                    0.25,
                    path,
                )?;
                Self::GptNeoX(cfg)
            }
            "bert" => {
                let cfg: BertConfig = parse(raw, path)?;
                if cfg.position_embedding_type != "absolute" {
                    return Err(bad(format!(
                        "position_embedding_type `{}` is not supported (only `absolute`)",
                        cfg.position_embedding_type
                    )));
                }
                Self::Bert(cfg)
            }
            "distilbert" => Self::DistilBert(parse(raw, path)?),
            other => {
                return Err(bad(format!(
                    "model_type `{other}` is not supported (supported: {})",
                    SUPPORTED_MODEL_TYPES.join(", ")
                )))
            }
        })
    }

    pub fn model_type(&self) -> &'static str {
        match self {
            Self::Gpt2(_) => "gpt2",
            Self::Llama(c) => c.flavor.model_type(),
            Self::GptNeoX(_) => "gpt_neox",
            Self::Bert(_) => "bert",
            Self::DistilBert(_) => "distilbert",
        }
    }

    /// Whether the model is a causal LM (generates) rather than an encoder.
    pub fn is_causal(&self) -> bool {
        matches!(self, Self::Gpt2(_) | Self::Llama(_) | Self::GptNeoX(_))
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Gpt2(c) => c.n_embd,
            Self::Llama(c) => c.hidden_size,
            Self::GptNeoX(c) => c.hidden_size,
            Self::Bert(c) => c.hidden_size,
            Self::DistilBert(c) => c.dim,
        }
    }

    /// Transformer blocks.
    pub fn num_layers(&self) -> usize {
        match self {
            Self::Gpt2(c) => c.n_layer,
            Self::Llama(c) => c.num_hidden_layers,
            Self::GptNeoX(c) => c.num_hidden_layers,
            Self::Bert(c) => c.num_hidden_layers,
            Self::DistilBert(c) => c.n_layers,
        }
    }

    /// The longest sequence the model takes.
    pub fn max_positions(&self) -> usize {
        match self {
            Self::Gpt2(c) => c.n_positions,
            Self::Llama(c) => c.max_position_embeddings,
            Self::GptNeoX(c) => c.max_position_embeddings,
            Self::Bert(c) => c.max_position_embeddings,
            Self::DistilBert(c) => c.max_position_embeddings,
        }
    }

    /// The tensor-name prefix of the backbone in transformers' task models
    /// (`transformer.` in GPT2LMHeadModel, `model.` in LlamaForCausalLM, ...).
    pub fn prefix(&self) -> &'static str {
        match self {
            Self::Gpt2(_) => "transformer",
            Self::Llama(_) => "model",
            Self::GptNeoX(_) => "gpt_neox",
            Self::Bert(_) => "bert",
            Self::DistilBert(_) => "distilbert",
        }
    }

    /// Names of the heads that sit beside the backbone at the checkpoint root.
    fn head_names(&self) -> &'static [&'static str] {
        match self {
            Self::Gpt2(_) | Self::Llama(_) => &["lm_head.", "score."],
            Self::GptNeoX(_) => &["embed_out.", "score."],
            Self::Bert(_) => &["cls.", "classifier."],
            Self::DistilBert(_) => &[
                "vocab_transform.",
                "vocab_layer_norm.",
                "vocab_projector.",
                "pre_classifier.",
                "classifier.",
            ],
        }
    }

    /// The name a checkpoint tensor has in a task model: base-model
    /// checkpoints (the hub's `gpt2`, `bert-base-uncased`'s BertModel, ...)
    /// lack the backbone prefix; old BERT files call LayerNorm parameters
    /// gamma/beta.
    pub fn canonical_name(&self, name: &str) -> String {
        let prefix = self.prefix();
        let name = if matches!(self, Self::Bert(_)) {
            name.replace("LayerNorm.gamma", "LayerNorm.weight")
                .replace("LayerNorm.beta", "LayerNorm.bias")
        } else {
            name.to_string()
        };
        let at_root = name.starts_with(&format!("{prefix}."))
            || self.head_names().iter().any(|h| name.starts_with(h));
        if at_root {
            name
        } else {
            format!("{prefix}.{name}")
        }
    }
}

/// Deserializes an architecture's config, naming config.json in errors.
fn parse<T: DeserializeOwned>(raw: &Value, path: &Path) -> Result<T> {
    serde_path_to_error::deserialize(raw.clone()).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        message: format!("`{}`: {}", e.path(), e.inner()),
    })
}

/// Parsing of [`RopeConfig`] (defined with the rotary embedding in layers.rs).
impl RopeConfig {
    /// transformers 5 keeps everything in `rope_parameters`; 4.x has the
    /// base in `theta_key` and the scaling in `rope_scaling`.
    fn parse(
        raw: &Value,
        theta_key: &str,
        default_theta: f64,
        legacy_partial_key: Option<&str>,
        default_partial: f64,
        path: &Path,
    ) -> Result<Self> {
        let bad = |message: String| Error::Parse {
            path: path.to_path_buf(),
            message,
        };
        let number = |v: &Value, field: &str| -> Result<Option<f64>> {
            match v {
                Value::Null => Ok(None),
                v => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| bad(format!("`{field}` must be a number, not {v}"))),
            }
        };
        let (params, where_) = match &raw["rope_parameters"] {
            Value::Object(_) => (&raw["rope_parameters"], "rope_parameters"),
            _ => (&raw["rope_scaling"], "rope_scaling"),
        };
        let theta = number(&params["rope_theta"], &format!("{where_}.rope_theta"))?
            .or(number(&raw[theta_key], theta_key)?)
            .or(number(&raw["rope_theta"], "rope_theta")?)
            .unwrap_or(default_theta);
        let legacy_partial = match legacy_partial_key {
            Some(k) => number(&raw[k], k)?,
            None => None,
        };
        let partial_rotary_factor = number(
            &params["partial_rotary_factor"],
            &format!("{where_}.partial_rotary_factor"),
        )?
        .or(number(
            &raw["partial_rotary_factor"],
            "partial_rotary_factor",
        )?)
        .or(legacy_partial)
        .unwrap_or(default_partial);
        let kind = params["rope_type"]
            .as_str()
            .or(params["type"].as_str())
            .unwrap_or("default");
        let field = |name: &str| -> Result<f64> {
            number(&params[name], &format!("{where_}.{name}"))?
                .ok_or_else(|| bad(format!("{where_}: rope type `{kind}` needs `{name}`")))
        };
        let scaling = match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: field("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: field("factor")?,
                low_freq_factor: field("low_freq_factor")?,
                high_freq_factor: field("high_freq_factor")?,
                original_max_position_embeddings: field("original_max_position_embeddings")?,
            },
            other => {
                return Err(bad(format!(
                    "{where_}: rope type `{other}` is not supported (supported: default, linear, llama3)"
                )))
            }
        };
        let valid = theta > 0.0 && partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0;
        if !valid {
            return Err(bad(format!(
                "invalid rotary settings: theta {theta}, partial_rotary_factor {partial_rotary_factor}"
            )));
        }
        Ok(Self {
            theta,
            scaling,
            partial_rotary_factor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rope(raw: Value) -> RopeConfig {
        RopeConfig::parse(
            &raw,
            "rope_theta",
            10_000.0,
            None,
            1.0,
            Path::new("config.json"),
        )
        .unwrap()
    }

    #[test]
    fn both_config_shapes_give_the_same_rope() {
        let v4 = json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}});
        let v5 = json!({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}});
        assert_eq!(rope(v4.clone()), rope(v5));
        assert_eq!(rope(v4).theta, 500000.0);
        assert_eq!(rope(json!({})), RopeConfig::default());
        // old configs say "type" instead of "rope_type"
        assert_eq!(
            rope(json!({"rope_scaling": {"type": "linear", "factor": 2.0}})).scaling,
            RopeScaling::Linear { factor: 2.0 }
        );
    }

    #[test]
    fn neox_legacy_names_are_read() {
        let raw = json!({"rotary_emb_base": 1000.0, "rotary_pct": 0.5});
        let r = RopeConfig::parse(
            &raw,
            "rotary_emb_base",
            10_000.0,
            Some("rotary_pct"),
            0.25,
            Path::new("c"),
        )
        .unwrap();
        assert_eq!((r.theta, r.partial_rotary_factor), (1000.0, 0.5));
        let raw = json!({"rope_parameters": {"rope_theta": 1000.0, "partial_rotary_factor": 0.5, "rope_type": "default"}});
        let r5 = RopeConfig::parse(
            &raw,
            "rotary_emb_base",
            10_000.0,
            Some("rotary_pct"),
            0.25,
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(r, r5);
    }

    #[test]
    fn unknown_rope_types_and_model_types_are_refused_by_name() {
        let err = RopeConfig::parse(
            &json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
            "rope_theta",
            10_000.0,
            None,
            1.0,
            Path::new("m/config.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("m/config.json") && err.contains("yarn") && err.contains("llama3"),
            "{err}"
        );
        let err = ArchConfig::from_value(&json!({"model_type": "t5"}), Path::new("m/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`t5`") && err.contains("gpt_neox, bert"),
            "{err}"
        );
    }

    #[test]
    fn prefixes_are_added_where_missing() {
        let gpt2 = ArchConfig::Gpt2(
            serde_json::from_value(
                json!({"vocab_size": 1, "n_positions": 1, "n_embd": 1, "n_layer": 1, "n_head": 1}),
            )
            .unwrap(),
        );
        assert_eq!(
            gpt2.canonical_name("h.0.ln_1.weight"),
            "transformer.h.0.ln_1.weight"
        );
        assert_eq!(
            gpt2.canonical_name("transformer.wte.weight"),
            "transformer.wte.weight"
        );
        assert_eq!(gpt2.canonical_name("lm_head.weight"), "lm_head.weight");
        let bert = ArchConfig::Bert(
            serde_json::from_value(json!({"vocab_size": 1, "hidden_size": 1,
            "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 1}))
            .unwrap(),
        );
        assert_eq!(
            bert.canonical_name("embeddings.LayerNorm.gamma"),
            "bert.embeddings.LayerNorm.weight"
        );
        assert_eq!(
            bert.canonical_name("cls.predictions.bias"),
            "cls.predictions.bias"
        );
    }
}
