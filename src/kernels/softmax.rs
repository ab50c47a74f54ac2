//! The attention softmax with the scale and the additive mask folded in.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result as CResult, Shape, Tensor, D};

use super::fast_math::{self, wide_simd_fn};
use super::{f32_data, for_pieces, fused_path, tracks_grad};
use crate::Result;

/// softmax(scores * scale + bias) over the last dimension, for attention:
/// scores (B, H, T, L), bias (B or 1, 1, T, L) — the additive mask of
/// [`crate::models::attention_bias`], which takes no gradient.
pub fn masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    if fused_path(&[scores, bias]) && scores.rank() == 4 && bias.rank() == 4 {
        let (b, _, t, l) = scores.dims4()?;
        let (bb, bh, bt, bl) = bias.dims4()?;
        if (bb == b || bb == 1) && bh == 1 && bt == t && bl == l {
            let scores = scores.contiguous()?;
            let bias = bias.contiguous()?;
            return Ok(scores.apply_op2(
                &bias,
                MaskedSoftmax {
                    scale: scale as f32,
                },
            )?);
        }
    }
    // bf16/f16 scores are normalized in f32 (as transformers' eager Llama
    // attention does): a bf16 sum over hundreds of keys loses the small ones.
    let dtype = scores.dtype();
    let x = (scores * scale)?
        .broadcast_add(bias)?
        .to_dtype(DType::F32)?;
    let p = if tracks_grad(&[scores]) {
        candle_nn::ops::softmax(&x, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&x)?
    };
    Ok(p.to_dtype(dtype)?)
}

struct MaskedSoftmax {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, self.name())?;
        let bias = f32_data(s2, l2, self.name())?;
        let (_, h, t, l) = l1.shape().dims4()?;
        let bias_batch = l2.dims()[0];
        let mut out = vec![0f32; x.len()];
        for_pieces(&mut out, l, |r, o| {
            // Row r is (batch, head, query); its mask row is (batch, query).
            let batch = if bias_batch == 1 { 0 } else { r / (h * t) };
            let m = &bias[(batch * t + r % t) * l..][..l];
            softmax_row(&x[r * l..(r + 1) * l], m, self.scale, o)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let dx = res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad { scale: self.scale })?;
        Ok((Some(dx), None))
    }
}

wide_simd_fn! {
    pub(super) fn softmax_row(row: &[f32], mask: &[f32], scale: f32, out: &mut [f32]) {
        for j in 0..row.len() {
            out[j] = row[j] * scale + mask[j];
        }
        let max = fast_math::max(out);
        out.iter_mut().for_each(|v| *v = fast_math::exp(*v - max));
        let inv = 1.0 / fast_math::sum_by(out, |v| v);
        out.iter_mut().for_each(|v| *v *= inv);
    }
}

/// (y, dy) -> scale * y * (dy - sum(dy * y)) per row of the last dimension.
struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let y = f32_data(s1, l1, self.name())?;
        let dy = f32_data(s2, l2, self.name())?;
        let l = *l1.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; y.len()];
        for_pieces(&mut out, l, |r, o| {
            softmax_grad_row(
                &y[r * l..(r + 1) * l],
                &dy[r * l..(r + 1) * l],
                self.scale,
                o,
            )
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

wide_simd_fn! {
    pub(super) fn softmax_grad_row(y: &[f32], dy: &[f32], scale: f32, out: &mut [f32]) {
        let dot = fast_math::sum_by2(y, dy, |a, b| a * b);
        for j in 0..y.len() {
            out[j] = scale * y[j] * (dy[j] - dot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::{Device, Var};

    #[test]
    fn masked_softmax_matches_the_composed_op_in_value_and_gradient() {
        let dev = Device::Cpu;
        let (b, h, t, l) = (2, 3, 5, 7);
        // A causal mask over the last t of l keys; row 1 also masks its first key.
        let mut m = vec![0f32; b * t * l];
        for bi in 0..b {
            for q in 0..t {
                for k in 0..l {
                    let blocked = k > l - t + q || (bi == 1 && k == 0);
                    m[(bi * t + q) * l + k] = if blocked { -1e9 } else { 0.0 };
                }
            }
        }
        let bias = Tensor::from_vec(m, (b, 1, t, l), &dev).unwrap();
        let scale = 1.0 / 8f64.sqrt();
        for bias in [bias.clone(), bias.narrow(0, 0, 1).unwrap()] {
            let x = Var::from_tensor(&seeded(&[b, h, t, l], 8, 5.0)).unwrap();
            compare(
                &[x],
                |v| masked_softmax(&v[0], &bias, scale).unwrap(),
                |v| {
                    let s = (&v[0] * scale).unwrap().broadcast_add(&bias).unwrap();
                    candle_nn::ops::softmax(&s, D::Minus1).unwrap()
                },
                1e-6,
            );
        }
        // Large enough for the parallel path.
        let x = Var::from_tensor(&seeded(&[4, 12, 64, 64], 9, 5.0)).unwrap();
        let bias = Tensor::zeros((4, 1, 64, 64), DType::F32, &dev).unwrap();
        compare(
            &[x],
            |v| masked_softmax(&v[0], &bias, 0.125).unwrap(),
            |v| {
                candle_nn::ops::softmax(
                    &(&v[0] * 0.125).unwrap().broadcast_add(&bias).unwrap(),
                    D::Minus1,
                )
                .unwrap()
            },
            1e-6,
        );
    }
}
