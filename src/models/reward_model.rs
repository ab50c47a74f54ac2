//! A reward model: any backbone plus the head transformers puts on a
//! sequence-classification model with num_labels 1, under the same tensor
//! names, so a checkpoint loads in transformers (AutoModelForSequenceClassification)
//! and here alike:
//! - decoders (GPT-2, Llama family, GPT-NeoX): `score` (hidden -> 1, no bias)
//!   on the hidden state of the last real token;
//! - BERT: `bert.pooler.dense` + tanh on [CLS], then `classifier`;
//! - DistilBERT: `pre_classifier` + ReLU on [CLS], then `classifier`.
//!
//! "Last real token" and "[CLS]" are read from the attention mask (last /
//! first position with mask 1), for left and right padding alike; see docs/models.md
//! ("Pad and EOS policy") for how this relates to transformers' pad-id rule.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde_json::{json, Value};

use super::layers::Linear;
use super::{ArchConfig, Backbone};
use crate::{HostRng, Result};

/// The key of config.json holding the normalization offset (transformers ignores it).
pub const OFFSET_KEY: &str = "candle_rlhf_reward_offset";

enum Head {
    /// Decoders: `score.weight` (1, E).
    Score(Tensor),
    /// Encoders: a dense layer with an activation on [CLS], then `classifier`.
    Pooled {
        dense: Linear,
        tanh: bool,
        classifier: Linear,
    },
}

/// A backbone with a scalar reward head.
pub struct RewardModel {
    pub config: ArchConfig,
    backbone: Backbone,
    head: Head,
    /// Subtracted from every reported score (reward normalization); 0 if none.
    pub offset: f64,
}

/// Serves a head tensor from the checkpoint when it has one, else draws a new
/// one (weights N(0, 1/(hidden+1)), biases 0) and adds it to `varmap`.
struct HeadInit<'a> {
    vb: &'a VarBuilder<'static>,
    varmap: &'a VarMap,
    rng: HostRng,
    std: f64,
}

impl HeadInit<'_> {
    fn get(&mut self, shape: (usize, usize), name: &str) -> Result<Tensor> {
        if self.vb.contains_tensor(name) {
            return Ok(self.vb.get(shape, name)?);
        }
        let t = self
            .rng
            .normal_tensor(shape, self.std, self.vb.dtype(), self.vb.device())?;
        self.insert(name, t)
    }

    fn bias(&mut self, size: usize, name: &str) -> Result<Tensor> {
        if self.vb.contains_tensor(name) {
            return Ok(self.vb.get(size, name)?);
        }
        let t = Tensor::zeros(size, self.vb.dtype(), self.vb.device())?;
        self.insert(name, t)
    }

    fn insert(&mut self, name: &str, t: Tensor) -> Result<Tensor> {
        Ok(super::weights::add_var(self.varmap, name, &t)?)
    }

    fn linear(&mut self, prefix: &str, d_in: usize, d_out: usize) -> Result<Linear> {
        Ok(Linear::from_parts(
            prefix,
            self.get((d_out, d_in), &format!("{prefix}.weight"))?,
            Some(self.bias(d_out, &format!("{prefix}.bias"))?),
        ))
    }
}

impl super::Linears for RewardModel {
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut all = self.backbone.linears_mut();
        if let Head::Pooled {
            dense, classifier, ..
        } = &mut self.head
        {
            all.push(dense);
            all.push(classifier);
        }
        all
    }

    fn set_activation_checkpointing(&mut self, on: bool) {
        self.backbone.set_activation_checkpointing(on);
    }
}

impl RewardModel {
    /// Builds the backbone (without an LM head) from `vb`, and the head from
    /// `vb` when the checkpoint has one, else new from the seeded stream.
    pub fn load(
        vb: VarBuilder<'static>,
        varmap: &VarMap,
        cfg: &ArchConfig,
        seed: u64,
    ) -> Result<Self> {
        let backbone = Backbone::load_trunk(vb.clone(), cfg)?;
        let e = cfg.hidden_size();
        let mut init = HeadInit {
            vb: &vb,
            varmap,
            rng: HostRng::stream(seed, "reward-head"),
            std: 1.0 / ((e + 1) as f64).sqrt(),
        };
        let head = match cfg {
            ArchConfig::Bert(_) => Head::Pooled {
                dense: init.linear("bert.pooler.dense", e, e)?,
                tanh: true,
                classifier: init.linear("classifier", e, 1)?,
            },
            ArchConfig::DistilBert(_) => Head::Pooled {
                dense: init.linear("pre_classifier", e, e)?,
                tanh: false,
                classifier: init.linear("classifier", e, 1)?,
            },
            _ => Head::Score(init.get((1, e), "score.weight")?),
        };
        Ok(Self {
            config: cfg.clone(),
            backbone,
            head,
            offset: 0.0,
        })
    }

