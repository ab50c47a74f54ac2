//! GRPO and RLOO: online RL without a critic, as TRL's GRPOTrainer and
//! RLOOTrainer define them. Each prompt is answered `num_generations`
//! times; a completion's advantage is its reward against the others of its
//! group (GRPO: minus the group mean, scaled; RLOO: minus the mean of the
//! other completions). One iteration (one generation batch), top to bottom:
//!
//! 1. sample the group of completions of each prompt (KV cache, no graph);
//! 2. log-probs of the sampled tokens under the policy as it sampled (when
//!    a later step needs them) and under the reference (when beta > 0);
//! 3. score them with every reward function, weighted into one reward;
//! 4. rewards: RLOO clamps them (`reward_clip_range`) and subtracts beta x
//!    the sequence KL; GRPO leaves them (its beta x k3 KL is a loss term);
//! 5. advantages, one per completion, from its group;
//! 6. `num_iterations` passes of optimizer steps over shuffled micro-batches
//!    of the generation batch: the clipped surrogate (per token for GRPO,
//!    per sequence for RLOO), reduced as `loss_type` says;
//! 7. (no adaptive KL: the critic-free family keeps beta fixed);
//! 8. log (TRL's metric names), samples, evaluation, checkpoint.
//!
//! Logging, evaluation and checkpoint intervals (`train.logging_steps`,
//! `eval_steps`, `save_steps`) count iterations, which are optimizer steps
//! under the defaults (`steps_per_generation` = gradient accumulation,
//! `num_iterations` = 1); `train.max_steps` counts optimizer steps.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

pub use super::eval::EvalFigures;
use super::eval::{evaluate_if_due, log_eval};
use super::rollout::{self, policy_outputs, Batch, Scored};
use super::stats::{mean, std, LossStats};
use crate::chat::TemplateSource;
use crate::checkpoint::{self, Checkpoint, Manifest, TrainerState};
use crate::config::{
    Config, DatasetConfig, GrpoLossType, ImportanceSamplingLevel, KlEstimator, ModelInit,
    ScaleRewards,
};
use crate::data::prompts::{load_prompt_rows, PromptReport, PromptRow};
use crate::generate::Sampling;
use crate::hub::HubSettings;
use crate::metrics::Progress;
use crate::models::{load_dir_frozen, resolve_model, CausalLm};
use crate::optim::adamw::{AdamW, AdamWParams};
use crate::optim::{StepOutcome, TrainCore};
use crate::rewards::RewardFuncs;
use crate::rl;
use crate::run::{checkpoint_if_due, RunDir};
use crate::signal::StopSignal;
use crate::tokenizer::Tokenizer;
use crate::trainers::trained::Trained;
use crate::{io, Error, HostRng, Result};

/// Which member of the critic-free family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    Grpo,
    Rloo,
}

impl Algo {
    /// The subcommand and config section.
    pub fn name(self) -> &'static str {
        match self {
            Algo::Grpo => "grpo",
            Algo::Rloo => "rloo",
        }
    }
}

/// The settings of one run, read from `[grpo]` or `[rloo]`.
struct Settings<'a> {
    algo: Algo,
    data: DatasetConfig<'a>,
    group: usize,
    max_prompt_length: usize,
    truncate_prompts: bool,
    max_completion_length: usize,
    temperature: f64,
    top_p: f64,
    top_k: Option<usize>,
    beta: f64,
    eps_low: f64,
    eps_high: f64,
    num_iterations: usize,
    steps_per_generation: usize,
    mask_truncated: bool,
    ref_model: Option<&'a str>,
    num_sample_generations: usize,
    disable_dropout: bool,
    // GRPO only.
    loss_type: GrpoLossType,
    scale_rewards: ScaleRewards,
    level: ImportanceSamplingLevel,
    // RLOO only.
    normalize_advantages: bool,
    reward_clip_range: Option<[f64; 2]>,
}

