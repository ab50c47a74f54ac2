//! Run configuration: TOML files parsed into typed structs, `--set` overrides,
//! and validation before any model is loaded.
//!
//! Hyperparameters keep the names Hugging Face TRL and transformers use
//! (learning_rate, per_device_train_batch_size, kl_coef, cliprange, lam, ...)
//! and, unless a comment says otherwise, their defaults. Unknown keys are
//! rejected with the nearest known key suggested; every field has a default,
//! so a config file only lists what it changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::device::DTypeName;
use crate::{Error, Result};

/// Everything a run reads from its config file. Each subcommand uses the
/// sections it needs; the resolved whole is saved in every run directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Seed, device, dtype and run directory.
    pub run: RunConfig,
    /// The model to start from.
    pub model: ModelConfig,
    /// Optimizer, schedule, batching, logging and checkpointing shared by every trainer.
    pub train: TrainConfig,
    /// Sampling settings for `generate`.
    pub generate: GenerateConfig,
    /// Supervised fine-tuning (TRL's SFTConfig).
    pub sft: SftConfig,
    /// Reward-model training (TRL's RewardConfig).
    pub reward: RewardConfig,
    /// PPO (TRL's PPOConfig).
    pub ppo: PpoConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Seed of every random draw in the run (initialization, shuffling, sampling).
    pub seed: u64,
    /// auto | cpu | cuda[:N] | metal[:N]; auto picks CUDA, then Metal, then the CPU.
    pub device: String,
    /// Compute dtype of the models: f32 | bf16 | f16.
    pub dtype: DTypeName,
    /// Run directory for checkpoints, metrics and plots (default: runs/<command>-<time>).
    pub out: Option<PathBuf>,
    /// CPU threads for the tensor ops; 0 uses every core (or RAYON_NUM_THREADS).
    pub threads: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            seed: 42, // transformers' and TRL's default seed
            device: "auto".into(),
            dtype: DTypeName::F32,
            out: None,
            threads: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A local directory in Hugging Face layout, or a hub id `org/name`.
    pub name_or_path: String,
    /// Hub revision (branch, tag or commit); default main.
    pub revision: Option<String>,
}

/// Learning-rate schedules, named as transformers names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Peak learning rate of AdamW.
    pub learning_rate: f64,
    /// Sequences (or pairs) per forward/backward pass.
    pub per_device_train_batch_size: usize,
    /// Sequences (or pairs) per forward pass during evaluation.
    pub per_device_eval_batch_size: usize,
    /// Micro-batches whose gradients are summed before one optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Passes over the training data (ignored when max_steps is set).
    pub num_train_epochs: f64,
    /// Total optimizer steps; overrides num_train_epochs when set.
    pub max_steps: Option<u64>,
    /// Global gradient-norm clipping threshold; 0 turns clipping off.
    pub max_grad_norm: f64,
    /// constant | constant_with_warmup | linear | cosine.
    pub lr_scheduler_type: LrSchedulerType,
    /// Fraction of the steps spent warming up linearly from 0.
    pub warmup_ratio: f64,
    /// Warmup steps; when above 0 it overrides warmup_ratio.
    pub warmup_steps: u64,
    /// Decoupled (AdamW) weight decay; biases and norm weights are never decayed.
    pub weight_decay: f64,
    /// AdamW beta1.
    pub adam_beta1: f64,
    /// AdamW beta2.
    pub adam_beta2: f64,
    /// AdamW epsilon.
    pub adam_epsilon: f64,
    /// Append a metrics line every this many optimizer steps.
    pub logging_steps: u64,
    /// Write a checkpoint every this many optimizer steps.
    pub save_steps: u64,
    /// Keep only the newest this many checkpoints (unset: keep all).
    pub save_total_limit: Option<usize>,
    /// Evaluate every this many steps (unset: at the end only).
    pub eval_steps: Option<u64>,
    /// Stop the run after this many consecutive steps with a NaN/inf loss or gradient.
    pub max_nonfinite_steps: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            learning_rate: 5e-5, // transformers' default; TRL's PPOConfig uses 3e-6
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            num_train_epochs: 3.0,
            max_steps: None,
            max_grad_norm: 1.0,
            lr_scheduler_type: LrSchedulerType::Linear,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            weight_decay: 0.0, // transformers' default (candle-nn's AdamW uses 0.01)
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            logging_steps: 10, // TRL's default (transformers': 500)
            save_steps: 500,
            save_total_limit: Some(3),
            eval_steps: None,
            max_nonfinite_steps: 5,
        }
    }
}

