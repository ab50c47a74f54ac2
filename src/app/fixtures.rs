//! Fixtures the project makes itself, deterministically from a seed: the hub
//! cannot be reached from CI or the development machines, so tests and the
//! first-run demo never download.
//!
//! - a synthetic corpus of short movie-review sentences;
//! - byte-level BPE tokenizers trained on it (EOS `<|endoftext|>`, with a
//!   distinct pad `<pad>`, with no pad at all, or with pad = EOS) and a
//!   WordPiece tokenizer with [CLS]/[SEP]/[PAD] for the encoders;
//! - a tiny random model of every supported architecture in Hugging Face
//!   layout (2 layers, hidden 64), with randomized norm weights and biases so
//!   that a loader ignoring them fails; both config.json shapes represented;
//! - the same models laid out as a Hugging Face hub cache
//!   (`hub/models--candle-rlhf--NAME/{blobs,snapshots/REV,refs/main}`);
//! - a preference dataset repo `candle-rlhf/tiny-preferences` in that cache
//!   (Parquet splits `train` and `test`);
//! - `reward/NAME`: each model with a new seeded reward head, saved as
//!   `candle-rlhf reward` saves a reward model (for golden scores).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

use crate::io::{atomic_write, save_safetensors};
use crate::models::{ArchConfig, Backbone};
use crate::{Error, HostRng, IoContext, Result};

pub const EOS_TOKEN: &str = "<|endoftext|>";
pub const PAD_TOKEN: &str = "<pad>";
/// Where `candle-rlhf fixtures` writes the tiny GPT-2 inside its output directory.
pub const TINY_GPT2: &str = "models/tiny-gpt2";
/// The hub organisation of the fixture models in the fixture hub cache.
pub const HUB_ORG: &str = "candle-rlhf";

// The fixtures' corpus uses the demo task's words (src/app/task.rs).
use crate::app::task::{ADVERBS, NEGATIVE, OPENERS, POSITIVE, SUBJECTS, VERBS};

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

/// How a fixture tokenizer pads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PadStyle {
    /// A `<pad>` token distinct from EOS.
    Distinct,
    /// No pad token at all (GPT-2, Pythia).
    None,
    /// The pad token is EOS (Qwen2.5 base).
    Eos,
}

fn tokenizer_error(path: &Path) -> impl Fn(tokenizers::Error) -> Error + '_ {
    move |e| {
        Error::Msg(format!(
            "{}: tokenizer training failed: {e}",
            path.display()
        ))
    }
}

/// Writes the corpus next to `path` for the trainers, which read files.
fn with_corpus_file<T>(
    corpus: &[String],
    path: &Path,
    f: impl FnOnce(String) -> Result<T>,
) -> Result<T> {
    let tmp = path.with_extension("corpus.txt");
    std::fs::write(&tmp, corpus.join("\n")).with_path(&tmp)?;
    let out = f(tmp.to_string_lossy().into_owned());
    std::fs::remove_file(&tmp).with_path(&tmp)?;
    out
}

/// Where `make_all` writes the synthetic preference pairs.
pub const PREFERENCES: &str = "data/preferences.jsonl";
/// Where `make_all` writes SFT rows of the demo's task (prompt, completion).
pub const SFT_ROWS: &str = "data/sft.jsonl";
/// The sentiment pairs for a pretrained encoder (app::sentiment): training
/// words, and held-out words for evaluation.
pub const SENTIMENT_TRAIN: &str = "data/sentiment-train.jsonl";
/// The synthetic preference pairs as conversations (prompt, chosen and
/// rejected message lists), and as SFT `messages` rows.
pub const CHAT_PREFERENCES: &str = "data/chat-preferences.jsonl";
pub const CHAT_SFT: &str = "data/chat-sft.jsonl";
pub const SENTIMENT_EVAL: &str = "data/sentiment-eval.jsonl";

