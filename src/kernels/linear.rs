//! x W (+ b): the products of every linear layer, with the bias added in the
//! product's own buffer.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result as CResult, Shape, Tensor,
};

use super::fast_math::wide_simd_fn;
use super::product::{mm, storage_product};
use super::{f32_data, for_pieces, fused_path};
use crate::Result;

/// Row counts up to which [`matmul_weight_t`] takes the transposed product
/// on the CPU (decoding steps, small batches).
pub const FEW_ROWS: usize = 256;

/// x (N, in) times W^T, W stored (out, in) as torch's nn.Linear keeps it.
/// On the CPU with few rows (every decoding step), the gemm crate reads the
/// transposed view W^T column by column and is several times slower than
/// computing (W x^T)^T, whose transpose is a small copy (docs/benchmarks-history.md,
/// "Design measurements"). With many rows (training, prefill) the plain
/// product is as fast and needs no copy. So is it when the product records
/// a graph (a training micro-batch of few rows): there the transposes cost
/// copies forward and backward (docs/benchmarks-history.md, "Candle's backward store"). GPUs
/// take W^T as it is.
pub fn matmul_weight_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    weight_t_product(x, w, mm)
}

/// [`matmul_weight_t`] as a whole linear layer's output (no bias, no
/// adapter): inside `recompute::output_product` during a recomputation
/// the product skips its value.
pub fn layer_output_weight_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    weight_t_product(x, w, super::product::mm_layer_output)
}

fn weight_t_product(
    x: &Tensor,
    w: &Tensor,
    mm: fn(&Tensor, &Tensor) -> CResult<Tensor>,
) -> Result<Tensor> {
    if frozen(x, w) {
        return frozen_product(x, w, true);
    }
    if x.device().is_cpu() && x.dim(0)? <= FEW_ROWS && !x.track_op() && !w.track_op() {
        Ok(mm(w, &x.t()?)?.t()?)
    } else {
        Ok(mm(x, &w.t()?)?)
    }
}

/// x (N, in) times W plus the bias b (out): W (in, out) as GPT-2's Conv1D
/// stores it, or with `transposed` W^T for W (out, in) as nn.Linear does.
/// The bias is added in the product's own output buffer, so no second
/// (N, out) tensor stays alive for the backward as with a matmul then an add
/// (a quarter of GPT-2-small's activations by a count of tensor sizes); the bias gradient sums the
/// output gradient's rows (Candle's broadcast_add backward divides per element).
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor, transposed: bool) -> Result<Tensor> {
    if fused_path(&[x, w, b]) && x.rank() == 2 && w.rank() == 2 && b.rank() == 1 {
        let skip_value = super::recompute::output_unused();
        return Ok(x.apply_op3(
            w,
            b,
            Linear {
                transposed,
                skip_value,
            },
        )?);
    }
    let y = match (transposed, frozen(x, w)) {
        (true, _) => matmul_weight_t(x, w)?,
        (false, true) => frozen_product(x, w, false)?,
        (false, false) => mm(x, w)?,
    };
    Ok(y.broadcast_add(b)?)
}

/// Whether `x` records a graph and `w` is frozen (a LoRA base weight: no
/// Var and no graph of its own). Candle's matmul backward computes the
/// gradient of both operands whatever they are, so a frozen weight would
/// cost a full weight gradient (and its memory) per product.
fn frozen(x: &Tensor, w: &Tensor) -> bool {
    x.track_op() && !w.track_op()
}

/// x (N, in) times W^T (W (out, in), `transposed`) or W (W (in, out)), with
/// a backward to x alone: the product with a frozen weight.
pub fn frozen_product(x: &Tensor, w: &Tensor, transposed: bool) -> Result<Tensor> {
    let skip_value = super::recompute::output_unused();
    Ok(x.contiguous()?.apply_op2(
        w,
        FrozenProduct {
            transposed,
            skip_value,
        },
    )?)
}

struct FrozenProduct {
    transposed: bool,
    /// Zeros instead of the value on the CPU (`recompute::output_product`):
    /// the backward reads W alone.
    skip_value: bool,
}