impl TrainConfig {
    /// Sequences (or pairs) per optimizer step.
    pub fn effective_batch_size(&self) -> usize {
        self.per_device_train_batch_size * self.gradient_accumulation_steps
    }

    /// Warmup steps for a run of `total_steps`: warmup_steps when set, else
    /// ceil(warmup_ratio * total), as transformers computes it.
    pub fn warmup_steps_for(&self, total_steps: u64) -> u64 {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (self.warmup_ratio * total_steps as f64).ceil() as u64
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateConfig {
    /// Tokens to sample after the prompt.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 is greedy decoding.
    pub temperature: f64,
    /// Keep only the k most likely tokens (unset: all).
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.
    pub top_p: f64,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    /// Rows with `prompt` and `completion` (loss on the completion), or with
    /// `text` (loss on every token): a .jsonl, .jsonl.gz, .json or .parquet
    /// file, or a dataset read at `dataset_train_split`.
    pub dataset: String,
    pub dataset_train_split: String,
    /// A separate evaluation set; without it, `eval_ratio` of the rows is held out.
    pub eval_dataset: Option<String>,
    pub dataset_test_split: String,
    pub eval_ratio: f64,
    /// The text column of plain-text rows (TRL's name).
    pub dataset_text_field: String,
    /// Sequences are cut to this many tokens (TRL truncates too), and counted.
    pub max_length: usize,
    /// Loss on completion tokens only for prompt/completion rows (TRL's
    /// default); false trains on the prompt too.
    pub completion_only_loss: bool,
    /// Pack whole sequences into rows of max_length (best-fit decreasing, as
    /// TRL's "bfd"); each attends only within itself, positions restart.
    pub packing: bool,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            dataset: String::new(),
            dataset_train_split: "train".into(),
            eval_dataset: None,
            dataset_test_split: "test".into(),
            eval_ratio: 0.1,
            dataset_text_field: "text".into(),
            max_length: 1024,
            completion_only_loss: true,
            packing: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// Preference pairs with columns chosen, rejected and optionally prompt
    /// and margin: a .jsonl, .jsonl.gz, .json or .parquet file, or a dataset
    /// (hub id `org/name[@revision]` or local directory) read at split
    /// `dataset_train_split`.
    pub dataset: String,
    /// The split of a dataset repo to train on (TRL's name).
    pub dataset_train_split: String,
    /// A separate evaluation set (file, or dataset read at split
    /// `dataset_test_split`); without it, `eval_ratio` of the data is held out.
    pub eval_dataset: Option<String>,
    /// The split of `eval_dataset` when it is a dataset repo (TRL's name).
    pub dataset_test_split: String,
    /// Fraction of the pairs held out for evaluation (seeded split) when there is no eval_dataset.
    pub eval_ratio: f64,
    /// Pairs whose chosen or rejected sequence is longer than this many tokens
    /// are dropped (TRL's behaviour), or truncated when `truncate` is set.
    pub max_length: usize,
    /// Truncate over-long sequences to max_length instead of dropping the pair.
    pub truncate: bool,
    /// Adds coef * mean((r_chosen + r_rejected)^2) to the loss, keeping rewards centred.
    pub center_rewards_coefficient: Option<f64>,
    /// After training, store the mean score of the chosen training responses
    /// in config.json and subtract it from every reported score.
    pub normalize: bool,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            dataset: String::new(),
            dataset_train_split: "train".into(),
            eval_dataset: None,
            dataset_test_split: "test".into(),
            eval_ratio: 0.1,
            max_length: 1024,
            truncate: false,
            center_rewards_coefficient: None,
            normalize: false,
        }
    }
}

