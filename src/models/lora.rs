//! LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language
//! Models") as peft computes, initialises and stores it.
//!
//! A targeted linear layer y = x W^T + b gains `scaling * B A x` with A
//! (r, in) and B (out, r): `scaling` is lora_alpha / r (lora_alpha / sqrt(r)
//! with rsLoRA), A starts Kaiming-uniform (or N(0, 1/r^2)), B at zero, so the
//! adapted model starts equal to the base. Only A, B and the modules of
//! `modules_to_save` are Vars; the base weights are plain tensors with no
//! gradient and no optimizer state, shared by every model built over them
//! (the PPO/GRPO reference is the base with no adapter attached: no second
//! copy of the weights).
//!
//! On disk, peft's layout: `adapter_model.safetensors` with tensors
//! `base_model.model.<module>.lora_A.weight` / `lora_B.weight` (and
//! `base_model.model.<module>.weight` for `modules_to_save`), and
//! `adapter_config.json`, which `peft.PeftModel.from_pretrained(base, dir)`
//! reads. GPT-2's Conv1D layers store W as (in, out): peft writes
//! `fan_in_fan_out: true` and keeps A and B in the same shapes as for a
//! Linear; merging adds (B A)^T there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde_json::{json, Value};

pub use super::adapter::{Adapter, Dropout};
use super::layers::Linears;
use super::weights::{add_var, named_tensors};
use super::ArchConfig;
use crate::config::{InitLoraWeights, LoraConfig, TargetModules};
use crate::{Error, HostRng, Result};

pub use crate::checkpoint::{
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MERGED_CONFIG_FILE, PEFT_PREFIX,
};

/// Which modules get adapters.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Every linear layer but the output layer (peft's "all-linear").
    AllLinear,
    /// Full names, or suffixes after a `.`.
    Names(Vec<String>),
    /// A regular expression the full module name matches whole.
    Pattern(String),
}

/// One adapter's settings, from `[lora]` or an adapter_config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub targets: Targets,
    pub modules_to_save: Vec<String>,
    pub use_rslora: bool,
    pub gaussian_init: bool,
}

/// peft's default target modules per architecture (its
/// TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
fn default_targets(model_type: &str) -> Option<Vec<String>> {
    let names: &[&str] = match model_type {
        "gpt2" => &["c_attn"],
        "llama" | "mistral" | "qwen2" | "qwen3" => &["q_proj", "v_proj"],
        "gpt_neox" => &["query_key_value"],
        "bert" => &["query", "value"],
        _ => return None,
    };
    Some(names.iter().map(|s| s.to_string()).collect())
}

impl LoraSpec {
    /// The spec of `[lora]` for a model of `model_type`.
    pub fn from_config(cfg: &LoraConfig, model_type: &str) -> Result<Self> {
        let targets = match &cfg.target_modules {
            Some(TargetModules::Pattern(p)) if p == "all-linear" => Targets::AllLinear,
            Some(TargetModules::Pattern(p)) => Targets::Pattern(p.clone()),
            Some(TargetModules::Names(n)) => Targets::Names(n.clone()),
            None => Targets::Names(default_targets(model_type).ok_or_else(|| {
                Error::InvalidConfig {
                    field: "lora.target_modules".into(),
                    value: "unset".into(),
                    reason: format!(
                        "peft has no default target modules for model_type `{model_type}`; list them, or use \"all-linear\""
                    ),
                }
            })?),
        };
        Ok(Self {
            r: cfg.r,
            lora_alpha: cfg.lora_alpha,
            lora_dropout: cfg.lora_dropout,
            targets,
            modules_to_save: cfg.modules_to_save.clone(),
            use_rslora: cfg.use_rslora,
            gaussian_init: matches!(&cfg.init_lora_weights, InitLoraWeights::Name(n) if n == "gaussian"),
        })
    }

