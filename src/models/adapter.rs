//! A LoRA adapter at run time: the update a linear layer adds, and the
//! dropout on its input. What gets an adapter, and the files, are in
//! [`super::lora`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::Tensor;

use crate::kernels::matmul_weight_t;
use crate::{HostRng, Result};

/// Dropout on an adapter's input (peft's `lora_dropout`), its masks drawn
/// on the host from (seed, optimizer step, call within the step): a resumed
/// run draws the same masks without saving any RNG state.
pub struct Dropout {
    p: f64,
    seed: u64,
    step: AtomicU64,
    calls: AtomicU64,
    /// Off outside training forwards (peft's `model.eval()`).
    active: AtomicBool,
}

impl Dropout {
    pub fn new(p: f64, seed: u64) -> Arc<Self> {
        Arc::new(Self {
            p,
            seed,
            step: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            active: AtomicBool::new(true),
        })
    }

    /// Starts the masks of optimizer step `step`.
    pub fn begin_step(&self, step: u64) {
        self.step.store(step, Ordering::SeqCst);
        self.calls.store(0, Ordering::SeqCst);
    }

    /// How many masks this step has drawn: where a recomputed layer
    /// (activation checkpointing) rewinds to, to draw its masks again.
    pub fn position(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Sets the count of masks drawn this step (see [`Self::position`]).
    pub fn set_position(&self, calls: u64) {
        self.calls.store(calls, Ordering::SeqCst);
    }

    /// Training (masks drawn) or evaluation (identity).
    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::SeqCst);
    }

    /// The next mask for an input like `x` (0 or 1 / (1 - p) per element),
    /// or None when dropout is off.
    fn mask(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if self.p == 0.0 || !self.active.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let step = self.step.load(Ordering::SeqCst);
        let mut rng = HostRng::stream(self.seed, &format!("lora-dropout/{step}/{call}"));
        let keep = (1.0 / (1.0 - self.p)) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.uniform() < self.p { 0.0 } else { keep })
            .collect();
        Ok(Some(
            Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?,
        ))
    }

    #[cfg(test)]
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.mask(x)? {
            Some(mask) => (x * mask)?,
            None => x.clone(),
        })
    }
}

/// The adapter of one linear layer.
#[derive(Clone)]
pub struct Adapter {
    /// (r, in).
    a: Tensor,
    /// (out, r).
    b: Tensor,
    scaling: f64,
    dropout: Option<Arc<Dropout>>,
}

impl Adapter {
    pub(crate) fn new(a: Tensor, b: Tensor, scaling: f64, dropout: Option<Arc<Dropout>>) -> Self {
        Self {
            a,
            b,
            scaling,
            dropout,
        }
    }

    pub fn dropout(&self) -> Option<&Arc<Dropout>> {
        self.dropout.as_ref()
    }

    /// The adapted layer's output for x (N, in): the base product `base`
    /// (W, its bias, whether W is stored (in, out)) plus scaling B A
    /// dropout(x). One fused op on the CPU (see `kernels::lora`), else
    /// `base_product` plus the composed update.
    pub fn forward(
        &self,
        x: &Tensor,
        base: (&Tensor, Option<&Tensor>, bool),
        base_product: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mask = match &self.dropout {
            Some(d) => d.mask(x)?,
            None => None,
        };
        let (weight, bias, fan_in_fan_out) = base;
        let parts = crate::kernels::LoraLinearParts {
            weight,
            bias,
            fan_in_fan_out,
            scaling: self.scaling,
            mask: mask.clone(),
        };
        if let Some(y) = crate::kernels::lora_linear(x, &self.a, &self.b, parts)? {
            return Ok(y);
        }
        let xd = match &mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        // The update's products are read by their backward (h by B's
        // gradient): none skips its value, even as a layer's last product.
        let update = crate::kernels::recompute::values_needed(|| -> Result<Tensor> {
            let h = (matmul_weight_t(&xd, &self.a)? * self.scaling)?;
            matmul_weight_t(&h, &self.b)
        })?;
        Ok((base_product()? + update)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn dropout_masks_repeat_for_the_same_step_and_scale_the_kept() {
        let d = Dropout::new(0.5, 7);
        let x = Tensor::ones((4, 64), DType::F32, &Device::Cpu).unwrap();
        d.begin_step(3);
        let a = d
            .apply(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = d
            .apply(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        d.begin_step(3);
        let again = d
            .apply(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, again, "same step, same call: same mask");
        assert_ne!(a, b, "the next call draws a new mask");
        assert!(a.iter().all(|&v| v == 0.0 || v == 2.0));
        let dropped = a.iter().filter(|&&v| v == 0.0).count();
        assert!(
            (64..192).contains(&dropped),
            "{dropped} of 256 dropped at p = 0.5"
        );
        d.set_active(false);
        let off = d
            .apply(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(off.iter().all(|&v| v == 1.0), "evaluation drops nothing");
    }
}
