//! The one online engine across algorithms: every completion is scored
//! with its own prompt row, evaluation draws `num_generations_eval`
//! completions per prompt (PPO: n_samples_per_prompt), and a run directory
//! written before the engine was one resumes.

use std::path::Path;

use candle_rlhf::config::{Config, RewardFuncConfig, RewardFuncType};
use candle_rlhf::signal::StopSignal;
use candle_rlhf::trainers::online::{self, Trainer};

use crate::models::{fixtures_root, model_dir};
use crate::ppo::{eval_prompts, ppo_config};

fn quoted(p: &Path) -> String {
    format!("{:?}", p.to_string_lossy())
}

/// A tiny GRPO, RLOO or PPO config on `dataset`, with `funcs`, then `extra`.
fn config(
    t: Trainer,
    run: &Path,
    dataset: &Path,
    funcs: Vec<RewardFuncConfig>,
    extra: &[String],
) -> Config {
    let s = t.name();
    let mut sets = vec![
        format!("model.name_or_path={}", quoted(&model_dir("tiny-gpt2"))),
        format!("{s}.dataset={}", quoted(dataset)),
        format!("{s}.eval_dataset={}", quoted(dataset)),
        format!("run.out={}", quoted(run)),
        crate::device_setting(),
        "train.per_device_train_batch_size=8".into(),
        "train.save_steps=100".into(),
        // Checkpointing only costs time on the tiny fixtures (tests/it/memory.rs tests it).
        "train.activation_checkpointing=false".into(),
    ];
    match t {
        Trainer::Ppo => sets.extend([
            "ppo.total_episodes=8".into(),
            "ppo.response_length=4".into(),
            "ppo.num_ppo_epochs=1".into(),
            "ppo.value_model=\"head\"".into(),
        ]),
        _ => sets.extend([
            "train.max_steps=1".into(),
            format!("{s}.num_generations=4"),
            format!("{s}.max_completion_length=4"),
            format!("{s}.max_prompt_length=64"),
        ]),
    }
    sets.extend(extra.iter().cloned());
    let mut cfg = Config::load(None, &sets).unwrap();
    cfg.reward_funcs = funcs;
    cfg
}

/// A regex reward: 1 when the completion has an "e".
fn has_e() -> Vec<RewardFuncConfig> {
    vec![RewardFuncConfig {
        name: "has_e".into(),
        kind: RewardFuncType::Regex,
        pattern: Some("e".into()),
        ..Default::default()
    }]
}

#[test]
fn prompts_that_tokenize_alike_keep_their_own_columns() {
    // Regression: completions found their prompt row by its token ids, so
    // of two rows with the same prompt and different columns only one ever
    // reached the scorer. Each prompt appears twice here, with answer ""
    // and answer "x"; `^()` captures "" from any completion, so exactly the
    // rows whose answer is "" score 1 and every evaluation's mean is 0.5.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("twins.jsonl");
    let mut text = String::new();
    for p in ["the movie was", "i think the film", "a story about"] {
        for answer in ["", "x"] {
            text += &format!("{}\n", serde_json::json!({"prompt": p, "answer": answer}));
        }
    }
    std::fs::write(&data, text).unwrap();
    let funcs = vec![RewardFuncConfig {
        name: "match".into(),
        kind: RewardFuncType::ExactMatch,
        pattern: Some("^()".into()),
        column: Some("answer".into()),
        ..Default::default()
    }];
    for t in [Trainer::Ppo, Trainer::Grpo, Trainer::Rloo] {
        let dir = tmp.path().join(t.name());
        let cfg = config(t, &dir, &data, funcs.clone(), &[]);
        let out = online::train(&cfg, t, &dir, false, &StopSignal::new()).unwrap();
        for e in [out.eval_before.unwrap(), out.eval_after.unwrap()] {
            assert_eq!(e.get("rewards/match/mean"), Some(0.5), "{}: {e}", t.name());
            // Each completion's reward is its own row's: the rows come in
            // prompt order, `group` completions each, answers "" then "x".
            let rewards: Vec<f64> = e
                .completions
                .iter()
                .map(|c| c["reward"].as_f64().unwrap())
                .collect();
            let want: Vec<f64> = (0..6)
                .flat_map(|row| std::iter::repeat_n(((row % 2) == 0) as u8 as f64, e.group))
                .collect();
            assert_eq!(rewards, want, "{}", t.name());
        }
        // The training iterations log the function's mean as well.
        let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        assert!(metrics.contains("rewards/match/mean"), "{metrics}");
    }
}

