//! The online engine: one loop for PPO, REINFORCE++, GRPO and RLOO, read
//! top to bottom as CleanRL's ppo.py. Each iteration takes one batch of
//! prompts through the same numbered steps; the algorithm (`algo.rs`)
//! supplies only what differs:
//!
//! 1. sample completions with the KV cache and no graph, each prompt
//!    `group` times, each completion carrying its prompt row;
//! 2. log-probs of the sampled tokens under the policy as it sampled and
//!    under the reference, and the critic's values (what the algorithm needs);
//! 3. score them with every reward function, weighted into one reward;
//! 4. rewards (PPO: -kl_coef x KL per token, the score on the last; RLOO:
//!    less beta x the sequence KL; GRPO: as scored);
//! 5. advantages (GAE | REINFORCE++ | group | leave-one-out);
//! 6. passes x shuffled optimizer steps of micro-batches of the algorithm's loss;
//! 7. adaptive KL control (PPO);
//! 8. log, samples, evaluation, checkpoint.
//!
//! Logging, evaluation and checkpoint intervals (`train.logging_steps`,
//! `eval_steps`, `save_steps`) count iterations.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use super::algo::{self, Algo, MicroBatch, Settings, Trainer};
use super::critic::{build_critic, Critic};
use super::eval::{evaluate, evaluate_if_due, log_eval, EvalReport};
use super::rollout::{self, Rollout};
use super::stats::{PhaseTimes, Stats};
use super::Models;
use crate::chat::TemplateSource;
use crate::checkpoint::{self, Manifest, TrainerState};
use crate::config::{Config, ModelInit};
use crate::data::prompts::{PromptReport, PromptRow};
use crate::hub::HubSettings;
use crate::metrics::Progress;
use crate::models::{resolve_model, CausalLm, Linears};
use crate::optim::adamw::{AdamW, AdamWParams};
use crate::optim::{StepOutcome, TrainCore};
use crate::rewards::RewardFuncs;
use crate::run::{checkpoint_if_due, RunDir};
use crate::signal::StopSignal;
use crate::tokenizer::Tokenizer;
use crate::trainers::trained::{ModelFiles, Trained};
use crate::{io, Error, HostRng, Result};

/// What an online run did.
#[derive(Debug, Clone)]
pub struct OnlineRun {
    pub algo: Algo,
    pub run_dir: PathBuf,
    pub checkpoint: PathBuf,
    /// Iterations (batches of rollouts) completed.
    pub iterations: u64,
    pub optimizer_steps: u64,
    pub prompts: PromptReport,
    /// Evaluation before the first iteration and after the last (with eval prompts).
    pub eval_before: Option<EvalReport>,
    pub eval_after: Option<EvalReport>,
    pub seconds_per_iteration: f64,
    /// Each iteration's phase times, for the iterations this process ran.
    pub times: Vec<PhaseTimes>,
}

impl OnlineRun {
    /// The phase times summed over this process's iterations.
    pub fn total_times(&self) -> PhaseTimes {
        let mut sum = PhaseTimes::default();
        for t in &self.times {
            sum += *t;
        }
        sum
    }
}

/// What the engine keeps in a checkpoint beside the weights, the optimizer,
/// the RNG streams and the data position (`trainer_state.json`'s `extra`).
/// Every field has a default, so the states of earlier versions (PPO's
/// `{kl_coef, episode}`, GRPO's and RLOO's `{num_tokens}`) resume.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct OnlineState {
    /// PPO's KL coefficient now (adaptive KL control moves it); unset: the config's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kl_coef: Option<f64>,
    /// Completions rolled out so far (TRL PPOTrainer's `episode`).
    #[serde(default)]
    episode: u64,
    /// Prompt and completion tokens processed so far (TRL GRPOTrainer's `num_tokens`).
    #[serde(default)]
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