    /// The factor of B A x: lora_alpha / r, or lora_alpha / sqrt(r) (rsLoRA).
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Whether the module `name` is targeted (peft's check_target_module_exists):
    /// never a module of modules_to_save; under "all-linear" never the output
    /// layer (`lm_head`, `embed_out`) nor a classification head (`score`, `classifier`).
    pub fn targets(&self, name: &str) -> bool {
        if self.saves(&format!("{name}.weight")) {
            return false;
        }
        match &self.targets {
            Targets::AllLinear => {
                let last = name.rsplit('.').next().unwrap_or(name);
                !matches!(last, "lm_head" | "embed_out" | "score" | "classifier")
            }
            Targets::Names(names) => names
                .iter()
                .any(|t| name == t || name.ends_with(&format!(".{t}"))),
            Targets::Pattern(p) => regex::Regex::new(&format!("^(?:{p})$"))
                .map(|re| re.is_match(name))
                .unwrap_or(false),
        }
    }

    /// Whether the tensor `tensor_name` belongs to a module of modules_to_save
    /// (peft's rule: the name contains the module's name between dots).
    pub fn saves(&self, tensor_name: &str) -> bool {
        let dotted = format!(".{tensor_name}.");
        self.modules_to_save
            .iter()
            .any(|m| dotted.contains(&format!(".{m}.")))
    }

    /// The adapter_config.json peft writes for this spec: `adapted` the
    /// module names that got adapters (peft resolves "all-linear" to them),
    /// `saved` the modules trained in full.
    pub fn adapter_config(
        &self,
        base_model: &str,
        adapted: &[String],
        saved: &[String],
        fan_in_fan_out: bool,
        task_type: &str,
    ) -> Value {
        let target_modules = match &self.targets {
            Targets::AllLinear => json!(adapted),
            Targets::Names(n) => json!(n),
            Targets::Pattern(p) => json!(p),
        };
        json!({
            "base_model_name_or_path": base_model,
            "bias": "none",
            "fan_in_fan_out": fan_in_fan_out,
            "inference_mode": true,
            "init_lora_weights": if self.gaussian_init { json!("gaussian") } else { json!(true) },
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "modules_to_save": if saved.is_empty() { Value::Null } else { json!(saved) },
            "peft_type": "LORA",
            "r": self.r,
            "target_modules": target_modules,
            "task_type": task_type,
            "use_dora": false,
            "use_rslora": self.use_rslora,
        })
    }

    /// Reads an adapter_config.json, refusing what is not plain LoRA.
    pub fn from_adapter_config(v: &Value, path: &Path) -> Result<(Self, bool)> {
        let bad = |message: String| Error::Parse {
            path: path.to_path_buf(),
            message,
        };
        if v["peft_type"].as_str() != Some("LORA") {
            return Err(bad(format!(
                "peft_type {} is not supported (LORA only)",
                v["peft_type"]
            )));
        }
        for (key, plain) in [("use_dora", false), ("lora_bias", false)] {
            if v[key].as_bool().unwrap_or(plain) != plain {
                return Err(bad(format!("`{key}: true` is not supported")));
            }
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if v[key].as_object().is_some_and(|o| !o.is_empty()) {
                return Err(bad(format!("`{key}` is not supported")));
            }
        }
        let r = v["r"]
            .as_u64()
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("`r` must be a positive integer".into()))?;
        let targets = match &v["target_modules"] {
            Value::String(s) if s == "all-linear" => Targets::AllLinear,
            Value::String(s) => Targets::Pattern(s.clone()),
            Value::Array(a) => Targets::Names(
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect(),
            ),
            other => {
                return Err(bad(format!(
                    "`target_modules` {other} is not a list or a string"
                )))
            }
        };
        let spec = Self {
            r: r as usize,
            lora_alpha: v["lora_alpha"].as_f64().unwrap_or(8.0),
            lora_dropout: v["lora_dropout"].as_f64().unwrap_or(0.0),
            targets,
            modules_to_save: v["modules_to_save"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            use_rslora: v["use_rslora"].as_bool().unwrap_or(false),
            gaussian_init: v["init_lora_weights"].as_str() == Some("gaussian"),
        };
        Ok((spec, v["fan_in_fan_out"].as_bool().unwrap_or(false)))
    }
}

/// How [`attach`] makes adapters.
pub enum Attach<'a> {
    /// Trainable: A and B are Vars of the map, drawn as the spec says unless
    /// the map already holds them (a loaded adapter); with dropout.
    Train {
        seed: u64,
        dropout: Option<Arc<Dropout>>,
    },
    /// Detached views of the map's Vars (rollouts): no graph, no dropout,
    /// every optimizer update seen.
    Frozen,
    /// Plain tensors by the same names (an adapter read from a file).
    Tensors(&'a HashMap<String, Tensor>),
}

/// Attaches an adapter to every targeted linear layer of `model`, its
/// tensors named `<module>.lora_A.weight` / `.lora_B.weight` in `varmap`
/// (peft's names less [`PEFT_PREFIX`]). A layer whose weight is trained in
/// full (modules_to_save, a new head) gets none. Returns the adapted
/// modules' names; none at all is an error naming the spec's targets.
pub fn attach(
    model: &mut dyn Linears,
    spec: &LoraSpec,
    varmap: &VarMap,
    how: Attach,
) -> Result<Vec<String>> {
    let mut rng = match &how {
        Attach::Train { seed, .. } => Some(HostRng::stream(*seed, "lora-init")),
        _ => None,
    };
    let existing: HashMap<String, candle_core::Var> =
        super::weights::named_vars(varmap).into_iter().collect();
    let mut adapted = Vec::new();
    for linear in model.linears_mut() {
        let name = linear.name().to_string();
        if !spec.targets(&name) || linear.weight_is_trainable() {
            continue;
        }
        let (d_in, d_out) = linear.features()?;
        let (a_name, b_name) = (
            format!("{name}.lora_A.weight"),
            format!("{name}.lora_B.weight"),
        );
        let (dtype, device) = linear.weight_dtype_device();
        let (a, b, dropout) = match &how {
            Attach::Train { dropout, .. } => {
                let (a, b) = match (existing.get(&a_name), existing.get(&b_name)) {
                    (Some(a), Some(b)) => (a.as_tensor().clone(), b.as_tensor().clone()),
                    _ => {
                        let rng = rng.as_mut().expect("drawn for training");
                        let a = if spec.gaussian_init {
                            rng.normal_tensor((spec.r, d_in), 1.0 / spec.r as f64, dtype, &device)?
                        } else {
                            // kaiming_uniform_(a = sqrt(5)) on (r, in): bound 1 / sqrt(in).
                            let bound = 1.0 / (d_in as f64).sqrt();
                            rng.uniform_tensor((spec.r, d_in), -bound, bound, dtype, &device)?
                        };
                        let b = Tensor::zeros((d_out, spec.r), dtype, &device)?;
                        (add_var(varmap, &a_name, &a)?, add_var(varmap, &b_name, &b)?)
                    }
                };
                (a, b, dropout.clone())
            }
            Attach::Frozen => {
                let get = |n: &str| {
                    existing
                        .get(n)
                        .map(|v| v.as_detached_tensor())
                        .ok_or_else(|| {
                            Error::Msg(format!("LoRA: no trained tensor `{n}` to attach"))
                        })
                };
                (get(&a_name)?, get(&b_name)?, None)
            }
            Attach::Tensors(t) => {
                let get = |n: &str| {
                    t.get(n)
                        .map(|x| x.to_dtype(dtype))
                        .transpose()?
                        .ok_or_else(|| Error::Msg(format!("LoRA adapter: no tensor `{n}`")))
                };
                (get(&a_name)?, get(&b_name)?, None)
            }
        };
        if a.dims() != [spec.r, d_in] || b.dims() != [d_out, spec.r] {
            return Err(Error::Msg(format!(
                "LoRA adapter of `{name}`: A {:?} and B {:?} do not fit a layer of {d_in} -> {d_out} features at rank {}",
                a.dims(),
                b.dims(),
                spec.r
            )));
        }
        linear.set_adapter(Some(Adapter::new(a, b, spec.scaling(), dropout)));
        adapted.push(name);
    }
    if adapted.is_empty() {
        return Err(Error::InvalidConfig {
            field: "lora.target_modules".into(),
            value: format!("{:?}", spec.targets),
            reason: "matches no linear layer of the model".into(),
        });
    }
    Ok(adapted)
}

/// The trainable tensors of `varmap` under peft's names, for adapter_model.safetensors.
pub fn adapter_tensors(varmap: &VarMap) -> Vec<(String, Tensor)> {
    named_tensors(varmap)
        .into_iter()
        .map(|(n, t)| (format!("{PEFT_PREFIX}{n}"), t))
        .collect()
}

/// The modules of `varmap` trained in full (every Var that is not an
/// adapter's A or B), by module name: adapter_config.json's modules_to_save.
pub fn saved_modules(varmap: &VarMap) -> Vec<String> {
    let mut m: Vec<String> = named_tensors(varmap)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| !n.contains(".lora_A.") && !n.contains(".lora_B."))
        .map(|n| n.rsplit_once('.').map_or(n.clone(), |(m, _)| m.to_string()))
        .collect();
    m.dedup();
    m
}

