//! Preference rows prepared as TRL 1.12's DPOTrainer prepares them
//! (`_prepare_dataset`, then `DataCollatorForPreference`):
//!
//! 1. An implicit prompt (no `prompt` column; an empty one is kept) is the longest common prefix
//!    of chosen and rejected, characters for text and messages for
//!    conversations (TRL's `extract_prompt`, quirks included).
//! 2. Text rows get the EOS token's text appended to chosen and rejected
//!    unless they already end with it; conversational rows get what the chat
//!    template writes, no more.
//! 3. The prompt (conversational: rendered with the generation prompt) and
//!    prompt + completion are tokenized separately; the completion is what
//!    follows the prompt's length (a mismatch is warned about and counted).
//! 4. Under keep_start, a row whose prompt alone has max_length tokens or
//!    more is dropped and counted.
//! 5. At collation each sequence (prompt + completion) is cut to max_length:
//!    its first tokens (keep_start) or its last (keep_end).
//!
//! A pair whose chosen equals its rejected and an empty completion are kept
//! (TRL keeps them; they carry no gradient) and counted.

use serde_json::Value;

use super::preference::PreferenceRow;
use crate::chat::TemplateSource;
use crate::config::TruncationMode;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// One pair as token ids: the prompt and each completion after it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DpoPair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// What preparing the rows kept and counted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DpoDataReport {
    pub rows: usize,
    pub kept: usize,
    /// keep_start: the prompt alone had max_length tokens or more.
    pub dropped_prompt_too_long: usize,
    /// prompt + completion did not start with the prompt's own tokens.
    pub mismatched: usize,
    /// Pairs with a side longer than max_length (cut at collation).
    pub truncated: usize,
    /// Kept pairs whose chosen equals their rejected.
    pub identical: usize,
    /// Kept pairs with an empty completion.
    pub empty_completion: usize,
}

impl std::fmt::Display for DpoDataReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rows: {} kept, {} dropped with a prompt of max_length tokens or more, {} truncated to max_length, {} with chosen = rejected, {} with an empty completion, {} whose prompt tokens differ from the start of prompt + completion",
            self.rows, self.kept, self.dropped_prompt_too_long, self.truncated, self.identical, self.empty_completion, self.mismatched
        )
    }
}

/// TRL's `extract_prompt` on two sequences: the index where they first
/// differ, stepped back over a space before it (`is_space`); without a
/// difference the loop's last index (min length - 1), as Python leaves it.
/// May be -1 (Python's `x[idx - 1]` reads the last item at idx 0).
fn prompt_end<T: PartialEq>(a: &[T], b: &[T], is_space: impl Fn(&T) -> bool) -> isize {
    let n = a.len().min(b.len());
    if n == 0 {
        return 0;
    }
    for idx in 0..n {
        if a[idx] != b[idx] {
            let before = if idx == 0 { a.last() } else { a.get(idx - 1) };
            return idx as isize - isize::from(before.is_some_and(&is_space));
        }
    }
    n as isize - 1
}

/// Python's (x[:idx], x[idx:]) for idx >= -1.
fn py_split<T: Clone>(x: &[T], idx: isize) -> (Vec<T>, Vec<T>) {
    let at = if idx < 0 {
        x.len().saturating_sub(idx.unsigned_abs())
    } else {
        (idx as usize).min(x.len())
    };
    (x[..at].to_vec(), x[at..].to_vec())
}

/// An implicit text prompt: (prompt, chosen, rejected) as TRL extracts them.
pub fn extract_prompt_text(chosen: &str, rejected: &str) -> (String, String, String) {
    let (c, r): (Vec<char>, Vec<char>) = (chosen.chars().collect(), rejected.chars().collect());
    let idx = prompt_end(&c, &r, |ch| *ch == ' ');
    let (prompt, c_rest) = py_split(&c, idx);
    let (_, r_rest) = py_split(&r, idx);
    let s = |v: Vec<char>| v.into_iter().collect::<String>();
    (s(prompt), s(c_rest), s(r_rest))
}

/// An implicit conversational prompt: the common leading messages.
pub fn extract_prompt_messages(
    chosen: &[Value],
    rejected: &[Value],
) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let idx = prompt_end(chosen, rejected, |_| false);
    let (prompt, c_rest) = py_split(chosen, idx);
    let (_, r_rest) = py_split(rejected, idx);
    (prompt, c_rest, r_rest)
}

