//! Model architectures, written for training: every op has a backward
//! (no fused softmax / layer-norm / rope, which drop gradients in Candle),
//! and tensor names equal Hugging Face's so checkpoints are interchangeable.

pub mod adapter;
pub mod bert;
pub mod distilbert;
pub mod gpt2;
pub mod gpt_neox;
pub mod hf_config;
pub mod layers;
pub mod llama;
pub mod lora;
pub mod reward_model;
pub mod weights;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

pub use hf_config::{ArchConfig, SUPPORTED_MODEL_TYPES};
pub use layers::Linears;

use crate::{Error, Result};

/// Keys and values of every layer, detached: a cache never holds an autograd graph.
pub type KvCache = Vec<layers::KvSlot>;

/// A causal language model: GPT-2, the Llama family or GPT-NeoX.
pub enum CausalLm {
    Gpt2(gpt2::Gpt2),
    Llama(llama::Llama),
    GptNeoX(gpt_neox::GptNeoX),
}

impl CausalLm {
    /// Builds the model of `cfg` from `vb` at the checkpoint root; without
    /// `with_head`, the trunk alone (under a reward or value head).
    pub fn load(vb: VarBuilder, cfg: &ArchConfig, with_head: bool) -> Result<Self> {
        Ok(match cfg {
            ArchConfig::Gpt2(c) => Self::Gpt2(gpt2::Gpt2::load(vb, c, with_head)?),
            ArchConfig::Llama(c) => Self::Llama(llama::Llama::load(vb, c, with_head)?),
            ArchConfig::GptNeoX(c) => Self::GptNeoX(gpt_neox::GptNeoX::load(vb, c, with_head)?),
            other => {
                return Err(Error::Msg(format!(
                    "model_type `{}` is an encoder, not a causal LM (causal LMs: gpt2, llama, mistral, qwen2, qwen3, gpt_neox)",
                    other.model_type()
                )))
            }
        })
    }

    /// Final hidden states (B, T, E) of `ids` (B, T) at position ids
    /// `positions` (B, T), with `bias` from [`attention_bias`]. With a cache,
    /// the new keys and values are appended to it (detached) and the queries
    /// attend over everything cached.
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        bias: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        match self {
            Self::Gpt2(m) => m.forward(ids, positions, bias, cache),
            Self::Llama(m) => m.forward(ids, positions, bias, cache),
            Self::GptNeoX(m) => m.forward(ids, positions, bias, cache),
        }
    }

    /// Logits (B, T, V) of hidden states (B, T, E).
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gpt2(m) => m.lm_logits(hidden),
            Self::Llama(m) => m.lm_logits(hidden),
            Self::GptNeoX(m) => m.lm_logits(hidden),
        }
    }

    /// The LM head's weight (V, E): what [`crate::rl::head_figures`] takes.
    pub fn head_weight(&self) -> Result<&Tensor> {
        match self {
            Self::Gpt2(m) => m.head_weight(),
            Self::Llama(m) => m.head_weight(),
            Self::GptNeoX(m) => m.head_weight(),
        }
    }

    /// [`crate::rl::TokenFigures`] of hidden states (N, E) against `labels`
    /// (N,), logits scaled by `scale`: the head fused with the log-probs in
    /// row chunks, never the whole (N, V) logits.
    pub fn token_figures(
        &self,
        hidden: &Tensor,
        labels: &Tensor,
        scale: f64,
        weighting: bool,
    ) -> Result<crate::rl::TokenFigures> {
        crate::rl::head_figures(hidden, self.head_weight()?, labels, scale, weighting)
    }

    /// A cache with one empty slot per layer, each preallocated for
    /// `capacity` positions when first written (prompt plus new tokens).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let layers = match self {
            Self::Gpt2(m) => m.num_layers(),
            Self::Llama(m) => m.num_layers(),
            Self::GptNeoX(m) => m.num_layers(),
        };
        vec![layers::KvSlot::with_capacity(capacity); layers]
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Gpt2(m) => m.dtype(),
            Self::Llama(m) => m.dtype(),
            Self::GptNeoX(m) => m.dtype(),
        }
    }

    /// The longest sequence the model takes.
    pub fn max_positions(&self) -> usize {
        match self {
            Self::Gpt2(m) => m.config.n_positions,
            Self::Llama(m) => m.config.max_position_embeddings,
            Self::GptNeoX(m) => m.config.max_position_embeddings,
        }
    }
}

impl Linears for CausalLm {
    fn linears_mut(&mut self) -> Vec<&mut layers::Linear> {
        match self {
            Self::Gpt2(m) => m.linears_mut(),
            Self::Llama(m) => m.linears_mut(),
            Self::GptNeoX(m) => m.linears_mut(),
        }
    }

