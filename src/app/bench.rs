//! `candle-rlhf bench`: the speed of the three workloads of RLHF on a model
//! shape (configs/models/*.toml), with random weights since speed does not
//! depend on their values:
//! 1. a reward-model training step (Bradley-Terry loss on a batch of pairs);
//! 2. rollout generation (KV-cached sampling, no stop token, so every row
//!    decodes the full response length) at each batch size;
//! 3. one PPO iteration run by the PPO trainer itself (rollout; policy,
//!    reference, value and reward forwards; num_ppo_epochs of updates), split
//!    into its phases; one GRPO or RLOO iteration likewise;
//! 4. a DPO step on the reward workload (reward_batch_size pairs of
//!    reward_seq_len-token sequences, half prompt, half completion): the
//!    reference's forward, the policy's forward and backward, AdamW; once
//!    with the reference model, once with precomputed log-probs.
//!
//! Each part reports its peak resident memory. The model, reward model and
//! prompts are written to a work directory that `scripts/bench_compare.sh`
//! hands to PyTorch/TRL, so both sides run the same weights on the same inputs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::bench_steps::{
    after_warmup, median, peak_rss_mb, random_rows, reset_peak_rss, PeakAfterWarmup, StepPlan,
};
pub use super::bench_steps::{DpoBench, SftBench};
use crate::config::{Config, ModelInit, TrainConfig};
use crate::error::IoContext;
use crate::generate::{generate, Draw, Sampling};
use crate::models::reward_model::RewardModel;
use crate::models::{load_dir_frozen, ArchConfig, CausalLm, Linears};
use crate::optim::adamw::{AdamW, AdamWParams};
use crate::optim::TrainCore;
use crate::trainers::online::{self, PhaseTimes, Trainer};
use crate::trainers::trained::Trained;
use crate::{Error, HostRng, Result};

/// The work each part does, per shape (the `[workload]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Preference pairs per reward-model step.
    pub reward_batch_size: usize,
    /// Tokens in each chosen and each rejected sequence.
    pub reward_seq_len: usize,
    /// Batch sizes of the generation benchmark.
    pub generate_batch_sizes: Vec<usize>,
    /// Prompt tokens of every generation and PPO row.
    pub prompt_length: usize,
    /// New tokens per row (PPO's response_length).
    pub response_length: usize,
    /// Rollouts per PPO iteration (TRL's local_batch_size).
    pub ppo_batch_size: usize,
    pub ppo_num_mini_batches: usize,
    pub ppo_epochs: usize,
    /// Rows per forward/backward in the PPO update (the reward step takes
    /// the whole reward batch at once).
    pub per_device_train_batch_size: usize,
    /// GRPO and RLOO: prompts per iteration, each answered num_generations
    /// times with response_length tokens (one optimizer step, beta 0.04).
    pub online_prompts: usize,
    pub num_generations: usize,
    /// SFT step: rows and tokens per row (unset: reward_batch_size and reward_seq_len).
    #[serde(default)]
    pub sft_batch_size: Option<usize>,
    #[serde(default)]
    pub sft_seq_len: Option<usize>,
}

impl Workload {
    /// The SFT step's rows and tokens per row.
    pub fn sft(&self) -> (usize, usize) {
        (
            self.sft_batch_size.unwrap_or(self.reward_batch_size),
            self.sft_seq_len.unwrap_or(self.reward_seq_len),
        )
    }
}

/// A model shape: config.json's values and the workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub name: String,
    pub config: Value,
    pub workload: Workload,
}

impl Shape {
    /// Reads a shape file: `[config]` (config.json's fields) and `[workload]`.
    pub fn load(path: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            config: toml::Table,
            workload: Workload,
        }
        let text = std::fs::read_to_string(path).with_path(path)?;
        let file: File = toml::from_str(&text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let w = &file.workload;
        let zero = [
            ("reward_batch_size", w.reward_batch_size),
            ("reward_seq_len", w.reward_seq_len),
            ("prompt_length", w.prompt_length),
            ("response_length", w.response_length),
            ("ppo_batch_size", w.ppo_batch_size),
            ("ppo_num_mini_batches", w.ppo_num_mini_batches),
            ("ppo_epochs", w.ppo_epochs),
            ("per_device_train_batch_size", w.per_device_train_batch_size),
            ("online_prompts", w.online_prompts),
            ("num_generations", w.num_generations),
        ]
        .into_iter()
        .find(|(_, v)| *v == 0);
        if let Some((field, _)) = zero {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                message: format!("workload.{field} must be positive"),
            });
        }
        if !w
            .ppo_batch_size
            .is_multiple_of(w.ppo_num_mini_batches * w.per_device_train_batch_size)
        {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                message: format!(
                    "workload.ppo_batch_size {} is not a multiple of ppo_num_mini_batches x per_device_train_batch_size",
                    w.ppo_batch_size
                ),
            });
        }
        let generation_batch = w.online_prompts * w.num_generations;
        if w.num_generations < 2 || !generation_batch.is_multiple_of(w.per_device_train_batch_size)
        {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                message: format!(
                    "workload.num_generations must be at least 2 and online_prompts x num_generations ({generation_batch}) a multiple of per_device_train_batch_size"
                ),
            });
        }
        let name = path
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned());
        Ok(Self {
            name,
            config: serde_json::to_value(file.config).map_err(|e| Error::Msg(e.to_string()))?,
            workload: file.workload,
        })
    }

    fn vocab_size(&self) -> Result<usize> {
        self.config["vocab_size"]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| Error::Msg(format!("shape {}: config.vocab_size is missing", self.name)))
    }
}

