//! candle-rlhf: RLHF on Candle. Reward-model training with the logsigmoid
//! Bradley-Terry loss and batched PPO with a KL penalty to a frozen
//! reference, on CPU, CUDA or Metal, with Hugging Face-layout checkpoints.
//!
//! The modules follow the pipeline: configuration and devices; models and
//! tokenizers; generation; the training core (optimizer, schedules,
//! accumulation, clipping, non-finite guard); checkpoints and run
//! directories; metrics and plots; self-made fixtures.

pub mod app;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod generate;
pub mod hub;
pub mod io;
pub mod kernels;
pub mod metrics;
pub mod models;
pub mod optim;
pub mod plot;
pub mod rewards;
pub mod rl;
pub mod rng;
pub mod run;
pub mod signal;
pub mod tokenizer;

pub mod trainers;

pub use config::Config;
pub use error::{Error, IoContext, Result};
pub use rng::HostRng;
