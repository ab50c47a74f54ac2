//! Prompts for rollouts and evaluation: the `prompt` column of a file or
//! dataset split, tokenized, or TRL's pre-tokenized `input_ids`; too-long
//! prompts dropped or cut. The PPO trainer and `eval` both read them here.

use serde_json::{Map, Value};

use crate::chat::TemplateSource;
use crate::hub::HubSettings;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// What reading prompts kept and skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptReport {
    pub rows: usize,
    pub kept: usize,
    pub dropped_too_long: usize,
    pub truncated: usize,
    pub skipped_empty: usize,
}

impl std::fmt::Display for PromptReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} prompts: {} kept, {} dropped as longer than max_prompt_length, {} truncated, {} empty skipped",
            self.rows, self.kept, self.dropped_too_long, self.truncated, self.skipped_empty
        )
    }
}

/// Reads the `prompt` column of a file or dataset split and tokenizes it, or
/// takes token ids as they are from an `input_ids` column (TRL's pre-tokenized
/// form); too-long prompts are dropped or cut to their last `max_len` tokens.
/// A conversational prompt (a message list) is rendered by the template with
/// the generation prompt and tokenized without adding special tokens.
pub fn load_prompts(
    spec: &str,
    split: &str,
    tok: &Tokenizer,
    template: &TemplateSource,
    max_len: usize,
    truncate: bool,
    hub: &HubSettings,
) -> Result<(Vec<Vec<u32>>, PromptReport)> {
    let (rows, report) = load_prompt_rows(spec, split, tok, template, max_len, truncate, hub)?;
    Ok((rows.into_iter().map(|r| r.ids).collect(), report))
}

/// A prompt: its token ids, its messages when it was conversational, and
/// the row's other columns (what verifiers compare with, e.g. `answer`).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    pub ids: Vec<u32>,
    pub messages: Option<Vec<Value>>,
    pub columns: Map<String, Value>,
}

/// A row's columns other than the prompt itself.
fn other_columns(value: &Value) -> Map<String, Value> {
    let mut m = value.as_object().cloned().unwrap_or_default();
    m.remove("prompt");
    m.remove("input_ids");
    m
}

/// [`load_prompts`], keeping each conversational prompt's messages.
pub fn load_prompt_rows(
    spec: &str,
    split: &str,
    tok: &Tokenizer,
    template: &TemplateSource,
    max_len: usize,
    truncate: bool,
    hub: &HubSettings,
) -> Result<(Vec<PromptRow>, PromptReport)> {
    let records = crate::data::load_records(spec, split, hub)?;
    let mut report = PromptReport {
        rows: records.len(),
        ..Default::default()
    };
    let conversational = |v: &Value| v.get("prompt").is_some_and(Value::is_array);
    crate::data::records::check_one_kind(
        records.iter().map(|(v, s)| (conversational(v), s.as_str())),
    )?;
    let mut prompts = Vec::new();
    for (value, source) in &records {
        if conversational(value) {
            let messages = value["prompt"].as_array().cloned().unwrap_or_default();
            if messages.is_empty() {
                report.skipped_empty += 1;
                continue;
            }
            let text = template
                .get()?
                .render_prompt(&messages)
                .map_err(|e| Error::Msg(format!("{source}: {e}")))?;
            let ids = tok.encode_plain(&text)?;
            prompts.extend(
                fit_prompt(ids, max_len, truncate, &mut report).map(|ids| PromptRow {
                    ids,
                    messages: Some(messages),
                    columns: other_columns(value),
                }),
            );
            continue;
        }
        if let Some(ids) = input_ids(value, source)? {
            if ids.is_empty() {
                report.skipped_empty += 1;
            } else {
                prompts.extend(fit_prompt(ids, max_len, truncate, &mut report).map(|ids| {
                    PromptRow {
                        ids,
                        messages: None,
                        columns: other_columns(value),
                    }
                }));
            }
            continue;
        }
        let Some(text) = crate::data::text_column(value, "prompt", source)? else {
            let found: Vec<&str> = value
                .as_object()
                .map(|o| o.keys().map(String::as_str).collect())
                .unwrap_or_default();
            return Err(Error::Msg(format!(
                "{source}: missing column `prompt` (columns found: {})",
                found.join(", ")
            )));
        };
        let ids = tok.encode(text)?;
        if text.trim().is_empty() || ids.is_empty() {
            report.skipped_empty += 1;
            continue;
        }
        prompts.extend(
            fit_prompt(ids, max_len, truncate, &mut report).map(|ids| PromptRow {
                ids,
                messages: None,
                columns: other_columns(value),
            }),
        );
    }
    report.kept = prompts.len();
    if prompts.is_empty() {
        return Err(Error::Msg(format!(
            "{spec}: no prompt left after filtering ({report}; max_prompt_length {max_len})"
        )));
    }
    Ok((prompts, report))
}

/// A prompt within max_len tokens: dropped when longer, or cut to its last
/// max_len tokens with `truncate`; counted in `report`.
fn fit_prompt(
    mut ids: Vec<u32>,
    max_len: usize,
    truncate: bool,
    report: &mut PromptReport,
) -> Option<Vec<u32>> {
    if ids.len() > max_len {
        if !truncate {
            report.dropped_too_long += 1;
            return None;
        }
        ids.drain(..ids.len() - max_len);
        report.truncated += 1;
    }
    Some(ids)
}

/// The `input_ids` column of a row, when it has one: a list of token ids.
fn input_ids(value: &Value, source: &str) -> Result<Option<Vec<u32>>> {
    let Some(column) = value.get("input_ids") else {
        return Ok(None);
    };
    let bad = || {
        Error::Msg(format!(
            "{source}: column `input_ids` must be a list of token ids"
        ))
    };
    column
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(bad)
        })
        .collect::<Result<Vec<u32>>>()
        .map(Some)
}
