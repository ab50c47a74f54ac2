//! DPO against TRL 1.12's own code (tests/golden_dpo, made by
//! scripts/make_golden_dpo.py): every loss type with its gradient and
//! metrics, the row preparation, evaluate() at step 0 on two models written
//! by transformers; then resume after SIGKILL, LoRA, precomputed reference
//! log-probs, and bad input.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use candle_rlhf::chat::TemplateSource;
use candle_rlhf::config::{Config, DpoLossType, FDivergenceType, TruncationMode};
use candle_rlhf::data::dpo::{prepare_pairs, sequence};
use candle_rlhf::data::preference::parse_all;
use candle_rlhf::rl::dpo::DpoHyper;
use candle_rlhf::signal::StopSignal;
use candle_rlhf::tokenizer::Tokenizer;
use candle_rlhf::trainers::dpo::{self, DpoBatch, Settings};
use serde_json::Value;

use crate::models::{fixtures_root, model_dir};

fn golden(name: &str) -> Value {
    let path = crate::repo().join("tests/golden_dpo").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// A path of a golden file: `fixtures/...` is the test's fixture tree.
fn golden_path(p: &str) -> PathBuf {
    match p.strip_prefix("fixtures/") {
        Some(rest) => fixtures_root().join(rest),
        None => crate::repo().join(p),
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

fn ints<T: TryFrom<u64>>(v: &Value) -> Vec<T>
where
    T::Error: std::fmt::Debug,
{
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| T::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

fn settings_of(c: &Value) -> Settings {
    let types: Vec<DpoLossType> = serde_json::from_value(c["loss_type"].clone()).unwrap();
    let weights: Option<Vec<f64>> =
        serde_json::from_value(c["loss_weights"].clone()).unwrap_or(None);
    let f_div: FDivergenceType = serde_json::from_value(
        c.get("f_divergence_type")
            .cloned()
            .unwrap_or("reverse_kl".into()),
    )
    .unwrap();
    let num = |k: &str, d: f64| c.get(k).and_then(Value::as_f64).unwrap_or(d);
    Settings {
        losses: types
            .iter()
            .enumerate()
            .map(|(i, &t)| (t, weights.as_ref().map_or(1.0, |w| w[i])))
            .collect(),
        hyper: DpoHyper {
            beta: num("beta", 0.1),
            label_smoothing: num("label_smoothing", 0.0),
            f_divergence_type: f_div,
            f_alpha_divergence_coef: num("f_alpha_divergence_coef", 0.5),
            discopop_tau: num("discopop_tau", 0.05),
        },
        max_length: 1024,
        mode: TruncationMode::KeepStart,
        ld_alpha: c.get("ld_alpha").and_then(Value::as_f64),
        use_weighting: c
            .get("use_weighting")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    }
}

/// |a - b| <= rel * |b| + abs.
fn assert_close(what: &str, a: f64, b: f64, rel: f64, abs: f64) {
    assert!(
        (a - b).abs() <= rel * b.abs() + abs,
        "{what}: ours {a}, TRL {b}"
    );
}

#[test]
fn every_loss_type_its_gradient_and_metrics_equal_trls_compute_loss() {
    let g = golden("losses.json");
    let inputs = &g["inputs"];
    let dev = Device::Cpu;
    let rows =
        |k: &str| -> Vec<Vec<u32>> { inputs[k].as_array().unwrap().iter().map(ints).collect() };
    let ids = rows("input_ids");
    let completion: Vec<Vec<u8>> = rows("completion_mask")
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as u8).collect())
        .collect();
    let logits_v: Vec<Vec<Vec<f32>>> = serde_json::from_value(inputs["logits"].clone()).unwrap();
    let (n, t, v) = (logits_v.len(), logits_v[0].len(), logits_v[0][0].len());
    let flat: Vec<f32> = logits_v.into_iter().flatten().flatten().collect();
    let refs = |k: &str| -> Tensor {
        let x: Vec<f32> = serde_json::from_value(inputs[k].clone()).unwrap();
        Tensor::new(x, &dev).unwrap()
    };
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 28);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let s = settings_of(&case["config"]);
        let batch =
            DpoBatch::from_rows(ids.clone(), completion.clone(), s.ld_alpha, 0, &dev).unwrap();
        let logits =
            Var::from_tensor(&Tensor::from_vec(flat.clone(), (n, t, v), &dev).unwrap()).unwrap();
        let picked = batch.select(&logits.reshape((n * t, v)).unwrap()).unwrap();
        let reference = (refs("ref_chosen_logps"), refs("ref_rejected_logps"));
        let (loss, figures) = dpo::loss_from_logits(&picked, &batch, &s, reference).unwrap();
        let value = loss.to_scalar::<f32>().unwrap() as f64;
        assert_close(&format!("{name} loss"), value, f(&case["loss"]), 1e-5, 1e-6);
        for (k, ours) in &figures {
            let theirs = f(&case["metrics"][*k]);
            assert_close(&format!("{name} {k}"), *ours, theirs, 1e-5, 1e-6);
        }
        assert_eq!(figures.len(), 10, "{name}: every metric but num_tokens");
        let grads = loss.backward().unwrap();
        let ours: Vec<f32> = grads
            .get(&logits)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let theirs: Vec<f32> =
            serde_json::from_value::<Vec<Vec<Vec<f32>>>>(case["grad_logits"].clone())
                .unwrap()
                .into_iter()
                .flatten()
                .flatten()
                .collect();
        let scale = theirs.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert_close(
                &format!("{name} grad[{i}]"),
                *a as f64,
                *b as f64,
                0.0,
                1e-5 * scale + 1e-8,
            );
        }
    }
}

