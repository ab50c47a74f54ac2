//! The one evaluator of the online engine, for every algorithm and for the
//! `eval` subcommand: each held-out prompt answered `eval_group` times
//! (TRL's `num_generations_eval`; PPO's `n_samples_per_prompt`), scored by
//! every reward function, with TRL GRPOTrainer's names under `eval/`; and
//! how a run records it (metrics.jsonl, eval-<step>.jsonl).

use candle_core::DType;
use serde_json::{json, Value};

use super::algo::Settings;
use super::rollout::{self, Needs, Rollout, Scored};
use super::stats::{mean, std};
use super::Models;
use crate::config::KlEstimator;
use crate::data::prompts::PromptRow;
use crate::run::RunDir;
use crate::{io, Error, HostRng, Result};

/// One evaluation: its figures (TRL's names under `eval/`) and completions.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// Held-out prompts, each answered `group` times.
    pub prompts: usize,
    pub group: usize,
    /// `eval/reward`, `eval/reward_std`, `eval/rewards/<name>/mean`,
    /// `eval/completions/mean_length`, `eval/completions/clipped_ratio`,
    /// and `eval/kl` when there is a reference.
    pub figures: Vec<(String, f64)>,
    /// {prompt, completion, reward} per completion.
    pub completions: Vec<Value>,
}

impl EvalReport {
    /// The value of `eval/<name>`.
    pub fn get(&self, name: &str) -> Option<f64> {
        let key = format!("eval/{name}");
        self.figures
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }

    /// The mean reward (`eval/reward`).
    pub fn reward(&self) -> f64 {
        self.get("reward").unwrap_or(f64::NAN)
    }

    /// The mean over completions of the summed per-token k1 KL to the
    /// reference (`eval/kl`); NaN without a reference.
    pub fn kl(&self) -> f64 {
        self.get("kl").unwrap_or(f64::NAN)
    }

    /// The mean completion length in tokens.
    pub fn mean_length(&self) -> f64 {
        self.get("completions/mean_length").unwrap_or(f64::NAN)
    }

    /// The share of completions that ended with a stop token.
    pub fn eos_rate(&self) -> f64 {
        1.0 - self.get("completions/clipped_ratio").unwrap_or(f64::NAN)
    }
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} prompts x {}: mean reward {:.4}, KL to reference {:.4}, mean length {:.1}, EOS rate {:.3}",
            self.prompts,
            self.group,
            self.reward(),
            self.kl(),
            self.mean_length(),
            self.eos_rate()
        )
    }
}

/// Samples `s.eval_group` completions of each prompt (seeded: the same
/// draws every call, apart from the training's streams), scores them with
/// every reward function and measures the KL to the reference when there
/// is one. With several ranks each answers its part of the prompts and
/// the figures are those of one rank answering all.
pub(crate) fn evaluate(
    m: &Models,
    s: &Settings,
    prompts: &[PromptRow],
    seed: u64,
) -> Result<EvalReport> {
    let rows: Vec<&PromptRow> = prompts
        .iter()
        .flat_map(|r| std::iter::repeat_n(r, s.eval_group))
        .collect();
    let (chunk, fixed) = (s.eval_sample_chunk, s.fixed_width);
    let stream = |row: usize| HostRng::keyed(seed, "eval", &[row as u64]);
    // Each rank answers its part of the prompts; the figures below are
    // taken over every rank's completions, gathered.
    let part = crate::dist::world().split(prompts.len());
    let mine = part.start * s.eval_group..part.end * s.eval_group;
    let ro = Rollout::sample(m, rows, mine, &s.sampling, chunk, fixed, stream)?;
    let stop = &s.sampling.stop_token_ids;
    let Scored { total, each, texts } = rollout::score(m, &ro, stop, None)?;
    let total64: Vec<f64> = total.iter().map(|&x| x as f64).collect();
    let lengths = ro.lengths();
    let clipped = ro.stopped(stop).iter().filter(|&&c| !c).count();
    // reward_std: the mean of the groups' stds, as TRL's GRPOTrainer logs
    // it; the batch's with one completion per prompt.
    let reward_std = match s.eval_group {
        1 => std(&total64),
        g => mean(&total64.chunks(g).map(std).collect::<Vec<_>>()),
    };
    let mut figures: Vec<(String, f64)> = vec![
        ("eval/reward".into(), mean(&total64)),
        ("eval/reward_std".into(), reward_std),
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
    if m.reference.is_some() {
        let needs = Needs {
            old: true,
            reference: true,
            values: false,
        };
        let f = rollout::forward(m, &ro, needs, s.o.temperature, s.forward_chunk)?;
        let (Some(lp), Some(rlp)) = (f.old, f.reference) else {
            return Err(Error::Msg("evaluation: no log-probs".into()));
        };
        let kl = (crate::rl::kl_per_token(&lp, &rlp, KlEstimator::K1)? * ro.mask(m.device)?)?;
        let kl = kl.sum(1)?.to_dtype(DType::F64)?.mean_all()?;
        figures.push(("eval/kl".into(), kl.to_scalar::<f64>()?));
    }
    Ok(EvalReport {
        prompts: prompts.len(),
        group: s.eval_group,
        figures,
        completions: texts
            .into_iter()
            .zip(&total)
            .map(|((prompt, completion), r)| json!({"prompt": prompt, "completion": completion, "reward": r}))
            .collect(),
    })
}

/// Logs an evaluation's figures at `step` and writes its completions to
/// RUN_DIR/eval-<step>.jsonl.
pub(crate) fn log_eval(run: &mut RunDir, step: u64, e: &EvalReport) -> Result<()> {
    run.metrics.log(step, &e.figures)?;
    if !crate::dist::world().is_main() {
        return Ok(());
    }
    let text: String = e.completions.iter().map(|c| format!("{c}\n")).collect();
    io::atomic_write(
        &run.path.join(format!("eval-{step}.jsonl")),
        text.as_bytes(),
    )
}

/// Evaluates after `step` of `total` when due (every `eval_steps`, and at
/// the end). Called after the step's checkpoint, so a failing evaluation
/// (a scorer that fails) loses no training; its error names the step.
pub(crate) fn evaluate_if_due<E>(
    eval_steps: Option<u64>,
    step: u64,
    total: u64,
    unit: &str,
    evaluate: impl FnOnce() -> Result<Option<E>>,
) -> Result<Option<E>> {
    if !(eval_steps.is_some_and(|n| step.is_multiple_of(n)) || step == total) {
        return Ok(None);
    }
    evaluate().map_err(|e| {
        Error::Msg(format!(
            "evaluating after {unit} {step}: {e} (the checkpoint of this {unit}, when due, is written)"
        ))
    })
}
