//! DPO and its loss family, as TRL 1.12's `DPOTrainer._compute_loss`
//! computes them. Each `loss_type` is a pure function of what its formula
//! reads, per pair (B,): the policy's and the reference's summed completion
//! log-probs of chosen and rejected (their differences are the log-ratios),
//! the completion token counts (ipo, sigmoid_norm) and the chosen tokens'
//! mean NLL (sft). The loss is sum_k weight_k * mean(per-pair loss_k), each
//! pair's loss scaled by its WPO weight under `use_weighting`.
//!
//! Worked examples are in the tests below; `tests/it/dpo.rs` checks every
//! loss, its gradient and the metrics against goldens made by calling
//! TRL's own `_compute_loss` (scripts/make_golden_dpo.py).

use candle_core::Tensor;

use super::neg_logsigmoid;
use crate::config::{DpoConfig, DpoLossType, FDivergenceType};
use crate::Result;

/// The settings the losses read (DPOConfig's names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoHyper {
    pub beta: f64,
    pub label_smoothing: f64,
    pub f_divergence_type: FDivergenceType,
    pub f_alpha_divergence_coef: f64,
    pub discopop_tau: f64,
}

impl DpoHyper {
    pub fn of(cfg: &DpoConfig) -> Self {
        Self {
            beta: cfg.beta,
            label_smoothing: cfg.label_smoothing,
            f_divergence_type: cfg.f_divergence_type,
            f_alpha_divergence_coef: cfg.f_alpha_divergence_coef,
            discopop_tau: cfg.discopop_tau,
        }
    }
}

/// What the losses read, one entry per pair (B,), f32.
#[derive(Debug, Clone)]
pub struct PairLogps {
    /// Summed completion log-probs of the policy (LD-DPO-weighted with ld_alpha).
    pub chosen: Tensor,
    pub rejected: Tensor,
    /// The same of the reference (no graph).
    pub ref_chosen: Tensor,
    pub ref_rejected: Tensor,
    /// Completion token counts.
    pub chosen_tokens: Tensor,
    pub rejected_tokens: Tensor,
    /// sft: the mean NLL over every chosen completion token of the batch (a scalar).
    pub sft_nll: Option<Tensor>,
}

impl PairLogps {
    /// log(pi / pi_ref) of chosen and rejected.
    pub fn logratios(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            (&self.chosen - &self.ref_chosen)?,
            (&self.rejected - &self.ref_rejected)?,
        ))
    }
}

fn logsigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(neg_logsigmoid(x)?.neg()?)
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(logsigmoid(x)?.exp()?)
}

/// f-DPO's scores f'(pi / pi_ref), from log-ratios: reverse_kl the log-ratio
/// itself (DPO), forward_kl 1 - exp(-r), js_divergence log 2 + logsigmoid(r),
/// alpha_divergence (exp((a - 1) r) - 1) / (a - 1) with (a - 1) r clamped at
/// 80 (r itself when a is 1).
pub fn scores(logratios: &Tensor, f: FDivergenceType, alpha: f64) -> Result<Tensor> {
    Ok(match f {
        FDivergenceType::ReverseKl => logratios.clone(),
        FDivergenceType::ForwardKl => (logratios.neg()?.exp()?.neg()? + 1.0)?,
        FDivergenceType::JsDivergence => (logsigmoid(logratios)? + std::f64::consts::LN_2)?,
        FDivergenceType::AlphaDivergence if (alpha - 1.0).abs() < 1e-6 => logratios.clone(),
        FDivergenceType::AlphaDivergence => {
            let t = (logratios * (alpha - 1.0))?.minimum(80.0)?;
            ((t.exp()? - 1.0)? * (1.0 / (alpha - 1.0)))?
        }
    })
}

/// sigmoid (Rafailov et al., 2023): -logsigmoid(beta * delta).
pub fn sigmoid_loss(delta: &Tensor, beta: f64) -> Result<Tensor> {
    neg_logsigmoid(&(delta * beta)?)
}

/// hinge (SLiC, Zhao et al., 2023): relu(1 - beta * delta).
pub fn hinge(delta: &Tensor, beta: f64) -> Result<Tensor> {
    Ok(((delta * -beta)? + 1.0)?.relu()?)
}

/// Each side's score divided by its completion tokens (at least 1).
fn per_token(scores: &Tensor, tokens: &Tensor) -> Result<Tensor> {
    Ok((scores / tokens.maximum(1.0)?)?)
}

