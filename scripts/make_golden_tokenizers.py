#!/usr/bin/env python3
"""Golden token ids: what `AutoTokenizer.from_pretrained(dir)(text)["input_ids"]`
gives for a fixed set of texts, for every fixture model's tokenizer and for
the real all-MiniLM-L6-v2 tokenizer committed under tests/data. Read by
tests/it/tokenizer.rs (no Python in CI).

Usage (from the repository root, after `cargo run -- fixtures --out fixtures`):
    .venv-golden/bin/python scripts/make_golden_tokenizers.py fixtures tests
writes tests/golden_tokenizer/NAME.json, with the transformers and tokenizers
versions and the sha256 of the tokenizer.json it read.
"""
import hashlib
import json
import sys
from pathlib import Path

import tokenizers
import transformers
from transformers import AutoTokenizer

TEXTS = [
    "the movie was great.",
    "The Movie WAS Great!",
    "  leading and trailing spaces  ",
    "",
    "naïve café, déjà vu — 東京 🙂",
    "overall the movie was really great, and the cast was superb.",
    "<|endoftext|> and <pad> inside a text",
    "[CLS] and [SEP] and [PAD] inside a text",
    "line one\nline two\ttabbed",
    "don't stop: 12345.678 + 9 = ?",
    "word " * 150,
]


def main(fixtures: Path, tests: Path) -> None:
    dirs = {p.name: p for p in sorted((fixtures / "models").iterdir()) if p.is_dir()}
    dirs["all-MiniLM-L6-v2"] = tests / "data" / "all-MiniLM-L6-v2"
    out = tests / "golden_tokenizer"
    out.mkdir(exist_ok=True)
    for name, d in dirs.items():
        tok = AutoTokenizer.from_pretrained(str(d))
        sha = hashlib.sha256((d / "tokenizer.json").read_bytes()).hexdigest()
        cases = [{"text": t, "input_ids": tok(t)["input_ids"]} for t in TEXTS]
        golden = {
            "tokenizer": name,
            "made_by": f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}",
            "tokenizer_json_sha256": sha,
            "cases": cases,
        }
        (out / f"{name}.json").write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n")
        print(name, [len(c["input_ids"]) for c in cases])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
