//! The trainers, one per stage of the pipeline: `sft`, `reward`
//! (reward-model training; the model itself is `models::reward_model`),
//! `dpo` (preference tuning without a reward model) and
//! the online RL engine `online` (one loop for PPO with its critic,
//! REINFORCE++, GRPO and RLOO). Each writes its loop top to bottom over the
//! shared training core (`optim::TrainCore`) and saves through
//! [`trained::Trained::save_checkpoint`].

pub mod dpo;
pub mod online;
pub mod reward;
pub mod sft;
pub mod trained;

use candle_core::Device;
use candle_nn::VarMap;

use crate::checkpoint::TrainerState;
use crate::config::TrainConfig;
use crate::optim::{step_plan, AdamW, AdamWParams, TrainCore};
use crate::run::RunDir;
use crate::Result;

/// Where an offline trainer (sft, reward, dpo) starts its loop: AdamW over
/// `varmap` with the schedule of a run over `items` examples, and the state,
/// fresh (stream "data", `num_tokens` 0) or restored from the run's newest
/// checkpoint.
pub(crate) struct OfflineStart {
    pub core: TrainCore,
    pub state: TrainerState,
    /// Examples per micro-batch, optimizer steps per epoch, in all.
    pub batch: usize,
    pub per_epoch: u64,
    pub total: u64,
}

pub(crate) fn offline_start(
    run: &RunDir,
    t: &TrainConfig,
    varmap: &VarMap,
    items: usize,
    seed: u64,
    device: &Device,
) -> Result<OfflineStart> {
    let ranks = crate::dist::world().size;
    if items < ranks {
        return Err(crate::Error::Msg(format!(
            "{items} training example(s) cannot be shared by {ranks} ranks"
        )));
    }
    let (batch, per_epoch, total) = step_plan(t, items);
    let mut core = TrainCore::new(
        AdamW::from_varmap(varmap, AdamWParams::from_config(t))?,
        t,
        total,
    );
    let fresh = TrainerState::fresh(seed, &["data"], serde_json::json!({"num_tokens": 0}));
    let state = run.restore(fresh, &mut core.optimizer, device)?;
    Ok(OfflineStart {
        core,
        state,
        batch,
        per_epoch,
        total,
    })
}
