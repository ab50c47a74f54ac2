//! LayerNorm and RMSNorm with one shared backward.

use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result as CResult, Shape, Tensor, D,
};

use super::fast_math::{self, wide_simd_fn};
use super::{f32_data, for_pieces, fused_path, tracks_grad, SharedOut};
use crate::Result;

/// LayerNorm over the last dimension: (x - mean) / sqrt(var + eps) * w + b,
/// the biased variance, as torch's nn.LayerNorm.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    if fused_path(&[x, w, b]) {
        let x = x.contiguous()?;
        Ok(x.apply_op3(w, b, LayerNorm { eps })?)
    } else if tracks_grad(&[x, w, b]) {
        Ok(candle_nn::ops::layer_norm_slow(x, w, b, eps)?)
    } else {
        Ok(candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps)?)
    }
}

#[derive(Clone, Copy)]
struct LayerNorm {
    eps: f32,
}

wide_simd_fn! {
    fn layer_norm_row(row: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
        let (mean, rstd) = row_stats(row, eps);
        for j in 0..row.len() {
            out[j] = (row[j] - mean) * rstd * w[j] + b[j];
        }
    }
}

/// Mean and 1/std of a row (two passes, as the composed op).
#[inline(always)]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = fast_math::sum_by(x, |v| v) / n;
    let var = fast_math::sum_by(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// The backward of LayerNorm or RMSNorm over the last dimension as one
/// kernel ([`NormGrad`]): dx in x's shape, and the parameter gradients (dw,
/// then db for LayerNorm) as the rows the kernel appends after dx's.
fn norm_backward(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    norm: Norm,
    eps: f32,
) -> CResult<(Tensor, Tensor)> {
    let rows = x.elem_count() / w.elem_count();
    let all = x.apply_op3_no_bwd(w, &grad.contiguous()?, &NormGrad { norm, eps })?;
    let params = all.dim(0)? - rows;
    // The parameter rows are copied out: views of `all` would keep the whole
    // buffer (dx's rows too) alive as the weights' gradients until the
    // optimizer step, now that Candle's store keeps a gradient as it comes.
    Ok((
        all.narrow(0, 0, rows)?.reshape(x.shape())?,
        all.narrow(0, rows, params)?.force_contiguous()?,
    ))
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let w = f32_data(s2, l2, self.name())?;
        let b = f32_data(s3, l3, self.name())?;
        let d = w.len();
        if d == 0 || l1.dims().last() != Some(&d) || b.len() != d {
            bail!(
                "{}: weight and bias must match the last dimension",
                self.name()
            )
        }
        let mut out = vec![0f32; x.len()];
        for_pieces(&mut out, d, |i, o| {
            layer_norm_row(&x[i * d..(i + 1) * d], w, b, self.eps, o)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, params) = norm_backward(x, w, grad, Norm::Layer, self.eps)?;
        Ok((Some(dx), Some(params.get(0)?), Some(params.get(1)?)))
    }
}

/// The (rows + sums, d) output of a normalization's backward: `row(i, acc,
/// out_i)` writes row i of dx and adds that row's parameter gradients into
/// `acc` (sums x d: dw, then db). One task per block of 32 rows, each with its
/// own partial sums, added up at the end: one pass over x and dy in all.
fn rows_and_sums(
    rows: usize,
    d: usize,
    sums: usize,
    row: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    const BLOCK: usize = 32;
    let mut out = vec![0f32; (rows + sums) * d];
    let (dx, total) = out.split_at_mut(rows * d);
    let width = sums * d;
    let mut partials = vec![0f32; rows.div_ceil(BLOCK) * width];
    let partial_out = SharedOut(partials.as_mut_ptr());
    for_pieces(dx, BLOCK * d, |blk, dx_block| {
        // SAFETY: block blk alone writes partials[blk * width..(blk + 1) * width].
        let acc = unsafe { partial_out.slice(blk * width, width) };
        for (r, o) in dx_block.chunks_mut(d).enumerate() {
            row(blk * BLOCK + r, acc, o);
        }
    });
    for acc in partials.chunks(width.max(1)) {
        total.iter_mut().zip(acc).for_each(|(s, a)| *s += a);
    }
    out
}

/// Which normalization a [`NormGrad`] differentiates.
#[derive(Clone, Copy)]
enum Norm {
    Layer,
    Rms,
}

/// (x, w, dy) -> dx with the parameter gradients appended as rows:
/// LayerNorm [dx; dw; db] (rows + 2, d), RMSNorm [dx; dw] (rows + 1, d), in
/// one pass over x and dy ([`layer_norm_grad_row`], [`rms_norm_grad_row`]).
struct NormGrad {
    norm: Norm,
    eps: f32,
}

impl CustomOp3 for NormGrad {
    fn name(&self) -> &'static str {
        match self.norm {
            Norm::Layer => "fused-layer-norm-grad",
            Norm::Rms => "fused-rms-norm-grad",
        }
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
        let w = f32_data(s2, l2, self.name())?;
        let dy = f32_data(s3, l3, self.name())?;
        let d = w.len();
        let rows = x.len() / d;
        let sums = match self.norm {
            Norm::Layer => 2,
            Norm::Rms => 1,
        };
        let out = rows_and_sums(rows, d, sums, |i, acc, o| {
            let (x, dy) = (&x[i * d..(i + 1) * d], &dy[i * d..(i + 1) * d]);
            match self.norm {
                Norm::Layer => layer_norm_grad_row(x, dy, w, self.eps, acc, o),
                Norm::Rms => rms_norm_grad_row(x, dy, w, self.eps, acc, o),
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((rows + sums, d))))
    }
}

wide_simd_fn! {
    /// dx of one row into `out`; dw and db of the row added to acc[..d], acc[d..]:
    /// xhat = (x - mean) * rstd, g = dy * w,
    /// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), dw = dy * xhat, db = dy.
    fn layer_norm_grad_row(row: &[f32], g_row: &[f32], w: &[f32], eps: f32, acc: &mut [f32], out: &mut [f32]) {
        let d = row.len();
        let (mean, rstd) = row_stats(row, eps);
        let (dw, db) = acc.split_at_mut(d);
        // out holds g = dy * w until the last loop.
        for j in 0..d {
            let xhat = (row[j] - mean) * rstd;
            out[j] = g_row[j] * w[j];
            dw[j] += g_row[j] * xhat;
            db[j] += g_row[j];
        }
        let mean_g = fast_math::sum_by(out, |g| g) / d as f32;
        let mean_gx = fast_math::sum_by2(out, row, |g, x| g * (x - mean) * rstd) / d as f32;
        for j in 0..d {
            let xhat = (row[j] - mean) * rstd;
            out[j] = rstd * (out[j] - mean_g - xhat * mean_gx);
        }
    }
}

// ---------------------------------------------------------------- RMSNorm

/// RMSNorm over the last dimension as transformers' LlamaRMSNorm:
/// x / sqrt(mean(x^2) + eps), normalized in f32, cast back, times w. The
/// composed op's backward reduces the weight gradient over the leading
/// dimensions, which Candle does with a division per element.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_path(&[x, w]) {
        let eps = eps as f32;
        return Ok(x
            .contiguous()?
            .apply_op2(&w.contiguous()?, RmsNorm { eps })?);
    }
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let variance = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(variance + eps)?.sqrt()?)?;
    Ok(normed.to_dtype(dtype)?.broadcast_mul(w)?)
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, self.name())?;
        let w = f32_data(s2, l2, self.name())?;
        let d = w.len();
        if d == 0 || l1.dims().last() != Some(&d) {
            bail!("{}: the weight must match the last dimension", self.name())
        }
        let mut out = vec![0f32; x.len()];
        for_pieces(&mut out, d, |i, o| {
            rms_norm_row(&x[i * d..(i + 1) * d], w, self.eps, o)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (dx, params) = norm_backward(x, w, grad, Norm::Rms, self.eps)?;
        Ok((Some(dx), Some(params.get(0)?.reshape(w.shape())?)))
    }
}

