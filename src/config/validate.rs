//! Values that parse but make no sense, refused before any model loads.
//! One table of rules per section: the field, its value, whether it holds,
//! and what it must be. The first rule that fails is the error.

use super::{
    Config, DpoConfig, DpoLossType, FDivergenceType, GenerateConfig, GrpoConfig, InitLoraWeights,
    LoraConfig, OnlineKeys, PpoConfig, RewardConfig, RewardFuncConfig, RewardFuncType, RlooConfig,
    SftConfig, TargetModules, TrainConfig,
};
use crate::{Error, Result};

/// One rule: the field's full key, its value as written, whether it holds,
/// and the reason given when it does not.
struct Rule {
    field: String,
    value: String,
    ok: bool,
    reason: String,
}

fn rule(field: impl Into<String>, value: impl std::fmt::Display, ok: bool, reason: &str) -> Rule {
    Rule {
        field: field.into(),
        value: value.to_string(),
        ok,
        reason: reason.to_string(),
    }
}

/// A rule on an optional value: holds when unset.
fn rule_opt<T: std::fmt::Display + Copy>(
    field: impl Into<String>,
    value: Option<T>,
    holds: impl Fn(T) -> bool,
    reason: &str,
) -> Rule {
    match value {
        Some(v) => rule(field, v, holds(v), reason),
        None => rule(field, "unset", true, reason),
    }
}

// The usual bounds, each with its reason.
const AT_LEAST_1: &str = "must be at least 1";
const NON_NEGATIVE: &str = "must be >= 0";
const POSITIVE: &str = "must be > 0";
const UNIT_CLOSED: &str = "must be in [0, 1]";
const UNIT_HALF_OPEN: &str = "must be in [0, 1)";
const PROBABILITY: &str = "must be in (0, 1]";

fn non_negative(x: f64) -> bool {
    x.is_finite() && x >= 0.0
}

fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

#[rustfmt::skip]
fn train_rules(t: &TrainConfig) -> Vec<Rule> {
    vec![
        rule("train.learning_rate", t.learning_rate, non_negative(t.learning_rate), "must be a finite number >= 0"),
        rule("train.per_device_train_batch_size", t.per_device_train_batch_size, t.per_device_train_batch_size >= 1, AT_LEAST_1),
        rule("train.per_device_eval_batch_size", t.per_device_eval_batch_size, t.per_device_eval_batch_size >= 1, AT_LEAST_1),
        rule("train.gradient_accumulation_steps", t.gradient_accumulation_steps, t.gradient_accumulation_steps >= 1, AT_LEAST_1),
        rule("train.num_train_epochs", t.num_train_epochs, positive(t.num_train_epochs), POSITIVE),
        rule_opt("train.max_steps", t.max_steps, |m| m >= 1, "must be at least 1 (leave it unset to train by epochs)"),
        rule("train.max_grad_norm", t.max_grad_norm, non_negative(t.max_grad_norm), "must be >= 0 (0 turns clipping off)"),
        rule("train.warmup_ratio", t.warmup_ratio, (0.0..=1.0).contains(&t.warmup_ratio), UNIT_CLOSED),
        rule("train.weight_decay", t.weight_decay, non_negative(t.weight_decay), NON_NEGATIVE),
        rule("train.adam_beta1", t.adam_beta1, (0.0..1.0).contains(&t.adam_beta1), UNIT_HALF_OPEN),
        rule("train.adam_beta2", t.adam_beta2, (0.0..1.0).contains(&t.adam_beta2), UNIT_HALF_OPEN),
        rule("train.adam_epsilon", t.adam_epsilon, positive(t.adam_epsilon), POSITIVE),
        rule("train.logging_steps", t.logging_steps, t.logging_steps >= 1, AT_LEAST_1),
        rule("train.save_steps", t.save_steps, t.save_steps >= 1, AT_LEAST_1),
        rule_opt("train.save_total_limit", t.save_total_limit, |k| k >= 1, "must be at least 1 (leave it unset to keep every checkpoint)"),
        rule_opt("train.eval_steps", t.eval_steps, |e| e >= 1, AT_LEAST_1),
        rule("train.max_nonfinite_steps", t.max_nonfinite_steps, t.max_nonfinite_steps >= 1, AT_LEAST_1),
    ]
}

