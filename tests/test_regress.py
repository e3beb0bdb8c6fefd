"""`personaspace regress`: the S1 suite on a (persona, layer) table; gates; plots; bad tables."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from personaspace.io import json_text
from personaspace.regress import RegressSettings, TableError, regress_table, validate_table
from personaspace.report.studies import num, panel_section
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
    table.loc[(table.layer == 10) & (table.persona != "helpful_assistant"), "cosine"] = 0.5  # the reference's stays 1
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
    assert metrics["layers"]["10"]["cooks_distance_reason"] == "rate is constant"


def test_a_report_renders_a_study_where_nothing_fired():
    """Found on the H200 (issue 27): a random-init 7B never writes the marker, and the report stage
    failed on the undefined length-partial correlation (KeyError 'test')."""
    table = pd.read_csv(TABLE)
    table["fired"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no 0/0 left in the analysis
        metrics, _ = regress_table(table, _settings())
    metrics["off_diagonal"] = {"all": {"n_cells": 132, "rho": None, "p": None}}
    evaluation = {"source_rate_mean": 0.0, "bystander_rate_mean": 0.0, "baseline_rate": 0.0}
    section = panel_section("base", "panel", metrics, evaluation, level=0.95)
    lines = [h for h in section.headline if h.quantity == "Length-partial Spearman rho"]
    assert lines and lines[0].value == num(None) and "pingouin" in lines[0].test


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


def _drawn(monkeypatch, draw) -> list:
    """The figures ``draw()`` makes, kept open instead of saved."""
    from personaspace import plots

    figures: list = []
    monkeypatch.setattr(plots, "_save", lambda fig, stem: figures.append(fig) or [])
    draw()
    return figures


def test_the_rate_matrix_outlines_each_sources_own_cell(monkeypatch):
    from matplotlib.patches import Rectangle

    from personaspace.plots import rate_heatmap

    matrix = pd.read_csv(REPO / "tests/fixtures/rate_matrix_12.csv", index_col=0)
    (fig,) = _drawn(monkeypatch, lambda: rate_heatmap(matrix, Path("unused")))
    outlined = {
        (round(r.get_x() + 0.5), round(r.get_y() + 0.5)) for r in fig.axes[0].patches if isinstance(r, Rectangle)
    }
    columns = list(matrix.columns)
    assert outlined == {(columns.index(source), i) for i, source in enumerate(matrix.index)}


def test_the_prediction_band_stays_within_the_rates_range(monkeypatch):
    from personaspace.plots import hero_scatter

    scatter = pd.read_csv(REPO / "plots/panel/base/scatter.csv")
    assert scatter["pi_high"].max() > 1  # the committed fit's band would rise above a rate of 1
    (fig,) = _drawn(monkeypatch, lambda: hero_scatter(scatter, Path("unused"), 15, "helpful_assistant"))
    band = fig.axes[0].collections[0].get_paths()[0].vertices
    assert band[:, 1].min() >= 0 and band[:, 1].max() <= 1


def test_the_scatter_labels_do_not_overlap(monkeypatch):
    """The committed panel's persona labels, which overlapped when placed beside each point."""
    from personaspace.plots import hero_scatter

    scatter = pd.read_csv(REPO / "plots/panel/base/scatter.csv")
    (fig,) = _drawn(monkeypatch, lambda: hero_scatter(scatter, Path("unused"), 15, "helpful_assistant"))
    renderer = fig.canvas.get_renderer()
    names = set(scatter["persona"])
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts if t.get_text() in names]
    assert len(boxes) == len(names)
    overlapping = [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert not overlapping


# --- refusals and conventions of `personaspace regress` (run through personaspace.cli.main) ---


@pytest.fixture
def quick_params(tmp_path, raw_params):
    """The committed params with small simulation counts, so each CLI run takes about a second."""
    raw_params["stats"].update(power_simulations=200, cv_repeats=2)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw_params))
    return path


