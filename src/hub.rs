//! Where a model argument's files are: a local directory in Hugging Face
//! layout, or a hub id `org/name[@revision]` resolved through the Hugging
//! Face cache (the same layout as the Python library, so a cache filled by
//! Python works), then the network. Dataset repos resolve the same way, to
//! the data files of one split.
//!
//! hf-hub 0.4 reads none of HF_HUB_OFFLINE, HF_HUB_CACHE or HF_TOKEN, and
//! treats a commit hash as a revision to fetch: this module reads the
//! environment and the cache itself and calls hf-hub only to download.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::{Error, Result};

/// The hub settings of the environment, as huggingface_hub reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct HubSettings {
    /// The hub cache directory (HF_HUB_CACHE, else HF_HOME/hub).
    pub cache: PathBuf,
    pub endpoint: String,
    pub token: Option<String>,
    /// HF_HUB_OFFLINE: never touch the network.
    pub offline: bool,
    /// Download progress bars (only on a terminal).
    pub progress: bool,
}

impl HubSettings {
    /// Reads HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_ENDPOINT, HF_TOKEN,
    /// HF_TOKEN_PATH (and XDG_CACHE_HOME, HOME) from the process environment.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// The settings given a lookup of environment variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache_root = var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(var("HOME").unwrap_or_else(|| ".".into())).join(".cache")
            });
            cache_root.join("huggingface")
        });
        let cache = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("hub"));
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true")
        });
        let token_file = var("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("token"));
        let token = var("HF_TOKEN")
            .or_else(|| std::fs::read_to_string(token_file).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        Self {
            cache,
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()),
            token,
            offline,
            progress: std::io::stderr().is_terminal(),
        }
    }
}

/// A hub model id with its revision (default `main`).
#[derive(Debug, Clone, PartialEq)]
pub struct HubId {
    pub repo: String,
    pub revision: String,
}

impl HubId {
    /// Parses `org/name`, `name` (legacy ids such as `gpt2`) or either with `@revision`.
    pub fn parse(s: &str) -> Option<Self> {
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, rev),
            Some(_) => return None,
            None => (s, "main"),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        let valid = |p: &&str| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        (parts.len() <= 2 && parts.iter().all(valid)).then(|| Self {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    fn is_commit(&self) -> bool {
        self.revision.len() == 40 && self.revision.chars().all(|c| c.is_ascii_hexdigit())
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)
    }
}

/// The local directory of a model argument: the directory itself, or the
/// cache snapshot of a hub id (downloading what is missing unless offline).
pub fn resolve_model(arg: &str, settings: &HubSettings) -> Result<PathBuf> {
    let path = Path::new(arg);
    if path.is_dir() {
        // A candle-rlhf run directory stands for its newest complete checkpoint.
        if !path.join("config.json").is_file() {
            if let Some((_, newest)) = crate::checkpoint::latest(path)? {
                return Ok(newest);
            }
        }
        return Ok(path.to_path_buf());
    }
    let looks_like_path = arg.starts_with('.') || arg.starts_with('/') || arg.contains('\\');
    match HubId::parse(arg) {
        Some(id) if !looks_like_path => resolve_hub(&id, settings),
        _ => Err(Error::Msg(format!(
            "{arg}: no such model directory (and not a hub id `org/name[@revision]`)"
        ))),
    }
}

/// The files a model needs beside its weights; optional ones may be absent.
const REQUIRED: &[&str] = &["config.json"];
const OPTIONAL: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// Resolves each file of a hub repo in the cache, then over the network.
struct Resolver<'a> {
    id: &'a HubId,
    kind: RepoType,
    settings: &'a HubSettings,
    api: Option<hf_hub::api::sync::ApiRepo>,
}

impl<'a> Resolver<'a> {
    fn new(id: &'a HubId, kind: RepoType, settings: &'a HubSettings) -> Result<Self> {
        let api = if settings.offline {
            None
        } else {
            let api = ApiBuilder::from_cache(Cache::new(settings.cache.clone()))
                .with_endpoint(settings.endpoint.clone())
                .with_token(settings.token.clone())
                .with_progress(settings.progress)
                .build()
                .map_err(|e| Error::Msg(format!("hub client: {e}")))?;
            Some(api.repo(Repo::with_revision(
                id.repo.clone(),
                kind,
                id.revision.clone(),
            )))
        };
        Ok(Self {
            id,
            kind,
            settings,
            api,
        })
    }

