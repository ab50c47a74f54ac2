#!/usr/bin/env bash
# Learning against TRL: candle-rlhf grpo/rloo and TRL 1.12's GRPOTrainer /
# RLOOTrainer on the same policy, prompts, reward, batch, schedule,
# sampling and evaluation, over several seeds; prints the held-out reward
# gain (final eval reward minus initial eval reward) per seed and the mean
# ± standard error of each side, and their ratio (the project's target:
# ours at least 0.8x TRL's).
#
#   scripts/learn_compare.sh [grpo|rloo|both] [SEEDS]     (default: both 5)
#
# Seeds 1..SEEDS. Each run uses one CPU thread (--threads 1;
# torch.set_num_threads(1) and OMP_NUM_THREADS=1), the runs go one after
# another. About 15-20 s per run on a 2-core machine.
#
# Environment:
#   LEARN_BIN    the candle-rlhf binary            (default /tmp/learn-bin)
#   LEARN_PY     Python with torch, transformers, trl (default .venv-bench/bin/python;
#                scripts/bench-requirements.txt)
#   LEARN_MODEL  the policy directory, built by scripts/make_tiny_policy.py when
#                missing                           (default fixtures/models/learn-llama)
#
# Writes under runs/learn-compare/ (ignored by git): data/{train,eval}.jsonl,
# config.toml (read by both sides), <algo>/candle-seed<N>/ (the candle-rlhf
# run directory: metrics.jsonl, eval-*.jsonl), <algo>/trl-seed<N>.json (the
# TRL run: eval rewards, log history), logs/, results.json, results.md.
set -euo pipefail
cd "$(dirname "$0")/.."

WHICH=${1:-both}
SEEDS=${2:-5}
BIN=${LEARN_BIN:-/tmp/learn-bin}
PY=${LEARN_PY:-.venv-bench/bin/python}
MODEL=${LEARN_MODEL:-fixtures/models/learn-llama}
OUT=runs/learn-compare

case "$WHICH" in
  grpo | rloo) ALGOS=("$WHICH") ;;
  both) ALGOS=(grpo rloo) ;;
  *) echo "usage: $0 [grpo|rloo|both] [SEEDS]" >&2; exit 2 ;;
esac

mkdir -p "$OUT/logs"
"$PY" scripts/learn_data.py "$OUT/data"
if [ ! -f "$MODEL/model.safetensors" ]; then
  "$PY" scripts/make_tiny_policy.py "$MODEL"
fi

# The one config both sides read (scripts/learn_trl.py maps every key of
# [train] and the algorithm's section onto TRL's config; it refuses a
# missing key). Comments mark the values that differ from candle-rlhf's
# defaults (src/config/sections.rs); the rest are written out anyway.
cat > "$OUT/config.toml" <<EOF
# Written by scripts/learn_compare.sh; read by candle-rlhf and scripts/learn_trl.py.

[model]
name_or_path = "$MODEL"            # scripts/make_tiny_policy.py: tiny Llama, transformers-initialised, SFT warm start

[run]
device = "cpu"                     # default: auto

[train]
learning_rate = 3e-4               # default 5e-5: the tiny policy learns in 100 steps, final eval reward well below 0.9
lr_scheduler_type = "linear"
warmup_steps = 0
weight_decay = 0.0
adam_beta1 = 0.9
adam_beta2 = 0.999
adam_epsilon = 1e-8
max_grad_norm = 1.0
per_device_train_batch_size = 32   # default 8: one generation batch, 4 prompts x 8 completions
gradient_accumulation_steps = 1
max_steps = 100                    # default: unset (epochs)
logging_steps = 10
save_steps = 500                   # default; only the final checkpoint is written

[grpo]
dataset = "$OUT/data/train.jsonl"
eval_dataset = "$OUT/data/eval.jsonl"   # default: none (no evaluation)
max_prompt_length = 64             # default 512: prompts here are under 10 tokens
num_generations = 8
num_generations_eval = 32          # default: num_generations; 25 held-out prompts x 32 = 800 completions per evaluation
max_completion_length = 16         # default 512 (256 before beb95cf): completions here are 2-6 tokens and EOS
temperature = 1.0
top_p = 1.0
beta = 0.04                        # default 0.0 (TRL 1.12's too): a k3 KL to the initial policy
epsilon = 0.2
num_iterations = 1
steps_per_generation = 1           # default: unset, = gradient_accumulation_steps (1)
mask_truncated_completions = false
disable_dropout = false
loss_type = "dapo"
scale_rewards = "group"
importance_sampling_level = "token"