/// `n` preference pairs with a hidden rule: the same prompt completed with a
/// positive word (chosen) and a negative one (rejected), as JSONL rows with
/// prompt, chosen and rejected.
pub fn synthetic_preferences(seed: u64, n: usize) -> Vec<Value> {
    let mut rng = HostRng::stream(seed, "preferences");
    let mut pick = |words: &[&'static str]| words[rng.below(words.len())];
    (0..n)
        .map(|_| {
            let prompt = format!("{} {} {}", pick(OPENERS), pick(SUBJECTS), pick(VERBS));
            let adverb = pick(ADVERBS);
            json!({
                "prompt": prompt,
                "chosen": format!(" {adverb} {}.", pick(POSITIVE)),
                "rejected": format!(" {adverb} {}.", pick(NEGATIVE)),
            })
        })
        .collect()
}

/// Writes rows as JSONL.
pub fn write_jsonl(path: &Path, rows: &[Value]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_path(parent)?;
    }
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    atomic_write(path, text.as_bytes())
}

/// Trains a byte-level BPE tokenizer of about `vocab_size` tokens on `corpus`
/// and writes it to `path` (tokenizer.json); `<pad>` exists unless `pad` is None.
pub fn train_bpe_tokenizer(
    corpus: &[String],
    vocab_size: usize,
    pad: PadStyle,
    path: &Path,
) -> Result<()> {
    let fail = tokenizer_error(path);
    let mut special = vec![AddedToken::from(EOS_TOKEN, true)];
    if pad == PadStyle::Distinct {
        special.push(AddedToken::from(PAD_TOKEN, true));
    }
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(0)
        .special_tokens(special)
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
    .map_err(&fail)?;
    with_corpus_file(corpus, path, |file| {
        tokenizer
            .train_from_files(&mut trainer, vec![file])
            .map_err(&fail)?;
        Ok(())
    })?;
    tokenizer.save(path, true).map_err(fail)
}

/// Builds a lower-casing WordPiece tokenizer from `corpus` (BERT's pipeline:
/// [CLS] text [SEP]; specials [PAD]=0 [UNK] [CLS] [SEP] [MASK]) and writes it
/// to `path`. Its vocabulary is every character, alone and as a `##`
/// continuation, then the corpus's words by frequency: deterministic, unlike
/// the crate's WordPiece trainer, whose ties follow hash order.
pub fn build_wordpiece_tokenizer(corpus: &[String], vocab_size: usize, path: &Path) -> Result<()> {
    let fail = tokenizer_error(path);
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    let normalizer = BertNormalizer::new(true, true, None, true);
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    let mut chars: std::collections::BTreeSet<char> = Default::default();
    for line in corpus {
        // BertPreTokenizer: split on whitespace and punctuation.
        for word in line
            .to_lowercase()
            .split(|c: char| c.is_whitespace() || c.is_ascii_punctuation())
            .filter(|w| !w.is_empty())
        {
            *counts.entry(word.to_string()).or_default() += 1;
        }
        chars.extend(line.to_lowercase().chars().filter(|c| !c.is_whitespace()));
    }
    let mut words: Vec<(String, usize)> = counts.into_iter().collect();
    words.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut tokens: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
    tokens.extend(chars.iter().map(|c| c.to_string()));
    tokens.extend(chars.iter().map(|c| format!("##{c}")));
    for (w, _) in words {
        if tokens.len() >= vocab_size {
            break;
        }
        if !tokens.contains(&w) {
            tokens.push(w);
        }
    }
    // vocab.txt, one token per line, id = line number (BERT's format).
    let vocab_file = path.with_extension("vocab.txt");
    std::fs::write(&vocab_file, tokens.join("\n")).with_path(&vocab_file)?;
    let model = WordPiece::from_file(&vocab_file.to_string_lossy())
        .unk_token("[UNK]".into())
        .continuing_subword_prefix("##".into())
        .build()
        .map_err(&fail);
    std::fs::remove_file(&vocab_file).with_path(&vocab_file)?;
    let model = model?;
    let mut tokenizer = TokenizerBuilder::<
        WordPiece,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(model)
    .with_normalizer(Some(normalizer.into()))
    .with_pre_tokenizer(Some(BertPreTokenizer.into()))
    .with_decoder(Some(
        tokenizers::decoders::wordpiece::WordPiece::default().into(),
    ))
    .build()
    .map_err(&fail)?;
    tokenizer.add_special_tokens(
        &specials
            .iter()
            .map(|t| AddedToken::from(*t, true))
            .collect::<Vec<_>>(),
    );
    let template = TemplateProcessing::builder()
        .try_single("[CLS] $A [SEP]")
        .and_then(|b| b.try_pair("[CLS] $A [SEP] $B:1 [SEP]:1"))
        .map_err(|e| Error::Msg(format!("template: {e}")))?
        .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)])
        .build()
        .map_err(|e| Error::Msg(format!("template: {e}")))?;
    tokenizer.with_post_processor(Some(PostProcessorWrapper::from(template)));
    tokenizer.save(path, true).map_err(fail)
}