#[test]
fn rows_are_prepared_and_cut_as_trls_dpo_trainer_prepares_them() {
    let g = golden("prep.json");
    for case in g["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let dir = golden_path(case["tokenizer"].as_str().unwrap());
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let template = TemplateSource::new(&dir, None);
        let records: Vec<(Value, String)> = case["input_rows"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, r)| (r.clone(), format!("{name}: row {i}")))
            .collect();
        let rows = parse_all(&records).unwrap();
        let max_length = case["max_length"].as_u64().unwrap() as usize;
        let mode: TruncationMode = serde_json::from_value(case["truncation_mode"].clone()).unwrap();
        let (pairs, report) = prepare_pairs(&rows, &tok, &template, max_length, mode).unwrap();
        let want = case["rows"].as_array().unwrap();
        assert_eq!(pairs.len(), want.len(), "{name}: rows kept");
        assert_eq!(
            report.kept,
            case["rows_kept"].as_u64().unwrap() as usize,
            "{name}"
        );
        assert_eq!(
            report.dropped_prompt_too_long,
            rows.len() - pairs.len(),
            "{name}"
        );
        for (p, w) in pairs.iter().zip(want) {
            let i = &w["index_in_input"];
            assert_eq!(
                p.prompt,
                ints::<u32>(&w["prompt_ids"]),
                "{name} row {i}: prompt"
            );
            assert_eq!(
                p.chosen,
                ints::<u32>(&w["chosen_ids"]),
                "{name} row {i}: chosen"
            );
            assert_eq!(
                p.rejected,
                ints::<u32>(&w["rejected_ids"]),
                "{name} row {i}: rejected"
            );
            for (side, ids) in [("chosen", &p.chosen), ("rejected", &p.rejected)] {
                let (seq, mask) = sequence(&p.prompt, ids, max_length, mode);
                assert_eq!(
                    seq,
                    ints::<u32>(&w[format!("{side}_input_ids")]),
                    "{name} row {i}: {side}"
                );
                assert_eq!(
                    mask,
                    ints::<u8>(&w[format!("{side}_completion_mask")]),
                    "{name} row {i}: {side} mask"
                );
            }
        }
    }
}

/// A config of the tiny-llama fixture on its preference pairs.
pub fn tiny_config(out_sets: &[String]) -> Config {
    let mut sets = vec![
        format!(
            "model.name_or_path={:?}",
            model_dir("tiny-llama").to_string_lossy()
        ),
        format!(
            "dpo.dataset={:?}",
            fixtures_root()
                .join("data/preferences.jsonl")
                .to_string_lossy()
        ),
        crate::device_setting(),
    ];
    sets.extend(out_sets.iter().cloned());
    Config::load(Some(&crate::repo().join("configs/dpo-tiny.toml")), &sets).unwrap()
}

fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn evaluation_at_step_0_equals_trls_evaluate_on_models_written_by_transformers() {
    let g = golden("eval.json");
    let tmp = tempfile::tempdir().unwrap();
    for case in g["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let c = &case["config"];
        let types: Vec<String> = serde_json::from_value(c["loss_type"].clone()).unwrap();
        let p = |k: &str| {
            format!(
                "{:?}",
                golden_path(g[k].as_str().unwrap()).to_string_lossy()
            )
        };
        let sets = vec![
            format!("model.name_or_path={}", p("policy")),
            format!("dpo.ref_model={}", p("reference")),
            format!("dpo.dataset={}", p("dataset")),
            format!("dpo.eval_dataset={}", p("dataset")),
            format!("dpo.loss_type={types:?}"),
            format!("dpo.beta={}", f(&c["beta"])),
            format!("dpo.label_smoothing={}", f(&c["label_smoothing"])),
            format!("dpo.max_length={}", g["max_length"]),
            format!(
                "train.per_device_eval_batch_size={}",
                g["per_device_eval_batch_size"]
            ),
            "train.eval_on_start=true".into(),
            "train.max_steps=1".into(),
            "run.device=\"cpu\"".into(),
        ];
        let cfg = Config::load(Some(&crate::repo().join("configs/dpo-tiny.toml")), &sets).unwrap();
        let dir = tmp.path().join(name);
        dpo::train(&cfg, &dir, false, &StopSignal::new()).unwrap();
        let first = metrics(&dir).into_iter().find(|m| m["step"] == 0).unwrap();
        for (k, theirs) in case["metrics"].as_object().unwrap() {
            if k == "epoch" {
                continue;
            }
            let ours = first.get(k).unwrap_or_else(|| panic!("{name}: no {k}"));
            if k == "eval_rewards/accuracies" {
                assert_eq!(ours.as_f64(), theirs.as_f64(), "{name} {k}");
            } else {
                assert_close(&format!("{name} {k}"), f(ours), f(theirs), 1e-4, 1e-6);
            }
        }
    }
}

/// `candle-rlhf dpo` on the tiny preset with the fixture model and pairs, then `sets`.
fn dpo_cmd(out: &Path, sets: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(crate::bin());
    c.env_remove("RUST_BACKTRACE")
        .arg("dpo")
        .arg("--config")
        .arg(crate::repo().join("configs/dpo-tiny.toml"))
        .args([
            "--set",
            &format!(
                "model.name_or_path={:?}",
                model_dir("tiny-llama").to_string_lossy()
            ),
        ])
        .args([
            "--set",
            &format!(
                "dpo.dataset={:?}",
                fixtures_root()
                    .join("data/preferences.jsonl")
                    .to_string_lossy()
            ),
        ]);
    for s in sets {
        c.args(["--set", s]);
    }
    c.args(["--out", &out.to_string_lossy()]);
    c
}

#[test]
fn a_killed_dpo_run_resumes_to_the_same_weights_as_one_never_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = [
        "train.max_steps=40",
        "train.save_steps=1",
        "dpo.loss_type=[\"sigmoid\", \"sft\"]",
        "train.per_device_train_batch_size=2",
        "train.gradient_accumulation_steps=2",
    ];
    let cmd = |out: &Path| dpo_cmd(out, &sets);
    let killed = tmp.path().join("killed");
    let mut child = cmd(&killed)
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
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL: no chance to write anything more
    child.wait().unwrap();
    let ok = |c: &mut std::process::Command| {
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let resumed = ok(cmd(&killed).arg("--resume").arg(&killed));
    assert!(resumed.contains("steps: 40"), "{resumed}");
    let straight = tmp.path().join("straight");
    ok(&mut cmd(&straight));
    let read = |d: &Path| std::fs::read(d.join("checkpoints/40/model.safetensors")).unwrap();
    assert!(
        read(&killed) == read(&straight),
        "resumed after a kill differs"
    );
}

/// The precomputed reference files of a run directory.
fn ref_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("ref_logps-")
        })
        .collect();
    files.sort();
    files
}

