//! What the model will see of a data row, for `candle-rlhf render`: the text
//! columns TRL 1.12's data utilities give (`maybe_extract_prompt`, then
//! `maybe_apply_chat_template`), and optionally the token ids and loss mask
//! our trainers feed the model.
//!
//! The kind of row follows from its columns: `chosen`/`rejected`
//! (preference), `prompt` + `completion`, `messages` (a conversation),
//! `prompt` alone. Text rows keep their text; conversational rows are
//! rendered by the chat template.

use serde_json::{json, Map, Value};

use crate::chat::{ChatTemplate, TemplateSource};
use crate::config::SftConfig;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// TRL's `extract_prompt` for a preference row whose prompt is inside
/// chosen and rejected: the common prefix (of characters for text, of
/// messages for conversations) becomes the prompt. Other rows pass through.
pub fn maybe_extract_prompt(row: &Map<String, Value>) -> Map<String, Value> {
    let (Some(chosen), Some(rejected)) = (row.get("chosen"), row.get("rejected")) else {
        return row.clone();
    };
    if let Some(prompt) = row.get("prompt") {
        // Both conversational or both text: the prompt is explicit.
        if chosen.is_array() == prompt.is_array() {
            return row.clone();
        }
    }
    let mut out = row.clone();
    match (chosen, rejected) {
        (Value::Array(c), Value::Array(r)) => {
            let idx = common_prefix(c.len().min(r.len()), |i| c[i] == r[i], |_| false);
            out.insert("prompt".into(), Value::Array(c[..idx].to_vec()));
            out.insert("chosen".into(), Value::Array(c[idx..].to_vec()));
            out.insert("rejected".into(), Value::Array(r[idx..].to_vec()));
        }
        (Value::String(c), Value::String(r)) => {
            let (cc, rc): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let idx = common_prefix(cc.len().min(rc.len()), |i| cc[i] == rc[i], |i| cc[i] == ' ');
            let s = |v: &[char]| v.iter().collect::<String>();
            out.insert("prompt".into(), Value::String(s(&cc[..idx])));
            out.insert("chosen".into(), Value::String(s(&cc[idx..])));
            out.insert("rejected".into(), Value::String(s(&rc[idx..])));
        }
        _ => {}
    }
    out
}

/// The index TRL's loop leaves: the first differing position (one back
/// when the item before it is a space), or the last index when none differs.
fn common_prefix(
    n: usize,
    same: impl Fn(usize) -> bool,
    is_space: impl Fn(usize) -> bool,
) -> usize {
    for idx in 0..n {
        if !same(idx) {
            // Python's chosen[idx - 1] at idx 0 reads the last item.
            let before = if idx == 0 {
                n.saturating_sub(1)
            } else {
                idx - 1
            };
            return if is_space(before) {
                idx.saturating_sub(1)
            } else {
                idx
            };
        }
    }
    n.saturating_sub(1)
}

/// The longest common prefix of two strings, by characters.
fn shared_prefix(a: &str, b: &str) -> String {
    a.chars()
        .zip(b.chars())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect()
}

fn messages(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

/// TRL's `apply_chat_template` on a conversational row: the text columns.
pub fn apply_chat_template(
    row: &Map<String, Value>,
    t: &ChatTemplate,
) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    if let Some(m) = row.get("messages") {
        out.insert("text".into(), t.render(&messages(m), false)?.into());
    }
    if let Some(p) = row.get("prompt") {
        let prompt_msgs = messages(p);
        let mut prompt = t.render_prompt(&prompt_msgs)?;
        let mut joined = Vec::new();
        for key in ["chosen", "rejected", "completion"] {
            if let Some(resp) = row.get(key) {
                let full = t.render(&[prompt_msgs.clone(), messages(resp)].concat(), false)?;
                prompt = shared_prefix(&prompt, &full);
                joined.push((key, full));
            }
        }
        for (key, full) in joined {
            out.insert(key.into(), full[prompt.len()..].to_string().into());
        }
        out.insert("prompt".into(), prompt.into());
    } else {
        for key in ["chosen", "rejected"] {
            if let Some(conv) = row.get(key) {
                out.insert(key.into(), t.render(&messages(conv), false)?.into());
            }
        }
    }
    Ok(out)
}

