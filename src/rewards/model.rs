//! A reward model as a reward: scores completions the way the reward
//! model was trained to read them.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::{Completion, Reward};
use crate::hub::HubSettings;
use crate::models::resolve_model;
use crate::models::reward_model::RewardScorer;
use crate::Result;

/// A reward model as a reward. A conversational prompt, when the reward
/// model has a chat template of its own, is re-rendered with the response as
/// an assistant message by that template and scored as the reward model was
/// trained. Otherwise, with the policy's tokenizer, token ids pass straight
/// through (prompt + response, EOS appended when missing, as in reward
/// training); with another tokenizer the text is re-tokenized with its own.
pub struct RewardModelReward {
    pub scorer: RewardScorer,
    pub same_tokenizer: bool,
    /// The reward model's own chat template, if it has one.
    pub template: Option<crate::chat::ChatTemplate>,
    /// The resolved directory (a critic may start from it).
    pub dir: PathBuf,
}

impl RewardModelReward {
    pub fn load(model: &str, policy_dir: &Path, device: &Device) -> Result<Self> {
        Self::load_in(model, policy_dir, DType::F32, device)
    }

    /// [`Self::load`] with the model in `dtype`.
    pub fn load_in(model: &str, policy_dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let dir = resolve_model(model, &HubSettings::from_env())?;
        let scorer = RewardScorer::load_in(&dir.to_string_lossy(), dtype, device)?;
        Ok(Self {
            scorer,
            template: crate::chat::ChatTemplate::resolve(&dir, None)?,
            same_tokenizer: same_tokenizer(&dir, policy_dir),
            dir,
        })
    }
}

/// Whether two model directories ship byte-identical tokenizer.json files.
pub fn same_tokenizer(a: &Path, b: &Path) -> bool {
    match (
        std::fs::read(a.join("tokenizer.json")),
        std::fs::read(b.join("tokenizer.json")),
    ) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

impl Reward for RewardModelReward {
    fn score(&self, batch: &[Completion]) -> Result<Vec<f32>> {
        if let Some(t) = &self.template {
            if !batch.is_empty() && batch.iter().all(|c| c.prompt_messages.is_some()) {
                let seqs = batch
                    .iter()
                    .map(|c| {
                        let mut conv = c.prompt_messages.unwrap_or_default().to_vec();
                        conv.push(serde_json::json!({"role": "assistant", "content": c.response}));
                        self.scorer.tokenizer.encode_plain(&t.render(&conv, false)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                return self.scorer.score_ids(&seqs);
            }
        }
        if self.same_tokenizer {
            // EOS appended when the sequence does not end with a stop token.
            let tok = &self.scorer.tokenizer;
            let seqs: Vec<Vec<u32>> = batch
                .iter()
                .map(|c| {
                    let mut s = [c.query_ids, c.response_ids].concat();
                    if !s.last().is_some_and(|&l| tok.is_stop(l)) {
                        s.push(tok.eos_id);
                    }
                    s
                })
                .collect();
            self.scorer.score_ids(&seqs)
        } else {
            let texts: Vec<String> = batch
                .iter()
                .map(|c| format!("{}{}", c.prompt, c.response))
                .collect();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            self.scorer.score(&refs)
        }
    }
}