/// Which parts to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Reward,
    Generate,
    Ppo,
    /// One GRPO or RLOO iteration.
    Online(Trainer),
    /// A DPO step, with the reference model and with precomputed log-probs.
    Dpo,
    /// An SFT step.
    Sft,
}

impl Part {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name.trim() {
            "reward" => Self::Reward,
            "generate" => Self::Generate,
            "ppo" => Self::Ppo,
            "grpo" => Self::Online(Trainer::Grpo),
            "rloo" => Self::Online(Trainer::Rloo),
            "dpo" => Self::Dpo,
            "sft" => Self::Sft,
            other => {
                return Err(Error::Msg(format!(
                    "unknown bench part `{other}` (reward, sft, generate, ppo, grpo, rloo, dpo)"
                )))
            }
        })
    }
}

pub struct BenchOptions {
    pub shape: Shape,
    pub parts: Vec<Part>,
    /// Timed repetitions of each part, after `warmup` untimed ones.
    pub iters: usize,
    pub warmup: usize,
    /// Where the random model, reward model and prompts are written (kept).
    pub work_dir: PathBuf,
    /// The run settings (device, dtype, seed) come from here.
    pub config: Config,
    /// Where generation draws its tokens.
    pub draw: Draw,
    /// The device's peak TFLOP/s in the run's dtype, for MFU.
    pub peak_tflops: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RewardBench {
    pub pairs: usize,
    pub seq_len: usize,
    /// Median seconds per step (forward, backward, optimizer step).
    pub step_s: f64,
    /// Median seconds of its phases: the forward and loss, the backward (with
    /// checkpointing, the layers' recomputation in it), the optimizer step.
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs per second of the step ([`ModelFlops`]), in TFLOP/s.
    pub model_tflops: f64,
    pub peak_rss_mb: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateBench {
    pub batch_size: usize,
    pub prompt_length: usize,
    pub new_tokens: usize,
    /// Median seconds per call, prompt included.
    pub seconds: f64,
    /// New tokens per second over the batch.
    pub tokens_per_s: f64,
    /// Whether tokens were drawn on the device (else on the host).
    pub drawn_on_device: bool,
    pub peak_rss_mb: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PpoBench {
    pub batch_size: usize,
    pub prompt_length: usize,
    pub response_length: usize,
    pub epochs: usize,
    pub mini_batches: usize,
    /// Whether the critic ran on a thread of its own (ppo.critic_on_own_thread).
    pub critic_on_own_thread: bool,
    /// Mean phase times over the timed iterations.
    pub iteration: PhaseTimes,
    /// Model FLOPs per second of the update phase (policy and critic
    /// forwards and backwards over every epoch), in TFLOP/s.
    pub update_model_tflops: f64,
    pub peak_rss_mb: f64,
}

/// One GRPO or RLOO iteration.
#[derive(Debug, Clone, Serialize)]
pub struct OnlineBench {
    pub algo: String,
    pub prompts: usize,
    pub num_generations: usize,
    pub prompt_length: usize,
    /// The completion budget (max_completion_length).
    pub response_length: usize,
    /// Mean phase times over the timed iterations.
    pub iteration: PhaseTimes,
    pub peak_rss_mb: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub shape: String,
    pub parameters: usize,
    pub device: String,
    pub dtype: String,
    pub threads: usize,
    pub cpu: String,
    /// The CPU's vector extensions that matter to the products.
    pub cpu_vector_extensions: Vec<String>,
    /// Which kernels the CPU matmuls ran (gemm AVX2 / AVX-512, or a BLAS).
    pub product_path: String,
    pub date: String,
    pub commit: String,
    pub iters: usize,
    /// LoRA rank on every linear layer (`--lora`), or None: full fine-tuning.
    pub lora_r: Option<usize>,
    /// The device's peak TFLOP/s in this dtype (`--peak-tflops`), against
    /// which model FLOPs utilisation (MFU) is reported.
    pub peak_tflops: Option<f64>,
    /// Layers recomputed in the backward (`--activation-checkpointing`).
    pub activation_checkpointing: bool,
    pub reward: Option<RewardBench>,
    pub sft: Option<SftBench>,
    pub generate: Vec<GenerateBench>,
    pub ppo: Option<PpoBench>,
    /// The GRPO and RLOO iterations, in the order asked.
    pub online: Vec<OnlineBench>,
    /// The DPO steps: precomputed reference log-probs, then the reference model.
    pub dpo: Vec<DpoBench>,
}

/// Runs the parts of `opts` and returns their figures.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    let cfg = &opts.config;
    let (device, device_name) = crate::device::resolve_device(&cfg.run.device)?;
    let dtype = cfg.run.dtype.dtype();
    let model_dir = opts.work_dir.join("model");
    prepare_model(&opts.shape, &model_dir, cfg.run.seed)?;
    let cpu = crate::device::cpu_info();
    let mut report = BenchReport {
        shape: opts.shape.name.clone(),
        parameters: count_parameters(&model_dir)?,
        device: device_name,
        dtype: format!("{dtype:?}").to_lowercase(),
        threads: crate::device::threads(),
        cpu: cpu.model,
        cpu_vector_extensions: cpu.vector_extensions,
        product_path: cpu.product_path,
        date: today_utc(),
        commit: git_commit(),
        iters: opts.iters,
        lora_r: cfg.lora.as_ref().map(|l| l.r),
        peak_tflops: opts.peak_tflops,
        activation_checkpointing: cfg.train.activation_checkpointing,
        reward: None,
        sft: None,
        generate: Vec::new(),
        ppo: None,
        online: Vec::new(),
        dpo: Vec::new(),
    };
    let w = &opts.shape.workload;
    let vocab = opts.shape.vocab_size()?;
    let flops = ModelFlops::of(&model_dir)?;
    let arch = ArchConfig::load(&model_dir.join("config.json"))?;
    if !arch.is_causal() && opts.parts.iter().any(|p| *p != Part::Reward) {
        return Err(Error::Msg(format!(
            "{}: a {} shape is an encoder, which neither generates nor runs PPO: use --parts reward",
            opts.shape.name,
            arch.model_type()
        )));
    }
    let mut rng = HostRng::new(cfg.run.seed);
    let plan = StepPlan {
        config: cfg,
        pairs: (w.reward_batch_size, w.reward_seq_len),
        warmup: opts.warmup,
        iters: opts.iters,
    };
    for part in &opts.parts {
        reset_peak_rss();
        match part {
            Part::Reward => {
                ensure_reward_model(opts, &model_dir)?;
                let [forward_s, backward_s, optimizer_s, step_s] =
                    reward_steps(opts, &model_dir, vocab, &device, &mut rng)?;
                let tokens = 2 * w.reward_batch_size * w.reward_seq_len;
                // A reward model has no LM head (its one-output head is negligible).
                let step_flops = 3.0 * tokens as f64 * flops.trunk_per_token(w.reward_seq_len);
                report.reward = Some(RewardBench {
                    pairs: w.reward_batch_size,
                    seq_len: w.reward_seq_len,
                    step_s,
                    forward_s,
                    backward_s,
                    optimizer_s,
                    tokens_per_s: tokens as f64 / step_s,
                    model_tflops: step_flops / step_s / 1e12,
                    peak_rss_mb: peak_rss_mb(),
                });
            }
            Part::Generate => {
                let model = load_causal(&model_dir, dtype, &device)?;
                let sampling = Sampling {
                    max_new_tokens: w.response_length,
                    temperature: 1.0,
                    top_k: None,
                    top_p: 1.0,
                    stop_token_ids: Vec::new(),
                    keep_stop_token: false,
                    draw: opts.draw,
                };
                for &b in &w.generate_batch_sizes {
                    reset_peak_rss();
                    let seconds = generation(opts, &model, &sampling, b, vocab, &device, &mut rng)?;
                    report.generate.push(GenerateBench {
                        batch_size: b,
                        prompt_length: w.prompt_length,
                        new_tokens: w.response_length,
                        seconds,
                        tokens_per_s: (b * w.response_length) as f64 / seconds,
                        drawn_on_device: sampling.draws_on_device(&device),
                        peak_rss_mb: peak_rss_mb(),
                    });
                }
            }
            Part::Online(t) => {
                let iteration = online_iterations(opts, &model_dir, vocab, &mut rng, *t)?;
                report.online.push(OnlineBench {
                    algo: t.name().into(),
                    prompts: w.online_prompts,
                    num_generations: w.num_generations,
                    prompt_length: w.prompt_length,
                    response_length: w.response_length,
                    iteration,
                    peak_rss_mb: peak_rss_mb(),
                });
            }
            Part::Sft => {
                let (rows, seq_len) = w.sft();
                let shape = (rows, seq_len);
                let step_s = super::bench_steps::sft_steps(
                    &plan, &model_dir, shape, vocab, &device, &mut rng,
                )?;
                report.sft = Some(SftBench {
                    rows,
                    seq_len,
                    step_s,
                    tokens_per_s: (rows * seq_len) as f64 / step_s,
                    peak_rss_mb: peak_rss_mb(),
                });
            }
            Part::Dpo => {
                for precomputed in [true, false] {
                    reset_peak_rss();
                    report.dpo.push(super::bench_steps::dpo_steps(
                        &plan,
                        &model_dir,
                        vocab,
                        &device,
                        &mut rng,
                        precomputed,
                    )?);
                }
            }
            Part::Ppo => {
                let iteration = ppo_iterations(opts, &model_dir, vocab, &mut rng)?;
                // Each epoch trains the policy's trunk on every query-response
                // token (padded to full width), its LM head on the response
                // tokens only (ppo.rs `policy_outputs`), and the critic, here
                // the reward model's backbone (`value_model = auto` with a
                // reward model on the policy's backbone), on every token.
                let seq = w.prompt_length + w.response_length;
                let rows = (w.ppo_epochs * w.ppo_batch_size) as f64;
                let update_flops = 3.0
                    * rows
                    * (2.0 * seq as f64 * flops.trunk_per_token(seq)
                        + w.response_length as f64 * flops.head_per_token());
                report.ppo = Some(PpoBench {
                    batch_size: w.ppo_batch_size,
                    prompt_length: w.prompt_length,
                    response_length: w.response_length,
                    epochs: w.ppo_epochs,
                    mini_batches: w.ppo_num_mini_batches,
                    critic_on_own_thread: opts.config.ppo.critic_on_own_thread,
                    update_model_tflops: update_flops / iteration.update_s / 1e12,
                    iteration,
                    peak_rss_mb: peak_rss_mb(),
                });
            }
        }
    }
    Ok(report)
}

/// Writes the shape's random model once (reused while its config is unchanged).
fn prepare_model(shape: &Shape, dir: &Path, seed: u64) -> Result<()> {
    let config_path = dir.join("config.json");
    let same = crate::io::read_json(&config_path).is_ok_and(|c: Value| c == shape.config)
        && dir.join("model.safetensors").is_file();
    if !same {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_path(dir)?;
        }
        crate::app::fixtures::write_random_model(dir, shape.config.clone(), seed)?;
        crate::device::release_freed_memory();
    }
    Ok(())
}

/// Each tensor's name and shape in model.safetensors, from its header alone
/// (reading the whole file would leave its size in the process's memory).
fn tensor_shapes(model_dir: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    use std::io::Read;
    let path = model_dir.join("model.safetensors");
    let bad = |message: String| Error::Parse {
        path: path.clone(),
        message,
    };
    let mut file = std::fs::File::open(&path).with_path(&path)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).with_path(&path)?;
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    file.read_exact(&mut header).with_path(&path)?;
    let header: Value = serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    let tensors = header
        .as_object()
        .ok_or_else(|| bad("header is not an object".into()))?;
    Ok(tensors
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, t)| {
            let shape = t["shape"].as_array().map_or(Vec::new(), |s| {
                s.iter()
                    .filter_map(Value::as_u64)
                    .map(|d| d as usize)
                    .collect()
            });
            (name.clone(), shape)
        })
        .collect())
}

