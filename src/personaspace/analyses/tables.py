"""The one check of a count table that every study analysis (em_first, joint_probe, train_steering) calls.

>>> spec = CountTable("table", keys=("condition", "persona", "question_id"),
...                   known={"condition": Known(["base", "em"], "a condition of the study")})
>>> spec.validate(pd.DataFrame({"condition": ["em2"], "persona": ["chef"], "question_id": ["q0"],
...                             "fired": [1], "n": [2]}))
Traceback (most recent call last):
...
personaspace.analyses.TableError: table row 0 (condition 'em2', persona 'chef', question_id 'q0'): condition 'em2' is not a condition of the study (base, em); unknown conditions ['em2'] in 1 row(s)

A table has one row per combination of its ``keys`` (text) and whole counts ``fired`` and ``n``;
optionally ``truncated`` (a count, at most ``n``) and ``mean_tokens`` (a length, >= 0). The
analysis names the values each key may take (``known``) and the cells it reads (``coverage``).
Refused, each with a TableError naming the table, the row (position, 0 = the first data row, and
its keys) or the key, and the fix: a missing or unknown column, no rows, an empty or NaN cell,
true/false or text in a number column, a negative, fractional or non-finite count, ``n`` <= 0 or
above 2**53, ``fired`` or ``truncated`` above ``n``, a key value the study does not know, a
duplicated cell, and a cell the analysis reads with no rows. Nothing is coerced silently.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from personaspace.analyses import TableError

COUNTS = ("fired", "n", "truncated")  # whole counts; fired and truncated at most n
MEASURES = ("mean_tokens",)  # non-negative numbers
MAX_COUNT = 2**53  # above it a float (CSV, parquet double) no longer holds every whole number


@dataclass(frozen=True)
class Known:
    """The values a key column may hold and what they are, for the message (``a condition of the study``)."""

    values: Sequence[str]
    what: str


@dataclass(frozen=True)
class Coverage:
    """Cells the analysis reads: every combination of ``grid``'s values (column -> values) needs a row.

    ``why`` says who reads them and how to fix a gap. The first missing combination is reported by
    its shortest prefix (``arm 'A', mode 'neutral'`` when that whole series is absent).
    """

    grid: Mapping[str, Sequence[str]]
    why: str


@dataclass(frozen=True)
class CountTable:
    """The contract of one count table: its ``name`` in messages, key columns, known values and coverage."""

    name: str
    keys: Sequence[str]
    known: Mapping[str, Known] = field(default_factory=dict)
    optional: Sequence[str] = ()  # of COUNTS or MEASURES, beside the required fired and n
    coverage: Sequence[Coverage] = ()

    def cell(self, table: pd.DataFrame, row: int) -> str:
        """Row ``row``'s keys, as messages name it: ``condition 'em', persona 'chef', ...``."""
        values = table.iloc[row]
        return ", ".join(f"{key} {values[key]!r}" for key in self.keys)

    def refuse_rows(self, table: pd.DataFrame, bad: np.ndarray | pd.Series, message: Callable[[int], str]) -> None:
        """Raise TableError at the first row where ``bad`` holds: ``<name> row <r> (<keys>): <message(r)>``."""
        bad = np.asarray(bad, dtype=bool)
        if bad.any():
            row = int(np.argmax(bad))
            raise TableError(f"{self.name} row {row} ({self.cell(table, row)}): {message(row)}")

    def validate(self, table: pd.DataFrame) -> pd.DataFrame:
        """A clean copy of ``table`` (keys as text, counts as int64), or TableError on the first violation."""
        name, keys = self.name, list(self.keys)
        if not isinstance(table, pd.DataFrame):
            raise TableError(f"{name}: expected a DataFrame, got {type(table).__name__}")
        required = [*keys, "fired", "n"]
        missing = [c for c in required if c not in table.columns]
        if missing:
            raise TableError(f"{name}: missing column(s) {missing}; the table needs {required}")
        allowed = required + list(self.optional)
        unknown = [c for c in table.columns if c not in allowed]
        if unknown:
            raise TableError(f"{name}: unknown column(s) {unknown}; allowed: {allowed}")
        if table.empty:
            raise TableError(f"{name}: no rows; it needs one row per ({', '.join(keys)})")
        table = table.reset_index(drop=True)
        for column in table.columns:
            blank = table[column].map(lambda v: isinstance(v, str) and not v.strip()).to_numpy(dtype=bool)
            empty = table[column].isna().to_numpy() | blank
            if empty.any():
                raise TableError(f"{name} row {int(np.argmax(empty))}: column {column!r} is empty or NaN")
        for column in keys:
            table[column] = table[column].astype(str)
        numbers = {column: self._numbers(table, column) for column in table.columns if column not in keys}
        self._check_numbers(table, numbers)
        for column, known in self.known.items():
            self._check_known(table, column, known)
        self.refuse_rows(table, table.duplicated(keys), lambda r: f"appears twice; one row per ({', '.join(keys)})")
        for need in self.coverage:
            self.require(table, need)
        for column in COUNTS:
            if column in numbers:
                table[column] = numbers[column].astype(np.int64)
        for column in MEASURES:
            if column in numbers:
                table[column] = numbers[column]
        return table

    def _numbers(self, table: pd.DataFrame, column: str) -> pd.Series:
        """``column`` as floats; true/false or text is refused (no silent 0/1 or NaN)."""
        flags = table[column].map(lambda v: isinstance(v, bool | np.bool_))
        self.refuse_rows(table, flags, lambda r: f"{column} holds true/false, not a number")
        values = pd.to_numeric(table[column], errors="coerce")
        self.refuse_rows(table, values.isna(), lambda r: f"{column} {table[column].iloc[r]!r} is not a number")
        return values.astype(float)

    def _check_numbers(self, table: pd.DataFrame, numbers: Mapping[str, pd.Series]) -> None:
        n = numbers["n"]
        checks: list[tuple[pd.Series, Callable[[int], str]]] = [
            (~np.isfinite(n) | (n > MAX_COUNT), lambda r: f"n {n.iloc[r]:g} is not a count (finite, at most 2**53)"),
            (n <= 0, lambda r: f"n must be a positive count, got {n.iloc[r]:g}"),
            (n % 1 != 0, lambda r: f"n must be a whole count, got {n.iloc[r]:g}"),
        ]
        for column in [c for c in COUNTS if c != "n" and c in numbers]:
            v = numbers[column]
            checks += [
                (~np.isfinite(v), lambda r, c=column, v=v: f"{c} {v.iloc[r]:g} is not a count"),
                (v < 0, lambda r, c=column, v=v: f"{c} must be >= 0, got {v.iloc[r]:g}"),
                (v % 1 != 0, lambda r, c=column, v=v: f"{c} must be a whole count, got {v.iloc[r]:g}"),
                (v > n, lambda r, c=column, v=v: f"{c} {v.iloc[r]:g} > n {n.iloc[r]:g}; a cell counts at most n"),
            ]
        for column in [c for c in MEASURES if c in numbers]:
            v = numbers[column]
            checks += [
                (~np.isfinite(v), lambda r, c=column, v=v: f"{c} {v.iloc[r]:g} is not a finite number"),
                (v < 0, lambda r, c=column, v=v: f"{c} must be >= 0, got {v.iloc[r]:g}"),
            ]
        for bad, message in checks:
            self.refuse_rows(table, bad, message)

    def _check_known(self, table: pd.DataFrame, column: str, known: Known) -> None:
        values = [str(v) for v in known.values]
        outside = ~table[column].isin(values).to_numpy()
        unknown = sorted(set(table.loc[outside, column]))
        self.refuse_rows(
            table, outside,
            lambda r: f"{column} {table[column].iloc[r]!r} is not {known.what} ({', '.join(values)}); "
            f"unknown {column}s {unknown} in {int(outside.sum())} row(s)",
        )  # fmt: skip

    def require(self, table: pd.DataFrame, need: Coverage) -> None:
        """Raise TableError naming the first combination of ``need.grid`` (shortest prefix) with no row."""
        columns = list(need.grid)
        for depth in range(1, len(columns) + 1):
            prefix = columns[:depth]
            present = set(table[prefix].itertuples(index=False, name=None))
            for combination in itertools.product(*(need.grid[c] for c in prefix)):
                if tuple(str(v) for v in combination) not in present:
                    cell = ", ".join(f"{c} {v!r}" for c, v in zip(prefix, combination, strict=True))
                    raise TableError(f"{self.name}: no rows for {cell}; {need.why}")
