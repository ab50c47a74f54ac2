//! Hugging Face chat templates, rendered as transformers'
//! `apply_chat_template` renders them: Jinja through minijinja with
//! minijinja-contrib's Python-compatible methods (`.strip()`, `.split()`,
//! `.startswith()`, ... as templates call them), `trim_blocks` and
//! `lstrip_blocks` on, and the same variables: `messages`,
//! `add_generation_prompt`, the special tokens as strings, `tools` and
//! `documents` none, `raise_exception(msg)` and `strftime_now(fmt)`.
//!
//! `{% generation %}...{% endgeneration %}` blocks (transformers' extension
//! for `return_assistant_tokens_mask`) are kept as spans of the rendered
//! text: [`ChatTemplate::render_spans`] returns them, and SFT's
//! `assistant_only_loss` trains on the tokens inside.
//!
//! Which template: the user's file (`model.chat_template`, `--chat-template`)
//! wins; else `chat_template.jinja` in the model folder (transformers 5
//! saves it there); else `chat_template` in tokenizer_config.json (a string,
//! or a list of named templates, of which "default" is taken).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use serde_json::Value;

use crate::{Error, IoContext, Result};

/// Marks where a `{% generation %}` block starts and ends in rendered text
/// (Unicode private-use characters, which no template writes).
const GEN_START: char = '\u{E000}';
const GEN_END: char = '\u{E001}';

/// Pins `strftime_now`'s date (YYYY-MM-DD) for tests; read only for that.
pub const TODAY_ENV: &str = "CANDLE_RLHF_TEMPLATE_DATE";

/// A chat template with the special tokens it is rendered with.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    /// The Jinja source as written.
    pub source: String,
    /// Where it came from, for messages (a file, or tokenizer_config.json).
    pub origin: String,
    /// bos_token, eos_token, ... of tokenizer_config.json, as strings.
    pub special_tokens: BTreeMap<String, String>,
    /// Whether it marks assistant turns with `{% generation %}` blocks.
    pub has_generation_blocks: bool,
    /// The compiled template (generation blocks replaced by span markers),
    /// built once: rendering runs per data row and per scored completion.
    env: minijinja::Environment<'static>,
}

/// The special-token names transformers passes to a template.
const SPECIAL_TOKENS: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

fn token_string(v: &Value) -> Option<String> {
    v.as_str()
        .or_else(|| v.get("content").and_then(Value::as_str))
        .map(str::to_string)
}

impl ChatTemplate {
    /// The template of a model directory, `user` (a file) first; None when
    /// neither the user nor the model gives one.
    pub fn resolve(model_dir: &Path, user: Option<&Path>) -> Result<Option<Self>> {
        let tok_cfg: Value = match model_dir.join("tokenizer_config.json") {
            p if p.is_file() => crate::io::read_json(&p)?,
            _ => Value::Null,
        };
        let specials: BTreeMap<String, String> = SPECIAL_TOKENS
            .iter()
            .filter_map(|k| token_string(&tok_cfg[*k]).map(|v| (k.to_string(), v)))
            .collect();
        if let Some(file) = user {
            let source = std::fs::read_to_string(file).with_path(file)?;
            return Self::new(source, file.display().to_string(), specials).map(Some);
        }
        let jinja = model_dir.join("chat_template.jinja");
        if jinja.is_file() {
            let source = std::fs::read_to_string(&jinja).with_path(&jinja)?;
            return Self::new(source, jinja.display().to_string(), specials).map(Some);
        }
        let origin = model_dir
            .join("tokenizer_config.json")
            .display()
            .to_string();
        let source = match &tok_cfg["chat_template"] {
            Value::String(s) => Some(s.clone()),
            Value::Array(named) => {
                let default = named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str());
                match default {
                    Some(s) => Some(s.to_string()),
                    None => {
                        return Err(Error::Msg(format!(
                            "{origin}: chat_template lists named templates but none is named \"default\""
                        )))
                    }
                }
            }
            _ => None,
        };
        source
            .map(|s| Self::new(s, format!("{origin} (chat_template)"), specials))
            .transpose()
    }

    /// A template from its source; the source is checked by compiling it.
    pub fn new(
        source: String,
        origin: String,
        special_tokens: BTreeMap<String, String>,
    ) -> Result<Self> {
        let (prepared, has_generation_blocks) = mark_generation_blocks(&source);
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| template_error(&origin, e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", prepared)
            .map_err(|e| template_error(&origin, e))?;
        Ok(Self {
            source,
            origin,
            special_tokens,
            has_generation_blocks,
            env,
        })
    }

    fn error(&self, e: minijinja::Error) -> Error {
        template_error(&self.origin, e)
    }
}

