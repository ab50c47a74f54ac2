//! The training core every trainer (SFT, reward, PPO) shares: gradient
//! accumulation, global-norm clipping, the non-finite guard, the learning-rate
//! schedule and AdamW, behind two calls: [`TrainCore::backward`] once per
//! micro-batch and [`TrainCore::step`] once per optimizer step.
//!
//! It does not own the loop: each trainer writes its own, top to bottom.

pub mod adamw;
pub mod schedule;

use candle_core::{DType, Result as CResult, Tensor};

pub use adamw::{AdamW, AdamWParams};
pub use schedule::LrSchedule;

use crate::config::TrainConfig;
use crate::{Error, Result};

/// Gradients aligned with the optimizer's variables (`None`: no gradient).
#[derive(Debug, Clone)]
pub struct ParamGrads(pub Vec<Option<Tensor>>);

impl ParamGrads {
    /// Backpropagates `loss` and picks the optimizer's variables' gradients.
    /// They are detached: Candle records the ops that computed them (a weight's
    /// gradient is x^T g, x an activation), so each would otherwise keep the
    /// whole forward graph, every activation, alive until the optimizer step
    /// (the memory this keeps: docs/benchmarks-history.md, "Design measurements").
    /// Layers recomputed in the backward (activation checkpointing) hand
    /// theirs over on the way ([`crate::kernels::gradients`]).
    pub fn backward(loss: &Tensor, optimizer: &AdamW) -> Result<Self> {
        let vars: Vec<&Tensor> = optimizer.vars().map(|(_, v)| v.as_tensor()).collect();
        Ok(ParamGrads(crate::kernels::gradients(loss, &vars)?))
    }

    /// [`Self::backward`] added to `self` (the micro-batches so far): in
    /// place as the backward goes where every sum has a storage of its own
    /// ([`crate::kernels::recompute::gradients_into`]), else with [`Self::add`].
    pub fn add_backward(self, loss: &Tensor, optimizer: &AdamW) -> Result<Self> {
        if !self.storage_is_exclusive() {
            let mut sum = self;
            sum.add(Self::backward(loss, optimizer)?)?;
            return Ok(sum);
        }
        let vars: Vec<&Tensor> = optimizer.vars().map(|(_, v)| v.as_tensor()).collect();
        let into = crate::kernels::recompute::gradients_into(loss, &vars, self.0)?;
        Ok(ParamGrads(into))
    }

    /// Adds `other` element-wise (gradient accumulation), into this
    /// micro-batch sum's own tensors where no two of them share storage (a
    /// backward may give two variables one gradient tensor): no third copy
    /// of every gradient while the two are added.
    pub fn add(&mut self, other: ParamGrads) -> Result<()> {
        let exclusive = self.storage_is_exclusive();
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine = match (mine.take(), theirs) {
                (Some(a), Some(b)) if exclusive => {
                    Some(crate::kernels::recompute::accumulate(Some(a), b)?)
                }
                (Some(a), Some(b)) => Some((a + b)?),
                (a, b) => a.or(b),
            };
        }
        Ok(())
    }

    /// Whether every gradient here has a storage of its own.
    fn storage_is_exclusive(&self) -> bool {
        let mut seen = std::collections::HashSet::new();
        self.0.iter().flatten().all(|g| {
            let (storage, _) = g.storage_and_layout();
            seen.insert(&*storage as *const candle_core::Storage as usize)
        })
    }

    pub fn scale(&mut self, factor: f64) -> Result<()> {
        if factor == 1.0 {
            return Ok(()); // one micro-batch: no copy of every gradient
        }
        // In place where no two gradients share a storage: no copy of each.
        let exclusive = self.storage_is_exclusive();
        for g in self.0.iter_mut().flatten() {
            match exclusive && crate::kernels::fused_path(&[g]) && g.is_contiguous() {
                true => g.inplace_op1(&ScaleInto(factor))?,
                false => *g = (&*g * factor)?,
            }
        }
        Ok(())
    }

    /// The L2 norm of all gradients together, computed in f32 (one host sync).
    /// (Summing in f64 instead changes the clipping coefficient in its last
    /// bits, which is enough to send a sampled RL run down another path; see
    /// docs/benchmarks-history.md, "Design measurements".) On the CPU each
    /// gradient's sum of squares is taken without a tensor of its squares,
    /// in the same order and so to the same bits.
    pub fn global_norm(&self) -> Result<f64> {
        let on_host: Option<Vec<f32>> = (self.0.iter().flatten())
            .map(crate::kernels::squares::sum_of_squares)
            .collect();
        if let Some(sums) = on_host {
            let total = sums.into_iter().reduce(|t, sq| t + sq);
            return Ok(total.map_or(0.0, |t| (t as f64).sqrt()));
        }
        let mut total: Option<Tensor> = None;
        for g in self.0.iter().flatten() {
            let sq = g.to_dtype(DType::F32)?.sqr()?.sum_all()?;
            total = Some(match total {
                Some(t) => (t + sq)?,
                None => sq,
            });
        }
        match total {
            Some(t) => Ok((t.to_scalar::<f32>()? as f64).sqrt()),
            None => Ok(0.0),
        }
    }

    /// Scales the gradients so their global norm is at most `max_norm`, as
    /// torch's clip_grad_norm_ does. Returns the norm before clipping.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.global_norm()?;
        self.scale(clip_coefficient(norm, max_norm))?;
        Ok(norm)
    }
}

