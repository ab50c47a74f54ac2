//! Where a model's weights come from when it is built with `load(vb, cfg)`:
//! a checkpoint (every requested tensor must exist with the right shape) or a
//! seeded random draw (fixtures, new heads). Either way each tensor becomes a
//! trainable `Var`, collected in a `VarMap` named as Hugging Face names it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};

use crate::{Error, HostRng, Result};

/// Serves tensors read from safetensors files: each as a new `Var` in
/// `varmap` when trainable, else as a plain tensor (no copy, no tracking).
struct CheckpointBackend {
    tensors: HashMap<String, Tensor>,
    varmap: VarMap,
    source: PathBuf,
    /// Which tensors become Vars (all, none, or LoRA's modules_to_save).
    trainable: Box<dyn Fn(&str) -> bool + Send + Sync>,
}

fn lock(varmap: &VarMap) -> std::sync::MutexGuard<'_, HashMap<String, Var>> {
    varmap.data().lock().unwrap_or_else(|p| p.into_inner())
}

/// Makes `t` a trainable Var named `name` in `varmap`; returns its tensor.
pub fn add_var(varmap: &VarMap, name: &str, t: &Tensor) -> candle_core::Result<Tensor> {
    let var = Var::from_tensor(t)?;
    let out = var.as_tensor().clone();
    lock(varmap).insert(name.to_string(), var);
    Ok(out)
}

impl CheckpointBackend {
    fn fetch(
        &self,
        shape: Option<&Shape>,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(var) = lock(&self.varmap).get(name) {
            return Ok(var.as_tensor().clone()); // tied weights are requested twice
        }
        let t = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: no tensor `{name}`", self.source.display()))
        })?;
        if let Some(shape) = shape {
            if t.shape() != shape {
                candle_core::bail!(
                    "{}: tensor `{name}` has shape {:?} but config.json implies {:?}",
                    self.source.display(),
                    t.dims(),
                    shape.dims()
                );
            }
        }
        let t = t.to_dtype(dtype)?.to_device(dev)?;
        if (self.trainable)(name) {
            add_var(&self.varmap, name, &t)
        } else {
            Ok(t)
        }
    }
}

impl SimpleBackend for CheckpointBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.fetch(Some(&s), name, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(None, name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Draws every requested tensor from a seeded RNG: N(0, 0.02^2) for weights
/// (GPT-2's init), 1 + N(0, 0.1^2) for norm scales and N(0, 0.02^2) for
/// biases, so that a loader ignoring norms or biases gives other outputs.
struct RandomBackend {
    rng: Mutex<HostRng>,
    varmap: VarMap,
}

impl SimpleBackend for RandomBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(var) = lock(&self.varmap).get(name) {
            return Ok(var.as_tensor().clone());
        }
        let is_norm = name
            .split('.')
            .any(|p| p.starts_with("ln") || p.contains("norm") || p.contains("LayerNorm"));
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let t = if is_norm && name.ends_with("weight") {
            (rng.normal_tensor(s, 0.1, DType::F32, dev)
                .map_err(candle_core::Error::wrap)?
                + 1.0)?
        } else {
            rng.normal_tensor(s, 0.02, DType::F32, dev)
                .map_err(candle_core::Error::wrap)?
        };
        add_var(&self.varmap, name, &t.to_dtype(dtype)?)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// Reads the safetensors weights of a model directory (`model.safetensors`
/// or the shards of `model.safetensors.index.json`), renaming with `rename`.
pub fn read_safetensors_dir(
    dir: &Path,
    device: &Device,
    rename: impl Fn(&str) -> String,
) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        let idx: serde_json::Value = crate::io::read_json(&index)?;
        let mut shards: Vec<String> = idx["weight_map"]
            .as_object()
            .ok_or_else(|| Error::Parse {
                path: index.clone(),
                message: "no `weight_map` object".into(),
            })?
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else if dir.join("pytorch_model.bin").is_file() {
        return Err(Error::Msg(format!(
            "{}: only pickle weights (pytorch_model.bin); candle-rlhf loads safetensors only (pickle can run code). Convert with transformers: AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)",
            dir.display()
        )));
    } else {
        return Err(Error::Msg(format!(
            "{}: no model.safetensors or model.safetensors.index.json",
            dir.display()
        )));
    };
    let mut out = HashMap::new();
    for file in files {
        for (name, t) in crate::io::load_safetensors(&file, device)? {
            out.insert(rename(&name), t);
        }
    }
    Ok(out)
}

/// The frozen tensors of a model directory, in `dtype` on `device`, under
/// their canonical names: shared by every holder while one holds them. A
/// LoRA critic's base and the reward model it starts from (the scorer) are
/// one copy this way, as are two LoRA runs' bases over one directory.
pub fn shared_frozen(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<std::sync::Arc<HashMap<String, Tensor>>> {
    use std::sync::{Arc, Mutex, Weak};
    type Key = (PathBuf, DType, candle_core::DeviceLocation);
    type Held = Weak<HashMap<String, Tensor>>;
    static LIVE: Mutex<Vec<(Key, Held)>> = Mutex::new(Vec::new());
    let key = (
        dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()),
        dtype,
        device.location(),
    );
    let mut live = LIVE.lock().expect("not poisoned");
    live.retain(|(_, w)| w.strong_count() > 0);
    if let Some(held) = live
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, w)| w.upgrade())
    {
        return Ok(held);
    }
    let arch = super::ArchConfig::load(&dir.join("config.json"))?;
    let tensors = read_safetensors_dir(dir, device, |n| arch.canonical_name(n))?
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let shared = Arc::new(tensors);
    live.push((key, Arc::downgrade(&shared)));
    Ok(shared)
}

