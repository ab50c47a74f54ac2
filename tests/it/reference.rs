//! Our models against independent implementations on the same checkpoints:
//! golden outputs made once with Hugging Face transformers
//! (scripts/make_golden.py, files in tests/golden/) for every architecture,
//! and candle-transformers' models where it has the architecture (llama,
//! mistral, qwen2, bert, distilbert). Both at most 1e-4 apart in f32.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use candle_rlhf::models::reward_model::RewardModel;
use candle_rlhf::models::Backbone;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use candle_rlhf::data::batch::right_pad;

use crate::models::{load, max_abs_diff, model_dir, outputs, ENCODERS};

const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
pub struct Golden {
    pub model: String,
    pub made_by: String,
    pub model_sha256: String,
    pub cases: BTreeMap<String, Case>,
}

#[derive(Deserialize)]
pub struct Case {
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u8>>,
    positions: Vec<[usize; 2]>,
    #[serde(default)]
    head: Vec<Vec<f32>>,
    #[serde(default)]
    logsumexp: Vec<f64>,
    #[serde(default)]
    argmax: Vec<usize>,
    #[serde(default)]
    hidden: Vec<Vec<f32>>,
}

/// Our outputs against one golden case: the largest difference seen.
pub fn compare(model: &Backbone, case: &Case, what: &str) -> f32 {
    let (b, t) = (case.input_ids.len(), case.input_ids[0].len());
    let ids = Tensor::from_vec(case.input_ids.concat(), (b, t), &crate::dev()).unwrap();
    let hidden = model.forward(&ids, &case.attention_mask).unwrap();
    let out = match model {
        Backbone::Causal(m) => m.lm_logits(&hidden).unwrap(),
        Backbone::Encoder(_) => hidden,
    };
    let out: Vec<Vec<Vec<f32>>> = out.to_vec3().unwrap();
    let mut worst = 0f32;
    for (n, &[row, pos]) in case.positions.iter().enumerate() {
        let ours = &out[row][pos];
        let expected = if case.hidden.is_empty() {
            &case.head[n]
        } else {
            &case.hidden[n]
        };
        for (a, e) in ours.iter().zip(expected) {
            worst = worst.max((a - e).abs());
        }
        if !case.logsumexp.is_empty() {
            let max = ours.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = max
                + ours
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            worst = worst.max((lse - case.logsumexp[n]).abs() as f32);
            // The reference's argmax is (within tolerance) our maximum too.
            assert!(
                ours[case.argmax[n]] as f64 >= max - TOLERANCE as f64,
                "{what}: argmax at {row},{pos}"
            );
        }
    }
    worst
}

/// The sha256 of `bytes` in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn every_architecture_matches_transformers_golden_outputs() {
    let dir = crate::repo().join("tests/golden");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let golden: Golden =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let weights = std::fs::read(model_dir(&golden.model).join("model.safetensors")).unwrap();
        let sha: String = Sha256::digest(&weights)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            sha,
            golden.model_sha256,
            "fixture {} changed since {} was made: regenerate with scripts/make_golden.py",
            golden.model,
            path.display()
        );
        let (model, _, _) = load(&golden.model, DType::F32);
        let mut worst = 0f32;
        for (name, case) in &golden.cases {
            worst = worst.max(compare(&model, case, &format!("{}/{name}", golden.model)));
        }
        eprintln!(
            "{}: max |ours - transformers| = {worst:.2e} ({})",
            golden.model, golden.made_by
        );
        assert!(worst <= TOLERANCE, "{}: {worst}", golden.model);
        seen += 1;
    }
    assert_eq!(seen, 8, "one golden file per fixture architecture");
}

fn their_vb(name: &str) -> VarBuilder<'static> {
    let file = model_dir(name).join("model.safetensors");
    // SAFETY: the fixture file is not modified while mapped.
    unsafe { VarBuilder::from_mmaped_safetensors(&[file], DType::F32, &crate::dev()).unwrap() }
}

fn config_json<T: serde::de::DeserializeOwned>(name: &str) -> T {
    serde_json::from_str(&std::fs::read_to_string(model_dir(name).join("config.json")).unwrap())
        .unwrap()
}

const ROWS: [[u32; 7]; 2] = [[5, 17, 42, 9, 100, 7, 8], [33, 2, 64, 11, 12, 13, 14]];

fn ids() -> Tensor {
    Tensor::new(&ROWS, &crate::dev()).unwrap()
}

