#!/usr/bin/env python3
"""The PyTorch side of `candle-rlhf bench`: the same three workloads, on the
same random weights and inputs, with TRL 1.12 and transformers.

    python scripts/bench_trl.py --shape configs/models/gpt2.toml \
        --work-dir runs/bench/gpt2 --threads 1 --json out.json

`--work-dir` is the directory `candle-rlhf bench --work-dir` wrote: model/
(the random policy in Hugging Face layout), reward/ (the random reward model)
and prompts.jsonl (random prompt ids). scripts/bench_compare.sh runs both sides.

1. reward: TRL's RewardTrainer, one step = forward of chosen and rejected,
   -logsigmoid loss, backward, clipping, AdamW (timed by a callback around
   each optimizer step, so data loading and collation count, as they do in
   the Rust trainer).
2. generate: transformers' `generate` with sampling at temperature 1, no stop
   token (min_new_tokens = max_new_tokens), under torch.inference_mode.
3. ppo: trl.experimental.ppo.PPOTrainer with policy, reference, reward and
   value models (the value model is the reward model's copy, as in TRL's
   examples), one update per batch; timed per update by a callback, the
   generation phase by wrapping batch_generation. Variants: `shipped` keeps
   the two gc.collect() calls per update; `nogc` removes them. Both run f32
   with gradient checkpointing off (TRL's PPOConfig defaults to bf16 and
   checkpointing on; on a CPU that is slower and not what we compare).

4. grpo, rloo: trl.GRPOTrainer / trl.RLOOTrainer, one generation batch of
   online_prompts x num_generations completions per iteration (the text
   prompts `candle-rlhf bench` wrote to WORK/grpo-prompts.jsonl and
   rloo-prompts.jsonl), the random reward model as the reward function,
   beta 0.04 (a reference forward), num_iterations 1, one optimizer step
   (steps_per_generation = gradient_accumulation_steps), no vLLM, f32,
   gradient checkpointing off; timed per step by a callback, with the
   generation (`_generate`) and scoring (`_calculate_rewards`) phases
   wrapped, and the log-probs phase the rest of
   `_generate_and_score_completions`.

5. dpo: trl.DPOTrainer, one step = reward_batch_size pairs of
   reward_seq_len-token sequences (a random prompt of half the tokens, random
   chosen and rejected completions of the other half, pre-tokenized and put
   in place of the trainer's prepared dataset), the reference model's
   forward included (precompute_ref_log_probs off), sigmoid loss, beta 0.1,
   f32, gradient checkpointing off; timed per step by a callback, the
   reference forward by wrapping ref_model.forward, the optimizer between
   on_pre_optimizer_step and on_optimizer_step, the policy the rest.

Peak RSS per part comes from /proc/self/status (VmHWM), reset between parts.

On a GPU (`--device cuda`, used by scripts/gpu_run.sh) the same workloads run
there: `--dtype bf16` trains with TRL's `bf16=True` (f32 weights and optimizer
state, bf16 autocast: what candle-rlhf's bf16 does with its f32 master
weights), holds the reference and reward models and the generating model in
bf16, synchronizes the device before every clock read, and reports the peak
of torch's allocator (`torch.cuda.max_memory_reserved`) beside the RSS.
Only the generate part runs without TRL and datasets installed.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
import tomllib
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", required=True)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parts", default="reward,generate,ppo")
    p.add_argument("--ppo-variants", default="shipped,nogc")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",")],
                   help="generation batch sizes instead of the shape's")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    # LoRA of rank R on every linear layer (peft, lora_alpha 2R), as `candle-rlhf bench --lora R`.
    p.add_argument("--lora", type=int, default=None)
    p.add_argument("--activation-checkpointing", default="off", choices=["on", "off"])
    return p.parse_args()


ARGS = parse_args()
# Threads before torch starts its pools.
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
)

torch.set_num_threads(ARGS.threads)
CUDA = ARGS.device == "cuda"
DEVICE = torch.device(ARGS.device)
# Weights of frozen and generating models; trained ones stay f32 (masters).
HELD = torch.bfloat16 if ARGS.dtype == "bf16" else torch.float32


def sync():
    """Waits for the device, so that the clock reads finished work."""
    if CUDA:
        torch.cuda.synchronize()


def reset_peak_device():
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def peak_device_mb():
    return torch.cuda.max_memory_reserved() / 2**20 if CUDA else None


def reset_peak_rss():
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class StepTimer(TrainerCallback):
    """Wall time between the start and the end of each trainer step."""

    def __init__(self):
        self.times = []
        self._start = None

    def on_step_begin(self, args, state, control, **kw):
        sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        sync()
        now = time.perf_counter()
        if self._start is not None:
            self.times.append(now - self._start)
        if len(self.times) == ARGS.warmup:
            # Peak memory over the timed steps, after the warm-up allocated
            # what is allocated late (the optimizer's moments).
            reset_peak_rss()
            reset_peak_device()
        self._start = now  # PPOTrainer has no on_step_begin: time end to end


class OptimizerTimer(TrainerCallback):
    """Seconds of each optimizer step (clipping and AdamW), into phases["optimizer_s"]."""

    def __init__(self, phases):
        self.phases = phases

    def on_pre_optimizer_step(self, args, state, control, **kw):
        sync()
        self.start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kw):
        sync()
        self.phases["optimizer_s"].append(time.perf_counter() - self.start)


def timed(fn, into):
    """`fn`, appending the seconds of each call to the list `into`."""

    def wrapper(*a, **k):
        sync()
        start = time.perf_counter()
        out = fn(*a, **k)
        sync()
        into.append(time.perf_counter() - start)
        return out

    return wrapper


def common_args(out_dir):
    return dict(
        output_dir=str(out_dir),
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        use_cpu=not CUDA,
        bf16=ARGS.dtype == "bf16",
        fp16=False,
        # transformers 5.23's name (gradient_checkpointing is its deprecated alias)
        activation_checkpointing=ARGS.activation_checkpointing == "on",
        dataloader_num_workers=0,
        seed=42,
    )


def random_ids(rng, rows, length, vocab):
    return torch.randint(0, vocab, (rows, length), generator=rng).tolist()


def lora_config(task_type):
    """peft's LoraConfig for --lora R: every linear layer, lora_alpha 2R."""
    if ARGS.lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=ARGS.lora, lora_alpha=2 * ARGS.lora, target_modules="all-linear", task_type=task_type)


