//! The sections of a config file, one struct each. Every key is written
//! once, as a sheet: its one-line doc, its type and its default, with the
//! reason where the default departs from TRL's or transformers'.
//!
//! `[sft]`, `[reward]`, `[dpo]`, `[ppo]`, `[grpo]` and `[rloo]` share the four dataset keys, declared
//! once in [`dataset_section!`]. They are plain fields of each section, not
//! a `#[serde(flatten)]` struct, because serde's `flatten` does not combine
//! with `deny_unknown_fields`: a misspelt key must still be refused with the
//! nearest known one, on its line.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::device::DTypeName;
use crate::{Error, Result};

/// Declares a config section: `pub field: Type = default,` with a doc line
/// per field. The struct refuses unknown keys and takes each missing key's
/// default.
macro_rules! section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty = $default:expr ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        impl $name {
            /// Every key as written here: name, Rust type and attributes
            /// (its doc lines, serde aliases), for docs/config.md.
            pub const KEYS: &'static [super::reference::KeySheet] = &[
                $( super::reference::KeySheet {
                    name: stringify!($field),
                    ty: stringify!($ty),
                    attrs: stringify!($(#[$fmeta])*),
                }, )*
            ];
        }
    };
}

/// A section that reads a data set: the shared dataset keys, then its own.
macro_rules! dataset_section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident ($section:literal) { $($rest:tt)* }
    ) => {
        section! {
            $(#[$meta])*
            pub struct $name {
                /// Training rows: a .jsonl, .jsonl.gz, .json or .parquet file, or a dataset (hub id `org/name[@revision]` or local directory) read at `dataset_train_split`.
                pub dataset: String = String::new(),
                /// The split of a dataset repo to train on (TRL's name).
                pub dataset_train_split: String = "train".into(),
                /// A separate evaluation set (a file, or a dataset read at `dataset_test_split`).
                pub eval_dataset: Option<String> = None,
                /// The split of `eval_dataset` when it is a dataset repo (TRL's name).
                pub dataset_test_split: String = "test".into(),
                $($rest)*
            }
        }

        impl $name {
            /// The dataset keys of this section.
            pub fn data(&self) -> DatasetConfig<'_> {
                DatasetConfig {
                    section: $section,
                    dataset: &self.dataset,
                    train_split: &self.dataset_train_split,
                    eval_dataset: self.eval_dataset.as_deref(),
                    test_split: &self.dataset_test_split,
                }
            }
        }
    };
}

/// The dataset keys every data-reading section shares, as one value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DatasetConfig<'a> {
    /// The section they come from (`sft`, `reward`, `ppo`), for messages.
    pub section: &'static str,
    pub dataset: &'a str,
    pub train_split: &'a str,
    pub eval_dataset: Option<&'a str>,
    pub test_split: &'a str,
}

impl<'a> DatasetConfig<'a> {
    /// The training set, or an error naming `<section>.dataset` when unset.
    pub fn train(&self) -> Result<&'a str> {
        if self.dataset.is_empty() {
            return Err(Error::InvalidConfig {
                field: format!("{}.dataset", self.section),
                value: String::new(),
                reason: "a data file, a dataset directory or a hub dataset id is required".into(),
            });
        }
        Ok(self.dataset)
    }
}

section! {
    /// Seed, device, dtype and run directory.
    pub struct RunConfig {
        /// Seed of every random draw in the run (initialization, shuffling, sampling); 42 as in transformers and TRL.
        pub seed: u64 = 42,
        /// auto | cpu | cuda[:N] | metal[:N]; auto picks CUDA, then Metal, then the CPU.
        pub device: String = "auto".into(),
        /// Compute dtype of the models: f32 | bf16 | f16.
        pub dtype: DTypeName = DTypeName::F32,
        /// Run directory for checkpoints, metrics and plots (default: runs/<command>-<time>).
        pub out: Option<PathBuf> = None,
        /// CPU threads for the tensor ops; 0 uses every core (or RAYON_NUM_THREADS), under mpirun the node's cores divided by its ranks.
        pub threads: usize = 0,
    }
}

