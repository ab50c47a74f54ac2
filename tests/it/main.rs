//! The one integration-test binary (each test binary links candle, so one
//! binary keeps builds short). Modules by subject.

mod chat;
mod checkpoint;
mod cli;
mod config;
mod grpo;
mod hub;
mod layout;
mod lora;
mod mixed_precision;
mod models;
mod ppo;
mod ppo_io;
mod reference;
mod reward;
mod sft;
mod tokenizer;
mod toy;
mod training;

use std::path::PathBuf;

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
