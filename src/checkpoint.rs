//! Checkpoints: Hugging Face-layout weights plus everything needed to resume.
//!
//! `RUN_DIR/checkpoints/<step>/` holds `model.safetensors` (Hugging Face
//! tensor names, `format: pt` metadata so transformers loads it),
//! `config.json`, the tokenizer files, `optimizer.safetensors` (AdamW moments),
//! `trainer_state.json` (step, RNG states, data position) and `manifest.json`.
//! A checkpoint is written under a temporary name and renamed into place, so
//! a directory named by a step is always complete: a write killed midway
//! leaves only a `.tmp-*` directory, which readers ignore and the next write
//! removes.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::io::{self, save_safetensors, write_json};
use crate::optim::AdamW;
use crate::rng::HostRng;
use crate::{Error, IoContext, Result};

pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const MODEL_CONFIG_FILE: &str = "config.json";
/// A LoRA run's weights and settings, in peft's layout (see `models::lora`).
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// The config.json a LoRA checkpoint's merged model gets (a reward model's
/// head, pad id and offset differ from the base's).
pub const MERGED_CONFIG_FILE: &str = "merged_config.json";
/// Where a LoRA checkpoint keeps its merged model, when asked to.
pub const MERGED_DIR: &str = "merged";
/// The prefix peft gives every tensor name of an adapter file.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// What a trainer needs, beyond weights and optimizer, to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TrainerState {
    /// Optimizer steps completed (the next step to run has this index).
    pub step: u64,
    /// AdamW's own step count (differs from `step` when steps were skipped).
    pub optimizer_steps: u64,
    /// Every random stream of the trainer, by purpose.
    pub rngs: BTreeMap<String, HostRng>,
    /// Where the trainer is in its data (epoch, offset, permutation: its choice).
    pub data_position: serde_json::Value,
    /// Anything else a trainer adds (adaptive KL state, best metric, ...).
    pub extra: serde_json::Value,
}

impl TrainerState {
    /// A fresh state: one seeded stream per name in `streams`, no data
    /// position yet, and the trainer's `extra`.
    pub fn fresh(seed: u64, streams: &[&str], extra: serde_json::Value) -> Self {
        Self {
            rngs: streams
                .iter()
                .map(|s| (s.to_string(), HostRng::stream(seed, s)))
                .collect(),
            data_position: serde_json::json!({"offset": usize::MAX, "order": []}),
            extra,
            ..Default::default()
        }
    }

    /// The (order, offset) of the data position, (empty, past the end) when unset.
    fn position(&self) -> (Vec<usize>, usize) {
        let offset = self.data_position["offset"].as_u64().unwrap_or(u64::MAX) as usize;
        let order = serde_json::from_value(self.data_position["order"].clone()).unwrap_or_default();
        (order, offset)
    }

    /// The next `batch` of `n` items in epochs: a seeded permutation (stream
    /// "data") drawn anew when the rest of the epoch holds no full batch.
    /// The position is kept in the state, so a resumed run continues it.
    pub fn next_batch(&mut self, n: usize, batch: usize) -> Vec<usize> {
        let (mut order, mut offset) = self.position();
        if offset.saturating_add(batch) > order.len() {
            order = self.rng("data").permutation(n);
            offset = 0;
        }
        let picked = order[offset..offset + batch].to_vec();
        self.data_position = serde_json::json!({"offset": offset + batch, "order": order});
        picked
    }

    /// This rank's part of the next global batch: [`Self::next_batch`] of
    /// `batch` x ranks items (the same on every rank), split in rank order.
    pub fn next_shard(&mut self, n: usize, batch: usize) -> Vec<usize> {
        let world = crate::dist::world();
        world.shard(&self.next_batch(n, batch * world.size))
    }