section! {
    /// The model to start from.
    pub struct ModelConfig {
        /// A local directory in Hugging Face layout, or a hub id `org/name[@revision]`.
        pub name_or_path: String = String::new(),
        /// Hub revision (branch, tag or commit) of a hub id; unset: the id's `@revision`, else main.
        pub revision: Option<String> = None,
        /// A chat template file (Jinja) that wins over the model's own (`--chat-template FILE`).
        pub chat_template: Option<PathBuf> = None,
        /// pretrained: the checkpoint's weights; random: the same architecture initialised as transformers' `_init_weights` does (sft and reward).
        pub init: ModelInit = ModelInit::Pretrained,
    }
}

/// Where a trained model's weights start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelInit {
    Pretrained,
    Random,
}

impl ModelConfig {
    /// The model argument with `revision` applied: `name_or_path@revision`
    /// for a hub id. An error when `revision` conflicts with an `@revision`
    /// in the id, or when the model is a local directory.
    pub fn resolved_name(&self) -> Result<String> {
        let Some(rev) = &self.revision else {
            return Ok(self.name_or_path.clone());
        };
        let bad = |reason: String| Error::InvalidConfig {
            field: "model.revision".into(),
            value: rev.clone(),
            reason,
        };
        if std::path::Path::new(&self.name_or_path).exists() {
            return Err(bad(format!(
                "{} is a local directory; a revision applies to hub ids only",
                self.name_or_path
            )));
        }
        match self.name_or_path.split_once('@') {
            Some((_, given)) if given == rev => Ok(self.name_or_path.clone()),
            Some((_, given)) => Err(bad(format!(
                "conflicts with the revision `{given}` in model.name_or_path `{}`",
                self.name_or_path
            ))),
            None => Ok(format!("{}@{rev}", self.name_or_path)),
        }
    }
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

section! {
    /// Optimizer, schedule, batching, logging and checkpointing shared by every trainer.
    pub struct TrainConfig {
        /// Peak learning rate of AdamW (transformers' default; TRL's PPOConfig uses 3e-6).
        pub learning_rate: f64 = 5e-5,
        /// Sequences (or pairs) per forward/backward pass.
        pub per_device_train_batch_size: usize = 8,
        /// Sequences (or pairs) per forward pass during evaluation.
        pub per_device_eval_batch_size: usize = 8,
        /// Micro-batches whose gradients are summed before one optimizer step.
        pub gradient_accumulation_steps: usize = 1,
        /// Passes over the training data (ignored when max_steps is set).
        pub num_train_epochs: f64 = 3.0,
        /// Total optimizer steps; overrides num_train_epochs when set.
        pub max_steps: Option<u64> = None,
        /// Global gradient-norm clipping threshold; 0 turns clipping off.
        pub max_grad_norm: f64 = 1.0,
        /// constant | constant_with_warmup | linear | cosine.
        pub lr_scheduler_type: LrSchedulerType = LrSchedulerType::Linear,
        /// Fraction of the steps spent warming up linearly from 0.
        pub warmup_ratio: f64 = 0.0,
        /// Warmup steps; when above 0 it overrides warmup_ratio.
        pub warmup_steps: u64 = 0,
        /// Decoupled (AdamW) weight decay, transformers' default 0 (candle-nn's AdamW: 0.01); biases and norm weights are never decayed.
        pub weight_decay: f64 = 0.0,
        /// AdamW beta1.
        pub adam_beta1: f64 = 0.9,
        /// AdamW beta2.
        pub adam_beta2: f64 = 0.999,
        /// AdamW epsilon.
        pub adam_epsilon: f64 = 1e-8,
        /// Append a metrics line every this many optimizer steps (TRL's default; transformers': 500).
        pub logging_steps: u64 = 10,
        /// Write a checkpoint every this many optimizer steps.
        pub save_steps: u64 = 500,
        /// Keep only the newest this many checkpoints (transformers: keep all; unset keeps all).
        pub save_total_limit: Option<usize> = Some(3),
        /// Evaluate every this many steps (unset: at the end only).
        pub eval_steps: Option<u64> = None,
        /// Evaluate before the first update (transformers' name). Unset: false for sft, reward and dpo (as in transformers), true for ppo, grpo and rloo.
        pub eval_on_start: Option<bool> = None,
        /// Stop the run after this many consecutive steps with a NaN/inf loss or gradient.
        pub max_nonfinite_steps: usize = 5,
        /// Keep each layer's input only and recompute its inside in the backward, in every trained model (transformers 5.23's name; the alias `gradient_checkpointing` is TRL's, default true in its configs). Trained weights are bit-identical on and off; on costs about one more forward per step and saves most activation memory.
        #[serde(alias = "gradient_checkpointing")]
        pub activation_checkpointing: bool = true,
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

section! {
    /// Sampling settings for `generate`.
    pub struct GenerateConfig {
        /// Tokens to sample after the prompt.
        pub max_new_tokens: usize = 64,
        /// Softmax temperature; 0 is greedy decoding.
        pub temperature: f64 = 1.0,
        /// Keep only the k most likely tokens (unset: all).
        pub top_k: Option<usize> = None,
        /// Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.
        pub top_p: f64 = 1.0,
    }
}

dataset_section! {
    /// Supervised fine-tuning (TRL's SFTConfig). Rows have `prompt` and
    /// `completion` (loss on the completion) or `text` (loss on every token).
    pub struct SftConfig("sft") {
        /// Fraction of the rows held out for evaluation (seeded split) when there is no eval_dataset.
        pub eval_ratio: f64 = 0.1,
        /// The text column of plain-text rows (TRL's name).
        pub dataset_text_field: String = "text".into(),
        /// Sequences are cut to this many tokens (TRL truncates too), and counted.
        pub max_length: usize = 1024,
        /// Loss on completion tokens only for prompt/completion rows (TRL's default); false trains on the prompt too.
        pub completion_only_loss: bool = true,
        /// Conversational `messages` rows: loss on assistant turns only, as the chat template's `{% generation %}` blocks mark them (TRL's name; false: every token).
        pub assistant_only_loss: bool = false,
        /// Pack whole sequences into rows of max_length (best-fit decreasing, TRL's "bfd"); each attends only within itself, positions restart.
        pub packing: bool = false,
    }
}

dataset_section! {
    /// Reward-model training (TRL's RewardConfig). Rows have `chosen`,
    /// `rejected` and optionally `prompt` and `margin`.
    pub struct RewardConfig("reward") {
        /// Fraction of the pairs held out for evaluation (seeded split) when there is no eval_dataset.
        pub eval_ratio: f64 = 0.1,
        /// Pairs with a sequence longer than this many tokens are dropped (TRL's behaviour), or truncated when `truncate` is set.
        pub max_length: usize = 1024,
        /// Truncate over-long sequences to max_length instead of dropping the pair.
        pub truncate: bool = false,
        /// Adds coef * mean((r_chosen + r_rejected)^2) to the loss, keeping rewards centred.
        pub center_rewards_coefficient: Option<f64> = None,
        /// After training, store the mean score of the chosen training responses in config.json and subtract it from every reported score.
        pub normalize: bool = false,
        /// Turn off dropout in the reward model (TRL's name and default; the only dropout here is LoRA's lora_dropout).
        pub disable_dropout: bool = true,
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

/// How PPO turns rewards into advantages (OpenRLHF's `advantage_estimator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageEstimator {
    /// GAE with a critic (PPO).
    Gae,
    /// REINFORCE++: the per-token rewards' returns, whitened over the batch; no critic.
    Reinforce,
    /// REINFORCE++-baseline: each score minus its prompt group's mean, then as reinforce; no critic.
    ReinforceBaseline,
}

/// Where a sampled response is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopToken {
    Eos,
}

dataset_section! {
    /// PPO (TRL's PPOConfig, with its defaults unless a line says otherwise).
    /// Rows have `prompt` (or TRL's pre-tokenized `input_ids`).
    pub struct PpoConfig("ppo") {
        /// Prompts longer than this many tokens are dropped, or cut when `truncate_prompts` (counted either way).
        pub max_prompt_length: usize = 64,
        /// Cut over-long prompts to their last max_prompt_length tokens instead of dropping them.
        pub truncate_prompts: bool = false,
        /// The reward model: a directory or hub id (a candle-rlhf reward model or a transformers ForSequenceClassification with one label); library users may pass any `rewards::Reward`.
        pub reward_model: Option<String> = None,
        /// The reference model (default: a frozen copy of the initial policy).
        pub ref_model: Option<String> = None,
        /// Dtype of the frozen reference (default: the run's dtype). Under LoRA another dtype than the run's loads a second copy of the base instead of sharing the policy's.
        pub ref_dtype: Option<DTypeName> = None,
        /// Dtype the reward model of `reward_model` scores in (unset: f32); a critic started from it trains in the run's dtype.
        pub reward_model_dtype: Option<DTypeName> = None,
        /// auto: a critic from the reward model when it is a decoder sharing the policy's tokenizer (the N+ default), else a value head; reward: that critic or an error; head: the value head.
        pub value_model: ValueModel = ValueModel::Auto,
        /// Entropy bonus: loss -= entropy_coef * mean token entropy.
        pub entropy_coef: f64 = 0.0,
        /// Learning rate of the value head or critic (OpenRLHF's name); unset: `train.learning_rate`. It follows the same schedule, scaled.
        pub critic_learning_rate: Option<f64> = None,
        /// CPU only: the critic model's forward and backward on a thread of its own beside the policy's (needs run.threads = 1; faster on small models only, see BENCHMARKS.md).
        pub critic_on_own_thread: bool = false,
        /// Rollout sampling: keep only the k most likely tokens (unset: all).
        pub top_k: Option<usize> = None,
        /// Rollout sampling: nucleus threshold in (0, 1].
        pub top_p: f64 = 1.0,
        /// Adaptive KL control (Ziegler et al.): kl_coef moves toward `target` over `horizon` episodes.
        pub adap_kl_ctrl: bool = false,
        /// Adaptive KL: the KL per sequence to aim at (TRL's old PPOConfig).
        pub target: f64 = 6.0,
        /// Adaptive KL: episodes over which kl_coef moves (TRL's old PPOConfig).
        pub horizon: f64 = 10000.0,
        /// How many times over the run a few completions go to samples.jsonl (TRL's name).
        pub num_sample_generations: usize = 10,
        /// Optimization epochs over each batch of rollouts.
        pub num_ppo_epochs: usize = 4,
        /// Mini-batches per PPO epoch; each is one optimizer step.
        pub num_mini_batches: usize = 1,
        /// Prompts to roll out in the whole run (unset: one pass over the prompts).
        pub total_episodes: Option<u64> = None,
        /// Sequences per generation/forward chunk during the rollout.
        pub local_rollout_forward_batch_size: usize = 64,
        /// Tokens sampled per response.
        pub response_length: usize = 53,
        /// Sampling temperature of the rollout (> 0).
        pub temperature: f64 = 0.7,
        /// Cut responses after this token ("eos"); unset cuts nowhere. TRL: unset; we stop at EOS by default.
        pub stop_token: Option<StopToken> = Some(StopToken::Eos),
        /// Cut responses after this token id; overrides stop_token.
        pub stop_token_id: Option<u32> = None,
        /// Subtracted from the score of a response that never produced the stop token.
        pub missing_eos_penalty: Option<f64> = None,
        /// Weight of the per-token KL penalty in the reward (alias `init_kl_coef`).
        #[serde(alias = "init_kl_coef")]
        pub kl_coef: f64 = 0.05,
        /// k1 (logp - ref_logp), k2 or k3.
        pub kl_estimator: KlEstimator = KlEstimator::K1,
        /// Policy-ratio clipping range.
        pub cliprange: f64 = 0.2,
        /// Value-prediction clipping range.
        pub cliprange_value: f64 = 0.2,
        /// Weight of the value loss.
        pub vf_coef: f64 = 0.1,
        /// Discount factor.
        pub gamma: f64 = 1.0,
        /// GAE lambda.
        pub lam: f64 = 0.95,
        /// Whiten the per-token rewards before GAE.
        pub whiten_rewards: bool = false,
        /// gae (with the critic) | reinforce | reinforce_baseline (OpenRLHF's names; no critic is built for the last two).
        pub advantage_estimator: AdvantageEstimator = AdvantageEstimator::Gae,
        /// Responses sampled per prompt in a rollout batch (OpenRLHF's name); reinforce_baseline's group.
        pub n_samples_per_prompt: usize = 1,
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

/// What a `[[reward_funcs]]` table computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardFuncType {
    /// A reward model (a directory or hub id in `model`).
    Model,
    /// 1.0 when `pattern` matches somewhere in the completion, else 0.0.
    Regex,
    /// 1.0 when `pattern`'s first capture group equals the row's `column`, trimmed.
    ExactMatch,
    /// -|completion tokens - target| / target.
    Length,
    /// An external program: JSON lines in on stdin, one number per line out.
    Command,
    /// An OpenRLHF-style remote reward model: POST `{query, prompts, labels}`, read `{rewards}`.
    Http,
}

section! {
    /// One reward function (TRL's `reward_funcs`, one table each); the run's
    /// reward is their weighted sum.
    pub struct RewardFuncConfig {
        /// Its name in the metrics (`rewards/<name>/mean`); unique.
        pub name: String = String::new(),
        /// model | regex | exact_match | length | command | http.
        #[serde(rename = "type")]
        pub kind: RewardFuncType = RewardFuncType::Regex,
        /// Weight in the sum of rewards (TRL's `reward_weights`).
        pub weight: f64 = 1.0,
        /// type = model: the reward model, a directory or hub id.
        pub model: Option<String> = None,
        /// type = model: the dtype it scores in (f32 | bf16 | f16; unset: f32).
        pub dtype: Option<DTypeName> = None,
        /// type = regex: the pattern to find; exact_match: the pattern whose first capture group is the answer (unset: the whole completion).
        pub pattern: Option<String> = None,
        /// type = exact_match: the row's column holding the expected answer; http: the column sent as `labels` (default `label` when the rows have it).
        pub column: Option<String> = None,
        /// type = length: the target length in completion tokens.
        pub target: Option<usize> = None,
        /// type = command: the program and its arguments.
        pub command: Vec<String> = Vec::new(),
        /// type = http: the URL to POST to.
        pub url: Option<String> = None,
        /// type = command or http: seconds before the scorer counts as failed.
        pub timeout_s: f64 = 60.0,
    }
}

/// How GRPO normalizes a token's loss (TRL GRPOConfig's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLossType {
    /// Each sequence's token mean, then the mean over sequences (the GRPO paper).
    Grpo,
    /// Sum over tokens / (sequences x max_completion_length) (Dr. GRPO).
    DrGrpo,
    /// Sum over tokens / the tokens of the whole optimizer step (DAPO).
    Dapo,
    /// Sum over tokens / the tokens of the micro-batch.
    Bnpo,
}

/// How GRPO scales its group-relative advantages (TRL GRPOConfig's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// By the standard deviation of the prompt's group (the GRPO paper).
    Group,
    /// By the standard deviation of the whole batch (Liu et al., "Understanding R1-Zero-Like Training").
    Batch,
    /// Not at all (Dr. GRPO).
    None,
}

/// Token-level ratios (GRPO) or one ratio per sequence from the mean log-ratio (GSPO).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSamplingLevel {
    Token,
    Sequence,
}

/// A critic-free online section (`[grpo]`, `[rloo]`): the dataset keys, the
/// keys GRPO and RLOO share (declared once, here), then its own (with
/// `num_generations` and `beta`, whose defaults and meanings differ).
macro_rules! online_section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident ($section:literal) {
            $($rest:tt)*
        }
    ) => {
        dataset_section! {
            $(#[$meta])*
            pub struct $name($section) {
                /// Completions per held-out prompt in evaluation (TRL's name; unset: num_generations).
                pub num_generations_eval: Option<usize> = None,
                /// Prompts longer than this many tokens are dropped, or cut when `truncate_prompts`. TRL 1.12 has no such key (prompts are never cut); here it bounds the padded batch.
                pub max_prompt_length: usize = 512,
                /// Cut over-long prompts to their last max_prompt_length tokens instead of dropping them.
                pub truncate_prompts: bool = false,
                /// Tokens sampled per completion at most (TRL 1.12's default).
                pub max_completion_length: usize = 512,
                /// Sampling temperature (> 0).
                pub temperature: f64 = 1.0,
                /// Nucleus sampling threshold in (0, 1].
                pub top_p: f64 = 1.0,
                /// Keep only the k most likely tokens (unset: all; TRL's 0).
                pub top_k: Option<usize> = None,
                /// Lower clipping range of the importance ratio.
                pub epsilon: f64 = 0.2,
                /// Upper clipping range (unset: epsilon; DAPO uses 0.28).
                pub epsilon_high: Option<f64> = None,
                /// Optimization passes over each generation batch (mu in the GRPO paper).
                pub num_iterations: usize = 1,
                /// Micro-batches per generation batch (unset: train.gradient_accumulation_steps).
                pub steps_per_generation: Option<usize> = None,
                /// Completions cut at max_completion_length without a stop token are left out of the loss.
                pub mask_truncated_completions: bool = false,
                /// The reference model when beta > 0 (default: a frozen copy of the initial policy).
                pub ref_model: Option<String> = None,
                /// Dtype of the frozen reference (default: the run's dtype). Under LoRA another dtype than the run's loads a second copy of the base instead of sharing the policy's.
                pub ref_dtype: Option<DTypeName> = None,
                /// How many times over the run a few completions go to samples.jsonl.
                pub num_sample_generations: usize = 10,
                /// Turn off dropout in the policy (TRL's name and default; the only dropout here is LoRA's lora_dropout).
                pub disable_dropout: bool = false,
                $($rest)*
            }
        }

        impl $name {
            /// The keys GRPO and RLOO share, as one value.
            pub fn online(&self) -> OnlineKeys<'_> {
                OnlineKeys {
                    section: $section,
                    data: self.data(),
                    num_generations: self.num_generations,
                    num_generations_eval: self.num_generations_eval,
                    max_prompt_length: self.max_prompt_length,
                    truncate_prompts: self.truncate_prompts,
                    max_completion_length: self.max_completion_length,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    beta: self.beta,
                    epsilon: self.epsilon,
                    epsilon_high: self.epsilon_high,
                    num_iterations: self.num_iterations,
                    steps_per_generation: self.steps_per_generation,
                    mask_truncated_completions: self.mask_truncated_completions,
                    ref_model: self.ref_model.as_deref(),
                    ref_dtype: self.ref_dtype,
                    num_sample_generations: self.num_sample_generations,
                    disable_dropout: self.disable_dropout,
                }
            }
        }
    };
}

