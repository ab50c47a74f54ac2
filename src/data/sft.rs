//! SFT rows as TRL's SFTTrainer builds them: prompt + completion (loss on
//! the completion only) or plain text (every token), EOS appended, cut to
//! max_length; optionally packed several to a row (best-fit decreasing,
//! TRL's "bfd"), each sequence attending only to itself.

use serde_json::Value;

use crate::chat::TemplateSource;
use crate::config::SftConfig;
use crate::data::{self, Record};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// One training row: token ids, which tokens are trained (predicted from
/// the ones before), and the sequence each token belongs to (1, 2, ... when
/// packed; all 1 otherwise).
#[derive(Debug, Clone, PartialEq)]
pub struct SftRow {
    pub ids: Vec<u32>,
    pub trained: Vec<u8>,
    pub segments: Vec<u32>,
}

/// What tokenizing kept and skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SftDataReport {
    pub rows: usize,
    pub kept: usize,
    pub truncated: usize,
    pub skipped_empty: usize,
    /// Rows after packing (equal to `kept` without it).
    pub packed_rows: usize,
}

impl std::fmt::Display for SftDataReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rows: {} kept, {} truncated to max_length, {} skipped with nothing to train, {} training rows",
            self.rows, self.kept, self.truncated, self.skipped_empty, self.packed_rows
        )
    }
}

