//! LoRA: adapters start at the base model, train alone, merge to the same
//! model, save in peft's layout, and load where a model is expected.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use candle_rlhf::config::LoraConfig;
use candle_rlhf::models::lora::LoraWeights;
use candle_rlhf::models::reward_model::RewardModel;
use candle_rlhf::models::{load_dir_frozen, Backbone};
use candle_rlhf::optim::{AdamW, AdamWParams, ParamGrads};

use crate::models::{model_dir, outputs};

/// The largest absolute difference of two tensors of one shape.
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `[lora]` from TOML lines.
pub fn lora_config(toml_lines: &str) -> LoraConfig {
    toml::from_str(toml_lines).unwrap()
}

/// One fixture of each architecture family LoRA adapts.
const ARCHS: [&str; 5] = [
    "tiny-gpt2",
    "tiny-llama",
    "tiny-pythia",
    "tiny-qwen3",
    "tiny-bert",
];

fn rows() -> Vec<Vec<u32>> {
    vec![vec![5, 9, 2, 7, 3], vec![11, 4, 8]]
}

fn snapshot(varmap: &candle_nn::VarMap) -> HashMap<String, Vec<f32>> {
    candle_rlhf::models::weights::named_tensors(varmap)
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// One AdamW step (lr 0.05) on the squared outputs of `model`.
fn step(model: &Backbone, optimizer: &mut AdamW) {
    let (out, _) = outputs(model, &rows());
    let loss = out.sqr().unwrap().mean_all().unwrap();
    let grads = ParamGrads::backward(&loss, optimizer).unwrap();
    optimizer.step(&grads.0, 0.05).unwrap();
}

#[test]
fn adapters_start_at_the_base_train_alone_and_merge_to_the_adapted_model() {
    let dev = crate::dev();
    for name in ARCHS {
        let dir = model_dir(name);
        let cfg = lora_config("r = 4\nlora_alpha = 8\ntarget_modules = \"all-linear\"");
        let w = LoraWeights::read(&dir, DType::F32, &dev, &cfg, 0).unwrap();
        let arch = w.arch.clone();
        let mut adapted = Backbone::load(w.builder(), &arch).unwrap();
        let names = w.attach_trainable(&mut adapted).unwrap();
        let reference = Backbone::load(w.base_builder(), &arch).unwrap();
        let (_, vb, _) = load_dir_frozen(&dir, DType::F32, &dev).unwrap();
        let plain = Backbone::load(vb, &arch).unwrap();
        let (base_out, _) = outputs(&plain, &rows());

        // 1. At initialisation (B = 0) the adapted model is the base, exactly.
        let (start, _) = outputs(&adapted, &rows());
        // Exactly, where both run on the same product kernels; a BLAS build
        // runs the plain layer's products in the BLAS and the LoRA op's on
        // the gemm crate, which round differently.
        let tolerance = if cfg!(feature = "mkl") { 1e-6 } else { 0.0 };
        let diff = max_diff(&start, &base_out);
        assert!(
            diff <= tolerance,
            "{name}: adapted at init differs by {diff}"
        );
        // Every linear layer of the trunk is adapted under all-linear.
        let per_layer = match name {
            "tiny-gpt2" | "tiny-pythia" => 4,
            "tiny-bert" => 6,
            _ => 7,
        };
        assert_eq!(names.len() % per_layer, 0, "{name}: {names:?}");

        // 2. Only adapters are Vars; after one step B has moved and A not yet
        // (B = 0 gives A a zero gradient), after two both have.
        let mut optimizer = AdamW::from_varmap(&w.varmap, AdamWParams::default()).unwrap();
        let before = snapshot(&w.varmap);
        assert!(
            before
                .keys()
                .all(|k| k.contains(".lora_A.") || k.contains(".lora_B.")),
            "{name}: {:?}",
            before.keys()
        );
        assert_eq!(before.len(), 2 * names.len());
        step(&adapted, &mut optimizer);
        let after_one = snapshot(&w.varmap);
        for (k, v) in &after_one {
            let moved = v != &before[k];
            assert_eq!(moved, k.contains(".lora_B."), "{name}: {k} after one step");
        }
        step(&adapted, &mut optimizer);
        let after_two = snapshot(&w.varmap);
        assert!(
            after_two.iter().all(|(k, v)| v != &before[k]),
            "{name}: every A and B trains"
        );

        // 3. The base weights did not move: the reference (no adapter, the
        // same tensors) still gives the base model's outputs exactly.
        let (ref_out, _) = outputs(&reference, &rows());
        assert_eq!(
            max_diff(&ref_out, &base_out),
            0.0,
            "{name}: reference = base"
        );

        // 4. The merged model equals the adapted one within f32 rounding.
        let (trained_out, _) = outputs(&adapted, &rows());
        assert!(
            max_diff(&trained_out, &base_out) > 1e-4,
            "{name}: training changed nothing"
        );
        let merged: HashMap<String, Tensor> = w.merged().unwrap().into_iter().collect();
        let merged =
            Backbone::load(VarBuilder::from_tensors(merged, DType::F32, &dev), &arch).unwrap();
        let (merged_out, _) = outputs(&merged, &rows());
        let scale = trained_out
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = max_diff(&merged_out, &trained_out);
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "{name}: merged differs by {diff}"
        );
    }
}

