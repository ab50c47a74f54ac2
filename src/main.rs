//! The `candle-rlhf` command line. Each subcommand resolves its config, then
//! calls into the library; errors are printed once, on one line, here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use candle_rlhf::config::Config;
use candle_rlhf::trainers::online::{self, Trainer};
use candle_rlhf::Error;

#[derive(Parser)]
#[command(
    name = "candle-rlhf",
    version,
    about = "RLHF on Candle: SFT, reward models (Bradley-Terry) and PPO with a KL penalty"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options every run-producing subcommand takes.
#[derive(Args, Clone, Debug)]
struct Common {
    /// TOML config file; every key has a default, so the file lists only changes.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Override a config key, as in --set train.learning_rate=1e-5 (repeatable; applied in order).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    set: Vec<String>,
    /// auto | cpu | cuda[:N] | metal[:N]. auto picks CUDA, then Metal, then the CPU.
    #[arg(long)]
    device: Option<String>,
    /// Compute dtype of the models.
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    dtype: Option<String>,
    /// Seed of every random draw.
    #[arg(long)]
    seed: Option<u64>,
    /// Run directory (default: runs/<command>-<time>).
    #[arg(long, value_name = "RUN_DIR")]
    out: Option<PathBuf>,
    /// CPU threads for the tensor ops (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// A chat template file (Jinja) for conversational data, over the model's own.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
}

/// Options of `render`.
#[derive(Args, Clone, Debug)]
struct RenderArgs {
    /// TOML config file (its [model] chat_template and [sft] settings apply).
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Override a config key (repeatable; applied in order).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    set: Vec<String>,
    /// A chat template file (Jinja) over the model's own.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// The model whose tokenizer and chat template render the rows (a directory or hub id).
    #[arg(long)]
    model: String,
    /// A data file (.jsonl, .jsonl.gz, .json, .parquet), or a dataset directory or hub id read at --split.
    #[arg(long)]
    data: String,
    /// The split of a dataset given to --data.
    #[arg(long, default_value = "train")]
    split: String,
    /// Where the JSON lines go (default: standard output).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Also write the token ids (and the loss mask of SFT rows).
    #[arg(long)]
    ids: bool,
}

/// Options of `bench`.
#[derive(Args, Clone, Debug)]
struct BenchArgs {
    #[command(flatten)]
    common: Common,
    /// A model shape: configs/models/NAME.toml (config.json values and the workload).
    #[arg(
        long,
        value_name = "SHAPE.toml",
        default_value = "configs/models/tiny.toml"
    )]
    model: PathBuf,
    /// Which parts to run, comma-separated: reward, generate, ppo.
    #[arg(long, default_value = "reward,generate,ppo")]
    parts: String,
    /// Timed repetitions of each part.
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Where the random model, reward model and prompts are written (default runs/bench/NAME).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Also write the figures as JSON here.
    #[arg(long, value_name = "FILE.json")]
    json: Option<PathBuf>,
    /// Generation batch sizes instead of the shape's (e.g. 1,16,64 on a GPU).
    #[arg(long, value_name = "N,N,..", value_delimiter = ',')]
    batch_sizes: Option<Vec<usize>>,
    /// Where generation draws tokens: auto (the device on a GPU), host or device.
    #[arg(long, default_value = "auto")]
    draw: candle_rlhf::generate::Draw,
    /// The device's peak TFLOP/s in the run's dtype (an H100 SXM: 989 in
    /// bf16, 67 in f32): the report adds model FLOPs utilisation (MFU).
    #[arg(long, value_name = "TFLOPS")]
    peak_tflops: Option<f64>,
    /// Train LoRA adapters of rank R on every linear layer (lora_alpha 2R)
    /// in the reward step and the PPO iteration, instead of every weight.
    #[arg(long, value_name = "R")]
    lora: Option<usize>,
}

/// Options of the trainers.
#[derive(Args, Clone, Debug)]
struct TrainArgs {
    #[command(flatten)]
    common: Common,
    /// Continue the run in RUN_DIR from its newest complete checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
}

