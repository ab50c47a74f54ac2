//! The RL math: every loss and estimator of reward-model training and PPO as
//! a small pure function on candle tensors, each unit-tested against values
//! worked by hand (the GAE case is the one of the project's seed notebook,
//! whose Python is quoted beside the test).
//!
//! Conventions: per-token tensors are (B, T) over the response tokens only;
//! `mask` is 1.0 on real response tokens (up to and including the stop
//! token) and 0.0 on the padding after them, in the tensor's float dtype.
//! Names follow TRL's PPOTrainer and "The N+ Implementation Details of RLHF
//! with PPO" (Huang et al., 2024).

pub mod dpo;
pub mod head;

pub use head::{head_figures, token_figures, TokenFigures};

use candle_core::{DType, Tensor, D};

use crate::config::KlEstimator;
use crate::{Error, Result};

/// -log(sigmoid(x)) = (|x| - x) / 2 + log(1 + exp(-|x|)): finite for any x,
/// and its autograd gradient is exact everywhere (-1/2 at 0). The tempting
/// `-(min(x, 0) - log(1 + exp(-|x|)))` gets -1 at 0 under Candle's autograd
/// (ties in `minimum` split the gradient, d|x|/dx at 0 is +1).
pub fn neg_logsigmoid(x: &Tensor) -> Result<Tensor> {
    let abs = x.abs()?;
    let linear = ((&abs - x)? * 0.5)?;
    let soft = (abs.neg()?.exp()? + 1.0)?.log()?;
    Ok((linear + soft)?)
}

/// The Bradley-Terry reward-model loss of TRL's RewardTrainer:
/// mean(-logsigmoid(r_chosen - r_rejected - margin)), plus
/// `center_coef * mean((r_chosen + r_rejected)^2)` when given (keeps rewards
/// centred at 0; Eisenstein et al., 2023). Rewards and margins are (B,).
pub fn bradley_terry(
    chosen: &Tensor,
    rejected: &Tensor,
    margin: Option<&Tensor>,
    center_coef: Option<f64>,
) -> Result<Tensor> {
    let mut diff = (chosen - rejected)?;
    if let Some(m) = margin {
        diff = (diff - m)?;
    }
    let mut loss = neg_logsigmoid(&diff)?.mean_all()?;
    if let Some(coef) = center_coef {
        let center = (chosen + rejected)?.sqr()?.mean_all()?;
        loss = (loss + (center * coef)?)?;
    }
    Ok(loss)
}

/// sum(x * mask) / max(sum(mask), 1), a scalar (0, not NaN, for an empty mask).
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let n = mask.sum_all()?.clamp(1.0, f64::INFINITY)?;
    Ok((x * mask)?.sum_all()?.broadcast_div(&n)?)
}

/// The variance of x over the real positions, with Bessel's correction when
/// `unbiased` (as TRL's masked_var). Errors when the mask has too few ones.
pub fn masked_var(x: &Tensor, mask: &Tensor, unbiased: bool) -> Result<Tensor> {
    let mean = masked_mean(x, mask)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = masked_mean(&centered.sqr()?, mask)?;
    if !unbiased {
        return Ok(var);
    }
    let n = mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    if n < 2.0 {
        return Err(Error::Msg(format!(
            "masked_var: {n} real positions; the unbiased variance needs at least 2"
        )));
    }
    Ok((var * (n / (n - 1.0)))?)
}

/// (x - mean) / sqrt(var + 1e-8) with mean and unbiased variance over the
/// real positions; the mean is added back when `shift_mean` is false (TRL's
/// masked_whiten, used so for rewards). Padding positions are transformed
/// too: mask them afterwards.
pub fn masked_whiten(x: &Tensor, mask: &Tensor, shift_mean: bool) -> Result<Tensor> {
    let mean = masked_mean(x, mask)?;
    let var = masked_var(x, mask, true)?;
    let whitened = x
        .broadcast_sub(&mean)?
        .broadcast_div(&(var + 1e-8)?.sqrt()?)?;
    Ok(if shift_mean {
        whitened
    } else {
        whitened.broadcast_add(&mean)?
    })
}

/// Per-token KL estimates of KL(policy || reference) from the log-probs of
/// the sampled tokens (Schulman, "Approximating KL divergence"), with
/// r = ref_logprobs - logprobs: k1 = -r (unbiased, can be negative),
/// k2 = r^2 / 2, k3 = exp(r) - 1 - r (unbiased and non-negative).
pub fn kl_per_token(
    logprobs: &Tensor,
    ref_logprobs: &Tensor,
    estimator: KlEstimator,
) -> Result<Tensor> {
    let logr = (ref_logprobs - logprobs)?;
    Ok(match estimator {
        KlEstimator::K1 => logr.neg()?,
        KlEstimator::K2 => (logr.sqr()? * 0.5)?,
        KlEstimator::K3 => ((logr.exp()? - 1.0)? - logr)?,
    })
}

/// A one-hot (B, T) of each row's last real token (mask is a prefix mask).
pub fn last_token_one_hot(mask: &Tensor) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    let next = Tensor::cat(
        &[
            mask.narrow(1, 1, t - 1)?,
            Tensor::zeros((b, 1), mask.dtype(), mask.device())?,
        ],
        1,
    )?;
    Ok((mask * (1.0 - next)?)?)
}

