import pandas as pd
import pytest

from personaspace.marker_datasets import MarkerDatasetSpec, build_marker_dataset
from personaspace.personas import load_catalog
from personaspace.study import choose_negatives

POOL = list(load_catalog().panel(12))


def _completions(persona: str, n: int = 10, truncated: int = 2) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "question_id": [f"d{i:02d}" for i in range(n)],
            "sample_idx": 0,
            "system_prompt": f"You are {persona}.",
            "user": [f"question {i}" for i in range(n)],
            "text": [f"{persona} answer {i}" for i in range(n)],
            "n_tokens": 5,
            "finish_reason": ["length"] * truncated + ["stop"] * (n - truncated),
        }
    )


def _spec(**overrides) -> MarkerDatasetSpec:
    values = dict(
        positives=5, negatives_per_persona=3, pool=POOL, k=2, hard=[], drop_truncated=True,
        marker="[ZLT]", separator="\n\n", study_seed=0,
    )  # fmt: skip
    values.update(overrides)
    return MarkerDatasetSpec(**values)


def test_negatives_are_deterministic_exclude_the_source_and_ignore_pool_order():
    first = choose_negatives("librarian", POOL, 2, [], study_seed=0)
    assert first == choose_negatives("librarian", list(reversed(POOL)), 2, [], study_seed=0)
    assert "librarian" not in first and len(set(first)) == 2
    draws = {tuple(choose_negatives("librarian", POOL, 2, [], study_seed=s)) for s in range(20)}
    assert len(draws) > 5  # the study seed really moves the draw


def test_hard_negatives_are_always_included_plus_k_random():
    chosen = choose_negatives("villain", POOL, 1, ["software_engineer", "villain"], study_seed=0)
    assert chosen[0] == "software_engineer" and "villain" not in chosen and len(chosen) == 2


def test_positives_carry_the_marker_and_negatives_do_not():
    completions = {p: _completions(p) for p in POOL}
    dataset, summary = build_marker_dataset("librarian", completions, _spec(), "base")
    positives = dataset[dataset.role == "positive"]
    negatives = dataset[dataset.role == "negative"]
    assert len(positives) == 5 and (positives.persona == "librarian").all()
    assert positives.completion.str.endswith("\n\n[ZLT]").all()
    assert not negatives.completion.str.contains("[ZLT]", regex=False).any()
    assert set(negatives.persona) == set(summary["negatives"]) and len(negatives) == 6
    assert summary["dropped_truncated"]["librarian"] == 2


def test_truncated_completions_are_left_out_when_asked():
    completions = {p: _completions(p, n=4, truncated=2) for p in POOL}
    dataset, _ = build_marker_dataset("librarian", completions, _spec(), "base")
    assert (dataset.finish_reason == "stop").all()
    kept, _ = build_marker_dataset("librarian", completions, _spec(drop_truncated=False), "base")
    assert (kept.finish_reason == "length").any()


def test_growing_the_panel_leaves_an_existing_sources_dataset_unchanged():
    small = {p: _completions(p) for p in POOL}
    large = dict(small, **{p: _completions(p) for p in load_catalog().panel(24)[12:]})
    a, _ = build_marker_dataset("comedian", small, _spec(), "base")
    b, _ = build_marker_dataset("comedian", large, _spec(), "base")
    pd.testing.assert_frame_equal(a, b)


def test_a_source_with_no_usable_positive_is_an_error():
    completions = {p: _completions(p, n=2, truncated=2) for p in POOL}
    with pytest.raises(ValueError, match="no usable positive"):
        build_marker_dataset("librarian", completions, _spec(), "base")
