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

mod conversational {
    use candle_rlhf::app::fixtures::{self, IM_END};
    use candle_rlhf::chat::{ChatTemplate, TemplateSource};
    use candle_rlhf::config::SftConfig;
    use candle_rlhf::data::prompts::load_prompts;
    use candle_rlhf::data::sft::tokenize_rows;
    use candle_rlhf::data::{read_preferences, read_records, tokenize_pairs};
    use candle_rlhf::hub::HubSettings;
    use candle_rlhf::tokenizer::Tokenizer;

    use crate::models::{fixtures_root, model_dir};

    fn chatml(turns: &[(&str, &str)], generation_prompt: bool) -> String {
        let mut s: String = turns
            .iter()
            .map(|(role, content)| format!("<|im_start|>{role}\n{content}<|im_end|>\n"))
            .collect();
        if generation_prompt {
            s.push_str("<|im_start|>assistant\n");
        }
        s
    }

    #[test]
    fn the_instruct_fixture_has_a_template_stop_tokens_and_special_turn_markers() {
        let dir = model_dir("tiny-chat");
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let im_end = tok.inner.token_to_id(IM_END).unwrap();
        let endoftext = tok.inner.token_to_id(fixtures::EOS_TOKEN).unwrap();
        assert_eq!(tok.eos_id, im_end);
        assert_eq!(
            tok.stop_ids,
            vec![im_end, endoftext],
            "generation_config.json's list"
        );
        // The turn markers are single tokens, not split by the BPE.
        let ids = tok.encode_plain("<|im_start|>user\nhi<|im_end|>").unwrap();
        assert_eq!(ids[0], tok.inner.token_to_id(fixtures::IM_START).unwrap());
        assert_eq!(*ids.last().unwrap(), im_end);
        let t = ChatTemplate::resolve(&dir, None)
            .unwrap()
            .expect("tokenizer_config.json has one");
        assert!(t.has_generation_blocks);
    }

    #[test]
    fn conversational_pairs_are_the_rendered_conversations_without_an_added_eos() {
        let dir = model_dir("tiny-chat");
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let src = TemplateSource::new(&dir, None);
        let rows = read_preferences(&fixtures_root().join(fixtures::CHAT_PREFERENCES)).unwrap();
        let m = rows[0].messages.as_ref().expect("message lists");
        let (p, c) = (
            m.prompt[0]["content"].as_str().unwrap(),
            m.chosen[0]["content"].as_str().unwrap(),
        );
        let (pairs, report) = tokenize_pairs(&rows[..8], &tok, &src, 64, false).unwrap();
        assert_eq!(report.kept, 8);
        let want = tok
            .encode_plain(&chatml(&[("user", p), ("assistant", c)], false))
            .unwrap();
        assert_eq!(
            pairs[0].chosen, want,
            "prompt + response rendered, no special tokens added"
        );
        assert_eq!(
            pairs[0].chosen[0],
            tok.inner.token_to_id(fixtures::IM_START).unwrap(),
            "no BOS added before the template's text"
        );
        // Without a template: one error naming the model and --chat-template.
        let gpt2 = model_dir("tiny-gpt2");
        let err = candle_rlhf::chat::require(&gpt2, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tiny-gpt2") && err.contains("--chat-template"),
            "{err}"
        );
        // A user template wins: here the fixture's own, given to a model without one.
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("chatml.jinja");
        std::fs::write(&file, fixtures::CHAT_TEMPLATE).unwrap();
        let user = ChatTemplate::resolve(&gpt2, Some(&file)).unwrap().unwrap();
        assert_eq!(
            user.render(&m.prompt, true).unwrap(),
            chatml(&[("user", p)], true)
        );
    }

    #[test]
    fn conversational_prompts_end_with_the_generation_prompt() {
        let dir = model_dir("tiny-chat");
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let src = TemplateSource::new(&dir, None);
        let file = fixtures_root().join(fixtures::CHAT_PREFERENCES);
        let (prompts, report) = load_prompts(
            &file.to_string_lossy(),
            "train",
            &tok,
            &src,
            64,
            false,
            &HubSettings::from_vars(|_| None),
        )
        .unwrap();
        assert_eq!(report.kept, 600);
        let rows = read_preferences(&file).unwrap();
        let p = rows[0].messages.as_ref().unwrap().prompt[0]["content"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            prompts[0],
            tok.encode_plain(&chatml(&[("user", &p)], true)).unwrap()
        );
        // A model without a template: the error names it.
        let gpt2 = model_dir("tiny-gpt2");
        let err = load_prompts(
            &file.to_string_lossy(),
            "train",
            &Tokenizer::from_dir(&gpt2).unwrap(),
            &TemplateSource::new(&gpt2, None),
            64,
            false,
            &HubSettings::from_vars(|_| None),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("tiny-gpt2") && err.contains("--chat-template"),
            "{err}"
        );
    }