    /// The next `count` of `n` items in a stream of seeded permutations
    /// (stream "data"), crossing epoch boundaries item by item.
    pub fn next_items(&mut self, n: usize, count: usize) -> Vec<usize> {
        let (mut order, mut offset) = self.position();
        let mut picked = Vec::with_capacity(count);
        while picked.len() < count {
            if offset >= order.len() {
                order = self.rng("data").permutation(n);
                offset = 0;
            }
            picked.push(order[offset]);
            offset += 1;
        }
        self.data_position = serde_json::json!({"offset": offset, "order": order});
        picked
    }

    /// The random stream `name` (made by [`TrainerState::fresh`]).
    pub fn rng(&mut self, name: &str) -> &mut HostRng {
        self.rngs
            .get_mut(name)
            .unwrap_or_else(|| panic!("trainer state has no `{name}` stream"))
    }
}

/// The files of a model directory that a checkpoint carries beside its
/// weights: the tokenizer's (every format transformers reads, so that the
/// slow tokenizers load too) and generation_config.json, whose EOS ids are
/// the stop tokens.
pub fn tokenizer_files(dir: &Path) -> Vec<PathBuf> {
    [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "chat_template.jinja",
        "generation_config.json",
    ]
    .iter()
    .map(|f| dir.join(f))
    .filter(|p| p.is_file())
    .collect()
}

/// What produced a run: written to the run directory and into every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The subcommand (reward, ppo, sft, ...).
    pub command: String,
    pub crate_version: String,
    /// The commit the binary was built from, when it was built from a git checkout.
    pub git_commit: Option<String>,
    pub seed: u64,
    /// CPU threads Candle uses (RAYON_NUM_THREADS, else all cores).
    pub threads: usize,
    /// The device actually used (after `auto` was resolved).
    pub device: String,
    pub dtype: String,
    /// Seconds since the Unix epoch when the run (or this resumption) started.
    pub started_unix: u64,
    /// Data-parallel ranks the run trains on (1 without MPI); a run
    /// resumes on as many.
    #[serde(default = "one")]
    pub world_size: usize,
    pub config: Config,
}

fn one() -> usize {
    1
}

impl Manifest {
    pub fn new(command: &str, config: &Config, device: &str) -> Self {
        Self {
            command: command.into(),
            crate_version: env!("CARGO_PKG_VERSION").into(),
            git_commit: option_env!("CANDLE_RLHF_GIT_COMMIT").map(str::to_string),
            seed: config.run.seed,
            threads: candle_core::utils::get_num_threads(),
            device: device.into(),
            dtype: format!("{:?}", config.run.dtype.dtype()).to_lowercase(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            world_size: crate::dist::world().size,
            config: config.clone(),
        }
    }
}

/// The parts of one checkpoint.
pub struct Checkpoint<'a> {
    /// Tensors under their Hugging Face names.
    pub weights: &'a [(String, Tensor)],
    /// The model's config.json.
    pub model_config: Option<&'a serde_json::Value>,
    /// Tokenizer files copied beside the weights (tokenizer.json, ...).
    pub tokenizer_files: &'a [PathBuf],
    /// More safetensors files beside the model (a value head, a critic):
    /// (file name, tensors).
    pub extra_weights: &'a [(&'a str, Vec<(String, Tensor)>)],
    pub optimizer: Option<&'a AdamW>,
    pub state: &'a TrainerState,
    pub manifest: &'a Manifest,
    /// A LoRA run: `weights` are the adapter's (peft's names), written to
    /// adapter_model.safetensors with this adapter_config.json, and
    /// `model_config` goes to merged_config.json.
    pub lora: Option<&'a LoraParts>,
}

/// What a LoRA checkpoint holds beyond the adapter's tensors.
pub struct LoraParts {
    pub adapter_config: serde_json::Value,
    /// The merged model, written to `merged/` with config.json and the
    /// tokenizer files (`lora.save_merged`).
    pub merged: Option<Vec<(String, Tensor)>>,
}

