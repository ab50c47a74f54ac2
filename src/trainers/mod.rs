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