    #[test]
    fn assistant_only_loss_trains_exactly_the_assistant_turns() {
        let dir = model_dir("tiny-chat");
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let src = TemplateSource::new(&dir, None);
        let records = read_records(&fixtures_root().join(fixtures::CHAT_SFT)).unwrap();
        let cfg = SftConfig {
            assistant_only_loss: true,
            max_length: 128,
            ..Default::default()
        };
        let (rows, _) = tokenize_rows(&records[..4], &tok, &src, &cfg).unwrap();
        for (row, (value, _)) in rows.iter().zip(&records) {
            let content = value["messages"][1]["content"].as_str().unwrap();
            let trained: Vec<u32> = row
                .ids
                .iter()
                .zip(&row.trained)
                .filter(|(_, &t)| t == 1)
                .map(|(&i, _)| i)
                .collect();
            assert_eq!(
                tok.decode(&trained).unwrap(),
                content,
                "the assistant content and <|im_end|>"
            );
            assert_eq!(
                *trained.last().unwrap(),
                tok.eos_id,
                "<|im_end|> is trained"
            );
        }
        // Every token (but the first) by default, TRL's assistant_only_loss = false.
        let (all, _) = tokenize_rows(&records[..1], &tok, &src, &SftConfig::default()).unwrap();
        assert!(all[0].trained[1..].iter().all(|&t| t == 1));
        // A template without generation blocks refuses assistant_only_loss.
        let tmp = tempfile::tempdir().unwrap();
        let plain = tmp.path().join("plain.jinja");
        std::fs::write(
            &plain,
            fixtures::CHAT_TEMPLATE
                .replace("{% generation %}", "")
                .replace("{% endgeneration %}", ""),
        )
        .unwrap();
        let src = TemplateSource::new(&dir, Some(&plain));
        let err = tokenize_rows(&records[..1], &tok, &src, &cfg)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("assistant_only_loss") && err.contains("plain.jinja"),
            "{err}"
        );
    }

    #[test]
    fn the_conversational_configs_train_end_to_end() {
        let root = fixtures_root();
        let quoted = |p: std::path::PathBuf| format!("{:?}", p.to_string_lossy());
        for (cmd, config, sets) in [
            (
                "reward",
                "reward-chat-tiny.toml",
                vec!["train.max_steps=6".to_string()],
            ),
            (
                "sft",
                "sft-chat-tiny.toml",
                vec!["train.max_steps=6".to_string()],
            ),
            (
                "ppo",
                "ppo-chat-tiny.toml",
                vec![
                    "ppo.total_episodes=16".to_string(),
                    format!("ppo.reward_model={}", quoted(root.join("reward/tiny-chat"))),
                ],
            ),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let mut c = std::process::Command::new(crate::bin());
            c.env_remove("RUST_BACKTRACE")
                .arg(cmd)
                .arg("--config")
                .arg(crate::repo().join("configs").join(config))
                .args(["--out", &tmp.path().join("run").to_string_lossy()])
                .args([
                    "--set",
                    &format!("model.name_or_path={}", quoted(model_dir("tiny-chat"))),
                ])
                .args(["--set", &crate::device_setting()]);
            let dataset = match cmd {
                "sft" => root.join(fixtures::CHAT_SFT),
                _ => root.join(fixtures::CHAT_PREFERENCES),
            };
            c.args(["--set", &format!("{cmd}.dataset={}", quoted(dataset))]);
            for s in &sets {
                c.args(["--set", s]);
            }
            let out = c.output().unwrap();
            assert!(
                out.status.success(),
                "{cmd}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(tmp.path().join("run/metrics.jsonl").is_file(), "{cmd}");
        }
    }
}