/// x * factor in place, as Candle's `x * factor` computes it (its affine
/// op: x * factor + 0, in f32).
struct ScaleInto(f64);

impl candle_core::InplaceOp1 for ScaleInto {
    fn name(&self) -> &'static str {
        "scale-into"
    }

    fn cpu_fwd(&self, s: &mut candle_core::CpuStorage, l: &candle_core::Layout) -> CResult<()> {
        let (candle_core::CpuStorage::F32(v), Some((start, end))) = (s, l.contiguous_offsets())
        else {
            candle_core::bail!("scale-into: a contiguous f32 tensor only")
        };
        let (mul, add) = (self.0 as f32, 0f32);
        crate::kernels::for_pieces(&mut v[start..end], crate::kernels::CHUNK, |_, piece| {
            piece.iter_mut().for_each(|x| *x = *x * mul + add)
        });
        Ok(())
    }
}

/// torch's clip_grad_norm_ coefficient: max_norm / (norm + 1e-6), capped at
/// 1; 1 (no clipping) for a non-finite norm or `max_norm` 0 (clipping off).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    let coef = max_norm / (norm + 1e-6);
    match norm.is_finite() && max_norm > 0.0 && coef < 1.0 {
        true => coef,
        false => 1.0,
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    /// The weights were updated.
    Applied { grad_norm: f64, lr: f64 },
    /// A loss or gradient was NaN or infinite: the weights were left alone.
    Skipped { what: String },
}

/// How many optimizer steps a run over `items` examples takes: the
/// micro-batch of each rank (capped at the data), steps per epoch, and the
/// total (`max_steps`, else `num_train_epochs` epochs, at least 1). A step
/// takes micro-batch x accumulation x ranks examples (TRL's global batch).
pub fn step_plan(t: &TrainConfig, items: usize) -> (usize, u64, u64) {
    let ranks = crate::dist::world().size;
    let batch = t.per_device_train_batch_size.min(items / ranks).max(1);
    let per_epoch = items.div_ceil(batch * t.gradient_accumulation_steps * ranks) as u64;
    let total = t
        .max_steps
        .unwrap_or_else(|| ((per_epoch as f64) * t.num_train_epochs).ceil() as u64)
        .max(1);
    (batch, per_epoch, total)
}

/// One part of a loss for [`TrainCore::backward_concurrently`]: it computes
/// its loss (and anything else `S`) on the thread it is given.
pub type LossPart<'a, S> = Box<dyn FnOnce() -> Result<(Tensor, S)> + Send + 'a>;

/// Accumulation, clipping, the non-finite guard, the schedule and AdamW.
pub struct TrainCore {
    pub optimizer: AdamW,
    pub schedule: LrSchedule,
    /// 0 turns clipping off.
    max_grad_norm: f64,
    max_nonfinite_steps: usize,
    pending: Option<ParamGrads>,
    micro_batches: usize,
    nonfinite_loss: Option<String>,
    nonfinite_in_a_row: usize,
}

