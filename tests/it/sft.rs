//! SFT: which tokens train, packing that changes nothing but the layout,
//! learning, resume, bad rows; and the demo end to end (`--fast`).

use std::path::Path;

use candle_core::{DType, Device};
use candle_rlhf::app::task::Task;
use candle_rlhf::chat::TemplateSource;
use candle_rlhf::config::{Config, SftConfig};
use candle_rlhf::data::sft::{pack, tokenize_rows, SftRow};
use candle_rlhf::models::{load_dir_frozen, CausalLm};
use candle_rlhf::signal::StopSignal;
use candle_rlhf::tokenizer::Tokenizer;
use candle_rlhf::trainers::sft::{self, batch_loss};

use crate::models::model_dir;

fn records(rows: &[serde_json::Value]) -> Vec<(serde_json::Value, String)> {
    rows.iter()
        .enumerate()
        .map(|(i, r)| (r.clone(), format!("rows.jsonl: line {}", i + 1)))
        .collect()
}

#[test]
fn completion_tokens_train_and_prompt_tokens_do_not() {
    let gpt2 = model_dir("tiny-gpt2");
    let tok = Tokenizer::from_dir(&gpt2).unwrap();
    let tpl = TemplateSource::new(&gpt2, None);
    let rows = records(&[
        serde_json::json!({"prompt": "overall the movie was", "completion": " really great."}),
        serde_json::json!({"text": "the cast was dull."}),
    ]);
    let cfg = SftConfig::default();
    let (out, report) = tokenize_rows(&rows, &tok, &tpl, &cfg).unwrap();
    assert_eq!(report.kept, 2);
    let prompt_len = tok.encode("overall the movie was").unwrap().len();
    let full = tok.encode("overall the movie was really great.").unwrap();
    assert_eq!(out[0].ids, [full.clone(), vec![tok.eos_id]].concat());
    let want: Vec<u8> = (0..out[0].ids.len())
        .map(|i| u8::from(i >= prompt_len))
        .collect();
    assert_eq!(out[0].trained, want, "completion and EOS only");
    // Plain text: every token but the first (nothing predicts it).
    assert_eq!(out[1].trained[0], 0);
    assert!(out[1].trained[1..].iter().all(|&t| t == 1));
    assert_eq!(*out[1].ids.last().unwrap(), tok.eos_id);
    // completion_only_loss = false trains the prompt too.
    let all = SftConfig {
        completion_only_loss: false,
        ..SftConfig::default()
    };
    let (out, _) = tokenize_rows(&rows, &tok, &tpl, &all).unwrap();
    assert!(out[0].trained[1..].iter().all(|&t| t == 1));
    // Cut to max_length and counted.
    let short = SftConfig {
        max_length: prompt_len + 1,
        ..SftConfig::default()
    };
    let (out, report) = tokenize_rows(&rows, &tok, &tpl, &short).unwrap();
    assert_eq!(out[0].ids.len(), prompt_len + 1);
    assert!(report.truncated >= 1);
    // A row with neither shape: one error naming the line and the columns.
    let bad = records(&[serde_json::json!({"question": "x", "answer": "y"})]);
    let err = tokenize_rows(&bad, &tok, &tpl, &cfg)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 1") && err.contains("`completion`") && err.contains("question"),
        "{err}"
    );
}

#[test]
fn packed_rows_give_the_same_loss_as_separate_ones() {
    let dir = model_dir("tiny-gpt2");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let (arch, vb, _) = load_dir_frozen(&dir, DType::F32, &Device::Cpu).unwrap();
    let lm = CausalLm::load(vb, &arch, true).unwrap();
    let tpl = TemplateSource::new(&dir, None);
    let rows = Task::new(5, "sft").sft_rows(6);
    let (rows, _) = tokenize_rows(&records(&rows), &tok, &tpl, &SftConfig::default()).unwrap();
    let packed = pack(&rows, 64);
    assert!(packed.len() < rows.len(), "several sequences share a row");
    let total = |rs: &[SftRow]| {
        let refs: Vec<&SftRow> = rs.iter().collect();
        let (loss, correct, n) = batch_loss(&lm, &refs, tok.pad_id, &Device::Cpu).unwrap();
        (
            loss.to_scalar::<f32>().unwrap() as f64 * n as f64,
            correct,
            n,
        )
    };
    let (a, ca, na) = total(&rows);
    let (b, cb, nb) = total(&packed);
    eprintln!("summed NLL: separate {a:.5}, packed {b:.5}");
    assert_eq!((na, ca), (nb, cb));
    assert!((a - b).abs() < 1e-3 * a.abs(), "{a} vs {b}");
}