/// Copies the tokenizer at `from` to `to` with the padding and truncation
/// sections all-MiniLM-L6-v2's tokenizer.json has: every encode padded to
/// 128 tokens and cut at 128, if a loader applied them.
fn write_padded_copy(from: &Path, to: &Path) -> Result<()> {
    use tokenizers::{PaddingParams, PaddingStrategy, TruncationParams};
    let fail = tokenizer_error(to);
    let mut tok = tokenizers::Tokenizer::from_file(from).map_err(&fail)?;
    let pad_id = tok.token_to_id("[PAD]").unwrap_or(0);
    tok.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(128),
        pad_id,
        pad_token: "[PAD]".into(),
        ..Default::default()
    }));
    tok.with_truncation(Some(TruncationParams {
        max_length: 128,
        ..Default::default()
    }))
    .map_err(&fail)?;
    tok.save(to, true).map_err(fail)
}

/// The instruct fixture's turn markers.
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
/// The instruct fixture's chat template: ChatML, assistant turns marked with
/// generation blocks (as templates made for `assistant_only_loss` are).
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Copies the BPE tokenizer at `from` to `to` with ChatML's turn markers
/// added as special tokens.
fn write_chat_copy(from: &Path, to: &Path) -> Result<()> {
    let fail = tokenizer_error(to);
    let mut tok = tokenizers::Tokenizer::from_file(from).map_err(&fail)?;
    tok.add_special_tokens(&[
        tokenizers::AddedToken::from(IM_START, true),
        tokenizers::AddedToken::from(IM_END, true),
    ]);
    tok.save(to, true).map_err(fail)
}

/// One fixture model: its directory name, tokenizer and config.json.
struct Spec {
    name: &'static str,
    tokenizer: TokenizerKind,
    config: Value,
    /// Save without the backbone prefix, as the hub's base checkpoints are.
    strip_prefix: bool,
}

#[derive(Clone, Copy)]
enum TokenizerKind {
    Bpe(PadStyle),
    WordPiece,
    /// The BPE tokenizer with ChatML's `<|im_start|>` and `<|im_end|>` as
    /// special tokens, a chat template and `<|im_end|>` as EOS: an
    /// instruct model's tokenizer (Qwen2.5-Instruct's layout).
    BpeChat,
    /// The WordPiece tokenizer with the `padding` (Fixed 128) and
    /// `truncation` (128) sections that sentence-transformers' tokenizer.json
    /// files carry, which a loader must ignore as transformers does.
    WordPiecePadded,
}

