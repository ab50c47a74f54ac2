//! Reward models: heads, pooling, gradients, training to high accuracy on
//! the synthetic pairs, reloading, resuming, and bad preference data.

use std::path::Path;

use candle_core::{DType, Tensor};
use candle_rlhf::app::fixtures;
use candle_rlhf::chat::TemplateSource;
use candle_rlhf::data::batch::{left_pad, right_pad};
use candle_rlhf::data::{load_preferences, read_preferences, tokenize_pairs, PreferenceRow};
use candle_rlhf::models::reward_model::{RewardModel, RewardScorer};
use candle_rlhf::rl::bradley_terry;
use candle_rlhf::signal::StopSignal;
use candle_rlhf::tokenizer::Tokenizer;
use candle_rlhf::trainers::reward::{score_pairs, train};
use candle_rlhf::{Config, Error};

use crate::models::{assert_every_var_has_a_gradient, fixtures_root, model_dir, CAUSAL, ENCODERS};

/// Text rows never ask for a template: a source whose model has none.
fn no_template() -> TemplateSource<'static> {
    TemplateSource::new(fixtures_root(), None)
}

fn reward_model(name: &str) -> (RewardModel, candle_nn::VarMap) {
    RewardModel::from_dir(&model_dir(name), DType::F32, &crate::dev(), 0).unwrap()
}

fn rewards(m: &RewardModel, rows: &[Vec<u32>], left: bool) -> Vec<f32> {
    let width = rows.iter().map(Vec::len).max().unwrap();
    let (ids, mask) = if left {
        left_pad(rows, 1)
    } else {
        right_pad(rows, 1)
    };
    let ids = Tensor::from_vec(ids, (rows.len(), width), &crate::dev()).unwrap();
    m.rewards(&ids, &mask).unwrap().to_vec1().unwrap()
}

#[test]
fn new_heads_are_drawn_with_std_one_over_sqrt_hidden_plus_one() {
    let (_, vars) = reward_model("tiny-llama");
    let data = vars.data().lock().unwrap();
    let w: Vec<f32> = data["score.weight"]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(w.len(), 64);
    let std = (w.iter().map(|v| v * v).sum::<f32>() / 64.0).sqrt();
    let want = 1.0 / 65f32.sqrt();
    assert!((std / want - 1.0).abs() < 0.3, "std {std} vs {want}");
    assert!(
        !data.contains_key("lm_head.weight"),
        "a reward model carries no LM head"
    );
    drop(data);
    let (_, vars) = reward_model("tiny-bert");
    let data = vars.data().lock().unwrap();
    let b: Vec<f32> = data["classifier.bias"].as_tensor().to_vec1().unwrap();
    assert_eq!(b, vec![0.0]);
    assert!(data.contains_key("bert.pooler.dense.weight"));
}

#[test]
fn pooling_follows_the_mask_for_left_and_right_padding() {
    let rows = vec![vec![5u32, 17, 42, 9, 100, 7], vec![33u32, 2, 64]];
    for name in CAUSAL.iter().chain(ENCODERS) {
        let (m, _) = reward_model(name);
        let alone: Vec<f32> = rows
            .iter()
            .map(|r| rewards(&m, std::slice::from_ref(r), false)[0])
            .collect();
        for left in [false, true] {
            let batch = rewards(&m, &rows, left);
            for (a, b) in alone.iter().zip(&batch) {
                assert!((a - b).abs() < 1e-4, "{name} (left={left}): {a} vs {b}");
            }
        }
    }
}

#[test]
fn every_reward_model_weight_gets_a_gradient() {
    let rows = vec![
        vec![5u32, 17, 42, 9],
        vec![33u32, 2, 64, 11, 12],
        vec![7u32, 8],
        vec![9u32, 10, 11],
    ];
    for name in CAUSAL.iter().chain(ENCODERS) {
        let (m, vars) = reward_model(name);
        let width = 5;
        let (ids, mask) = right_pad(&rows, 1);
        let ids = Tensor::from_vec(ids, (4, width), &crate::dev()).unwrap();
        let r = m.rewards(&ids, &mask).unwrap();
        let loss = bradley_terry(
            &r.narrow(0, 0, 2).unwrap(),
            &r.narrow(0, 2, 2).unwrap(),
            None,
            Some(0.01),
        )
        .unwrap();
        let grads = loss.backward().unwrap();
        assert_every_var_has_a_gradient(name, &vars, &grads);
    }
}

