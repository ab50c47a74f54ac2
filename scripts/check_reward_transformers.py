#!/usr/bin/env python3
"""Loads a reward model saved by `candle-rlhf reward` in transformers
(AutoModelForSequenceClassification: BertForSequenceClassification for a
BERT backbone), scores a few texts, and prints the largest difference from
`candle-rlhf score` on the same texts. Not run by CI.

Usage: .venv-golden/bin/python scripts/check_reward_transformers.py CHECKPOINT_DIR [CANDLE_RLHF_BINARY]
"""
import subprocess
import sys

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

TEXTS = [
    "the movie was superb.",
    "the plot was dreadful.",
    "this film looked rather charming.",
    "the ending felt truly pathetic.",
    "The soundtrack is quite MAGNIFICENT!",
    "the acting was fine, i guess.",
]


def main(ckpt: str, binary: str) -> None:
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    print(f"{type(model).__name__} from {ckpt}; transformers {transformers.__version__}, torch {torch.__version__}")
    with torch.no_grad():
        batch = tok(TEXTS, padding=True, return_tensors="pt")
        theirs = model(**batch).logits[:, 0].tolist()
    offset = getattr(model.config, "candle_rlhf_reward_offset", 0.0) or 0.0
    args = [binary, "score", "--model", ckpt, "--device", "cpu"]
    for t in TEXTS:
        args += ["--text", t]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    ours = [float(line.split("\t")[0]) for line in out.strip().splitlines()]
    worst = 0.0
    for text, a, b in zip(TEXTS, ours, theirs):
        b -= offset
        worst = max(worst, abs(a - b))
        print(f"{a:+.6f}  {b:+.6f}  {text}")
    print(f"max |candle-rlhf - transformers| = {worst:.2e} over {len(TEXTS)} texts")
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "target/release/candle-rlhf")