#[rustfmt::skip]
fn generate_rules(g: &GenerateConfig) -> Vec<Rule> {
    vec![
        rule("generate.max_new_tokens", g.max_new_tokens, g.max_new_tokens >= 1, AT_LEAST_1),
        rule("generate.temperature", g.temperature, non_negative(g.temperature), "must be >= 0 (0 is greedy)"),
        rule("generate.top_p", g.top_p, g.top_p > 0.0 && g.top_p <= 1.0, PROBABILITY),
        rule_opt("generate.top_k", g.top_k, |k| k >= 1, "must be at least 1 (leave it unset for no top-k)"),
    ]
}

#[rustfmt::skip]
fn sft_rules(s: &SftConfig) -> Vec<Rule> {
    vec![
        rule("sft.max_length", s.max_length, s.max_length >= 2, "must be at least 2 tokens"),
        rule("sft.eval_ratio", s.eval_ratio, (0.0..1.0).contains(&s.eval_ratio), UNIT_HALF_OPEN),
    ]
}

#[rustfmt::skip]
fn lora_rules(l: Option<&LoraConfig>) -> Vec<Rule> {
    let Some(l) = l else { return vec![] };
    let init_ok = matches!(&l.init_lora_weights, InitLoraWeights::Flag(true))
        || matches!(&l.init_lora_weights, InitLoraWeights::Name(n) if n == "gaussian");
    let init = match &l.init_lora_weights {
        InitLoraWeights::Flag(b) => b.to_string(),
        InitLoraWeights::Name(n) => format!("\"{n}\""),
    };
    let pattern_ok = match &l.target_modules {
        Some(TargetModules::Pattern(p)) => p == "all-linear" || regex::Regex::new(p).is_ok(),
        Some(TargetModules::Names(n)) => !n.is_empty(),
        None => true,
    };
    vec![
        rule("lora.r", l.r, l.r >= 1, AT_LEAST_1),
        rule("lora.lora_alpha", l.lora_alpha, l.lora_alpha > 0.0 && l.lora_alpha.is_finite(), "must be positive"),
        rule("lora.lora_dropout", l.lora_dropout, (0.0..1.0).contains(&l.lora_dropout), UNIT_HALF_OPEN),
        rule("lora.init_lora_weights", init, init_ok, "must be true or \"gaussian\" (peft's other initialisations are not supported)"),
        rule("lora.target_modules", format!("{:?}", l.target_modules), pattern_ok, "must be a non-empty list of module names, \"all-linear\", or a valid regular expression"),
    ]
}

#[rustfmt::skip]
fn reward_rules(r: &RewardConfig) -> Vec<Rule> {
    vec![
        rule("reward.max_length", r.max_length, r.max_length >= 2, "must be at least 2 tokens"),
        rule("reward.eval_ratio", r.eval_ratio, (0.0..1.0).contains(&r.eval_ratio), UNIT_HALF_OPEN),
        rule_opt("reward.center_rewards_coefficient", r.center_rewards_coefficient, non_negative, NON_NEGATIVE),
    ]
}

