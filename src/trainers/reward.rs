//! Stage 2: reward-model training on preference pairs, as TRL's
//! RewardTrainer does it. Each micro-batch puts the chosen and the rejected
//! sequences of its pairs through the model in one padded batch, and the loss
//! is the Bradley-Terry -logsigmoid(r_chosen - r_rejected - margin)
//! (Ouyang et al., 2022, eq. 1), optionally plus a centering term.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::trained::{ModelFiles, Trained};
use crate::chat::TemplateSource;
use crate::checkpoint::{self, Manifest, TrainerState};
use crate::config::Config;
use crate::data::{self, TokenizedPair};
use crate::io;
use crate::metrics::Progress;
use crate::models::reward_model::{RewardModel, OFFSET_KEY};
use crate::models::Linears;
use crate::optim::{StepOutcome, TrainCore};
use crate::rl::bradley_terry;
use crate::run::{checkpoint_if_due, RunDir};
use crate::signal::StopSignal;
use crate::tokenizer::Tokenizer;
use crate::Result;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RewardRun {
    pub run_dir: PathBuf,
    pub checkpoint: PathBuf,
    pub steps: u64,
    pub eval_accuracy: f64,
    pub eval_loss: f64,
    pub seconds_per_step: f64,
    pub data: data::DataReport,
}

/// Batch statistics with TRL's names.
#[derive(Debug, Clone, Default)]
struct PairStats {
    loss_sum: f64,
    /// What loss_sum is divided by: micro-batches (training: a mean of
    /// their means, as TRL logs it) or pairs (evaluation: per pair).
    loss_weight: f64,
    correct: usize,
    pairs: usize,
    margin_sum: f64,
    rewards: Vec<f32>,
    tokens: usize,
}

impl PairStats {
    fn add(&mut self, loss: f64, weight: f64, chosen: &[f32], rejected: &[f32], tokens: usize) {
        self.loss_sum += loss * weight;
        self.loss_weight += weight;
        for (c, r) in chosen.iter().zip(rejected) {
            self.correct += usize::from(c > r); // ties count as wrong, as in TRL
            self.margin_sum += (c - r) as f64;
        }
        self.pairs += chosen.len();
        self.rewards.extend(chosen.iter().chain(rejected));
        self.tokens += tokens;
    }

    /// The figures of every rank's pairs (data parallelism): the sums
    /// all-reduced, the rewards gathered. A training step's micro-batch
    /// count is the same on every rank: its loss terms, each rank's share
    /// of a micro-batch's mean, add up and it is not summed.
    fn all_ranks(mut self, weight_is_per_rank: bool) -> Result<Self> {
        let world = crate::dist::world();
        if world.is_single() {
            return Ok(self);
        }
        let mut sums = [
            self.loss_sum,
            self.loss_weight,
            self.correct as f64,
            self.pairs as f64,
            self.margin_sum,
            self.tokens as f64,
        ];
        world.sum(&mut sums);
        self.loss_sum = sums[0];
        if !weight_is_per_rank {
            self.loss_weight = sums[1];
        }
        self.correct = sums[2] as usize;
        self.pairs = sums[3] as usize;
        self.margin_sum = sums[4];
        self.tokens = sums[5] as usize;
        self.rewards = world.concat_f32(std::mem::take(&mut self.rewards));
        Ok(self)
    }

    fn loss(&self) -> f64 {
        self.loss_sum / self.loss_weight.max(1e-300)
    }

    fn accuracy(&self) -> f64 {
        self.correct as f64 / self.pairs.max(1) as f64
    }

    fn figures(&self, prefix: &str) -> Vec<(String, f64)> {
        let n = self.rewards.len().max(1) as f64;
        let fold = |f: fn(f32, f32) -> f32, init| self.rewards.iter().copied().fold(init, f) as f64;
        vec![
            (format!("{prefix}loss"), self.loss()),
            (format!("{prefix}accuracy"), self.accuracy()),
            (
                format!("{prefix}margin"),
                self.margin_sum / self.pairs.max(1) as f64,
            ),
            (
                format!("{prefix}mean_reward"),
                self.rewards.iter().map(|&r| r as f64).sum::<f64>() / n,
            ),
            (format!("{prefix}min_reward"), fold(f32::min, f32::INFINITY)),
            (
                format!("{prefix}max_reward"),
                fold(f32::max, f32::NEG_INFINITY),
            ),
        ]
    }
}

