#!/usr/bin/env python3
"""Prompts of the learning comparison's task (see scripts/learn_reward.py).

    python scripts/learn_data.py OUT_DIR

writes OUT_DIR/train.jsonl (410 prompts) and OUT_DIR/eval.jsonl (25
held-out prompts), one {"prompt": ..., "target": "positive"} per line. A
prompt is a short header and two words of any kind ("List: plot awful");
the completion should go on with positive words, whatever the prompt's
words are. Of the 435 pairs of the 30 words, every 18th is held out and
never appears in a training prompt. Deterministic: no randomness.
"""

import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from learn_reward import ALL_WORDS  # noqa: E402

HEADERS = ("Words:", "List:", "Go on:")
TARGET = "positive"


def rows(held_out: bool):
    """The prompt rows, training or held-out, in a fixed order."""
    out = []
    for i, (a, b) in enumerate(itertools.combinations(ALL_WORDS, 2)):
        if (i % 18 == 0) != held_out:
            continue
        if i % 2:
            a, b = b, a
        header = HEADERS[(i + i // 18) % len(HEADERS)]
        out.append({"prompt": f"{header} {a} {b}", "target": TARGET})
    return out


def write(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for name, held_out in (("train.jsonl", False), ("eval.jsonl", True)):
        with open(os.path.join(out_dir, name), "w") as f:
            for r in rows(held_out):
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    write(sys.argv[1])
