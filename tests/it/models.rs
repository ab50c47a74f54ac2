//! GPT-2 on the self-made fixture: KV cache, gradients, padding, loading errors, generation.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, D};
use candle_rlhf::generate::{generate, Sampling};
use candle_rlhf::models::gpt2::Gpt2;
use candle_rlhf::models::{attention_bias, left_pad, position_ids};
use candle_rlhf::tokenizer::Tokenizer;
use candle_rlhf::{fixtures, HostRng};

/// The tiny GPT-2, made once per test process.
pub fn tiny_gpt2() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep().join("tiny-gpt2");
        fixtures::write_tiny_gpt2(&dir, 0).unwrap();
        dir
    })
}

fn load() -> (Gpt2, candle_nn::VarMap) {
    Gpt2::from_dir(tiny_gpt2(), DType::F32, &Device::Cpu).unwrap()
}

/// Full-sequence logits (B, T, V) of left-padded rows.
fn full_logits(model: &Gpt2, rows: &[Vec<u32>]) -> (Tensor, Vec<Vec<u8>>) {
    let width = rows.iter().map(Vec::len).max().unwrap();
    let (ids, mask) = left_pad(rows, 1);
    let pos: Vec<u32> = position_ids(&mask).concat();
    let dev = Device::Cpu;
    let ids = Tensor::from_vec(ids, (rows.len(), width), &dev).unwrap();
    let pos = Tensor::from_vec(pos, (rows.len(), width), &dev).unwrap();
    let bias = attention_bias(&mask, width, DType::F32, &dev).unwrap();
    let hidden = model.forward(&ids, &pos, &bias, None).unwrap();
    (model.lm_logits(&hidden).unwrap(), mask)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn fixtures_are_deterministic_per_seed() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    fixtures::write_tiny_gpt2(a.path(), 0).unwrap();
    fixtures::write_tiny_gpt2(b.path(), 0).unwrap();
    for file in [
        "model.safetensors",
        "tokenizer.json",
        "config.json",
        "tokenizer_config.json",
    ] {
        assert_eq!(
            std::fs::read(a.path().join(file)).unwrap(),
            std::fs::read(b.path().join(file)).unwrap(),
            "{file}"
        );
    }
    let c = tempfile::tempdir().unwrap();
    fixtures::write_tiny_gpt2(c.path(), 1).unwrap();
    assert_ne!(
        std::fs::read(a.path().join("model.safetensors")).unwrap(),
        std::fs::read(c.path().join("model.safetensors")).unwrap()
    );
}

#[test]
fn tokenizer_follows_the_pad_eos_policy_and_round_trips() {
    let tok = Tokenizer::from_dir(tiny_gpt2()).unwrap();
    assert_eq!(
        tok.inner.id_to_token(tok.eos_id).as_deref(),
        Some(fixtures::EOS_TOKEN)
    );
    assert_eq!(
        tok.inner.id_to_token(tok.pad_id).as_deref(),
        Some(fixtures::PAD_TOKEN)
    );
    assert_ne!(tok.pad_id, tok.eos_id);
    let text = "the movie was really great.";
    let ids = tok.encode(text).unwrap();
    assert!(ids.len() < text.len(), "BPE merged something: {ids:?}");
    assert_eq!(tok.decode(&ids).unwrap(), text);
}

