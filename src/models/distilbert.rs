//! DistilBERT (Sanh et al., 2019) as transformers' `modeling_distilbert.py`
//! computes DistilBertModel: word + position embeddings (no token types),
//! post-norm layers with LayerNorm eps 1e-12. The seeds' reward model is a
//! DistilBERT read at its [CLS] token.

use candle_core::{DType, Tensor};
use candle_nn::{Module, VarBuilder};

use super::layers::Embedding;
use serde::Deserialize;

use super::bert::EncoderLayer;
use super::layers::{check_heads, Activation, LayerNorm, Linear};
use crate::Result;

/// transformers hard-codes this epsilon for every DistilBERT LayerNorm.
const EPS: f64 = 1e-12;

fn default_act() -> String {
    "gelu".into()
}
fn default_positions() -> usize {
    512
}

/// The fields of a DistilBERT config.json the model uses.
#[derive(Debug, Clone, Deserialize)]
pub struct DistilBertConfig {
    pub vocab_size: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub hidden_dim: usize,
    #[serde(default = "default_act")]
    pub activation: String,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
}

impl super::layers::Linears for DistilBert {
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(EncoderLayer::linears_mut)
            .collect()
    }

    fn set_activation_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }
}

/// DistilBertModel.
pub struct DistilBert {
    pub config: DistilBertConfig,
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    embeddings_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    act: Activation,
    /// Activation checkpointing of the layers in training forwards.
    checkpointing: bool,
}

impl DistilBert {
    /// Builds the model from `vb` at the checkpoint root (`distilbert.*`).
    pub fn load(vb: VarBuilder, cfg: &DistilBertConfig) -> Result<Self> {
        let (e, h, i) = (cfg.dim, cfg.n_heads, cfg.hidden_dim);
        check_heads((e, "dim"), (h, "n_heads"))?;
        let act = Activation::from_config(&cfg.activation, "activation")?;
        let m = vb.pp("distilbert");
        let emb = m.pp("embeddings");
        let layers = (0..cfg.n_layers)
            .map(|n| {
                let l = m.pp(format!("transformer.layer.{n}"));
                Ok(EncoderLayer {
                    query: Linear::load(l.pp("attention.q_lin"), e, e, true)?,
                    key: Linear::load(l.pp("attention.k_lin"), e, e, true)?,
                    value: Linear::load(l.pp("attention.v_lin"), e, e, true)?,
                    attention_output: Linear::load(l.pp("attention.out_lin"), e, e, true)?,
                    attention_norm: LayerNorm::load(l.pp("sa_layer_norm"), e, EPS)?,
                    intermediate: Linear::load(l.pp("ffn.lin1"), e, i, true)?,
                    output: Linear::load(l.pp("ffn.lin2"), i, e, true)?,
                    output_norm: LayerNorm::load(l.pp("output_layer_norm"), e, EPS)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let word = emb.get((cfg.vocab_size, e), "word_embeddings.weight")?;
        let pos = emb.get(
            (cfg.max_position_embeddings, e),
            "position_embeddings.weight",
        )?;
        Ok(Self {
            config: cfg.clone(),
            word_embeddings: Embedding::new(word, e),
            position_embeddings: Embedding::new(pos, e),
            embeddings_norm: LayerNorm::load(emb.pp("LayerNorm"), e, EPS)?,
            layers,
            act,
            checkpointing: false,
        })
    }

    pub fn dtype(&self) -> DType {
        self.word_embeddings.embeddings().dtype()
    }

    /// Last hidden states (B, T, E); see [`super::bert::Bert::forward`].
    pub fn forward(&self, ids: &Tensor, positions: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let heads = self.config.n_heads;
        let x =
            (self.word_embeddings.forward(ids)? + self.position_embeddings.forward(positions)?)?;
        let x = self.embeddings_norm.forward(&x)?;
        EncoderLayer::run_all(&self.layers, self.checkpointing, x, bias, heads, self.act)
    }
}