/// Options of `generate`.
#[derive(Args, Clone, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    common: Common,
    /// Model directory in Hugging Face layout or hub id org/name[@revision]
    /// (default: the self-made tiny GPT-2, written to fixtures/ on first use).
    #[arg(long)]
    model: Option<String>,
    /// A prompt (repeatable; all prompts run as one left-padded batch).
    #[arg(long)]
    prompt: Vec<String>,
    /// A file with one prompt per line.
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// Tokens to generate per prompt.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long)]
    temperature: Option<f64>,
    /// Sample among the k most likely tokens only.
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling threshold.
    #[arg(long)]
    top_p: Option<f64>,
    /// Print one JSON object per prompt: prompt, completion, completion_ids.
    #[arg(long)]
    json: bool,
}

/// Options of `score`.
#[derive(Args, Clone, Debug)]
struct ScoreArgs {
    #[command(flatten)]
    common: Common,
    /// Reward model: a directory or hub id (a saved candle-rlhf reward model
    /// or any transformers ForSequenceClassification with num_labels 1).
    #[arg(long)]
    model: String,
    /// Preference pairs to score (.jsonl, .jsonl.gz, .json, .parquet, or a
    /// dataset directory or hub id read at --split): prints accuracy, mean
    /// margin and a calibration table, writes per-pair scores.
    #[arg(long, value_name = "FILE")]
    data: Option<String>,
    /// The split of a dataset given to --data.
    #[arg(long, default_value = "test")]
    split: String,
    /// A text to score (repeatable).
    #[arg(long)]
    text: Vec<String>,
    /// Where per-pair scores go (default: FILE.scores.jsonl beside a --data
    /// file, scores.jsonl for a dataset).
    #[arg(long, value_name = "FILE")]
    scores_out: Option<PathBuf>,
}

/// Options of `eval`.
#[derive(Args, Clone, Debug)]
struct EvalArgs {
    #[command(flatten)]
    common: Common,
    /// The policy: a directory (a PPO checkpoint, say) or hub id.
    #[arg(long)]
    policy: String,
    /// A reward model (a directory or hub id): shorthand for one
    /// `type = "model"` reward function; unset: the config's [[reward_funcs]].
    #[arg(long)]
    reward: Option<String>,
    /// Evaluate as this trainer does (its section's sampling and group);
    /// unset: the one the checkpoint was trained with, else ppo.
    #[arg(long, value_enum)]
    algo: Option<Trainer>,
    /// The reference for the KL (default: the one a PPO checkpoint was
    /// trained against, from its manifest; else the policy itself).
    #[arg(long = "ref")]
    reference: Option<String>,
    /// Held-out prompts (column `prompt`): a file, or a dataset directory or
    /// hub id read at --split.
    #[arg(long, value_name = "FILE")]
    prompts: String,
    /// The split of a dataset given to --prompts.
    #[arg(long, default_value = "test")]
    split: String,
}