/// The keys `[grpo]` and `[rloo]` share (see [`online_section!`]), as one value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OnlineKeys<'a> {
    pub section: &'static str,
    pub data: DatasetConfig<'a>,
    pub num_generations: usize,
    pub num_generations_eval: Option<usize>,
    pub max_prompt_length: usize,
    pub truncate_prompts: bool,
    pub max_completion_length: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: Option<usize>,
    pub beta: f64,
    pub epsilon: f64,
    pub epsilon_high: Option<f64>,
    pub num_iterations: usize,
    pub steps_per_generation: Option<usize>,
    pub mask_truncated_completions: bool,
    pub ref_model: Option<&'a str>,
    pub ref_dtype: Option<DTypeName>,
    pub num_sample_generations: usize,
    pub disable_dropout: bool,
}

online_section! {
    /// GRPO (TRL's GRPOConfig, with its defaults unless a line says
    /// otherwise). Rows have `prompt` (text or messages); their other
    /// columns go to the reward functions. Optimizer, batch sizes, steps and
    /// schedule come from `[train]`.
    pub struct GrpoConfig("grpo") {
        /// Completions sampled per prompt (the group; at least 2).
        pub num_generations: usize = 8,
        /// Weight of the k3 KL to the reference in the loss; 0 loads no reference model.
        pub beta: f64 = 0.0,
        /// grpo | dr_grpo | dapo | bnpo.
        pub loss_type: GrpoLossType = GrpoLossType::Dapo,
        /// group | batch | none: what divides the reward minus its group mean.
        pub scale_rewards: ScaleRewards = ScaleRewards::Group,
        /// token (GRPO) | sequence (GSPO).
        pub importance_sampling_level: ImportanceSamplingLevel = ImportanceSamplingLevel::Token,
    }
}

