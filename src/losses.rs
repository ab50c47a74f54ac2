//! The losses, each a small pure function over tensors with unit tests
//! against values worked by hand.

use candle_core::Tensor;

use crate::Result;

/// -log(sigmoid(x)) = (|x| - x) / 2 + log(1 + exp(-|x|)): finite for any x,
/// and its autograd gradient is exact everywhere (-1/2 at 0). The tempting
/// `-(min(x, 0) - log(1 + exp(-|x|)))` gets -1 at 0 under Candle's autograd
/// (ties in `minimum` split the gradient, d|x|/dx at 0 is +1).
pub fn neg_logsigmoid(x: &Tensor) -> Result<Tensor> {
    let abs = x.abs()?;
    let linear = ((&abs - x)? * 0.5)?;
    let soft = (abs.neg()?.exp()? + 1.0)?.log()?;
    Ok((linear + soft)?)
}

/// The Bradley-Terry reward-model loss of TRL's RewardTrainer:
/// mean(-logsigmoid(r_chosen - r_rejected - margin)), plus
/// `center_coef * mean((r_chosen + r_rejected)^2)` when given (keeps rewards
/// centred at 0; Eisenstein et al., 2023). Rewards and margins are (B,).
pub fn bradley_terry(
    chosen: &Tensor,
    rejected: &Tensor,
    margin: Option<&Tensor>,
    center_coef: Option<f64>,
) -> Result<Tensor> {
    let mut diff = (chosen - rejected)?;
    if let Some(m) = margin {
        diff = (diff - m)?;
    }
    let mut loss = neg_logsigmoid(&diff)?.mean_all()?;
    if let Some(coef) = center_coef {
        let center = (chosen + rejected)?.sqr()?.mean_all()?;
        loss = (loss + (center * coef)?)?;
    }
    Ok(loss)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(candle_core::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn neg_logsigmoid_and_its_gradient_are_exact_everywhere() {
        let xs = [-3000.0f64, -20.0, -1.0, 0.0, 1.0, 20.0, 3000.0];
        let x = Var::new(&xs[..], &Device::Cpu).unwrap();
        let y = neg_logsigmoid(x.as_tensor()).unwrap();
        // By hand: -log(sigmoid(x)) = log(1 + e^-x); at 0, ln 2; for x -> -inf, -x.
        let want = [
            3000.0,
            20.0 + (-20f64).exp().ln_1p(),
            1.0 + (-1f64).exp().ln_1p(),
            2f64.ln(),
            (-1f64).exp().ln_1p(),
            (-20f64).exp().ln_1p(),
            0.0,
        ];
        for (a, b) in values(&y).iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        // d/dx = -(1 - sigmoid(x)) = -sigmoid(-x): -1 at -3000, -1/2 at 0, 0 at 3000.
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = values(grads.get(x.as_tensor()).unwrap());
        for (x, g) in xs.iter().zip(g) {
            let want = -1.0 / (1.0 + x.exp());
            assert!((g - want).abs() < 1e-12, "x={x}: {g} vs {want}");
        }
    }

    #[test]
    fn bradley_terry_by_hand() {
        let dev = Device::Cpu;
        let c = Tensor::new(&[2.0f64, 0.0], &dev).unwrap();
        let r = Tensor::new(&[1.0f64, 0.0], &dev).unwrap();
        // differences 1 and 0: mean(log(1 + e^-1), ln 2)
        let want = ((-1f64).exp().ln_1p() + 2f64.ln()) / 2.0;
        let l = bradley_terry(&c, &r, None, None)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((l - want).abs() < 1e-12);
        // a margin of 1 on the first pair: its difference becomes 0.
        let m = Tensor::new(&[1.0f64, 0.0], &dev).unwrap();
        let l = bradley_terry(&c, &r, Some(&m), None)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((l - 2f64.ln()).abs() < 1e-12);
        // centering: + 0.01 * mean((2+1)^2, 0^2) = 0.045
        let l = bradley_terry(&c, &r, None, Some(0.01))
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((l - (want + 0.045)).abs() < 1e-12);
        // huge differences stay finite
        let big = Tensor::new(&[5000.0f64, -5000.0], &dev).unwrap();
        let zero = Tensor::new(&[0.0f64, 0.0], &dev).unwrap();
        let l = bradley_terry(&big, &zero, None, None)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((l - 2500.0).abs() < 1e-9, "{l}");
    }
}