impl FrozenProduct {
    /// (batch, m, n, k) and W's layout as the right operand of x W.
    fn plan(&self, l1: &Layout, l2: &Layout) -> CResult<((usize, usize, usize, usize), Layout)> {
        let (m, k) = l1.shape().dims2()?;
        let (w_layout, (k_w, n)) = match self.transposed {
            true => (l2.transpose(0, 1)?, (l2.dims()[1], l2.dims()[0])),
            false => (l2.clone(), (l2.dims()[0], l2.dims()[1])),
        };
        if k_w != k {
            bail!(
                "frozen product: x {:?} and weight {:?} do not fit",
                l1.dims(),
                l2.dims()
            )
        }
        Ok(((1, m, n, k), w_layout))
    }
}

impl CustomOp2 for FrozenProduct {
    fn name(&self) -> &'static str {
        "frozen-weight-product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (bmnk, w_layout) = self.plan(l1, l2)?;
        let (m, n) = (bmnk.1, bmnk.2);
        let f32s = matches!((s1, s2), (CpuStorage::F32(_), CpuStorage::F32(_)));
        if self.skip_value && f32s {
            super::recompute::count_skipped();
            return Ok((CpuStorage::F32(vec![0f32; m * n]), Shape::from((m, n))));
        }
        let y = storage_product(s1, l1, s2, &w_layout, self.name())?;
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (bmnk, w_layout) = self.plan(l1, l2)?;
        Ok((
            s1.matmul(s2, bmnk, l1, &w_layout)?,
            Shape::from((bmnk.1, bmnk.2)),
        ))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> CResult<(candle_core::MetalStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (bmnk, w_layout) = self.plan(l1, l2)?;
        Ok((
            s1.matmul(s2, bmnk, l1, &w_layout)?,
            Shape::from((bmnk.1, bmnk.2)),
        ))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        // y = x W^T: dx = g W; y = x W: dx = g W^T. No gradient to W.
        let dx = match self.transposed {
            true => mm(grad, w)?,
            false => mm(grad, &w.t()?)?,
        };
        Ok((Some(dx), None))
    }
}

