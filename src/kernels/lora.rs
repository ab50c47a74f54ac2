//! A LoRA linear layer in one op: y = x W^T (+ b) + scaling ((x * mask) A^T) B^T
//! with W and b frozen (no gradient), A (r, in) and B (out, r) trained.
//!
//! Composed, the update's (N, out) product, its scaled copy and the sum each
//! stay alive in the autograd graph until the backward: three activations
//! of the layer's output size per adapted layer, more than full fine-tuning
//! keeps. Here the graph keeps x, A and B; the backward recomputes the
//! (N, r) product. W is stored (out, in) (nn.Linear) or, with
//! `fan_in_fan_out`, (in, out) (GPT-2's Conv1D).

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result as CResult, Shape, Storage, Tensor};

use super::fast_math::wide_simd_fn;
use super::product::{mm, storage_product};
use super::{f32_data, for_pieces, fused_path};
use crate::Result;

/// The frozen parts of the layer and the adapter's settings.
pub struct LoraLinearParts<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub fan_in_fan_out: bool,
    pub scaling: f64,
    /// Dropout on the adapter's input: 0 or 1 / (1 - p) per element of x, or none.
    pub mask: Option<Tensor>,
}

/// The fused op on the CPU in f32 when W and b are frozen; None elsewhere
/// (the caller composes the ops).
pub fn lora_linear(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    parts: LoraLinearParts,
) -> Result<Option<Tensor>> {
    let frozen = !parts.weight.track_op() && parts.bias.is_none_or(|b| !b.track_op());
    // Without a graph (rollouts, decoding) there is nothing to save, and the
    // base product's own op is faster on few rows (see `matmul_weight_t`).
    let training = x.track_op() || a.track_op() || b.track_op();
    let mut all = vec![x, a, b, parts.weight];
    all.extend(parts.bias);
    all.extend(parts.mask.as_ref());
    if !frozen || !training || !fused_path(&all) || x.rank() != 2 {
        return Ok(None);
    }
    let op = LoraLinear {
        weight: parts.weight.clone(),
        bias: parts.bias.cloned(),
        fan_in_fan_out: parts.fan_in_fan_out,
        scaling: parts.scaling,
        mask: parts.mask,
        skip_value: super::recompute::output_unused(),
    };
    Ok(Some(x.contiguous()?.apply_op3(a, b, op)?))
}

struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    fan_in_fan_out: bool,
    scaling: f64,
    mask: Option<Tensor>,
    /// Zeros instead of the value (`recompute::output_product`): the backward reads inputs only.
    skip_value: bool,
}

/// A tensor's f32 data on the CPU, contiguous (copied if it is not).
fn host_f32(t: &Tensor) -> CResult<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