/// Rewards of the chosen and the rejected sequences of `pairs`, and the loss.
fn pair_loss(
    model: &RewardModel,
    pairs: &[&TokenizedPair],
    cfg: &Config,
    pad_id: u32,
    device: &Device,
) -> Result<(Tensor, Vec<f32>, Vec<f32>, usize)> {
    let b = pairs.len();
    // Chosen and rejected in one padded batch: (2B,), chosen first.
    let seqs: Vec<Vec<u32>> = pairs
        .iter()
        .map(|p| p.chosen.clone())
        .chain(pairs.iter().map(|p| p.rejected.clone()))
        .collect();
    let tokens = seqs.iter().map(Vec::len).sum();
    let rewards = model.rewards_of(&seqs, pad_id, device)?;
    let (chosen, rejected) = (rewards.narrow(0, 0, b)?, rewards.narrow(0, b, b)?);
    let margins: Vec<f32> = pairs.iter().map(|p| p.margin).collect();
    let margin = if margins.iter().any(|&m| m != 0.0) {
        Some(Tensor::from_vec(margins, b, device)?)
    } else {
        None
    };
    let loss = bradley_terry(
        &chosen,
        &rejected,
        margin.as_ref(),
        cfg.reward.center_rewards_coefficient,
    )?;
    Ok((loss, chosen.to_vec1()?, rejected.to_vec1()?, tokens))
}

/// Loss and statistics over `pairs` without training (the eval split).
fn eval_stats(
    model: &RewardModel,
    pairs: &[TokenizedPair],
    cfg: &Config,
    pad_id: u32,
    device: &Device,
) -> Result<PairStats> {
    // Each rank scores its part of the pairs; the figures are all-reduced.
    let mut stats = PairStats::default();
    let mine = &pairs[crate::dist::world().split(pairs.len())];
    let refs: Vec<&TokenizedPair> = mine.iter().collect();
    for chunk in refs.chunks(cfg.train.per_device_eval_batch_size) {
        let (loss, c, r, tokens) = pair_loss(model, chunk, cfg, pad_id, device)?;
        let b = chunk.len() as f64;
        stats.add(loss.to_scalar::<f32>()? as f64, b, &c, &r, tokens);
    }
    stats.all_ranks(false)
}

