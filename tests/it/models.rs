//! Every fixture architecture: KV cache, padding, gradients, dtypes, frozen
//! weights, generation, tokenizers and the pad/EOS policy, loading errors.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Tensor, D};
use candle_nn::VarMap;
use candle_rlhf::app::fixtures;
use candle_rlhf::data::batch::{left_pad, position_ids, right_pad};
use candle_rlhf::generate::{generate, Draw, Sampling};
use candle_rlhf::models::{
    attention_bias, frozen_builder, load_dir, ArchConfig, Backbone, CausalLm,
};
use candle_rlhf::tokenizer::Tokenizer;
use candle_rlhf::HostRng;

pub const CAUSAL: &[&str] = &[
    "tiny-gpt2",
    "tiny-llama",
    "tiny-mistral",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-pythia",
];
pub const ENCODERS: &[&str] = &["tiny-bert", "tiny-distilbert"];

/// All fixtures (models and hub cache), made once per test process.
pub fn fixtures_root() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        fixtures::make_all(&dir, 0).unwrap();
        dir
    })
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures_root().join("models").join(name)
}

/// A fixture as a backbone with its Vars.
pub fn load(name: &str, dtype: DType) -> (Backbone, VarMap, ArchConfig) {
    let (cfg, vb, vars) = load_dir(&model_dir(name), dtype, &crate::dev()).unwrap();
    (Backbone::load(vb, &cfg).unwrap(), vars, cfg)
}

pub fn load_causal(name: &str) -> CausalLm {
    match load(name, DType::F32).0 {
        Backbone::Causal(m) => m,
        Backbone::Encoder(_) => panic!("{name} is not causal"),
    }
}

/// Output rows (B, T, X) of a padded batch: logits for causal LMs (left
/// padding), hidden states for encoders (right padding).
pub fn outputs(model: &Backbone, rows: &[Vec<u32>]) -> (Tensor, Vec<Vec<u8>>) {
    let width = rows.iter().map(Vec::len).max().unwrap();
    let (ids, mask) = match model {
        Backbone::Causal(_) => left_pad(rows, 1),
        Backbone::Encoder(_) => right_pad(rows, 0),
    };
    let ids = Tensor::from_vec(ids, (rows.len(), width), &crate::dev()).unwrap();
    let hidden = model.forward(&ids, &mask).unwrap();
    let out = match model {
        Backbone::Causal(m) => m.lm_logits(&hidden).unwrap(),
        Backbone::Encoder(_) => hidden,
    };
    (out.to_dtype(DType::F32).unwrap(), mask)
}

/// Fails unless every Var of `varmap` has a finite, non-zero gradient.
pub fn assert_every_var_has_a_gradient(
    name: &str,
    varmap: &VarMap,
    grads: &candle_core::backprop::GradStore,
) {
    for (tensor, var) in varmap.data().lock().unwrap().iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient for {tensor}"));
        let norm = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: {tensor}: gradient norm {norm}"
        );
    }
}

