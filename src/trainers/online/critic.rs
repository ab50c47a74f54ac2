//! PPO's critic: a value head on the policy's hidden states, or a separate
//! model started from the reward model (the N+ default), with its
//! checkpoint file and its part of the optimizer.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use super::batch::Batch;
use crate::checkpoint;
use crate::config::{LoraConfig, PpoConfig, ValueModel};
use crate::models::lora::LoraWeights;
use crate::models::reward_model::RewardModel;
use crate::models::{frozen_builder, project};
use crate::rewards::same_tokenizer;
use crate::{Error, Result};

/// Where values come from.
pub(crate) enum Critic {
    /// `v_head` (hidden -> 1, zero-initialized) on the policy's last hidden
    /// states, detached.
    Head { weight: Var, bias: Var },
    /// A separate model initialized from the reward model (its `score` head
    /// read at every position), trained alongside the policy.
    Model {
        model: Box<RewardModel>,
        frozen: Box<RewardModel>,
        /// Its trained Vars: every weight, or (`lora.critic`) its adapters and `score`.
        varmap: VarMap,
    },
}

impl Critic {
    /// Values (B, r) in f32 of the states predicting each response token;
    /// `h` the policy's hidden states there (a value head needs them, a
    /// critic model reads the batch); `grad` records the graph.
    pub(crate) fn values(&self, b: &Batch, h: Option<&Tensor>, grad: bool) -> Result<Tensor> {
        match self {
            Critic::Head { weight, bias } => {
                // The head reads detached hidden states: value-loss gradients
                // train the head only and never move the policy (a shared
                // trunk lets a large value loss wreck the policy early on).
                let h = h
                    .ok_or_else(|| {
                        Error::Msg("a value head needs the policy's hidden states".into())
                    })?
                    .detach();
                let h = &h;
                let (w, c) = if grad {
                    (weight.as_tensor().clone(), bias.as_tensor().clone())
                } else {
                    (weight.as_detached_tensor(), bias.as_detached_tensor())
                };
                let v = project(h, &w.to_dtype(h.dtype())?)?.squeeze(2)?;
                Ok(v.to_dtype(DType::F32)?.broadcast_add(&c)?)
            }
            Critic::Model { model, frozen, .. } => {
                let m = if grad { model } else { frozen };
                Ok(m.values(&b.ids, &b.mask)?.narrow(1, b.q - 1, b.r)?)
            }
        }
    }

    /// (name, Var) pairs for the optimizer, prefixed apart from the policy's.
    pub(crate) fn vars(&self) -> Vec<(String, Var)> {
        match self {
            Critic::Head { weight, bias } => vec![
                ("v_head.weight".into(), weight.clone()),
                ("v_head.bias".into(), bias.clone()),
            ],
            Critic::Model { varmap, .. } => {
                let data = varmap.data().lock().expect("varmap lock");
                data.iter()
                    .map(|(n, v)| (format!("critic.{n}"), v.clone()))
                    .collect()
            }
        }
    }

    /// The file a checkpoint stores it in, with its tensors.
    pub(crate) fn checkpoint_file(&self) -> (&'static str, Vec<(String, Tensor)>) {
        match self {
            Critic::Head { weight, bias } => (
                "value_head.safetensors",
                vec![
                    ("v_head.weight".into(), weight.as_tensor().clone()),
                    ("v_head.bias".into(), bias.as_tensor().clone()),
                ],
            ),
            Critic::Model { varmap, .. } => (
                "critic.safetensors",
                crate::models::weights::named_tensors(varmap),
            ),
        }
    }

    pub(crate) fn restore(&self, dir: &Path, device: &Device) -> Result<()> {
        let (file, _) = self.checkpoint_file();
        let path = dir.join(file);
        match self {
            Critic::Head { weight, bias } => checkpoint::load_file_into_vars(
                &path,
                [("v_head.weight", weight), ("v_head.bias", bias)].into_iter(),
                device,
            ),
            Critic::Model { varmap, .. } => {
                let data = varmap.data().lock().expect("varmap lock");
                checkpoint::load_file_into_vars(
                    &path,
                    data.iter().map(|(n, v)| (n.as_str(), v)),
                    device,
                )
            }
        }
    }
}