pub fn sft_config(run: &Path, data: &Path, extra: &[&str]) -> Config {
    let q = |p: &Path| format!("{:?}", p.to_string_lossy());
    let mut sets = vec![
        format!("model.name_or_path={}", q(&model_dir("tiny-gpt2"))),
        format!("sft.dataset={}", q(data)),
        format!("run.out={}", q(run)),
        crate::device_setting(),
        "sft.max_length=32".into(),
        "train.learning_rate=3e-3".into(),
        "train.per_device_train_batch_size=16".into(),
        "train.max_steps=40".into(),
        "train.save_steps=10".into(),
        "train.warmup_ratio=0.0".into(),
        "train.logging_steps=1".into(),
        // Checkpointing only costs time on the tiny fixtures (tests/it/memory.rs tests it).
        "train.activation_checkpointing=false".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::load(None, &sets).unwrap()
}

#[test]
fn sft_learns_the_language_and_an_interrupted_run_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("sft.jsonl");
    candle_rlhf::app::fixtures::write_jsonl(&data, &Task::new(0, "sft").sft_rows(400)).unwrap();
    let straight_dir = tmp.path().join("straight");
    let straight = sft::train(
        &sft_config(&straight_dir, &data, &["sft.packing=true"]),
        &straight_dir,
        false,
        &StopSignal::new(),
    )
    .unwrap();
    // The random model starts near ln(vocab) = 6.1 nats per token (step 1).
    let metrics = std::fs::read_to_string(straight_dir.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    eprintln!(
        "SFT: loss {:.3} at step {} -> eval loss {:.3}, token accuracy {:.3}; {}",
        first["loss"],
        first["step"],
        straight.eval_loss,
        straight.eval_mean_token_accuracy,
        straight.data
    );
    assert!(first["loss"].as_f64().unwrap() > 4.0);
    assert!(straight.eval_loss < 2.5, "{}", straight.eval_loss);
    assert!(straight.data.packed_rows < straight.data.kept);

    let dir = tmp.path().join("stopped");
    let stop = StopSignal::new();
    stop.request();
    let err = sft::train(
        &sft_config(&dir, &data, &["sft.packing=true"]),
        &dir,
        false,
        &stop,
    )
    .unwrap_err();
    assert!(
        matches!(err, candle_rlhf::Error::Interrupted { step: 1, .. }),
        "{err}"
    );
    let resumed = sft::train(
        &sft_config(&dir, &data, &["sft.packing=true"]),
        &dir,
        true,
        &StopSignal::new(),
    )
    .unwrap();
    let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(
        read(&resumed.checkpoint) == read(&straight.checkpoint),
        "resumed SFT differs"
    );
    // The checkpoint is a causal LM directory that loads back.
    let (arch, vb, _) = load_dir_frozen(&resumed.checkpoint, DType::F32, &Device::Cpu).unwrap();
    CausalLm::load(vb, &arch, true).unwrap();
}

#[test]
fn the_fast_demo_runs_every_stage_and_ppo_grpo_rloo_dpo_beat_sft_on_the_gold_reward() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let o = std::process::Command::new(crate::bin())
        .env_remove("RUST_BACKTRACE")
        .args(["demo", "--fast", "--algo", "all", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}{stdout}",
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{stdout}");
    for f in [
        "report.md",
        "data/sft.jsonl",
        "data/preferences.jsonl",
        "sft/metrics.jsonl",
        "sft/plots/loss.svg",
        "reward/metrics.jsonl",
        "ppo/metrics.jsonl",
        "ppo/samples.jsonl",
        "grpo/metrics.jsonl",
        "rloo/samples.jsonl",
        "eval-sft.jsonl",
        "eval-ppo.jsonl",
        "dpo/metrics.jsonl",
        "eval-dpo.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    for stage in ["sft", "reward", "ppo", "grpo", "rloo", "dpo"] {
        let ckpts = std::fs::read_dir(out.join(stage).join("checkpoints"))
            .unwrap()
            .count();
        assert!(ckpts >= 1, "{stage}: no checkpoint");
    }
    // The gold reward of each completion, recomputed from the files.
    let gold = |name: &str| -> f64 {
        let text = std::fs::read_to_string(out.join(name)).unwrap();
        let g: Vec<f64> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                candle_rlhf::app::task::gold_reward(v["completion"].as_str().unwrap())
            })
            .collect();
        g.iter().sum::<f64>() / g.len() as f64
    };
    let sft_gold = gold("eval-sft.jsonl");
    // Measured (seed 0, 2 threads): SFT -0.08; PPO 1.10, GRPO 0.76, RLOO 1.08, DPO 0.90.
    for name in ["ppo", "grpo", "rloo", "dpo"] {
        let g = gold(&format!("eval-{name}.jsonl"));
        assert!(g > sft_gold + 0.3, "{name} {g} vs SFT {sft_gold}");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("| PPO |")
            && report.contains("| GRPO |")
            && report.contains("| RLOO |")
            && report.contains("| DPO |")
            && report.contains("![sft"),
        "{report}"
    );
    // A second demo into the same directory is refused, not overwritten.
    let o = std::process::Command::new(crate::bin())
        .env_remove("RUST_BACKTRACE")
        .args(["demo", "--fast", "--algo", "all", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("report.md"));
}

#[test]
fn sft_cli_trains_the_tiny_config_and_refuses_a_bad_file() {
    let tmp = tempfile::tempdir().unwrap();
    let q = |p: &Path| format!("{:?}", p.to_string_lossy());
    let root = crate::models::fixtures_root();
    let cli = |data: &Path, out: &Path| {
        std::process::Command::new(crate::bin())
            .env_remove("RUST_BACKTRACE")
            .arg("sft")
            .arg("--config")
            .arg(crate::repo().join("configs/sft-tiny.toml"))
            .args([
                "--set",
                &format!("model.name_or_path={}", q(&model_dir("tiny-gpt2"))),
            ])
            .args(["--set", &format!("sft.dataset={}", q(data))])
            .args(["--set", "train.max_steps=4"])
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let o = cli(
        &root.join(candle_rlhf::app::fixtures::SFT_ROWS),
        &tmp.path().join("ok"),
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}{stdout}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("steps: 4, eval loss"), "{stdout}");
    assert!(tmp
        .path()
        .join("ok/checkpoints/4/model.safetensors")
        .is_file());

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"completion\": \" b\"}\nnot json\n",
    )
    .unwrap();
    let o = cli(&bad, &tmp.path().join("bad"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("bad.jsonl") && err.contains("line 2"), "{err}");
}
