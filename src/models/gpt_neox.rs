//! GPT-NeoX / Pythia as transformers' `modeling_gpt_neox.py` computes it:
//! one fused `query_key_value` projection interleaved per head
//! ([q_h, k_h, v_h] for each head h), rotary positions on the first
//! `partial_rotary_factor` (rotary_pct) of each head, and with
//! `use_parallel_residual` the attention and MLP read the same input:
//! x + attn(ln1(x)) + mlp(ln2(x)).

use candle_core::{DType, Tensor};
use candle_nn::{Module, VarBuilder};

use super::layers::Embedding;
use serde::Deserialize;

use super::layers::RopeConfig;
use super::layers::{
    attention, check_heads, extend_cache, run_layer, Activation, KvSlot, LayerNorm, Linear,
    Recomputable, Rotary,
};
use super::KvCache;
use crate::kernels::attention::{packed_attention, Packing};
use crate::kernels::rotary;
use crate::Result;

fn default_act() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

/// The fields of a GPT-NeoX config.json the model uses.
#[derive(Debug, Clone, Deserialize)]
pub struct GptNeoXConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_true")]
    pub use_parallel_residual: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_true")]
    pub attention_bias: bool,
    #[serde(skip)]
    pub rope: RopeConfig,
}

#[derive(Clone)]
struct Layer {
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
    query_key_value: Linear,
    dense: Linear,
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
    heads: usize,
    act: Activation,
    use_parallel_residual: bool,
}

impl Layer {
    fn attend(
        &self,
        x: &Tensor,
        cos_sin: (&Tensor, &Tensor),
        bias: &Tensor,
        cache: Option<&mut KvSlot>,
    ) -> Result<Tensor> {
        let (b, t, e) = x.dims3()?;
        let heads = self.heads;
        let hd = e / heads;
        let qkv = self.query_key_value.forward(x)?;
        if cache.is_none() {
            // Training and scoring on the CPU: one op, with its own backward.
            let y = packed_attention(&qkv, Packing::PerHead, heads, bias, Some(cos_sin))?;
            if let Some(y) = y {
                return self.dense.forward(&y);
            }
        }
        // (B, T, H, 3 * hd) -> (B, H, T, 3 * hd): q, k, v sit side by side per head.
        let qkv = qkv.reshape((b, t, heads, 3 * hd))?.transpose(1, 2)?;
        let part = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(3, i * hd, hd)?.contiguous()?) };
        let (cos, sin) = cos_sin;
        let q = rotary(&part(0)?, cos, sin)?;
        let k = rotary(&part(1)?, cos, sin)?;
        let (k, v) = extend_cache(cache, k, part(2)?)?;
        self.dense.forward(&attention(&q, &k, &v, bias)?)
    }

    fn forward(
        &self,
        x: &Tensor,
        cos_sin: (&Tensor, &Tensor),
        bias: &Tensor,
        slot: Option<&mut KvSlot>,
    ) -> Result<Tensor> {
        let attn = self.attend(&self.input_layernorm.forward(x)?, cos_sin, bias, slot)?;
        let mlp = |h: &Tensor| -> Result<Tensor> {
            let h = self.act.forward(&self.dense_h_to_4h.forward(h)?)?;
            // Its value only enters the residual sum below.
            self.dense_4h_to_h.forward_into_residual(&h)
        };
        Ok(if self.use_parallel_residual {
            let m = mlp(&self.post_attention_layernorm.forward(x)?)?;
            ((x + attn)? + m)?
        } else {
            let x = (x + attn)?;
            let m = mlp(&self.post_attention_layernorm.forward(&x)?)?;
            (x + m)?
        })
    }
}

impl Recomputable for Layer {
    fn linears(&self) -> Vec<&Linear> {
        vec![
            &self.query_key_value,
            &self.dense,
            &self.dense_h_to_4h,
            &self.dense_4h_to_h,
        ]
    }
}