/// ipo (Azar et al., 2023, eq. 17), length-normalised as TRL does:
/// (c / n_c - r / n_r - 1 / (2 beta))^2.
pub fn ipo(c: &Tensor, r: &Tensor, n_c: &Tensor, n_r: &Tensor, beta: f64) -> Result<Tensor> {
    let delta = (per_token(c, n_c)? - per_token(r, n_r)?)?;
    Ok((delta - 1.0 / (2.0 * beta))?.sqr()?)
}

/// exo_pair (Ji et al., 2024, eq. 16): KL(q || p) over {chosen, rejected}
/// with q = softmax of beta * scores and p = (1 - eps, eps).
pub fn exo_pair(delta: &Tensor, beta: f64, eps: f64) -> Result<Tensor> {
    let x = (delta * beta)?;
    let (log_qw, log_ql) = (logsigmoid(&x)?, logsigmoid(&x.neg()?)?);
    let win = (log_qw.exp()? * (&log_qw - (-eps).ln_1p())?)?;
    let lose = (log_ql.exp()? * (&log_ql - eps.ln())?)?;
    Ok((win + lose)?)
}

/// nca_pair (Chen et al., 2024): -logsigmoid(beta c) - logsigmoid(-beta c) / 2
/// - logsigmoid(-beta r) / 2 on the log-ratios.
pub fn nca_pair(c: &Tensor, r: &Tensor, beta: f64) -> Result<Tensor> {
    let (c, r) = ((c * beta)?, (r * beta)?);
    let half = ((neg_logsigmoid(&c.neg()?)? + neg_logsigmoid(&r.neg()?)?)? * 0.5)?;
    Ok((neg_logsigmoid(&c)? + half)?)
}

/// robust (Chowdhury et al., 2024): the unbiased loss under label noise ls,
/// ((1 - ls) * -logsigmoid(x) - ls * -logsigmoid(-x)) / (1 - 2 ls), x = beta delta.
pub fn robust(delta: &Tensor, beta: f64, ls: f64) -> Result<Tensor> {
    let x = (delta * beta)?;
    let clean = (neg_logsigmoid(&x)? * (1.0 - ls))?;
    let flipped = (neg_logsigmoid(&x.neg()?)? * ls)?;
    Ok(((clean - flipped)? / (1.0 - 2.0 * ls))?)
}

/// bco_pair (Jung et al., 2024): -logsigmoid(beta c) - logsigmoid(-beta r).
pub fn bco_pair(c: &Tensor, r: &Tensor, beta: f64) -> Result<Tensor> {
    Ok((neg_logsigmoid(&(c * beta)?)? + neg_logsigmoid(&(r * -beta)?)?)?)
}

/// sppo_hard (Wu et al., 2024, hard labels): (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2.
pub fn sppo_hard(c: &Tensor, r: &Tensor, beta: f64) -> Result<Tensor> {
    let half = 0.5 / beta;
    Ok(((c - half)?.sqr()? + (r + half)?.sqr()?)?)
}

fn sorted(x: &Tensor) -> Result<Tensor> {
    let order = x.arg_sort_last_dim(true)?;
    Ok(x.index_select(&order, 0)?)
}

/// The cDPO form of both AOT losses: -logsigmoid(beta d)(1 - ls) - logsigmoid(-beta d) ls.
fn smoothed(d: &Tensor, beta: f64, ls: f64) -> Result<Tensor> {
    let x = (d * beta)?;
    Ok(((neg_logsigmoid(&x)? * (1.0 - ls))? + (neg_logsigmoid(&x.neg()?)? * ls)?)?)
}

/// aot (Melnyk et al., 2024): the policy's and the reference's
/// chosen-minus-rejected log-prob gaps, each sorted across the batch, paired
/// by rank.
pub fn aot(x: &PairLogps, beta: f64, ls: f64) -> Result<Tensor> {
    let gaps = (&x.chosen - &x.rejected)?;
    let ref_gaps = (&x.ref_chosen - &x.ref_rejected)?;
    smoothed(&(sorted(&gaps)? - sorted(&ref_gaps)?)?, beta, ls)
}

/// aot_unpaired: the chosen and the rejected log-ratios, each sorted across
/// the batch, paired by rank.
pub fn aot_unpaired(c: &Tensor, r: &Tensor, beta: f64, ls: f64) -> Result<Tensor> {
    smoothed(&(sorted(c)? - sorted(r)?)?, beta, ls)
}

/// apo_zero (D'Oosterlinck et al., 2024, eq. 7): 1 - sigmoid(beta c) + sigmoid(beta r).
pub fn apo_zero(c: &Tensor, r: &Tensor, beta: f64) -> Result<Tensor> {
    Ok(((sigmoid(&(c * beta)?)?.neg()? + 1.0)? + sigmoid(&(r * beta)?)?)?)
}