impl<'a> Settings<'a> {
    fn of(cfg: &'a Config, algo: Algo) -> Self {
        let ga = cfg.train.gradient_accumulation_steps;
        match algo {
            Algo::Grpo => {
                let g = &cfg.grpo;
                Settings {
                    algo,
                    data: g.data(),
                    group: g.num_generations,
                    max_prompt_length: g.max_prompt_length,
                    truncate_prompts: g.truncate_prompts,
                    max_completion_length: g.max_completion_length,
                    temperature: g.temperature,
                    top_p: g.top_p,
                    top_k: g.top_k,
                    beta: g.beta,
                    eps_low: g.epsilon,
                    eps_high: g.epsilon_high.unwrap_or(g.epsilon),
                    num_iterations: g.num_iterations,
                    steps_per_generation: g.steps_per_generation.unwrap_or(ga),
                    mask_truncated: g.mask_truncated_completions,
                    ref_model: g.ref_model.as_deref(),
                    num_sample_generations: g.num_sample_generations,
                    disable_dropout: g.disable_dropout,
                    loss_type: g.loss_type,
                    scale_rewards: g.scale_rewards,
                    level: g.importance_sampling_level,
                    normalize_advantages: false,
                    reward_clip_range: None,
                }
            }
            Algo::Rloo => {
                let r = &cfg.rloo;
                Settings {
                    algo,
                    data: r.data(),
                    group: r.num_generations,
                    max_prompt_length: r.max_prompt_length,
                    truncate_prompts: r.truncate_prompts,
                    max_completion_length: r.max_completion_length,
                    temperature: r.temperature,
                    top_p: r.top_p,
                    top_k: r.top_k,
                    beta: r.beta,
                    eps_low: r.epsilon,
                    eps_high: r.epsilon_high.unwrap_or(r.epsilon),
                    num_iterations: r.num_iterations,
                    steps_per_generation: r.steps_per_generation.unwrap_or(ga),
                    mask_truncated: r.mask_truncated_completions,
                    ref_model: r.ref_model.as_deref(),
                    num_sample_generations: r.num_sample_generations,
                    disable_dropout: r.disable_dropout,
                    loss_type: GrpoLossType::Grpo,
                    scale_rewards: ScaleRewards::None,
                    level: ImportanceSamplingLevel::Sequence,
                    normalize_advantages: r.normalize_advantages,
                    reward_clip_range: r.reward_clip_range,
                }
            }
        }
    }

    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.algo.name())
    }

    fn sampling(&self, tok: &Tokenizer) -> Sampling {
        Sampling {
            max_new_tokens: self.max_completion_length,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            // Completions stop on every stop token of the model
            // (generation_config.json's EOS ids and the tokenizer's EOS).
            stop_token_ids: tok.stop_ids.clone(),
            keep_stop_token: true,
            draw: Default::default(),
        }
    }
}

/// What a GRPO or RLOO run did.
#[derive(Debug, Clone)]
pub struct OnlineRun {
    pub run_dir: PathBuf,
    pub checkpoint: PathBuf,
    /// Iterations (generation batches) completed.
    pub iterations: u64,
    pub optimizer_steps: u64,
    pub prompts: PromptReport,
    /// Evaluation before the first iteration and after the last (with eval prompts).
    pub eval_before: Option<EvalFigures>,
    pub eval_after: Option<EvalFigures>,
    pub seconds_per_iteration: f64,
}

/// The models an iteration reads.
struct Models<'a> {
    policy: &'a CausalLm,
    /// The policy's detached twin: samples and gives the old log-probs.
    sampler: &'a CausalLm,
    reference: Option<&'a CausalLm>,
    tok: &'a Tokenizer,
    rewards: &'a RewardFuncs<'a>,
    device: &'a Device,
}

/// The generation batch, everything step 6 reads.
struct Generation {
    queries: Vec<Vec<u32>>,
    responses: Vec<Vec<u32>>,
    /// (B, T) 1 on the completion tokens that count in the loss.
    mask: Tensor,
    /// (B, T) per-token log-probs when sampled; None when the update's
    /// single step may take them from the policy's own forward, detached.
    old_logprobs: Option<Tensor>,
    /// (B, T) the reference's, when beta > 0 (GRPO's loss reads them).
    ref_logprobs: Option<Tensor>,
    /// (B,) one per completion.
    advantages: Vec<f64>,
    /// The scores and texts, and the batch's metrics (TRL's names).
    scored: Scored,
    figures: Vec<(String, f64)>,
}

/// Trains with the config's `[[reward_funcs]]` (see [`train_with_rewards`]).
pub fn train(
    cfg: &Config,
    algo: Algo,
    run_dir: &Path,
    resume: bool,
    stop: &StopSignal,
) -> Result<OnlineRun> {
    if cfg.reward_funcs.is_empty() {
        return Err(Error::InvalidConfig {
            field: "reward_funcs".into(),
            value: String::new(),
            reason: format!(
                "{} needs at least one [[reward_funcs]] table (type = model, regex, exact_match, length, command or http)",
                algo.name()
            ),
        });
    }
    let (device, _) = crate::device::resolve_device(&cfg.run.device)?;
    let policy_dir = resolve_model(&cfg.model.resolved_name()?, &HubSettings::from_env())?;
    let (rewards, _) = crate::rewards::from_config(&cfg.reward_funcs, &policy_dir, &device)?;
    train_with_rewards(cfg, algo, run_dir, resume, stop, &rewards)
}

