//! AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"),
//! written as torch.optim.AdamW computes it, with state that can be saved and
//! restored: candle-nn's AdamW keeps its moments and step count private, so a
//! resumable trainer cannot use it.
//!
//! Mixed precision: the moments are f32 whatever the weights' dtype, and a
//! bf16 or f16 weight gets an f32 master copy that takes the updates; the
//! weight the model computes with is the master rounded after each step.
//! Without it an update smaller than half a bf16 step (2^-9 of the weight)
//! would be rounded away at every step (Micikevicius et al., "Mixed Precision
//! Training", 2018; torch's autocast keeps f32 parameters for the same reason).
//! The master starts as the loaded weight, so a checkpoint read in bf16
//! starts exactly where the bf16 reference model is.

use std::collections::HashMap;

use candle_core::{CpuStorage, DType, Storage, StorageRef, Tensor, Var};

use crate::{Error, Result};

/// AdamW hyperparameters (the learning rate comes from the schedule at each step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamWParams {
    pub fn from_config(train: &crate::config::TrainConfig) -> Self {
        Self {
            beta1: train.adam_beta1,
            beta2: train.adam_beta2,
            eps: train.adam_epsilon,
            weight_decay: train.weight_decay,
        }
    }
}

/// One trained tensor and its optimizer state.
struct Param {
    name: String,
    var: Var,
    decays: bool,
    /// This parameter's learning rate over the scheduled one (parameter groups).
    lr_scale: f64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// The f32 master copy of a bf16/f16 weight; None for f32 weights.
    master: Option<Tensor>,
}

impl Param {
    /// The weight the update applies to, in f32.
    fn weight_f32(&self) -> Result<Tensor> {
        match &self.master {
            Some(m) => Ok(m.clone()),
            None => Ok(self.var.as_tensor().detach().to_dtype(DType::F32)?),
        }
    }

    /// Stores the updated f32 weight: in the master, and rounded in the var.
    fn set_weight(&mut self, w: Tensor) -> Result<()> {
        if self.master.is_some() {
            self.var.set(&w.to_dtype(self.var.dtype())?)?;
            self.master = Some(w);
        } else {
            self.var.set(&w)?;
        }
        Ok(())
    }
}

/// AdamW over a fixed, name-sorted list of variables.
pub struct AdamW {
    params: Vec<Param>,
    hp: AdamWParams,
    /// Optimizer steps taken (the `t` of the bias corrections).
    steps: u64,
    /// Whether CPU f32 parameters take the one-pass kernel ([`FusedStep`]).
    fused: bool,
}

/// transformers' rule: no weight decay on biases and normalization weights.
pub fn decays_by_default(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let is_norm = lower
        .split('.')
        .any(|part| part.contains("norm") || part.starts_with("ln_") || part == "ln");
    !(lower.ends_with("bias") || is_norm)
}