/// Per-token KL estimators (Schulman, "Approximating KL divergence").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    K1,
    K2,
    K3,
}

/// Where PPO's value estimates come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueModel {
    Auto,
    Reward,
    Head,
}

/// Where a sampled response is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopToken {
    Eos,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoConfig {
    /// Prompts (column `prompt`): a .jsonl, .jsonl.gz, .json or .parquet
    /// file, or a dataset (hub id or directory) read at `dataset_train_split`.
    pub dataset: String,
    pub dataset_train_split: String,
    /// Held-out prompts for evaluation every `train.eval_steps` updates and
    /// at the end (file, or dataset at `dataset_test_split`).
    pub eval_dataset: Option<String>,
    pub dataset_test_split: String,
    /// Prompts longer than this many tokens are dropped, or cut to their last
    /// tokens when `truncate_prompts` (counted either way).
    pub max_prompt_length: usize,
    pub truncate_prompts: bool,
    /// The reward model: a directory or hub id (a candle-rlhf reward model or
    /// any transformers ForSequenceClassification with one label). Library
    /// users may pass any `trainers::ppo::Reward` instead.
    pub reward_model: Option<String>,
    /// The reference model (default: a frozen copy of the initial policy).
    pub ref_model: Option<String>,
    /// Dtype of the frozen reference (default: the run's dtype).
    pub ref_dtype: Option<DTypeName>,
    /// `auto`: a critic initialized from the reward model when it shares the
    /// policy's tokenizer and is a decoder (the N+ default), else a value head
    /// on the policy; `reward`: that critic or an error; `head`: the value head.
    pub value_model: ValueModel,
    /// Entropy bonus: loss -= entropy_coef * mean token entropy.
    pub entropy_coef: f64,
    /// Learning rate of the value head or critic (OpenRLHF's name); unset:
    /// `train.learning_rate`. It follows the same schedule, scaled.
    pub critic_learning_rate: Option<f64>,
    /// On the CPU, run the critic model's forward and backward on a thread of
    /// its own beside the policy's during updates (not for a value head,
    /// which reads the policy's hidden states). Needs `run.threads = 1`:
    /// each model's ops then run on one thread, and the run uses two cores.
    /// On a small model, whose ops are too short to split across cores, this
    /// is the faster way to use two (tiny fixture: 0.040-0.044 s per PPO
    /// iteration against 0.055-0.064 s with both models on one thread); on
    /// GPT-2 small it is slower (27.7 s against 20.35 s at threads = 2), as
    /// the policy's larger half and the rollout then run on one core. See
    /// BENCHMARKS.md.
    pub critic_on_own_thread: bool,
    pub top_k: Option<usize>,
    pub top_p: f64,
    /// Adaptive KL control (Ziegler et al.): kl_coef starts at `kl_coef`
    /// (alias `init_kl_coef`) and moves toward `target` over `horizon` episodes.
    pub adap_kl_ctrl: bool,
    pub target: f64,
    pub horizon: f64,
    /// How many times over the run a few completions go to samples.jsonl (TRL's name).
    pub num_sample_generations: usize,
    /// Optimization epochs over each batch of rollouts.
    pub num_ppo_epochs: usize,
    /// Mini-batches per PPO epoch; each is one optimizer step.
    pub num_mini_batches: usize,
    /// Prompts to roll out in the whole run (unset: one pass over the prompts).
    pub total_episodes: Option<u64>,
    /// Sequences per generation/forward chunk during the rollout.
    pub local_rollout_forward_batch_size: usize,
    /// Tokens sampled per response.
    pub response_length: usize,
    /// Sampling temperature of the rollout (> 0).
    pub temperature: f64,
    /// Cut responses after this token ("eos"); unset cuts nowhere (TRL's default).
    pub stop_token: Option<StopToken>,
    /// Cut responses after this token id; overrides stop_token.
    pub stop_token_id: Option<u32>,
    /// Subtracted from the score of a response that never produced the stop token.
    pub missing_eos_penalty: Option<f64>,
    /// Weight of the per-token KL penalty in the reward.
    #[serde(alias = "init_kl_coef")]
    pub kl_coef: f64,
    /// k1 (logp - ref_logp), k2 or k3.
    pub kl_estimator: KlEstimator,
    /// Policy-ratio clipping range.
    pub cliprange: f64,
    /// Value-prediction clipping range.
    pub cliprange_value: f64,
    /// Weight of the value loss.
    pub vf_coef: f64,
    /// Discount factor.
    pub gamma: f64,
    /// GAE lambda.
    pub lam: f64,
    /// Whiten the per-token rewards before GAE.
    pub whiten_rewards: bool,
}

