//! `candle-rlhf demo`: the whole RLHF pipeline (SFT, reward model, PPO) offline,
//! on the embedded task of [`crate::app::task`], in minutes on a CPU:
//!
//! 0. data from the task's generator and a tiny random GPT-2 with a
//!    tokenizer trained on the language;
//! 1. SFT on prompt/completion rows (the base policy);
//! 2. a reward model from the SFT model on preference pairs labelled by the
//!    hidden gold reward with flipped labels;
//! 3. PPO, GRPO and/or RLOO (`--algo`) from the SFT policy against the
//!    learned reward model, the SFT policy as the frozen reference, each on
//!    the same number of completions; and/or DPO from the SFT policy on the
//!    reward model's own preference pairs (no reward model);
//! 4. evaluation of every policy on held-out prompts with the gold reward,
//!    the reward model, KL to the reference, length and EOS rate;
//!    optionally a sweep over PPO's kl_coef (reward hacking without the KL
//!    term).
//!
//! Everything lands in the output directory with a Markdown report.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::app::task::{self, Task};
use crate::config::{Config, RewardFuncConfig, RewardFuncType};
use crate::rewards::{RewardFuncs, RewardModelReward};
use crate::signal::StopSignal;
use crate::trainers::online::{self, Algo, OnlineRun, Trainer};
use crate::trainers::{dpo, reward, sft};
use crate::{Error, IoContext, Result};
use clap::ValueEnum;

/// How big a demo to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub out: PathBuf,
    /// A smaller run (about a minute on two cores) for CI and a first look.
    pub fast: bool,
    /// Rerun PPO with kl_coef 0 and a large one.
    pub kl_sweep: bool,
    pub seed: u64,
    /// PPO's kl_coef (default [`KL_COEF`]).
    pub kl_coef: Option<f64>,
    /// The algorithms to train and compare, in order.
    pub algos: Vec<DemoAlgo>,
}

/// One way to use the demo's preferences: an online trainer against the
/// reward model learned from them, or DPO on them directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoAlgo {
    Online(Trainer),
    Dpo,
}

impl DemoAlgo {
    pub fn name(self) -> &'static str {
        match self {
            DemoAlgo::Online(t) => t.name(),
            DemoAlgo::Dpo => "dpo",
        }
    }
}

/// `--task`: the demo's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoTask {
    /// The RLHF pipeline with a reward model on synthetic movie reviews.
    Reviews,
    /// GRPO with a verifiable exact-match reward on sums (app/arith.rs).
    Arithmetic,
}

/// `--algo`: one algorithm, or all of them side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlgoChoice {
    One(DemoAlgo),
    All,
}

impl AlgoChoice {
    /// The algorithms to run, in order: the online trainers, then DPO.
    pub fn algos(self) -> Vec<DemoAlgo> {
        match self {
            AlgoChoice::One(a) => vec![a],
            AlgoChoice::All => Trainer::value_variants()
                .iter()
                .map(|&t| DemoAlgo::Online(t))
                .chain([DemoAlgo::Dpo])
                .collect(),
        }
    }
}

impl clap::ValueEnum for AlgoChoice {
    fn value_variants<'a>() -> &'a [Self] {
        // The library's online trainers, dpo, then `all`: an online
        // algorithm is added in one place.
        static VARIANTS: std::sync::OnceLock<Vec<AlgoChoice>> = std::sync::OnceLock::new();
        VARIANTS.get_or_init(|| {
            let mut v: Vec<_> = AlgoChoice::All
                .algos()
                .into_iter()
                .map(AlgoChoice::One)
                .collect();
            v.push(AlgoChoice::All);
            v
        })
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        match self {
            AlgoChoice::One(DemoAlgo::Online(t)) => t.to_possible_value(),
            AlgoChoice::One(DemoAlgo::Dpo) => Some(clap::builder::PossibleValue::new("dpo")),
            AlgoChoice::All => Some(clap::builder::PossibleValue::new("all")),
        }
    }
}

fn display_name(a: DemoAlgo) -> String {
    a.name().to_uppercase()
}

