//! GPT-2 (Radford et al., 2019), as transformers' `modeling_gpt2.py` computes
//! it: learned positions, pre-norm blocks, Conv1D projections stored
//! [in, out] (transposed relative to Linear), gelu_new, tied LM head.
//!
//! Checkpoints with and without the `transformer.` prefix load; the model
//! always names its tensors with it, as GPT2LMHeadModel saves them.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::KvCache;
use crate::{Error, Result};

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

/// LayerNorm through `layer_norm_slow`: candle's fused layer norm has no backward.
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps: eps as f32,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm_slow(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// GPT-2's Conv1D: y = x W + b with W stored [in, out].
struct Conv1D {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1D {
    fn load(vb: VarBuilder, d_in: usize, d_out: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((d_in, d_out), "weight")?,
            bias: vb.get(d_out, "bias")?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d_in) = x.dims3()?;
        let y = x
            .reshape((b * t, d_in))?
            .matmul(&self.weight)?
            .broadcast_add(&self.bias)?;
        Ok(y.reshape((b, t, ()))?)
    }
}

struct Attention {
    c_attn: Conv1D,
    c_proj: Conv1D,
    n_head: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &Gpt2Config) -> Result<Self> {
        let e = cfg.n_embd;
        Ok(Self {
            c_attn: Conv1D::load(vb.pp("c_attn"), e, 3 * e)?,
            c_proj: Conv1D::load(vb.pp("c_proj"), e, e)?,
            n_head: cfg.n_head,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t, e) = x.dims3()?;
        let hd = e / self.n_head;
        let qkv = self.c_attn.forward(x)?; // (B, T, 3E)
        let heads = |i: usize| -> Result<Tensor> {
            // (B, T, E) -> (B, H, T, hd)
            Ok(qkv
                .narrow(2, i * e, e)?
                .reshape((b, t, self.n_head, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, mut k, mut v) = (heads(0)?, heads(1)?, heads(2)?);
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?; // (B, H, past + T, hd)
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.detach(), v.detach()));
        }
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (hd as f64).sqrt())?; // (B, H, T, L)
        let scores = scores.broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?; // differentiable softmax
        let y = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, e))?; // (B, T, E)
        self.c_proj.forward(&y)
    }
}

struct Mlp {
    c_fc: Conv1D,
    c_proj: Conv1D,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // gelu_new is the tanh approximation, which is candle's `gelu`.
        self.c_proj.forward(&self.c_fc.forward(x)?.gelu()?)
    }
}

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
                c_fc: Conv1D::load(vb.pp("mlp.c_fc"), cfg.n_embd, inner)?,
                c_proj: Conv1D::load(vb.pp("mlp.c_proj"), inner, cfg.n_embd)?,
            },
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, bias, cache)?)?;
        Ok((&x + self.mlp.forward(&self.ln_2.forward(&x)?)?)?)
    }
}

/// GPT2LMHeadModel.
pub struct Gpt2 {
    pub config: Gpt2Config,
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Tensor,
}

impl Gpt2 {
    /// Builds the model from `vb` at the checkpoint root (names `transformer.*`, `lm_head.weight`).
    pub fn load(vb: VarBuilder, cfg: &Gpt2Config) -> Result<Self> {
        if !cfg.n_embd.is_multiple_of(cfg.n_head) {
            return Err(Error::Msg(format!(
                "config.json: n_embd {} is not divisible by n_head {}",
                cfg.n_embd, cfg.n_head
            )));
        }
        let tv = vb.pp("transformer");
        let wte = tv.get((cfg.vocab_size, cfg.n_embd), "wte.weight")?;
        let wpe = tv.get((cfg.n_positions, cfg.n_embd), "wpe.weight")?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::load(tv.pp(format!("h.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(tv.pp("ln_f"), cfg.n_embd, cfg.layer_norm_epsilon)?;
        let lm_head = if cfg.tie_word_embeddings {
            wte.clone()
        } else {
            vb.get((cfg.vocab_size, cfg.n_embd), "lm_head.weight")?
        };
        Ok(Self {
            config: cfg.clone(),
            wte: Embedding::new(wte, cfg.n_embd),
            wpe: Embedding::new(wpe, cfg.n_embd),
            blocks,
            ln_f,
            lm_head,
        })
    }

    /// Loads config.json and the safetensors weights of `dir` as trainable Vars.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<(Self, VarMap)> {
        let cfg_path = dir.join("config.json");
        let cfg: Gpt2Config = crate::checkpoint::read_json(&cfg_path)?;
        // The hub's gpt2 has no prefix; GPT2LMHeadModel checkpoints have `transformer.`.
        let tensors = super::weights::read_safetensors_dir(dir, device, |name| {
            if name.starts_with("transformer.") || name.starts_with("lm_head.") {
                name.to_string()
            } else {
                format!("transformer.{name}")
            }
        })?;
        let (vb, varmap) = super::weights::checkpoint_builder(tensors, dir, dtype, device);
        let model = Self::load(vb, &cfg)?;
        Ok((model, varmap))
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.lm_head.dtype()
    }

    /// A cache with one empty slot per layer.
    pub fn new_cache(&self) -> KvCache {
        vec![None; self.blocks.len()]
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
            let slot = cache.as_deref_mut().map(|c| &mut c[i]);
            x = block.forward(&x, bias, slot)?;
        }
        self.ln_f.forward(&x)
    }

    /// Logits (B, T, V) of hidden states (B, T, E).
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, t, e) = hidden.dims3()?;
        Ok(hidden
            .reshape((b * t, e))?
            .matmul(&self.lm_head.t()?)?
            .reshape((b, t, ()))?)
    }
}
