//! Loading a tokenizer and the project's pad/EOS policy.
//!
//! Files are read as transformers reads them: tokenizer.json's own
//! `padding` and `truncation` sections are dropped on load (transformers'
//! fast tokenizers reset them too; padding and truncation are the trainer's
//! decisions), and text is encoded with the tokenizer's special tokens
//! ([CLS] ... [SEP] for BERT, BOS for Llama), as `tokenizer(text)` does.
//!
//! Policy: EOS is the tokenizer config's `eos_token` (else config.json's
//! `eos_token_id`, the first one when it lists several; else, for BERT-style
//! encoders, `sep_token`). The pad id is the tokenizer's `pad_token` when it
//! has one, else EOS (GPT-2 and Pythia ship none). Padding is always
//! described by an attention mask, never inferred from token ids, so a pad
//! that equals EOS is harmless.
//!
//! Stop tokens: what transformers' `generate` stops on, generation_config.json's
//! `eos_token_id` (an int or a list: Llama-3.x-Instruct lists three), else
//! config.json's; plus the tokenizer's EOS (our choice: a model whose
//! generation config forgets it still stops at the token it was trained to
//! end with).

use std::path::Path;

use crate::{Error, Result};

/// A token's byte range (start, end) in the text it came from.
pub type Offsets = (usize, usize);

pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    /// The EOS appended where a sequence must end with one (reward scoring).
    pub eos_id: u32,
    pub pad_id: u32,
    /// Every token generation stops after: the generation config's EOS ids
    /// (else config.json's), then `eos_id`; no duplicates.
    pub stop_ids: Vec<u32>,
}

/// The ids of an `eos_token_id` field: an int, a list of ints, or absent.
fn id_list(v: &serde_json::Value) -> Vec<u32> {
    match v {
        serde_json::Value::Array(items) => items
            .iter()
            .filter_map(|x| x.as_u64().map(|i| i as u32))
            .collect(),
        other => other.as_u64().map(|i| vec![i as u32]).unwrap_or_default(),
    }
}

fn token_name(v: &serde_json::Value) -> Option<&str> {
    v.as_str()
        .or_else(|| v.get("content").and_then(|c| c.as_str()))
}

impl Tokenizer {
    /// Reads `tokenizer.json`, `tokenizer_config.json` and `config.json` of a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Msg(format!(
                "{}: missing (candle-rlhf needs the fast tokenizer file)",
                path.display()
            )));
        }
        let mut inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        // transformers' fast tokenizers drop these on load; the tokenizers
        // crate would otherwise pad and cut every encode.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
        let tok_cfg: serde_json::Value = match dir.join("tokenizer_config.json") {
            p if p.is_file() => crate::io::read_json(&p)?,
            _ => serde_json::Value::Null,
        };
        let model_cfg: serde_json::Value = match dir.join("config.json") {
            p if p.is_file() => crate::io::read_json(&p)?,
            _ => serde_json::Value::Null,
        };
        let id_of = |field: &str| token_name(&tok_cfg[field]).and_then(|t| inner.token_to_id(t));
        let cfg_eos = &model_cfg["eos_token_id"];
        let eos_id = id_of("eos_token")
            .or_else(|| cfg_eos.as_u64().or(cfg_eos[0].as_u64()).map(|v| v as u32))
            .or_else(|| id_of("sep_token"))
            .ok_or_else(|| {
                Error::Msg(format!(
                    "{}: no eos_token (or sep_token) in tokenizer_config.json and no eos_token_id in config.json",
                    dir.display()
                ))
            })?;
        let pad_id = id_of("pad_token").unwrap_or(eos_id);
        let gen_cfg: serde_json::Value = match dir.join("generation_config.json") {
            p if p.is_file() => crate::io::read_json(&p)?,
            _ => serde_json::Value::Null,
        };
        let mut stop_ids = id_list(&gen_cfg["eos_token_id"]);
        if stop_ids.is_empty() {
            stop_ids = id_list(cfg_eos);
        }
        stop_ids.push(eos_id);
        let mut seen = std::collections::HashSet::new();
        stop_ids.retain(|id| seen.insert(*id));
        Ok(Self {
            inner,
            eos_id,
            pad_id,
            stop_ids,
        })
    }

    /// Whether generation stops after `id`.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// `text` as `AutoTokenizer.from_pretrained(dir)(text)["input_ids"]`
    /// encodes it: with the special tokens, no padding, no truncation.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Msg(format!("cannot tokenize {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `text` without special tokens added (`add_special_tokens=False`):
    /// how transformers tokenizes the text a chat template rendered, whose
    /// special tokens are already in it (no second BOS).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_plain_with_offsets(text)?.0)
    }

    /// [`Self::encode_plain`] with each token's byte range in `text`.
    pub fn encode_plain_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<Offsets>)> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Msg(format!("cannot tokenize {text:?}: {e}")))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// The text of token `id` as the vocabulary writes it (`tokenizer.eos_token`
    /// for the EOS id); empty for an id outside it.
    pub fn token_text(&self, id: u32) -> String {
        self.inner.id_to_token(id).unwrap_or_default()
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Msg(format!("cannot decode: {e}")))
    }
}