def bench_reward(work, w, vocab, rng):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    b, n = w["reward_batch_size"], ARGS.warmup + ARGS.iters
    chosen = random_ids(rng, b * n, w["reward_seq_len"], vocab)
    rejected = random_ids(rng, b * n, w["reward_seq_len"], vocab)
    ds = Dataset.from_dict({"chosen_ids": chosen, "rejected_ids": rejected})
    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForSequenceClassification.from_pretrained(
        work / "reward", num_labels=1, dtype=torch.float32
    )
    timer = StepTimer()
    phases = {"forward_s": [], "optimizer_s": []}
    args = RewardConfig(
        per_device_train_batch_size=b,
        max_steps=n,
        max_length=None,
        **common_args(work / "trl-reward"),
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[timer, OptimizerTimer(phases)],
        peft_config=lora_config("SEQ_CLS"),
    )
    # The forward and loss (compute_loss); the backward is the rest of the
    # step less the optimizer's part.
    trainer.compute_loss = timed(trainer.compute_loss, phases["forward_s"])
    reset_peak_rss()
    reset_peak_device()
    trainer.train()
    skip = ARGS.warmup
    step_s = statistics.median(timer.times[skip:])
    forward_s = statistics.median(phases["forward_s"][skip:])
    optimizer_s = statistics.median(phases["optimizer_s"][skip:])
    return {
        "pairs": b,
        "seq_len": w["reward_seq_len"],
        "step_s": step_s,
        "forward_s": forward_s,
        "backward_s": step_s - forward_s - optimizer_s,
        "optimizer_s": optimizer_s,
        "tokens_per_s": 2 * b * w["reward_seq_len"] / step_s,
        "peak_rss_mb": peak_rss_mb(),
        "peak_device_mb": peak_device_mb(),
    }