#[derive(Subcommand)]
enum Command {
    /// Sample completions from a causal LM.
    Generate(GenerateArgs),
    /// Write the self-made test fixtures (tokenizer, tiny models) to a directory.
    Fixtures {
        /// Output directory.
        #[arg(long, default_value = "fixtures")]
        out: PathBuf,
        /// Seed of the corpus, tokenizer and weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Supervised fine-tuning on prompt/completion data (stage 1).
    Sft(TrainArgs),
    /// Train a reward model on preference pairs (stage 2).
    Reward(TrainArgs),
    /// PPO against a reward model with a KL penalty to a reference (stage 3).
    Ppo(TrainArgs),
    /// GRPO: groups of completions per prompt, advantages against the group,
    /// no critic (TRL's GRPOTrainer; [grpo] and [[reward_funcs]]).
    Grpo(TrainArgs),
    /// RLOO: leave-one-out baselines, no critic (TRL's RLOOTrainer; [rloo]
    /// and [[reward_funcs]]).
    Rloo(TrainArgs),
    /// Score texts or preference pairs with a reward model.
    Score(ScoreArgs),
    /// Show what the model will see of a data file: one JSON line per row
    /// with TRL's text columns (chat template applied) and, with --ids, the
    /// token ids and loss mask the trainers feed the model.
    Render(RenderArgs),
    /// Sample a policy on held-out prompts as the online trainers evaluate:
    /// eval/reward (the config's [[reward_funcs]] or --reward), KL to the
    /// reference, length, clipped ratio; the completions go to
    /// RUN_DIR/completions.jsonl. Sampling settings are the section of the
    /// algorithm (--algo; else the checkpoint's; pass a run's
    /// RUN_DIR/config.toml to sample as it did).
    Eval(EvalArgs),
    /// Merge a LoRA adapter (peft's adapter_model.safetensors +
    /// adapter_config.json) into its base model and write a Hugging Face
    /// model directory.
    Merge {
        /// The base model: a directory or hub id (default: the adapter's
        /// base_model_name_or_path).
        #[arg(long)]
        base: Option<String>,
        /// The adapter directory (a LoRA checkpoint, a LoRA run directory, or peft's output).
        #[arg(long)]
        adapter: PathBuf,
        /// Where to write the merged model.
        #[arg(long)]
        out: PathBuf,
    },
    /// Draw every metric of RUN_DIR/metrics.jsonl to SVG files in RUN_DIR/plots/.
    Plot {
        /// A run directory holding metrics.jsonl.
        run_dir: PathBuf,
    },
    /// The whole pipeline offline on an embedded task: SFT, reward model,
    /// PPO, evaluation with a gold reward, and a report.
    Demo {
        /// Output directory.
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// A smaller run (about a minute on two cores).
        #[arg(long)]
        fast: bool,
        /// Also run PPO with kl_coef 0 and a large one.
        #[arg(long)]
        kl_sweep: bool,
        /// Seed of the data, the base model and every stage.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// PPO's kl_coef.
        #[arg(long)]
        kl_coef: Option<f64>,
        /// The task: reviews (the RLHF pipeline with a reward model) or
        /// arithmetic (GRPO with a verifiable exact-match reward).
        #[arg(long, value_enum, default_value = "reviews")]
        task: candle_rlhf::app::demo::DemoTask,
        /// The RL stage: ppo, grpo, rloo, or all (the three, side by side).
        #[arg(long, value_enum, default_value = "ppo")]
        algo: candle_rlhf::app::demo::AlgoChoice,
    },
    /// Measure reward-step, generation and PPO-iteration speed on a model shape.
    Bench(BenchArgs),
}

fn main() -> ExitCode {
    candle_rlhf::device::tune_allocator();
    init_tracing();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            let code = err.downcast_ref::<Error>().map_or(1, Error::exit_code);
            ExitCode::from(code as u8)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Plot { run_dir } => {
            let files = candle_rlhf::plot::plot_run(&run_dir)?;
            for f in files {
                println!("{}", f.display());
            }
            Ok(())
        }
        Command::Generate(args) => generate(args),
        Command::Merge { base, adapter, out } => merge(base, &adapter, &out),
        Command::Fixtures { out, seed } => {
            for dir in candle_rlhf::app::fixtures::make_all(&out, seed)? {
                println!("{}", dir.display());
            }
            Ok(())
        }
        Command::Sft(t) => sft(t),
        Command::Reward(t) => reward(t),
        Command::Ppo(t) => online(t, Trainer::Ppo),
        Command::Grpo(t) => online(t, Trainer::Grpo),
        Command::Rloo(t) => online(t, Trainer::Rloo),
        Command::Score(a) => score(a),
        Command::Eval(a) => eval(a),
        Command::Demo {
            out,
            fast,
            kl_sweep,
            seed,
            kl_coef,
            algo,
            task,
        } => {
            use candle_rlhf::app::demo;
            if task == demo::DemoTask::Arithmetic {
                println!("{}", candle_rlhf::app::arith::run(&out, fast, seed)?);
                return Ok(());
            }
            let report = demo::run(&demo::DemoOptions {
                out,
                fast,
                kl_sweep,
                seed,
                kl_coef,
                algos: algo.trainers(),
            })?;
            println!("{report}");
            Ok(())
        }
        Command::Bench(b) => bench(b),
        Command::Render(r) => render(r),
    }
}

