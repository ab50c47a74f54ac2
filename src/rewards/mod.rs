//! What a reward is to the online trainers (PPO, GRPO, RLOO): one score per
//! sampled completion, batched, from any number of named, weighted reward
//! functions (TRL's `reward_funcs` and `reward_weights`).
//!
//! - mod.rs: the [`Reward`] trait, [`Completion`], and [`RewardFuncs`], the
//!   weighted set a trainer scores with;
//! - rules.rs: `regex`, `exact_match` and `length`;
//! - external.rs: `command` (a program on stdin/stdout) and `http` (an
//!   OpenRLHF-style remote reward model);
//! - model.rs: a reward model as a reward;
//! - build.rs: the `[[reward_funcs]]` tables of a config made into a set.

mod build;
pub mod external;
pub mod model;
pub mod rules;

pub use build::{from_config, of_trainer, FirstModel};
pub use model::{same_tokenizer, RewardModelReward};

use serde_json::{Map, Value};

use crate::{Error, Result};

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
    pub prompt_messages: Option<&'a [Value]>,
    /// The prompt row's other columns (e.g. `answer`), for verifiers.
    pub columns: Option<&'a Map<String, Value>>,
}

/// A reward: one score per completion, batched. Closures
/// `Fn(&[Completion]) -> Result<Vec<f32>>` are rewards, so a verifier or a
/// rule plugs in directly; [`RewardModelReward`] is the reward model.
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

/// A borrowed reward in a [`RewardFuncs`] set (a library caller's own).
struct Borrowed<'a>(&'a dyn Reward);

impl Reward for Borrowed<'_> {
    fn score(&self, batch: &[Completion]) -> Result<Vec<f32>> {
        self.0.score(batch)
    }
}

/// One reward function of a set: its name in the metrics, its weight.
pub struct RewardFunc<'a> {
    pub name: String,
    pub weight: f64,
    pub reward: Box<dyn Reward + 'a>,
}

/// The reward functions of a run: each scores every completion; the
/// reward is their weighted sum (TRL's `reward_weights`).
pub struct RewardFuncs<'a>(pub Vec<RewardFunc<'a>>);

impl<'a> RewardFuncs<'a> {
    /// One reward function, weight 1, named `name`.
    pub fn single(name: &str, reward: &'a dyn Reward) -> Self {
        Self(vec![RewardFunc {
            name: name.to_string(),
            weight: 1.0,
            reward: Box::new(Borrowed(reward)),
        }])
    }

    /// The names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|f| f.name.as_str()).collect()
    }

    /// Every function's scores (one row per function), each checked: one
    /// finite number per completion, or an error naming the function.
    pub fn score_each(&self, batch: &[Completion]) -> Result<Vec<Vec<f32>>> {
        self.0
            .iter()
            .map(|f| {
                let fail = |why: String| Error::Msg(format!("reward function `{}`: {why}", f.name));
                let scores = f.reward.score(batch).map_err(|e| fail(e.to_string()))?;
                if scores.len() != batch.len() {
                    return Err(fail(format!(
                        "returned {} scores for {} completions",
                        scores.len(),
                        batch.len()
                    )));
                }
                if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
                    return Err(fail(format!(
                        "score {} of completion {i} is not a finite number",
                        scores[i]
                    )));
                }
                Ok(scores)
            })
            .collect()
    }

    /// The weighted sum of [`Self::score_each`]'s rows.
    pub fn combine(&self, each: &[Vec<f32>]) -> Vec<f32> {
        let n = each.first().map_or(0, Vec::len);
        let mut total = vec![0f32; n];
        for (f, scores) in self.0.iter().zip(each) {
            for (t, s) in total.iter_mut().zip(scores) {
                *t += (f.weight * *s as f64) as f32;
            }
        }
        total
    }
}

impl Reward for RewardFuncs<'_> {
    fn score(&self, batch: &[Completion]) -> Result<Vec<f32>> {
        Ok(self.combine(&self.score_each(batch)?))
    }
}

/// The text a column holds, as a verifier compares it: a string as is, any
/// other JSON value as JSON (`19`, `true`).
pub fn column_text(columns: Option<&Map<String, Value>>, column: &str) -> Option<String> {
    match columns?.get(column)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        v => Some(v.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn completion<'a>(
        response: &'a str,
        ids: &'a [u32],
        columns: Option<&'a Map<String, Value>>,
    ) -> Completion<'a> {
        Completion {
            prompt: "p",
            response,
            query_ids: &[1],
            response_ids: ids,
            prompt_messages: None,
            columns,
        }
    }

    #[test]
    fn weighted_sum_and_checks() {
        let a = |b: &[Completion]| -> Result<Vec<f32>> { Ok(vec![1.0; b.len()]) };
        let b =
            |b: &[Completion]| -> Result<Vec<f32>> { Ok((0..b.len()).map(|i| i as f32).collect()) };
        let funcs = RewardFuncs(vec![
            RewardFunc {
                name: "a".into(),
                weight: 0.5,
                reward: Box::new(a),
            },
            RewardFunc {
                name: "b".into(),
                weight: 2.0,
                reward: Box::new(b),
            },
        ]);
        let batch = [completion("x", &[], None), completion("y", &[], None)];
        // 0.5 * 1 + 2 * 0 and 0.5 * 1 + 2 * 1.
        assert_eq!(funcs.score(&batch).unwrap(), vec![0.5, 2.5]);
        assert_eq!(funcs.names(), vec!["a", "b"]);
        let short = |_: &[Completion]| -> Result<Vec<f32>> { Ok(vec![1.0]) };
        let nan = |b: &[Completion]| -> Result<Vec<f32>> { Ok(vec![f32::NAN; b.len()]) };
        for (name, r) in [
            ("short", Box::new(short) as Box<dyn Reward>),
            ("nan", Box::new(nan)),
        ] {
            let set = RewardFuncs(vec![RewardFunc {
                name: name.into(),
                weight: 1.0,
                reward: r,
            }]);
            let e = set.score(&batch).unwrap_err().to_string();
            assert!(e.contains(&format!("reward function `{name}`")), "{e}");
        }
    }

    #[test]
    fn column_text_of_json_values() {
        let row: Map<String, Value> =
            serde_json::from_str(r#"{"a": "19", "b": 19, "c": null}"#).unwrap();
        assert_eq!(column_text(Some(&row), "a").as_deref(), Some("19"));
        assert_eq!(column_text(Some(&row), "b").as_deref(), Some("19"));
        assert_eq!(column_text(Some(&row), "c"), None);
        assert_eq!(column_text(Some(&row), "d"), None);
        assert_eq!(column_text(None, "a"), None);
    }
}