fn count_parameters(model_dir: &Path) -> Result<usize> {
    Ok(tensor_shapes(model_dir)?
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum())
}

/// What a model's FLOPs are counted from: PaLM's model FLOPs (Chowdhery et
/// al. 2022, appendix B; nanoGPT's `estimate_mfu` counts the same way).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelFlops {
    /// Matrix weights of the transformer blocks: the 2-D tensors under
    /// `h.N.`, `layers.N.` or `layer.N.` (BERT, DistilBERT) (norms and biases are 1-D and add no products;
    /// causal-mask buffers some checkpoints store are 4-D).
    pub block_params: usize,
    pub layers: usize,
    pub hidden: usize,
    pub vocab: usize,
}

impl ModelFlops {
    /// Reads `model_dir`'s config.json and safetensors header.
    pub fn of(model_dir: &Path) -> Result<Self> {
        let config_path = model_dir.join("config.json");
        let raw: Value = crate::io::read_json(&config_path)?;
        let arch = ArchConfig::from_value(&raw, &config_path)?;
        let in_block = |name: &str| {
            let parts: Vec<&str> = name.split('.').collect();
            parts.windows(2).any(|w| {
                matches!(w[0], "h" | "layers" | "layer") && w[1].bytes().all(|c| c.is_ascii_digit())
            })
        };
        let block_params = tensor_shapes(model_dir)?
            .iter()
            .filter(|(name, shape)| shape.len() == 2 && in_block(name))
            .map(|(_, shape)| shape[0] * shape[1])
            .sum();
        let vocab = raw["vocab_size"].as_u64().unwrap_or(0) as usize;
        Ok(Self {
            block_params,
            layers: arch.num_layers(),
            hidden: arch.hidden_size(),
            vocab,
        })
    }

