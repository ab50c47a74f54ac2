//! The `candle-rlhf` command line. Each subcommand resolves its config, then
//! calls into the library; errors are printed once, on one line, here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use candle_rlhf::config::Config;
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

#[derive(Subcommand)]
enum Command {
    /// Sample completions from a causal LM.
    Generate(Common),
    /// Supervised fine-tuning on prompt/completion data (stage 1).
    Sft(TrainArgs),
    /// Train a reward model on preference pairs (stage 2).
    Reward(TrainArgs),
    /// PPO against a reward model with a KL penalty to a reference (stage 3).
    Ppo(TrainArgs),
    /// Score prompt/response pairs with a reward model.
    Score(Common),
    /// Evaluate a policy or reward model on held-out data.
    Eval(Common),
    /// Draw every metric of RUN_DIR/metrics.jsonl to SVG files in RUN_DIR/plots/.
    Plot {
        /// A run directory holding metrics.jsonl.
        run_dir: PathBuf,
    },
    /// The whole pipeline offline on an embedded task.
    Demo(Common),
    /// Measure training and generation speed.
    Bench(Common),
}

fn main() -> ExitCode {
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
        Command::Generate(c) => not_ready("generate", &c),
        Command::Sft(t) => not_ready("sft", &t.common),
        Command::Reward(t) => not_ready("reward", &t.common),
        Command::Ppo(t) => not_ready("ppo", &t.common),
        Command::Score(c) => not_ready("score", &c),
        Command::Eval(c) => not_ready("eval", &c),
        Command::Demo(c) => not_ready("demo", &c),
        Command::Bench(c) => not_ready("bench", &c),
    }
}

/// Validates the config (so it can be prepared ahead), then says the command
/// is not ready; exit code 2.
fn not_ready(command: &str, common: &Common) -> anyhow::Result<()> {
    resolve_config(common)?;
    Err(Error::NotReady(command.into()).into())
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
    Config::load(c.config.as_deref(), &sets)
}
