//! The command line's options (clap), and the subcommands whose body is
//! only turning them into a config and options: main.rs parses, then
//! dispatches here or to [`crate::app::commands`].

use std::path::PathBuf;

use clap::Args;

use crate::app::commands::{self, TrainCommand};
use crate::config::Config;
use crate::trainers::online::Trainer;
use crate::{Error, Result};

/// Options every run-producing subcommand takes.
#[derive(Args, Clone, Debug)]
pub struct Common {
    /// TOML config file; every key has a default, so the file lists only changes.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Override a config key, as in --set train.learning_rate=1e-5 (repeatable; applied in order).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub set: Vec<String>,
    /// auto | cpu | cuda[:N] | metal[:N]. auto picks CUDA, then Metal, then the CPU.
    #[arg(long)]
    pub device: Option<String>,
    /// Compute dtype of the models.
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    pub dtype: Option<String>,
    /// Seed of every random draw.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Run directory (default: runs/<command>-<time>).
    #[arg(long, value_name = "RUN_DIR")]
    pub out: Option<PathBuf>,
    /// CPU threads for the tensor ops (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// A chat template file (Jinja) for conversational data, over the model's own.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
}

/// Options of `render`.
#[derive(Args, Clone, Debug)]
pub struct RenderArgs {
    /// TOML config file (its [model] chat_template and [sft] settings apply).
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Override a config key (repeatable; applied in order).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub set: Vec<String>,
    /// A chat template file (Jinja) over the model's own.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// The model whose tokenizer and chat template render the rows (a directory or hub id).
    #[arg(long)]
    pub model: String,
    /// A data file (.jsonl, .jsonl.gz, .json, .parquet), or a dataset directory or hub id read at --split.
    #[arg(long)]
    pub data: String,
    /// The split of a dataset given to --data.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Where the JSON lines go (default: standard output).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Also write the token ids (and the loss mask of SFT rows).
    #[arg(long)]
    pub ids: bool,
}

/// Options of `bench`.
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub common: Common,
    /// A model shape: configs/models/NAME.toml (config.json values and the workload).
    #[arg(
        long,
        value_name = "SHAPE.toml",
        default_value = "configs/models/tiny.toml"
    )]
    pub model: PathBuf,
    /// Which parts to run, comma-separated: reward, sft, generate, ppo, grpo, rloo, dpo.
    #[arg(long, default_value = "reward,generate,ppo")]
    pub parts: String,
    /// Timed repetitions of each part.
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Recompute each layer in the backward (train.activation_checkpointing) in every
    /// trained model: on or off (off by default, so earlier tables stay comparable).
    #[arg(long, default_value = "off", value_parser = ["on", "off"])]
    pub activation_checkpointing: String,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Where the random model, reward model and prompts are written (default runs/bench/NAME).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Also write the figures as JSON here.
    #[arg(long, value_name = "FILE.json")]
    pub json: Option<PathBuf>,
    /// Generation batch sizes instead of the shape's (e.g. 1,16,64 on a GPU).
    #[arg(long, value_name = "N,N,..", value_delimiter = ',')]
    pub batch_sizes: Option<Vec<usize>>,
    /// Where generation draws tokens: auto (the device on a GPU), host or device.
    #[arg(long, default_value = "auto")]
    pub draw: crate::generate::Draw,
    /// The device's peak TFLOP/s in the run's dtype (an H100 SXM: 989 in
    /// bf16, 67 in f32): the report adds model FLOPs utilisation (MFU).
    #[arg(long, value_name = "TFLOPS")]
    pub peak_tflops: Option<f64>,
    /// Train LoRA adapters of rank R on every linear layer (lora_alpha 2R)
    /// in every part that trains (reward, sft, dpo, ppo, grpo, rloo), instead
    /// of every weight.
    #[arg(long, value_name = "R")]
    pub lora: Option<usize>,
}