/// The kind of a row, from its columns.
fn kind_of(row: &Map<String, Value>) -> &'static str {
    let has = |k: &str| row.contains_key(k);
    if has("chosen") && has("rejected") {
        "preference"
    } else if has("prompt") && has("completion") {
        "prompt-completion"
    } else if has("messages") {
        "conversation"
    } else if has("prompt") {
        "prompt"
    } else {
        "text"
    }
}

/// One row as the model will see it: `source`, `kind`, the text columns,
/// and with `ids` the token ids (and the loss mask of SFT rows) the
/// trainers feed the model.
pub fn render_row(
    value: &Value,
    source: &str,
    template: &TemplateSource,
    tok: &Tokenizer,
    ids: bool,
    sft: &SftConfig,
) -> Result<Value> {
    let in_row = |e: Error| Error::Msg(format!("{source}: {e}"));
    let row = value
        .as_object()
        .ok_or_else(|| Error::Msg(format!("{source}: expected a JSON object, found {value}")))?;
    let row = maybe_extract_prompt(row);
    let conversational = ["prompt", "chosen", "rejected", "completion", "messages"]
        .iter()
        .any(|k| row.get(*k).is_some_and(Value::is_array));
    let kind = kind_of(&row);
    let mut out = if conversational {
        apply_chat_template(&row, template.get()?).map_err(in_row)?
    } else {
        let keep = [
            "prompt",
            "chosen",
            "rejected",
            "completion",
            "messages",
            &sft.dataset_text_field,
        ];
        row.iter()
            .filter(|(k, _)| keep.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    out.insert("source".into(), source.into());
    out.insert("kind".into(), kind.into());
    if ids {
        let record = (value.clone(), source.to_string());
        match kind {
            "preference" => {
                let rows = super::preference::parse_all(std::slice::from_ref(&record))?;
                let (c, r) = super::preference::encode_sides(&rows[0], tok, template)?;
                out.insert("chosen_ids".into(), json!(c));
                out.insert("rejected_ids".into(), json!(r));
            }
            "prompt" => {
                let p = &row["prompt"];
                let ids = match p {
                    Value::Array(m) => {
                        tok.encode_plain(&template.get()?.render_prompt(m).map_err(in_row)?)?
                    }
                    other => tok.encode(other.as_str().unwrap_or(""))?,
                };
                out.insert("prompt_ids".into(), json!(ids));
            }
            _ => {
                let cfg = SftConfig {
                    max_length: usize::MAX,
                    ..sft.clone()
                };
                let (rows, _) =
                    super::sft::tokenize_rows(std::slice::from_ref(&record), tok, template, &cfg)?;
                out.insert("input_ids".into(), json!(rows[0].ids));
                out.insert("loss_mask".into(), json!(rows[0].trained));
            }
        }
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn extract_prompt_as_trl_does() {
        // Text: the common prefix, backing off the space before the difference.
        let r = maybe_extract_prompt(&obj(
            json!({"chosen": "The sky is blue.", "rejected": "The sky is green."}),
        ));
        assert_eq!(
            (
                r["prompt"].as_str(),
                r["chosen"].as_str(),
                r["rejected"].as_str()
            ),
            (Some("The sky is"), Some(" blue."), Some(" green."))
        );
        // Conversations: the common messages.
        let u = json!({"role": "user", "content": "Sky?"});
        let (a, b) = (
            json!({"role": "assistant", "content": "Blue."}),
            json!({"role": "assistant", "content": "Green."}),
        );
        let r = maybe_extract_prompt(&obj(json!({"chosen": [u, a], "rejected": [u, b]})));
        assert_eq!(r["prompt"], json!([u]));
        assert_eq!(r["chosen"], json!([a]));
        // An explicit prompt of the same kind stays.
        let r = maybe_extract_prompt(&obj(json!({"prompt": [u], "chosen": [a], "rejected": [b]})));
        assert_eq!(r["prompt"], json!([u]));
    }
}
