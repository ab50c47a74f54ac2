//! What differs between the online algorithms, side by side: the settings
//! each reads from its config section, the forwards step 2 needs, the
//! rewards of step 4, the advantages of step 5, the loss of step 6, step
//! 7's adaptive KL, and their metric names. The loop that calls these is
//! `engine.rs`; the formulas are in [`crate::rl`].
//!
//! - PPO (`[ppo]`, advantage_estimator = gae): per-token rewards (-kl_coef x
//!   KL, the score on the last token), GAE with a critic, clipped policy
//!   and value losses. TRL's PPOTrainer and "The N+ Implementation Details
//!   of RLHF with PPO" (Huang et al., 2024).
//! - REINFORCE++ (`[ppo]`, reinforce | reinforce_baseline): PPO's rewards,
//!   their discounted returns whitened over the batch, no critic
//!   (OpenRLHF's names; Hu, 2025).
//! - GRPO (`[grpo]`): each completion's reward against its prompt's group,
//!   a per-token clipped surrogate plus beta x k3 KL (TRL's GRPOTrainer).
//! - RLOO (`[rloo]`): the reward less beta x the sequence KL, minus the
//!   mean of the group's other completions, one ratio per sequence (TRL's
//!   RLOOTrainer).

use candle_core::{DType, Device, Tensor};

use super::critic::Critic;
use super::rollout::{policy_outputs, Batch, Forward, Needs, Rollout, Scored};
use super::stats::{mean, std, var, Stats};
use super::Models;
use crate::chat::TemplateSource;
use crate::config::{
    AdvantageEstimator, Config, GrpoLossType, ImportanceSamplingLevel, KlEstimator, OnlineKeys,
    ScaleRewards, TrainConfig,
};
use crate::data::prompts::{load_prompt_rows, PromptReport, PromptRow};
use crate::generate::Sampling;
use crate::hub::HubSettings;
use crate::models::CausalLm;
use crate::optim::{LossPart, TrainCore};
use crate::rl;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// One online algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    /// PPO with a critic and GAE.
    Ppo,
    /// REINFORCE++ (with `baseline`: REINFORCE++-baseline), no critic.
    Reinforce {
        baseline: bool,
    },
    Grpo,
    Rloo,
}

/// The algorithms a command line names (`--algo`): `ppo`, `grpo`, `rloo`
/// (REINFORCE++ is `ppo` with `ppo.advantage_estimator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Trainer {
    Ppo,
    Grpo,
    Rloo,
}

impl Trainer {
    /// The subcommand and config section.
    pub fn name(self) -> &'static str {
        match self {
            Trainer::Ppo => "ppo",
            Trainer::Grpo => "grpo",
            Trainer::Rloo => "rloo",
        }
    }

    /// The algorithm `cfg` asks of this trainer.
    pub fn algo(self, cfg: &Config) -> Algo {
        match self {
            Trainer::Ppo => match cfg.ppo.advantage_estimator {
                AdvantageEstimator::Gae => Algo::Ppo,
                AdvantageEstimator::Reinforce => Algo::Reinforce { baseline: false },
                AdvantageEstimator::ReinforceBaseline => Algo::Reinforce { baseline: true },
            },
            Trainer::Grpo => Algo::Grpo,
            Trainer::Rloo => Algo::Rloo,
        }
    }
}

impl Algo {
    /// The algorithm of subcommand `command` ("ppo", "grpo" or "rloo") under `cfg`.
    pub fn of(cfg: &Config, command: &str) -> Result<Algo> {
        let t = <Trainer as clap::ValueEnum>::from_str(command, false)
            .map_err(|_| Error::Msg(format!("`{command}` is not an online trainer")))?;
        Ok(t.algo(cfg))
    }

    /// The subcommand and config section it comes from.
    pub fn trainer(self) -> Trainer {
        match self {
            Algo::Ppo | Algo::Reinforce { .. } => Trainer::Ppo,
            Algo::Grpo => Trainer::Grpo,
            Algo::Rloo => Trainer::Rloo,
        }
    }

