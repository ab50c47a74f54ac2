//! Fixtures the project makes itself, deterministically from a seed: the hub
//! cannot be reached from CI or the development machines, so tests and the
//! first-run demo never download.
//!
//! - a synthetic corpus of short movie-review sentences;
//! - a byte-level BPE tokenizer trained on it (EOS `<|endoftext|>`, pad `<pad>`);
//! - a tiny random GPT-2 in Hugging Face layout (2 layers, hidden 64), with
//!   randomized norm weights and biases so a loader that ignores them fails.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

use crate::checkpoint::{atomic_write, save_safetensors};
use crate::models::gpt2::{Gpt2, Gpt2Config};
use crate::{Error, HostRng, IoContext, Result};

pub const EOS_TOKEN: &str = "<|endoftext|>";
pub const PAD_TOKEN: &str = "<pad>";
/// Where `candle-rlhf fixtures` writes the tiny GPT-2 inside its output directory.
pub const TINY_GPT2: &str = "models/tiny-gpt2";

const SUBJECTS: &[&str] = &[
    "the movie",
    "this film",
    "the plot",
    "the acting",
    "the story",
    "the cast",
    "the ending",
    "the music",
    "the script",
    "the director",
];
const VERBS: &[&str] = &["was", "felt", "seemed", "is", "looked"];
const ADVERBS: &[&str] = &["really", "very", "quite", "truly", "so", "rather"];
const POSITIVE: &[&str] = &[
    "great",
    "wonderful",
    "brilliant",
    "moving",
    "funny",
    "beautiful",
    "excellent",
    "charming",
    "delightful",
    "superb",
];
const NEGATIVE: &[&str] = &[
    "boring", "awful", "dull", "terrible", "weak", "messy", "bland", "painful", "silly", "tedious",
];
const OPENERS: &[&str] = &[
    "i think",
    "honestly",
    "overall",
    "in the end",
    "to be fair",
    "i felt that",
];

/// `n` short movie-review sentences, the same for the same seed.
pub fn synthetic_corpus(seed: u64, n: usize) -> Vec<String> {
    let mut rng = HostRng::stream(seed, "corpus");
    let mut pick = |words: &[&'static str]| words[rng.below(words.len())];
    (0..n)
        .map(|i| {
            let adj = if i % 2 == 0 {
                pick(POSITIVE)
            } else {
                pick(NEGATIVE)
            };
            match i % 3 {
                0 => format!(
                    "{} {} {} {}.",
                    pick(SUBJECTS),
                    pick(VERBS),
                    pick(ADVERBS),
                    adj
                ),
                1 => format!(
                    "{} {} {} {}.",
                    pick(OPENERS),
                    pick(SUBJECTS),
                    pick(VERBS),
                    adj
                ),
                _ => format!(
                    "{} {} {}, and {} {} {}.",
                    pick(SUBJECTS),
                    pick(VERBS),
                    adj,
                    pick(SUBJECTS),
                    pick(VERBS),
                    pick(POSITIVE)
                ),
            }
        })
        .collect()
}

/// Trains a byte-level BPE tokenizer of about `vocab_size` tokens on `corpus`
/// and writes it to `path` (tokenizer.json).
pub fn train_bpe_tokenizer(corpus: &[String], vocab_size: usize, path: &Path) -> Result<()> {
    let tmp_corpus = path.with_extension("corpus.txt");
    std::fs::write(&tmp_corpus, corpus.join("\n")).with_path(&tmp_corpus)?;
    let fail = |e: tokenizers::Error| {
        Error::Msg(format!(
            "{}: tokenizer training failed: {e}",
            path.display()
        ))
    };
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(0)
        .special_tokens(vec![
            AddedToken::from(EOS_TOKEN, true),
            AddedToken::from(PAD_TOKEN, true),
        ])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    // GPT-2's byte-level setup: no prefix space, offsets trimmed.
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_post_processor(Some(ByteLevel::new(false, true, true).into()))
    .with_decoder(Some(ByteLevel::new(false, true, true).into()))
    .build()
    .map_err(fail)?;
    let corpus_file = tmp_corpus.to_string_lossy().into_owned();
    tokenizer
        .train_from_files(&mut trainer, vec![corpus_file])
        .map_err(fail)?;
    tokenizer.save(path, true).map_err(fail)?;
    std::fs::remove_file(&tmp_corpus).with_path(&tmp_corpus)?;
    Ok(())
}

/// Writes a tiny random GPT-2 with its tokenizer into `dir` (Hugging Face layout).
pub fn write_tiny_gpt2(dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_path(dir)?;
    let tok_path = dir.join("tokenizer.json");
    train_bpe_tokenizer(&synthetic_corpus(seed, 2000), 512, &tok_path)?;
    let tok = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| Error::Parse {
        path: tok_path.clone(),
        message: e.to_string(),
    })?;
    let eos = tok
        .token_to_id(EOS_TOKEN)
        .ok_or_else(|| Error::Msg("fixture tokenizer lost its EOS".into()))?;
    let cfg = Gpt2Config {
        vocab_size: tok.get_vocab_size(true),
        n_positions: 128,
        n_embd: 64,
        n_layer: 2,
        n_head: 4,
        n_inner: None,
        layer_norm_epsilon: 1e-5,
        bos_token_id: Some(eos),
        eos_token_id: Some(eos),
        tie_word_embeddings: true,
    };
    let (vb, varmap) = crate::models::weights::random_builder(seed, DType::F32, &Device::Cpu);
    Gpt2::load(vb, &cfg)?;
    save_safetensors(
        &crate::models::weights::named_tensors(&varmap),
        &dir.join("model.safetensors"),
    )?;
    let mut config = serde_json::to_value(&cfg).map_err(|e| Error::Msg(e.to_string()))?;
    let extra = serde_json::json!({
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "activation_function": "gelu_new",
        "n_ctx": cfg.n_positions,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "torch_dtype": "float32",
    });
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    let tokenizer_config = serde_json::json!({
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
        "model_max_length": cfg.n_positions,
        "add_prefix_space": false,
    });
    for (name, value) in [
        ("config.json", config),
        ("tokenizer_config.json", tokenizer_config),
    ] {
        let text = serde_json::to_string_pretty(&value).map_err(|e| Error::Msg(e.to_string()))?;
        atomic_write(&dir.join(name), text.as_bytes())?;
    }
    Ok(())
}

/// Makes every fixture under `out`; returns the model directories written.
pub fn make_all(out: &Path, seed: u64) -> Result<Vec<PathBuf>> {
    let gpt2 = out.join(TINY_GPT2);
    write_tiny_gpt2(&gpt2, seed)?;
    Ok(vec![gpt2])
}