#[test]
fn kv_cached_decoding_equals_one_full_forward() {
    let (model, _) = load();
    let rows = vec![
        vec![5u32, 17, 42, 9, 100, 7, 8, 9, 10],
        vec![33u32, 2, 64, 11, 12, 13],
    ];
    let (full, _) = full_logits(&model, &rows);
    // Cached: the prompts (all but the last 4 tokens of each row), then one token at a time.
    let dev = Device::Cpu;
    let steps = 4;
    let prompts: Vec<Vec<u32>> = rows.iter().map(|r| r[..r.len() - steps].to_vec()).collect();
    let width = prompts.iter().map(Vec::len).max().unwrap();
    let (ids, mut mask) = left_pad(&prompts, 1);
    let mut cache = model.new_cache();
    let bias = attention_bias(&mask, width, DType::F32, &dev).unwrap();
    let pos = Tensor::from_vec(position_ids(&mask).concat(), (2, width), &dev).unwrap();
    let h = model
        .forward(
            &Tensor::from_vec(ids, (2, width), &dev).unwrap(),
            &pos,
            &bias,
            Some(&mut cache),
        )
        .unwrap();
    let mut cached = vec![model
        .lm_logits(&h.narrow(1, width - 1, 1).unwrap())
        .unwrap()];
    for s in 0..steps - 1 {
        mask.iter_mut().for_each(|m| m.push(1));
        let next: Vec<u32> = rows.iter().map(|r| r[r.len() - steps + s]).collect();
        let pos: Vec<u32> = prompts.iter().map(|p| (p.len() + s) as u32).collect();
        let bias = attention_bias(&mask, 1, DType::F32, &dev).unwrap();
        let h = model
            .forward(
                &Tensor::from_vec(next, (2, 1), &dev).unwrap(),
                &Tensor::from_vec(pos, (2, 1), &dev).unwrap(),
                &bias,
                Some(&mut cache),
            )
            .unwrap();
        cached.push(model.lm_logits(&h).unwrap());
    }
    let cached = Tensor::cat(&cached, 1).unwrap(); // (B, steps, V)
                                                   // The full pass's logits at the same positions: the last `steps` of the full
                                                   // width minus one (each predicts the next token).
    let t = full.dim(1).unwrap();
    let expected = full.narrow(1, t - steps - 1, steps).unwrap();
    let diff = max_abs_diff(&cached, &expected);
    assert!(diff < 1e-4, "cached vs full: {diff}");
}

#[test]
fn left_padding_does_not_change_a_rows_logits() {
    let (model, _) = load();
    let short = vec![40u32, 41, 42];
    let (alone, _) = full_logits(&model, std::slice::from_ref(&short));
    let (batched, _) = full_logits(&model, &[vec![1u32, 2, 3, 4, 5, 6, 7], short.clone()]);
    let a = alone.get(0).unwrap();
    let b = batched.get(1).unwrap().narrow(0, 4, 3).unwrap();
    let diff = max_abs_diff(&a, &b);
    assert!(diff < 1e-4, "padded vs alone: {diff}");
}

#[test]
fn every_weight_gets_a_gradient() {
    let (model, varmap) = load();
    let rows = vec![vec![5u32, 17, 42, 9, 100, 7], vec![33u32, 2, 64, 11]];
    let (logits, _) = full_logits(&model, &rows);
    let targets = Tensor::new(
        &[[17u32, 42, 9, 100, 7, 8], [1, 1, 2, 64, 11, 3]],
        &Device::Cpu,
    )
    .unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let loss = logp
        .gather(&targets.unsqueeze(2).unwrap(), 2)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap();
    let grads = loss.backward().unwrap();
    let vars = varmap.data().lock().unwrap();
    assert_eq!(vars.len(), 4 + 2 * 12, "wte, wpe, ln_f (2) + 12 per block");
    for (name, var) in vars.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm {norm}"
        );
    }
}

#[test]
fn checkpoints_without_the_transformer_prefix_load_the_same() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tiny_gpt2().join(f), dir.path().join(f)).unwrap();
    }
    let tensors = candle_rlhf::checkpoint::load_safetensors(
        &tiny_gpt2().join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let bare: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(k, v)| (k.trim_start_matches("transformer.").to_string(), v))
        .collect();
    candle_rlhf::checkpoint::save_safetensors(&bare, &dir.path().join("model.safetensors"))
        .unwrap();
    let (a, _) = load();
    let (b, _) = Gpt2::from_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let rows = vec![vec![3u32, 4, 5]];
    assert_eq!(
        max_abs_diff(&full_logits(&a, &rows).0, &full_logits(&b, &rows).0),
        0.0
    );
}

