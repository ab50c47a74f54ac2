#!/usr/bin/env python3
"""Prompts of the learning comparison's task (see scripts/learn_reward.py).

    python scripts/learn_data.py OUT_DIR

writes OUT_DIR/train.jsonl (222 prompts) and OUT_DIR/eval.jsonl (24
held-out prompts), one {"prompt": ..., "target": ...} per line. A prompt
is a short header and two words of one kind ("List: superb funny"); the
completion should go on with words of that kind (`target`). Of each kind's
45 word pairs, 8 are held out (one order each, 24 prompts) and never
appear in a training prompt; the other 37 train in both orders (222).
Deterministic: no randomness.
"""

import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from learn_reward import TARGETS, WORDS  # noqa: E402

HEADERS = ("Words:", "List:", "Go on:")


def rows(held_out: bool):
    """The prompt rows, training or held-out, in a fixed order."""
    out = []
    for kind in TARGETS:
        for i, pair in enumerate(itertools.combinations(WORDS[kind], 2)):
            if (i % 6 == 0) != held_out:
                continue
            orders = [pair] if held_out else [pair, pair[::-1]]
            for j, (a, b) in enumerate(orders):
                header = HEADERS[len(out) % len(HEADERS)]
                out.append({"prompt": f"{header} {a} {b}", "target": kind})
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
