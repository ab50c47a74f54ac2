//! The bodies of the `candle-rlhf` subcommands: each takes the resolved
//! config and the command's own options, does the work through the
//! library, and returns the text the command prints (main.rs only parses,
//! dispatches and prints).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::checkpoint::{self, Manifest};
use crate::config::{Config, RewardFuncConfig, RewardFuncType};
use crate::data::prompts::PromptReport;
use crate::generate::{generate as sample, Sampling};
use crate::hub::{self, HubSettings};
use crate::models::{load_dir_frozen, resolve_model, CausalLm};
use crate::rewards::RewardFuncs;
use crate::signal::StopSignal;
use crate::tokenizer::Tokenizer;
use crate::trainers::online::algo::{Algo, Settings};
use crate::trainers::online::{self, Trainer};
use crate::trainers::online::{EvalReport, Models};
use crate::{io, Error, Result};

/// Where `generate` finds its default model, made on first use.
pub const DEFAULT_FIXTURES: &str = "fixtures";

/// A config that points into a missing `fixtures/` gets told how to make
/// them: the fixture generator runs only when asked (`candle-rlhf fixtures`).
pub fn check_fixtures(paths: &[&str]) -> Result<()> {
    match paths
        .iter()
        .find(|p| p.starts_with("fixtures/") && !Path::new(p).exists())
    {
        Some(p) => Err(Error::Msg(format!(
            "{p} does not exist: the self-made fixtures are written by `candle-rlhf fixtures` (or `make fixtures`)"
        ))),
        None => Ok(()),
    }
}

/// A trainer subcommand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainCommand {
    Sft,
    Reward,
    Dpo,
    Online(Trainer),
}

impl TrainCommand {
    pub fn name(self) -> &'static str {
        match self {
            TrainCommand::Sft => "sft",
            TrainCommand::Reward => "reward",
            TrainCommand::Dpo => "dpo",
            TrainCommand::Online(t) => t.name(),
        }
    }
}

/// `sft`, `reward`, `dpo`, `ppo`, `grpo`, `rloo`: trains (or resumes) in `dir`
/// and reports the checkpoint, the figures and the run directory.
pub fn train(
    cfg: &Config,
    command: TrainCommand,
    dir: &Path,
    resume: bool,
    stop: &StopSignal,
) -> Result<String> {
    let mut paths = vec![cfg.model.name_or_path.as_str()];
    paths.push(match command {
        TrainCommand::Sft => &cfg.sft.dataset,
        TrainCommand::Reward => &cfg.reward.dataset,
        TrainCommand::Dpo => &cfg.dpo.dataset,
        TrainCommand::Online(Trainer::Ppo) => &cfg.ppo.dataset,
        TrainCommand::Online(Trainer::Grpo) => &cfg.grpo.dataset,
        TrainCommand::Online(Trainer::Rloo) => &cfg.rloo.dataset,
    });
    if let TrainCommand::Online(t) = command {
        paths.extend(
            cfg.ppo
                .reward_model
                .as_deref()
                .filter(|_| t == Trainer::Ppo),
        );
        paths.extend(cfg.reward_funcs.iter().filter_map(|f| f.model.as_deref()));
    }
    check_fixtures(&paths)?;
    let mut s = String::new();
    match command {
        TrainCommand::Sft => {
            let o = crate::trainers::sft::train(cfg, dir, resume, stop)?;
            let _ = write!(
                s,
                "model: {}\nsteps: {}, eval loss {:.4}, eval token accuracy {:.4}, {:.3} s/step\ndata: {}\nrun: {}",
                o.checkpoint.display(), o.steps, o.eval_loss, o.eval_mean_token_accuracy,
                o.seconds_per_step, o.data, o.run_dir.display()
            );
        }
        TrainCommand::Reward => {
            let o = crate::trainers::reward::train(cfg, dir, resume, stop)?;
            let _ = write!(
                s,
                "reward model: {}\nsteps: {}, eval accuracy {:.4}, eval loss {:.4}, {:.3} s/step\ndata: {}\nrun: {}",
                o.checkpoint.display(), o.steps, o.eval_accuracy, o.eval_loss,
                o.seconds_per_step, o.data, o.run_dir.display()
            );
        }
        TrainCommand::Dpo => {
            let o = crate::trainers::dpo::train(cfg, dir, resume, stop)?;
            let _ = write!(
                s,
                "model: {}\nsteps: {}, eval loss {:.4}, eval rewards/accuracies {:.4}, eval rewards/margins {:.4}, {:.3} s/step\ndata: {}\nrun: {}",
                o.checkpoint.display(), o.steps, o.eval("eval_loss"), o.eval("eval_rewards/accuracies"),
                o.eval("eval_rewards/margins"), o.seconds_per_step, o.data, o.run_dir.display()
            );
        }
        TrainCommand::Online(t) => {
            let o = online::train(cfg, t, dir, resume, stop)?;
            let _ = writeln!(
                s,
                "policy: {}\niterations: {} ({} optimizer steps), {:.3} s/iteration ({} in all)\nprompts: {}",
                o.checkpoint.display(), o.iterations, o.optimizer_steps,
                o.seconds_per_iteration, o.total_times(), o.prompts
            );
            for (label, e) in [
                ("eval before:", &o.eval_before),
                ("eval after: ", &o.eval_after),
            ] {
                if let Some(e) = e {
                    let _ = writeln!(s, "{label} {e}");
                }
            }
            let _ = write!(s, "run: {}", o.run_dir.display());
        }
    }
    Ok(s)
}