    /// FLOPs of one token's forward through the blocks in a sequence of
    /// `seq` tokens: 2 per block weight, plus 2·2·layers·hidden·seq for the
    /// attention scores and the weighted sum over the whole sequence (as PaLM
    /// counts, not only the causal half). The embedding lookup is no product.
    /// A training step, forward and backward, is 3 times the forward.
    pub fn trunk_per_token(&self, seq: usize) -> f64 {
        2.0 * self.block_params as f64 + 4.0 * (self.layers * self.hidden * seq) as f64
    }

    /// FLOPs of the LM head's forward for one token (vocab x hidden, tied
    /// or not).
    pub fn head_per_token(&self) -> f64 {
        2.0 * (self.vocab * self.hidden) as f64
    }
}

fn load_causal(dir: &Path, dtype: DType, device: &Device) -> Result<CausalLm> {
    let (arch, vb, _) = load_dir_frozen(dir, dtype, device)?;
    CausalLm::load(vb, &arch, true)
}

/// Median seconds of a reward-model step: chosen and rejected in one batch,
/// forward, Bradley-Terry loss, backward, gradient clipping, AdamW.
fn reward_steps(
    opts: &BenchOptions,
    model_dir: &Path,
    vocab: usize,
    device: &Device,
    rng: &mut HostRng,
) -> Result<[f64; 4]> {
    let cfg = &opts.config;
    let w = &opts.shape.workload;
    let dtype = cfg.run.dtype.dtype();
    let (model, varmap) = match &cfg.lora {
        None => RewardModel::from_dir(model_dir, dtype, device, cfg.run.seed)?,
        Some(lora) => {
            let (arch, vb, mut params) = Trained::load(
                model_dir,
                "model",
                Some(lora),
                "SEQ_CLS",
                ModelInit::Pretrained,
                dtype,
                device,
                cfg.run.seed,
            )?;
            let mut model = RewardModel::load(vb, params.varmap(), &arch, cfg.run.seed)?;
            params.attach(&mut model)?;
            (model, params.varmap().clone())
        }
    };
    let mut model = model;
    model.set_activation_checkpointing(cfg.train.activation_checkpointing);
    let train = TrainConfig {
        per_device_train_batch_size: w.reward_batch_size,
        ..cfg.train.clone()
    };
    let steps = (opts.warmup + opts.iters) as u64;
    let mut core = TrainCore::new(
        AdamW::from_varmap(&varmap, AdamWParams::from_config(&train))?,
        &train,
        steps,
    );
    let b = w.reward_batch_size;
    let mut phases: [Vec<f64>; 4] = Default::default();
    for step in 0..steps {
        let seqs = random_rows(2 * b, w.reward_seq_len, vocab, rng);
        // GPU work is queued: wait for it before reading the clock.
        let lap = |t: &mut Instant| -> Result<f64> {
            device.synchronize()?;
            let s = t.elapsed().as_secs_f64();
            *t = Instant::now();
            Ok(s)
        };
        let mut t = Instant::now();
        let (forward_s, backward_s) = {
            let rewards = model.rewards_of(&seqs, 0, device)?;
            let loss = crate::rl::bradley_terry(
                &rewards.narrow(0, 0, b)?,
                &rewards.narrow(0, b, b)?,
                None,
                None,
            )?;
            let forward_s = lap(&mut t)?;
            core.backward(&loss)?;
            (forward_s, lap(&mut t)?)
        }; // the graph (every activation) is freed before the optimizer step, as in the trainer

        // Freeing it counts in the optimizer's phase: the phases sum to the step's wall time.
        core.step(step)?;
        let optimizer_s = lap(&mut t)?;
        if step >= opts.warmup as u64 {
            let all = [
                forward_s,
                backward_s,
                optimizer_s,
                forward_s + backward_s + optimizer_s,
            ];
            for (v, x) in phases.iter_mut().zip(all) {
                v.push(x);
            }
        }
        after_warmup(step, opts.warmup);
    }
    Ok(phases.map(median))
}

