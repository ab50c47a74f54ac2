//! Data, from files to batches: the records of a data file or dataset split
//! ([`records`]), preference pairs ([`preference`]), SFT rows ([`sft`]),
//! prompts for rollouts and evaluation ([`prompts`]), padding and position
//! ids ([`batch`]). The common names are re-exported here.

pub mod batch;
pub mod dpo;
pub mod preference;
pub mod prompts;
pub mod records;
pub mod render;
pub mod sft;

pub use preference::{
    encode_with_eos, load_preferences, read_preferences, tokenize_pairs, DataReport, PreferenceRow,
    TokenizedPair,
};
pub use records::{load_records, read_records, split, text_column, Record};