/// Trains (or resumes) a policy with GRPO or RLOO against `rewards`.
pub fn train_with_rewards(
    cfg: &Config,
    algo: Algo,
    run_dir: &Path,
    resume: bool,
    stop: &StopSignal,
    rewards: &RewardFuncs,
) -> Result<OnlineRun> {
    if cfg.model.init != crate::config::ModelInit::Pretrained {
        return Err(Error::InvalidConfig {
            field: "model.init".into(),
            value: "random".into(),
            reason: format!(
                "applies to sft and reward: {} starts from a trained policy",
                algo.name()
            ),
        });
    }
    let s = Settings::of(cfg, algo);
    let t = &cfg.train;
    let seed = cfg.run.seed;
    let (device, device_name) = crate::device::resolve_device(&cfg.run.device)?;
    let dtype = cfg.run.dtype.dtype();
    let mut run = RunDir::open(
        run_dir,
        Manifest::new(algo.name(), cfg, &device_name),
        resume,
    )?;
    let hub = HubSettings::from_env();

    // The generation batch: per_device_train_batch_size x steps_per_generation
    // completions, num_generations per prompt (TRL's generation_batch_size).
    let micro = t.per_device_train_batch_size;
    let generation_batch = micro * s.steps_per_generation;
    if !generation_batch.is_multiple_of(s.group) {
        return Err(Error::InvalidConfig {
            field: s.key("num_generations"),
            value: s.group.to_string(),
            reason: format!("must divide the generation batch of {generation_batch} completions (train.per_device_train_batch_size x steps_per_generation)"),
        });
    }
    let prompts_per_generation = generation_batch / s.group;

    // The policy (trainable), its detached twin, and the reference when beta > 0.
    let policy_dir = resolve_model(&cfg.model.resolved_name()?, &hub)?;
    let tok = Tokenizer::from_dir(&policy_dir)?;
    let base_config: Value = io::read_json(&policy_dir.join("config.json"))?;
    let (arch, vb, mut params) = Trained::for_run(
        cfg,
        &policy_dir,
        "CAUSAL_LM",
        ModelInit::Pretrained,
        &device,
    )?;
    let mut policy = CausalLm::load(vb, &arch, true).map_err(|e| {
        Error::Msg(format!(
            "{} needs a causal LM policy; {} cannot be one: {e}",
            algo.name(),
            arch.model_type()
        ))
    })?;
    if s.disable_dropout {
        params = params.without_dropout();
    }
    params.attach(&mut policy)?;
    let sampler = params.frozen_causal(&arch, dtype, &device)?;
    let reference = match (s.beta > 0.0, s.ref_model) {
        (false, _) => None,
        // LoRA: the policy with its adapters disabled, over the same base tensors.
        (true, None) if params.lora().is_some() => params.base_causal(&arch).transpose()?,
        (true, r) => {
            let dir = match r {
                Some(r) => resolve_model(r, &hub)?,
                None => policy_dir.clone(),
            };
            let (ref_arch, ref_vb, _) = load_dir_frozen(&dir, dtype, &device)?;
            Some(CausalLm::load(ref_vb, &ref_arch, true)?)
        }
    };
    let policy_vars = params.varmap().clone();

    // Prompts, with their other columns for the reward functions.
    let template = TemplateSource::new(&policy_dir, cfg.model.chat_template.as_deref());
    let load = |spec: &str, split: &str| {
        load_prompt_rows(
            spec,
            split,
            &tok,
            &template,
            s.max_prompt_length,
            s.truncate_prompts,
            &hub,
        )
    };
    let (prompts, report) = load(s.data.train()?, s.data.train_split)?;
    tracing::info!("{}: {report}", s.data.dataset);
    let eval_prompts = match s.data.eval_dataset {
        Some(spec) => {
            let (e, r) = load(spec, s.data.test_split)?;
            tracing::info!("{spec}: {r}");
            e
        }
        None => Vec::new(),
    };
    let limit = policy.max_positions();
    if s.max_prompt_length + s.max_completion_length > limit {
        return Err(Error::InvalidConfig {
            field: s.key("max_completion_length"),
            value: s.max_completion_length.to_string(),
            reason: format!("max_prompt_length ({}) + max_completion_length exceeds the model's {limit} positions", s.max_prompt_length),
        });
    }

    // The schedule: optimizer steps per iteration, iterations in the run.
    let steps_per_iteration =
        (s.steps_per_generation / t.gradient_accumulation_steps * s.num_iterations) as u64;
    let total_iterations =
        match t.max_steps {
            Some(m) => m.div_ceil(steps_per_iteration),
            None => ((t.num_train_epochs * prompts.len() as f64) / prompts_per_generation as f64)
                .ceil() as u64,
        }
        .max(1);
    let vars: Vec<_> = crate::models::weights::named_vars(&policy_vars);
    let mut core = TrainCore::new(
        AdamW::new(vars, AdamWParams::from_config(t))?,
        t,
        total_iterations * steps_per_iteration,
    );
    let sampling = s.sampling(&tok);

    // State: fresh, or the newest checkpoint's.
    let fresh = TrainerState::fresh(
        seed,
        &["data", "sample", algo.name()],
        serde_json::to_value(OnlineState::default()).expect("plain numbers serialize"),
    );
    let mut state = run.restore(fresh, &mut core.optimizer, &device)?;
    let tokenizer_files = checkpoint::tokenizer_files(&policy_dir);
    let save = |run: &RunDir, core: &TrainCore, state: &TrainerState| -> Result<PathBuf> {
        let (weights, lora) = params.checkpoint_parts()?;
        checkpoint::save(
            &run.path,
            &Checkpoint {
                weights: &weights,
                model_config: Some(&base_config),
                tokenizer_files: &tokenizer_files,
                extra_weights: &[],
                optimizer: Some(&core.optimizer),
                state,
                manifest: &run.manifest,
                lora: lora.as_ref(),
            },
            t.save_total_limit,
        )
    };
    let m = Models {
        policy: &policy,
        sampler: &sampler,
        reference: reference.as_ref(),
        tok: &tok,
        rewards,
        device: &device,
    };
    let eval_now = |m: &Models| -> Result<Option<EvalFigures>> {
        match eval_prompts.is_empty() {
            true => Ok(None),
            false => evaluate(m, &s, &eval_prompts, &sampling, seed, micro).map(Some),
        }
    };
    let mut eval_before = None;
    if state.step == 0 {
        eval_before = eval_now(&m)?;
        if let Some(e) = &eval_before {
            log_eval(&mut run, 0, &e.figures, &e.completions)?;
        }
    }

    let progress = Progress::new(total_iterations, algo.name());
    let sample_every = (total_iterations / s.num_sample_generations.max(1) as u64).max(1);
    let started = Instant::now();
    let first = state.step;
    let mut last_checkpoint = None;
    let mut eval_after = None;
    while state.step < total_iterations {
        let iteration_started = Instant::now();
        // 1. Sample: each prompt of the batch num_generations times, one group after another.
        let picked: Vec<&PromptRow> = state
            .next_items(prompts.len(), prompts_per_generation)
            .into_iter()
            .map(|i| &prompts[i])
            .collect();
        let rows: Vec<&PromptRow> = picked
            .iter()
            .flat_map(|r| std::iter::repeat_n(*r, s.group))
            .collect();
        let queries: Vec<Vec<u32>> = rows.iter().map(|r| r.ids.clone()).collect();
        let generate_started = Instant::now();
        let responses = rollout::sample(
            m.sampler,
            m.tok,
            m.device,
            &queries,
            &sampling,
            generation_batch,
            state.rng("sample"),
        )?;
        let generate_s = generate_started.elapsed().as_secs_f64();
        // 2.-5. Log-probs, scores, rewards, advantages.
        let gen = prepare(&m, &s, t, queries, responses, &rows, state.step)?;

        let mut online_state = OnlineState::of(&state)?;
        online_state.num_tokens += gen
            .queries
            .iter()
            .zip(&gen.responses)
            .map(|(q, r)| (q.len() + r.len()) as u64)
            .sum::<u64>();
        online_state.store(&mut state);

        // 6. num_iterations passes over shuffled micro-batches; one optimizer
        //    step per gradient_accumulation_steps micro-batches.
        let update_started = Instant::now();
        let mut acc = LossStats::default();
        let mut last = (0.0, 0.0);
        for _ in 0..s.num_iterations {
            let order = state.rng(algo.name()).permutation(generation_batch);
            for step_rows in order.chunks(micro * t.gradient_accumulation_steps) {
                // DAPO divides by the real tokens of the whole optimizer step.
                let step_tokens = token_count(&gen.mask, step_rows)?;
                params.begin_step(state.optimizer_steps);
                for rows in step_rows.chunks(micro) {
                    let (loss, stats) = micro_batch_loss(&m, &s, t, &gen, rows, step_tokens)?;
                    core.backward(&loss)?;
                    acc.absorb(stats);
                }
                if let StepOutcome::Applied { grad_norm, lr } = core.step(state.optimizer_steps)? {
                    last = (grad_norm, lr);
                }
                state.optimizer_steps += 1;
            }
        }
        m.device.synchronize()?;
        let update_s = update_started.elapsed().as_secs_f64();
        state.step += 1;

        // 8. Log, samples, evaluation, checkpoint.
        if state.step.is_multiple_of(t.logging_steps) || state.step == total_iterations {
            let mut f = gen.figures.clone();
            f.extend(acc.figures());
            f.extend([
                ("num_tokens".into(), online_state.num_tokens as f64),
                ("learning_rate".into(), last.1),
                ("grad_norm".into(), last.0),
                ("time/generate".into(), generate_s),
                ("time/update".into(), update_s),
                (
                    "time/iteration".into(),
                    iteration_started.elapsed().as_secs_f64(),
                ),
            ]);
            run.metrics.log(state.step, &f)?;
        }
        if state.step.is_multiple_of(sample_every) || state.step == total_iterations {
            write_samples(&run.path, state.step, &gen.scored, &gen.advantages)?;
        }
        let reward = gen
            .figures
            .iter()
            .find(|(k, _)| k == "reward")
            .map_or(0.0, |x| x.1);
        progress.update(
            state.step,
            &[("reward", reward), ("loss", acc.loss / acc.n.max(1) as f64)],
        );
        let stopping = stop.requested();
        checkpoint_if_due(
            state.step,
            total_iterations,
            t.save_steps,
            stopping,
            &mut last_checkpoint,
            || save(&run, &core, &state),
        )?;
        let evaluated = evaluate_if_due(
            t.eval_steps,
            state.step,
            total_iterations,
            "iteration",
            || eval_now(&m),
        )?;
        if let Some(e) = evaluated {
            log_eval(&mut run, state.step, &e.figures, &e.completions)?;
            eval_after = Some(e);
        }
    }
    progress.finish();
    let ran = (state.step - first).max(1);
    let checkpoint = run.finish(last_checkpoint)?;
    Ok(OnlineRun {
        run_dir: run.path.clone(),
        checkpoint,
        iterations: state.step,
        optimizer_steps: state.optimizer_steps,
        prompts: report,
        eval_before,
        eval_after,
        seconds_per_iteration: started.elapsed().as_secs_f64() / ran as f64,
    })
}

