//! The Llama family as transformers' `modeling_llama.py` computes it:
//! Llama 2/3, Mistral, SmolLM/TinyLlama, Qwen2/Qwen2.5 and Qwen3. Pre-norm
//! blocks with RMSNorm, rotary positions (default, linear or llama3
//! scaling), grouped-query attention, SwiGLU MLP, tied or untied LM head.
//! Qwen2 adds biases to q/k/v; Llama's `attention_bias` adds them to
//! q/k/v/o. Qwen3 (`modeling_qwen3.py`) normalizes each head's query and
//! key with an RMSNorm over `head_dim` (`q_norm`, `k_norm`) before the
//! rotation, and gives `head_dim` explicitly (128 where hidden / heads is 64).
//!
//! Mistral's sliding window is not applied: for sequences shorter than the
//! window (4096 in Mistral 7B) it changes nothing.

use candle_core::{DType, Tensor};
use candle_nn::{Module, VarBuilder};

use super::layers::Embedding;
use serde::Deserialize;

use super::layers::RopeConfig;
use super::layers::{
    attention, extend_cache, run_layer, split_heads, Activation, KvSlot, Linear, Recomputable,
    RmsNorm, Rotary,
};
use super::KvCache;
use crate::kernels::attention::split_attention;
use crate::kernels::rotary;
use crate::{Error, Result};

/// Which member of the family; decides the attention biases.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum LlamaFlavor {
    #[default]
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl LlamaFlavor {
    pub fn model_type(&self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }
}

fn default_act() -> String {
    "silu".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}

/// The fields of a Llama/Mistral/Qwen2 config.json the model uses.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention; absent means one key/value head per query head.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Explicit per-head size; absent means hidden_size / num_attention_heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama: biases on q, k, v and o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Llama: biases in the MLP.
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(skip)]
    pub flavor: LlamaFlavor,
    #[serde(skip)]
    pub rope: RopeConfig,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    fn validate(&self) -> Result<()> {
        let (h, kv) = (self.num_attention_heads, self.kv_heads());
        if h == 0 || kv == 0 || !h.is_multiple_of(kv) {
            return Err(Error::Msg(format!(
                "config.json: num_attention_heads {h} is not a multiple of num_key_value_heads {kv}"
            )));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(h) {
            return Err(Error::Msg(format!(
                "config.json: hidden_size {} is not divisible by num_attention_heads {h} (and no head_dim)",
                self.hidden_size
            )));
        }
        Ok(())
    }
}

#[derive(Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Qwen3: RMSNorm over head_dim of each query and key head, before rotary.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    heads: usize,
    kv_heads: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let (e, hd) = (cfg.hidden_size, cfg.head_dim());
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.kv_heads());
        let qkv_bias = cfg.attention_bias || cfg.flavor == LlamaFlavor::Qwen2;
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), e, heads * hd, qkv_bias)?,
            k_proj: Linear::load(vb.pp("k_proj"), e, kv_heads * hd, qkv_bias)?,
            v_proj: Linear::load(vb.pp("v_proj"), e, kv_heads * hd, qkv_bias)?,
            o_proj: Linear::load(vb.pp("o_proj"), heads * hd, e, cfg.attention_bias)?,
            qk_norm: match cfg.flavor {
                LlamaFlavor::Qwen3 => Some((
                    RmsNorm::load(vb.pp("q_norm"), hd, cfg.rms_norm_eps)?,
                    RmsNorm::load(vb.pp("k_norm"), hd, cfg.rms_norm_eps)?,
                )),
                _ => None,
            },
            heads,
            kv_heads,
        })
    }

    /// Qwen3's per-head RMSNorm of (B, T, H d) projections, viewed as (B, T, H, d).
    fn norm_heads(norm: &RmsNorm, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        norm.forward(&x.reshape((b, t, heads, c / heads))?)?
            .reshape((b, t, c))
            .map_err(Into::into)
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        bias: &Tensor,
        cache: Option<&mut KvSlot>,
    ) -> Result<Tensor> {
        let (cos, sin) = rope;
        let (heads, kv_heads) = (self.heads, self.kv_heads);
        let (mut q, mut k, v) = (
            self.q_proj.forward(x)?,
            self.k_proj.forward(x)?,
            self.v_proj.forward(x)?,
        );
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            q = Self::norm_heads(q_norm, &q, heads)?;
            k = Self::norm_heads(k_norm, &k, kv_heads)?;
        }
        if cache.is_none() {
            // Training and scoring on the CPU: one op, with its own backward.
            if let Some(y) = split_attention((&q, &k, &v), (heads, kv_heads), bias, Some(rope))? {
                return self.o_proj.forward(&y);
            }
        }
        let q = rotary(&split_heads(&q, heads)?, cos, sin)?;
        let k = rotary(&split_heads(&k, kv_heads)?, cos, sin)?;
        let (k, v) = extend_cache(cache, k, split_heads(&v, kv_heads)?)?;
        let y = attention(&q, &k, &v, bias)?;
        self.o_proj.forward(&y)
    }
}