/// Trains (or resumes) a reward model in `run_dir` as `cfg` says.
pub fn train(cfg: &Config, run_dir: &Path, resume: bool, stop: &StopSignal) -> Result<RewardRun> {
    let (device, device_name) = crate::device::resolve_device(&cfg.run.device)?;
    let dtype = cfg.run.dtype.dtype();
    let manifest = Manifest::new("reward", cfg, &device_name);
    let mut run = RunDir::open(run_dir, manifest, resume)?;
    let seed = cfg.run.seed;

    // 1. Model and tokenizer: any backbone, the head loaded or new.
    let hub = crate::hub::HubSettings::from_env();
    let model_dir = crate::models::resolve_model(&cfg.model.resolved_name()?, &hub)?;
    let tok = Tokenizer::from_dir(&model_dir)?;
    let base_config: Value = io::read_json(&model_dir.join("config.json"))?;
    let (mut model, params) = match cfg.lora {
        None => {
            let (model, varmap) =
                RewardModel::from_dir_init(&model_dir, dtype, &device, cfg.model.init, seed)?;
            (model, Trained::Full(varmap))
        }
        Some(_) => {
            // peft's SEQ_CLS task: the head (`score` / `classifier`) trains in full.
            let (arch, vb, mut params) =
                Trained::for_run(cfg, &model_dir, "SEQ_CLS", cfg.model.init, &device)?;
            let mut model = RewardModel::load(vb, params.varmap(), &arch, seed)?;
            model.offset = base_config[OFFSET_KEY].as_f64().unwrap_or(0.0);
            if cfg.reward.disable_dropout {
                params = params.without_dropout();
            }
            params.attach(&mut model)?;
            (model, params)
        }
    };
    model.set_activation_checkpointing(cfg.train.activation_checkpointing);
    let varmap = params.varmap().clone();

    // 2. Data: tokenized, filtered, split.
    cfg.reward.data().train()?;
    let rows = data::load_preferences(&cfg.reward.dataset, &cfg.reward.dataset_train_split, &hub)?;
    // Conversational rows are rendered with the model's chat template (or the user's).
    let template = TemplateSource::new(&model_dir, cfg.model.chat_template.as_deref());
    let r = &cfg.reward;
    let (pairs, report) = data::tokenize_pairs(&rows, &tok, &template, r.max_length, r.truncate)?;
    tracing::info!("{}: {report}", cfg.reward.dataset);
    let (train_pairs, eval_pairs) = match &cfg.reward.eval_dataset {
        Some(path) => {
            let rows = data::load_preferences(path, &cfg.reward.dataset_test_split, &hub)?;
            let (eval, eval_report) =
                data::tokenize_pairs(&rows, &tok, &template, r.max_length, r.truncate)?;
            tracing::info!("{path}: {eval_report}");
            (pairs, eval)
        }
        None => data::split(&pairs, cfg.reward.eval_ratio, seed),
    };

    // 3. Optimizer, schedule and state: fresh, or the newest checkpoint's.
    let t = &cfg.train;
    let super::OfflineStart {
        mut core,
        mut state,
        batch,
        per_epoch,
        total,
    } = super::offline_start(&run, t, &varmap, train_pairs.len(), seed, &device)?;
    let tokenizer_files = checkpoint::tokenizer_files(&model_dir);
    let save = |run: &RunDir,
                core: &TrainCore,
                state: &TrainerState,
                model: &RewardModel|
     -> Result<PathBuf> {
        let files = ModelFiles {
            config: &model.checkpoint_config(&base_config, tok.pad_id),
            tokenizer_files: &tokenizer_files,
        };
        params.save_checkpoint(run, &files, &[], core, state, t.save_total_limit)
    };

    // 4. The loop: accumulate micro-batches, step, log, evaluate, checkpoint
    // (after an evaluation with eval_on_start, at every start as in transformers).
    let mut eval_figures: Vec<(String, f64)> = Vec::new();
    if t.eval_on_start.unwrap_or(false) && !eval_pairs.is_empty() {
        params.set_training(false);
        eval_figures = eval_stats(&model, &eval_pairs, cfg, tok.pad_id, &device)?.figures("eval_");
        run.metrics.log(state.step, &eval_figures)?;
    }
    let progress = Progress::new(total, "reward");
    let started = Instant::now();
    let first_step = state.step;
    let mut last_checkpoint = None;
    let mut tokens_this_run = 0usize;
    while state.step < total {
        let step = state.step;
        let mut stats = PairStats::default();
        params.begin_step(step);
        for _ in 0..t.gradient_accumulation_steps {
            // Seeded shuffling, reshuffled each epoch; the position is checkpointed.
            let chunk: Vec<&TokenizedPair> = state
                .next_shard(train_pairs.len(), batch)
                .into_iter()
                .map(|i| &train_pairs[i])
                .collect();
            let (loss, c, r, tokens) = pair_loss(&model, &chunk, cfg, tok.pad_id, &device)?;
            // The mean over every rank's pairs of this micro-batch.
            let loss = (loss * crate::dist::world().share(chunk.len() as f64))?;
            let value = core.backward(&loss)?;
            stats.add(value, 1.0, &c, &r, tokens);
        }
        let stats = stats.all_ranks(true)?;
        let outcome = core.step(step)?;
        state.step += 1;
        state.optimizer_steps = core.optimizer.steps();
        let num_tokens = state.extra["num_tokens"].as_u64().unwrap_or(0) + stats.tokens as u64;
        state.extra["num_tokens"] = json!(num_tokens);
        tokens_this_run += stats.tokens;
        let elapsed = started.elapsed().as_secs_f64().max(1e-9);
        if let StepOutcome::Applied { grad_norm, lr } = outcome {
            if state.step.is_multiple_of(t.logging_steps) || state.step == total {
                let mut figures = stats.figures("");
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
        progress.update(
            state.step,
            &[("loss", stats.loss()), ("accuracy", stats.accuracy())],
        );
        let eval_now =
            t.eval_steps.is_some_and(|n| state.step.is_multiple_of(n)) || state.step == total;
        if eval_now && !eval_pairs.is_empty() {
            params.set_training(false);
            eval_figures =
                eval_stats(&model, &eval_pairs, cfg, tok.pad_id, &device)?.figures("eval_");
            run.metrics.log(state.step, &eval_figures)?;
        }
        let stopping = stop.requested();
        if state.step == total && cfg.reward.normalize {
            // Reward normalization: the chosen training responses score 0 on average.
            model.offset = 0.0;
            let mut sum = 0.0;
            let mine = &train_pairs[crate::dist::world().split(train_pairs.len())];
            for chunk in mine.chunks(t.per_device_eval_batch_size) {
                let seqs: Vec<Vec<u32>> = chunk.iter().map(|p| p.chosen.clone()).collect();
                let r: Vec<f32> = model.rewards_of(&seqs, tok.pad_id, &device)?.to_vec1()?;
                sum += r.iter().map(|&v| v as f64).sum::<f64>();
            }
            model.offset = crate::dist::world().sum_of(sum) / train_pairs.len() as f64;
            tracing::info!("reward offset (mean chosen score): {:.4}", model.offset);
        }
        checkpoint_if_due(
            state.step,
            total,
            t.save_steps,
            stopping,
            &mut last_checkpoint,
            || save(&run, &core, &state, &model),
        )?;
    }
    progress.finish();
    let steps_run = (state.step - first_step).max(1);
    let seconds_per_step = started.elapsed().as_secs_f64() / steps_run as f64;
    let figure = |name: &str| {
        eval_figures
            .iter()
            .find(|(k, _)| k == name)
            .map_or(f64::NAN, |(_, v)| *v)
    };
    let checkpoint = run.finish(last_checkpoint)?;
    Ok(RewardRun {
        run_dir: run.path.clone(),
        checkpoint,
        steps: state.step,
        eval_accuracy: figure("eval_accuracy"),
        eval_loss: figure("eval_loss"),
        seconds_per_step,
        data: report,
    })
}

/// What `score --data` reports: accuracy, mean margin and calibration.
#[derive(Debug, Clone)]
pub struct ScoreReport {
    pub pairs: usize,
    pub accuracy: f64,
    pub mean_margin: f64,
    /// (bin low, bin high, pairs, mean predicted P(chosen > rejected), observed accuracy)
    pub calibration: Vec<(f64, f64, usize, f64, f64)>,
}

impl std::fmt::Display for ScoreReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "pairs: {}  accuracy: {:.4}  mean margin: {:.4}",
            self.pairs, self.accuracy, self.mean_margin
        )?;
        writeln!(
            f,
            "calibration (P = sigmoid(score_a - score_b), each pair counted in both orders):"
        )?;
        writeln!(f, "  bin          pairs  predicted  observed")?;
        for (lo, hi, n, p, o) in &self.calibration {
            writeln!(f, "  [{lo:.1}, {hi:.1})  {n:>6}  {p:>9.3}  {o:>8.3}")?;
        }
        Ok(())
    }
}

