//! The demo's embedded task, after TRL's classic IMDB sentiment example
//! shrunk to a CPU: a synthetic language of short movie-review sentences
//! ("overall the movie was" + " really great, and the cast was superb.")
//! with a hidden gold reward computed in code. From one seed it makes SFT
//! rows, preference pairs labelled by the gold reward with a rate of flipped
//! labels (human annotators agree about 73% of the time), and held-out
//! prompts; [`gold_reward`] plugs into PPO as a programmatic reward.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::rewards::Completion;
use crate::{HostRng, Result};

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
    "the director",
];
pub const VERBS: &[&str] = &["was", "felt", "seemed", "is", "looked"];
pub const ADVERBS: &[&str] = &["really", "very", "quite", "truly", "so", "rather"];
pub const POSITIVE: &[&str] = &[
    "great",
    "wonderful",
    "brilliant",
    "moving",
    "funny",
    "beautiful",
    "excellent",
    "charming",
    "delightful",
    "superb",
];
pub const NEGATIVE: &[&str] = &[
    "boring", "awful", "dull", "terrible", "weak", "messy", "bland", "painful", "silly", "tedious",
];
pub const OPENERS: &[&str] = &[
    "i think",
    "honestly",
    "overall",
    "in the end",
    "to be fair",
    "i felt that",
];

/// The gold reward of a response (text after the prompt), over its tokens
/// (lower-cased words, and each punctuation mark on its own):
/// `clamp(#distinct positive words - #distinct negative words, -2, 2)`
/// `- 0.5 x (token occurrences beyond the first of each token)`
/// `- 1 if it does not end a sentence with "."`.
/// A well-formed two-clause positive review scores the maximum, 2; piling
/// up adjectives gains nothing past 2, and repeating words or marks or
/// rambling past the end of the sentence costs, so degenerate text is not
/// optimal.
pub fn gold_reward(response: &str) -> f64 {
    let mut tokens: Vec<String> = Vec::new();
    let mut word = String::new();
    for c in response.chars() {
        if c.is_alphanumeric() {
            word.extend(c.to_lowercase());
            continue;
        }
        if !word.is_empty() {
            tokens.push(std::mem::take(&mut word));
        }
        if !c.is_whitespace() {
            tokens.push(c.to_string());
        }
    }
    if !word.is_empty() {
        tokens.push(word);
    }
    let mut seen = HashSet::new();
    let (mut sentiment, mut repeats) = (0i64, 0usize);
    for t in &tokens {
        if !seen.insert(t.as_str()) {
            repeats += 1;
        } else if POSITIVE.contains(&t.as_str()) {
            sentiment += 1;
        } else if NEGATIVE.contains(&t.as_str()) {
            sentiment -= 1;
        }
    }
    let unfinished = !response.trim_end().ends_with('.');
    sentiment.clamp(-2, 2) as f64 - 0.5 * repeats as f64 - if unfinished { 1.0 } else { 0.0 }
}

/// [`gold_reward`] as a PPO reward: scores each completion's response text.
pub fn gold(batch: &[Completion]) -> Result<Vec<f32>> {
    Ok(batch
        .iter()
        .map(|c| gold_reward(c.response) as f32)
        .collect())
}

/// The task's sampler: every draw comes from one seeded stream per purpose.
pub struct Task {
    rng: HostRng,
}

impl Task {
    /// A generator for `purpose` ("sft", "preferences", "eval", ...) from `seed`.
    pub fn new(seed: u64, purpose: &str) -> Self {
        Self {
            rng: HostRng::stream(seed, &format!("task-{purpose}")),
        }
    }

