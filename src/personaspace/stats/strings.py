"""String baselines: how similar two system prompts are as text, to compare against geometry.

>>> negative_levenshtein("kitten", "sitting")
-3
>>> token_jaccard("You are a pilot.", "You are a nurse.")
0.6
"""

from __future__ import annotations

import re
from typing import Any


def negative_levenshtein(a: str, b: str) -> int:
    """Minus the Levenshtein edit distance (rapidfuzz): higher means more similar."""
    from rapidfuzz.distance import Levenshtein

    return -int(Levenshtein.distance(a, b))


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def token_jaccard(a: str, b: str) -> float:
    """Jaccard index of the lower-cased word sets."""
    words = re.compile(r"\w+")
    return _jaccard(set(words.findall(a.lower())), set(words.findall(b.lower())))


def bpe_jaccard(a: str, b: str, tokenizer: Any) -> float:
    """Jaccard index of the sets of BPE token ids the model's tokenizer gives each prompt."""
    ids = tokenizer([a, b], add_special_tokens=False)["input_ids"]
    return _jaccard(set(ids[0]), set(ids[1]))