/// Prepares `rows` (steps 1-4 of the module doc); errors when nothing is left.
pub fn prepare_pairs(
    rows: &[PreferenceRow],
    tok: &Tokenizer,
    template: &TemplateSource,
    max_length: usize,
    mode: TruncationMode,
) -> Result<(Vec<DpoPair>, DpoDataReport)> {
    let mut report = DpoDataReport {
        rows: rows.len(),
        ..Default::default()
    };
    let eos = tok.token_text(tok.eos_id);
    let mut pairs = Vec::with_capacity(rows.len());
    for row in rows {
        let in_row = |e: Error| Error::Msg(format!("{}: {e}", row.source));
        let (prompt, with_chosen, with_rejected) = match &row.messages {
            None => {
                let (p, mut c, mut r) = if !row.has_prompt {
                    extract_prompt_text(&row.chosen, &row.rejected)
                } else {
                    (row.prompt.clone(), row.chosen.clone(), row.rejected.clone())
                };
                for side in [&mut c, &mut r] {
                    if !side.ends_with(eos.as_str()) {
                        side.push_str(&eos);
                    }
                }
                (
                    tok.encode(&p)?,
                    tok.encode(&format!("{p}{c}"))?,
                    tok.encode(&format!("{p}{r}"))?,
                )
            }
            Some(m) => {
                let (p, c, r) = if !row.has_prompt {
                    extract_prompt_messages(&m.chosen, &m.rejected)
                } else {
                    (m.prompt.clone(), m.chosen.clone(), m.rejected.clone())
                };
                let t = template.get().map_err(in_row)?;
                let whole = |side: &[Value]| -> Result<Vec<u32>> {
                    let text = t
                        .render(&[p.as_slice(), side].concat(), false)
                        .map_err(in_row)?;
                    tok.encode_plain(&text)
                };
                let prompt_text = t.render(&p, true).map_err(in_row)?;
                (tok.encode_plain(&prompt_text)?, whole(&c)?, whole(&r)?)
            }
        };
        let n = prompt.len();
        let starts = |ids: &[u32]| ids.len() >= n && ids[..n] == prompt[..];
        if !starts(&with_chosen) || !starts(&with_rejected) {
            report.mismatched += 1;
            tracing::warn!(
                "{}: the prompt's tokens differ from the start of prompt + completion (TRL warns the same); the completion is what follows the prompt's length",
                row.source
            );
        }
        if mode == TruncationMode::KeepStart && n >= max_length {
            report.dropped_prompt_too_long += 1;
            continue;
        }
        let pair = DpoPair {
            chosen: with_chosen.get(n..).unwrap_or_default().to_vec(),
            rejected: with_rejected.get(n..).unwrap_or_default().to_vec(),
            prompt,
        };
        report.truncated +=
            usize::from(n + pair.chosen.len().max(pair.rejected.len()) > max_length);
        report.identical += usize::from(pair.chosen == pair.rejected);
        report.empty_completion += usize::from(pair.chosen.is_empty() || pair.rejected.is_empty());
        pairs.push(pair);
    }
    report.kept = pairs.len();
    if pairs.is_empty() {
        return Err(Error::Msg(format!(
            "no preference pair left to train on ({report}; max_length {max_length})"
        )));
    }
    Ok((pairs, report))
}

/// One side of a pair as the collator builds it: prompt + completion cut to
/// `max_length` (keep_start: the first tokens; keep_end: the last), and its
/// completion mask (1 on completion tokens).
pub fn sequence(
    prompt: &[u32],
    completion: &[u32],
    max_length: usize,
    mode: TruncationMode,
) -> (Vec<u32>, Vec<u8>) {
    let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let mask: Vec<u8> = std::iter::repeat_n(0, prompt.len())
        .chain(std::iter::repeat_n(1, completion.len()))
        .collect();
    let len = ids.len();
    let range = match mode {
        TruncationMode::KeepStart => 0..len.min(max_length),
        TruncationMode::KeepEnd => len.saturating_sub(max_length)..len,
    };
    (ids[range.clone()].to_vec(), mask[range].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn implicit_prompts_as_trl_extracts_them() {
        // The space before the first difference goes to the completions.
        let (p, c, r) = extract_prompt_text("The sky is blue.", "The sky is green.");
        assert_eq!(
            (p.as_str(), c.as_str(), r.as_str()),
            ("The sky is", " blue.", " green.")
        );
        // No difference up to the shorter one: Python's loop leaves idx at its last value.
        let (p, c, r) = extract_prompt_text("abc", "abcd");
        assert_eq!((p.as_str(), c.as_str(), r.as_str()), ("ab", "c", "cd"));
        // Different from the first character with chosen ending in a space: idx -1.
        let (p, c, r) = extract_prompt_text("x y ", "z");
        assert_eq!((p.as_str(), c.as_str(), r.as_str()), ("x y", " ", "z"));
        let user = json!({"role": "user", "content": "Q"});
        let (a, b) = (
            json!({"role": "assistant", "content": "A"}),
            json!({"role": "assistant", "content": "B"}),
        );
        let (p, c, r) =
            extract_prompt_messages(&[user.clone(), a.clone()], &[user.clone(), b.clone()]);
        assert_eq!((p, c, r), (vec![user], vec![a], vec![b]));
    }

    #[test]
    fn sequences_are_cut_at_either_end() {
        let (ids, mask) = sequence(&[1, 2, 3], &[4, 5], 4, TruncationMode::KeepStart);
        assert_eq!((ids, mask), (vec![1, 2, 3, 4], vec![0, 0, 0, 1]));
        let (ids, mask) = sequence(&[1, 2, 3], &[4, 5], 4, TruncationMode::KeepEnd);
        assert_eq!((ids, mask), (vec![2, 3, 4, 5], vec![0, 0, 1, 1]));
        let (ids, mask) = sequence(&[1], &[4, 5], 8, TruncationMode::KeepStart);
        assert_eq!((ids, mask), (vec![1, 4, 5], vec![0, 1, 1]));
    }
}
