//! PPO, stage 3 of RLHF, read top to bottom as in CleanRL. Each update
//! (one batch of prompts) takes the steps every online trainer numbers the
//! same way (GRPO and RLOO: `grpo.rs`):
//!
//! 1. sample responses with the KV cache and no autograd graph;
//! 2. log-probs of the sampled tokens under policy and reference, and the
//!    critic's values;
//! 3. score them with the reward functions (missing-EOS penalty);
//! 4. rewards: -kl_coef x KL on every token, the score on the last real one
//!    (optionally whitened);
//! 5. advantages: GAE with the critic's values, or REINFORCE++ without one;
//! 6. PPO epochs x mini-batches of the clipped policy and value losses;
//! 7. adaptive KL control;
//! 8. log, samples, evaluation, checkpoint.
//!
//! Semantics and names follow TRL's PPOTrainer and "The N+ Implementation
//! Details of RLHF with PPO" (Huang et al., 2024); the formulas live in
//! [`crate::rl`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};

use crate::chat::TemplateSource;
use crate::checkpoint::{self, Checkpoint, Manifest, TrainerState};
use crate::config::{AdvantageEstimator, Config, ModelInit, PpoConfig, StopToken};
use crate::data::prompts::{load_prompt_rows, PromptReport};
use crate::generate::Sampling;
use crate::hub::HubSettings;
use crate::io;
use crate::metrics::Progress;
use crate::models::{load_dir_frozen, resolve_model, ArchConfig, CausalLm};
use crate::optim::adamw::{AdamW, AdamWParams};
use crate::optim::{LossPart, StepOutcome, TrainCore};
use crate::rl;
use crate::run::{checkpoint_if_due, RunDir};
use crate::signal::StopSignal;
use crate::tokenizer::Tokenizer;
use crate::trainers::trained::Trained;
use crate::{Error, HostRng, IoContext, Result};

use crate::rewards::RewardFuncs;
pub use crate::rewards::{same_tokenizer, Completion, Reward, RewardModelReward, SumOfRewards};

use super::critic::{build_critic, Critic};
pub use super::eval::EvalReport;
use super::eval::{evaluate_if_due, log_eval};
use super::rollout::{self, policy_outputs, Batch, PromptInfo, Scored};
pub use super::stats::PhaseTimes;
use super::stats::UpdateStats;

// ---------------------------------------------------------------- rollouts

/// One batch of rollouts with everything PPO needs, per response token (B x r).
struct Rollouts {
    queries: Vec<Vec<u32>>,
    responses: Vec<Vec<u32>>,
    logprobs: Tensor,
    values: Tensor,
    advantages: Tensor,
    returns: Tensor,
    mask: Tensor,
}

/// What the rollout phase measured.
#[derive(Default)]
struct RolloutStats {
    figures: Vec<(String, f64)>,
    scores: Vec<f32>,
    texts: Vec<(String, String)>,
    kl_per_sequence: f64,
    generate_s: f64,
    forward_s: f64,
    score_s: f64,
    tokens: usize,
}

/// The frozen models a rollout reads.
struct Models<'a> {
    sampler: &'a CausalLm,
    reference: &'a CausalLm,
    prompts: &'a PromptInfo,
    /// None when only evaluating.
    critic: Option<&'a Critic>,
    tok: &'a Tokenizer,
    rewards: &'a RewardFuncs<'a>,
    device: &'a Device,
}

/// Scores completions with the reward functions; subtracts
/// missing_eos_penalty from those without the stop token. Returns the
/// total scores, each function's, and the texts.
fn score(
    m: &Models,
    queries: &[Vec<u32>],
    responses: &[Vec<u32>],
    stop: &[u32],
    missing_eos_penalty: Option<f64>,
) -> Result<Scored> {
    let texts = rollout::decode(m.tok, queries, responses, stop)?;
    let rows: Vec<_> = queries.iter().map(|q| m.prompts.get(q)).collect();
    let each = rollout::score_each(m.rewards, queries, responses, &texts, &rows)?;
    let mut total = m.rewards.combine(&each);
    if let Some(pen) = missing_eos_penalty {
        for (s, r) in total.iter_mut().zip(responses) {
            if !rollout::stopped(r, stop) {
                *s -= pen as f32;
            }
        }
    }
    Ok(Scored { total, each, texts })
}

