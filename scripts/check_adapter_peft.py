#!/usr/bin/env python3
"""Loads a candle-rlhf LoRA checkpoint with peft and checks it against the
merged model `candle-rlhf merge` wrote, in transformers (not run by CI).

Usage (the pinned stack of `make golden`):
    candle-rlhf merge --adapter RUN/checkpoints/N --out /tmp/merged
    .venv-golden/bin/python scripts/check_adapter_peft.py RUN/checkpoints/N /tmp/merged [BASE]
Prints the largest |peft(base + adapter) - transformers(merged)| over the
logits of a padded batch (a reward model: over its scores). BASE defaults to
the adapter's base_model_name_or_path.
"""
import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

ROWS = [[5, 17, 42, 9, 100, 7, 8, 9], [33, 2, 64, 11, 12], [99, 3]]


def main(adapter, merged, base=None):
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    base = base or config["base_model_name_or_path"]
    seq_cls = config.get("task_type") == "SEQ_CLS"
    cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    pad_id = json.loads((Path(merged) / "config.json").read_text()).get("pad_token_id") or 0
    if seq_cls:
        # The head reads the last non-pad token: the base needs the pad id too.
        kwargs.update(num_labels=1, pad_token_id=pad_id)
    peft_model = PeftModel.from_pretrained(cls.from_pretrained(base, **kwargs), adapter).eval()
    ours = cls.from_pretrained(merged, **kwargs).eval()
    width = max(len(r) for r in ROWS)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in ROWS])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ROWS])
    with torch.no_grad():
        a = peft_model(input_ids=ids, attention_mask=mask).logits
        b = ours(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool() if a.dim() == 3 else torch.ones(a.shape[0], dtype=torch.bool)
    diff = (a[keep] - b[keep]).abs().max().item()
    print(f"peft loaded {adapter} onto {base}: max |peft - merged| = {diff:.3e} over {tuple(a.shape)} outputs")
    return diff


if __name__ == "__main__":
    d = main(*sys.argv[1:])
    sys.exit(0 if d <= 1e-4 else 1)