pub fn config(run: &Path, extra: &[&str]) -> Config {
    let mut sets = vec![
        format!(
            "model.name_or_path={:?}",
            model_dir("tiny-gpt2").to_string_lossy()
        ),
        format!(
            "reward.dataset={:?}",
            fixtures_root()
                .join(fixtures::PREFERENCES)
                .to_string_lossy()
        ),
        format!("run.out={:?}", run.to_string_lossy()),
        crate::device_setting(),
        "train.learning_rate=3e-3".into(),
        "train.per_device_train_batch_size=16".into(),
        "train.max_steps=40".into(),
        "train.save_steps=20".into(),
        "train.logging_steps=5".into(),
        "reward.eval_ratio=0.2".into(),
        "reward.max_length=64".into(),
        // Checkpointing only costs time on the tiny fixtures (tests/it/memory.rs tests it).
        "train.activation_checkpointing=false".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::load(None, &sets).unwrap()
}

#[test]
fn trains_to_high_eval_accuracy_then_reloads_with_the_same_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = train(
        &config(&run, &["reward.normalize=true"]),
        &run,
        false,
        &StopSignal::new(),
    )
    .unwrap();
    eprintln!(
        "tiny-gpt2 reward model: eval accuracy {} after {} steps, {:.4} s/step",
        out.eval_accuracy, out.steps, out.seconds_per_step
    );
    assert!(
        out.eval_accuracy >= 0.9,
        "eval accuracy {}",
        out.eval_accuracy
    );
    // TRL's metric names, train and eval.
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    for key in [
        "\"loss\"",
        "\"accuracy\"",
        "\"margin\"",
        "\"mean_reward\"",
        "\"min_reward\"",
        "\"max_reward\"",
        "\"num_tokens\"",
        "\"learning_rate\"",
        "\"grad_norm\"",
        "\"tokens_per_second\"",
        "\"eval_loss\"",
        "\"eval_accuracy\"",
    ] {
        assert!(text.contains(key), "metrics.jsonl lacks {key}");
    }
    // The checkpoint is laid out as GPT2ForSequenceClassification.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.checkpoint.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["architectures"][0], "GPT2ForSequenceClassification");
    let names =
        candle_rlhf::io::load_safetensors(&out.checkpoint.join("model.safetensors"), &crate::dev())
            .unwrap();
    assert!(names.contains_key("score.weight") && names.contains_key("transformer.wte.weight"));
    assert!(!names.keys().any(|k| k.starts_with("lm_head")));
    // Reloaded, it scores every pair as the trainer's evaluation did, and
    // normalization centres the chosen responses at 0.
    let scorer = RewardScorer::load(&out.checkpoint.to_string_lossy(), &crate::dev()).unwrap();
    assert!(scorer.model.offset != 0.0);
    let data = fixtures_root().join(fixtures::PREFERENCES);
    let report = score_pairs(
        &scorer,
        &TemplateSource::new(&out.checkpoint, None),
        &read_preferences(&data).unwrap(),
        &tmp.path().join("scores.jsonl"),
        64,
    )
    .unwrap();
    assert!(report.accuracy >= 0.9, "{report}");
    let again = RewardScorer::load(&out.checkpoint.to_string_lossy(), &crate::dev()).unwrap();
    let texts = [
        "i think the movie was really great.",
        "i think the movie was really dull.",
    ];
    assert_eq!(scorer.score(&texts).unwrap(), again.score(&texts).unwrap());
    let rows = read_preferences(&data).unwrap();
    let tok = Tokenizer::from_dir(&out.checkpoint).unwrap();
    let (pairs, _) = tokenize_pairs(&rows, &tok, &no_template(), 64, false).unwrap();
    let chosen: Vec<Vec<u32>> = pairs.iter().map(|p| p.chosen.clone()).collect();
    let mean = scorer.score_ids(&chosen).unwrap().iter().sum::<f32>() / chosen.len() as f32;
    assert!(
        mean.abs() < 0.5,
        "mean chosen score after normalization: {mean}"
    );
}

