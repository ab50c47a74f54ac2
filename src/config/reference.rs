//! docs/config.md: every key of every section with its type, default and
//! doc line, made from the section definitions themselves
//! (`candle-rlhf config --markdown`; a test fails when the committed file
//! differs).

use serde_json::Value;

use super::*;

/// One key as its section declares it (see `section!` in sections.rs).
#[derive(Debug, Clone, Copy)]
pub struct KeySheet {
    pub name: &'static str,
    /// The Rust type, as written.
    pub ty: &'static str,
    /// The attributes, as written: `#[doc = "..."]` lines, `#[serde(alias = "...")]`.
    pub attrs: &'static str,
}

impl KeySheet {
    /// The doc lines joined into one paragraph.
    pub fn doc(&self) -> String {
        let lines = string_args(self.attrs, "doc");
        lines.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ")
    }

    /// Other names serde accepts for the key.
    pub fn aliases(&self) -> Vec<String> {
        string_args(self.attrs, "alias")
    }

    /// The key as a config file spells it (`#[serde(rename = "...")]`, else the field).
    pub fn key(&self) -> String {
        string_args(self.attrs, "rename")
            .into_iter()
            .next()
            .unwrap_or_else(|| self.name.to_string())
    }
}

/// The string literals that follow `prefix` in `attrs` (escapes undone).
fn string_args(attrs: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = attrs;
    while let Some(at) = rest.find(prefix) {
        rest = &rest[at + prefix.len()..];
        // `name = value`, spaced as stringify! spaces it (a line break at times).
        let Some(after) = rest.trim_start().strip_prefix('=') else {
            continue;
        };
        rest = after.trim_start();
        // A raw string (how doc comments come out of stringify!): r"...", r#"..."#.
        if let Some(raw) = rest.strip_prefix('r') {
            let hashes = raw.len() - raw.trim_start_matches('#').len();
            let close = format!("\"{}", "#".repeat(hashes));
            let Some(body) = raw[hashes..].strip_prefix('"') else {
                continue;
            };
            let end = body.find(&close).unwrap_or(body.len());
            out.push(body[..end].to_string());
            rest = &body[end..];
            continue;
        }
        let Some(body) = rest.strip_prefix('"') else {
            continue;
        };
        let mut text = String::new();
        let mut chars = body.char_indices();
        let mut end = body.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, e)) = chars.next() {
                        text.push(match e {
                            'n' => '\n',
                            't' => '\t',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i;
                    break;
                }
                c => text.push(c),
            }
        }
        out.push(text);
        rest = &body[end.min(body.len())..];
    }
    out
}

/// A Rust type as a config reader would name it.
fn type_name(ty: &str) -> String {
    let ty: String = ty.chars().filter(|c| !c.is_whitespace()).collect();
    if let Some(inner) = ty.strip_prefix("Option<").and_then(|t| t.strip_suffix('>')) {
        return format!("{} (optional)", type_name(inner));
    }
    if let Some(inner) = ty.strip_prefix("Vec<").and_then(|t| t.strip_suffix('>')) {
        return format!("list of {}", type_name(inner));
    }
    match ty.as_str() {
        "String" => "string".into(),
        "PathBuf" => "path".into(),
        "bool" => "bool".into(),
        "f32" | "f64" => "float".into(),
        "u32" | "u64" | "usize" | "i32" | "i64" => "integer".into(),
        "DTypeName" => "dtype name".into(),
        other => format!("{other} (a name)"),
    }
}

/// A default value as TOML would spell it (`unset` for none).
fn shown(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "unset".into(),
        Some(Value::String(s)) => format!("{s:?}"),
        Some(other) => {
            let text = other.to_string();
            if text.len() > 60 {
                format!("{}...", &text[..57])
            } else {
                text
            }
        }
    }
}

/// A section of the reference: its table, what it is, its keys and defaults.
struct Section {
    table: &'static str,
    about: &'static str,
    keys: &'static [KeySheet],
    defaults: Value,
}

fn section<T: Serialize + Default>(
    table: &'static str,
    about: &'static str,
    keys: &'static [KeySheet],
) -> Section {
    Section {
        table,
        about,
        keys,
        defaults: serde_json::to_value(T::default()).expect("defaults serialize"),
    }
}