[rloo]
dataset = "$OUT/data/train.jsonl"
eval_dataset = "$OUT/data/eval.jsonl"   # default: none (no evaluation)
max_prompt_length = 64             # default 512
num_generations = 8                # default 2: the same groups as GRPO
num_generations_eval = 32          # default: num_generations
max_completion_length = 16         # default 512 (256 before beb95cf)
temperature = 1.0
top_p = 1.0
beta = 0.05
epsilon = 0.2
num_iterations = 1
steps_per_generation = 1           # default: unset, = gradient_accumulation_steps (1)
mask_truncated_completions = false
disable_dropout = false
normalize_advantages = false

# scripts/learn_reward.py: the fraction of the completion's words of the
# row's target kind (TRL imports the same file's kind_reward).
[[reward_funcs]]
name = "kind_reward"
type = "command"
command = ["python3", "-S", "scripts/learn_reward.py"]
EOF

started=$(date +%s)
for algo in "${ALGOS[@]}"; do
  mkdir -p "$OUT/$algo"
  for seed in $(seq 1 "$SEEDS"); do
    run="$OUT/$algo/candle-seed$seed"
    rm -rf "$run"
    t0=$(date +%s.%N)
    "$BIN" "$algo" --config "$OUT/config.toml" --out "$run" --seed "$seed" --threads 1 \
      > "$OUT/logs/$algo-candle-seed$seed.log" 2>&1
    t1=$(date +%s.%N)
    echo "{\"seconds\": $(awk "BEGIN{print $t1 - $t0}")}" > "$run/wall.json"
    grep -E "^eval (before|after)" "$OUT/logs/$algo-candle-seed$seed.log" | sed "s/^/$algo seed $seed candle-rlhf: /"

    OMP_NUM_THREADS=1 "$PY" scripts/learn_trl.py "$algo" --config "$OUT/config.toml" --seed "$seed" \
      --threads 1 --out "$OUT/$algo/trl-seed$seed.json" > "$OUT/logs/$algo-trl-seed$seed.log" 2>&1
    grep -E "^eval (before|after)" "$OUT/logs/$algo-trl-seed$seed.log" | sed "s/^/$algo seed $seed TRL:         /"
  done
done
echo "all runs: $(( $(date +%s) - started )) s"

"$PY" - "$OUT" "$SEEDS" "${ALGOS[@]}" <<'PY'
import json, math, os, sys

out, seeds, algos = sys.argv[1], int(sys.argv[2]), sys.argv[3:]


def candle(algo, seed):
    run = os.path.join(out, algo, f"candle-seed{seed}")
    evals = [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "eval/reward" in r]
    wall = json.load(open(os.path.join(run, "wall.json")))["seconds"]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] > 0, run
    return first["eval/reward"], last["eval/reward"], wall


def trl(algo, seed):
    r = json.load(open(os.path.join(out, algo, f"trl-seed{seed}.json")))
    return r["eval_before"], r["eval_after"], r["seconds"]


def mean_se(xs):
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, sd / math.sqrt(len(xs))


results, lines = {}, []
for algo in algos:
    rows = [(s, candle(algo, s), trl(algo, s)) for s in range(1, seeds + 1)]
    lines.append(f"\n{algo.upper()}: held-out eval reward (max 1.0), seeds 1..{seeds}\n")
    lines.append("| seed | candle-rlhf start | end | gain | s | TRL start | end | gain | s |")
    lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s, c, t in rows:
        lines.append(
            f"| {s} | {c[0]:.4f} | {c[1]:.4f} | {c[1] - c[0]:+.4f} | {c[2]:.1f}"
            f" | {t[0]:.4f} | {t[1]:.4f} | {t[1] - t[0]:+.4f} | {t[2]:.1f} |"
        )
    cg = [c[1] - c[0] for _, c, _ in rows]
    tg = [t[1] - t[0] for _, _, t in rows]
    (cm, cse), (tm, tse) = mean_se(cg), mean_se(tg)
    ratio = cm / tm if tm else float("nan")
    lines.append(
        f"\nmean gain ± s.e.: candle-rlhf {cm:.4f} ± {cse:.4f}, TRL {tm:.4f} ± {tse:.4f};"
        f" ratio {ratio:.3f} (target >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'})"
    )
    results[algo] = {
        "seeds": [
            {"seed": s, "candle": {"start": c[0], "end": c[1], "seconds": c[2]},
             "trl": {"start": t[0], "end": t[1], "seconds": t[2]}}
            for s, c, t in rows
        ],
        "candle_gain_mean": cm, "candle_gain_se": cse,
        "trl_gain_mean": tm, "trl_gain_se": tse, "ratio": ratio,
    }
text = "\n".join(lines) + "\n"
print(text)
with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text)
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
PY