    /// "model" or "dataset", for messages.
    fn noun(&self) -> &'static str {
        match self.kind {
            RepoType::Dataset => "dataset",
            RepoType::Space => "space",
            _ => "model",
        }
    }

    fn repo_dir(&self) -> PathBuf {
        self.settings.cache.join(format!(
            "{}s--{}",
            self.noun(),
            self.id.repo.replace('/', "--")
        ))
    }

    /// The cached snapshot: snapshots/COMMIT, COMMIT being the revision
    /// itself or what refs/REVISION holds (whitespace trimmed).
    fn snapshot(&self) -> Option<PathBuf> {
        let repo = self.repo_dir();
        let commit = if self.id.is_commit() {
            self.id.revision.clone()
        } else {
            std::fs::read_to_string(repo.join("refs").join(&self.id.revision))
                .ok()?
                .trim()
                .to_string()
        };
        Some(repo.join("snapshots").join(commit))
    }

    /// The cached copy of `file`.
    fn cached(&self, file: &str) -> Option<PathBuf> {
        let path = self.snapshot()?.join(file);
        path.is_file().then_some(path)
    }

    /// `file` from the cache, else downloaded; None when neither has it.
    fn fetch(&self, file: &str) -> Result<Option<PathBuf>> {
        if let Some(p) = self.cached(file) {
            return Ok(Some(p));
        }
        let Some(api) = &self.api else {
            return Ok(None);
        };
        match api.get(file) {
            Ok(p) => Ok(Some(p)),
            Err(hf_hub::api::sync::ApiError::RequestError(e))
                if matches!(e.as_ref(), ureq::Error::Status(404, _)) =>
            {
                Ok(None)
            }
            Err(e) => Err(Error::Msg(format!(
                "hub {} {}: {file}: {e}",
                self.noun(),
                self.id
            ))),
        }
    }

    fn missing(&self, file: &str) -> Error {
        let why = if self.settings.offline {
            format!(
                "is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE=1 forbids downloading",
                self.settings.cache.display()
            )
        } else {
            format!("does not exist on {}", self.settings.endpoint)
        };
        Error::Msg(format!(
            "hub {} {} (repo {}, revision {}): {file} {why}",
            self.noun(),
            self.id,
            self.id.repo,
            self.id.revision
        ))
    }
}

fn resolve_hub(id: &HubId, settings: &HubSettings) -> Result<PathBuf> {
    let r = Resolver::new(id, RepoType::Model, settings)?;
    let mut resolved = Vec::new();
    for file in REQUIRED {
        resolved.push(r.fetch(file)?.ok_or_else(|| r.missing(file))?);
    }
    for file in OPTIONAL {
        resolved.extend(r.fetch(file)?);
    }
    // Weights: one safetensors file, else a sharded index and its shards.
    if let Some(p) = r.fetch("model.safetensors")? {
        resolved.push(p);
    } else if let Some(index) = r.fetch("model.safetensors.index.json")? {
        let idx: serde_json::Value = crate::io::read_json(&index)?;
        let mut shards: Vec<&str> = idx["weight_map"]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        for shard in shards {
            resolved.push(r.fetch(shard)?.ok_or_else(|| r.missing(shard))?);
        }
        resolved.push(index);
    } else if r.cached("pytorch_model.bin").is_some()
        || (!settings.offline && r.fetch("pytorch_model.bin")?.is_some())
    {
        return Err(Error::Msg(format!(
            "hub model {id}: only pickle weights (pytorch_model.bin); candle-rlhf loads safetensors only (pickle can run code). Convert with transformers: AutoModel.from_pretrained(\"{}\").save_pretrained(DIR, safe_serialization=True), then pass DIR",
            id.repo
        )));
    } else {
        return Err(r.missing("model.safetensors"));
    }
    let snapshot = resolved[0]
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    if let Some(stray) = resolved.iter().find(|p| p.parent() != Some(&snapshot)) {
        return Err(Error::Msg(format!(
            "hub model {id}: {} is from another revision than {} (the repo changed while downloading); run again",
            stray.display(),
            snapshot.display()
        )));
    }
    Ok(snapshot)
}

/// The extensions of data files a split may consist of.
pub const DATA_EXTENSIONS: &[&str] = &[".parquet", ".jsonl", ".jsonl.gz", ".json", ".json.gz"];

/// The files of `split` among a dataset repo's files (paths relative to the
/// repo root), sorted: data files whose path has the split name as a whole
/// part between `/`, `-`, `.` or a space, as the datasets library's default
/// patterns find them (`data/train-00000-of-00001.parquet`, `train.jsonl`,
/// `test/0000.parquet`, `data/train_prefs-*.parquet` for split `train_prefs`).
pub fn split_files<'a>(files: impl IntoIterator<Item = &'a str>, split: &str) -> Vec<String> {
    let mut found: Vec<String> = files
        .into_iter()
        .filter(|f| DATA_EXTENSIONS.iter().any(|ext| f.ends_with(ext)))
        .filter(|f| f.split(['/', '-', '.', ' ']).any(|part| part == split))
        .map(str::to_string)
        .collect();
    found.sort();
    found
}

/// Every file under `dir`, as paths relative to it with `/` separators.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
    }
    out
}