/// Options of the trainers.
#[derive(Args, Clone, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub common: Common,
    /// Continue the run in RUN_DIR from its newest complete checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
}

/// Options of `generate`.
#[derive(Args, Clone, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub common: Common,
    /// Model directory in Hugging Face layout or hub id org/name[@revision]
    /// (default: the self-made tiny GPT-2, written to fixtures/ on first use).
    #[arg(long)]
    pub model: Option<String>,
    /// A prompt (repeatable; all prompts run as one left-padded batch).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// A file with one prompt per line.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// Tokens to generate per prompt.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Sample among the k most likely tokens only.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Print one JSON object per prompt: prompt, completion, completion_ids.
    #[arg(long)]
    pub json: bool,
}

/// Options of `score`.
#[derive(Args, Clone, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub common: Common,
    /// Reward model: a directory or hub id (a saved candle-rlhf reward model
    /// or any transformers ForSequenceClassification with num_labels 1).
    #[arg(long)]
    pub model: String,
    /// Preference pairs to score (.jsonl, .jsonl.gz, .json, .parquet, or a
    /// dataset directory or hub id read at --split): prints accuracy, mean
    /// margin and a calibration table, writes per-pair scores.
    #[arg(long, value_name = "FILE")]
    pub data: Option<String>,
    /// The split of a dataset given to --data.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// A text to score (repeatable).
    #[arg(long)]
    pub text: Vec<String>,
    /// Where per-pair scores go (default: FILE.scores.jsonl beside a --data
    /// file, scores.jsonl for a dataset).
    #[arg(long, value_name = "FILE")]
    pub scores_out: Option<PathBuf>,
}

/// Options of `eval`.
#[derive(Args, Clone, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub common: Common,
    /// The policy: a directory (a PPO checkpoint, say) or hub id.
    #[arg(long)]
    pub policy: String,
    /// A reward model (a directory or hub id): shorthand for one
    /// `type = "model"` reward function; unset: the config's [[reward_funcs]].
    #[arg(long)]
    pub reward: Option<String>,
    /// Evaluate as this trainer does (its section's sampling and group);
    /// unset: the one the checkpoint was trained with, else ppo.
    #[arg(long, value_enum)]
    pub algo: Option<Trainer>,
    /// The reference for the KL (default: the one a PPO checkpoint was
    /// trained against, from its manifest; else the policy itself).
    #[arg(long = "ref")]
    pub reference: Option<String>,
    /// Held-out prompts (column `prompt`): a file, or a dataset directory or
    /// hub id read at --split.
    #[arg(long, value_name = "FILE")]
    pub prompts: String,
    /// The split of a dataset given to --prompts.
    #[arg(long, default_value = "test")]
    pub split: String,
}

/// `generate`: its flags become `generate.*` overrides.
pub fn generate(args: GenerateArgs) -> Result<()> {
    let mut common = args.common.clone();
    let quoted = |s: &str| toml::Value::String(s.to_string()).to_string();
    if let Some(m) = &args.model {
        common.set.push(format!("model.name_or_path={}", quoted(m)));
    }
    for (key, value) in [
        ("max_new_tokens", args.max_new_tokens.map(|v| v.to_string())),
        ("temperature", args.temperature.map(|v| format!("{v:?}"))),
        ("top_k", args.top_k.map(|v| v.to_string())),
        ("top_p", args.top_p.map(|v| format!("{v:?}"))),
    ] {
        if let Some(v) = value {
            common.set.push(format!("generate.{key}={v}"));
        }
    }
    let cfg = resolve_config(&common)?;
    let o = commands::GenerateOptions {
        prompts: args.prompt,
        prompts_file: args.prompts,
        json: args.json,
    };
    print!("{}", commands::generate(&cfg, &o)?);
    Ok(())
}

