//! Tokenizer files read as transformers reads them: padding and truncation
//! sections ignored, special tokens as strings or AddedToken objects, the
//! stop tokens of generation_config.json, and token ids equal to
//! `AutoTokenizer.from_pretrained(dir)(text)["input_ids"]`.

use std::path::{Path, PathBuf};

use candle_rlhf::data::encode_with_eos;
use candle_rlhf::tokenizer::Tokenizer;
use serde_json::{json, Value};

use crate::models::model_dir;

/// A copy of a fixture model's tokenizer files (and config.json) to edit.
fn copy_tokenizer(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    for f in ["tokenizer.json", "tokenizer_config.json", "config.json"] {
        let from = model_dir(name).join(f);
        if from.is_file() {
            std::fs::copy(&from, dir.join(f)).unwrap();
        }
    }
    (tmp, dir)
}

fn write(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn the_padding_and_truncation_of_tokenizer_json_are_ignored() {
    // tiny-bert's tokenizer.json pads to 128 and truncates at 128, as
    // all-MiniLM-L6-v2's does; applied, every text would be 128 ids long.
    let dir = model_dir("tiny-bert");
    let raw = read(&dir.join("tokenizer.json"));
    assert_eq!(
        raw["padding"]["strategy"]["Fixed"],
        json!(128),
        "the fixture pads"
    );
    assert_eq!(
        raw["truncation"]["max_length"],
        json!(128),
        "the fixture truncates"
    );
    let plain = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let text = "the movie was great.";
    assert_eq!(plain.encode(text, true).unwrap().get_ids().len(), 128);

    let ours = Tokenizer::from_dir(&dir).unwrap();
    let ids = ours.encode(text).unwrap();
    // The same vocabulary without the sections (tiny-distilbert) gives the same ids.
    let unpadded = Tokenizer::from_dir(&model_dir("tiny-distilbert")).unwrap();
    assert_eq!(ids, unpadded.encode(text).unwrap());
    assert!(ids.len() < 12, "{ids:?}");
    // Nor is a long text cut at 128.
    let long = "the movie was great. ".repeat(60);
    assert!(ours.encode(&long).unwrap().len() > 128);
}

#[test]
fn special_tokens_given_as_added_token_objects_are_read() {
    let (_tmp, dir) = copy_tokenizer("tiny-gpt2");
    let mut cfg = read(&dir.join("tokenizer_config.json"));
    let added = |content: &str| {
        json!({"__type": "AddedToken", "content": content, "lstrip": false, "normalized": false,
               "rstrip": false, "single_word": false, "special": true})
    };
    cfg["eos_token"] = added("<|endoftext|>");
    cfg["pad_token"] = added("<pad>");
    write(&dir.join("tokenizer_config.json"), &cfg);
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let plain = Tokenizer::from_dir(&model_dir("tiny-gpt2")).unwrap();
    assert_eq!(tok.inner.id_to_token(tok.eos_id).unwrap(), "<|endoftext|>");
    assert_eq!(tok.inner.id_to_token(tok.pad_id).unwrap(), "<pad>");
    assert_eq!((tok.eos_id, tok.pad_id), (plain.eos_id, plain.pad_id));
}

#[test]
fn stop_tokens_are_the_generation_configs_eos_ids_and_the_tokenizers_eos() {
    let (_tmp, dir) = copy_tokenizer("tiny-llama");
    let eos = Tokenizer::from_dir(&dir).unwrap().eos_id;
    // Without generation_config.json: config.json's eos_token_id, then EOS.
    assert_eq!(Tokenizer::from_dir(&dir).unwrap().stop_ids, vec![eos]);
    // Llama-3.x-Instruct lists several.
    write(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": 1, "eos_token_id": [7, eos, 9], "do_sample": true}),
    );
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.stop_ids, vec![7, eos, 9], "in order, EOS not repeated");
    assert!(tok.is_stop(9) && !tok.is_stop(8));
    // A single int, EOS added after it.
    write(
        &dir.join("generation_config.json"),
        &json!({"eos_token_id": 5}),
    );
    assert_eq!(Tokenizer::from_dir(&dir).unwrap().stop_ids, vec![5, eos]);
    // No generation config, config.json with a list.
    std::fs::remove_file(dir.join("generation_config.json")).unwrap();
    let mut cfg = read(&dir.join("config.json"));
    cfg["eos_token_id"] = json!([11, 12]);
    write(&dir.join("config.json"), &cfg);
    assert_eq!(
        Tokenizer::from_dir(&dir).unwrap().stop_ids,
        vec![11, 12, eos]
    );

    // A text that ends with a stop token gets no EOS appended; others do.
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let body = tok.encode("the movie was").unwrap();
    let last = *body.last().unwrap();
    assert_eq!(
        encode_with_eos(&tok, "", "the movie was").unwrap(),
        [body.clone(), vec![eos]].concat()
    );
    write(
        &dir.join("generation_config.json"),
        &json!({"eos_token_id": [last]}),
    );
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(encode_with_eos(&tok, "", "the movie was").unwrap(), body);
}