/// The fixture models: every architecture, both config.json shapes.
fn specs(vocab: usize, wp_vocab: usize, eos: u32) -> Vec<Spec> {
    let llama_common = |model_type: &str| {
        json!({
            "model_type": model_type, "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "bos_token_id": eos, "eos_token_id": eos, "attention_dropout": 0.0,
        })
    };
    let extend = |mut base: Value, extra: Value| {
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        base
    };
    vec![
        // The hub's gpt2 layout: no `transformer.` prefix, transformers 4.x config.
        Spec {
            name: "tiny-gpt2",
            tokenizer: TokenizerKind::Bpe(PadStyle::Distinct),
            strip_prefix: true,
            config: json!({
                "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab,
                "n_positions": 128, "n_ctx": 128, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": null,
                "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "bos_token_id": eos, "eos_token_id": eos, "tie_word_embeddings": true, "torch_dtype": "float32",
            }),
        },
        // Llama 3 style: 4.x shape, llama3 rope scaling, GQA, untied head.
        Spec {
            name: "tiny-llama",
            tokenizer: TokenizerKind::Bpe(PadStyle::Distinct),
            strip_prefix: false,
            config: extend(
                llama_common("llama"),
                json!({
                    "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": false,
                    "rope_theta": 500000.0, "attention_bias": false, "mlp_bias": false,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                    "torch_dtype": "float32",
                }),
            ),
        },
        // Mistral: an explicit head_dim unlike hidden_size / heads.
        Spec {
            name: "tiny-mistral",
            tokenizer: TokenizerKind::Bpe(PadStyle::Distinct),
            strip_prefix: false,
            config: extend(
                llama_common("mistral"),
                json!({
                    "architectures": ["MistralForCausalLM"], "head_dim": 32, "tie_word_embeddings": false,
                    "rope_theta": 1000000.0, "sliding_window": 4096, "torch_dtype": "float32",
                }),
            ),
        },
        // Qwen2.5 style: transformers 5 shape, q/k/v biases, tied, pad = EOS.
        Spec {
            name: "tiny-qwen2",
            tokenizer: TokenizerKind::Bpe(PadStyle::Eos),
            strip_prefix: false,
            config: extend(
                llama_common("qwen2"),
                json!({
                    "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": true,
                    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
                    "use_sliding_window": false, "sliding_window": null, "max_window_layers": 2,
                    "dtype": "float32",
                }),
            ),
        },
        // Qwen3 as the hub ships it (transformers 4.5x shape): per-head q/k
        // RMSNorm, an explicit head_dim (32) that is not hidden / heads (16),
        // no q/k/v biases, tied, pad = EOS.
        Spec {
            name: "tiny-qwen3",
            tokenizer: TokenizerKind::Bpe(PadStyle::Eos),
            strip_prefix: false,
            config: extend(
                llama_common("qwen3"),
                json!({
                    "architectures": ["Qwen3ForCausalLM"], "head_dim": 32, "attention_bias": false,
                    "tie_word_embeddings": true, "rope_theta": 1000000.0, "rope_scaling": null,
                    "use_sliding_window": false, "sliding_window": null, "max_window_layers": 2,
                    "torch_dtype": "float32",
                }),
            ),
        },
        // An instruct model (Qwen2.5-Instruct's layout): ChatML turn markers as
        // special tokens, a chat template, <|im_end|> as EOS and in
        // generation_config.json's eos_token_id beside <|endoftext|>.
        Spec {
            name: "tiny-chat",
            tokenizer: TokenizerKind::BpeChat,
            strip_prefix: false,
            config: extend(
                llama_common("qwen2"),
                json!({
                    "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": true,
                    "rope_theta": 1000000.0, "use_sliding_window": false, "sliding_window": null,
                    "max_window_layers": 2, "torch_dtype": "float32",
                }),
            ),
        },
        // Pythia: no pad token, rotary on a quarter of each head, parallel residual.
        Spec {
            name: "tiny-pythia",
            tokenizer: TokenizerKind::Bpe(PadStyle::None),
            strip_prefix: false,
            config: json!({
                "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "vocab_size": vocab,
                "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                "max_position_embeddings": 128, "rotary_pct": 0.25, "rotary_emb_base": 10000,
                "use_parallel_residual": true, "layer_norm_eps": 1e-5, "hidden_act": "gelu",
                "tie_word_embeddings": false, "attention_dropout": 0.0, "hidden_dropout": 0.0,
                "bos_token_id": eos, "eos_token_id": eos, "torch_dtype": "float32",
            }),
        },
        Spec {
            name: "tiny-bert",
            tokenizer: TokenizerKind::WordPiecePadded,
            strip_prefix: true,
            config: json!({
                "model_type": "bert", "architectures": ["BertModel"], "vocab_size": wp_vocab,
                "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                "max_position_embeddings": 128, "type_vocab_size": 2, "initializer_range": 0.02,
                "layer_norm_eps": 1e-12, "pad_token_id": 0, "position_embedding_type": "absolute",
                "classifier_dropout": null, "torch_dtype": "float32",
            }),
        },
        Spec {
            name: "tiny-distilbert",
            tokenizer: TokenizerKind::WordPiece,
            strip_prefix: false,
            config: json!({
                "model_type": "distilbert", "architectures": ["DistilBertModel"], "vocab_size": wp_vocab,
                "dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128, "activation": "gelu",
                "max_position_embeddings": 128, "dropout": 0.0, "attention_dropout": 0.0,
                "initializer_range": 0.02, "pad_token_id": 0, "sinusoidal_pos_embds": false,
                "dtype": "float32",
            }),
        },
    ]
}