/// Writes `ckpt` as `run_dir/checkpoints/<step>/` and keeps the newest
/// `keep_last` checkpoints. Returns the checkpoint directory.
pub fn save(run_dir: &Path, ckpt: &Checkpoint, keep_last: Option<usize>) -> Result<PathBuf> {
    // Data parallelism: every rank holds the same weights (checked here, at
    // every checkpoint, by a checksum), and rank 0 alone writes them.
    let world = crate::dist::world();
    if !world.is_single() {
        let extra = ckpt.extra_weights.iter().flat_map(|(_, t)| t.iter());
        let sum = crate::dist::checksum(ckpt.weights.iter().chain(extra).map(|(_, t)| t))?;
        world.check_same(&format!("the weights at step {}", ckpt.state.step), sum)?;
        if !world.is_main() {
            return Ok(run_dir
                .join(CHECKPOINTS_DIR)
                .join(ckpt.state.step.to_string()));
        }
    }
    let dir = write_atomically(run_dir, ckpt.state.step, |tmp| {
        let (weights_file, config_file) = match ckpt.lora {
            None => (WEIGHTS_FILE, MODEL_CONFIG_FILE),
            Some(_) => (ADAPTER_WEIGHTS_FILE, MERGED_CONFIG_FILE),
        };
        save_safetensors(ckpt.weights, &tmp.join(weights_file))?;
        if let Some(cfg) = ckpt.model_config {
            write_json(&tmp.join(config_file), cfg)?;
        }
        copy_files(ckpt.tokenizer_files, tmp)?;
        if let Some(lora) = ckpt.lora {
            write_json(&tmp.join(ADAPTER_CONFIG_FILE), &lora.adapter_config)?;
            if let Some(merged) = &lora.merged {
                let dir = tmp.join(MERGED_DIR);
                fs::create_dir(&dir).with_path(&dir)?;
                save_safetensors(merged, &dir.join(WEIGHTS_FILE))?;
                if let Some(cfg) = ckpt.model_config {
                    write_json(&dir.join(MODEL_CONFIG_FILE), cfg)?;
                }
                copy_files(ckpt.tokenizer_files, &dir)?;
            }
        }
        for (file, tensors) in ckpt.extra_weights {
            save_safetensors(tensors, &tmp.join(file))?;
        }
        if let Some(opt) = ckpt.optimizer {
            opt.save_state(&tmp.join(OPTIMIZER_FILE))?;
        }
        write_json(&tmp.join(MANIFEST_FILE), ckpt.manifest)?;
        // Last: its presence marks the directory complete.
        write_json(&tmp.join(TRAINER_STATE_FILE), ckpt.state)
    })?;
    if let Some(k) = keep_last {
        prune(run_dir, k)?;
    }
    Ok(dir)
}

/// Copies `files` into `dir` under their own names.
fn copy_files(files: &[PathBuf], dir: &Path) -> Result<()> {
    for file in files {
        let name = file
            .file_name()
            .ok_or_else(|| Error::Msg(format!("{} is not a file", file.display())))?;
        fs::copy(file, dir.join(name)).with_path(file)?;
    }
    Ok(())
}