    fn set_activation_checkpointing(&mut self, on: bool) {
        match self {
            Self::Gpt2(m) => m.set_activation_checkpointing(on),
            Self::Llama(m) => m.set_activation_checkpointing(on),
            Self::GptNeoX(m) => m.set_activation_checkpointing(on),
        }
    }
}

/// An encoder: BERT or DistilBERT.
pub enum Encoder {
    Bert(bert::Bert),
    DistilBert(distilbert::DistilBert),
}

impl Encoder {
    /// Last hidden states (B, T, E) with a key-padding `bias` from [`encoder_attention_bias`].
    pub fn forward(&self, ids: &Tensor, positions: &Tensor, bias: &Tensor) -> Result<Tensor> {
        match self {
            Self::Bert(m) => m.forward(ids, positions, bias),
            Self::DistilBert(m) => m.forward(ids, positions, bias),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Self::Bert(m) => m.dtype(),
            Self::DistilBert(m) => m.dtype(),
        }
    }
}

impl Linears for Encoder {
    fn linears_mut(&mut self) -> Vec<&mut layers::Linear> {
        match self {
            Self::Bert(m) => m.linears_mut(),
            Self::DistilBert(m) => m.linears_mut(),
        }
    }

    fn set_activation_checkpointing(&mut self, on: bool) {
        match self {
            Self::Bert(m) => m.set_activation_checkpointing(on),
            Self::DistilBert(m) => m.set_activation_checkpointing(on),
        }
    }
}

impl Linears for Backbone {
    fn linears_mut(&mut self) -> Vec<&mut layers::Linear> {
        match self {
            Self::Causal(m) => m.linears_mut(),
            Self::Encoder(m) => m.linears_mut(),
        }
    }

    fn set_activation_checkpointing(&mut self, on: bool) {
        match self {
            Self::Causal(m) => m.set_activation_checkpointing(on),
            Self::Encoder(m) => m.set_activation_checkpointing(on),
        }
    }
}

/// Any supported model, as the trunk under a head: hidden states at every position.
pub enum Backbone {
    Causal(CausalLm),
    Encoder(Encoder),
}

impl Backbone {
    /// Builds the model of `cfg` from `vb` at the checkpoint root.
    pub fn load(vb: VarBuilder, cfg: &ArchConfig) -> Result<Self> {
        Self::build(vb, cfg, true)
    }

    /// The same without a causal LM's head: the trunk of a reward or value model.
    pub fn load_trunk(vb: VarBuilder, cfg: &ArchConfig) -> Result<Self> {
        Self::build(vb, cfg, false)
    }

    fn build(vb: VarBuilder, cfg: &ArchConfig, lm_head: bool) -> Result<Self> {
        Ok(match cfg {
            ArchConfig::Bert(c) => Self::Encoder(Encoder::Bert(bert::Bert::load(vb, c)?)),
            ArchConfig::DistilBert(c) => {
                Self::Encoder(Encoder::DistilBert(distilbert::DistilBert::load(vb, c)?))
            }
            causal => Self::Causal(CausalLm::load(vb, causal, lm_head)?),
        })
    }

    /// Last hidden states (B, T, E) of `ids` (B, T) under `mask` (B rows of
    /// T, 1 real / 0 pad; left or right padding), positions cumsum(mask) - mask.
    pub fn forward(&self, ids: &Tensor, mask: &[Vec<u8>]) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if mask.len() != b || mask.iter().any(|r| r.len() != t) {
            return Err(Error::Msg(format!(
                "attention mask is not {b} x {t} like the input ids"
            )));
        }
        let device = ids.device();
        let positions = Tensor::from_vec(
            crate::data::batch::position_ids(mask).concat(),
            (b, t),
            device,
        )?;
        match self {
            Self::Causal(m) => {
                let bias = attention_bias(mask, t, m.dtype(), device)?;
                m.forward(ids, &positions, &bias, None)
            }
            Self::Encoder(m) => {
                let bias = encoder_attention_bias(mask, m.dtype(), device)?;
                m.forward(ids, &positions, &bias)
            }
        }
    }

    /// The causal LM, if this is one.
    pub fn causal(&self) -> Option<&CausalLm> {
        match self {
            Self::Causal(m) => Some(m),
            Self::Encoder(_) => None,
        }
    }
}

/// The local directory of a model argument ([`crate::hub::resolve_model`]:
/// a directory, a run directory's newest checkpoint, or a hub snapshot). A
/// peft adapter directory (adapter_config.json and no config.json) stands
/// for its base model (`base_model_name_or_path`, itself resolved so) with
/// the adapter merged, made once in the hub cache.
pub fn resolve_model(arg: &str, settings: &crate::hub::HubSettings) -> Result<std::path::PathBuf> {
    let dir = crate::hub::resolve_model(arg, settings)?;
    if !lora::is_adapter_dir(&dir) {
        return Ok(dir);
    }
    let base = resolve_model(&lora::adapter_base(&dir)?, settings)?;
    lora::merged_in_cache(&dir, &base, &settings.cache)
}