/// The names of the fixture models, each under `models/` and in the hub cache.
pub const MODEL_NAMES: &[&str] = &[
    "tiny-gpt2",
    "tiny-llama",
    "tiny-mistral",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-chat",
    "tiny-pythia",
    "tiny-bert",
    "tiny-distilbert",
];

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Msg(e.to_string()))?;
    atomic_write(path, text.as_bytes())
}

/// The tokenizer files of each kind, trained once under `dir/tokenizers/`.
struct Tokenizers {
    dir: PathBuf,
}

impl Tokenizers {
    fn train(dir: &Path, seed: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).with_path(dir)?;
        let corpus = synthetic_corpus(seed, 2000);
        train_bpe_tokenizer(&corpus, 512, PadStyle::Distinct, &dir.join("bpe.json"))?;
        train_bpe_tokenizer(&corpus, 512, PadStyle::None, &dir.join("bpe-nopad.json"))?;
        build_wordpiece_tokenizer(&corpus, 400, &dir.join("wordpiece.json"))?;
        write_padded_copy(
            &dir.join("wordpiece.json"),
            &dir.join("wordpiece-padded.json"),
        )?;
        write_chat_copy(&dir.join("bpe.json"), &dir.join("bpe-chat.json"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn file(&self, kind: TokenizerKind) -> PathBuf {
        self.dir.join(match kind {
            TokenizerKind::Bpe(PadStyle::None) => "bpe-nopad.json",
            TokenizerKind::Bpe(_) => "bpe.json",
            TokenizerKind::WordPiece => "wordpiece.json",
            TokenizerKind::WordPiecePadded => "wordpiece-padded.json",
            TokenizerKind::BpeChat => "bpe-chat.json",
        })
    }

    fn vocab_and_eos(&self, kind: TokenizerKind) -> Result<(usize, u32)> {
        let path = self.file(kind);
        let tok = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let eos = tok
            .token_to_id(EOS_TOKEN)
            .or(tok.token_to_id("[SEP]"))
            .unwrap_or(0);
        Ok((tok.get_vocab_size(true), eos))
    }

    /// tokenizer_config.json for `kind`.
    fn config(kind: TokenizerKind) -> Value {
        match kind {
            TokenizerKind::Bpe(pad) => {
                let mut c = json!({
                    "tokenizer_class": "GPT2Tokenizer", "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN,
                    "unk_token": EOS_TOKEN, "model_max_length": 128, "add_prefix_space": false,
                });
                match pad {
                    PadStyle::Distinct => c["pad_token"] = json!(PAD_TOKEN),
                    PadStyle::Eos => c["pad_token"] = json!(EOS_TOKEN),
                    PadStyle::None => {}
                }
                c
            }
            TokenizerKind::BpeChat => json!({
                "tokenizer_class": "GPT2Tokenizer", "bos_token": null, "eos_token": IM_END,
                "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "model_max_length": 128,
                "add_prefix_space": false, "chat_template": CHAT_TEMPLATE,
            }),
            TokenizerKind::WordPiece | TokenizerKind::WordPiecePadded => json!({
                "tokenizer_class": "BertTokenizer", "do_lower_case": true, "cls_token": "[CLS]",
                "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]",
                "model_max_length": 128,
            }),
        }
    }
}

/// Writes one fixture model (weights, config, tokenizer) into `dir`.
fn write_model(dir: &Path, spec: &Spec, tokenizers: &Tokenizers, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_path(dir)?;
    let config_path = dir.join("config.json");
    let cfg = ArchConfig::from_value(&spec.config, &config_path)?;
    let (vb, varmap) =
        crate::models::weights::random_builder(seed, spec.name, DType::F32, &Device::Cpu);
    Backbone::load(vb, &cfg)?;
    let prefix = format!("{}.", cfg.prefix());
    let tensors: Vec<_> = crate::models::weights::named_tensors(&varmap)
        .into_iter()
        .map(|(name, t)| match name.strip_prefix(&prefix) {
            Some(bare) if spec.strip_prefix => (bare.to_string(), t),
            _ => (name, t),
        })
        .collect();
    save_safetensors(&tensors, &dir.join("model.safetensors"))?;
    write_json(&config_path, &spec.config)?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &Tokenizers::config(spec.tokenizer),
    )?;
    let tok = tokenizers.file(spec.tokenizer);
    std::fs::copy(&tok, dir.join("tokenizer.json")).with_path(&tok)?;
    if let TokenizerKind::BpeChat = spec.tokenizer {
        // An instruct model stops on its end-of-turn token and on the base EOS.
        let t = tokenizers::Tokenizer::from_file(&tok).map_err(tokenizer_error(&tok))?;
        let ids: Vec<u32> = [IM_END, EOS_TOKEN]
            .iter()
            .filter_map(|s| t.token_to_id(s))
            .collect();
        write_json(
            &dir.join("generation_config.json"),
            &json!({"eos_token_id": ids, "pad_token_id": ids[1], "do_sample": true}),
        )?;
    }
    Ok(())
}

/// Writes a model of `config` (config.json's values) with random weights
/// drawn from `seed`, and the fixture BPE tokenizer, into `dir`: for
/// benchmarks, whose speed does not depend on the weights' values. The
/// tokenizer's vocabulary is small; ids above it decode to nothing.
pub fn write_random_model(dir: &Path, config: Value, seed: u64) -> Result<()> {
    let tokenizers = Tokenizers::train(&dir.join(".tokenizers"), seed)?;
    let spec = Spec {
        name: "random",
        tokenizer: TokenizerKind::Bpe(PadStyle::Distinct),
        config,
        strip_prefix: false,
    };
    write_model(dir, &spec, &tokenizers, seed)?;
    std::fs::remove_dir_all(&tokenizers.dir).with_path(&tokenizers.dir)
}

/// Writes the tiny GPT-2 with its tokenizer into `dir` (Hugging Face layout).
pub fn write_tiny_gpt2(dir: &Path, seed: u64) -> Result<()> {
    let tokenizers = Tokenizers::train(&dir.join(".tokenizers"), seed)?;
    let (vocab, eos) = tokenizers.vocab_and_eos(TokenizerKind::Bpe(PadStyle::Distinct))?;
    let spec = specs(vocab, 0, eos).remove(0);
    write_model(dir, &spec, &tokenizers, seed)?;
    std::fs::remove_dir_all(&tokenizers.dir).with_path(&tokenizers.dir)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Lays a model directory out as the Python library caches a hub repo:
/// `cache/models--ORG--NAME/blobs/SHA256`, `snapshots/COMMIT/FILE` (a link to
/// its blob) and `refs/main` holding COMMIT. Returns the commit.
pub fn write_hub_cache_entry(cache: &Path, repo_id: &str, model_dir: &Path) -> Result<String> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(model_dir).with_path(model_dir)? {
        let path = entry.with_path(model_dir)?.path();
        if path.is_file() {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            files.push((name, std::fs::read(&path).with_path(&path)?));
        }
    }
    write_hub_cache_repo(cache, "models", repo_id, files)
}

/// Writes a repo into a hub cache: `kind` is `models` or `datasets`, files
/// are (path in the repo, bytes). Returns the (made-up, deterministic) commit.
pub fn write_hub_cache_repo(
    cache: &Path,
    kind: &str,
    repo_id: &str,
    mut files: Vec<(String, Vec<u8>)>,
) -> Result<String> {
    let repo = cache.join(format!("{kind}--{}", repo_id.replace('/', "--")));
    files.sort();
    let hashes: Vec<String> = files.iter().map(|(_, bytes)| sha256_hex(bytes)).collect();
    // A made-up but deterministic 40-hex commit id.
    let listing: String = files
        .iter()
        .zip(&hashes)
        .map(|((n, _), h)| format!("{n}:{h}\n"))
        .collect();
    let commit = sha256_hex(listing.as_bytes())[..40].to_string();
    let snapshot = repo.join("snapshots").join(&commit);
    for dir in [repo.join("blobs"), snapshot.clone(), repo.join("refs")] {
        std::fs::create_dir_all(&dir).with_path(&dir)?;
    }
    for ((name, bytes), hash) in files.iter().zip(&hashes) {
        let blob = repo.join("blobs").join(hash);
        atomic_write(&blob, bytes)?;
        let link = snapshot.join(name);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).with_path(parent)?;
        }
        let _ = std::fs::remove_file(&link);
        // From snapshots/COMMIT/a/b/FILE up to the repo: one `..` per level.
        let depth = name.matches('/').count() + 2;
        let target = PathBuf::from("../".repeat(depth)).join("blobs").join(hash);
        #[cfg(unix)]
        std::os::unix::fs::symlink(&target, &link).with_path(&link)?;
        #[cfg(not(unix))]
        std::fs::copy(&blob, &link).with_path(&link)?;
    }
    // Written without a trailing newline, as huggingface_hub writes it.
    atomic_write(&repo.join("refs").join("main"), commit.as_bytes())?;
    Ok(commit)
}

