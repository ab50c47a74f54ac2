//! GELU, fused with its backward: the tanh approximation (GPT-2's
//! "gelu_new") and the exact, erf-based GELU (BERT's "gelu").

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
        Ok(x.contiguous()?.apply_op1(Gelu(Variant::Tanh))?)
    } else {
        Ok(x.gelu()?)
    }
}

/// Which GELU an op computes.
#[derive(Clone, Copy)]
enum Variant {
    /// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    Tanh,
    /// x Phi(x), Phi the normal CDF.
    Erf,
}

/// GELU's forward on the CPU; its backward is [`GeluGrad`].
struct Gelu(Variant);

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        match self.0 {
            Variant::Tanh => "fused-gelu-tanh",
            Variant::Erf => "fused-gelu-erf",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s, l, self.name())?;
        let mut out = vec![0f32; x.len()];
        for_chunks(&mut out, |at, o| {
            let x = &x[at..at + o.len()];
            match self.0 {
                Variant::Tanh => gelu_chunk(x, o),
                Variant::Erf => gelu_erf_chunk(x, o),
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad.contiguous()?,
            &GeluGrad(self.0),
        )?))
    }
}

/// d gelu / dx times the incoming gradient: (x, dy) -> dx.
struct GeluGrad(Variant);

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        match self.0 {
            Variant::Tanh => "fused-gelu-tanh-grad",
            Variant::Erf => "fused-gelu-erf-grad",
        }
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
            let (x, dy) = (&x[at..at + o.len()], &dy[at..at + o.len()]);
            match self.0 {
                Variant::Tanh => gelu_grad_chunk(x, dy, o),
                Variant::Erf => gelu_erf_grad_chunk(x, dy, o),
            }
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

// ---------------------------------------------------------------- GELU (erf)

/// 1 / sqrt(2).
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi).
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
// Abramowitz & Stegun 7.1.26: erf(z) = 1 - t (a1 + t (a2 + ... + t a5)) e^-z^2,
// t = 1 / (1 + p z), z >= 0, |error| <= 1.5e-7.
const ERF_P: f32 = 0.327_591_1;
const ERF_A: [f32; 5] = [
    0.254_829_6,
    -0.284_496_74,
    1.421_413_7,
    -1.453_152,
    1.061_405_4,
];

/// The exact GELU (transformers' "gelu", torch's default): x Phi(x), with
/// Phi(x) = 0.5 (1 + erf(x / sqrt 2)), as Candle's `gelu_erf`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if fused_path(&[x]) {
        Ok(x.contiguous()?.apply_op1(Gelu(Variant::Erf))?)
    } else {
        Ok(x.gelu_erf()?)
    }
}

/// (Phi(x), e^(-x^2 / 2)): the normal CDF, and the exp its density needs.
/// For x < 0, Phi(x) = 0.5 erfc(|x| / sqrt 2) comes straight from the
/// series, without the cancellation of 1 - erf.
#[inline(always)]
fn normal_cdf_and_exp(x: f32) -> (f32, f32) {
    let z = x.abs() * FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + ERF_P * z);
    let poly = t * (ERF_A[0] + t * (ERF_A[1] + t * (ERF_A[2] + t * (ERF_A[3] + t * ERF_A[4]))));
    let e = fast_math::exp(-z * z);
    let tail = 0.5 * poly * e; // 0.5 erfc(z)
    (if x >= 0.0 { 1.0 - tail } else { tail }, e)
}

wide_simd_fn! {
    fn gelu_erf_chunk(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * normal_cdf_and_exp(v).0;
        }
    }
}

wide_simd_fn! {
    /// out = dy * (Phi(x) + x phi(x)), phi(x) = e^(-x^2 / 2) / sqrt(2 pi).
    fn gelu_erf_grad_chunk(x: &[f32], dy: &[f32], out: &mut [f32]) {
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(dy) {
            let (cdf, e) = normal_cdf_and_exp(v);
            *o = g * (cdf + v * e * FRAC_1_SQRT_2PI);
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

    #[test]
    fn gelu_erf_matches_candle_gelu_erf_in_value_and_gradient() {
        let x = Var::from_tensor(&seeded(&[3, 70, 130], 2, 5.0)).unwrap();
        compare(
            &[x],
            |v| gelu_erf(&v[0]).unwrap(),
            |v| v[0].gelu_erf().unwrap(),
            1e-5,
        );
    }

    #[test]
    fn gelu_erf_by_hand_and_far_from_zero() {
        // Phi(1) = 0.841344746, Phi(-1) = 0.158655254, phi(1) = 0.241970725.
        let x = Var::new(&[-1e4f32, -30.0, -1.0, 0.0, 1.0, 30.0, 1e4], &Device::Cpu).unwrap();
        let y = gelu_erf(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let want = [0.0, 0.0, -0.158_655_25, 0.0, 0.841_344_8, 30.0, 1e4];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{y:?}");
        }
        let g = gelu_erf(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx = g.get(&x).unwrap().to_vec1::<f32>().unwrap();
        // d/dx at +-1: Phi(+-1) +- phi(1) = 1.083315471 and -0.083315471.
        let want = [0.0, 0.0, -0.083_315_47, 0.5, 1.083_315_5, 1.0, 1.0];
        for (a, b) in dx.iter().zip(want) {
            assert!((a - b).abs() <= 1e-6, "{dx:?}");
        }
    }
}