/// An adapter directory as read from disk.
pub struct AdapterDir {
    pub dir: PathBuf,
    pub spec: LoraSpec,
    pub fan_in_fan_out: bool,
    /// Tensors by name less [`PEFT_PREFIX`].
    pub tensors: HashMap<String, Tensor>,
}

/// Whether `dir` holds a peft adapter and no full model.
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG_FILE).is_file() && !dir.join("config.json").is_file()
}

impl AdapterDir {
    pub fn read(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join(ADAPTER_CONFIG_FILE);
        let config: Value = crate::io::read_json(&config_path)?;
        let (spec, fan_in_fan_out) = LoraSpec::from_adapter_config(&config, &config_path)?;
        let weights = dir.join(ADAPTER_WEIGHTS_FILE);
        let tensors = crate::io::load_safetensors(&weights, device)?
            .into_iter()
            .map(|(n, t)| {
                // peft drops the adapter name on save; strip `.default` if a file kept it.
                let n = n
                    .strip_prefix(PEFT_PREFIX)
                    .unwrap_or(&n)
                    .replace(".default.", ".");
                (n, t)
            })
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            spec,
            fan_in_fan_out,
            tensors,
        })
    }

    /// Renames every tensor with `rename` applied to its module's weight
    /// name (a checkpoint's names made canonical).
    pub fn rename(&mut self, rename: impl Fn(&str) -> String) {
        let old = std::mem::take(&mut self.tensors);
        for (n, t) in old {
            let new = match n.find(".lora_") {
                Some(i) => {
                    let module = rename(&format!("{}.weight", &n[..i]));
                    format!("{}{}", module.trim_end_matches(".weight"), &n[i..])
                }
                None => rename(&n),
            };
            self.tensors.insert(new, t);
        }
    }

    /// Adds scaling * B A into each adapted weight of `weights` (transposed
    /// for fan_in_fan_out layers) and puts the modules_to_save tensors in
    /// place: the merged model. Computed in f32, stored in each weight's dtype.
    pub fn merge_into(&self, weights: &mut HashMap<String, Tensor>) -> Result<()> {
        let scaling = self.spec.scaling();
        for (name, t) in &self.tensors {
            if let Some(module) = name.strip_suffix(".lora_A.weight") {
                let b = self
                    .tensors
                    .get(&format!("{module}.lora_B.weight"))
                    .ok_or_else(|| self.error(format!("`{module}` has lora_A but no lora_B")))?;
                let key = format!("{module}.weight");
                let w = weights.get(&key).ok_or_else(|| {
                    self.error(format!(
                        "the base model has no `{key}` for the adapter of `{module}`"
                    ))
                })?;
                let delta = (b.to_dtype(DType::F32)?.matmul(&t.to_dtype(DType::F32)?)? * scaling)?;
                let delta = if self.fan_in_fan_out {
                    delta.t()?
                } else {
                    delta
                };
                if w.dims() != delta.dims() {
                    return Err(self.error(format!(
                        "the update of `{module}` is {:?}, its base weight {:?}",
                        delta.dims(),
                        w.dims()
                    )));
                }
                let merged = (w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())?;
                weights.insert(key, merged);
            } else if !name.contains(".lora_B.") {
                let dtype = weights.get(name).map_or(t.dtype(), Tensor::dtype);
                weights.insert(name.clone(), t.to_dtype(dtype)?);
            }
        }
        Ok(())
    }

    fn error(&self, message: String) -> Error {
        Error::Checkpoint {
            path: self.dir.join(ADAPTER_WEIGHTS_FILE),
            message,
        }
    }
}

