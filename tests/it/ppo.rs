//! PPO on the fixtures: a programmatic reward the tiny policy can learn,
//! the KL penalty holding it back, checkpoints, resume.

use std::path::{Path, PathBuf};

use crate::train_with_reward;
use candle_rlhf::app::fixtures;
use candle_rlhf::config::Config;
use candle_rlhf::rewards::Completion;
use candle_rlhf::signal::StopSignal;
use candle_rlhf::trainers::online::OnlineRun;
use candle_rlhf::Result;

use crate::models::{fixtures_root, model_dir};

/// The hidden rule: the fraction of response tokens whose id is in the
/// lower half of the vocabulary (a random policy scores about 0.5).
pub fn low_half(batch: &[Completion]) -> Result<Vec<f32>> {
    Ok(batch
        .iter()
        .map(|c| {
            let low = c.response_ids.iter().filter(|&&id| id < 222).count();
            low as f32 / c.response_ids.len().max(1) as f32
        })
        .collect())
}

/// 32 held-out prompts (another seed than the training prompts).
pub fn eval_prompts() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let path = fixtures_root().join("data/eval-prompts.jsonl");
        let rows = fixtures::synthetic_preferences(7, 32);
        fixtures::write_jsonl(&path, &rows).unwrap();
        path
    })
    .clone()
}

pub fn ppo_config(run: &Path, extra: &[&str]) -> Config {
    let quoted = |p: &Path| format!("{:?}", p.to_string_lossy());
    let mut sets = vec![
        format!("model.name_or_path={}", quoted(&model_dir("tiny-gpt2"))),
        format!(
            "ppo.dataset={}",
            quoted(&fixtures_root().join(fixtures::PREFERENCES))
        ),
        format!("ppo.eval_dataset={}", quoted(&eval_prompts())),
        format!("run.out={}", quoted(run)),
        crate::device_setting(),
        "train.learning_rate=3e-3".into(),
        "train.per_device_train_batch_size=8".into(),
        "train.save_steps=10".into(),
        "ppo.num_mini_batches=2".into(),
        "ppo.local_rollout_forward_batch_size=16".into(),
        "ppo.response_length=8".into(),
        "ppo.total_episodes=640".into(),
        "ppo.stop_token_id=100000".into(), // never sampled: fixed-length responses
        // Checkpointing only costs time on the tiny fixtures (tests/it/memory.rs tests it).
        "train.activation_checkpointing=false".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::load(None, &sets).unwrap()
}

fn run(dir: &Path, extra: &[&str]) -> OnlineRun {
    train_with_reward(
        &ppo_config(dir, extra),
        dir,
        false,
        &StopSignal::new(),
        &low_half,
        None,
    )
    .unwrap()
}

#[test]
fn ppo_raises_a_learnable_reward_and_a_huge_kl_coef_holds_it_back() {
    let tmp = tempfile::tempdir().unwrap();
    let free = run(&tmp.path().join("free"), &[]);
    let held = run(&tmp.path().join("held"), &["ppo.kl_coef=50.0"]);
    let (b, a) = (
        free.eval_before.clone().unwrap(),
        free.eval_after.clone().unwrap(),
    );
    let (hb, ha) = (held.eval_before.unwrap(), held.eval_after.unwrap());
    eprintln!(
        "kl_coef 0.05: reward {:.3} -> {:.3}, KL {:.3}; kl_coef 50: reward {:.3} -> {:.3}, KL {:.3}; {:.3} s/update ({} over {} updates)",
        b.reward(), a.reward(), a.kl(), hb.reward(), ha.reward(), ha.kl(),
        free.seconds_per_iteration, free.total_times(), free.iterations
    );
    assert_eq!(free.iterations, 40);
    // Measured: 0.562 -> 0.688 (KL 2.1) free, 0.562 -> 0.488 (KL 0.48) held.
    assert!(a.reward() > b.reward() + 0.08, "{b} -> {a}");
    assert!(a.kl().is_finite() && a.kl() < 10.0, "KL bounded: {a}");
    assert!(
        ha.reward() - hb.reward() < (a.reward() - b.reward()) / 3.0,
        "a huge kl_coef barely moves the reward: {hb} -> {ha}"
    );
    assert!(ha.kl() < a.kl() / 2.0, "and keeps KL small: {ha} vs {a}");
    // Metrics carry TRL's names; samples and eval completions are written.
    let metrics = std::fs::read_to_string(free.run_dir.join("metrics.jsonl")).unwrap();
    for name in [
        "objective/kl",
        "objective/entropy",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "objective/scores",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "policy/entropy_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "val/ratio",
        "val/ratio_var",
        "val/num_eos_tokens",
        "val/explained_variance",
        "time/generate",
        "time/forward",
        "time/score",
        "time/update",
        "eval/reward",
    ] {
        assert!(metrics.contains(&format!("\"{name}\"")), "{name} missing");
    }
    assert!(free.run_dir.join("samples.jsonl").is_file());
    assert!(free.run_dir.join("eval-40.jsonl").is_file());
}

#[test]
fn an_interrupted_ppo_run_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let short = ["ppo.total_episodes=64", "train.save_steps=2"];
    let dir = tmp.path().join("stopped");
    let stop = StopSignal::new();
    stop.request(); // as Ctrl-C: checkpoint after the first update, then stop
    let err = train_with_reward(
        &ppo_config(&dir, &short),
        &dir,
        false,
        &stop,
        &low_half,
        None,
    )
    .unwrap_err();
    assert!(
        matches!(err, candle_rlhf::Error::Interrupted { step: 1, .. }),
        "{err}"
    );
    let resumed = train_with_reward(
        &ppo_config(&dir, &short),
        &dir,
        true,
        &StopSignal::new(),
        &low_half,
        None,
    )
    .unwrap();
    let straight_dir = tmp.path().join("straight");
    let straight = train_with_reward(
        &ppo_config(&straight_dir, &short),
        &straight_dir,
        false,
        &StopSignal::new(),
        &low_half,
        None,
    )
    .unwrap();
    assert_eq!(resumed.iterations, 4);
    for file in ["model.safetensors", "value_head.safetensors"] {
        let read = |d: &Path| std::fs::read(d.join(file)).unwrap();
        assert_eq!(
            read(&resumed.checkpoint),
            read(&straight.checkpoint),
            "{file}: resumed run differs from an uninterrupted one"
        );
    }
}

