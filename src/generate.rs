//! Batched sampling with a KV cache: prompts are left-padded into one batch,
//! the prompt goes through one forward pass, then one token per step. The
//! cache holds detached keys and values, so no autograd graph outlives a step.
//!
//! Host round-trips per decoded token: the positions and attention bias of
//! every step are uploaded once, before the first step, and each step takes a
//! view of them. With [`Draw::Device`] (the default on a GPU) the token is
//! drawn on the device too, so a step uploads one uniform per row and reads
//! back one id per row instead of the whole (batch x vocabulary) logits:
//! 39 MB per step for Qwen2.5's vocabulary at batch 64.

use candle_core::{DType, Device, Tensor};

use crate::data::batch::{left_pad, position_ids};
use crate::models::{attention_bias, CausalLm};
use crate::{Error, HostRng, Result};

/// How tokens are drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 is greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: f64,
    /// Generation of a row stops after any of these tokens (none: runs to
    /// max_new_tokens).
    pub stop_token_ids: Vec<u32>,
    /// Whether the stop token ends the output (PPO scores it) or is dropped.
    pub keep_stop_token: bool,
    /// Where tokens are drawn.
    pub draw: Draw,
}

/// Where [`generate`] draws each token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Draw {
    /// On the device where the model is not on the CPU, else on the host.
    #[default]
    Auto,
    /// On the host from the logits copied back ([`sample_token`]).
    Host,
    /// On the device ([`DeviceSampler`]) where the settings allow it (greedy,
    /// or the whole vocabulary: no top_k, top_p 1), else on the host.
    Device,
}

impl std::str::FromStr for Draw {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Draw::Auto),
            "host" => Ok(Draw::Host),
            "device" => Ok(Draw::Device),
            other => Err(format!("`{other}`: expected auto, host or device")),
        }
    }
}

impl Sampling {
    pub fn from_config(g: &crate::config::GenerateConfig, stop_token_ids: Vec<u32>) -> Self {
        Self {
            max_new_tokens: g.max_new_tokens,
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            stop_token_ids,
            keep_stop_token: false,
            draw: Draw::Auto,
        }
    }

