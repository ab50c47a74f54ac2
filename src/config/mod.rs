//! Run configuration: TOML files parsed into typed sections, `--set`
//! overrides, and validation before any model is loaded.
//!
//! Hyperparameters keep the names Hugging Face TRL and transformers use
//! (learning_rate, per_device_train_batch_size, kl_coef, cliprange, lam, ...)
//! and, unless a doc line says otherwise, their defaults. Unknown keys are
//! rejected with the nearest known key suggested; every field has a default,
//! so a config file only lists what it changes.
//!
//! - sections.rs: the sections, one line per key with its doc and default;
//! - validate.rs: the rules values must meet, a table per section;
//! - parse.rs: overrides and error messages;
//! - reference.rs: docs/config.md, made from the sections.

mod parse;
pub mod reference;
mod sections;
mod validate;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use sections::{
    AdvantageEstimator, DatasetConfig, DpoConfig, DpoLossType, FDivergenceType, GenerateConfig,
    GrpoConfig, GrpoLossType, ImportanceSamplingLevel, InitLoraWeights, KlEstimator, LoraConfig,
    LrSchedulerType, ModelConfig, ModelInit, OnlineKeys, PpoConfig, RewardConfig, RewardFuncConfig,
    RewardFuncType, RlooConfig, RunConfig, ScaleRewards, SftConfig, StopToken, TargetModules,
    TrainConfig, TruncationMode, ValueModel,
};

use crate::{Error, Result};
use parse::{apply_override, file_error, flatten_into, override_error};

/// Everything a run reads from its config file. Each subcommand uses the
/// sections it needs; the resolved whole is saved in every run directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Seed, device, dtype and run directory.
    pub run: RunConfig,
    /// The model to start from.
    pub model: ModelConfig,
    /// Optimizer, schedule, batching, logging and checkpointing shared by every trainer.
    pub train: TrainConfig,
    /// Sampling settings for `generate`.
    pub generate: GenerateConfig,
    /// Supervised fine-tuning (TRL's SFTConfig).
    pub sft: SftConfig,
    /// Reward-model training (TRL's RewardConfig).
    pub reward: RewardConfig,
    /// DPO (TRL's DPOConfig).
    pub dpo: DpoConfig,
    /// PPO (TRL's PPOConfig).
    pub ppo: PpoConfig,
    /// GRPO (TRL's GRPOConfig).
    pub grpo: GrpoConfig,
    /// RLOO (TRL's RLOOConfig).
    pub rloo: RlooConfig,
    /// The reward functions of ppo, grpo and rloo, one `[[reward_funcs]]` table each.
    pub reward_funcs: Vec<RewardFuncConfig>,
    /// LoRA adapters on the trained model (peft's LoraConfig); absent: full fine-tuning.
    pub lora: Option<LoraConfig>,
}

impl Config {
    /// Reads `path` (or the defaults when `None`), applies each `key.path=value`
    /// override in order, and validates the result.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Config> {
        let table = match path {
            Some(path) => {
                let source = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
                    source_name: source.clone(),
                    message: format!("cannot read the config file: {e}"),
                })?;
                // Typed parse of the file alone first: its errors carry line numbers.
                toml::from_str::<Config>(&text).map_err(|e| file_error(&source, &text, &e))?;
                text.parse::<toml::Table>()
                    .map_err(|e| file_error(&source, &text, &e))?
            }
            None => toml::Table::new(),
        };
        Self::from_table(table, overrides)
    }

    /// This config with `key.path=value` overrides applied, validated.
    pub fn with_overrides(&self, overrides: &[String]) -> Result<Config> {
        let table = toml::Table::try_from(self)
            .map_err(|e| Error::Msg(format!("cannot write config as TOML: {e}")))?;
        Self::from_table(table, overrides)
    }

    fn from_table(mut table: toml::Table, overrides: &[String]) -> Result<Config> {
        for assignment in overrides {
            apply_override(&mut table, assignment)?;
            Config::deserialize(toml::Value::Table(table.clone()))
                .map_err(|e| override_error(assignment, &e))?;
        }
        let config = Config::deserialize(toml::Value::Table(table))
            .map_err(|e| override_error("(combined)", &e))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a config from TOML text (used for configs saved in run directories).
    pub fn from_toml_str(source_name: &str, text: &str) -> Result<Config> {
        let config =
            toml::from_str::<Config>(text).map_err(|e| file_error(source_name, text, &e))?;
        config.validate()?;
        Ok(config)
    }

    /// The config as TOML text, as saved in run directories.
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string_pretty(self)
            .map_err(|e| Error::Msg(format!("cannot write config as TOML: {e}")))
    }

    /// Rejects values that parse but make no sense, naming the field.
    pub fn validate(&self) -> Result<()> {
        validate::validate(self)
    }

    /// Every leaf of the config as `section.key` -> value (unset options absent).
    pub fn flatten(&self) -> BTreeMap<String, serde_json::Value> {
        let mut out = BTreeMap::new();
        if let Ok(value) = serde_json::to_value(self) {
            flatten_into("", &value, &mut out);
        }
        out
    }
}
