//! The trainers, one per stage of the pipeline: `sft`, `reward`
//! (reward-model training; the model itself is `models::reward_model`) and
//! the online RL engine `online` (PPO with its critic; GRPO and RLOO
//! without one). Each writes its loop top to bottom over the shared
//! training core (`optim::TrainCore`).

pub mod online;
pub mod reward;
pub mod sft;
pub mod trained;

pub use online::ppo;
