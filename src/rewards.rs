//! What a reward is to the online trainers: one score per sampled
//! completion, batched. A leaf module: a reward function, a verifier or an
//! application's task implements [`Reward`] without importing a trainer.
//! The reward model as a reward lives with the PPO trainer
//! (`trainers::ppo::RewardModelReward`).

use crate::Result;

/// One sampled completion, as a reward function sees it.
pub struct Completion<'a> {
    pub prompt: &'a str,
    /// The response text (special tokens skipped, the stop token not shown).
    pub response: &'a str,
    /// The prompt's token ids under the policy's tokenizer, unpadded.
    pub query_ids: &'a [u32],
    /// The response's ids, ending with the stop token when it was produced.
    pub response_ids: &'a [u32],
    /// The prompt's messages when it was conversational: a reward model with
    /// a chat template of its own re-renders them with the response.
    pub prompt_messages: Option<&'a [serde_json::Value]>,
}

/// A reward: one score per completion, batched. Closures
/// `Fn(&[Completion]) -> Result<Vec<f32>>` are rewards, so a verifier or a
/// rule plugs in directly; `trainers::ppo::RewardModelReward` is the reward model.
pub trait Reward {
    fn score(&self, batch: &[Completion]) -> Result<Vec<f32>>;
}

impl<F: Fn(&[Completion]) -> Result<Vec<f32>>> Reward for F {
    fn score(&self, batch: &[Completion]) -> Result<Vec<f32>> {
        self(batch)
    }
}

/// The sum of several rewards (reward models, rules).
pub struct SumOfRewards(pub Vec<Box<dyn Reward>>);

impl Reward for SumOfRewards {
    fn score(&self, batch: &[Completion]) -> Result<Vec<f32>> {
        let mut total = vec![0f32; batch.len()];
        for r in &self.0 {
            for (t, s) in total.iter_mut().zip(r.score(batch)?) {
                *t += s;
            }
        }
        Ok(total)
    }
}