/// 1 / sqrt(mean(x^2) + eps) of a row.
#[inline(always)]
fn rms_rstd(x: &[f32], eps: f32) -> f32 {
    let mean_sq = fast_math::sum_by(x, |v| v * v) / x.len() as f32;
    1.0 / (mean_sq + eps).sqrt()
}

wide_simd_fn! {
    fn rms_norm_row(row: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let r = rms_rstd(row, eps);
        for j in 0..row.len() {
            out[j] = row[j] * r * w[j];
        }
    }
}

wide_simd_fn! {
    /// dx of one row into `out`; the row's dw added to `acc`: with
    /// r = 1/sqrt(mean(x^2) + eps) and g = dy * w,
    /// dx = r * (g - x * r^2 * mean(g * x)), dw = dy * x * r.
    fn rms_norm_grad_row(row: &[f32], g_row: &[f32], w: &[f32], eps: f32, acc: &mut [f32], out: &mut [f32]) {
        let d = row.len();
        let r = rms_rstd(row, eps);
        // out holds g = dy * w until the last loop.
        for j in 0..d {
            out[j] = g_row[j] * w[j];
            acc[j] += g_row[j] * row[j] * r;
        }
        let mean_gx = fast_math::sum_by2(out, row, |g, x| g * x) / d as f32;
        for j in 0..d {
            out[j] = r * (out[j] - row[j] * r * r * mean_gx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::Var;

    #[test]
    fn rms_norm_matches_the_composed_op_in_value_and_gradient() {
        let vars = [
            Var::from_tensor(&(seeded(&[4, 100, 96], 31, 3.0) + 0.5).unwrap()).unwrap(),
            Var::from_tensor(&seeded(&[96], 32, 1.0)).unwrap(),
        ];
        let composed = |v: &[Tensor]| {
            let variance = v[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let rstd = (variance + 1e-6).unwrap().sqrt().unwrap();
            v[0].broadcast_div(&rstd)
                .unwrap()
                .broadcast_mul(&v[1])
                .unwrap()
        };
        compare(
            &vars,
            |v| rms_norm(&v[0], &v[1], 1e-6).unwrap(),
            composed,
            1e-5,
        );
    }

    #[test]
    fn layer_norm_matches_the_composed_op_in_value_and_gradient() {
        // Rows with an offset and a spread, so mean and variance both matter;
        // large enough to take the parallel path.
        let x = (seeded(&[4, 100, 96], 2, 3.0) + 0.7).unwrap();
        let vars = [
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&seeded(&[96], 3, 1.0)).unwrap(),
            Var::from_tensor(&seeded(&[96], 4, 1.0)).unwrap(),
        ];
        compare(
            &vars,
            |v| layer_norm(&v[0], &v[1], &v[2], 1e-5).unwrap(),
            |v| candle_nn::ops::layer_norm_slow(&v[0], &v[1], &v[2], 1e-5).unwrap(),
            2e-5,
        );
        // A small batch on one thread.
        let small = [
            Var::from_tensor(&seeded(&[2, 3, 8], 5, 2.0)).unwrap(),
            Var::from_tensor(&seeded(&[8], 6, 1.0)).unwrap(),
            Var::from_tensor(&seeded(&[8], 7, 1.0)).unwrap(),
        ];
        compare(
            &small,
            |v| layer_norm(&v[0], &v[1], &v[2], 1e-5).unwrap(),
            |v| candle_nn::ops::layer_norm_slow(&v[0], &v[1], &v[2], 1e-5).unwrap(),
            2e-5,
        );
    }
}
