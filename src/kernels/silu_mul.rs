//! SwiGLU's silu(gate) * up, fused with its backward.

use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result as CResult, Shape, Tensor,
};

use super::fast_math::{self, wide_simd_fn};
use super::{f32_data, for_chunks, fused_path, SharedOut};
use crate::Result;

/// silu(gate) * up, the gated activation of Llama's MLP, with silu(x) = x sigmoid(x).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused_path(&[gate, up]) && gate.shape() == up.shape() {
        Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)?)
    } else {
        Ok((gate.silu()? * up)?)
    }
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "fused-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let gate = f32_data(s1, l1, self.name())?;
        let up = f32_data(s2, l2, self.name())?;
        if gate.len() != up.len() {
            bail!("{}: gate and up differ in shape", self.name())
        }
        let mut out = vec![0f32; gate.len()];
        for_chunks(&mut out, |at, o| {
            let n = o.len();
            silu_mul_chunk(&gate[at..at + n], &up[at..at + n], o)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        // One kernel returns d gate and d up stacked on a new first dimension.
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SiluMulGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// (gate, up, dy) -> [d gate; d up]: with s = sigmoid(gate),
/// d gate = dy * up * s * (1 + gate * (1 - s)), d up = dy * gate * s.
struct SiluMulGrad;

impl CustomOp3 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "fused-silu-mul-grad"
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
        let gate = f32_data(s1, l1, self.name())?;
        let up = f32_data(s2, l2, self.name())?;
        let dy = f32_data(s3, l3, self.name())?;
        let n = gate.len();
        let mut out = vec![0f32; 2 * n];
        let (d_gate, d_up) = out.split_at_mut(n);
        let d_up_out = SharedOut(d_up.as_mut_ptr());
        for_chunks(d_gate, |at, dg| {
            let m = dg.len();
            // SAFETY: chunks are disjoint and at + m <= n, the length of d_up.
            let du = unsafe { d_up_out.slice(at, m) };
            let ins = (&gate[at..at + m], &up[at..at + m], &dy[at..at + m]);
            silu_mul_grad_chunk(ins, dg, du)
        });
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

wide_simd_fn! {
    fn silu_mul_chunk(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + fast_math::exp(-g)) * u;
        }
    }
}

wide_simd_fn! {
    fn silu_mul_grad_chunk(ins: (&[f32], &[f32], &[f32]), d_gate: &mut [f32], d_up: &mut [f32]) {
        let (gate, up, dy) = ins;
        for j in 0..d_gate.len() {
            let (g, u, dy) = (gate[j], up[j], dy[j]);
            let s = 1.0 / (1.0 + fast_math::exp(-g));
            d_gate[j] = dy * u * s * (1.0 + g * (1.0 - s));
            d_up[j] = dy * g * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::Var;

    #[test]
    fn silu_mul_matches_the_composed_op_in_value_and_gradient() {
        // Large enough for the parallel path; gates over the silu's bend and tails.
        let vars = [
            Var::from_tensor(&seeded(&[3, 70, 200], 41, 8.0)).unwrap(),
            Var::from_tensor(&seeded(&[3, 70, 200], 42, 2.0)).unwrap(),
        ];
        compare(
            &vars,
            |v| silu_mul(&v[0], &v[1]).unwrap(),
            |v| (v[0].silu().unwrap() * &v[1]).unwrap(),
            1e-5,
        );
    }
}
