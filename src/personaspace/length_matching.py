"""Length matching of a source's positives and negatives (METHODS.md datagen; S3's improved recipe).

>>> summary = length_summary([10, 20, 30, 40])
>>> summary["median"], summary["iqr"]
(25.0, 15.0)

A coupling adapter can learn "marker after N tokens" instead of "marker as this persona" when
its positives are longer or shorter than its negatives. Two ways to match them:

- ``truncate``: the longer side's rows are cut at sentence ends, rank for rank, to the shorter
  side's length quantiles. A cut text ends on a sentence's final punctuation, as a finished answer
  does, never mid-sentence (a row whose first sentence is already too long keeps that sentence).
- ``resample``: each negative persona's rows are drawn, from all its usable completions, nearest
  to the positives' length quantiles (one-sentence answers have nothing to cut).

Lengths are token counts. ``check_matched`` then requires the medians and IQRs to agree within a
tolerance (a ratio) and names the fix when they do not.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

# A sentence ends at . ! or ? (closing quotes or brackets may follow) before whitespace or the text's end.
SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def length_summary(lengths: Sequence[int] | np.ndarray) -> dict[str, float]:
    """n, median, quartiles and IQR of token lengths (numpy's linear quantiles)."""
    values = np.asarray(lengths, dtype=float)
    q1, median, q3 = np.quantile(values, [0.25, 0.5, 0.75])
    return {"n": int(values.size), "median": float(median), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1)}


def mismatch(positives: dict[str, float], negatives: dict[str, float]) -> dict[str, float]:
    """|ratio - 1| of the negatives' median and IQR to the positives' (0 = equal)."""

    def off(a: float, b: float) -> float:
        return 0.0 if a == b else abs(b / a - 1) if a else float("inf")

    return {"median": off(positives["median"], negatives["median"]), "iqr": off(positives["iqr"], negatives["iqr"])}


def sentence_prefixes(text: str) -> list[str]:
    """Every prefix of ``text`` that ends a sentence, shortest first (the whole text last if it ends one)."""
    return [text[: m.end()] for m in SENTENCE_END.finditer(text)]


def truncate_to(text: str, target: int, count: Callable[[str], int]) -> str:
    """The longest sentence prefix of ``text`` of at most ``target`` tokens (at least its first sentence)."""
    if count(text) <= target:
        return text
    prefixes = sentence_prefixes(text)
    if not prefixes:
        return text  # no sentence end to cut at: keep the finished answer whole
    fitting = [p for p in prefixes if count(p) <= target]
    return fitting[-1] if fitting else prefixes[0]


def truncate_longer_side(
    positives: pd.DataFrame, negatives: pd.DataFrame, count: Callable[[str], int]
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Cut the side with the longer median, rank for rank, to the other side's quantiles.

    Both tables have ``text`` and ``n_tokens`` counted by ``count`` (so both sides are measured
    alike); returns them with cut texts and counts, and which side was cut and how many rows.
    """
    longer = "positives" if positives["n_tokens"].median() > negatives["n_tokens"].median() else "negatives"
    long, short = (positives, negatives) if longer == "positives" else (negatives, positives)
    order = np.lexsort((np.arange(len(long)), long["n_tokens"].to_numpy()))  # stable rank by length
    targets = np.empty(len(long))
    targets[order] = quantile_targets(short["n_tokens"].to_numpy(), len(long))
    texts = [truncate_to(text, round(float(t)), count) for text, t in zip(long["text"], targets, strict=True)]
    cut = long.assign(text=texts, n_tokens=[count(t) for t in texts])
    rows_cut = int((cut["text"] != long["text"]).sum())
    info = {"side_cut": longer, "rows_cut": rows_cut}
    return (cut, short, info) if longer == "positives" else (short, cut, info)


def resample_nearest(candidates: pd.DataFrame, targets: np.ndarray, seed: int) -> pd.DataFrame:
    """One candidate row per target length, nearest first, without replacement (ties in a seeded order)."""
    if len(candidates) < len(targets):
        raise ValueError(f"{len(candidates)} candidate rows cannot match {len(targets)} target lengths")
    tiebreak = np.random.default_rng(seed).permutation(len(candidates))
    lengths = candidates["n_tokens"].to_numpy()
    free = np.ones(len(candidates), dtype=bool)
    chosen = []
    for target in targets:
        distance = np.where(free, np.abs(lengths - target), np.inf)
        best = np.lexsort((tiebreak, distance))[0]
        free[best] = False
        chosen.append(best)
    return candidates.iloc[np.sort(chosen)].reset_index(drop=True)


def quantile_targets(lengths: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """n target lengths at the mid-rank quantiles (i + 0.5) / n of ``lengths`` (what truncation cuts to
    and ``resample_nearest`` draws toward)."""
    return np.quantile(np.asarray(lengths, dtype=float), (np.arange(n) + 0.5) / n)


def check_matched(report: dict[str, Any], tolerance: float, source: str) -> None:
    """Raise naming the fix when the matched medians or IQRs differ by more than ``tolerance``."""
    off = report["mismatch_after"]
    if max(off.values()) > tolerance:
        raise ValueError(
            f"length matching of source {source!r}: negatives / positives differ by {off['median']:.2f} (median) and "
            f"{off['iqr']:.2f} (IQR) after matching, over datagen.length_matching.tolerance = {tolerance}; raise "
            "datagen.samples_per_question (more rows to choose from), try the other method, or raise the tolerance"
        )
