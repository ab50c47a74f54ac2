#!/usr/bin/env python3
"""The rule reward of the learning comparison (scripts/learn_compare.sh).

Task (prompts from scripts/learn_data.py): a prompt is a short header and
two words of any kind ("List: plot awful"); the completion should go on
with words of the kind named in the row's `target` column ("positive" in
every row the comparison writes). The reward of a completion is the
fraction of its words that belong to the target kind's word list (10
words each of "positive", "negative", "neutral", every one a single token
of the tiny tokenizer in fixtures/models/tiny-llama); 0 for a completion
without words. Maximum 1.0.

The warm start of scripts/make_tiny_policy.py writes 2 to 5 words drawn
uniformly from all 30, so a policy starts near 1/3.

Two uses, one file:
- a candle-rlhf `type = "command"` scorer: one JSON object per line on
  stdin (the row's other columns, here `target`, plus "prompt" and
  "completion"), one number per line on stdout, in order;
- a TRL reward function: `from learn_reward import kind_reward`, called as
  `kind_reward(prompts, completions, target=[...])`.

Standard library only (the scorer is started once per batch).
"""

import json
import re
import sys

WORDS = {
    "positive": (
        "great wonderful brilliant moving superb charming excellent beautiful delightful funny"
    ).split(),
    "negative": ("painful bland dull boring terrible awful silly tedious weak messy").split(),
    "neutral": ("movie film plot cast script music story ending director acting").split(),
}
KINDS = tuple(WORDS)
SETS = {k: frozenset(v) for k, v in WORDS.items()}
ALL_WORDS = sorted(w for ws in WORDS.values() for w in ws)

_WORD = re.compile(r"[A-Za-z]+")


def score(completion: str, target: str) -> float:
    """The fraction of the completion's words that are of kind `target`."""
    words = [w.lower() for w in _WORD.findall(completion)]
    if not words:
        return 0.0
    wanted = SETS[target]
    return sum(w in wanted for w in words) / len(words)


def _text(completion) -> str:
    # TRL passes plain strings for text prompts, lists of messages for
    # conversational ones.
    if isinstance(completion, list):
        return " ".join(m.get("content", "") for m in completion)
    return completion


def kind_reward(prompts, completions, target, **kwargs):
    """TRL reward function: the dataset's `target` column comes as a kwarg."""
    return [score(_text(c), t) for c, t in zip(completions, target)]


def main() -> None:
    out = []
    for line in sys.stdin:
        if not line.strip():
            continue
        row = json.loads(line)
        out.append(f"{score(row['completion'], row['target'])!r}\n")
    sys.stdout.write("".join(out))


if __name__ == "__main__":
    main()