/// Tokenizes SFT records: `prompt` + `completion`, or the text field; EOS
/// appended; cut to `max_length` (counted); rows with no trained token skipped.
/// Conversational rows are rendered by the chat template, as TRL 1.12 does:
/// `prompt`/`completion` message lists train on what the completion adds to
/// the prompt rendered with the generation prompt; `messages` rows train on
/// every token, or on the `{% generation %}` spans with
/// `assistant_only_loss`. No EOS is appended to them.
pub fn tokenize_rows(
    records: &[Record],
    tok: &Tokenizer,
    template: &TemplateSource,
    cfg: &SftConfig,
) -> Result<(Vec<SftRow>, SftDataReport)> {
    let mut report = SftDataReport {
        rows: records.len(),
        ..Default::default()
    };
    let conversational = |v: &Value| {
        ["prompt", "completion", "messages"]
            .iter()
            .any(|c| v.get(*c).is_some_and(Value::is_array))
    };
    crate::data::records::check_one_kind(
        records.iter().map(|(v, s)| (conversational(v), s.as_str())),
    )?;
    if cfg.assistant_only_loss && !records.iter().any(|(v, _)| conversational(v)) {
        return Err(Error::InvalidConfig {
            field: "sft.assistant_only_loss".into(),
            value: "true".into(),
            reason: format!(
                "{}: applies to conversational `messages` rows, and these rows are text",
                cfg.dataset
            ),
        });
    }
    let mut rows = Vec::new();
    for (value, source) in records {
        if conversational(value) {
            let in_row = |e: Error| Error::Msg(format!("{source}: {e}"));
            let (mut ids, mut trained) =
                conversation_row(value, tok, template, cfg).map_err(in_row)?;
            if ids.len() > cfg.max_length {
                ids.truncate(cfg.max_length);
                trained.truncate(cfg.max_length);
                report.truncated += 1;
            }
            if !trained.contains(&1) {
                report.skipped_empty += 1;
                continue;
            }
            rows.push(SftRow {
                segments: vec![1; ids.len()],
                ids,
                trained,
            });
            continue;
        }
        let prompt = data::text_column(value, "prompt", source)?;
        let completion = data::text_column(value, "completion", source)?;
        let text = data::text_column(value, &cfg.dataset_text_field, source)?;
        let (mut ids, first_trained) = match (prompt, completion, text) {
            (Some(p), Some(c), _) => {
                let ids = data::encode_with_eos(tok, p, c)?;
                let prompt_len = if cfg.completion_only_loss {
                    tok.encode(p)?.len().max(1)
                } else {
                    1
                };
                (ids, prompt_len)
            }
            (None, None, Some(t)) => (data::encode_with_eos(tok, "", t)?, 1),
            _ => {
                let found: Vec<&str> = value
                    .as_object()
                    .map(|o| o.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                return Err(Error::Msg(format!(
                    "{source}: an SFT row needs `prompt` and `completion`, or `{}` (columns found: {})",
                    cfg.dataset_text_field,
                    found.join(", ")
                )));
            }
        };
        if ids.len() > cfg.max_length {
            ids.truncate(cfg.max_length);
            report.truncated += 1;
        }
        if ids.len() <= first_trained {
            report.skipped_empty += 1;
            continue;
        }
        let trained = (0..ids.len())
            .map(|i| u8::from(i >= first_trained))
            .collect();
        rows.push(SftRow {
            segments: vec![1; ids.len()],
            ids,
            trained,
        });
    }
    report.kept = rows.len();
    report.packed_rows = rows.len();
    if rows.is_empty() {
        return Err(Error::Msg(format!(
            "{}: no SFT row left ({report}; max_length {})",
            cfg.dataset, cfg.max_length
        )));
    }
    Ok((rows, report))
}

/// The ids and trained-token mask of a conversational row (before truncation).
fn conversation_row(
    value: &Value,
    tok: &Tokenizer,
    template: &TemplateSource,
    cfg: &SftConfig,
) -> Result<(Vec<u32>, Vec<u8>)> {
    let list = |c: &str| value.get(c).and_then(Value::as_array).cloned();
    let t = template.get()?;
    if let (Some(prompt), Some(completion)) = (list("prompt"), list("completion")) {
        // TRL: prompt ids from the prompt with the generation prompt, the
        // completion is what the whole conversation adds after them.
        let prompt_ids = tok.encode_plain(&t.render_prompt(&prompt)?)?;
        let all = [prompt, completion].concat();
        let ids = tok.encode_plain(&t.render(&all, false)?)?;
        let first = if cfg.completion_only_loss {
            prompt_ids.len().max(1)
        } else {
            1
        };
        let trained = (0..ids.len()).map(|i| u8::from(i >= first)).collect();
        return Ok((ids, trained));
    }
    let Some(messages) = list("messages") else {
        return Err(Error::Msg(
            "a conversational SFT row needs `prompt` and `completion` message lists, or `messages`"
                .into(),
        ));
    };
    let (text, spans) = t.render_spans(&messages, false)?;
    let (ids, offsets) = tok.encode_plain_with_offsets(&text)?;
    let trained = if cfg.assistant_only_loss {
        if !t.has_generation_blocks {
            return Err(Error::InvalidConfig {
                field: "sft.assistant_only_loss".into(),
                value: "true".into(),
                reason: format!(
                    "the chat template {} marks no assistant turns ({{% generation %}} blocks)",
                    t.origin
                ),
            });
        }
        // A token is trained when it starts inside an assistant span.
        offsets
            .iter()
            .enumerate()
            .map(|(i, (start, _))| u8::from(i > 0 && spans.iter().any(|s| s.contains(start))))
            .collect()
    } else {
        (0..ids.len()).map(|i| u8::from(i >= 1)).collect()
    };
    Ok((ids, trained))
}

/// Packs whole rows into rows of at most `max_length` tokens, best-fit
/// decreasing: longest first, each into the fullest row it still fits.
pub fn pack(rows: &[SftRow], max_length: usize) -> Vec<SftRow> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(rows[i].ids.len()), i));
    let mut bins: Vec<SftRow> = Vec::new();
    for i in order {
        let r = &rows[i];
        let best = bins
            .iter_mut()
            .filter(|b| b.ids.len() + r.ids.len() <= max_length)
            .max_by_key(|b| b.ids.len());
        match best {
            Some(bin) => {
                let segment = bin.segments.last().copied().unwrap_or(0) + 1;
                bin.ids.extend(&r.ids);
                bin.trained.extend(&r.trained);
                bin.segments
                    .extend(std::iter::repeat_n(segment, r.ids.len()));
            }
            None => bins.push(r.clone()),
        }
    }
    bins
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: usize, seg: u32) -> SftRow {
        SftRow {
            ids: (0..n as u32).collect(),
            trained: vec![1; n],
            segments: vec![seg; n],
        }
    }

    #[test]
    fn packing_is_best_fit_decreasing_of_whole_sequences() {
        // Lengths 6, 5, 4, 3, 2 into rows of 8: 6 opens a row, 5 another,
        // 4 a third, 3 joins the fullest that fits (5 -> 8), 2 joins the
        // fullest that fits (6 -> 8).
        let rows: Vec<SftRow> = [3, 6, 2, 5, 4].iter().map(|&n| row(n, 1)).collect();
        let packed = pack(&rows, 8);
        let layout: Vec<Vec<u32>> = packed.iter().map(|r| r.segments.clone()).collect();
        assert_eq!(
            layout,
            vec![
                vec![1, 1, 1, 1, 1, 1, 2, 2],
                vec![1, 1, 1, 1, 1, 2, 2, 2],
                vec![1, 1, 1, 1],
            ]
        );
        let tokens: usize = packed.iter().map(|r| r.ids.len()).sum();
        assert_eq!(tokens, 20, "no token lost or duplicated");
    }
}
