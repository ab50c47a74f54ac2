//! The LM head and the token log-prob fused in row chunks, as Liger-Kernel's
//! fused linear cross-entropy: the (rows, vocabulary) logits are never held
//! whole. Each chunk's logits are made, read and dropped in the forward, and
//! made again in the backward (`kernels::recompute`). With Qwen's 151,936
//! words, 8 x 1,024 positions of f32 logits are 5 GB, and their gradient as
//! much again; a chunk holds about 64 MB.

use candle_core::{DType, Tensor, D};

use crate::kernels::recompute::{attach2, leaf};
use crate::Result;

/// Logits per chunk: about 2^24 (64 MB in f32), at least one row.
const CHUNK_LOGITS: usize = 1 << 24;

/// What the logits give per row, (N,) each: the label's log-prob and the
/// entropy (both with the graph), and with none whether the argmax is the
/// label (1 or 0), the mean logit, and WPO's log_denom.
pub struct TokenFigures {
    pub logps: Tensor,
    pub entropy: Tensor,
    pub correct: Tensor,
    pub mean_logit: Tensor,
    /// logsumexp(2 x) - 2 logsumexp(x) of the unscaled logits (DPO's `use_weighting`).
    pub log_denom: Option<Tensor>,
}

/// [`TokenFigures`] of logits (.., V) against `labels` (..) u32, with the
/// logits scaled by `scale` (1 / temperature) for the log-prob and entropy.
pub fn token_figures(
    logits: &Tensor,
    labels: &Tensor,
    scale: f64,
    weighting: bool,
) -> Result<TokenFigures> {
    let logits = logits.to_dtype(DType::F32)?;
    let plain = logits.detach();
    let [logps, entropy, correct, mean_logit] =
        match crate::kernels::token_figures_fused(&logits, labels, scale)? {
            Some(all) => all,
            None => {
                let (logps, entropy) = super::token_logprobs_and_entropy(&logits, labels, scale)?;
                [
                    logps,
                    entropy,
                    plain.argmax(D::Minus1)?.eq(labels)?.to_dtype(DType::F32)?,
                    plain.mean(D::Minus1)?,
                ]
            }
        };
    Ok(TokenFigures {
        logps,
        entropy,
        correct,
        mean_logit,
        log_denom: match weighting {
            true => {
                let lse = plain.log_sum_exp(D::Minus1)?;
                Some(((&plain * 2.0)?.log_sum_exp(D::Minus1)? - (lse * 2.0)?)?)
            }
            false => None,
        },
    })
}

/// [`TokenFigures`] of the head `weight` (V, E) over `hidden` (N, E)
/// against `labels` (N,) u32: the values of [`token_figures`] on
/// hidden x weight^T (cast to f32), with at most one chunk of logits alive.
pub fn head_figures(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    scale: f64,
    weighting: bool,
) -> Result<TokenFigures> {
    let rows = (CHUNK_LOGITS / weight.dim(0)?.max(1)).max(1);
    head_figures_in_chunks(hidden, weight, labels, (scale, weighting), rows)
}

/// The logits of `rows` hidden states, in f32.
fn chunk_logits(rows: &Tensor, weight: &Tensor) -> Result<Tensor> {
    Ok(crate::kernels::matmul_weight_t(rows, weight)?.to_dtype(DType::F32)?)
}