#[test]
fn precomputed_reference_log_probs_train_as_the_live_reference_and_survive_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let mut sets: Vec<String> = vec!["train.max_steps=6".into(), "train.save_steps=3".into()];
        sets.extend(extra.iter().map(|s| s.to_string()));
        let dir = tmp.path().join(name);
        let o = dpo::train(&tiny_config(&sets), &dir, false, &StopSignal::new()).unwrap();
        (dir, o)
    };
    let (live_dir, live) = run("live", &[]);
    let (pre_dir, pre) = run(
        "pre",
        &[
            "dpo.precompute_ref_log_probs=true",
            "dpo.precompute_ref_batch_size=5",
        ],
    );
    let stored = ref_files(&pre_dir);
    assert_eq!(stored.len(), 1, "{stored:?}");
    // Same pairs, reference sums from other batch layouts: equal to f32 rounding.
    for k in ["eval_loss", "eval_rewards/margins", "eval_logps/chosen"] {
        assert_close(k, pre.eval(k), live.eval(k), 1e-4, 1e-6);
    }
    // Resume reads the stored figures: the file is not rewritten.
    let before = std::fs::metadata(&stored[0]).unwrap().modified().unwrap();
    std::fs::remove_dir_all(pre_dir.join("checkpoints/6")).unwrap();
    let cfg = tiny_config(&[
        "train.max_steps=6".into(),
        "train.save_steps=3".into(),
        "dpo.precompute_ref_log_probs=true".into(),
        "dpo.precompute_ref_batch_size=5".into(),
    ]);
    let again = dpo::train(&cfg, &pre_dir, true, &StopSignal::new()).unwrap();
    assert_eq!(again.steps, 6);
    assert_eq!(ref_files(&pre_dir), stored);
    let after = std::fs::metadata(&stored[0]).unwrap().modified().unwrap();
    assert_eq!(before, after);
    assert_eq!(again.eval("eval_loss"), pre.eval("eval_loss"));
    // A new run in the directory of one that left no checkpoint, with another
    // cut: its own figures, not the old file's.
    std::fs::remove_dir_all(pre_dir.join("checkpoints")).unwrap();
    let cfg = cfg.with_overrides(&["dpo.max_length=12".into()]).unwrap();
    dpo::train(&cfg, &pre_dir, false, &StopSignal::new()).unwrap();
    assert_eq!(ref_files(&pre_dir).len(), 2);
    drop(live_dir);
}

#[test]
fn lora_dpo_learns_with_the_base_as_its_reference_and_saves_peft_files() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(&[
        "train.max_steps=30".into(),
        "train.eval_on_start=true".into(),
    ]);
    cfg.lora = Some(Default::default());
    cfg.train.learning_rate = 1e-2;
    let dir = tmp.path().join("lora");
    let o = dpo::train(&cfg, &dir, false, &StopSignal::new()).unwrap();
    assert!(o.checkpoint.join("adapter_model.safetensors").exists());
    assert!(o.checkpoint.join("adapter_config.json").exists());
    let m = metrics(&dir);
    let at = |step: u64| {
        m.iter()
            .find(|r| r["step"] == step && r.get("eval_loss").is_some())
            .unwrap()
    };
    // At step 0 the adapters are zero: the policy is its reference.
    assert!(f(&at(0)["eval_rewards/margins"]).abs() < 1e-5);
    assert!(f(&at(30)["eval_rewards/margins"]) > 0.05, "{}", at(30));
    assert!(f(&at(30)["eval_loss"]) < f(&at(0)["eval_loss"]));
}

#[test]
fn combinations_trl_refuses_are_refused_before_any_model_loads() {
    let cases: [(&[&str], &str); 6] = [
        (
            &[
                "dpo.loss_type=\"bco_pair\"",
                "dpo.f_divergence_type=\"js_divergence\"",
            ],
            "dpo.f_divergence_type",
        ),
        (
            &["dpo.loss_type=\"aot\"", "dpo.use_weighting=true"],
            "dpo.use_weighting",
        ),
        (&["dpo.loss_type=\"exo_pair\""], "dpo.label_smoothing"),
        (
            &[
                "dpo.loss_type=[\"sigmoid\", \"sft\"]",
                "dpo.loss_weights=[1.0]",
            ],
            "dpo.loss_weights",
        ),
        (&["dpo.sync_ref_model=true"], "dpo.sync_ref_model"),
        (&["dpo.loss_type=\"kto\""], "unknown loss type"),
    ];
    for (sets, want) in cases {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let e = Config::load(None, &sets).unwrap_err().to_string();
        assert!(e.contains(want), "{sets:?}: {e}");
    }
    assert!(Config::load(None, &["dpo.loss_type=\"ipo\"".into()]).is_ok());
}