impl Default for PpoConfig {
    fn default() -> Self {
        // TRL PPOConfig defaults, except stop_token (TRL: none).
        Self {
            dataset: String::new(),
            dataset_train_split: "train".into(),
            eval_dataset: None,
            dataset_test_split: "test".into(),
            max_prompt_length: 64,
            truncate_prompts: false,
            reward_model: None,
            ref_model: None,
            ref_dtype: None,
            value_model: ValueModel::Auto,
            entropy_coef: 0.0,
            critic_learning_rate: None,
            critic_on_own_thread: false,
            top_k: None,
            top_p: 1.0,
            adap_kl_ctrl: false,
            target: 6.0,      // TRL's old PPOConfig
            horizon: 10000.0, // TRL's old PPOConfig
            num_sample_generations: 10,
            num_ppo_epochs: 4,
            num_mini_batches: 1,
            total_episodes: None,
            local_rollout_forward_batch_size: 64,
            response_length: 53,
            temperature: 0.7,
            stop_token: Some(StopToken::Eos), // TRL: None; we stop at EOS by default
            stop_token_id: None,
            missing_eos_penalty: None,
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            gamma: 1.0,
            lam: 0.95,
            whiten_rewards: false,
        }
    }
}

impl PpoConfig {
    /// Rollouts per PPO batch: micro-batch x accumulation x mini-batches (TRL's local_batch_size).
    pub fn local_batch_size(&self, train: &TrainConfig) -> usize {
        train.effective_batch_size() * self.num_mini_batches
    }

    /// Rollouts per optimizer step (TRL's local_mini_batch_size).
    pub fn local_mini_batch_size(&self, train: &TrainConfig) -> usize {
        train.effective_batch_size()
    }
}

/// Keys that may change between a checkpoint and its resumption: they change
/// where and how a run reports, not what it computes.
pub const RESUME_MAY_CHANGE: &[&str] = &[
    "run.device",
    "run.out",
    "run.threads",
    "train.logging_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.eval_steps",
    "train.max_nonfinite_steps",
    "train.per_device_eval_batch_size",
];