/// Where `generate` finds its default model, made on first use.
const DEFAULT_FIXTURES: &str = "fixtures";

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    use candle_rlhf::generate::{generate, Sampling};
    use candle_rlhf::hub::HubSettings;
    use candle_rlhf::models::resolve_model;
    use candle_rlhf::models::{load_dir_frozen, CausalLm};
    use candle_rlhf::tokenizer::Tokenizer;

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
    let (device, said) = candle_rlhf::device::resolve_device(&cfg.run.device)?;
    tracing::info!("device: {said}");

    let model_dir = if cfg.model.name_or_path.is_empty() {
        let dir = PathBuf::from(DEFAULT_FIXTURES).join(candle_rlhf::app::fixtures::TINY_GPT2);
        if !dir.join("model.safetensors").is_file() {
            tracing::info!("making the tiny fixture model in {}", dir.display());
            candle_rlhf::app::fixtures::write_tiny_gpt2(&dir, 0)?;
        }
        dir
    } else {
        resolve_model(&cfg.model.resolved_name()?, &HubSettings::from_env())?
    };
    let tokenizer = Tokenizer::from_dir(&model_dir)?;
    let dtype = cfg.run.dtype.dtype();
    // Sample from plain (untracked) weights: no step records an autograd graph.
    let (arch, vb, _) = load_dir_frozen(&model_dir, dtype, &device)?;
    let model = CausalLm::load(vb, &arch, true)?;
    tracing::info!("{} model from {}", arch.model_type(), model_dir.display());

    let mut prompts = args.prompt.clone();
    if let Some(file) = &args.prompts {
        let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
        prompts.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    if prompts.is_empty() {
        anyhow::bail!("no prompt: pass --prompt TEXT (repeatable) or --prompts FILE");
    }
    let ids = prompts
        .iter()
        .map(|p| tokenizer.encode(p))
        .collect::<candle_rlhf::Result<Vec<_>>>()?;
    let sampling = Sampling::from_config(&cfg.generate, tokenizer.stop_ids.clone());
    let mut rng = candle_rlhf::HostRng::stream(cfg.run.seed, "sample");
    let outputs = generate(&model, &ids, tokenizer.pad_id, &sampling, &mut rng, &device)?;
    for (prompt, out) in prompts.iter().zip(outputs) {
        let completion = tokenizer.decode(&out)?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({"prompt": prompt, "completion": completion, "completion_ids": out})
            );
        } else {
            println!("{prompt}{completion}");
        }
    }
    Ok(())
}

/// A config that points into a missing `fixtures/` gets told how to make
/// them: the fixture generator runs only when asked (`candle-rlhf fixtures`).
fn check_fixtures(paths: &[&str]) -> anyhow::Result<()> {
    if let Some(p) = paths
        .iter()
        .find(|p| p.starts_with("fixtures/") && !std::path::Path::new(p).exists())
    {
        anyhow::bail!(
            "{p} does not exist: the self-made fixtures are written by `candle-rlhf fixtures` (or `make fixtures`)"
        );
    }
    Ok(())
}

/// The run directory: --resume's, else run.out, else runs/<command>-<time>.
fn run_dir(command: &str, t: &TrainArgs, cfg: &Config) -> PathBuf {
    t.resume
        .clone()
        .or_else(|| cfg.run.out.clone())
        .unwrap_or_else(|| candle_rlhf::run::default_run_dir(command))
}

fn sft(t: TrainArgs) -> anyhow::Result<()> {
    let cfg = resolve_config(&t.common)?;
    check_fixtures(&[&cfg.model.name_or_path, &cfg.sft.dataset])?;
    let stop = candle_rlhf::signal::install()?;
    let dir = run_dir("sft", &t, &cfg);
    let out = candle_rlhf::trainers::sft::train(&cfg, &dir, t.resume.is_some(), &stop)?;
    println!(
        "model: {}\nsteps: {}, eval loss {:.4}, eval token accuracy {:.4}, {:.3} s/step\ndata: {}\nrun: {}",
        out.checkpoint.display(),
        out.steps,
        out.eval_loss,
        out.eval_mean_token_accuracy,
        out.seconds_per_step,
        out.data,
        out.run_dir.display()
    );
    Ok(())
}

fn reward(t: TrainArgs) -> anyhow::Result<()> {
    let cfg = resolve_config(&t.common)?;
    check_fixtures(&[&cfg.model.name_or_path, &cfg.reward.dataset])?;
    let stop = candle_rlhf::signal::install()?;
    let dir = run_dir("reward", &t, &cfg);
    let out = candle_rlhf::trainers::reward::train(&cfg, &dir, t.resume.is_some(), &stop)?;
    println!(
        "reward model: {}\nsteps: {}, eval accuracy {:.4}, eval loss {:.4}, {:.3} s/step\ndata: {}\nrun: {}",
        out.checkpoint.display(),
        out.steps,
        out.eval_accuracy,
        out.eval_loss,
        out.seconds_per_step,
        out.data,
        out.run_dir.display()
    );
    Ok(())
}

