//! Online RL: the policy samples, the reward functions score, the policy
//! learns. PPO (with a critic and GAE) and the critic-free family (GRPO,
//! RLOO) share the rollout (`rollout.rs`) and the reward functions
//! (`crate::rewards`).

mod critic;
pub mod grpo;
pub mod ppo;
pub(crate) mod rollout;