#[test]
fn ppo_cli_trains_with_a_reward_model_and_saves_a_loadable_policy() {
    use std::process::Command;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let root = fixtures_root();
    let quoted = |p: &Path| format!("{:?}", p.to_string_lossy());
    let base = |c: &mut Command| {
        c.env_remove("RUST_BACKTRACE")
            .arg("ppo")
            .arg("--config")
            .arg(crate::repo().join("configs/tiny-ppo.toml"))
            .args([
                "--set",
                &format!("model.name_or_path={}", quoted(&model_dir("tiny-gpt2"))),
            ])
            .args([
                "--set",
                &format!("ppo.dataset={}", quoted(&root.join(fixtures::PREFERENCES))),
            ])
            .args([
                "--set",
                "ppo.total_episodes=32",
                "--set",
                "train.save_steps=100",
            ])
            .args(["--out", &out.to_string_lossy()]);
    };
    let mut c = Command::new(crate::bin());
    base(&mut c);
    c.args([
        "--set",
        &format!(
            "ppo.reward_model={}",
            quoted(&root.join("reward/tiny-gpt2"))
        ),
    ]);
    let o = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}{stdout}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("iterations: 2 "), "{stdout}");
    // The policy checkpoint is a Hugging Face directory that loads back; the
    // reward model shares the policy's tokenizer, so the critic started from
    // it (the N+ default) and is saved beside the policy.
    let ckpt = out.join("checkpoints/2");
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "critic.safetensors",
    ] {
        assert!(ckpt.join(f).is_file(), "{f}");
    }
    let (_, vb, _) = candle_rlhf::models::load_dir_frozen(
        &ckpt,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let cfg = candle_rlhf::models::ArchConfig::load(&ckpt.join("config.json")).unwrap();
    candle_rlhf::models::CausalLm::load(vb, &cfg, true).unwrap();
    // A clear error when the reward model is missing, exit 2 for a config error.
    let mut c = Command::new(crate::bin());
    base(&mut c);
    let o = c
        .args(["--set", "ppo.reward_model=\"/nonexistent/rm\""])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("/nonexistent/rm"),
        "{err}"
    );
}

