//! Config files, overrides and validation.

use candle_rlhf::config::{Config, KlEstimator, LrSchedulerType};
use std::fs;
use std::path::Path;

fn load_text(text: &str, sets: &[&str]) -> Result<Config, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    fs::write(&path, text).unwrap();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Config::load(Some(&path), &sets).map_err(|e| e.to_string())
}

#[test]
fn a_file_sets_only_what_it_changes_and_set_overrides_it() {
    let cfg = load_text(
        "[train]\nlearning_rate = 1e-4\nlr_scheduler_type = \"cosine\"\n\n[ppo]\nkl_estimator = \"k3\"\n",
        &["train.learning_rate=3e-6", "ppo.num_mini_batches=2"],
    )
    .unwrap();
    assert_eq!(cfg.train.learning_rate, 3e-6);
    assert_eq!(cfg.train.lr_scheduler_type, LrSchedulerType::Cosine);
    assert_eq!(cfg.ppo.kl_estimator, KlEstimator::K3);
    assert_eq!(cfg.ppo.num_mini_batches, 2);
    assert_eq!(cfg.ppo.kl_coef, 0.05, "TRL's default");
    assert_eq!(cfg.ppo.local_batch_size(&cfg.train), 16);
    assert_eq!(cfg.run.seed, 42);
}

#[test]
fn unknown_keys_are_refused_with_the_nearest_known_key() {
    let err = load_text(
        "[run]\nseed = 1\n\n[train]\nper_device_train_batch_size = 4\nlerning_rate = 1e-4\n",
        &[],
    )
    .unwrap_err();
    assert!(
        err.contains("run.toml") && err.contains("line 6") && err.contains("[train]"),
        "{err}"
    );
    assert!(
        err.contains("unknown key `lerning_rate`")
            && err.contains("did you mean `learning_rate`")
            && !err.contains("adam_beta1"),
        "{err}"
    );
    assert!(!err.contains('\n'), "one line: {err}");

    let err = load_text("[trian]\nlearning_rate = 1e-4\n", &[]).unwrap_err();
    assert!(err.contains("did you mean `train`"), "{err}");

    let err = load_text("", &["ppo.clip_range=0.1"]).unwrap_err();
    assert!(
        err.contains("--set ppo.clip_range=0.1") && err.contains("did you mean `ppo.cliprange`"),
        "{err}"
    );

    let err = load_text("[ppo]\nkl_estimator = \"k4\"\n", &[]).unwrap_err();
    assert!(
        err.contains("line 2") && err.contains("`k4`") && err.contains("`k3`"),
        "{err}"
    );
}

#[test]
fn wrong_types_name_the_line() {
    let err = load_text("[train]\n\nlearning_rate = \"fast\"\n", &[]).unwrap_err();
    assert!(
        err.contains("line 3") && err.contains("invalid type"),
        "{err}"
    );
    let err = load_text("[train\n", &[]).unwrap_err();
    assert!(err.contains("run.toml") && err.contains("line 1"), "{err}");
}

#[test]
fn invalid_values_are_refused_before_anything_loads() {
    let cases = [
        ("train.learning_rate=-1e-5", "train.learning_rate"),
        ("ppo.cliprange=0", "ppo.cliprange"),
        ("ppo.cliprange_value=-0.2", "ppo.cliprange_value"),
        ("train.warmup_ratio=1.5", "train.warmup_ratio"),
        (
            "train.per_device_train_batch_size=0",
            "train.per_device_train_batch_size",
        ),
        ("ppo.lam=1.2", "ppo.lam"),
        ("ppo.temperature=0", "ppo.temperature"),
        ("generate.top_p=0", "generate.top_p"),
        ("train.adam_beta2=1.0", "train.adam_beta2"),
    ];
    for (set, field) in cases {
        let err = load_text("", &[set]).unwrap_err();
        assert!(err.contains(&format!("`{field}`")), "{set}: {err}");
    }
    // Batch sizes that don't divide: a rollout batch of 8 x 3 = 24 in chunks of 10.
    let err = load_text(
        "[train]\nper_device_train_batch_size = 8\n[ppo]\nnum_mini_batches = 3\nlocal_rollout_forward_batch_size = 10\n",
        &[],
    )
    .unwrap_err();
    assert!(
        err.contains("local_rollout_forward_batch_size") && err.contains("24"),
        "{err}"
    );
    assert!(
        load_text("[ppo]\nlocal_rollout_forward_batch_size = 4\n", &[]).is_ok(),
        "4 divides 8"
    );
}