/// The combinations TRL 1.12's DPOTrainer refuses, with its reasons, and
/// the bounds the losses need.
#[rustfmt::skip]
fn dpo_rules(d: &DpoConfig) -> Vec<Rule> {
    use DpoLossType::*;
    let names = |ts: &[DpoLossType]| ts.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ");
    let f_ok = [Sigmoid, SigmoidNorm, Hinge, Ipo, ExoPair, Robust, Discopop, Sft];
    let f_default = d.f_divergence_type == FDivergenceType::ReverseKl;
    let has = |t: DpoLossType| d.loss_type.contains(&t);
    let weights = d.loss_weights.as_ref().map_or(d.loss_type.len(), Vec::len);
    vec![
        rule("dpo.loss_type", "[]", !d.loss_type.is_empty(), "needs at least one loss"),
        rule("dpo.loss_weights", format!("{weights} weights"), weights == d.loss_type.len(),
            &format!("must have the same length as `loss_type` when combining multiple losses ({} loss types)", d.loss_type.len())),
        rule("dpo.f_divergence_type", format!("{:?} with [{}]", d.f_divergence_type, names(&d.loss_type)),
            f_default || d.loss_type.iter().all(|t| f_ok.contains(t)),
            "a non-default f_divergence_type is only supported for hinge, ipo, exo_pair, robust, discopop, sft, sigmoid and sigmoid_norm (TRL: the f-DPO reparameterization leaves a beta log Z(x) term that only cancels in the chosen-rejected reward difference); use reverse_kl with these losses"),
        rule("dpo.use_weighting", "true with aot", !(d.use_weighting && (has(Aot) || has(AotUnpaired))),
            "WPO-style weighting is not implemented for aot or aot_unpaired, because those losses sort samples, which would misalign per-pair weights (TRL's reason)"),
        rule("dpo.label_smoothing", d.label_smoothing, !(has(ExoPair) && d.label_smoothing == 0.0),
            "must be greater than 0.0 with the exo_pair loss; the EXO paper recommends 1e-3"),
        rule("dpo.label_smoothing", d.label_smoothing, d.label_smoothing.is_finite(), "must be finite"),
        rule("dpo.beta", d.beta, positive(d.beta), POSITIVE),
        rule("dpo.max_length", d.max_length, d.max_length >= 2, "must be at least 2 tokens"),
        rule("dpo.eval_ratio", d.eval_ratio, (0.0..1.0).contains(&d.eval_ratio), UNIT_HALF_OPEN),
        rule("dpo.discopop_tau", d.discopop_tau, positive(d.discopop_tau), POSITIVE),
        rule("dpo.f_alpha_divergence_coef", d.f_alpha_divergence_coef, d.f_alpha_divergence_coef.is_finite(), "must be finite"),
        rule_opt("dpo.ld_alpha", d.ld_alpha, non_negative, NON_NEGATIVE),
        rule_opt("dpo.precompute_ref_batch_size", d.precompute_ref_batch_size, |n| n >= 1, AT_LEAST_1),
        rule("dpo.sync_ref_model", d.sync_ref_model, !d.sync_ref_model,
            "TR-DPO's reference sync (sync_ref_model, ref_model_mixup_alpha, ref_model_sync_steps) is not implemented; set sync_ref_model = false"),
    ]
}

#[rustfmt::skip]
fn ppo_rules(p: &PpoConfig, t: &TrainConfig, threads: usize) -> Vec<Rule> {
    let batch = p.local_batch_size(t);
    let chunk = p.local_rollout_forward_batch_size;
    vec![
        rule("ppo.num_ppo_epochs", p.num_ppo_epochs, p.num_ppo_epochs >= 1, AT_LEAST_1),
        rule("ppo.num_mini_batches", p.num_mini_batches, p.num_mini_batches >= 1, AT_LEAST_1),
        rule("ppo.local_rollout_forward_batch_size", chunk, chunk >= 1, AT_LEAST_1),
        rule(
            "ppo.local_rollout_forward_batch_size",
            chunk,
            chunk >= batch || (chunk >= 1 && batch.is_multiple_of(chunk)),
            &format!("must divide the rollout batch of {batch} (per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches) so chunks are equal, or be at least {batch}"),
        ),
        rule_opt("ppo.total_episodes", p.total_episodes, |n| n >= batch as u64, &format!("must be at least one rollout batch ({batch})")),
        rule("ppo.response_length", p.response_length, p.response_length >= 1, AT_LEAST_1),
        rule("ppo.temperature", p.temperature, positive(p.temperature), "must be > 0: PPO samples its rollouts"),
        rule("ppo.kl_coef", p.kl_coef, non_negative(p.kl_coef), NON_NEGATIVE),
        rule("ppo.cliprange", p.cliprange, positive(p.cliprange), POSITIVE),
        rule("ppo.cliprange_value", p.cliprange_value, positive(p.cliprange_value), POSITIVE),
        rule("ppo.vf_coef", p.vf_coef, non_negative(p.vf_coef), NON_NEGATIVE),
        rule("ppo.gamma", p.gamma, (0.0..=1.0).contains(&p.gamma), UNIT_CLOSED),
        rule("ppo.lam", p.lam, (0.0..=1.0).contains(&p.lam), UNIT_CLOSED),
        rule("ppo.max_prompt_length", p.max_prompt_length, p.max_prompt_length >= 1, AT_LEAST_1),
        rule("ppo.top_p", p.top_p, p.top_p > 0.0 && p.top_p <= 1.0, PROBABILITY),
        rule_opt("ppo.top_k", p.top_k, |k| k >= 1, "must be at least 1 (leave it unset for no top-k)"),
        rule("ppo.entropy_coef", p.entropy_coef, non_negative(p.entropy_coef), NON_NEGATIVE),
        rule("ppo.target", p.target, positive(p.target), POSITIVE),
        rule("ppo.horizon", p.horizon, positive(p.horizon), POSITIVE),
        rule(
            "ppo.critic_on_own_thread",
            p.critic_on_own_thread,
            !p.critic_on_own_thread || threads == 1,
            &format!("needs run.threads = 1 (each model's ops on one thread, two cores in all), not {threads}"),
        ),
        rule_opt("ppo.critic_learning_rate", p.critic_learning_rate, positive, POSITIVE),
        rule_opt("ppo.missing_eos_penalty", p.missing_eos_penalty, f64::is_finite, "must be finite"),
        rule("ppo.n_samples_per_prompt", p.n_samples_per_prompt, p.n_samples_per_prompt >= 1 && batch.is_multiple_of(p.n_samples_per_prompt.max(1)), &format!("must be at least 1 and divide the rollout batch of {batch}")),
        rule(
            "ppo.n_samples_per_prompt",
            p.n_samples_per_prompt,
            p.advantage_estimator != super::AdvantageEstimator::ReinforceBaseline || p.n_samples_per_prompt >= 2,
            "must be at least 2 with advantage_estimator = \"reinforce_baseline\" (the baseline is the group's mean)",
        ),
    ]
}