/// apo_down (eq. 8): sigmoid(beta c) + 1 - sigmoid(beta (c - r)).
pub fn apo_down(c: &Tensor, r: &Tensor, beta: f64) -> Result<Tensor> {
    let gap = sigmoid(&((c - r)? * beta)?)?;
    Ok((sigmoid(&(c * beta)?)? + (gap.neg()? + 1.0)?)?)
}

/// discopop (Chris Lu et al., 2024, eq. 5): with x = beta delta and
/// m = sigmoid(x / tau), -logsigmoid(x) (1 - m) + exp(-x) m.
pub fn discopop(delta: &Tensor, beta: f64, tau: f64) -> Result<Tensor> {
    let x = (delta * beta)?;
    let m = sigmoid(&(&x / tau)?)?;
    let logistic = (neg_logsigmoid(&x)? * (m.neg()? + 1.0)?)?;
    Ok((logistic + (x.neg()?.exp()? * m)?)?)
}

/// sigmoid_norm: sigmoid on the per-token scores, -logsigmoid(beta (c / n_c - r / n_r)).
pub fn sigmoid_norm(
    c: &Tensor,
    r: &Tensor,
    n_c: &Tensor,
    n_r: &Tensor,
    beta: f64,
) -> Result<Tensor> {
    sigmoid_loss(&(per_token(c, n_c)? - per_token(r, n_r)?)?, beta)
}

/// One loss type's per-pair loss (B,).
pub fn per_pair(t: DpoLossType, h: &DpoHyper, x: &PairLogps) -> Result<Tensor> {
    use DpoLossType::*;
    let (beta, ls) = (h.beta, h.label_smoothing);
    let (c_lr, r_lr) = x.logratios()?;
    let f = |lr: &Tensor| scores(lr, h.f_divergence_type, h.f_alpha_divergence_coef);
    let (c_s, r_s) = (f(&c_lr)?, f(&r_lr)?);
    let delta = (&c_s - &r_s)?;
    let (n_c, n_r) = (&x.chosen_tokens, &x.rejected_tokens);
    match t {
        Sigmoid => sigmoid_loss(&delta, beta),
        Hinge => hinge(&delta, beta),
        Ipo => ipo(&c_s, &r_s, n_c, n_r, beta),
        ExoPair => exo_pair(&delta, beta, ls),
        NcaPair => nca_pair(&c_lr, &r_lr, beta),
        Robust => robust(&delta, beta, ls),
        BcoPair => bco_pair(&c_lr, &r_lr, beta),
        SppoHard => sppo_hard(&c_lr, &r_lr, beta),
        Aot => aot(x, beta, ls),
        AotUnpaired => aot_unpaired(&c_lr, &r_lr, beta, ls),
        ApoZero => apo_zero(&c_lr, &r_lr, beta),
        ApoDown => apo_down(&c_lr, &r_lr, beta),
        Discopop => discopop(&delta, beta, h.discopop_tau),
        Sft => {
            let nll = x.sft_nll.as_ref().ok_or_else(|| {
                crate::Error::Msg("the sft loss needs the chosen tokens' NLL".into())
            })?;
            Ok(nll.broadcast_as(c_lr.shape())?)
        }
        SigmoidNorm => sigmoid_norm(&c_s, &r_s, n_c, n_r, beta),
    }
}

/// The loss: sum over `losses` of weight * mean(per-pair loss), each pair's
/// loss scaled by its WPO weight when `wpo` is given.
pub fn dpo_loss(
    losses: &[(DpoLossType, f64)],
    h: &DpoHyper,
    x: &PairLogps,
    wpo: Option<&Tensor>,
) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for &(t, weight) in losses {
        let mut l = per_pair(t, h, x)?;
        if let Some(w) = wpo {
            l = (l * w)?;
        }
        let term = (l.mean_all()? * weight)?;
        total = Some(match total {
            None => term,
            Some(acc) => (acc + term)?,
        });
    }
    total.ok_or_else(|| crate::Error::Msg("dpo.loss_type is empty".into()))
}

/// WPO's pair weights (Zhou et al., 2024, eq. 2), no graph: per sequence
/// w = exp(mean over its completion tokens of (logp - log_denom)), log_denom =
/// logsumexp(2 logits) - 2 logsumexp(logits); a pair weighs w_chosen * w_rejected.
/// Tokens (N,); `member` (2B, N) is 1 where a token is one of a sequence's,
/// chosen sequences first.
pub fn wpo_weights(token_logps: &Tensor, log_denom: &Tensor, member: &Tensor) -> Result<Tensor> {
    let aligned = (token_logps.detach() - log_denom.detach())?;
    let sums = member.matmul(&aligned.unsqueeze(1)?)?.squeeze(1)?;
    let w = (sums / member.sum(1)?.maximum(1.0)?)?.exp()?;
    let b = w.dim(0)? / 2;
    Ok((w.narrow(0, 0, b)? * w.narrow(0, b, b)?)?)
}