/// The largest |x| of a tensor.
pub fn max_abs(x: &Tensor) -> f32 {
    x.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

#[test]
fn fixtures_are_deterministic_per_seed() {
    let a = tempfile::tempdir().unwrap();
    fixtures::make_all(a.path(), 0).unwrap();
    let c = tempfile::tempdir().unwrap();
    fixtures::make_all(c.path(), 1).unwrap();
    for name in fixtures::MODEL_NAMES {
        for file in [
            "model.safetensors",
            "tokenizer.json",
            "config.json",
            "tokenizer_config.json",
        ] {
            let read =
                |root: &Path| std::fs::read(root.join("models").join(name).join(file)).unwrap();
            assert_eq!(read(a.path()), read(fixtures_root()), "{name}/{file}");
        }
        let weights = |root: &Path| {
            std::fs::read(root.join("models").join(name).join("model.safetensors")).unwrap()
        };
        assert_ne!(
            weights(a.path()),
            weights(c.path()),
            "{name}: seed 1 = seed 0"
        );
    }
}

#[test]
fn tokenizers_follow_the_pad_eos_policy() {
    let tok = |name: &str| Tokenizer::from_dir(&model_dir(name)).unwrap();
    let name_of = |t: &Tokenizer, id: u32| t.inner.id_to_token(id).unwrap();
    // A pad distinct from EOS is used as is.
    let gpt2 = tok("tiny-gpt2");
    assert_eq!(name_of(&gpt2, gpt2.eos_id), fixtures::EOS_TOKEN);
    assert_eq!(name_of(&gpt2, gpt2.pad_id), fixtures::PAD_TOKEN);
    // No pad token at all (Pythia): the pad is EOS.
    let pythia = tok("tiny-pythia");
    assert!(pythia.inner.token_to_id(fixtures::PAD_TOKEN).is_none());
    assert_eq!(pythia.pad_id, pythia.eos_id);
    // The pad token is EOS (Qwen2.5 base).
    let qwen = tok("tiny-qwen2");
    assert_eq!(name_of(&qwen, qwen.pad_id), fixtures::EOS_TOKEN);
    assert_eq!(qwen.pad_id, qwen.eos_id);
    // WordPiece: [CLS] text [SEP], [PAD] pads, EOS falls back to [SEP].
    let bert = tok("tiny-bert");
    let ids = bert.encode("The movie was GREAT.").unwrap();
    assert_eq!(name_of(&bert, ids[0]), "[CLS]");
    assert_eq!(name_of(&bert, *ids.last().unwrap()), "[SEP]");
    assert_eq!(name_of(&bert, bert.pad_id), "[PAD]");
    assert_eq!(name_of(&bert, bert.eos_id), "[SEP]");
    assert_eq!(bert.decode(&ids).unwrap(), "the movie was great.");
    // Byte-level BPE round-trips and merges.
    let text = "the movie was really great.";
    let ids = gpt2.encode(text).unwrap();
    assert!(ids.len() < text.len(), "BPE merged something: {ids:?}");
    assert_eq!(gpt2.decode(&ids).unwrap(), text);
}

#[test]
fn kv_cached_decoding_equals_one_full_forward() {
    let rows = vec![
        vec![5u32, 17, 42, 9, 100, 7, 8, 9, 10],
        vec![33u32, 2, 64, 11, 12, 13],
    ];
    let steps = 4;
    let dev = crate::dev();
    // Capacities: exactly what the decode needs (5 prompt positions and 3
    // decoded: the buffers are written in place), too small (they grow once,
    // copying what is cached), and none (allocated at the first write).
    for (name, capacity) in CAUSAL.iter().flat_map(|n| [(n, 8), (n, 6), (n, 0)]) {
        let model = load_causal(name);
        let (full, _) = outputs(&Backbone::Causal(load_causal(name)), &rows);
        // Cached: the prompts (all but the last 4 tokens of each row), then one token at a time.
        let prompts: Vec<Vec<u32>> = rows.iter().map(|r| r[..r.len() - steps].to_vec()).collect();
        let width = prompts.iter().map(Vec::len).max().unwrap();
        let (ids, mut mask) = left_pad(&prompts, 1);
        let mut cache = model.new_cache(capacity);
        let bias = attention_bias(&mask, width, DType::F32, &dev).unwrap();
        let pos = Tensor::from_vec(position_ids(&mask).concat(), (2, width), &dev).unwrap();
        let ids = Tensor::from_vec(ids, (2, width), &dev).unwrap();
        let h = model.forward(&ids, &pos, &bias, Some(&mut cache)).unwrap();
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
                                                       // The full pass's logits at the same positions (each predicts the next token).
        let t = full.dim(1).unwrap();
        let expected = full.narrow(1, t - steps - 1, steps).unwrap();
        let diff = max_abs_diff(&cached, &expected);
        assert!(
            diff < 1e-4,
            "{name}, capacity {capacity}: cached vs full: {diff}"
        );
        assert_eq!(cache[0].len(), width + steps - 1);
    }
}

#[test]
fn padding_does_not_change_a_row_and_pad_rows_stay_finite() {
    for name in CAUSAL.iter().chain(ENCODERS) {
        let (model, _, _) = load(name, DType::F32);
        let short = vec![40u32, 41, 42];
        let (alone, _) = outputs(&model, std::slice::from_ref(&short));
        let (batched, mask) = outputs(&model, &[vec![1u32, 2, 3, 4, 5, 6, 7], short.clone()]);
        // the short row's real positions: the last 3 (left padding) or the first 3 (right)
        let start = mask[1].iter().position(|&m| m == 1).unwrap();
        let b = batched.get(1).unwrap().narrow(0, start, 3).unwrap();
        let diff = max_abs_diff(&alone.get(0).unwrap(), &b);
        assert!(diff < 1e-4, "{name}: padded vs alone: {diff}");
        // A row that is all padding gives finite numbers everywhere.
        let ids = Tensor::new(&[[1u32, 2, 3], [0, 0, 0]], &crate::dev()).unwrap();
        let out = model
            .forward(&ids, &[vec![1, 1, 1], vec![0, 0, 0]])
            .unwrap();
        let all: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            all.iter().all(|v| v.is_finite()),
            "{name}: NaN/inf from a pad row"
        );
    }
}