/// Log-probs under policy and reference, and values (with a critic), for
/// all rows in chunks: (logprobs, ref_logprobs, values, mask), each (B, r).
fn forward_rollouts(
    m: &Models,
    queries: &[Vec<u32>],
    responses: &[Vec<u32>],
    r: usize,
    temperature: f64,
    chunk: usize,
) -> Result<(Tensor, Tensor, Option<Tensor>, Tensor)> {
    let (mut lp, mut rlp, mut vals, mut masks) = (vec![], vec![], vec![], vec![]);
    for (qs, rs) in queries.chunks(chunk).zip(responses.chunks(chunk)) {
        let qs: Vec<&[u32]> = qs.iter().map(Vec::as_slice).collect();
        let rs: Vec<&[u32]> = rs.iter().map(Vec::as_slice).collect();
        let b = Batch::new(&qs, &rs, r, m.tok.pad_id, m.sampler.dtype(), m.device)?;
        let (logprobs, _, h) = policy_outputs(m.sampler, &b, temperature)?;
        // The reference reads the same batch; only its attention bias
        // follows the dtype when the reference runs in a lower one.
        let ref_logprobs = if m.reference.dtype() == b.bias.dtype() {
            policy_outputs(m.reference, &b, temperature)?.0
        } else {
            let b_ref = Batch {
                bias: b.bias.to_dtype(m.reference.dtype())?,
                ..b.clone()
            };
            policy_outputs(m.reference, &b_ref, temperature)?.0
        };
        if let Some(critic) = m.critic {
            vals.push(critic.values(&b, Some(&h), false)?);
        }
        lp.push(logprobs);
        rlp.push(ref_logprobs);
        masks.push(b.response_mask);
    }
    let values = match vals.is_empty() {
        true => None,
        false => Some(Tensor::cat(&vals, 0)?),
    };
    Ok((
        Tensor::cat(&lp, 0)?,
        Tensor::cat(&rlp, 0)?,
        values,
        Tensor::cat(&masks, 0)?,
    ))
}

fn mean_f(x: &Tensor) -> Result<f64> {
    Ok(x.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}

/// Steps 1-5: sample, log-probs, score, rewards, advantages.
fn roll_out(
    m: &Models,
    p: &PpoConfig,
    queries: Vec<Vec<u32>>,
    sampling: &Sampling,
    kl_coef: f64,
    rng: &mut HostRng,
) -> Result<(Rollouts, RolloutStats)> {
    let started = Instant::now();
    let chunk = p.local_rollout_forward_batch_size;
    // 1. Sample responses with the KV cache, no autograd graph.
    let responses = rollout::sample(m.sampler, m.tok, m.device, &queries, sampling, chunk, rng)?;
    let generate_s = started.elapsed().as_secs_f64();
    // 2. Log-probs of the sampled tokens under policy and reference, values:
    //    computed once per rollout and reused by every PPO epoch.
    let started = Instant::now();
    let r = p.response_length;
    let (logprobs, ref_logprobs, values, mask) =
        forward_rollouts(m, &queries, &responses, r, p.temperature, chunk)?;
    m.device.synchronize()?; // GPU work is queued: wait for it before reading the clock
    let forward_s = started.elapsed().as_secs_f64();
    // 3. Scores from the reward functions (with the missing-EOS penalty).
    let started = Instant::now();
    let stop = &sampling.stop_token_ids;
    let Scored {
        total: scores,
        each,
        texts,
    } = score(m, &queries, &responses, stop, p.missing_eos_penalty)?;
    let score_s = started.elapsed().as_secs_f64();
    // REINFORCE++-baseline: each score minus the mean of its prompt's group
    // (the batch holds n_samples_per_prompt responses per prompt, in a row).
    let scores_t = match p.advantage_estimator {
        AdvantageEstimator::ReinforceBaseline => {
            let s64: Vec<f64> = scores.iter().map(|&x| x as f64).collect();
            let centred = rl::group_baseline(&s64, p.n_samples_per_prompt)?;
            Tensor::new(
                centred
                    .iter()
                    .map(|&x| x as f32)
                    .collect::<Vec<_>>()
                    .as_slice(),
                m.device,
            )?
        }
        _ => Tensor::new(scores.as_slice(), m.device)?,
    };
    // 4. Per-token rewards: -kl_coef * KL on every token, the score on the last real one.
    let kl = (rl::kl_per_token(&logprobs, &ref_logprobs, p.kl_estimator)? * &mask)?;
    let (mut rewards, non_score) = rl::per_token_rewards(&kl, &mask, &scores_t, kl_coef)?;
    //    Optional reward whitening (shift_mean = false, as TRL).
    if p.whiten_rewards {
        rewards = (rl::masked_whiten(&rewards, &mask, false)? * &mask)?;
    }
    // 5. Advantages. gae: GAE over response tokens with the critic's
    //    values, returns = advantages + values, then the advantages are
    //    whitened over real tokens. reinforce(_baseline): REINFORCE++, the
    //    discounted returns of the per-token rewards whitened over the
    //    batch; no critic, so values and returns stay 0.
    let (advantages, returns, values) = match (p.advantage_estimator, values) {
        (AdvantageEstimator::Gae, Some(values)) => {
            let values = (values * &mask)?;
            let (advantages, returns) = rl::gae(&rewards, &values, &mask, p.gamma, p.lam)?;
            let advantages = (rl::masked_whiten(&advantages, &mask, true)? * &mask)?;
            (advantages, returns, values)
        }
        (AdvantageEstimator::Gae, None) => {
            return Err(Error::Msg("PPO rollouts need a critic".into()))
        }
        _ => {
            let advantages = rl::reinforce_pp_advantages(&rewards, &mask, p.gamma)?;
            let zeros = mask.zeros_like()?;
            (advantages, zeros.clone(), zeros)
        }
    };

    let per_seq = |t: &Tensor| -> Result<f64> { mean_f(&t.sum(1)?) };
    let kl_seq = per_seq(&kl)?;
    let non_score_seq = per_seq(&non_score)?;
    let mean_score = scores.iter().map(|&s| s as f64).sum::<f64>() / scores.len() as f64;
    let lengths: Vec<usize> = responses.iter().map(Vec::len).collect();
    let eos = responses
        .iter()
        .filter(|r| r.last().is_some_and(|l| stop.contains(l)))
        .count();
    let ev = match m.critic {
        Some(_) => rl::explained_variance(&returns, &values, &mask)?,
        None => 0.0,
    };
    let tokens: usize = lengths.iter().sum();
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
        (
            "mean_response_length".into(),
            tokens as f64 / lengths.len() as f64,
        ),
    ];
    for (name, scores) in m.rewards.names().into_iter().zip(&each) {
        let mean = scores.iter().map(|&s| s as f64).sum::<f64>() / scores.len() as f64;
        figures.push((format!("rewards/{name}/mean"), mean));
    }
    Ok((
        Rollouts {
            queries,
            responses,
            logprobs,
            values,
            advantages,
            returns,
            mask,
        },
        RolloutStats {
            figures,
            scores,
            texts,
            kl_per_sequence: kl_seq,
            generate_s,
            forward_s,
            score_s,
            tokens,
        },
    ))
}