def bench_sft(work, w, vocab, rng):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    b = w.get("sft_batch_size") or w["reward_batch_size"]
    t = w.get("sft_seq_len") or w["reward_seq_len"]
    n = ARGS.warmup + ARGS.iters
    ds = Dataset.from_dict({"input_ids": random_ids(rng, b * n, t, vocab)})
    tok = AutoTokenizer.from_pretrained(work / "model")
    timer = StepTimer()
    args = SFTConfig(
        per_device_train_batch_size=b,
        max_steps=n,
        max_length=None,
        packing=False,
        model_init_kwargs={"dtype": torch.float32},
        **common_args(work / "trl-sft"),
    )
    trainer = SFTTrainer(
        model=str(work / "model"),
        args=args,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[timer],
        peft_config=lora_config("CAUSAL_LM"),
    )
    reset_peak_rss()
    reset_peak_device()
    trainer.train()
    step_s = statistics.median(timer.times[ARGS.warmup :])
    return {
        "rows": b,
        "seq_len": t,
        "step_s": step_s,
        "tokens_per_s": b * t / step_s,
        "peak_rss_mb": peak_rss_mb(),
        "peak_device_mb": peak_device_mb(),
    }


def bench_generate(work, w, vocab, rng):
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=HELD).to(DEVICE).eval()
    out = []
    r = w["response_length"]
    for b in ARGS.batch_sizes or w["generate_batch_sizes"]:
        reset_peak_rss()
        reset_peak_device()
        times = []
        for i in range(ARGS.warmup + ARGS.iters):
            ids = torch.tensor(random_ids(rng, b, w["prompt_length"], vocab), device=DEVICE)
            sync()
            start = time.perf_counter()
            with torch.inference_mode():
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=r,
                    min_new_tokens=r,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    pad_token_id=0,
                )
            sync()
            assert gen.shape[1] == w["prompt_length"] + r
            if i >= ARGS.warmup:
                times.append(time.perf_counter() - start)
        s = statistics.median(times)
        out.append(
            {
                "batch_size": b,
                "prompt_length": w["prompt_length"],
                "new_tokens": r,
                "seconds": s,
                "tokens_per_s": b * r / s,
                "peak_rss_mb": peak_rss_mb(),
                "peak_device_mb": peak_device_mb(),
            }
        )
    return out