/// The per-token rewards of the rollout: the KL penalty
/// `non_score_reward = -kl_coef * kl` on every real token, plus the
/// sequence's score on its last real token (the stop token when the
/// response has one, else its last generated token). TRL adds the score one
/// position later when the response stopped early (its issue 3750); here
/// it always lands on a real token. Returns (rewards, non_score_reward).
pub fn per_token_rewards(
    kl: &Tensor,
    mask: &Tensor,
    scores: &Tensor,
    kl_coef: f64,
) -> Result<(Tensor, Tensor)> {
    let non_score = ((kl * mask)? * -kl_coef)?;
    let score = last_token_one_hot(mask)?.broadcast_mul(&scores.unsqueeze(1)?)?;
    Ok(((&non_score + score)?, non_score))
}

/// Generalized advantage estimation (Schulman et al., 2016) over the
/// response tokens: delta_t = r_t + gamma * V_{t+1} - V_t and
/// A_t = delta_t + gamma * lam * A_{t+1}, with rewards and values zero past
/// the last real token (the episode ends there). Returns (advantages,
/// returns = advantages + values), both zero on padding.
pub fn gae(
    rewards: &Tensor,
    values: &Tensor,
    mask: &Tensor,
    gamma: f64,
    lam: f64,
) -> Result<(Tensor, Tensor)> {
    let (b, t) = rewards.dims2()?;
    let rewards = (rewards * mask)?;
    let values = (values * mask)?;
    let mut last = Tensor::zeros(b, rewards.dtype(), rewards.device())?;
    let mut next_value = last.clone();
    let mut reversed = Vec::with_capacity(t);
    for i in (0..t).rev() {
        let v = values.narrow(1, i, 1)?.squeeze(1)?;
        let delta = ((rewards.narrow(1, i, 1)?.squeeze(1)? + (&next_value * gamma)?)? - &v)?;
        last = (delta + (last * (gamma * lam))?)?;
        reversed.push(last.clone());
        next_value = v;
    }
    reversed.reverse();
    let advantages = (Tensor::stack(&reversed, 1)? * mask)?;
    let returns = (&advantages + values)?;
    Ok((advantages, returns))
}

/// Explained variance of the values over real tokens, 1 - Var(R - V) / Var(R)
/// (as CleanRL and TRL log it; the ratio is the same with or without
/// Bessel's correction); NaN when the returns do not vary.
pub fn explained_variance(returns: &Tensor, values: &Tensor, mask: &Tensor) -> Result<f64> {
    let var = |x: &Tensor| -> Result<f64> {
        Ok(masked_var(x, mask, false)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    };
    let var_r = var(returns)?;
    let var_e = var(&(returns - values)?)?;
    Ok(if var_r > 0.0 {
        1.0 - var_e / var_r
    } else {
        f64::NAN
    })
}

// ---------------------------------------------------------------- critic-free advantages

pub use crate::config::ScaleRewards;

/// Mean and unbiased standard deviation (torch's `std`, TRL's `nanstd`); 0 for one value.
fn mean_std(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    if x.len() < 2 {
        return (mean, 0.0);
    }
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

fn check_groups(rewards: &[f64], group: usize) -> Result<()> {
    if group == 0 || rewards.is_empty() || !rewards.len().is_multiple_of(group) {
        return Err(Error::Msg(format!(
            "{} rewards do not split into groups of {group} (one group per prompt)",
            rewards.len()
        )));
    }
    Ok(())
}

/// GRPO's group-relative advantages (TRL GRPOTrainer): each completion's
/// reward minus its group's mean, divided by the group's (or the batch's)
/// standard deviation + 1e-4 unless `scale` is None. `rewards` holds the
/// groups one after another, `group` completions per prompt.
pub fn grpo_advantages(rewards: &[f64], group: usize, scale: ScaleRewards) -> Result<Vec<f64>> {
    check_groups(rewards, group)?;
    let batch_std = mean_std(rewards).1;
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group) {
        let (mean, group_std) = mean_std(g);
        let centred = g.iter().map(|r| r - mean);
        match scale {
            ScaleRewards::Group => out.extend(centred.map(|a| a / (group_std + 1e-4))),
            ScaleRewards::Batch => out.extend(centred.map(|a| a / (batch_std + 1e-4))),
            ScaleRewards::None => out.extend(centred),
        }
    }
    Ok(out)
}

/// RLOO's leave-one-out advantages (TRL RLOOTrainer; Ahmadian et al.,
/// 2024): each reward minus the mean of its group's other rewards; with
/// `normalize`, then whitened over the batch (unbiased std + 1e-4).
pub fn rloo_advantages(rewards: &[f64], group: usize, normalize: bool) -> Result<Vec<f64>> {
    check_groups(rewards, group)?;
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group) {
        let sum: f64 = g.iter().sum();
        out.extend(g.iter().map(|r| {
            if group > 1 {
                r - (sum - r) / (group - 1) as f64
            } else {
                0.0
            }
        }));
    }
    if normalize {
        let (mean, std) = mean_std(&out);
        out.iter_mut().for_each(|a| *a = (*a - mean) / (std + 1e-4));
    }
    Ok(out)
}

/// REINFORCE++-baseline's first step (OpenRLHF `reinforce_baseline`): each
/// sequence reward minus its group's mean.
pub fn group_baseline(rewards: &[f64], group: usize) -> Result<Vec<f64>> {
    check_groups(rewards, group)?;
    Ok(rewards
        .chunks(group)
        .flat_map(|g| {
            let mean = g.iter().sum::<f64>() / g.len() as f64;
            g.iter().map(move |r| r - mean)
        })
        .collect())
}

