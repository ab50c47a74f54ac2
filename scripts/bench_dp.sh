#!/usr/bin/env bash
# Data parallelism on one machine: 1 rank x 2 threads against 2 ranks x 1
# thread (mpirun), the same global batch, for the GPT-2 reward step (8 pairs
# of about 128 tokens) and a GRPO iteration (the gpt2 shape's bench workload:
# 2 prompts x 4 completions of 53 tokens, a reward model, beta 0.04), on the
# random GPT-2 weights `candle-rlhf bench` writes. Prints the median seconds
# per step (from metrics.jsonl's timestamps, the first step left out) and the
# bytes rank 0 sent into collectives per step.
#
#   cargo build --release --features mpi
#   target/release/candle-rlhf bench --model configs/models/gpt2.toml --parts grpo --work-dir runs/bench-compare/gpt2
#   scripts/bench_dp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/candle-rlhf
WORK=${WORK:-runs/bench-compare/gpt2}
OUT=${OUT:-runs/dp}
STEPS=${STEPS:-7}
mkdir -p "$OUT"

# Preference pairs of about 128 GPT-2 tokens, from the fixtures' sentences.
python3 - "$OUT/long-pairs.jsonl" <<'EOF'
import json, random, sys
random.seed(0)
rows = [json.loads(l) for l in open("fixtures/data/preferences.jsonl")]
sents = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
def long():
    t = ""
    while len(t) < 520:
        t += " " + random.choice(sents)
    return t
with open(sys.argv[1], "w") as f:
    for i in range(400):
        f.write(json.dumps({"prompt": rows[i % len(rows)]["prompt"], "chosen": long(), "rejected": long()}) + "\n")
EOF

# median seconds per step after the first, from a run's metrics.jsonl
per_step() {
    python3 - "$1" <<'EOF'
import json, statistics, sys
t = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
t = [r["timestamp"] for r in t if "grad_norm" in r]
print(f"{statistics.median(b - a for a, b in zip(t[1:], t[2:])):.3f}")
EOF
}

run() { # name ranks threads per-device-batch command args...
    local name=$1 np=$2 threads=$3 batch=$4
    shift 4
    rm -rf "${OUT:?}/$name"
    local launch=("$BIN")
    [ "$np" -gt 1 ] && launch=(mpirun --allow-run-as-root --oversubscribe -np "$np" "$BIN")
    "${launch[@]}" "$@" --out "$OUT/$name" --set run.threads="$threads" \
        --set train.per_device_train_batch_size="$batch" --set train.max_steps="$STEPS" \
        --set train.logging_steps=1 --set train.save_steps=100000 \
        > "$OUT/$name.log" 2>&1
    local sent
    sent=$(sed -n 's/.*sent \([0-9.]*\) MB.*/\1/p' "$OUT/$name.log")
    echo "$name: $(per_step "$OUT/$name") s/step, rank 0 sent ${sent:-0} MB in $STEPS steps"
}

reward=(reward --set "model.name_or_path=\"$WORK/model\"" --set "reward.dataset=\"$OUT/long-pairs.jsonl\""
    --set reward.max_length=160 --set reward.eval_ratio=0.01 --set train.activation_checkpointing=false)
run reward-1x2 1 2 8 "${reward[@]}"
run reward-2x1 2 1 4 "${reward[@]}"

grpo=(grpo --config "$WORK/grpo-run/config.toml"
    --set train.activation_checkpointing=false)
run grpo-1x2 1 2 8 "${grpo[@]}"
run grpo-2x1 2 1 4 "${grpo[@]}"