    /// Loads a model directory (a base model, or a saved reward model) with
    /// its Vars; reads the normalization offset from config.json.
    pub fn from_dir(
        dir: &Path,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<(Self, VarMap)> {
        Self::from_dir_init(
            dir,
            dtype,
            device,
            crate::config::ModelInit::Pretrained,
            seed,
        )
    }

    /// [`Self::from_dir`] with the backbone's weights as `init` says
    /// (`model.init = "random"`: drawn as transformers' `_init_weights`).
    pub fn from_dir_init(
        dir: &Path,
        dtype: DType,
        device: &Device,
        init: crate::config::ModelInit,
        seed: u64,
    ) -> Result<(Self, VarMap)> {
        let (cfg, vb, varmap) = super::load_dir_init(dir, dtype, device, init, seed)?;
        let mut model = Self::load(vb, &varmap, &cfg, seed)?;
        let raw: Value = crate::io::read_json(&dir.join("config.json"))?;
        model.offset = raw[OFFSET_KEY].as_f64().unwrap_or(0.0);
        Ok((model, varmap))
    }

    /// Raw rewards (B,) in f32 of `ids` (B, T) under `mask`, before the offset.
    pub fn rewards(&self, ids: &Tensor, mask: &[Vec<u8>]) -> Result<Tensor> {
        let hidden = self.backbone.forward(ids, mask)?; // (B, T, E)
        let (b, t, e) = hidden.dims3()?;
        let decoder = matches!(self.head, Head::Score(_));
        // The pooled position of each row, as a flat index into (B * T).
        let index: Vec<u32> = mask
            .iter()
            .enumerate()
            .map(|(row, m)| {
                let pos = if decoder {
                    m.iter().rposition(|&v| v == 1) // the last real token
                } else {
                    m.iter().position(|&v| v == 1) // [CLS], the first real token
                };
                (row * t + pos.unwrap_or(0)) as u32
            })
            .collect();
        let index = Tensor::from_vec(index, b, hidden.device())?;
        let pooled = hidden.reshape((b * t, e))?.index_select(&index, 0)?; // (B, E)
        let reward = match &self.head {
            Head::Score(w) => pooled.matmul(&w.t()?)?,
            Head::Pooled {
                dense,
                tanh,
                classifier,
            } => {
                let h = dense.forward(&pooled.unsqueeze(1)?)?;
                let h = if *tanh { h.tanh()? } else { h.relu()? };
                classifier.forward(&h)?.squeeze(1)?
            }
        };
        Ok(reward.reshape(b)?.to_dtype(DType::F32)?)
    }

    /// Whether the head is a decoder's `score` (usable at every position).
    pub fn is_decoder(&self) -> bool {
        matches!(self.head, Head::Score(_))
    }

    /// The `score` head at every position: (B, T) in f32. A critic
    /// initialized from a decoder reward model reads its values so.
    pub fn values(&self, ids: &Tensor, mask: &[Vec<u8>]) -> Result<Tensor> {
        let Head::Score(w) = &self.head else {
            return Err(crate::Error::Msg(
                "an encoder reward model cannot serve as a per-token critic".into(),
            ));
        };
        let hidden = self.backbone.forward(ids, mask)?;
        Ok(super::project(&hidden, w)?
            .squeeze(2)?
            .to_dtype(DType::F32)?)
    }

    /// Raw rewards (B,) of token-id sequences, run as one right-padded batch.
    pub fn rewards_of(&self, seqs: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Tensor> {
        if seqs.is_empty() {
            return Ok(Tensor::zeros(0, DType::F32, device)?);
        }
        let width = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let (ids, mask) = crate::data::batch::right_pad(seqs, pad_id);
        let ids = Tensor::from_vec(ids, (seqs.len(), width), device)?;
        self.rewards(&ids, &mask)
    }

    /// config.json of the saved reward model: the backbone's config as read
    /// (`base`), as transformers writes a sequence-classification model with
    /// one label, plus the pad id and the normalization offset.
    pub fn checkpoint_config(&self, base: &Value, pad_token_id: u32) -> Value {
        let mut cfg = base.clone();
        let arch = match self.config.model_type() {
            "gpt2" => "GPT2ForSequenceClassification",
            "llama" => "LlamaForSequenceClassification",
            "mistral" => "MistralForSequenceClassification",
            "qwen2" => "Qwen2ForSequenceClassification",
            "qwen3" => "Qwen3ForSequenceClassification",
            "gpt_neox" => "GPTNeoXForSequenceClassification",
            "bert" => "BertForSequenceClassification",
            _ => "DistilBertForSequenceClassification",
        };
        if let Some(obj) = cfg.as_object_mut() {
            obj.insert("architectures".into(), json!([arch]));
            obj.insert("id2label".into(), json!({"0": "LABEL_0"}));
            obj.insert("label2id".into(), json!({"LABEL_0": 0}));
            obj.insert("pad_token_id".into(), json!(pad_token_id));
            obj.insert(OFFSET_KEY.into(), json!(self.offset));
        }
        cfg
    }
}

/// A saved reward model with its tokenizer, for scoring text from Rust:
///
/// ```no_run
/// # fn main() -> candle_rlhf::Result<()> {
/// let scorer = candle_rlhf::models::reward_model::RewardScorer::load("runs/reward-1/checkpoints/60", &candle_core::Device::Cpu)?;
/// let scores = scorer.score(&["the movie was great.", "the movie was dull."])?;
/// # Ok(()) }
/// ```
pub struct RewardScorer {
    pub model: RewardModel,
    /// Its frozen weights, shared with a LoRA critic started from it.
    _weights: std::sync::Arc<std::collections::HashMap<String, Tensor>>,
    pub tokenizer: crate::tokenizer::Tokenizer,
    device: Device,
}

impl RewardScorer {
    /// Loads a reward model from a directory or hub id (f32).
    pub fn load(model: &str, device: &Device) -> Result<Self> {
        Self::load_in(model, DType::F32, device)
    }

    /// [`Self::load`] with the weights in `dtype` (scores still come back in f32).
    pub fn load_in(model: &str, dtype: DType, device: &Device) -> Result<Self> {
        let dir = super::resolve_model(model, &crate::hub::HubSettings::from_env())?;
        let tokenizer = crate::tokenizer::Tokenizer::from_dir(&dir)?;
        // Frozen weights, shared with any other holder (a LoRA critic's base).
        let weights = super::weights::shared_frozen(&dir, dtype, device)?;
        let cfg = ArchConfig::load(&dir.join("config.json"))?;
        let varmap = VarMap::new();
        let vb = super::weights::selective_builder(
            (*weights).clone(),
            &dir,
            dtype,
            device,
            &varmap,
            |_| false,
        );
        let mut model = RewardModel::load(vb, &varmap, &cfg, 0)?;
        let raw: Value = crate::io::read_json(&dir.join("config.json"))?;
        model.offset = raw[OFFSET_KEY].as_f64().unwrap_or(0.0);
        Ok(Self {
            model,
            _weights: weights,
            tokenizer,
            device: device.clone(),
        })
    }

    /// The score of each text (EOS appended when missing), minus the offset.
    pub fn score(&self, texts: &[&str]) -> Result<Vec<f32>> {
        let seqs = texts
            .iter()
            .map(|t| crate::data::encode_with_eos(&self.tokenizer, "", t))
            .collect::<Result<Vec<_>>>()?;
        self.score_ids(&seqs)
    }

    /// Scores of token-id sequences, in one right-padded batch.
    pub fn score_ids(&self, seqs: &[Vec<u32>]) -> Result<Vec<f32>> {
        let r: Vec<f32> = self
            .model
            .rewards_of(seqs, self.tokenizer.pad_id, &self.device)?
            .to_vec1()?;
        // As reported: minus the normalization offset.
        Ok(r.into_iter()
            .map(|v| v - self.model.offset as f32)
            .collect())
    }
}