/// `generate`'s own options (sampling settings are in `cfg.generate`).
pub struct GenerateOptions {
    pub prompts: Vec<String>,
    /// A file with one prompt per line.
    pub prompts_file: Option<PathBuf>,
    /// One JSON object per prompt: prompt, completion, completion_ids.
    pub json: bool,
}

/// `generate`: samples a completion of each prompt from `cfg.model` (unset:
/// the tiny fixture GPT-2, made on first use).
pub fn generate(cfg: &Config, o: &GenerateOptions) -> Result<String> {
    let (device, said) = crate::device::resolve_device(&cfg.run.device)?;
    tracing::info!("device: {said}");
    let model_dir = if cfg.model.name_or_path.is_empty() {
        let dir = PathBuf::from(DEFAULT_FIXTURES).join(crate::app::fixtures::TINY_GPT2);
        if !dir.join("model.safetensors").is_file() {
            tracing::info!("making the tiny fixture model in {}", dir.display());
            crate::app::fixtures::write_tiny_gpt2(&dir, 0)?;
        }
        dir
    } else {
        resolve_model(&cfg.model.resolved_name()?, &HubSettings::from_env())?
    };
    let tokenizer = Tokenizer::from_dir(&model_dir)?;
    // Sample from plain (untracked) weights: no step records an autograd graph.
    let (arch, vb, _) = load_dir_frozen(&model_dir, cfg.run.dtype.dtype(), &device)?;
    let model = CausalLm::load(vb, &arch, true)?;
    tracing::info!("{} model from {}", arch.model_type(), model_dir.display());
    let mut prompts = o.prompts.clone();
    if let Some(file) = &o.prompts_file {
        let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
        let lines = text.lines().filter(|l| !l.trim().is_empty());
        prompts.extend(lines.map(str::to_string));
    }
    if prompts.is_empty() {
        return Err(Error::Msg(
            "no prompt: pass --prompt TEXT (repeatable) or --prompts FILE".into(),
        ));
    }
    let ids = prompts
        .iter()
        .map(|p| tokenizer.encode(p))
        .collect::<Result<Vec<_>>>()?;
    let sampling = Sampling::from_config(&cfg.generate, tokenizer.stop_ids.clone());
    let mut rngs: Vec<crate::HostRng> = (0..ids.len())
        .map(|row| crate::HostRng::keyed(cfg.run.seed, "sample", &[row as u64]))
        .collect();
    let outputs = sample(
        &model,
        &ids,
        tokenizer.pad_id,
        &sampling,
        &mut rngs,
        &device,
    )?;
    let mut s = String::new();
    for (prompt, out) in prompts.iter().zip(outputs) {
        let completion = tokenizer.decode(&out)?;
        let _ = match o.json {
            true => writeln!(
                s,
                "{}",
                json!({"prompt": prompt, "completion": completion, "completion_ids": out})
            ),
            false => writeln!(s, "{prompt}{completion}"),
        };
    }
    Ok(s)
}

/// `eval`'s own options.
pub struct EvalOptions {
    pub policy: String,
    /// A reward model: shorthand for one `type = "model"` reward function.
    pub reward: Option<String>,
    pub reference: Option<String>,
    pub algo: Option<Trainer>,
    pub prompts: String,
    pub split: String,
}

