#!/usr/bin/env bash
# The sha256 of the weight files that short tiny runs of every online
# algorithm write, one line per run: what a refactor of the online engine
# must leave byte-identical (same seed, same thread count).
#
#   scripts/online_sha.sh BINARY OUT_DIR > table.txt
#
# BINARY: a built candle-rlhf; OUT_DIR: where the runs go (wiped first).
# Needs the fixtures (`candle-rlhf fixtures --out fixtures`).
set -euo pipefail
bin=$(realpath "$1"); out=$2
cd "$(dirname "$0")/.."
rm -rf "$out"; mkdir -p "$out"
[ -d fixtures/models/tiny-gpt2 ] || "$bin" fixtures --out fixtures >/dev/null

ppo=(--config configs/tiny-ppo.toml --threads 2 --seed 3
     --set ppo.total_episodes=48 --set train.save_steps=100
     --set ppo.eval_dataset="\"fixtures/data/preferences.jsonl\"")
grpo=(--config configs/grpo-tiny.toml --threads 2 --seed 3
      --set train.max_steps=3 --set train.save_steps=100)
lora=(--set lora.r=4 --set lora.lora_alpha=8 --set 'lora.target_modules="all-linear"')

run() { # name, subcommand, args...
  local name=$1 cmd=$2; shift 2
  "$bin" "$cmd" --out "$out/$name" "$@" >"$out/$name.log" 2>&1 || { echo "$name FAILED (see $out/$name.log)"; return; }
  local ck; ck=$(ls -d "$out/$name"/checkpoints/* | sort -t/ -k4 -n | tail -1)
  for f in model.safetensors adapter_model.safetensors critic.safetensors value_head.safetensors; do
    [ -f "$ck/$f" ] && printf '%-28s %-26s %s\n' "$name" "$f" "$(sha256sum "$ck/$f" | cut -c1-16)"
  done
  return 0
}

run ppo-gae-head        ppo "${ppo[@]}" --set ppo.value_model='"head"'
run ppo-gae-critic      ppo "${ppo[@]}" --set ppo.value_model='"reward"'
run ppo-gae-lora-critic ppo "${ppo[@]}" --set ppo.value_model='"reward"' "${lora[@]}" --set lora.critic=true
run ppo-reinforce       ppo "${ppo[@]}" --set ppo.advantage_estimator='"reinforce"'
run ppo-reinforce-base  ppo "${ppo[@]}" --set ppo.advantage_estimator='"reinforce_baseline"' --set ppo.n_samples_per_prompt=4
run ppo-gae-kl-adapt    ppo "${ppo[@]}" --set ppo.value_model='"head"' --set ppo.adap_kl_ctrl=true --set ppo.whiten_rewards=true --set ppo.missing_eos_penalty=1.0
# Each loss_type on tiny-chat, whose completions stop at different lengths
# (tiny-gpt2's all run to the budget, where the four reductions differ by a
# power-of-two scale that AdamW cancels exactly).
chat=(--set 'model.name_or_path="fixtures/models/tiny-chat"')
for lt in grpo dr_grpo dapo bnpo; do
  run grpo-$lt grpo "${grpo[@]}" "${chat[@]}" --set grpo.loss_type="\"$lt\"" --set grpo.beta=0.04
done
run grpo-sequence     grpo "${grpo[@]}" --set grpo.importance_sampling_level='"sequence"' --set grpo.num_iterations=2
run grpo-scale-batch  grpo "${grpo[@]}" --set grpo.scale_rewards='"batch"' --set grpo.steps_per_generation=2
run grpo-scale-none   grpo "${grpo[@]}" --set grpo.scale_rewards='"none"' --set grpo.mask_truncated_completions=true
run grpo-lora         grpo "${grpo[@]}" "${lora[@]}" --set grpo.beta=0.04 --set lora.lora_dropout=0.1
run grpo-eval         grpo "${grpo[@]}" --set grpo.eval_dataset="\"fixtures/data/preferences.jsonl\""
run rloo              rloo "${grpo[@]}"
run rloo-chat-masked  rloo "${grpo[@]}" "${chat[@]}" --set rloo.mask_truncated_completions=true
run rloo-norm-clip    rloo "${grpo[@]}" --set rloo.normalize_advantages=true --set 'rloo.reward_clip_range=[0.0, 1.0]' --set rloo.num_iterations=2
