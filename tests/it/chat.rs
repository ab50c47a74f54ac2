//! Chat templates rendered as transformers renders them: real templates of
//! several families (tests/data/chat_templates, sources in SOURCE.md)
//! against transformers' renderings (tests/golden_chat, made by
//! scripts/make_golden_chat.py), byte for byte.

use std::collections::BTreeMap;

use candle_rlhf::chat::{ChatTemplate, TODAY_ENV};
use serde_json::Value;

/// The first position where two texts differ, with a little context.
fn first_difference(ours: &str, theirs: &str) -> Option<String> {
    let (a, b): (Vec<char>, Vec<char>) = (ours.chars().collect(), theirs.chars().collect());
    let at = a
        .iter()
        .zip(&b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then_some(a.len().min(b.len())))?;
    let show = |v: &[char]| {
        v[at.saturating_sub(10)..(at + 10).min(v.len())]
            .iter()
            .collect::<String>()
    };
    Some(format!(
        "first difference at character {at}: ours {:?} vs transformers {:?}",
        show(&a),
        show(&b)
    ))
}

#[test]
fn real_templates_render_as_transformers_renders_them() {
    // SAFETY-free in edition 2021; only chat::strftime_now reads it.
    std::env::set_var(TODAY_ENV, "2026-12-03");
    let root = crate::repo().join("tests");
    let specials: BTreeMap<String, BTreeMap<String, String>> = serde_json::from_str(
        &std::fs::read_to_string(root.join("data/chat_templates/special_tokens.json")).unwrap(),
    )
    .unwrap();
    let mut templates = 0;
    let mut rendered = 0;
    let mut refused = 0;
    for entry in std::fs::read_dir(root.join("golden_chat")).unwrap() {
        let golden: Value =
            serde_json::from_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap()).unwrap();
        let name = golden["template"].as_str().unwrap();
        let file = root.join(format!("data/chat_templates/{name}.jinja"));
        let source = std::fs::read_to_string(&file).unwrap();
        let t =
            ChatTemplate::new(source, file.display().to_string(), specials[name].clone()).unwrap();
        for case in golden["cases"].as_array().unwrap() {
            let messages = case["messages"].as_array().unwrap();
            let agp = case["add_generation_prompt"].as_bool().unwrap();
            let ours = t.render(messages, agp);
            match (&case["text"], &case["error"]) {
                (Value::String(want), _) => {
                    let got = ours.unwrap_or_else(|e| panic!("{name}: {e}"));
                    if let Some(diff) = first_difference(&got, want) {
                        panic!("{name} (add_generation_prompt {agp}): {diff}");
                    }
                    rendered += 1;
                }
                (_, Value::String(message)) => {
                    let err = ours
                        .expect_err("transformers refused this conversation")
                        .to_string();
                    assert!(
                        err.contains(message.as_str()) && err.contains(name),
                        "{name}: {err}"
                    );
                    refused += 1;
                }
                _ => panic!("{name}: a case with neither text nor error"),
            }
        }
        templates += 1;
    }
    assert_eq!(
        templates, 7,
        "Llama 3, Mistral, Phi-3, ChatML, Gemma, SmolLM2, DeepSeek-R1"
    );
    assert!(
        rendered >= 50 && refused >= 4,
        "{rendered} rendered, {refused} refused"
    );
}