/// Median seconds to sample `response_length` tokens for `batch` prompts.
fn generation(
    opts: &BenchOptions,
    model: &CausalLm,
    sampling: &Sampling,
    batch: usize,
    vocab: usize,
    device: &Device,
    rng: &mut HostRng,
) -> Result<f64> {
    let w = &opts.shape.workload;
    let mut times = Vec::new();
    for i in 0..opts.warmup + opts.iters {
        let prompts = random_rows(batch, w.prompt_length, vocab, rng);
        let started = Instant::now();
        let mut rngs: Vec<HostRng> = (0..batch)
            .map(|r| HostRng::keyed(i as u64, "bench", &[r as u64]))
            .collect();
        let out = generate(model, &prompts, 0, sampling, &mut rngs, device)?;
        debug_assert!(out.iter().all(|r| r.len() == w.response_length));
        if i >= opts.warmup {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}

/// WORK_DIR/reward: a random reward model on the shape's backbone (written
/// unless there for this vocabulary). PPO scores with it and initializes its
/// critic from it; scripts/bench_trl.py trains it in TRL's reward step.
fn ensure_reward_model(opts: &BenchOptions, model_dir: &Path) -> Result<PathBuf> {
    let reward_dir = opts.work_dir.join("reward");
    if !reward_dir.join("model.safetensors").is_file()
        || crate::io::read_json::<Value>(&reward_dir.join("config.json"))
            .map_or(true, |c| c["vocab_size"] != opts.shape.config["vocab_size"])
    {
        crate::app::fixtures::write_reward_model(model_dir, &reward_dir, opts.config.run.seed)?;
        crate::device::release_freed_memory();
    }
    Ok(reward_dir)
}

/// Mean phase times of PPO iterations run by the PPO trainer on random
/// prompts (an `input_ids` column) against a random reward model whose
/// backbone also initializes the critic, as TRL's examples do.
fn ppo_iterations(
    opts: &BenchOptions,
    model_dir: &Path,
    vocab: usize,
    rng: &mut HostRng,
) -> Result<PhaseTimes> {
    let w = &opts.shape.workload;
    let reward_dir = ensure_reward_model(opts, model_dir)?;
    let iterations = opts.warmup + opts.iters;
    let prompts: Vec<Value> =
        random_rows(w.ppo_batch_size * iterations, w.prompt_length, vocab, rng)
            .into_iter()
            .map(|ids| json!({ "input_ids": ids }))
            .collect();
    let prompts_path = opts.work_dir.join("prompts.jsonl");
    crate::app::fixtures::write_jsonl(&prompts_path, &prompts)?;
    let run_dir = opts.work_dir.join("ppo-run");
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir).with_path(&run_dir)?;
    }
    let quoted = |p: &Path| toml::Value::String(p.to_string_lossy().into_owned()).to_string();
    let accumulation = w.ppo_batch_size / (w.ppo_num_mini_batches * w.per_device_train_batch_size);
    let sets = [
        format!("model.name_or_path={}", quoted(model_dir)),
        format!(
            "train.per_device_train_batch_size={}",
            w.per_device_train_batch_size
        ),
        format!("train.gradient_accumulation_steps={accumulation}"),
        "train.logging_steps=1".into(),
        format!("train.save_steps={}", u32::MAX),
        format!("ppo.dataset={}", quoted(&prompts_path)),
        format!("ppo.reward_model={}", quoted(&reward_dir)),
        format!("ppo.total_episodes={}", w.ppo_batch_size * iterations),
        format!("ppo.num_mini_batches={}", w.ppo_num_mini_batches),
        format!("ppo.num_ppo_epochs={}", w.ppo_epochs),
        format!("ppo.response_length={}", w.response_length),
        format!("ppo.max_prompt_length={}", w.prompt_length),
        format!("ppo.local_rollout_forward_batch_size={}", w.ppo_batch_size),
        "ppo.num_sample_generations=1".into(),
    ];
    let cfg = opts.config.with_overrides(&sets)?;
    let stop = crate::signal::StopSignal::new();
    let run = {
        let _peak = PeakAfterWarmup::watch(&run_dir, opts.warmup);
        online::train(&cfg, Trainer::Ppo, &run_dir, false, &stop)?
    };
    mean_times(&run.times, opts.warmup)
}

