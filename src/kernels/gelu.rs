//! GELU with the tanh approximation, fused with its backward.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result as CResult, Shape, Tensor};

use super::fast_math::{self, wide_simd_fn};
use super::{f32_data, for_chunks, fused_path};
use crate::Result;

const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044_715;

/// GELU with the tanh approximation (transformers' "gelu_new"), as Candle's
/// `gelu`: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if fused_path(&[x]) {
        Ok(x.contiguous()?.apply_op1(GeluTanh)?)
    } else {
        Ok(x.gelu()?)
    }
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s, l, self.name())?;
        let mut out = vec![0f32; x.len()];
        for_chunks(&mut out, |at, o| gelu_chunk(&x[at..at + o.len()], o));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluTanhGrad)?,
        ))
    }
}

/// d gelu / dx times the incoming gradient: (x, dy) -> dx.
struct GeluTanhGrad;

impl CustomOp2 for GeluTanhGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, self.name())?;
        let dy = f32_data(s2, l2, self.name())?;
        let mut out = vec![0f32; x.len()];
        for_chunks(&mut out, |at, o| {
            let n = o.len();
            gelu_grad_chunk(&x[at..at + n], &dy[at..at + n], o)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// 0.5 (1 + tanh u) = sigmoid(2u) = 1 / (1 + e^-2u), with
/// u = sqrt(2/pi) (x + 0.044715 x^3): one exp and one division, where tanh
/// costs an exp, a division and a series for small |u|. For very negative u,
/// e^-2u is +inf and the sigmoid 0, as it should be.
#[inline(always)]
fn gelu_sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + fast_math::exp(-2.0 * SQRT_TWO_OVER_PI * v * (1.0 + GELU_A * v * v)))
}

wide_simd_fn! {
    fn gelu_chunk(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * gelu_sigmoid(v);
        }
    }
}

wide_simd_fn! {
    /// out = dy * d gelu(x) / dx, with s = sigmoid(2u):
    /// d (x s) / dx = s + x * 2 s (1 - s) * du/dx.
    fn gelu_grad_chunk(x: &[f32], dy: &[f32], out: &mut [f32]) {
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(dy) {
            let s = gelu_sigmoid(v);
            let du = SQRT_TWO_OVER_PI * (1.0 + 3.0 * GELU_A * v * v);
            *o = g * (s + 2.0 * v * s * (1.0 - s) * du);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn gelu_matches_candle_gelu_in_value_and_gradient() {
        let x = Var::from_tensor(&seeded(&[3, 70, 130], 1, 4.0)).unwrap();
        compare(
            &[x],
            |v| gelu_tanh(&v[0]).unwrap(),
            |v| v[0].gelu().unwrap(),
            1e-5,
        );
    }

    #[test]
    fn gelu_saturates_without_nan_far_from_zero() {
        let x = Var::new(
            &[-1e4f32, -100.0, -12.0, 0.0, 12.0, 100.0, 1e4],
            &Device::Cpu,
        )
        .unwrap();
        let y = gelu_tanh(x.as_tensor()).unwrap();
        assert_eq!(
            y.to_vec1::<f32>().unwrap(),
            x.gelu().unwrap().to_vec1::<f32>().unwrap()
        );
        let g = y.sum_all().unwrap().backward().unwrap();
        let dx = g.get(&x).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(dx, [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn other_dtypes_take_the_composed_path() {
        let x = seeded(&[2, 8], 10, 2.0).to_dtype(DType::BF16).unwrap();
        let y = gelu_tanh(&x).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let want = x.gelu().unwrap().to_dtype(DType::F32).unwrap();
        assert!(max_diff(&y.to_dtype(DType::F32).unwrap(), &want) == 0.0);
    }
}
