#!/usr/bin/env python3
"""The policy of the learning comparison (scripts/learn_compare.sh).

    python scripts/make_tiny_policy.py OUT_DIR [--warm-steps N]

Builds a tiny Llama with transformers itself (hidden 64, 2 layers, 4 heads,
intermediate 128, the 445-token tokenizer of fixtures/models/tiny-llama,
256 positions), initialised by `AutoModelForCausalLM.from_config` after
`torch.manual_seed(0)`.

The random model is not trained on the task's format (no RL run was tried
from it), so it first gets a short SFT-like warm start in plain PyTorch
(fixed seed 0, one thread): on the training prompts of
scripts/learn_data.py, completions of 2 to 5 words drawn uniformly from all
30 words of scripts/learn_reward.py, whatever the prompt's words, then
EOS; cross-entropy on the completion tokens only. The warm-started policy
writes the format, with words of every kind alike, so its expected reward
is about 1/3 of the maximum 1 (measured 0.31-0.33 on the held-out prompts).

Writes OUT_DIR/model.safetensors and config.json (save_pretrained with
safe_serialization), generation_config.json (eos 0, pad 1: both trainers
stop on EOS), and the tokenizer files of fixtures/models/tiny-llama.
"""

import argparse
import json
import os
import random
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from learn_data import rows  # noqa: E402
from learn_reward import ALL_WORDS  # noqa: E402

TOKENIZER_DIR = os.path.join(HERE, "..", "fixtures", "models", "tiny-llama")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def warm_start(model, tok, steps: int, seed: int = 0) -> list:
    """SFT on the format: prompt -> 2..5 words drawn uniformly from all 30, then EOS."""
    rng = random.Random(seed)
    prompts = [r["prompt"] for r in rows(held_out=False)]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    model.train()
    losses = []
    for _ in range(steps):
        batch = []
        for _ in range(32):
            p = tok(rng.choice(prompts), add_special_tokens=False).input_ids
            words = [rng.choice(ALL_WORDS) for _ in range(rng.randint(2, 5))]
            c = tok("".join(" " + w for w in words), add_special_tokens=False).input_ids + [eos]
            batch.append((p, c))
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), pad)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        for i, (p, c) in enumerate(batch):
            n = len(p) + len(c)
            ids[i, :n] = torch.tensor(p + c)
            att[i, :n] = 1
            labels[i, len(p) : n] = torch.tensor(c)
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--warm-steps", type=int, default=300)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    losses = warm_start(model, tok, args.warm_steps) if args.warm_steps > 0 else []

    os.makedirs(args.out_dir, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(args.out_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        src = os.path.join(TOKENIZER_DIR, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(args.out_dir, name))
    with open(os.path.join(args.out_dir, "warm_start.json"), "w") as f:
        json.dump(
            {
                "steps": args.warm_steps,
                "first_loss": losses[0] if losses else None,
                "last_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
            },
            f,
            indent=1,
        )
    print(
        f"{args.out_dir}: {sum(p.numel() for p in model.parameters())} parameters,"
        f" warm start {args.warm_steps} steps"
        + (f", loss {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f}" if losses else "")
    )


if __name__ == "__main__":
    main()