/// Builds the critic the config asks for.
pub(crate) fn build_critic(
    p: &PpoConfig,
    reward_dir: Option<&Path>,
    policy_dir: &Path,
    hidden: usize,
    lora: Option<&LoraConfig>,
    dtype: DType,
    device: &Device,
) -> Result<Critic> {
    let head = || -> Result<Critic> {
        if p.critic_on_own_thread {
            tracing::warn!("ppo.critic_on_own_thread: the critic is a value head on the policy's hidden states, so it runs on the policy's thread");
        }
        Ok(Critic::Head {
            weight: Var::zeros((1, hidden), DType::F32, device)?,
            bias: Var::zeros(1, DType::F32, device)?,
        })
    };
    if p.value_model == ValueModel::Head {
        return head();
    }
    let why_not = match reward_dir {
        None => Some("no reward model directory (a programmatic reward)".to_string()),
        Some(dir) if !same_tokenizer(dir, policy_dir) => Some(format!(
            "the reward model {} has another tokenizer than the policy",
            dir.display()
        )),
        Some(_) => None,
    };
    if let Some(why) = why_not {
        if p.value_model == ValueModel::Reward {
            return Err(Error::InvalidConfig {
                field: "ppo.value_model".into(),
                value: "reward".into(),
                reason: format!("a critic cannot start from the reward model: {why}; use value_model = \"head\" (or \"auto\" to fall back)"),
            });
        }
        tracing::info!("value head on the policy: {why}");
        return head();
    }
    let dir = reward_dir.expect("checked above");
    if let Some(l) = lora {
        return lora_critic(dir, l, dtype, device);
    }
    let (model, varmap) = RewardModel::from_dir(dir, dtype, device, 0)?;
    if !model.is_decoder() {
        if p.value_model == ValueModel::Reward {
            return Err(Error::InvalidConfig {
                field: "ppo.value_model".into(),
                value: "reward".into(),
                reason: "an encoder reward model gives no per-token values".into(),
            });
        }
        return head();
    }
    let cfg = model.config.clone();
    let frozen = RewardModel::load(frozen_builder(&varmap, dtype, device), &varmap, &cfg, 0)?;
    tracing::info!("critic initialized from the reward model {}", dir.display());
    Ok(Critic::Model {
        model: Box::new(model),
        frozen: Box::new(frozen),
        varmap,
    })
}

/// `lora.critic`: the reward model with adapters of its own (the policy's
/// settings) and its `score` head trained in full, as peft's SEQ_CLS task;
/// no dropout, as TRL's PPOTrainer turns it off in every model.
fn lora_critic(dir: &Path, l: &LoraConfig, dtype: DType, device: &Device) -> Result<Critic> {
    let mut w = LoraWeights::read(dir, dtype, device, l, 0)?;
    w.spec.modules_to_save.push("score".into());
    w.dropout = None;
    let mut model = RewardModel::load(w.builder(), &w.varmap, &w.arch, 0)?;
    if !model.is_decoder() {
        return Err(Error::InvalidConfig {
            field: "lora.critic".into(),
            value: "true".into(),
            reason: "an encoder reward model gives no per-token values".into(),
        });
    }
    let adapted = w.attach_trainable(&mut model)?;
    let mut frozen = RewardModel::load(w.frozen_builder(), &w.varmap, &w.arch, 0)?;
    w.attach_frozen(&mut frozen)?;
    tracing::info!(
        "critic initialized from the reward model {} with LoRA on {} modules",
        dir.display(),
        adapted.len()
    );
    Ok(Critic::Model {
        model: Box::new(model),
        frozen: Box::new(frozen),
        varmap: w.varmap.clone(),
    })
}
