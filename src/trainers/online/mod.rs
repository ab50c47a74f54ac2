//! Online RL: the policy samples, the reward functions score, the policy
//! learns. One engine runs every algorithm (PPO, REINFORCE++, GRPO, RLOO):
//!
//! - engine.rs: the loop, its steps numbered once (1 sample, 2 log-probs,
//!   3 score, 4 rewards, 5 advantages, 6 passes of optimizer steps, 7
//!   adaptive KL, 8 log / evaluate / checkpoint), setup and resume;
//! - algo.rs: what differs between the algorithms, side by side, and the
//!   one settings struct built from `[ppo]`, `[grpo]` or `[rloo]`;
//! - rollout.rs: sampled completions with their prompt rows, the forwards
//!   over them, their scores;
//! - batch.rs: prompts and completions as one padded batch, the policy's
//!   log-probs on it;
//! - critic.rs: PPO's value head or critic model;
//! - eval.rs: the one evaluator (training and `candle-rlhf eval`);
//! - stats.rs: phase times and the metric accumulator.

pub mod algo;
mod batch;
mod critic;
pub mod engine;
pub mod eval;
pub(crate) mod rollout;
pub mod stats;

use candle_core::Device;

pub use algo::{Algo, Trainer};
pub use engine::{train, train_with_rewards, OnlineRun};
pub use eval::EvalReport;
pub use stats::PhaseTimes;

use crate::models::CausalLm;
use crate::rewards::{Reward, RewardFuncs};
use crate::signal::StopSignal;
use crate::tokenizer::Tokenizer;
use critic::Critic;

/// The frozen models an iteration and an evaluation read.
pub(crate) struct Models<'a> {
    /// The policy's detached twin: samples, and gives the old log-probs.
    pub sampler: &'a CausalLm,
    pub reference: Option<&'a CausalLm>,
    pub critic: Option<&'a Critic>,
    pub tok: &'a Tokenizer,
    pub rewards: &'a RewardFuncs<'a>,
    pub device: &'a Device,
}

/// Trains (or resumes) with `algo` against one `reward` (see
/// [`train_with_rewards`]); its metrics are `rewards/reward/mean`.
pub fn train_with_reward(
    cfg: &crate::config::Config,
    algo: Algo,
    run_dir: &std::path::Path,
    resume: bool,
    stop: &StopSignal,
    reward: &dyn Reward,
    reward_dir: Option<&std::path::Path>,
) -> crate::Result<OnlineRun> {
    let rewards = RewardFuncs::single("reward", reward);
    train_with_rewards(cfg, algo, run_dir, resume, stop, &rewards, reward_dir)
}