wide_simd_fn! {
    /// row += s * d + b (b may be empty).
    fn add_scaled(row: &mut [f32], d: &[f32], s: f32, b: &[f32]) {
        if b.is_empty() {
            for (o, &v) in row.iter_mut().zip(d) {
                *o += s * v;
            }
        } else {
            for ((o, &v), &c) in row.iter_mut().zip(d).zip(b) {
                *o += s * v + c;
            }
        }
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (r, k_a) = la.shape().dims2()?;
        let (n, r_b) = lb.shape().dims2()?;
        let (w_storage, lw) = self.weight.storage_and_layout();
        let Storage::Cpu(sw) = &*w_storage else {
            bail!("{}: the weight is not on the CPU", self.name())
        };
        let (k_w, n_w) = match self.fan_in_fan_out {
            true => (lw.dims()[0], lw.dims()[1]),
            false => (lw.dims()[1], lw.dims()[0]),
        };
        if k_a != k || r_b != r || k_w != k || n_w != n {
            bail!(
                "{}: x {:?}, A {:?}, B {:?}, weight {:?} do not fit",
                self.name(),
                lx.dims(),
                la.dims(),
                lb.dims(),
                lw.dims()
            )
        }
        if self.skip_value {
            super::recompute::count_skipped();
            return Ok((CpuStorage::F32(vec![0f32; m * n]), Shape::from((m, n))));
        }
        // y = x W^T (or x W).
        let w_layout = match self.fan_in_fan_out {
            true => lw.clone(),
            false => lw.transpose(0, 1)?,
        };
        let name = self.name();
        let mut y = storage_product(sx, lx, sw, &w_layout, name)?;
        drop(w_storage);
        // h = (x * mask) A^T, (m, r).
        let h = match &self.mask {
            Some(mask) => {
                let mask = host_f32(mask)?;
                let x = f32_data(sx, lx, name)?;
                let xd: Vec<f32> = x.iter().zip(&mask).map(|(a, b)| a * b).collect();
                let xd = CpuStorage::F32(xd);
                storage_product(
                    &xd,
                    &Layout::contiguous((m, k)),
                    sa,
                    &la.transpose(0, 1)?,
                    name,
                )?
            }
            None => storage_product(sx, lx, sa, &la.transpose(0, 1)?, name)?,
        };
        // d = h B^T, (m, n); y += scaling d + b.
        let h = CpuStorage::F32(h);
        let d = storage_product(
            &h,
            &Layout::contiguous((m, r)),
            sb,
            &lb.transpose(0, 1)?,
            name,
        )?;
        let bias = match &self.bias {
            Some(b) => host_f32(b)?,
            None => Vec::new(),
        };
        let s = self.scaling as f32;
        for_pieces(&mut y, n, |row, out| {
            add_scaled(out, &d[row * n..(row + 1) * n], s, &bias)
        });
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let x_tracks = x.track_op();
        let (x, a, b, g) = (x.detach(), a.detach(), b.detach(), grad.detach());
        let s = self.scaling;
        let xd = match &self.mask {
            Some(mask) => (&x * mask)?,
            None => x,
        };
        let gb = mm(&g, &b)?; // (m, r)
        let h = mm(&xd, &a.t()?)?; // (m, r)
        let da = (mm(&gb.t()?, &xd)? * s)?; // (r, in)
        let db = (mm(&g.t()?, &h)? * s)?; // (out, r)
        let dx = if x_tracks {
            let base = match self.fan_in_fan_out {
                true => mm(&g, &self.weight.t()?)?,
                false => mm(&g, &self.weight)?,
            };
            let through = (mm(&gb, &a)? * s)?;
            let through = match &self.mask {
                Some(mask) => (through * mask)?,
                None => through,
            };
            Some((base + through)?)
        } else {
            None
        };
        Ok((dx, Some(da), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::Var;

    #[test]
    fn fused_lora_linear_matches_the_composed_ops_in_value_and_gradient() {
        for fan_in_fan_out in [false, true] {
            for (with_bias, with_mask) in [(false, false), (true, false), (true, true)] {
                let (m, k, n, r) = (7, 12, 10, 3);
                let w_dims = if fan_in_fan_out { [k, n] } else { [n, k] };
                let w = seeded(&w_dims, 1, 1.0);
                let bias = seeded(&[n], 2, 1.0);
                let mask = with_mask.then(|| {
                    let v: Vec<f32> = (0..m * k)
                        .map(|i| if i % 3 == 0 { 0.0 } else { 1.5 })
                        .collect();
                    Tensor::from_vec(v, (m, k), &candle_core::Device::Cpu).unwrap()
                });
                let vars = [
                    Var::from_tensor(&seeded(&[m, k], 3, 1.0)).unwrap(),
                    Var::from_tensor(&seeded(&[r, k], 4, 1.0)).unwrap(),
                    Var::from_tensor(&seeded(&[n, r], 5, 1.0)).unwrap(),
                ];
                let s = 0.75;
                let composed = |v: &[Tensor]| {
                    let wt = if fan_in_fan_out {
                        w.clone()
                    } else {
                        w.t().unwrap()
                    };
                    let mut y = v[0].matmul(&wt).unwrap();
                    if with_bias {
                        y = y.broadcast_add(&bias).unwrap();
                    }
                    let xd = match &mask {
                        Some(mk) => (&v[0] * mk).unwrap(),
                        None => v[0].clone(),
                    };
                    let d = xd
                        .matmul(&v[1].t().unwrap())
                        .unwrap()
                        .matmul(&v[2].t().unwrap())
                        .unwrap();
                    (y + (d * s).unwrap()).unwrap()
                };
                let fused = |v: &[Tensor]| {
                    let parts = LoraLinearParts {
                        weight: &w,
                        bias: with_bias.then_some(&bias),
                        fan_in_fan_out,
                        scaling: s,
                        mask: mask.clone(),
                    };
                    lora_linear(&v[0], &v[1], &v[2], parts)
                        .unwrap()
                        .expect("the fused path")
                };
                compare(&vars, fused, composed, 1e-4);
            }
        }
    }
}