#[test]
fn every_weight_gets_a_nonzero_gradient() {
    let rows = vec![vec![5u32, 17, 42, 9, 100, 7], vec![33u32, 2, 64, 11]];
    for name in CAUSAL.iter().chain(ENCODERS) {
        let (model, varmap, _) = load(name, DType::F32);
        let (out, _) = outputs(&model, &rows);
        // Causal LMs: next-token cross-entropy. Encoders: a random projection of every hidden state.
        let loss = match &model {
            Backbone::Causal(_) => {
                let targets = Tensor::new(
                    &[[17u32, 42, 9, 100, 7, 8], [1, 1, 2, 64, 11, 3]],
                    &crate::dev(),
                )
                .unwrap();
                let logp = candle_nn::ops::log_softmax(&out, D::Minus1).unwrap();
                logp.gather(&targets.unsqueeze(2).unwrap(), 2)
                    .unwrap()
                    .mean_all()
                    .unwrap()
                    .neg()
                    .unwrap()
            }
            Backbone::Encoder(_) => {
                let e = out.dim(2).unwrap();
                let w = HostRng::new(3)
                    .normal_tensor(e, 1.0, DType::F32, &crate::dev())
                    .unwrap();
                out.broadcast_mul(&w)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .mean_all()
                    .unwrap()
            }
        };
        let grads = loss.backward().unwrap();
        assert!(
            varmap.data().lock().unwrap().len() >= 14,
            "{name}: too few tensors"
        );
        assert_every_var_has_a_gradient(name, &varmap, &grads);
    }
}

#[test]
fn a_frozen_model_records_no_graph_but_sees_updates() {
    let (model, varmap, cfg) = load("tiny-llama", DType::F32);
    let frozen = Backbone::load(frozen_builder(&varmap, DType::F32, &crate::dev()), &cfg).unwrap();
    let rows = vec![vec![5u32, 17, 42]];
    let (a, _) = outputs(&model, &rows);
    let (b, _) = outputs(&frozen, &rows);
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let grads = b.sum_all().unwrap().backward().unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        assert!(
            grads.get(var.as_tensor()).is_none(),
            "{name} tracked through the frozen model"
        );
    }
    // An update to a Var is seen by the frozen model (shared storage).
    let vars = varmap.data().lock().unwrap();
    let norm = &vars["model.norm.weight"];
    norm.set(&(norm.as_tensor() * 2.0).unwrap()).unwrap();
    drop(vars);
    let (c, _) = outputs(&frozen, &rows);
    assert!(
        max_abs_diff(&b, &c) > 1e-3,
        "frozen model did not see the update"
    );
}

