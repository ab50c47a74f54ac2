//! Direct Preference Optimization (Rafailov et al., 2023) and its loss
//! family, as TRL 1.12's DPOTrainer runs it: each micro-batch puts the
//! chosen and the rejected sequences of its pairs (prompt + completion,
//! chosen rows first) through the policy in one right-padded batch, sums
//! each completion's token log-probs, takes the reference's sums (a frozen
//! model, the LoRA base with adapters off, or precomputed once), and the
//! loss of `rl::dpo` on the log-ratios. Metrics carry TRL's names.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::online::stats::Stats;
use super::trained::{ModelFiles, Trained};
use crate::chat::TemplateSource;
use crate::checkpoint::{self, Manifest, TrainerState};
use crate::config::{Config, DpoLossType, TruncationMode};
use crate::data::batch::position_ids;
use crate::data::dpo::{prepare_pairs, sequence, DpoDataReport, DpoPair};
use crate::data::{self};
use crate::io;
use crate::metrics::Progress;
use crate::models::{attention_bias, CausalLm};
use crate::optim::{step_plan, AdamW, AdamWParams, StepOutcome, TrainCore};
use crate::rl::dpo::{dpo_loss, ld_weights, token_figures, wpo_weights, DpoHyper, PairLogps};
use crate::run::{checkpoint_if_due, RunDir};
use crate::signal::StopSignal;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The file of precomputed reference log-probs in the run directory.
pub const REF_LOGPS_FILE: &str = "ref_logps.safetensors";

/// What the loss and the batches read from `[dpo]`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub losses: Vec<(DpoLossType, f64)>,
    pub hyper: DpoHyper,
    pub max_length: usize,
    pub mode: TruncationMode,
    pub ld_alpha: Option<f64>,
    pub use_weighting: bool,
}

impl Settings {
    pub fn of(cfg: &Config) -> Self {
        let d = &cfg.dpo;
        Self {
            losses: d.losses(),
            hyper: DpoHyper::of(d),
            max_length: d.max_length,
            mode: d.truncation_mode,
            ld_alpha: d.ld_alpha,
            use_weighting: d.use_weighting,
        }
    }

    fn has(&self, t: DpoLossType) -> bool {
        self.losses.iter().any(|(l, _)| *l == t)
    }
}

/// One micro-batch on the device: 2B right-padded rows (chosen then
/// rejected), the shifted labels and completion masks.
pub struct DpoBatch {
    pub pairs: usize,
    ids: Tensor,
    positions: Tensor,
    /// 1 on real tokens, 0 on padding, per row.
    real: Vec<Vec<u8>>,
    labels: Tensor,
    /// (2B, W-1): 1.0 where the label is a completion token.
    mask: Tensor,
    /// (2B, W-1): the mask with LD-DPO's weights.
    ld: Tensor,
    /// Real tokens of the batch (TRL's num_tokens counts the attention mask).
    pub tokens: usize,
}

impl DpoBatch {
    /// The collated batch of `pairs`, cut as `s` says.
    pub fn new(pairs: &[&DpoPair], s: &Settings, pad: u32, device: &Device) -> Result<Self> {
        let side = |p: &DpoPair, c: &[u32]| sequence(&p.prompt, c, s.max_length, s.mode);
        let rows: Vec<(Vec<u32>, Vec<u8>)> = pairs
            .iter()
            .map(|p| side(p, &p.chosen))
            .chain(pairs.iter().map(|p| side(p, &p.rejected)))
            .collect();
        let (ids, completion): (Vec<_>, Vec<_>) = rows.into_iter().unzip();
        Self::from_rows(ids, completion, s.ld_alpha, pad, device)
    }

