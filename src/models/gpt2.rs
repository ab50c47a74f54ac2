//! GPT-2 (Radford et al., 2019), as transformers' `modeling_gpt2.py` computes
//! it: learned positions, pre-norm blocks, Conv1D projections stored
//! [in, out] (transposed relative to Linear), gelu_new, tied LM head.
//!
//! Checkpoints with and without the `transformer.` prefix load; the model
//! always names its tensors with it, as GPT2LMHeadModel saves them.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use super::layers::Embedding;
use serde::{Deserialize, Serialize};

use super::layers::{
    attention, check_heads, extend_cache, run_layer, split_heads, KvSlot, LayerNorm, Linear,
    Linears, Recomputable,
};
use super::KvCache;
use crate::kernels::attention::{packed_attention, Packing};
use crate::Result;

fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

/// The fields of a GPT-2 config.json that the model uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// MLP width; null means 4 * n_embd.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
}

#[derive(Clone)]
struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &Gpt2Config) -> Result<Self> {
        let e = cfg.n_embd;
        Ok(Self {
            c_attn: Linear::load_conv1d(vb.pp("c_attn"), e, 3 * e)?,
            c_proj: Linear::load_conv1d(vb.pp("c_proj"), e, e)?,
            n_head: cfg.n_head,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor, cache: Option<&mut KvSlot>) -> Result<Tensor> {
        let e = x.dim(2)?;
        let qkv = self.c_attn.forward(x)?; // (B, T, 3E): q, then k, then v
        if cache.is_none() {
            // Training and scoring on the CPU: one op, with its own backward.
            if let Some(y) = packed_attention(&qkv, Packing::Blocks, self.n_head, bias, None)? {
                return self.c_proj.forward(&y);
            }
        }
        let heads = |x: &Tensor| split_heads(x, self.n_head);
        let (q, k, v) = (
            heads(&qkv.narrow(2, 0, e)?)?,
            heads(&qkv.narrow(2, e, e)?)?,
            heads(&qkv.narrow(2, 2 * e, e)?)?,
        );
        let (k, v) = extend_cache(cache, k, v)?;
        self.c_proj.forward(&attention(&q, &k, &v, bias)?)
    }
}

#[derive(Clone)]
struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // gelu_new is the tanh approximation (candle's `gelu`, fused on the CPU).
        // Its value only enters the residual sum (Block::forward).
        self.c_proj
            .forward_into_residual(&crate::kernels::gelu_tanh(&self.c_fc.forward(x)?)?)
    }
}

#[derive(Clone)]
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &Gpt2Config) -> Result<Self> {
        let inner = cfg.n_inner.unwrap_or(4 * cfg.n_embd);
        Ok(Self {
            ln_1: LayerNorm::load(vb.pp("ln_1"), cfg.n_embd, cfg.layer_norm_epsilon)?,
            attn: Attention::load(vb.pp("attn"), cfg)?,
            ln_2: LayerNorm::load(vb.pp("ln_2"), cfg.n_embd, cfg.layer_norm_epsilon)?,
            mlp: Mlp {
                c_fc: Linear::load_conv1d(vb.pp("mlp.c_fc"), cfg.n_embd, inner)?,
                c_proj: Linear::load_conv1d(vb.pp("mlp.c_proj"), inner, cfg.n_embd)?,
            },
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor, cache: Option<&mut KvSlot>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, bias, cache)?)?;
        Ok((&x + self.mlp.forward(&self.ln_2.forward(&x)?)?)?)
    }
}

impl Recomputable for Block {
    fn linears(&self) -> Vec<&Linear> {
        vec![
            &self.attn.c_attn,
            &self.attn.c_proj,
            &self.mlp.c_fc,
            &self.mlp.c_proj,
        ]
    }
}

impl Linears for Gpt2 {
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.blocks
            .iter_mut()
            .flat_map(|b| {
                [
                    &mut b.attn.c_attn,
                    &mut b.attn.c_proj,
                    &mut b.mlp.c_fc,
                    &mut b.mlp.c_proj,
                ]
            })
            .collect()
    }

    fn set_activation_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }
}

/// GPT2LMHeadModel.
pub struct Gpt2 {
    pub config: Gpt2Config,
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// None for a trunk under another head (a reward model).
    lm_head: Option<Tensor>,
    /// Activation checkpointing of the blocks in training forwards.
    checkpointing: bool,
}

impl Gpt2 {
    /// Builds the model from `vb` at the checkpoint root (names `transformer.*`, `lm_head.weight`).
    /// `with_head: false` leaves out the LM head (the trunk of a reward or value model).
    pub fn load(vb: VarBuilder, cfg: &Gpt2Config, with_head: bool) -> Result<Self> {
        check_heads((cfg.n_embd, "n_embd"), (cfg.n_head, "n_head"))?;
        let tv = vb.pp("transformer");
        let wte = tv.get((cfg.vocab_size, cfg.n_embd), "wte.weight")?;
        let wpe = tv.get((cfg.n_positions, cfg.n_embd), "wpe.weight")?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::load(tv.pp(format!("h.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(tv.pp("ln_f"), cfg.n_embd, cfg.layer_norm_epsilon)?;
        let lm_head = match (with_head, cfg.tie_word_embeddings) {
            (false, _) => None,
            (true, true) => Some(wte.clone()),
            (true, false) => Some(vb.get((cfg.vocab_size, cfg.n_embd), "lm_head.weight")?),
        };
        Ok(Self {
            config: cfg.clone(),
            wte: Embedding::new(wte, cfg.n_embd),
            wpe: Embedding::new(wpe, cfg.n_embd),
            blocks,
            ln_f,
            lm_head,
            checkpointing: false,
        })
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.wte.embeddings().dtype()
    }

    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Final hidden states (B, T, E) of `ids` (B, T) at `positions` (B, T),
    /// with `bias` from [`super::attention_bias`]; with a cache, the new keys
    /// and values are appended to it.
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        bias: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let mut x = (self.wte.forward(ids)? + self.wpe.forward(positions)?)?;
        for (i, block) in self.blocks.iter().enumerate() {
            x = match cache.as_deref_mut() {
                Some(c) => block.forward(&x, bias, Some(&mut c[i]))?,
                None => {
                    let bias = bias.clone();
                    run_layer(self.checkpointing, block, &x, move |b, x| {
                        b.forward(x, &bias, None)
                    })?
                }
            };
        }
        self.ln_f.forward(&x)
    }

    /// Logits (B, T, V) of hidden states (B, T, E).
    /// The LM head's weight (V, E).
    pub fn head_weight(&self) -> Result<&Tensor> {
        super::head(&self.lm_head)
    }

    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        super::project(hidden, super::head(&self.lm_head)?)
    }
}