/// Mean phase times of GRPO or RLOO iterations on random prompts, scored
/// by the random reward model (`type = "model"`), against the reference
/// (beta 0.04): one generation batch of online_prompts x num_generations
/// completions per iteration, one optimizer step (steps_per_generation =
/// gradient_accumulation_steps), num_iterations 1.
fn online_iterations(
    opts: &BenchOptions,
    model_dir: &Path,
    vocab: usize,
    rng: &mut HostRng,
    trainer: Trainer,
) -> Result<PhaseTimes> {
    let w = &opts.shape.workload;
    let reward_dir = ensure_reward_model(opts, model_dir)?;
    let iterations = opts.warmup + opts.iters;
    // Text prompts (TRL's GRPOTrainer and RLOOTrainer read text): random
    // ids of the shape's tokenizer, decoded; both sides tokenize the same
    // text, so prompt_length is approximate (the same on both).
    // Tokens whose text is plain ASCII letters keep their count through
    // decoding and encoding again, near enough.
    let tok = crate::tokenizer::Tokenizer::from_dir(model_dir)?;
    let mut words = Vec::new();
    for id in 0..tok.inner.get_vocab_size(true).min(vocab) as u32 {
        let t = tok.decode(&[id])?;
        if !t.trim().is_empty() && t.chars().all(|c| c.is_ascii_alphabetic() || c == ' ') {
            words.push(id);
        }
    }
    let prompts = random_rows(
        w.online_prompts * iterations,
        w.prompt_length,
        words.len(),
        rng,
    )
    .into_iter()
    .map(|r| {
        let ids: Vec<u32> = r.iter().map(|&i| words[i as usize]).collect();
        Ok(json!({ "prompt": tok.decode(&ids)? }))
    })
    .collect::<Result<Vec<Value>>>()?;
    let name = trainer.name();
    let prompts_path = opts.work_dir.join(format!("{name}-prompts.jsonl"));
    crate::app::fixtures::write_jsonl(&prompts_path, &prompts)?;
    let run_dir = opts.work_dir.join(format!("{name}-run"));
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir).with_path(&run_dir)?;
    }
    let quoted = |p: &Path| toml::Value::String(p.to_string_lossy().into_owned()).to_string();
    let micro = w.per_device_train_batch_size;
    let steps = w.online_prompts * w.num_generations / micro;
    let sets = [
        format!("model.name_or_path={}", quoted(model_dir)),
        format!("train.per_device_train_batch_size={micro}"),
        format!("train.gradient_accumulation_steps={steps}"),
        format!("train.max_steps={iterations}"),
        "train.logging_steps=1".into(),
        format!("train.save_steps={}", u32::MAX),
        format!("{name}.dataset={}", quoted(&prompts_path)),
        format!("{name}.num_generations={}", w.num_generations),
        format!("{name}.max_completion_length={}", w.response_length),
        // TRL 1.12 never cuts a prompt: room for the re-encoded text.
        format!("{name}.max_prompt_length={}", 2 * w.prompt_length),
        format!("{name}.beta=0.04"),
        format!("{name}.num_sample_generations=1"),
    ];
    let mut cfg = opts.config.with_overrides(&sets)?;
    cfg.reward_funcs = vec![crate::config::RewardFuncConfig {
        name: "reward_model".into(),
        kind: crate::config::RewardFuncType::Model,
        model: Some(reward_dir.to_string_lossy().into_owned()),
        ..Default::default()
    }];
    let stop = crate::signal::StopSignal::new();
    let run = {
        let _peak = PeakAfterWarmup::watch(&run_dir, opts.warmup);
        online::train(&cfg, trainer, &run_dir, false, &stop)?
    };
    mean_times(&run.times, opts.warmup)
}