#[test]
fn a_bom_is_not_data_and_an_empty_file_is_named() {
    use candle_rlhf::data::read_records;
    let tmp = tempfile::tempdir().unwrap();
    let row = "{\"chosen\": \"a\", \"rejected\": \"b\"}";
    let jsonl = tmp.path().join("bom.jsonl");
    std::fs::write(&jsonl, format!("\u{feff}{row}\n{row}\n")).unwrap();
    assert_eq!(read_records(&jsonl).unwrap().len(), 2);
    let json = tmp.path().join("bom.json");
    std::fs::write(&json, format!("\u{feff}[{row}]")).unwrap();
    assert_eq!(read_records(&json).unwrap().len(), 1);
    for (name, text) in [
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n\n"),
        ("empty.json", "[]"),
    ] {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        let err = read_records(&path).unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("no rows"),
            "{name}: {err}"
        );
    }
}

#[test]
fn token_ids_equal_transformers_for_every_fixture_and_minilm() {
    // tests/golden_tokenizer/NAME.json: AutoTokenizer.from_pretrained(dir)(text)
    // ["input_ids"] for each text, made by scripts/make_golden_tokenizers.py.
    use sha2::{Digest, Sha256};
    let golden_dir = crate::repo().join("tests/golden_tokenizer");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&golden_dir).unwrap() {
        let golden = read(&entry.unwrap().path());
        let name = golden["tokenizer"].as_str().unwrap();
        let dir = match name {
            "all-MiniLM-L6-v2" => crate::repo().join("tests/data/all-MiniLM-L6-v2"),
            fixture => model_dir(fixture),
        };
        let bytes = std::fs::read(dir.join("tokenizer.json")).unwrap();
        let sha: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            sha, golden["tokenizer_json_sha256"],
            "{name}: the tokenizer changed since the golden ids were made (make golden)"
        );
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let cases = golden["cases"].as_array().unwrap();
        assert!(cases.len() >= 10);
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let want: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
            assert_eq!(tok.encode(text).unwrap(), want, "{name}: {text:?}");
        }
        seen.push(name.to_string());
    }
    seen.sort();
    assert!(seen.contains(&"all-MiniLM-L6-v2".to_string()), "{seen:?}");
    assert_eq!(seen.len(), 9, "8 fixtures and MiniLM: {seen:?}");
}

#[test]
fn minilm_tokenizer_pads_nothing_and_names_its_special_tokens() {
    let tok = Tokenizer::from_dir(&crate::repo().join("tests/data/all-MiniLM-L6-v2")).unwrap();
    let ids = tok.encode("The movie was great!").unwrap();
    let names: Vec<String> = ids
        .iter()
        .map(|&i| tok.inner.id_to_token(i).unwrap())
        .collect();
    assert_eq!(
        names,
        ["[CLS]", "the", "movie", "was", "great", "!", "[SEP]"]
    );
    assert_eq!(tok.inner.id_to_token(tok.pad_id).unwrap(), "[PAD]");
    assert_eq!(tok.inner.id_to_token(tok.eos_id).unwrap(), "[SEP]");
}
