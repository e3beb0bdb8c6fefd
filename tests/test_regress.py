"""`personaspace regress`: the S1 suite on a (persona, layer) table; gates; plots; bad tables."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from personaspace.io import json_text
from personaspace.regress import RegressSettings, TableError, regress_table, validate_table
from personaspace.stats.gates import (
    GateThresholds,
    drift_sign_test,
    gate_outcome,
    off_diagonal,
    stratified_split,
    three_gate,
)

from .conftest import REPO

TABLE = REPO / "tests" / "fixtures" / "regress_table_12.csv"
THRESHOLDS = GateThresholds(alpha=0.05, z_crit=1.96, slope_tolerance=0.25, expected_sign=1)


def _settings(**overrides) -> RegressSettings:
    values = dict(
        reference_persona="helpful_assistant", level=0.95, alpha=0.05, influence_numerator=4, cv_folds=5,
        cv_repeats=3, power_rhos=[0.5], power_simulations=500, gates=THRESHOLDS, holdout_fraction=0.5, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return RegressSettings(**values)


def test_metrics_have_the_documented_keys():
    calibration = [
        "software_engineer",
        "kindergarten_teacher",
        "librarian",
        "french_person",
        "villain",
        "model_default",
    ]
    metrics, plot_data = regress_table(pd.read_csv(TABLE), _settings(calibration=calibration))
    assert metrics["n_personas"] == 11 and metrics["excluded"] == ["helpful_assistant"]
    assert metrics["primary_layer"] == 15  # the middle of 10, 15, 20
    layer = metrics["layers"]["15"]
    for key in ("r", "p"):
        assert isinstance(layer["pearson"][key], float)
        assert isinstance(layer["without_influential"]["pearson"][key], float)
    assert set(layer["spearman"]) == {"rho", "p"} and isinstance(layer["holm"]["spearman_p"], float)
    assert set(layer["cooks_distance"]) == set(metrics["rates"]) - {"helpful_assistant"}
    assert layer["influence_threshold"] == pytest.approx(4 / 11)
    assert layer["loo_pi"]["n"] == 11 and 0 <= layer["loo_pi"]["covered"] <= 11
    assert set(layer["holdout"]) == {
        "data_scientist",
        "medical_doctor",
        "police_officer",
        "comedian",
        "zelthari_scholar",
    }
    assert set(layer["holdout"]["comedian"]) == {"predicted", "pi_low", "pi_high", "inside"}
    assert {"rho", "p"} <= set(layer["length_partial_spearman"]) and set(layer["vif"]) == {
        "cosine",
        "log_prompt_tokens",
    }
    assert layer["within_category"]["occupational"]["spearman"]["n"] == 6
    assert layer["within_category"]["generic_helper"]["spearman"]["rho"] is None
    assert "rho_reason" in layer["within_category"]["generic_helper"]["spearman"]
    rate = metrics["rates"]["librarian"]
    assert (rate["rate"], rate["n"]) == (0.52, 100) and rate["wilson_low"] < 0.52 < rate["wilson_high"]
    assert {"calibration", "random_stratified", "outcome", "outcome_reason"} <= set(metrics["gates"])
    assert all(isinstance(metrics["gates"]["calibration"][g], bool) for g in "ABC")
    assert metrics["layers"]["15"]["string_baselines"]["token_jaccard"]["steiger_z"] is not None
    assert set(plot_data) == {"scatter", "rho_by_layer", "rates"}
    json.dumps(metrics, allow_nan=False)  # plain JSON, no NaN


def test_holm_is_adjusted_across_the_layers_present():
    metrics, _ = regress_table(pd.read_csv(TABLE), _settings())
    raw = sorted((metrics["layers"][k]["spearman"]["p"], k) for k in ("10", "15", "20"))
    smallest = raw[0]
    assert metrics["layers"][smallest[1]]["holm"]["spearman_p"] == pytest.approx(min(1, 3 * smallest[0]))


def test_a_constant_cosine_layer_gives_nulls_with_reasons_not_a_crash():
    table = pd.read_csv(TABLE)
    table.loc[table.layer == 10, "cosine"] = 0.5
    metrics, _ = regress_table(table, _settings())
    layer = metrics["layers"]["10"]
    assert layer["pearson"]["r"] is None and layer["pearson"]["r_reason"] == "one variable is constant"
    assert layer["cooks_distance"] is None and "constant" in layer["cooks_distance_reason"]
    assert layer["holm"]["spearman_p"] is None


def test_no_source_firing_at_all_gives_json_ready_metrics():
    """An untrained or failed study (every rate 0): degenerate fits read as undefined, never NaN/inf."""
    table = pd.read_csv(TABLE)
    table["fired"] = 0
    metrics, _ = regress_table(table, _settings())
    json_text(metrics)  # raises on NaN or inf
    assert metrics["layers"]["10"]["spearman"]["rho"] is None


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda t: t.drop(columns="fired"), "missing column(s) ['fired']"),
        (lambda t: t.assign(cosine=t.cosine.where(t.index != 4)), "row 4: column 'cosine' is empty or NaN"),
        (lambda t: t.assign(n=t.n.where(t.index != 2, -5)), "row 2: n must be a positive count"),
        (lambda t: t.assign(fired=t.fired.where(t.index != 0, 101)), "row 0: fired must be <= n"),
        (
            lambda t: pd.concat([t, t.iloc[[3]]], ignore_index=True),
            "row 36: persona 'kindergarten_teacher' appears twice in layer 10",
        ),
        (lambda t: t[t.persona.isin(["villain", "comedian"])], "layer 10: needs at least 3 personas, has 2"),
    ],
)
def test_malformed_tables_get_one_clear_error(corrupt, message):
    with pytest.raises(TableError) as exc:
        validate_table(corrupt(pd.read_csv(TABLE)))
    assert message in str(exc.value)


def test_cli_writes_metrics_plot_data_and_figures(tmp_path):
    out = tmp_path / "regress"
    result = subprocess.run(
        [sys.executable, "-m", "personaspace.cli", "regress", "--table", str(TABLE), "--out", str(out),
         "--calibration", "software_engineer,librarian,villain,comedian,model_default,data_scientist",
         "--params", str(REPO / "params.yaml")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["primary_layer"] == 15 and "holdout" in metrics["layers"]["20"]
    for name in ("scatter", "rho_by_layer", "rates_forest"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    assert {"scatter.csv", "rho_by_layer.csv", "rates.csv"} <= {p.name for p in out.iterdir()}


def test_cli_writes_nothing_for_a_bad_table(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.read_csv(TABLE).assign(fired=200).to_csv(bad, index=False)
    out = tmp_path / "regress"
    result = subprocess.run(
        [sys.executable, "-m", "personaspace.cli", "regress", "--table", str(bad), "--out", str(out),
         "--params", str(REPO / "params.yaml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2 and "fired must be <= n" in result.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]


def _synthetic(slope_sign_holdout: int, seed: int, n: int = 24) -> tuple[pd.DataFrame, list[str], list[str]]:
    rng = np.random.default_rng(seed)
    categories = ["occupational", "character", "generic_helper"] * (n // 3)
    cosine = rng.uniform(0, 1, n)
    personas = [f"p{i:02d}" for i in range(n)]
    calibration, holdout = personas[::2], personas[1::2]
    sign = np.array([1 if p in calibration else slope_sign_holdout for p in personas])
    rate = np.clip(0.5 + sign * 0.8 * (cosine - 0.5) + rng.normal(0, 0.03, n), 0, 1)
    table = pd.DataFrame({"persona": personas, "category": categories, "cosine": cosine, "rate": rate})
    return table, calibration, holdout


def test_three_gate_outcomes_on_known_structures():
    table, cal, hold = _synthetic(+1, seed=0)
    gates = {name: three_gate(table, cal, hold, THRESHOLDS) for name in ("given", "other")}
    assert gates["given"]["A"] and gates["given"]["B"] and gates["given"]["C"]
    assert gate_outcome(gates, THRESHOLDS)[0] == "consistent"
    table, cal, hold = _synthetic(-1, seed=1)
    gates = {"given": three_gate(table, cal, hold, THRESHOLDS), "random": three_gate(table, hold, cal, THRESHOLDS)}
    assert gate_outcome(gates, THRESHOLDS)[0] == "inverted"
    table, cal, hold = _synthetic(+1, seed=2)
    table["cosine"] = -table["cosine"]
    gates = {"given": three_gate(table, cal, hold, THRESHOLDS), "random": three_gate(table, hold, cal, THRESHOLDS)}
    assert gate_outcome(gates, THRESHOLDS)[0] == "anti_correlated"
    table["rate"] = np.random.default_rng(3).uniform(0, 1, len(table))
    gates = {"given": three_gate(table, cal, hold, THRESHOLDS), "random": three_gate(table, hold, cal, THRESHOLDS)}
    assert gate_outcome(gates, THRESHOLDS)[0] == "indeterminate"
    assert gate_outcome({"only": gates["given"]}, THRESHOLDS)[0] == "indeterminate"


def test_stratified_split_is_seeded_stratified_and_order_free():
    table, _, _ = _synthetic(+1, seed=0)
    cal, hold = stratified_split(table, 0.5, seed=4)
    assert (cal, hold) == stratified_split(table.iloc[::-1], 0.5, seed=4)
    held = table.set_index("persona").loc[hold, "category"].value_counts()
    assert held.to_dict() == {"occupational": 4, "character": 4, "generic_helper": 4}
    assert stratified_split(table, 0.5, seed=5) != (cal, hold)


def test_drift_sign_test_is_the_exact_binomial():
    before = {f"p{i}": 0.3 for i in range(10)}
    after = {f"p{i}": 0.5 for i in range(10)}
    out = drift_sign_test(before, after, alpha=0.05)
    assert (out["up"], out["down"]) == (10, 0) and out["p"] == pytest.approx(2 * 0.5**10)
    assert out["confidence"] == "LOW"
    assert drift_sign_test(before, before, alpha=0.05)["p"] is None


def test_off_diagonal_uses_every_source_bystander_cell_and_splits_emitters():
    names = ["a", "b", "c", "d"]
    rng = np.random.default_rng(0)
    cosines = pd.DataFrame(rng.uniform(0, 1, (4, 4)), index=names, columns=names)
    rates = cosines.copy()  # bystander rate = cosine exactly
    for i, name in enumerate(names):
        rates.loc[name, name] = [0.9, 0.8, 0.1, 0.2][i]
    out = off_diagonal(rates, cosines, strong_emitter_min_rate=0.5)
    assert out["all"]["n_cells"] == 12 and out["all"]["rho"] == pytest.approx(1.0)
    assert out["strong"]["n_cells"] == 6 and out["weak"]["n_cells"] == 6


def test_rate_heatmap_writes_png_and_pdf(tmp_path):
    from personaspace.plots import rate_heatmap

    names = ["librarian", "villain", "comedian"]
    matrix = pd.DataFrame(np.random.default_rng(0).uniform(0, 1, (3, 3)), index=names, columns=names)
    paths = rate_heatmap(matrix, tmp_path / "heatmap")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in paths)
