//! PPO's inputs and outputs: prompts from files and hub datasets with their
//! drop/truncation counts, the reward model's id pass-through and
//! re-tokenization, the critic's fallback, `eval`, a killed run resumed, and
//! a saved policy loaded into candle-transformers.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::train_with_reward;
use candle_core::{DType, Tensor};
use candle_rlhf::app::fixtures;
use candle_rlhf::chat::TemplateSource;
use candle_rlhf::data::prompts::load_prompts;
use candle_rlhf::hub::HubSettings;
use candle_rlhf::rewards::{Completion, RewardModelReward};
use candle_rlhf::signal::StopSignal;
use candle_rlhf::tokenizer::Tokenizer;
use candle_rlhf::Result;

use crate::hub::{hub_cache, offline};
use crate::models::{fixtures_root, max_abs, max_abs_diff, model_dir};
use crate::ppo::ppo_config;

fn local() -> HubSettings {
    offline(&hub_cache())
}

fn gpt2_tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&model_dir("tiny-gpt2")).unwrap()
}

#[test]
fn prompts_from_parquet_and_hub_splits_equal_the_jsonl_ones_with_counted_drops() {
    let tok = gpt2_tokenizer();
    let gpt2 = model_dir("tiny-gpt2");
    let tpl = TemplateSource::new(&gpt2, None);
    let jsonl = fixtures_root().join(fixtures::PREFERENCES);
    let rows = fixtures::synthetic_preferences(0, 600);
    let lengths: Vec<usize> = rows
        .iter()
        .map(|r| tok.encode(r["prompt"].as_str().unwrap()).unwrap().len())
        .collect();
    let (all, report) = load_prompts(
        &jsonl.to_string_lossy(),
        "train",
        &tok,
        &tpl,
        64,
        false,
        &local(),
    )
    .unwrap();
    assert_eq!((report.rows, report.kept, all.len()), (600, 600, 600));

    // The hub dataset's train split is rows 100.. of the same pairs, as Parquet.
    let (hub, hub_report) = load_prompts(
        fixtures::PREFERENCE_DATASET,
        "train",
        &tok,
        &tpl,
        64,
        false,
        &local(),
    )
    .unwrap();
    assert_eq!(hub_report.rows, 500);
    assert_eq!(hub, all[100..].to_vec());

    // A Parquet file of prompts alone reads the same.
    let tmp = tempfile::tempdir().unwrap();
    let parquet = tmp.path().join("prompts.parquet");
    let prompt_rows: Vec<_> = rows
        .iter()
        .map(|r| serde_json::json!({"prompt": r["prompt"]}))
        .collect();
    fixtures::write_parquet(&parquet, &["prompt"], &prompt_rows).unwrap();
    let (from_parquet, _) = load_prompts(
        &parquet.to_string_lossy(),
        "train",
        &tok,
        &tpl,
        64,
        false,
        &local(),
    )
    .unwrap();
    assert_eq!(from_parquet, all);

    // A limit below some prompts' length: dropped (counted), or cut to their last tokens.
    let limit = 4;
    let too_long = lengths.iter().filter(|&&n| n > limit).count();
    assert!(too_long > 0 && too_long < 600, "{too_long}");
    let (kept, r) = load_prompts(
        &jsonl.to_string_lossy(),
        "train",
        &tok,
        &tpl,
        limit,
        false,
        &local(),
    )
    .unwrap();
    assert_eq!(
        (r.dropped_too_long, r.truncated, r.kept),
        (too_long, 0, 600 - too_long)
    );
    assert_eq!(kept.len(), 600 - too_long);
    let (cut, r) = load_prompts(
        &jsonl.to_string_lossy(),
        "train",
        &tok,
        &tpl,
        limit,
        true,
        &local(),
    )
    .unwrap();
    assert_eq!(
        (r.dropped_too_long, r.truncated, r.kept),
        (0, too_long, 600)
    );
    for (ids, full) in cut.iter().zip(&all) {
        assert_eq!(ids.as_slice(), &full[full.len().saturating_sub(limit)..]);
    }

    // Text and conversational rows mixed in one file, and a missing column:
    // one error naming file and row.
    let chat = tmp.path().join("chat.jsonl");
    std::fs::write(
        &chat,
        "{\"prompt\": \"fine\"}\n{\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    )
    .unwrap();
    let err = load_prompts(
        &chat.to_string_lossy(),
        "train",
        &tok,
        &tpl,
        64,
        false,
        &local(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("chat.jsonl") && err.contains("line 2") && err.contains("one kind of row"),
        "{err}"
    );
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"question\": \"x\"}\n").unwrap();
    let err = load_prompts(
        &bad.to_string_lossy(),
        "train",
        &tok,
        &tpl,
        64,
        false,
        &local(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("bad.jsonl") && err.contains("`prompt`") && err.contains("question"),
        "{err}"
    );
}

/// Completions built from text, as the rollout builds them: the response
/// ends with the stop token, which the text does not show.
fn completions(tok: &Tokenizer, pairs: &[(String, String)]) -> Vec<(Vec<u32>, Vec<u32>)> {
    pairs
        .iter()
        .map(|(p, r)| {
            let mut resp = tok.encode(r).unwrap();
            resp.push(tok.eos_id);
            (tok.encode(p).unwrap(), resp)
        })
        .collect()
}

fn score_with(reward: &RewardModelReward, pairs: &[(String, String)], tok: &Tokenizer) -> Vec<f32> {
    let ids = completions(tok, pairs);
    let batch: Vec<Completion> = pairs
        .iter()
        .zip(&ids)
        .map(|((p, r), (q, s))| Completion {
            prompt: p,
            response: r,
            query_ids: q,
            response_ids: s,
            prompt_messages: None,
            columns: None,
        })
        .collect();
    use candle_rlhf::rewards::Reward;
    reward.score(&batch).unwrap()
}

#[test]
fn a_reward_model_takes_ids_with_the_same_tokenizer_and_retokenized_text_with_another() {
    let tok = gpt2_tokenizer();
    let pairs: Vec<(String, String)> = fixtures::synthetic_preferences(3, 6)
        .iter()
        .map(|r| {
            (
                r["prompt"].as_str().unwrap().to_string(),
                r["chosen"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let policy = model_dir("tiny-gpt2");
    let cpu = crate::dev();

    // Same tokenizer: ids pass through; they equal re-tokenizing the text.
    let mut same = RewardModelReward::load(
        &fixtures_root().join("reward/tiny-gpt2").to_string_lossy(),
        &policy,
        &cpu,
    )
    .unwrap();
    assert!(same.same_tokenizer);
    let by_ids = score_with(&same, &pairs, &tok);
    same.same_tokenizer = false;
    let by_text = score_with(&same, &pairs, &tok);
    for (a, b) in by_ids.iter().zip(&by_text) {
        assert!((a - b).abs() < 1e-5, "{by_ids:?} vs {by_text:?}");
    }

    // Another tokenizer (the pythia fixture's has no pad token and other
    // ids): the text is re-tokenized with it, scoring as `score` does.
    let other_dir = fixtures_root().join("reward/tiny-pythia");
    let mut other = RewardModelReward::load(&other_dir.to_string_lossy(), &policy, &cpu).unwrap();
    assert!(!other.same_tokenizer);
    let got = score_with(&other, &pairs, &tok);
    let texts: Vec<String> = pairs.iter().map(|(p, r)| format!("{p}{r}")).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let want =
        candle_rlhf::models::reward_model::RewardScorer::load(&other_dir.to_string_lossy(), &cpu)
            .unwrap()
            .score(&refs)
            .unwrap();
    assert_eq!(got, want);
    // Passing the policy's ids to it would score other tokens.
    other.same_tokenizer = true;
    let wrong = score_with(&other, &pairs, &tok);
    assert!(
        got.iter().zip(&wrong).any(|(a, b)| (a - b).abs() > 1e-4),
        "{got:?} vs {wrong:?}"
    );
}

fn constant(batch: &[Completion]) -> Result<Vec<f32>> {
    Ok(vec![1.0; batch.len()])
}

#[test]
fn a_critic_needs_the_policys_tokenizer_or_falls_back_to_a_value_head() {
    let tmp = tempfile::tempdir().unwrap();
    let other = fixtures_root().join("reward/tiny-pythia");
    let short = ["ppo.total_episodes=16", "train.save_steps=1"];
    let with = |name: &str, value_model: &str| {
        let dir = tmp.path().join(name);
        let mut sets = short.to_vec();
        let v = format!("ppo.value_model=\"{value_model}\"");
        sets.push(&v);
        let r = train_with_reward(
            &ppo_config(&dir, &sets),
            &dir,
            false,
            &StopSignal::new(),
            // The demo task's gold reward, a programmatic reward.
            &candle_rlhf::app::task::gold,
            Some(&other),
        );
        (dir, r)
    };
    let (_, strict) = with("strict", "reward");
    let err = strict.unwrap_err().to_string();
    assert!(
        err.contains("ppo.value_model")
            && err.contains("another tokenizer")
            && err.contains("tiny-pythia"),
        "{err}"
    );
    let (_, auto) = with("auto", "auto");
    let ckpt = auto.unwrap().checkpoint;
    assert!(ckpt.join("value_head.safetensors").is_file());
    assert!(!ckpt.join("critic.safetensors").exists());
}

#[test]
fn separate_critic_learning_rate_moves_the_value_head_alone() {
    // With the policy's learning rate 0 the policy must stay as it was
    // while the value head, at its own rate, learns.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let run = train_with_reward(
        &ppo_config(
            &dir,
            &[
                "ppo.total_episodes=32",
                "train.learning_rate=1e-12",
                "ppo.critic_learning_rate=1e-2",
            ],
        ),
        &dir,
        false,
        &StopSignal::new(),
        &constant,
        None,
    )
    .unwrap();
    let load = |p: &Path| candle_core::safetensors::load(p, &crate::dev()).unwrap();
    let before = load(&model_dir("tiny-gpt2").join("model.safetensors"));
    let after = load(&run.checkpoint.join("model.safetensors"));
    let mut policy_change = 0f32;
    for (name, t) in &before {
        // The fixture stores GPT-2's bare names; checkpoints write them as
        // transformers' GPT2LMHeadModel saves them, under `transformer.`.
        let d = max_abs_diff(t, &after[&format!("transformer.{name}")]);
        policy_change = policy_change.max(d);
    }
    let head = load(&run.checkpoint.join("value_head.safetensors"));
    let w = max_abs(&head["v_head.weight"]);
    eprintln!("policy moved at most {policy_change:.2e}; value head |w| max {w:.3e}");
    assert!(policy_change < 1e-6, "{policy_change}");
    assert!(w > 1e-3, "the value head learned at its own rate: {w}");
}

fn bin() -> Command {
    let mut c = Command::new(crate::bin());
    c.env_remove("RUST_BACKTRACE");
    c
}

fn quoted(p: &Path) -> String {
    format!("{:?}", p.to_string_lossy())
}

/// `ppo` on the tiny config with short responses, through the binary.
fn ppo_cmd(out: &Path, extra: &[String]) -> Command {
    let root = fixtures_root();
    let mut c = bin();
    c.arg("ppo")
        .arg("--config")
        .arg(crate::repo().join("configs/tiny-ppo.toml"));
    let mut sets = vec![
        format!("model.name_or_path={}", quoted(&model_dir("tiny-gpt2"))),
        format!("ppo.dataset={}", quoted(&root.join(fixtures::PREFERENCES))),
        format!(
            "ppo.reward_model={}",
            quoted(&root.join("reward/tiny-gpt2"))
        ),
        "ppo.response_length=8".into(),
    ];
    sets.extend(extra.iter().cloned());
    for s in sets {
        c.args(["--set", &s]);
    }
    c.args(["--out", &out.to_string_lossy()]);
    c
}

fn ok(c: &mut Command) -> String {
    let o = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{}{stdout}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

fn eval_prompts(dir: &Path) -> PathBuf {
    let path = dir.join("held-out.jsonl");
    fixtures::write_jsonl(&path, &fixtures::synthetic_preferences(11, 12)).unwrap();
    path
}

#[test]
fn eval_reproduces_ppos_own_final_evaluation_and_writes_completions() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = eval_prompts(tmp.path());
    let run = tmp.path().join("ppo");
    let stdout = ok(&mut ppo_cmd(
        &run,
        &[
            "ppo.total_episodes=32".into(),
            format!("ppo.eval_dataset={}", quoted(&prompts)),
        ],
    ));
    let after = stdout
        .lines()
        .find_map(|l| l.strip_prefix("eval after:  "))
        .unwrap_or_else(|| panic!("{stdout}"))
        .to_string();

    // The run directory (its newest checkpoint) with the run's config: the
    // same draws, the same report; the reference comes from the manifest.
    let out = tmp.path().join("eval");
    let mut c = bin();
    c.arg("eval")
        .arg("--config")
        .arg(run.join("config.toml"))
        .arg("--policy")
        .arg(&run)
        .arg("--reward")
        .arg(fixtures_root().join("reward/tiny-gpt2"))
        .arg("--prompts")
        .arg(&prompts)
        .arg("--out")
        .arg(&out);
    let eval_out = ok(&mut c);
    let first = eval_out.lines().next().unwrap();
    assert_eq!(first, after, "eval CLI vs ppo's final evaluation");
    assert!(first.starts_with("12 prompts x 1: mean reward"), "{first}");
    let lines = std::fs::read_to_string(out.join("completions.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 12);
    let rows: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    let mean = rows
        .iter()
        .map(|r| r["reward"].as_f64().unwrap())
        .sum::<f64>()
        / 12.0;
    assert!((summary["eval/reward"].as_f64().unwrap() - mean).abs() < 1e-5);

    // The base model against itself (not a PPO checkpoint): KL exactly 0.
    let mut c = bin();
    c.arg("eval")
        .arg("--policy")
        .arg(model_dir("tiny-gpt2"))
        .arg("--reward")
        .arg(fixtures_root().join("reward/tiny-gpt2"))
        .arg("--prompts")
        .arg(&prompts)
        .args(["--set", "ppo.response_length=8"])
        .arg("--out")
        .arg(tmp.path().join("base"));
    let base = ok(&mut c);
    assert!(base.contains("KL to reference 0.0000"), "{base}");

    // A missing prompts file: one error naming it, non-zero exit.
    let o = bin()
        .args(["eval", "--prompts", "/no/such/prompts.jsonl", "--reward"])
        .arg(fixtures_root().join("reward/tiny-gpt2"))
        .arg("--policy")
        .arg(model_dir("tiny-gpt2"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("/no/such/prompts.jsonl"),
        "{err}"
    );
}

#[test]
fn a_killed_ppo_run_resumes_to_the_same_weights_as_one_never_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = [
        "ppo.total_episodes=192".to_string(),
        "train.save_steps=1".to_string(),
    ];
    let killed = tmp.path().join("killed");
    let mut child = ppo_cmd(&killed, &sets)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let marker = killed.join("checkpoints/3/trainer_state.json");
    let started = std::time::Instant::now();
    while !marker.exists() {
        assert!(started.elapsed().as_secs() < 300, "no checkpoint 3");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no chance to write anything more
    child.wait().unwrap();

    let mut resume = ppo_cmd(&killed, &sets);
    resume.arg("--resume").arg(&killed);
    let resumed = ok(&mut resume);
    assert!(resumed.contains("iterations: 12 "), "{resumed}");
    let straight = tmp.path().join("straight");
    ok(&mut ppo_cmd(&straight, &sets));
    for file in ["model.safetensors", "critic.safetensors"] {
        let read = |d: &Path| std::fs::read(d.join("checkpoints/12").join(file)).unwrap();
        assert!(
            read(&killed) == read(&straight),
            "{file}: resumed after a kill differs"
        );
    }
}

#[test]
fn a_ppo_trained_llama_loads_into_candle_transformers_and_generates_the_same_tokens() {
    use candle_transformers::models::llama;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let mut cfg = ppo_config(&dir, &["ppo.total_episodes=16"]);
    cfg.model.name_or_path = model_dir("tiny-llama").to_string_lossy().into_owned();
    let run = train_with_reward(&cfg, &dir, false, &StopSignal::new(), &constant, None).unwrap();
    let ckpt = run.checkpoint;

    // Theirs: the checkpoint's own config.json and safetensors.
    let their_cfg: llama::LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    let their_cfg = their_cfg.into_config(false);
    // SAFETY: the checkpoint file is not modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[ckpt.join("model.safetensors")],
            DType::F32,
            &crate::dev(),
        )
        .unwrap()
    };
    let theirs = llama::Llama::load(vb, &their_cfg).unwrap();
    let mut cache = llama::Cache::new(true, DType::F32, &their_cfg, &crate::dev()).unwrap();
    let tok = gpt2_tokenizer();
    let prompt = tok.encode("overall the movie was").unwrap();
    let mut theirs_out = Vec::new();
    let mut input = prompt.clone();
    let mut pos = 0;
    for _ in 0..8 {
        let x = Tensor::new(input.as_slice(), &crate::dev())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = theirs.forward(&x, pos, &mut cache).unwrap();
        pos += input.len();
        let next = logits
            .squeeze(0)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        theirs_out.push(next);
        input = vec![next];
    }

    // Ours, greedy from the same checkpoint.
    let (arch, vb, _) =
        candle_rlhf::models::load_dir_frozen(&ckpt, DType::F32, &crate::dev()).unwrap();
    let ours = candle_rlhf::models::CausalLm::load(vb, &arch, true).unwrap();
    let sampling = candle_rlhf::generate::Sampling {
        max_new_tokens: 8,
        temperature: 0.0,
        top_k: None,
        top_p: 1.0,
        stop_token_ids: Vec::new(),
        keep_stop_token: true,
        draw: Default::default(),
    };
    let mut rngs = [candle_rlhf::HostRng::stream(0, "sample")];
    let ours_out = candle_rlhf::generate::generate(
        &ours,
        &[prompt],
        tok.pad_id,
        &sampling,
        &mut rngs,
        &crate::dev(),
    )
    .unwrap()
    .remove(0);
    assert_eq!(
        ours_out, theirs_out,
        "greedy tokens: ours vs candle-transformers"
    );
    // And the policy did change in training.
    let before = candle_core::safetensors::load(
        model_dir("tiny-llama").join("model.safetensors"),
        &crate::dev(),
    )
    .unwrap();
    let after =
        candle_core::safetensors::load(ckpt.join("model.safetensors"), &crate::dev()).unwrap();
    assert_eq!(before.len(), after.len(), "the same tensor names");
    let moved = before.iter().any(|(n, t)| {
        (t - &after[n])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    });
    assert!(moved, "PPO changed the weights");
}

#[test]
fn a_critic_on_its_own_thread_trains_to_the_same_weights() {
    // The policy's and the critic's losses cover disjoint weights, so running
    // their forwards and backwards on two threads changes no result.
    let tmp = tempfile::tempdir().unwrap();
    let sets = |own: bool| {
        vec![
            "ppo.total_episodes=64".to_string(),
            "run.threads=1".to_string(),
            format!("ppo.critic_on_own_thread={own}"),
        ]
    };
    let last_checkpoint = |run: &Path| {
        let dir = run.join("checkpoints");
        let step = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().to_str()?.parse::<u64>().ok())
            .max()
            .unwrap();
        dir.join(step.to_string())
    };
    let (apart, together) = (tmp.path().join("apart"), tmp.path().join("together"));
    ok(&mut ppo_cmd(&apart, &sets(true)));
    ok(&mut ppo_cmd(&together, &sets(false)));
    let (a, b) = (last_checkpoint(&apart), last_checkpoint(&together));
    assert_eq!(a.file_name(), b.file_name());
    for file in ["model.safetensors", "critic.safetensors"] {
        let read = |d: &Path| std::fs::read(d.join(file)).unwrap();
        assert!(
            read(&a) == read(&b),
            "{file}: the critic's thread changed the weights"
        );
    }
    // More than one thread per model would make the two contend: refused.
    let mut both = ppo_cmd(&tmp.path().join("refused"), &sets(true));
    let out = both.args(["--set", "run.threads=2"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ppo.critic_on_own_thread"), "{err}");
}
