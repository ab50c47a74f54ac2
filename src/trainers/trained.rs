//! What a trainer trains: every weight of the model (full fine-tuning), or
//! LoRA adapters over frozen base weights (`[lora]`), and what its
//! checkpoints hold for each.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::checkpoint::{self, Checkpoint, LoraParts, TrainerState};
use crate::config::{Config, LoraConfig, ModelInit};
use crate::models::lora::{adapter_tensors, LoraWeights};
use crate::models::{frozen_builder, load_dir_init, ArchConfig, CausalLm, Linears};
use crate::optim::TrainCore;
use crate::run::RunDir;
use crate::{Error, Result};

/// adapter_config.json's `base_model_name_or_path` for the model argument
/// `arg`: a hub id as given, a local directory as an absolute path (so the
/// adapter loads from anywhere).
pub fn base_name(arg: &str) -> String {
    let path = Path::new(arg);
    if path.is_dir() {
        if let Ok(abs) = path.canonicalize() {
            return abs.display().to_string();
        }
    }
    arg.to_string()
}

/// Tensors under their checkpoint names.
pub type NamedTensors = Vec<(String, Tensor)>;

/// The trained weights of one model.
pub enum Trained {
    /// Every weight is a Var of the map.
    Full(VarMap),
    /// Adapters (and modules_to_save) are the Vars; the base stays frozen.
    Lora {
        weights: Box<LoraWeights>,
        /// The adapted modules, once attached.
        adapted: Vec<String>,
        /// The base model as the run names it (adapter_config.json's base_model_name_or_path).
        base_name: String,
        /// peft's task_type: CAUSAL_LM or SEQ_CLS.
        task_type: &'static str,
        save_merged: bool,
    },
}

impl Trained {
    /// Reads `dir` (named `base_name` in the run's config) for training:
    /// in full as `init` says, or for LoRA when `lora` is set. Returns the
    /// architecture and the builder to construct the model from.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        dir: &Path,
        base_name: &str,
        lora: Option<&LoraConfig>,
        task_type: &'static str,
        init: ModelInit,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<(ArchConfig, VarBuilder<'static>, Self)> {
        let Some(cfg) = lora else {
            let (arch, vb, varmap) = load_dir_init(dir, dtype, device, init, seed)?;
            return Ok((arch, vb, Self::Full(varmap)));
        };
        if init != ModelInit::Pretrained {
            return Err(Error::InvalidConfig {
                field: "model.init".into(),
                value: "random".into(),
                reason: "LoRA adapts a pretrained model; a random base is trained in full (remove [lora])".into(),
            });
        }
        let mut weights = LoraWeights::read(dir, dtype, device, cfg, seed)?;
        if task_type == "SEQ_CLS" {
            // As peft does for sequence classification: the head trains in full.
            for head in ["classifier", "score"] {
                if !weights.spec.modules_to_save.iter().any(|m| m == head) {
                    weights.spec.modules_to_save.push(head.to_string());
                }
            }
        }
        let vb = weights.builder();
        Ok((
            weights.arch.clone(),
            vb,
            Self::Lora {
                weights: Box::new(weights),
                adapted: vec![],
                base_name: base_name.to_string(),
                task_type,
                save_merged: cfg.save_merged,
            },
        ))
    }

    /// The same with LoRA's dropout off (TRL's `disable_dropout`); call before [`Self::attach`].
    pub fn without_dropout(mut self) -> Self {
        if let Self::Lora { weights, .. } = &mut self {
            weights.dropout = None;
        }
        self
    }

    /// [`Self::load`] with the run's settings: the model `cfg` names (read
    /// from `dir`), its `[lora]`, seed, dtype and device.
    pub fn for_run(
        cfg: &Config,
        dir: &Path,
        task_type: &'static str,
        init: ModelInit,
        device: &Device,
    ) -> Result<(ArchConfig, VarBuilder<'static>, Self)> {
        Self::load(
            dir,
            &base_name(&cfg.model.resolved_name()?),
            cfg.lora.as_ref(),
            task_type,
            init,
            cfg.run.dtype.dtype(),
            device,
            cfg.run.seed,
        )
    }

    /// Attaches the adapters to the model built from [`Self::load`]'s builder
    /// (nothing to do in full fine-tuning).
    pub fn attach(&mut self, model: &mut dyn Linears) -> Result<()> {
        if let Self::Lora {
            weights, adapted, ..
        } = self
        {
            *adapted = weights.attach_trainable(model)?;
            let trainable: usize = crate::models::weights::named_tensors(&weights.varmap)
                .iter()
                .map(|(_, t)| t.elem_count())
                .sum();
            tracing::info!(
                "LoRA r={} on {} modules: {trainable} trainable parameters",
                weights.spec.r,
                adapted.len()
            );
        }
        Ok(())
    }

    /// The Vars the optimizer trains and checkpoints hold.
    pub fn varmap(&self) -> &VarMap {
        match self {
            Self::Full(v) => v,
            Self::Lora { weights, .. } => &weights.varmap,
        }
    }