impl Config {
    /// Reads `path` (or the defaults when `None`), applies each `key.path=value`
    /// override in order, and validates the result.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Config> {
        let table = match path {
            Some(path) => {
                let source = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
                    source_name: source.clone(),
                    message: format!("cannot read the config file: {e}"),
                })?;
                // Typed parse of the file alone first: its errors carry line numbers.
                toml::from_str::<Config>(&text).map_err(|e| file_error(&source, &text, &e))?;
                text.parse::<toml::Table>()
                    .map_err(|e| file_error(&source, &text, &e))?
            }
            None => toml::Table::new(),
        };
        Self::from_table(table, overrides)
    }

    /// This config with `key.path=value` overrides applied, validated.
    pub fn with_overrides(&self, overrides: &[String]) -> Result<Config> {
        let table = toml::Table::try_from(self)
            .map_err(|e| Error::Msg(format!("cannot write config as TOML: {e}")))?;
        Self::from_table(table, overrides)
    }

    fn from_table(mut table: toml::Table, overrides: &[String]) -> Result<Config> {
        for assignment in overrides {
            apply_override(&mut table, assignment)?;
            Config::deserialize(toml::Value::Table(table.clone()))
                .map_err(|e| override_error(assignment, &e))?;
        }
        let config = Config::deserialize(toml::Value::Table(table))
            .map_err(|e| override_error("(combined)", &e))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a config from TOML text (used for configs saved in run directories).
    pub fn from_toml_str(source_name: &str, text: &str) -> Result<Config> {
        let config =
            toml::from_str::<Config>(text).map_err(|e| file_error(source_name, text, &e))?;
        config.validate()?;
        Ok(config)
    }

    /// The config as TOML text, as saved in run directories.
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string_pretty(self)
            .map_err(|e| Error::Msg(format!("cannot write config as TOML: {e}")))
    }

    /// Rejects values that parse but make no sense, naming the field.
    pub fn validate(&self) -> Result<()> {
        crate::device::parse_spec(&self.run.device).map_err(|e| Error::InvalidConfig {
            field: "run.device".into(),
            value: self.run.device.clone(),
            reason: e.to_string(),
        })?;
        let t = &self.train;
        let p = &self.ppo;
        let g = &self.generate;
        check(
            "train.learning_rate",
            t.learning_rate,
            t.learning_rate.is_finite() && t.learning_rate >= 0.0,
            "must be a finite number >= 0",
        )?;
        check(
            "train.per_device_train_batch_size",
            t.per_device_train_batch_size,
            t.per_device_train_batch_size >= 1,
            "must be at least 1",
        )?;
        check(
            "train.per_device_eval_batch_size",
            t.per_device_eval_batch_size,
            t.per_device_eval_batch_size >= 1,
            "must be at least 1",
        )?;
        check(
            "train.gradient_accumulation_steps",
            t.gradient_accumulation_steps,
            t.gradient_accumulation_steps >= 1,
            "must be at least 1",
        )?;
        check(
            "train.num_train_epochs",
            t.num_train_epochs,
            t.num_train_epochs.is_finite() && t.num_train_epochs > 0.0,
            "must be > 0",
        )?;
        if let Some(m) = t.max_steps {
            check(
                "train.max_steps",
                m,
                m >= 1,
                "must be at least 1 (leave it unset to train by epochs)",
            )?;
        }
        check(
            "train.max_grad_norm",
            t.max_grad_norm,
            t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0,
            "must be >= 0 (0 turns clipping off)",
        )?;
        check(
            "train.warmup_ratio",
            t.warmup_ratio,
            (0.0..=1.0).contains(&t.warmup_ratio),
            "must be in [0, 1]",
        )?;
        check(
            "train.weight_decay",
            t.weight_decay,
            t.weight_decay.is_finite() && t.weight_decay >= 0.0,
            "must be >= 0",
        )?;
        check(
            "train.adam_beta1",
            t.adam_beta1,
            (0.0..1.0).contains(&t.adam_beta1),
            "must be in [0, 1)",
        )?;
        check(
            "train.adam_beta2",
            t.adam_beta2,
            (0.0..1.0).contains(&t.adam_beta2),
            "must be in [0, 1)",
        )?;
        check(
            "train.adam_epsilon",
            t.adam_epsilon,
            t.adam_epsilon.is_finite() && t.adam_epsilon > 0.0,
            "must be > 0",
        )?;
        check(
            "train.logging_steps",
            t.logging_steps,
            t.logging_steps >= 1,
            "must be at least 1",
        )?;
        check(
            "train.save_steps",
            t.save_steps,
            t.save_steps >= 1,
            "must be at least 1",
        )?;
        if let Some(k) = t.save_total_limit {
            check(
                "train.save_total_limit",
                k,
                k >= 1,
                "must be at least 1 (leave it unset to keep every checkpoint)",
            )?;
        }
        if let Some(e) = t.eval_steps {
            check("train.eval_steps", e, e >= 1, "must be at least 1")?;
        }
        check(
            "train.max_nonfinite_steps",
            t.max_nonfinite_steps,
            t.max_nonfinite_steps >= 1,
            "must be at least 1",
        )?;

        check(
            "generate.max_new_tokens",
            g.max_new_tokens,
            g.max_new_tokens >= 1,
            "must be at least 1",
        )?;
        check(
            "generate.temperature",
            g.temperature,
            g.temperature.is_finite() && g.temperature >= 0.0,
            "must be >= 0 (0 is greedy)",
        )?;
        check(
            "generate.top_p",
            g.top_p,
            g.top_p > 0.0 && g.top_p <= 1.0,
            "must be in (0, 1]",
        )?;
        if let Some(k) = g.top_k {
            check(
                "generate.top_k",
                k,
                k >= 1,
                "must be at least 1 (leave it unset for no top-k)",
            )?;
        }

        check(
            "sft.max_length",
            self.sft.max_length,
            self.sft.max_length >= 2,
            "must be at least 2 tokens",
        )?;
        check(
            "sft.eval_ratio",
            self.sft.eval_ratio,
            (0.0..1.0).contains(&self.sft.eval_ratio),
            "must be in [0, 1)",
        )?;

        check(
            "reward.max_length",
            self.reward.max_length,
            self.reward.max_length >= 2,
            "must be at least 2 tokens",
        )?;
        check(
            "reward.eval_ratio",
            self.reward.eval_ratio,
            (0.0..1.0).contains(&self.reward.eval_ratio),
            "must be in [0, 1)",
        )?;
        if let Some(c) = self.reward.center_rewards_coefficient {
            check(
                "reward.center_rewards_coefficient",
                c,
                c.is_finite() && c >= 0.0,
                "must be >= 0",
            )?;
        }

        check(
            "ppo.num_ppo_epochs",
            p.num_ppo_epochs,
            p.num_ppo_epochs >= 1,
            "must be at least 1",
        )?;
        check(
            "ppo.num_mini_batches",
            p.num_mini_batches,
            p.num_mini_batches >= 1,
            "must be at least 1",
        )?;
        check(
            "ppo.local_rollout_forward_batch_size",
            p.local_rollout_forward_batch_size,
            p.local_rollout_forward_batch_size >= 1,
            "must be at least 1",
        )?;
        let batch = p.local_batch_size(t);
        let chunk = p.local_rollout_forward_batch_size;
        check(
            "ppo.local_rollout_forward_batch_size",
            chunk,
            chunk >= batch || batch.is_multiple_of(chunk),
            &format!("must divide the rollout batch of {batch} (per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches) so chunks are equal, or be at least {batch}"),
        )?;
        if let Some(n) = p.total_episodes {
            check(
                "ppo.total_episodes",
                n,
                n >= batch as u64,
                &format!("must be at least one rollout batch ({batch})"),
            )?;
        }
        check(
            "ppo.response_length",
            p.response_length,
            p.response_length >= 1,
            "must be at least 1",
        )?;
        check(
            "ppo.temperature",
            p.temperature,
            p.temperature.is_finite() && p.temperature > 0.0,
            "must be > 0: PPO samples its rollouts",
        )?;
        check(
            "ppo.kl_coef",
            p.kl_coef,
            p.kl_coef.is_finite() && p.kl_coef >= 0.0,
            "must be >= 0",
        )?;
        check(
            "ppo.cliprange",
            p.cliprange,
            p.cliprange.is_finite() && p.cliprange > 0.0,
            "must be > 0",
        )?;
        check(
            "ppo.cliprange_value",
            p.cliprange_value,
            p.cliprange_value.is_finite() && p.cliprange_value > 0.0,
            "must be > 0",
        )?;
        check(
            "ppo.vf_coef",
            p.vf_coef,
            p.vf_coef.is_finite() && p.vf_coef >= 0.0,
            "must be >= 0",
        )?;
        check(
            "ppo.gamma",
            p.gamma,
            (0.0..=1.0).contains(&p.gamma),
            "must be in [0, 1]",
        )?;
        check(
            "ppo.lam",
            p.lam,
            (0.0..=1.0).contains(&p.lam),
            "must be in [0, 1]",
        )?;
        check(
            "ppo.max_prompt_length",
            p.max_prompt_length,
            p.max_prompt_length >= 1,
            "must be at least 1",
        )?;
        check(
            "ppo.top_p",
            p.top_p,
            p.top_p > 0.0 && p.top_p <= 1.0,
            "must be in (0, 1]",
        )?;
        check(
            "ppo.entropy_coef",
            p.entropy_coef,
            p.entropy_coef.is_finite() && p.entropy_coef >= 0.0,
            "must be >= 0",
        )?;
        check(
            "ppo.target",
            p.target,
            p.target.is_finite() && p.target > 0.0,
            "must be > 0",
        )?;
        check(
            "ppo.horizon",
            p.horizon,
            p.horizon.is_finite() && p.horizon > 0.0,
            "must be > 0",
        )?;
        check(
            "ppo.critic_on_own_thread",
            p.critic_on_own_thread,
            !p.critic_on_own_thread || self.run.threads == 1,
            &format!(
                "needs run.threads = 1 (each model's ops on one thread, two cores in all), not {}",
                self.run.threads
            ),
        )?;
        if let Some(lr) = p.critic_learning_rate {
            check(
                "ppo.critic_learning_rate",
                lr,
                lr.is_finite() && lr > 0.0,
                "must be > 0",
            )?;
        }
        if let Some(pen) = p.missing_eos_penalty {
            check(
                "ppo.missing_eos_penalty",
                pen,
                pen.is_finite(),
                "must be finite",
            )?;
        }
        Ok(())
    }

    /// Every leaf of the config as `section.key` -> value (unset options absent).
    pub fn flatten(&self) -> BTreeMap<String, serde_json::Value> {
        let mut out = BTreeMap::new();
        if let Ok(value) = serde_json::to_value(self) {
            flatten_into("", &value, &mut out);
        }
        out
    }

    /// The first key, in sorted order, whose value differs from `saved` and
    /// that is not in [`RESUME_MAY_CHANGE`]: `(key, was, now)`.
    pub fn resume_difference(&self, saved: &Config) -> Option<(String, String, String)> {
        let now = self.flatten();
        let was = saved.flatten();
        let keys: std::collections::BTreeSet<&String> = now.keys().chain(was.keys()).collect();
        let changed = keys
            .into_iter()
            .filter(|k| !RESUME_MAY_CHANGE.contains(&k.as_str()))
            .find(|k| now.get(*k) != was.get(*k))
            .map(|k| (k.clone(), show(was.get(k)), show(now.get(k))));
        changed
    }
}

