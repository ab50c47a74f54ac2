//! Evaluation reports of the online trainers and how a run records them:
//! the figures in metrics.jsonl, the completions in eval-<step>.jsonl.

use serde_json::Value;

use crate::run::RunDir;
use crate::{io, Result};

/// What `eval` and the periodic evaluation report.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    pub prompts: usize,
    pub mean_score: f64,
    /// Mean over prompts of the summed per-token k1 KL to the reference.
    pub kl: f64,
    pub mean_length: f64,
    pub eos_rate: f64,
    /// {prompt, response, score} per prompt.
    pub completions: Vec<Value>,
}

impl EvalReport {
    pub fn figures(&self) -> Vec<(String, f64)> {
        vec![
            ("eval/scores".into(), self.mean_score),
            ("eval/kl".into(), self.kl),
            ("eval/mean_response_length".into(), self.mean_length),
            ("eval/eos_rate".into(), self.eos_rate),
        ]
    }
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} prompts: mean reward {:.4}, KL to reference {:.4}, mean length {:.1}, EOS rate {:.3}",
            self.prompts, self.mean_score, self.kl, self.mean_length, self.eos_rate
        )
    }
}

/// One evaluation: TRL's metric names under `eval/`, and the completions.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalFigures {
    pub figures: Vec<(String, f64)>,
    /// {prompt, completion, reward} per prompt.
    pub completions: Vec<Value>,
}

impl EvalFigures {
    /// The value of `eval/<name>`.
    pub fn get(&self, name: &str) -> Option<f64> {
        let key = format!("eval/{name}");
        self.figures
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }
}

/// Logs an evaluation's figures at `step` and writes its completions to
/// RUN_DIR/eval-<step>.jsonl.
pub(crate) fn log_eval(
    run: &mut RunDir,
    step: u64,
    figures: &[(String, f64)],
    completions: &[Value],
) -> Result<()> {
    run.metrics.log(step, figures)?;
    let text: String = completions.iter().map(|c| format!("{c}\n")).collect();
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
        crate::Error::Msg(format!(
            "evaluating after {unit} {step}: {e} (the checkpoint of this {unit}, when due, is written)"
        ))
    })
}
