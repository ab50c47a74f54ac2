//! Activation checkpointing in every trainer: the same seed gives the same
//! weights, byte for byte, with it on and off (policy, critic, LoRA with
//! dropout). The other tests run with it off where it only costs time.

use std::path::Path;

use candle_rlhf::app::task::Task;
use candle_rlhf::kernels::recompute::{recomputed_on_this_thread, skipped_on_this_thread};
use candle_rlhf::signal::StopSignal;
use candle_rlhf::trainers::online::Algo;
use candle_rlhf::trainers::{dpo, reward, sft};

use crate::models::fixtures_root;
use crate::ppo::{low_half, ppo_config};
use crate::train_with_reward;

/// Fails unless `run` writes the same `files` into its checkpoint with
/// checkpointing off and on. Returns whether the recomputations skipped
/// the value of a layer's last product (never without checkpointing).
fn assert_same(
    what: &str,
    run: impl Fn(&Path, &str) -> std::path::PathBuf,
    tmp: &Path,
    files: &[&str],
) -> bool {
    let mut skipped = false;
    let w: Vec<Vec<Vec<u8>>> = [false, true]
        .iter()
        .map(|on| {
            let dir = tmp.join(format!("{what}-{on}").replace([' ', ','], "-"));
            let (before, skips) = (recomputed_on_this_thread(), skipped_on_this_thread());
            let checkpoint = run(&dir, &format!("train.activation_checkpointing={on}"));
            let recomputed = recomputed_on_this_thread() > before;
            assert_eq!(recomputed, *on, "{what}: layers recomputed: {recomputed}");
            skipped = skipped_on_this_thread() > skips;
            assert!(
                *on || !skipped,
                "{what}: a value skipped without checkpointing"
            );
            files
                .iter()
                .map(|f| std::fs::read(checkpoint.join(f)).unwrap())
                .collect()
        })
        .collect();
    assert!(
        w[0] == w[1],
        "{what}: checkpointing changed the trained weights"
    );
    skipped
}

#[test]
fn offline_trainers_train_the_same_weights_with_checkpointing_on_and_off() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("sft.jsonl");
    candle_rlhf::app::fixtures::write_jsonl(&data, &Task::new(0, "sft").sft_rows(64)).unwrap();
    let stop = StopSignal::new();
    let few = ["train.max_steps=3", "train.save_steps=3"];
    // Two micro-batches per step: with checkpointing on, the layers'
    // gradients are added into the step's sums in place during the backward.
    let sft_run = |dir: &Path, on: &str| {
        let two = "train.gradient_accumulation_steps=2";
        let cfg = crate::sft::sft_config(dir, &data, &[few[0], few[1], two, on]);
        sft::train(&cfg, dir, false, &stop).unwrap().checkpoint
    };
    assert_same("sft", sft_run, tmp.path(), &["model.safetensors"]);
    let lora = [
        "lora.r=4",
        "lora.lora_alpha=8",
        "lora.lora_dropout=0.1",
        "lora.target_modules=\"all-linear\"",
    ];
    let reward_run = |dir: &Path, on: &str| {
        let mut sets = vec![few[0], few[1], on];
        sets.extend(lora);
        let cfg = crate::reward::config(dir, &sets);
        reward::train(&cfg, dir, false, &stop).unwrap().checkpoint
    };
    let files = ["adapter_model.safetensors"];
    // The LoRA layers' last products (MLP down projections) are recomputed
    // without their values.
    assert!(assert_same("reward, LoRA", reward_run, tmp.path(), &files));
    let dpo_run = |dir: &Path, on: &str| {
        let sets: Vec<String> = [
            format!("run.out={:?}", dir.to_string_lossy()),
            "train.max_steps=3".into(),
            "train.save_steps=3".into(),
            on.into(),
        ]
        .into();
        dpo::train(&crate::dpo::tiny_config(&sets), dir, false, &stop)
            .unwrap()
            .checkpoint
    };
    assert_same("dpo", dpo_run, tmp.path(), &["model.safetensors"]);
}

#[test]
fn online_trainers_train_the_same_policy_and_critic_with_checkpointing_on_and_off() {
    let tmp = tempfile::tempdir().unwrap();
    let reward_dir = fixtures_root().join("reward/tiny-gpt2");
    let stop = StopSignal::new();
    // PPO with a critic started from the reward model, in full and with LoRA
    // (dropout on the policy's adapters; the critic has adapters of its own).
    for lora in [false, true] {
        let run = |dir: &Path, on: &str| {
            let mut sets = vec![
                "ppo.total_episodes=16",
                "train.save_steps=2",
                "ppo.value_model=\"reward\"",
                on,
            ];
            if lora {
                sets.extend([
                    "lora.r=4",
                    "lora.lora_alpha=8",
                    "lora.lora_dropout=0.1",
                    "lora.target_modules=\"all-linear\"",
                    "lora.critic=true",
                ]);
            }
            let cfg = ppo_config(dir, &sets);
            train_with_reward(&cfg, dir, false, &stop, &low_half, Some(&reward_dir))
                .unwrap()
                .checkpoint
        };
        let files = match lora {
            true => ["adapter_model.safetensors", "critic.safetensors"],
            false => ["model.safetensors", "critic.safetensors"],
        };
        let skipped = assert_same(&format!("ppo, lora {lora}"), run, tmp.path(), &files);
        assert!(skipped || !lora, "ppo with LoRA: no value skipped");
    }
    for algo in [Algo::Grpo, Algo::Rloo] {
        let run = |dir: &Path, on: &str| {
            let extra = ["train.max_steps=2", "train.save_steps=2", on];
            let cfg = crate::grpo::config(algo, dir, &extra);
            candle_rlhf::trainers::online::train_with_reward(
                &cfg, algo, dir, false, &stop, &low_half, None,
            )
            .unwrap()
            .checkpoint
        };
        let name = algo.trainer().name();
        assert_same(name, run, tmp.path(), &["model.safetensors"]);
    }
}
