//! Token log-probabilities and entropy of logits, in one pass each way.

use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result as CResult, Shape, Tensor, D,
};

use super::fast_math::{self, wide_simd_fn, LANES};
use super::{f32_data, for_pieces_costing, fused_path, u32_data};
use crate::Result;

/// Per row of `logits` (.., V) scaled by `scale` (1 / temperature): the
/// log-probability of the row's token in `tokens` (..) u32, and the entropy
/// of the row's softmax; both (..), with a backward through the logits.
/// None where the kernel does not apply (not the CPU in f32, scale <= 0):
/// the caller then composes the ops (`rl::token_logprobs_and_entropy` does).
///
/// The composed version makes a dozen (.., V) tensors forward and as many
/// backward: with GPT-2's 50,257-word vocabulary, hundreds of megabytes per
/// micro-batch. This reads the logits twice forward and three times
/// backward, and writes only the (.., V) gradient.
pub fn token_logprobs_and_entropy_fused(
    logits: &Tensor,
    tokens: &Tensor,
    scale: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    let Some(columns) = per_row(logits, tokens, scale, false)? else {
        return Ok(None);
    };
    Ok(Some((
        column(&columns, 0, tokens)?,
        column(&columns, 1, tokens)?,
    )))
}

/// [`token_logprobs_and_entropy_fused`] and, from the same reads of each
/// row, what the metrics take from the unscaled logits: whether the row's
/// argmax is its token (1 or 0) and the row's mean logit, both without a
/// graph. None where the kernel does not apply, as there. Composing
/// `argmax` and `mean` over a 151,936-word row costs twice the fused
/// log-probs themselves.
pub fn token_figures_fused(
    logits: &Tensor,
    tokens: &Tensor,
    scale: f64,
) -> Result<Option<[Tensor; 4]>> {
    let Some(columns) = per_row(logits, tokens, scale, true)? else {
        return Ok(None);
    };
    Ok(Some([
        column(&columns, 0, tokens)?,
        column(&columns, 1, tokens)?,
        column(&columns, 2, tokens)?.detach(),
        column(&columns, 3, tokens)?.detach(),
    ]))
}

/// The op's (N, 2 or 4) columns over the logits as (N, V) rows, or None
/// where the kernel does not apply.
fn per_row(logits: &Tensor, tokens: &Tensor, scale: f64, figures: bool) -> Result<Option<Tensor>> {
    // The kernel takes the row maximum before scaling, so it needs scale > 0
    // (a temperature is positive; the composed path takes any scale).
    let fused = fused_path(&[logits]) && scale > 0.0;
    if !(fused && tokens.dtype() == DType::U32 && tokens.device().is_cpu()) {
        return Ok(None);
    }
    let v = logits.dim(D::Minus1)?;
    let rows = logits.contiguous()?.reshape(((), v))?;
    let op = LogprobEntropy {
        scale: scale as f32,
        figures,
    };
    Ok(Some(
        rows.apply_op2(&tokens.flatten_all()?.contiguous()?, op)?,
    ))
}

/// Column `i` of the op's output in the tokens' shape.
fn column(columns: &Tensor, i: usize, tokens: &Tensor) -> Result<Tensor> {
    Ok(columns.narrow(1, i, 1)?.reshape(tokens.shape())?)
}

/// Per row: log-prob and entropy, and with `figures` whether the argmax is
/// the token and the mean logit (columns 2 and 3, which take no gradient).
struct LogprobEntropy {
    scale: f32,
    figures: bool,
}