/// Bins pairs by the predicted probability that the first of two responses
/// is preferred, sigmoid(s_a - s_b), and compares with how often it was.
/// Each pair is counted in both orders, so the table is symmetric around 0.5.
pub fn calibration(margins: &[f64], bins: usize) -> Vec<(f64, f64, usize, f64, f64)> {
    let mut acc = vec![(0usize, 0.0f64, 0.0f64); bins];
    for &m in margins {
        for (diff, chosen_first) in [(m, 1.0), (-m, 0.0)] {
            let p = 1.0 / (1.0 + (-diff).exp());
            let b = ((p * bins as f64) as usize).min(bins - 1);
            acc[b].0 += 1;
            acc[b].1 += p;
            acc[b].2 += chosen_first;
        }
    }
    acc.iter()
        .enumerate()
        .filter(|(_, (n, _, _))| *n > 0)
        .map(|(i, (n, p, o))| {
            (
                i as f64 / bins as f64,
                (i + 1) as f64 / bins as f64,
                *n,
                p / *n as f64,
                o / *n as f64,
            )
        })
        .collect()
}

/// Scores every pair, writes one JSON line per pair (source, chosen_score,
/// rejected_score) to `out`, and reports.
pub fn score_pairs(
    scorer: &crate::models::reward_model::RewardScorer,
    template: &TemplateSource,
    rows: &[data::PreferenceRow],
    out: &Path,
    batch: usize,
) -> Result<ScoreReport> {
    let mut lines = String::new();
    let mut margins = Vec::new();
    for chunk in rows.chunks(batch.max(1)) {
        let sides = chunk
            .iter()
            .map(|r| data::preference::encode_sides(r, &scorer.tokenizer, template))
            .collect::<Result<Vec<_>>>()?;
        let seqs: Vec<Vec<u32>> = sides
            .iter()
            .map(|(c, _)| c.clone())
            .chain(sides.iter().map(|(_, r)| r.clone()))
            .collect();
        let s = scorer.score_ids(&seqs)?;
        for (i, row) in chunk.iter().enumerate() {
            let (c, r) = (s[i], s[chunk.len() + i]);
            margins.push((c - r) as f64);
            lines.push_str(&format!(
                "{}\n",
                json!({"source": row.source, "chosen_score": c, "rejected_score": r})
            ));
        }
    }
    io::atomic_write(out, lines.as_bytes())?;
    let n = margins.len().max(1) as f64;
    Ok(ScoreReport {
        pairs: margins.len(),
        accuracy: margins.iter().filter(|&&m| m > 0.0).count() as f64 / n,
        mean_margin: margins.iter().sum::<f64>() / n,
        calibration: calibration(&margins, 10),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_bins_both_orders_of_each_pair() {
        // margin 0: p = 0.5 both ways, in bin [0.5, 0.6), observed 1/2.
        // margin ln 3: p = 0.75 (chosen first, observed 1) and 0.25 (observed 0).
        let table = calibration(&[0.0, 3f64.ln()], 10);
        assert_eq!(table.len(), 3);
        let (lo, _, n, p, o) = table[0];
        assert_eq!((lo, n), (0.2, 1));
        assert!((p - 0.25).abs() < 1e-12 && o == 0.0);
        let (lo, _, n, p, o) = table[1];
        assert_eq!((lo, n), (0.5, 2));
        assert!((p - 0.5).abs() < 1e-12 && (o - 0.5).abs() < 1e-12);
        let (lo, _, n, p, o) = table[2];
        assert_eq!((lo, n), (0.7, 1));
        assert!((p - 0.75).abs() < 1e-12 && o == 1.0);
    }

    #[test]
    fn accuracy_counts_ties_as_wrong() {
        let mut s = PairStats::default();
        s.add(0.5, 1.0, &[1.0, 2.0, 0.0], &[0.0, 2.0, 1.0], 10);
        assert!((s.accuracy() - 1.0 / 3.0).abs() < 1e-12);
        let f = s.figures("");
        assert_eq!(f[2].1, 0.0); // mean margin (1 + 0 - 1) / 3
        assert_eq!((f[4].1, f[5].1), (0.0, 2.0)); // min, max reward
    }
}