/// [`head_figures`] with `chunk` rows per chunk.
pub fn head_figures_in_chunks(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    (scale, weighting): (f64, bool),
    chunk: usize,
) -> Result<TokenFigures> {
    let n = hidden.dim(0)?;
    let spans: Vec<(usize, usize)> = (0..n)
        .step_by(chunk.max(1))
        .map(|s| (s, chunk.min(n - s)))
        .collect();
    // Forward: each chunk's logits and graph dropped before the next. The
    // inputs keep whether they record a graph, so that the kernels take
    // the paths the backward's recomputation takes.
    let (h, w) = (hidden.clone(), weight.clone());
    let mut parts: Vec<[Tensor; 5]> = Vec::with_capacity(spans.len());
    for &(start, len) in &spans {
        let z = chunk_logits(&h.narrow(0, start, len)?, &w)?;
        let f = token_figures(&z, &labels.narrow(0, start, len)?, scale, weighting)?;
        let denom = match f.log_denom {
            Some(d) => d,
            None => f.mean_logit.zeros_like()?,
        };
        parts.push([f.logps, f.entropy, f.correct, f.mean_logit, denom].map(|t| t.detach()));
    }
    let column = |i: usize| -> Result<Tensor> {
        let all: Vec<&Tensor> = parts.iter().map(|p| &p[i]).collect();
        Ok(match all.len() {
            0 => Tensor::zeros(0, DType::F32, hidden.device())?,
            _ => Tensor::cat(&all, 0)?,
        })
    };
    let value = Tensor::stack(&[column(0)?, column(1)?], 1)?;
    // Backward: each chunk's logits again, with a graph from the logits on
    // for as long as the chunk takes. The products of the chunk's logit
    // gradient dz are written out: dh = dz W, the same product the logits'
    // own backward takes, and dz^T h added straight into the head's
    // gradient, which with several micro-batches (or a tied embedding's
    // part before it) is the training backward's running sum: one
    // vocabulary-sized tensor, where the composed backward held three (the
    // sum, the chunk's product and their sum).
    let labels_b = labels.clone();
    let backward: crate::kernels::recompute::Backward2 = Box::new(move |h, w, grad| {
        use crate::kernels::{logprobs, product, recompute};
        let grad = grad.detach();
        let (h, w_plain) = (h.detach(), w.detach());
        let mut dw = match w.track_op() {
            true => Some(recompute::take_sum(w)),
            false => None,
        };
        let mut dh = Vec::with_capacity(spans.len());
        for &(start, len) in &spans {
            let rows = h.narrow(0, start, len)?;
            // The product the forward took for a hidden state that records a graph.
            let z = product::mm(&rows, &w_plain.t()?)?.to_dtype(DType::F32)?;
            let tokens = labels_b.narrow(0, start, len)?;
            let g = grad.narrow(0, start, len)?;
            // The logits' gradient, written over the logits on the CPU (one
            // chunk-sized tensor), else through the composed ops' backward.
            let dz = match logprobs::grad_in_place_applies(&z, &tokens, scale) {
                true => logprobs::logprob_entropy_grad_in_place(z, &tokens, &g, scale)
                    .map_err(candle_core::Error::wrap)?,
                false => {
                    let z = leaf(&z)?;
                    let (lp, ent) =
                        super::token_logprobs_and_entropy(z.as_tensor(), &tokens, scale)
                            .map_err(candle_core::Error::wrap)?;
                    let s = ((lp * g.narrow(1, 0, 1)?.squeeze(1)?)?.sum_all()?
                        + (ent * g.narrow(1, 1, 1)?.squeeze(1)?)?.sum_all()?)?;
                    match s.backward()?.get(z.as_tensor()) {
                        Some(g) => g.detach(),
                        None => z.zeros_like()?,
                    }
                }
            };
            let dz = dz.to_dtype(w_plain.dtype())?;
            dh.push(product::mm(&dz, &w_plain)?);
            if let Some(sum) = dw.as_mut() {
                *sum = Some(product::add_product(sum.take(), &dz.t()?, &rows)?);
            }
        }
        // A trained head's gradient goes to the training backward whole, where
        // a tied embedding's is added into it in place.
        let dw = match dw.flatten() {
            Some(g) => recompute::hand_over(w, g)?,
            None => None,
        };
        Ok((Some(Tensor::cat(&dh, 0)?), dw))
    });
    let both = attach2(hidden, weight, value, backward)?;
    Ok(TokenFigures {
        logps: both.narrow(1, 0, 1)?.squeeze(1)?,
        entropy: both.narrow(1, 1, 1)?.squeeze(1)?,
        correct: column(2)?,
        mean_logit: column(3)?,
        log_denom: match weighting {
            true => Some(column(4)?),
            false => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradients;
    use candle_core::{Device, Var};

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    /// Within the tolerance: max |a - b| <= 1e-5 x max |b|.
    fn close(what: &str, a: &Tensor, b: &Tensor) {
        let (d, s) = (max_abs(&(a - b).unwrap()), max_abs(b));
        assert!(
            d <= 1e-5 * s.max(1e-12),
            "{what}: differs by {d} (scale {s})"
        );
    }

    #[test]
    fn chunked_head_equals_the_composed_head_in_values_and_gradients() {
        let dev = Device::Cpu;
        let (n, e, v) = (7, 5, 11);
        let mut rng = crate::HostRng::new(4);
        let h =
            Var::from_tensor(&rng.normal_tensor((n, e), 1.0, DType::F32, &dev).unwrap()).unwrap();
        let w =
            Var::from_tensor(&rng.normal_tensor((v, e), 1.0, DType::F32, &dev).unwrap()).unwrap();
        let labels = Tensor::new(&[3u32, 0, 10, 7, 7, 1, 5], &dev).unwrap();
        // Weights of the loss on the log-probs and on the entropies.
        let (a, b) = (
            rng.normal_tensor(n, 1.0, DType::F32, &dev).unwrap(),
            rng.normal_tensor(n, 1.0, DType::F32, &dev).unwrap(),
        );
        let loss = |f: &TokenFigures| -> Tensor {
            ((&f.logps * &a).unwrap().sum_all().unwrap()
                + (&f.entropy * &b).unwrap().sum_all().unwrap())
            .unwrap()
        };
        for scale in [1.0, 1.0 / 0.7] {
            for frozen_head in [false, true] {
                let wt = match frozen_head {
                    true => w.as_tensor().detach(),
                    false => w.as_tensor().clone(),
                };
                let logits = crate::kernels::matmul_weight_t(h.as_tensor(), &wt).unwrap();
                let want = token_figures(&logits, &labels, scale, true).unwrap();
                let vars = [h.as_tensor(), w.as_tensor()];
                let want_g = gradients(&loss(&want), &vars).unwrap();
                for chunk in [1, 3, 7, 100] {
                    let got =
                        head_figures_in_chunks(h.as_tensor(), &wt, &labels, (scale, true), chunk)
                            .unwrap();
                    let what = format!("scale {scale}, frozen {frozen_head}, chunk {chunk}");
                    close(&format!("{what}: logps"), &got.logps, &want.logps);
                    close(&format!("{what}: entropy"), &got.entropy, &want.entropy);
                    close(&format!("{what}: mean"), &got.mean_logit, &want.mean_logit);
                    close(
                        &format!("{what}: log_denom"),
                        got.log_denom.as_ref().unwrap(),
                        want.log_denom.as_ref().unwrap(),
                    );
                    assert_eq!(
                        got.correct.to_vec1::<f32>().unwrap(),
                        want.correct.to_vec1::<f32>().unwrap()
                    );
                    let got_g = gradients(&loss(&got), &vars).unwrap();
                    close(
                        &format!("{what}: d hidden"),
                        got_g[0].as_ref().unwrap(),
                        want_g[0].as_ref().unwrap(),
                    );
                    match frozen_head {
                        true => assert!(got_g[1].is_none(), "{what}: a frozen head got a gradient"),
                        false => close(
                            &format!("{what}: d head"),
                            got_g[1].as_ref().unwrap(),
                            want_g[1].as_ref().unwrap(),
                        ),
                    }
                }
            }
        }
    }

    /// A tied table, the embedding's and the chunked head's: the gradient of
    /// each backward equals the composed ops', and with a step's sum handed
    /// in (gradient accumulation) both parts are added into that sum's own
    /// storage.
    #[test]
    fn a_tied_table_adds_its_head_and_embedding_gradients_into_the_step_sum_in_place() {
        let dev = Device::Cpu;
        let (v, e) = (11, 4);
        let mut rng = crate::HostRng::new(9);
        let table =
            Var::from_tensor(&rng.normal_tensor((v, e), 1.0, DType::F32, &dev).unwrap()).unwrap();
        let t = table.as_tensor();
        let batch = |ids: &[u32], labels: &[u32]| {
            (
                Tensor::new(ids, &dev).unwrap(),
                Tensor::new(labels, &dev).unwrap(),
            )
        };
        let chunked = |(ids, labels): &(Tensor, Tensor)| -> Tensor {
            let h = crate::kernels::embedding(t, ids).unwrap().tanh().unwrap();
            let f = head_figures_in_chunks(&h, t, labels, (1.0, false), 2).unwrap();
            (f.logps.sum_all().unwrap() + (f.entropy * 0.3).unwrap().sum_all().unwrap()).unwrap()
        };
        let composed = |(ids, labels): &(Tensor, Tensor)| -> Tensor {
            let h = t.index_select(ids, 0).unwrap().tanh().unwrap();
            let logits = h.matmul(&t.t().unwrap()).unwrap();
            let (lp, ent) = crate::rl::token_logprobs_and_entropy(&logits, labels, 1.0).unwrap();
            (lp.sum_all().unwrap() + (ent * 0.3).unwrap().sum_all().unwrap()).unwrap()
        };
        // A repeated id, and ids that are labels too.
        let a = batch(&[3, 0, 3, 9, 4], &[0, 3, 9, 4, 10]);
        let b = batch(&[7, 7, 1, 2, 5], &[7, 1, 2, 5, 6]);
        let one = |loss: Tensor| gradients(&loss, &[t]).unwrap()[0].clone().unwrap();
        for x in [&a, &b] {
            close("one backward", &one(chunked(x)), &one(composed(x)));
        }
        let want = (one(composed(&a)) + one(composed(&b))).unwrap();
        let first = one(chunked(&a));
        let held = first.clone();
        let sums = crate::kernels::recompute::gradients_into(&chunked(&b), &[t], vec![Some(first)]);
        let sum = sums.unwrap()[0].clone().unwrap();
        close("the step's sum", &sum, &want);
        assert_eq!(
            held.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            sum.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "the sum was not added into in place"
        );
    }
}
