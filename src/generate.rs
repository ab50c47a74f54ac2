//! Batched sampling with a KV cache: prompts are left-padded into one batch,
//! the prompt goes through one forward pass, then one token per step. The
//! cache holds detached keys and values, so no autograd graph outlives a step.

use candle_core::{DType, Device, Tensor};

use crate::models::{attention_bias, left_pad, position_ids, CausalLm};
use crate::{Error, HostRng, Result};

/// How tokens are drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 is greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: f64,
    /// Generation of a row stops after this token.
    pub stop_token_id: Option<u32>,
    /// Whether the stop token ends the output (PPO scores it) or is dropped.
    pub keep_stop_token: bool,
}

impl Sampling {
    pub fn from_config(g: &crate::config::GenerateConfig, stop_token_id: Option<u32>) -> Self {
        Self {
            max_new_tokens: g.max_new_tokens,
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            stop_token_id,
            keep_stop_token: false,
        }
    }
}

/// Draws one token from a row of logits: greedy at temperature 0, else
/// softmax(logits / T) restricted to the top k, then to the smallest set
/// whose probability reaches top_p.
pub fn sample_token(logits: &[f32], s: &Sampling, rng: &mut HostRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if s.temperature == 0.0 {
        return argmax();
    }
    if s.top_k.is_none() && s.top_p >= 1.0 {
        return sample_full(logits, s.temperature, rng);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Descending by logit; ties by index so the order is deterministic.
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = s.top_k {
        order.truncate(k.max(1));
    }
    let max = logits[order[0]] as f64;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / s.temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut kept = weights.len();
    if s.top_p < 1.0 {
        let mut cum = 0.0;
        for (n, w) in weights.iter().enumerate() {
            cum += w / total;
            if cum >= s.top_p {
                kept = n + 1;
                break;
            }
        }
    }
    let kept_total: f64 = weights[..kept].iter().sum();
    let mut u = rng.uniform() * kept_total;
    for (n, w) in weights[..kept].iter().enumerate() {
        if u < *w {
            return order[n] as u32;
        }
        u -= w;
    }
    order[kept - 1] as u32
}

/// Draws from softmax(logits / T) over the whole vocabulary by inverse CDF
/// in index order: two passes, no sort (sorting a 50k vocabulary per token
/// took about a third of GPT-2's batched sampling).
fn sample_full(logits: &[f32], temperature: f64, rng: &mut HostRng) -> u32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let weight = |v: f32| ((v as f64 - max) / temperature).exp();
    let total: f64 = logits.iter().map(|&v| weight(v)).sum();
    let mut u = rng.uniform() * total;
    let mut last = 0;
    for (i, &v) in logits.iter().enumerate() {
        let w = weight(v);
        if w > 0.0 {
            if u < w {
                return i as u32;
            }
            u -= w;
            last = i;
        }
    }
    last as u32 // rounding left u at the end: the last token with weight
}