/// The (N, V) logits and N tokens of the op, checked.
fn logits_and_tokens<'a>(
    op: &str,
    logits: (&'a CpuStorage, &Layout),
    tokens: (&'a CpuStorage, &Layout),
) -> CResult<(&'a [f32], &'a [u32], usize)> {
    let x = f32_data(logits.0, logits.1, op)?;
    let t = u32_data(tokens.0, tokens.1, op)?;
    let (n, v) = logits.1.shape().dims2()?;
    if t.len() != n || v == 0 {
        bail!("{op}: {n} rows of logits but {} tokens", t.len())
    }
    if let Some(&bad) = t.iter().find(|&&tok| tok as usize >= v) {
        bail!("{op}: token {bad} is outside the vocabulary of {v}")
    }
    Ok((x, t, v))
}

impl CustomOp2 for LogprobEntropy {
    fn name(&self) -> &'static str {
        "fused-logprob-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, tokens, v) = logits_and_tokens(self.name(), (s1, l1), (s2, l2))?;
        let n = tokens.len();
        let width = if self.figures { 4 } else { 2 };
        let mut out = vec![0f32; width * n];
        for_pieces_costing(&mut out, width, n * v, |i, o| {
            let row = &x[i * v..(i + 1) * v];
            let token = tokens[i] as usize;
            let st = match self.figures {
                false => row_softmax_stats(row, self.scale, None),
                true => {
                    let (max, sum) = row_max_and_sum(row);
                    // The first position of the maximum, as Candle's
                    // `argmax`; a row with a NaN (its sum is NaN) takes
                    // Candle's scan itself, which a NaN stops moving.
                    let argmax = match sum.is_nan() {
                        false => row.iter().position(|&l| l == max).unwrap_or(0),
                        true => (1..v).fold(0, |best, j| match row[best] < row[j] {
                            true => j,
                            false => best,
                        }),
                    };
                    o[2] = (argmax == token) as u8 as f32;
                    o[3] = sum / v as f32;
                    row_softmax_stats(row, self.scale, Some(max))
                }
            };
            o[0] = self.scale * row[token] - st.lse;
            o[1] = st.entropy;
        });
        Ok((CpuStorage::F32(out), Shape::from((n, width))))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        tokens: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        // The figures' columns take no gradient.
        let grad = grad.narrow(1, 0, 2)?.contiguous()?;
        let dx =
            logits.apply_op3_no_bwd(tokens, &grad, &LogprobEntropyGrad { scale: self.scale })?;
        Ok((Some(dx), None))
    }
}

/// (logits, tokens, d[logp, entropy]) -> d logits, with p = softmax(s l),
/// log p_j = s l_j - lse and H = -sum p log p:
/// d logp / d l_j = s (1[j = token] - p_j), dH / d l_j = -s p_j (log p_j + H).
struct LogprobEntropyGrad {
    scale: f32,
}

