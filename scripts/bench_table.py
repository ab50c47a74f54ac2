#!/usr/bin/env python3
"""Prints the comparison table of scripts/bench_compare.sh (standard library only).

    python3 scripts/bench_table.py OUT_DIR SHAPE [SHAPE ...]

reads OUT_DIR/SHAPE-candle-tN.json and OUT_DIR/SHAPE-torch-tN.json for every
thread count N found, takes each side at its best thread count per row, and
prints a Markdown table: both figures (with the thread count), and the time
ratio candle / torch (below 1.0: candle-rlhf is faster).
"""
import json
import sys
from pathlib import Path


def load(out, shape, side):
    runs = {}
    for path in sorted(out.glob(f"{shape}-{side}-t*.json")):
        threads = int(path.stem.rsplit("-t", 1)[1])
        runs[threads] = json.loads(path.read_text())
    return runs


def best(runs, get):
    """(seconds, threads, rss) with the fewest seconds over thread counts."""
    found = [(s, t, rss) for t, r in runs.items() if (v := get(r)) for s, rss in [v]]
    return min(found) if found else None


def rows(candle, torch):
    def reward(r):
        x = r.get("reward")
        return (x["step_s"], x["peak_rss_mb"]) if x else None

    def sft(r):
        x = r.get("sft")
        return (x["step_s"], x["peak_rss_mb"]) if x else None

    def gen(b):
        def get(r):
            for g in r.get("generate") or []:
                if g["batch_size"] == b:
                    return (g["seconds"], g["peak_rss_mb"])
            return None

        return get

    def ppo_candle(r):
        x = r.get("ppo")
        return (x["iteration"]["total_s"], x["peak_rss_mb"]) if x else None

    def ppo_torch(variant):
        def get(r):
            for x in r.get("ppo") or []:
                if x["variant"] == variant:
                    return (x["iteration_s"], x["peak_rss_mb"])
            return None

        return get

    def online(algo, candle_side):
        def get(r):
            for x in r.get("online") or []:
                if x["algo"] == algo:
                    t = x["iteration"]["total_s"] if candle_side else x["iteration_s"]
                    return (t, x["peak_rss_mb"])
            return None

        return get

    def split(r, algo, candle_side):
        """The phase split: generation / log-probs / scoring / update, in s."""
        for x in r.get("online") or []:
            if x["algo"] == algo:
                p = x["iteration"] if candle_side else x
                return "/".join(f"{p[k]:.3f}" for k in ("generate_s", "forward_s", "score_s", "update_s"))
        return None

    def dpo(precomputed):
        def get(r):
            for x in r.get("dpo") or []:
                if x["precomputed"] == precomputed:
                    return (x["step_s"], x["peak_rss_mb"])
            return None

        return get

    def dpo_split(r, precomputed):
        for x in r.get("dpo") or []:
            if x["precomputed"] == precomputed:
                return "/".join(f"{x[k]:.3f}" for k in ("policy_s", "reference_s", "optimizer_s"))
        return None

    def reward_split(r):
        x = r.get("reward") or {}
        if "forward_s" not in x:  # runs before the phases were recorded
            return "-"
        return "/".join(f"{x[k]:.3f}" for k in ("forward_s", "backward_s", "optimizer_s"))

    any_run = next(iter(candle.values()), {}) or next(iter(torch.values()), {})
    c, t = best(candle, reward), best(torch, reward)
    yield "reward step (s)", c, t, None
    if c or t:
        cs = reward_split(candle[c[1]]) if c else "-"
        ts = reward_split(torch[t[1]]) if t else "-"
        PHASES.append(f"reward step: candle-rlhf {cs}; TRL {ts} (forward/backward/optimizer, s, at each side's best thread count)")
    if best(candle, sft) or best(torch, sft):
        yield "SFT step (s)", best(candle, sft), best(torch, sft), None
    for g in any_run.get("generate") or []:
        b = g["batch_size"]
        tokens = b * g["new_tokens"]
        yield f"generate batch {b} (s; tokens/s)", best(candle, gen(b)), best(torch, gen(b)), tokens
    yield "PPO iteration vs TRL as shipped (s)", best(candle, ppo_candle), best(torch, ppo_torch("shipped")), None
    yield "PPO iteration vs TRL without gc.collect (s)", best(candle, ppo_candle), best(torch, ppo_torch("nogc")), None
    for algo in ("grpo", "rloo"):
        c, t = best(candle, online(algo, True)), best(torch, online(algo, False))
        if c or t:
            yield f"{algo.upper()} iteration (s)", c, t, None
            cs = split(candle[c[1]], algo, True) if c else "-"
            ts = split(torch[t[1]], algo, False) if t else "-"
            PHASES.append(f"{algo.upper()}: candle-rlhf {cs}; TRL {ts} (generation/log-probs/scoring/update, s, at each side's best thread count)")
    c, t = best(candle, dpo(False)), best(torch, dpo(False))
    if c or t:
        yield "DPO step, reference model (s)", c, t, None
        cs = dpo_split(candle[c[1]], False) if c else "-"
        ts = dpo_split(torch[t[1]], False) if t else "-"
        PHASES.append(f"DPO: candle-rlhf {cs}; TRL {ts} (policy forward+backward/reference forward/optimizer, s, at each side's best thread count)")
        p = best(candle, dpo(True))
        if p:
            yield "DPO step, precomputed reference log-probs, candle-rlhf only (s)", p, None, None


PHASES = []


def cell(x, tokens):
    if x is None:
        return "-", "-"
    s, t, rss = x
    fig = f"{s:.3f} s" + (f" ({tokens / s:.0f} tok/s)" if tokens else "") + f", {t} thr"
    return fig, f"{rss:.0f} MB"


def main():
    out = Path(sys.argv[1])
    for shape in sys.argv[2:]:
        candle, torch = load(out, shape, "candle"), load(out, shape, "torch")
        meta = next(iter(candle.values()), {})
        tmeta = next(iter(torch.values()), {})
        lora = meta.get("lora_r")
        tuned = f", LoRA r={lora} on every linear layer (peft {tmeta.get('peft', '?')} on PyTorch's side)" if lora else ", full fine-tuning"
        print(
            f"\n### {shape} ({meta.get('parameters', 0) / 1e6:.1f}M parameters{tuned}): "
            f"{meta.get('cpu', '?')}, {meta.get('date', '?')}, commit {meta.get('commit', '?')}; "
            f"torch {tmeta.get('torch', '?')}, transformers {tmeta.get('transformers', '?')}, "
            f"TRL {tmeta.get('trl', '?')}; threads tried: candle {sorted(candle)}, torch {sorted(torch)}\n"
        )
        print("| workload | candle-rlhf | PyTorch/TRL | time ratio | peak RSS candle | peak RSS torch |")
        print("|---|---|---|---|---|---|")
        for name, c, t, tokens in rows(candle, torch):
            cf, crss = cell(c, tokens)
            tf, trss = cell(t, tokens)
            ratio = f"{c[0] / t[0]:.2f}" if c and t else "-"
            print(f"| {name} | {cf} | {tf} | {ratio} | {crss} | {trss} |")
        for line in PHASES:
            print(f"\n{line}")
        PHASES.clear()


if __name__ == "__main__":
    main()