    /// A batch of unpadded rows `ids` with their completion masks.
    pub fn from_rows(
        ids: Vec<Vec<u32>>,
        completion: Vec<Vec<u8>>,
        ld_alpha: Option<f64>,
        pad: u32,
        device: &Device,
    ) -> Result<Self> {
        let n = ids.len();
        let width = ids.iter().map(Vec::len).max().unwrap_or(0).max(2);
        let mut flat = Vec::with_capacity(n * width);
        let mut real = Vec::with_capacity(n);
        let mut mask = Vec::with_capacity(n);
        for (row, comp) in ids.iter().zip(&completion) {
            flat.extend(
                row.iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, width - row.len())),
            );
            let mut r = vec![1u8; row.len()];
            r.resize(width, 0);
            real.push(r);
            let mut m: Vec<f32> = comp.iter().skip(1).map(|&x| f32::from(x)).collect();
            m.resize(width - 1, 0.0);
            mask.push(m);
        }
        let ids = Tensor::from_vec(flat, (n, width), device)?;
        let ld = ld_weights(&mask, ld_alpha);
        let table = |rows: Vec<Vec<f32>>| Tensor::from_vec(rows.concat(), (n, width - 1), device);
        Ok(Self {
            pairs: n / 2,
            positions: Tensor::from_vec(position_ids(&real).concat(), (n, width), device)?,
            labels: ids.narrow(1, 1, width - 1)?.contiguous()?,
            ids,
            tokens: real.iter().flatten().map(|&r| r as usize).sum(),
            real,
            mask: table(mask)?,
            ld: table(ld)?,
        })
    }

    /// The shifted logits (2B, W-1, V) of `lm` over the batch.
    fn logits(&self, lm: &CausalLm) -> Result<Tensor> {
        let width = self.ids.dim(1)?;
        let bias = attention_bias(&self.real, width, lm.dtype(), self.ids.device())?;
        let hidden = lm.forward(&self.ids, &self.positions, &bias, None)?;
        lm.lm_logits(&hidden.narrow(1, 0, width - 1)?)
    }

    /// (chosen, rejected) halves of a (2B, ..) tensor.
    fn halves(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = self.pairs;
        Ok((x.narrow(0, 0, b)?, x.narrow(0, b, b)?))
    }
}

/// The reference's summed completion log-probs (chosen, rejected), (B,) each, no graph.
pub fn reference_logps(reference: &CausalLm, batch: &DpoBatch) -> Result<(Tensor, Tensor)> {
    let logits = batch.logits(reference)?.detach();
    let logps = crate::rl::token_logprobs(&logits.to_dtype(DType::F32)?, &batch.labels)?;
    let sums = (logps * &batch.ld)?.sum(1)?.detach();
    batch.halves(&sums)
}

/// The loss and TRL's metrics of one micro-batch, from the policy's shifted
/// logits (2B, W-1, V) and the reference's sums.
pub fn loss_from_logits(
    logits: &Tensor,
    batch: &DpoBatch,
    s: &Settings,
    reference: (Tensor, Tensor),
) -> Result<(Tensor, Vec<(&'static str, f64)>)> {
    let tf = token_figures(logits, &batch.labels, s.use_weighting)?;
    let mask = &batch.mask;
    let sums = (&tf.logps * &batch.ld)?.sum(1)?;
    let (chosen, rejected) = batch.halves(&sums)?;
    let counts = mask.sum(1)?;
    let (chosen_tokens, rejected_tokens) = batch.halves(&counts)?;
    let (mask_c, _) = batch.halves(mask)?;
    let n_chosen = mask_c.sum_all()?.to_scalar::<f32>()? as f64;
    let sft_nll = if s.has(DpoLossType::Sft) {
        let (lp_c, _) = batch.halves(&tf.logps)?;
        Some(((lp_c * &mask_c)?.sum_all()? / -n_chosen.max(1.0))?)
    } else {
        None
    };
    let x = PairLogps {
        chosen,
        rejected,
        ref_chosen: reference.0,
        ref_rejected: reference.1,
        chosen_tokens,
        rejected_tokens,
        sft_nll,
    };
    let wpo = match &tf.log_denom {
        Some(d) => Some(wpo_weights(&tf.logps, d, mask)?),
        None => None,
    };
    let loss = dpo_loss(&s.losses, &s.hyper, &x, wpo.as_ref())?;

    // Metrics, as DPOTrainer logs them (host values, no graph).
    let v = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.detach()
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect())
    };
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    let masked = |t: &Tensor, m: &Tensor| -> Result<f64> {
        Ok((t * m)?.sum_all()?.to_scalar::<f32>()? as f64)
    };
    let beta = s.hyper.beta;
    let (c, r) = (v(&x.chosen)?, v(&x.rejected)?);
    let (rc, rr) = (v(&x.ref_chosen)?, v(&x.ref_rejected)?);
    let cr: Vec<f64> = c.iter().zip(&rc).map(|(a, b)| beta * (a - b)).collect();
    let rj: Vec<f64> = r.iter().zip(&rr).map(|(a, b)| beta * (a - b)).collect();
    let wins: Vec<f64> = cr
        .iter()
        .zip(&rj)
        .map(|(a, b)| f64::from(u8::from(a > b)))
        .collect();
    let margins: Vec<f64> = cr.iter().zip(&rj).map(|(a, b)| a - b).collect();
    let n_all = mask.sum_all()?.to_scalar::<f32>()? as f64;
    let (logit_c, logit_r) = batch.halves(&tf.mean_logit)?;
    let (correct_c, _) = batch.halves(&tf.correct)?;
    let (_, mask_r) = batch.halves(mask)?;
    let n_rejected = n_all - n_chosen;
    let ratio = |a: f64, n: f64| if n > 0.0 { a / n } else { 0.0 };
    let figures = vec![
        ("entropy", ratio(masked(&tf.entropy, mask)?, n_all)),
        ("logits/chosen", ratio(masked(&logit_c, &mask_c)?, n_chosen)),
        (
            "logits/rejected",
            ratio(masked(&logit_r, &mask_r)?, n_rejected),
        ),
        (
            "mean_token_accuracy",
            ratio(masked(&correct_c, &mask_c)?, n_chosen),
        ),
        ("rewards/chosen", mean(&cr)),
        ("rewards/rejected", mean(&rj)),
        ("rewards/accuracies", mean(&wins)),
        ("rewards/margins", mean(&margins)),
        ("logps/chosen", mean(&c)),
        ("logps/rejected", mean(&r)),
    ];
    Ok((loss, figures))
}

