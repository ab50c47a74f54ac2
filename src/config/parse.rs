//! Reading config text: `--set key.path=value` overrides applied to the
//! TOML table, and errors that name the file, line, section and the nearest
//! known key.

use std::collections::BTreeMap;

use crate::{Error, Result};

pub(super) fn flatten_into(
    prefix: &str,
    value: &serde_json::Value,
    out: &mut BTreeMap<String, serde_json::Value>,
) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_into(&key, v, out);
            }
        }
        serde_json::Value::Null => {}
        leaf => {
            out.insert(prefix.to_string(), leaf.clone());
        }
    }
}

/// Applies `a.b.c=value` to a TOML table. The value is read as TOML (numbers,
/// booleans, quoted strings, arrays); anything that is not TOML is a string.
pub(super) fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let bad = |message: String| Error::Config {
        source_name: format!("--set {assignment}"),
        message,
    };
    let (key, raw) = assignment.split_once('=').ok_or_else(|| {
        bad("expected key.path=value, as in --set train.learning_rate=1e-5".into())
    })?;
    let path: Vec<&str> = key.trim().split('.').map(str::trim).collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(bad(format!("`{key}` is not a key path")));
    }
    let raw = raw.trim();
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut node = table;
    for part in &path[..path.len() - 1] {
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry
            .as_table_mut()
            .ok_or_else(|| bad(format!("`{part}` is a value, not a section")))?;
    }
    node.insert(path[path.len() - 1].to_string(), value);
    Ok(())
}

/// The words in backticks of a serde message: for "unknown field `x`,
/// expected one of `a`, `b`" that is [x, a, b].
fn backticked(message: &str) -> Vec<&str> {
    message.split('`').skip(1).step_by(2).collect()
}

/// Rewrites serde's "unknown field `x`, expected one of ..." as
/// "unknown key `x` (did you mean `prefix.y`?)"; the full list of keys is
/// given only when none is near. Other messages pass through.
fn explain(message: &str, prefix: &str) -> String {
    if !message.starts_with("unknown field") {
        return message.to_string();
    }
    let words = backticked(message);
    let Some((wrong, known)) = words.split_first() else {
        return message.to_string();
    };
    let nearest = known
        .iter()
        .min_by_key(|k| edit_distance(wrong, k))
        .filter(|k| edit_distance(wrong, k) <= (wrong.len() / 3).max(2));
    match nearest {
        Some(k) => format!("unknown key `{wrong}` (did you mean `{prefix}{k}`?)"),
        None => format!("unknown key `{wrong}`; known keys: {}", known.join(", ")),
    }
}

fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or(message).trim()
}

/// One line for a TOML error in a file: line number, section and message,
/// with the nearest key when a key is unknown.
pub(super) fn file_error(source_name: &str, text: &str, err: &toml::de::Error) -> Error {
    let message = first_line(err.message()).to_string();
    let mut located = String::new();
    if let Some(span) = err.span() {
        let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
        located = format!("line {line_no}: ");
        let section = text
            .lines()
            .take(line_no - 1)
            .filter_map(|l| {
                let l = l.trim();
                (l.starts_with('[') && l.ends_with(']'))
                    .then(|| l.trim_matches(|c| c == '[' || c == ']').to_string())
            })
            .last();
        let this_line = text.lines().nth(line_no - 1).unwrap_or("").trim();
        if let (Some(section), false) = (section, this_line.starts_with('[')) {
            located.push_str(&format!("[{section}] "));
        }
    }
    Error::Config {
        source_name: source_name.into(),
        message: format!("{located}{}", explain(&message, "")),
    }
}

pub(super) fn override_error(assignment: &str, err: &toml::de::Error) -> Error {
    let message = first_line(err.message()).to_string();
    let key = assignment
        .split_once('=')
        .map_or(assignment, |(k, _)| k.trim());
    let parent = key
        .rsplit_once('.')
        .map(|(p, _)| format!("{p}."))
        .unwrap_or_default();
    Error::Config {
        source_name: format!("--set {assignment}"),
        message: explain(&message, &parent),
    }
}

/// Levenshtein distance, for "did you mean" hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + (ca != *cb) as usize)
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("lerning_rate", "learning_rate"), 1);
        assert_eq!(edit_distance("abc", "abc"), 0);
        assert_eq!(edit_distance("", "ab"), 2);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn override_values_are_typed_as_toml() {
        let mut t = toml::Table::new();
        apply_override(&mut t, "train.learning_rate=1e-5").unwrap();
        apply_override(&mut t, "model.name_or_path=org/name").unwrap();
        apply_override(&mut t, "ppo.whiten_rewards = true").unwrap();
        assert_eq!(t["train"]["learning_rate"].as_float(), Some(1e-5));
        assert_eq!(t["model"]["name_or_path"].as_str(), Some("org/name"));
        assert_eq!(t["ppo"]["whiten_rewards"].as_bool(), Some(true));
        assert!(apply_override(&mut t, "no_equals_sign").is_err());
        assert!(apply_override(&mut t, "train..x=1").is_err());
    }
}