    /// The LoRA weights, when training adapters.
    pub fn lora(&self) -> Option<&LoraWeights> {
        match self {
            Self::Full(_) => None,
            Self::Lora { weights, .. } => Some(weights),
        }
    }

    /// Starts optimizer step `step` (its LoRA dropout masks).
    pub fn begin_step(&self, step: u64) {
        if let Some(d) = self.lora().and_then(|w| w.dropout.as_ref()) {
            d.begin_step(step);
            d.set_active(true);
        }
    }

    /// Training forwards (dropout on) or evaluation (off).
    pub fn set_training(&self, training: bool) {
        if let Some(d) = self.lora().and_then(|w| w.dropout.as_ref()) {
            d.set_active(training);
        }
    }

    /// A causal LM over the trained weights that records no graph (rollouts):
    /// detached Vars, and detached adapters under LoRA.
    pub fn frozen_causal(
        &self,
        arch: &ArchConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<CausalLm> {
        match self {
            Self::Full(varmap) => CausalLm::load(frozen_builder(varmap, dtype, device), arch, true),
            Self::Lora { weights, .. } => {
                let mut lm = CausalLm::load(weights.frozen_builder(), arch, true)?;
                weights.attach_frozen(&mut lm)?;
                Ok(lm)
            }
        }
    }

    /// Under LoRA, the base model with no adapter (the reference of PPO and
    /// GRPO), over the trained model's own base tensors: no second copy.
    pub fn base_causal(&self, arch: &ArchConfig) -> Option<Result<CausalLm>> {
        self.lora()
            .map(|w| CausalLm::load(w.base_builder(), arch, true))
    }

    /// The frozen reference of an online run: `ref_model` (a directory or
    /// hub id) in `ref_dtype` (unset: `dtype`), else the initial policy in
    /// `policy_dir`: under LoRA, the policy with its adapters disabled over
    /// the same base tensors (no second copy) when the dtypes agree.
    #[allow(clippy::too_many_arguments)]
    pub fn reference(
        &self,
        arch: &ArchConfig,
        ref_model: Option<&str>,
        policy_dir: &Path,
        ref_dtype: Option<DType>,
        dtype: DType,
        device: &Device,
    ) -> Result<CausalLm> {
        let ref_dtype = ref_dtype.unwrap_or(dtype);
        if let (None, true) = (ref_model, ref_dtype == dtype) {
            if let Some(base) = self.base_causal(arch) {
                return base;
            }
        }
        let dir = match ref_model {
            Some(r) => crate::models::resolve_model(r, &crate::hub::HubSettings::from_env())?,
            None => policy_dir.to_path_buf(),
        };
        let (ref_arch, vb, _) = crate::models::load_dir_frozen(&dir, ref_dtype, device)?;
        CausalLm::load(vb, &ref_arch, true).map_err(|e| {
            let kind = ref_arch.model_type();
            Error::Msg(format!(
                "the reference {} ({kind}) is no causal LM: {e}",
                dir.display()
            ))
        })
    }

    /// The tensors a checkpoint saves and, under LoRA, its adapter parts.
    pub fn checkpoint_parts(&self) -> Result<(NamedTensors, Option<LoraParts>)> {
        match self {
            Self::Full(varmap) => Ok((crate::models::weights::named_tensors(varmap), None)),
            Self::Lora {
                weights,
                adapted,
                base_name,
                task_type,
                save_merged,
            } => Ok((
                adapter_tensors(&weights.varmap),
                Some(LoraParts {
                    adapter_config: weights.adapter_config(base_name, adapted, task_type),
                    merged: if *save_merged {
                        Some(weights.merged()?)
                    } else {
                        None
                    },
                }),
            )),
        }
    }

    /// Writes a checkpoint of a run (the one helper of every trainer): the
    /// trained weights (full, or the adapter under LoRA) with the model's
    /// files, `extra` safetensors files beside them (a critic), the
    /// optimizer and the trainer state; keeps `save_total_limit` of them.
    pub fn save_checkpoint(
        &self,
        run: &RunDir,
        files: &ModelFiles,
        extra: &[(&str, NamedTensors)],
        core: &TrainCore,
        state: &TrainerState,
        save_total_limit: Option<usize>,
    ) -> Result<PathBuf> {
        let (weights, lora) = self.checkpoint_parts()?;
        checkpoint::save(
            &run.path,
            &Checkpoint {
                weights: &weights,
                model_config: Some(files.config),
                tokenizer_files: files.tokenizer_files,
                extra_weights: extra,
                optimizer: Some(&core.optimizer),
                state,
                manifest: &run.manifest,
                lora: lora.as_ref(),
            },
            save_total_limit,
        )
    }
}

/// The files a checkpoint carries beside the weights: the model's
/// config.json (a reward model's with its head) and the tokenizer's.
pub struct ModelFiles<'a> {
    pub config: &'a serde_json::Value,
    pub tokenizer_files: &'a [PathBuf],
}