#[test]
fn half_precision_checkpoints_load_into_f32_and_back() {
    for name in ["tiny-llama", "tiny-pythia", "tiny-bert"] {
        let src = model_dir(name);
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        let tensors =
            candle_rlhf::io::load_safetensors(&src.join("model.safetensors"), &crate::dev())
                .unwrap();
        let bf16: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(DType::BF16).unwrap()))
            .collect();
        candle_rlhf::io::save_safetensors(&bf16, &dir.path().join("model.safetensors")).unwrap();
        // bf16 file -> f32 weights: exactly the bf16 values.
        let (_, vb, vars) = load_dir(dir.path(), DType::F32, &crate::dev()).unwrap();
        let cfg = ArchConfig::load(&dir.path().join("config.json")).unwrap();
        let model = Backbone::load(vb, &cfg).unwrap();
        for (k, v) in vars.data().lock().unwrap().iter() {
            assert_eq!(v.dtype(), DType::F32, "{k}");
            let want = bf16
                .iter()
                .find(|(n, _)| cfg.canonical_name(n) == *k)
                .unwrap()
                .1
                .to_dtype(DType::F32)
                .unwrap();
            assert_eq!(max_abs_diff(v.as_tensor(), &want), 0.0, "{name}: {k}");
        }
        // f32 file -> bf16 / f16 model: runs, close to the f32 model.
        let rows = vec![vec![5u32, 17, 42, 9], vec![8u32, 9]];
        let (f, _) = outputs(&model, &rows);
        for dtype in [DType::BF16, DType::F16] {
            let (half, _, _) = load(name, dtype);
            let diff = max_abs_diff(&outputs(&half, &rows).0, &f);
            assert!(
                diff.is_finite() && diff < 0.1,
                "{name}: {dtype:?} vs f32 {diff}"
            );
        }
    }
}