/// Writes rows as a snappy-compressed Parquet file of required string
/// columns (as `datasets` writes a text dataset).
pub fn write_parquet(path: &Path, columns: &[&str], rows: &[Value]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_path(parent)?;
    }
    atomic_write(path, &parquet_bytes(columns, rows)?)
}

/// The bytes of [`write_parquet`]'s file.
pub fn parquet_bytes(columns: &[&str], rows: &[Value]) -> Result<Vec<u8>> {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;
    let fields: String = columns
        .iter()
        .map(|c| format!("REQUIRED BYTE_ARRAY {c} (UTF8); "))
        .collect();
    let err = |e: parquet::errors::ParquetError| Error::Msg(format!("writing Parquet: {e}"));
    let schema =
        parquet::schema::parser::parse_message_type(&format!("message schema {{ {fields}}}"))
            .map_err(err)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut bytes = Vec::new();
    let mut writer =
        SerializedFileWriter::new(&mut bytes, Arc::new(schema), Arc::new(props)).map_err(err)?;
    let mut group = writer.next_row_group().map_err(err)?;
    for column in columns {
        let values: Vec<ByteArray> = rows
            .iter()
            .map(|r| ByteArray::from(r[column].as_str().unwrap_or_default()))
            .collect();
        let mut col = group
            .next_column()
            .map_err(err)?
            .ok_or_else(|| Error::Msg(format!("Parquet schema lost column {column}")))?;
        col.typed::<ByteArrayType>()
            .write_batch(&values, None, None)
            .map_err(err)?;
        col.close().map_err(err)?;
    }
    group.close().map_err(err)?;
    writer.close().map_err(err)?;
    Ok(bytes)
}