/// Per-token weights of the summed log-probs over the completion masks
/// `mask` (2B rows, chosen then rejected): 1 on completion tokens, and with
/// LD-DPO's `ld_alpha`, ld_alpha on the tokens past the shorter completion
/// of the pair (TRL's shared and tail masks).
pub fn ld_weights(mask: &[Vec<f32>], ld_alpha: Option<f64>) -> Vec<Vec<f32>> {
    let Some(alpha) = ld_alpha else {
        return mask.to_vec();
    };
    let b = mask.len() / 2;
    let count = |row: &Vec<f32>| row.iter().filter(|&&m| m > 0.0).count();
    mask.iter()
        .enumerate()
        .map(|(i, row)| {
            let shared = count(&mask[i % b]).min(count(&mask[i % b + b]));
            let mut seen = 0;
            row.iter()
                .map(|&m| {
                    if m == 0.0 {
                        return 0.0;
                    }
                    seen += 1;
                    if seen <= shared {
                        1.0
                    } else {
                        alpha as f32
                    }
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn close(a: &Tensor, want: &[f64]) {
        let a: Vec<f32> = a.to_vec1().unwrap();
        for (x, w) in a.iter().zip(want) {
            assert!((*x as f64 - w).abs() < 1e-5, "{a:?} vs {want:?}");
        }
    }

    /// One pair: policy log-probs (-3, -5), reference (-4, -4), so the
    /// log-ratios are c = 1, r = -1 and delta = 2; 2 and 4 completion tokens.
    fn pair() -> PairLogps {
        PairLogps {
            chosen: t(&[-3.0]),
            rejected: t(&[-5.0]),
            ref_chosen: t(&[-4.0]),
            ref_rejected: t(&[-4.0]),
            chosen_tokens: t(&[2.0]),
            rejected_tokens: t(&[4.0]),
            sft_nll: Some(Tensor::new(0.7f32, &Device::Cpu).unwrap()),
        }
    }

    fn hyper(beta: f64, ls: f64) -> DpoHyper {
        DpoHyper {
            beta,
            label_smoothing: ls,
            f_divergence_type: FDivergenceType::ReverseKl,
            f_alpha_divergence_coef: 0.5,
            discopop_tau: 0.05,
        }
    }

    #[test]
    fn each_loss_on_a_worked_pair() {
        // beta 0.5: beta*delta = 1, beta*c = 0.5, beta*r = -0.5.
        // -logsigmoid(1) = ln(1 + e^-1) = 0.3132617; -logsigmoid(-1) = 1.3132617.
        // -logsigmoid(0.5) = 0.4740770, -logsigmoid(-0.5) = 0.9740770.
        // sigmoid(0.5) = 0.6224593, sigmoid(1) = 0.7310586.
        let x = pair();
        let h = hyper(0.5, 0.0);
        use DpoLossType::*;
        let cases: [(DpoLossType, f64); 12] = [
            (Sigmoid, 0.3132617),
            (Hinge, 0.0),
            // c/2 - r/4 = 0.5 + 0.25 = 0.75; (0.75 - 1)^2.
            (Ipo, 0.0625),
            // 0.4740770 + (0.9740770 + 0.4740770) / 2
            (NcaPair, 1.1981540),
            // 0.4740770 + 0.4740770
            (BcoPair, 0.9481540),
            // (1 - 1)^2 + (-1 + 1)^2
            (SppoHard, 0.0),
            // 1 - 0.6224593 + (1 - 0.6224593)
            (ApoZero, 0.7550813),
            // 0.6224593 + 1 - 0.7310586
            (ApoDown, 0.8914007),
            (Sft, 0.7),
            // -logsigmoid(0.5 * 0.75) = ln(1 + e^-0.375)
            (SigmoidNorm, 0.5231233),
            // one pair: sorting changes nothing, aot = sigmoid on (c - r) - (rc - rr) = 2.
            (Aot, 0.3132617),
            (AotUnpaired, 0.3132617),
        ];
        for (kind, want) in cases {
            close(&per_pair(kind, &h, &x).unwrap(), &[want]);
        }
        // discopop, tau 0.05: m = sigmoid(20) = 0.99999999794; the exp part e^-1 = 0.3678794.
        let m = 1.0 / (1.0 + (-20f64).exp());
        close(
            &per_pair(Discopop, &h, &x).unwrap(),
            &[0.3132617 * (1.0 - m) + 0.3678794 * m],
        );
        // robust, ls 0.1: (0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8 = 0.1882617.
        close(
            &per_pair(Robust, &hyper(0.5, 0.1), &x).unwrap(),
            &[0.1882617],
        );
        // exo_pair, eps 0.1: q = (0.7310586, 0.2689414);
        // 0.7310586 (ln 0.7310586 - ln 0.9) + 0.2689414 (ln 0.2689414 - ln 0.1) = 0.1140821.
        close(
            &per_pair(ExoPair, &hyper(0.5, 0.1), &x).unwrap(),
            &[0.1140821],
        );
    }

    #[test]
    fn f_divergence_scores() {
        let r = t(&[1.0, -1.0]);
        let s = |f| scores(&r, f, 0.5).unwrap();
        close(&s(FDivergenceType::ReverseKl), &[1.0, -1.0]);
        // 1 - e^-1, 1 - e
        close(&s(FDivergenceType::ForwardKl), &[0.6321206, -1.7182818]);
        // ln 2 + logsigmoid(1), ln 2 + logsigmoid(-1)
        close(&s(FDivergenceType::JsDivergence), &[0.3798854, -0.6201146]);
        // (e^-0.5 - 1) / -0.5, (e^0.5 - 1) / -0.5
        close(
            &s(FDivergenceType::AlphaDivergence),
            &[0.7869387, -1.2974425],
        );
        close(
            &scores(&r, FDivergenceType::AlphaDivergence, 1.0).unwrap(),
            &[1.0, -1.0],
        );
    }

    #[test]
    fn aot_pairs_by_rank_across_the_batch() {
        // Gaps c - r: (2, -1); reference gaps (0, 1). Sorted: (-1, 2) and
        // (0, 1): deltas (-1, 1), so beta 1 gives -logsigmoid(-1), -logsigmoid(1).
        let x = PairLogps {
            chosen: t(&[0.0, -1.0]),
            rejected: t(&[-2.0, 0.0]),
            ref_chosen: t(&[0.0, 0.0]),
            ref_rejected: t(&[0.0, -1.0]),
            ..pair()
        };
        close(
            &per_pair(DpoLossType::Aot, &hyper(1.0, 0.0), &x).unwrap(),
            &[1.3132617, 0.3132617],
        );
        // Log-ratios c = (0, -1), r = (-2, 1); sorted (-1, 0) and (-2, 1): deltas (1, -1).
        close(
            &per_pair(DpoLossType::AotUnpaired, &hyper(1.0, 0.0), &x).unwrap(),
            &[0.3132617, 1.3132617],
        );
    }

    #[test]
    fn weighted_sum_of_losses_and_wpo() {
        let x = pair();
        let h = hyper(0.5, 0.0);
        let losses = [(DpoLossType::Sigmoid, 1.0), (DpoLossType::Sft, 0.5)];
        let l = dpo_loss(&losses, &h, &x, None).unwrap();
        assert!((l.to_scalar::<f32>().unwrap() - (0.3132617 + 0.35) as f32).abs() < 1e-6);
        let w = t(&[0.5]);
        let l = dpo_loss(&losses, &h, &x, Some(&w)).unwrap();
        assert!((l.to_scalar::<f32>().unwrap() - (0.3132617 + 0.35) as f32 * 0.5).abs() < 1e-6);
        // WPO: one pair; tokens (-1, -1, 0) with log_denom 0: chosen has the first
        // two (mean -1 -> w = e^-1), rejected the third (w = e^0 = 1).
        let logps = t(&[-1.0, -1.0, 0.0]);
        let denom = logps.zeros_like().unwrap();
        let member = Tensor::new(&[[1f32, 1.0, 0.0], [0.0, 0.0, 1.0]], &Device::Cpu).unwrap();
        close(
            &wpo_weights(&logps, &denom, &member).unwrap(),
            &[(-1f64).exp()],
        );
    }

    #[test]
    fn ld_alpha_weighs_the_longer_tail() {
        // Pair: chosen has 3 completion tokens, rejected 1 (after a prompt token).
        let mask = vec![vec![0.0, 1.0, 1.0, 1.0], vec![0.0, 1.0, 0.0, 0.0]];
        assert_eq!(ld_weights(&mask, None), mask);
        assert_eq!(
            ld_weights(&mask, Some(0.5)),
            vec![vec![0.0, 1.0, 0.5, 0.5], vec![0.0, 1.0, 0.0, 0.0]]
        );
    }
}