impl TrainCore {
    pub fn new(optimizer: AdamW, train: &TrainConfig, total_steps: u64) -> Self {
        Self {
            optimizer,
            schedule: LrSchedule::from_config(train, total_steps),
            max_grad_norm: train.max_grad_norm,
            max_nonfinite_steps: train.max_nonfinite_steps,
            pending: None,
            micro_batches: 0,
            nonfinite_loss: None,
            nonfinite_in_a_row: 0,
        }
    }

    /// Backpropagates one micro-batch's loss and adds its gradients to the
    /// pending step; returns the loss value. A non-finite loss is not
    /// backpropagated and makes the coming step a skipped one.
    pub fn backward(&mut self, loss: &Tensor) -> Result<f64> {
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        self.micro_batches += 1;
        if !value.is_finite() {
            self.nonfinite_loss
                .get_or_insert_with(|| format!("loss = {value}"));
            return Ok(value);
        }
        self.pending = Some(match self.pending.take() {
            Some(sum) => sum.add_backward(loss, &self.optimizer)?,
            None => ParamGrads::backward(loss, &self.optimizer)?,
        });
        Ok(value)
    }

    /// [`Self::backward`] for a loss that is a sum of parts over disjoint
    /// parameters (PPO's policy and critic losses), each part's forward and
    /// backward on a thread of its own. On a small model the ops are too
    /// short to split across cores; the two models' graphs are not. Returns
    /// the summed loss value and what each part returned beside its loss.
    pub fn backward_concurrently<S: Send>(
        &mut self,
        parts: Vec<LossPart<'_, S>>,
    ) -> Result<(f64, Vec<S>)> {
        let optimizer = &self.optimizer;
        let results: Vec<Result<(f64, Option<ParamGrads>, S)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .into_iter()
                .map(|part| {
                    scope.spawn(move || {
                        let (loss, extra) = part()?;
                        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
                        let grads = match value.is_finite() {
                            true => Some(ParamGrads::backward(&loss, optimizer)?),
                            false => None,
                        };
                        Ok((value, grads, extra))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a loss part panicked"))
                .collect()
        });
        self.micro_batches += 1;
        let (mut total, mut extras) = (0.0, Vec::new());
        let mut summed: Option<ParamGrads> = None;
        for result in results {
            let (value, grads, extra) = result?;
            total += value;
            extras.push(extra);
            match (&mut summed, grads) {
                (_, None) => {}
                (Some(sum), Some(g)) => sum.add(g)?,
                (None, Some(g)) => summed = Some(g),
            }
        }
        if !total.is_finite() {
            self.nonfinite_loss
                .get_or_insert_with(|| format!("loss = {total}"));
            return Ok((total, extras));
        }
        if let Some(grads) = summed {
            match &mut self.pending {
                Some(p) => p.add(grads)?,
                None => self.pending = Some(grads),
            }
        }
        Ok((total, extras))
    }

    /// One optimizer step at global step `step` (0-based): averages the
    /// accumulated gradients over micro-batches, checks they are finite,
    /// clips them, and applies AdamW at the scheduled learning rate.
    /// Errors with [`Error::NonFinite`] after `max_nonfinite_steps` skipped steps in a row.
    pub fn step(&mut self, step: u64) -> Result<StepOutcome> {
        let micro_batches = std::mem::take(&mut self.micro_batches).max(1);
        let pending = self.pending.take();
        let mut what = self.nonfinite_loss.take();
        // Data parallelism: a non-finite loss on any rank skips the step on every rank.
        let world = crate::dist::world();
        if world.any(what.is_some()) && what.is_none() {
            what = Some("a non-finite loss on another rank".into());
        }
        let mut applied = None;
        if what.is_none() {
            let mut grads = pending.unwrap_or_else(|| ParamGrads(vec![None; self.optimizer.len()]));
            // Summed over the ranks before clipping: each rank's loss is its
            // share of the global batch's (dist::World::share).
            if !world.is_single() {
                let like: Vec<Tensor> = (self.optimizer.vars())
                    .map(|(_, v)| v.as_tensor().clone())
                    .collect();
                world.sum_gradients(&mut grads.0, &like)?;
            }
            grads.scale(1.0 / micro_batches as f64)?;
            let norm = grads.global_norm()?;
            if norm.is_finite() {
                let lr = self.schedule.lr(step);
                // Clipping's coefficient is applied inside AdamW's pass.
                let coef = clip_coefficient(norm, self.max_grad_norm);
                self.optimizer.step_scaled(&grads.0, lr, coef)?;
                applied = Some(StepOutcome::Applied {
                    grad_norm: norm,
                    lr,
                });
            } else {
                what = Some(format!("gradient norm = {norm}"));
            }
        }
        if let Some(outcome) = applied {
            self.nonfinite_in_a_row = 0;
            return Ok(outcome);
        }
        let what = what.unwrap_or_default();
        self.nonfinite_in_a_row += 1;
        tracing::warn!(
            "step {step} skipped: {what} ({} in a row)",
            self.nonfinite_in_a_row
        );
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps {
            return Err(Error::NonFinite {
                count: self.nonfinite_in_a_row,
                step,
                what,
            });
        }
        Ok(StepOutcome::Skipped { what })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn grads(values: &[&[f32]]) -> ParamGrads {
        ParamGrads(
            values
                .iter()
                .map(|v| Some(Tensor::new(*v, &Device::Cpu).unwrap()))
                .collect(),
        )
    }

    #[test]
    fn clipping_scales_to_the_threshold_and_reports_the_norm_before() {
        // Norm of [3, 4] and [12] is 13.
        let mut g = grads(&[&[3.0, 4.0], &[12.0]]);
        let before = g.clip_global_norm(1.0).unwrap();
        assert!((before - 13.0).abs() < 1e-5);
        assert!((g.global_norm().unwrap() - 1.0).abs() < 1e-5);
        let a = g.0[0].as_ref().unwrap().to_vec1::<f32>().unwrap();
        assert!((a[0] - 3.0 / 13.0).abs() < 1e-5 && (a[1] - 4.0 / 13.0).abs() < 1e-5);
        // Below the threshold nothing changes.
        let mut small = grads(&[&[0.3, 0.4]]);
        small.clip_global_norm(1.0).unwrap();
        assert_eq!(
            small.0[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.3, 0.4]
        );
    }

    /// The fused linear layers' weight and bias gradients, a weight used
    /// twice included, equal the composed ops' (a frozen bias beside them
    /// also takes a gradient in the store, which the optimizer does not ask
    /// for).
    #[test]
    fn fused_gradients_equal_the_composed_ones() {
        let seeded = crate::kernels::testing::seeded;
        let w = Var::from_tensor(&seeded(&[5, 4], 1, 0.5)).unwrap();
        let b = Var::from_tensor(&seeded(&[5], 2, 0.5)).unwrap();
        let frozen_b = Var::from_tensor(&seeded(&[5], 3, 0.5)).unwrap();
        let x = Var::from_tensor(&seeded(&[6, 4], 4, 1.0)).unwrap();
        let loss = |fused: bool| {
            let lin = |b: &Tensor| match fused {
                true => crate::kernels::linear(x.as_tensor(), &w, b, true).unwrap(),
                false => x.matmul(&w.t().unwrap()).unwrap().broadcast_add(b).unwrap(),
            };
            let (h, y) = (lin(&b), lin(&frozen_b));
            let z = (h.sqr().unwrap() + y.tanh().unwrap()).unwrap();
            (z.sum_all().unwrap() + w.sum_all().unwrap().exp().unwrap()).unwrap()
        };
        let vars = vec![("w".to_string(), w.clone()), ("b".to_string(), b.clone())];
        let opt = AdamW::new(vars, AdamWParams::default()).unwrap();
        let fused = ParamGrads::backward(&loss(true), &opt).unwrap();
        let composed = ParamGrads::backward(&loss(false), &opt).unwrap();
        assert_eq!(fused.0.len(), 2);
        for (a, b) in composed.0.iter().zip(&fused.0) {
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            let diff = crate::kernels::testing::max_diff(a, b);
            assert!(diff <= 1e-6 * crate::kernels::testing::max_abs(a), "{diff}");
        }
    }

    /// Candle's store as vendor/candle-core patches it: a tensor's first
    /// gradient is kept as it comes and later ones are added, so a tensor
    /// used several times (both sides of one add, a concatenation's views,
    /// a product) gets the sum; an op whose backward returns a gradient of
    /// the wrong shape is an error, as upstream's zeros + gradient was.
    #[test]
    fn the_patched_store_sums_every_use_and_checks_shapes() {
        let x = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let c = Tensor::cat(&[x.as_tensor(), x.as_tensor()], 0).unwrap();
        let loss = ((x.as_tensor() + x.as_tensor()).unwrap().sum_all().unwrap()
            + (x.as_tensor() * 3.0).unwrap().sum_all().unwrap()
            + (&c * &c).unwrap().sum_all().unwrap()
            + x.sqr().unwrap().sum_all().unwrap())
        .unwrap();
        let store = loss.backward().unwrap();
        // d/dx: 2 (x + x) + 3 + 2 * 2x (the two halves of c) + 2x.
        let got = store.get(&x).unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f32> = [1f32, -2.0, 3.0].iter().map(|v| 5.0 + 6.0 * v).collect();
        assert_eq!(got, want);

        struct WrongShape;
        impl candle_core::CustomOp1 for WrongShape {
            fn name(&self) -> &'static str {
                "wrong-shape"
            }
            fn cpu_fwd(
                &self,
                s: &candle_core::CpuStorage,
                l: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                Ok((s.clone(), l.shape().clone()))
            }
            fn bwd(
                &self,
                _arg: &Tensor,
                _res: &Tensor,
                _grad: &Tensor,
            ) -> candle_core::Result<Option<Tensor>> {
                Ok(Some(Tensor::zeros(
                    2,
                    candle_core::DType::F32,
                    &Device::Cpu,
                )?))
            }
        }
        let y = (x.as_tensor() * 1.0)
            .unwrap()
            .apply_op1(WrongShape)
            .unwrap();
        let err = y.sum_all().unwrap().backward().unwrap_err().to_string();
        assert!(err.contains("shape mismatch"), "{err}");
    }

    #[test]
    fn accumulation_sums_and_keeps_missing_gradients() {
        let mut a = ParamGrads(vec![
            Some(Tensor::new(&[1.0f32], &Device::Cpu).unwrap()),
            None,
        ]);
        let b = grads(&[&[2.0], &[5.0]]);
        a.add(b).unwrap();
        assert_eq!(
            a.0[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            vec![3.0]
        );
        assert_eq!(
            a.0[1].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            vec![5.0]
        );
        assert!(a.0.iter().all(Option::is_some));
    }

    #[test]
    fn accumulating_through_a_recomputed_layer_adds_in_place_the_same_sums() {
        // A layer x -> tanh(x w) under checkpointing, and v after it: w's
        // gradient comes from inside the recomputation, v's from the plain graph.
        let dev = Device::Cpu;
        let w = Var::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev).unwrap();
        let v = Var::new(&[[1.5f32], [-0.5]], &dev).unwrap();
        let opt = AdamW::new(
            vec![("w".into(), w.clone()), ("v".into(), v.clone())],
            AdamWParams::default(),
        )
        .unwrap();
        let loss = |x: &[[f32; 2]; 2]| {
            let x = Var::new(x, &dev).unwrap();
            let wt = w.as_tensor().clone();
            let layer = move |x: &Tensor| Ok(x.matmul(&wt)?.tanh()?);
            let h = crate::kernels::checkpoint(x.as_tensor(), layer, |_| {}).unwrap();
            h.matmul(v.as_tensor())
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let (a, b) = ([[1.0f32, 2.0], [-0.5, 0.3]], [[0.7f32, -1.2], [2.5, 0.1]]);
        let mut plain = ParamGrads::backward(&loss(&a), &opt).unwrap();
        plain
            .add(ParamGrads::backward(&loss(&b), &opt).unwrap())
            .unwrap();
        let first = ParamGrads::backward(&loss(&a), &opt).unwrap();
        let w_sum = first.0[0].as_ref().unwrap().clone();
        let summed = first.add_backward(&loss(&b), &opt).unwrap();
        for (x, y) in plain.0.iter().zip(&summed.0) {
            let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
            let bits = |t: &Tensor| -> Vec<u32> {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|f| f.to_bits())
                    .collect()
            };
            assert_eq!(bits(x), bits(y));
        }
        // w's sum was added into in place: the first micro-batch's tensor holds it.
        assert_eq!(
            w_sum.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            summed.0[0]
                .as_ref()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }

    #[test]
    fn gradients_hold_no_graph() {
        // The gradient of w is h * 1 with h an activation: Candle records that
        // product, so kept as is it would keep h and u's graph alive.
        let u = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let w = Var::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
        let h = (u.as_tensor() * 2.0).unwrap();
        let loss = (&h * w.as_tensor()).unwrap().sum_all().unwrap();
        let store = loss.backward().unwrap();
        assert!(store.get(w.as_tensor()).unwrap().track_op());
        let opt = AdamW::new(
            vec![("u".into(), u.clone()), ("w".into(), w.clone())],
            AdamWParams::default(),
        )
        .unwrap();
        let grads = ParamGrads::backward(&loss, &opt).unwrap();
        for g in grads.0.iter() {
            let g = g.as_ref().unwrap();
            assert!(!g.track_op(), "a gradient still records its graph");
        }
        assert_eq!(
            grads.0[1].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            vec![2.0, 4.0]
        );
    }

    fn core_on(x: &Var, max_nonfinite_steps: usize) -> TrainCore {
        let opt = AdamW::new(vec![("x".into(), x.clone())], AdamWParams::default()).unwrap();
        let cfg = TrainConfig {
            learning_rate: 0.1,
            lr_scheduler_type: crate::config::LrSchedulerType::Constant,
            max_nonfinite_steps,
            ..Default::default()
        };
        TrainCore::new(opt, &cfg, 100)
    }

    #[test]
    fn accumulated_micro_batches_equal_one_big_batch() {
        // Two micro-batches with losses x*1 and x*3 average to the gradient 2:
        // after clipping at 1.0 the gradient is 1 and the AdamW step is lr.
        let x = Var::new(&[0.0f32], &Device::Cpu).unwrap();
        let mut core = core_on(&x, 3);
        core.backward(&(x.as_tensor() * 1.0).unwrap().sum_all().unwrap())
            .unwrap();
        core.backward(&(x.as_tensor() * 3.0).unwrap().sum_all().unwrap())
            .unwrap();
        let out = core.step(0).unwrap();
        match out {
            StepOutcome::Applied { grad_norm, lr } => {
                assert!((grad_norm - 2.0).abs() < 1e-6, "mean of 1 and 3");
                assert_eq!(lr, 0.1);
            }
            other => panic!("{other:?}"),
        }
        assert!((x.as_tensor().to_vec1::<f32>().unwrap()[0] + 0.1).abs() < 1e-6);
    }

    #[test]
    fn non_finite_steps_are_skipped_then_stop_the_run() {
        let x = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut core = core_on(&x, 2);
        // NaN loss: skipped, weight untouched.
        let nan = (x.as_tensor() * f64::NAN).unwrap().sum_all().unwrap();
        core.backward(&nan).unwrap();
        assert!(matches!(core.step(0).unwrap(), StepOutcome::Skipped { .. }));
        assert_eq!(x.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0]);
        // A good step resets the count.
        core.backward(&x.as_tensor().sum_all().unwrap()).unwrap();
        assert!(matches!(core.step(1).unwrap(), StepOutcome::Applied { .. }));
        let w = x.as_tensor().to_vec1::<f32>().unwrap()[0];
        // Finite loss, infinite gradient (sqrt at 0 has an infinite slope).
        let y = Var::new(&[0.0f32], &Device::Cpu).unwrap();
        let mut core = core_on(&y, 2);
        core.backward(&y.as_tensor().sqrt().unwrap().sum_all().unwrap())
            .unwrap();
        match core.step(0).unwrap() {
            StepOutcome::Skipped { what } => assert!(what.contains("gradient norm"), "{what}"),
            other => panic!("{other:?}"),
        }
        core.backward(&y.as_tensor().sqrt().unwrap().sum_all().unwrap())
            .unwrap();
        let err = core.step(1).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NonFinite {
                    count: 2,
                    step: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(y.as_tensor().to_vec1::<f32>().unwrap(), vec![0.0]);
        assert!(w.is_finite());
    }
}
