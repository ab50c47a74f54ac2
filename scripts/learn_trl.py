#!/usr/bin/env python3
"""TRL's side of the learning comparison (scripts/learn_compare.sh).

    python scripts/learn_trl.py {grpo|rloo} --config CONFIG.toml --seed N --out RESULT.json

Trains the config's policy with TRL 1.12's GRPOTrainer or RLOOTrainer on
the config's training prompts, against scripts/learn_reward.py's
`kind_reward`, with every hyperparameter read from the same candle-rlhf
TOML file the `candle-rlhf grpo|rloo` run reads ([train] and the
algorithm's section; every key this script maps must be written there,
so that no default of either side decides silently). TRL's defaults that
would differ on a CPU (bf16, gradient checkpointing, learning rate 1e-6)
are overridden explicitly.

Evaluation mirrors candle-rlhf's (src/trainers/online/eval.rs): every
held-out prompt of `eval_dataset` sampled `num_generations_eval` times with
the training's sampling (temperature, top_p, max_completion_length, stop on
EOS), the completions decoded without the EOS and scored; `eval/reward` is
the mean. It runs before training and after the last step, on a random
stream of its own (seeded from the run's seed, the training's RNG state
restored afterwards). TRL's own evaluation loop is off (eval_strategy "no").

Writes RESULT.json: {"eval_before", "eval_after", "gain", "seconds",
"log_history", ...}. One CPU thread (torch.set_num_threads(1)).
"""

import argparse
import json
import os
import sys
import time
import tomllib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from learn_reward import kind_reward  # noqa: E402


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluate(model, tok, rows, group, sampling, seed):
    """Mean reward over `group` sampled completions of every held-out prompt."""
    eos, pad = tok.eos_token_id, tok.pad_token_id
    was_training = model.training
    model.eval()
    prompts = [r for r in rows for _ in range(group)]
    texts, rewards, lengths, stopped = [], [], [], []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        chunk = 64
        for start in range(0, len(prompts), chunk):
            part = prompts[start : start + chunk]
            ids = [tok(r["prompt"], add_special_tokens=False).input_ids for r in part]
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
            attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                do_sample=True,
                max_new_tokens=sampling["max_completion_length"],
                temperature=sampling["temperature"],
                top_p=sampling["top_p"],
                # 0, not None: None falls back to transformers' default top_k of 50
                top_k=sampling["top_k"],
                eos_token_id=eos,
                pad_token_id=pad,
                bos_token_id=tok.bos_token_id,
            )
            for row, seq in zip(part, out[:, width:].tolist()):
                # cut after the first EOS, as TRL's _generate_single_turn does
                if eos in seq:
                    seq = seq[: seq.index(eos) + 1]
                    stopped.append(True)
                else:
                    stopped.append(False)
                lengths.append(len(seq))
                text = tok.decode(seq, skip_special_tokens=True)
                texts.append(text)
                rewards.append(kind_reward([row["prompt"]], [text], target=[row["target"]])[0])
    if was_training:
        model.train()
    n = len(rewards)
    return {
        "reward": sum(rewards) / n,
        "mean_length": sum(lengths) / n,
        "eos_rate": sum(stopped) / n,
        "completions": [
            {"prompt": r["prompt"], "completion": t, "reward": x}
            for r, t, x in zip(prompts, texts, rewards)
        ],
    }


