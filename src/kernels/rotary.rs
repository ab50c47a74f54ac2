//! Rotary position embeddings (rotate_half form), fused with the backward.

use candle_core::{CpuStorage, CustomOp3, Layout, Result as CResult, Shape, Tensor, D};

use super::fast_math::wide_simd_fn;
use super::{f32_data, for_pieces, fused_path, tracks_grad};
use crate::Result;

/// Rotary position embedding in transformers' "rotate half" layout on x
/// (B, H, T, d): with r the last dimension of cos and sin (B, 1, T, r), the
/// first r features of each head turn pairwise, (x_j, x_{j+r/2}) by the
/// angle at j, and the other d - r pass unchanged. cos and sin take no
/// gradient. The composed version (narrow, neg, cat, two products and a sum)
/// keeps five (B, H, T, d) tensors per call alive for the backward; this
/// keeps none (its backward is the inverse rotation of the gradient).
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _, t, d) = x.dims4()?;
    let r = cos.dim(D::Minus1)?;
    let fits = cos.dims() == [b, 1, t, r] && sin.dims() == cos.dims() && r <= d && r % 2 == 0;
    if fits && fused_path(&[x, cos, sin]) {
        let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
        return Ok(x
            .contiguous()?
            .apply_op3(&cos, &sin, Rotate { inverse: false })?);
    }
    if fits && r == d && !tracks_grad(&[x]) {
        // The rollout on other devices: Candle's no-grad kernel, which takes
        // one copy of the (duplicated) half angles, (B, T, d/2).
        let half = |c: &Tensor| c.squeeze(1)?.narrow(2, 0, r / 2)?.contiguous();
        let (cos, sin) = (half(cos)?, half(sin)?);
        return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?);
    }
    let (rot, pass) = (x.narrow(3, 0, r)?, x.narrow(3, r, d - r)?);
    let h = r / 2;
    let rotated_half = Tensor::cat(&[&rot.narrow(3, h, h)?.neg()?, &rot.narrow(3, 0, h)?], 3)?;
    let out = (rot.broadcast_mul(cos)? + rotated_half.broadcast_mul(sin)?)?;
    Ok(if r == d {
        out
    } else {
        Tensor::cat(&[&out, &pass], 3)?
    })
}

/// The rotation of [`rotary`] (x, cos, sin) -> y, or with `inverse` its
/// transpose, which maps the gradient of y to that of x.
struct Rotate {
    inverse: bool,
}

impl CustomOp3 for Rotate {
    fn name(&self) -> &'static str {
        "fused-rotary"
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
        let x = f32_data(s1, l1, self.name())?;
        let cos = f32_data(s2, l2, self.name())?;
        let sin = f32_data(s3, l3, self.name())?;
        let (_, h, t, d) = l1.shape().dims4()?;
        let r = l2.dims()[3];
        let mut out = vec![0f32; x.len()];
        for_pieces(&mut out, d, |i, o| {
            // Row i is (batch, head, position); its angles are row (batch, position).
            let at = (i / (h * t) * t + i % t) * r;
            let (c, s) = (&cos[at..at + r], &sin[at..at + r]);
            rotate_row(&x[i * d..(i + 1) * d], c, s, self.inverse, o)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inverse = Rotate {
            inverse: !self.inverse,
        };
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?;
        Ok((Some(dx), None, None))
    }
}

wide_simd_fn! {
    /// y_j = a c_j - b s_j, y_{j+h} = b c_{j+h} + a s_{j+h} for (a, b) =
    /// (x_j, x_{j+h}); the inverse is the transpose: a c_j + b s_{j+h}, b c_{j+h} - a s_j.
    pub(super) fn rotate_row(x: &[f32], cos: &[f32], sin: &[f32], inverse: bool, out: &mut [f32]) {
        let h = cos.len() / 2;
        let (x1, x2) = x[..2 * h].split_at(h);
        let (c1, c2) = cos.split_at(h);
        let (s1, s2) = sin.split_at(h);
        let (o1, rest) = out.split_at_mut(h);
        let (o2, pass) = rest.split_at_mut(h);
        if inverse {
            for j in 0..h {
                o1[j] = x1[j] * c1[j] + x2[j] * s2[j];
                o2[j] = x2[j] * c2[j] - x1[j] * s1[j];
            }
        } else {
            for j in 0..h {
                o1[j] = x1[j] * c1[j] - x2[j] * s1[j];
                o2[j] = x2[j] * c2[j] + x1[j] * s2[j];
            }
        }
        pass.copy_from_slice(&x[2 * h..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::{DType, Var};

    /// cos and sin (B, 1, T, r) for left-padded position rows.
    fn rotary_angles(r: usize) -> (Tensor, Tensor) {
        let pos = [vec![0u32, 0, 0, 7, 14], vec![0, 7, 14, 21, 28]];
        rope_angles(&pos, r)
    }

    #[test]
    fn rotary_matches_rotate_half_in_value_and_gradient() {
        // Full rotation (Llama) and a part of each head (GPT-NeoX's rotary_pct).
        for r in [8, 6] {
            let (cos, sin) = rotary_angles(r);
            let x = Var::from_tensor(&seeded(&[2, 3, 5, 8], 51, 2.0)).unwrap();
            // transformers' apply_rotary_pos_emb: x cos + rotate_half(x) sin on the first r.
            let reference = |v: &[Tensor]| {
                let (rot, pass) = (
                    v[0].narrow(3, 0, r).unwrap(),
                    v[0].narrow(3, r, 8 - r).unwrap(),
                );
                let (x1, x2) = (
                    rot.narrow(3, 0, r / 2).unwrap(),
                    rot.narrow(3, r / 2, r / 2).unwrap(),
                );
                let half = Tensor::cat(&[&x2.neg().unwrap(), &x1], 3).unwrap();
                let y =
                    (rot.broadcast_mul(&cos).unwrap() + half.broadcast_mul(&sin).unwrap()).unwrap();
                Tensor::cat(&[&y, &pass], 3).unwrap()
            };
            compare(
                &[x],
                |v| rotary(&v[0], &cos, &sin).unwrap(),
                reference,
                1e-5,
            );
        }
    }

    #[test]
    fn rotary_without_a_gradient_elsewhere_takes_candles_kernel() {
        // bf16 on the CPU stands in for a GPU: no graph, so Candle's rope runs.
        let (cos, sin) = rotary_angles(8);
        let x = seeded(&[2, 3, 5, 8], 52, 2.0);
        let want = rotary(&x, &cos, &sin).unwrap();
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let got = rotary(&bf(&x), &bf(&cos), &bf(&sin)).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert!(max_diff(&got.to_dtype(DType::F32).unwrap(), &want) < 0.05);
    }
}