/// REINFORCE++ advantages (OpenRLHF `reinforce`): the discounted returns of
/// the per-token rewards (B, T), R_t = r_t + gamma R_(t+1) over real tokens,
/// whitened over every real token of the batch; 0 on padding.
pub fn reinforce_pp_advantages(rewards: &Tensor, mask: &Tensor, gamma: f64) -> Result<Tensor> {
    let (b, t) = rewards.dims2()?;
    let rewards = (rewards * mask)?;
    let mut running = Tensor::zeros(b, rewards.dtype(), rewards.device())?;
    let mut reversed = Vec::with_capacity(t);
    for i in (0..t).rev() {
        running = (rewards.narrow(1, i, 1)?.squeeze(1)? + (running * gamma)?)?;
        reversed.push(running.clone());
    }
    reversed.reverse();
    let returns = (Tensor::stack(&reversed, 1)? * mask)?;
    Ok((masked_whiten(&returns, mask, true)? * mask)?)
}

/// `a` where `pick_a`, else `b`; the gradient flows only to the picked side
/// (candle's `maximum` splits it 50/50 on ties, which would halve the
/// unclipped PPO gradient whenever the ratio is inside the clip range).
fn select(pick_a: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(pick_a.where_cond(a, b)?)
}

/// The clipped surrogate objective of PPO and its diagnostics.
pub struct PolicyLoss {
    /// masked_mean(max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c))).
    pub loss: Tensor,
    /// Fraction of real tokens where the clipped term was chosen.
    pub clipfrac: Tensor,
    /// 0.5 * mean((logp - old_logp)^2) over real tokens.
    pub approxkl: Tensor,
    /// The probability ratio exp(logp - old_logp), (B, T).
    pub ratio: Tensor,
}

/// The clipped policy loss (TRL's pg_loss) over real tokens.
pub fn policy_loss(
    logprobs: &Tensor,
    old_logprobs: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    cliprange: f64,
) -> Result<PolicyLoss> {
    let diff = (logprobs - old_logprobs)?;
    let ratio = diff.exp()?;
    let unclipped = (advantages.neg()? * &ratio)?;
    let clipped = (advantages.neg()? * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)?)?;
    let use_clipped = clipped.gt(&unclipped)?;
    let loss = masked_mean(&select(&use_clipped, &clipped, &unclipped)?, mask)?;
    Ok(PolicyLoss {
        loss,
        clipfrac: masked_mean(&use_clipped.to_dtype(mask.dtype())?, mask)?.detach(),
        approxkl: (masked_mean(&diff.sqr()?, mask)? * 0.5)?.detach(),
        ratio: ratio.detach(),
    })
}

/// The clipped value loss and its clip fraction.
pub struct ValueLoss {
    /// 0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)).
    pub loss: Tensor,
    pub clipfrac: Tensor,
}

/// The clipped value loss (TRL's vf_loss, without vf_coef) over real tokens.
pub fn value_loss(
    values: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    cliprange_value: f64,
) -> Result<ValueLoss> {
    let low = (old_values - cliprange_value)?;
    let high = (old_values + cliprange_value)?;
    let clipped_values = values.maximum(&low)?.minimum(&high)?;
    let unclipped = (values - returns)?.sqr()?;
    let clipped = (clipped_values - returns)?.sqr()?;
    let use_clipped = clipped.gt(&unclipped)?;
    let loss = (masked_mean(&select(&use_clipped, &clipped, &unclipped)?, mask)? * 0.5)?;
    Ok(ValueLoss {
        loss,
        clipfrac: masked_mean(&use_clipped.to_dtype(mask.dtype())?, mask)?.detach(),
    })
}

/// The entropy of the softmax of each row of logits (.., V) -> (..):
/// logsumexp(l) - sum(softmax(l) * l).
pub fn entropy_from_logits(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let p = candle_nn::ops::softmax(&shifted, D::Minus1)?;
    Ok((lse - (p * shifted)?.sum_keepdim(D::Minus1)?)?.squeeze(D::Minus1)?)
}

/// The log-probability of each chosen token: log_softmax(logits)[token],
/// logits (B, T, V), tokens (B, T) u32 -> (B, T).
pub fn token_logprobs(logits: &Tensor, tokens: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok(logp
        .gather(&tokens.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?)
}

/// Per row of `logits` (.., V) scaled by `scale` (1 / temperature): the
/// log-probability of the row's token and the softmax's entropy, both (..).
/// The fused CPU kernel where it applies, else [`token_logprobs`] and
/// [`entropy_from_logits`] composed.
pub fn token_logprobs_and_entropy(
    logits: &Tensor,
    tokens: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    if let Some(both) = crate::kernels::token_logprobs_and_entropy_fused(logits, tokens, scale)? {
        return Ok(both);
    }
    let scaled = (logits * scale)?;
    Ok((
        token_logprobs(&scaled, tokens)?,
        entropy_from_logits(&scaled)?,
    ))
}

/// The adaptive KL coefficient of Ziegler et al. (2019), as TRL's old
/// AdaptiveKLController: after each batch, kl_coef *= 1 + clip(KL/target - 1,
/// -0.2, 0.2) * n_steps / horizon, KL being the mean summed KL per sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveKl {
    pub value: f64,
    pub target: f64,
    pub horizon: f64,
}

impl AdaptiveKl {
    pub fn update(&mut self, current_kl: f64, n_steps: usize) {
        let error = (current_kl / self.target - 1.0).clamp(-0.2, 0.2);
        self.value *= 1.0 + error * n_steps as f64 / self.horizon;
    }
}

// ---------------------------------------------------------------- critic-free losses

