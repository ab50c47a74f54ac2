//! The docs stay true: docs/config.md is what the config definitions make;
//! every ```toml block of README.md and docs/ is a config this version
//! reads (an unknown key fails it); every relative link and every
//! `configs/` file named exists; every subcommand named answers `--help`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// README.md and every page under docs/.
fn pages() -> Vec<PathBuf> {
    let repo = crate::repo();
    let mut out = vec![repo.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo.join("docs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    out.extend(docs);
    out
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

#[test]
fn docs_config_md_is_what_the_config_definitions_make() {
    let path = crate::repo().join("docs/config.md");
    let made = candle_rlhf::config::reference::markdown();
    assert!(
        std::fs::read_to_string(&path).ok().as_deref() == Some(made.as_str()),
        "docs/config.md is stale: run `cargo run -- config --markdown > docs/config.md`"
    );
}

/// The fenced blocks of `text` whose info string is `lang` (every fence
/// opens and closes a block, whatever its language).
fn blocks(text: &str, lang: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    // The open block: its first line, whether it is wanted, its body.
    let mut open: Option<(usize, bool, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if !trimmed.starts_with("```") {
            if let Some((_, true, body)) = &mut open {
                body.push_str(line);
                body.push('\n');
            }
            continue;
        }
        match open.take() {
            Some((start, true, body)) => out.push((start, body)),
            Some(_) => {}
            None => {
                let info = trimmed.trim_start_matches('`').trim();
                open = Some((i + 1, info == lang, String::new()));
            }
        }
    }
    out
}

#[test]
fn every_toml_block_is_a_config_this_version_reads() {
    let mut seen = 0;
    for page in pages() {
        for (line, body) in blocks(&read(&page), "toml") {
            let name = format!("{}:{line}", page.display());
            if let Err(e) = candle_rlhf::Config::from_toml_str(&name, &body) {
                panic!("{e}\n{body}");
            }
            seen += 1;
        }
    }
    assert!(
        seen >= 6,
        "only {seen} toml blocks: one per trainer at least"
    );
}

#[test]
fn every_relative_link_and_named_config_file_exists() {
    let repo = crate::repo();
    let link = regex::Regex::new(r"\]\(([^)\s]+)\)").unwrap();
    let config = regex::Regex::new(r"\bconfigs/[A-Za-z0-9_.\-/]+\.toml").unwrap();
    for page in pages() {
        let text = read(&page);
        let dir = page.parent().unwrap();
        for c in link.captures_iter(&text) {
            let target = &c[1];
            if target.contains("://") || target.starts_with('#') || target.starts_with("mailto:") {
                continue;
            }
            let file = target.split('#').next().unwrap();
            assert!(
                dir.join(file).exists(),
                "{}: the link {target} leads nowhere",
                page.display()
            );
        }
        for m in config.find_iter(&text) {
            assert!(
                repo.join(m.as_str()).exists(),
                "{}: {} does not exist",
                page.display(),
                m.as_str()
            );
        }
    }
}

#[test]
fn every_subcommand_named_answers_help() {
    let named =
        regex::Regex::new(r"(?:candle-rlhf|cargo run --release --) ([a-z][a-z-]*)").unwrap();
    // Code only (fenced blocks and `inline` spans): prose may say
    // "candle-rlhf builds".
    let inline = regex::Regex::new(r"`([^`\n]+)`").unwrap();
    let mut commands = BTreeSet::new();
    for page in pages() {
        let text = read(&page);
        let mut code: Vec<String> = ["sh", "text", ""]
            .iter()
            .flat_map(|lang| blocks(&text, lang).into_iter().map(|(_, b)| b))
            .collect();
        code.extend(inline.captures_iter(&text).map(|c| c[1].to_string()));
        for piece in &code {
            for c in named.captures_iter(piece) {
                commands.insert(c[1].to_string());
            }
        }
    }
    for must in ["sft", "reward", "dpo", "ppo", "grpo", "rloo", "demo"] {
        assert!(
            commands.contains(must),
            "the docs never show `candle-rlhf {must}`"
        );
    }
    for c in &commands {
        let out = std::process::Command::new(crate::bin())
            .args([c.as_str(), "--help"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`candle-rlhf {c} --help` fails: the docs name a subcommand that does not exist\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