/// The mean phase times of the iterations after `warmup`.
fn mean_times(times: &[PhaseTimes], warmup: usize) -> Result<PhaseTimes> {
    let timed = &times[warmup.min(times.len() - 1)..];
    let mut mean = PhaseTimes::default();
    for t in timed {
        mean += *t;
    }
    let n = timed.len() as f64;
    Ok(PhaseTimes {
        generate_s: mean.generate_s / n,
        forward_s: mean.forward_s / n,
        score_s: mean.score_s / n,
        update_s: mean.update_s / n,
        total_s: mean.total_s / n,
    })
}

// ---------------------------------------------------------------- reporting

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} ({:.1}M parameters{}), {} {}, {} threads, {} ({}; products: {}) | {} | {}",
            self.shape,
            self.parameters as f64 / 1e6,
            self.lora_r.map_or(String::new(), |r| format!(
                ", LoRA r={r} on every linear layer"
            )),
            self.device,
            self.dtype,
            self.threads,
            self.cpu,
            self.cpu_vector_extensions.join(" "),
            self.product_path,
            self.date,
            self.commit
        )?;
        // Model FLOP/s, with MFU where the device's peak is known.
        let model_flops = |tflops: f64| match self.peak_tflops {
            Some(peak) => format!("{tflops:.2} TFLOP/s, MFU {:.1}%", 100.0 * tflops / peak),
            None => format!("{tflops:.2} TFLOP/s"),
        };
        writeln!(f, "| workload | figure | peak RSS |")?;
        writeln!(f, "|---|---|---|")?;
        if let Some(r) = &self.reward {
            writeln!(
                f,
                "| reward step, {} pairs x {} tokens | {:.3} s/step (forward {:.3}, backward {:.3}, optimizer {:.3}), {:.0} tokens/s, {} | {:.0} MB |",
                r.pairs, r.seq_len, r.step_s, r.forward_s, r.backward_s, r.optimizer_s,
                r.tokens_per_s, model_flops(r.model_tflops), r.peak_rss_mb
            )?;
        }
        if let Some(s) = &self.sft {
            writeln!(
                f,
                "| SFT step, {} rows x {} tokens | {:.3} s/step, {:.0} tokens/s | {:.0} MB |",
                s.rows, s.seq_len, s.step_s, s.tokens_per_s, s.peak_rss_mb
            )?;
        }
        for g in &self.generate {
            writeln!(
                f,
                "| generate, batch {}, prompt {}, {} new tokens, drawn on the {} | {:.1} tokens/s ({:.3} s) | {:.0} MB |",
                g.batch_size, g.prompt_length, g.new_tokens,
                if g.drawn_on_device { "device" } else { "host" },
                g.tokens_per_s, g.seconds, g.peak_rss_mb
            )?;
        }
        for o in &self.online {
            let t = &o.iteration;
            let share = |x: f64| 100.0 * x / t.total_s;
            writeln!(
                f,
                "| {} iteration, {} prompts x {}, prompt {}, completions {}, beta 0.04 | {:.3} s: generation {:.0}%, log-probs {:.0}%, reward {:.0}%, update {:.0}% | {:.0} MB |",
                o.algo.to_uppercase(), o.prompts, o.num_generations, o.prompt_length, o.response_length,
                t.total_s, share(t.generate_s), share(t.forward_s), share(t.score_s), share(t.update_s), o.peak_rss_mb
            )?;
        }
        for d in &self.dpo {
            writeln!(
                f,
                "| DPO step, {} pairs x {} tokens, {} | {:.3} s: policy {:.3} s, reference {:.3} s, optimizer {:.3} s | {:.0} MB |",
                d.pairs, d.seq_len,
                if d.precomputed { "reference log-probs precomputed" } else { "reference model" },
                d.step_s, d.policy_s, d.reference_s, d.optimizer_s, d.peak_rss_mb
            )?;
        }
        if let Some(p) = &self.ppo {
            let t = &p.iteration;
            let share = |x: f64| 100.0 * x / t.total_s;
            writeln!(
                f,
                "| PPO iteration, batch {}, prompt {}, response {}, {} epochs x {} mini-batches{} | {:.3} s: generation {:.0}%, forwards {:.0}%, reward {:.0}%, updates {:.0}% ({}) | {:.0} MB |",
                p.batch_size, p.prompt_length, p.response_length, p.epochs, p.mini_batches,
                if p.critic_on_own_thread { ", critic on its own thread" } else { "" },
                t.total_s, share(t.generate_s), share(t.forward_s), share(t.score_s), share(t.update_s),
                model_flops(p.update_model_tflops), p.peak_rss_mb
            )?;
        }
        Ok(())
    }
}