/// SwiGLU: down(act(gate(x)) * up(x)).
#[derive(Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &LlamaConfig, act: Activation) -> Result<Self> {
        let (e, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: Linear::load(vb.pp("gate_proj"), e, i, b)?,
            up_proj: Linear::load(vb.pp("up_proj"), e, i, b)?,
            down_proj: Linear::load(vb.pp("down_proj"), i, e, b)?,
            act,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = (self.gate_proj.forward(x)?, self.up_proj.forward(x)?);
        let hidden = match self.act {
            Activation::Silu => crate::kernels::silu_mul(&gate, &up)?,
            _ => (self.act.forward(&gate)? * up)?,
        };
        // Its value only enters the residual sum (Layer::forward).
        self.down_proj.forward_into_residual(&hidden)
    }
}

#[derive(Clone)]
struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Layer {
    fn forward(
        &self,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        bias: &Tensor,
        slot: Option<&mut KvSlot>,
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let h = self.self_attn.forward(&h, rope, bias, slot)?;
        let x = (x + h)?;
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + h)?)
    }
}

impl Recomputable for Layer {
    fn linears(&self) -> Vec<&Linear> {
        let (a, m) = (&self.self_attn, &self.mlp);
        vec![
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }
}

impl super::layers::Linears for Llama {
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.self_attn.q_proj,
                    &mut l.self_attn.k_proj,
                    &mut l.self_attn.v_proj,
                    &mut l.self_attn.o_proj,
                    &mut l.mlp.gate_proj,
                    &mut l.mlp.up_proj,
                    &mut l.mlp.down_proj,
                ]
            })
            .collect()
    }

    fn set_activation_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }
}

/// LlamaForCausalLM (and MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM).
pub struct Llama {
    pub config: LlamaConfig,
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// None for a trunk under another head (a reward model).
    lm_head: Option<Tensor>,
    rotary: Rotary,
    /// Activation checkpointing of the layers in training forwards.
    checkpointing: bool,
}

impl Llama {
    /// Builds the model from `vb` at the checkpoint root (`model.*`, `lm_head.weight`).
    /// `with_head: false` leaves out the LM head (the trunk of a reward or value model).
    pub fn load(vb: VarBuilder, cfg: &LlamaConfig, with_head: bool) -> Result<Self> {
        cfg.validate()?;
        let act = Activation::from_config(&cfg.hidden_act, "hidden_act")?;
        let (e, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let m = vb.pp("model");
        let embed = m.get((cfg.vocab_size, e), "embed_tokens.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = m.pp(format!("layers.{i}"));
                Ok(Layer {
                    input_layernorm: RmsNorm::load(l.pp("input_layernorm"), e, eps)?,
                    self_attn: Attention::load(l.pp("self_attn"), cfg)?,
                    post_attention_layernorm: RmsNorm::load(
                        l.pp("post_attention_layernorm"),
                        e,
                        eps,
                    )?,
                    mlp: Mlp::load(l.pp("mlp"), cfg, act)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(m.pp("norm"), e, eps)?;
        let lm_head = match (with_head, cfg.tie_word_embeddings) {
            (false, _) => None,
            (true, true) => Some(embed.clone()),
            (true, false) => Some(vb.get((cfg.vocab_size, e), "lm_head.weight")?),
        };
        let rotary_dim = (cfg.head_dim() as f64 * cfg.rope.partial_rotary_factor) as usize;
        Ok(Self {
            config: cfg.clone(),
            embed_tokens: Embedding::new(embed, e),
            layers,
            norm,
            lm_head,
            rotary: Rotary::new(rotary_dim, cfg.rope.theta, &cfg.rope.scaling)?,
            checkpointing: false,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.embeddings().dtype()
    }

    /// Final hidden states (B, T, E); see [`super::CausalLm::forward`].
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        bias: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let mut x = self.embed_tokens.forward(ids)?;
        let (cos, sin) = self.rotary.cos_sin(positions, x.dtype())?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = match cache.as_deref_mut() {
                Some(c) => layer.forward(&x, (&cos, &sin), bias, Some(&mut c[i]))?,
                None => {
                    let (cos, sin, bias) = (cos.clone(), sin.clone(), bias.clone());
                    run_layer(self.checkpointing, layer, &x, move |l, x| {
                        l.forward(x, (&cos, &sin), &bias, None)
                    })?
                }
            };
        }
        self.norm.forward(&x)
    }

    /// The LM head's weight (V, E).
    pub fn head_weight(&self) -> Result<&Tensor> {
        super::head(&self.lm_head)
    }

    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        super::project(hidden, super::head(&self.lm_head)?)
    }
}