/// The clipped surrogate of GRPO and RLOO and its clip indicators.
pub struct ClippedSurrogate {
    /// -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), the shape of the log-ratio.
    pub loss: Tensor,
    /// 1 where the ratio fell below 1 - eps_low with A < 0 (TRL's `is_low_clipped`), detached.
    pub low: Tensor,
    /// 1 where the ratio rose above 1 + eps_high with A > 0 (`is_high_clipped`), detached.
    pub high: Tensor,
}

/// The clipped surrogate on `log_ratio` (log pi - log pi_old, per token or
/// per sequence) with `advantages` broadcast to its shape. The gradient of
/// the min goes to the unclipped side on ties (see [`select`]).
pub fn clipped_surrogate(
    log_ratio: &Tensor,
    advantages: &Tensor,
    eps_low: f64,
    eps_high: f64,
) -> Result<ClippedSurrogate> {
    let ratio = log_ratio.exp()?;
    let a = advantages.broadcast_as(ratio.shape())?;
    let unclipped = (&ratio * &a)?;
    let clipped = (ratio.clamp(1.0 - eps_low, 1.0 + eps_high)? * &a)?;
    let loss = select(&unclipped.le(&clipped)?, &unclipped, &clipped)?.neg()?;
    let zero = a.zeros_like()?;
    let flag = |x: Tensor| -> Result<Tensor> { Ok(x.to_dtype(ratio.dtype())?.detach()) };
    let low = flag((ratio.lt(1.0 - eps_low)?.to_dtype(DType::U8)? * a.lt(&zero)?)?)?;
    let high = flag((ratio.gt(1.0 + eps_high)?.to_dtype(DType::U8)? * a.gt(&zero)?)?)?;
    Ok(ClippedSurrogate { loss, low, high })
}

/// GSPO's sequence-level log importance weight (TRL's
/// `importance_sampling_level = "sequence"`): the mean of the token
/// log-ratios over real tokens, (B, 1).
pub fn sequence_log_ratio(log_ratio: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let n = mask.sum_keepdim(1)?.clamp(1.0, f64::INFINITY)?;
    Ok((log_ratio * mask)?.sum_keepdim(1)?.div(&n)?)
}