    /// Whether tokens are drawn on `device` rather than on the host.
    pub fn draws_on_device(&self, device: &Device) -> bool {
        let supported = self.temperature == 0.0 || (self.top_k.is_none() && self.top_p >= 1.0);
        match self.draw {
            Draw::Auto => supported && !device.is_cpu(),
            Draw::Host => false,
            Draw::Device => supported,
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

/// Draws tokens from (batch x vocabulary) f32 logits on their device, so that
/// only one uniform per row goes up and one id per row comes back.
///
/// Sampling is the inverse CDF of softmax(logits / T) in index order, the
/// draw [`sample_token`] makes on the host, with the cumulative sum in two
/// levels: the vocabulary is cut into about sqrt(V) blocks of about sqrt(V)
/// tokens, a product with a triangular matrix of ones sums the block totals,
/// the block holding the target is gathered and summed the same way. (Candle's
/// `cumsum` is one such product over the whole dimension, a V x V matrix.)
/// Greedy decoding is the argmax (on CUDA, which of several equal maxima it
/// returns is the kernel's choice; the host takes the first).
pub struct DeviceSampler {
    vocab: usize,
    block: usize,
    blocks: usize,
    /// (blocks x blocks) and (block x block): ones on and above the diagonal,
    /// so `row.matmul(upper)` is the inclusive prefix sum of `row`.
    upper_blocks: Tensor,
    upper_block: Tensor,
}

impl DeviceSampler {
    pub fn new(vocab: usize, device: &Device) -> Result<Self> {
        let block = (vocab as f64).sqrt().ceil().max(1.0) as usize;
        let blocks = vocab.div_ceil(block);
        let upper = |n: usize| -> Result<Tensor> {
            let ones: Vec<f32> = (0..n * n)
                .map(|i| if i / n <= i % n { 1.0 } else { 0.0 })
                .collect();
            Ok(Tensor::from_vec(ones, (n, n), device)?)
        };
        Ok(Self {
            vocab,
            block,
            blocks,
            upper_blocks: upper(blocks)?,
            upper_block: upper(block)?,
        })
    }

    /// Token ids (batch, u32) drawn from `logits` (batch x vocabulary, f32):
    /// the argmax at temperature 0, else the token where `uniforms[row]` of the
    /// way through the cumulative probabilities falls.
    pub fn draw(&self, logits: &Tensor, temperature: f64, uniforms: &[f32]) -> Result<Tensor> {
        let (b, vocab) = logits.dims2()?;
        if vocab != self.vocab || uniforms.len() != b {
            return Err(Error::Msg(format!(
                "device sampler for {} tokens got logits {b} x {vocab} and {} uniforms",
                self.vocab,
                uniforms.len()
            )));
        }
        if temperature == 0.0 {
            return Ok(logits.argmax(1)?);
        }
        let device = logits.device();
        let (block, blocks) = (self.block, self.blocks);
        // Unnormalized probabilities exp((l - max) / T), padded with zeros to
        // whole blocks.
        let max = logits.max_keepdim(1)?;
        let weights = (logits.broadcast_sub(&max)? / temperature)?.exp()?;
        let weights = weights
            .pad_with_zeros(1, 0, blocks * block - vocab)?
            .reshape((b, blocks, block))?;
        let block_totals = weights.sum(2)?; // (b, blocks)
        let through_block = block_totals.matmul(&self.upper_blocks)?; // inclusive
        let total = through_block.narrow(1, blocks - 1, 1)?;
        // A uniform of 1 (an f64 just below 1 rounds up in f32) would put the
        // target at the total: keep it below.
        let below_one = f32::from_bits(1.0f32.to_bits() - 1);
        let u: Vec<f32> = uniforms.iter().map(|u| u.min(below_one)).collect();
        let u = Tensor::from_vec(u, (b, 1), device)?;
        let target = u.mul(&total)?;
        // The number of running totals at or below the target (strictly
        // below, with `strict`), per row.
        let count = |running: &Tensor, target: &Tensor, strict: bool| -> Result<Tensor> {
            let passed = if strict {
                running.broadcast_lt(target)?
            } else {
                running.broadcast_le(target)?
            };
            Ok(passed.to_dtype(DType::F32)?.sum_keepdim(1)?)
        };
        // The first block whose running total passes the target: the number
        // of blocks whose running total does not (blocks of weight 0 are
        // passed). Rounding can leave the target at the total: then the last
        // block with weight, the number of running totals below the total.
        let j = count(&through_block, &target, false)?.minimum(&count(
            &through_block,
            &total,
            true,
        )?)?;
        let j_ids = j.to_dtype(DType::U32)?;
        let before = (through_block - &block_totals)?.gather(&j_ids, 1)?;
        let rest = (target - before)?;
        let in_block = weights
            .gather(
                &j_ids
                    .unsqueeze(2)?
                    .broadcast_as((b, 1, block))?
                    .contiguous()?,
                1,
            )?
            .squeeze(1)?;
        // The same within the block; the block's running sum (a product) and
        // its total (a sum) can round apart, so clamp to its last token with
        // weight likewise.
        let running = in_block.matmul(&self.upper_block)?;
        let block_total = running.narrow(1, block - 1, 1)?;
        let k = count(&running, &rest, false)?.minimum(&count(&running, &block_total, true)?)?;
        let id = ((j * block as f64)? + k)?;
        Ok(id.squeeze(1)?.to_dtype(DType::U32)?)
    }
}

/// Completes each prompt, drawing row i's tokens from `rngs[i]` (so a
/// completion does not depend on the other rows of its batch); returns the
/// generated ids without the stop token. Build `model` from
/// [`crate::models::frozen_builder`] so that no step records an autograd graph.
pub fn generate(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    pad_id: u32,
    s: &Sampling,
    rngs: &mut [HostRng],
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    if rngs.len() != b {
        return Err(Error::Msg(format!(
            "{b} prompts but {} random streams",
            rngs.len()
        )));
    }
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if b == 0 || prompts.iter().any(Vec::is_empty) {
        return Err(Error::Msg("every prompt needs at least one token".into()));
    }
    let limit = model.max_positions();
    let steps = s.max_new_tokens;
    if width + steps > limit {
        return Err(Error::Msg(format!(
            "the longest prompt ({width} tokens) plus max_new_tokens ({steps}) exceeds the model's {limit} positions",
        )));
    }
    let dtype = model.dtype();
    // 1. Left-pad the prompts into one batch.
    let (ids, mask) = left_pad(prompts, pad_id);
    let mut cache = model.new_cache(width + steps);
    let mut input = Tensor::from_vec(ids, (b, width), device)?;
    let mut pos = Tensor::from_vec(position_ids(&mask).concat(), (b, width), device)?;
    let mut bias = attention_bias(&mask, width, dtype, device)?;
    // Every decode step's bias and positions, uploaded once: the query of
    // step t (counting the prompt pass as 0) sees the real prompt tokens and
    // every token before it, the first width + t keys of the last row.
    let grown: Vec<Vec<u8>> = mask
        .iter()
        .map(|row| [row.as_slice(), &vec![1u8; steps]].concat())
        .collect();
    let decode_bias = attention_bias(&grown, 1, dtype, device)?;
    let decode_pos: Vec<u32> = (0..steps as u32)
        .flat_map(|t| prompts.iter().map(move |p| p.len() as u32 + t))
        .collect();
    let decode_pos = Tensor::from_vec(decode_pos, (steps, b), device)?;
    let on_device = s.draws_on_device(device);
    let mut sampler: Option<DeviceSampler> = None;
    let mut out = vec![Vec::new(); b];
    let mut done = vec![false; b];
    for t in 0..steps {
        // 2. Forward the new positions; keep only the last one's logits.
        let hidden = model.forward(&input, &pos, &bias, Some(&mut cache))?;
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?;
        let logits = model.lm_logits(&last)?.squeeze(1)?.to_dtype(DType::F32)?;
        // 3. Draw each row's token with the seeded RNG (one uniform per row
        // still generating, on the host or uploaded).
        // `drawn` holds the ids on the device when they were drawn there.
        let (next, drawn) = if on_device {
            let sampler = match &mut sampler {
                Some(sampler) => sampler,
                empty => empty.insert(DeviceSampler::new(logits.dim(1)?, device)?),
            };
            let uniforms: Vec<f32> = (done.iter().zip(rngs.iter_mut()))
                .map(|(&d, rng)| {
                    if d || s.temperature == 0.0 {
                        0.0
                    } else {
                        rng.uniform() as f32
                    }
                })
                .collect();
            let drawn = sampler.draw(&logits, s.temperature, &uniforms)?;
            (drawn.to_vec1::<u32>()?, Some(drawn)) // host sync
        } else {
            let rows = logits.to_vec2::<f32>()?; // host sync
            let next: Vec<u32> = (rows.iter().zip(&done).zip(rngs.iter_mut()))
                .map(|((l, &d), rng)| if d { pad_id } else { sample_token(l, s, rng) })
                .collect();
            (next, None)
        };
        for (row, &tok) in next.iter().enumerate() {
            if done[row] {
                continue;
            }
            let stop = s.stop_token_ids.contains(&tok);
            if !stop || s.keep_stop_token {
                out[row].push(tok);
            }
            done[row] = stop;
        }
        if done.iter().all(|d| *d) || t + 1 == steps {
            break;
        }
        // A finished row keeps decoding what it drew; its outputs are ignored.
        input = match drawn {
            Some(drawn) => drawn.reshape((b, 1))?,
            None => Tensor::from_vec(next, (b, 1), device)?,
        };
        pos = decode_pos.narrow(0, t, 1)?.reshape((b, 1))?;
        bias = decode_bias.narrow(3, 0, width + t + 1)?;
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
            stop_token_ids: Vec::new(),
            keep_stop_token: false,
            draw: Default::default(),
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

    /// Random logits with a few -inf (never drawn) and a spread wide enough
    /// that many tokens carry weight.
    fn random_logits(rng: &mut HostRng, b: usize, vocab: usize) -> Vec<f32> {
        (0..b * vocab)
            .map(|_| {
                let u = rng.uniform();
                if u < 0.05 {
                    f32::NEG_INFINITY
                } else {
                    (u * 6.0 - 3.0) as f32
                }
            })
            .collect()
    }

    #[test]
    fn the_device_draw_equals_the_host_draw_for_the_same_uniforms() {
        let device = Device::Cpu;
        let mut data_rng = HostRng::new(1);
        // Square, non-square and one-token vocabularies; several temperatures.
        for (vocab, temperature) in [
            (1, 1.0),
            (2, 0.7),
            (7, 1.0),
            (50, 0.7),
            (1000, 1.3),
            (50257, 0.7),
        ] {
            let b = 6;
            let logits = random_logits(&mut data_rng, b, vocab);
            let s = sampling(temperature, None, 1.0);
            let sampler = DeviceSampler::new(vocab, &device).unwrap();
            let t = Tensor::from_slice(&logits, (b, vocab), &device).unwrap();
            let (mut host_rng, mut device_rng) = (HostRng::new(7), HostRng::new(7));
            for _ in 0..40 {
                let host: Vec<u32> = logits
                    .chunks(vocab)
                    .map(|row| sample_token(row, &s, &mut host_rng))
                    .collect();
                let uniforms: Vec<f32> = (0..b).map(|_| device_rng.uniform() as f32).collect();
                let drawn = sampler.draw(&t, temperature, &uniforms).unwrap();
                assert_eq!(drawn.to_vec1::<u32>().unwrap(), host, "vocab {vocab}");
            }
        }
    }

    #[test]
    fn the_device_draw_follows_the_softmax_at_the_edges() {
        // Weights 1, 2, 3, 4 over 9 tokens (the rest -inf), temperature 1:
        // uniforms at the cumulative edges land on the token they close.
        let device = Device::Cpu;
        let mut logits = vec![f32::NEG_INFINITY; 9];
        for (i, w) in [(1, 1.0f32), (3, 2.0), (4, 3.0), (8, 4.0)] {
            logits[i] = w.ln();
        }
        let t = Tensor::from_slice(&logits, (1, 9), &device).unwrap();
        let sampler = DeviceSampler::new(9, &device).unwrap();
        for (u, want) in [
            (0.0, 1),
            (0.09, 1),
            (0.11, 3),
            (0.29, 3),
            (0.31, 4),
            (0.59, 4),
            (0.61, 8),
            (0.999, 8),
        ] {
            let id = sampler
                .draw(&t, 1.0, &[u])
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            assert_eq!(id, [want], "u = {u}");
        }
        // A uniform of 1 (a draw just below 1 rounded to f32) takes the last
        // token with weight, not a token of weight 0 after it.
        let mut front = vec![f32::NEG_INFINITY; 9];
        front[..4].fill(0.0);
        let front = Tensor::from_slice(&front, (1, 9), &device).unwrap();
        for u in [1.0, 0.999_999_9] {
            let id = sampler
                .draw(&front, 1.0, &[u])
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            assert_eq!(id, [3], "u = {u}");
        }
        // Temperature 0 is the argmax, whatever the uniform.
        let id = sampler
            .draw(&t, 0.0, &[0.0])
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(id, [8]);
        // A wrong batch is refused.
        assert!(sampler.draw(&t, 1.0, &[0.5, 0.5]).is_err());
    }

    #[test]
    fn draws_on_the_device_only_where_the_settings_allow() {
        let cpu = Device::Cpu;
        let mut s = sampling(0.7, None, 1.0);
        assert!(
            !s.draws_on_device(&cpu),
            "auto draws on the host on the CPU"
        );
        s.draw = Draw::Device;
        assert!(s.draws_on_device(&cpu));
        s.temperature = 0.0;
        s.top_k = Some(5);
        assert!(s.draws_on_device(&cpu), "greedy ignores top_k");
        s.temperature = 0.7;
        assert!(!s.draws_on_device(&cpu), "top_k needs the host's sort");
        s.top_k = None;
        s.top_p = 0.9;
        assert!(!s.draws_on_device(&cpu), "top_p needs the host's sort");
        s.draw = Draw::Host;
        s.top_p = 1.0;
        assert!(!s.draws_on_device(&cpu));
    }
}