#[test]
fn an_interrupted_run_resumes_to_the_same_end() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let cfg = config(&run, &["train.max_steps=8", "train.save_steps=4"]);
    let stop = StopSignal::new();
    stop.request(); // as Ctrl-C: the run checkpoints after its first step and stops
    match train(&cfg, &run, false, &stop) {
        Err(Error::Interrupted { step, .. }) => assert_eq!(step, 1),
        other => panic!("expected an interruption, got {other:?}"),
    }
    let resumed = train(&cfg, &run, true, &StopSignal::new()).unwrap();
    let straight_dir = tmp.path().join("straight");
    let straight = train(
        &config(&straight_dir, &["train.max_steps=8", "train.save_steps=4"]),
        &straight_dir,
        false,
        &StopSignal::new(),
    )
    .unwrap();
    assert_eq!(resumed.steps, 8);
    let w = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(
        w(&resumed.checkpoint),
        w(&straight.checkpoint),
        "resumed run differs from an uninterrupted one"
    );
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn bad_preference_data_gives_clear_errors_or_counted_skips() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let err = |name: &str, bytes: &[u8]| {
        read_preferences(&write(d, name, bytes))
            .unwrap_err()
            .to_string()
    };
    let e = err(
        "a.jsonl",
        b"{\"chosen\": \"x\", \"rejected\": \"y\"}\n{\"chosen\": \"x\",\n",
    );
    assert!(
        e.contains("a.jsonl") && e.contains("line 2") && e.contains("malformed JSON"),
        "{e}"
    );
    let e = err("b.jsonl", b"{\"chosen\": \"x\", \"answer\": \"y\"}\n");
    assert!(
        e.contains("missing column `rejected`") && e.contains("columns found: answer, chosen"),
        "{e}"
    );
    let e = err(
        "c.jsonl",
        b"{\"chosen\": \"x\", \"rejected\": \"y\"}\n{\"chosen\": \"\xff\", \"rejected\": \"y\"}\n",
    );
    assert!(e.contains("line 2") && e.contains("UTF-8"), "{e}");
    let e = err("d.jsonl", b"{\"chosen\": 3, \"rejected\": \"y\"}\n");
    assert!(e.contains("`chosen` must be a string"), "{e}");
    let e = err(
        "e.jsonl",
        b"{\"chosen\": [{\"role\": \"user\", \"content\": \"hi\"}], \"rejected\": \"y\"}\n",
    );
    // Conversational rows are read; a row mixing a message list with text is not.
    assert!(
        e.contains("e.jsonl: line 1")
            && e.contains("`rejected` is text")
            && e.contains("message lists"),
        "{e}"
    );
    let e = err(
        "f.json",
        b"[{\"chosen\": \"x\", \"rejected\": \"y\"},\n {\"chosen\": }]",
    );
    assert!(e.contains("f.json") && e.contains("line 2"), "{e}");
    let e = err("g.csv", b"chosen,rejected\n");
    assert!(e.contains("unknown data file format"), "{e}");
    let e = err("i.parquet", b"PAR1 not really parquet PAR1");
    assert!(
        e.contains("i.parquet") && e.contains("not a readable Parquet file"),
        "{e}"
    );
    let rows = [serde_json::json!({"question": "q", "answer": "a"})];
    fixtures::write_parquet(&d.join("j.parquet"), &["question", "answer"], &rows).unwrap();
    let e = read_preferences(&d.join("j.parquet"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("j.parquet: row 1")
            && e.contains("missing column `chosen`")
            && e.contains("columns found: answer, question"),
        "{e}"
    );
    let e = err(
        "h.jsonl",
        b"{\"chosen\": \"x\", \"rejected\": \"y\", \"margin\": \"big\"}\n",
    );
    assert!(e.contains("`margin` must be a finite number"), "{e}");

    // Counted skips, and an error when nothing is left.
    let tok = Tokenizer::from_dir(&model_dir("tiny-gpt2")).unwrap();
    let rows = read_preferences(&write(
        d,
        "skips.jsonl",
        b"{\"chosen\": \"good\", \"rejected\": \"good\"}\n{\"chosen\": \" \", \"rejected\": \"bad\"}\n{\"prompt\": \"the movie was\", \"chosen\": \" great.\", \"rejected\": \" dull.\"}\n",
    ))
    .unwrap();
    let (pairs, report) = tokenize_pairs(&rows, &tok, &no_template(), 64, false).unwrap();
    assert_eq!(
        (pairs.len(), report.skipped_identical, report.skipped_empty),
        (1, 1, 1)
    );
    assert_eq!(*pairs[0].chosen.last().unwrap(), tok.eos_id, "EOS appended");
    // max_length smaller than the prompt: dropped (drop mode) or, when truncating, still dropped.
    for truncate in [false, true] {
        let e = tokenize_pairs(&rows[2..], &tok, &no_template(), 2, truncate)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no preference pair left") && e.contains("1 dropped"),
            "{e}"
        );
    }
    // Truncation keeps a pair whose prompt fits.
    let (pairs, report) = tokenize_pairs(&rows[2..], &tok, &no_template(), 5, true).unwrap();
    assert_eq!((report.truncated, pairs[0].chosen.len()), (1, 5));
}