def _regress(params: Path, table: Path, out: Path, *extra: str) -> int:
    from personaspace.cli import main

    return main(["regress", "--table", str(table), "--out", str(out), "--params", str(params), *extra])


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_regress_refuses_an_unknown_reference_persona(tmp_path, quick_params, capsys):
    before = _tree(tmp_path)
    assert _regress(quick_params, TABLE, tmp_path / "out", "--reference", "helpful_asistant") == 2
    err = capsys.readouterr().err
    assert "--reference" in err and "'helpful_asistant'" in err and "helpful_assistant, kindergarten_teacher" in err
    assert _tree(tmp_path) == before  # nothing written


def test_regress_refuses_a_reference_whose_cosine_is_not_1(tmp_path, quick_params, capsys):
    """A known but wrong reference: the cosines were taken to another persona (its own cosine is not 1)."""
    assert _regress(quick_params, TABLE, tmp_path / "out", "--reference", "librarian") == 2
    err = capsys.readouterr().err
    assert "--reference" in err and "'librarian'" in err and "cosine 0.3 in layer 10" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "calibration,message",
    [
        ("librarian,villian,comedian,zelthari", "names persona(s) not in the table: 'villian', 'zelthari'"),
        ("librarian,villain,helpful_assistant", "--calibration names the reference persona 'helpful_assistant'"),
    ],
)
def test_regress_refuses_an_unknown_calibration_persona(tmp_path, quick_params, capsys, calibration, message):
    assert _regress(quick_params, TABLE, tmp_path / "out", "--calibration", calibration) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_regress_refuses_a_fractional_layer():
    table = pd.read_csv(TABLE).astype({"layer": float})
    table.loc[table.layer == 15, "layer"] = 15.5  # astype(int) read this silently as layer 15
    with pytest.raises(TableError, match=r"row 1: layer must be a whole number, got 15\.5"):
        validate_table(table)


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda t: t.assign(fired=t.fired > 50), "row 0: column 'fired' holds true/false, not a number"),
        (lambda t: t.assign(n=True), "row 0: column 'n' holds true/false, not a number"),
        (lambda t: t.assign(layer=t.layer.astype(object).where(t.index != 7, True)), "row 7: column 'layer' holds"),
        (lambda t: t.assign(prompt_tokens=t.prompt_tokens.where(t.index != 3, 17.5)), "row 3: prompt_tokens must be"),
        (lambda t: t.assign(inherited=["yes"] * len(t)), "row 0: inherited must be true or false, got 'yes'"),
        (
            lambda t: t.assign(prompt=t.prompt.where(t.index != 1, "You are someone else.")),
            "persona 'software_engineer': prompt differs between layers",
        ),
    ],
)
def test_regress_refuses_other_silent_coercions(corrupt, message):
    with pytest.raises(TableError) as exc:
        validate_table(corrupt(pd.read_csv(TABLE)))
    assert message in str(exc.value)


def test_regress_survives_a_persona_without_a_system_prompt():
    """0 prompt tokens (no system prompt): the length controls are undefined with a reason, not a crash."""
    table = pd.read_csv(TABLE)
    table.loc[table.persona == "model_default", ["prompt", "prompt_tokens"]] = ["", 0]
    metrics, _ = regress_table(table, _settings())
    layer = metrics["layers"]["15"]
    assert layer["length_partial_spearman"] is None and "0 prompt tokens" in layer["length_partial_spearman_reason"]
    assert layer["spearman"]["rho"] is not None