/// The sizes of one demo.
struct Plan {
    sft_rows: usize,
    sft_steps: u64,
    pairs: usize,
    reward_steps: u64,
    ppo_episodes: u64,
    dpo_steps: u64,
    eval_prompts: usize,
}

impl Plan {
    fn of(fast: bool) -> Self {
        if fast {
            Plan {
                sft_rows: 2000,
                sft_steps: 400,
                pairs: 1000,
                reward_steps: 60,
                ppo_episodes: 768,
                dpo_steps: 300,
                eval_prompts: 128,
            }
        } else {
            Plan {
                sft_rows: 4000,
                sft_steps: 800,
                pairs: 2000,
                reward_steps: 150,
                ppo_episodes: 3072,
                dpo_steps: 300,
                eval_prompts: 512,
            }
        }
    }
}

/// Rate of flipped preference labels: annotators agree about 73% of the time.
pub const FLIP_RATE: f64 = 0.27;
/// The default kl_coef of the demo's PPO, and the sweep's large one. TRL's
/// default 0.05 lets this small policy drift into what the reward model
/// over-rates (shorter answers: gold 0.44 against 0.98 at 0.2 in `--fast`);
/// kl_coef 0 shows outright reward hacking.
pub const KL_COEF: f64 = 0.2;
pub const LARGE_KL_COEF: f64 = 2.0;
/// GRPO's beta in the demo: the weight of the k3 KL to the SFT policy in
/// the loss. At 0.04 (TRL's former default) the policy learns to run on
/// past the period, which the reward model over-rates (`--fast`: gold
/// -1.07, KL 27.9); at 0.2 seed 1 of the full demo drifts the same way
/// (gold -0.54, KL 18.2); 0.5 beats SFT by 12-15 standard errors on seeds
/// 0-2 at KL 0.8-3.4.
pub const GRPO_BETA: f64 = 0.5;

/// DPO's beta in the demo (DPOConfig's default: 0.1), with learning rate
/// 3e-4 over 300 steps of 32 pairs. At beta 0.1 and 1e-3 (60 steps) the
/// `--fast` policy learns to drop its adjectives (gold +0.29 over SFT, 2.4
/// standard errors, KL 5.1); at 0.5 and 1e-3 seed 2 of the full demo runs
/// on without a period (gold +0.10, EOS rate 0.75, KL 4.4); 0.5 at 3e-4
/// beats SFT by 11-17 paired standard errors on seeds 0-2 at KL 0.5-0.9.
pub const DPO_BETA: f64 = 0.5;

/// One policy evaluated on the held-out prompts.
#[derive(Debug, Clone)]
pub struct PolicyEval {
    pub name: String,
    pub gold: f64,
    /// Standard error of the mean gold reward.
    pub gold_se: f64,
    pub reward_model: f64,
    pub kl: f64,
    pub mean_length: f64,
    pub eos_rate: f64,
    /// (prompt, response, gold) for the first prompts.
    pub samples: Vec<(String, String, f64)>,
    /// Wall time of its training (0 for the SFT policy, trained before).
    pub train_s: f64,
}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub out: PathBuf,
    pub seed: u64,
    pub reward_eval_accuracy: f64,
    /// Reward-model agreement with the gold reward on held-out pairs (no flips).
    pub gold_agreement: f64,
    pub sft: PolicyEval,
    /// One per algorithm of `--algo`, in order (named PPO, GRPO, RLOO).
    pub trained: Vec<PolicyEval>,
    /// (kl_coef, evaluation) of the sweep's extra runs.
    pub sweep: Vec<(f64, PolicyEval)>,
    /// (stage, seconds)
    pub timings: Vec<(String, f64)>,
    pub report: PathBuf,
}

impl DemoReport {
    /// A policy's gold reward over the SFT policy's, in standard errors of
    /// the mean difference paired by prompt (every policy is sampled once on
    /// the same held-out prompts, in order).
    pub fn margin_in_se(&self, p: &PolicyEval) -> f64 {
        let d: Vec<f64> = p
            .samples
            .iter()
            .zip(&self.sft.samples)
            .map(|(a, b)| a.2 - b.2)
            .collect();
        let n = d.len() as f64;
        let mean = d.iter().sum::<f64>() / n;
        let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        mean / (var / n).sqrt().max(1e-12)
    }