fn online(t: TrainArgs, trainer: Trainer) -> anyhow::Result<()> {
    let cfg = resolve_config(&t.common)?;
    let data = match trainer {
        Trainer::Ppo => &cfg.ppo.dataset,
        Trainer::Grpo => &cfg.grpo.dataset,
        Trainer::Rloo => &cfg.rloo.dataset,
    };
    let mut paths = vec![cfg.model.name_or_path.as_str(), data.as_str()];
    if trainer == Trainer::Ppo {
        paths.extend(cfg.ppo.reward_model.as_deref());
    }
    paths.extend(cfg.reward_funcs.iter().filter_map(|f| f.model.as_deref()));
    check_fixtures(&paths)?;
    let stop = candle_rlhf::signal::install()?;
    let dir = run_dir(trainer.name(), &t, &cfg);
    let out = online::train(&cfg, trainer, &dir, t.resume.is_some(), &stop)?;
    println!(
        "policy: {}\niterations: {} ({} optimizer steps), {:.3} s/iteration ({} in all)\nprompts: {}",
        out.checkpoint.display(),
        out.iterations,
        out.optimizer_steps,
        out.seconds_per_iteration,
        out.total_times(),
        out.prompts
    );
    if let Some(e) = &out.eval_before {
        println!("eval before: {e}");
    }
    if let Some(e) = &out.eval_after {
        println!("eval after:  {e}");
    }
    println!("run: {}", out.run_dir.display());
    Ok(())
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    use candle_rlhf::hub::HubSettings;
    use candle_rlhf::models::resolve_model;
    let mut cfg = resolve_config(&a.common)?;
    let (device, _) = candle_rlhf::device::resolve_device(&cfg.run.device)?;
    let policy_dir = resolve_model(&a.policy, &HubSettings::from_env())?;
    // --reward DIR: one `type = "model"` reward function.
    if let Some(rm) = &a.reward {
        cfg.reward_funcs = vec![candle_rlhf::config::RewardFuncConfig {
            name: "reward_model".into(),
            kind: candle_rlhf::config::RewardFuncType::Model,
            model: Some(rm.clone()),
            ..Default::default()
        }];
    }
    if cfg.reward_funcs.is_empty() {
        anyhow::bail!("nothing to score with: pass --reward DIR or a config with [[reward_funcs]]");
    }
    let (rewards, _) = candle_rlhf::rewards::from_config(&cfg.reward_funcs, &policy_dir, &device)?;
    let algo = a.algo.map(|t| t.algo(&cfg));
    let (report, prompts) = online::evaluate_policy(
        &cfg,
        algo,
        &a.policy,
        a.reference.as_deref(),
        &rewards,
        &a.prompts,
        &a.split,
    )?;
    let dir = cfg
        .run
        .out
        .clone()
        .unwrap_or_else(|| candle_rlhf::run::default_run_dir("eval"));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let completions = dir.join("completions.jsonl");
    let text: String = report
        .completions
        .iter()
        .map(|c| format!("{c}\n"))
        .collect();
    candle_rlhf::io::atomic_write(&completions, text.as_bytes())?;
    let figures: serde_json::Map<String, serde_json::Value> = report
        .figures
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::json!(v)))
        .collect();
    let summary = dir.join("eval.json");
    candle_rlhf::io::atomic_write(&summary, serde_json::to_string_pretty(&figures)?.as_bytes())?;
    println!(
        "{report}\nprompts: {prompts}\ncompletions: {}\nsummary: {}",
        completions.display(),
        summary.display()
    );
    Ok(())
}

