//! Hub ids through the self-made hub cache (offline), the generate CLI on
//! every architecture, and one clear error per kind of bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::DType;
use candle_rlhf::hub::{resolve_model, HubSettings};

use crate::models::{fixtures_root, load, max_abs_diff, model_dir, outputs, CAUSAL};

pub fn offline(cache: &Path) -> HubSettings {
    HubSettings {
        cache: cache.to_path_buf(),
        endpoint: "http://127.0.0.1:9".into(), // never reached
        token: None,
        offline: true,
        progress: false,
    }
}

pub fn hub_cache() -> PathBuf {
    fixtures_root().join("hub")
}

/// A copy of the fixture hub cache that a test may change.
fn cache_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .arg("-a")
        .arg(hub_cache())
        .arg(dir.path().join("hub"))
        .status()
        .unwrap();
    assert!(status.success());
    dir
}

fn commit_of(cache: &Path, name: &str) -> String {
    std::fs::read_to_string(cache.join(format!("models--candle-rlhf--{name}/refs/main"))).unwrap()
}

#[test]
fn hub_ids_resolve_to_the_cached_snapshot_offline() {
    let s = offline(&hub_cache());
    for name in ["tiny-llama", "tiny-bert"] {
        let dir = resolve_model(&format!("candle-rlhf/{name}"), &s).unwrap();
        let commit = commit_of(&hub_cache(), name);
        assert!(
            dir.ends_with(format!("snapshots/{commit}")),
            "{}",
            dir.display()
        );
        // The same model as the local directory.
        let cfg = candle_rlhf::models::ArchConfig::load(&dir.join("config.json")).unwrap();
        let (_, vb, _) =
            candle_rlhf::models::load_dir(&dir, DType::F32, &candle_core::Device::Cpu).unwrap();
        let from_hub = candle_rlhf::models::Backbone::load(vb, &cfg).unwrap();
        let (local, _, _) = load(name, DType::F32);
        let rows = vec![vec![4u32, 5, 6]];
        assert_eq!(
            max_abs_diff(&outputs(&from_hub, &rows).0, &outputs(&local, &rows).0),
            0.0
        );
        // A commit hash as revision reads snapshots/COMMIT directly.
        assert_eq!(
            resolve_model(&format!("candle-rlhf/{name}@{commit}"), &s).unwrap(),
            dir
        );
    }
    // A local directory is taken as is.
    assert_eq!(
        resolve_model(&model_dir("tiny-gpt2").to_string_lossy(), &s).unwrap(),
        model_dir("tiny-gpt2")
    );
}

#[test]
fn a_refs_file_written_with_a_newline_still_resolves() {
    let tmp = cache_copy();
    let cache = tmp.path().join("hub");
    let refs = cache.join("models--candle-rlhf--tiny-gpt2/refs/main");
    let commit = std::fs::read_to_string(&refs).unwrap();
    std::fs::write(&refs, format!("{commit}\n")).unwrap();
    let dir = resolve_model("candle-rlhf/tiny-gpt2", &offline(&cache)).unwrap();
    assert!(dir.ends_with(&commit));
}

#[test]
fn offline_misses_name_the_repo_revision_and_file() {
    let s = offline(&hub_cache());
    let err = resolve_model("someone/not-cached", &s)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("someone/not-cached")
            && err.contains("revision main")
            && err.contains("config.json")
            && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    let err = resolve_model("candle-rlhf/tiny-gpt2@v2", &s)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("revision v2") && err.contains("config.json"),
        "{err}"
    );
    // Weights missing from the cache are named too.
    let tmp = cache_copy();
    let cache = tmp.path().join("hub");
    let commit = commit_of(&cache, "tiny-gpt2");
    let snap = cache.join(format!("models--candle-rlhf--tiny-gpt2/snapshots/{commit}"));
    std::fs::remove_file(snap.join("model.safetensors")).unwrap();
    let err = resolve_model("candle-rlhf/tiny-gpt2", &offline(&cache))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("tiny-gpt2@main"),
        "{err}"
    );
    // Only pickle weights: refused with the reason and the way out.
    std::fs::write(snap.join("pytorch_model.bin"), b"pickle").unwrap();
    let err = resolve_model("candle-rlhf/tiny-gpt2", &offline(&cache))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("safetensors only") && err.contains("safe_serialization"),
        "{err}"
    );
    // Neither a directory nor a hub id.
    let err = resolve_model("./no/such/dir", &s).unwrap_err().to_string();
    assert!(err.contains("no such model directory"), "{err}");
}

fn bin() -> Command {
    let mut c = Command::new(crate::bin());
    for var in [
        "RUST_BACKTRACE",
        "HF_HUB_CACHE",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "HF_TOKEN",
    ] {
        c.env_remove(var);
    }
    c
}

