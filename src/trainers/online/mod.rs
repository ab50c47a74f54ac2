//! Online RL: the policy samples, the reward functions score, the policy
//! learns. Every trainer here numbers its iteration the same way (1 sample,
//! 2 log-probs, 3 score, 4 rewards, 5 advantages, 6 optimizer steps, 7
//! adaptive KL, 8 log / evaluate / checkpoint):
//!
//! - ppo.rs: PPO with a critic and GAE, or REINFORCE++ without one;
//! - grpo.rs: GRPO and RLOO, no critic;
//! - rollout.rs: prompts and responses as one batch, log-probs, sampling,
//!   scoring with the reward functions (`crate::rewards`);
//! - critic.rs: PPO's value head or critic model;
//! - eval.rs: evaluation reports and how a run records them;
//! - stats.rs: phase times and loss diagnostics.

mod critic;
pub mod eval;
pub mod grpo;
pub mod ppo;
pub(crate) mod rollout;
pub mod stats;
