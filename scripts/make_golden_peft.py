#!/usr/bin/env python3
"""Golden LoRA adapters made by peft, for tests/it/lora.rs (which needs no
Python): peft's own files and the logits of the adapted model.

Usage (from the repository root, after `cargo run -- fixtures`; `make golden`
runs it with the pinned stack):
    .venv-golden/bin/python scripts/make_golden_peft.py fixtures tests
writes tests/golden_peft/NAME/{adapter_model.safetensors, adapter_config.json,
golden.json} for the fixture causal LMs below.

Each adapter is peft's LoraConfig on the fixture with init_lora_weights=False
(A and B keep nn.Linear's Kaiming-uniform init, so the update is not zero and
the test sees it), saved with save_pretrained. golden.json holds, for the
same left-padded batch as scripts/make_golden.py, the first 16 logits, the
logsumexp and the argmax at every real position of the adapted model.
"""
import json
import sys
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from make_golden import ROWS, pad, run, sha256  # noqa: E402

# (fixture, LoraConfig arguments): GPT-2's Conv1D (fan_in_fan_out), Llama's
# grouped attention and SwiGLU with rsLoRA, GPT-NeoX's fused qkv with a list
# of module names.
ADAPTERS = [
    ("tiny-gpt2", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    ("tiny-llama", dict(r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear")),
    ("tiny-pythia", dict(r=2, lora_alpha=4, target_modules=["query_key_value", "dense_4h_to_h"])),
]


def main(fixtures, tests):
    out_root = Path(tests) / "golden_peft"
    for name, kwargs in ADAPTERS:
        torch.manual_seed(0)
        base_dir = Path(fixtures) / "models" / name
        base = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, **kwargs)).eval()
        out = out_root / name
        model.save_pretrained(out)
        (out / "README.md").unlink(missing_ok=True)  # peft's empty model card
        golden = {
            "model": name,
            "made_by": f"peft {peft.__version__}, transformers {transformers.__version__}, torch {torch.__version__}",
            "model_sha256": sha256(base_dir / "model.safetensors"),
            "cases": {"padded": run(model, True, *pad(ROWS, left=True))},
        }
        (out / "golden.json").write_text(json.dumps(golden, indent=0) + "\n")
        print("peft", name, kwargs)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
