//! Steps 1-3 of the online engine, the same for every algorithm: sample
//! completions (each carrying its prompt row, never looked up by its token
//! ids), the log-probs and values of one padded batch, and the scores of
//! the reward functions.

use candle_core::{DType, Device, Tensor};

pub(crate) use super::batch::{policy_outputs, Batch};
use super::critic::Critic;
use crate::data::prompts::PromptRow;
use crate::generate::{generate, Sampling};
use crate::models::CausalLm;
use crate::rewards::{Completion, RewardFuncs};
use crate::tokenizer::Tokenizer;
use crate::{HostRng, Result};

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

/// One batch of sampled completions: each with the prompt row it answers.
pub(crate) struct Rollout<'p> {
    /// The prompt row of each completion (its messages and other columns
    /// go to the reward functions).
    pub rows: Vec<&'p PromptRow>,
    pub queries: Vec<Vec<u32>>,
    /// Sampled tokens, each cut after its stop token.
    pub responses: Vec<Vec<u32>>,
    /// The padded width of the completions in every later batch: the
    /// sampling budget (PPO) or the longest completion (GRPO, RLOO).
    pub width: usize,
}

impl<'p> Rollout<'p> {
    /// Samples one completion per row (`rows` repeats a prompt for a group).
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        rows: Vec<&'p PromptRow>,
        sampler: &CausalLm,
        tok: &Tokenizer,
        device: &Device,
        sampling: &Sampling,
        chunk: usize,
        fixed_width: bool,
        rng: &mut HostRng,
    ) -> Result<Self> {
        let queries: Vec<Vec<u32>> = rows.iter().map(|r| r.ids.clone()).collect();
        let responses = sample(sampler, tok, device, &queries, sampling, chunk, rng)?;
        let width = match fixed_width {
            true => sampling.max_new_tokens,
            false => responses.iter().map(Vec::len).max().unwrap_or(0).max(1),
        };
        Ok(Self {
            rows,
            queries,
            responses,
            width,
        })
    }

    pub fn len(&self) -> usize {
        self.responses.len()
    }

    /// Rows `rows` as one padded batch (prompts left-padded, completions
    /// right-padded to `width`).
    pub fn batch(&self, rows: &[usize], pad: u32, dtype: DType, device: &Device) -> Result<Batch> {
        let qs: Vec<&[u32]> = rows.iter().map(|&i| self.queries[i].as_slice()).collect();
        let rs: Vec<&[u32]> = rows.iter().map(|&i| self.responses[i].as_slice()).collect();
        Batch::new(&qs, &rs, self.width, pad, dtype, device)
    }

    /// (B, width) 1 on the real completion tokens.
    pub fn mask(&self, device: &Device) -> Result<Tensor> {
        let w = self.width;
        let flat: Vec<f32> = self
            .responses
            .iter()
            .flat_map(|r| (0..w).map(move |i| (i < r.len()) as u8 as f32))
            .collect();
        Ok(Tensor::from_vec(flat, (self.len(), w), device)?)
    }

    /// Whether each completion ended with a stop token.
    pub fn stopped(&self, stop: &[u32]) -> Vec<bool> {
        self.responses.iter().map(|r| stopped(r, stop)).collect()
    }

    /// Completion lengths in tokens.
    pub fn lengths(&self) -> Vec<f64> {
        self.responses.iter().map(|r| r.len() as f64).collect()
    }
}

/// Which forwards step 2 runs over a rollout.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Needs {
    /// Log-probs under the policy as it sampled (the old policy).
    pub old: bool,
    /// Log-probs under the reference.
    pub reference: bool,
    /// The critic's values.
    pub values: bool,
}

/// Step 2's outputs, each (B, width) f32.
pub(crate) struct Forward {
    pub old: Option<Tensor>,
    pub reference: Option<Tensor>,
    pub values: Option<Tensor>,
}

/// Step 2: the log-probs of the sampled tokens under the sampler (the
/// policy as it sampled) and the reference, and the critic's values,
/// `chunk` rows at a time; no graph is recorded.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    ro: &Rollout,
    needs: Needs,
    sampler: &CausalLm,
    reference: Option<&CausalLm>,
    critic: Option<&Critic>,
    temperature: f64,
    chunk: usize,
    pad: u32,
    device: &Device,
) -> Result<Forward> {
    let (mut old, mut refs, mut vals) = (vec![], vec![], vec![]);
    let all: Vec<usize> = (0..ro.len()).collect();
    for rows in all.chunks(chunk.max(1)) {
        let b = ro.batch(rows, pad, sampler.dtype(), device)?;
        // A value head reads the sampler's hidden states.
        let head = matches!(critic, Some(Critic::Head { .. })) && needs.values;
        let mut h = None;
        if needs.old || head {
            let (logprobs, _, hidden) = policy_outputs(sampler, &b, temperature)?;
            old.push(logprobs);
            h = Some(hidden);
        }
        if let (true, Some(r)) = (needs.reference, reference) {
            // The reference reads the same batch; only its attention bias
            // follows the dtype when the reference runs in a lower one.
            let logprobs = if r.dtype() == b.bias.dtype() {
                policy_outputs(r, &b, temperature)?.0
            } else {
                let b = Batch {
                    bias: b.bias.to_dtype(r.dtype())?,
                    ..b.clone()
                };
                policy_outputs(r, &b, temperature)?.0
            };
            refs.push(logprobs);
        }
        if let (true, Some(c)) = (needs.values, critic) {
            vals.push(c.values(&b, h.as_ref(), false)?);
        }
    }
    let cat = |v: Vec<Tensor>| -> Result<Option<Tensor>> {
        Ok(match v.is_empty() {
            true => None,
            false => Some(Tensor::cat(&v, 0)?),
        })
    };
    Ok(Forward {
        old: match needs.old {
            true => cat(old)?,
            false => None,
        },
        reference: cat(refs)?,
        values: cat(vals)?,
    })
}

/// Step 3: every reward function's scores of a rollout, their weighted sum
/// (less `missing_eos_penalty` for a completion without a stop token), and
/// the texts.
pub(crate) fn score(
    ro: &Rollout,
    rewards: &RewardFuncs,
    tok: &Tokenizer,
    stop: &[u32],
    missing_eos_penalty: Option<f64>,
) -> Result<Scored> {
    let texts = decode(tok, &ro.queries, &ro.responses, stop)?;
    let rows: Vec<Option<&PromptRow>> = ro.rows.iter().map(|r| Some(*r)).collect();
    let each = score_each(rewards, &ro.queries, &ro.responses, &texts, &rows)?;
    let mut total = rewards.combine(&each);
    if let Some(pen) = missing_eos_penalty {
        for (s, r) in total.iter_mut().zip(&ro.responses) {
            if !stopped(r, stop) {
                *s -= pen as f32;
            }
        }
    }
    Ok(Scored { total, each, texts })
}