#[test]
fn render_gives_trls_text_columns_byte_for_byte() {
    // tests/golden_render: TRL 1.12's maybe_extract_prompt then
    // maybe_apply_chat_template (scripts/make_golden_render.py).
    use candle_rlhf::chat::TemplateSource;
    use candle_rlhf::data::{read_records, render::render_row};
    let root = crate::repo().join("tests");
    let minilm = root.join("data/all-MiniLM-L6-v2");
    let tok = candle_rlhf::tokenizer::Tokenizer::from_dir(&minilm).unwrap();
    let records = read_records(&root.join("data/conversational.jsonl")).unwrap();
    let mut checked = 0;
    let mut ids_checked = 0;
    for name in ["chatml", "smollm2"] {
        let golden: Value = serde_json::from_str(
            &std::fs::read_to_string(root.join(format!("golden_render/{name}.json"))).unwrap(),
        )
        .unwrap();
        let file = root.join(format!("data/chat_templates/{name}.jinja"));
        let template = TemplateSource::new(&minilm, Some(&file));
        let want = golden["rows"].as_array().unwrap();
        assert_eq!(want.len(), records.len());
        for ((value, source), want) in records.iter().zip(want) {
            let got =
                render_row(value, source, &template, &tok, true, &Default::default()).unwrap();
            for (key, text) in want.as_object().unwrap() {
                if key.ends_with("_ids") {
                    // The ids TRL's RewardTrainer tokenizes for the same row.
                    assert_eq!(got[key], *text, "{name}, {source}, `{key}`");
                    ids_checked += 1;
                    continue;
                }
                let (ours, theirs) = (
                    got[key].as_str().unwrap_or("(missing)"),
                    text.as_str().unwrap(),
                );
                if let Some(diff) = first_difference(ours, theirs) {
                    panic!("{name}, {source}, `{key}`: {diff}");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 2 * 11, "every text column of both templates");
    assert_eq!(
        ids_checked,
        2 * 4,
        "chosen and rejected ids of both preference rows"
    );
}

#[test]
fn render_cli_writes_one_line_per_row_with_ids() {
    let root = crate::models::fixtures_root();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rendered.jsonl");
    let status = std::process::Command::new(crate::bin())
        .args(["render", "--ids", "--model"])
        .arg(crate::models::model_dir("tiny-chat"))
        .arg("--data")
        .arg(root.join(candle_rlhf::app::fixtures::CHAT_PREFERENCES))
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), 600);
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["kind"], "preference");
    assert!(first["prompt"]
        .as_str()
        .unwrap()
        .ends_with("<|im_start|>assistant\n"));
    assert!(first["chosen_ids"].as_array().unwrap().len() > 5);
}

#[test]
fn a_reward_model_with_a_template_rerenders_conversational_prompts() {
    use candle_rlhf::rewards::RewardModelReward;
    use candle_rlhf::rewards::{Completion, Reward};
    let root = crate::models::fixtures_root();
    let policy = crate::models::model_dir("tiny-chat");
    let rm = RewardModelReward::load(
        &root.join("reward/tiny-chat").to_string_lossy(),
        &policy,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let t = rm
        .template
        .as_ref()
        .expect("the reward model carries the chat template");
    let prompt = vec![serde_json::json!({"role": "user", "content": "overall the movie was"})];
    let tok = &rm.scorer.tokenizer;
    let query = tok.encode_plain(&t.render(&prompt, true).unwrap()).unwrap();
    let response_ids = tok.encode_plain("truly superb.<|im_end|>").unwrap();
    let completion = |messages| Completion {
        prompt: "user\noverall the movie was\nassistant\n",
        response: "truly superb.",
        query_ids: &query,
        response_ids: &response_ids,
        prompt_messages: messages,
        columns: None,
    };
    let rendered = rm.score(&[completion(Some(&prompt))]).unwrap()[0];
    let mut conv = prompt.clone();
    conv.push(serde_json::json!({"role": "assistant", "content": "truly superb."}));
    let want = rm
        .scorer
        .score_ids(&[tok.encode_plain(&t.render(&conv, false).unwrap()).unwrap()])
        .unwrap()[0];
    assert_eq!(
        rendered, want,
        "prompt messages + the response as an assistant turn, rendered"
    );
    // Without messages (a text prompt) the ids pass through as before.
    let through = rm.score(&[completion(None)]).unwrap()[0];
    let mut ids = [query.clone(), response_ids.clone()].concat();
    if !tok.is_stop(*ids.last().unwrap()) {
        ids.push(tok.eos_id);
    }
    assert_eq!(through, rm.scorer.score_ids(&[ids]).unwrap()[0]);
}
