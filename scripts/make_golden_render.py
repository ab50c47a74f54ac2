#!/usr/bin/env python3
"""Golden text columns of `candle-rlhf render`: what TRL 1.12's
`maybe_extract_prompt` then `maybe_apply_chat_template` give for the rows of
tests/data/conversational.jsonl (explicit and implicit prompts, a
prompt-completion row, a conversation, prompts ending with a user or an
assistant turn), with real templates of tests/data/chat_templates on the
all-MiniLM-L6-v2 tokenizer (the templates use no special token).

Usage: .venv-golden/bin/python scripts/make_golden_render.py tests
writes tests/golden_render/NAME.json.
"""
import json
import sys
from pathlib import Path

import transformers
import trl
from transformers import AutoTokenizer
from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

TEMPLATES = ["chatml", "smollm2"]


def main(tests: Path) -> None:
    rows = [json.loads(l) for l in (tests / "data" / "conversational.jsonl").read_text().splitlines() if l.strip()]
    out = tests / "golden_render"
    out.mkdir(exist_ok=True)
    for name in TEMPLATES:
        tok = AutoTokenizer.from_pretrained(tests / "data" / "all-MiniLM-L6-v2")
        tok.chat_template = (tests / "data" / "chat_templates" / f"{name}.jinja").read_text()
        rendered = [maybe_apply_chat_template(maybe_extract_prompt(dict(r)), tok) for r in rows]
        # The ids TRL 1.12's RewardTrainer feeds the model for a preference
        # row: apply_chat_template(prompt + side, tokenize=True).
        for row, done in zip(rows, rendered):
            if "chosen" in row:
                for side in ("chosen", "rejected"):
                    conv = row.get("prompt", []) + row[side]
                    done[f"{side}_ids"] = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        golden = {
            "template": name,
            "made_by": f"trl {trl.__version__}, transformers {transformers.__version__}",
            "rows": rendered,
        }
        (out / f"{name}.json").write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n")
        print(name, len(rendered))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
