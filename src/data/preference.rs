//! Preference pairs: `chosen`, `rejected` and optional `prompt` and
//! `margin` columns, tokenized as prompt + response (+ EOS), filtered and
//! counted. Pairs that cannot train (empty, identical, too long) are
//! counted skips.

use std::path::Path;

use serde_json::Value;

use super::records::{load_records, read_records};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// One preference pair as read.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceRow {
    /// Empty when the prompt is inside chosen and rejected.
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// The `margin` column: the loss asks r_chosen - r_rejected to exceed it.
    pub margin: f64,
    /// `file: line N` (or `item N` of a JSON array), for messages.
    pub source: String,
}

/// Reads preference pairs from a file or a dataset split (see [`load_records`]).
pub fn load_preferences(
    spec: &str,
    split: &str,
    hub: &crate::hub::HubSettings,
) -> Result<Vec<PreferenceRow>> {
    load_records(spec, split, hub)?
        .iter()
        .map(|(value, source)| parse_row(value, source.clone()))
        .collect()
}

/// Reads a preference file (see [`read_records`]).
pub fn read_preferences(path: &Path) -> Result<Vec<PreferenceRow>> {
    read_records(path)?
        .iter()
        .map(|(value, source)| parse_row(value, source.clone()))
        .collect()
}

fn parse_row(value: &Value, source: String) -> Result<PreferenceRow> {
    let obj = value
        .as_object()
        .ok_or_else(|| Error::Msg(format!("{source}: expected a JSON object, found {value}")))?;
    let text = |column: &str, required: bool| -> Result<String> {
        match obj.get(column) {
            None if !required => Ok(String::new()),
            None => {
                let found: Vec<&str> = obj.keys().map(String::as_str).collect();
                Err(Error::Msg(format!(
                    "{source}: missing column `{column}` (columns found: {}); preference data needs chosen and rejected, and optionally prompt and margin",
                    found.join(", ")
                )))
            }
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Array(_)) => Err(Error::Msg(format!(
                "{source}: column `{column}` is a list of messages (conversational data), which candle-rlhf does not render: apply the chat template and store text"
            ))),
            Some(other) => Err(Error::Msg(format!(
                "{source}: column `{column}` must be a string, found {other}"
            ))),
        }
    };
    let margin = match obj.get("margin") {
        None | Some(Value::Null) => 0.0,
        Some(v) => v.as_f64().filter(|m| m.is_finite()).ok_or_else(|| {
            Error::Msg(format!(
                "{source}: column `margin` must be a finite number, found {v}"
            ))
        })?,
    };
    Ok(PreferenceRow {
        prompt: text("prompt", false)?,
        chosen: text("chosen", true)?,
        rejected: text("rejected", true)?,
        margin,
        source,
    })
}

/// A pair ready for the model: token ids of prompt + response (+ EOS).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPair {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub margin: f32,
}

/// What tokenizing kept and skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataReport {
    pub rows: usize,
    pub kept: usize,
    pub dropped_too_long: usize,
    pub truncated: usize,
    pub skipped_empty: usize,
    pub skipped_identical: usize,
}

impl std::fmt::Display for DataReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rows: {} kept, {} dropped as longer than max_length, {} truncated, {} skipped with an empty response, {} skipped with chosen = rejected",
            self.rows, self.kept, self.dropped_too_long, self.truncated, self.skipped_empty, self.skipped_identical
        )
    }
}

/// prompt + response as token ids, with EOS appended when missing: when the
/// last token is not a stop token, the tokenizer's EOS is appended.
pub fn encode_with_eos(tok: &Tokenizer, prompt: &str, response: &str) -> Result<Vec<u32>> {
    let mut ids = tok.encode(&format!("{prompt}{response}"))?;
    if !ids.last().is_some_and(|&last| tok.is_stop(last)) {
        ids.push(tok.eos_id);
    }
    Ok(ids)
}

/// Tokenizes rows; pairs longer than `max_length` are dropped, or cut to it
/// when `truncate` (a prompt that alone fills max_length is still dropped).
/// Errors when nothing is left.
pub fn tokenize_pairs(
    rows: &[PreferenceRow],
    tok: &Tokenizer,
    max_length: usize,
    truncate: bool,
) -> Result<(Vec<TokenizedPair>, DataReport)> {
    let mut report = DataReport {
        rows: rows.len(),
        ..Default::default()
    };
    let mut pairs = Vec::new();
    for row in rows {
        if row.chosen.trim().is_empty() || row.rejected.trim().is_empty() {
            report.skipped_empty += 1;
            continue;
        }
        if row.chosen == row.rejected {
            report.skipped_identical += 1;
            continue;
        }
        let mut chosen = encode_with_eos(tok, &row.prompt, &row.chosen)?;
        let mut rejected = encode_with_eos(tok, &row.prompt, &row.rejected)?;
        if chosen.len().max(rejected.len()) > max_length {
            let prompt_len = if row.prompt.is_empty() {
                0
            } else {
                tok.encode(&row.prompt)?.len()
            };
            if !truncate || prompt_len >= max_length {
                report.dropped_too_long += 1;
                continue;
            }
            chosen.truncate(max_length);
            rejected.truncate(max_length);
            report.truncated += 1;
            if chosen == rejected {
                report.skipped_identical += 1;
                continue;
            }
        }
        pairs.push(TokenizedPair {
            chosen,
            rejected,
            margin: row.margin as f32,
        });
    }
    report.kept = pairs.len();
    if pairs.is_empty() {
        return Err(Error::Msg(format!(
            "no preference pair left to train on after filtering ({report}; max_length {max_length})"
        )));
    }
    Ok((pairs, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_with_and_without_prompt_and_margin() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\": \"Q\", \"chosen\": \" a\", \"rejected\": \" b\", \"margin\": 1.5}\n\n{\"chosen\": \"Q a\", \"rejected\": \"Q b\"}\n",
        )
        .unwrap();
        let rows = read_preferences(&p).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].prompt.as_str(), rows[0].margin), ("Q", 1.5));
        assert_eq!((rows[1].prompt.as_str(), rows[1].margin), ("", 0.0));
        assert!(rows[1].source.ends_with("line 3"));
    }
}