online_section! {
    /// RLOO (TRL's RLOOConfig, with its defaults unless a line says
    /// otherwise). Rows have `prompt` (text or messages); their other
    /// columns go to the reward functions. Optimizer, batch sizes, steps and
    /// schedule come from `[train]`.
    pub struct RlooConfig("rloo") {
        /// Completions sampled per prompt (the group; at least 2).
        pub num_generations: usize = 2,
        /// Weight of the sequence KL (summed k1) subtracted from the reward; 0 loads no reference model.
        pub beta: f64 = 0.05,
        /// Whiten the advantages over the generation batch.
        pub normalize_advantages: bool = false,
        /// Clamp the summed reward to [min, max] before the KL penalty (unset: no clamp).
        pub reward_clip_range: Option<[f64; 2]> = None,
    }
}

/// One DPO loss (TRL 1.12's `loss_type` names; see `rl::dpo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossType {
    Sigmoid,
    Hinge,
    Ipo,
    ExoPair,
    NcaPair,
    Robust,
    BcoPair,
    SppoHard,
    Aot,
    AotUnpaired,
    ApoZero,
    ApoDown,
    Discopop,
    Sft,
    SigmoidNorm,
}

impl DpoLossType {
    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sigmoid => "sigmoid",
            Self::Hinge => "hinge",
            Self::Ipo => "ipo",
            Self::ExoPair => "exo_pair",
            Self::NcaPair => "nca_pair",
            Self::Robust => "robust",
            Self::BcoPair => "bco_pair",
            Self::SppoHard => "sppo_hard",
            Self::Aot => "aot",
            Self::AotUnpaired => "aot_unpaired",
            Self::ApoZero => "apo_zero",
            Self::ApoDown => "apo_down",
            Self::Discopop => "discopop",
            Self::Sft => "sft",
            Self::SigmoidNorm => "sigmoid_norm",
        }
    }
}