#[test]
fn generation_is_seeded_greedy_is_deterministic_and_stops() {
    let dev = crate::dev();
    for name in CAUSAL {
        let model = load_causal(name);
        let tok = Tokenizer::from_dir(&model_dir(name)).unwrap();
        let prompts = vec![
            tok.encode("the movie was").unwrap(),
            tok.encode("i think this film").unwrap(),
        ];
        let sample_with =
            |prompts: &[Vec<u32>], temperature: f64, seed: u64, stop: &[u32], draw: Draw| {
                let s = Sampling {
                    max_new_tokens: 12,
                    temperature,
                    top_k: None,
                    top_p: 1.0,
                    stop_token_ids: stop.to_vec(),
                    keep_stop_token: false,
                    draw,
                };
                let mut rngs: Vec<HostRng> = (0..prompts.len())
                    .map(|row| HostRng::keyed(seed, "test", &[row as u64]))
                    .collect();
                generate(&model, prompts, tok.pad_id, &s, &mut rngs, &dev).unwrap()
            };
        let sample = |prompts: &[Vec<u32>], temperature: f64, seed: u64, stop: &[u32]| {
            sample_with(prompts, temperature, seed, stop, Draw::Auto)
        };
        let g1 = sample(&prompts, 0.0, 1, &[]);
        assert_eq!(
            g1,
            sample(&prompts, 0.0, 2, &[]),
            "{name}: greedy ignores the seed"
        );
        assert!(g1.iter().all(|r| r.len() == 12));
        let s1 = sample(&prompts, 1.0, 5, &[]);
        assert_eq!(
            s1,
            sample(&prompts, 1.0, 5, &[]),
            "{name}: same seed, same samples"
        );
        assert_ne!(s1, sample(&prompts, 1.0, 6, &[]), "{name}");
        // Stop at a token the greedy output contains: the row ends just before it.
        let stop = g1[0][3];
        let cut = sample(&prompts, 0.0, 1, &[stop]);
        let first = g1[0].iter().position(|&t| t == stop).unwrap();
        assert_eq!(cut[0], g1[0][..first].to_vec(), "{name}");
        // Several stop tokens (Llama-3-Instruct lists three): a row ends at
        // the first of any of them.
        let (a, b) = (g1[0][6], g1[0][2]);
        let cut2 = sample(&prompts, 0.0, 1, &[a, b]);
        let first2 = g1[0].iter().position(|&t| t == a || t == b).unwrap();
        assert_eq!(cut2[0], g1[0][..first2].to_vec(), "{name}");
        // Each row equals its own greedy run alone (padding is invisible).
        assert_eq!(sample(&prompts[1..], 0.0, 0, &[])[0], g1[1], "{name}");
        // Each row draws from its own stream: sampled alone with its
        // stream, a row gets what it got in the batch (so data-parallel
        // ranks sample what one process samples).
        let s = Sampling {
            max_new_tokens: 12,
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            stop_token_ids: vec![],
            keep_stop_token: false,
            draw: Draw::Auto,
        };
        let stream = |row: u64| HostRng::keyed(5, "test", &[row]);
        let both = generate(
            &model,
            &prompts,
            tok.pad_id,
            &s,
            &mut [stream(0), stream(1)],
            &dev,
        )
        .unwrap();
        let alone = generate(
            &model,
            &prompts[1..],
            tok.pad_id,
            &s,
            &mut [stream(1)],
            &dev,
        )
        .unwrap();
        assert_eq!(alone[0], both[1], "{name}");
        // Tokens drawn on the device are those drawn on the host from the
        // same uniforms, a row that stopped early included.
        for temperature in [0.0, 1.0] {
            let host = sample_with(&prompts, temperature, 5, &[stop], Draw::Host);
            let on_device = sample_with(&prompts, temperature, 5, &[stop], Draw::Device);
            assert_eq!(host, on_device, "{name} at temperature {temperature}");
        }
    }
}

#[test]
fn model_flops_count_the_block_weights_by_hand() {
    use candle_rlhf::app::bench::ModelFlops;
    // GPT-2 block of width d: 12d² matrix weights (attention 4d², MLP 8d²;
    // biases and LayerNorms are 1-D); tiny-gpt2 has 2 blocks of width 64.
    let gpt2 = ModelFlops::of(&model_dir("tiny-gpt2")).unwrap();
    let want = ModelFlops {
        block_params: 2 * (12 * 64 * 64),
        layers: 2,
        hidden: 64,
        vocab: 445,
    };
    assert_eq!(gpt2, want);
    // tiny-llama: width 64, 4 heads of 16 sharing 2 key/value heads, MLP 96:
    // q and o 64x64, k and v 64x32, gate, up and down 64x96 (the RMSNorms
    // are 1-D; the untied lm_head is outside the blocks).
    let llama = ModelFlops::of(&model_dir("tiny-llama")).unwrap();
    assert_eq!(
        llama.block_params,
        2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96)
    );
    assert_eq!((llama.layers, llama.hidden, llama.vocab), (2, 64, 445));
    // tiny-bert: width 64, FFN 128; query, key, value and attention output
    // 64x64, intermediate and output 64x128, under `encoder.layer.N.`.
    let bert = ModelFlops::of(&model_dir("tiny-bert")).unwrap();
    assert_eq!(bert.block_params, 2 * (4 * 64 * 64 + 2 * 64 * 128));
}

