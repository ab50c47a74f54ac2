//! The trainers, one file per stage of the pipeline: `sft`, `reward`
//! (reward-model training; the model itself is `models::reward_model`) and
//! `ppo`. Each writes its loop top to bottom over the shared training core
//! (`optim::TrainCore`).

pub mod ppo;
pub mod reward;
pub mod sft;