/// Fills a temporary directory with `fill`, syncs it, and renames it to
/// `run_dir/checkpoints/<step>`. If `fill` fails the temporary directory is
/// removed and any earlier checkpoint is untouched.
pub fn write_atomically(
    run_dir: &Path,
    step: u64,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    fs::create_dir_all(&root).with_path(&root)?;
    remove_stale_temporaries(&root)?;
    let tmp = root.join(format!(".tmp-{step}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_path(&tmp)?;
    }
    fs::create_dir(&tmp).with_path(&tmp)?;
    if let Err(e) = fill(&tmp).and_then(|()| io::sync_dir_files(&tmp)) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let dest = root.join(step.to_string());
    if dest.exists() {
        // Re-saving a step (a resumed run reaching it again): move the old one
        // aside first so that some complete copy exists at every instant.
        let old = root.join(format!(".old-{step}-{}", std::process::id()));
        fs::rename(&dest, &old).with_path(&dest)?;
        fs::rename(&tmp, &dest).with_path(&dest)?;
        fs::remove_dir_all(&old).with_path(&old)?;
    } else {
        fs::rename(&tmp, &dest).with_path(&dest)?;
    }
    if let Ok(d) = fs::File::open(&root) {
        let _ = d.sync_all();
    }
    Ok(dest)
}

/// Removes `.tmp-*` / `.old-*` left by writes that were killed midway.
fn remove_stale_temporaries(root: &Path) -> Result<()> {
    for entry in fs::read_dir(root).with_path(root)? {
        let path = entry.with_path(root)?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(".tmp-") || name.starts_with(".old-") {
            fs::remove_dir_all(&path).with_path(&path)?;
        }
    }
    Ok(())
}

/// Complete checkpoints of a run, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    if !root.exists() {
        return Ok(vec![]);
    }
    let mut found = vec![];
    for entry in fs::read_dir(&root).with_path(&root)? {
        let path = entry.with_path(&root)?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(step) = step {
            if path.join(TRAINER_STATE_FILE).is_file() {
                found.push((step, path));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The newest complete checkpoint of a run.
pub fn latest(run_dir: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(list(run_dir)?.pop())
}

/// Deletes all but the newest `keep_last` checkpoints.
pub fn prune(run_dir: &Path, keep_last: usize) -> Result<()> {
    let all = list(run_dir)?;
    let excess = all.len().saturating_sub(keep_last);
    for (_, path) in all.into_iter().take(excess) {
        fs::remove_dir_all(&path).with_path(&path)?;
    }
    Ok(())
}

/// Restores AdamW's moments and step count from a checkpoint directory.
pub fn load_optimizer(
    dir: &Path,
    optimizer: &mut AdamW,
    state: &TrainerState,
    device: &Device,
) -> Result<()> {
    let path = dir.join(OPTIMIZER_FILE);
    let tensors = io::load_safetensors(&path, device)?;
    optimizer
        .load_state(tensors, state.optimizer_steps)
        .map_err(|e| Error::Checkpoint {
            path,
            message: e.to_string(),
        })
}

/// Copies checkpoint weights into existing variables of the same names and
/// shapes: model.safetensors, or a LoRA run's adapter file (its names less
/// peft's prefix).
pub fn load_into_vars<'a>(
    dir: &Path,
    vars: impl Iterator<Item = (&'a str, &'a candle_core::Var)>,
    device: &Device,
) -> Result<()> {
    let adapter = dir.join(ADAPTER_WEIGHTS_FILE);
    if adapter.is_file() {
        let renamed: Vec<(String, &candle_core::Var)> = vars
            .map(|(n, v)| (format!("{PEFT_PREFIX}{n}"), v))
            .collect();
        return load_file_into_vars(
            &adapter,
            renamed.iter().map(|(n, v)| (n.as_str(), *v)),
            device,
        );
    }
    load_file_into_vars(&dir.join(WEIGHTS_FILE), vars, device)
}

/// Copies the tensors of one safetensors file into existing variables.
pub fn load_file_into_vars<'a>(
    path: &Path,
    vars: impl Iterator<Item = (&'a str, &'a candle_core::Var)>,
    device: &Device,
) -> Result<()> {
    let path = path.to_path_buf();
    let mut tensors = io::load_safetensors(&path, device)?;
    for (name, var) in vars {
        let t = tensors.remove(name).ok_or_else(|| Error::Checkpoint {
            path: path.clone(),
            message: format!("no tensor `{name}`"),
        })?;
        if t.dims() != var.dims() {
            return Err(Error::Checkpoint {
                path: path.clone(),
                message: format!(
                    "tensor `{name}` has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                ),
            });
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}