#[test]
fn checkpoints_with_and_without_the_backbone_prefix_load_the_same() {
    // tiny-gpt2 is stored like the hub's gpt2 (no prefix), tiny-llama with `model.`.
    for (name, prefix) in [("tiny-gpt2", ""), ("tiny-llama", "model.")] {
        let src = model_dir(name);
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        let tensors =
            candle_rlhf::io::load_safetensors(&src.join("model.safetensors"), &crate::dev())
                .unwrap();
        let cfg = ArchConfig::load(&src.join("config.json")).unwrap();
        let flipped: Vec<(String, Tensor)> = tensors
            .into_iter()
            .map(|(k, v)| {
                let canonical = cfg.canonical_name(&k);
                let k = if prefix.is_empty() {
                    canonical
                } else {
                    k.trim_start_matches(prefix).to_string()
                };
                (k, v)
            })
            .collect();
        assert!(flipped.iter().any(|(k, _)| k.starts_with(cfg.prefix())) == prefix.is_empty());
        candle_rlhf::io::save_safetensors(&flipped, &dir.path().join("model.safetensors")).unwrap();
        let (a, _, _) = load(name, DType::F32);
        let (cfg, vb, _) = load_dir(dir.path(), DType::F32, &crate::dev()).unwrap();
        let b = Backbone::load(vb, &cfg).unwrap();
        let rows = vec![vec![3u32, 4, 5]];
        assert_eq!(
            max_abs_diff(&outputs(&a, &rows).0, &outputs(&b, &rows).0),
            0.0,
            "{name}"
        );
    }
}

#[test]
fn fused_cpu_kernels_give_the_gradients_of_the_composed_ops() {
    // On the CPU in f32 the models run the fused kernels (attention, linear,
    // norms, activations); in f64 every op is Candle's composed one. The
    // weights' gradients of the same loss on a left-padded batch must agree.
    let rows: Vec<Vec<u32>> = (0..3)
        .map(|i| {
            (0..9 + 4 * i)
                .map(|j| ((i * 31 + j * 7) % 400 + 5) as u32)
                .collect()
        })
        .collect();
    for name in [
        "tiny-gpt2",
        "tiny-llama",
        "tiny-qwen2",
        "tiny-qwen3",
        "tiny-pythia",
    ] {
        let grads = |dtype: DType| {
            let (model, varmap, _) = load(name, dtype);
            let logits = outputs(&model, &rows).0;
            let probe = logits
                .ones_like()
                .unwrap()
                .cumsum(2)
                .unwrap()
                .sin()
                .unwrap();
            let loss = (logits * probe).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let data = varmap.data().lock().unwrap();
            let mut out: Vec<(String, Tensor)> = data
                .iter()
                .map(|(n, v)| {
                    let g = grads
                        .get(v.as_tensor())
                        .unwrap_or_else(|| panic!("{name}: {n}: no gradient"));
                    (n.clone(), g.to_dtype(DType::F32).unwrap())
                })
                .collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            out
        };
        let (fused, composed) = (grads(DType::F32), grads(DType::F64));
        assert_eq!(fused.len(), composed.len());
        for ((tensor, got), (_, want)) in fused.iter().zip(&composed) {
            let scale = max_abs(want);
            let diff = max_abs_diff(got, want);
            assert!(
                diff <= 1e-4 * scale.max(1e-6),
                "{name}: {tensor}: differs by {diff} (scale {scale})"
            );
        }
    }
}

/// Gradients of every Var of `varmap` for `loss`, by name, through the
/// entry point that collects recomputed layers' gradients.
pub fn named_gradients(varmap: &VarMap, loss: &Tensor) -> Vec<(String, Vec<f32>)> {
    let data = varmap.data().lock().unwrap();
    let mut named: Vec<(&String, &candle_core::Var)> = data.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    let vars: Vec<&Tensor> = named.iter().map(|(_, v)| v.as_tensor()).collect();
    let grads = candle_rlhf::kernels::gradients(loss, &vars).unwrap();
    named
        .iter()
        .zip(grads)
        .map(|((n, _), g)| {
            let g = g.unwrap_or_else(|| panic!("{n}: no gradient"));
            ((*n).clone(), g.flatten_all().unwrap().to_vec1().unwrap())
        })
        .collect()
}

