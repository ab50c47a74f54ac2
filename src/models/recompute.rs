//! Activation recomputation ("gradient checkpointing", Chen et al., 2016)
//! for the weight-free middle of attention: splitting heads, rotary,
//! scores, the masked softmax and the weighted sum.
//!
//! Candle keeps every intermediate of the forward graph alive until the whole
//! backward pass ends. For attention those are the per-head copies of q, k
//! and v, the rotated q and k, the (B, H, T, T) scores and probabilities and
//! the merged output: about a fifth of a GPT-2-small reward step's
//! activations by a count of tensor sizes, more for longer sequences. Their
//! arithmetic is small beside the projections around them (the score and
//! weighted-sum products of GPT-2 small at 128 tokens are about 1/36 of a
//! layer's FLOPs), so the
//! forward here runs on detached inputs and keeps nothing, and the backward
//! runs it again with a graph, the way FlashAttention recomputes its scores.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result as CResult, Shape, Tensor, Var};

use crate::Result;

/// Whether attention over (B, H, T, T) scores is worth recomputing: below
/// about 2 MB of f32 scores per layer the memory saved is small, and the
/// second forward cost about 5% of a tiny-model PPO iteration (0.076 against
/// 0.080 s, 1 thread). SmolLM2's PPO micro-batch (8 x 117 tokens, 9 heads)
/// has 0.99M scores per layer, GPT-2's reward step 3.1M.
pub fn worth_recomputing(batch: usize, heads: usize, len: usize) -> bool {
    batch * heads * len * len >= 1 << 19
}

/// The recomputed function: inputs to output, without weights (a weight
/// inside would get no gradient, as the backward returns input gradients only).
pub type Region = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync;

/// f(a, b, c), keeping none of f's intermediates for the backward when a
/// gradient is tracked on the CPU in f32 (elsewhere f runs as it is).
pub fn recompute(a: &Tensor, b: &Tensor, c: &Tensor, f: Arc<Region>) -> Result<Tensor> {
    let tracked = [a, b, c].iter().any(|x| x.track_op());
    let cpu_f32 = [a, b, c]
        .iter()
        .all(|x| x.device().is_cpu() && x.dtype() == DType::F32);
    if !tracked || !cpu_f32 {
        return f(a, b, c);
    }
    let out = f(&a.detach(), &b.detach(), &c.detach())?;
    Ok(a.apply_op3(b, c, Recompute { f, out })?)
}

struct Recompute {
    f: Arc<Region>,
    /// The output, computed without a graph; the op hands out a copy.
    out: Tensor,
}

fn candle_err(e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl CustomOp3 for Recompute {
    fn name(&self) -> &'static str {
        "recomputed-region"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let data = self.out.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(data), self.out.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The forward again, on fresh variables, with a graph this time; the
        // gradient flows in as the weight of a sum.
        let vars = [a, b, c].map(|x| Var::from_tensor(&x.detach()));
        let [va, vb, vc] = vars;
        let (va, vb, vc) = (va?, vb?, vc?);
        let y = (self.f)(va.as_tensor(), vb.as_tensor(), vc.as_tensor()).map_err(candle_err)?;
        let grads = (y * grad.detach())?.sum_all()?.backward()?;
        let take = |v: &Var| grads.get(v.as_tensor()).map(Tensor::detach);
        Ok((take(&va), take(&vb), take(&vc)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::fused::tests::{max_abs, max_diff, seeded};
    use crate::models::layers::{attention, split_heads};

    #[test]
    fn recomputed_attention_equals_the_plain_one_in_value_and_gradient() {
        // Causal mask over 6 positions, 4 heads of 8, inputs from a weight so
        // that the gradient has to flow through the recomputed region to it.
        let (b, t, heads, d) = (2, 6, 4, 8);
        let mask: Vec<f32> = (0..t * t)
            .map(|i| if i % t <= i / t { 0.0 } else { -1e9 })
            .collect();
        let bias = Tensor::from_vec(mask, (1, 1, t, t), &candle_core::Device::Cpu).unwrap();
        let w = Var::from_tensor(&seeded(&[heads * d, 3 * heads * d], 1, 0.3)).unwrap();
        let x = seeded(&[b * t, heads * d], 2, 1.0);
        let probe = seeded(&[b, t, heads * d], 3, 1.0);
        let region: Arc<Region> = {
            let bias = bias.clone();
            Arc::new(move |q, k, v| {
                let split = |x: &Tensor| split_heads(x, heads);
                attention(&split(q)?, &split(k)?, &split(v)?, &bias)
            })
        };
        let run = |recomputed: bool| {
            let qkv = x
                .matmul(w.as_tensor())
                .unwrap()
                .reshape((b, t, 3 * heads * d))
                .unwrap();
            let part = |i: usize| qkv.narrow(2, i * heads * d, heads * d).unwrap();
            let (q, k, v) = (part(0), part(1), part(2));
            let y = match recomputed {
                true => recompute(&q, &k, &v, region.clone()).unwrap(),
                false => region(&q, &k, &v).unwrap(),
            };
            let grads = (&y * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (y, grads.get(w.as_tensor()).unwrap().clone())
        };
        let (y_plain, g_plain) = run(false);
        let (y_re, g_re) = run(true);
        assert!(max_diff(&y_plain, &y_re) < 1e-6);
        let scale = max_abs(&g_plain);
        assert!(scale > 0.0);
        assert!(
            max_diff(&g_plain, &g_re) < 1e-5 * scale,
            "{}",
            max_diff(&g_plain, &g_re)
        );
    }
}