// ---------------------------------------------------------------- evaluation

/// Samples one completion per prompt (seeded, the same draws every call) and
/// reports reward, KL to the reference, length and EOS rate.
fn evaluate(
    m: &Models,
    p: &PpoConfig,
    prompts: &[Vec<u32>],
    sampling: &Sampling,
    seed: u64,
) -> Result<EvalReport> {
    let mut rng = HostRng::stream(seed, "eval");
    let chunk = p.local_rollout_forward_batch_size;
    let responses = rollout::sample(
        m.sampler, m.tok, m.device, prompts, sampling, chunk, &mut rng,
    )?;
    let (logprobs, ref_logprobs, _, mask) = forward_rollouts(
        m,
        prompts,
        &responses,
        p.response_length,
        p.temperature,
        chunk,
    )?;
    let kl = (rl::kl_per_token(&logprobs, &ref_logprobs, crate::config::KlEstimator::K1)? * mask)?;
    let kl = mean_f(&kl.sum(1)?)?;
    let stop = &sampling.stop_token_ids;
    let Scored {
        total: scores,
        texts,
        ..
    } = score(m, prompts, &responses, stop, None)?;
    let n = prompts.len() as f64;
    let eos = responses
        .iter()
        .filter(|r| r.last().is_some_and(|l| stop.contains(l)))
        .count();
    Ok(EvalReport {
        prompts: prompts.len(),
        mean_score: scores.iter().map(|&s| s as f64).sum::<f64>() / n,
        kl,
        mean_length: responses.iter().map(Vec::len).sum::<usize>() as f64 / n,
        eos_rate: eos as f64 / n,
        completions: texts
            .into_iter()
            .zip(&scores)
            .map(|((prompt, response), s)| json!({"prompt": prompt, "response": response, "score": s}))
            .collect(),
    })
}

/// The reference a PPO checkpoint was trained against: its manifest's
/// `ppo.ref_model`, else its initial policy `model.name_or_path`. None for
/// a directory that is not a candle-rlhf PPO checkpoint.
pub fn trained_reference(policy_dir: &Path) -> Option<String> {
    let path = policy_dir.join(checkpoint::MANIFEST_FILE);
    let manifest: Manifest = io::read_json(&path).ok()?;
    if manifest.command != "ppo" {
        return None;
    }
    let c = manifest.config;
    c.ppo.ref_model.or_else(|| c.model.resolved_name().ok())
}

