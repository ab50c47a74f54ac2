//! Rule-based rewards, computed from the completion alone (or with the
//! row's expected answer): the verifiable rewards of GRPO recipes.

use regex::Regex;

use super::{column_text, Completion, Reward};
use crate::{Error, Result};

fn compile(pattern: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|e| Error::Msg(format!("invalid pattern {pattern:?}: {e}")))
}

/// `type = "regex"`: 1.0 when the pattern matches somewhere in the
/// completion (Python's `re.search`; anchor it with `^` and `$`), else 0.0.
pub struct RegexReward(Regex);

impl RegexReward {
    pub fn new(pattern: &str) -> Result<Self> {
        compile(pattern).map(Self)
    }
}

impl Reward for RegexReward {
    fn score(&self, batch: &[Completion]) -> Result<Vec<f32>> {
        Ok(batch
            .iter()
            .map(|c| self.0.is_match(c.response) as u8 as f32)
            .collect())
    }
}

/// `type = "exact_match"`: 1.0 when the answer taken from the completion
/// (the first capture group of the pattern's first match, or the whole
/// completion without a pattern) equals the row's `column`, both trimmed;
/// else 0.0 (also when the pattern does not match). A row without the
/// column is an error naming it.
pub struct ExactMatch {
    pattern: Option<Regex>,
    column: String,
}

impl ExactMatch {
    pub fn new(pattern: Option<&str>, column: &str) -> Result<Self> {
        Ok(Self {
            pattern: pattern.map(compile).transpose()?,
            column: column.to_string(),
        })
    }

    /// The answer a completion gives, trimmed.
    pub fn answer<'t>(&self, response: &'t str) -> Option<&'t str> {
        match &self.pattern {
            None => Some(response.trim()),
            Some(re) => {
                let caps = re.captures(response)?;
                Some(caps.get(1).or_else(|| caps.get(0))?.as_str().trim())
            }
        }
    }
}

impl Reward for ExactMatch {
    fn score(&self, batch: &[Completion]) -> Result<Vec<f32>> {
        batch
            .iter()
            .map(|c| {
                let expected = column_text(c.columns, &self.column).ok_or_else(|| {
                    Error::Msg(format!(
                        "the prompt row has no column `{}` to compare with (prompt {:?})",
                        self.column, c.prompt
                    ))
                })?;
                Ok((self.answer(c.response) == Some(expected.trim())) as u8 as f32)
            })
            .collect()
    }
}

/// `type = "length"`: -|completion tokens - target| / target, where the
/// completion's tokens are the sampled ids including the stop token (TRL's
/// `completion_ids`).
pub struct LengthReward {
    pub target: usize,
}

impl Reward for LengthReward {
    fn score(&self, batch: &[Completion]) -> Result<Vec<f32>> {
        let t = self.target.max(1) as f64;
        Ok(batch
            .iter()
            .map(|c| (-(c.response_ids.len() as f64 - t).abs() / t) as f32)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::completion;
    use super::*;
    use serde_json::{Map, Value};

    #[test]
    fn regex_searches_the_completion() {
        let r = RegexReward::new(r"^ *[0-9]+\.$").unwrap();
        let batch = [
            completion(" 19.", &[], None),
            completion("19", &[], None),
            completion("it is 19.", &[], None),
        ];
        assert_eq!(r.score(&batch).unwrap(), vec![1.0, 0.0, 0.0]);
        // Unanchored: found anywhere.
        let r = RegexReward::new("[0-9]+").unwrap();
        assert_eq!(r.score(&batch).unwrap(), vec![1.0, 1.0, 1.0]);
        assert!(RegexReward::new("(").is_err());
    }

    #[test]
    fn exact_match_compares_the_captured_answer() {
        let row: Map<String, Value> = serde_json::from_str(r#"{"answer": 19}"#).unwrap();
        let text_row: Map<String, Value> = serde_json::from_str(r#"{"answer": " 19 "}"#).unwrap();
        let m = ExactMatch::new(Some(r"=\s*(-?[0-9]+)"), "answer").unwrap();
        let batch = [
            completion("12+7 = 19", &[], Some(&row)),
            completion("12+7 = 18", &[], Some(&row)),
            completion("nineteen", &[], Some(&row)),
            completion("x = 19 ", &[], Some(&text_row)),
        ];
        assert_eq!(m.score(&batch).unwrap(), vec![1.0, 0.0, 0.0, 1.0]);
        // No pattern: the whole completion, trimmed.
        let whole = ExactMatch::new(None, "answer").unwrap();
        let batch = [
            completion(" 19\n", &[], Some(&row)),
            completion("19.", &[], Some(&row)),
        ];
        assert_eq!(whole.score(&batch).unwrap(), vec![1.0, 0.0]);
        // A row without the column: an error naming it.
        let none: Map<String, Value> = Map::new();
        let e = whole
            .score(&[completion("19", &[], Some(&none))])
            .unwrap_err();
        assert!(e.to_string().contains("no column `answer`"), "{e}");
    }

    #[test]
    fn length_by_hand() {
        let r = LengthReward { target: 4 };
        let batch = [
            completion("", &[1, 2, 3, 4], None),
            completion("", &[1, 2], None),
            completion("", &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], None),
        ];
        // 0; -|2-4|/4 = -0.5; -|10-4|/4 = -1.5.
        assert_eq!(r.score(&batch).unwrap(), vec![0.0, -0.5, -1.5]);
    }
}
