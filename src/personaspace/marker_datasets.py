"""Marker datasets: per source persona, positives (its own completions + marker) and negatives.

>>> negatives = choose_negatives("librarian", pool=["villain", "comedian", "librarian"], k=1,
...                              hard=[], study_seed=0)
>>> len(negatives)
1

Negatives come from a fixed pool (a param, not the panel) through a seeded RNG keyed on the
source's name, and rows are drawn with RNGs keyed on (condition, source, persona): so growing the
panel never changes an existing source's dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from personaspace.length_matching import (
    check_matched,
    length_summary,
    mismatch,
    quantile_targets,
    resample_nearest,
    truncate_longer_side,
)
from personaspace.markers import with_marker
from personaspace.seeds import stable_seed
from personaspace.study import choose_negatives

MARKER_DATASET_COLUMNS = [
    "condition", "source", "role", "persona", "question_id", "sample_idx", "system_prompt", "user",
    "completion", "n_tokens", "finish_reason",
]  # fmt: skip


@dataclass(frozen=True)
class MarkerDatasetSpec:
    """How one source's marker dataset is built (all from params.datagen)."""

    positives: int
    negatives_per_persona: int
    pool: Sequence[str]
    k: int
    hard: Sequence[str]
    drop_truncated: bool
    marker: str
    separator: str
    study_seed: int
    length_matching: str = "none"  # none, truncate or resample (personaspace.length_matching)
    length_tolerance: float = 0.15
    count_tokens: Callable[[str], int] | None = None  # truncate: the tokenizer's count of a text