#[test]
fn a_reward_model_trains_its_head_in_full_and_adapters_elsewhere() {
    let dev = crate::dev();
    for name in ["tiny-gpt2", "tiny-bert"] {
        let cfg = lora_config(
            "r = 2\ntarget_modules = \"all-linear\"\nmodules_to_save = [\"score\", \"classifier\"]",
        );
        let w = LoraWeights::read(&model_dir(name), DType::F32, &dev, &cfg, 0).unwrap();
        let mut model = RewardModel::load(w.builder(), &w.varmap, &w.arch, 0).unwrap();
        let adapted = w.attach_trainable(&mut model).unwrap();
        let saved = candle_rlhf::models::lora::saved_modules(&w.varmap);
        let want: &[&str] = if name == "tiny-bert" {
            // The fixture has no pooler: a new head, trained in full beside
            // the classifier, and no adapter on it.
            assert!(!adapted.iter().any(|n| n.contains("pooler")), "{adapted:?}");
            &["bert.pooler.dense", "classifier"]
        } else {
            &["score"]
        };
        assert_eq!(saved, want, "{name}");
    }
}

#[test]
fn bad_lora_settings_are_refused_naming_the_key() {
    for (set, key) in [
        ("lora.r=0", "lora.r"),
        ("lora.lora_dropout=1.0", "lora.lora_dropout"),
        ("lora.init_lora_weights=\"pissa\"", "lora.init_lora_weights"),
        ("lora.init_lora_weights=false", "lora.init_lora_weights"),
        ("lora.target_modules=\"(\"", "lora.target_modules"),
    ] {
        let err = candle_rlhf::config::Config::load(None, &[set.to_string()])
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{set}: {err}");
    }
    // No module matches: one error naming target_modules.
    let cfg = lora_config("target_modules = [\"no_such_proj\"]");
    let w =
        LoraWeights::read(&model_dir("tiny-llama"), DType::F32, &crate::dev(), &cfg, 0).unwrap();
    let mut m = Backbone::load(w.builder(), &w.arch).unwrap();
    let err = w.attach_trainable(&mut m).unwrap_err().to_string();
    assert!(err.contains("lora.target_modules"), "{err}");
}

fn q(p: &std::path::Path) -> String {
    format!("{:?}", p.to_string_lossy())
}