/// Writes the model `base_dir` with the adapter of `adapter_dir` merged into
/// `out` (a Hugging Face model directory): model.safetensors, config.json
/// (the adapter's merged_config.json when it has one, else the base's), and
/// the tokenizer and generation files (the adapter's where it has them,
/// else the base's). Written under a temporary name and renamed into place.
pub fn write_merged(adapter_dir: &Path, base_dir: &Path, out: &Path) -> Result<()> {
    use crate::IoContext;
    let cpu = Device::Cpu;
    let arch = ArchConfig::load(&base_dir.join("config.json"))?;
    let mut adapter = AdapterDir::read(adapter_dir, &cpu)?;
    adapter.rename(|n| arch.canonical_name(n));
    let mut weights =
        super::weights::read_safetensors_dir(base_dir, &cpu, |n| arch.canonical_name(n))?;
    adapter.merge_into(&mut weights)?;
    let mut sorted: Vec<(String, Tensor)> = weights.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));

    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_path(parent)?;
    let name = out
        .file_name()
        .map_or("merged".into(), |n| n.to_string_lossy().to_string());
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_path(&tmp)?;
    }
    std::fs::create_dir(&tmp).with_path(&tmp)?;
    let fill = || -> Result<()> {
        crate::io::save_safetensors(&sorted, &tmp.join("model.safetensors"))?;
        let merged_config = adapter_dir.join(MERGED_CONFIG_FILE);
        let config = match merged_config.is_file() {
            true => merged_config,
            false => base_dir.join("config.json"),
        };
        std::fs::copy(&config, tmp.join("config.json")).with_path(&config)?;
        let own = crate::checkpoint::tokenizer_files(adapter_dir);
        let files = match own.iter().any(|f| {
            f.ends_with("tokenizer.json") || f.ends_with("vocab.txt") || f.ends_with("vocab.json")
        }) {
            true => own,
            false => crate::checkpoint::tokenizer_files(base_dir),
        };
        for f in files {
            let name = f.file_name().expect("a file");
            std::fs::copy(&f, tmp.join(name)).with_path(&f)?;
        }
        crate::io::sync_dir_files(&tmp)
    };
    if let Err(e) = fill() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out.exists() {
        std::fs::remove_dir_all(out).with_path(out)?;
    }
    std::fs::rename(&tmp, out).with_path(out)?;
    Ok(())
}

