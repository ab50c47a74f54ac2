//! Data files as records: JSONL, gzip-compressed JSONL, a JSON array,
//! Parquet, or the files of a dataset repo's split, each row a JSON object
//! with where it came from. Bad rows are one clear error naming the file and
//! line.

use std::io::Read;
use std::path::Path;

use serde_json::Value;

use crate::{Error, HostRng, IoContext, Result};

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

/// Refuses a file that mixes text rows and conversational rows, naming the
/// first row whose kind differs from the first row's.
pub fn check_one_kind<'a>(mut kinds: impl Iterator<Item = (bool, &'a str)>) -> Result<()> {
    let Some((first, first_source)) = kinds.next() else {
        return Ok(());
    };
    if let Some((_, source)) = kinds.find(|(conv, _)| *conv != first) {
        let (a, b) = if first {
            ("message lists (conversational)", "text")
        } else {
            ("text", "message lists (conversational)")
        };
        return Err(Error::Msg(format!(
            "{source}: this row is {b} but the rows before it ({first_source} on) are {a}; a file holds one kind of row"
        )));
    }
    Ok(())
}

/// Reads the records of a data file; the format follows the extension
/// (.jsonl, .jsonl.gz / .json.gz, .json, .parquet).
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let name = path.to_string_lossy();
    let records = if name.ends_with(".parquet") {
        read_parquet(path)?
    } else {
        read_text_records(path, &name)?
    };
    if records.is_empty() {
        return Err(Error::Parse {
            path: path.to_path_buf(),
            message: "no rows".into(),
        });
    }
    Ok(records)
}

/// The records of a JSONL or JSON file, gzip-compressed or not.
fn read_text_records(path: &Path, name: &str) -> Result<Vec<Record>> {
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
    // A UTF-8 byte-order mark is not data (the datasets library skips it too).
    let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let stem = name.trim_end_matches(".gz");
    if stem.ends_with(".json") {
        read_json_array(path, text)
    } else if stem.ends_with(".jsonl") {
        read_jsonl(path, text)
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