/// A VarBuilder over checkpoint tensors; when `trainable`, each requested
/// tensor becomes a Var in the returned map (else the map stays empty).
pub fn checkpoint_builder(
    tensors: HashMap<String, Tensor>,
    source: &Path,
    dtype: DType,
    device: &Device,
    trainable: bool,
) -> (VarBuilder<'static>, VarMap) {
    let varmap = VarMap::new();
    let vb = selective_builder(tensors, source, dtype, device, &varmap, move |_| trainable);
    (vb, varmap)
}

/// A VarBuilder over checkpoint tensors where the tensors `trainable` names
/// become Vars of `varmap` and the others are served as they are.
pub fn selective_builder(
    tensors: HashMap<String, Tensor>,
    source: &Path,
    dtype: DType,
    device: &Device,
    varmap: &VarMap,
    trainable: impl Fn(&str) -> bool + Send + Sync + 'static,
) -> VarBuilder<'static> {
    let backend = CheckpointBackend {
        tensors,
        varmap: varmap.clone(),
        source: source.to_path_buf(),
        trainable: Box::new(trainable),
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

/// A VarBuilder that draws each requested tensor from the RNG stream
/// (`seed`, `purpose`), so that two models drawn for different purposes differ.
pub fn random_builder(
    seed: u64,
    purpose: &str,
    dtype: DType,
    device: &Device,
) -> (VarBuilder<'static>, VarMap) {
    let varmap = VarMap::new();
    let backend = RandomBackend {
        rng: Mutex::new(HostRng::stream(seed, &format!("init/{purpose}"))),
        varmap: varmap.clone(),
    };
    (
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone()),
        varmap,
    )
}

/// Replaces every tensor of a checkpoint by a fresh draw with its name and
/// shape, as transformers' `_init_weights` initialises a new model: norm
/// scales 1, biases (and norm shifts) 0, every other weight (linear layers,
/// embeddings) N(0, `std`) with `std` config.json's `initializer_range`,
/// and the `pad_row` of the token embeddings 0 (nn.Embedding's
/// padding_idx). Drawn in name order from the stream (`seed`, "init/random").
pub fn reinitialize(
    tensors: &mut HashMap<String, Tensor>,
    std: f64,
    pad_row: Option<usize>,
    seed: u64,
) -> Result<()> {
    let mut rng = HostRng::stream(seed, "init/random");
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort();
    for name in names {
        let old = &tensors[&name];
        let (shape, dev) = (old.shape().clone(), old.device().clone());
        let last = name.rsplit('.').next().unwrap_or("");
        let is_norm = name
            .split('.')
            .any(|p| p.starts_with("ln") || p.to_lowercase().contains("norm"));
        let fresh = match last {
            "bias" | "beta" => Tensor::zeros(shape, DType::F32, &dev)?,
            "weight" | "gamma" if is_norm => Tensor::ones(shape, DType::F32, &dev)?,
            _ => {
                let t = rng.normal_tensor(shape, std, DType::F32, &dev)?;
                match pad_row {
                    Some(row)
                        if (name.contains("word_embeddings") || name.contains("embed_tokens"))
                            && row < t.dim(0)? =>
                    {
                        let zeros = Tensor::zeros((1, t.dim(1)?), DType::F32, &dev)?;
                        t.slice_assign(&[row..row + 1, 0..t.dim(1)?], &zeros)?
                    }
                    _ => t,
                }
            }
        };
        tensors.insert(name, fresh.to_dtype(old.dtype())?);
    }
    Ok(())
}

/// The Vars of a map as (name, tensor), sorted by name, for saving.
pub fn named_tensors(varmap: &VarMap) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = lock(varmap)
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The Vars of a map as (name, var), sorted by name, for an optimizer.
pub fn named_vars(varmap: &VarMap) -> Vec<(String, candle_core::Var)> {
    let mut v: Vec<(String, candle_core::Var)> = lock(varmap)
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