fn sft_lora_config(run: &std::path::Path, data: &std::path::Path) -> candle_rlhf::config::Config {
    let sets = vec![
        format!("model.name_or_path={}", q(&model_dir("tiny-gpt2"))),
        format!("sft.dataset={}", q(data)),
        format!("run.out={}", q(run)),
        crate::device_setting(),
        "sft.max_length=32".into(),
        "train.learning_rate=1e-2".into(),
        "train.per_device_train_batch_size=16".into(),
        "train.max_steps=60".into(),
        "train.save_steps=20".into(),
        "train.warmup_ratio=0.0".into(),
        "train.logging_steps=1".into(),
        "lora.r=8".into(),
        "lora.lora_alpha=16".into(),
        "lora.lora_dropout=0.1".into(),
        "lora.target_modules=\"all-linear\"".into(),
        "lora.save_merged=true".into(),
        // The fixture's embeddings are random and frozen: the final norm's
        // scale must train for the logits to sharpen.
        "lora.modules_to_save=[\"ln_f\"]".into(),
        // Checkpointing only costs time on the tiny fixtures (tests/it/memory.rs tests it).
        "train.activation_checkpointing=false".into(),
    ];
    candle_rlhf::config::Config::load(None, &sets).unwrap()
}

#[test]
fn sft_with_lora_saves_a_peft_adapter_resumes_bit_identically_and_merges() {
    use candle_rlhf::app::task::Task;
    use candle_rlhf::signal::StopSignal;
    use candle_rlhf::trainers::sft;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("sft.jsonl");
    candle_rlhf::app::fixtures::write_jsonl(&data, &Task::new(0, "sft").sft_rows(400)).unwrap();
    let dir = tmp.path().join("straight");
    let straight = sft::train(
        &sft_lora_config(&dir, &data),
        &dir,
        false,
        &StopSignal::new(),
    )
    .unwrap();
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    eprintln!(
        "SFT with LoRA r=8 all-linear: loss {:.3} at step 1 -> eval loss {:.3}, token accuracy {:.3}",
        first["loss"], straight.eval_loss, straight.eval_mean_token_accuracy
    );
    assert!(
        straight.eval_loss < first["loss"].as_f64().unwrap() - 0.8,
        "adapters learn"
    );
    assert!(straight.eval_mean_token_accuracy > 0.4);

    // peft's layout: adapter files, no full model.
    let ckpt = &straight.checkpoint;
    assert!(!ckpt.join("model.safetensors").exists());
    let cfg: serde_json::Value =
        candle_rlhf::io::read_json(&ckpt.join("adapter_config.json")).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["fan_in_fan_out"], true, "GPT-2's Conv1D");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    let targets = cfg["target_modules"].as_array().unwrap();
    assert!(
        targets.iter().any(|t| t == "transformer.h.0.attn.c_attn"),
        "{targets:?}"
    );
    let base = cfg["base_model_name_or_path"].as_str().unwrap();
    assert_eq!(
        std::path::Path::new(base),
        model_dir("tiny-gpt2").canonicalize().unwrap()
    );
    let tensors = candle_rlhf::io::load_safetensors(
        &ckpt.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let (ln_f, adapters): (Vec<_>, Vec<_>) = tensors
        .keys()
        .partition(|k| k.starts_with("base_model.model.transformer.ln_f."));
    assert_eq!(ln_f.len(), 2, "modules_to_save: ln_f's weight and bias");
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["transformer.ln_f"])
    );
    assert!(
        adapters
            .iter()
            .all(|k| k.starts_with("base_model.model.transformer.h.")
                && (k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))),
        "{adapters:?}"
    );
    assert_eq!(adapters.len(), 2 * targets.len());

    // An interrupted run resumes to the same adapter, dropout masks included.
    let dir2 = tmp.path().join("stopped");
    let stop = StopSignal::new();
    stop.request();
    let err = sft::train(&sft_lora_config(&dir2, &data), &dir2, false, &stop).unwrap_err();
    assert!(
        matches!(err, candle_rlhf::Error::Interrupted { step: 1, .. }),
        "{err}"
    );
    let resumed = sft::train(
        &sft_lora_config(&dir2, &data),
        &dir2,
        true,
        &StopSignal::new(),
    )
    .unwrap();
    let read = |d: &std::path::Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(
        read(&resumed.checkpoint) == read(ckpt),
        "resumed LoRA SFT differs"
    );

    // `merge` writes the same model as the run's merged/ copy; the adapter
    // directory loads wherever a model is expected (generate here).
    let out = tmp.path().join("merged-cli");
    let o = std::process::Command::new(crate::bin())
        .args(["merge", "--adapter"])
        .arg(ckpt)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cpu = candle_core::Device::Cpu;
    let a = candle_rlhf::io::load_safetensors(&out.join("model.safetensors"), &cpu).unwrap();
    let b =
        candle_rlhf::io::load_safetensors(&ckpt.join("merged/model.safetensors"), &cpu).unwrap();
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        assert_eq!(max_diff(t, &b[k]), 0.0, "{k}");
    }
    assert!(out.join("config.json").is_file() && out.join("tokenizer.json").is_file());
    let cache = tmp.path().join("hf");
    let o = std::process::Command::new(crate::bin())
        .env("HF_HOME", &cache)
        .args([
            "generate",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
            "--prompt",
            "the movie",
            "--model",
        ])
        .arg(ckpt)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        cache.join("hub/candle-rlhf-merged").is_dir(),
        "merged once into the cache"
    );
}