/// The merged model of an adapter directory, made once in the cache
/// `cache/candle-rlhf-merged/<hash of the adapter's files and the base's path>`:
/// what an adapter directory stands for wherever a model is expected.
pub fn merged_in_cache(adapter_dir: &Path, base_dir: &Path, cache: &Path) -> Result<PathBuf> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in [
        ADAPTER_CONFIG_FILE,
        ADAPTER_WEIGHTS_FILE,
        MERGED_CONFIG_FILE,
    ] {
        let path = adapter_dir.join(f);
        if path.is_file() {
            h.update(
                std::fs::read(&path).map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?,
            );
        }
    }
    h.update(
        base_dir
            .canonicalize()
            .unwrap_or(base_dir.to_path_buf())
            .display()
            .to_string(),
    );
    let key: String = h
        .finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect();
    let out = cache.join("candle-rlhf-merged").join(key);
    if out.join("model.safetensors").is_file() && out.join("config.json").is_file() {
        return Ok(out);
    }
    tracing::info!(
        "merging the adapter {} into {} ({})",
        adapter_dir.display(),
        base_dir.display(),
        out.display()
    );
    write_merged(adapter_dir, base_dir, &out)?;
    Ok(out)
}

/// The base model named by an adapter directory's adapter_config.json.
pub fn adapter_base(adapter_dir: &Path) -> Result<String> {
    let path = adapter_dir.join(ADAPTER_CONFIG_FILE);
    let v: Value = crate::io::read_json(&path)?;
    v["base_model_name_or_path"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .ok_or_else(|| Error::Parse {
            path,
            message: "no `base_model_name_or_path`: the base model is unknown".into(),
        })
}

/// A model's weights under LoRA training: the base tensors, converted once
/// to the run's dtype and shared by every model built over them (trained
/// model, rollout copy, reference), and the Vars the optimizer trains
/// (adapters, modules_to_save, new heads).
pub struct LoraWeights {
    pub spec: LoraSpec,
    pub arch: ArchConfig,
    /// Shared with every other holder of the directory's frozen tensors ([`super::weights::shared_frozen`]).
    base: std::sync::Arc<HashMap<String, Tensor>>,
    /// The trainable Vars, by name less peft's prefix.
    pub varmap: VarMap,
    /// Dropout of the trained model's adapters (None at lora_dropout 0).
    pub dropout: Option<Arc<Dropout>>,
    source: PathBuf,
    dtype: DType,
    device: Device,
    seed: u64,
}

impl LoraWeights {
    /// Reads the model directory `dir` for `[lora]` training from `seed`.
    pub fn read(
        dir: &Path,
        dtype: DType,
        device: &Device,
        cfg: &LoraConfig,
        seed: u64,
    ) -> Result<Self> {
        let arch = ArchConfig::load(&dir.join("config.json"))?;
        let spec = LoraSpec::from_config(cfg, arch.model_type())?;
        let base = super::weights::shared_frozen(dir, dtype, device)?;
        let dropout = (spec.lora_dropout > 0.0).then(|| Dropout::new(spec.lora_dropout, seed));
        Ok(Self {
            spec,
            arch,
            base,
            varmap: VarMap::new(),
            dropout,
            source: dir.to_path_buf(),
            dtype,
            device: device.clone(),
            seed,
        })
    }

    /// The builder of the trained model: base tensors as they are, those of
    /// modules_to_save as Vars of [`Self::varmap`].
    pub fn builder(&self) -> VarBuilder<'static> {
        let spec = self.spec.clone();
        super::weights::selective_builder(
            (*self.base).clone(),
            &self.source,
            self.dtype,
            &self.device,
            &self.varmap,
            move |name| spec.saves(name),
        )
    }

    /// Attaches trainable adapters (drawn on the first call, the same Vars after).
    pub fn attach_trainable(&self, model: &mut dyn Linears) -> Result<Vec<String>> {
        attach(
            model,
            &self.spec,
            &self.varmap,
            Attach::Train {
                seed: self.seed,
                dropout: self.dropout.clone(),
            },
        )
    }

    /// The builder of a rollout copy: base tensors and detached views of
    /// the Vars (see [`super::frozen_builder`]); attach with [`Self::attach_frozen`].
    pub fn frozen_builder(&self) -> VarBuilder<'static> {
        let mut tensors = (*self.base).clone();
        for (name, t) in named_tensors(&self.varmap) {
            tensors.insert(name, t.detach());
        }
        VarBuilder::from_tensors(tensors, self.dtype, &self.device)
    }

    /// Attaches detached views of the trained adapters: no graph, no dropout.
    pub fn attach_frozen(&self, model: &mut dyn Linears) -> Result<Vec<String>> {
        attach(model, &self.spec, &self.varmap, Attach::Frozen)
    }

    /// The base model alone (the adapters disabled): the PPO/GRPO reference,
    /// over the same tensors as the trained model.
    pub fn base_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_tensors((*self.base).clone(), self.dtype, &self.device)
    }

    /// Whether `fan_in_fan_out` holds for this architecture's linear layers (GPT-2's Conv1D).
    pub fn fan_in_fan_out(&self) -> bool {
        self.arch.model_type() == "gpt2"
    }

    /// adapter_config.json for a checkpoint: `base_model` as the run names it.
    pub fn adapter_config(&self, base_model: &str, adapted: &[String], task_type: &str) -> Value {
        self.spec.adapter_config(
            base_model,
            adapted,
            &saved_modules(&self.varmap),
            self.fan_in_fan_out(),
            task_type,
        )
    }

    /// The merged model's tensors (base plus scaled updates, modules_to_save
    /// in place), sorted by name.
    pub fn merged(&self) -> Result<Vec<(String, Tensor)>> {
        let adapter = AdapterDir {
            dir: self.source.clone(),
            spec: self.spec.clone(),
            fan_in_fan_out: self.fan_in_fan_out(),
            tensors: named_tensors(&self.varmap).into_iter().collect(),
        };
        let mut weights = (*self.base).clone();
        adapter.merge_into(&mut weights)?;
        let mut out: Vec<(String, Tensor)> = weights.into_iter().collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(targets: Targets, save: &[&str]) -> LoraSpec {
        LoraSpec {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            targets,
            modules_to_save: save.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
            gaussian_init: false,
        }
    }

    #[test]
    fn targets_match_as_peft_matches() {
        let s = spec(
            Targets::Names(vec!["q_proj".into(), "model.layers.1.mlp.up_proj".into()]),
            &[],
        );
        assert!(s.targets("model.layers.0.self_attn.q_proj"));
        assert!(
            !s.targets("model.layers.0.self_attn.qq_proj"),
            "a suffix counts after a dot only"
        );
        assert!(s.targets("model.layers.1.mlp.up_proj"));
        assert!(!s.targets("model.layers.0.mlp.up_proj"));
        let all = spec(Targets::AllLinear, &["pre_classifier"]);
        assert!(all.targets("transformer.h.0.attn.c_attn"));
        assert!(!all.targets("classifier") && !all.targets("lm_head") && !all.targets("score"));
        assert!(
            !all.targets("pre_classifier"),
            "modules_to_save get no adapter"
        );
        let re = spec(Targets::Pattern(r".*\.(q|v)_proj".into()), &[]);
        assert!(re.targets("model.layers.3.self_attn.v_proj"));
        assert!(!re.targets("model.layers.3.self_attn.k_proj"));
    }

    #[test]
    fn modules_to_save_match_between_dots() {
        let s = spec(Targets::AllLinear, &["score", "bert.pooler"]);
        assert!(s.saves("score.weight"));
        assert!(s.saves("bert.pooler.dense.weight"));
        assert!(!s.saves("scores.weight"));
        assert!(!s.saves("model.layers.0.mlp.up_proj.weight"));
    }

    #[test]
    fn scaling_is_alpha_over_r_or_over_its_root() {
        let mut s = spec(Targets::AllLinear, &[]);
        assert_eq!(s.scaling(), 2.0);
        s.use_rslora = true;
        assert_eq!(s.scaling(), 4.0);
    }

    #[test]
    fn merge_adds_the_scaled_product_transposed_for_conv1d() {
        let dev = Device::Cpu;
        // W (out 2, in 3); A (r 1, in 3) = [1, 2, 3]; B (out 2, r 1) = [1, -1]; scaling 2.
        let a = Tensor::new(&[[1f32, 2., 3.]], &dev).unwrap();
        let b = Tensor::new(&[[1f32], [-1.]], &dev).unwrap();
        let mut s = spec(Targets::AllLinear, &["score"]);
        s.r = 1;
        s.lora_alpha = 2.0;
        let tensors: HashMap<String, Tensor> = [
            ("m.lora_A.weight".to_string(), a),
            ("m.lora_B.weight".to_string(), b),
            (
                "score.weight".to_string(),
                Tensor::new(&[[5f32, 6.]], &dev).unwrap(),
            ),
        ]
        .into_iter()
        .collect();
        let mut adapter = AdapterDir {
            dir: PathBuf::from("x"),
            spec: s,
            fan_in_fan_out: false,
            tensors,
        };
        let mut w: HashMap<String, Tensor> = [(
            "m.weight".to_string(),
            Tensor::zeros((2, 3), DType::F32, &dev).unwrap(),
        )]
        .into_iter()
        .collect();
        adapter.merge_into(&mut w).unwrap();
        assert_eq!(
            w["m.weight"].to_vec2::<f32>().unwrap(),
            vec![vec![2., 4., 6.], vec![-2., -4., -6.]]
        );
        assert_eq!(
            w["score.weight"].to_vec2::<f32>().unwrap(),
            vec![vec![5., 6.]]
        );
        // Conv1D stores (in 3, out 2): the update goes in transposed.
        adapter.fan_in_fan_out = true;
        let mut w: HashMap<String, Tensor> = [(
            "m.weight".to_string(),
            Tensor::zeros((3, 2), DType::F32, &dev).unwrap(),
        )]
        .into_iter()
        .collect();
        adapter.merge_into(&mut w).unwrap();
        assert_eq!(
            w["m.weight"].to_vec2::<f32>().unwrap(),
            vec![vec![2., -2.], vec![4., -4.], vec![6., -6.]]
        );
    }
}