/// The fixture preference dataset repo in the fixture hub cache (splits
/// `train` and `test` as Parquet, laid out as `datasets` uploads them).
pub const PREFERENCE_DATASET: &str = "candle-rlhf/tiny-preferences";

fn write_preference_dataset(cache: &Path, rows: &[Value]) -> Result<()> {
    let (test, train) = rows.split_at(rows.len() / 6);
    let mut files = vec![(
        "README.md".to_string(),
        b"Synthetic preference pairs: the positive review is chosen.\n".to_vec(),
    )];
    for (split, part) in [("train", train), ("test", test)] {
        files.push((
            format!("data/{split}-00000-of-00001.parquet"),
            parquet_bytes(&["prompt", "chosen", "rejected"], part)?,
        ));
    }
    write_hub_cache_repo(cache, "datasets", PREFERENCE_DATASET, files)?;
    Ok(())
}

/// Saves `model_dir`'s backbone with a new reward head drawn from `seed` in
/// `out`, laid out as the reward trainer lays out its checkpoints.
pub fn write_reward_model(model_dir: &Path, out: &Path, seed: u64) -> Result<()> {
    let (model, varmap) = crate::models::reward_model::RewardModel::from_dir(
        model_dir,
        DType::F32,
        &Device::Cpu,
        seed,
    )?;
    let tok = crate::tokenizer::Tokenizer::from_dir(model_dir)?;
    let base: Value = crate::io::read_json(&model_dir.join("config.json"))?;
    std::fs::create_dir_all(out).with_path(out)?;
    save_safetensors(
        &crate::models::weights::named_tensors(&varmap),
        &out.join("model.safetensors"),
    )?;
    write_json(
        &out.join("config.json"),
        &model.checkpoint_config(&base, tok.pad_id),
    )?;
    for file in crate::checkpoint::tokenizer_files(model_dir) {
        let name = file.file_name().expect("a file");
        std::fs::copy(&file, out.join(name)).with_path(&file)?;
    }
    Ok(())
}