#[test]
fn adapters_made_by_peft_load_and_give_peft_logits_unmerged_and_merged() {
    use crate::reference::{compare, Golden};
    use candle_rlhf::models::lora::{attach, AdapterDir, Attach};
    let dev = crate::dev();
    let root = crate::repo().join("tests/golden_peft");
    let mut seen = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let adapter_dir = entry.unwrap().path();
        let golden: Golden = serde_json::from_str(
            &std::fs::read_to_string(adapter_dir.join("golden.json")).unwrap(),
        )
        .unwrap();
        let base = model_dir(&golden.model);
        let sha =
            crate::reference::sha256_hex(&std::fs::read(base.join("model.safetensors")).unwrap());
        assert_eq!(
            sha, golden.model_sha256,
            "fixture {} changed: regenerate with make golden",
            golden.model
        );
        let (arch, vb, _) = load_dir_frozen(&base, DType::F32, &dev).unwrap();
        // Unmerged: peft's A and B attached to our layers.
        let mut adapter = AdapterDir::read(&adapter_dir, &dev).unwrap();
        adapter.rename(|n| arch.canonical_name(n));
        let mut model = Backbone::load(vb, &arch).unwrap();
        let names = attach(
            &mut model,
            &adapter.spec,
            &candle_nn::VarMap::new(),
            Attach::Tensors(&adapter.tensors),
        )
        .unwrap();
        assert_eq!(
            2 * names.len(),
            adapter.tensors.len(),
            "{}: every adapter used",
            golden.model
        );
        let unmerged = compare(&model, &golden.cases["padded"], &golden.model);
        // Merged by `candle-rlhf merge`'s code into a model directory.
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        candle_rlhf::models::lora::write_merged(&adapter_dir, &base, &out).unwrap();
        let (arch, vb, _) = load_dir_frozen(&out, DType::F32, &dev).unwrap();
        let merged = compare(
            &Backbone::load(vb, &arch).unwrap(),
            &golden.cases["padded"],
            &golden.model,
        );
        eprintln!(
            "{}: max |ours - peft| = {unmerged:.2e} with the adapter, {merged:.2e} merged ({})",
            golden.model, golden.made_by
        );
        assert!(
            unmerged <= 1e-4 && merged <= 1e-4,
            "{}: {unmerged} / {merged}",
            golden.model
        );
        seen += 1;
    }
    assert_eq!(seen, 3);
}