#[test]
fn a_missing_config_file_is_named() {
    let err = Config::load(Some(Path::new("/nonexistent/x.toml")), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/x.toml"), "{err}");
}

#[test]
fn the_resolved_config_round_trips_through_toml() {
    let cfg = load_text(
        "[train]\nmax_steps = 7\n[ppo]\nmissing_eos_penalty = 1.0\n",
        &["run.out=runs/x"],
    )
    .unwrap();
    let text = cfg.to_toml_string().unwrap();
    assert_eq!(Config::from_toml_str("saved", &text).unwrap(), cfg);
}

#[test]
fn every_preset_in_configs_is_valid() {
    let dir = crate::repo().join("configs");
    let mut n = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 1, "no presets found in {}", dir.display());
}

#[test]
fn every_bench_shape_is_a_valid_model_config() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir("configs/models").unwrap() {
        let path = entry.unwrap().path();
        let shape = candle_rlhf::app::bench::Shape::load(&path).unwrap();
        let cfg = candle_rlhf::models::ArchConfig::from_value(&shape.config, &path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let w = &shape.workload;
        assert!(
            w.prompt_length + w.response_length <= cfg.max_positions(),
            "{}",
            path.display()
        );
        names.push(shape.name);
    }
    names.sort();
    assert_eq!(
        names,
        [
            "gpt2",
            "minilm",
            "qwen2.5-0.5b",
            "qwen2.5-1.5b",
            "qwen2.5-3b",
            "smollm2-135m",
            "tiny"
        ]
    );
}

#[test]
fn the_shared_dataset_keys_are_refused_misspelt_in_every_section() {
    let err = load_text("[reward]\nmax_length = 10\ndatset = \"x.jsonl\"\n", &[]).unwrap_err();
    assert!(
        err.contains("line 3")
            && err.contains("[reward]")
            && err.contains("did you mean `dataset`"),
        "{err}"
    );
    let err = load_text("", &["ppo.dataset_train_splitt=dev"]).unwrap_err();
    assert!(
        err.contains("did you mean `ppo.dataset_train_split`"),
        "{err}"
    );
    let err = load_text("[sft]\neval_datset = \"e.jsonl\"\n", &[]).unwrap_err();
    assert!(err.contains("did you mean `eval_dataset`"), "{err}");
    let cfg = load_text(
        "[sft]\ndataset = \"a\"\n[reward]\ndataset_test_split = \"dev\"\n[ppo]\neval_dataset = \"b\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(cfg.sft.data().dataset, "a");
    assert_eq!(cfg.reward.data().test_split, "dev");
    assert_eq!(cfg.ppo.data().eval_dataset, Some("b"));
    assert_eq!(cfg.ppo.data().train_split, "train", "TRL's default split");
    // An unset training set is one error naming the section's key.
    let err = cfg.reward.data().train().unwrap_err().to_string();
    assert!(err.contains("`reward.dataset`"), "{err}");
    assert_eq!(cfg.sft.data().train().unwrap(), "a");
}

#[test]
fn model_revision_applies_to_hub_ids_and_conflicts_are_refused() {
    use candle_rlhf::config::ModelConfig;
    let m = |name: &str, rev: Option<&str>| ModelConfig {
        name_or_path: name.into(),
        revision: rev.map(str::to_string),
        ..Default::default()
    };
    assert_eq!(m("org/name", None).resolved_name().unwrap(), "org/name");
    assert_eq!(
        m("org/name", Some("v1")).resolved_name().unwrap(),
        "org/name@v1"
    );
    assert_eq!(
        m("org/name@v1", Some("v1")).resolved_name().unwrap(),
        "org/name@v1"
    );
    let err = m("org/name@v2", Some("v1"))
        .resolved_name()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`model.revision`") && err.contains("v2"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().to_string_lossy().into_owned();
    let err = m(&local, Some("v1"))
        .resolved_name()
        .unwrap_err()
        .to_string();
    assert!(err.contains("local directory"), "{err}");
    // From a file, too.
    let cfg = load_text(
        "[model]\nname_or_path = \"org/name\"\nrevision = \"abc\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(cfg.model.resolved_name().unwrap(), "org/name@abc");
}

#[test]
fn every_config_key_has_one_doc_line() {
    // The sections are a sheet: `pub key: Type = default,` under its `///` line.
    let text = fs::read_to_string(crate::repo().join("src/config/sections.rs")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut keys = 0;
    for (i, line) in lines.iter().enumerate() {
        let l = line.trim();
        if l.starts_with("pub ") && l.contains(": ") && l.contains(" = ") && l.ends_with(',') {
            keys += 1;
            let doc = lines[..i]
                .iter()
                .rev()
                .find(|p| !p.trim().starts_with("#["))
                .unwrap();
            assert!(doc.trim().starts_with("///"), "no doc line above `{l}`");
        }
    }
    assert!(
        keys >= 70,
        "only {keys} keys found: the sheet's format changed"
    );
}