impl AdamW {
    /// Optimizes `vars` (name, variable); the order is fixed by sorting on the name.
    pub fn new(mut vars: Vec<(String, Var)>, hp: AdamWParams) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                // Two allocations: the one-pass step writes m and v in place.
                let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
                let (exp_avg, exp_avg_sq) = (zeros()?, zeros()?);
                let master = match var.dtype() {
                    DType::F32 => None,
                    _ => Some(var.as_tensor().detach().to_dtype(DType::F32)?),
                };
                Ok(Param {
                    master,
                    decays: decays_by_default(&name),
                    lr_scale: 1.0,
                    name,
                    var,
                    exp_avg,
                    exp_avg_sq,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            hp,
            steps: 0,
            fused: true,
        })
    }

    /// Every variable of a `VarMap`, named as the model built them.
    pub fn from_varmap(varmap: &candle_nn::VarMap, hp: AdamWParams) -> Result<Self> {
        let vars = varmap
            .data()
            .lock()
            .map_err(|_| Error::Msg("the VarMap lock is poisoned".into()))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Self::new(vars, hp)
    }

    /// The optimized variables, in the optimizer's order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Gives the parameters `chosen` by name a learning rate of `scale` times
    /// the scheduled one (a parameter group, as torch's optimizers have).
    pub fn scale_lr(&mut self, chosen: impl Fn(&str) -> bool, scale: f64) {
        for p in self.params.iter_mut().filter(|p| chosen(&p.name)) {
            p.lr_scale = scale;
        }
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One AdamW update with learning rate `lr`. `grads[i]` belongs to the
    /// i-th variable of [`AdamW::vars`]; a `None` leaves that variable and its
    /// moments untouched (as torch does for parameters without a gradient).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`AdamW::step`] with every gradient multiplied by `grad_scale` first
    /// (global-norm clipping's coefficient), inside the one-pass kernel
    /// instead of a pass of its own: the same f32 products as scaling the
    /// gradients, then stepping.
    pub fn step_scaled(
        &mut self,
        grads: &[Option<Tensor>],
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(Error::Msg(format!(
                "AdamW::step got {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )));
        }
        self.steps += 1;
        let t = self.steps as i32;
        let AdamWParams {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.hp;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        for (p, grad) in self.params.iter_mut().zip(grads) {
            let Some(grad) = grad else { continue };
            let lr = lr * p.lr_scale;
            let g = grad.detach().to_dtype(DType::F32)?;
            let scaled = || -> Result<Tensor> {
                Ok(match grad_scale == 1.0 {
                    true => g.clone(),
                    false => (&g * grad_scale)?,
                })
            };
            // Scalars rounded to f32 as Candle's scalar ops round them
            // (a division by a scalar is a multiplication by its inverse).
            let step = FusedStep {
                beta1: beta1 as f32,
                one_minus_beta1: (1.0 - beta1) as f32,
                beta2: beta2 as f32,
                one_minus_beta2: (1.0 - beta2) as f32,
                eps: eps as f32,
                keep: match p.decays && weight_decay != 0.0 {
                    true => Some((1.0 - lr * weight_decay) as f32),
                    false => None,
                },
                step_size: (lr / bias_correction1) as f32,
                inv_bias_correction2_sqrt: (1.0 / bias_correction2_sqrt) as f32,
                grad_scale: (grad_scale != 1.0).then_some(grad_scale as f32),
            };
            // The f32 weight the update applies to: the master, or the var's
            // own tensor (written in place, as Var::set writes).
            let target = match &p.master {
                Some(m) => m.clone(),
                None => p.var.as_tensor().clone(),
            };
            if self.fused && step.apply(&target, &g, &p.exp_avg, &p.exp_avg_sq)? {
                if p.master.is_some() {
                    p.var.set(&target.to_dtype(p.var.dtype())?)?;
                }
                continue;
            }
            let g = scaled()?;
            // m_t = b1 m + (1 - b1) g ;  v_t = b2 v + (1 - b2) g^2
            p.exp_avg = ((&p.exp_avg * beta1)? + (&g * (1.0 - beta1))?)?;
            p.exp_avg_sq = ((&p.exp_avg_sq * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let mut w = p.weight_f32()?;
            if p.decays && weight_decay != 0.0 {
                // Decoupled weight decay, applied before the Adam update (torch's order).
                w = (w * (1.0 - lr * weight_decay))?;
            }
            // denom = sqrt(v) / sqrt(1 - b2^t) + eps ;  w -= lr / (1 - b1^t) * m / denom
            let denom = ((p.exp_avg_sq.sqrt()? / bias_correction2_sqrt)? + eps)?;
            let update = ((&p.exp_avg / denom)? * (lr / bias_correction1))?;
            p.set_weight((w - update)?)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`exp_avg.<name>`, `exp_avg_sq.<name>`),
    /// and the f32 master weights of bf16/f16 parameters (`master.<name>`).
    /// Copies: the next step updates the originals in place. Checkpoints
    /// write them without copies ([`AdamW::save_state`]).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.named_state()
            .map(|(n, t)| Ok((n, t.copy()?)))
            .collect()
    }

    /// The moments and master weights by their names in the checkpoint.
    fn named_state(&self) -> impl Iterator<Item = (String, &Tensor)> {
        self.params.iter().flat_map(|p| {
            [
                Some((format!("exp_avg.{}", p.name), &p.exp_avg)),
                Some((format!("exp_avg_sq.{}", p.name), &p.exp_avg_sq)),
                p.master.as_ref().map(|m| (format!("master.{}", p.name), m)),
            ]
            .into_iter()
            .flatten()
        })
    }

    /// Writes [`AdamW::state_tensors`] to the safetensors file `path` from
    /// the tensors themselves, not copies (the borrow keeps any step from
    /// updating them meanwhile): saving a checkpoint holds no second copy of
    /// the optimizer's state, twice the model's size in f32.
    pub fn save_state(&self, path: &std::path::Path) -> Result<()> {
        let state: Vec<(String, Tensor)> =
            self.named_state().map(|(n, t)| (n, t.clone())).collect();
        crate::io::save_safetensors(&state, path)
    }

    /// Restores the moments and master weights written by
    /// [`AdamW::state_tensors`] and the step count. A bf16 parameter whose
    /// state has no master keeps the one taken from its weight.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for p in &mut self.params {
            let mut take = |prefix: &str| -> Result<Option<Tensor>> {
                let key = format!("{prefix}.{}", p.name);
                let Some(t) = tensors.remove(&key) else {
                    return Ok(None);
                };
                if t.dims() != p.var.dims() {
                    return Err(Error::Msg(format!(
                        "optimizer state `{key}` has shape {:?}, the parameter has {:?}",
                        t.dims(),
                        p.var.dims()
                    )));
                }
                // A copy of its own: the step writes the moments in place.
                Ok(Some(
                    t.to_dtype(DType::F32)?.to_device(p.var.device())?.copy()?,
                ))
            };
            let missing = |prefix: &str| {
                Error::Msg(format!(
                    "optimizer state has no tensor `{prefix}.{}`",
                    p.name
                ))
            };
            p.exp_avg = take("exp_avg")?.ok_or_else(|| missing("exp_avg"))?;
            p.exp_avg_sq = take("exp_avg_sq")?.ok_or_else(|| missing("exp_avg_sq"))?;
            if p.master.is_some() {
                if let Some(m) = take("master")? {
                    p.master = Some(m);
                }
            }
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(Error::Msg(format!(
                "optimizer state has `{extra}`, which belongs to no parameter of this model"
            )));
        }
        self.steps = steps;
        Ok(())
    }
}

/// One AdamW update of a parameter in a single pass over w, g, m and v,
/// written in place: on the CPU the composed update below costs fourteen
/// tensor ops, each a pass over the parameter and a new allocation, and even
/// one pass into new buffers costs three zeroed allocations and a copy into
/// the var (measured in docs/benchmarks-history.md, "The gradient path and a BLAS
/// build"). Same arithmetic, in f32, as the composed update.
struct FusedStep {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
    /// 1 - lr x weight_decay, for parameters that decay.
    keep: Option<f32>,
    /// lr / (1 - beta1^t).
    step_size: f32,
    /// 1 / sqrt(1 - beta2^t).
    inv_bias_correction2_sqrt: f32,
    /// The clipping coefficient the gradient is multiplied by first.
    grad_scale: Option<f32>,
}

/// A contiguous f32 CPU tensor's storage, read-locked.
struct F32View<'a> {
    guard: StorageRef<'a>,
    range: std::ops::Range<usize>,
}

impl<'a> F32View<'a> {
    fn of(t: &'a Tensor) -> Option<Self> {
        let (guard, layout) = t.storage_and_layout();
        let (start, end) = layout.contiguous_offsets()?;
        matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))).then_some(Self {
            guard,
            range: start..end,
        })
    }

    fn slice(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.range.clone()],
            _ => unreachable!("checked in F32View::of"),
        }
    }
}

