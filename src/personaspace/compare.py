"""Experiments side by side, one row per metric: ``personaspace compare``.

``dvc exp show`` and ``dvc metrics show`` print one column per metric, thousands of characters wide
for a study's metrics files. This turns ``dvc exp show --json`` around: one column per revision
(the workspace, each baseline commit and its experiments), one row per scalar metric of the study's
``metrics/<study>/`` files, plus the params that tell the columns apart.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from typing import Any

import pandas as pd

from personaspace.params_guard import flat_keys

PARAMS_SHOWN = ("study.name", "scale", "model", "personas")  # what tells a study's experiments apart


def _revisions(exp_show: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(label, data) of every revision in ``dvc exp show --json``: baselines, then their experiments."""
    found = []
    for baseline in exp_show:
        if baseline.get("data"):
            label = baseline["rev"] if baseline["rev"] == "workspace" else baseline.get("name") or baseline["rev"][:7]
            found.append((label, baseline["data"]))
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                if rev.get("data"):
                    found.append((rev.get("name") or rev["rev"][:7], rev["data"]))
    return found


def _shown(value: Any, precision: int) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{precision}g}"
    return str(value)


def headline_table(exp_show: list[dict[str, Any]], study: str, keep: str | None = None, precision: int = 4) -> str:
    """The table ``personaspace compare`` prints: rows ``<file>: <key>``, a column per revision."""
    prefix = f"metrics/{study}/"
    columns: dict[str, dict[str, str]] = {}
    for label, data in _revisions(exp_show):
        column: dict[str, str] = {}
        params = flat_keys((data.get("params") or {}).get("params.yaml", {}).get("data", {}))
        for name in PARAMS_SHOWN:
            if name in params:
                column[f"params: {name}"] = _shown(params[name], precision)
        for path, metrics in sorted((data.get("metrics") or {}).items()):
            if not path.startswith(prefix):
                continue
            stem = path.removeprefix(prefix).removesuffix(".json")
            for key, value in flat_keys(metrics.get("data", {})).items():
                if not isinstance(value, list):
                    column[f"{stem}: {key}"] = _shown(value, precision)
        columns[label] = column
    table = pd.DataFrame(columns).fillna("-")
    if keep:
        pattern = re.compile(keep)
        table = table[[bool(pattern.search(row)) or row.startswith("params: ") for row in table.index]]
    # params equal in every column go above the table, so that a long model name widens no column
    same = [row for row in table.index if row.startswith("params: ") and table.loc[row].nunique() == 1]
    header = ", ".join(f"{row.removeprefix('params: ')}={table.loc[row].iloc[0]}" for row in same)
    body = table.drop(index=same).to_string()
    return f"every column: {header}\n{body}" if header else body


def exp_show_json(args: list[str]) -> list[dict[str, Any]]:
    """``dvc exp show --json`` with ``args`` (e.g. ``-A``, ``--rev HEAD~1``, ``-n 3``)."""
    done = subprocess.run(["dvc", "exp", "show", "--json", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"dvc exp show failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)
