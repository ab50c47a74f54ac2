//! Stage 1: supervised fine-tuning of a causal LM, as TRL's SFTTrainer does
//! it. Rows are prompt + completion (the loss on completion tokens only,
//! TRL's `completion_only_loss`) or plain text (every token), EOS appended;
//! optionally packed several to a row (best-fit decreasing, each sequence
//! attending only to itself with positions restarting, TRL's "bfd").
//! The loss is the mean negative log-likelihood over the trained tokens.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::trained::{ModelFiles, Trained};
use crate::chat::TemplateSource;
use crate::checkpoint::{self, Manifest, TrainerState};
use crate::config::Config;
use crate::data::batch::position_ids;
use crate::data::sft::{pack, tokenize_rows, SftDataReport, SftRow};
use crate::data::{self};
use crate::io;
use crate::metrics::Progress;
use crate::models::{attention_bias, CausalLm, Linears};
use crate::optim::{StepOutcome, TrainCore};
use crate::rl;
use crate::run::{checkpoint_if_due, RunDir};
use crate::signal::StopSignal;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Mean NLL over the trained tokens of `rows` (right-padded into one
/// batch), and (correct, trained) counts of greedy next-token predictions
/// (TRL's mean_token_accuracy).
pub fn batch_loss(
    lm: &CausalLm,
    rows: &[&SftRow],
    pad: u32,
    device: &Device,
) -> Result<(Tensor, usize, usize)> {
    let width = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let b = rows.len();
    let mut ids = Vec::with_capacity(b * width);
    let mut targets_mask = Vec::with_capacity(b * (width - 1));
    let mut segments = Vec::with_capacity(b);
    for r in rows {
        let pad_len = width - r.ids.len();
        ids.extend(&r.ids);
        ids.extend(std::iter::repeat_n(pad, pad_len));
        let mut t: Vec<f32> = r.trained[1..].iter().map(|&x| x as f32).collect();
        t.resize(width - 1, 0.0);
        targets_mask.extend(t);
        let mut s = r.segments.clone();
        s.resize(width, 0);
        segments.push(s);
    }
    let ids = Tensor::from_vec(ids, (b, width), device)?;
    let positions = Tensor::from_vec(position_ids(&segments).concat(), (b, width), device)?;
    let bias = attention_bias(&segments, width, lm.dtype(), device)?;
    let hidden = lm.forward(&ids, &positions, &bias, None)?;
    let e = hidden.dim(2)?;
    // The head fused with the log-probs in row chunks: no (B, T, V) logits.
    let h = hidden
        .narrow(1, 0, width - 1)?
        .reshape((b * (width - 1), e))?;
    let targets = ids.narrow(1, 1, width - 1)?.flatten_all()?;
    let mask = Tensor::from_vec(targets_mask, (b, width - 1), device)?;
    let tf = lm.token_figures(&h, &targets, 1.0, false)?;
    let logp = tf.logps.reshape((b, width - 1))?;
    let loss = rl::masked_mean(&logp, &mask)?.neg()?;
    let hits = tf.correct.reshape((b, width - 1))?;
    let correct = (hits * &mask)?.sum_all()?.to_scalar::<f32>()? as usize;
    let trained = mask.sum_all()?.to_scalar::<f32>()? as usize;
    Ok((loss, correct, trained))
}

/// Loss and token accuracy over `rows` without training.
fn eval_loss(
    lm: &CausalLm,
    rows: &[SftRow],
    batch: usize,
    pad: u32,
    dev: &Device,
) -> Result<(f64, f64)> {
    // Each rank scores its part of the rows; the sums are all-reduced.
    let world = crate::dist::world();
    let mut sums = [0.0; 3]; // nll, correct, trained
    let refs: Vec<&SftRow> = rows[world.split(rows.len())].iter().collect();
    for chunk in refs.chunks(batch.max(1)) {
        let (loss, c, t) = batch_loss(lm, chunk, pad, dev)?;
        sums[0] += loss.to_scalar::<f32>()? as f64 * t as f64;
        sums[1] += c as f64;
        sums[2] += t as f64;
    }
    world.sum(&mut sums);
    let n = sums[2].max(1.0);
    Ok((sums[0] / n, sums[1] / n))
}

/// What a finished SFT run reports.
#[derive(Debug, Clone)]
pub struct SftRun {
    pub run_dir: PathBuf,
    pub checkpoint: PathBuf,
    pub steps: u64,
    pub eval_loss: f64,
    pub eval_mean_token_accuracy: f64,
    pub seconds_per_step: f64,
    pub data: SftDataReport,
}

/// Trains (or resumes) a causal LM on SFT rows in `run_dir` as `cfg` says.
pub fn train(cfg: &Config, run_dir: &Path, resume: bool, stop: &StopSignal) -> Result<SftRun> {
    let (device, device_name) = crate::device::resolve_device(&cfg.run.device)?;
    let manifest = Manifest::new("sft", cfg, &device_name);
    let mut run = RunDir::open(run_dir, manifest, resume)?;
    let (s, t, seed) = (&cfg.sft, &cfg.train, cfg.run.seed);
    let hub = crate::hub::HubSettings::from_env();

    // 1. Model and tokenizer.
    let model_dir = crate::models::resolve_model(&cfg.model.resolved_name()?, &hub)?;
    let tok = Tokenizer::from_dir(&model_dir)?;
    let base_config: Value = io::read_json(&model_dir.join("config.json"))?;
    let (arch, vb, mut params) =
        Trained::for_run(cfg, &model_dir, "CAUSAL_LM", cfg.model.init, &device)?;
    let mut lm = CausalLm::load(vb, &arch, true).map_err(|e| {
        Error::Msg(format!(
            "SFT needs a causal LM; {} cannot be one: {e}",
            arch.model_type()
        ))
    })?;
    params.attach(&mut lm)?;
    lm.set_activation_checkpointing(cfg.train.activation_checkpointing);
    let varmap = params.varmap().clone();
    if s.max_length > lm.max_positions() {
        return Err(Error::InvalidConfig {
            field: "sft.max_length".into(),
            value: s.max_length.to_string(),
            reason: format!("exceeds the model's {} positions", lm.max_positions()),
        });
    }

    // 2. Data: tokenized, split, packed.
    s.data().train()?;
    let records = data::load_records(&s.dataset, &s.dataset_train_split, &hub)?;
    let template = TemplateSource::new(&model_dir, cfg.model.chat_template.as_deref());
    let (rows, mut report) = tokenize_rows(&records, &tok, &template, s)?;
    let (mut train_rows, mut eval_rows) = match &s.eval_dataset {
        Some(spec) => {
            let records = data::load_records(spec, &s.dataset_test_split, &hub)?;
            let (eval, r) = tokenize_rows(&records, &tok, &template, s)?;
            tracing::info!("{spec}: {r}");
            (rows, eval)
        }
        None => data::split(&rows, s.eval_ratio, seed),
    };
    if s.packing {
        train_rows = pack(&train_rows, s.max_length);
        eval_rows = pack(&eval_rows, s.max_length);
    }
    report.packed_rows = train_rows.len();
    tracing::info!("{}: {report}", s.dataset);

    // 3. Optimizer, schedule and state: fresh, or the newest checkpoint's.
    let super::OfflineStart {
        mut core,
        mut state,
        batch,
        per_epoch,
        total,
    } = super::offline_start(&run, t, &varmap, train_rows.len(), seed, &device)?;
    let tokenizer_files = checkpoint::tokenizer_files(&model_dir);
    let files = ModelFiles {
        config: &base_config,
        tokenizer_files: &tokenizer_files,
    };
    let save = |run: &RunDir, core: &TrainCore, state: &TrainerState| -> Result<PathBuf> {
        params.save_checkpoint(run, &files, &[], core, state, t.save_total_limit)
    };

    // 4. The loop (after an evaluation with eval_on_start, at every start as in transformers).
    let mut eval_figures = (f64::NAN, f64::NAN);
    let log_eval = |run: &mut RunDir, step: u64, figures: (f64, f64)| {
        let named = [
            ("eval_loss", figures.0),
            ("eval_mean_token_accuracy", figures.1),
        ];
        run.metrics.log(step, &named)
    };
    if t.eval_on_start.unwrap_or(false) && !eval_rows.is_empty() {
        params.set_training(false);
        eval_figures = eval_loss(
            &lm,
            &eval_rows,
            t.per_device_eval_batch_size,
            tok.pad_id,
            &device,
        )?;
        log_eval(&mut run, state.step, eval_figures)?;
    }
    let progress = Progress::new(total, "sft");
    let started = Instant::now();
    let first_step = state.step;
    let mut last_checkpoint = None;
    let mut tokens_this_run = 0usize;
    let world = crate::dist::world();
    while state.step < total {
        let step = state.step;
        let (mut loss_sum, mut correct, mut trained) = (0.0, 0, 0);
        params.begin_step(step);
        for _ in 0..t.gradient_accumulation_steps {
            // Seeded shuffling, reshuffled each epoch; the position is checkpointed.
            let chunk: Vec<&SftRow> = state
                .next_shard(train_rows.len(), batch)
                .into_iter()
                .map(|i| &train_rows[i])
                .collect();
            tokens_this_run += chunk.iter().map(|r| r.ids.len()).sum::<usize>();
            let (loss, c, n) = batch_loss(&lm, &chunk, tok.pad_id, &device)?;
            // The mean over the trained tokens of every rank's micro-batch.
            let loss = (loss * world.share(n as f64))?;
            loss_sum += core.backward(&loss)?;
            correct += c;
            trained += n;
        }
        // Figures over the global batch: every rank's sums.
        let mut sums = [
            loss_sum,
            correct as f64,
            trained as f64,
            tokens_this_run as f64,
        ];
        world.sum(&mut sums);
        let (loss_sum, correct, trained) = (sums[0], sums[1] as usize, sums[2] as usize);
        let tokens_this_run = sums[3] as usize;
        let outcome = core.step(step)?;
        state.step += 1;
        state.optimizer_steps = core.optimizer.steps();
        let num_tokens = state.extra["num_tokens"].as_u64().unwrap_or(0) + trained as u64;
        state.extra["num_tokens"] = json!(num_tokens);
        let loss = loss_sum / t.gradient_accumulation_steps as f64;
        let accuracy = correct as f64 / trained.max(1) as f64;
        if let StepOutcome::Applied { grad_norm, lr } = outcome {
            if state.step.is_multiple_of(t.logging_steps) || state.step == total {
                let elapsed = started.elapsed().as_secs_f64().max(1e-9);
                run.metrics.log(
                    state.step,
                    &[
                        ("loss", loss),
                        ("mean_token_accuracy", accuracy),
                        ("grad_norm", grad_norm),
                        ("learning_rate", lr),
                        ("num_tokens", num_tokens as f64),
                        ("tokens_per_second", tokens_this_run as f64 / elapsed),
                        ("epoch", state.step as f64 / per_epoch as f64),
                    ],
                )?;
            }
        }
        progress.update(state.step, &[("loss", loss), ("accuracy", accuracy)]);
        let eval_now =
            t.eval_steps.is_some_and(|n| state.step.is_multiple_of(n)) || state.step == total;
        if eval_now && !eval_rows.is_empty() {
            let batch = t.per_device_eval_batch_size;
            params.set_training(false);
            eval_figures = eval_loss(&lm, &eval_rows, batch, tok.pad_id, &device)?;
            log_eval(&mut run, state.step, eval_figures)?;
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
    Ok(SftRun {
        run_dir: run.path.clone(),
        checkpoint,
        steps: state.step,
        eval_loss: eval_figures.0,
        eval_mean_token_accuracy: eval_figures.1,
        seconds_per_step: started.elapsed().as_secs_f64() / steps_run as f64,
        data: report,
    })
}