/// Makes every fixture under `out`: tokenizers, `models/NAME` for each of
/// [`MODEL_NAMES`], the hub cache `hub/` and reward models `reward/NAME`.
/// Returns the model directories.
pub fn make_all(out: &Path, seed: u64) -> Result<Vec<PathBuf>> {
    let tokenizers = Tokenizers::train(&out.join("tokenizers"), seed)?;
    let (vocab, eos) = tokenizers.vocab_and_eos(TokenizerKind::Bpe(PadStyle::Distinct))?;
    let (wp_vocab, _) = tokenizers.vocab_and_eos(TokenizerKind::WordPiece)?;
    let (nopad_vocab, nopad_eos) = tokenizers.vocab_and_eos(TokenizerKind::Bpe(PadStyle::None))?;
    let (chat_vocab, _) = tokenizers.vocab_and_eos(TokenizerKind::BpeChat)?;
    let chat_eos = tokenizers::Tokenizer::from_file(tokenizers.file(TokenizerKind::BpeChat))
        .ok()
        .and_then(|t| t.token_to_id(IM_END))
        .unwrap_or(eos);
    let mut dirs = Vec::new();
    for mut spec in specs(vocab, wp_vocab, eos) {
        if matches!(spec.tokenizer, TokenizerKind::Bpe(PadStyle::None)) {
            spec.config["vocab_size"] = json!(nopad_vocab);
            spec.config["bos_token_id"] = json!(nopad_eos);
            spec.config["eos_token_id"] = json!(nopad_eos);
        }
        if matches!(spec.tokenizer, TokenizerKind::BpeChat) {
            spec.config["vocab_size"] = json!(chat_vocab);
            spec.config["eos_token_id"] = json!(chat_eos);
        }
        let dir = out.join("models").join(spec.name);
        write_model(&dir, &spec, &tokenizers, seed)?;
        write_hub_cache_entry(&out.join("hub"), &format!("{HUB_ORG}/{}", spec.name), &dir)?;
        write_reward_model(&dir, &out.join("reward").join(spec.name), seed)?;
        dirs.push(dir);
    }
    let preferences = synthetic_preferences(seed, 600);
    write_jsonl(&out.join(PREFERENCES), &preferences)?;
    write_jsonl(
        &out.join(SFT_ROWS),
        &crate::app::task::Task::new(seed, "sft").sft_rows(1000),
    )?;
    write_preference_dataset(&out.join("hub"), &preferences)?;
    // The same pairs and prompts as conversations, for the instruct fixture.
    let user =
        |text: &Value| json!([{"role": "user", "content": text.as_str().unwrap_or("").trim()}]);
    let assistant = |text: &Value| json!([{"role": "assistant", "content": text.as_str().unwrap_or("").trim()}]);
    let chat_pairs: Vec<Value> = preferences
        .iter()
        .map(|r| json!({"prompt": user(&r["prompt"]), "chosen": assistant(&r["chosen"]), "rejected": assistant(&r["rejected"])}))
        .collect();
    write_jsonl(&out.join(CHAT_PREFERENCES), &chat_pairs)?;
    let chat_sft: Vec<Value> = chat_pairs
        .iter()
        .map(|r| json!({"messages": [r["prompt"][0].clone(), r["chosen"][0].clone()]}))
        .collect();
    write_jsonl(&out.join(CHAT_SFT), &chat_sft)?;
    // The sentiment task of configs/reward-minilm.toml: held-out words in eval.
    use crate::app::sentiment::{sentiment_pairs, Split};
    write_jsonl(
        &out.join(SENTIMENT_TRAIN),
        &sentiment_pairs(seed, 512, Split::Train),
    )?;
    write_jsonl(
        &out.join(SENTIMENT_EVAL),
        &sentiment_pairs(seed, 256, Split::Eval),
    )?;
    Ok(dirs)
}
