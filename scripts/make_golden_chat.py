#!/usr/bin/env python3
"""Golden chat-template renderings: what transformers' apply_chat_template
renders (its `render_jinja_template`, called with the tokenizer's special
tokens as apply_chat_template passes them) for every template in
tests/data/chat_templates, over a few conversations, with and without the
generation prompt. A template that raises is recorded with its message.
`strftime_now` is pinned to 2026-12-03 (the tests pin ours the same way).

Usage: .venv-golden/bin/python scripts/make_golden_chat.py tests
writes tests/golden_chat/NAME.json.
"""
import datetime
import json
import sys
from pathlib import Path

import transformers
from transformers.utils import chat_template_utils as ctu

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "user", "content": "  Grüße, naïve café — 東京 🙂  "},
        {"role": "assistant", "content": "  Hallo!\n\n  "},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Think first."},
        {"role": "assistant", "content": "<think>hmm</think>Done."},
    ],
]


class FixedDate(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 12, 3)


def main(tests: Path) -> None:
    ctu.datetime = FixedDate  # strftime_now reads datetime.now()
    src = tests / "data" / "chat_templates"
    specials = json.loads((src / "special_tokens.json").read_text())
    out = tests / "golden_chat"
    out.mkdir(exist_ok=True)
    for path in sorted(src.glob("*.jinja")):
        name = path.stem
        template = path.read_text()
        cases = []
        for conv in CONVERSATIONS:
            for agp in (False, True):
                case = {"messages": conv, "add_generation_prompt": agp}
                try:
                    rendered, _ = ctu.render_jinja_template(
                        conversations=[conv],
                        chat_template=template,
                        add_generation_prompt=agp,
                        **specials[name],
                    )
                    case["text"] = rendered[0]
                except Exception as e:  # the template refused the conversation
                    case["error"] = str(e)
                cases.append(case)
        golden = {"template": name, "made_by": f"transformers {transformers.__version__}", "cases": cases}
        (out / f"{name}.json").write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n")
        print(name, sum("text" in c for c in cases), "rendered,", sum("error" in c for c in cases), "refused")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