def test_regress_refuses_an_empty_table(tmp_path, quick_params, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text(TABLE.read_text().splitlines()[0] + "\n")
    with pytest.raises(TableError, match="no rows"):
        validate_table(pd.read_csv(empty))
    assert _regress(quick_params, empty, tmp_path / "out") == 2
    assert "the table has no rows" in capsys.readouterr().err
    (tmp_path / "blank.csv").write_text("")
    assert _regress(quick_params, tmp_path / "blank.csv", tmp_path / "out") == 2
    assert "--table" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_regress_refuses_to_replace_a_folder_it_did_not_write(tmp_path, quick_params, capsys):
    out = tmp_path / "analysis"
    out.mkdir()
    (out / "notes.md").write_text("my notes")
    assert _regress(quick_params, TABLE, out) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "choose a new --out or empty it" in err
    assert _tree(out) == {"notes.md": b"my notes"}
    (tmp_path / "a_file").write_text("x")
    assert _regress(quick_params, TABLE, tmp_path / "a_file") == 2
    assert (tmp_path / "a_file").read_text() == "x"


def test_regress_replaces_only_what_its_previous_run_wrote(tmp_path, quick_params, capsys):
    out = tmp_path / "analysis"
    out.mkdir()  # an empty folder is fine
    assert _regress(quick_params, TABLE, out) == 0
    manifest = json.loads((out / ".personaspace-regress.json").read_text())
    assert set(manifest["files"]) == set(_tree(out)) - {".personaspace-regress.json"}
    (out / "metrics.json").write_text("{}")  # a previous run's own file, edited: still its own
    assert _regress(quick_params, TABLE, out) == 0 and json.loads((out / "metrics.json").read_text())
    (out / "extra.csv").write_text("mine")
    capsys.readouterr()
    assert _regress(quick_params, TABLE, out) == 2
    assert "extra.csv" in capsys.readouterr().err and (out / "extra.csv").read_text() == "mine"


def test_regress_include_reference_keeps_the_reference_in_the_fit(tmp_path, quick_params, raw_params, capsys):
    calibration = "software_engineer,kindergarten_teacher,librarian,french_person,villain,model_default"
    assert _regress(quick_params, TABLE, tmp_path / "without", "--calibration", calibration) == 0
    assert "rho = 0.936" in capsys.readouterr().out  # the number the README quotes
    assert _regress(quick_params, TABLE, tmp_path / "with", "--calibration", calibration, "--include-reference") == 0
    without, with_ = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("without", "with"))
    assert without["layers"]["15"]["spearman"]["rho"] == pytest.approx(0.9363636, abs=1e-6)
    assert without["layers"]["15"]["spearman"]["p"] == pytest.approx(2.2e-05, rel=0.05)
    assert (without["n_personas"], without["reference_in_fit"]) == (11, False)
    assert without["excluded"] == ["helpful_assistant"]
    assert (with_["n_personas"], with_["reference_in_fit"], with_["excluded"]) == (12, True, [])
    assert with_["layers"]["15"]["spearman"]["rho"] != pytest.approx(without["layers"]["15"]["spearman"]["rho"])
    assert "helpful_assistant" in with_["layers"]["15"]["cooks_distance"]


def test_settings_read_fit_reference_from_params(raw_params):
    from personaspace.config import StatsParams
    from personaspace.regress import settings_from_params

    stats = StatsParams.model_validate(raw_params["stats"])
    assert settings_from_params(stats, seed=0).fit_reference is False
    assert settings_from_params(stats, seed=0, fit_reference=True).fit_reference is True
    stats = StatsParams.model_validate({**raw_params["stats"], "fit_reference": True})
    assert settings_from_params(stats, seed=0).fit_reference is True


def test_regress_survives_a_source_that_always_fires(tmp_path, quick_params):
    table = pd.read_csv(TABLE)
    table.loc[table.persona == "software_engineer", ["fired", "n"]] = [60, 60]
    table.loc[table.persona == "villain", ["fired", "n"]] = [0, 100]
    path = tmp_path / "edges.csv"
    table.to_csv(path, index=False)
    out = tmp_path / "out"
    assert _regress(quick_params, path, out) == 0
    for name in ("scatter", "rho_by_layer", "rates_forest"):
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.pdf").stat().st_size > 1000
    rates = json.loads((out / "metrics.json").read_text())["rates"]
    assert (rates["software_engineer"]["rate"], rates["villain"]["rate"]) == (1.0, 0.0)
    for persona, rate in rates.items():
        assert rate["wilson_low"] <= rate["rate"] <= rate["wilson_high"], persona