#[test]
fn a_lora_reward_model_trains_and_its_checkpoint_scores_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let root = crate::models::fixtures_root();
    let prefs = root.join(candle_rlhf::app::fixtures::PREFERENCES);
    let run = tmp.path().join("rm");
    let o = std::process::Command::new(crate::bin())
        .env_remove("RUST_BACKTRACE")
        .args(["reward", "--config"])
        .arg(crate::repo().join("configs/reward-tiny.toml"))
        .args([
            "--set",
            &format!("model.name_or_path={}", q(&model_dir("tiny-gpt2"))),
        ])
        .args(["--set", &format!("reward.dataset={}", q(&prefs))])
        .args([
            "--set",
            "train.learning_rate=1e-2",
            "--set",
            "lora.r=8",
            "--set",
            "lora.lora_alpha=16",
        ])
        .args(["--set", "lora.target_modules=\"all-linear\""])
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}{stdout}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ckpt = run.join("checkpoints/60");
    let cfg: serde_json::Value =
        candle_rlhf::io::read_json(&ckpt.join("adapter_config.json")).unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["score"]),
        "the new head trains in full"
    );
    let merged: serde_json::Value =
        candle_rlhf::io::read_json(&ckpt.join("merged_config.json")).unwrap();
    assert_eq!(merged["architectures"][0], "GPT2ForSequenceClassification");
    // `score` takes the LoRA run directory: its newest checkpoint, merged once into the cache.
    let o = std::process::Command::new(crate::bin())
        .env("HF_HOME", tmp.path().join("hf"))
        .args(["score", "--model"])
        .arg(&run)
        .arg("--data")
        .arg(&prefs)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{stdout}\n{out}");
    let accuracy: f64 = out
        .lines()
        .find_map(|l| l.split("accuracy").nth(1))
        .and_then(|rest| {
            rest.trim_start_matches([' ', ':', '='])
                .split_whitespace()
                .next()
        })
        .and_then(|v| v.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no accuracy in {out}"));
    assert!(accuracy > 0.9, "{accuracy}");
}

#[test]
fn activation_checkpointing_trains_adapters_with_dropout_bit_identically() {
    // Two optimizer steps of two micro-batches each, LoRA dropout 0.2: the
    // recomputed layers must draw the masks the forward drew, and the next
    // micro-batch the masks after them.
    use candle_rlhf::models::Linears;
    let dev = crate::dev();
    for name in ARCHS {
        let train = |on: bool| {
            let cfg = lora_config(
                "r = 4\nlora_alpha = 8\nlora_dropout = 0.2\ntarget_modules = \"all-linear\"",
            );
            let w = LoraWeights::read(&model_dir(name), DType::F32, &dev, &cfg, 0).unwrap();
            let mut model = Backbone::load(w.builder(), &w.arch).unwrap();
            w.attach_trainable(&mut model).unwrap();
            model.set_activation_checkpointing(on);
            let dropout = w.dropout.clone().expect("lora_dropout > 0");
            let vars = candle_rlhf::models::weights::named_vars(&w.varmap);
            let mut optimizer = AdamW::new(vars, AdamWParams::default()).unwrap();
            for s in 0..2 {
                dropout.begin_step(s);
                let mut total: Option<ParamGrads> = None;
                for micro in [rows(), vec![vec![3, 1, 4, 1, 5, 9]]] {
                    let (out, _) = outputs(&model, &micro);
                    let loss = out.sqr().unwrap().mean_all().unwrap();
                    let g = ParamGrads::backward(&loss, &optimizer).unwrap();
                    match &mut total {
                        Some(t) => t.add(g).unwrap(),
                        None => total = Some(g),
                    }
                }
                optimizer.step(&total.unwrap().0, 0.05).unwrap();
            }
            snapshot(&w.varmap)
        };
        let (plain, recomputed) = (train(false), train(true));
        assert!(!plain.is_empty());
        for (tensor, a) in &plain {
            let b = &recomputed[tensor];
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(a) == bits(b), "{name}: {tensor} differs");
        }
    }
}