#[test]
fn reinforce_pp_estimators_learn_without_a_critic() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("reinforce", vec!["ppo.advantage_estimator=reinforce"]),
        (
            "reinforce_baseline",
            vec![
                "ppo.advantage_estimator=reinforce_baseline",
                "ppo.n_samples_per_prompt=4",
            ],
        ),
    ] {
        let out = run(&tmp.path().join(name), &extra);
        let (b, a) = (out.eval_before.unwrap(), out.eval_after.unwrap());
        eprintln!(
            "{name}: reward {:.3} -> {:.3}, KL {:.3}",
            b.reward(),
            a.reward(),
            a.kl()
        );
        assert!(a.reward() > b.reward() + 0.08, "{name}: {b} -> {a}");
        // No critic was built: the checkpoint holds the policy alone.
        assert!(out.checkpoint.join("model.safetensors").is_file());
        for f in ["value_head.safetensors", "critic.safetensors"] {
            assert!(!out.checkpoint.join(f).exists(), "{name}: {f}");
        }
    }
    // The baseline needs a group.
    let e = Config::load(
        None,
        &["ppo.advantage_estimator=reinforce_baseline".to_string()],
    )
    .unwrap_err();
    assert!(e.to_string().contains("ppo.n_samples_per_prompt"), "{e}");
}

#[test]
fn ppo_with_lora_trains_policy_and_critic_adapters_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let reward_dir = fixtures_root().join("reward/tiny-gpt2");
    let sets = [
        "ppo.total_episodes=64",
        "train.save_steps=2",
        "ppo.value_model=\"reward\"",
        "lora.r=4",
        "lora.lora_alpha=8",
        "lora.lora_dropout=0.1",
        "lora.target_modules=\"all-linear\"",
        "lora.critic=true",
    ];
    let go = |dir: &Path, stop: &StopSignal, resume: bool| {
        train_with_reward(
            &ppo_config(dir, &sets),
            dir,
            resume,
            stop,
            &low_half,
            Some(&reward_dir),
        )
    };
    let dir = tmp.path().join("stopped");
    let stop = StopSignal::new();
    stop.request();
    let err = go(&dir, &stop, false).unwrap_err();
    assert!(
        matches!(err, candle_rlhf::Error::Interrupted { step: 1, .. }),
        "{err}"
    );
    let resumed = go(&dir, &StopSignal::new(), true).unwrap();
    let straight_dir = tmp.path().join("straight");
    let straight = go(&straight_dir, &StopSignal::new(), false).unwrap();
    assert_eq!(resumed.iterations, 4);
    assert!(!straight.checkpoint.join("model.safetensors").exists());
    for file in ["adapter_model.safetensors", "critic.safetensors"] {
        let read = |d: &Path| std::fs::read(d.join(file)).unwrap();
        assert_eq!(
            read(&resumed.checkpoint),
            read(&straight.checkpoint),
            "{file}: resumed run differs"
        );
    }
    // The critic trains adapters of its own and its `score` head, nothing else.
    let critic = candle_rlhf::io::load_safetensors(
        &straight.checkpoint.join("critic.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(critic.contains_key("score.weight"));
    assert!(
        critic
            .keys()
            .all(|k| k == "score.weight" || k.contains(".lora_A.") || k.contains(".lora_B.")),
        "{:?}",
        critic.keys()
    );
    // The policy trained: its adapter's B moved away from 0.
    let adapter = candle_rlhf::io::load_safetensors(
        &straight.checkpoint.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let moved = adapter
        .iter()
        .filter(|(k, _)| k.contains(".lora_B."))
        .all(|(_, t)| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        });
    assert!(moved, "every B has trained");
}