    /// Its name: ppo, reinforce, reinforce_baseline, grpo or rloo.
    pub fn name(self) -> &'static str {
        match self {
            Algo::Ppo => "ppo",
            Algo::Reinforce { baseline: false } => "reinforce",
            Algo::Reinforce { baseline: true } => "reinforce_baseline",
            Algo::Grpo => "grpo",
            Algo::Rloo => "rloo",
        }
    }

    /// The subcommand, config section, and the name of the random stream
    /// that shuffles its mini-batches.
    pub fn command(self) -> &'static str {
        self.trainer().name()
    }

    /// PPO and REINFORCE++ read `[ppo]`: per-token rewards, TRL PPOTrainer's
    /// metric names, adaptive KL.
    fn ppo_family(self) -> bool {
        self.trainer() == Trainer::Ppo
    }

    /// Step 2: which forwards the rollout needs. PPO and REINFORCE++: the
    /// old and reference log-probs of their per-token reward (PPO: and the
    /// values). GRPO and RLOO: the log-probs as sampled only when the batch
    /// serves more than one optimizer step, or for RLOO's KL in the reward
    /// (otherwise the step's own forward, detached, is the same); the
    /// reference's when beta > 0.
    pub(crate) fn needs(self, s: &Settings, t: &TrainConfig) -> Needs {
        let (ppo, beta) = (self.ppo_family(), s.o.beta > 0.0);
        let several_steps =
            s.passes() > 1 || s.steps_per_generation() > t.gradient_accumulation_steps;
        Needs {
            old: ppo || several_steps || (self == Algo::Rloo && beta),
            reference: ppo || beta,
            values: self == Algo::Ppo,
        }
    }
}

/// The settings of one run, from `[ppo]`, `[grpo]` or `[rloo]` and `[train]`.
pub(crate) struct Settings<'a> {
    pub algo: Algo,
    pub cfg: &'a Config,
    /// The keys GRPO and RLOO share; PPO's under those names (see [`Settings::of`]).
    pub o: OnlineKeys<'a>,
    /// Sampling of the rollouts and of evaluation; completions keep their stop token.
    pub sampling: Sampling,
    /// Completions per held-out prompt in evaluation.
    pub eval_group: usize,
    pub ref_dtype: Option<DType>,
    pub missing_eos_penalty: Option<f64>,
    /// Completions padded to the sampling budget (PPO) or to the longest (GRPO, RLOO).
    pub fixed_width: bool,
    /// Rows per generation chunk, in training and evaluation, and per forward chunk.
    pub sample_chunk: usize,
    pub eval_sample_chunk: usize,
    pub forward_chunk: usize,
    /// Completions per iteration and per optimizer step (over every
    /// rank), per micro-batch (of one rank).
    pub batch: usize,
    pub step_rows: usize,
    pub micro: usize,
    /// Data-parallel ranks.
    pub ranks: usize,
}

impl<'a> Settings<'a> {
    pub fn of(cfg: &'a Config, algo: Algo, tok: &Tokenizer) -> Self {
        let (t, p) = (&cfg.train, &cfg.ppo);
        let (ga, micro) = (t.gradient_accumulation_steps, t.per_device_train_batch_size);
        let ppo = algo.ppo_family();
        let o = match algo.trainer() {
            // PPO's keys under GRPO's names: its group is n_samples_per_prompt,
            // its budget response_length, its passes num_ppo_epochs, its
            // clipping cliprange, its KL weight (initial) kl_coef; TRL's
            // PPOTrainer turns dropout off in every model, lora_dropout too.
            Trainer::Ppo => OnlineKeys {
                section: "ppo",
                data: p.data(),
                num_generations: p.n_samples_per_prompt,
                num_generations_eval: None,
                max_prompt_length: p.max_prompt_length,
                truncate_prompts: p.truncate_prompts,
                max_completion_length: p.response_length,
                temperature: p.temperature,
                top_p: p.top_p,
                top_k: p.top_k,
                beta: p.kl_coef,
                epsilon: p.cliprange,
                epsilon_high: None,
                num_iterations: p.num_ppo_epochs,
                steps_per_generation: Some(ga * p.num_mini_batches),
                mask_truncated_completions: false,
                ref_model: p.ref_model.as_deref(),
                ref_dtype: p.ref_dtype,
                num_sample_generations: p.num_sample_generations,
                disable_dropout: true,
            },
            Trainer::Grpo => cfg.grpo.online(),
            Trainer::Rloo => cfg.rloo.online(),
        };
        // GRPO and RLOO stop on every stop token of the model
        // (generation_config.json's EOS ids and the tokenizer's); PPO's
        // stop_token_id wins over stop_token ("eos": the same), unset: none.
        let stop_token_ids = match (ppo, p.stop_token_id, p.stop_token) {
            (true, Some(id), _) => vec![id],
            (true, None, None) => Vec::new(),
            _ => tok.stop_ids.clone(),
        };
        let spg = o.steps_per_generation.unwrap_or(ga);
        // PPO chunks its rollouts by local_rollout_forward_batch_size; GRPO
        // and RLOO sample a generation batch at once and forward micro-batches.
        let chunk = p.local_rollout_forward_batch_size;
        let ranks = crate::dist::world().size;
        Settings {
            algo,
            cfg,
            o,
            sampling: Sampling {
                max_new_tokens: o.max_completion_length,
                temperature: o.temperature,
                top_k: o.top_k,
                top_p: o.top_p,
                stop_token_ids,
                keep_stop_token: true,
                draw: Default::default(),
            },
            eval_group: o.num_generations_eval.unwrap_or(o.num_generations),
            ref_dtype: o.ref_dtype.map(|d| d.dtype()),
            missing_eos_penalty: p.missing_eos_penalty.filter(|_| ppo),
            fixed_width: ppo,
            sample_chunk: if ppo { chunk } else { micro * spg },
            eval_sample_chunk: if ppo { chunk } else { micro.max(16) },
            forward_chunk: if ppo { chunk } else { micro },
            // Global counts, as TRL's: each of the job's ranks samples and
            // trains on micro x ... of them.
            batch: micro * spg * ranks,
            step_rows: micro * ga * ranks,
            micro,
            ranks,
        }
    }