/// `eval`: the online trainers' evaluation of a policy; writes
/// completions.jsonl and eval.json to `run.out` (unset: runs/eval-<time>).
pub fn eval(cfg: &Config, o: &EvalOptions) -> Result<String> {
    let mut cfg = cfg.clone();
    let (device, _) = crate::device::resolve_device(&cfg.run.device)?;
    let policy_dir = resolve_model(&o.policy, &HubSettings::from_env())?;
    if let Some(rm) = &o.reward {
        cfg.reward_funcs = vec![RewardFuncConfig {
            name: "reward_model".into(),
            kind: RewardFuncType::Model,
            model: Some(rm.clone()),
            ..Default::default()
        }];
    }
    if cfg.reward_funcs.is_empty() {
        return Err(Error::Msg(
            "nothing to score with: pass --reward DIR or a config with [[reward_funcs]]".into(),
        ));
    }
    let (rewards, _) = crate::rewards::from_config(&cfg.reward_funcs, &policy_dir, &device)?;
    let algo = o.algo.map(|t| t.algo(&cfg));
    let reference = o.reference.as_deref();
    let (report, prompts) = evaluate_policy(
        &cfg, algo, &o.policy, reference, &rewards, &o.prompts, &o.split,
    )?;
    let dir = (cfg.run.out.clone()).unwrap_or_else(|| crate::run::default_run_dir("eval"));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let completions = dir.join("completions.jsonl");
    let text: String = report
        .completions
        .iter()
        .map(|c| format!("{c}\n"))
        .collect();
    crate::io::atomic_write(&completions, text.as_bytes())?;
    let figures: serde_json::Map<String, serde_json::Value> = (report.figures.iter())
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let summary = dir.join("eval.json");
    crate::io::write_json(&summary, &figures)?;
    Ok(format!(
        "{report}\nprompts: {prompts}\ncompletions: {}\nsummary: {}",
        completions.display(),
        summary.display()
    ))
}

/// The algorithm and reference a candle-rlhf online checkpoint was trained
/// with: its manifest's command, and that section's `ref_model`, else its
/// initial policy. None for any other directory.
pub fn trained_with(policy_dir: &Path) -> Option<(Algo, Option<String>)> {
    let path = policy_dir.join(checkpoint::MANIFEST_FILE);
    let manifest: Manifest = io::read_json(&path).ok()?;
    let algo = Algo::of(&manifest.config, &manifest.command).ok()?;
    let c = &manifest.config;
    let reference = Settings::ref_model_of(c, algo)
        .map(str::to_string)
        .or_else(|| c.model.resolved_name().ok());
    Some((algo, reference))
}

/// `candle-rlhf eval`: evaluates `policy` on held-out prompts as the
/// trainers do. The algorithm's section of `cfg` gives the sampling,
/// prompt length and group (`algo`; unset: the one the checkpoint was
/// trained with, else PPO); the KL is to `reference` (unset: the one the
/// checkpoint was trained against; else the policy itself, 0).
pub fn evaluate_policy(
    cfg: &Config,
    algo: Option<Algo>,
    policy: &str,
    reference: Option<&str>,
    rewards: &RewardFuncs,
    prompts: &str,
    split: &str,
) -> Result<(EvalReport, PromptReport)> {
    let (device, _) = crate::device::resolve_device(&cfg.run.device)?;
    let dtype = cfg.run.dtype.dtype();
    let hub = HubSettings::from_env();
    // The checkpoint itself (its manifest names the algorithm and the
    // reference), then the model it stands for (a LoRA checkpoint: its base
    // with the adapter merged).
    let checkpoint_dir = crate::hub::resolve_model(policy, &hub)?;
    let trained = trained_with(&checkpoint_dir);
    let algo = match (algo, &trained) {
        (Some(a), _) => a,
        (None, Some((a, _))) => *a,
        (None, None) => Algo::of(cfg, "ppo")?,
    };
    let policy_dir = resolve_model(policy, &hub)?;
    let tok = Tokenizer::from_dir(&policy_dir)?;
    let s = Settings::of(cfg, algo, &tok);
    let (arch, vb, _) = load_dir_frozen(&policy_dir, dtype, &device)?;
    let sampler = CausalLm::load(vb, &arch, true)?;
    let ref_dir = match reference
        .map(str::to_string)
        .or_else(|| trained.and_then(|(_, r)| r))
    {
        Some(r) => resolve_model(&r, &hub)?,
        None => {
            tracing::warn!("no reference given and {} is not a candle-rlhf online checkpoint: KL is measured to the policy itself (0)", policy_dir.display());
            policy_dir.clone()
        }
    };
    let ref_dtype = s.ref_dtype.unwrap_or(dtype);
    let (ref_arch, ref_vb, _) = load_dir_frozen(&ref_dir, ref_dtype, &device)?;
    let reference = CausalLm::load(ref_vb, &ref_arch, true)?;
    let template =
        crate::chat::TemplateSource::new(&policy_dir, cfg.model.chat_template.as_deref());
    let (rows, report) = s.load_prompts(&tok, &template, prompts, split)?;
    let m = Models {
        sampler: &sampler,
        reference: Some(&reference),
        critic: None,
        tok: &tok,
        rewards,
        device: &device,
    };
    let e = online::eval::evaluate(&m, &s, &rows, cfg.run.seed)?;
    Ok((e, report))
}