#[test]
fn the_chunked_head_gives_adapters_the_composed_heads_gradients() {
    // Under LoRA the head is frozen: the chunked head returns the hidden
    // states' gradient only, and the adapters get the composed path's.
    let dev = crate::dev();
    for name in ["tiny-gpt2", "tiny-llama"] {
        let cfg = lora_config("r = 4\nlora_alpha = 8\ntarget_modules = \"all-linear\"");
        let w = LoraWeights::read(&model_dir(name), DType::F32, &dev, &cfg, 0).unwrap();
        let mut model = Backbone::load(w.builder(), &w.arch).unwrap();
        w.attach_trainable(&mut model).unwrap();
        let vars = candle_rlhf::models::weights::named_vars(&w.varmap);
        let mut optimizer = AdamW::new(vars, AdamWParams::default()).unwrap();
        step(&model, &mut optimizer); // B moves off 0, so every adapter gets a gradient
        let Backbone::Causal(lm) = &model else {
            unreachable!()
        };
        let ids = Tensor::new(&[[5u32, 9, 2, 7, 3, 8]], &dev).unwrap();
        let hidden = model
            .forward(&ids.narrow(1, 0, 5).unwrap(), &[vec![1; 5]])
            .unwrap();
        let labels = ids.narrow(1, 1, 5).unwrap().flatten_all().unwrap();
        let fused = lm
            .token_figures(&hidden.reshape((5, ())).unwrap(), &labels, 1.0, false)
            .unwrap();
        let logits = lm.lm_logits(&hidden).unwrap().reshape((5, ())).unwrap();
        let plain = candle_rlhf::rl::token_figures(&logits, &labels, 1.0, false).unwrap();
        let a = ParamGrads::backward(&fused.logps.sum_all().unwrap(), &optimizer).unwrap();
        let b = ParamGrads::backward(&plain.logps.sum_all().unwrap(), &optimizer).unwrap();
        assert!(!a.0.is_empty());
        for (ga, gb) in a.0.iter().zip(&b.0) {
            let (ga, gb) = (ga.as_ref().unwrap(), gb.as_ref().unwrap());
            let scale = max_diff(gb, &gb.zeros_like().unwrap());
            assert!(scale > 0.0, "{name}: an adapter got no gradient");
            assert!(max_diff(ga, gb) <= 1e-5 * scale, "{name}: differs");
        }
    }
}

#[test]
fn a_lora_critic_and_the_reward_model_it_starts_from_hold_one_copy_of_the_base() {
    use candle_rlhf::models::weights::shared_frozen;
    use std::sync::Arc;
    let dev = crate::dev();
    // A private copy of the fixture reward model: no other test holds it.
    let tmp = tempfile::tempdir().unwrap();
    let src = crate::models::fixtures_root().join("reward/tiny-gpt2");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    let dir = tmp.path();
    let scorer =
        candle_rlhf::models::reward_model::RewardScorer::load(&dir.to_string_lossy(), &dev)
            .unwrap();
    let probe = shared_frozen(dir, DType::F32, &dev).unwrap();
    assert_eq!(
        Arc::strong_count(&probe),
        2,
        "the scorer holds the shared tensors"
    );
    let cfg = lora_config("r = 4\nlora_alpha = 8\ntarget_modules = \"all-linear\"");
    let critic_base = LoraWeights::read(dir, DType::F32, &dev, &cfg, 0).unwrap();
    assert_eq!(
        Arc::strong_count(&probe),
        3,
        "the LoRA weights read the same copy"
    );
    // In another dtype the base is a copy of its own.
    let bf16 = LoraWeights::read(dir, DType::BF16, &dev, &cfg, 0).unwrap();
    assert_eq!(Arc::strong_count(&probe), 3);
    drop((scorer, critic_base, bf16));
    assert_eq!(Arc::strong_count(&probe), 1);
    drop(probe);
    let fresh = shared_frozen(dir, DType::F32, &dev).unwrap();
    assert_eq!(Arc::strong_count(&fresh), 1, "nothing outlives its holders");
}
