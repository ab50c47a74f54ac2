//! The one integration-test binary (each test binary links candle, so one
//! binary keeps builds short). Modules by subject.

mod checkpoint;
mod cli;
mod config;
mod hub;
mod models;
mod ppo;
mod ppo_io;
mod reference;
mod reward;
mod sft;
mod toy;
mod training;