fn show(v: Option<&serde_json::Value>) -> String {
    v.map_or_else(|| "unset".to_string(), |v| v.to_string())
}

fn flatten_into(
    prefix: &str,
    value: &serde_json::Value,
    out: &mut BTreeMap<String, serde_json::Value>,
) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_into(&key, v, out);
            }
        }
        serde_json::Value::Null => {}
        leaf => {
            out.insert(prefix.to_string(), leaf.clone());
        }
    }
}

fn check(field: &str, value: impl std::fmt::Display, ok: bool, reason: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        })
    }
}

/// Applies `a.b.c=value` to a TOML table. The value is read as TOML (numbers,
/// booleans, quoted strings, arrays); anything that is not TOML is a string.
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let bad = |message: String| Error::Config {
        source_name: format!("--set {assignment}"),
        message,
    };
    let (key, raw) = assignment.split_once('=').ok_or_else(|| {
        bad("expected key.path=value, as in --set train.learning_rate=1e-5".into())
    })?;
    let path: Vec<&str> = key.trim().split('.').map(str::trim).collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(bad(format!("`{key}` is not a key path")));
    }
    let raw = raw.trim();
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut node = table;
    for part in &path[..path.len() - 1] {
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry
            .as_table_mut()
            .ok_or_else(|| bad(format!("`{part}` is a value, not a section")))?;
    }
    node.insert(path[path.len() - 1].to_string(), value);
    Ok(())
}