/// A minijinja error as one line naming the template; `raise_exception`'s
/// message as the template wrote it.
fn template_error(origin: &str, e: minijinja::Error) -> Error {
    if e.kind() == minijinja::ErrorKind::InvalidOperation {
        if let Some(msg) = e.detail().and_then(|d| d.strip_prefix("raise_exception: ")) {
            return Error::Msg(format!("chat template {origin}: {msg}"));
        }
    }
    let line = e.line().map(|l| format!(" (line {l})")).unwrap_or_default();
    Error::Msg(format!("chat template {origin}{line}: {e:#}"))
}

impl ChatTemplate {
    /// The text `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` gives.
    pub fn render(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String> {
        Ok(self.render_spans(messages, add_generation_prompt)?.0)
    }

    /// A prompt as TRL renders one: with the generation prompt after a user
    /// (or tool) turn; after an assistant turn, continuing that message
    /// (transformers' `continue_final_message`: the text is cut after the
    /// final message's content).
    pub fn render_prompt(&self, prompt: &[Value]) -> Result<String> {
        let last = prompt.last().and_then(|m| m["role"].as_str()).unwrap_or("");
        match last {
            "user" | "tool" => self.render(prompt, true),
            "assistant" => {
                let text = self.render(prompt, false)?;
                let content = prompt
                    .last()
                    .and_then(|m| m["content"].as_str())
                    .unwrap_or("");
                let cut = |c: &str| text.rfind(c).map(|at| text[..at + c.len()].to_string());
                cut(content).or_else(|| cut(content.trim())).ok_or_else(|| {
                    Error::Msg(format!(
                        "chat template {}: the final message's content does not appear in the rendered text, so it cannot be continued",
                        self.origin
                    ))
                })
            }
            other => Err(Error::Msg(format!(
                "invalid role in the prompt's last message: `{other}` (user, tool or assistant)"
            ))),
        }
    }

    /// The rendered text and the byte ranges of its `{% generation %}`
    /// blocks (the assistant turns, where the template marks them).
    pub fn render_spans(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<Range<usize>>)> {
        let tmpl = self.env.get_template("chat").map_err(|e| self.error(e))?;
        let mut ctx: BTreeMap<String, minijinja::Value> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), minijinja::Value::from(v.as_str())))
            .collect();
        ctx.insert(
            "messages".into(),
            minijinja::Value::from(minijinja::value::Serde(messages)),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            minijinja::Value::from(add_generation_prompt),
        );
        ctx.insert("tools".into(), minijinja::Value::from(()));
        ctx.insert("documents".into(), minijinja::Value::from(()));
        let raw = tmpl.render(ctx).map_err(|e| self.error(e))?;
        Ok(take_spans(&raw))
    }
}

/// `raise_exception(msg)`: the template refuses its input.
fn raise_exception(msg: String) -> std::result::Result<minijinja::Value, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        format!("raise_exception: {msg}"),
    ))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
];

/// `strftime_now(format)`: today's date (UTC; [`TODAY_ENV`] pins it) in
/// Python's strftime codes %d %m %Y %y %b %B %a %A %j %%; the time of day
/// is midnight.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let (y, m, d) = match std::env::var(TODAY_ENV) {
        Ok(s) => parse_date(&s).ok_or_else(|| {
            minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                format!("{TODAY_ENV}={s}: expected YYYY-MM-DD"),
            )
        })?,
        Err(_) => crate::clock::today_utc(),
    };
    Ok(strftime(&format, (y, m, d)))
}

