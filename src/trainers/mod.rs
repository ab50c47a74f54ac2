//! The trainers, one file per stage of the pipeline. Each writes its loop
//! top to bottom over the shared training core (src/train/).

pub mod ppo;
pub mod reward;
pub mod sft;