/// `score`'s own options.
pub struct ScoreOptions {
    pub model: String,
    pub data: Option<String>,
    pub split: String,
    pub text: Vec<String>,
    pub scores_out: Option<PathBuf>,
}

/// `score`: a reward model's scores of texts, or its accuracy on pairs.
pub fn score(cfg: &Config, o: &ScoreOptions) -> Result<String> {
    use crate::models::reward_model::RewardScorer;
    let (device, _) = crate::device::resolve_device(&cfg.run.device)?;
    let scorer = RewardScorer::load(&o.model, &device)?;
    if o.data.is_none() && o.text.is_empty() {
        return Err(Error::Msg(
            "nothing to score: pass --text TEXT (repeatable) or --data FILE".into(),
        ));
    }
    let mut s = String::new();
    let texts: Vec<&str> = o.text.iter().map(String::as_str).collect();
    if !texts.is_empty() {
        for (text, v) in texts.iter().zip(scorer.score(&texts)?) {
            let _ = writeln!(s, "{v:.6}\t{text}");
        }
    }
    if let Some(data) = &o.data {
        let out = o.scores_out.clone().unwrap_or_else(|| {
            let path = PathBuf::from(data);
            match path.is_file() {
                true => path.with_extension("scores.jsonl"),
                false => PathBuf::from("scores.jsonl"),
            }
        });
        let hub = HubSettings::from_env();
        let rows = crate::data::load_preferences(data, &o.split, &hub)?;
        // Conversational pairs are rendered with the reward model's template.
        let model_dir = resolve_model(&o.model, &hub)?;
        let template =
            crate::chat::TemplateSource::new(&model_dir, cfg.model.chat_template.as_deref());
        let batch = cfg.train.per_device_eval_batch_size;
        let report = crate::trainers::reward::score_pairs(&scorer, &template, &rows, &out, batch)?;
        let _ = writeln!(s, "{report}per-pair scores: {}", out.display());
    }
    Ok(s)
}

/// `render`'s own options.
pub struct RenderOptions {
    pub model: String,
    pub data: String,
    pub split: String,
    /// Also the token ids (and the loss mask of SFT rows).
    pub ids: bool,
}

/// `render`: the rows of a data file as the model sees them, one JSON
/// line each; and how many rows there were.
pub fn render(cfg: &Config, o: &RenderOptions) -> Result<(String, usize)> {
    let hub = HubSettings::from_env();
    let dir = resolve_model(&o.model, &hub)?;
    let tok = Tokenizer::from_dir(&dir)?;
    let template = crate::chat::TemplateSource::new(&dir, cfg.model.chat_template.as_deref());
    let records = crate::data::load_records(&o.data, &o.split, &hub)?;
    let mut lines = String::new();
    for (value, source) in &records {
        let row = crate::data::render::render_row(value, source, &template, &tok, o.ids, &cfg.sft)?;
        let _ = writeln!(lines, "{row}");
    }
    Ok((lines, records.len()))
}

/// `merge`: a LoRA adapter (a checkpoint, a run directory or peft's
/// output) merged into its base (unset: the adapter's
/// base_model_name_or_path), written to `out` as a model directory.
pub fn merge(base: Option<String>, adapter: &Path, out: &Path) -> Result<()> {
    use crate::models::lora;
    let hub = HubSettings::from_env();
    // A run directory stands for its newest checkpoint.
    let adapter = hub::resolve_model(&adapter.to_string_lossy(), &hub)?;
    if !lora::is_adapter_dir(&adapter) {
        return Err(Error::Msg(format!(
            "{}: not a LoRA adapter (no {} or it holds a full model's config.json)",
            adapter.display(),
            lora::ADAPTER_CONFIG_FILE
        )));
    }
    let base = match base {
        Some(b) => b,
        None => lora::adapter_base(&adapter)?,
    };
    let base_dir = resolve_model(&base, &hub)?;
    lora::write_merged(&adapter, &base_dir, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn a_missing_fixture_path_says_how_to_make_it() {
        let err = check_fixtures(&["fixtures/no/such/model"]).unwrap_err();
        assert!(err.to_string().contains("candle-rlhf fixtures"), "{err}");
        assert!(check_fixtures(&["/elsewhere/no/such", ""]).is_ok());
    }

    #[test]
    fn train_commands_name_their_subcommand() {
        let names: Vec<_> = [TrainCommand::Sft, TrainCommand::Reward]
            .into_iter()
            .chain(
                Trainer::value_variants()
                    .iter()
                    .map(|&t| TrainCommand::Online(t)),
            )
            .map(TrainCommand::name)
            .collect();
        assert_eq!(names, ["sft", "reward", "ppo", "grpo", "rloo"]);
    }
}
