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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

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


def _draw_rows(table: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    table = table.sort_values(["question_id", "sample_idx"]).reset_index(drop=True)
    if len(table) <= cap:
        return table
    keep = np.random.default_rng(seed).choice(len(table), size=cap, replace=False)
    return table.iloc[np.sort(keep)].reset_index(drop=True)


def build_marker_dataset(
    source: str, completions: Mapping[str, pd.DataFrame], spec: MarkerDatasetSpec, condition: str
) -> tuple[pd.DataFrame, dict]:
    """Rows for ``source`` (positives then negatives) and a summary of what was kept and dropped."""
    negatives = choose_negatives(source, spec.pool, spec.k, spec.hard, spec.study_seed)
    summary: dict = {"source": source, "negatives": negatives, "dropped_truncated": {}}
    parts = []
    for persona, role, cap in [(source, "positive", spec.positives)] + [
        (n, "negative", spec.negatives_per_persona) for n in negatives
    ]:
        if persona not in completions:
            raise KeyError(f"no completions for {persona!r} (needed by source {source!r})")
        table = completions[persona]
        if spec.drop_truncated:
            summary["dropped_truncated"][persona] = int((table["finish_reason"] != "stop").sum())
            table = table[table["finish_reason"] == "stop"]
        drawn = _draw_rows(table, cap, stable_seed(spec.study_seed, "rows", condition, source, persona))
        completion = drawn["text"]
        if role == "positive":
            completion = completion.map(lambda text: with_marker(text, spec.marker, spec.separator))
        parts.append(
            pd.DataFrame(
                {
                    "condition": condition,
                    "source": source,
                    "role": role,
                    "persona": persona,
                    "question_id": drawn["question_id"],
                    "sample_idx": drawn["sample_idx"],
                    "system_prompt": drawn["system_prompt"],
                    "user": drawn["user"],
                    "completion": completion,
                    "n_tokens": drawn["n_tokens"],
                    "finish_reason": drawn["finish_reason"],
                }
            )
        )
    dataset = pd.concat(parts, ignore_index=True)[MARKER_DATASET_COLUMNS]
    summary["rows"] = dataset.groupby("persona", sort=False).size().to_dict()
    if (dataset["role"] == "positive").sum() == 0:
        raise ValueError(f"source {source!r} has no usable positive completions; raise datagen.max_new_tokens")
    return dataset, summary