def bench_ppo(work, w, variant):
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    if variant == "nogc":
        class NoGc:
            @staticmethod
            def collect(*a, **k):
                return 0

        ppo_module.gc = NoGc()
    else:
        import gc

        ppo_module.gc = gc
    gen_times = []
    original = ppo_module.batch_generation

    ppo_module.batch_generation = timed(original, gen_times)

    n = ARGS.warmup + ARGS.iters
    prompts = [json.loads(l)["input_ids"] for l in (work / "prompts.jsonl").read_text().splitlines()]
    prompts = prompts[: w["ppo_batch_size"] * n]
    ds = Dataset.from_dict({"input_ids": prompts})
    tok = AutoTokenizer.from_pretrained(work / "model")
    f32, held = dict(dtype=torch.float32), dict(dtype=HELD)
    policy = AutoModelForCausalLM.from_pretrained(work / "model", **f32)
    # With LoRA, TRL's reference is the policy with its adapters disabled.
    ref = None if ARGS.lora else AutoModelForCausalLM.from_pretrained(work / "model", **held)
    reward = AutoModelForSequenceClassification.from_pretrained(work / "reward", num_labels=1, **held)
    value = AutoModelForSequenceClassification.from_pretrained(work / "reward", num_labels=1, **f32)
    accumulation = w["ppo_batch_size"] // (w["ppo_num_mini_batches"] * w["per_device_train_batch_size"])
    args = PPOConfig(
        per_device_train_batch_size=w["per_device_train_batch_size"],
        gradient_accumulation_steps=accumulation,
        num_mini_batches=w["ppo_num_mini_batches"],
        num_ppo_epochs=w["ppo_epochs"],
        response_length=w["response_length"],
        local_rollout_forward_batch_size=w["ppo_batch_size"],
        total_episodes=w["ppo_batch_size"] * n,
        num_sample_generations=0,
        stop_token=None,
        missing_eos_penalty=None,
        **common_args(work / f"trl-ppo-{variant}"),
    )
    timer = StepTimer()
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=ds,
        callbacks=[timer],
        peft_config=lora_config("CAUSAL_LM"),
    )
    reset_peak_rss()
    reset_peak_device()
    timer._start = time.perf_counter()
    trainer.train()
    ppo_module.batch_generation = original
    timed = timer.times[ARGS.warmup :]
    gen = gen_times[ARGS.warmup : ARGS.warmup + len(timed)]
    return {
        "variant": variant,
        "batch_size": w["ppo_batch_size"],
        "prompt_length": w["prompt_length"],
        "response_length": w["response_length"],
        "epochs": w["ppo_epochs"],
        "mini_batches": w["ppo_num_mini_batches"],
        "iteration_s": statistics.mean(timed),
        "generate_s": statistics.mean(gen),
        "peak_rss_mb": peak_rss_mb(),
        "peak_device_mb": peak_device_mb(),
    }


def bench_online(work, w, algo):
    from datasets import Dataset
    import trl

    Config, Trainer = {
        "grpo": (trl.GRPOConfig, trl.GRPOTrainer),
        "rloo": (trl.RLOOConfig, trl.RLOOTrainer),
    }[algo]
    n = ARGS.warmup + ARGS.iters
    rows = (work / f"{algo}-prompts.jsonl").read_text().splitlines()
    prompts = [json.loads(l)["prompt"] for l in rows][: w["online_prompts"] * n]
    ds = Dataset.from_dict({"prompt": prompts})
    tok = AutoTokenizer.from_pretrained(work / "model")
    micro = w["per_device_train_batch_size"]
    steps = w["online_prompts"] * w["num_generations"] // micro
    args = Config(
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=steps,
        steps_per_generation=steps,
        num_generations=w["num_generations"],
        max_completion_length=w["response_length"],
        temperature=1.0,
        top_p=1.0,
        beta=0.04,
        num_iterations=1,
        max_steps=n,
        learning_rate=1e-6,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        use_vllm=False,
        model_init_kwargs={"dtype": torch.float32},
        **common_args(work / f"trl-{algo}"),
    )
    phases = {"generate_s": [], "score_s": [], "prepare_s": []}

    timer = StepTimer()
    trainer = Trainer(
        model=str(work / "model"),
        reward_funcs=str(work / "reward"),
        args=args,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[timer],
        peft_config=lora_config("CAUSAL_LM"),
    )
    trainer._generate = timed(trainer._generate, phases["generate_s"])
    trainer._calculate_rewards = timed(trainer._calculate_rewards, phases["score_s"])
    trainer._generate_and_score_completions = timed(
        trainer._generate_and_score_completions, phases["prepare_s"]
    )
    reset_peak_rss()
    reset_peak_device()
    trainer.train()
    skip = ARGS.warmup
    timed_steps = timer.times[skip:]
    mean = lambda k: statistics.mean(phases[k][skip : skip + len(timed_steps)])
    gen, score, prep = mean("generate_s"), mean("score_s"), mean("prepare_s")
    total = statistics.mean(timed_steps)
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {
        "algo": algo,
        "prompts": w["online_prompts"],
        "num_generations": w["num_generations"],
        "response_length": w["response_length"],
        "iteration_s": total,
        "generate_s": gen,
        "forward_s": prep - gen - score,
        "score_s": score,
        "update_s": total - prep,
        "mean_completion_length": statistics.mean(lengths) if lengths else None,
        "peak_rss_mb": peak_rss_mb(),
        "peak_device_mb": peak_device_mb(),
    }