impl CustomOp3 for LogprobEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-logprob-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, tokens, v) = logits_and_tokens(self.name(), (s1, l1), (s2, l2))?;
        let g = f32_data(s3, l3, self.name())?;
        let n = tokens.len();
        // A copy of the logits (instead of a zeroed buffer), each row then
        // replaced by its gradient.
        let mut out = x.to_vec();
        for_pieces_costing(&mut out, v, 3 * n * v, |i, o| {
            let st = row_softmax_stats(o, self.scale, None);
            grad_row(o, self.scale, st, (g[2 * i], g[2 * i + 1]), tokens[i]);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Whether [`logprob_entropy_grad_in_place`] applies: f32 logits (N, V) on
/// the CPU, contiguous, a positive scale, u32 tokens.
pub(crate) fn grad_in_place_applies(logits: &Tensor, tokens: &Tensor, scale: f64) -> bool {
    fused_path(&[logits])
        && scale > 0.0
        && logits.rank() == 2
        && logits.is_contiguous()
        && tokens.dtype() == DType::U32
        && tokens.device().is_cpu()
}

/// [`token_logprobs_and_entropy_fused`]'s backward written over the
/// logits, where [`grad_in_place_applies`]: `logits` (N, V), held by the
/// caller alone, become d[logp, entropy] / d logits for the upstream
/// gradient `grad` (N, 2), the same values as the op's backward. The
/// chunked LM head's backward then holds one chunk of logits, not the
/// logits and their gradient.
pub(crate) fn logprob_entropy_grad_in_place(
    logits: Tensor,
    tokens: &Tensor,
    grad: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if !(grad_in_place_applies(&logits, tokens, scale) && fused_path(&[grad])) {
        return Err(crate::Error::Msg(
            "the in-place log-prob gradient takes f32 CPU logits, u32 tokens and a positive scale"
                .into(),
        ));
    }
    let op = LogprobEntropyGradInPlace {
        scale: scale as f32,
    };
    logits.inplace_op3(&tokens.contiguous()?, &grad.contiguous()?, &op)?;
    Ok(logits)
}

struct LogprobEntropyGradInPlace {
    scale: f32,
}

impl candle_core::InplaceOp3 for LogprobEntropyGradInPlace {
    fn name(&self) -> &'static str {
        "fused-logprob-entropy-grad-in-place"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<()> {
        let name = self.name();
        let (n, v) = l1.shape().dims2()?;
        let (CpuStorage::F32(x), Some((start, end))) = (s1, l1.contiguous_offsets()) else {
            bail!("{name}: contiguous f32 logits only")
        };
        let (tokens, g) = (u32_data(s2, l2, name)?, f32_data(s3, l3, name)?);
        if tokens.len() != n || g.len() != 2 * n || v == 0 {
            bail!(
                "{name}: {n} rows of logits, {} tokens, {} gradients",
                tokens.len(),
                g.len()
            )
        }
        if let Some(&bad) = tokens.iter().find(|&&tok| tok as usize >= v) {
            bail!("{name}: token {bad} is outside the vocabulary of {v}")
        }
        for_pieces_costing(&mut x[start..end], v, 3 * n * v, |i, row| {
            let st = row_softmax_stats(row, self.scale, None);
            grad_row(row, self.scale, st, (g[2 * i], g[2 * i + 1]), tokens[i]);
        });
        Ok(())
    }
}

/// One row's logits, replaced by their gradient.
fn grad_row(
    row: &mut [f32],
    scale: f32,
    st: SoftmaxStats,
    (g_logp, g_entropy): (f32, f32),
    token: u32,
) {
    logprob_entropy_grad_row(row, scale, st, g_logp, g_entropy);
    row[token as usize] += scale * g_logp;
}

/// Of the softmax of s * row: log-sum-exp and entropy.
#[derive(Clone, Copy)]
struct SoftmaxStats {
    lse: f32,
    entropy: f32,
}

wide_simd_fn! {
    /// The row's maximum and sum in one pass.
    fn row_max_and_sum(row: &[f32]) -> (f32, f32) {
        let (mut max, mut sum) = ([f32::NEG_INFINITY; LANES], [0f32; LANES]);
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for k in 0..LANES {
                max[k] = max[k].max(c[k]);
                sum[k] += c[k];
            }
        }
        let m = tail.iter().chain(&max).fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        (m, sum.iter().sum::<f32>() + tail.iter().sum::<f32>())
    }
}

wide_simd_fn! {
    /// Two passes over the row: its maximum (unless given), then sum(e) and
    /// sum(e z) with z = s l - max and e = exp(z); lse = max + ln sum(e),
    /// H = ln sum(e) - sum(e z) / sum(e).
    fn row_softmax_stats(row: &[f32], scale: f32, max: Option<f32>) -> SoftmaxStats {
        // scale > 0 (checked by the caller), so the maximum of s l is s max(l).
        let m = scale * max.unwrap_or_else(|| fast_math::max(row));
        let (mut sum, mut sum_ez) = ([0f32; LANES], [0f32; LANES]);
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for k in 0..LANES {
                let z = scale * c[k] - m;
                let e = fast_math::exp(z);
                sum[k] += e;
                sum_ez[k] += e * z;
            }
        }
        let (mut s, mut sez) = (sum.iter().sum::<f32>(), sum_ez.iter().sum::<f32>());
        for &l in tail {
            let z = scale * l - m;
            let e = fast_math::exp(z);
            s += e;
            sez += e * z;
        }
        let log_sum = s.ln();
        SoftmaxStats {
            lse: m + log_sum,
            entropy: log_sum - sez / s,
        }
    }
}