#[test]
fn gzip_jsonl_reads_like_jsonl() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let plain = fixtures_root().join(fixtures::PREFERENCES);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&std::fs::read(&plain).unwrap()).unwrap();
    let path = write(dir.path(), "p.jsonl.gz", &gz.finish().unwrap());
    let a = read_preferences(&plain).unwrap();
    let b = read_preferences(&path).unwrap();
    assert_eq!(a.len(), b.len());
    assert_eq!(a[5].chosen, b[5].chosen);
}

/// The fields that matter of rows read from anywhere.
fn texts(rows: &[PreferenceRow]) -> Vec<(String, String, String, f64)> {
    rows.iter()
        .map(|r| {
            (
                r.prompt.clone(),
                r.chosen.clone(),
                r.rejected.clone(),
                r.margin,
            )
        })
        .collect()
}

#[test]
fn parquet_files_and_hub_dataset_splits_read_like_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let all = read_preferences(&fixtures_root().join(fixtures::PREFERENCES)).unwrap();
    let rows = fixtures::synthetic_preferences(0, 600);
    let path = dir.path().join("p.parquet");
    fixtures::write_parquet(&path, &["prompt", "chosen", "rejected"], &rows).unwrap();
    let parquet = read_preferences(&path).unwrap();
    assert_eq!(texts(&parquet), texts(&all));
    assert!(
        parquet[3].source.ends_with("p.parquet: row 4"),
        "{}",
        parquet[3].source
    );

    // The fixture dataset repo in the hub cache: first sixth `test`, the rest `train`.
    let hub = crate::hub::offline(&crate::hub::hub_cache());
    let train = load_preferences(fixtures::PREFERENCE_DATASET, "train", &hub).unwrap();
    let test = load_preferences(fixtures::PREFERENCE_DATASET, "test", &hub).unwrap();
    assert_eq!((train.len(), test.len()), (500, 100));
    assert_eq!(texts(&test), texts(&all[..100]));
    assert_eq!(texts(&train), texts(&all[100..]));
    assert!(train[0]
        .source
        .contains("data/train-00000-of-00001.parquet: row 1"));
    let e = load_preferences(fixtures::PREFERENCE_DATASET, "validation", &hub)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("hub dataset candle-rlhf/tiny-preferences@main")
            && e.contains("split `validation`")
            && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
    // A dataset directory laid out as the repo reads the same.
    let snapshot =
        crate::hub::hub_cache().join("datasets--candle-rlhf--tiny-preferences/snapshots");
    let commit = std::fs::read_dir(&snapshot)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let local = load_preferences(&commit.to_string_lossy(), "test", &hub).unwrap();
    assert_eq!(texts(&local), texts(&test));
    let e = load_preferences("no/such-dataset", "train", &hub)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no/such-dataset") && e.contains("split `train`"),
        "{e}"
    );
}