/// The words in backticks of a serde message: for "unknown field `x`,
/// expected one of `a`, `b`" that is [x, a, b].
fn backticked(message: &str) -> Vec<&str> {
    message.split('`').skip(1).step_by(2).collect()
}

/// Rewrites serde's "unknown field `x`, expected one of ..." as
/// "unknown key `x` (did you mean `prefix.y`?)"; the full list of keys is
/// given only when none is near. Other messages pass through.
fn explain(message: &str, prefix: &str) -> String {
    if !message.starts_with("unknown field") {
        return message.to_string();
    }
    let words = backticked(message);
    let Some((wrong, known)) = words.split_first() else {
        return message.to_string();
    };
    let nearest = known
        .iter()
        .min_by_key(|k| edit_distance(wrong, k))
        .filter(|k| edit_distance(wrong, k) <= (wrong.len() / 3).max(2));
    match nearest {
        Some(k) => format!("unknown key `{wrong}` (did you mean `{prefix}{k}`?)"),
        None => format!("unknown key `{wrong}`; known keys: {}", known.join(", ")),
    }
}

fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or(message).trim()
}

/// One line for a TOML error in a file: line number, section and message,
/// with the nearest key when a key is unknown.
fn file_error(source_name: &str, text: &str, err: &toml::de::Error) -> Error {
    let message = first_line(err.message()).to_string();
    let mut located = String::new();
    if let Some(span) = err.span() {
        let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
        located = format!("line {line_no}: ");
        let section = text
            .lines()
            .take(line_no - 1)
            .filter_map(|l| {
                let l = l.trim();
                (l.starts_with('[') && l.ends_with(']'))
                    .then(|| l.trim_matches(|c| c == '[' || c == ']').to_string())
            })
            .last();
        let this_line = text.lines().nth(line_no - 1).unwrap_or("").trim();
        if let (Some(section), false) = (section, this_line.starts_with('[')) {
            located.push_str(&format!("[{section}] "));
        }
    }
    Error::Config {
        source_name: source_name.into(),
        message: format!("{located}{}", explain(&message, "")),
    }
}

