//! Preference pairs: `chosen`, `rejected` and optional `prompt` and
//! `margin` columns, tokenized as prompt + response (+ EOS), filtered and
//! counted. Pairs that cannot train (empty, identical, too long) are
//! counted skips.
//!
//! Conversational rows (message lists: `prompt` + `chosen`/`rejected`, or
//! whole conversations in `chosen`/`rejected`) are scored as TRL's
//! RewardTrainer scores them: each side is the whole conversation (prompt
//! messages + response messages) rendered by the chat template and
//! tokenized without adding special tokens; no EOS is appended, the
//! template's end-of-turn text ends it.

use std::path::Path;

use serde_json::Value;

use super::records::{check_one_kind, load_records, read_records};
use crate::chat::{is_conversation, TemplateSource};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// One preference pair as read.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceRow {
    /// Empty when the prompt is inside chosen and rejected.
    pub prompt: String,
    /// Whether the row has a `prompt` column (DPO extracts an implicit prompt only without one, as TRL).
    pub has_prompt: bool,
    pub chosen: String,
    pub rejected: String,
    /// The `margin` column: the loss asks r_chosen - r_rejected to exceed it.
    pub margin: f64,
    /// `file: line N` (or `item N` of a JSON array), for messages.
    pub source: String,
    /// The message lists of a conversational row (the texts above are then empty).
    pub messages: Option<PairMessages>,
}

/// The message lists of a conversational preference row.
#[derive(Debug, Clone, PartialEq)]
pub struct PairMessages {
    /// Empty for implicit-prompt rows (whole conversations in chosen and rejected).
    pub prompt: Vec<Value>,
    pub chosen: Vec<Value>,
    pub rejected: Vec<Value>,
}

/// Preference rows of records, refusing a mix of text and conversational rows.
pub fn parse_all(records: &[super::Record]) -> Result<Vec<PreferenceRow>> {
    let rows: Vec<PreferenceRow> = records
        .iter()
        .map(|(value, source)| parse_row(value, source.clone()))
        .collect::<Result<_>>()?;
    check_one_kind(
        rows.iter()
            .map(|r| (r.messages.is_some(), r.source.as_str())),
    )?;
    Ok(rows)
}

/// Reads preference pairs from a file or a dataset split (see [`load_records`]).
pub fn load_preferences(
    spec: &str,
    split: &str,
    hub: &crate::hub::HubSettings,
) -> Result<Vec<PreferenceRow>> {
    parse_all(&load_records(spec, split, hub)?)
}

/// Reads a preference file (see [`read_records`]).
pub fn read_preferences(path: &Path) -> Result<Vec<PreferenceRow>> {
    parse_all(&read_records(path)?)
}