struct Linear {
    transposed: bool,
    /// Zeros instead of the value (`recompute::output_product`): the
    /// backward reads x and W alone.
    skip_value: bool,
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
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
        let (m, k) = l1.shape().dims2()?;
        let (k_w, n) = match self.transposed {
            true => (l2.dims()[1], l2.dims()[0]),
            false => (l2.dims()[0], l2.dims()[1]),
        };
        let b = f32_data(s3, l3, self.name())?;
        if k_w != k || b.len() != n {
            bail!(
                "{}: x {:?}, weight {:?}, bias {:?} do not fit",
                self.name(),
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        if self.skip_value {
            super::recompute::count_skipped();
            return Ok((CpuStorage::F32(vec![0f32; m * n]), Shape::from((m, n))));
        }
        let out = if self.transposed && m <= FEW_ROWS {
            // (W x^T)^T, see matmul_weight_t: the product is (n, m), transposed
            // into the output as the bias is added.
            let wx = storage_product(s2, l2, s1, &l1.transpose(0, 1)?, self.name())?;
            let mut out = vec![0f32; m * n];
            for (j, col) in wx.chunks_exact(m.max(1)).enumerate() {
                for (i, &v) in col.iter().enumerate() {
                    out[i * n + j] = v + b[j];
                }
            }
            out
        } else {
            let w_layout = match self.transposed {
                true => l2.transpose(0, 1)?,
                false => l2.clone(),
            };
            let mut y = storage_product(s1, l1, s2, &w_layout, self.name())?;
            for_pieces(&mut y, n, |_, row| add_in_place(row, b));
            y
        };
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (w_tracks, b_tracks) = (w.track_op(), b.track_op());
        let (x, w, g) = (x.detach(), w.detach(), grad.detach());
        // y = x W^T + b: dx = g W, dW = g^T x; y = x W + b: dx = g W^T, dW = x^T g.
        let dx = match self.transposed {
            true => mm(&g, &w)?,
            false => mm(&g, &w.t()?)?,
        };
        // A frozen weight or bias (LoRA's base) gets no gradient.
        let dw = match (w_tracks, self.transposed) {
            (false, _) => None,
            (true, true) => Some(mm(&g.t()?, &x)?),
            (true, false) => Some(mm(&x.t()?, &g)?),
        };
        let db = match b_tracks {
            true => Some(
                g.contiguous()?
                    .apply_op1_no_bwd(&ColumnSum)?
                    .reshape(b.shape())?,
            ),
            false => None,
        };
        Ok((Some(dx), dw, db))
    }
}

wide_simd_fn! {
    /// row += b, elementwise.
    fn add_in_place(row: &mut [f32], b: &[f32]) {
        for (o, &b) in row.iter_mut().zip(b) {
            *o += b;
        }
    }
}

wide_simd_fn! {
    /// out[j] += the sum of g[i * n + j] over rows i, n = out.len().
    fn column_sum(g: &[f32], out: &mut [f32]) {
        for row in g.chunks_exact(out.len()) {
            out.iter_mut().zip(row).for_each(|(o, &v)| *o += v);
        }
    }
}

/// (.., n) -> (n): the sum over every leading index, one row at a time.
struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "fused-column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let g = f32_data(s, l, self.name())?;
        let n = l.dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; n];
        if n > 0 {
            column_sum(g, &mut out);
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::Var;

    #[test]
    fn linear_matches_matmul_plus_bias_in_value_and_gradient() {
        // Both weight layouts; 5 rows (the transposed product of few rows)
        // and 300 (the plain product, parallel bias pass).
        for rows in [5, 300] {
            for transposed in [false, true] {
                let w_dims = if transposed { [70, 50] } else { [50, 70] };
                let vars = [
                    Var::from_tensor(&seeded(&[rows, 50], 11, 2.0)).unwrap(),
                    Var::from_tensor(&seeded(&w_dims, 12, 1.0)).unwrap(),
                    Var::from_tensor(&seeded(&[70], 13, 1.0)).unwrap(),
                ];
                let composed = |v: &[Tensor]| {
                    let w = if transposed {
                        v[1].t().unwrap()
                    } else {
                        v[1].clone()
                    };
                    v[0].matmul(&w).unwrap().broadcast_add(&v[2]).unwrap()
                };
                compare(
                    &vars,
                    |v| linear(&v[0], &v[1], &v[2], transposed).unwrap(),
                    composed,
                    1e-4,
                );
            }
        }
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient_and_x_the_same_one() {
        use candle_core::Var;
        // W plain (a LoRA base weight), x tracked: x's gradient equals the
        // plain product's, and W has none, in both layouts and on both
        // paths (few rows, many), with a bias (fused op) and without.
        for rows in [5, FEW_ROWS + 44] {
            for transposed in [true, false] {
                let w_dims = if transposed { [24, 40] } else { [40, 24] };
                let w = seeded(&w_dims, 1, 1.0);
                let b = seeded(&[24], 4, 1.0);
                let x = Var::from_tensor(&seeded(&[rows, 40], 2, 1.0)).unwrap();
                let up = seeded(&[rows, 24], 3, 1.0);
                let wt = if transposed {
                    w.t().unwrap()
                } else {
                    w.clone()
                };
                let wv = Var::from_tensor(&wt).unwrap();
                let plain = x.matmul(wv.as_tensor()).unwrap();
                for with_bias in [false, true] {
                    let ours = match (with_bias, transposed) {
                        (true, _) => linear(&x, &w, &b, transposed).unwrap(),
                        (false, true) => matmul_weight_t(&x, &w).unwrap(),
                        (false, false) => frozen_product(&x, &w, false).unwrap(),
                    };
                    let want = match with_bias {
                        true => plain.broadcast_add(&b).unwrap(),
                        false => plain.clone(),
                    };
                    assert!(max_diff(&ours, &want) < 1e-4, "rows {rows}");
                    let g = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
                    let g_plain = (&want * &up)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let (a, e) = (g.get(&x).unwrap(), g_plain.get(&x).unwrap());
                    assert!(max_diff(a, e) < 1e-4, "rows {rows}: dx differs");
                    assert!(
                        g.get(&w).is_none() && g.get(&b).is_none(),
                        "a frozen weight got a gradient"
                    );
                }
            }
        }
    }

    #[test]
    fn matmul_weight_t_equals_the_plain_product_with_gradients_on_both_paths() {
        use candle_core::Var;
        let w = Var::from_tensor(&seeded(&[24, 40], 1, 1.0)).unwrap();
        // 5 rows take the transposed product, 300 the plain one.
        for rows in [5, FEW_ROWS + 44] {
            let x = Var::from_tensor(&seeded(&[rows, 40], 2, 1.0)).unwrap();
            let up = seeded(&[rows, 24], 3, 1.0);
            let ours = matmul_weight_t(&x, &w).unwrap();
            let plain = x.matmul(&w.t().unwrap()).unwrap();
            assert_eq!(ours.dims(), &[rows, 24]);
            assert!(max_diff(&ours, &plain) < 1e-4, "rows {rows}");
            let g_ours = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g_plain = (plain * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for var in [&x, &w] {
                let (a, b) = (g_ours.get(var).unwrap(), g_plain.get(var).unwrap());
                assert!(max_diff(a, b) < 1e-4, "rows {rows}: gradient differs");
            }
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// A layer x + P(tanh(x W1 + b1)) whose last product P (a trained layer
    /// with a bias or without, a LoRA layer over a frozen weight, a frozen weight's
    /// product) skips its value when recomputed: the same output, and the
    /// same gradients bit for bit as without checkpointing.
    #[test]
    fn a_last_product_recomputed_without_its_value_gives_the_same_gradients() {
        let (n, e, r) = (6, 5, 2);
        let w1 = Var::from_tensor(&seeded(&[e, e], 1, 1.0)).unwrap();
        let b1 = Var::from_tensor(&seeded(&[e], 2, 1.0)).unwrap();
        let w2 = Var::from_tensor(&seeded(&[e, e], 3, 1.0)).unwrap();
        let b2 = Var::from_tensor(&seeded(&[e], 4, 1.0)).unwrap();
        let frozen = seeded(&[e, e], 5, 1.0);
        let a = Var::from_tensor(&seeded(&[r, e], 6, 1.0)).unwrap();
        let b = Var::from_tensor(&seeded(&[e, r], 7, 1.0)).unwrap();
        let weights = [&w1, &b1, &w2, &b2, &a, &b].map(|v| v.as_tensor().clone());
        for kind in ["trained, bias", "trained", "lora", "frozen"] {
            let [w1, b1, w2, b2, a, b] = weights.clone();
            let frozen = frozen.clone();
            let layer = move |x: &Tensor| -> crate::Result<Tensor> {
                let h = linear(x, &w1, &b1, true)?.tanh()?;
                let y = crate::kernels::recompute::output_product(|| -> crate::Result<Tensor> {
                    Ok(match kind {
                        "trained, bias" => linear(&h, &w2, &b2, true)?,
                        "trained" => layer_output_weight_t(&h, &w2)?,
                        "lora" => {
                            let parts = crate::kernels::LoraLinearParts {
                                weight: &frozen,
                                bias: None,
                                fan_in_fan_out: false,
                                scaling: 0.5,
                                mask: None,
                            };
                            crate::kernels::lora_linear(&h, &a, &b, parts)?.expect("the fused op")
                        }
                        _ => layer_output_weight_t(&h, &frozen)?,
                    })
                })?;
                Ok((x + y)?)
            };
            let x = Var::from_tensor(&seeded(&[n, e], 8, 1.0)).unwrap();
            let up = seeded(&[n, e], 9, 1.0);
            let vars: Vec<&Tensor> = [x.as_tensor()].into_iter().chain(&weights).collect();
            let plain_out = layer(x.as_tensor()).unwrap();
            let plain =
                crate::kernels::gradients(&(&plain_out * &up).unwrap().sum_all().unwrap(), &vars)
                    .unwrap();
            let skipped = crate::kernels::recompute::skipped_on_this_thread();
            let ours = crate::kernels::checkpoint(x.as_tensor(), layer, |_| {}).unwrap();
            assert_eq!(bits(&ours), bits(&plain_out), "{kind}: the output");
            assert_eq!(
                crate::kernels::recompute::skipped_on_this_thread(),
                skipped,
                "{kind}: skipped in the forward"
            );
            let ours = crate::kernels::gradients(&(&ours * &up).unwrap().sum_all().unwrap(), &vars)
                .unwrap();
            assert_eq!(
                crate::kernels::recompute::skipped_on_this_thread(),
                skipped + 1,
                "{kind}: recomputed without the value"
            );
            for (i, (p, o)) in plain.iter().zip(&ours).enumerate() {
                match (p, o) {
                    (Some(p), Some(o)) => assert_eq!(bits(p), bits(o), "{kind}: gradient {i}"),
                    (None, None) => {}
                    _ => panic!("{kind}: gradient {i} on one side only"),
                }
            }
        }
    }
}