#[test]
fn bad_rows_are_counted_or_refused_with_their_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |rows: &str, extra: &[&str]| {
        let path = tmp.path().join(format!("d{}.jsonl", rows.len()));
        std::fs::write(&path, rows).unwrap();
        let mut sets = vec![
            format!("dpo.dataset={:?}", path.to_string_lossy()),
            "train.max_steps=1".into(),
            "dpo.eval_ratio=0.0".into(),
        ];
        sets.extend(extra.iter().map(|s| s.to_string()));
        let cfg = tiny_config(&sets);
        dpo::train(
            &cfg,
            &tmp.path().join(format!("r{}", rows.len())),
            false,
            &StopSignal::new(),
        )
    };
    // Kept as TRL keeps them: chosen = rejected; an empty text completion
    // becomes the EOS text alone (TRL appends it), so it is not empty.
    let good =
        "{\"prompt\": \"the movie was\", \"chosen\": \" great.\", \"rejected\": \" bad.\"}\n";
    let o = run(
        &format!("{good}{{\"prompt\": \"a\", \"chosen\": \" same\", \"rejected\": \" same\"}}\n{{\"prompt\": \"b\", \"chosen\": \"\", \"rejected\": \" x\"}}\n"),
        &[],
    )
    .unwrap();
    assert_eq!(
        (o.data.kept, o.data.identical, o.data.empty_completion),
        (3, 1, 0)
    );
    // A prompt that fills max_length is dropped and counted.
    let long = format!(
        "{good}{{\"prompt\": \"{}\", \"chosen\": \" a\", \"rejected\": \" b\"}}\n",
        "the movie ".repeat(40)
    );
    let o = run(&long, &["dpo.max_length=16"]).unwrap();
    assert_eq!((o.data.kept, o.data.dropped_prompt_too_long), (1, 1));
    // A missing column and a mix of text and messages: errors naming the file and line.
    let e = run(
        &format!("{good}{{\"prompt\": \"x\", \"chosen\": \" y\"}}\n"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("line 2") && e.contains("rejected"), "{e}");
    let mixed = format!("{good}{{\"chosen\": [{{\"role\": \"user\", \"content\": \"q\"}}], \"rejected\": [{{\"role\": \"user\", \"content\": \"r\"}}]}}\n");
    let e = run(&mixed, &[]).unwrap_err().to_string();
    assert!(e.contains(".jsonl") && e.contains("line 2"), "{e}");
}

#[test]
fn eval_on_start_evaluates_at_step_0_where_asked_and_not_where_turned_off() {
    let tmp = tempfile::tempdir().unwrap();
    let model = format!(
        "model.name_or_path={:?}",
        model_dir("tiny-gpt2").to_string_lossy()
    );
    let data = |section: &str, file: &str| {
        format!(
            "{section}.dataset={:?}",
            fixtures_root().join(file).to_string_lossy()
        )
    };
    let load = |preset: &str, sets: Vec<String>| {
        let mut all = vec![
            model.clone(),
            crate::device_setting(),
            "train.max_steps=1".to_string(),
        ];
        all.extend(sets);
        Config::load(Some(&crate::repo().join("configs").join(preset)), &all).unwrap()
    };
    let evaluated_at_0 = |dir: &Path| {
        metrics(dir)
            .iter()
            .any(|m| m["step"] == 0 && m.get("eval_loss").is_some())
    };
    let stop = StopSignal::new();
    for on in [false, true] {
        let on_set = if on {
            vec!["train.eval_on_start=true".to_string()]
        } else {
            vec![]
        };
        // sft and reward: off unless asked, as in transformers.
        let dir = tmp.path().join(format!("sft-{on}"));
        let sets = [
            vec![data("sft", "data/sft.jsonl"), "sft.eval_ratio=0.1".into()],
            on_set.clone(),
        ]
        .concat();
        candle_rlhf::trainers::sft::train(&load("sft-tiny.toml", sets), &dir, false, &stop)
            .unwrap();
        assert_eq!(evaluated_at_0(&dir), on, "sft");
        let dir = tmp.path().join(format!("reward-{on}"));
        let sets = [vec![data("reward", "data/preferences.jsonl")], on_set].concat();
        candle_rlhf::trainers::reward::train(&load("reward-tiny.toml", sets), &dir, false, &stop)
            .unwrap();
        assert_eq!(evaluated_at_0(&dir), on, "reward");
    }
    // grpo (like ppo and rloo): on unless turned off.
    for (set, on) in [(None, true), (Some("train.eval_on_start=false"), false)] {
        let dir = tmp.path().join(format!("grpo-{on}"));
        let eval = format!(
            "grpo.eval_dataset={:?}",
            fixtures_root()
                .join("data/preferences.jsonl")
                .to_string_lossy()
        );
        let mut sets = vec![data("grpo", "data/preferences.jsonl"), eval];
        sets.extend(set.map(String::from));
        let cfg = load("grpo-tiny.toml", sets);
        let o = candle_rlhf::trainers::online::train(
            &cfg,
            candle_rlhf::trainers::online::Trainer::Grpo,
            &dir,
            false,
            &stop,
        )
        .unwrap();
        assert_eq!(o.eval_before.is_some(), on, "grpo");
    }
}