    /// Completions per prompt in a rollout (PPO's n_samples_per_prompt).
    pub fn group(&self) -> usize {
        self.o.num_generations
    }

    /// Passes over each rollout (PPO's num_ppo_epochs, num_iterations).
    pub fn passes(&self) -> usize {
        self.o.num_iterations
    }

    /// Micro-batches per rollout (of each rank).
    pub fn steps_per_generation(&self) -> usize {
        self.batch / (self.micro * self.ranks)
    }

    /// The prompt rows of `spec` (a file or a dataset read at `split`), cut
    /// or dropped at max_prompt_length.
    pub fn load_prompts(
        &self,
        tok: &Tokenizer,
        template: &TemplateSource,
        spec: &str,
        split: &str,
    ) -> Result<(Vec<PromptRow>, PromptReport)> {
        let (o, hub) = (&self.o, HubSettings::from_env());
        let rows = load_prompt_rows(
            spec,
            split,
            tok,
            template,
            o.max_prompt_length,
            o.truncate_prompts,
            &hub,
        )?;
        tracing::info!("{spec}: {}", rows.1);
        Ok(rows)
    }

    /// The reference model the algorithm's section names.
    pub fn ref_model_of(cfg: &Config, algo: Algo) -> Option<&str> {
        match algo.trainer() {
            Trainer::Ppo => cfg.ppo.ref_model.as_deref(),
            Trainer::Grpo => cfg.grpo.ref_model.as_deref(),
            Trainer::Rloo => cfg.rloo.ref_model.as_deref(),
        }
    }

    /// `section.key`, for error messages.
    pub fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.algo.command())
    }

    /// The key of the completion budget.
    pub fn length_key(&self) -> &'static str {
        match self.algo.ppo_family() {
            true => "response_length",
            false => "max_completion_length",
        }
    }

    /// Whether the run loads a reference model: PPO always (its reward's
    /// KL), GRPO and RLOO when beta > 0.
    pub fn needs_reference(&self) -> bool {
        self.algo.ppo_family() || self.o.beta > 0.0
    }

    /// Iterations in the run, and optimizer steps per iteration.
    pub fn schedule(&self, prompts: usize) -> (u64, u64) {
        let t = &self.cfg.train;
        if self.algo.ppo_family() {
            // Episodes count completions: one pass samples each prompt
            // n_samples_per_prompt times.
            let p = &self.cfg.ppo;
            let episodes = p
                .total_episodes
                .unwrap_or(prompts as u64 * self.group() as u64)
                .max(1);
            let updates = episodes.div_ceil(self.batch as u64);
            return (updates, (p.num_ppo_epochs * p.num_mini_batches) as u64);
        }
        let per_iteration =
            (self.steps_per_generation() / t.gradient_accumulation_steps * self.passes()) as u64;
        let prompts_per_iteration = (self.batch / self.group()) as f64;
        let iterations = match t.max_steps {
            Some(m) => m.div_ceil(per_iteration),
            None => (t.num_train_epochs * prompts as f64 / prompts_per_iteration).ceil() as u64,
        };
        (iterations.max(1), per_iteration)
    }
}