fn parse_date(s: &str) -> Option<(i64, u32, u32)> {
    let mut it = s.trim().split('-');
    let y = it.next()?.parse().ok()?;
    let m = it.next()?.parse().ok()?;
    let d = it.next()?.parse().ok()?;
    (it.next().is_none() && (1..=12).contains(&m) && (1..=31).contains(&d)).then_some((y, m, d))
}

/// Days since 1970-01-01 of a civil date (inverse of `clock::civil_from_days`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn strftime(format: &str, (y, m, d): (i64, u32, u32)) -> String {
    let days = days_from_civil(y, m, d);
    let weekday = WEEKDAYS[days.rem_euclid(7) as usize];
    let month = MONTHS[(m - 1) as usize];
    let day_of_year = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('H') | Some('M') | Some('S') => out.push_str("00"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Replaces `{% generation %}` / `{% endgeneration %}` (any whitespace
/// control) by expressions that print the span markers, keeping what
/// `trim_blocks` and `lstrip_blocks` would have done around the block tags.
fn mark_generation_blocks(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(at) = rest.find("{%") {
        let tag_end = match rest[at..].find("%}") {
            Some(e) => at + e + 2,
            None => break,
        };
        let inner = &rest[at + 2..tag_end - 2];
        let left = inner.starts_with('-') || inner.starts_with('+');
        let right = inner.ends_with('-') || inner.ends_with('+');
        let word = inner.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        let marker = match word {
            "generation" => GEN_START,
            "endgeneration" => GEN_END,
            _ => {
                out.push_str(&rest[..tag_end]);
                rest = &rest[tag_end..];
                continue;
            }
        };
        found = true;
        let mut before = &rest[..at];
        // lstrip_blocks: spaces and tabs from the line start to the tag go.
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        if !inner.starts_with('+')
            && before[line_start..].chars().all(|c| c == ' ' || c == '\t')
            && (line_start > 0 || out.is_empty() || out.ends_with('\n'))
        {
            before = &before[..line_start];
        }
        out.push_str(before);
        let l = if left && inner.starts_with('-') {
            "-"
        } else {
            ""
        };
        let r = if right && inner.ends_with('-') {
            "-"
        } else {
            ""
        };
        out.push_str(&format!("{{{{{l} \"{marker}\" {r}}}}}"));
        rest = &rest[tag_end..];
        // trim_blocks: the first newline after a block tag goes.
        if !inner.ends_with('+') {
            if let Some(stripped) = rest.strip_prefix('\n') {
                rest = stripped;
            } else if let Some(stripped) = rest.strip_prefix("\r\n") {
                rest = stripped;
            }
        }
    }
    out.push_str(rest);
    (out, found)
}

/// The text without the span markers, and the byte ranges they enclosed.
fn take_spans(raw: &str) -> (String, Vec<Range<usize>>) {
    let mut text = String::with_capacity(raw.len());
    let mut spans = Vec::new();
    let mut open = None;
    for c in raw.chars() {
        match c {
            GEN_START => open = Some(text.len()),
            GEN_END => {
                if let Some(start) = open.take() {
                    spans.push(start..text.len());
                }
            }
            c => text.push(c),
        }
    }
    (text, spans)
}

/// Whether a JSON value is a conversation: a list of `{"role", "content"}` objects.
pub fn is_conversation(v: &Value) -> bool {
    v.as_array()
        .is_some_and(|a| !a.is_empty() && a.iter().all(|m| m.get("role").is_some()))
}

/// Where a model's template comes from, resolved on first use: data readers
/// take one and ask for the template only when a row is conversational.
pub struct TemplateSource<'a> {
    model_dir: &'a Path,
    user: Option<&'a Path>,
    resolved: std::sync::OnceLock<ChatTemplate>,
}

impl<'a> TemplateSource<'a> {
    pub fn new(model_dir: &'a Path, user: Option<&'a Path>) -> Self {
        Self {
            model_dir,
            user,
            resolved: std::sync::OnceLock::new(),
        }
    }

    /// The template ([`require`]d: an error naming the model without one).
    pub fn get(&self) -> Result<&ChatTemplate> {
        if let Some(t) = self.resolved.get() {
            return Ok(t);
        }
        let t = require(self.model_dir, self.user)?;
        Ok(self.resolved.get_or_init(|| t))
    }
}

/// The template of a model directory, or the error conversational data gets
/// without one.
pub fn require(model_dir: &Path, user: Option<&Path>) -> Result<ChatTemplate> {
    ChatTemplate::resolve(model_dir, user)?.ok_or_else(|| {
        Error::Msg(format!(
            "{}: the data is conversational but the model has no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json): give one with --chat-template FILE or model.chat_template",
            model_dir.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(src: &str) -> ChatTemplate {
        let specials = BTreeMap::from([
            ("bos_token".to_string(), "<s>".to_string()),
            ("eos_token".to_string(), "</s>".to_string()),
        ]);
        ChatTemplate::new(src.to_string(), "test".into(), specials).unwrap()
    }

    #[test]
    fn chatml_renders_with_trim_and_lstrip_blocks() {
        let t = template(
            "{% for m in messages %}\n    {{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim + '<|im_end|>\\n' }}\n{% endfor %}\n{% if add_generation_prompt %}\n    {{ '<|im_start|>assistant\\n' }}\n{% endif %}",
        );
        // What jinja2's ImmutableSandboxedEnvironment(trim_blocks=True,
        // lstrip_blocks=True) renders, as transformers sets it up: block
        // lines vanish, an expression line keeps its indent and newline.
        let msgs = [json!({"role": "user", "content": "  hi  "})];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "    <|im_start|>user\nhi<|im_end|>\n\n    <|im_start|>assistant\n\n"
        );
        assert_eq!(
            t.render(&msgs, false).unwrap(),
            "    <|im_start|>user\nhi<|im_end|>\n\n"
        );
    }

    #[test]
    fn python_string_methods_special_tokens_and_raise_exception() {
        let t = template(
            "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m.content.strip().upper() }}{{ eos_token }}{% endfor %}",
        );
        let ok = [json!({"role": "user", "content": " a b "})];
        assert_eq!(t.render(&ok, false).unwrap(), "<s>A B</s>");
        let sys = [json!({"role": "system", "content": "x"})];
        let err = t.render(&sys, false).unwrap_err().to_string();
        assert!(
            err.contains("System role not supported") && err.contains("test"),
            "{err}"
        );
        // A construct the engine lacks fails with the template named, no panic.
        let bad = ChatTemplate::new(
            "{% frobnicate %}".into(),
            "bad.jinja".into(),
            BTreeMap::new(),
        );
        assert!(bad.unwrap_err().to_string().contains("bad.jinja"));
    }

    #[test]
    fn generation_blocks_become_spans() {
        let t = template(
            "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}</s>{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}",
        );
        assert!(t.has_generation_blocks);
        let msgs = [
            json!({"role": "user", "content": "hi"}),
            json!({"role": "assistant", "content": "hello"}),
        ];
        let (text, spans) = t.render_spans(&msgs, false).unwrap();
        // jinja2 renders the same template without the generation tags as
        // "user: hiassistant: hello</s>" (trim_blocks eats each newline).
        assert_eq!(text, "user: hiassistant: hello</s>");
        assert_eq!(spans.len(), 1);
        assert_eq!(&text[spans[0].clone()], "hello</s>");
        assert!(!template("{{ messages[0].content }}").has_generation_blocks);
    }

    #[test]
    fn strftime_codes_by_hand() {
        // 2026-12-03 is a Thursday, day 337 of the year.
        assert_eq!(strftime("%d %b %Y", (2026, 12, 3)), "03 Dec 2026");
        assert_eq!(
            strftime("%A %B %j %y %m %%", (2026, 12, 3)),
            "Thursday December 337 26 12 %"
        );
        assert_eq!(strftime("%a", (1970, 1, 1)), "Thu");
        assert_eq!(days_from_civil(2026, 11, 21), 20_778);
    }
}