#[test]
fn the_shared_prompt_row_gives_the_loss_and_gradients_of_two_separate_rows() {
    // One row per pair (the prompt once, chosen and rejected branching off
    // it) against the collator's two rows per pair, on a real model: the
    // reference sums, the loss, the metrics and every weight's gradient.
    // keep_end with a short max_length cuts some prompts differently on the
    // two sides, so those pairs share less (or nothing).
    let dir = model_dir("tiny-llama");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let rows = candle_rlhf::data::read_preferences(&fixtures_root().join("data/preferences.jsonl"))
        .unwrap();
    let dev = Device::Cpu;
    for (mode, max_length) in [
        (TruncationMode::KeepStart, 64),
        (TruncationMode::KeepEnd, 9),
    ] {
        let (pairs, _) = prepare_pairs(
            &rows[..6],
            &tok,
            &TemplateSource::new(&dir, None),
            max_length,
            mode,
        )
        .unwrap();
        let mut s = settings_of(
            &serde_json::json!({"loss_type": ["sigmoid", "sft"], "ld_alpha": 0.5, "use_weighting": true}),
        );
        (s.max_length, s.mode) = (max_length, mode);
        let refs: Vec<_> = pairs.iter().collect();
        let shared = DpoBatch::new(&refs, &s, tok.pad_id, &dev).unwrap();
        let sides: Vec<(Vec<u32>, Vec<u8>)> = pairs
            .iter()
            .map(|p| sequence(&p.prompt, &p.chosen, max_length, mode))
            .chain(
                pairs
                    .iter()
                    .map(|p| sequence(&p.prompt, &p.rejected, max_length, mode)),
            )
            .collect();
        let (ids, masks): (Vec<_>, Vec<_>) = sides.into_iter().unzip();
        let separate = DpoBatch::from_rows(ids, masks, s.ld_alpha, tok.pad_id, &dev).unwrap();
        assert_eq!(shared.tokens, separate.tokens);
        let (arch, vb, vars) =
            candle_rlhf::models::load_dir(&dir, candle_core::DType::F32, &dev).unwrap();
        let lm = candle_rlhf::models::CausalLm::load(vb, &arch, true).unwrap();
        let run = |b: &DpoBatch| {
            let r = dpo::reference_logps(&lm, b).unwrap();
            let sums: Vec<f32> = Tensor::cat(&[&r.0, &r.1], 0).unwrap().to_vec1().unwrap();
            let (loss, figures) =
                dpo::policy_loss(&lm, b, &s, (r.0.affine(1.0, 0.5).unwrap(), r.1)).unwrap();
            let grads = loss.backward().unwrap();
            let g: Vec<Vec<f32>> = vars
                .all_vars()
                .iter()
                .map(|v| {
                    grads
                        .get(v)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect();
            (sums, loss.to_scalar::<f32>().unwrap(), figures, g)
        };
        let (a, b) = (run(&shared), run(&separate));
        for (x, y) in a.0.iter().zip(&b.0) {
            assert_close("reference sum", *x as f64, *y as f64, 1e-5, 1e-5);
        }
        assert_close("loss", a.1 as f64, b.1 as f64, 1e-5, 1e-6);
        for ((k, x), (_, y)) in a.2.iter().zip(&b.2) {
            assert_close(k, *x, *y, 1e-5, 1e-6);
        }
        for (gx, gy) in a.3.iter().zip(&b.3) {
            let scale = gy.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            for (x, y) in gx.iter().zip(gy) {
                assert_close("gradient", *x as f64, *y as f64, 0.0, 1e-4 * scale + 1e-7);
            }
        }
    }
}

#[test]
fn robust_outside_its_range_is_warned_about_and_runs_as_trl_lets_it() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = [
        "dpo.loss_type=\"robust\"",
        "dpo.label_smoothing=0.6",
        "train.max_steps=1",
    ];
    let o = dpo_cmd(&tmp.path().join("robust"), &sets).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("label_smoothing should lie in [0.0, 0.5) for the robust loss"),
        "{stderr}"
    );
}
