//! The one integration-test binary (each test binary links candle, so one
//! binary keeps builds short). Modules by subject.

mod chat;
mod checkpoint;
mod cli;
mod config;
#[cfg(feature = "mpi")]
mod dist;
mod docs;
mod dpo;
mod grpo;
mod hub;
mod layout;
mod lora;
mod memory;
mod mixed_precision;
mod models;
mod online;
mod ppo;
mod ppo_io;
mod reference;
mod reward;
mod sft;
mod tokenizer;
mod toy;
mod training;
mod vendor;

use std::path::{Path, PathBuf};

/// PPO (or REINFORCE++, as the config's advantage_estimator says) against
/// one reward: the online engine with `[ppo]`.
pub fn train_with_reward(
    cfg: &candle_rlhf::config::Config,
    dir: &Path,
    resume: bool,
    stop: &candle_rlhf::signal::StopSignal,
    reward: &dyn candle_rlhf::rewards::Reward,
    reward_dir: Option<&Path>,
) -> candle_rlhf::Result<candle_rlhf::trainers::online::OnlineRun> {
    use candle_rlhf::trainers::online::{self, Trainer};
    let algo = Trainer::Ppo.algo(cfg);
    online::train_with_reward(cfg, algo, dir, resume, stop, reward, reward_dir)
}

/// The binary under test: `CANDLE_RLHF_BIN` when the tests run away from
/// their build (scripts/gpu_run.sh on a machine without Rust), else cargo's.
pub fn bin() -> PathBuf {
    std::env::var_os("CANDLE_RLHF_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_candle-rlhf").into())
}

/// The source tree (configs, golden files): `CANDLE_RLHF_REPO`, else the
/// one the tests were built from.
pub fn repo() -> PathBuf {
    std::env::var_os("CANDLE_RLHF_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}

/// The compute device of the tests (CUDA in a `--features cuda` build on a
/// GPU machine, else the CPU; see `device::test_device_spec`).
pub fn dev() -> candle_core::Device {
    candle_rlhf::device::test_device()
}

/// `run.device` for test configs, the same device as [`dev`].
pub fn device_setting() -> String {
    format!("run.device={:?}", candle_rlhf::device::test_device_spec())
}