/// `candle-rlhf eval`: samples one completion per held-out prompt from
/// `policy` and reports `reward`, KL to `reference` (default: the one a PPO
/// checkpoint was trained against, else the policy itself), mean length and
/// EOS rate. Sampling, prompt length and seed come from `cfg.ppo` and
/// `cfg.run`, as in training, so the numbers match `ppo`'s own evaluation.
pub fn evaluate_policy(
    cfg: &Config,
    policy: &str,
    reference: Option<&str>,
    reward: &dyn Reward,
    prompts: &str,
    split: &str,
) -> Result<(EvalReport, PromptReport)> {
    let (device, _) = crate::device::resolve_device(&cfg.run.device)?;
    let dtype = cfg.run.dtype.dtype();
    let p = &cfg.ppo;
    let hub = HubSettings::from_env();
    // The checkpoint itself (its manifest names the reference), then the
    // model it stands for (a LoRA checkpoint: its base with the adapter merged).
    let checkpoint_dir = crate::hub::resolve_model(policy, &hub)?;
    let policy_dir = resolve_model(policy, &hub)?;
    let tok = Tokenizer::from_dir(&policy_dir)?;
    let (arch, vb, _) = load_dir_frozen(&policy_dir, dtype, &device)?;
    let sampler = causal(CausalLm::load(vb, &arch, true), &arch)?;
    let ref_dir = match reference
        .map(str::to_string)
        .or_else(|| trained_reference(&checkpoint_dir))
    {
        Some(r) => resolve_model(&r, &hub)?,
        None => {
            tracing::warn!("no reference given and {} is not a PPO checkpoint: KL is measured to the policy itself (0)", policy_dir.display());
            policy_dir.clone()
        }
    };
    let ref_dtype = p.ref_dtype.map_or(dtype, |d| d.dtype());
    let (ref_arch, ref_vb, _) = load_dir_frozen(&ref_dir, ref_dtype, &device)?;
    let reference = causal(CausalLm::load(ref_vb, &ref_arch, true), &ref_arch)?;
    let template = TemplateSource::new(&policy_dir, cfg.model.chat_template.as_deref());
    let (rows, report) = load_prompt_rows(
        prompts,
        split,
        &tok,
        &template,
        p.max_prompt_length,
        p.truncate_prompts,
        &hub,
    )?;
    let info = PromptInfo::of(&rows);
    let ids: Vec<Vec<u32>> = rows.into_iter().map(|r| r.ids).collect();
    let rewards = RewardFuncs::single("reward", reward);
    let models = Models {
        sampler: &sampler,
        reference: &reference,
        prompts: &info,
        critic: None,
        tok: &tok,
        rewards: &rewards,
        device: &device,
    };
    let sampling = sampling_of(p, &tok);
    let e = evaluate(&models, p, &ids, &sampling, cfg.run.seed)?;
    Ok((e, report))
}

// ---------------------------------------------------------------- training

/// What a PPO run did.
#[derive(Debug, Clone)]
pub struct PpoRun {
    pub run_dir: PathBuf,
    pub checkpoint: PathBuf,
    pub updates: u64,
    pub prompts: PromptReport,
    /// Evaluation before the first update and after the last (with eval prompts).
    pub eval_before: Option<EvalReport>,
    pub eval_after: Option<EvalReport>,
    pub seconds_per_update: f64,
    /// Each update's phase times, for the updates this process ran.
    pub update_times: Vec<PhaseTimes>,
}

impl PpoRun {
    /// The phase times summed over this process's updates.
    pub fn total_times(&self) -> PhaseTimes {
        let mut sum = PhaseTimes::default();
        for t in &self.update_times {
            sum += *t;
        }
        sum
    }
}

/// The rollout's sampling settings; responses keep their stop token.
fn sampling_of(p: &PpoConfig, tok: &Tokenizer) -> Sampling {
    Sampling {
        max_new_tokens: p.response_length,
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        // stop_token_id wins; "eos" stops on every stop token of the model
        // (generation_config.json's EOS ids and the tokenizer's EOS).
        stop_token_ids: match (p.stop_token_id, p.stop_token) {
            (Some(id), _) => vec![id],
            (None, Some(StopToken::Eos)) => tok.stop_ids.clone(),
            (None, None) => Vec::new(),
        },
        keep_stop_token: true,
        draw: Default::default(),
    }
}

/// Trains with the config's `[[reward_funcs]]`, or the reward model of its
/// `ppo.reward_model` shorthand (see [`train_with_rewards`]).
pub fn train(cfg: &Config, run_dir: &Path, resume: bool, stop: &StopSignal) -> Result<PpoRun> {
    let (device, _) = crate::device::resolve_device(&cfg.run.device)?;
    let policy_dir = resolve_model(&cfg.model.resolved_name()?, &HubSettings::from_env())?;
    let funcs = match &cfg.ppo.reward_model {
        Some(rm) => vec![crate::config::RewardFuncConfig {
            name: "reward_model".into(),
            kind: crate::config::RewardFuncType::Model,
            model: Some(rm.clone()),
            ..Default::default()
        }],
        None => cfg.reward_funcs.clone(),
    };
    if funcs.is_empty() {
        return Err(Error::InvalidConfig {
            field: "ppo.reward_model".into(),
            value: String::new(),
            reason: "a reward model directory or hub id, or [[reward_funcs]] tables, are required (library users may pass any Reward)".into(),
        });
    }
    let (rewards, first_model) = crate::rewards::from_config(&funcs, &policy_dir, &device)?;
    train_with_rewards(cfg, run_dir, resume, stop, &rewards, first_model.as_deref())
}