#[test]
fn bad_checkpoints_give_one_clear_error() {
    let copy = |skip: &str| {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors",
        ] {
            if f != skip {
                std::fs::copy(tiny_gpt2().join(f), dir.path().join(f)).unwrap();
            }
        }
        dir
    };
    // config.json disagrees with the weights: the tensor and both shapes are named.
    let dir = copy("");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    cfg["n_positions"] = 64.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = Gpt2::from_dir(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("transformer.wpe.weight")
            && err.contains("[128, 64]")
            && err.contains("[64, 64]"),
        "{err}"
    );
    // A missing tensor is named.
    let dir = copy("");
    let tensors = candle_rlhf::checkpoint::load_safetensors(
        &dir.path().join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let fewer: Vec<(String, Tensor)> = tensors
        .into_iter()
        .filter(|(k, _)| k != "transformer.h.1.mlp.c_fc.bias")
        .collect();
    candle_rlhf::checkpoint::save_safetensors(&fewer, &dir.path().join("model.safetensors"))
        .unwrap();
    let err = Gpt2::from_dir(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no tensor `transformer.h.1.mlp.c_fc.bias`"),
        "{err}"
    );
    // Pickle weights only: refused, with the reason and the way out.
    let dir = copy("model.safetensors");
    std::fs::write(dir.path().join("pytorch_model.bin"), b"pickle").unwrap();
    let err = Gpt2::from_dir(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("safetensors only") && err.contains("safe_serialization"),
        "{err}"
    );
    // Missing config.json / tokenizer.json are named.
    let dir = copy("config.json");
    let err = Gpt2::from_dir(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    let dir = copy("tokenizer.json");
    let err = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn generation_is_seeded_greedy_is_deterministic_and_stops_at_eos() {
    let (model, _) = load();
    let tok = Tokenizer::from_dir(tiny_gpt2()).unwrap();
    let prompts = vec![
        tok.encode("the movie was").unwrap(),
        tok.encode("i think this film").unwrap(),
    ];
    let dev = Device::Cpu;
    let sample = |temperature: f64, seed: u64, stop: Option<u32>| {
        let s = Sampling {
            max_new_tokens: 12,
            temperature,
            top_k: None,
            top_p: 1.0,
            stop_token_id: stop,
        };
        generate(
            &model,
            &prompts,
            tok.pad_id,
            &s,
            &mut HostRng::new(seed),
            &dev,
        )
        .unwrap()
    };
    let g1 = sample(0.0, 1, None);
    assert_eq!(g1, sample(0.0, 2, None), "greedy ignores the seed");
    assert!(g1.iter().all(|r| r.len() == 12));
    let s1 = sample(1.0, 5, None);
    assert_eq!(s1, sample(1.0, 5, None), "same seed, same samples");
    assert_ne!(s1, sample(1.0, 6, None));
    // Stop at a token the greedy output contains: the row ends just before it.
    let stop = g1[0][3];
    let cut = sample(0.0, 1, Some(stop));
    let first = g1[0].iter().position(|&t| t == stop).unwrap();
    assert_eq!(cut[0], g1[0][..first].to_vec());
    // Each row equals its own greedy run alone (padding is invisible).
    let alone = generate(
        &model,
        &prompts[1..],
        tok.pad_id,
        &Sampling {
            max_new_tokens: 12,
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
            stop_token_id: None,
        },
        &mut HostRng::new(0),
        &dev,
    )
    .unwrap();
    assert_eq!(alone[0], g1[1]);
}

#[test]
fn generate_cli_prints_json_per_prompt() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_candle-rlhf"))
        .args(["generate", "--model"])
        .arg(tiny_gpt2())
        .args([
            "--prompt",
            "the movie was",
            "--prompt",
            "overall the plot",
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
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["prompt"], "the movie was");
    let ids = lines[1]["completion_ids"].as_array().unwrap();
    assert!(!ids.is_empty() && ids.len() <= 5);
    assert!(lines[1]["completion"].is_string());

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_candle-rlhf"))
        .args(["generate", "--model", "/no/such/model", "--prompt", "x"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    let error_lines: Vec<&str> = err.lines().filter(|l| !l.contains("INFO")).collect();
    assert_eq!(error_lines.len(), 1, "{err}");
    assert!(error_lines[0].starts_with("error: /no/such/model"), "{err}");
}
