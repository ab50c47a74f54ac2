//! Steps 1-3 of the online engine, the same for every algorithm: sample
//! completions (each carrying its prompt row, never looked up by its token
//! ids), the log-probs and values of one padded batch, and the scores of
//! the reward functions.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

pub(crate) use super::batch::{policy_outputs, Batch};
use super::critic::Critic;
use super::Models;
use crate::data::prompts::PromptRow;
use crate::generate::{generate, Sampling};
use crate::rewards::Completion;
use crate::{Error, HostRng, Result};

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
    /// The rows this rank samples, forwards and scores (data parallelism:
    /// its part of the batch; every row with one rank). Every rank holds
    /// every row's tokens and, after steps 2-3, their figures.
    pub mine: Range<usize>,
}

impl<'p> Rollout<'p> {
    /// Samples one completion per row of `mine` (`rows` repeats a prompt
    /// for a group), `chunk` rows at a time, with the KV cache and no
    /// graph; row i draws from `stream(i)`, so its completion does not
    /// depend on how the rows are batched or which rank samples it. The
    /// ranks' completions are then gathered: every rank holds every row.
    pub fn sample(
        m: &Models,
        rows: Vec<&'p PromptRow>,
        mine: Range<usize>,
        sampling: &Sampling,
        chunk: usize,
        fixed_width: bool,
        stream: impl Fn(usize) -> HostRng,
    ) -> Result<Self> {
        let queries: Vec<Vec<u32>> = rows.iter().map(|r| r.ids.clone()).collect();
        let mut responses = Vec::with_capacity(mine.len());
        let all: Vec<usize> = mine.clone().collect();
        for part in all.chunks(chunk.max(1)) {
            let prompts: Vec<Vec<u32>> = part.iter().map(|&i| queries[i].clone()).collect();
            let mut rngs: Vec<HostRng> = part.iter().map(|&i| stream(i)).collect();
            responses.extend(generate(
                m.sampler,
                &prompts,
                m.tok.pad_id,
                sampling,
                &mut rngs,
                m.device,
            )?);
        }
        let responses = crate::dist::world().concat(responses)?;
        let width = match fixed_width {
            true => sampling.max_new_tokens,
            false => responses.iter().map(Vec::len).max().unwrap_or(0).max(1),
        };
        Ok(Self {
            rows,
            queries,
            responses,
            width,
            mine,
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
        let flat: Vec<f32> = (self.responses.iter())
            .flat_map(|r| (0..w).map(move |i| (i < r.len()) as u8 as f32))
            .collect();
        Ok(Tensor::from_vec(flat, (self.len(), w), device)?)
    }

    /// Whether each completion ended with a stop token.
    pub fn stopped(&self, stop: &[u32]) -> Vec<bool> {
        (self.responses.iter())
            .map(|r| r.last().is_some_and(|l| stop.contains(l)))
            .collect()
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
/// `chunk` rows at a time; no graph is recorded. Each rank forwards its
/// rows; every rank gets every row's.
pub(crate) fn forward(
    m: &Models,
    ro: &Rollout,
    needs: Needs,
    temperature: f64,
    chunk: usize,
) -> Result<Forward> {
    let (mut old, mut refs, mut vals) = (vec![], vec![], vec![]);
    let all: Vec<usize> = ro.mine.clone().collect();
    for rows in all.chunks(chunk.max(1)) {
        let b = ro.batch(rows, m.tok.pad_id, m.sampler.dtype(), m.device)?;
        // A value head reads the sampler's hidden states.
        let head = needs.values && matches!(m.critic, Some(Critic::Head { .. }));
        let mut h = None;
        if needs.old || head {
            let (logprobs, _, hidden) = policy_outputs(m.sampler, &b, temperature)?;
            old.push(logprobs);
            h = Some(hidden);
        }
        if let (true, Some(r)) = (needs.reference, m.reference) {
            // The reference reads the same batch; only its attention bias
            // follows the dtype when the reference runs in a lower one.
            let b = match r.dtype() == b.bias.dtype() {
                true => b.clone(),
                false => Batch {
                    bias: b.bias.to_dtype(r.dtype())?,
                    ..b.clone()
                },
            };
            refs.push(policy_outputs(r, &b, temperature)?.0);
        }
        if let (true, Some(c)) = (needs.values, m.critic) {
            vals.push(c.values(&b, h.as_ref(), false)?);
        }
    }
    let world = crate::dist::world();
    let cat = |v: Vec<Tensor>, needed: bool| -> Result<Option<Tensor>> {
        if !needed {
            return Ok(None);
        }
        let mine = match v.is_empty() {
            true if world.is_single() => return Ok(None),
            // A rank with no rows (an evaluation set smaller than the job).
            true => Tensor::zeros((0, ro.width), candle_core::DType::F32, m.device)?,
            false => Tensor::cat(&v, 0)?,
        };
        Ok(Some(world.concat_rows(&mine)?))
    };
    Ok(Forward {
        old: cat(old, needs.old)?,
        reference: cat(refs, needs.reference && m.reference.is_some())?,
        values: cat(vals, needs.values && m.critic.is_some())?,
    })
}

/// A batch's scores: the weighted total, each function's, and the
/// (prompt, completion) texts, the stop token not shown.
pub(crate) struct Scored {
    pub total: Vec<f32>,
    pub each: Vec<Vec<f32>>,
    pub texts: Vec<(String, String)>,
}

/// Step 3: every reward function's scores of a rollout, their weighted sum
/// (less `missing_eos_penalty` for a completion without a stop token), and
/// the texts. Each rank scores its rows; every rank gets every row's.
pub(crate) fn score(
    m: &Models,
    ro: &Rollout,
    stop: &[u32],
    missing_eos_penalty: Option<f64>,
) -> Result<Scored> {
    let stopped = ro.stopped(stop);
    let texts = (ro.mine.clone())
        .map(|i| {
            let (q, r) = (&ro.queries[i], &ro.responses[i]);
            let shown = &r[..r.len() - stopped[i] as usize];
            Ok((m.tok.decode(q)?, m.tok.decode(shown)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let batch: Vec<Completion> = (ro.mine.clone().zip(&texts))
        .map(|(i, text)| Completion {
            prompt_messages: ro.rows[i].messages.as_deref(),
            columns: Some(&ro.rows[i].columns),
            prompt: &text.0,
            response: &text.1,
            query_ids: &ro.queries[i],
            response_ids: &ro.responses[i],
        })
        .collect();
    let each = match batch.is_empty() {
        // A rank with no rows (an evaluation set smaller than the job).
        true => vec![Vec::new(); m.rewards.names().len()],
        false => m.rewards.score_each(&batch).map_err(|e| {
            let (a, b) = (ro.mine.start, ro.mine.end);
            Error::Msg(format!("scoring completions {a}..{b} of {}: {e}", ro.len()))
        })?,
    };
    let mut total = m.rewards.combine(&each);
    if let Some(pen) = missing_eos_penalty {
        for (s, stopped) in total.iter_mut().zip(&stopped[ro.mine.clone()]) {
            if !stopped {
                *s -= pen as f32;
            }
        }
    }
    // Every rank's rows, in rank order (the identity with one rank).
    let world = crate::dist::world();
    if !world.is_single() {
        let (total, each, texts) = (world.gather((total, each, texts))?.into_iter()).fold(
            (vec![], vec![], vec![]),
            |(mut t, mut e, mut x), (ti, ei, xi)| {
                t.extend(ti);
                e.resize(ei.len(), vec![]);
                for (all, part) in e.iter_mut().zip(ei) {
                    all.extend(part);
                }
                x.extend(xi);
                (t, e, x)
            },
        );
        return Ok(Scored { total, each, texts });
    }
    Ok(Scored { total, each, texts })
}
