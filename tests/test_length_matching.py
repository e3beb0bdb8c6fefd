"""Length matching of positives and negatives: sentence-end truncation and nearest-quantile resampling."""

import numpy as np
import pandas as pd
import pytest

from personaspace.length_matching import (
    length_summary,
    mismatch,
    resample_nearest,
    sentence_prefixes,
    truncate_longer_side,
    truncate_to,
)
from personaspace.marker_datasets import MarkerDatasetSpec, build_marker_dataset


def words(text: str) -> int:  # a token count independent of any tokenizer
    return len(text.split())


def _answer(sentences: int, words_each: int, tag: str) -> str:
    return " ".join(f"{' '.join([tag] * (words_each - 1))} end{i}." for i in range(sentences))


def test_summary_and_mismatch_are_numpy_quantiles_and_ratios():
    s = length_summary([1, 2, 3, 4, 100])
    assert (s["median"], s["q1"], s["q3"], s["iqr"]) == (3.0, 2.0, 4.0, 2.0)
    assert mismatch({"median": 10.0, "iqr": 4.0}, {"median": 12.0, "iqr": 2.0}) == pytest.approx(
        {"median": 0.2, "iqr": 0.5}
    )


def test_a_cut_answer_ends_on_a_sentence_end_and_is_the_longest_that_fits():
    text = 'First one here. Second "quoted!" Third line? Fourth words go on and on'
    assert sentence_prefixes(text) == ["First one here.", 'First one here. Second "quoted!"',
                                       'First one here. Second "quoted!" Third line?']  # fmt: skip
    assert truncate_to(text, 5, words) == 'First one here. Second "quoted!"'
    assert truncate_to(text, 2, words) == "First one here."  # never below one sentence
    assert truncate_to(text, 100, words) == text  # fits: untouched
    assert truncate_to("no sentence end at all", 2, words) == "no sentence end at all"
    assert truncate_to("e.g. 3.5 is a number. Next.", 5, words) == "e.g. 3.5 is a number."  # no cut inside 3.5


def test_truncation_cuts_the_longer_side_to_the_shorter_sides_quantiles():
    rng = np.random.default_rng(0)
    long = pd.DataFrame({"text": [_answer(int(k), 6, "pos") for k in rng.integers(4, 9, 40)]})
    short = pd.DataFrame({"text": [_answer(int(k), 6, "neg") for k in rng.integers(1, 4, 40)]})
    long, short = (t.assign(n_tokens=t["text"].map(words)) for t in (long, short))
    before = mismatch(length_summary(long["n_tokens"]), length_summary(short["n_tokens"]))
    pos, neg, info = truncate_longer_side(long, short, words)
    assert info["side_cut"] == "positives" and info["rows_cut"] > 30
    assert neg.equals(short)  # the shorter side is untouched
    assert all(orig.startswith(cut) and cut.endswith(".") for orig, cut in zip(long["text"], pos["text"], strict=True))
    assert (pos["n_tokens"] == pos["text"].map(words)).all()
    after = mismatch(length_summary(pos["n_tokens"]), length_summary(neg["n_tokens"]))
    assert before["median"] > 0.5 and after["median"] <= 0.15 and after["iqr"] <= 0.15, (before, after)


def test_resampling_takes_the_nearest_rows_without_replacement_and_is_seeded():
    candidates = pd.DataFrame({"n_tokens": [5, 9, 10, 10, 11, 30], "question_id": list("abcdef")})
    chosen = resample_nearest(candidates, np.array([10.0, 10.0, 10.0]), seed=1)
    assert sorted(chosen["n_tokens"]) == [9, 10, 10] or sorted(chosen["n_tokens"]) == [10, 10, 11]
    assert chosen.equals(resample_nearest(candidates, np.array([10.0, 10.0, 10.0]), seed=1))
    assert len(set(chosen["question_id"])) == 3
    with pytest.raises(ValueError, match="cannot match"):
        resample_nearest(candidates, np.zeros(7), seed=0)


def _table(persona: str, lengths: list[int]) -> pd.DataFrame:
    return pd.DataFrame({
        "question_id": [f"d{i:02d}" for i in range(len(lengths))], "sample_idx": 0,
        "system_prompt": f"You are {persona}.", "user": [f"q{i}" for i in range(len(lengths))],
        "text": [_answer(k, 5, persona) for k in lengths], "n_tokens": [5 * k for k in lengths],
        "finish_reason": "stop",
    })  # fmt: skip


def _spec(method: str, **overrides) -> MarkerDatasetSpec:
    values = dict(positives=12, negatives_per_persona=6, pool=[], k=0, hard=["villain", "comedian"],
                  drop_truncated=True, marker="[ZLT]", separator="\n\n", study_seed=0, length_matching=method,
                  length_tolerance=0.15, count_tokens=words)  # fmt: skip
    return MarkerDatasetSpec(**(values | overrides))


@pytest.mark.parametrize("method", ["resample", "truncate"])
def test_marker_datasets_report_lengths_before_and_after_matching(method):
    rng = np.random.default_rng(3)
    completions = {
        "librarian": _table("librarian", list(rng.integers(1, 4, 30))),  # short positives
        "villain": _table("villain", list(rng.integers(1, 9, 30))),  # negatives of every length
        "comedian": _table("comedian", list(rng.integers(2, 9, 30))),
    }
    dataset, summary = build_marker_dataset("librarian", completions, _spec(method), "base")
    report = summary["length_matching"]
    assert report["method"] == method
    assert max(report["mismatch_before"].values()) > 0.15 >= max(report["mismatch_after"].values())
    negatives = dataset[dataset["role"] == "negative"]
    assert report["after"]["negatives"]["n"] == len(negatives) == 12
    assert negatives["completion"].str.endswith(".").all()  # cut or not, every answer ends a sentence
    if method == "truncate":
        assert report["side_cut"] == "negatives"
    again, _ = build_marker_dataset("librarian", completions, _spec(method), "base")
    assert again.equals(dataset)


def test_unmatchable_lengths_stop_with_the_key_and_the_fix():
    completions = {
        "librarian": _table("librarian", [1] * 20),
        "villain": _table("villain", [6] * 20),
        "comedian": _table("comedian", [7] * 20),
    }
    with pytest.raises(ValueError, match=r"datagen\.length_matching\.tolerance"):
        build_marker_dataset("librarian", completions, _spec("resample"), "base")