impl super::layers::Linears for GptNeoX {
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.query_key_value,
                    &mut l.dense,
                    &mut l.dense_h_to_4h,
                    &mut l.dense_4h_to_h,
                ]
            })
            .collect()
    }

    fn set_activation_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }
}

/// GPTNeoXForCausalLM.
pub struct GptNeoX {
    pub config: GptNeoXConfig,
    embed_in: Embedding,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    /// None for a trunk under another head (a reward model).
    embed_out: Option<Tensor>,
    rotary: Rotary,
    /// Activation checkpointing of the layers in training forwards.
    checkpointing: bool,
}

impl GptNeoX {
    /// Builds the model from `vb` at the checkpoint root (`gpt_neox.*`, `embed_out.weight`).
    /// `with_head: false` leaves out the LM head (the trunk of a reward or value model).
    pub fn load(vb: VarBuilder, cfg: &GptNeoXConfig, with_head: bool) -> Result<Self> {
        let (e, h) = (cfg.hidden_size, cfg.num_attention_heads);
        check_heads((e, "hidden_size"), (h, "num_attention_heads"))?;
        let act = Activation::from_config(&cfg.hidden_act, "hidden_act")?;
        let (i, eps, bias) = (
            cfg.intermediate_size,
            cfg.layer_norm_eps,
            cfg.attention_bias,
        );
        let m = vb.pp("gpt_neox");
        let embed = m.get((cfg.vocab_size, e), "embed_in.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|n| {
                let l = m.pp(format!("layers.{n}"));
                Ok(Layer {
                    input_layernorm: LayerNorm::load(l.pp("input_layernorm"), e, eps)?,
                    post_attention_layernorm: LayerNorm::load(
                        l.pp("post_attention_layernorm"),
                        e,
                        eps,
                    )?,
                    query_key_value: Linear::load(
                        l.pp("attention.query_key_value"),
                        e,
                        3 * e,
                        bias,
                    )?,
                    dense: Linear::load(l.pp("attention.dense"), e, e, bias)?,
                    dense_h_to_4h: Linear::load(l.pp("mlp.dense_h_to_4h"), e, i, true)?,
                    dense_4h_to_h: Linear::load(l.pp("mlp.dense_4h_to_h"), i, e, true)?,
                    heads: h,
                    act,
                    use_parallel_residual: cfg.use_parallel_residual,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::load(m.pp("final_layer_norm"), e, eps)?;
        let embed_out = match (with_head, cfg.tie_word_embeddings) {
            (false, _) => None,
            (true, true) => Some(embed.clone()),
            (true, false) => Some(vb.get((cfg.vocab_size, e), "embed_out.weight")?),
        };
        let rotary_dim = ((e / h) as f64 * cfg.rope.partial_rotary_factor) as usize;
        Ok(Self {
            config: cfg.clone(),
            embed_in: Embedding::new(embed, e),
            layers,
            final_layer_norm,
            embed_out,
            rotary: Rotary::new(rotary_dim, cfg.rope.theta, &cfg.rope.scaling)?,
            checkpointing: false,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn dtype(&self) -> DType {
        self.embed_in.embeddings().dtype()
    }

    /// Final hidden states (B, T, E); see [`super::CausalLm::forward`].
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        bias: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let mut x = self.embed_in.forward(ids)?;
        let (cos, sin) = self.rotary.cos_sin(positions, x.dtype())?;
        for (n, layer) in self.layers.iter().enumerate() {
            x = match cache.as_deref_mut() {
                Some(c) => layer.forward(&x, (&cos, &sin), bias, Some(&mut c[n]))?,
                None => {
                    let (cos, sin, bias) = (cos.clone(), sin.clone(), bias.clone());
                    run_layer(self.checkpointing, layer, &x, move |l, x| {
                        l.forward(x, (&cos, &sin), &bias, None)
                    })?
                }
            };
        }
        self.final_layer_norm.forward(&x)
    }

    /// The LM head's weight (V, E).
    pub fn head_weight(&self) -> Result<&Tensor> {
        super::head(&self.embed_out)
    }

    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        super::project(hidden, super::head(&self.embed_out)?)
    }
}
