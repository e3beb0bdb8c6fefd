"""`personaspace compare`: dvc exp show's JSON turned into a column per revision (personaspace.compare)."""

from __future__ import annotations

from personaspace.compare import headline_table


def _data(personas: int, rate: float, rho: float) -> dict:
    """One revision's `data` as `dvc exp show --json` (DVC 3.67) nests it."""
    params = {"study": {"name": "panel"}, "scale": "laptop", "model": "smollm2-135m-instruct", "personas": personas}
    return {
        "rev": "x",
        "params": {"params.yaml": {"data": params}},
        "metrics": {
            "metrics/panel/eval_base.json": {"data": {"source_rate_mean": rate, "source_rates": {"a": 0.5}}},
            "metrics/panel/regress_base.json": {"data": {"primary": {"spearman_rho": rho}, "layers": [1, 2]}},
            "metrics/markers/base-ds1.json": {"data": {"sources": {"a": {"rows": {"a": 24}}}}},
            "metrics/em_first/contrasts.json": {"data": {"other_study": 1.0}},
        },
    }


EXP_SHOW = [
    {"rev": "workspace", "name": None, "data": _data(24, 0.80125, 0.5), "error": None, "experiments": None},
    {
        "rev": "0123456789abcdef",
        "name": "main",
        "data": _data(12, 0.7875, 0.6969047818350564),
        "experiments": [{"revs": [{"rev": "fedcba98765", "name": "tangy-boat", "data": _data(24, 0.80125, 0.5)}]}],
    },
]


def test_a_row_per_metric_and_a_column_per_revision_fit_a_terminal():
    table = headline_table(EXP_SHOW, "panel")
    lines = table.splitlines()
    assert lines[0] == "every column: study.name=panel, scale=laptop, model=smollm2-135m-instruct"
    assert lines[1].split() == ["workspace", "main", "tangy-boat"]
    rows = {line.split()[0] + " " + line.split()[1]: line.split()[2:] for line in lines[2:]}
    assert rows == {
        "params: personas": ["24", "12", "24"],
        "eval_base: source_rate_mean": ["0.8013", "0.7875", "0.8013"],
        "eval_base: source_rates.a": ["0.5", "0.5", "0.5"],
        "regress_base: primary.spearman_rho": ["0.5", "0.6969", "0.5"],
    }  # lists (layers), other studies' and the marker datasets' metrics left out
    assert max(map(len, lines)) <= 120


def test_keep_selects_rows_and_precision_sets_digits():
    table = headline_table(EXP_SHOW, "panel", keep="spearman", precision=2)
    assert [line.split()[:2] for line in table.splitlines()[2:]] == [
        ["params:", "personas"],
        ["regress_base:", "primary.spearman_rho"],
    ]
    assert table.splitlines()[-1].split()[2:] == ["0.5", "0.7", "0.5"]