/// Our last-position logits (B, V) of the unpadded ROWS.
fn our_last_logits(name: &str) -> Tensor {
    let (model, _, _) = load(name, DType::F32);
    let rows: Vec<Vec<u32>> = ROWS.iter().map(|r| r.to_vec()).collect();
    let (logits, _) = outputs(&model, &rows);
    logits
        .narrow(1, ROWS[0].len() - 1, 1)
        .unwrap()
        .squeeze(1)
        .unwrap()
}

#[test]
fn llama_matches_candle_transformers() {
    use candle_transformers::models::llama;
    let cfg: llama::LlamaConfig = config_json("tiny-llama");
    let cfg = cfg.into_config(false);
    let theirs = llama::Llama::load(their_vb("tiny-llama"), &cfg).unwrap();
    let mut cache = llama::Cache::new(false, DType::F32, &cfg, &crate::dev()).unwrap();
    let their_logits = theirs.forward(&ids(), 0, &mut cache).unwrap(); // (B, V), last position
    let diff = max_abs_diff(&our_last_logits("tiny-llama"), &their_logits);
    eprintln!("tiny-llama: max |ours - candle-transformers| = {diff:.2e}");
    assert!(diff <= TOLERANCE, "{diff}");
}

#[test]
fn mistral_matches_candle_transformers() {
    use candle_transformers::models::mistral;
    let cfg: mistral::Config = config_json("tiny-mistral");
    let mut theirs = mistral::Model::new(&cfg, their_vb("tiny-mistral")).unwrap();
    let their_logits = theirs.forward(&ids(), 0).unwrap().squeeze(1).unwrap();
    let diff = max_abs_diff(&our_last_logits("tiny-mistral"), &their_logits);
    eprintln!("tiny-mistral: max |ours - candle-transformers| = {diff:.2e}");
    assert!(diff <= TOLERANCE, "{diff}");
}

#[test]
fn qwen2_matches_candle_transformers_at_every_position() {
    use candle_transformers::models::qwen2;
    // The fixture's config.json has the transformers 5 shape, which
    // candle-transformers does not parse: its values, written out.
    let raw: serde_json::Value = config_json("tiny-qwen2");
    let n = |k: &str| raw[k].as_u64().unwrap() as usize;
    let cfg = qwen2::Config {
        vocab_size: n("vocab_size"),
        hidden_size: n("hidden_size"),
        intermediate_size: n("intermediate_size"),
        num_hidden_layers: n("num_hidden_layers"),
        num_attention_heads: n("num_attention_heads"),
        num_key_value_heads: n("num_key_value_heads"),
        max_position_embeddings: n("max_position_embeddings"),
        sliding_window: 4096,
        max_window_layers: n("max_window_layers"),
        tie_word_embeddings: true,
        rope_theta: raw["rope_parameters"]["rope_theta"].as_f64().unwrap(),
        rms_norm_eps: raw["rms_norm_eps"].as_f64().unwrap(),
        use_sliding_window: false,
        hidden_act: candle_nn::Activation::Silu,
    };
    let mut theirs = qwen2::Model::new(&cfg, their_vb("tiny-qwen2")).unwrap();
    let their_hidden = theirs.forward(&ids(), 0, None).unwrap(); // (B, T, E)
    let (model, _, _) = load("tiny-qwen2", DType::F32);
    let mask = vec![vec![1u8; ROWS[0].len()]; ROWS.len()];
    let ours = model.forward(&ids(), &mask).unwrap();
    let diff = max_abs_diff(&ours, &their_hidden);
    eprintln!("tiny-qwen2: max |ours - candle-transformers| (hidden, all positions) = {diff:.2e}");
    assert!(diff <= TOLERANCE, "{diff}");
}

#[test]
fn qwen3_matches_candle_transformers_at_every_position() {
    use candle_transformers::models::qwen3;
    // The fixture's config.json has the shape the hub's Qwen3 files have,
    // which candle-transformers reads as it is.
    let cfg: qwen3::Config = config_json("tiny-qwen3");
    assert_ne!(
        cfg.head_dim * cfg.num_attention_heads,
        cfg.hidden_size,
        "explicit head_dim"
    );
    let mut theirs = qwen3::Model::new(&cfg, their_vb("tiny-qwen3")).unwrap();
    let their_hidden = theirs.forward(&ids(), 0).unwrap(); // (B, T, E)
    let (model, _, _) = load("tiny-qwen3", DType::F32);
    let mask = vec![vec![1u8; ROWS[0].len()]; ROWS.len()];
    let ours = model.forward(&ids(), &mask).unwrap();
    let diff = max_abs_diff(&ours, &their_hidden);
    eprintln!("tiny-qwen3: max |ours - candle-transformers| (hidden, all positions) = {diff:.2e}");
    assert!(diff <= TOLERANCE, "{diff}");
}