#[test]
fn evaluation_draws_num_generations_eval_completions_per_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures_root().join(candle_rlhf::app::fixtures::PREFERENCES);
    let funcs = has_e();
    let eval_rows = 32; // eval_prompts(): 32 held-out prompts
    for (t, key, group) in [
        (Trainer::Grpo, Some("grpo.num_generations_eval=3"), 3),
        (Trainer::Grpo, None, 4), // unset: num_generations
        (Trainer::Rloo, Some("rloo.num_generations_eval=2"), 2),
        (Trainer::Ppo, Some("ppo.n_samples_per_prompt=2"), 2),
    ] {
        let dir = tmp.path().join(format!("{}-{group}", t.name()));
        let mut sets = vec![format!(
            "{}.eval_dataset={}",
            t.name(),
            quoted(&eval_prompts())
        )];
        sets.extend(key.map(str::to_string));
        let cfg = config(t, &dir, &data, funcs.clone(), &sets);
        let out = online::train(&cfg, t, &dir, false, &StopSignal::new()).unwrap();
        let e = out.eval_after.unwrap();
        assert_eq!((e.prompts, e.group), (eval_rows, group), "{key:?}");
        assert_eq!(e.completions.len(), eval_rows * group, "{key:?}");
        let file = std::fs::read_to_string(dir.join("eval-0.jsonl")).unwrap();
        assert_eq!(file.lines().count(), eval_rows * group, "{key:?}");
        for name in [
            "eval/reward",
            "eval/reward_std",
            "eval/rewards/has_e/mean",
            "eval/completions/mean_length",
            "eval/completions/clipped_ratio",
        ] {
            assert!(e.figures.iter().any(|(k, _)| k == name), "{name}: {e:?}");
        }
        // A reference is loaded by PPO always and by RLOO (beta 0.05): eval/kl.
        assert_eq!(e.get("kl").is_some(), t != Trainer::Grpo, "{}", t.name());
    }
}

/// Rewrites a checkpoint's trainer state as the version before the one
/// engine wrote it: PPO kept `{kl_coef, episode}`, GRPO and RLOO
/// `{num_tokens}`.
fn to_old_state(checkpoint: &Path, keep: &[&str]) {
    let path = checkpoint.join("trainer_state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let extra = state["extra"].as_object_mut().unwrap();
    extra.retain(|k, _| keep.contains(&k.as_str()));
    assert_eq!(extra.len(), keep.len(), "{extra:?}");
    std::fs::write(&path, serde_json::to_string(&state).unwrap()).unwrap();
}

#[test]
fn a_run_directory_of_the_two_loop_version_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let reward = crate::ppo::low_half;
    for (t, keep) in [
        (Trainer::Ppo, &["kl_coef", "episode"][..]),
        (Trainer::Grpo, &["num_tokens"][..]),
    ] {
        let cfg = |dir: &Path| match t {
            Trainer::Ppo => ppo_config(
                dir,
                &[
                    "ppo.total_episodes=64",
                    "train.save_steps=2",
                    "ppo.adap_kl_ctrl=true",
                ],
            ),
            _ => {
                let data = fixtures_root().join(candle_rlhf::app::fixtures::PREFERENCES);
                let extra = ["train.max_steps=4", "train.save_steps=2", "grpo.beta=0.04"];
                let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
                config(t, dir, &data, vec![], &extra)
            }
        };
        let train = |dir: &Path, resume: bool, stop: &StopSignal| {
            let c = cfg(dir);
            let algo = t.algo(&c);
            online::train_with_reward(&c, algo, dir, resume, stop, &reward, None)
        };
        let dir = tmp.path().join(format!("old-{}", t.name()));
        let stop = StopSignal::new();
        stop.request(); // checkpoint after the first iteration, then stop
        let err = train(&dir, false, &stop).unwrap_err();
        assert!(
            matches!(err, candle_rlhf::Error::Interrupted { step: 1, .. }),
            "{err}"
        );
        let (_, first) = candle_rlhf::checkpoint::latest(&dir).unwrap().unwrap();
        to_old_state(&first, keep);
        let resumed = train(&dir, true, &StopSignal::new()).unwrap();
        let straight = train(
            &tmp.path().join(format!("new-{}", t.name())),
            false,
            &StopSignal::new(),
        )
        .unwrap();
        let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
        assert_eq!(
            read(&resumed.checkpoint),
            read(&straight.checkpoint),
            "{}: resumed from the old state differs",
            t.name()
        );
    }
}

#[test]
fn eval_scores_any_online_checkpoint_with_the_configs_reward_funcs() {
    // A GRPO checkpoint, evaluated without --reward or --algo: its manifest
    // names the algorithm (so [grpo]'s group of 4) and the reward comes
    // from the config's [[reward_funcs]].
    use candle_rlhf::app::commands::{eval, EvalOptions};
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures_root().join(candle_rlhf::app::fixtures::PREFERENCES);
    let funcs = has_e();
    let dir = tmp.path().join("grpo");
    let cfg = config(Trainer::Grpo, &dir, &data, funcs.clone(), &[]);
    let run = online::train(&cfg, Trainer::Grpo, &dir, false, &StopSignal::new()).unwrap();
    let out = tmp.path().join("eval");
    let sets = [format!("run.out={}", quoted(&out))];
    let eval_cfg = config(Trainer::Grpo, &out, &data, funcs, &sets);
    let o = EvalOptions {
        policy: run.checkpoint.to_string_lossy().into_owned(),
        reward: None,
        reference: None,
        algo: None,
        prompts: eval_prompts().to_string_lossy().into_owned(),
        split: "test".into(),
    };
    let text = eval(&eval_cfg, &o).unwrap();
    assert!(text.starts_with("32 prompts x 4: mean reward"), "{text}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert!(summary["eval/rewards/has_e/mean"].is_f64(), "{summary}");
    // GRPO's beta is 0, yet eval measures the KL (k1, summed per
    // completion: a sample mean, negative at times) to the initial policy.
    assert!(
        summary["eval/kl"].as_f64().unwrap().is_finite(),
        "{summary}"
    );
    let lines = std::fs::read_to_string(out.join("completions.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 32 * 4);
    // Without reward functions, one clear error.
    let bare = config(Trainer::Grpo, &out, &data, vec![], &sets);
    let err = eval(&bare, &o).unwrap_err().to_string();
    assert!(err.contains("[[reward_funcs]]"), "{err}");
}