/// Trains with `trainer`'s algorithm against the config's
/// `[[reward_funcs]]` (PPO: or its `ppo.reward_model` shorthand).
pub fn train(
    cfg: &Config,
    trainer: Trainer,
    run_dir: &Path,
    resume: bool,
    stop: &StopSignal,
) -> Result<OnlineRun> {
    let funcs = crate::rewards::of_trainer(cfg, trainer.name())?;
    let (device, _) = crate::device::resolve_device(&cfg.run.device)?;
    let policy_dir = resolve_model(&cfg.model.resolved_name()?, &HubSettings::from_env())?;
    let (rewards, first_model) = crate::rewards::from_config(&funcs, &policy_dir, &device)?;
    let algo = trainer.algo(cfg);
    train_with_rewards(
        cfg,
        algo,
        run_dir,
        resume,
        stop,
        &rewards,
        first_model.as_deref(),
    )
}

/// Trains (or resumes) a policy with `algo` against the weighted sum of
/// `rewards`; `reward_dir`, the first reward model's directory when there
/// is one, may initialize PPO's critic.
pub fn train_with_rewards(
    cfg: &Config,
    algo: Algo,
    run_dir: &Path,
    resume: bool,
    stop: &StopSignal,
    rewards: &RewardFuncs,
    reward_dir: Option<&Path>,
) -> Result<OnlineRun> {
    if cfg.model.init != ModelInit::Pretrained {
        return Err(Error::InvalidConfig {
            field: "model.init".into(),
            value: "random".into(),
            reason: format!(
                "applies to sft and reward: {} starts from a trained policy, which is also its reference",
                algo.command()
            ),
        });
    }
    let (t, seed) = (&cfg.train, cfg.run.seed);
    let (device, device_name) = crate::device::resolve_device(&cfg.run.device)?;
    let dtype = cfg.run.dtype.dtype();
    let manifest = Manifest::new(algo.command(), cfg, &device_name);
    let mut run = RunDir::open(run_dir, manifest, resume)?;
    let hub = HubSettings::from_env();

    // Setup: the policy (trainable), its detached twin that samples, the
    // frozen reference, the critic (PPO).
    let policy_dir = resolve_model(&cfg.model.resolved_name()?, &hub)?;
    let tok = Tokenizer::from_dir(&policy_dir)?;
    let s = Settings::of(cfg, algo, &tok);
    // A group never spans ranks: each rank's part of the batch holds whole groups.
    let local_batch = s.batch / s.ranks;
    if !local_batch.is_multiple_of(s.group()) {
        let (group, steps) = match algo.trainer() {
            Trainer::Ppo => (
                "ppo.n_samples_per_prompt".to_string(),
                "train.gradient_accumulation_steps x ppo.num_mini_batches".to_string(),
            ),
            _ => (s.key("num_generations"), s.key("steps_per_generation")),
        };
        return Err(Error::InvalidConfig {
            field: group,
            value: s.group().to_string(),
            reason: format!("must divide each rank's generation batch of {local_batch} completions (train.per_device_train_batch_size x {steps})"),
        });
    }
    let base_config: Value = io::read_json(&policy_dir.join("config.json"))?;
    let (arch, vb, mut params) = Trained::for_run(
        cfg,
        &policy_dir,
        "CAUSAL_LM",
        ModelInit::Pretrained,
        &device,
    )?;
    let mut policy = CausalLm::load(vb, &arch, true).map_err(|e| {
        let kind = arch.model_type();
        Error::Msg(format!(
            "{} needs a causal LM policy; {kind} cannot be one: {e}",
            algo.command()
        ))
    })?;
    if s.o.disable_dropout {
        params = params.without_dropout();
    }
    params.attach(&mut policy)?;
    policy.set_activation_checkpointing(cfg.train.activation_checkpointing);
    let sampler = params.frozen_causal(&arch, dtype, &device)?;
    let reference = match s.needs_reference() {
        true => Some(params.reference(
            &arch,
            s.o.ref_model,
            &policy_dir,
            s.ref_dtype,
            dtype,
            &device,
        )?),
        false => None,
    };
    let mut critic = match algo {
        Algo::Ppo => Some(build_critic(
            &cfg.ppo,
            reward_dir,
            &policy_dir,
            arch.hidden_size(),
            cfg.lora.as_ref().filter(|l| l.critic),
            dtype,
            &device,
        )?),
        _ => None,
    };
    if let Some(Critic::Model { model, .. }) = &mut critic {
        model.set_activation_checkpointing(cfg.train.activation_checkpointing);
    }

    // Setup: prompts, with their other columns for the reward functions.
    let template = TemplateSource::new(&policy_dir, cfg.model.chat_template.as_deref());
    let (prompts, report) =
        s.load_prompts(&tok, &template, s.o.data.train()?, s.o.data.train_split)?;
    let eval_prompts: Vec<PromptRow> = match s.o.data.eval_dataset {
        Some(spec) => {
            s.load_prompts(&tok, &template, spec, s.o.data.test_split)?
                .0
        }
        None => Vec::new(),
    };
    let limit = policy.max_positions();
    if s.o.max_prompt_length + s.sampling.max_new_tokens > limit {
        return Err(Error::InvalidConfig {
            field: s.key(s.length_key()),
            value: s.sampling.max_new_tokens.to_string(),
            reason: format!(
                "max_prompt_length ({}) + {} exceeds the model's {limit} positions",
                s.o.max_prompt_length,
                s.length_key()
            ),
        });
    }

    // Setup: the schedule over optimizer steps, the optimizer (the critic's
    // group follows the same schedule, scaled by critic_learning_rate).
    let (total, steps_per_iteration) = s.schedule(prompts.len());
    let policy_vars = params.varmap().clone();
    let mut vars = crate::models::weights::named_vars(&policy_vars);
    let critic_vars = critic.as_ref().map(Critic::vars).unwrap_or_default();
    let critic_names: Vec<String> = critic_vars.iter().map(|(n, _)| n.clone()).collect();
    vars.extend(critic_vars);
    let mut core = TrainCore::new(
        AdamW::new(vars, AdamWParams::from_config(t))?,
        t,
        total * steps_per_iteration,
    );
    if let (Some(critic_lr), true) = (cfg.ppo.critic_learning_rate, critic.is_some()) {
        if t.learning_rate == 0.0 {
            return Err(Error::InvalidConfig {
                field: "ppo.critic_learning_rate".into(),
                value: critic_lr.to_string(),
                reason: "it scales train.learning_rate's schedule, which is 0".into(),
            });
        }
        core.optimizer.scale_lr(
            |n| critic_names.iter().any(|c| c == n),
            critic_lr / t.learning_rate,
        );
    }

    // Setup: state, fresh or the newest checkpoint's (the critic's too).
    let fresh = TrainerState::fresh(
        seed,
        &["data", algo.command()],
        serde_json::to_value(OnlineState::default()).expect("plain numbers serialize"),
    );
    let mut state = fresh;
    if let Some(point) = &run.resume {
        let named = crate::models::weights::named_vars(&policy_vars);
        checkpoint::load_into_vars(
            &point.checkpoint,
            named.iter().map(|(n, v)| (n.as_str(), v)),
            &device,
        )?;
        if let Some(critic) = &critic {
            critic.restore(&point.checkpoint, &device)?;
        }
        checkpoint::load_optimizer(
            &point.checkpoint,
            &mut core.optimizer,
            &point.state,
            &device,
        )?;
        state = point.state.clone();
    }
    let files = ModelFiles {
        config: &base_config,
        tokenizer_files: &checkpoint::tokenizer_files(&policy_dir),
    };
    let save = |run: &RunDir, core: &TrainCore, state: &TrainerState| -> Result<PathBuf> {
        let extra: Vec<_> = critic.iter().map(Critic::checkpoint_file).collect();
        params.save_checkpoint(run, &files, &extra, core, state, t.save_total_limit)
    };
    let m = Models {
        sampler: &sampler,
        reference: reference.as_ref(),
        critic: critic.as_ref(),
        tok: &tok,
        rewards,
        device: &device,
    };
    let eval_now = |m: &Models| -> Result<Option<EvalReport>> {
        match eval_prompts.is_empty() {
            true => Ok(None),
            false => evaluate(m, &s, &eval_prompts, seed).map(Some),
        }
    };
    let mut eval_before = None;
    if state.step == 0 && t.eval_on_start.unwrap_or(true) {
        eval_before = eval_now(&m)?;
        if let Some(e) = &eval_before {
            log_eval(&mut run, 0, e)?;
        }
    }

    // The loop: one iteration per batch of prompts, steps 1-8.
    let progress = Progress::new(total, algo.command());
    let sample_every = (total / s.o.num_sample_generations.max(1) as u64).max(1);
    let stop_ids = &s.sampling.stop_token_ids;
    let mut times = Vec::new();
    let started = Instant::now();
    let first = state.step;
    let mut last_checkpoint = None;
    let mut eval_after = None;
    let mut online = OnlineState::of(&state)?;
    while state.step < total {
        let iteration = state.step + 1;
        let no_update = |e: Error| {
            Error::Msg(format!(
                "iteration {iteration} (prompts of {}): {e} (no update was applied; the last checkpoint is intact)",
                s.o.data.dataset
            ))
        };
        let iteration_started = Instant::now();
        // 1. Sample: a seeded shuffle of the prompts, reshuffled each pass
        //    (position checkpointed); each prompt `group` times in a row.
        //    Each completion draws from its own stream, keyed by the seed,
        //    the iteration and its row in the batch.
        let rows: Vec<&PromptRow> = state
            .next_items(prompts.len(), s.batch / s.group())
            .into_iter()
            .flat_map(|i| std::iter::repeat_n(&prompts[i], s.group()))
            .collect();
        let (chunk, fixed) = (s.sample_chunk, s.fixed_width);
        let stream = |row: usize| HostRng::keyed(seed, "sample", &[iteration, row as u64]);
        let world = crate::dist::world();
        let mine = world.rank * local_batch..(world.rank + 1) * local_batch;
        let ro = Rollout::sample(&m, rows, mine, &s.sampling, chunk, fixed, stream)
            .map_err(no_update)?;
        let generate_s = iteration_started.elapsed().as_secs_f64();
        // 2. Log-probs (old, reference) and values: once per rollout,
        //    reused by every pass.
        let phase = Instant::now();
        let needs = algo.needs(&s, t);
        let fwd = rollout::forward(&m, &ro, needs, s.o.temperature, s.forward_chunk)
            .map_err(no_update)?;
        device.synchronize()?; // GPU work is queued: wait for it before reading the clock
        let forward_s = phase.elapsed().as_secs_f64();
        // 3. Scores from every reward function (PPO: less missing_eos_penalty).
        let phase = Instant::now();
        let scored = rollout::score(&m, &ro, stop_ids, s.missing_eos_penalty).map_err(no_update)?;
        let score_s = phase.elapsed().as_secs_f64();
        // 4.-5. Rewards and advantages.
        let kl_coef = online.kl_coef.unwrap_or(s.o.beta);
        let tg = algo::targets(&s, &m, &ro, &fwd, &scored, kl_coef).map_err(no_update)?;

        // 6. Passes over shuffled optimizer steps of micro-batches.
        let phase = Instant::now();
        let mut stats = Stats::default();
        let (mut grad_norm, mut lr) = (0.0, 0.0);
        for _ in 0..s.passes() {
            let order = state.rng(algo.command()).permutation(s.batch);
            for step_rows in order.chunks(s.step_rows) {
                // DAPO divides by the real tokens of the whole optimizer step
                // (only GRPO's loss reads them).
                let step_tokens = match algo {
                    Algo::Grpo => algo::token_count(&tg.mask, step_rows, &device)?,
                    _ => 0.0,
                };
                params.begin_step(state.optimizer_steps);
                // Micro-batch k of the step: rows of every rank, this rank's part.
                for rows in step_rows.chunks(s.micro * s.ranks) {
                    let rows = world.shard(rows);
                    let mb = MicroBatch::new(&m, &policy, &ro, &fwd, &tg, &rows)?;
                    algo::backward(&s, &mut core, &m, &policy, &mb, step_tokens, &mut stats)?;
                }
                if let StepOutcome::Applied {
                    grad_norm: g,
                    lr: l,
                } = core.step(state.optimizer_steps)?
                {
                    (grad_norm, lr) = (g, l);
                }
                state.optimizer_steps += 1;
            }
        }
        // Each micro-batch's diagnostics: every rank's share of them, summed.
        stats.over_ranks();
        device.synchronize()?;
        let update_s = phase.elapsed().as_secs_f64();
        state.step += 1;
        online.episode += s.batch as u64;
        online.num_tokens += ro
            .queries
            .iter()
            .zip(&ro.responses)
            .map(|(q, r)| (q.len() + r.len()) as u64)
            .sum::<u64>();
        // 7. Adaptive KL control (PPO) moves the coefficient from this batch's KL.
        if algo.trainer() == Trainer::Ppo {
            online.kl_coef = Some(algo::adapt_kl(&s, kl_coef, tg.kl_per_sequence));
        }
        online.store(&mut state);

        // 8. Metrics (means over every micro-batch), samples, evaluation, checkpoint.
        let total_s = iteration_started.elapsed().as_secs_f64();
        times.push(PhaseTimes {
            generate_s,
            forward_s,
            score_s,
            update_s,
            total_s,
        });
        if state.step.is_multiple_of(t.logging_steps) || state.step == total {
            let tokens: f64 = ro.lengths().iter().sum();
            let mut f = tg.figures.clone();
            f.extend(algo::loss_figures(algo, &stats));
            f.extend([
                ("learning_rate".into(), lr),
                ("grad_norm".into(), grad_norm),
                ("episode".into(), online.episode as f64),
                ("num_tokens".into(), online.num_tokens as f64),
                ("time/generate".into(), generate_s),
                ("time/forward".into(), forward_s),
                ("time/score".into(), score_s),
                ("time/update".into(), update_s),
                ("time/iteration".into(), total_s),
                ("tokens_per_second".into(), tokens / total_s),
            ]);
            run.metrics.log(state.step, &f)?;
        }
        let due = state.step.is_multiple_of(sample_every) || state.step == total;
        if due && world.is_main() {
            // A few completions with their rewards (GRPO, RLOO: and advantages).
            // Up to 8 rows spread over the batch (every rank's part).
            let n = scored.total.len();
            let rows = (0..n).step_by((n / 8).max(1)).take(8).map(|i| {
                let (p, c) = &scored.texts[i];
                let r = scored.total[i];
                let mut row =
                    json!({"step": state.step, "prompt": p, "completion": c, "reward": r});
                if let Some(a) = &tg.per_completion {
                    row["advantage"] = json!(a[i]);
                }
                row
            });
            io::append_jsonl(&run.path.join("samples.jsonl"), rows)?;
        }
        let reward =
            super::stats::mean(&scored.total.iter().map(|&x| x as f64).collect::<Vec<_>>());
        progress.update(
            state.step,
            &[("reward", reward), ("kl", tg.kl_per_sequence)],
        );
        let stopping = stop.requested();
        checkpoint_if_due(
            state.step,
            total,
            t.save_steps,
            stopping,
            &mut last_checkpoint,
            || save(&run, &core, &state),
        )?;
        let evaluated = evaluate_if_due(t.eval_steps, state.step, total, "iteration", || {
            eval_now(&m)
        })?;
        if let Some(e) = evaluated {
            log_eval(&mut run, state.step, &e)?;
            eval_after = Some(e);
        }
    }
    progress.finish();
    let ran = (state.step - first).max(1);
    let checkpoint = run.finish(last_checkpoint)?;
    Ok(OnlineRun {
        algo,
        run_dir: run.path.clone(),
        checkpoint,
        iterations: state.step,
        optimizer_steps: state.optimizer_steps,
        prompts: report,
        eval_before,
        eval_after,
        seconds_per_iteration: started.elapsed().as_secs_f64() / ran as f64,
        times,
    })
}