fn sections() -> Vec<Section> {
    vec![
        section::<RunConfig>("[run]", "Seed, device, dtype, threads and run directory.", RunConfig::KEYS),
        section::<ModelConfig>("[model]", "The model to start from.", ModelConfig::KEYS),
        section::<TrainConfig>("[train]", "Optimizer, schedule, batching, logging and checkpointing, shared by every trainer.", TrainConfig::KEYS),
        section::<GenerateConfig>("[generate]", "Sampling settings of `candle-rlhf generate`.", GenerateConfig::KEYS),
        section::<SftConfig>("[sft]", "Supervised fine-tuning (TRL's SFTConfig).", SftConfig::KEYS),
        section::<RewardConfig>("[reward]", "Reward-model training (TRL's RewardConfig).", RewardConfig::KEYS),
        section::<DpoConfig>("[dpo]", "DPO and its loss family (TRL's DPOConfig).", DpoConfig::KEYS),
        section::<PpoConfig>("[ppo]", "PPO and REINFORCE++ (TRL's PPOConfig).", PpoConfig::KEYS),
        section::<GrpoConfig>("[grpo]", "GRPO (TRL's GRPOConfig).", GrpoConfig::KEYS),
        section::<RlooConfig>("[rloo]", "RLOO (TRL's RLOOConfig).", RlooConfig::KEYS),
        section::<RewardFuncConfig>("[[reward_funcs]]", "One table per reward function of ppo, grpo and rloo (their weighted sum is the reward).", RewardFuncConfig::KEYS),
        section::<LoraConfig>("[lora]", "LoRA adapters on the trained model (peft's LoraConfig); no `[lora]` table: full fine-tuning.", LoraConfig::KEYS),
    ]
}

/// docs/config.md.
pub fn markdown() -> String {
    let mut out = String::from(
        "# Config reference\n\n\
         Every key of a candle-rlhf config file, by section, with its type and default. \
         A file lists only what it changes; `--set section.key=value` overrides one key \
         on the command line; an unknown key is refused with the nearest known one. \
         Made by `candle-rlhf config --markdown` from `src/config/sections.rs` \
         (a test fails when this file is older than the code).\n",
    );
    for s in sections() {
        out.push_str(&format!("\n## `{}`\n\n{}\n\n", s.table, s.about));
        out.push_str("| key | type | default | what it is |\n|---|---|---|---|\n");
        for k in s.keys {
            let mut doc = k.doc().replace('|', "\\|");
            let aliases = k.aliases();
            if !aliases.is_empty() {
                doc.push_str(&format!(" Also read as `{}`.", aliases.join("`, `")));
            }
            let key = k.key();
            out.push_str(&format!(
                "| `{}` | {} | `{}` | {} |\n",
                key,
                type_name(k.ty),
                shown(s.defaults.get(&key)).replace('|', "\\|"),
                doc
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheets_read_docs_aliases_types_and_defaults() {
        let k = KeySheet {
            name: "x",
            ty: "Option < Vec < usize > >",
            attrs: r##"#[doc = " A \"quoted\" word,"] #[doc = r#" on "two" lines."#] #[serde(alias = "y")]"##,
        };
        assert_eq!(k.doc(), "A \"quoted\" word, on \"two\" lines.");
        assert_eq!(k.aliases(), vec!["y".to_string()]);
        assert_eq!(type_name(k.ty), "list of integer (optional)");
        assert_eq!(shown(Some(&serde_json::json!("auto"))), "\"auto\"");
        assert_eq!(shown(None), "unset");
        // The real sheet: every key of [train] has a doc line and a default.
        let md = markdown();
        assert!(md.contains("| `learning_rate` | float | `"), "{md}");
        for k in TrainConfig::KEYS {
            assert!(!k.doc().is_empty(), "train.{} has no doc line", k.name);
        }
        assert!(md.contains("Also read as `gradient_checkpointing`"));
        // A renamed field shows the key a file uses, with its default.
        assert!(
            md.contains("| `type` | RewardFuncType (a name) | `\"regex\"` |"),
            "{md}"
        );
    }
}