fn override_error(assignment: &str, err: &toml::de::Error) -> Error {
    let message = first_line(err.message()).to_string();
    let key = assignment
        .split_once('=')
        .map_or(assignment, |(k, _)| k.trim());
    let parent = key
        .rsplit_once('.')
        .map(|(p, _)| format!("{p}."))
        .unwrap_or_default();
    Error::Config {
        source_name: format!("--set {assignment}"),
        message: explain(&message, &parent),
    }
}

/// Levenshtein distance, for "did you mean" hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + (ca != *cb) as usize)
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("lerning_rate", "learning_rate"), 1);
        assert_eq!(edit_distance("abc", "abc"), 0);
        assert_eq!(edit_distance("", "ab"), 2);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn override_values_are_typed_as_toml() {
        let mut t = toml::Table::new();
        apply_override(&mut t, "train.learning_rate=1e-5").unwrap();
        apply_override(&mut t, "model.name_or_path=org/name").unwrap();
        apply_override(&mut t, "ppo.whiten_rewards = true").unwrap();
        assert_eq!(t["train"]["learning_rate"].as_float(), Some(1e-5));
        assert_eq!(t["model"]["name_or_path"].as_str(), Some("org/name"));
        assert_eq!(t["ppo"]["whiten_rewards"].as_bool(), Some(true));
        assert!(apply_override(&mut t, "no_equals_sign").is_err());
        assert!(apply_override(&mut t, "train..x=1").is_err());
    }
}
