//! candle-rlhf: RLHF on Candle. Reward-model training with the logsigmoid
//! Bradley-Terry loss and batched PPO with a KL penalty to a frozen
//! reference, on CPU, CUDA or Metal, with Hugging Face-layout checkpoints.
//!
//! The modules, grouped in pipeline order. Their dependencies run one way:
//! tests/it/layout.rs fails on an import cycle, on a kernel that imports the
//! rest, and on a pipeline module that imports the application.

// Foundations: errors, seeded randomness, devices, files, Ctrl-C, configs.
pub mod clock;
pub mod config;
pub mod device;
pub mod dist;
pub mod error;
pub mod io;
pub mod rng;
pub mod signal;

// Inputs: model and dataset resolution, tokenizers, data to batches.
pub mod chat;
pub mod data;
pub mod hub;
pub mod tokenizer;

// Compute: fused CPU kernels, the model architectures, sampling.
pub mod generate;
pub mod kernels;
pub mod models;

// Learning: the RL math, rewards, the optimizer core, the trainers.
pub mod optim;
pub mod rewards;
pub mod rl;
pub mod trainers;

// Outputs: checkpoints, run directories, metrics, plots.
pub mod checkpoint;
pub mod metrics;
pub mod plot;
pub mod run;

// The application on top: demo, bench, fixture generator.
pub mod app;

pub use config::Config;
pub use error::{Error, IoContext, Result};
pub use rng::HostRng;

/// docs/library.md, whose examples `cargo test --doc` runs.
#[cfg(doctest)]
#[doc = include_str!("../docs/library.md")]
pub struct LibraryGuide;