/// The policy's loss and metrics over a batch.
pub fn policy_loss(
    policy: &CausalLm,
    batch: &DpoBatch,
    s: &Settings,
    reference: (Tensor, Tensor),
) -> Result<(Tensor, Vec<(&'static str, f64)>)> {
    loss_from_logits(&batch.logits(policy)?, batch, s, reference)
}

/// Where the reference's log-probs come from.
enum Reference {
    Model(CausalLm),
    /// Per pair (chosen, rejected), computed once: train pairs, then eval pairs.
    Precomputed {
        train: Vec<(f32, f32)>,
        eval: Vec<(f32, f32)>,
    },
}

impl Reference {
    fn of(
        &self,
        batch: &DpoBatch,
        which: &[usize],
        eval: bool,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Model(lm) => reference_logps(lm, batch),
            Self::Precomputed { train, eval: ev } => {
                let table = if eval { ev } else { train };
                let (c, r): (Vec<f32>, Vec<f32>) = which.iter().map(|&i| table[i]).unzip();
                let n = c.len();
                Ok((Tensor::from_vec(c, n, dev)?, Tensor::from_vec(r, n, dev)?))
            }
        }
    }
}

/// Every pair's reference log-probs, `batch` pairs per forward.
fn precompute(
    reference: &CausalLm,
    pairs: &[DpoPair],
    s: &Settings,
    batch: usize,
    pad: u32,
    dev: &Device,
) -> Result<Vec<(f32, f32)>> {
    let mut out = Vec::with_capacity(pairs.len());
    let refs: Vec<&DpoPair> = pairs.iter().collect();
    let progress = Progress::new(
        pairs.len().div_ceil(batch.max(1)) as u64,
        "reference log-probs",
    );
    for (i, chunk) in refs.chunks(batch.max(1)).enumerate() {
        let b = DpoBatch::new(chunk, s, pad, dev)?;
        let (c, r) = reference_logps(reference, &b)?;
        out.extend(c.to_vec1::<f32>()?.into_iter().zip(r.to_vec1::<f32>()?));
        progress.update(i as u64 + 1, &[]);
    }
    progress.finish();
    Ok(out)
}

