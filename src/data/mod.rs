//! Data, from files to batches. Here: the records of a data file (JSONL,
//! gzip-compressed JSONL, a JSON array, Parquet, or a dataset repo's split)
//! and preference pairs read from them, tokenized as prompt + response
//! (+ EOS), filtered and split. Beside it: SFT rows ([`sft`]), prompts for
//! rollouts and evaluation ([`prompts`]), padding and position ids
//! ([`batch`]).
//! Bad rows are one clear error naming the file and line; rows that cannot
//! train (empty, identical, too long) are counted skips.

pub mod batch;
pub mod prompts;
pub mod sft;

use std::io::Read;
use std::path::Path;

use serde_json::Value;

use crate::tokenizer::Tokenizer;
use crate::{Error, HostRng, IoContext, Result};

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

/// One row of a data file as a JSON object, with where it came from
/// (`file: line N`, `item N` or `row N`) for messages.
pub type Record = (Value, String);

/// Reads the records of a data file or a dataset split: `spec` is a file
/// (.jsonl, .jsonl.gz, .json, .json.gz, .parquet), else a directory laid out
/// as a dataset repo or a hub dataset id, read at `split`.
pub fn load_records(spec: &str, split: &str, hub: &crate::hub::HubSettings) -> Result<Vec<Record>> {
    let path = Path::new(spec);
    if path.is_file() {
        return read_records(path);
    }
    let mut records = Vec::new();
    for file in crate::hub::resolve_dataset(spec, split, hub)? {
        records.extend(read_records(&file)?);
    }
    Ok(records)
}

/// A text column of a record: None when absent or null; one error naming
/// the row for conversational data (lists of messages) or other types.
pub fn text_column<'a>(value: &'a Value, column: &str, source: &str) -> Result<Option<&'a str>> {
    match value.get(column) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Array(_)) => Err(Error::Msg(format!(
            "{source}: column `{column}` is a list of messages (conversational data), which candle-rlhf does not render: apply the chat template and store text"
        ))),
        Some(other) => Err(Error::Msg(format!(
            "{source}: column `{column}` must be a string, found {other}"
        ))),
    }
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

/// Reads the records of a data file; the format follows the extension
/// (.jsonl, .jsonl.gz / .json.gz, .json, .parquet).
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let name = path.to_string_lossy();
    if name.ends_with(".parquet") {
        return read_parquet(path);
    }
    let mut bytes = std::fs::read(path).with_path(path)?;
    if name.ends_with(".gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::Parse {
                path: path.to_path_buf(),
                message: format!("not valid gzip: {e}"),
            })?;
        bytes = out;
    }
    let stem = name.trim_end_matches(".gz");
    if stem.ends_with(".json") {
        read_json_array(path, &bytes)
    } else if stem.ends_with(".jsonl") {
        read_jsonl(path, &bytes)
    } else {
        Err(Error::Msg(format!(
            "{name}: unknown data file format (use .jsonl, .jsonl.gz, .json or .parquet)"
        )))
    }
}

/// Parquet rows as JSON objects (lists become arrays, structs objects).
fn read_parquet(path: &Path) -> Result<Vec<Record>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |e: parquet::errors::ParquetError| Error::Parse {
        path: path.to_path_buf(),
        message: format!("not a readable Parquet file: {e}"),
    };
    let file = std::fs::File::open(path).with_path(path)?;
    let reader = SerializedFileReader::new(file).map_err(bad)?;
    let mut records = Vec::new();
    for (i, row) in reader.get_row_iter(None).map_err(bad)?.enumerate() {
        let row = row.map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            message: format!("row {}: {e}", i + 1),
        })?;
        records.push((
            row.to_json_value(),
            format!("{}: row {}", path.display(), i + 1),
        ));
    }
    Ok(records)
}

fn parse_error(path: &Path, line: usize, message: String) -> Error {
    Error::Parse {
        path: path.to_path_buf(),
        message: format!("line {line}: {message}"),
    }
}

fn read_jsonl(path: &Path, bytes: &[u8]) -> Result<Vec<Record>> {
    let mut rows = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let text = std::str::from_utf8(raw)
            .map_err(|e| parse_error(path, line, format!("not UTF-8 ({e})")))?;
        if text.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(text)
            .map_err(|e| parse_error(path, line, format!("malformed JSON: {e}")))?;
        rows.push((value, format!("{}: line {line}", path.display())));
    }
    Ok(rows)
}

fn read_json_array(path: &Path, bytes: &[u8]) -> Result<Vec<Record>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        parse_error(path, line, "not UTF-8".into())
    })?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| parse_error(path, e.line(), format!("malformed JSON: {e}")))?;
    let items = value.as_array().ok_or_else(|| Error::Parse {
        path: path.to_path_buf(),
        message: "a .json preference file must hold an array of objects".into(),
    })?;
    Ok(items
        .iter()
        .enumerate()
        .map(|(i, v)| (v.clone(), format!("{}: item {}", path.display(), i + 1)))
        .collect())
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

/// prompt + response as token ids, with EOS appended when missing.
pub fn encode_with_eos(tok: &Tokenizer, prompt: &str, response: &str) -> Result<Vec<u32>> {
    let mut ids = tok.encode(&format!("{prompt}{response}"))?;
    if ids.last() != Some(&tok.eos_id) {
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

/// Splits pairs into (train, eval) with `eval_ratio` held out, by a seeded shuffle.
pub fn split<T: Clone>(items: &[T], eval_ratio: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let order = HostRng::stream(seed, "split").permutation(items.len());
    let n_eval = ((items.len() as f64) * eval_ratio).round() as usize;
    let n_eval = n_eval.min(items.len().saturating_sub(1));
    let eval = order[..n_eval].iter().map(|&i| items[i].clone()).collect();
    let train = order[n_eval..].iter().map(|&i| items[i].clone()).collect();
    (train, eval)
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

    #[test]
    fn split_is_seeded_and_disjoint() {
        let items: Vec<usize> = (0..100).collect();
        let (train, eval) = split(&items, 0.2, 7);
        assert_eq!((train.len(), eval.len()), (80, 20));
        assert_eq!(split(&items, 0.2, 7), (train.clone(), eval.clone()));
        let mut all = [train, eval].concat();
        all.sort();
        assert_eq!(all, items);
    }
}