/// What GRPO and RLOO keep in a checkpoint beside the weights, the
/// optimizer, the RNG streams and the data position (`trainer_state.json`'s
/// `extra`).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct OnlineState {
    /// Prompt and completion tokens processed so far (TRL's `num_tokens`).
    num_tokens: u64,
}

impl OnlineState {
    fn of(state: &TrainerState) -> Result<Self> {
        serde_json::from_value(state.extra.clone())
            .map_err(|e| Error::Msg(format!("trainer_state.json: the trainer's state: {e}")))
    }

    fn store(self, state: &mut TrainerState) {
        state.extra = serde_json::to_value(self).expect("plain numbers serialize");
    }
}

/// Per-token log-probs of `responses` under `lm`, `chunk` rows at a time, (B, T).
fn logprobs_of(
    lm: &CausalLm,
    m: &Models,
    queries: &[Vec<u32>],
    responses: &[Vec<u32>],
    t: usize,
    temperature: f64,
    chunk: usize,
) -> Result<Tensor> {
    let mut parts = Vec::new();
    for (qs, rs) in queries.chunks(chunk).zip(responses.chunks(chunk)) {
        let qs: Vec<&[u32]> = qs.iter().map(Vec::as_slice).collect();
        let rs: Vec<&[u32]> = rs.iter().map(Vec::as_slice).collect();
        let b = Batch::new(&qs, &rs, t, m.tok.pad_id, lm.dtype(), m.device)?;
        parts.push(policy_outputs(lm, &b, temperature)?.0);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// The (B, T) mask of real completion tokens, T the longest completion.
fn completion_mask(responses: &[Vec<u32>], t: usize, device: &Device) -> Result<Tensor> {
    let flat: Vec<f32> = responses
        .iter()
        .flat_map(|r| (0..t).map(move |i| (i < r.len()) as u8 as f32))
        .collect();
    Ok(Tensor::from_vec(flat, (responses.len(), t), device)?)
}

/// Steps 2-5 on a sampled generation batch: the log-probs the loss needs,
/// the scores, the rewards and the advantages; and the batch's metrics.
#[allow(clippy::too_many_arguments)]
fn prepare(
    m: &Models,
    s: &Settings,
    t: &crate::config::TrainConfig,
    queries: Vec<Vec<u32>>,
    responses: Vec<Vec<u32>>,
    rows: &[&PromptRow],
    iteration: u64,
) -> Result<Generation> {
    let stop = &m.tok.stop_ids;
    let width = responses.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let chunk = t.per_device_train_batch_size;
    // 2. Log-probs under the policy as it sampled: needed when the batch
    //    serves more than one optimizer step, or for RLOO's KL in the
    //    reward; otherwise the step's own forward, detached, is the same.
    let several_steps =
        s.num_iterations > 1 || s.steps_per_generation > t.gradient_accumulation_steps;
    let needs_old = several_steps || (s.algo == Algo::Rloo && s.beta > 0.0);
    let old_logprobs = match needs_old {
        true => Some(logprobs_of(
            m.sampler,
            m,
            &queries,
            &responses,
            width,
            s.temperature,
            chunk,
        )?),
        false => None,
    };
    let ref_logprobs = match m.reference {
        Some(r) => Some(logprobs_of(
            r,
            m,
            &queries,
            &responses,
            width,
            s.temperature,
            chunk,
        )?),
        None => None,
    };
    let full_mask = completion_mask(&responses, width, m.device)?;
    let truncated: Vec<bool> = responses
        .iter()
        .map(|r| !rollout::stopped(r, stop))
        .collect();
    // mask_truncated_completions: a completion cut without a stop token
    // leaves the loss (its advantage still counts in its group).
    let mask = match s.mask_truncated {
        true => {
            let keep: Vec<f32> = truncated.iter().map(|&c| (!c) as u8 as f32).collect();
            full_mask.broadcast_mul(&Tensor::from_vec(keep, (responses.len(), 1), m.device)?)?
        }
        false => full_mask.clone(),
    };

    // 3. Scores from every reward function, weighted into one reward.
    let texts = rollout::decode(m.tok, &queries, &responses, stop)?;
    let row_refs: Vec<Option<&PromptRow>> = rows.iter().map(|r| Some(*r)).collect();
    let each =
        rollout::score_each(m.rewards, &queries, &responses, &texts, &row_refs).map_err(|e| {
            Error::Msg(format!(
                "{e} (scoring iteration {}; no update was applied, the last checkpoint is intact)",
                iteration + 1
            ))
        })?;
    let total = m.rewards.combine(&each);
    let mut rewards: Vec<f64> = total.iter().map(|&x| x as f64).collect();

    // 4. Rewards: RLOO clamps, then subtracts beta x the summed k1 KL.
    // (RLOO's sequence KL; GRPO's KL is a loss term, measured in step 6.)
    let mut seq_kl = None;
    if let (Algo::Rloo, Some(old), Some(reference)) = (s.algo, &old_logprobs, &ref_logprobs) {
        // Over the tokens that count in the loss (a masked truncated
        // completion takes no penalty, as in TRL).
        let kl = (rl::kl_per_token(old, reference, KlEstimator::K1)? * &mask)?;
        seq_kl = Some(kl.sum(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
    }
    if s.algo == Algo::Rloo {
        if let Some([lo, hi]) = s.reward_clip_range {
            rewards.iter_mut().for_each(|r| *r = r.clamp(lo, hi));
        }
        if let Some(kl) = &seq_kl {
            rewards
                .iter_mut()
                .zip(kl)
                .for_each(|(r, k)| *r -= s.beta * k);
        }
    }

    // 5. Advantages from each prompt's group.
    let advantages = match s.algo {
        Algo::Grpo => rl::grpo_advantages(&rewards, s.group, s.scale_rewards)?,
        Algo::Rloo => rl::rloo_advantages(&rewards, s.group, s.normalize_advantages)?,
    };

    // Metrics, TRL's names: the reward before any KL or clipping.
    let total64: Vec<f64> = total.iter().map(|&x| x as f64).collect();
    // Groups whose rewards all agree (no learning signal): GRPO's raw
    // rewards; RLOO's after clipping and the KL penalty, as TRL counts them.
    let signal = match s.algo {
        Algo::Grpo => &total64,
        Algo::Rloo => &rewards,
    };
    let zero_std = signal.chunks(s.group).filter(|g| std(g) < 1e-6).count();
    // reward_std: the mean of the groups' stds (GRPO unless scaled by the
    // batch), else the batch's.
    let group_std =
        total64.chunks(s.group).map(std).sum::<f64>() / (total64.len() / s.group) as f64;
    let reward_std = match (s.algo, s.scale_rewards) {
        (Algo::Grpo, ScaleRewards::Group | ScaleRewards::None) => group_std,
        _ => std(&total64),
    };
    let lengths: Vec<f64> = responses.iter().map(|r| r.len() as f64).collect();
    let terminated: Vec<f64> = responses
        .iter()
        .zip(&truncated)
        .filter(|(_, &c)| !c)
        .map(|(r, _)| r.len() as f64)
        .collect();
    let mut figures: Vec<(String, f64)> = vec![
        ("reward".into(), mean(&total64)),
        ("reward_std".into(), reward_std),
        (
            "frac_reward_zero_std".into(),
            zero_std as f64 / (total64.len() / s.group) as f64,
        ),
        ("completions/mean_length".into(), mean(&lengths)),
        (
            "completions/min_length".into(),
            lengths.iter().cloned().fold(f64::INFINITY, f64::min),
        ),
        (
            "completions/max_length".into(),
            lengths.iter().cloned().fold(0.0, f64::max),
        ),
        (
            "completions/clipped_ratio".into(),
            truncated.iter().filter(|&&c| c).count() as f64 / lengths.len() as f64,
        ),
        (
            "completions/mean_terminated_length".into(),
            mean(&terminated),
        ),
    ];
    for (name, scores) in m.rewards.names().into_iter().zip(&each) {
        let x: Vec<f64> = scores.iter().map(|&v| v as f64).collect();
        figures.push((format!("rewards/{name}/mean"), mean(&x)));
        figures.push((format!("rewards/{name}/std"), std(&x)));
    }
    if let Some(kl) = &seq_kl {
        // RLOO's kl: the mean per-token k1 over real tokens.
        let tokens: f64 = lengths.iter().sum::<f64>().max(1.0);
        figures.push(("kl".into(), kl.iter().sum::<f64>() / tokens));
    }
    let gen = Generation {
        queries,
        responses,
        mask,
        old_logprobs,
        ref_logprobs,
        advantages,
        scored: Scored { total, each, texts },
        figures,
    };
    Ok(gen)
}

/// Real tokens of `rows` of the mask.
fn token_count(mask: &Tensor, rows: &[usize]) -> Result<f64> {
    let idx = Tensor::from_vec(
        rows.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        rows.len(),
        mask.device(),
    )?;
    Ok(mask
        .index_select(&idx, 0)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The loss of one micro-batch (rows `rows` of the generation batch), to
/// backpropagate as it is: already divided for gradient accumulation.
fn micro_batch_loss(
    m: &Models,
    s: &Settings,
    t: &crate::config::TrainConfig,
    gen: &Generation,
    rows: &[usize],
    step_tokens: f64,
) -> Result<(Tensor, LossStats)> {
    let idx = Tensor::from_vec(
        rows.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        rows.len(),
        m.device,
    )?;
    let qs: Vec<&[u32]> = rows.iter().map(|&i| gen.queries[i].as_slice()).collect();
    let rs: Vec<&[u32]> = rows.iter().map(|&i| gen.responses[i].as_slice()).collect();
    let width = gen.mask.dim(1)?;
    let batch = Batch::new(&qs, &rs, width, m.tok.pad_id, m.policy.dtype(), m.device)?;
    let (logprobs, entropy, _) = policy_outputs(m.policy, &batch, s.temperature)?;
    let mask = gen.mask.index_select(&idx, 0)?;
    let old = match &gen.old_logprobs {
        Some(o) => o.index_select(&idx, 0)?,
        None => logprobs.detach(),
    };
    let adv: Vec<f32> = rows.iter().map(|&i| gen.advantages[i] as f32).collect();
    let adv = Tensor::from_vec(adv, (rows.len(), 1), m.device)?;
    let ga = t.gradient_accumulation_steps as f64;
    let log_ratio = (&logprobs - &old)?;
    let mut stats = LossStats {
        n: 1,
        entropy: scalar(&rl::masked_mean(&entropy, &mask)?)?,
        ..Default::default()
    };
    let (loss, clip) = match s.algo {
        Algo::Grpo => {
            let lr = match s.level {
                ImportanceSamplingLevel::Token => log_ratio,
                ImportanceSamplingLevel::Sequence => rl::sequence_log_ratio(&log_ratio, &mask)?,
            };
            let clip = rl::clipped_surrogate(&lr, &adv, s.eps_low, s.eps_high)?;
            let mut per_token = clip.loss.broadcast_as(mask.shape())?.contiguous()?;
            if let (Some(reference), true) = (&gen.ref_logprobs, s.beta > 0.0) {
                // GRPO's KL term: beta x k3 per token (TRL's per_token_kl).
                let kl = rl::kl_per_token(
                    &logprobs,
                    &reference.index_select(&idx, 0)?,
                    KlEstimator::K3,
                )?;
                stats.kl = scalar(&rl::masked_mean(&kl.detach(), &mask)?)?;
                stats.has_kl = true;
                per_token = (per_token + (kl * s.beta)?)?;
            }
            let loss = rl::reduce_token_loss(
                &per_token,
                &mask,
                s.loss_type,
                s.max_completion_length,
                step_tokens,
            )?;
            // The optimizer step averages its micro-batches' gradients; DAPO's
            // normalizer already spans the whole step, so undo that mean.
            let loss = match s.loss_type {
                GrpoLossType::Dapo => (loss * ga)?,
                _ => loss,
            };
            (loss, clip)
        }
        Algo::Rloo => {
            // One ratio per sequence, from the summed log-probs.
            let seq = (log_ratio * &mask)?.sum_keepdim(1)?;
            let clip = rl::clipped_surrogate(&seq, &adv, s.eps_low, s.eps_high)?;
            (clip.loss.mean_all()?, clip)
        }
    };
    // Clip fractions: over real tokens for token ratios; over sequences for
    // one ratio per sequence (GSPO, RLOO), as TRL counts them.
    let frac = |x: &Tensor| -> Result<f64> {
        if x.dims().iter().product::<usize>() == rows.len() {
            return scalar(&x.mean_all()?);
        }
        let x = x.broadcast_as(mask.shape())?.contiguous()?;
        scalar(&rl::masked_mean(&x, &mask)?)
    };
    stats.low = frac(&clip.low)?;
    stats.high = frac(&clip.high)?;
    stats.region = frac(&(&clip.low + &clip.high)?)?;
    // The micro-batches' mean of this is the step's loss.
    stats.loss = scalar(&loss)?;
    Ok((loss, stats))
}

/// One completion per held-out prompt (seeded, the same draws every call),
/// scored by every reward function: TRL's names under `eval/`.
fn evaluate(
    m: &Models,
    s: &Settings,
    prompts: &[PromptRow],
    sampling: &Sampling,
    seed: u64,
    chunk: usize,
) -> Result<EvalFigures> {
    let mut rng = HostRng::stream(seed, "eval");
    let queries: Vec<Vec<u32>> = prompts.iter().map(|r| r.ids.clone()).collect();
    let responses = rollout::sample(
        m.sampler,
        m.tok,
        m.device,
        &queries,
        sampling,
        chunk.max(16),
        &mut rng,
    )?;
    let stop = &m.tok.stop_ids;
    let texts = rollout::decode(m.tok, &queries, &responses, stop)?;
    let rows: Vec<Option<&PromptRow>> = prompts.iter().map(Some).collect();
    let each = rollout::score_each(m.rewards, &queries, &responses, &texts, &rows)?;
    let total = m.rewards.combine(&each);
    let total64: Vec<f64> = total.iter().map(|&x| x as f64).collect();
    let lengths: Vec<f64> = responses.iter().map(|r| r.len() as f64).collect();
    let clipped = responses
        .iter()
        .filter(|r| !rollout::stopped(r, stop))
        .count();
    let mut figures: Vec<(String, f64)> = vec![
        ("eval/reward".into(), mean(&total64)),
        ("eval/reward_std".into(), std(&total64)),
        ("eval/completions/mean_length".into(), mean(&lengths)),
        (
            "eval/completions/clipped_ratio".into(),
            clipped as f64 / lengths.len().max(1) as f64,
        ),
    ];
    for (name, scores) in m.rewards.names().into_iter().zip(&each) {
        let x: Vec<f64> = scores.iter().map(|&v| v as f64).collect();
        figures.push((format!("eval/rewards/{name}/mean"), mean(&x)));
    }
    if let Some(reference) = m.reference {
        let width = lengths.iter().cloned().fold(1.0, f64::max) as usize;
        let lp = logprobs_of(
            m.sampler,
            m,
            &queries,
            &responses,
            width,
            s.temperature,
            chunk,
        )?;
        let rlp = logprobs_of(
            reference,
            m,
            &queries,
            &responses,
            width,
            s.temperature,
            chunk,
        )?;
        let mask = completion_mask(&responses, width, m.device)?;
        let kl = (rl::kl_per_token(&lp, &rlp, KlEstimator::K1)? * mask)?.sum(1)?;
        figures.push(("eval/kl".into(), scalar(&kl.mean_all()?)?));
    }
    Ok(EvalFigures {
        figures,
        completions: texts
            .into_iter()
            .zip(&total)
            .map(|((prompt, completion), r)| json!({"prompt": prompt, "completion": completion, "reward": r}))
            .collect(),
    })
}

/// Appends a few completions with rewards and advantages to RUN_DIR/samples.jsonl.
fn write_samples(
    run_dir: &Path,
    iteration: u64,
    scored: &Scored,
    advantages: &[f64],
) -> Result<()> {
    use crate::IoContext;
    use std::io::Write;
    let path = run_dir.join("samples.jsonl");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_path(&path)?;
    for (((prompt, completion), reward), adv) in scored
        .texts
        .iter()
        .zip(&scored.total)
        .zip(advantages)
        .take(8)
    {
        let line = json!({"step": iteration, "prompt": prompt, "completion": completion, "reward": reward, "advantage": adv});
        writeln!(file, "{line}").with_path(&path)?;
    }
    Ok(())
}