/// Reads the precomputed reference log-probs of a run, if they are there
/// and fit the pair counts.
fn read_precomputed(path: &Path, n_train: usize, n_eval: usize) -> Result<Option<Reference>> {
    if !path.exists() {
        return Ok(None);
    }
    let t = candle_core::safetensors::load(path, &Device::Cpu)?;
    let pairs = |name: &str, n: usize| -> Result<Option<Vec<(f32, f32)>>> {
        let Some(x) = t.get(name) else {
            return Ok(None);
        };
        let rows = x.to_vec2::<f32>()?;
        Ok((rows.len() == n).then(|| rows.into_iter().map(|r| (r[0], r[1])).collect()))
    };
    Ok(match (pairs("train", n_train)?, pairs("eval", n_eval)?) {
        (Some(train), Some(eval)) => Some(Reference::Precomputed { train, eval }),
        _ => None,
    })
}

fn write_precomputed(path: &Path, train: &[(f32, f32)], eval: &[(f32, f32)]) -> Result<()> {
    let table = |rows: &[(f32, f32)]| -> Result<Tensor> {
        let flat: Vec<f32> = rows.iter().flat_map(|&(c, r)| [c, r]).collect();
        Ok(Tensor::from_vec(flat, (rows.len(), 2), &Device::Cpu)?)
    };
    let mut map = std::collections::HashMap::new();
    map.insert("train".to_string(), table(train)?);
    map.insert("eval".to_string(), table(eval)?);
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::Msg(format!("{}: {e}", path.display())))
}