impl FusedStep {
    /// Updates w, m and v in place from g, in one pass; false (nothing done)
    /// when a tensor is not a contiguous f32 CPU tensor. w, m and v must be
    /// three distinct storages (they are: AdamW allocates or copies each).
    fn apply(&self, w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> Result<bool> {
        if [w, m, v].iter().any(|t| F32View::of(t).is_none()) {
            return Ok(false);
        }
        let Some(g_view) = F32View::of(g) else {
            return Ok(false);
        };
        let g = g_view.slice();
        use crate::kernels::{for_pieces, SharedOut};
        write_f32(m, &mut |m| {
            write_f32(v, &mut |v| {
                write_f32(w, &mut |w| {
                    if g.len() != w.len() || m.len() != w.len() || v.len() != w.len() {
                        candle_core::bail!("AdamW: gradient and moments do not fit the weight");
                    }
                    // Pieces of w on Candle's pool; m and v are written at the
                    // same places through raw parts.
                    let (m_out, v_out) = (SharedOut(m.as_mut_ptr()), SharedOut(v.as_mut_ptr()));
                    for_pieces(w, 1 << 12, |i, w| {
                        let at = i * (1 << 12);
                        // SAFETY: pieces are disjoint and at + w.len() <= the
                        // length of m and v (checked equal above).
                        let (m, v) =
                            unsafe { (m_out.slice(at, w.len()), v_out.slice(at, w.len())) };
                        adamw_chunk(self, &g[at..at + w.len()], (w, m, v));
                    });
                    Ok(())
                })
            })
        })?;
        Ok(true)
    }
}

/// Runs `f` on the elements of a contiguous f32 CPU tensor, writable in
/// place (Candle's in-place op takes the storage's write lock).
fn write_f32(t: &Tensor, f: &mut ElementsFn) -> candle_core::Result<()> {
    t.inplace_op1(&WriteF32(std::cell::RefCell::new(f)))
}

/// What [`write_f32`] runs on a tensor's elements.
type ElementsFn<'a> = dyn FnMut(&mut [f32]) -> candle_core::Result<()> + 'a;

struct WriteF32<'a, 'f>(std::cell::RefCell<&'a mut ElementsFn<'f>>);

impl candle_core::InplaceOp1 for WriteF32<'_, '_> {
    fn name(&self) -> &'static str {
        "adamw-in-place"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &candle_core::Layout) -> candle_core::Result<()> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(data), Some((start, end))) => {
                (self.0.borrow_mut())(&mut data[start..end])
            }
            _ => candle_core::bail!("AdamW: the in-place step needs a contiguous f32 tensor"),
        }
    }
}