    fn pick(&mut self, words: &[&'static str]) -> &'static str {
        words[self.rng.below(words.len())]
    }

    fn adjective(&mut self) -> &'static str {
        if self.rng.uniform() < 0.5 {
            self.pick(POSITIVE)
        } else {
            self.pick(NEGATIVE)
        }
    }

    /// A prompt: "{opener} {subject} {verb}", as "overall the movie was".
    pub fn prompt(&mut self) -> String {
        format!(
            "{} {} {}",
            self.pick(OPENERS),
            self.pick(SUBJECTS),
            self.pick(VERBS)
        )
    }

    /// A completion of either sentiment, one clause or two:
    /// " really great." or " really great, and the cast was dull."
    pub fn completion(&mut self) -> String {
        let adverb = self.pick(ADVERBS);
        let first = self.adjective();
        if self.rng.uniform() < 0.5 {
            return format!(" {adverb} {first}.");
        }
        let (subject, verb) = (self.pick(SUBJECTS), self.pick(VERBS));
        let mut second = self.adjective();
        while second == first {
            second = self.adjective();
        }
        format!(" {adverb} {first}, and {subject} {verb} {second}.")
    }

    /// A completion as an imperfect model writes them, the kind annotators
    /// compare: 30% of them broken by one of three faults the gold reward
    /// penalizes: the end cut off (no period), a word repeated, the
    /// adverb stuttered.
    pub fn sampled_completion(&mut self) -> String {
        let c = self.completion();
        if self.rng.uniform() >= 0.3 {
            return c;
        }
        let words: Vec<&str> = c.trim_end_matches('.').split(' ').skip(1).collect();
        match self.rng.below(3) {
            0 => {
                let keep = 1 + self.rng.below(words.len());
                format!(" {}", words[..keep].join(" ").trim_end_matches(','))
            }
            1 => {
                let last = words[words.len() - 1];
                format!(" {} {last}.", words.join(" "))
            }
            _ => format!(" {} {}.", words[0], words.join(" ")),
        }
    }

    /// `n` SFT rows {prompt, completion} from the review distribution.
    pub fn sft_rows(&mut self, n: usize) -> Vec<Value> {
        (0..n)
            .map(|_| json!({"prompt": self.prompt(), "completion": self.completion()}))
            .collect()
    }

    /// `n` preference pairs {prompt, chosen, rejected}: two sampled
    /// completions (see [`Task::sampled_completion`]) of the same prompt
    /// with different gold rewards, the better one chosen,
    /// then the label flipped with probability `flip_rate`. Each row also
    /// records `gold_chosen`, `gold_rejected` and `flipped`.
    pub fn preference_rows(&mut self, n: usize, flip_rate: f64) -> Vec<Value> {
        (0..n)
            .map(|_| {
                let prompt = self.prompt();
                let a = self.sampled_completion();
                let mut b = self.sampled_completion();
                while gold_reward(&b) == gold_reward(&a) {
                    b = self.sampled_completion();
                }
                let (mut chosen, mut rejected) = if gold_reward(&a) > gold_reward(&b) {
                    (a, b)
                } else {
                    (b, a)
                };
                let flipped = self.rng.uniform() < flip_rate;
                if flipped {
                    std::mem::swap(&mut chosen, &mut rejected);
                }
                json!({
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "gold_chosen": gold_reward(&chosen),
                    "gold_rejected": gold_reward(&rejected),
                    "flipped": flipped,
                })
            })
            .collect()
    }

    /// `n` prompt rows {prompt} (held-out prompts for PPO and evaluation).
    pub fn prompt_rows(&mut self, n: usize) -> Vec<Value> {
        (0..n).map(|_| json!({"prompt": self.prompt()})).collect()
    }

    /// `n` sentences for training a tokenizer on the language.
    pub fn corpus(&mut self, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| format!("{}{}", self.prompt(), self.completion()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gold_reward_by_hand() {
        assert_eq!(gold_reward(" really great."), 1.0);
        assert_eq!(gold_reward(" really dull."), -1.0);
        // Two positive clauses: the maximum.
        assert_eq!(gold_reward(" really great, and the cast was superb."), 2.0);
        // Mixed: 1 - 1 = 0.
        assert_eq!(gold_reward(" so funny, and the plot was weak."), 0.0);
        // Piling up distinct adjectives is clamped at 2 ...
        assert_eq!(gold_reward(" great wonderful brilliant superb."), 2.0);
        // ... and repeating costs 0.5 per extra occurrence (great x3: 2 repeats).
        assert_eq!(gold_reward(" great great great."), 1.0 - 1.0);
        // No final period: -1 (rambling past the sentence's end).
        assert_eq!(gold_reward(" really great"), 0.0);
        assert_eq!(gold_reward(" really great. the"), 0.0);
        assert_eq!(gold_reward(""), -1.0);
        // Case does not matter; marks are tokens, and repeating them costs.
        assert_eq!(gold_reward(" Really GREAT!."), 1.0);
        assert_eq!(gold_reward(" great...."), 1.0 - 1.5);
    }

    #[test]
    fn the_same_seed_makes_the_same_data_and_pairs_follow_the_gold_reward() {
        let a = Task::new(3, "preferences").preference_rows(400, 0.25);
        let b = Task::new(3, "preferences").preference_rows(400, 0.25);
        assert_eq!(a, b);
        let c = Task::new(4, "preferences").preference_rows(400, 0.25);
        assert_ne!(a, c);
        let mut flipped = 0;
        for row in &a {
            let (gc, gr) = (
                row["gold_chosen"].as_f64().unwrap(),
                row["gold_rejected"].as_f64().unwrap(),
            );
            assert_eq!(gc, gold_reward(row["chosen"].as_str().unwrap()));
            assert_ne!(gc, gr, "ties are never pairs");
            let f = row["flipped"].as_bool().unwrap();
            assert_eq!(f, gc < gr, "the chosen one is better unless flipped");
            flipped += usize::from(f);
        }
        // 400 draws at 0.25: 100 expected, sd 8.7.
        assert!((70..=130).contains(&flipped), "{flipped}");
    }

    #[test]
    fn sampled_completions_are_sometimes_broken_and_then_penalized() {
        let mut t = Task::new(1, "preferences");
        let (mut broken, n) = (0, 2000);
        for _ in 0..n {
            let c = t.sampled_completion();
            let words: Vec<&str> = c
                .split(|ch: char| !ch.is_alphanumeric())
                .filter(|w| !w.is_empty())
                .collect();
            let distinct: HashSet<&&str> = words.iter().collect();
            let faulty = !c.ends_with('.') || distinct.len() < words.len();
            if faulty {
                broken += 1;
                // Never better than the clean maximum, and marked down.
                assert!(gold_reward(&c) <= 1.5, "{c}: {}", gold_reward(&c));
            }
        }
        // 30% corrupted; a cut after the last word of one clause still ends
        // without its period, so every corruption shows.
        let rate = broken as f64 / n as f64;
        assert!((0.26..0.34).contains(&rate), "{rate}");
    }

    #[test]
    fn completions_of_the_language_are_well_formed_and_mixed() {
        let mut t = Task::new(0, "sft");
        let rewards: Vec<f64> = (0..1000).map(|_| gold_reward(&t.completion())).collect();
        for r in &rewards {
            assert!([-2.0, -1.0, 0.0, 1.0, 2.0].contains(r), "{r}");
        }
        let mean = rewards.iter().sum::<f64>() / 1000.0;
        assert!(mean.abs() < 0.15, "both sentiments equally: {mean}");
        assert!(rewards.contains(&2.0) && rewards.contains(&-2.0));
    }
}
