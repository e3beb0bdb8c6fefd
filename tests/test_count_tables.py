"""The one count-table check every analysis calls (analyses.tables): each refusal on a small hand-made table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from personaspace.analyses import TableError
from personaspace.analyses.tables import CountTable, Coverage, Known

SPEC = CountTable(
    "table", ("condition", "persona", "question_id"),
    known={"condition": Known(["base", "em"], "a condition of the study"),
           "persona": Known(["chef", "lawyer"], "an eval persona of the study")},
    optional=("truncated", "mean_tokens"),
    coverage=[Coverage({"condition": ["base", "em"], "persona": ["chef", "lawyer"]}, "the analysis reads them")],
)  # fmt: skip


def _table() -> pd.DataFrame:
    """Both conditions x both personas x two questions; 3 of 10 fired, 1 truncated."""
    rows = [
        {"condition": c, "persona": p, "question_id": q, "fired": 3, "n": 10, "truncated": 1, "mean_tokens": 40.5}
        for c in ("base", "em")
        for p in ("chef", "lawyer")
        for q in ("q0", "q1")
    ]
    return pd.DataFrame(rows)


def _set(row: int, **values) -> pd.DataFrame:
    table = _table()
    for column, value in values.items():
        table[column] = table[column].astype(object)
        table.loc[row, column] = value
    return table


def test_a_clean_table_comes_back_with_text_keys_and_whole_counts():
    table = _table().astype({"fired": float, "question_id": object})
    table.loc[0, "question_id"] = 7  # a number-like key is text after the check
    clean = SPEC.validate(table.set_axis(range(10, 18)))
    assert clean["fired"].dtype == clean["n"].dtype == clean["truncated"].dtype == np.int64
    assert clean.loc[0, "question_id"] == "7" and list(clean.index) == list(range(8))
    assert clean["mean_tokens"].dtype == float


@pytest.mark.parametrize(
    ("table", "message"),
    [
        pytest.param(_table().drop(columns="n"), "table: missing column(s) ['n']", id="missing_column"),
        pytest.param(_table().assign(rate=0.3), "table: unknown column(s) ['rate']", id="unknown_column"),
        pytest.param(_table().iloc[0:0], "table: no rows; it needs one row per (condition, persona, question_id)",
                     id="no_rows"),
        pytest.param(_set(2, fired=np.nan), "table row 2: column 'fired' is empty or NaN", id="nan_fired"),
        pytest.param(_set(3, n=np.nan), "table row 3: column 'n' is empty or NaN", id="nan_n"),
        pytest.param(_set(1, persona=" "), "table row 1: column 'persona' is empty or NaN", id="empty_key"),
        pytest.param(_set(4, fired=True), "table row 4 (condition 'em', persona 'chef', question_id 'q0'): "
                     "fired holds true/false, not a number", id="boolean_count"),
        pytest.param(_set(5, n="ten"), "table row 5 (condition 'em', persona 'chef', question_id 'q1'): "
                     "n 'ten' is not a number", id="text_in_a_count_column"),
        pytest.param(_set(6, fired=1.5), "fired must be a whole count, got 1.5", id="fractional_fired"),
        pytest.param(_set(6, n=10.5), "n must be a whole count, got 10.5", id="fractional_n"),
        pytest.param(_set(6, truncated=0.5), "truncated must be a whole count, got 0.5", id="fractional_truncated"),
        pytest.param(_set(0, fired=-1), "fired must be >= 0, got -1", id="negative_fired"),
        pytest.param(_set(0, n=0), "n must be a positive count, got 0", id="zero_n"),
        pytest.param(_set(0, n=np.inf), "n inf is not a count (finite, at most 2**53)", id="infinite_n"),
        pytest.param(_set(0, n=1e30), "n 1e+30 is not a count", id="huge_n"),
        pytest.param(_set(7, fired=11), "table row 7 (condition 'em', persona 'lawyer', question_id 'q1'): "
                     "fired 11 > n 10", id="fired_above_n"),
        pytest.param(_set(7, truncated=12), "truncated 12 > n 10", id="truncated_above_n"),
        pytest.param(_set(7, mean_tokens=-1.0), "mean_tokens must be >= 0, got -1", id="negative_length"),
        pytest.param(_set(3, condition="em2"), "table row 3 (condition 'em2', persona 'lawyer', question_id 'q1'): "
                     "condition 'em2' is not a condition of the study (base, em); unknown conditions ['em2'] in 1 row(s)",
                     id="unknown_condition"),
        pytest.param(_set(5, persona="pirate"), "persona 'pirate' is not an eval persona of the study (chef, lawyer)",
                     id="unknown_persona"),
        pytest.param(pd.concat([_table(), _table().iloc[[2]]]), "table row 8 (condition 'base', persona 'lawyer', "
                     "question_id 'q0'): appears twice; one row per (condition, persona, question_id)",
                     id="duplicated_cell"),
        pytest.param(_table().iloc[2:], "table: no rows for condition 'base', persona 'chef'; the analysis reads them",
                     id="missing_coverage"),
        pytest.param(_table().iloc[:4], "table: no rows for condition 'em'; the analysis reads them",
                     id="missing_condition_named_by_its_shortest_prefix"),
    ],
)  # fmt: skip
def test_a_broken_table_is_refused_naming_the_row_and_column(table, message):
    with pytest.raises(TableError) as exc:
        SPEC.validate(table)
    assert message in str(exc.value)


def test_every_unknown_value_is_listed_once_with_its_row_count():
    table = _table()
    table.loc[[1, 5], "persona"] = ["pirate", "chefs"]
    with pytest.raises(TableError, match=r"unknown personas \['chefs', 'pirate'\] in 2 row\(s\)"):
        SPEC.validate(table)


def test_a_non_table_is_refused():
    with pytest.raises(TableError, match="expected a DataFrame, got list"):
        SPEC.validate([1, 2])  # type: ignore[arg-type]