fn score(a: ScoreArgs) -> anyhow::Result<()> {
    use candle_rlhf::models::reward_model::RewardScorer;
    let cfg = resolve_config(&a.common)?;
    let (device, _) = candle_rlhf::device::resolve_device(&cfg.run.device)?;
    let scorer = RewardScorer::load(&a.model, &device)?;
    if a.data.is_none() && a.text.is_empty() {
        anyhow::bail!("nothing to score: pass --text TEXT (repeatable) or --data FILE");
    }
    if !a.text.is_empty() {
        let texts: Vec<&str> = a.text.iter().map(String::as_str).collect();
        for (text, s) in texts.iter().zip(scorer.score(&texts)?) {
            println!("{s:.6}\t{text}");
        }
    }
    if let Some(data) = &a.data {
        let out = a.scores_out.clone().unwrap_or_else(|| {
            let path = PathBuf::from(data);
            if path.is_file() {
                path.with_extension("scores.jsonl")
            } else {
                PathBuf::from("scores.jsonl")
            }
        });
        let hub = candle_rlhf::hub::HubSettings::from_env();
        let rows = candle_rlhf::data::load_preferences(data, &a.split, &hub)?;
        // Conversational pairs are rendered with the reward model's template.
        let model_dir = candle_rlhf::models::resolve_model(&a.model, &hub)?;
        let template =
            candle_rlhf::chat::TemplateSource::new(&model_dir, cfg.model.chat_template.as_deref());
        let report = candle_rlhf::trainers::reward::score_pairs(
            &scorer,
            &template,
            &rows,
            &out,
            cfg.train.per_device_eval_batch_size,
        )?;
        print!("{report}");
        println!("per-pair scores: {}", out.display());
    }
    Ok(())
}

fn render(a: RenderArgs) -> anyhow::Result<()> {
    use candle_rlhf::chat::TemplateSource;
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
    let hub = candle_rlhf::hub::HubSettings::from_env();
    let dir = candle_rlhf::models::resolve_model(&a.model, &hub)?;
    let tok = candle_rlhf::tokenizer::Tokenizer::from_dir(&dir)?;
    let template = TemplateSource::new(&dir, cfg.model.chat_template.as_deref());
    let records = candle_rlhf::data::load_records(&a.data, &a.split, &hub)?;
    let mut lines = String::new();
    for (value, source) in &records {
        let row =
            candle_rlhf::data::render::render_row(value, source, &template, &tok, a.ids, &cfg.sft)?;
        lines.push_str(&format!("{row}\n"));
    }
    match &a.out {
        Some(path) => {
            candle_rlhf::io::atomic_write(path, lines.as_bytes())?;
            eprintln!("{} rows: {}", records.len(), path.display());
        }
        None => print!("{lines}"),
    }
    Ok(())
}

fn bench(b: BenchArgs) -> anyhow::Result<()> {
    let mut config = resolve_config(&b.common)?;
    if let Some(r) = b.lora {
        config = config.with_overrides(&[
            format!("lora.r={r}"),
            format!("lora.lora_alpha={}", 2 * r),
            "lora.target_modules=\"all-linear\"".into(),
        ])?;
    }
    let mut shape = candle_rlhf::app::bench::Shape::load(&b.model)?;
    if let Some(sizes) = b.batch_sizes {
        anyhow::ensure!(
            !sizes.is_empty() && !sizes.contains(&0),
            "--batch-sizes: every batch size must be at least 1"
        );
        shape.workload.generate_batch_sizes = sizes;
    }
    let parts = b
        .parts
        .split(',')
        .map(candle_rlhf::app::bench::Part::parse)
        .collect::<candle_rlhf::Result<Vec<_>>>()?;
    let work_dir = b
        .work_dir
        .unwrap_or_else(|| PathBuf::from("runs/bench").join(&shape.name));
    let report = candle_rlhf::app::bench::run(&candle_rlhf::app::bench::BenchOptions {
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
        let text = serde_json::to_string_pretty(&report)?;
        candle_rlhf::io::atomic_write(path, text.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The config file with `--set` overrides, then the dedicated flags (which win).
fn resolve_config(c: &Common) -> candle_rlhf::Result<Config> {
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
    candle_rlhf::device::set_threads(cfg.run.threads);
    Ok(cfg)
}

fn merge(base: Option<String>, adapter: &Path, out: &Path) -> anyhow::Result<()> {
    use candle_rlhf::models::lora;
    let hub = candle_rlhf::hub::HubSettings::from_env();
    // A run directory stands for its newest checkpoint.
    let adapter = candle_rlhf::hub::resolve_model(&adapter.to_string_lossy(), &hub)?;
    if !lora::is_adapter_dir(&adapter) {
        anyhow::bail!(
            "{}: not a LoRA adapter (no {} or it holds a full model's config.json)",
            adapter.display(),
            lora::ADAPTER_CONFIG_FILE
        );
    }
    let base = match base {
        Some(b) => b,
        None => lora::adapter_base(&adapter)?,
    };
    let base_dir = candle_rlhf::models::resolve_model(&base, &hub)?;
    lora::write_merged(&adapter, &base_dir, out)?;
    println!("{}", out.display());
    Ok(())
}