#[test]
fn reward_and_score_cli_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let bin = || {
        let mut c = std::process::Command::new(crate::bin());
        c.env_remove("RUST_BACKTRACE");
        c
    };
    let out = bin()
        .args(["reward", "--config"])
        .arg(crate::repo().join("configs/reward-tiny.toml"))
        .args(["--device", &candle_rlhf::device::test_device_spec()])
        .arg("--set")
        .arg(format!(
            "model.name_or_path={:?}",
            model_dir("tiny-pythia").to_string_lossy()
        ))
        .arg("--set")
        .arg(format!(
            "reward.dataset={:?}",
            fixtures_root()
                .join(fixtures::PREFERENCES)
                .to_string_lossy()
        ))
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("eval accuracy"), "{stdout}");
    assert!(run.join("plots").is_dir());
    let ckpt = candle_rlhf::checkpoint::latest(&run).unwrap().unwrap().1;
    let out = bin()
        .args(["score", "--model"])
        .arg(&ckpt)
        .args(["--text", "the movie was great.", "--data"])
        .arg(fixtures_root().join(fixtures::PREFERENCES))
        .arg("--scores-out")
        .arg(tmp.path().join("s.jsonl"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("accuracy") && stdout.contains("calibration"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("s.jsonl"))
            .unwrap()
            .lines()
            .count(),
        600
    );
    // A missing column: one error line, exit 1.
    let bad = write(tmp.path(), "bad.jsonl", b"{\"chosen\": \"x\"}\n");
    let out = bin()
        .args(["score", "--model"])
        .arg(&ckpt)
        .arg("--data")
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("error:") && l.contains("missing column `rejected`")),
        "{stderr}"
    );
}

#[test]
fn model_init_random_draws_weights_as_transformers_init_weights() {
    // transformers' _init_weights for BERT: Linear and Embedding weights
    // N(0, initializer_range), biases 0, LayerNorm weight 1 and bias 0, the
    // padding_idx row of the word embeddings 0.
    use candle_rlhf::config::ModelInit;
    use candle_rlhf::models::load_dir_init;
    let dir = model_dir("tiny-bert");
    let dev = candle_core::Device::Cpu;
    // Build the backbone so that the map holds every tensor the model reads.
    let load = |init, seed| {
        let (cfg, vb, vars) = load_dir_init(&dir, DType::F32, &dev, init, seed).unwrap();
        candle_rlhf::models::Backbone::load(vb, &cfg).unwrap();
        candle_rlhf::models::weights::named_tensors(&vars)
    };
    let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let values = |ts: &[(String, Tensor)]| {
        ts.iter()
            .map(|(n, t)| (n.clone(), v(t)))
            .collect::<Vec<_>>()
    };
    let pretrained = load(ModelInit::Pretrained, 0);
    let random = load(ModelInit::Random, 0);
    assert_eq!(
        values(&random),
        values(&load(ModelInit::Random, 0)),
        "seeded"
    );
    assert_ne!(
        values(&random),
        values(&load(ModelInit::Random, 1)),
        "another seed, other weights"
    );
    let mut matrices = Vec::new();
    for ((name, r), (pname, p)) in random.iter().zip(&pretrained) {
        assert_eq!(name, pname);
        assert_eq!(r.dims(), p.dims(), "{name}");
        let vals = v(r);
        if name.ends_with("bias") {
            assert!(vals.iter().all(|&x| x == 0.0), "{name}: biases 0");
        } else if name.contains("LayerNorm") {
            assert!(vals.iter().all(|&x| x == 1.0), "{name}: norm scales 1");
        } else {
            assert_ne!(vals, v(p), "{name}: not the checkpoint's");
            matrices.extend(vals);
        }
    }
    // initializer_range 0.02 in tiny-bert's config.json.
    let n = matrices.len() as f64;
    let mean = matrices.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (matrices
        .iter()
        .map(|&x| (x as f64 - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    assert!(
        n > 50_000.0 && mean.abs() < 1e-3 && (std - 0.02).abs() < 0.001,
        "{n} {mean} {std}"
    );
    // pad_token_id 0: the word embeddings' row 0 is zero.
    let emb = random
        .iter()
        .find(|(n, _)| n.ends_with("word_embeddings.weight"))
        .unwrap();
    assert!(v(&emb.1.get(0).unwrap()).iter().all(|&x| x == 0.0));
    assert!(v(&emb.1.get(1).unwrap()).iter().any(|&x| x != 0.0));
}
