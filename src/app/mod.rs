//! The application built on the library: the subcommands' bodies
//! (`commands`), the offline demo and its
//! embedded task, the `bench` harness, the generator of the self-made
//! fixtures (tiny models, tokenizers, data, a hub cache) that tests and the
//! demo train on, and the sentiment task for a real pretrained encoder. The pipeline modules never import this one; tests may.

pub mod arith;
pub mod bench;
mod bench_steps;
pub mod cli;
pub mod commands;
pub mod demo;
pub mod fixtures;
pub mod sentiment;
pub mod task;