/// Runs `generate --json` greedily; returns the parsed lines.
fn generate_json(cmd: &mut Command, model: &str) -> Vec<serde_json::Value> {
    let out = cmd
        .args([
            "generate",
            "--model",
            model,
            "--prompt",
            "the movie was",
            "--prompt",
            "overall the plot",
        ])
        .args([
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
            "--json",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{model}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn generate_cli_prints_text_from_every_architecture_locally_and_through_the_hub_cache() {
    // HF_HOME with the cache in HF_HOME/hub, as huggingface_hub lays it out.
    let home = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(hub_cache(), home.path().join("hub")).unwrap();
    for name in CAUSAL {
        let local = generate_json(&mut bin(), &model_dir(name).to_string_lossy());
        assert_eq!(local.len(), 2, "{name}");
        assert_eq!(local[0]["prompt"], "the movie was");
        for line in &local {
            let ids = line["completion_ids"].as_array().unwrap();
            assert!(!ids.is_empty() && ids.len() <= 5, "{name}: {line}");
            assert!(line["completion"].is_string());
        }
        let mut hub = bin();
        hub.env("HF_HOME", home.path()).env("HF_HUB_OFFLINE", "1");
        let through_hub = generate_json(&mut hub, &format!("candle-rlhf/{name}"));
        assert_eq!(through_hub, local, "{name}: hub cache vs local directory");
    }
    // HF_HUB_CACHE wins over HF_HOME.
    let mut c = bin();
    c.env("HF_HOME", "/nonexistent")
        .env("HF_HUB_CACHE", hub_cache())
        .env("HF_HUB_OFFLINE", "1");
    assert_eq!(generate_json(&mut c, "candle-rlhf/tiny-qwen2").len(), 2);
    // Plain text output: the prompt followed by its completion.
    let out = bin()
        .args(["generate", "--model"])
        .arg(model_dir("tiny-pythia"))
        .args([
            "--prompt",
            "the plot",
            "--max-new-tokens",
            "3",
            "--seed",
            "4",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .starts_with("the plot"));
}

/// A copy of a fixture model directory with `edit` applied.
fn broken(name: &str, edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(model_dir(name).join(f), dir.path().join(f)).unwrap();
    }
    edit(dir.path());
    dir
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut cfg);
    std::fs::write(path, cfg.to_string()).unwrap();
}

#[test]
fn bad_models_give_one_clear_error_line_and_a_nonzero_exit() {
    let cases: Vec<(tempfile::TempDir, Vec<&str>)> = vec![
        (
            broken("tiny-llama", |d| {
                std::fs::remove_file(d.join("config.json")).unwrap()
            }),
            vec!["config.json: missing"],
        ),
        (
            broken("tiny-llama", |d| {
                edit_config(d, |c| c["model_type"] = "t5".into())
            }),
            vec![
                "model_type `t5` is not supported",
                "gpt2, llama, mistral, qwen2, qwen3, gpt_neox, bert, distilbert",
            ],
        ),
        (
            broken("tiny-llama", |d| {
                edit_config(d, |c| c["intermediate_size"] = 100.into())
            }),
            vec![
                "model.layers.0.mlp.gate_proj.weight",
                "[96, 64]",
                "[100, 64]",
            ],
        ),
        (
            broken("tiny-pythia", |d| {
                edit_config(d, |c| c["num_hidden_layers"] = 3.into())
            }),
            vec!["no tensor `gpt_neox.layers.2."],
        ),
        (
            broken("tiny-qwen2", |d| {
                std::fs::remove_file(d.join("tokenizer.json")).unwrap()
            }),
            vec!["tokenizer.json: missing"],
        ),
        (
            broken("tiny-mistral", |d| {
                let p = d.join("model.safetensors");
                let bytes = std::fs::read(&p).unwrap();
                std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
            }),
            vec!["model.safetensors"],
        ),
        (
            broken("tiny-gpt2", |d| {
                std::fs::remove_file(d.join("model.safetensors")).unwrap();
                std::fs::write(d.join("pytorch_model.bin"), b"pickle").unwrap();
            }),
            vec!["safetensors only", "safe_serialization"],
        ),
        (
            broken("tiny-gpt2", |d| {
                edit_config(d, |c| c["n_embd"] = "wide".into())
            }),
            vec!["config.json", "n_embd"],
        ),
        (
            broken("tiny-llama", |d| {
                std::fs::write(d.join("config.json"), "{ not json").unwrap()
            }),
            vec!["config.json"],
        ),
    ];
    for (dir, wants) in &cases {
        let out = bin()
            .args(["generate", "--device", "cpu", "--prompt", "x", "--model"])
            .arg(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|l| !l.contains("INFO")).collect();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].starts_with("error: "), "{stderr}");
        for want in wants {
            assert!(
                errors[0].contains(want),
                "missing `{want}` in: {}",
                errors[0]
            );
        }
    }
    // A hub id that is not cached, offline.
    let out = bin()
        .env("HF_HUB_CACHE", hub_cache())
        .env("HF_HUB_OFFLINE", "1")
        .args([
            "generate",
            "--model",
            "candle-rlhf/tiny-missing",
            "--prompt",
            "x",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("error: hub model candle-rlhf/tiny-missing@main")),
        "{stderr}"
    );
}

#[test]
fn sharded_checkpoints_load_locally_and_through_the_cache() {
    let src = model_dir("tiny-llama");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let tensors = candle_rlhf::io::load_safetensors(
        &src.join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let (first, second): (Vec<_>, Vec<_>) = tensors
        .into_iter()
        .partition(|(k, _)| k.contains("layers.0.") || k.contains("embed"));
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", &first),
        ("model-00002-of-00002.safetensors", &second),
    ] {
        candle_rlhf::io::save_safetensors(part, &dir.path().join(file)).unwrap();
        for (k, _) in part.iter() {
            weight_map.insert(k.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    candle_rlhf::app::fixtures::write_hub_cache_entry(cache.path(), "someone/sharded", dir.path())
        .unwrap();
    let from_cache = resolve_model("someone/sharded", &offline(cache.path())).unwrap();
    let (local, _, _) = load("tiny-llama", DType::F32);
    let rows = vec![vec![4u32, 5, 6]];
    for d in [dir.path().to_path_buf(), from_cache] {
        let (cfg, vb, _) =
            candle_rlhf::models::load_dir(&d, DType::F32, &candle_core::Device::Cpu).unwrap();
        let m = candle_rlhf::models::Backbone::load(vb, &cfg).unwrap();
        assert_eq!(
            max_abs_diff(&outputs(&m, &rows).0, &outputs(&local, &rows).0),
            0.0,
            "{}",
            d.display()
        );
    }
}
