//! The `candle-rlhf` command line. Each subcommand resolves its config, then
//! calls into the library; errors are printed once, on one line, here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use candle_rlhf::app::cli::{
    self, BenchArgs, EvalArgs, GenerateArgs, RenderArgs, ScoreArgs, TrainArgs,
};
use candle_rlhf::app::commands::{self, TrainCommand};
use candle_rlhf::trainers::online::Trainer;
use candle_rlhf::Error;

#[derive(Parser)]
#[command(
    name = "candle-rlhf",
    version,
    about = "RLHF on Candle: SFT, reward models (Bradley-Terry), DPO, and PPO, GRPO and RLOO with a KL penalty"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    /// DPO and its loss family on preference pairs, no reward model (TRL's
    /// DPOTrainer; [dpo]).
    Dpo(TrainArgs),
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
        /// The stage after the reward model: ppo, grpo, rloo (against it),
        /// dpo (on its preference pairs), or all (the four, side by side).
        #[arg(long, value_enum, default_value = "ppo")]
        algo: candle_rlhf::app::demo::AlgoChoice,
    },
    /// Measure reward-step, generation, PPO/GRPO/RLOO-iteration and DPO-step speed on a model shape.
    Bench(BenchArgs),
    /// Print every config key's default as TOML, or with --markdown the
    /// config reference (docs/config.md: keys, types, defaults, docs).
    Config {
        #[arg(long)]
        markdown: bool,
    },
}

fn main() -> ExitCode {
    candle_rlhf::device::tune_allocator();
    // One of several MPI ranks when launched by mpirun or srun (the `mpi` feature).
    let session = match candle_rlhf::dist::init() {
        Ok(s) => s,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    let world = *candle_rlhf::dist::world();
    init_tracing(world.is_main());
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = err.downcast_ref::<Error>().map_or(1, Error::exit_code);
            let interrupted =
                matches!(err.downcast_ref::<Error>(), Some(Error::Interrupted { .. }));
            if world.is_single() || interrupted {
                // A stop is agreed by every rank at the same step: each exits cleanly.
                if world.is_main() {
                    eprintln!("error: {err:#}");
                }
                session.finish();
                return ExitCode::from(code as u8);
            }
            // One rank's error stops the whole job (MPI_Abort): no rank
            // is left waiting for it in a collective.
            eprintln!("error (rank {} of {}): {err:#}", world.rank, world.size);
            world.abort(code);
        }
    };
    if !world.is_single() && world.is_main() {
        let mb = candle_rlhf::dist::bytes_sent() as f64 / 1e6;
        eprintln!(
            "data parallelism: rank 0 of {} sent {mb:.1} MB into collectives",
            world.size
        );
    }
    session.finish(); // MPI_Finalize
    code
}

/// Logs at `info` (RUST_LOG overrides); ranks other than 0 only warn.
fn init_tracing(main_rank: bool) {
    let level = if main_rank { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
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
            for f in candle_rlhf::plot::plot_run(&run_dir)? {
                println!("{}", f.display());
            }
        }
        Command::Generate(a) => cli::generate(a)?,
        Command::Merge { base, adapter, out } => {
            commands::merge(base, &adapter, &out)?;
            println!("{}", out.display());
        }
        Command::Fixtures { out, seed } => {
            for dir in candle_rlhf::app::fixtures::make_all(&out, seed)? {
                println!("{}", dir.display());
            }
        }
        Command::Sft(t) => cli::train(t, TrainCommand::Sft)?,
        Command::Reward(t) => cli::train(t, TrainCommand::Reward)?,
        Command::Dpo(t) => cli::train(t, TrainCommand::Dpo)?,
        Command::Ppo(t) => cli::train(t, TrainCommand::Online(Trainer::Ppo))?,
        Command::Grpo(t) => cli::train(t, TrainCommand::Online(Trainer::Grpo))?,
        Command::Rloo(t) => cli::train(t, TrainCommand::Online(Trainer::Rloo))?,
        Command::Score(a) => {
            let cfg = cli::resolve_config(&a.common)?;
            let o = commands::ScoreOptions {
                model: a.model,
                data: a.data,
                split: a.split,
                text: a.text,
                scores_out: a.scores_out,
            };
            print!("{}", commands::score(&cfg, &o)?);
        }
        Command::Eval(a) => {
            let cfg = cli::resolve_config(&a.common)?;
            let o = commands::EvalOptions {
                policy: a.policy,
                reward: a.reward,
                reference: a.reference,
                algo: a.algo,
                prompts: a.prompts,
                split: a.split,
            };
            println!("{}", commands::eval(&cfg, &o)?);
        }
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
            let algos = algo.algos();
            let o = demo::DemoOptions {
                out,
                fast,
                kl_sweep,
                seed,
                kl_coef,
                algos,
            };
            println!("{}", demo::run(&o)?);
        }
        Command::Bench(b) => cli::bench(b)?,
        Command::Config { markdown } => match markdown {
            true => print!("{}", candle_rlhf::config::reference::markdown()),
            false => print!("{}", candle_rlhf::Config::default().to_toml_string()?),
        },
        Command::Render(r) => cli::render(r)?,
    }
    Ok(())
}