/// The data files of one split of a dataset: in a local directory (laid out
/// as a dataset repo), else of a hub dataset repo `org/name[@revision]`,
/// from the cache when it holds the split, else listed and downloaded.
pub fn resolve_dataset(arg: &str, split: &str, settings: &HubSettings) -> Result<Vec<PathBuf>> {
    let path = Path::new(arg);
    if path.is_dir() {
        let files = split_files(files_under(path).iter().map(String::as_str), split);
        if files.is_empty() {
            return Err(Error::Msg(format!(
                "{arg}: no data file of split `{split}` (looked for {} files with `{split}` in their path)",
                DATA_EXTENSIONS.join(" ")
            )));
        }
        return Ok(files.iter().map(|f| path.join(f)).collect());
    }
    let Some(id) = HubId::parse(arg) else {
        return Err(Error::Msg(format!(
            "{arg}: no such data file or directory (and not a hub dataset id `org/name[@revision]`)"
        )));
    };
    let r = Resolver::new(&id, RepoType::Dataset, settings)?;
    if let Some(snapshot) = r.snapshot() {
        let files = split_files(files_under(&snapshot).iter().map(String::as_str), split);
        if !files.is_empty() {
            return Ok(files.iter().map(|f| snapshot.join(f)).collect());
        }
    }
    let Some(api) = &r.api else {
        return Err(r.missing(&format!("split `{split}`")));
    };
    let info = api
        .info()
        .map_err(|e| Error::Msg(format!("hub dataset {id}: listing its files: {e}")))?;
    let names: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let files = split_files(names.iter().copied(), split);
    if files.is_empty() {
        return Err(Error::Msg(format!(
            "hub dataset {id}: no data file of split `{split}` among its {} files ({})",
            names.len(),
            names.join(", ")
        )));
    }
    files
        .iter()
        .map(|f| r.fetch(f)?.ok_or_else(|| r.missing(f)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> HubSettings {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubSettings::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn split_files_follow_the_datasets_naming() {
        let repo = [
            "README.md",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
            "data/train_prefs-00000-of-00001.parquet",
            "validation.jsonl",
            "test/0000.parquet",
            "contest.json",
            "train.csv",
        ];
        assert_eq!(
            split_files(repo, "train"),
            [
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet"
            ]
        );
        assert_eq!(
            split_files(repo, "test"),
            ["data/test-00000-of-00001.parquet", "test/0000.parquet"]
        );
        assert_eq!(
            split_files(repo, "train_prefs"),
            ["data/train_prefs-00000-of-00001.parquet"]
        );
        assert_eq!(split_files(repo, "validation"), ["validation.jsonl"]);
        assert!(split_files(repo, "eval").is_empty());
    }

    #[test]
    fn hub_ids_parse_with_and_without_revision() {
        assert_eq!(
            HubId::parse("Qwen/Qwen2.5-0.5B"),
            Some(HubId {
                repo: "Qwen/Qwen2.5-0.5B".into(),
                revision: "main".into()
            })
        );
        assert_eq!(HubId::parse("gpt2@v1").unwrap().revision, "v1");
        for bad in ["a/b/c", "org/", "x@", "../etc", "a b/c"] {
            assert_eq!(HubId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn environment_is_read_as_huggingface_hub_reads_it() {
        let s = settings(&[("HOME", "/home/u")]);
        assert_eq!(s.cache, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(s.endpoint, "https://huggingface.co");
        assert!(!s.offline && s.token.is_none());
        let s = settings(&[
            ("HF_HOME", "/h"),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_TOKEN", " hf_x\n"),
        ]);
        assert_eq!(s.cache, PathBuf::from("/h/hub"));
        assert!(s.offline);
        assert_eq!(s.token.as_deref(), Some("hf_x"));
        let s = settings(&[
            ("HF_HOME", "/h"),
            ("HF_HUB_CACHE", "/c"),
            ("HF_ENDPOINT", "https://mirror"),
            ("HF_HUB_OFFLINE", "0"),
        ]);
        assert_eq!(s.cache, PathBuf::from("/c"));
        assert_eq!(s.endpoint, "https://mirror");
        assert!(!s.offline);
    }

    #[test]
    fn the_token_file_is_read_when_hf_token_is_unset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "hf_file\n").unwrap();
        let home = dir.path().to_string_lossy().into_owned();
        assert_eq!(
            settings(&[("HF_HOME", &home)]).token.as_deref(),
            Some("hf_file")
        );
        let other = dir.path().join("elsewhere");
        std::fs::write(&other, "hf_other").unwrap();
        let s = settings(&[
            ("HF_HOME", &home),
            ("HF_TOKEN_PATH", &other.to_string_lossy()),
        ]);
        assert_eq!(s.token.as_deref(), Some("hf_other"));
    }
}