fn parse_row(value: &Value, source: String) -> Result<PreferenceRow> {
    let obj = value
        .as_object()
        .ok_or_else(|| Error::Msg(format!("{source}: expected a JSON object, found {value}")))?;
    let margin = match obj.get("margin") {
        None | Some(Value::Null) => 0.0,
        Some(v) => v.as_f64().filter(|m| m.is_finite()).ok_or_else(|| {
            Error::Msg(format!(
                "{source}: column `margin` must be a finite number, found {v}"
            ))
        })?,
    };
    let conversational = ["prompt", "chosen", "rejected"]
        .iter()
        .any(|c| obj.get(*c).is_some_and(Value::is_array));
    if conversational {
        let list = |column: &str, required: bool| -> Result<Vec<Value>> {
            match obj.get(column) {
                None | Some(Value::Null) if !required => Ok(Vec::new()),
                Some(v @ Value::Array(items)) if is_conversation(v) || items.is_empty() => {
                    Ok(items.clone())
                }
                Some(Value::Array(_)) => Err(Error::Msg(format!(
                    "{source}: column `{column}` must be a list of {{\"role\", \"content\"}} messages"
                ))),
                Some(Value::String(_)) => Err(Error::Msg(format!(
                    "{source}: column `{column}` is text while the row's other columns are message lists"
                ))),
                None => Err(Error::Msg(format!(
                    "{source}: missing column `{column}`; conversational preference data needs chosen and rejected message lists"
                ))),
                Some(other) => Err(Error::Msg(format!(
                    "{source}: column `{column}` must be a list of messages, found {other}"
                ))),
            }
        };
        return Ok(PreferenceRow {
            prompt: String::new(),
            has_prompt: obj.get("prompt").is_some_and(|v| !v.is_null()),
            chosen: String::new(),
            rejected: String::new(),
            margin,
            source: source.clone(),
            messages: Some(PairMessages {
                prompt: list("prompt", false)?,
                chosen: list("chosen", true)?,
                rejected: list("rejected", true)?,
            }),
        });
    }
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
            Some(other) => Err(Error::Msg(format!(
                "{source}: column `{column}` must be a string, found {other}"
            ))),
        }
    };
    Ok(PreferenceRow {
        prompt: text("prompt", false)?,
        has_prompt: obj.contains_key("prompt"),
        chosen: text("chosen", true)?,
        rejected: text("rejected", true)?,
        margin,
        source,
        messages: None,
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

/// Token ids of a row's chosen and rejected sides: prompt + response with
/// EOS appended when missing for text rows; the whole conversation rendered
/// by `template` and tokenized without special tokens for conversational
/// ones (no EOS appended: the template's end-of-turn text ends it).
pub fn encode_sides(
    row: &PreferenceRow,
    tok: &Tokenizer,
    template: &TemplateSource,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let Some(m) = &row.messages else {
        return Ok((
            encode_with_eos(tok, &row.prompt, &row.chosen)?,
            encode_with_eos(tok, &row.prompt, &row.rejected)?,
        ));
    };
    let t = template.get().map_err(|e| in_row(row, e))?;
    let side = |resp: &[Value]| -> Result<Vec<u32>> {
        let conv = [m.prompt.as_slice(), resp].concat();
        let text = t.render(&conv, false).map_err(|e| in_row(row, e))?;
        tok.encode_plain(&text)
    };
    Ok((side(&m.chosen)?, side(&m.rejected)?))
}

/// Tokens of a row's prompt alone (0 without one); a conversational prompt
/// is rendered with the generation prompt, as TRL's prompt column is.
fn prompt_length(row: &PreferenceRow, tok: &Tokenizer, template: &TemplateSource) -> Result<usize> {
    match &row.messages {
        None if row.prompt.is_empty() => Ok(0),
        None => Ok(tok.encode(&row.prompt)?.len()),
        Some(m) if m.prompt.is_empty() => Ok(0),
        Some(m) => {
            let t = template.get().map_err(|e| in_row(row, e))?;
            let text = t.render_prompt(&m.prompt).map_err(|e| in_row(row, e))?;
            Ok(tok.encode_plain(&text)?.len())
        }
    }
}

fn in_row(row: &PreferenceRow, e: Error) -> Error {
    Error::Msg(format!("{}: {e}", row.source))
}

/// Tokenizes rows; pairs longer than `max_length` are dropped, or cut to it
/// when `truncate` (a prompt that alone fills max_length is still dropped).
/// Errors when nothing is left.
/// Conversational rows are rendered by `template` (resolved only if one is).
pub fn tokenize_pairs(
    rows: &[PreferenceRow],
    tok: &Tokenizer,
    template: &TemplateSource,
    max_length: usize,
    truncate: bool,
) -> Result<(Vec<TokenizedPair>, DataReport)> {
    let mut report = DataReport {
        rows: rows.len(),
        ..Default::default()
    };
    let mut pairs = Vec::new();
    for row in rows {
        let (empty, identical) = match &row.messages {
            None => (
                row.chosen.trim().is_empty() || row.rejected.trim().is_empty(),
                row.chosen == row.rejected,
            ),
            Some(m) => (
                m.chosen.is_empty() || m.rejected.is_empty(),
                m.chosen == m.rejected,
            ),
        };
        if empty {
            report.skipped_empty += 1;
            continue;
        }
        if identical {
            report.skipped_identical += 1;
            continue;
        }
        let (mut chosen, mut rejected) = encode_sides(row, tok, template)?;
        if chosen.len().max(rejected.len()) > max_length {
            let prompt_len = prompt_length(row, tok, template)?;
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