/// Reads a model directory's config.json and safetensors weights (tensor
/// names made canonical, see [`ArchConfig::canonical_name`]) into a
/// VarBuilder whose tensors become trainable Vars of the returned map,
/// converted to `dtype` whatever dtype the files store.
pub fn load_dir(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(ArchConfig, VarBuilder<'static>, VarMap)> {
    read_dir(dir, dtype, device, true)
}

/// [`load_dir`] with the weights `init` says: the checkpoint's, or drawn
/// afresh as transformers' `_init_weights` does (see
/// [`weights::reinitialize`]; `initializer_range` and `pad_token_id` from
/// config.json, 0.02 and none by default), from `seed`.
pub fn load_dir_init(
    dir: &Path,
    dtype: DType,
    device: &Device,
    init: crate::config::ModelInit,
    seed: u64,
) -> Result<(ArchConfig, VarBuilder<'static>, VarMap)> {
    if init == crate::config::ModelInit::Pretrained {
        return load_dir(dir, dtype, device);
    }
    let cfg = ArchConfig::load(&dir.join("config.json"))?;
    let raw: serde_json::Value = crate::io::read_json(&dir.join("config.json"))?;
    let std = raw["initializer_range"].as_f64().unwrap_or(0.02);
    let pad_row = raw["pad_token_id"].as_u64().map(|p| p as usize);
    let mut tensors = weights::read_safetensors_dir(dir, device, |n| cfg.canonical_name(n))?;
    weights::reinitialize(&mut tensors, std, pad_row, seed)?;
    let (vb, varmap) = weights::checkpoint_builder(tensors, dir, dtype, device, true);
    Ok((cfg, vb, varmap))
}

/// The same for inference: plain tensors, no Vars, no autograd graph
/// (sampling, scoring); the returned map holds only what a caller adds.
pub fn load_dir_frozen(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(ArchConfig, VarBuilder<'static>, VarMap)> {
    read_dir(dir, dtype, device, false)
}

fn read_dir(
    dir: &Path,
    dtype: DType,
    device: &Device,
    trainable: bool,
) -> Result<(ArchConfig, VarBuilder<'static>, VarMap)> {
    let cfg = ArchConfig::load(&dir.join("config.json"))?;
    let tensors = weights::read_safetensors_dir(dir, device, |n| cfg.canonical_name(n))?;
    let (vb, varmap) = weights::checkpoint_builder(tensors, dir, dtype, device, trainable);
    Ok((cfg, vb, varmap))
}

/// A VarBuilder over detached copies of `varmap`'s Vars (same storage, no
/// gradient tracking): a model built from it (rollouts, a frozen reference)
/// records no autograd graph yet sees every optimizer update.
pub fn frozen_builder(varmap: &VarMap, dtype: DType, device: &Device) -> VarBuilder<'static> {
    let tensors: HashMap<String, Tensor> = weights::named_tensors(varmap)
        .into_iter()
        .map(|(name, t)| (name, t.detach()))
        .collect();
    VarBuilder::from_tensors(tensors, dtype, device)
}

/// The LM head of a model loaded with one.
fn head(lm_head: &Option<Tensor>) -> Result<&Tensor> {
    lm_head
        .as_ref()
        .ok_or_else(|| Error::Msg("this model was loaded without its LM head".into()))
}

/// hidden (B, T, E) times weight^T (V, E): logits (B, T, V).
pub(crate) fn project(hidden: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (b, t, e) = hidden.dims3()?;
    let logits = crate::kernels::matmul_weight_t(&hidden.reshape((b * t, e))?, weight)?;
    Ok(logits.reshape((b, t, ()))?)
}

/// The additive attention mask of an encoder: 0 for real keys, a large
/// finite negative for pad keys (a row of -inf would give NaN), the same
/// for every query. Shape (B, 1, T, T), as the fused attention op takes it.
pub fn encoder_attention_bias(mask: &[Vec<u8>], dtype: DType, device: &Device) -> Result<Tensor> {
    let (b, t) = (mask.len(), mask.first().map_or(0, Vec::len));
    let blocked = blocked_value(dtype);
    let mut data: Vec<f32> = Vec::with_capacity(b * t * t);
    for row in mask {
        let keys: Vec<f32> = row
            .iter()
            .map(|&m| if m == 1 { 0.0 } else { blocked })
            .collect();
        for _ in 0..t {
            data.extend_from_slice(&keys);
        }
    }
    Ok(Tensor::from_vec(data, (b, 1, t, t), device)?.to_dtype(dtype)?)
}

/// A finite "minus infinity" that survives the dtype.
fn blocked_value(dtype: DType) -> f32 {
    if dtype == DType::F16 {
        -6.0e4
    } else {
        -1.0e9
    }
}

/// The additive attention mask for `queries` new positions over `mask.len()`
/// keys per row: 0 where key j is a real token at or before the query, a
/// large finite negative elsewhere (a row of -inf would give NaN). Pad
/// queries attend to nothing real, get a uniform softmax, and are ignored.
/// Shape (B, 1, queries, keys).
pub fn attention_bias<M: Copy + Into<u32>>(
    mask: &[Vec<M>],
    queries: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let b = mask.len();
    let keys = mask.first().map_or(0, Vec::len);
    let blocked = blocked_value(dtype);
    let mut data = Vec::with_capacity(b * queries * keys);
    for row in mask {
        for i in 0..queries {
            let query_pos = keys - queries + i;
            // A real query sees its own segment; a pad query sees every real
            // key before it (its output is ignored, but a fully blocked row
            // would give NaN).
            let own: u32 = row[query_pos].into();
            data.extend((0..keys).map(|j| {
                let key: u32 = row[j].into();
                if j <= query_pos && key != 0 && (own == 0 || key == own) {
                    0.0f32
                } else {
                    blocked
                }
            }));
        }
    }
    Ok(Tensor::from_vec(data, (b, 1, queries, keys), device)?.to_dtype(dtype)?)
}

/// The additive attention mask (B, 1, T, T) of rows that hold a shared
/// prefix and two branches after it (DPO's prompt, then chosen and rejected
/// in one row): `branch` per token is 0 pad, 1 shared, or a branch id (2, 3).
/// A token sees the earlier shared tokens and the earlier tokens of its own
/// branch; a pad query sees every earlier real key (its output is ignored).
pub fn tree_attention_bias(branch: &[Vec<u8>], dtype: DType, device: &Device) -> Result<Tensor> {
    let t = branch.first().map_or(0, Vec::len);
    let blocked = blocked_value(dtype);
    let mut data = Vec::with_capacity(branch.len() * t * t);
    for row in branch {
        for (q, &own) in row.iter().enumerate() {
            data.extend(row.iter().enumerate().map(|(k, &key)| {
                let visible = key == 1 || key == own || (own == 0 && key != 0);
                if k <= q && key != 0 && visible {
                    0.0f32
                } else {
                    blocked
                }
            }));
        }
    }
    Ok(Tensor::from_vec(data, (branch.len(), 1, t, t), device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_bias_shares_the_prefix_and_keeps_branches_apart() {
        // shared, shared, chosen, rejected, pad
        let bias = tree_attention_bias(&[vec![1, 1, 2, 3, 0]], DType::F32, &Device::Cpu).unwrap();
        let v = bias.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let seen: Vec<Vec<usize>> = v
            .chunks(5)
            .map(|r| (0..5).filter(|&k| r[k] == 0.0).collect())
            .collect();
        assert_eq!(
            seen,
            vec![
                vec![0],
                vec![0, 1],
                vec![0, 1, 2],
                vec![0, 1, 3],
                vec![0, 1, 2, 3]
            ]
        );
    }

    #[test]
    fn bias_is_causal_and_hides_padding() {
        let mask: Vec<Vec<u8>> = vec![vec![0, 1, 1]];
        let bias = attention_bias(&mask, 2, DType::F32, &Device::Cpu).unwrap();
        let v = bias.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // query at position 1 sees key 1 only; query at 2 sees keys 1 and 2.
        assert_eq!(v, vec![-1e9, 0.0, -1e9, -1e9, 0.0, 0.0]);
    }

    #[test]
    fn packed_segments_attend_within_themselves_and_restart_positions() {
        // Two sequences packed in one row (segments 1, 1, 2, 2, 2) and a pad.
        let seg: Vec<Vec<u32>> = vec![vec![1, 1, 2, 2, 2, 0]];
        assert_eq!(
            crate::data::batch::position_ids(&seg),
            vec![vec![0, 1, 0, 1, 2, 0]]
        );
        let bias = attention_bias(&seg, 6, DType::F32, &Device::Cpu).unwrap();
        let v = bias.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let seen: Vec<Vec<usize>> = v
            .chunks(6)
            .map(|r| (0..6).filter(|&j| r[j] == 0.0).collect())
            .collect();
        assert_eq!(
            seen,
            vec![
                vec![0],
                vec![0, 1],
                vec![2],
                vec![2, 3],
                vec![2, 3, 4],
                vec![0, 1, 2, 3, 4], // the pad query: every real key before it
            ]
        );
    }
}