#[rustfmt::skip]
fn online_rules(o: &OnlineKeys, t: &TrainConfig) -> Vec<Rule> {
    let key = |k: &str| format!("{}.{k}", o.section);
    let ga = t.gradient_accumulation_steps;
    vec![
        rule(key("num_generations"), o.num_generations, o.num_generations >= 2, "must be at least 2: the advantage compares a prompt's completions"),
        rule_opt(key("num_generations_eval"), o.num_generations_eval, |n| n >= 1, AT_LEAST_1),
        rule(key("max_prompt_length"), o.max_prompt_length, o.max_prompt_length >= 1, AT_LEAST_1),
        rule(key("max_completion_length"), o.max_completion_length, o.max_completion_length >= 1, AT_LEAST_1),
        rule(key("temperature"), o.temperature, positive(o.temperature), "must be > 0: completions are sampled"),
        rule(key("top_p"), o.top_p, o.top_p > 0.0 && o.top_p <= 1.0, PROBABILITY),
        rule_opt(key("top_k"), o.top_k, |k| k >= 1, "must be at least 1 (leave it unset for no top-k)"),
        rule(key("beta"), o.beta, non_negative(o.beta), NON_NEGATIVE),
        rule(key("epsilon"), o.epsilon, positive(o.epsilon), POSITIVE),
        rule_opt(key("epsilon_high"), o.epsilon_high, positive, POSITIVE),
        rule(key("num_iterations"), o.num_iterations, o.num_iterations >= 1, AT_LEAST_1),
        rule_opt(key("steps_per_generation"), o.steps_per_generation, |n| n >= 1 && n.is_multiple_of(ga), &format!("must be a multiple of train.gradient_accumulation_steps ({ga})")),
    ]
}

fn grpo_rules(g: &GrpoConfig, t: &TrainConfig) -> Vec<Rule> {
    online_rules(&g.online(), t)
}

#[rustfmt::skip]
fn rloo_rules(r: &RlooConfig, t: &TrainConfig) -> Vec<Rule> {
    let mut rules = online_rules(&r.online(), t);
    if let Some([lo, hi]) = r.reward_clip_range {
        rules.push(rule("rloo.reward_clip_range", format!("[{lo}, {hi}]"), lo.is_finite() && hi.is_finite() && lo <= hi, "must be [min, max] with min <= max"));
    }
    rules
}