def trl_args(algo, cfg, seed, out_dir):
    """The TRL config, every value from the candle-rlhf TOML (no defaults here)."""
    t, a = cfg["train"], cfg[algo]
    common = dict(
        output_dir=out_dir,
        # the optimizer and schedule ([train])
        learning_rate=t["learning_rate"],
        lr_scheduler_type=t["lr_scheduler_type"],
        warmup_steps=t["warmup_steps"],
        weight_decay=t["weight_decay"],
        adam_beta1=t["adam_beta1"],
        adam_beta2=t["adam_beta2"],
        adam_epsilon=t["adam_epsilon"],
        optim="adamw_torch",
        max_grad_norm=t["max_grad_norm"],
        max_steps=t["max_steps"],
        per_device_train_batch_size=t["per_device_train_batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation_steps"],
        # the generation batch and sampling ([grpo] / [rloo])
        steps_per_generation=a["steps_per_generation"],
        num_generations=a["num_generations"],
        num_generations_eval=a["num_generations_eval"],
        max_completion_length=a["max_completion_length"],
        temperature=a["temperature"],
        top_p=a["top_p"],
        top_k=0,  # candle-rlhf: top_k unset (all tokens)
        min_p=None,
        repetition_penalty=1.0,
        # the loss
        beta=a["beta"],
        epsilon=a["epsilon"],
        epsilon_high=a["epsilon"],
        num_iterations=a["num_iterations"],
        mask_truncated_completions=a["mask_truncated_completions"],
        disable_dropout=a["disable_dropout"],
        # the machine and bookkeeping
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_vllm=False,
        eval_strategy="no",  # evaluated by evaluate() before and after, as candle-rlhf does
        save_strategy="no",
        logging_steps=t["logging_steps"],
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        shuffle_dataset=True,
        log_completions=False,
    )
    if algo == "grpo":
        from trl import GRPOConfig

        return GRPOConfig(
            **common,
            loss_type=a["loss_type"],
            scale_rewards=a["scale_rewards"],
            importance_sampling_level=a["importance_sampling_level"],
            # TRL 1.12's default, kept: the k3 KL term is multiplied by the
            # (differentiable) importance ratio. candle-rlhf has no such key:
            # its KL term is k3 alone (src/trainers/online/algo.rs, group_loss).
            use_bias_correction_kl=True,
        )
    from trl import RLOOConfig

    return RLOOConfig(**common, normalize_advantages=a["normalize_advantages"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("algo", choices=["grpo", "rloo"])
    ap.add_argument("--config", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True, help="result JSON file")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    started = time.time()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    a = cfg[args.algo]
    model_dir = cfg["model"]["name_or_path"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    train_rows = read_jsonl(a["dataset"])
    eval_rows = read_jsonl(a["eval_dataset"])
    out_dir = os.path.splitext(args.out)[0] + "-trl"
    targs = trl_args(args.algo, cfg, args.seed, out_dir)
    if args.algo == "grpo":
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOTrainer as Trainer
    trainer = Trainer(
        model=model,
        reward_funcs=kind_reward,
        args=targs,
        train_dataset=Dataset.from_list(train_rows),
        processing_class=tok,
    )
    sampling = {
        "max_completion_length": a["max_completion_length"],
        "temperature": a["temperature"],
        "top_p": a["top_p"],
        "top_k": 0,
    }
    group = a["num_generations_eval"]
    eval_seed = args.seed + 1_000_003
    before = evaluate(trainer.model, tok, eval_rows, group, sampling, eval_seed)
    print(f"eval before: mean reward {before['reward']:.4f}, mean length {before['mean_length']:.2f}", flush=True)
    t0 = time.time()
    trainer.train()
    train_s = time.time() - t0
    after = evaluate(trainer.model, tok, eval_rows, group, sampling, eval_seed)
    print(f"eval after: mean reward {after['reward']:.4f}, mean length {after['mean_length']:.2f}", flush=True)
    result = {
        "side": "trl",
        "algo": args.algo,
        "seed": args.seed,
        "eval_before": before["reward"],
        "eval_after": after["reward"],
        "gain": after["reward"] - before["reward"],
        "eval_before_length": before["mean_length"],
        "eval_after_length": after["mean_length"],
        "eval_after_eos_rate": after["eos_rate"],
        "train_seconds": train_s,
        "seconds": time.time() - started,
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "trl": __import__("trl").__version__,
        },
        "log_history": trainer.state.log_history,
        "eval_after_samples": after["completions"][:16],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