/// Steps 4-5's outputs: what every pass of step 6 reads, per row of the rollout.
pub(crate) struct Targets {
    /// (B, width) 1 on the tokens that count in the loss.
    pub mask: Tensor,
    /// (B, width) per token (PPO, REINFORCE++) or (B, 1) per completion.
    pub advantages: Tensor,
    /// (B, width): PPO's returns and the critic's values at the rollout.
    pub returns: Option<Tensor>,
    pub values: Option<Tensor>,
    /// GRPO's and RLOO's advantage of each completion, for samples.jsonl
    /// (PPO's and REINFORCE++'s are per token: none).
    pub per_completion: Option<Vec<f64>>,
    /// The mean KL per sequence (adaptive KL's input).
    pub kl_per_sequence: f64,
    /// The rollout's metrics.
    pub figures: Vec<(String, f64)>,
}

fn mean_f(x: &Tensor) -> Result<f64> {
    Ok(x.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Steps 4-5: rewards and advantages, with the rollout's metrics.
pub(crate) fn targets(
    s: &Settings,
    m: &Models,
    ro: &Rollout,
    fwd: &Forward,
    scored: &Scored,
    kl_coef: f64,
) -> Result<Targets> {
    match s.algo.ppo_family() {
        true => ppo_targets(s, m, ro, fwd, scored, kl_coef),
        false => group_targets(s, m, ro, fwd, scored),
    }
}

/// PPO and REINFORCE++: per-token rewards and advantages.
fn ppo_targets(
    s: &Settings,
    m: &Models,
    ro: &Rollout,
    fwd: &Forward,
    scored: &Scored,
    kl_coef: f64,
) -> Result<Targets> {
    let p = &s.cfg.ppo;
    let device = m.device;
    let (Some(logprobs), Some(ref_logprobs)) = (&fwd.old, &fwd.reference) else {
        return Err(Error::Msg(
            "PPO rollouts need the policy's and the reference's log-probs".into(),
        ));
    };
    let mask = ro.mask(device)?;
    let scores = &scored.total;
    // REINFORCE++-baseline: each score minus the mean of its prompt's group
    // (the batch holds n_samples_per_prompt responses per prompt, in a row).
    let scores_t = match s.algo {
        Algo::Reinforce { baseline: true } => {
            let centred = rl::group_baseline(&to64(scores), s.group())?;
            let c32: Vec<f32> = centred.iter().map(|&x| x as f32).collect();
            Tensor::new(c32.as_slice(), device)?
        }
        _ => Tensor::new(scores.as_slice(), device)?,
    };
    // 4. Per-token rewards: -kl_coef * KL on every token, the score on the last real one.
    let kl = (rl::kl_per_token(logprobs, ref_logprobs, p.kl_estimator)? * &mask)?;
    let (mut rewards, non_score) = rl::per_token_rewards(&kl, &mask, &scores_t, kl_coef)?;
    //    Optional reward whitening (shift_mean = false, as TRL).
    if p.whiten_rewards {
        rewards = (rl::masked_whiten(&rewards, &mask, false)? * &mask)?;
    }
    // 5. Advantages. PPO: GAE over response tokens with the critic's
    //    values, returns = advantages + values, then the advantages are
    //    whitened over real tokens. REINFORCE++: the discounted returns of
    //    the per-token rewards whitened over the batch; no critic.
    let (advantages, returns, values) = match (s.algo, &fwd.values) {
        (Algo::Ppo, Some(values)) => {
            let values = (values * &mask)?;
            let (advantages, returns) = rl::gae(&rewards, &values, &mask, p.gamma, p.lam)?;
            let advantages = (rl::masked_whiten(&advantages, &mask, true)? * &mask)?;
            (advantages, Some(returns), Some(values))
        }
        (Algo::Ppo, None) => return Err(Error::Msg("PPO rollouts need a critic".into())),
        _ => (
            rl::reinforce_pp_advantages(&rewards, &mask, p.gamma)?,
            None,
            None,
        ),
    };

    // TRL PPOTrainer's metric names.
    let per_seq = |t: &Tensor| -> Result<f64> { mean_f(&t.sum(1)?) };
    let kl_seq = per_seq(&kl)?;
    let non_score_seq = per_seq(&non_score)?;
    let mean_score = mean(&to64(scores));
    let lengths = ro.lengths();
    let eos = ro
        .stopped(&s.sampling.stop_token_ids)
        .iter()
        .filter(|&&x| x)
        .count();
    let ev = match (&returns, &values) {
        (Some(r), Some(v)) => rl::explained_variance(r, v, &mask)?,
        _ => 0.0,
    };
    let mut figures = vec![
        ("objective/kl".into(), kl_seq),
        (
            "objective/entropy".into(),
            per_seq(&(logprobs.neg()? * &mask)?)?,
        ),
        ("objective/non_score_reward".into(), non_score_seq),
        ("objective/rlhf_reward".into(), mean_score + non_score_seq),
        ("objective/scores".into(), mean_score),
        ("objective/kl_coef".into(), kl_coef),
        ("val/num_eos_tokens".into(), eos as f64),
        ("val/explained_variance".into(), ev),
        ("mean_response_length".into(), mean(&lengths)),
    ];
    for (name, scores) in m.rewards.names().into_iter().zip(&scored.each) {
        figures.push((format!("rewards/{name}/mean"), mean(&to64(scores))));
    }
    Ok(Targets {
        mask,
        advantages,
        returns,
        values,
        per_completion: None,
        kl_per_sequence: kl_seq,
        figures,
    })
}

/// GRPO and RLOO: one advantage per completion, from its group.
fn group_targets(
    s: &Settings,
    m: &Models,
    ro: &Rollout,
    fwd: &Forward,
    scored: &Scored,
) -> Result<Targets> {
    let device = m.device;
    let full_mask = ro.mask(device)?;
    let truncated: Vec<bool> = ro
        .stopped(&s.sampling.stop_token_ids)
        .iter()
        .map(|&x| !x)
        .collect();
    // mask_truncated_completions: a completion cut without a stop token
    // leaves the loss (its advantage still counts in its group).
    let mask = match s.o.mask_truncated_completions {
        true => {
            let keep: Vec<f32> = truncated.iter().map(|&c| (!c) as u8 as f32).collect();
            full_mask.broadcast_mul(&Tensor::from_vec(keep, (ro.len(), 1), device)?)?
        }
        false => full_mask,
    };
    let total64 = to64(&scored.total);
    let mut rewards = total64.clone();

    // 4. Rewards: RLOO clamps, then subtracts beta x the summed k1 KL
    //    (GRPO's KL is a loss term, measured in step 6).
    let mut seq_kl = None;
    if let (Algo::Rloo, Some(old), Some(reference)) = (s.algo, &fwd.old, &fwd.reference) {
        // Over the tokens that count in the loss (a masked truncated
        // completion takes no penalty, as in TRL).
        let kl = (rl::kl_per_token(old, reference, KlEstimator::K1)? * &mask)?;
        seq_kl = Some(kl.sum(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
    }
    if s.algo == Algo::Rloo {
        if let Some([lo, hi]) = s.cfg.rloo.reward_clip_range {
            rewards.iter_mut().for_each(|r| *r = r.clamp(lo, hi));
        }
        if let Some(kl) = &seq_kl {
            rewards
                .iter_mut()
                .zip(kl)
                .for_each(|(r, k)| *r -= s.o.beta * k);
        }
    }

    // 5. Advantages from each prompt's group.
    let (g, group) = (&s.cfg.grpo, s.group());
    let advantages = match s.algo {
        Algo::Grpo => rl::grpo_advantages(&rewards, group, g.scale_rewards)?,
        _ => rl::rloo_advantages(&rewards, group, s.cfg.rloo.normalize_advantages)?,
    };

    // TRL's metric names: the reward before any KL or clipping. Groups
    // whose rewards all agree (no learning signal): GRPO's raw rewards;
    // RLOO's after clipping and the KL penalty, as TRL counts them.
    let signal = match s.algo {
        Algo::Grpo => &total64,
        _ => &rewards,
    };
    let groups = (total64.len() / group) as f64;
    let zero_std = signal.chunks(group).filter(|g| std(g) < 1e-6).count();
    // reward_std: the mean of the groups' stds (GRPO unless scaled by the
    // batch), else the batch's.
    let group_std = total64.chunks(group).map(std).sum::<f64>() / groups;
    let reward_std = match (s.algo, g.scale_rewards) {
        (Algo::Grpo, ScaleRewards::Group | ScaleRewards::None) => group_std,
        _ => std(&total64),
    };
    let lengths = ro.lengths();
    let terminated: Vec<f64> = lengths
        .iter()
        .zip(&truncated)
        .filter(|(_, &c)| !c)
        .map(|(l, _)| *l)
        .collect();
    let mut figures: Vec<(String, f64)> = vec![
        ("reward".into(), mean(&total64)),
        ("reward_std".into(), reward_std),
        ("frac_reward_zero_std".into(), zero_std as f64 / groups),
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
    for (name, scores) in m.rewards.names().into_iter().zip(&scored.each) {
        let x = to64(scores);
        figures.push((format!("rewards/{name}/mean"), mean(&x)));
        figures.push((format!("rewards/{name}/std"), std(&x)));
    }
    let mut kl_per_sequence = 0.0;
    if let Some(kl) = &seq_kl {
        // RLOO's kl: the mean per-token k1 over real tokens.
        let tokens: f64 = lengths.iter().sum::<f64>().max(1.0);
        figures.push(("kl".into(), kl.iter().sum::<f64>() / tokens));
        kl_per_sequence = mean(kl);
    }
    let adv32: Vec<f32> = advantages.iter().map(|&a| a as f32).collect();
    Ok(Targets {
        mask,
        advantages: Tensor::from_vec(adv32, (ro.len(), 1), device)?,
        returns: None,
        values: None,
        per_completion: Some(advantages),
        kl_per_sequence,
        figures,
    })
}

/// One micro-batch (rows of the rollout) gathered for the loss.
pub(crate) struct MicroBatch<'r> {
    pub rows: &'r [usize],
    pub batch: Batch,
    pub mask: Tensor,
    pub old: Option<Tensor>,
    pub reference: Option<Tensor>,
    pub advantages: Tensor,
    pub returns: Option<Tensor>,
    pub values: Option<Tensor>,
}

impl<'r> MicroBatch<'r> {
    pub fn new(
        m: &Models,
        policy: &CausalLm,
        ro: &Rollout,
        fwd: &Forward,
        tg: &Targets,
        rows: &'r [usize],
    ) -> Result<Self> {
        let idx = Tensor::from_vec(
            rows.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            rows.len(),
            m.device,
        )?;
        let pick = |t: &Tensor| t.index_select(&idx, 0);
        let pick_opt = |t: &Option<Tensor>| t.as_ref().map(pick).transpose();
        Ok(Self {
            rows,
            batch: ro.batch(rows, m.tok.pad_id, policy.dtype(), m.device)?,
            mask: pick(&tg.mask)?,
            old: pick_opt(&fwd.old)?,
            reference: pick_opt(&fwd.reference)?,
            advantages: pick(&tg.advantages)?,
            returns: pick_opt(&tg.returns)?,
            values: pick_opt(&tg.values)?,
        })
    }
}

/// Step 6 on one micro-batch: backpropagates its loss into `core`'s
/// pending step (already divided for gradient accumulation) and adds its
/// diagnostics to `stats`. `step_tokens`: the real tokens of the whole
/// optimizer step (DAPO's normalizer).
pub(crate) fn backward(
    s: &Settings,
    core: &mut TrainCore,
    m: &Models,
    policy: &CausalLm,
    mb: &MicroBatch,
    step_tokens: f64,
    stats: &mut Stats,
) -> Result<()> {
    let sh = Shares::of(mb)?;
    if !s.algo.ppo_family() {
        let loss = group_loss(s, policy, mb, step_tokens, &sh, stats)?;
        core.backward(&loss)?;
        return Ok(());
    }
    let Some(critic) = m.critic else {
        // REINFORCE++: the policy's loss alone.
        let (loss, _) = ppo_policy_loss(s, policy, mb, sh.tokens, stats)?;
        core.backward(&loss)?;
        return Ok(());
    };
    // With `critic_on_own_thread`, a critic model (not a head on the
    // policy's hidden states) runs its forward and backward on a thread
    // beside the policy's.
    let side_by_side = s.cfg.ppo.critic_on_own_thread
        && matches!(critic, Critic::Model { .. })
        && m.device.is_cpu();
    if side_by_side {
        let parts: Vec<LossPart<Stats>> = vec![
            Box::new(move || {
                let mut st = Stats::default();
                ppo_policy_loss(s, policy, mb, sh.tokens, &mut st).map(|(loss, _)| (loss, st))
            }),
            Box::new(move || {
                let mut st = Stats::default();
                ppo_value_loss(s, critic, mb, None, sh.tokens, &mut st).map(|loss| (loss, st))
            }),
        ];
        for part in core.backward_concurrently(parts)?.1 {
            stats.absorb(part);
        }
        return Ok(());
    }
    let (policy_loss, h) = ppo_policy_loss(s, policy, mb, sh.tokens, stats)?;
    let critic_loss = ppo_value_loss(s, critic, mb, Some(&h), sh.tokens, stats)?;
    core.backward(&(policy_loss + critic_loss)?)?;
    Ok(())
}

/// This rank's shares of micro-batch k's real tokens and rows among every
/// rank's micro-batch k (1 and 1 with one rank). A loss that is a mean
/// over this rank's tokens (rows), times the share, is its part of the
/// mean over every rank's; so are the diagnostics, summed over the ranks
/// after the passes ([`Stats::over_ranks`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shares {
    pub tokens: f64,
    pub rows: f64,
}

impl Shares {
    fn of(mb: &MicroBatch) -> Result<Self> {
        let world = crate::dist::world();
        if world.is_single() {
            return Ok(Shares {
                tokens: 1.0,
                rows: 1.0,
            });
        }
        let mine = [scalar(&mb.mask.sum_all()?)?, mb.rows.len() as f64];
        let mut all = mine;
        world.sum(&mut all);
        let part = |m: f64, a: f64| if a > 0.0 { m / a } else { 0.0 };
        Ok(Shares {
            tokens: part(mine[0], all[0]),
            rows: part(mine[1], all[1]),
        })
    }
}

/// PPO's policy loss, pg_loss - entropy_coef * entropy, and the hidden
/// states (for a value head).
/// Every term is a mean over the micro-batch's tokens: times `share`.
fn ppo_policy_loss(
    s: &Settings,
    policy: &CausalLm,
    mb: &MicroBatch,
    share: f64,
    stats: &mut Stats,
) -> Result<(Tensor, Tensor)> {
    let p = &s.cfg.ppo;
    let (logprobs, entropy, h) = policy_outputs(policy, &mb.batch, s.o.temperature)?;
    let old = mb
        .old
        .as_ref()
        .ok_or_else(|| Error::Msg("no old log-probs".into()))?;
    let pl = rl::policy_loss(&logprobs, old, &mb.advantages, &mb.mask, p.cliprange)?;
    let entropy = rl::masked_mean(&entropy, &mb.mask)?;
    let mut loss = pl.loss.clone();
    if p.entropy_coef > 0.0 {
        loss = (loss - (&entropy * p.entropy_coef)?)?;
    }
    stats.add("policy/approxkl_avg", share * scalar(&pl.approxkl)?);
    stats.add("policy/clipfrac_avg", share * scalar(&pl.clipfrac)?);
    stats.add("loss/policy_avg", share * scalar(&pl.loss)?);
    stats.add("policy/entropy_avg", share * scalar(&entropy)?);
    let ratio = rl::masked_mean(&pl.ratio, &mb.mask)?;
    stats.add("val/ratio", share * scalar(&ratio)?);
    Ok((scaled(loss, share)?, h))
}

/// PPO's value loss, vf_coef * vf_loss; `h` as [`Critic::values`] takes it.
fn ppo_value_loss(
    s: &Settings,
    critic: &Critic,
    mb: &MicroBatch,
    h: Option<&Tensor>,
    share: f64,
    stats: &mut Stats,
) -> Result<Tensor> {
    let p = &s.cfg.ppo;
    let (Some(old_values), Some(returns)) = (&mb.values, &mb.returns) else {
        return Err(Error::Msg(
            "PPO's value loss needs values and returns".into(),
        ));
    };
    let values = critic.values(&mb.batch, h, true)?;
    let vl = rl::value_loss(&values, old_values, returns, &mb.mask, p.cliprange_value)?;
    stats.add("loss/value_avg", share * scalar(&vl.loss)?);
    stats.add("val/clipfrac_avg", share * scalar(&vl.clipfrac)?);
    Ok((&vl.loss * (p.vf_coef * share))?)
}

/// GRPO's and RLOO's loss: the clipped surrogate (per token, or per
/// sequence for GSPO and RLOO) plus GRPO's beta x k3 KL, reduced as
/// `loss_type` says.
fn group_loss(
    s: &Settings,
    policy: &CausalLm,
    mb: &MicroBatch,
    step_tokens: f64,
    sh: &Shares,
    stats: &mut Stats,
) -> Result<Tensor> {
    let (logprobs, entropy, _) = policy_outputs(policy, &mb.batch, s.o.temperature)?;
    let mask = &mb.mask;
    let old = match &mb.old {
        Some(o) => o.clone(),
        None => logprobs.detach(),
    };
    let adv = &mb.advantages;
    let ga = s.cfg.train.gradient_accumulation_steps as f64;
    let (g, o) = (&s.cfg.grpo, &s.o);
    let (eps_low, eps_high) = (o.epsilon, o.epsilon_high.unwrap_or(o.epsilon));
    let log_ratio = (&logprobs - &old)?;
    stats.add(
        "entropy",
        sh.tokens * scalar(&rl::masked_mean(&entropy, mask)?)?,
    );
    let mut kl_mean = None;
    let (loss, clip) = match s.algo {
        Algo::Grpo => {
            let lr = match g.importance_sampling_level {
                ImportanceSamplingLevel::Token => log_ratio,
                ImportanceSamplingLevel::Sequence => rl::sequence_log_ratio(&log_ratio, mask)?,
            };
            let clip = rl::clipped_surrogate(&lr, adv, eps_low, eps_high)?;
            let mut per_token = clip.loss.broadcast_as(mask.shape())?.contiguous()?;
            if let (Some(reference), true) = (&mb.reference, o.beta > 0.0) {
                // GRPO's KL term: beta x k3 per token (TRL's per_token_kl).
                let kl = rl::kl_per_token(&logprobs, reference, KlEstimator::K3)?;
                kl_mean = Some(sh.tokens * scalar(&rl::masked_mean(&kl.detach(), mask)?)?);
                per_token = (per_token + (kl * o.beta)?)?;
            }
            let loss = rl::reduce_token_loss(
                &per_token,
                mask,
                g.loss_type,
                s.sampling.max_new_tokens,
                step_tokens,
            )?;
            // The optimizer step averages its micro-batches' gradients; DAPO's
            // normalizer already spans the whole step (every rank's tokens),
            // so undo that mean. The others divide by the micro-batch's
            // sequences or (bnpo) tokens: every rank's, where TRL's bnpo
            // divides by each process's own.
            let loss = match g.loss_type {
                GrpoLossType::Dapo => (loss * ga)?,
                GrpoLossType::Bnpo => scaled(loss, sh.tokens)?,
                GrpoLossType::Grpo | GrpoLossType::DrGrpo => scaled(loss, sh.rows)?,
            };
            (loss, clip)
        }
        _ => {
            // RLOO: one ratio per sequence, from the summed log-probs.
            let seq = (log_ratio * mask)?.sum_keepdim(1)?;
            let clip = rl::clipped_surrogate(&seq, adv, eps_low, eps_high)?;
            (scaled(clip.loss.mean_all()?, sh.rows)?, clip)
        }
    };
    // Clip fractions: over real tokens for token ratios; over sequences for
    // one ratio per sequence (GSPO, RLOO), as TRL counts them.
    let rows = mb.rows.len();
    let frac = |x: &Tensor| -> Result<f64> {
        if x.dims().iter().product::<usize>() == rows {
            return Ok(sh.rows * scalar(&x.mean_all()?)?);
        }
        let x = x.broadcast_as(mask.shape())?.contiguous()?;
        Ok(sh.tokens * scalar(&rl::masked_mean(&x, mask)?)?)
    };
    stats.add("clip_ratio/low_mean", frac(&clip.low)?);
    stats.add("clip_ratio/high_mean", frac(&clip.high)?);
    stats.add("clip_ratio/region_mean", frac(&(&clip.low + &clip.high)?)?);
    if let Some(kl) = kl_mean {
        stats.add("kl", kl);
    }
    // The micro-batches' mean of this is the step's loss.
    stats.add("loss", scalar(&loss)?);
    Ok(loss)
}

/// Step 8: the iteration's loss diagnostics, in the algorithm's names.
pub(crate) fn loss_figures(algo: Algo, stats: &Stats) -> Vec<(String, f64)> {
    let mut f = stats.figures();
    if algo.ppo_family() {
        f.push(("val/ratio_var".into(), var(stats.values("val/ratio"))));
    }
    f
}

/// Step 7: adaptive KL control (Ziegler et al.) moves PPO's coefficient
/// from this batch's KL; the critic-free family keeps beta fixed.
pub(crate) fn adapt_kl(s: &Settings, kl_coef: f64, kl_per_sequence: f64) -> f64 {
    let p = &s.cfg.ppo;
    if !(s.algo.ppo_family() && p.adap_kl_ctrl) {
        return kl_coef;
    }
    let mut ctl = rl::AdaptiveKl {
        value: kl_coef,
        target: p.target,
        horizon: p.horizon,
    };
    ctl.update(kl_per_sequence, s.batch);
    ctl.value
}

/// `loss` times this rank's `share` of it (no op for 1).
fn scaled(loss: Tensor, share: f64) -> Result<Tensor> {
    Ok(match share == 1.0 {
        true => loss,
        false => (loss * share)?,
    })
}

/// Rows of `mask` that are real tokens.
pub(crate) fn token_count(mask: &Tensor, rows: &[usize], device: &Device) -> Result<f64> {
    let idx = Tensor::from_vec(
        rows.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        rows.len(),
        device,
    )?;
    scalar(&mask.index_select(&idx, 0)?.sum_all()?)
}