crate::kernels::fast_math::wide_simd_fn! {
    /// The AdamW update of one chunk, in place: (w, m, v) from (w, g, m, v).
    fn adamw_chunk(s: &FusedStep, g: &[f32], state: (&mut [f32], &mut [f32], &mut [f32])) {
        let (w, m, v) = state;
        for k in 0..w.len() {
            let gk = s.grad_scale.map_or(g[k], |c| g[k] * c);
            let mk = m[k] * s.beta1 + gk * s.one_minus_beta1;
            let vk = v[k] * s.beta2 + gk * gk * s.one_minus_beta2;
            let wk = s.keep.map_or(w[k], |keep| w[k] * keep);
            let denom = vk.sqrt() * s.inv_bias_correction2_sqrt + s.eps;
            w[k] = wk - mk / denom * s.step_size;
            m[k] = mk;
            v[k] = vk;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn minimize_square(weight_decay: f64) -> Vec<f32> {
        let x = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let hp = AdamWParams {
            weight_decay,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("x".into(), x.clone())], hp).unwrap();
        (0..3)
            .map(|_| {
                let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
                let grads = loss.backward().unwrap();
                let g = grads.get(x.as_tensor()).cloned();
                opt.step(&[g], 0.1).unwrap();
                x.as_tensor().to_vec1::<f32>().unwrap()[0]
            })
            .collect()
    }

    /// f(x) = x^2 from x = 1, lr 0.1, betas (0.9, 0.999), eps 1e-8.
    /// Worked by hand: step 1: g = 2, m = 0.2, v = 0.004, m^ = 2, v^ = 4,
    /// x = 1 - 0.1 * 2 / (2 + 1e-8) = 0.9. Step 2: g = 1.8, m = 0.36,
    /// v = 0.007236, m^ = 0.36 / 0.19, v^ = 0.007236 / 0.001999,
    /// x = 0.9 - 0.1 * 1.894737 / 1.902580 = 0.800412. Step 3 the same way:
    /// 0.701586. With weight_decay 0.1, x is first scaled by 1 - 0.1 * 0.1:
    /// 0.89, 0.781572, 0.675101.
    #[test]
    fn the_one_pass_kernel_equals_the_composed_update() {
        // Parameters large enough for the parallel path, with and without decay.
        let dev = candle_core::Device::Cpu;
        let mut rng = crate::HostRng::new(3);
        let mut draw = |n: usize| -> Tensor {
            let v: Vec<f32> = (0..n).map(|_| rng.uniform() as f32 - 0.5).collect();
            Tensor::from_vec(v, n, &dev).unwrap()
        };
        let w0 = [draw(40_000), draw(33)];
        let grads: Vec<Vec<Option<Tensor>>> = (0..3)
            .map(|_| vec![Some(draw(33)), Some(draw(40_000))])
            .collect();
        let run = |fused: bool| -> Vec<Vec<f32>> {
            let vars = vec![
                ("a.bias".to_string(), Var::from_tensor(&w0[1]).unwrap()),
                ("b.weight".to_string(), Var::from_tensor(&w0[0]).unwrap()),
            ];
            let hp = AdamWParams {
                weight_decay: 0.1,
                ..AdamWParams::default()
            };
            let mut opt = AdamW::new(vars, hp).unwrap();
            opt.fused = fused;
            for (i, g) in grads.iter().enumerate() {
                opt.step(g, 1e-2 / (i + 1) as f64).unwrap();
            }
            let mut out: Vec<Vec<f32>> = opt
                .vars()
                .map(|(_, v)| v.to_vec1::<f32>().unwrap())
                .collect();
            out.extend(
                opt.state_tensors()
                    .unwrap()
                    .iter()
                    .map(|(_, t)| t.to_vec1::<f32>().unwrap()),
            );
            out
        };
        let (fused, composed) = (run(true), run(false));
        for (a, b) in fused.iter().zip(&composed) {
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-7, "fused and composed differ by {worst}");
        }
        assert_ne!(
            fused[1],
            w0[0].to_vec1::<f32>().unwrap(),
            "the weights moved"
        );
    }

    #[test]
    fn adamw_matches_hand_worked_steps() {
        let plain = minimize_square(0.0);
        for (got, want) in plain.iter().zip([0.9, 0.800412229, 0.701586273]) {
            assert!((*got as f64 - want).abs() < 1e-6, "{plain:?}");
        }
        let decayed = minimize_square(0.1);
        for (got, want) in decayed.iter().zip([0.89, 0.781571856, 0.675101222]) {
            assert!((*got as f64 - want).abs() < 1e-6, "{decayed:?}");
        }
    }

    /// Two equal parameters with equal gradients; the "critic." one has a
    /// learning-rate scale of 0.5. Adam's first step moves a weight by
    /// lr * g / (|g| + eps): 0.1 for the policy, 0.05 for the critic.
    #[test]
    fn scaled_parameter_groups_step_by_their_own_rate() {
        let dev = Device::Cpu;
        let a = Var::new(&[1.0f32], &dev).unwrap();
        let c = Var::new(&[1.0f32], &dev).unwrap();
        let mut opt = AdamW::new(
            vec![
                ("policy.w".into(), a.clone()),
                ("critic.w".into(), c.clone()),
            ],
            AdamWParams::default(),
        )
        .unwrap();
        opt.scale_lr(|n| n.starts_with("critic."), 0.5);
        let g = Tensor::new(&[2.0f32], &dev).unwrap();
        opt.step(&[Some(g.clone()), Some(g)], 0.1).unwrap();
        let at = |v: &Var| v.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((at(&a) - 0.9).abs() < 1e-6, "{}", at(&a));
        assert!((at(&c) - 0.95).abs() < 1e-6, "{}", at(&c));
    }

    #[test]
    fn bf16_weights_get_f32_moments() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(
            &Tensor::new(&[1.0f32, -1.0], &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        )
        .unwrap();
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWParams::default()).unwrap();
        let g = Tensor::new(&[0.5f32, -0.5], &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        opt.step(&[Some(g)], 0.1).unwrap();
        for (name, t) in opt.state_tensors().unwrap() {
            assert_eq!(t.dtype(), DType::F32, "{name}");
        }
        let v = opt.state_tensors().unwrap()[1].1.to_vec1::<f32>().unwrap();
        assert!((v[0] - 0.00025).abs() < 1e-9, "(1 - 0.999) * 0.5^2: {v:?}");
        assert_eq!(w.dtype(), DType::BF16);
        // Adam's first step moves each weight by about lr against its gradient's sign.
        let after = w
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            (after[0] - 0.9).abs() < 0.01 && (after[1] + 0.9).abs() < 0.01,
            "{after:?}"
        );
    }

    #[test]
    fn bf16_weights_keep_small_updates_in_an_f32_master() {
        // lr 1e-4 with a constant gradient moves the weight by about 1e-4 per
        // step (Adam's step is about lr), far below half a bf16 step at 1.0
        // (2^-9): without a master copy every update would round back to 1.0.
        let dev = Device::Cpu;
        let bf16 = |v: f32| {
            Tensor::new(&[v], &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let w = Var::from_tensor(&bf16(1.0)).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWParams::default()).unwrap();
        for _ in 0..50 {
            opt.step(&[Some(bf16(0.5))], 1e-4).unwrap();
        }
        let state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
        let master = state["master.w"].to_vec1::<f32>().unwrap()[0];
        assert!(
            (master - 0.995).abs() < 1e-5,
            "master after 50 steps: {master}"
        );
        let rounded = w
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        let want = bf16(master)
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert_eq!(rounded, want, "the var is the master rounded to bf16");
        assert!(rounded < 1.0);

        // Saved and restored, the master continues exactly where it was.
        let w2 = Var::from_tensor(w.as_tensor()).unwrap();
        let mut again = AdamW::new(vec![("w".into(), w2.clone())], AdamWParams::default()).unwrap();
        again.load_state(state, opt.steps()).unwrap();
        opt.step(&[Some(bf16(0.5))], 1e-4).unwrap();
        again.step(&[Some(bf16(0.5))], 1e-4).unwrap();
        let master_of = |o: &AdamW| o.state_tensors().unwrap()[2].1.to_vec1::<f32>().unwrap();
        assert_eq!(master_of(&opt), master_of(&again));
    }

    #[test]
    fn biases_and_norms_are_not_decayed() {
        assert!(decays_by_default("model.layers.0.self_attn.q_proj.weight"));
        assert!(decays_by_default("transformer.h.0.attn.c_attn.weight"));
        assert!(!decays_by_default("transformer.h.0.attn.c_attn.bias"));
        assert!(!decays_by_default("transformer.h.0.ln_1.weight"));
        assert!(!decays_by_default("transformer.ln_f.weight"));
        assert!(!decays_by_default("model.layers.0.input_layernorm.weight"));
        assert!(!decays_by_default("model.norm.weight"));
        assert!(!decays_by_default("bert.embeddings.LayerNorm.weight"));
    }

    #[test]
    fn state_round_trips_and_rejects_mismatches() {
        let dev = Device::Cpu;
        let a = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let mut opt = AdamW::new(vec![("a".into(), a.clone())], AdamWParams::default()).unwrap();
        let g = Tensor::new(&[0.5f32, -1.0], &dev).unwrap();
        opt.step(&[Some(g.clone())], 0.01).unwrap();
        let saved: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
        let b = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let mut restored = AdamW::new(vec![("a".into(), b)], AdamWParams::default()).unwrap();
        restored.load_state(saved.clone(), opt.steps()).unwrap();
        assert_eq!(restored.steps(), 1);
        let m = restored.state_tensors().unwrap()[0]
            .1
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(m, vec![0.05, -0.1]);

        let c = Var::new(&[1.0f32, 2.0, 3.0], &dev).unwrap();
        let mut wrong = AdamW::new(vec![("a".into(), c)], AdamWParams::default()).unwrap();
        let err = wrong.load_state(saved, 1).unwrap_err().to_string();
        assert!(err.contains("exp_avg.a") && err.contains("[2]"), "{err}");
    }

    /// Clipping's coefficient inside the pass equals scaling the gradient
    /// first, exactly (on a parameter large enough for the parallel path).
    #[test]
    fn a_scaled_step_equals_scaling_then_stepping() {
        let dev = Device::Cpu;
        let w0: Vec<f32> = (0..40_000)
            .map(|i| ((i % 17) as f32 - 8.0) * 0.01)
            .collect();
        let g: Vec<f32> = (0..40_000).map(|i| ((i % 13) as f32 - 6.0) * 0.3).collect();
        let g = Tensor::from_vec(g, 40_000, &dev).unwrap();
        let run = |scaled_inside: bool| {
            let var =
                Var::from_tensor(&Tensor::from_vec(w0.clone(), 40_000, &dev).unwrap()).unwrap();
            let mut opt =
                AdamW::new(vec![("w".into(), var.clone())], AdamWParams::default()).unwrap();
            for _ in 0..2 {
                match scaled_inside {
                    true => opt.step_scaled(&[Some(g.clone())], 0.01, 0.37).unwrap(),
                    false => opt.step(&[Some((&g * 0.37).unwrap())], 0.01).unwrap(),
                }
            }
            var.to_vec1::<f32>().unwrap()
        };
        assert_eq!(run(true), run(false));
    }

    /// The one-pass step writes the weight, m and v in place: every clone of
    /// the var's tensor sees the update (as with Var::set), while saved state
    /// and the restored moments are copies later steps leave alone.
    #[test]
    fn the_in_place_step_leaves_saved_state_alone() {
        let dev = Device::Cpu;
        let a = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let seen_by_model = a.as_tensor().clone();
        let mut opt = AdamW::new(vec![("a".into(), a.clone())], AdamWParams::default()).unwrap();
        let g = Tensor::new(&[0.5f32, -1.0], &dev).unwrap();
        opt.step(&[Some(g.clone())], 0.1).unwrap();
        // Step 1 moves each weight by lr against the sign of its gradient.
        let w1 = seen_by_model.to_vec1::<f32>().unwrap();
        assert!(
            (w1[0] - 0.9).abs() < 1e-6 && (w1[1] + 1.9).abs() < 1e-6,
            "{w1:?}"
        );
        let saved: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
        let mut restored = AdamW::new(
            vec![("a".into(), Var::new(&[0.9f32, -1.9], &dev).unwrap())],
            AdamWParams::default(),
        )
        .unwrap();
        restored.load_state(saved.clone(), 1).unwrap();
        opt.step(&[Some(g.clone())], 0.1).unwrap();
        restored.step(&[Some(g)], 0.1).unwrap();
        // m after one step is 0.1 g; the second steps did not touch the saved copy.
        assert_eq!(
            saved["exp_avg.a"].to_vec1::<f32>().unwrap(),
            vec![0.05, -0.1]
        );
        assert_eq!(
            opt.state_tensors().unwrap()[0].1.to_vec1::<f32>().unwrap(),
            restored.state_tensors().unwrap()[0]
                .1
                .to_vec1::<f32>()
                .unwrap()
        );
        assert_ne!(seen_by_model.to_vec1::<f32>().unwrap(), w1);
    }
}