#[test]
fn activation_checkpointing_gives_the_same_gradients_bit_for_bit() {
    use candle_rlhf::models::Linears;
    let rows = vec![vec![5u32, 17, 42, 9, 100, 7], vec![33u32, 2, 64, 11]];
    for name in CAUSAL.iter().chain(ENCODERS) {
        let run = |on: bool| {
            let (mut model, varmap, _) = load(name, DType::F32);
            model.set_activation_checkpointing(on);
            let (out, _) = outputs(&model, &rows);
            let probe = out.ones_like().unwrap().cumsum(2).unwrap().sin().unwrap();
            let loss = (out * probe).unwrap().sum_all().unwrap();
            // What the graph holds: with checkpointing, each layer is one node.
            let nodes = loss.sorted_nodes().len();
            (named_gradients(&varmap, &loss), nodes)
        };
        let ((plain, plain_nodes), (recomputed, nodes)) = (run(false), run(true));
        assert!(
            nodes * 2 < plain_nodes,
            "{name}: {nodes} graph nodes with checkpointing, {plain_nodes} without"
        );
        assert_eq!(plain.len(), recomputed.len());
        for ((tensor, a), (_, b)) in plain.iter().zip(&recomputed) {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(a) == bits(b), "{name}: {tensor} differs");
        }
    }
}

#[test]
fn the_chunked_head_gives_the_composed_heads_loss_and_gradients() {
    // SFT's loss through CausalLm::token_figures (head and log-probs fused
    // in row chunks) against lm_logits then log_softmax, every weight's
    // gradient: tied heads (gpt2, qwen2, qwen3) and untied ones.
    let rows = vec![vec![5u32, 17, 42, 9, 100, 7], vec![33u32, 2, 64, 11, 8, 1]];
    let ids = Tensor::new(rows.clone(), &crate::dev()).unwrap();
    let mask = vec![vec![1u8; 5]; 2];
    let mut kinds = [0, 0];
    for name in CAUSAL {
        let (model, varmap, _) = load(name, DType::F32);
        let Backbone::Causal(lm) = &model else {
            unreachable!()
        };
        let hidden = model.forward(&ids.narrow(1, 0, 5).unwrap(), &mask).unwrap();
        let h = hidden.reshape((10, ())).unwrap();
        let labels = ids.narrow(1, 1, 5).unwrap().flatten_all().unwrap();
        let fused = lm.token_figures(&h, &labels, 1.0, false).unwrap();
        let logits = lm.lm_logits(&hidden).unwrap().reshape((10, ())).unwrap();
        let plain = candle_rlhf::rl::token_figures(&logits, &labels, 1.0, false).unwrap();
        let loss = |f: &candle_rlhf::rl::TokenFigures| {
            (f.logps.sum_all().unwrap() + (&f.entropy * 0.3).unwrap().sum_all().unwrap()).unwrap()
        };
        let (a, b) = (loss(&fused), loss(&plain));
        let (a_v, b_v) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
        assert!(
            (a_v - b_v).abs() <= 1e-5 * b_v.abs(),
            "{name}: {a_v} vs {b_v}"
        );
        let untied = ["lm_head.weight", "embed_out.weight"]
            .iter()
            .any(|n| varmap.data().lock().unwrap().contains_key(*n));
        kinds[usize::from(untied)] += 1;
        for ((tensor, ga), (_, gb)) in named_gradients(&varmap, &a)
            .iter()
            .zip(&named_gradients(&varmap, &b))
        {
            let scale = gb.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = ga
                .iter()
                .zip(gb)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 1e-5 * scale.max(1e-12),
                "{name}: {tensor}: differs by {diff} (scale {scale})"
            );
        }
    }
    assert!(
        kinds[0] > 0 && kinds[1] > 0,
        "tied and untied heads: {kinds:?}"
    );
}