/// A right-padded batch for the encoders: ids, our mask, and the real positions.
fn encoder_batch() -> (Tensor, Vec<Vec<u8>>) {
    let rows = vec![vec![2u32, 17, 42, 9, 100, 7, 3], vec![2u32, 64, 11, 3]];
    let (ids, mask) = right_pad(&rows, 0);
    (Tensor::from_vec(ids, (2, 7), &crate::dev()).unwrap(), mask)
}

/// Largest difference over real positions of two (B, T, E) tensors.
fn diff_at_real(a: &Tensor, b: &Tensor, mask: &[Vec<u8>]) -> f32 {
    let m: Vec<f32> = mask.concat().iter().map(|&v| v as f32).collect();
    let m = Tensor::from_vec(m, (mask.len(), mask[0].len(), 1), &crate::dev()).unwrap();
    max_abs_diff(&a.broadcast_mul(&m).unwrap(), &b.broadcast_mul(&m).unwrap())
}

#[test]
fn encoders_match_candle_transformers_on_a_right_padded_batch() {
    use candle_transformers::models::{bert, distilbert};
    let (ids, mask) = encoder_batch();
    let mask_t = Tensor::new(mask.clone(), &crate::dev()).unwrap();
    for name in ENCODERS {
        let theirs = if *name == "tiny-bert" {
            let cfg: bert::Config = config_json(name);
            let m = bert::BertModel::load(their_vb(name), &cfg).unwrap();
            m.forward(&ids, &ids.zeros_like().unwrap(), Some(&mask_t))
                .unwrap()
        } else {
            let cfg: distilbert::Config = config_json(name);
            let m = distilbert::DistilBertModel::load(their_vb(name), &cfg).unwrap();
            // candle-transformers' DistilBERT masks where its mask is 1 (the pads).
            let pads = mask_t
                .eq(0u8)
                .unwrap()
                .unsqueeze(1)
                .unwrap()
                .unsqueeze(1)
                .unwrap();
            m.forward(&ids, &pads).unwrap()
        };
        let (model, _, _) = load(name, DType::F32);
        let ours = model.forward(&ids, &mask).unwrap();
        let diff = diff_at_real(&ours, &theirs, &mask);
        eprintln!("{name}: max |ours - candle-transformers| (hidden, real positions) = {diff:.2e}");
        assert!(diff <= TOLERANCE, "{name}: {diff}");
    }
}

#[derive(Deserialize)]
struct RewardGolden {
    model: String,
    architecture: String,
    made_by: String,
    model_sha256: String,
    cases: BTreeMap<String, RewardCase>,
}

#[derive(Deserialize)]
struct RewardCase {
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u8>>,
    rewards: Vec<f32>,
}

fn sha256_of(path: &Path) -> String {
    Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The fixture reward models (every architecture, each with a seeded head,
/// saved as `candle-rlhf reward` saves) score as transformers'
/// AutoModelForSequenceClassification scores them: right- and left-padded
/// batches and single rows (tests/golden_reward, scripts/make_golden.py).
#[test]
fn saved_reward_models_score_as_transformers_does() {
    let dir = crate::repo().join("tests/golden_reward");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let golden: RewardGolden =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let model_dir = crate::models::fixtures_root()
            .join("reward")
            .join(&golden.model);
        assert_eq!(
            sha256_of(&model_dir.join("model.safetensors")),
            golden.model_sha256,
            "fixture reward/{} changed since {} was made: regenerate with scripts/make_golden.py",
            golden.model,
            path.display()
        );
        let (model, _) =
            RewardModel::from_dir(&model_dir, DType::F32, &crate::dev(), 12345).unwrap();
        let mut worst = 0f32;
        for (name, case) in &golden.cases {
            let (b, t) = (case.input_ids.len(), case.input_ids[0].len());
            let ids = Tensor::from_vec(case.input_ids.concat(), (b, t), &crate::dev()).unwrap();
            let ours: Vec<f32> = model
                .rewards(&ids, &case.attention_mask)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(ours.len(), case.rewards.len(), "{}/{name}", golden.model);
            for (a, e) in ours.iter().zip(&case.rewards) {
                worst = worst.max((a - e).abs());
            }
        }
        eprintln!(
            "{} ({}): max |ours - transformers| = {worst:.2e} ({})",
            golden.model, golden.architecture, golden.made_by
        );
        assert!(worst <= TOLERANCE, "{}: {worst}", golden.model);
        seen += 1;
    }
    assert_eq!(seen, 8, "one golden reward file per fixture architecture");
}