/// Evaluation as transformers and DPOTrainer report it: `eval_loss` the mean
/// over pairs (each batch's loss weighted by its pairs), every other metric
/// the mean over batches, each with the `eval_` prefix.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    policy: &CausalLm,
    reference: &Reference,
    pairs: &[DpoPair],
    s: &Settings,
    batch: usize,
    pad: u32,
    num_tokens: u64,
    dev: &Device,
) -> Result<Vec<(String, f64)>> {
    let mut stats = Stats::default();
    let (mut loss_sum, mut n) = (0.0, 0usize);
    let idx: Vec<usize> = (0..pairs.len()).collect();
    for which in idx.chunks(batch.max(1)) {
        let chunk: Vec<&DpoPair> = which.iter().map(|&i| &pairs[i]).collect();
        let b = DpoBatch::new(&chunk, s, pad, dev)?;
        let r = reference.of(&b, which, true, dev)?;
        let (loss, figures) = policy_loss(policy, &b, s, r)?;
        loss_sum += loss.to_scalar::<f32>()? as f64 * which.len() as f64;
        n += which.len();
        for (k, v) in figures {
            stats.add(k, v);
        }
    }
    let mut out = vec![("eval_loss".to_string(), loss_sum / n.max(1) as f64)];
    out.extend(
        stats
            .figures()
            .into_iter()
            .map(|(k, v)| (format!("eval_{k}"), v)),
    );
    out.push(("eval_num_tokens".into(), num_tokens as f64));
    Ok(out)
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct DpoRun {
    pub run_dir: PathBuf,
    pub checkpoint: PathBuf,
    pub steps: u64,
    /// The last evaluation's figures (`eval_loss`, `eval_rewards/accuracies`, ...).
    pub eval: Vec<(String, f64)>,
    pub seconds_per_step: f64,
    pub data: DpoDataReport,
}

impl DpoRun {
    /// A figure of the last evaluation (NaN when absent).
    pub fn eval(&self, name: &str) -> f64 {
        self.eval
            .iter()
            .find(|(k, _)| k == name)
            .map_or(f64::NAN, |(_, v)| *v)
    }
}

/// Trains (or resumes) a policy with DPO in `run_dir` as `cfg` says.
pub fn train(cfg: &Config, run_dir: &Path, resume: bool, stop: &StopSignal) -> Result<DpoRun> {
    let (device, device_name) = crate::device::resolve_device(&cfg.run.device)?;
    let manifest = Manifest::new("dpo", cfg, &device_name);
    let mut run = RunDir::open(run_dir, manifest, resume)?;
    let (d, t, seed) = (&cfg.dpo, &cfg.train, cfg.run.seed);
    let s = Settings::of(cfg);
    let hub = crate::hub::HubSettings::from_env();
    if d.padding_free {
        tracing::warn!(
            "dpo.padding_free = true is ignored, as TRL 1.12 ignores it: sequences are padded"
        );
    }
    if d.truncation_mode == TruncationMode::KeepEnd {
        tracing::warn!("dpo.truncation_mode = \"keep_end\" is deprecated in TRL 1.12 (to be removed in v2.0.0); use keep_start");
    }
    if d.loss_type.contains(&DpoLossType::Robust) && !(0.0..0.5).contains(&d.label_smoothing) {
        tracing::warn!(
            "dpo.label_smoothing should lie in [0.0, 0.5) for the robust loss; it is {}",
            d.label_smoothing
        );
    }

    // 1. Policy and tokenizer.
    let model_dir = crate::models::resolve_model(&cfg.model.resolved_name()?, &hub)?;
    let tok = Tokenizer::from_dir(&model_dir)?;
    let base_config: Value = io::read_json(&model_dir.join("config.json"))?;
    let (arch, vb, mut params) =
        Trained::for_run(cfg, &model_dir, "CAUSAL_LM", cfg.model.init, &device)?;
    let mut lm = CausalLm::load(vb, &arch, true).map_err(|e| {
        Error::Msg(format!(
            "DPO needs a causal LM; {} cannot be one: {e}",
            arch.model_type()
        ))
    })?;
    if d.disable_dropout {
        params = params.without_dropout();
    }
    params.attach(&mut lm)?;
    let varmap = params.varmap().clone();

    // 2. Data: prepared as TRL prepares it, split.
    d.data().train()?;
    let template = TemplateSource::new(&model_dir, cfg.model.chat_template.as_deref());
    let prepare = |spec: &str, split: &str| -> Result<(Vec<DpoPair>, DpoDataReport)> {
        let rows = data::load_preferences(spec, split, &hub)?;
        let (pairs, report) =
            prepare_pairs(&rows, &tok, &template, d.max_length, d.truncation_mode)?;
        tracing::info!("{spec}: {report}");
        Ok((pairs, report))
    };
    let (pairs, report) = prepare(&d.dataset, &d.dataset_train_split)?;
    let (train_pairs, eval_pairs) = match &d.eval_dataset {
        Some(spec) => (pairs, prepare(spec, &d.dataset_test_split)?.0),
        None => data::split(&pairs, d.eval_ratio, seed),
    };

    let longest = train_pairs
        .iter()
        .chain(&eval_pairs)
        .map(|p| (p.prompt.len() + p.chosen.len().max(p.rejected.len())).min(d.max_length));
    if let Some(longest) = longest.max().filter(|&n| n > lm.max_positions()) {
        return Err(Error::InvalidConfig {
            field: "dpo.max_length".into(),
            value: d.max_length.to_string(),
            reason: format!(
                "sequences of up to {longest} tokens remain, beyond the model's {} positions",
                lm.max_positions()
            ),
        });
    }

    // 3. The reference: precomputed once (and kept in the run directory),
    // or a frozen model (the LoRA base with adapters off: no second copy).
    let ref_dtype = d.ref_dtype.map(|x| x.dtype());
    let dtype = cfg.run.dtype.dtype();
    let load_reference = || {
        params.reference(
            &arch,
            d.ref_model.as_deref(),
            &model_dir,
            ref_dtype,
            dtype,
            &device,
        )
    };
    let ref_path = run.path.join(REF_LOGPS_FILE);
    let reference = if d.precompute_ref_log_probs {
        match read_precomputed(&ref_path, train_pairs.len(), eval_pairs.len())? {
            Some(r) => r,
            None => {
                let model = load_reference()?;
                let batch = d
                    .precompute_ref_batch_size
                    .unwrap_or(t.per_device_eval_batch_size);
                let train = precompute(&model, &train_pairs, &s, batch, tok.pad_id, &device)?;
                let eval = precompute(&model, &eval_pairs, &s, batch, tok.pad_id, &device)?;
                write_precomputed(&ref_path, &train, &eval)?;
                Reference::Precomputed { train, eval } // the model is freed here
            }
        }
    } else {
        Reference::Model(load_reference()?)
    };

    // 4. Optimizer, schedule and state.
    let (batch, per_epoch, total) = step_plan(t, train_pairs.len());
    let mut core = TrainCore::new(
        AdamW::from_varmap(&varmap, AdamWParams::from_config(t))?,
        t,
        total,
    );
    let mut state = run.restore(
        TrainerState::fresh(seed, &["data"], json!({"num_tokens": 0})),
        &mut core.optimizer,
        &device,
    )?;
    let tokenizer_files = checkpoint::tokenizer_files(&model_dir);
    let files = ModelFiles {
        config: &base_config,
        tokenizer_files: &tokenizer_files,
    };
    let save = |run: &RunDir, core: &TrainCore, state: &TrainerState| -> Result<PathBuf> {
        params.save_checkpoint(run, &files, &[], core, state, t.save_total_limit)
    };
    let eval_now = |run: &mut RunDir, step: u64, num_tokens: u64| -> Result<Vec<(String, f64)>> {
        params.set_training(false);
        let figures = evaluate(
            &lm,
            &reference,
            &eval_pairs,
            &s,
            t.per_device_eval_batch_size,
            tok.pad_id,
            num_tokens,
            &device,
        )?;
        params.set_training(true);
        run.metrics.log(step, &figures)?;
        Ok(figures)
    };

    // 5. The loop: accumulate micro-batches, step, log, evaluate, checkpoint.
    let mut eval_figures = Vec::new();
    if state.step == 0 && t.eval_on_start.unwrap_or(false) && !eval_pairs.is_empty() {
        eval_figures = eval_now(&mut run, 0, 0)?;
    }
    let progress = Progress::new(total, "dpo");
    let started = Instant::now();
    let first_step = state.step;
    let mut last_checkpoint = None;
    let mut window = Stats::default();
    let mut tokens_this_run = 0usize;
    while state.step < total {
        let step = state.step;
        params.begin_step(step);
        let mut step_loss = 0.0;
        let mut step_tokens = 0;
        for _ in 0..t.gradient_accumulation_steps {
            // Seeded shuffling, reshuffled each epoch; the position is checkpointed.
            let which = state.next_batch(train_pairs.len(), batch);
            let chunk: Vec<&DpoPair> = which.iter().map(|&i| &train_pairs[i]).collect();
            let b = DpoBatch::new(&chunk, &s, tok.pad_id, &device)?;
            let r = reference.of(&b, &which, false, &device)?;
            let (loss, figures) = policy_loss(&lm, &b, &s, r)?;
            step_loss += core.backward(&loss)?;
            step_tokens += b.tokens;
            for (k, v) in figures {
                window.add(k, v);
            }
        }
        let outcome = core.step(step)?;
        state.step += 1;
        state.optimizer_steps = core.optimizer.steps();
        let num_tokens = state.extra["num_tokens"].as_u64().unwrap_or(0) + step_tokens as u64;
        state.extra["num_tokens"] = json!(num_tokens);
        tokens_this_run += step_tokens;
        let loss = step_loss / t.gradient_accumulation_steps as f64;
        window.add("loss", loss);
        if let StepOutcome::Applied { grad_norm, lr } = outcome {
            if state.step.is_multiple_of(t.logging_steps) || state.step == total {
                let elapsed = started.elapsed().as_secs_f64().max(1e-9);
                let mut figures = std::mem::take(&mut window).figures();
                figures.extend([
                    ("grad_norm".to_string(), grad_norm),
                    ("learning_rate".to_string(), lr),
                    ("num_tokens".to_string(), num_tokens as f64),
                    (
                        "tokens_per_second".to_string(),
                        tokens_this_run as f64 / elapsed,
                    ),
                    ("epoch".to_string(), state.step as f64 / per_epoch as f64),
                ]);
                run.metrics.log(state.step, &figures)?;
            }
        }
        progress.update(state.step, &[("loss", loss)]);
        let due = t.eval_steps.is_some_and(|n| state.step.is_multiple_of(n)) || state.step == total;
        if due && !eval_pairs.is_empty() {
            eval_figures = eval_now(&mut run, state.step, num_tokens)?;
        }
        let stopping = stop.requested();
        checkpoint_if_due(
            state.step,
            total,
            t.save_steps,
            stopping,
            &mut last_checkpoint,
            || save(&run, &core, &state),
        )?;
    }
    progress.finish();
    let steps_run = (state.step - first_step).max(1);
    let checkpoint = run.finish(last_checkpoint)?;
    Ok(DpoRun {
        run_dir: run.path.clone(),
        checkpoint,
        steps: state.step,
        eval: eval_figures,
        seconds_per_step: started.elapsed().as_secs_f64() / steps_run as f64,
        data: report,
    })
}