/// The checkout's commit, or `CANDLE_RLHF_COMMIT` away from one (the GPU
/// pack's runner sets it from the pack's PACK_INFO).
fn git_commit() -> String {
    if let Ok(commit) = std::env::var("CANDLE_RLHF_COMMIT") {
        return commit;
    }
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Today's date (UTC) as YYYY-MM-DD, from the system clock.
fn today_utc() -> String {
    let (y, m, d) = crate::clock::today_utc();
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_middle() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![5.0]), 5.0);
    }

    #[test]
    fn unknown_parts_are_refused() {
        assert!(Part::parse("ppo").is_ok());
        assert_eq!(Part::parse("sft").unwrap(), Part::Sft);
        assert!(Part::parse("train")
            .unwrap_err()
            .to_string()
            .contains("reward, sft, generate, ppo"));
    }

    #[test]
    fn model_flops_of_gpt2_small_by_hand() {
        // GPT-2 small: 12 blocks of 12·768² matrix weights, LM head
        // 50,257 x 768. Forward of one token in 1,024:
        // 2·84,934,656 + 4·12·768·1,024 = 207,618,048 in the trunk and
        // 2·38,597,376 = 77,194,752 in the head, 284,812,800 in all.
        // Training, 3x: 854.4M, near nanoGPT's 6N + 12LHQT with N the whole
        // 124.4M (859M; N also holds the position embeddings and norms).
        let gpt2 = ModelFlops {
            block_params: 12 * 12 * 768 * 768,
            layers: 12,
            hidden: 768,
            vocab: 50_257,
        };
        assert_eq!(gpt2.trunk_per_token(1024), 207_618_048.0);
        assert_eq!(gpt2.head_per_token(), 77_194_752.0);
    }
}