/// A trainer: the run directory is --resume's, else run.out, else
/// runs/<command>-<time>.
pub fn train(t: TrainArgs, command: TrainCommand) -> Result<()> {
    let cfg = resolve_config(&t.common)?;
    // Data parallelism: every rank must run the same config as rank 0.
    let world = crate::dist::world();
    let hash = crate::dist::fingerprint(cfg.to_toml_string()?.as_bytes());
    world.check_same("the config (--config and --set)", hash)?;
    let stop = crate::signal::install()?;
    let dir = (t.resume.clone())
        .or_else(|| cfg.run.out.clone())
        .unwrap_or_else(|| crate::run::default_run_dir(command.name()));
    let resume = t.resume.is_some();
    let report = commands::train(&cfg, command, &dir, resume, &stop)?;
    if world.is_main() {
        println!("{report}");
    }
    Ok(())
}

pub fn render(a: RenderArgs) -> Result<()> {
    let cfg = resolve_config(&Common {
        config: a.config.clone(),
        set: a.set.clone(),
        device: None,
        dtype: None,
        seed: None,
        out: None,
        threads: None,
        chat_template: a.chat_template.clone(),
    })?;
    let o = commands::RenderOptions {
        model: a.model,
        data: a.data,
        split: a.split,
        ids: a.ids,
    };
    let (lines, rows) = commands::render(&cfg, &o)?;
    match &a.out {
        Some(path) => {
            crate::io::atomic_write(path, lines.as_bytes())?;
            eprintln!("{rows} rows: {}", path.display());
        }
        None => print!("{lines}"),
    }
    Ok(())
}

pub fn bench(b: BenchArgs) -> Result<()> {
    let mut config = resolve_config(&b.common)?;
    config.train.activation_checkpointing = b.activation_checkpointing == "on";
    if let Some(r) = b.lora {
        config = config.with_overrides(&[
            format!("lora.r={r}"),
            format!("lora.lora_alpha={}", 2 * r),
            "lora.target_modules=\"all-linear\"".into(),
        ])?;
    }
    let mut shape = crate::app::bench::Shape::load(&b.model)?;
    if let Some(sizes) = b.batch_sizes {
        if sizes.is_empty() || sizes.contains(&0) {
            return Err(Error::Msg(
                "--batch-sizes: every batch size must be at least 1".into(),
            ));
        }
        shape.workload.generate_batch_sizes = sizes;
    }
    let parts = b
        .parts
        .split(',')
        .map(crate::app::bench::Part::parse)
        .collect::<crate::Result<Vec<_>>>()?;
    let work_dir = b
        .work_dir
        .unwrap_or_else(|| PathBuf::from("runs/bench").join(&shape.name));
    let report = crate::app::bench::run(&crate::app::bench::BenchOptions {
        shape,
        parts,
        iters: b.iters.max(1),
        warmup: b.warmup,
        work_dir,
        config,
        draw: b.draw,
        peak_tflops: b.peak_tflops,
    })?;
    print!("{report}");
    if let Some(path) = &b.json {
        crate::io::write_json(path, &report)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The config file with `--set` overrides, then the dedicated flags (which win).
pub fn resolve_config(c: &Common) -> crate::Result<Config> {
    let quoted = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut sets = c.set.clone();
    if let Some(d) = &c.device {
        sets.push(format!("run.device={}", quoted(d)));
    }
    if let Some(d) = &c.dtype {
        sets.push(format!("run.dtype={}", quoted(d)));
    }
    if let Some(s) = c.seed {
        sets.push(format!("run.seed={s}"));
    }
    if let Some(o) = &c.out {
        sets.push(format!("run.out={}", quoted(&o.to_string_lossy())));
    }
    if let Some(n) = c.threads {
        sets.push(format!("run.threads={n}"));
    }
    if let Some(f) = &c.chat_template {
        sets.push(format!(
            "model.chat_template={}",
            quoted(&f.to_string_lossy())
        ));
    }
    let cfg = Config::load(c.config.as_deref(), &sets)?;
    crate::device::set_threads(cfg.run.threads);
    Ok(cfg)
}