/// The f-divergence of f-DPO (Wang et al., 2023): what a log-ratio becomes before the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FDivergenceType {
    ReverseKl,
    ForwardKl,
    JsDivergence,
    AlphaDivergence,
}

/// Which end of an over-long sequence DPO keeps (TRL's `truncation_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncationMode {
    KeepStart,
    /// Deprecated in TRL 1.12 (accepted with its warning).
    KeepEnd,
}

/// `loss_type = "ipo"` or `loss_type = ["sigmoid", "sft"]`: one name or a list.
fn one_or_many<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<DpoLossType>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(DpoLossType),
        Many(Vec<DpoLossType>),
    }
    let names = "sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft or sigmoid_norm";
    let v = toml::Value::deserialize(d)?;
    match OneOrMany::deserialize(v.clone()) {
        Ok(OneOrMany::One(t)) => Ok(vec![t]),
        Ok(OneOrMany::Many(ts)) => Ok(ts),
        Err(_) => Err(serde::de::Error::custom(format!(
            "unknown loss type {v}: expected one of {names}, or a list of them"
        ))),
    }
}

dataset_section! {
    /// DPO (TRL 1.12's DPOConfig, with its names and defaults unless a line
    /// says otherwise). Rows have `chosen`, `rejected` and optionally
    /// `prompt` (text or messages). Optimizer, batch sizes (in pairs), steps
    /// and schedule come from `[train]`.
    pub struct DpoConfig("dpo") {
        /// Fraction of the pairs held out for evaluation (seeded split) when there is no eval_dataset.
        pub eval_ratio: f64 = 0.1,
        /// The reference model (default: a frozen copy of the initial policy; with `[lora]`, the policy's base with its adapters off).
        pub ref_model: Option<String> = None,
        /// Dtype of the frozen reference (default: the run's dtype).
        pub ref_dtype: Option<DTypeName> = None,
        /// Temperature of the implicit reward beta * log(pi / pi_ref); IPO's tau.
        pub beta: f64 = 0.1,
        /// One loss name or a list, summed with loss_weights.
        #[serde(deserialize_with = "one_or_many")]
        pub loss_type: Vec<DpoLossType> = vec![DpoLossType::Sigmoid],
        /// A weight per loss_type (unset: 1.0 each).
        pub loss_weights: Option<Vec<f64>> = None,
        /// Assumed share of flipped labels (cDPO / robust; EXO's epsilon).
        pub label_smoothing: f64 = 0.0,
        /// Prompt + completion are cut to this many tokens.
        pub max_length: usize = 1024,
        /// keep_start (cut the end; rows whose prompt alone fills max_length are dropped) | keep_end (deprecated).
        pub truncation_mode: TruncationMode = TruncationMode::KeepStart,
        /// Compute every pair's reference log-probs once before training, free the reference, keep them in the run directory.
        pub precompute_ref_log_probs: bool = false,
        /// Pairs per reference forward when precomputing (unset: train.per_device_eval_batch_size).
        pub precompute_ref_batch_size: Option<usize> = None,
        /// WPO (Zhou et al., 2024): weight each pair by the policy's length-normalised probability of both completions.
        pub use_weighting: bool = false,
        /// LD-DPO (Liu et al., 2024): tokens past the shorter completion's length count ld_alpha times (unset: 1).
        pub ld_alpha: Option<f64> = None,
        /// reverse_kl (DPO) | forward_kl | js_divergence | alpha_divergence.
        pub f_divergence_type: FDivergenceType = FDivergenceType::ReverseKl,
        /// alpha of alpha_divergence.
        pub f_alpha_divergence_coef: f64 = 0.5,
        /// DiscoPOP's temperature (the paper's 0.05).
        pub discopop_tau: f64 = 0.05,
        /// Turn off dropout in the policy (TRL's name and default; the only dropout here is LoRA's lora_dropout).
        pub disable_dropout: bool = true,
        /// Ignored with a warning, as TRL 1.12 ignores it: sequences are padded.
        pub padding_free: bool = false,
        /// TR-DPO's reference sync: not implemented, refused when true.
        pub sync_ref_model: bool = false,
        /// TR-DPO: read only with sync_ref_model, which is refused.
        pub ref_model_mixup_alpha: f64 = 0.6,
        /// TR-DPO: read only with sync_ref_model, which is refused.
        pub ref_model_sync_steps: u64 = 512,
    }
}

