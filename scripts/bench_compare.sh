#!/usr/bin/env bash
# Side-by-side CPU benchmark: `candle-rlhf bench` and the same workloads in
# PyTorch/TRL (scripts/bench_trl.py), on the same random weights and inputs,
# at each thread count; then one table with each side at its best thread count
# and the ratios (scripts/bench_table.py). Not part of CI.
#
#   scripts/bench_compare.sh [SHAPE ...]      # default: tiny gpt2
#
# Environment: THREADS ("1 2"), ITERS (3), WARMUP (1), PARTS
# (reward,generate,ppo,grpo,rloo,dpo), OUT (runs/bench-compare, or runs/bench-compare-loraR),
# VENV (.venv-bench), LORA (a rank R: LoRA on every linear layer, lora_alpha
# 2R, on both sides; peft on PyTorch's), AC (on|off, default off: activation
# checkpointing on both sides), WORK (where the random weights are written,
# default OUT: a shared WORK keeps model generation out of later runs' memory).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-"1 2"}
ITERS=${ITERS:-3}
WARMUP=${WARMUP:-1}
PARTS=${PARTS:-reward,generate,ppo,grpo,rloo,dpo}
LORA=${LORA:-}
AC=${AC:-off}
OUT=${OUT:-runs/bench-compare${LORA:+-lora$LORA}-ac-$AC}
WORK=${WORK:-$OUT}
LORA_FLAG=()
[ -z "$LORA" ] || LORA_FLAG=(--lora "$LORA")
VENV=${VENV:-.venv-bench}
SHAPES=("$@")
[ ${#SHAPES[@]} -gt 0 ] || SHAPES=(tiny gpt2)

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r scripts/bench-requirements.txt
fi
cargo build --release -q
mkdir -p "$OUT"
for shape in "${SHAPES[@]}"; do
    for t in $THREADS; do
        echo "== $shape, $t thread(s): candle-rlhf" >&2
        target/release/candle-rlhf bench --model "configs/models/$shape.toml" \
            --threads "$t" --iters "$ITERS" --warmup "$WARMUP" --parts "$PARTS" \
            --work-dir "$WORK/$shape" --json "$OUT/$shape-candle-t$t.json" "${LORA_FLAG[@]}" \
            --activation-checkpointing "$AC" >&2
        echo "== $shape, $t thread(s): PyTorch/TRL" >&2
        "$VENV/bin/python" scripts/bench_trl.py --shape "configs/models/$shape.toml" \
            --threads "$t" --iters "$ITERS" --warmup "$WARMUP" --parts "$PARTS" \
            --work-dir "$WORK/$shape" --json "$OUT/$shape-torch-t$t.json" "${LORA_FLAG[@]}" \
            --activation-checkpointing "$AC" > /dev/null
    done
done
python3 scripts/bench_table.py "$OUT" "${SHAPES[@]}"
