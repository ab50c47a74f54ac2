//! BERT (Devlin et al., 2019) as transformers' `modeling_bert.py` computes
//! BertModel without its pooler: word + position + token-type embeddings,
//! post-norm encoder layers. Token types are all 0 (single segment); the
//! reward head (pooler + classifier) sits on top, in the reward trainer.
//!
//! Positions come from the attention mask (cumsum(mask) - mask), which for
//! the usual right padding equals transformers' arange.

use candle_core::{DType, Tensor};
use candle_nn::{Module, VarBuilder};

use super::layers::Embedding;
use serde::Deserialize;

use super::layers::{attention, check_heads, split_heads, Activation, LayerNorm, Linear};
use crate::kernels::attention::split_attention;
use crate::Result;

fn default_act() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-12
}
fn default_type_vocab() -> usize {
    2
}
fn default_positions() -> usize {
    512
}
fn default_position_type() -> String {
    "absolute".into()
}

/// The fields of a BERT config.json the model uses.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
}

/// A post-norm encoder layer, BERT's and DistilBERT's alike (they differ in
/// tensor names only): a = LN(x + attn(x)); out = LN(a + ffn(a)).
#[derive(Clone)]
pub(crate) struct EncoderLayer {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub attention_output: Linear,
    pub attention_norm: LayerNorm,
    pub intermediate: Linear,
    pub output: Linear,
    pub output_norm: LayerNorm,
}

impl EncoderLayer {
    /// The layer's six linear modules.
    pub fn linears_mut(&mut self) -> [&mut Linear; 6] {
        [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.attention_output,
            &mut self.intermediate,
            &mut self.output,
        ]
    }
}

impl super::layers::Recomputable for EncoderLayer {
    fn linears(&self) -> Vec<&Linear> {
        vec![
            &self.query,
            &self.key,
            &self.value,
            &self.attention_output,
            &self.intermediate,
            &self.output,
        ]
    }
}

impl EncoderLayer {
    /// Every layer of an encoder in turn, each through [`super::layers::run_layer`].
    pub fn run_all(
        layers: &[EncoderLayer],
        checkpointing: bool,
        mut x: Tensor,
        bias: &Tensor,
        heads: usize,
        act: Activation,
    ) -> Result<Tensor> {
        for layer in layers {
            let bias = bias.clone();
            x = super::layers::run_layer(checkpointing, layer, &x, move |l, x| {
                l.forward(x, &bias, heads, act)
            })?;
        }
        Ok(x)
    }

    pub fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        heads: usize,
        act: Activation,
    ) -> Result<Tensor> {
        let (q, k, v) = (
            self.query.forward(x)?,
            self.key.forward(x)?,
            self.value.forward(x)?,
        );
        // On the CPU in f32: one op with its own backward, bidirectional,
        // the key padding in `bias` (B, 1, T, T); else the composed ops.
        let y = match split_attention((&q, &k, &v), (heads, heads), bias, None)? {
            Some(y) => y,
            None => {
                let split = |t: &Tensor| split_heads(t, heads);
                attention(&split(&q)?, &split(&k)?, &split(&v)?, bias)?
            }
        };
        let a = self.attention_output.forward(&y)?;
        let a = self.attention_norm.forward(&(a + x)?)?;
        let f = self
            .output
            .forward(&act.forward(&self.intermediate.forward(&a)?)?)?;
        self.output_norm.forward(&(f + a)?)
    }
}

impl super::layers::Linears for Bert {
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

/// BertModel (no pooler).
pub struct Bert {
    pub config: BertConfig,
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_row: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    act: Activation,
    /// Activation checkpointing of the layers in training forwards.
    checkpointing: bool,
}

impl Bert {
    /// Builds the model from `vb` at the checkpoint root (`bert.*`).
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let (e, h, i) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.intermediate_size,
        );
        check_heads((e, "hidden_size"), (h, "num_attention_heads"))?;
        let act = Activation::from_config(&cfg.hidden_act, "hidden_act")?;
        let eps = cfg.layer_norm_eps;
        let m = vb.pp("bert");
        let emb = m.pp("embeddings");
        let token_types = emb.get((cfg.type_vocab_size, e), "token_type_embeddings.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|n| {
                let l = m.pp(format!("encoder.layer.{n}"));
                Ok(EncoderLayer {
                    query: Linear::load(l.pp("attention.self.query"), e, e, true)?,
                    key: Linear::load(l.pp("attention.self.key"), e, e, true)?,
                    value: Linear::load(l.pp("attention.self.value"), e, e, true)?,
                    attention_output: Linear::load(l.pp("attention.output.dense"), e, e, true)?,
                    attention_norm: LayerNorm::load(l.pp("attention.output.LayerNorm"), e, eps)?,
                    intermediate: Linear::load(l.pp("intermediate.dense"), e, i, true)?,
                    output: Linear::load(l.pp("output.dense"), i, e, true)?,
                    output_norm: LayerNorm::load(l.pp("output.LayerNorm"), e, eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: cfg.clone(),
            word_embeddings: Embedding::new(
                emb.get((cfg.vocab_size, e), "word_embeddings.weight")?,
                e,
            ),
            position_embeddings: Embedding::new(
                emb.get(
                    (cfg.max_position_embeddings, e),
                    "position_embeddings.weight",
                )?,
                e,
            ),
            token_type_row: token_types.narrow(0, 0, 1)?,
            embeddings_norm: LayerNorm::load(emb.pp("LayerNorm"), e, eps)?,
            layers,
            act,
            checkpointing: false,
        })
    }

    pub fn dtype(&self) -> DType {
        self.token_type_row.dtype()
    }

    /// Last hidden states (B, T, E) of `ids` (B, T) at `positions`, with a
    /// key-padding `bias` (B, 1, T, T) from [`super::encoder_attention_bias`].
    pub fn forward(&self, ids: &Tensor, positions: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let heads = self.config.num_attention_heads;
        let x = (self.word_embeddings.forward(ids)?
            + self.position_embeddings.forward(positions)?)?
        .broadcast_add(&self.token_type_row)?;
        let x = self.embeddings_norm.forward(&x)?;
        EncoderLayer::run_all(&self.layers, self.checkpointing, x, bias, heads, self.act)
    }
}
