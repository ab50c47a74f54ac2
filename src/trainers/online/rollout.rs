//! What every online trainer does with its policy before a loss: prompts
//! and responses made into one padded batch, the policy's log-probs on it,
//! sampled responses, and their scores from the reward functions.

use candle_core::{DType, Device, Tensor};

use crate::data::batch::position_ids;
use crate::data::prompts::PromptRow;
use crate::generate::{generate, Sampling};
use crate::models::{attention_bias, CausalLm};
use crate::rewards::{Completion, RewardFuncs};
use crate::tokenizer::Tokenizer;
use crate::{HostRng, Result};

/// Queries and responses as one batch: each row is the left-padded query
/// (width q) followed by its response, right-padded to r tokens.
#[derive(Clone)]
pub(crate) struct Batch {
    pub ids: Tensor,
    pub mask: Vec<Vec<u8>>,
    pub positions: Tensor,
    pub bias: Tensor,
    /// (B, r) u32: the response tokens (pad after the end).
    pub responses: Tensor,
    /// (B, r) f32: 1 on real response tokens.
    pub response_mask: Tensor,
    pub q: usize,
    pub r: usize,
}

impl Batch {
    pub fn new(
        queries: &[&[u32]],
        responses: &[&[u32]],
        r: usize,
        pad: u32,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let b = queries.len();
        let q = queries.iter().map(|x| x.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(b * (q + r));
        let mut mask = Vec::with_capacity(b);
        let mut resp = Vec::with_capacity(b * r);
        let mut resp_mask = Vec::with_capacity(b * r);
        for (query, response) in queries.iter().zip(responses) {
            let (lp, rp) = (q - query.len(), r - response.len());
            ids.extend(std::iter::repeat_n(pad, lp));
            ids.extend_from_slice(query);
            ids.extend_from_slice(response);
            ids.extend(std::iter::repeat_n(pad, rp));
            let mut m = vec![0u8; lp];
            m.extend(std::iter::repeat_n(1u8, query.len() + response.len()));
            m.extend(std::iter::repeat_n(0u8, rp));
            mask.push(m);
            resp.extend_from_slice(response);
            resp.extend(std::iter::repeat_n(pad, rp));
            resp_mask.extend(std::iter::repeat_n(1f32, response.len()));
            resp_mask.extend(std::iter::repeat_n(0f32, rp));
        }
        let positions: Vec<u32> = position_ids(&mask).concat();
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, q + r), device)?,
            positions: Tensor::from_vec(positions, (b, q + r), device)?,
            bias: attention_bias(&mask, q + r, dtype, device)?,
            mask,
            responses: Tensor::from_vec(resp, (b, r), device)?,
            response_mask: Tensor::from_vec(resp_mask, (b, r), device)?,
            q,
            r,
        })
    }
}

/// Per response token: log-probs of the sampled tokens and entropies, with
/// logits divided by (temperature + 1e-7) as TRL does, and the hidden
/// states that predicted them (B, r, E). Position ids come from the mask.
pub(crate) fn policy_outputs(
    lm: &CausalLm,
    b: &Batch,
    temperature: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let hidden = lm.forward(&b.ids, &b.positions, &b.bias, None)?;
    let h = hidden.narrow(1, b.q - 1, b.r)?;
    let logits = lm.lm_logits(&h)?.to_dtype(DType::F32)?;
    let (logprobs, entropy) =
        crate::rl::token_logprobs_and_entropy(&logits, &b.responses, 1.0 / (temperature + 1e-7))?;
    Ok((logprobs, entropy, h))
}

/// The prompt rows by their token ids: what a reward model with a chat
/// template of its own re-renders (the messages), and what a verifier
/// compares with (the other columns).
#[derive(Default)]
pub(crate) struct PromptInfo(std::collections::HashMap<Vec<u32>, PromptRow>);

impl PromptInfo {
    pub fn of(rows: &[PromptRow]) -> Self {
        let mut m = Self::default();
        m.extend(rows);
        m
    }

    pub fn extend(&mut self, rows: &[PromptRow]) {
        for row in rows {
            self.0.insert(row.ids.clone(), row.clone());
        }
    }

    pub fn get(&self, ids: &[u32]) -> Option<&PromptRow> {
        self.0.get(ids)
    }
}

/// Samples one response per query, `chunk` queries at a time, with the KV
/// cache and no autograd graph; each is cut after its stop token.
pub(crate) fn sample(
    sampler: &CausalLm,
    tok: &Tokenizer,
    device: &Device,
    queries: &[Vec<u32>],
    sampling: &Sampling,
    chunk: usize,
    rng: &mut HostRng,
) -> Result<Vec<Vec<u32>>> {
    let mut responses = Vec::with_capacity(queries.len());
    for part in queries.chunks(chunk.max(1)) {
        responses.extend(generate(sampler, part, tok.pad_id, sampling, rng, device)?);
    }
    Ok(responses)
}

/// Decoded (prompt, response) text.
pub(crate) type PromptAndResponse = (String, String);

/// The prompt and response texts, the stop token not shown.
pub(crate) fn decode(
    tok: &Tokenizer,
    queries: &[Vec<u32>],
    responses: &[Vec<u32>],
    stop: &[u32],
) -> Result<Vec<PromptAndResponse>> {
    queries
        .iter()
        .zip(responses)
        .map(|(q, r)| {
            let shown: &[u32] = match r.last() {
                Some(l) if stop.contains(l) => &r[..r.len() - 1],
                _ => r,
            };
            Ok((tok.decode(q)?, tok.decode(shown)?))
        })
        .collect()
}

/// Every reward function's scores of the completions (one row per
/// function); `rows` gives each completion's prompt row when known.
pub(crate) fn score_each(
    rewards: &RewardFuncs,
    queries: &[Vec<u32>],
    responses: &[Vec<u32>],
    texts: &[PromptAndResponse],
    rows: &[Option<&PromptRow>],
) -> Result<Vec<Vec<f32>>> {
    let batch: Vec<Completion> = queries
        .iter()
        .zip(responses)
        .zip(texts)
        .zip(rows)
        .map(|(((q, r), (pt, rt)), row)| Completion {
            prompt_messages: row.and_then(|x| x.messages.as_deref()),
            columns: row.map(|x| &x.columns),
            prompt: pt,
            response: rt,
            query_ids: q,
            response_ids: r,
        })
        .collect();
    rewards.score_each(&batch)
}

/// A batch's scores: the weighted total, each function's, and the texts.
pub(crate) struct Scored {
    pub total: Vec<f32>,
    pub each: Vec<Vec<f32>>,
    pub texts: Vec<PromptAndResponse>,
}

/// Whether a response ended with a stop token.
pub(crate) fn stopped(response: &[u32], stop: &[u32]) -> bool {
    response.last().is_some_and(|l| stop.contains(l))
}
