//! The `[[reward_funcs]]` tables of a config, made into a [`RewardFuncs`] set.

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Device;

use super::external::{CommandReward, HttpReward};
use super::rules::{ExactMatch, LengthReward, RegexReward};
use super::{RewardFunc, RewardFuncs, RewardModelReward};
use crate::config::{Config, RewardFuncConfig, RewardFuncType};
use crate::{Error, Result};

/// The directory of the first reward model in a set, if any (PPO's critic
/// may start from it).
pub type FirstModel = Option<PathBuf>;

/// The reward functions an online trainer (`command`: ppo, grpo or rloo)
/// scores with: the config's `[[reward_funcs]]`, or for PPO the reward
/// model of its `ppo.reward_model` shorthand; an error naming the key when
/// there are none.
pub fn of_trainer(cfg: &Config, command: &str) -> Result<Vec<RewardFuncConfig>> {
    if let (Some(rm), "ppo") = (&cfg.ppo.reward_model, command) {
        return Ok(vec![RewardFuncConfig {
            name: "reward_model".into(),
            kind: RewardFuncType::Model,
            model: Some(rm.clone()),
            dtype: cfg.ppo.reward_model_dtype,
            ..Default::default()
        }]);
    }
    if !cfg.reward_funcs.is_empty() {
        return Ok(cfg.reward_funcs.clone());
    }
    let kinds = "type = model, regex, exact_match, length, command or http";
    Err(match command {
        "ppo" => Error::InvalidConfig {
            field: "ppo.reward_model".into(),
            value: String::new(),
            reason: "a reward model directory or hub id, or [[reward_funcs]] tables, are required (library users may pass any Reward)".into(),
        },
        _ => Error::InvalidConfig {
            field: "reward_funcs".into(),
            value: String::new(),
            reason: format!("{command} needs at least one [[reward_funcs]] table ({kinds})"),
        },
    })
}

/// Builds the reward functions of `funcs` (each loaded once; reward models
/// on `device`, compared with the policy in `policy_dir` for id
/// pass-through), and the directory of the first reward model.
pub fn from_config(
    funcs: &[RewardFuncConfig],
    policy_dir: &Path,
    device: &Device,
) -> Result<(RewardFuncs<'static>, FirstModel)> {
    let mut out = Vec::with_capacity(funcs.len());
    let mut first_model = None;
    for f in funcs {
        let timeout = Duration::from_secs_f64(f.timeout_s);
        let missing = |key: &str| crate::Error::InvalidConfig {
            field: format!("reward_funcs.{key}"),
            value: String::new(),
            reason: format!("reward function `{}` needs it", f.name),
        };
        let reward: Box<dyn super::Reward> = match f.kind {
            RewardFuncType::Model => {
                let model = f.model.as_deref().ok_or_else(|| missing("model"))?;
                let dtype = f.dtype.map_or(candle_core::DType::F32, |d| d.dtype());
                let r = RewardModelReward::load_in(model, policy_dir, dtype, device)?;
                first_model.get_or_insert_with(|| r.dir.clone());
                Box::new(r)
            }
            RewardFuncType::Regex => Box::new(RegexReward::new(
                f.pattern.as_deref().ok_or_else(|| missing("pattern"))?,
            )?),
            RewardFuncType::ExactMatch => Box::new(ExactMatch::new(
                f.pattern.as_deref(),
                f.column.as_deref().ok_or_else(|| missing("column"))?,
            )?),
            RewardFuncType::Length => Box::new(LengthReward {
                target: f.target.ok_or_else(|| missing("target"))?,
            }),
            RewardFuncType::Command => Box::new(CommandReward {
                argv: f.command.clone(),
                timeout,
            }),
            RewardFuncType::Http => Box::new(HttpReward {
                url: f.url.clone().ok_or_else(|| missing("url"))?,
                label_column: f.column.clone().unwrap_or_else(|| "label".into()),
                timeout,
            }),
        };
        out.push(RewardFunc {
            name: f.name.clone(),
            weight: f.weight,
            reward,
        });
    }
    Ok((RewardFuncs(out), first_model))
}
