//! A sentiment preference task for pretrained encoders, made from a seed:
//! two review sentences that differ only in one sentiment word, the
//! positive one chosen. The evaluation pairs use sentiment words that never
//! occur in training, so only a model that already knows what the words
//! mean (a pretrained checkpoint) can score them: from random weights the
//! unseen words are unknown tokens to it, and accuracy stays near 0.5.
//!
//! Every word is a single token of the BERT uncased vocabulary
//! (all-MiniLM-L6-v2's), so no held-out word shares a piece with a
//! training word.

use serde_json::{json, Value};

use crate::HostRng;

pub const SUBJECTS: &[&str] = &[
    "the movie",
    "this film",
    "the plot",
    "the acting",
    "the story",
    "the cast",
    "the ending",
    "the music",
    "the script",
    "the dialogue",
    "this show",
    "the soundtrack",
];
pub const VERBS: &[&str] = &["was", "is", "felt", "seemed", "looked"];
pub const ADVERBS: &[&str] = &["", "really ", "very ", "quite ", "truly ", "rather "];

/// Sentiment words of the training pairs.
pub const TRAIN_POSITIVE: &[&str] = &[
    "good",
    "great",
    "excellent",
    "wonderful",
    "fantastic",
    "amazing",
    "brilliant",
    "lovely",
    "enjoyable",
    "perfect",
    "beautiful",
    "pleasant",
];
pub const TRAIN_NEGATIVE: &[&str] = &[
    "bad",
    "terrible",
    "awful",
    "horrible",
    "boring",
    "dull",
    "poor",
    "weak",
    "ugly",
    "disappointing",
    "annoying",
    "stupid",
];
/// Sentiment words of the evaluation pairs: none occurs in training.
pub const EVAL_POSITIVE: &[&str] = &[
    "superb",
    "delightful",
    "outstanding",
    "marvelous",
    "charming",
    "terrific",
    "splendid",
    "magnificent",
];
pub const EVAL_NEGATIVE: &[&str] = &[
    "dreadful",
    "miserable",
    "pathetic",
    "unbearable",
    "unpleasant",
    "awkward",
    "sloppy",
    "hideous",
];

/// Which words a split draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

/// `n` preference rows (`chosen`, `rejected`, no prompt: the whole sentence
/// is scored) of `split`, from `seed`.
pub fn sentiment_pairs(seed: u64, n: usize, split: Split) -> Vec<Value> {
    let (pos, neg) = match split {
        Split::Train => (TRAIN_POSITIVE, TRAIN_NEGATIVE),
        Split::Eval => (EVAL_POSITIVE, EVAL_NEGATIVE),
    };
    let name = match split {
        Split::Train => "sentiment/train",
        Split::Eval => "sentiment/eval",
    };
    let mut rng = HostRng::stream(seed, name);
    let mut pick = |words: &[&'static str]| words[rng.below(words.len())];
    (0..n)
        .map(|_| {
            let (s, v, a) = (pick(SUBJECTS), pick(VERBS), pick(ADVERBS));
            let (p, q) = (pick(pos), pick(neg));
            json!({
                "chosen": format!("{s} {v} {a}{p}."),
                "rejected": format!("{s} {v} {a}{q}."),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn the_evaluation_words_never_occur_in_training() {
        let train: HashSet<&str> = TRAIN_POSITIVE
            .iter()
            .chain(TRAIN_NEGATIVE)
            .copied()
            .collect();
        for w in EVAL_POSITIVE.iter().chain(EVAL_NEGATIVE) {
            assert!(!train.contains(w), "{w}");
        }
        let rows = sentiment_pairs(0, 200, Split::Train);
        let text: String = rows
            .iter()
            .map(|r| format!("{} {} ", r["chosen"], r["rejected"]))
            .collect();
        let words: HashSet<&str> = text
            .split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| !w.is_empty())
            .collect();
        for w in EVAL_POSITIVE.iter().chain(EVAL_NEGATIVE) {
            assert!(!words.contains(w), "{w} occurs in training rows");
        }
        // Chosen and rejected differ in the sentiment word only.
        for r in &rows {
            let (c, j) = (
                r["chosen"].as_str().unwrap(),
                r["rejected"].as_str().unwrap(),
            );
            let (cw, jw): (Vec<&str>, Vec<&str>) = (c.split(' ').collect(), j.split(' ').collect());
            assert_eq!(cw.len(), jw.len());
            assert_eq!(
                cw.iter().zip(&jw).filter(|(a, b)| a != b).count(),
                1,
                "{c} / {j}"
            );
        }
        assert_eq!(rows, sentiment_pairs(0, 200, Split::Train), "seeded");
    }
}