wide_simd_fn! {
    /// l_j -> s (-g_logp p_j - g_entropy p_j (log p_j + H)), in place; the
    /// caller adds s g_logp at the token.
    fn logprob_entropy_grad_row(
        row: &mut [f32],
        scale: f32,
        st: SoftmaxStats,
        g_logp: f32,
        g_entropy: f32,
    ) {
        for o in row.iter_mut() {
            let logp = scale * *o - st.lse;
            let p = fast_math::exp(logp);
            *o = -scale * p * (g_logp + g_entropy * (logp + st.entropy));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::{Device, Var};

    #[test]
    fn token_figures_equal_the_fused_log_probs_and_the_composed_argmax_and_mean() {
        // 3 x 40 logits (lanes and a tail); row 1's token is its argmax.
        let logits = Var::from_tensor(&seeded(&[3, 40], 7, 3.0)).unwrap();
        let row1: Vec<f32> = logits.as_tensor().get(1).unwrap().to_vec1().unwrap();
        let best = (0..40).fold(0, |b, j| if row1[j] > row1[b] { j } else { b }) as u32;
        let tokens = Tensor::new(&[5u32, best, 39], &Device::Cpu).unwrap();
        let x = logits.as_tensor();
        let [lp, ent, correct, mean] = token_figures_fused(x, &tokens, 0.5).unwrap().unwrap();
        let (lp0, ent0) = token_logprobs_and_entropy_fused(x, &tokens, 0.5)
            .unwrap()
            .unwrap();
        // The same log-probs and entropies, bit for bit.
        assert_eq!(max_diff(&lp, &lp0), 0.0);
        assert_eq!(max_diff(&ent, &ent0), 0.0);
        let composed = x.argmax(D::Minus1).unwrap().eq(&tokens).unwrap();
        let composed = composed.to_dtype(DType::F32).unwrap();
        assert_eq!(correct.to_vec1::<f32>().unwrap(), vec![0.0, 1.0, 0.0]);
        assert_eq!(max_diff(&correct, &composed), 0.0);
        let m = x.mean(D::Minus1).unwrap();
        assert!(
            max_diff(&mean, &m) <= 1e-6 * max_abs(&m).max(1e-3),
            "{}",
            max_diff(&mean, &m)
        );
        assert!(!correct.track_op() && !mean.track_op());
        // Rows with a NaN: whether the argmax is the token, as Candle's argmax.
        let nan = f32::NAN;
        let rows = Tensor::new(
            &[
                [nan, 1.0, 2.0],
                [nan, 1.0, 2.0],
                [0.5, nan, 2.0],
                [nan, nan, nan],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let tokens = Tensor::new(&[0u32, 2, 2, 0], &Device::Cpu).unwrap();
        let [_, _, correct, _] = token_figures_fused(&rows, &tokens, 1.0).unwrap().unwrap();
        let composed = rows.argmax(D::Minus1).unwrap().eq(&tokens).unwrap();
        assert_eq!(
            correct.to_vec1::<f32>().unwrap(),
            composed
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        // Gradients through the log-probs and entropies only, as the pair's.
        let probe = seeded(&[3], 11, 1.0);
        let grad = |a: &Tensor, b: &Tensor| {
            let s = ((a * &probe).unwrap().sum_all().unwrap() + b.sum_all().unwrap()).unwrap();
            s.backward().unwrap().get(x).unwrap().clone()
        };
        assert_eq!(max_diff(&grad(&lp, &ent), &grad(&lp0, &ent0)), 0.0);
    }

    #[test]
    fn token_logprobs_and_entropy_reject_a_token_outside_the_vocabulary() {
        let logits = seeded(&[2, 5], 23, 1.0);
        let tokens = Tensor::new(&[1u32, 5], &Device::Cpu).unwrap();
        let err = token_logprobs_and_entropy_fused(&logits, &tokens, 1.0).unwrap_err();
        assert!(
            err.to_string()
                .contains("token 5 is outside the vocabulary of 5"),
            "{err}"
        );
    }

    /// The gradient written over the logits equals the op's backward bit
    /// for bit; a token outside the vocabulary is an error.
    #[test]
    fn the_gradient_written_over_the_logits_equals_the_ops_backward() {
        let (n, v) = (5, 300);
        let logits = Var::from_tensor(&seeded(&[n, v], 31, 3.0)).unwrap();
        let tokens = Tensor::new(&[0u32, 299, 7, 7, 150], &Device::Cpu).unwrap();
        let up = seeded(&[n, 2], 32, 1.0);
        for scale in [1.0, 1.0 / 0.7] {
            let (lp, ent) = token_logprobs_and_entropy_fused(logits.as_tensor(), &tokens, scale)
                .unwrap()
                .unwrap();
            let loss = ((lp * up.narrow(1, 0, 1).unwrap().squeeze(1).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                + (ent * up.narrow(1, 1, 1).unwrap().squeeze(1).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap())
            .unwrap();
            let want = loss.backward().unwrap().get(&logits).unwrap().clone();
            let z = logits.as_tensor().copy().unwrap();
            assert!(grad_in_place_applies(&z, &tokens, scale));
            let got = logprob_entropy_grad_in_place(z, &tokens, &up, scale).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v.iter().map(|f| f.to_bits()).collect()
            };
            assert_eq!(bits(&got), bits(&want), "scale {scale}");
        }
        let bad = Tensor::new(&[0u32, 300, 1, 2, 3], &Device::Cpu).unwrap();
        let z = logits.as_tensor().copy().unwrap();
        let err = logprob_entropy_grad_in_place(z, &bad, &up, 1.0).unwrap_err();
        assert!(
            err.to_string()
                .contains("token 300 is outside the vocabulary of 300"),
            "{err}"
        );
    }
}