    /// The evaluation of the policy named `name` (PPO, GRPO, RLOO).
    pub fn policy(&self, name: &str) -> Option<&PolicyEval> {
        self.trained.iter().find(|p| p.name == name)
    }
}

fn write_rows(path: &Path, rows: &[serde_json::Value]) -> Result<String> {
    crate::app::fixtures::write_jsonl(path, rows)?;
    Ok(path.to_string_lossy().into_owned())
}

/// The common part of every stage's config.
pub(crate) fn base_config(seed: u64, model: &Path, out: &Path) -> Config {
    let mut c = Config::default();
    c.run.seed = seed;
    c.run.device = "cpu".into();
    c.run.out = Some(out.to_path_buf());
    c.model.name_or_path = model.to_string_lossy().into_owned();
    c.train.logging_steps = 5;
    c.train.save_total_limit = Some(1);
    c.train.warmup_ratio = 0.0;
    // The demo's models are small: recomputing activations only costs time.
    c.train.activation_checkpointing = false;
    c
}

/// Runs the demo.
pub fn run(opts: &DemoOptions) -> Result<DemoReport> {
    let plan = Plan::of(opts.fast);
    let out = &opts.out;
    if out.join("report.md").exists() {
        return Err(Error::Msg(format!(
            "{} already holds a demo (report.md); choose another --out or delete it",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).with_path(out)?;
    let stop = StopSignal::new();
    let mut timings = Vec::new();
    let mut clock = Instant::now();
    let mut lap = |name: &str, timings: &mut Vec<(String, f64)>| {
        timings.push((name.to_string(), clock.elapsed().as_secs_f64()));
        clock = Instant::now();
    };

    // 0. Data and the base model.
    let data = out.join("data");
    let seed = opts.seed;
    let sft_data = write_rows(
        &data.join("sft.jsonl"),
        &Task::new(seed, "sft").sft_rows(plan.sft_rows),
    )?;
    let pairs = write_rows(
        &data.join("preferences.jsonl"),
        &Task::new(seed, "preferences").preference_rows(plan.pairs, FLIP_RATE),
    )?;
    let pairs_eval = write_rows(
        &data.join("preferences-eval.jsonl"),
        &Task::new(seed, "preferences-eval").preference_rows(200, FLIP_RATE),
    )?;
    let pairs_gold = write_rows(
        &data.join("preferences-gold.jsonl"),
        &Task::new(seed, "preferences-eval").preference_rows(200, 0.0),
    )?;
    let prompts = write_rows(
        &data.join("prompts.jsonl"),
        &Task::new(seed, "prompts").prompt_rows(512),
    )?;
    let eval_prompts = write_rows(
        &data.join("eval-prompts.jsonl"),
        &Task::new(seed, "eval-prompts").prompt_rows(plan.eval_prompts),
    )?;
    let base = out.join("base");
    crate::app::fixtures::write_tiny_gpt2(&base, seed)?;
    lap("data and base model", &mut timings);

    // 1. SFT.
    let mut c = base_config(opts.seed, &base, &out.join("sft"));
    c.sft.dataset = sft_data;
    c.sft.max_length = 32;
    c.sft.eval_ratio = 0.05;
    c.train.learning_rate = 3e-3;
    c.train.per_device_train_batch_size = 32;
    c.train.max_steps = Some(plan.sft_steps);
    c.train.save_steps = plan.sft_steps;
    c.validate()?;
    let sft_run = sft::train(&c, &out.join("sft"), false, &stop)?;
    tracing::info!(
        "SFT: eval loss {:.3}, token accuracy {:.3}",
        sft_run.eval_loss,
        sft_run.eval_mean_token_accuracy
    );
    lap("SFT", &mut timings);

    // 2. The reward model, from the SFT model.
    let mut c = base_config(opts.seed, &sft_run.checkpoint, &out.join("reward"));
    c.reward.dataset = pairs.clone();
    c.reward.eval_dataset = Some(pairs_eval);
    c.reward.max_length = 32;
    c.train.learning_rate = 1e-3;
    c.train.per_device_train_batch_size = 32;
    c.train.max_steps = Some(plan.reward_steps);
    c.train.save_steps = plan.reward_steps;
    c.validate()?;
    let rm_run = reward::train(&c, &out.join("reward"), false, &stop)?;
    let scorer = crate::models::reward_model::RewardScorer::load(
        &rm_run.checkpoint.to_string_lossy(),
        &candle_core::Device::Cpu,
    )?;
    let gold_pairs = crate::data::read_preferences(Path::new(&pairs_gold))?;
    let agreement = reward::score_pairs(
        &scorer,
        &crate::chat::TemplateSource::new(&rm_run.checkpoint, None),
        &gold_pairs,
        &out.join("reward/gold-pairs.scores.jsonl"),
        64,
    )?;
    lap("reward model", &mut timings);

    // 3. PPO from the SFT policy against the reward model.
    let ppo_config = |kl_coef: f64, dir: &Path| -> Result<Config> {
        let mut c = base_config(opts.seed, &sft_run.checkpoint, dir);
        c.ppo.dataset = prompts.clone();
        c.ppo.reward_model = Some(rm_run.checkpoint.to_string_lossy().into_owned());
        c.ppo.kl_coef = kl_coef;
        c.ppo.response_length = 16;
        c.ppo.max_prompt_length = 16;
        c.ppo.temperature = 1.0;
        c.ppo.num_mini_batches = 2;
        c.ppo.local_rollout_forward_batch_size = 64;
        c.ppo.total_episodes = Some(plan.ppo_episodes);
        c.ppo.num_sample_generations = 8;
        c.train.learning_rate = 1e-3;
        c.train.per_device_train_batch_size = 16;
        c.train.save_steps = plan.ppo_episodes;
        c.validate()?;
        Ok(c)
    };
    let train_ppo = |kl_coef: f64, name: &str| -> Result<OnlineRun> {
        let dir = out.join(name);
        online::train(
            &ppo_config(kl_coef, &dir)?,
            Trainer::Ppo,
            &dir,
            false,
            &stop,
        )
    };
    // GRPO and RLOO on PPO's budget: the same completions in all
    // (ppo_episodes), in batches of 32 (8 prompts x 4), each batch serving
    // 8 optimizer steps as PPO's 4 epochs x 2 mini-batches do; the same
    // learning rate, sampling and reward model.
    let kl_coef = opts.kl_coef.unwrap_or(KL_COEF);
    let critic_free_config = |algo: Trainer, dir: &Path| -> Result<Config> {
        let mut c = base_config(opts.seed, &sft_run.checkpoint, dir);
        c.reward_funcs = vec![RewardFuncConfig {
            name: "reward_model".into(),
            kind: RewardFuncType::Model,
            model: Some(rm_run.checkpoint.to_string_lossy().into_owned()),
            ..Default::default()
        }];
        c.train.learning_rate = 1e-3;
        c.train.per_device_train_batch_size = 16;
        c.train.max_steps = Some(plan.ppo_episodes / 32 * 8);
        c.train.save_steps = plan.ppo_episodes;
        match algo {
            Trainer::Ppo => unreachable!("PPO has its own config"),
            Trainer::Grpo => {
                let g = &mut c.grpo;
                g.dataset = prompts.clone();
                (g.max_prompt_length, g.max_completion_length) = (16, 16);
                (g.num_generations, g.steps_per_generation, g.num_iterations) = (4, Some(2), 4);
                g.beta = GRPO_BETA;
                g.num_sample_generations = 8;
            }
            Trainer::Rloo => {
                let r = &mut c.rloo;
                r.dataset = prompts.clone();
                (r.max_prompt_length, r.max_completion_length) = (16, 16);
                (r.num_generations, r.steps_per_generation, r.num_iterations) = (4, Some(2), 4);
                // The same penalty as PPO's: kl_coef x the summed k1 KL off the reward.
                r.beta = kl_coef;
                r.num_sample_generations = 8;
            }
        }
        c.validate()?;
        Ok(c)
    };
    let eval_cfg = ppo_config(kl_coef, &out.join("eval"))?;
    let evaluate = |name: &str, policy: &Path| -> Result<PolicyEval> {
        evaluate_with_gold(
            &eval_cfg,
            name,
            policy,
            &sft_run.checkpoint,
            &rm_run.checkpoint,
            &eval_prompts,
            out,
        )
    };
    // DPO from the SFT policy on the reward model's pairs (27% of labels
    // flipped), the SFT policy as its reference; evaluated on the 200
    // held-out pairs with gold labels.
    let dpo_config = |dir: &Path| -> Result<Config> {
        let mut c = base_config(opts.seed, &sft_run.checkpoint, dir);
        c.dpo.dataset = pairs.clone();
        c.dpo.eval_dataset = Some(pairs_gold.clone());
        c.dpo.max_length = 32;
        c.dpo.beta = DPO_BETA;
        c.train.learning_rate = 3e-4;
        c.train.per_device_train_batch_size = 32;
        c.train.per_device_eval_batch_size = 100;
        c.train.eval_on_start = Some(true);
        c.train.max_steps = Some(plan.dpo_steps);
        c.train.save_steps = plan.dpo_steps;
        c.validate()?;
        Ok(c)
    };
    let mut trained = Vec::new();
    let mut ppo_run = None;
    let mut dpo_run = None;
    for algo in &opts.algos {
        let started = Instant::now();
        let checkpoint = match *algo {
            DemoAlgo::Online(Trainer::Ppo) => {
                let r = train_ppo(kl_coef, "ppo")?;
                let c = r.checkpoint.clone();
                ppo_run = Some(r);
                c
            }
            DemoAlgo::Online(t) => {
                let dir = out.join(t.name());
                online::train(&critic_free_config(t, &dir)?, t, &dir, false, &stop)?.checkpoint
            }
            DemoAlgo::Dpo => {
                let dir = out.join("dpo");
                let r = dpo::train(&dpo_config(&dir)?, &dir, false, &stop)?;
                let c = r.checkpoint.clone();
                dpo_run = Some(r);
                c
            }
        };
        let train_s = started.elapsed().as_secs_f64();
        let name = display_name(*algo);
        lap(&name, &mut timings);
        let mut e = evaluate(&name, &checkpoint)?;
        e.train_s = train_s;
        trained.push(e);
    }

    // 4. The SFT policy on the held-out prompts (the trained ones above).
    let sft_eval = evaluate("SFT", &sft_run.checkpoint)?;
    lap("evaluation", &mut timings);

    let mut sweep = Vec::new();
    if opts.kl_sweep {
        for (kl, name) in [(0.0, "ppo-kl0"), (LARGE_KL_COEF, "ppo-kl-large")] {
            let r = train_ppo(kl, name)?;
            sweep.push((kl, evaluate(&format!("PPO kl_coef {kl}"), &r.checkpoint)?));
        }
        lap("KL sweep", &mut timings);
    }

    let report = DemoReport {
        out: out.clone(),
        seed,
        reward_eval_accuracy: rm_run.eval_accuracy,
        gold_agreement: agreement.accuracy,
        sft: sft_eval,
        trained,
        sweep,
        timings,
        report: out.join("report.md"),
    };
    let text = markdown(
        &report,
        &sft_run,
        &rm_run,
        ppo_run.as_ref(),
        dpo_run.as_ref(),
    );
    crate::io::atomic_write(&report.report, text.as_bytes())?;
    Ok(report)
}

/// Samples the policy on the eval prompts (the eval config's sampling and
/// seed), scores with the reward model and the gold reward; writes the
/// completions to OUT/eval-<name>.jsonl.
fn evaluate_with_gold(
    cfg: &Config,
    name: &str,
    policy: &Path,
    reference: &Path,
    reward_model: &Path,
    prompts: &str,
    out: &Path,
) -> Result<PolicyEval> {
    let rm = RewardModelReward::load(
        &reward_model.to_string_lossy(),
        policy,
        &candle_core::Device::Cpu,
    )?;
    // Every policy sampled alike (the eval config's [ppo] sampling, one
    // completion per prompt), whichever algorithm trained it.
    let (e, _) = crate::app::commands::evaluate_policy(
        cfg,
        Some(Algo::Ppo),
        &policy.to_string_lossy(),
        Some(&reference.to_string_lossy()),
        &RewardFuncs::single("reward_model", &rm),
        prompts,
        "test",
    )?;
    let mut samples = Vec::new();
    let mut lines = String::new();
    for c in &e.completions {
        let (p, r) = (
            c["prompt"].as_str().unwrap_or(""),
            c["completion"].as_str().unwrap_or(""),
        );
        let g = task::gold_reward(r);
        samples.push((p.to_string(), r.to_string(), g));
        let mut row = c.clone();
        row["gold"] = serde_json::json!(g);
        let _ = writeln!(lines, "{row}");
    }
    let slug: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    crate::io::atomic_write(&out.join(format!("eval-{slug}.jsonl")), lines.as_bytes())?;
    let n = samples.len() as f64;
    let gold = samples.iter().map(|s| s.2).sum::<f64>() / n;
    let var = samples.iter().map(|s| (s.2 - gold).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    Ok(PolicyEval {
        name: name.to_string(),
        gold,
        gold_se: (var / n).sqrt(),
        reward_model: e.reward(),
        kl: e.kl(),
        mean_length: e.mean_length(),
        eos_rate: e.eos_rate(),
        samples,
        train_s: 0.0,
    })
}

impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "reward model: eval accuracy {:.3} (labels with {:.0}% flipped), agreement with the gold reward {:.3}",
            self.reward_eval_accuracy,
            FLIP_RATE * 100.0,
            self.gold_agreement
        )?;
        f.write_str(&policy_table(self))?;
        for p in &self.trained {
            writeln!(
                f,
                "{} - SFT gold reward: {:+.3} = {:.1} standard errors",
                p.name,
                p.gold - self.sft.gold,
                self.margin_in_se(p)
            )?;
        }
        for p in std::iter::once(&self.sft).chain(&self.trained) {
            writeln!(f, "completions of {}:", p.name)?;
            for (prompt, response, g) in p.samples.iter().take(3) {
                writeln!(f, "  [{g:+.1}] {prompt} |{response}")?;
            }
        }
        let times: Vec<String> = self
            .timings
            .iter()
            .map(|(n, s)| format!("{n} {s:.1} s"))
            .collect();
        writeln!(f, "time: {}", times.join(", "))?;
        write!(f, "report: {}", self.report.display())
    }
}

/// The policies' table (plain text and Markdown alike).
fn policy_table(r: &DemoReport) -> String {
    let mut s = String::from(
        "| policy | gold reward (± s.e.) | reward model | KL to SFT | mean length | EOS rate | training time |\n|---|---|---|---|---|---|---|\n",
    );
    let rows = std::iter::once(&r.sft)
        .chain(&r.trained)
        .chain(r.sweep.iter().map(|(_, e)| e));
    for p in rows {
        let time = match p.train_s > 0.0 {
            true => format!("{:.0} s", p.train_s),
            false => "-".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {:.3} ± {:.3} | {:.3} | {:.3} | {:.1} | {:.2} | {time} |",
            p.name, p.gold, p.gold_se, p.reward_model, p.kl, p.mean_length, p.eos_rate
        );
    }
    s
}

/// The one-page report: the table, completions, and every stage's plots.
fn markdown(
    r: &DemoReport,
    sft_run: &sft::SftRun,
    rm: &reward::RewardRun,
    ppo_run: Option<&OnlineRun>,
    dpo_run: Option<&dpo::DpoRun>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# candle-rlhf demo\n");
    let _ = writeln!(
        s,
        "The whole RLHF pipeline offline on a synthetic movie-review language with a hidden gold reward \
         (src/app/task.rs: distinct positive minus negative words, clamped to ±2, minus 0.5 per repeated word, \
         minus 1 without a final period). Seed {}, {} CPU threads.\n",
        r.seed,
        candle_core::utils::get_num_threads()
    );
    let _ = writeln!(
        s,
        "## Results on {} held-out prompts\n",
        r.sft.samples.len()
    );
    s.push_str(&policy_table(r));
    s.push('\n');
    for p in &r.trained {
        let _ = writeln!(
            s,
            "{} - SFT gold reward: {:+.3} ({:.1} standard errors of the mean difference, paired by prompt).\n",
            p.name,
            p.gold - r.sft.gold,
            r.margin_in_se(p)
        );
    }
    let _ = writeln!(
        s,
        "Reward model: eval accuracy {:.3} on pairs with {:.0}% of labels flipped; agreement with the gold reward on 200 unflipped held-out pairs {:.3}.\n",
        r.reward_eval_accuracy,
        FLIP_RATE * 100.0,
        r.gold_agreement
    );
    if !r.sweep.is_empty() {
        let _ = writeln!(
            s,
            "The KL sweep: without the KL term (kl_coef 0) the policy is free to exploit the reward model; \
             with a large one ({LARGE_KL_COEF}) it stays near the SFT policy.\n"
        );
    }
    let _ = writeln!(s, "## Completions\n");
    for p in std::iter::once(&r.sft)
        .chain(&r.trained)
        .chain(r.sweep.iter().map(|(_, e)| e))
    {
        let _ = writeln!(s, "{}:\n", p.name);
        for (prompt, response, g) in p.samples.iter().take(5) {
            let _ = writeln!(s, "- `{prompt}|{response}` (gold {g:+.1})");
        }
        s.push('\n');
    }
    let _ = writeln!(s, "## Stages\n");
    let _ = writeln!(
        s,
        "- SFT: {} steps, eval loss {:.3}, token accuracy {:.3} ({}).",
        sft_run.steps, sft_run.eval_loss, sft_run.eval_mean_token_accuracy, sft_run.data
    );
    let _ = writeln!(
        s,
        "- Reward model: {} steps, eval accuracy {:.3}, eval loss {:.3}.",
        rm.steps, rm.eval_accuracy, rm.eval_loss
    );
    if let Some(ppo_run) = ppo_run {
        let _ = writeln!(
            s,
            "- PPO: {} updates, {:.2} s/update ({} in all).",
            ppo_run.iterations,
            ppo_run.seconds_per_iteration,
            ppo_run.total_times()
        );
    }
    if let Some(d) = dpo_run {
        let _ = writeln!(
            s,
            "- DPO: {} steps, {:.3} s/step; on the 200 held-out pairs with gold labels eval rewards/accuracies {:.3}, margins {:.3}, loss {:.3}.",
            d.steps,
            d.seconds_per_step,
            d.eval("eval_rewards/accuracies"),
            d.eval("eval_rewards/margins"),
            d.eval("eval_loss")
        );
    }
    let times: Vec<String> = r
        .timings
        .iter()
        .map(|(n, t)| format!("{n} {t:.1} s"))
        .collect();
    let _ = writeln!(s, "- Wall time: {}.\n", times.join(", "));
    let _ = writeln!(s, "## Curves\n");
    for stage in [
        "sft",
        "reward",
        "ppo",
        "grpo",
        "rloo",
        "dpo",
        "ppo-kl0",
        "ppo-kl-large",
    ] {
        let dir = r.out.join(stage).join("plots");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                let family = n.trim_end_matches(".svg");
                [
                    "loss",
                    "accuracy",
                    "mean_token_accuracy",
                    "objective",
                    "policy",
                    "val",
                    "mean_response_length",
                    "reward",
                    "rewards",
                    "completions",
                    "logps",
                ]
                .contains(&family)
            })
            .collect();
        files.sort();
        let _ = writeln!(s, "### {stage}\n");
        for f in files {
            let _ = writeln!(s, "![{stage} {f}]({stage}/plots/{f})");
        }
        s.push('\n');
    }
    s
}