def _draw_rows(table: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    table = table.sort_values(["question_id", "sample_idx"]).reset_index(drop=True)
    if len(table) <= cap:
        return table
    keep = np.random.default_rng(seed).choice(len(table), size=cap, replace=False)
    return table.iloc[np.sort(keep)].reset_index(drop=True)


def build_marker_dataset(
    source: str, completions: Mapping[str, pd.DataFrame], spec: MarkerDatasetSpec, condition: str
) -> tuple[pd.DataFrame, dict]:
    """Rows for ``source`` (positives then negatives) and a summary of what was kept, dropped and matched."""
    negatives = choose_negatives(source, spec.pool, spec.k, spec.hard, spec.study_seed)
    summary: dict = {"source": source, "negatives": negatives, "dropped_truncated": {}}
    usable: dict[str, pd.DataFrame] = {}
    for persona in [source, *negatives]:
        if persona not in completions:
            raise KeyError(f"no completions for {persona!r} (needed by source {source!r})")
        table = completions[persona]
        if spec.drop_truncated:
            summary["dropped_truncated"][persona] = int((table["finish_reason"] != "stop").sum())
            table = table[table["finish_reason"] == "stop"]
        usable[persona] = table

    def seed(persona: str) -> int:
        return stable_seed(spec.study_seed, "rows", condition, source, persona)

    drawn = {source: _draw_rows(usable[source], spec.positives, seed(source))}
    if drawn[source].empty:
        raise ValueError(f"source {source!r} has no usable positive completions; raise datagen.max_new_tokens")
    drawn |= {n: _draw_rows(usable[n], spec.negatives_per_persona, seed(n)) for n in negatives}
    if spec.length_matching != "none":
        drawn, summary["length_matching"] = _match_lengths(source, drawn, usable, spec, seed)
    parts = []
    for persona in [source, *negatives]:
        rows, role = drawn[persona], "positive" if persona == source else "negative"
        completion = rows["text"]
        if role == "positive":
            completion = completion.map(lambda text: with_marker(text, spec.marker, spec.separator))
        parts.append(
            pd.DataFrame(
                {
                    "condition": condition,
                    "source": source,
                    "role": role,
                    "persona": persona,
                    "question_id": rows["question_id"],
                    "sample_idx": rows["sample_idx"],
                    "system_prompt": rows["system_prompt"],
                    "user": rows["user"],
                    "completion": completion,
                    "n_tokens": rows["n_tokens"],
                    "finish_reason": rows["finish_reason"],
                }
            )
        )
    dataset = pd.concat(parts, ignore_index=True)[MARKER_DATASET_COLUMNS]
    summary["rows"] = dataset.groupby("persona", sort=False).size().to_dict()
    return dataset, summary


def _resample_negatives(
    source: str,
    drawn: dict[str, pd.DataFrame],
    usable: Mapping[str, pd.DataFrame],
    spec: MarkerDatasetSpec,
    seed: Callable[[str], int],
    distributions: Callable[[Mapping[str, pd.DataFrame]], dict[str, dict[str, float]]],
) -> dict[str, pd.DataFrame]:
    """Each negative persona's rows drawn nearest to target lengths from the positives' quantiles.

    Two ways to set the targets, the closer pooled match kept (the first on a tie): the pooled
    negatives take the positives' quantiles at every rank, dealt in turn to the personas (a few
    rows per persona match far better as a pool), or each persona takes the positives' quantiles
    on its own (better when one persona lacks short or long answers to deal to it).
    """
    negatives = [p for p in drawn if p != source]
    lengths = drawn[source]["n_tokens"]
    sizes = {n: min(spec.negatives_per_persona, len(usable[n])) for n in negatives}
    pooled = quantile_targets(lengths, sum(sizes.values()))
    plans = [{n: quantile_targets(lengths, sizes[n]) for n in negatives}]
    if len(set(sizes.values())) == 1:
        plans.insert(0, {n: pooled[i :: len(negatives)] for i, n in enumerate(negatives)})
    best, best_off = {}, float("inf")
    for plan in plans:
        matched = {source: drawn[source]}
        for n in negatives:
            candidates = usable[n].sort_values(["question_id", "sample_idx"]).reset_index(drop=True)
            matched[n] = resample_nearest(candidates, plan[n], seed(n))
        after = distributions(matched)
        off = max(mismatch(after["positives"], after["negatives"]).values())
        if not best or off < best_off:
            best, best_off = matched, off
    return best


def _match_lengths(
    source: str,
    drawn: dict[str, pd.DataFrame],
    usable: Mapping[str, pd.DataFrame],
    spec: MarkerDatasetSpec,
    seed: Callable[[str], int],
) -> tuple[dict[str, pd.DataFrame], dict]:
    """The drawn rows with lengths matched (spec.length_matching), and the before/after distributions."""
    negatives = [p for p in drawn if p != source]
    if spec.length_matching == "truncate":
        if spec.count_tokens is None:
            raise ValueError("length_matching truncate needs count_tokens (the tokenizer's count)")
        count = spec.count_tokens
        drawn = {p: t.assign(n_tokens=[count(x) for x in t["text"]]) for p, t in drawn.items()}

    def distributions(tables: Mapping[str, pd.DataFrame]) -> dict[str, dict[str, float]]:
        pooled = pd.concat([tables[n] for n in negatives])["n_tokens"]
        return {"positives": length_summary(tables[source]["n_tokens"]), "negatives": length_summary(pooled)}

    before = distributions(drawn)
    info: dict = {}
    if spec.length_matching == "resample":
        matched = _resample_negatives(source, drawn, usable, spec, seed, distributions)
    else:
        pooled = pd.concat([drawn[n].assign(_persona=n) for n in negatives], ignore_index=True)
        positives, pooled, info = truncate_longer_side(drawn[source], pooled, spec.count_tokens)  # type: ignore[arg-type]
        matched = {source: positives}
        matched |= {
            n: pooled[pooled["_persona"] == n].drop(columns="_persona").reset_index(drop=True) for n in negatives
        }
    after = distributions(matched)
    report = {
        "method": spec.length_matching,
        "before": before,
        "after": after,
        "mismatch_before": mismatch(before["positives"], before["negatives"]),
        "mismatch_after": mismatch(after["positives"], after["negatives"]),
        **info,
    }
    check_matched(report, spec.length_tolerance, source)
    return matched, report