def bench_dpo(work, w, vocab, rng):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    b, n, half = w["reward_batch_size"], ARGS.warmup + ARGS.iters, w["reward_seq_len"] // 2
    ids = lambda: random_ids(rng, b * n, half, vocab)
    tokenized = Dataset.from_dict({"prompt_ids": ids(), "chosen_ids": ids(), "rejected_ids": ids()})
    tok = AutoTokenizer.from_pretrained(work / "model")
    args = DPOConfig(
        per_device_train_batch_size=b,
        max_steps=n,
        max_length=None,
        beta=0.1,
        loss_type=["sigmoid"],
        learning_rate=1e-6,
        precompute_ref_log_probs=False,
        model_init_kwargs={"dtype": torch.float32},
        **common_args(work / "trl-dpo"),
    )
    phases = {"reference_s": [], "optimizer_s": []}
    timer = StepTimer()
    text = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})
    trainer = DPOTrainer(
        model=str(work / "model"),
        args=args,
        train_dataset=text,
        processing_class=tok,
        callbacks=[timer, OptimizerTimer(phases)],
        peft_config=lora_config("CAUSAL_LM"),
    )
    trainer.train_dataset = tokenized  # exact lengths: the collator reads these columns
    ref = trainer.ref_model
    if ref is not None:
        ref.forward = timed(ref.forward, phases["reference_s"])
    reset_peak_rss()
    reset_peak_device()
    trainer.train()
    skip = ARGS.warmup
    step_s = statistics.median(timer.times[skip:])
    med = lambda k: statistics.median(phases[k][skip:]) if phases[k] else 0.0
    reference_s, optimizer_s = med("reference_s"), med("optimizer_s")
    return {
        "pairs": b,
        "seq_len": w["reward_seq_len"],
        "precomputed": False,
        "step_s": step_s,
        "policy_s": step_s - reference_s - optimizer_s,
        "reference_s": reference_s,
        "optimizer_s": optimizer_s,
        "peak_rss_mb": peak_rss_mb(),
        "peak_device_mb": peak_device_mb(),
    }


def trl_version():
    try:
        import trl

        return trl.__version__
    except ImportError:
        return None


def peft_version():
    try:
        import peft

        return peft.__version__
    except ImportError:
        return None


def main():
    shape_path = Path(ARGS.shape)
    shape = tomllib.loads(shape_path.read_text())
    w, vocab = shape["workload"], shape["config"]["vocab_size"]
    work = Path(ARGS.work_dir)
    rng = torch.Generator().manual_seed(0)
    parts = ARGS.parts.split(",")
    report = {
        "shape": shape_path.stem,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl_version(),
        "cpu": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "dtype": ARGS.dtype,
        "lora_r": ARGS.lora,
        "peft": peft_version(),
        "iters": ARGS.iters,
        "activation_checkpointing": ARGS.activation_checkpointing == "on",
        "reward": None,
        "sft": None,
        "generate": [],
        "ppo": [],
        "online": [],
        "dpo": [],
    }
    if "reward" in parts:
        report["reward"] = bench_reward(work, w, vocab, rng)
    if "sft" in parts:
        report["sft"] = bench_sft(work, w, vocab, rng)
    if "generate" in parts:
        report["generate"] = bench_generate(work, w, vocab, rng)
    if "ppo" in parts:
        for variant in ARGS.ppo_variants.split(","):
            report["ppo"].append(bench_ppo(work, w, variant))
    for algo in ("grpo", "rloo"):
        if algo in parts:
            report["online"].append(bench_online(work, w, algo))
    if "dpo" in parts:
        report["dpo"].append(bench_dpo(work, w, vocab, rng))
    print(json.dumps(report, indent=2))
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
