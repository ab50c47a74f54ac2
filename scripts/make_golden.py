#!/usr/bin/env python3
"""Golden outputs of the fixture models, computed once with Hugging Face
transformers, for tests/it/golden.rs (which needs no Python).

Usage (from the repository root, after `cargo run -- fixtures`):
    python3 -m venv .venv-golden && .venv-golden/bin/pip install torch transformers safetensors
    .venv-golden/bin/python scripts/make_golden.py fixtures tests
writes tests/golden/NAME.json from fixtures/models/NAME and
tests/golden_reward/NAME.json from the reward models fixtures/reward/NAME.

For every model it runs two batches, in float32 with eager attention:
  - causal LMs: a left-padded batch with position ids cumsum(mask) - mask
    (TRL's rule) and the same rows one by one, unpadded; it records, at each
    real position, the first 16 logits, the logsumexp over the vocabulary
    and the argmax;
  - encoders: a right-padded batch and the rows alone; it records the last
    hidden state at each real position.
Reward models are loaded with AutoModelForSequenceClassification (num_labels 1)
and score a right-padded and (decoders only) a left-padded batch (padding with the config's
pad_token_id, so transformers' last-non-pad-token rule finds the same token
as our attention mask does) and each row alone; the golden value is logits[:, 0].
The fixture's sha256 is recorded so a test can tell a changed fixture from a
wrong model.
"""
import hashlib
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

ROWS = [[5, 17, 42, 9, 100, 7, 8, 9], [33, 2, 64, 11, 12], [99, 3]]
HEAD = 16


def pad(rows, left, pad_id=0):
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        p = width - len(r)
        ids.append([pad_id] * p + r if left else r + [pad_id] * p)
        mask.append([0] * p + [1] * len(r) if left else [1] * len(r) + [0] * p)
    return torch.tensor(ids), torch.tensor(mask)


def run(model, causal, ids, mask):
    with torch.no_grad():
        if causal:
            pos = (mask.cumsum(-1) - mask).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        else:
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = [[b, t] for b in range(ids.shape[0]) for t in range(ids.shape[1]) if mask[b, t] == 1]
    case = {
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "positions": real,
    }
    sel = torch.stack([out[b, t] for b, t in real]).double()
    if causal:
        case["head"] = [[round(x, 7) for x in row] for row in sel[:, :HEAD].tolist()]
        case["logsumexp"] = [round(x, 7) for x in torch.logsumexp(sel, -1).tolist()]
        case["argmax"] = sel.argmax(-1).tolist()
    else:
        case["hidden"] = [[round(x, 7) for x in row] for row in sel.tolist()]
    return case


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def made_by():
    return f"transformers {transformers.__version__}, torch {torch.__version__}"


def score(model, ids, mask):
    kwargs = {}
    if model.config.model_type not in ("bert", "distilbert"):
        # As in run(): GPT-2 would otherwise count positions from the padding.
        kwargs["position_ids"] = (mask.cumsum(-1) - mask).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **kwargs).logits[:, 0]
    return {
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "rewards": [round(x, 7) for x in out.double().tolist()],
    }


def reward_models(reward_dir, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    for d in sorted(Path(reward_dir).iterdir()):
        model = AutoModelForSequenceClassification.from_pretrained(
            d, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        assert model.config.num_labels == 1, d
        pad_id = model.config.pad_token_id
        cases = {"right": score(model, *pad(ROWS, left=False, pad_id=pad_id))}
        # Encoders pool hidden_states[:, 0] even when it is padding, so only
        # right padding (what their tokenizers do) has a meaning there.
        if model.config.model_type not in ("bert", "distilbert"):
            cases["left"] = score(model, *pad(ROWS, left=True, pad_id=pad_id))
        for i, row in enumerate(ROWS):
            cases[f"row{i}"] = score(model, *pad([row], left=False))
        golden = {
            "model": d.name,
            "architecture": model.config.architectures[0],
            "made_by": made_by(),
            "model_sha256": sha256(d / "model.safetensors"),
            "cases": cases,
        }
        (out_dir / f"{d.name}.json").write_text(json.dumps(golden, indent=0) + "\n")
        print("reward", d.name, golden["architecture"])


def main(fixtures, tests):
    models_dir = Path(fixtures) / "models"
    out_dir = Path(tests) / "golden"
    out_dir.mkdir(parents=True, exist_ok=True)
    for d in sorted(Path(models_dir).iterdir()):
        config = AutoConfig.from_pretrained(d)
        causal = config.model_type in ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox")
        cls = AutoModelForCausalLM if causal else AutoModel
        kwargs = {} if causal or config.model_type != "bert" else {"add_pooling_layer": False}
        model = cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager", **kwargs).eval()
        cases = {"padded": run(model, causal, *pad(ROWS, left=causal))}
        for i, row in enumerate(ROWS):
            cases[f"row{i}"] = run(model, causal, *pad([row], left=causal))
        golden = {
            "model": d.name,
            "model_type": config.model_type,
            "made_by": made_by(),
            "model_sha256": sha256(d / "model.safetensors"),
            "cases": cases,
        }
        (out_dir / f"{d.name}.json").write_text(json.dumps(golden, indent=0) + "\n")
        print(d.name, config.model_type)
    reward_models(Path(fixtures) / "reward", Path(tests) / "golden_reward")


if __name__ == "__main__":
    main(*sys.argv[1:3])