/// Trains (or resumes) a policy with PPO against one `reward` (see
/// [`train_with_rewards`]); its metrics are `rewards/reward/mean`.
pub fn train_with_reward(
    cfg: &Config,
    run_dir: &Path,
    resume: bool,
    stop: &StopSignal,
    reward: &dyn Reward,
    reward_dir: Option<&Path>,
) -> Result<PpoRun> {
    let rewards = RewardFuncs::single("reward", reward);
    train_with_rewards(cfg, run_dir, resume, stop, &rewards, reward_dir)
}

/// Trains (or resumes) a policy with PPO against the weighted sum of
/// `rewards`; `reward_dir`, the first reward model's directory when there
/// is one, may initialize the critic.
pub fn train_with_rewards(
    cfg: &Config,
    run_dir: &Path,
    resume: bool,
    stop: &StopSignal,
    rewards: &RewardFuncs,
    reward_dir: Option<&Path>,
) -> Result<PpoRun> {
    if cfg.model.init != crate::config::ModelInit::Pretrained {
        return Err(Error::InvalidConfig {
            field: "model.init".into(),
            value: "random".into(),
            reason: "applies to sft and reward: PPO starts from a trained policy, which is also its reference".into(),
        });
    }
    let (device, device_name) = crate::device::resolve_device(&cfg.run.device)?;
    let dtype = cfg.run.dtype.dtype();
    let manifest = Manifest::new("ppo", cfg, &device_name);
    let mut run = RunDir::open(run_dir, manifest, resume)?;
    let (p, t, seed) = (&cfg.ppo, &cfg.train, cfg.run.seed);
    let hub = HubSettings::from_env();

    // Setup: the policy (trainable), its detached twin for sampling, the frozen reference.
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
    let mut policy = causal(CausalLm::load(vb, &arch, true), &arch)?;
    // TRL's PPOTrainer turns dropout off in every model: lora_dropout too.
    params = params.without_dropout();
    params.attach(&mut policy)?;
    let policy_vars = params.varmap().clone();
    let sampler = params.frozen_causal(&arch, dtype, &device)?;
    let ref_dtype = p.ref_dtype.map_or(dtype, |d| d.dtype());
    let reference = match (&p.ref_model, params.base_causal(&arch)) {
        // LoRA: the policy with its adapters disabled, over the same base
        // tensors (no second copy), when the reference's dtype is the run's.
        (None, Some(base)) if ref_dtype == dtype => base?,
        (r, _) => {
            let ref_dir = match r {
                Some(r) => resolve_model(r, &hub)?,
                None => policy_dir.clone(),
            };
            let (ref_arch, ref_vb, _) = load_dir_frozen(&ref_dir, ref_dtype, &device)?;
            causal(CausalLm::load(ref_vb, &ref_arch, true), &ref_arch)?
        }
    };
    // The critic, for GAE only (REINFORCE++ needs none).
    let critic = match p.advantage_estimator {
        AdvantageEstimator::Gae => Some(build_critic(
            p,
            reward_dir,
            &policy_dir,
            arch.hidden_size(),
            cfg.lora.as_ref().filter(|l| l.critic),
            dtype,
            &device,
        )?),
        _ => None,
    };

    // Setup: prompts.
    p.data().train()?;
    let template = TemplateSource::new(&policy_dir, cfg.model.chat_template.as_deref());
    let (prompt_rows, report) = load_prompt_rows(
        &p.dataset,
        &p.dataset_train_split,
        &tok,
        &template,
        p.max_prompt_length,
        p.truncate_prompts,
        &hub,
    )?;
    tracing::info!("{}: {report}", p.dataset);
    let mut info = PromptInfo::of(&prompt_rows);
    let prompts: Vec<Vec<u32>> = prompt_rows.into_iter().map(|r| r.ids).collect();
    let eval_prompts = match &p.eval_dataset {
        Some(spec) => {
            let (e, r) = load_prompt_rows(
                spec,
                &p.dataset_test_split,
                &tok,
                &template,
                p.max_prompt_length,
                p.truncate_prompts,
                &hub,
            )?;
            tracing::info!("{spec}: {r}");
            info.extend(&e);
            e.into_iter().map(|r| r.ids).collect()
        }
        None => Vec::new(),
    };
    let limit = policy.max_positions();
    if p.max_prompt_length + p.response_length > limit {
        return Err(Error::InvalidConfig {
            field: "ppo.response_length".into(),
            value: p.response_length.to_string(),
            reason: format!(
                "max_prompt_length ({}) + response_length exceeds the model's {limit} positions",
                p.max_prompt_length
            ),
        });
    }

    // Setup: batch sizes (TRL's names) and the schedule over optimizer steps.
    let batch = p.local_batch_size(t);
    let mini_batch = p.local_mini_batch_size(t);
    // Episodes count responses: one pass samples each prompt n_samples_per_prompt times.
    let episodes = p
        .total_episodes
        .unwrap_or(prompts.len() as u64 * p.n_samples_per_prompt as u64)
        .max(1);
    let total_updates = episodes.div_ceil(batch as u64);
    let total_steps = total_updates * (p.num_ppo_epochs * p.num_mini_batches) as u64;
    let mut vars: Vec<(String, Var)> = policy_vars
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    let critic_vars = critic.as_ref().map(Critic::vars).unwrap_or_default();
    let critic_names: Vec<String> = critic_vars.iter().map(|(n, _)| n.clone()).collect();
    vars.extend(critic_vars);
    let mut core = TrainCore::new(
        AdamW::new(vars, AdamWParams::from_config(t))?,
        t,
        total_steps,
    );
    // Separate learning rates: the critic's group follows the same schedule, scaled.
    if let Some(critic_lr) = p.critic_learning_rate {
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
    let sampling = sampling_of(p, &tok);

    // Setup: state, fresh or the newest checkpoint's.
    let mut state = TrainerState::fresh(seed, &["data", "sample", "ppo"], json!({}));
    PpoState {
        kl_coef: p.kl_coef,
        episode: 0,
    }
    .store(&mut state);
    if let Some(point) = &run.resume {
        checkpoint::load_into_vars(
            &point.checkpoint,
            policy_vars
                .data()
                .lock()
                .expect("varmap lock")
                .iter()
                .map(|(n, v)| (n.as_str(), v)),
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
    let tokenizer_files = checkpoint::tokenizer_files(&policy_dir);
    let save = |run: &RunDir, core: &TrainCore, state: &TrainerState| -> Result<PathBuf> {
        let (weights, lora) = params.checkpoint_parts()?;
        let extra: Vec<_> = critic.iter().map(Critic::checkpoint_file).collect();
        checkpoint::save(
            &run.path,
            &Checkpoint {
                weights: &weights,
                model_config: Some(&base_config),
                tokenizer_files: &tokenizer_files,
                extra_weights: &extra,
                optimizer: Some(&core.optimizer),
                state,
                manifest: &run.manifest,
                lora: lora.as_ref(),
            },
            t.save_total_limit,
        )
    };
    let models = Models {
        sampler: &sampler,
        reference: &reference,
        prompts: &info,
        critic: critic.as_ref(),
        tok: &tok,
        rewards,
        device: &device,
    };
    let eval_now = |m: &Models| -> Result<Option<EvalReport>> {
        if eval_prompts.is_empty() {
            return Ok(None);
        }
        evaluate(m, p, &eval_prompts, &sampling, seed).map(Some)
    };
    let mut eval_before = None;
    if state.step == 0 {
        eval_before = eval_now(&models)?;
        if let Some(e) = &eval_before {
            log_eval(&mut run, 0, &e.figures(), &e.completions)?;
        }
    }

    // The loop: one update per batch of prompts, steps 1-8.
    let progress = Progress::new(total_updates, "ppo");
    let sample_every = (total_updates / p.num_sample_generations.max(1) as u64).max(1);
    let mut update_times = Vec::new();
    let started = Instant::now();
    let first_update = state.step;
    let mut last_checkpoint = None;
    let mut eval_after = None;
    while state.step < total_updates {
        let update_started = Instant::now();
        // Prompts: a seeded shuffle, reshuffled each pass; position checkpointed.
        //          Each prompt n_samples_per_prompt times, in a row.
        let n = p.n_samples_per_prompt;
        let queries: Vec<Vec<u32>> = state
            .next_items(prompts.len(), batch / n)
            .into_iter()
            .flat_map(|i| std::iter::repeat_n(prompts[i].clone(), n))
            .collect();
        let mut ppo_state = PpoState::of(&state, p)?;
        let kl_coef = ppo_state.kl_coef;
        // Steps 1-5.
        let update = state.step + 1;
        let (ro, stats) = roll_out(&models, p, queries, &sampling, kl_coef, state.rng("sample"))
            .map_err(|e| {
                Error::Msg(format!(
                    "update {update}: {e} (no update was applied; the last checkpoint is intact)"
                ))
            })?;

        // 6. PPO epochs over shuffled mini-batches, accumulating micro-batches.
        let update_phase = Instant::now();
        let mut acc = UpdateStats::default();
        let mut lr = 0.0;
        for _ in 0..p.num_ppo_epochs {
            let order = state.rng("ppo").permutation(batch);
            for mb in order.chunks(mini_batch) {
                for micro in mb.chunks(t.per_device_train_batch_size) {
                    micro_batch_backward(&mut core, &models, &policy, p, &ro, micro, &mut acc)?;
                }
                if let StepOutcome::Applied { lr: l, .. } = core.step(state.optimizer_steps)? {
                    lr = l;
                }
                state.optimizer_steps += 1;
            }
        }
        models.device.synchronize()?;
        let this_update_s = update_phase.elapsed().as_secs_f64();
        state.step += 1;
        ppo_state.episode += batch as u64;
        let episode = ppo_state.episode;
        // 7. Adaptive KL control updates the coefficient from this batch's KL.
        if p.adap_kl_ctrl {
            let mut ctl = rl::AdaptiveKl {
                value: kl_coef,
                target: p.target,
                horizon: p.horizon,
            };
            ctl.update(stats.kl_per_sequence, batch);
            ppo_state.kl_coef = ctl.value;
        }
        ppo_state.store(&mut state);

        // 8. Metrics (means over every micro-batch of the update), samples, eval, checkpoint.
        let elapsed = update_started.elapsed().as_secs_f64();
        update_times.push(PhaseTimes {
            generate_s: stats.generate_s,
            forward_s: stats.forward_s,
            score_s: stats.score_s,
            update_s: this_update_s,
            total_s: elapsed,
        });
        if state.step.is_multiple_of(t.logging_steps) || state.step == total_updates {
            let mut figures = stats.figures.clone();
            figures.extend(acc.figures());
            figures.extend([
                ("lr".into(), lr),
                ("episode".into(), episode as f64),
                ("time/generate".into(), stats.generate_s),
                ("time/forward".into(), stats.forward_s),
                ("time/score".into(), stats.score_s),
                ("time/update".into(), this_update_s),
                ("tokens_per_second".into(), stats.tokens as f64 / elapsed),
            ]);
            run.metrics.log(state.step, &figures)?;
        }
        if state.step.is_multiple_of(sample_every) || state.step == total_updates {
            write_samples(&run.path, state.step, &stats)?;
        }
        let mean_score = stats.scores.iter().map(|&s| s as f64).sum::<f64>() / batch as f64;
        progress.update(
            state.step,
            &[
                ("episode", episode as f64),
                ("score", mean_score),
                ("kl", stats.kl_per_sequence),
            ],
        );
        let stopping = stop.requested();
        checkpoint_if_due(
            state.step,
            total_updates,
            t.save_steps,
            stopping,
            &mut last_checkpoint,
            || save(&run, &core, &state),
        )?;
        let evaluated = evaluate_if_due(t.eval_steps, state.step, total_updates, "update", || {
            eval_now(&models)
        })?;
        if let Some(e) = evaluated {
            log_eval(&mut run, state.step, &e.figures(), &e.completions)?;
            eval_after = Some(e);
        }
    }
    progress.finish();
    let updates_run = (state.step - first_update).max(1);
    let checkpoint = run.finish(last_checkpoint)?;
    Ok(PpoRun {
        run_dir: run.path.clone(),
        checkpoint,
        updates: state.step,
        prompts: report,
        eval_before,
        eval_after,
        seconds_per_update: started.elapsed().as_secs_f64() / updates_run as f64,
        update_times,
    })
}

/// What PPO keeps in a checkpoint beside the weights, the optimizer, the
/// RNG streams and the data position (`trainer_state.json`'s `extra`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
struct PpoState {
    /// The KL coefficient now (adaptive KL control moves it).
    kl_coef: f64,
    /// Prompts rolled out so far (TRL's `episode`).
    episode: u64,
}

impl PpoState {
    fn of(state: &TrainerState, p: &PpoConfig) -> Result<Self> {
        // A checkpoint from before this field set: the config's coefficient.
        if state.extra.get("kl_coef").is_none() {
            return Ok(Self {
                kl_coef: p.kl_coef,
                episode: state
                    .extra
                    .get("episode")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
            });
        }
        serde_json::from_value(state.extra.clone())
            .map_err(|e| Error::Msg(format!("trainer_state.json: PPO's state: {e}")))
    }

    fn store(self, state: &mut TrainerState) {
        state.extra = serde_json::to_value(self).expect("plain numbers serialize");
    }
}

/// A policy must be a causal LM.
fn causal(lm: Result<CausalLm>, arch: &ArchConfig) -> Result<CausalLm> {
    lm.map_err(|e| {
        Error::Msg(format!(
            "PPO needs a causal LM policy; {} cannot be one: {e}",
            arch.model_type()
        ))
    })
}

/// One micro-batch (rows `rows` of the rollouts) gathered for the loss.
struct MicroBatch {
    batch: Batch,
    mask: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    old_values: Tensor,
    returns: Tensor,
}

impl MicroBatch {
    fn new(
        m: &Models,
        policy: &CausalLm,
        p: &PpoConfig,
        ro: &Rollouts,
        rows: &[usize],
    ) -> Result<Self> {
        let idx = Tensor::from_vec(
            rows.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            rows.len(),
            m.device,
        )?;
        let qs: Vec<&[u32]> = rows.iter().map(|&i| ro.queries[i].as_slice()).collect();
        let rs: Vec<&[u32]> = rows.iter().map(|&i| ro.responses[i].as_slice()).collect();
        let batch = Batch::new(
            &qs,
            &rs,
            p.response_length,
            m.tok.pad_id,
            policy.dtype(),
            m.device,
        )?;
        let pick = |t: &Tensor| t.index_select(&idx, 0);
        Ok(Self {
            batch,
            mask: pick(&ro.mask)?,
            old_logprobs: pick(&ro.logprobs)?,
            advantages: pick(&ro.advantages)?,
            old_values: pick(&ro.values)?,
            returns: pick(&ro.returns)?,
        })
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The policy's part of the PPO loss, pg_loss - entropy_coef * entropy,
/// with its statistics and the hidden states (for a value head).
fn policy_part(
    policy: &CausalLm,
    p: &PpoConfig,
    mb: &MicroBatch,
) -> Result<(Tensor, UpdateStats, Tensor)> {
    let (logprobs, entropy, h) = policy_outputs(policy, &mb.batch, p.temperature)?;
    let pl = rl::policy_loss(
        &logprobs,
        &mb.old_logprobs,
        &mb.advantages,
        &mb.mask,
        p.cliprange,
    )?;
    let entropy = rl::masked_mean(&entropy, &mb.mask)?;
    let mut loss = pl.loss.clone();
    if p.entropy_coef > 0.0 {
        loss = (loss - (&entropy * p.entropy_coef)?)?;
    }
    let stats = UpdateStats {
        n: 1,
        approxkl: scalar(&pl.approxkl)?,
        clipfrac: scalar(&pl.clipfrac)?,
        pg_loss: scalar(&pl.loss)?,
        entropy: scalar(&entropy)?,
        ratios: vec![scalar(&rl::masked_mean(&pl.ratio, &mb.mask)?)?],
        ..UpdateStats::default()
    };
    Ok((loss, stats, h))
}

/// The critic's part of the PPO loss, vf_coef * vf_loss, with its
/// statistics; `h` as [`Critic::values`] takes it.
fn critic_part(
    critic: &Critic,
    p: &PpoConfig,
    mb: &MicroBatch,
    h: Option<&Tensor>,
) -> Result<(Tensor, UpdateStats)> {
    let values = critic.values(&mb.batch, h, true)?;
    let vl = rl::value_loss(
        &values,
        &mb.old_values,
        &mb.returns,
        &mb.mask,
        p.cliprange_value,
    )?;
    let stats = UpdateStats {
        vf_loss: scalar(&vl.loss)?,
        vf_clipfrac: scalar(&vl.clipfrac)?,
        ..UpdateStats::default()
    };
    Ok(((&vl.loss * p.vf_coef)?, stats))
}

/// Backpropagates the PPO loss of one micro-batch (rows `rows` of the
/// rollouts), pg_loss + vf_coef * vf_loss - entropy_coef * entropy, into
/// `core`'s pending step, and adds its statistics to `acc`. With
/// `critic_on_own_thread`, a critic model (not a head on the policy's hidden
/// states) runs its forward and backward on a thread beside the policy's.
fn micro_batch_backward(
    core: &mut TrainCore,
    m: &Models,
    policy: &CausalLm,
    p: &PpoConfig,
    ro: &Rollouts,
    rows: &[usize],
    acc: &mut UpdateStats,
) -> Result<()> {
    let mb = MicroBatch::new(m, policy, p, ro, rows)?;
    let Some(critic) = m.critic else {
        // REINFORCE++: the policy's loss alone.
        let (loss, stats, _) = policy_part(policy, p, &mb)?;
        core.backward(&loss)?;
        acc.absorb(stats);
        return Ok(());
    };
    let side_by_side =
        p.critic_on_own_thread && matches!(critic, Critic::Model { .. }) && m.device.is_cpu();
    if side_by_side {
        let mb = &mb;
        let parts: Vec<LossPart<UpdateStats>> = vec![
            Box::new(move || policy_part(policy, p, mb).map(|(loss, stats, _)| (loss, stats))),
            Box::new(move || critic_part(critic, p, mb, None)),
        ];
        for stats in core.backward_concurrently(parts)?.1 {
            acc.absorb(stats);
        }
        return Ok(());
    }
    let (policy_loss, policy_stats, h) = policy_part(policy, p, &mb)?;
    let (critic_loss, critic_stats) = critic_part(critic, p, &mb, Some(&h))?;
    core.backward(&(policy_loss + critic_loss)?)?;
    acc.absorb(policy_stats);
    acc.absorb(critic_stats);
    Ok(())
}

/// Appends a few completions with their scores to RUN_DIR/samples.jsonl.
fn write_samples(run_dir: &Path, update: u64, stats: &RolloutStats) -> Result<()> {
    use std::io::Write;
    let path = run_dir.join("samples.jsonl");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_path(&path)?;
    for ((prompt, response), score) in stats.texts.iter().zip(&stats.scores).take(4) {
        let line =
            json!({"update": update, "prompt": prompt, "response": response, "score": score});
        writeln!(file, "{line}").with_path(&path)?;
    }
    Ok(())
}