impl DpoConfig {
    /// (loss, weight) for each loss_type.
    pub fn losses(&self) -> Vec<(DpoLossType, f64)> {
        let weights = self.loss_weights.clone().unwrap_or_default();
        self.loss_type
            .iter()
            .enumerate()
            .map(|(i, &t)| (t, weights.get(i).copied().unwrap_or(1.0)))
            .collect()
    }
}

/// Which modules get adapters (peft's `target_modules`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names: a module matches when its full name equals one or ends with `.` and one.
    Names(Vec<String>),
    /// "all-linear" (every linear layer but the output layer), or a regular
    /// expression the full module name must match whole.
    Pattern(String),
}

/// How adapters start (peft's `init_lora_weights`): `true` (A Kaiming-uniform,
/// B = 0) or "gaussian" (A ~ N(0, 1/r^2), B = 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    Flag(bool),
    Name(String),
}

section! {
    /// LoRA adapters (peft's LoraConfig, its names and defaults) on the model
    /// the subcommand trains: the policy of sft, ppo, grpo and rloo, the
    /// reward model of reward. The section's presence turns LoRA on.
    pub struct LoraConfig {
        /// Rank of the update B A.
        pub r: usize = 8,
        /// The update is scaled by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora).
        pub lora_alpha: f64 = 8.0,
        /// Dropout on the adapter's input, in [0, 1), drawn from the seeded host RNG.
        pub lora_dropout: f64 = 0.0,
        /// Module names, "all-linear", or a regex (unset: peft's default for the architecture).
        pub target_modules: Option<TargetModules> = None,
        /// Modules trained in full and saved beside the adapter (e.g. `score`, `v_head`).
        pub modules_to_save: Vec<String> = Vec::new(),
        /// Rank-stabilized scaling lora_alpha / sqrt(r) (Kalajdzievski, 2023).
        pub use_rslora: bool = false,
        /// true (A Kaiming-uniform, B = 0) or "gaussian".
        pub init_lora_weights: InitLoraWeights = InitLoraWeights::Flag(true),
        /// PPO: the critic gets adapters of its own (same settings) instead of training in full.
        pub critic: bool = false,
        /// Also write the merged model into each checkpoint (`merged/`).
        pub save_merged: bool = false,
    }
}