/// Completes each prompt; returns the generated ids without the stop token.
/// Build `model` from [`crate::models::frozen_builder`] so that no step
/// records an autograd graph.
pub fn generate(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    pad_id: u32,
    s: &Sampling,
    rng: &mut HostRng,
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if b == 0 || prompts.iter().any(Vec::is_empty) {
        return Err(Error::Msg("every prompt needs at least one token".into()));
    }
    let limit = model.max_positions();
    if width + s.max_new_tokens > limit {
        return Err(Error::Msg(format!(
            "the longest prompt ({width} tokens) plus max_new_tokens ({}) exceeds the model's {limit} positions",
            s.max_new_tokens
        )));
    }
    let dtype = model.dtype();
    // 1. Left-pad the prompts into one batch.
    let (ids, mut mask) = left_pad(prompts, pad_id);
    let positions: Vec<u32> = position_ids(&mask).concat();
    let mut cache = model.new_cache(width + s.max_new_tokens);
    let mut input = Tensor::from_vec(ids, (b, width), device)?;
    let mut pos = Tensor::from_vec(positions, (b, width), device)?;
    let mut queries = width;
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    let mut out = vec![Vec::new(); b];
    let mut done = vec![false; b];
    for _ in 0..s.max_new_tokens {
        // 2. Forward the new positions; keep only the last one's logits.
        let bias = attention_bias(&mask, queries, dtype, device)?;
        let hidden = model.forward(&input, &pos, &bias, Some(&mut cache))?;
        let last = hidden.narrow(1, queries - 1, 1)?;
        let logits = model
            .lm_logits(&last)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?; // host sync
                                // 3. Sample each row on the host with the seeded RNG.
        let mut next = vec![pad_id; b];
        for (row, l) in logits.iter().enumerate() {
            if done[row] {
                continue;
            }
            let tok = sample_token(l, s, rng);
            if Some(tok) == s.stop_token_id {
                done[row] = true;
                if s.keep_stop_token {
                    out[row].push(tok);
                }
            } else {
                out[row].push(tok);
            }
            next[row] = tok;
        }
        if done.iter().all(|d| *d) {
            break;
        }
        for row in mask.iter_mut() {
            row.push(1);
        }
        input = Tensor::from_vec(next, (b, 1), device)?;
        pos = Tensor::from_vec(next_pos.clone(), (b, 1), device)?;
        next_pos.iter_mut().for_each(|p| *p += 1);
        queries = 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f64, top_k: Option<usize>, top_p: f64) -> Sampling {
        Sampling {
            max_new_tokens: 1,
            temperature,
            top_k,
            top_p,
            stop_token_id: None,
            keep_stop_token: false,
        }
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut rng = HostRng::new(0);
        assert_eq!(
            sample_token(&[0.1, 3.0, -1.0, 2.9], &sampling(0.0, None, 1.0), &mut rng),
            1
        );
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let mut rng = HostRng::new(0);
        let logits = [0.0, 1.0, 0.5, 0.9];
        for _ in 0..50 {
            assert_eq!(
                sample_token(&logits, &sampling(1.0, Some(1), 1.0), &mut rng),
                1
            );
            assert_eq!(
                sample_token(&logits, &sampling(1.0, None, 1e-6), &mut rng),
                1
            );
        }
    }

    #[test]
    fn sampling_follows_the_softmax() {
        // logits ln(1), ln(3): probabilities 0.25 and 0.75.
        let logits = [0.0f32, 3.0f32.ln()];
        let mut rng = HostRng::new(9);
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| sample_token(&logits, &sampling(1.0, None, 1.0), &mut rng) == 1)
            .count();
        let freq = ones as f64 / n as f64;
        assert!((freq - 0.75).abs() < 0.015, "{freq}");
        // top_p 0.7 keeps only the 0.75 token.
        assert!((0..100).all(|_| sample_token(&logits, &sampling(1.0, None, 0.7), &mut rng) == 1));
    }

    #[test]
    fn the_unsorted_full_vocabulary_draw_has_the_sorted_draws_distribution() {
        // logits ln(w) at temperature 2: probabilities proportional to sqrt(w);
        // a -inf logit is never drawn.
        let w = [1.0f32, 4.0, 9.0, 16.0];
        let mut logits: Vec<f32> = w.iter().map(|v| v.ln()).collect();
        logits.push(f32::NEG_INFINITY);
        let want = [0.1, 0.2, 0.3, 0.4, 0.0];
        let n = 40_000;
        // top_k = the vocabulary size takes the sorted path with nothing cut.
        for top_k in [None, Some(logits.len())] {
            let mut rng = HostRng::new(5);
            let mut counts = [0usize; 5];
            for _ in 0..n {
                counts[sample_token(&logits, &sampling(2.0, top_k, 1.0), &mut rng) as usize] += 1;
            }
            for (c, p) in counts.iter().zip(want) {
                let freq = *c as f64 / n as f64;
                assert!((freq - p).abs() < 0.01, "{top_k:?}: {counts:?}");
            }
        }
    }
}