/// The `[[reward_funcs]]` tables: a unique name each and the keys its type needs.
fn check_reward_funcs(funcs: &[RewardFuncConfig]) -> Result<()> {
    let bad = |i: usize, key: &str, value: String, reason: String| Error::InvalidConfig {
        field: format!("reward_funcs[{i}].{key}"),
        value,
        reason,
    };
    for (i, f) in funcs.iter().enumerate() {
        if f.name.trim().is_empty() {
            return Err(bad(
                i,
                "name",
                String::new(),
                "every reward function needs a name (its metrics are rewards/<name>/mean)".into(),
            ));
        }
        if funcs[..i].iter().any(|g| g.name == f.name) {
            return Err(bad(
                i,
                "name",
                f.name.clone(),
                "is used by an earlier reward function".into(),
            ));
        }
        if !f.weight.is_finite() {
            return Err(bad(
                i,
                "weight",
                f.weight.to_string(),
                "must be finite".into(),
            ));
        }
        if !(f.timeout_s.is_finite() && f.timeout_s > 0.0) {
            return Err(bad(
                i,
                "timeout_s",
                f.timeout_s.to_string(),
                POSITIVE.into(),
            ));
        }
        let need = |key: &str, present: bool| -> Result<()> {
            match present {
                true => Ok(()),
                false => Err(bad(
                    i,
                    key,
                    String::new(),
                    format!("is required by type = \"{}\"", type_name(f.kind)),
                )),
            }
        };
        match f.kind {
            RewardFuncType::Model => need("model", f.model.is_some())?,
            RewardFuncType::Regex => need("pattern", f.pattern.is_some())?,
            RewardFuncType::ExactMatch => need("column", f.column.is_some())?,
            RewardFuncType::Length => {
                need("target", f.target.is_some())?;
                if f.target == Some(0) {
                    return Err(bad(i, "target", "0".into(), AT_LEAST_1.into()));
                }
            }
            RewardFuncType::Command => need("command", !f.command.is_empty())?,
            RewardFuncType::Http => need("url", f.url.is_some())?,
        }
        if let Some(p) = &f.pattern {
            if let Err(e) = regex::Regex::new(p) {
                return Err(bad(
                    i,
                    "pattern",
                    p.clone(),
                    format!("is not a valid regular expression: {e}"),
                ));
            }
        }
    }
    Ok(())
}

/// The name a reward function type is written with.
pub fn type_name(t: RewardFuncType) -> &'static str {
    match t {
        RewardFuncType::Model => "model",
        RewardFuncType::Regex => "regex",
        RewardFuncType::ExactMatch => "exact_match",
        RewardFuncType::Length => "length",
        RewardFuncType::Command => "command",
        RewardFuncType::Http => "http",
    }
}

/// Checks every section; the first rule that fails is the error, naming its field.
pub fn validate(c: &Config) -> Result<()> {
    crate::device::parse_spec(&c.run.device).map_err(|e| Error::InvalidConfig {
        field: "run.device".into(),
        value: c.run.device.clone(),
        reason: e.to_string(),
    })?;
    let rules = [
        train_rules(&c.train),
        generate_rules(&c.generate),
        sft_rules(&c.sft),
        reward_rules(&c.reward),
        dpo_rules(&c.dpo),
        ppo_rules(&c.ppo, &c.train, c.run.threads),
        grpo_rules(&c.grpo, &c.train),
        rloo_rules(&c.rloo, &c.train),
        lora_rules(c.lora.as_ref()),
    ];
    check_reward_funcs(&c.reward_funcs)?;
    if c.ppo.reward_model.is_some() && !c.reward_funcs.is_empty() {
        return Err(Error::InvalidConfig {
            field: "ppo.reward_model".into(),
            value: c.ppo.reward_model.clone().unwrap_or_default(),
            reason: "is a shorthand for one [[reward_funcs]] table of type = \"model\"; set one or the other, not both".into(),
        });
    }
    match rules.into_iter().flatten().find(|r| !r.ok) {
        Some(r) => Err(Error::InvalidConfig {
            field: r.field,
            value: r.value,
            reason: r.reason,
        }),
        None => Ok(()),
    }
}