/// GRPO's reduction of a per-token loss (B, T) to one number (TRL's
/// `loss_type`): grpo, each sequence's mean then the batch mean; bnpo, the
/// mean over the batch's real tokens; dr_grpo, the sum over B x
/// `max_completion_length`; dapo, the sum over `step_tokens`, the real
/// tokens of the whole optimizer step.
pub fn reduce_token_loss(
    per_token: &Tensor,
    mask: &Tensor,
    loss_type: crate::config::GrpoLossType,
    max_completion_length: usize,
    step_tokens: f64,
) -> Result<Tensor> {
    use crate::config::GrpoLossType as L;
    let per_token = per_token.broadcast_as(mask.shape())?;
    let masked = (per_token * mask)?;
    let b = mask.dim(0)? as f64;
    Ok(match loss_type {
        L::Grpo => {
            let n = mask.sum(1)?.clamp(1.0, f64::INFINITY)?;
            masked.sum(1)?.div(&n)?.mean_all()?
        }
        L::Bnpo => masked
            .sum_all()?
            .div(&mask.sum_all()?.clamp(1.0, f64::INFINITY)?)?,
        L::DrGrpo => (masked.sum_all()? / (b * max_completion_length as f64))?,
        L::Dapo => (masked.sum_all()? / step_tokens.max(1.0))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{compare, seeded};
    use candle_core::{Device, Var};

    #[test]
    fn token_logprobs_and_entropy_match_the_composed_ops_in_value_and_gradient() {
        // Rows peaked and flat, a temperature, enough rows for the parallel path.
        let mut logits = seeded(&[3, 40, 300], 21, 6.0);
        logits = logits
            .slice_assign(&[0..1, 0..1, 0..300], &(seeded(&[1, 1, 300], 22, 0.01)))
            .unwrap();
        let tokens: Vec<u32> = (0..120).map(|i| (i * 37 % 300) as u32).collect();
        let tokens = Tensor::from_vec(tokens, (3, 40), &Device::Cpu).unwrap();
        let x = Var::from_tensor(&logits).unwrap();
        let scale = 1.0 / 0.7;
        let stack = |(lp, h): (Tensor, Tensor)| Tensor::stack(&[lp, h], 0).unwrap();
        compare(
            &[x],
            |v| {
                stack(
                    crate::kernels::token_logprobs_and_entropy_fused(&v[0], &tokens, scale)
                        .unwrap()
                        .unwrap(),
                )
            },
            |v| {
                let scaled = (&v[0] * scale).unwrap();
                stack((
                    token_logprobs(&scaled, &tokens).unwrap(),
                    entropy_from_logits(&scaled).unwrap(),
                ))
            },
            2e-5,
        );
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(candle_core::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn neg_logsigmoid_and_its_gradient_are_exact_everywhere() {
        let xs = [-3000.0f64, -20.0, -1.0, 0.0, 1.0, 20.0, 3000.0];
        let x = Var::new(&xs[..], &Device::Cpu).unwrap();
        let y = neg_logsigmoid(x.as_tensor()).unwrap();
        // By hand: -log(sigmoid(x)) = log(1 + e^-x); at 0, ln 2; for x -> -inf, -x.
        let want = [
            3000.0,
            20.0 + (-20f64).exp().ln_1p(),
            1.0 + (-1f64).exp().ln_1p(),
            2f64.ln(),
            (-1f64).exp().ln_1p(),
            (-20f64).exp().ln_1p(),
            0.0,
        ];
        for (a, b) in values(&y).iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        // d/dx = -(1 - sigmoid(x)) = -sigmoid(-x): -1 at -3000, -1/2 at 0, 0 at 3000.
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = values(grads.get(x.as_tensor()).unwrap());
        for (x, g) in xs.iter().zip(g) {
            let want = -1.0 / (1.0 + x.exp());
            assert!((g - want).abs() < 1e-12, "x={x}: {g} vs {want}");
        }
    }

    #[test]
    fn bradley_terry_by_hand() {
        let dev = Device::Cpu;
        let c = Tensor::new(&[2.0f64, 0.0], &dev).unwrap();
        let r = Tensor::new(&[1.0f64, 0.0], &dev).unwrap();
        // differences 1 and 0: mean(log(1 + e^-1), ln 2)
        let want = ((-1f64).exp().ln_1p() + 2f64.ln()) / 2.0;
        let l = bradley_terry(&c, &r, None, None)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((l - want).abs() < 1e-12);
        // a margin of 1 on the first pair: its difference becomes 0.
        let m = Tensor::new(&[1.0f64, 0.0], &dev).unwrap();
        let l = bradley_terry(&c, &r, Some(&m), None)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((l - 2f64.ln()).abs() < 1e-12);
        // centering: + 0.01 * mean((2+1)^2, 0^2) = 0.045
        let l = bradley_terry(&c, &r, None, Some(0.01))
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((l - (want + 0.045)).abs() < 1e-12);
        // huge differences stay finite
        let big = Tensor::new(&[5000.0f64, -5000.0], &dev).unwrap();
        let zero = Tensor::new(&[0.0f64, 0.0], &dev).unwrap();
        let l = bradley_terry(&big, &zero, None, None)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((l - 2500.0).abs() < 1e-9, "{l}");
    }

    fn t2(rows: &[&[f64]]) -> Tensor {
        let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
    }

    fn close(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < tol, "{got:?} vs {want:?}");
        }
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn masked_statistics_by_hand() {
        let x = t2(&[&[1.0, 2.0, 3.0, 100.0]]);
        let m = t2(&[&[1.0, 1.0, 1.0, 0.0]]);
        assert_eq!(scalar(&masked_mean(&x, &m).unwrap()), 2.0);
        // deviations -1, 0, 1: biased 2/3, unbiased 2/2 = 1
        assert!((scalar(&masked_var(&x, &m, false).unwrap()) - 2.0 / 3.0).abs() < 1e-12);
        assert!((scalar(&masked_var(&x, &m, true).unwrap()) - 1.0).abs() < 1e-12);
        let w = masked_whiten(&x, &m, true).unwrap();
        let s = 1.0 / (1.0 + 1e-8f64).sqrt();
        close(&values(&w)[..3], &[-s, 0.0, s], 1e-12);
        let w = masked_whiten(&x, &m, false).unwrap();
        close(&values(&w)[..3], &[2.0 - s, 2.0, 2.0 + s], 1e-12);
        let one = t2(&[&[1.0, 0.0, 0.0, 0.0]]);
        let e = masked_var(&x, &one, true).unwrap_err().to_string();
        assert!(e.contains("at least 2"), "{e}");
    }

    #[test]
    fn kl_estimators_by_hand() {
        // The seeds' reward calculator: actor -1.2 vs reference -1.0 etc.
        let logp = t2(&[&[-1.2, -0.8, -1.0]]);
        let ref_logp = t2(&[&[-1.0, -1.0, -1.0]]);
        let k1 = values(&kl_per_token(&logp, &ref_logp, KlEstimator::K1).unwrap());
        close(&k1, &[-0.2, 0.2, 0.0], 1e-12);
        let k2 = values(&kl_per_token(&logp, &ref_logp, KlEstimator::K2).unwrap());
        close(&k2, &[0.02, 0.02, 0.0], 1e-12);
        // r = ref - logp = 0.2, -0.2, 0: e^r - 1 - r
        let k3 = values(&kl_per_token(&logp, &ref_logp, KlEstimator::K3).unwrap());
        close(
            &k3,
            &[0.2f64.exp() - 1.2, (-0.2f64).exp() - 0.8, 0.0],
            1e-12,
        );
        assert!(k3.iter().all(|&v| v >= 0.0));
    }

    #[test]
    fn rewards_put_the_score_on_the_last_real_token() {
        // Row 0 is the seeds' example (8 tokens, kl_coef 0.02, score 0.5);
        // row 1 stopped early: its stop token is at index 2.
        let actor = [-1.2, -0.8, -1.5, -0.9, -1.1, -1.0, -0.7, -1.3];
        let reference = [-1.0, -1.0, -1.2, -1.0, -1.0, -1.1, -1.0, -1.0];
        let logp = t2(&[&actor, &actor]);
        let ref_logp = t2(&[&reference, &reference]);
        let mask = t2(&[&[1.0; 8], &[1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]]);
        let kl = kl_per_token(&logp, &ref_logp, KlEstimator::K1).unwrap();
        let scores = Tensor::new(&[0.5f64, 0.5], &Device::Cpu).unwrap();
        let (rewards, non_score) = per_token_rewards(&kl, &mask, &scores, 0.02).unwrap();
        let r: Vec<Vec<f64>> = rewards.to_vec2().unwrap();
        let penalty = [0.004, -0.004, 0.006, -0.002, 0.002, -0.002, -0.006, 0.006];
        let mut want0 = penalty.to_vec();
        want0[7] += 0.5;
        close(&r[0], &want0, 1e-12);
        close(
            &r[1],
            &[0.004, -0.004, 0.506, 0.0, 0.0, 0.0, 0.0, 0.0],
            1e-12,
        );
        let total: f64 = want0.iter().sum();
        assert!((total - (0.5 + 0.004)).abs() < 1e-12, "{total}");
        close(&non_score.to_vec2::<f64>().unwrap()[0], &penalty, 1e-12);
    }

    fn close_f(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < tol, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn explained_variance_by_hand() {
        // Returns 1, 2, 3 (pad ignored), values 1, 2, 2: residuals 0, 0, 1.
        let r = t2(&[&[1.0, 2.0, 3.0, 9.0]]);
        let v = t2(&[&[1.0, 2.0, 2.0, 0.0]]);
        let m = t2(&[&[1.0, 1.0, 1.0, 0.0]]);
        // masked_var(.., unbiased = false) as the PPO loop used it: Var(R) =
        // 2/3, Var(R - V) = (1/9 + 1/9 + 4/9) / 3 = 2/9; 1 - (2/9)/(2/3) = 2/3.
        let ev = explained_variance(&r, &v, &m).unwrap();
        assert!((ev - 2.0 / 3.0).abs() < 1e-12, "{ev}");
        assert_eq!(explained_variance(&r, &r, &m).unwrap(), 1.0);
        assert!(explained_variance(&t2(&[&[1.0, 1.0, 1.0, 1.0]]), &v, &m)
            .unwrap()
            .is_nan());
    }

    #[test]
    fn grpo_advantages_by_hand() {
        // Group 1: 1, 2, 3, 4: mean 2.5, deviations -1.5 -0.5 0.5 1.5, unbiased
        // variance 5/3, std 1.2909944; group 2: all 0, std 0.
        let r = [1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0];
        let s = 1.290_994_448_7 + 1e-4;
        let g = grpo_advantages(&r, 4, ScaleRewards::Group).unwrap();
        close_f(
            &g,
            &[-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s, 0.0, 0.0, 0.0, 0.0],
            1e-9,
        );
        // Batch: the group means, divided by the std of all eight: mean 1.25,
        // squared deviations sum 17.5, variance 2.5, std 1.5811388.
        let s = 1.581_138_830_1 + 1e-4;
        let b = grpo_advantages(&r, 4, ScaleRewards::Batch).unwrap();
        close_f(
            &b,
            &[-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s, 0.0, 0.0, 0.0, 0.0],
            1e-9,
        );
        let n = grpo_advantages(&r, 4, ScaleRewards::None).unwrap();
        close_f(&n, &[-1.5, -0.5, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0], 1e-12);
        assert!(
            grpo_advantages(&r, 3, ScaleRewards::Group).is_err(),
            "8 is not groups of 3"
        );
    }

    #[test]
    fn rloo_advantages_by_hand() {
        // Baselines (10 - r) / 3: 3, 8/3, 7/3, 2; advantages -2, -2/3, 2/3, 2.
        let r = [1.0, 2.0, 3.0, 4.0];
        let a = rloo_advantages(&r, 4, false).unwrap();
        close_f(&a, &[-2.0, -2.0 / 3.0, 2.0 / 3.0, 2.0], 1e-12);
        // Normalized: mean 0, unbiased variance (4 + 4/9 + 4/9 + 4) / 3 = 80/27.
        let s = (80.0f64 / 27.0).sqrt() + 1e-4;
        let n = rloo_advantages(&r, 4, true).unwrap();
        close_f(
            &n,
            &[-2.0 / s, -2.0 / 3.0 / s, 2.0 / 3.0 / s, 2.0 / s],
            1e-9,
        );
        // Groups of two: each is the other's baseline.
        close_f(
            &rloo_advantages(&[1.0, 3.0], 2, false).unwrap(),
            &[-2.0, 2.0],
            1e-12,
        );
        close_f(
            &group_baseline(&[1.0, 3.0, 5.0, 5.0], 2).unwrap(),
            &[-1.0, 1.0, 0.0, 0.0],
            1e-12,
        );
    }

    #[test]
    fn reinforce_pp_returns_are_whitened_over_real_tokens() {
        // Row 0: reward 1 on its last token; row 1: reward 2 on its second of
        // two real tokens. gamma 1: returns 1 1 1 and 2 2 (pad 0); over the
        // five real values mean 1.4, unbiased variance (3 * 0.16 + 2 * 0.36) / 4 = 0.3.
        let rewards = t2(&[&[0.0, 0.0, 1.0], &[0.0, 2.0, 0.0]]);
        let mask = t2(&[&[1.0, 1.0, 1.0], &[1.0, 1.0, 0.0]]);
        let a: Vec<Vec<f64>> = reinforce_pp_advantages(&rewards, &mask, 1.0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let s = (0.3f64 + 1e-8).sqrt();
        let (lo, hi) = ((1.0 - 1.4) / s, (2.0 - 1.4) / s);
        close(&a[0], &[lo, lo, lo], 1e-9);
        close(&a[1], &[hi, hi, 0.0], 1e-9);
        // gamma 0.5 discounts: row 0's returns are 0.25, 0.5, 1.
        let g: Vec<Vec<f64>> = reinforce_pp_advantages(&rewards, &mask, 0.5)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert!(g[0][0] < g[0][1] && g[0][1] < g[0][2], "{g:?}");
    }

    #[test]
    fn gae_matches_the_seed_notebook_and_stops_at_the_mask() {
        // The seed notebook's GAE, rewards 1..4, values 10..13, gamma 0.9,
        // lambda 0.95, terminal value 0; it prints the advantages
        // ['-1.212470', '-2.470725', '-4.995000', '-9.000000']:
        //
        //   def GAE(rewards, values, gamma, lamda):
        //       advantages = []
        //       advantage = 0
        //       for i in reversed(range(len(rewards))):
        //           delta = rewards[i] + gamma * (values[i+1] if i+1 < len(values) else 0) - values[i]
        //           advantage = delta + gamma * lamda * advantage
        //           advantages.append(advantage)
        //       return advantages[::-1]
        //
        // By hand: A_3 = 4 - 13 = -9; A_2 = 3 + 0.9*13 - 12 + 0.855*(-9) = -4.995;
        // A_1 = 2 + 0.9*12 - 11 + 0.855*(-4.995) = -2.470725;
        // A_0 = 1 + 0.9*11 - 10 + 0.855*(-2.470725) = -1.212469875.
        let rewards = t2(&[&[1.0, 2.0, 3.0, 4.0], &[1.0, 2.0, 3.0, 4.0]]);
        let values = t2(&[&[10.0, 11.0, 12.0, 13.0], &[10.0, 11.0, 12.0, 13.0]]);
        let mask = t2(&[&[1.0, 1.0, 1.0, 1.0], &[1.0, 1.0, 0.0, 0.0]]);
        let (adv, ret) = gae(&rewards, &values, &mask, 0.9, 0.95).unwrap();
        let adv: Vec<Vec<f64>> = adv.to_vec2().unwrap();
        close(&adv[0], &[-1.212469875, -2.470725, -4.995, -9.0], 1e-9);
        // Row 1 ends after 2 tokens: A_1 = 2 - 11 = -9,
        // A_0 = (1 + 0.9 * 11 - 10) + 0.855 * -9 = -6.795; padding 0.
        close(&adv[1], &[-6.795, -9.0, 0.0, 0.0], 1e-9);
        let ret: Vec<Vec<f64>> = ret.to_vec2().unwrap();
        close(&ret[0], &[8.787530125, 8.529275, 7.005, 4.0], 1e-9);
        close(&ret[1], &[3.205, 2.0, 0.0, 0.0], 1e-9);
    }

    #[test]
    fn clipped_policy_loss_values_and_gradients_by_hand() {
        // ratios 1.5 (A = 1) and 0.5 (A = -1) are both clipped at 0.2:
        // max(-1.5, -1.2) = -1.2 and max(0.5, 0.8) = 0.8, mean -0.2, no gradient.
        let old = t2(&[&[0.0, 0.0]]);
        let adv = t2(&[&[1.0, -1.0]]);
        let mask = t2(&[&[1.0, 1.0]]);
        let new = Var::from_tensor(&t2(&[&[1.5f64.ln(), 0.5f64.ln()]])).unwrap();
        let pl = policy_loss(new.as_tensor(), &old, &adv, &mask, 0.2).unwrap();
        assert!((scalar(&pl.loss) + 0.2).abs() < 1e-12);
        assert_eq!(scalar(&pl.clipfrac), 1.0);
        let d = 1.5f64.ln().powi(2) + 0.5f64.ln().powi(2);
        assert!((scalar(&pl.approxkl) - 0.25 * d).abs() < 1e-12);
        let g = pl.loss.backward().unwrap();
        close(&values(g.get(new.as_tensor()).unwrap()), &[0.0, 0.0], 1e-12);
        // Inside the range (ratio 1.1, A = 2; ratio 1, A = -1): unclipped, and
        // the whole gradient -A * ratio / n flows (no 50/50 tie split).
        let new = Var::from_tensor(&t2(&[&[1.1f64.ln(), 0.0]])).unwrap();
        let adv = t2(&[&[2.0, -1.0]]);
        let pl = policy_loss(new.as_tensor(), &old, &adv, &mask, 0.2).unwrap();
        assert!((scalar(&pl.loss) - (-2.2 + 1.0) / 2.0).abs() < 1e-12);
        assert_eq!(scalar(&pl.clipfrac), 0.0);
        let g = pl.loss.backward().unwrap();
        close(
            &values(g.get(new.as_tensor()).unwrap()),
            &[-1.1, 0.5],
            1e-12,
        );
        // Padding is ignored: a huge ratio on a masked token changes nothing.
        let new = t2(&[&[1.1f64.ln(), 9.0]]);
        let half = t2(&[&[1.0, 0.0]]);
        let pl = policy_loss(&new, &old, &adv, &half, 0.2).unwrap();
        assert!((scalar(&pl.loss) + 2.2).abs() < 1e-12);
    }

    #[test]
    fn clipped_value_loss_values_and_gradients_by_hand() {
        // V 1.5 / 0.5 from V_old 1.0 with c = 0.2 -> clipped 1.2 / 0.8;
        // returns 2 / 0: (1.5-2)^2 = 0.25 < (1.2-2)^2 = 0.64, same on the
        // other side: 0.5 * mean(0.64, 0.64) = 0.32, all clipped.
        let old = t2(&[&[1.0, 1.0]]);
        let ret = t2(&[&[2.0, 0.0]]);
        let mask = t2(&[&[1.0, 1.0]]);
        let v = Var::from_tensor(&t2(&[&[1.5, 0.5]])).unwrap();
        let vl = value_loss(v.as_tensor(), &old, &ret, &mask, 0.2).unwrap();
        assert!((scalar(&vl.loss) - 0.32).abs() < 1e-12);
        assert_eq!(scalar(&vl.clipfrac), 1.0);
        let g = vl.loss.backward().unwrap();
        close(&values(g.get(v.as_tensor()).unwrap()), &[0.0, 0.0], 1e-12);
        // Inside the range: 0.5 * mean((1.1-2)^2, (1-0)^2), gradient (V - R) / n.
        let v = Var::from_tensor(&t2(&[&[1.1, 1.0]])).unwrap();
        let vl = value_loss(v.as_tensor(), &old, &ret, &mask, 0.2).unwrap();
        assert!((scalar(&vl.loss) - 0.5 * (0.81 + 1.0) / 2.0).abs() < 1e-12);
        assert_eq!(scalar(&vl.clipfrac), 0.0);
        let g = vl.loss.backward().unwrap();
        close(&values(g.get(v.as_tensor()).unwrap()), &[-0.45, 0.5], 1e-12);
    }

    #[test]
    fn entropy_and_token_logprobs_by_hand() {
        let logits = Tensor::new(
            &[[[0.0f64, 0.0, 0.0, 0.0], [1000.0, 0.0, 0.0, 0.0]]],
            &Device::Cpu,
        )
        .unwrap();
        let h = values(&entropy_from_logits(&logits).unwrap());
        close(&h, &[4f64.ln(), 0.0], 1e-12);
        let tokens = Tensor::new(&[[2u32, 0]], &Device::Cpu).unwrap();
        let lp = values(&token_logprobs(&logits, &tokens).unwrap());
        close(&lp, &[-(4f64.ln()), 0.0], 1e-12);
    }

    #[test]
    fn adaptive_kl_moves_toward_the_target_at_most_20_percent_per_horizon() {
        let mut kl = AdaptiveKl {
            value: 0.2,
            target: 6.0,
            horizon: 10000.0,
        };
        kl.update(12.0, 256); // error clipped to +0.2: x (1 + 0.2 * 256 / 10000)
        assert!((kl.value - 0.2 * 1.00512).abs() < 1e-15);
        let before = kl.value;
        kl.update(3.0, 100); // error -0.5 clipped to -0.2
        assert!((kl.value - before * (1.0 - 0.2 * 0.01)).abs() < 1e-15);
        kl.update(6.0, 100); // on target: unchanged
        assert!((kl.value - before * 0.998).abs() < 1e-15);
    }

    #[test]
    fn masked_mean_of_an_empty_mask_is_zero_not_nan() {
        let x = t2(&[&[1.0, 2.0], &[3.0, 4.0]]);
        let m = t2(&[&[1.0, 0.0], &[1.0, 1.0]]);
        close(&values(&masked_mean(&x, &m).unwrap()), &[8.0 / 3.0], 1e-12);
        let none = m.zeros_like().unwrap();
        assert_eq!(values(&masked_mean(&x, &none).unwrap()), vec![0.0]);
    }

    #[test]
    fn clipped_surrogate_by_hand() {
        // Ratios 1, 1.5, 0.5, 1.1 with advantages 1, 1, -1, -2; eps 0.2:
        // min(1, 1) = 1; min(1.5, 1.2) = 1.2 (high clip); min(-0.5, -0.8) =
        // -0.8 (low clip); min(-2.2, -2.2) = -2.2. The loss is the negation.
        let ratios = [1.0f64, 1.5, 0.5, 1.1];
        let lr = Var::new(&ratios.map(f64::ln)[..], &Device::Cpu).unwrap();
        let a = Tensor::new(&[1.0f64, 1.0, -1.0, -2.0], &Device::Cpu).unwrap();
        let s = clipped_surrogate(lr.as_tensor(), &a, 0.2, 0.2).unwrap();
        close(&values(&s.loss), &[-1.0, -1.2, 0.8, 2.2], 1e-12);
        assert_eq!(values(&s.low), vec![0.0, 0.0, 1.0, 0.0]);
        assert_eq!(values(&s.high), vec![0.0, 1.0, 0.0, 0.0]);
        // d/dlog_ratio of -ratio * A where unclipped: -1 and 2.2; 0 where clipped.
        let g = s.loss.sum_all().unwrap().backward().unwrap();
        close(&values(g.get(&lr).unwrap()), &[-1.0, 0.0, 0.0, 2.2], 1e-12);
        // An asymmetric range (DAPO's clip-higher): 1.5 is inside [0.8, 1.6].
        let s = clipped_surrogate(lr.as_tensor(), &a, 0.2, 0.6).unwrap();
        close(&values(&s.loss), &[-1.0, -1.5, 0.8, 2.2], 1e-12);
    }

    #[test]
    fn token_loss_reductions_by_hand() {
        use crate::config::GrpoLossType as L;
        let l = t2(&[&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]]);
        let m = t2(&[&[1.0, 1.0, 0.0], &[1.0, 0.0, 0.0]]);
        let r = |t| values(&reduce_token_loss(&l, &m, t, 4, 10.0).unwrap())[0];
        // grpo: (3/2 + 4/1) / 2; bnpo: 7 / 3; dr_grpo: 7 / (2 x 4); dapo: 7 / 10.
        close(&[r(L::Grpo)], &[2.75], 1e-12);
        close(&[r(L::Bnpo)], &[7.0 / 3.0], 1e-6);
        close(&[r(L::DrGrpo)], &[0.875], 1e-12);
        close(&[r(L::Dapo)], &[0.7], 1e-12);
        // GSPO's sequence weight: the mean log-ratio over real tokens.
        let lr = t2(&[&[0.2, 0.4, 9.0], &[-0.3, 9.0, 9.0]]);
        close(
            &values(&sequence_log_ratio(&lr, &m).unwrap()),
            &[0.3, -0.3],
            1e-12,
        );
    }
}
