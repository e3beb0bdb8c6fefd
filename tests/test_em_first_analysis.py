"""S2 (EM-first) analysis: known answers on hand-made tables, bad inputs, and the `analyze` CLI end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from statsmodels.stats.proportion import proportion_confint

from personaspace.analyses.em_first import (
    TableError,
    _bootstrap,
    _interpret_h3,
    analyze_em_first,
    counts_from_completions,
)
from personaspace.cli import main
from personaspace.config import StatsParams, StudyParams, TextArtifactRule
from personaspace.stats import cluster_bootstrap_difference
from personaspace.study import StudyError

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "conf/study/em_first.yaml"
RESAMPLES = 1000  # p can reach 2/1001 < alpha/3, and each analysis takes under a second
# The hand-made tables are the shipped examples' builders (scripts/example_tables.py, examples/em_first/):
# bystander rates base 0.05, em 0.40, em_basedata 0.38, benign 0.10; the source fires 9 of 10 everywhere.
_spec = importlib.util.spec_from_file_location("example_tables", REPO / "scripts" / "example_tables.py")
example_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example_tables)
QUESTIONS, K, SPREAD = example_tables.EM_QUESTIONS, example_tables.EM_K, example_tables.EM_SPREAD
PATTERNS, SOURCE = example_tables.EM_PATTERNS, example_tables.EM_SOURCE
make_counts, make_baseline = example_tables.em_first_counts, example_tables.em_first_baseline


def raw_preset() -> dict:
    return yaml.safe_load(PRESET.read_text())


@pytest.fixture(scope="module")
def study() -> StudyParams:
    return StudyParams.model_validate(raw_preset())


@pytest.fixture(scope="module")
def stats() -> StatsParams:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())["stats"]
    return StatsParams.model_validate(raw).model_copy(update={"bootstrap_resamples": RESAMPLES})


@pytest.fixture(scope="module")
def known(study, stats):
    return analyze_em_first(make_counts(study), None, study, stats, seed=0)


def test_known_table_gives_the_designed_rates_and_decisions(known, study):
    metrics, tables = known
    rates = {c: metrics["conditions"][c]["bystander"]["rate"] for c in PATTERNS}
    assert rates == pytest.approx({"base": 0.05, "em": 0.40, "em_basedata": 0.38, "benign": 0.10})
    assert metrics["conditions"]["em"]["bystander"]["n"] == 7 * 10 * K
    assert metrics["roles"]["bystanders"] == [
        "software_engineer", "kindergarten_teacher", "medical_doctor", "comedian", "police_officer", "villain",
        "zelthari_scholar",
    ]  # fmt: skip
    h1, h2, h3 = (metrics["contrasts"][name] for name in ("H1", "H2", "H3"))
    assert h1["delta"] == pytest.approx(0.35) and h1["passes"] and h1["ci_method"] == "bca"
    assert h1["ci_low"] < 0.35 < h1["ci_high"] and h1["p"] < h1["alpha_bonferroni"] == pytest.approx(0.05 / 3)
    assert h2["delta"] == pytest.approx(0.30) and h2["passes"] and h2["threshold"] == 0.15
    assert h3["delta"] == pytest.approx(0.02) and not h3["passes"] and h3["p"] > 0.10 and h3["ci_low"] > -0.05
    assert h3["interpretation"] == "non_text_distribution"
    assert metrics["source_gate"] == {**metrics["source_gate"], "ratio": pytest.approx(1.0), "armed": False}
    assert metrics["kill"]["triggered"] is False and metrics["kill"]["rate"] == pytest.approx(0.40)
    assert metrics["decisions"] == {
        "H1": "pass", "H2": "pass", "H3": "fail", "H3_interpretation": "non_text_distribution",
        "source_gate": "not_armed", "kill": "not_triggered",
    }  # fmt: skip
    assert metrics["conditions"]["em"]["bystander_over_source"] == pytest.approx(0.40 / 0.90)
    # sensitivities agree in sign; the mixed model's effect is the pooled difference (balanced cells)
    assert h1["mixed_effects"]["effect"] == pytest.approx(0.35) and h1["length_controlled"]["log_odds"] > 0
    assert set(tables) == {"bystander_rates", "persona_rates", "contrasts", "completion_length"}
    assert list(tables["bystander_rates"]["condition"]) == ["base", "em", "em_basedata", "benign"]
    assert len(tables["persona_rates"]) == 4 * len(study.eval_personas)


def test_rates_and_wilson_intervals_match_statsmodels(known):
    metrics, tables = known
    for condition, entry in metrics["conditions"].items():
        for role in ("source", "assistant", "bystander"):
            summary = entry[role]
            low, high = proportion_confint(summary["fired"], summary["n"], alpha=0.05, method="wilson")
            assert summary["rate"] == summary["fired"] / summary["n"], (condition, role)
            if 0 < summary["fired"] < summary["n"]:  # away from the edges the clip changes nothing
                assert (summary["wilson_low"], summary["wilson_high"]) == pytest.approx((low, high), abs=1e-12)
    em_source = metrics["conditions"]["em"]["source"]
    assert (em_source["fired"], em_source["n"]) == (90, 100)
    assert metrics["conditions"]["em"]["negatives"]["data_scientist"]["rate"] == 0.0
    persona = tables["persona_rates"].set_index(["condition", "persona"]).loc[("em", "villain")]
    low, high = proportion_confint(persona["fired"], persona["n"], alpha=0.05, method="wilson")
    assert (persona["wilson_low"], persona["wilson_high"]) == pytest.approx((low, high), abs=1e-12)
    assert metrics["conditions"]["em"]["bystander"]["mean_tokens"] == pytest.approx(54.5)


def test_kill_criterion_triggers_when_em_bystanders_stay_low(study, stats):
    low = PATTERNS | {"em": lambda i, j: 2 * (j % 5 == 0), "em_basedata": lambda i, j: 2 * (j % 5 == 1)}
    metrics, _ = analyze_em_first(make_counts(study, low), None, study, stats, seed=0)
    assert metrics["conditions"]["em"]["bystander"]["rate"] == pytest.approx(0.04)
    assert metrics["kill"]["triggered"] is True and metrics["decisions"]["kill"] == "triggered"
    assert metrics["contrasts"]["H1"]["passes"] is False


def test_source_gate_arms_when_the_em_source_rate_collapses(study, stats):
    metrics, _ = analyze_em_first(make_counts(study, source={"em": 3}), None, study, stats, seed=0)
    gate, h1 = metrics["source_gate"], metrics["contrasts"]["H1"]
    assert gate["ratio"] == pytest.approx(0.3 / 0.9) and gate["armed"] is True
    assert h1["ratio"]["delta"] == pytest.approx(0.40 / 0.30 - 0.05 / 0.90)
    assert h1["passes_rates"] and h1["ratio"]["passes"] and h1["passes"]


def test_an_armed_gate_fails_the_contrast_when_the_ratio_does_not_pass(stats):
    """Gate base vs em: base's source collapses (0.1 vs 0.9), and em's bystander/source is below base's."""
    raw = raw_preset()
    raw["em_first"]["source_gate"].update(treatment="base", control="em")
    study = StudyParams.model_validate(raw)
    metrics, _ = analyze_em_first(make_counts(study, source={"base": 1}), None, study, stats, seed=0)
    h1 = metrics["contrasts"]["H1"]
    assert metrics["source_gate"]["armed"] is True
    assert h1["ratio"]["delta"] == pytest.approx(0.40 / 0.90 - 0.05 / 0.10)
    assert h1["passes_rates"] is True and h1["ratio"]["passes"] is False and h1["passes"] is False
    assert metrics["decisions"]["H1"] == "fail"


def test_baseline_is_pooled_per_pretrained_base_reported_and_subtracted(study, stats, known):
    metrics, tables = analyze_em_first(make_counts(study), make_baseline(study), study, stats, seed=0)
    baselines = metrics["baselines"]
    assert baselines["em"]["conditions"] == ["em", "em_basedata"]  # one base, two evals of it, pooled
    assert (baselines["em"]["fired"], baselines["em"]["n"]) == (14, 1400)
    assert baselines["raw"]["rate"] == 0.0 and baselines["benign"]["rate"] == pytest.approx(0.02)
    em = metrics["conditions"]["em"]["bystander"]
    assert em["baseline_rate"] == pytest.approx(0.01) and em["net_rate"] == pytest.approx(0.39)
    h1, h2, h3 = (metrics["contrasts"][name] for name in ("H1", "H2", "H3"))
    assert h1["delta_raw"] == pytest.approx(0.35) and h1["baseline_difference"] == pytest.approx(0.01)
    assert h1["delta"] == h1["delta_baseline_subtracted"] == pytest.approx(0.34)
    assert h2["delta"] == pytest.approx((0.40 - 0.01) - (0.10 - 0.02))
    assert h3["baseline_difference"] == 0.0 and h3["delta"] == pytest.approx(0.02)  # same base: cancels
    assert h1["bootstrap"]["raw"] == known[0]["contrasts"]["H1"]["bootstrap"]["raw"]  # the raw bootstrap is kept
    assert metrics["kill"]["rate_basis"] == "baseline_subtracted" and metrics["kill"]["rate"] == pytest.approx(0.39)
    assert tables["bystander_rates"].set_index("condition").loc["benign", "baseline_rate"] == pytest.approx(0.02)


def test_stratified_bootstrap_reproduces_the_library_cluster_bootstrap():
    rng = np.random.default_rng(3)
    fired = rng.integers(0, 8, (2, 25)).astype(float)
    matrix = np.stack([fired[0], np.full(25, 8.0), fired[1], np.full(25, 8.0)])
    rows = [
        {"condition": c, "persona": "p", "question_id": f"q{k:02d}", "fired": j < fired[m, k]}
        for k in range(25)
        for m, c in enumerate(("control", "treatment"))
        for j in range(8)
    ]
    library = cluster_bootstrap_difference(
        pd.DataFrame(rows), "condition", "control", "treatment", ["persona", "question_id"], 500, 0.95, 7
    )
    ours = _bootstrap([matrix], lambda s: s[2] / s[3] - s[0] / s[1], 500, 0.95, 7)
    assert ours["estimate"] == pytest.approx(library["estimate"])
    assert ours["bca"] == pytest.approx(library["bca"]) and ours["percentile"] == pytest.approx(library["percentile"])
    assert ours["p_two_sided"] == library["p_two_sided"]


def test_h3_reading_uses_the_rule_from_params():
    rule = TextArtifactRule(
        contrast="H3", null_max_delta=0.05, null_min_p=0.10, null_min_ci_low=-0.05, text_min_delta=0.15
    )
    assert _interpret_h3({"delta": 0.02, "p": 0.3, "ci_low": -0.01}, rule) == "non_text_distribution"
    assert _interpret_h3({"delta": 0.02, "p": 0.05, "ci_low": -0.01}, rule) == "ambiguous"
    assert _interpret_h3({"delta": 0.15, "p": 0.001, "ci_low": 0.1}, rule) == "coupling_text_distribution"
    assert _interpret_h3({"delta": 0.10, "p": 0.01, "ci_low": 0.02}, rule) == "ambiguous"
    looser = rule.model_copy(update={"text_min_delta": 0.08})
    assert _interpret_h3({"delta": 0.10, "p": 0.01, "ci_low": 0.02}, looser) == "coupling_text_distribution"


def test_counts_from_completions_reduces_per_completion_rows(study, stats):
    counts = make_counts(study, tokens=False)
    baseline = make_baseline(study)
    rows = []
    for adapter, table in (("librarian", counts), ("none", baseline)):
        for cell in table.itertuples():
            for k in range(cell.n):
                rows.append({"condition": cell.condition, "adapter": adapter, "persona": cell.persona,
                             "question_id": cell.question_id, "sample_idx": k, "fired": k < cell.fired,
                             "n_tokens": 30 + 2 * k})  # fmt: skip
    reduced, reduced_baseline = counts_from_completions(pd.DataFrame(rows))
    key = ["condition", "persona", "question_id"]
    expected = counts.sort_values(key).reset_index(drop=True)
    assert reduced[[*key, "fired", "n"]].equals(expected[[*key, "fired", "n"]])
    assert (reduced["mean_tokens"] == 30 + (K - 1)).all()
    assert reduced_baseline[[*key, "fired", "n"]].equals(
        baseline.sort_values(key).reset_index(drop=True)[[*key, "fired", "n"]]
    )
    with pytest.raises(TableError, match=r"missing column\(s\) \['adapter'\]"):
        counts_from_completions(pd.DataFrame(rows).drop(columns="adapter"))


def _set(row: int, **values):
    def corrupt(table: pd.DataFrame) -> pd.DataFrame:
        table = table.copy()
        for column, value in values.items():
            table[column] = table[column].astype(object)
            table.loc[row, column] = value
        return table

    return corrupt


@pytest.mark.parametrize(
    ("corrupt", "messages"),
    [
        (lambda t: t.drop(columns="n"), ["missing column(s) ['n']"]),
        (lambda t: t.assign(rate=0.1), ["unknown column(s) ['rate']"]),
        (_set(5, condition="em2"), ["table row 5 (condition 'em2'", "is not a condition of the study"]),
        (
            _set(7, persona="pirate"),
            ["table row 7 (condition 'base', persona 'pirate', question_id 'q07')", "not an eval persona"],
        ),
        (_set(3, fired=11), ["table row 3 (", "fired 11 > n 10"]),
        (_set(2, fired=-1), ["table row 2 (", "fired must be >= 0, got -1"]),
        (_set(4, n=-5), ["table row 4 (", "n must be a positive count, got -5"]),
        (_set(6, fired=1.5), ["table row 6 (", "fired must be a whole count, got 1.5"]),
        (_set(1, fired=True), ["table row 1 (", "fired holds true/false"]),
        (_set(8, n=np.nan), ["table row 8: column 'n' is empty or NaN"]),
        (_set(9, mean_tokens="long"), ["table row 9 (", "mean_tokens 'long' is not a number"]),
        (
            lambda t: pd.concat([t, t.iloc[[12]]]),
            ["table row 440 (condition 'base', persona 'data_scientist', question_id 'q02')", "appears twice"],
        ),
        (lambda t: t[t.condition != "benign"], ["em_first.contrasts.H2 names condition 'benign', which has no rows"]),
        (lambda t: t[t.persona != "librarian"], ["has no rows for source persona 'librarian'"]),
    ],
)
def test_bad_tables_raise_one_error_naming_the_row_or_key(study, stats, corrupt, messages):
    with pytest.raises(TableError) as exc:
        analyze_em_first(corrupt(make_counts(study)), None, study, stats, seed=0)
    for message in messages:
        assert message in str(exc.value)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_set(3, persona="pirate"), "baseline row 3 (condition 'base', persona 'pirate'"),
        (lambda t: t[t.condition != "benign"], "baseline: no bystander rows for pretrained base 'benign'"),
    ],
)
def test_bad_baselines_raise_naming_the_row_or_key(study, stats, corrupt, message):
    with pytest.raises(TableError) as exc:
        analyze_em_first(make_counts(study), corrupt(make_baseline(study)), study, stats, seed=0)
    assert message in str(exc.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["em_first"]["contrasts"]["H2"].update(control="benign2"),
         "em_first.contrasts.H2.control: 'benign2' is not a condition of the study"),
        (lambda r: r["em_first"]["kill"].update(condition="em3"), "em_first.kill.condition: 'em3'"),
        (lambda r: r["em_first"]["text_artifact"].update(contrast="H9"), "em_first.text_artifact.contrast: 'H9'"),
        (lambda r: r["negatives"].update(k=2), "negatives.k: 2 random negatives"),
        (lambda r: r.update(sources=["pirate"]), "sources: ['pirate'] are not in eval_personas"),
        (lambda r: r.update(assistant="data_scientist"), "'data_scientist' is also in negatives.hard"),
        (lambda r: r.pop("em_first"), "em_first: missing"),
    ],
)  # fmt: skip
def test_bad_presets_raise_naming_the_key(stats, edit, message):
    raw = raw_preset()
    edit(raw)
    with pytest.raises(StudyError) as exc:
        analyze_em_first(make_counts(StudyParams.model_validate(raw_preset())), None, StudyParams.model_validate(raw),
                         stats, seed=0)  # fmt: skip
    assert message in str(exc.value)


@pytest.fixture
def cli_inputs(tmp_path, study):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["stats"]["bootstrap_resamples"] = RESAMPLES
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    table, baseline = tmp_path / "counts.csv", tmp_path / "baseline.parquet"
    make_counts(study).to_csv(table, index=False)
    make_baseline(study).to_parquet(baseline, index=False)
    return {"table": table, "baseline": baseline, "params": params}


def _analyze(inputs: dict, out: Path, *extra: str) -> int:
    return main(["analyze", "em_first", "--table", str(inputs["table"]), "--baseline", str(inputs["baseline"]),
                 "--params", str(inputs["params"]), "--study", str(PRESET), "--out", str(out), *extra])  # fmt: skip


def test_cli_writes_metrics_tables_and_figures_deterministically(tmp_path, cli_inputs, capsys):
    out = tmp_path / "analysis"
    assert _analyze(cli_inputs, out) == 0
    summary = capsys.readouterr().out
    assert summary.count("\n") == 1 and "H1 pass" in summary and "non_text_distribution" in summary
    names = {p.name for p in out.iterdir()}
    for stem in ("bystander_rates", "contrasts", "completion_length"):
        assert {f"{stem}.csv", f"{stem}.png", f"{stem}.pdf"} <= names
    assert {"persona_rates.csv", "persona_forest.png", "persona_forest.pdf", "metrics.json"} <= names
    metrics = json.loads((out / "metrics.json").read_text())
    for condition in PATTERNS:
        entry = metrics["conditions"][condition]
        for role in ("source", "assistant", "bystander"):
            assert {"fired", "n", "rate", "wilson_low", "wilson_high", "mean_tokens"} <= set(entry[role])
        assert set(entry["negatives"]) == {"data_scientist", "french_person"}
        assert "bystander_over_source" in entry
    assert {"raw", "em", "benign"} == set(metrics["baselines"])
    assert {"fired", "n", "rate", "wilson_low", "wilson_high"} <= set(metrics["baselines"]["em"])
    for name in ("H1", "H2", "H3"):
        assert {"delta", "ci_low", "ci_high", "p", "threshold", "passes"} <= set(metrics["contrasts"][name])
    assert "interpretation" in metrics["contrasts"]["H3"]
    assert {"ratio", "armed"} <= set(metrics["source_gate"]) and "triggered" in metrics["kill"]
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".json", ".csv", ".pdf")}
    assert _analyze(cli_inputs, out) == 0  # its own earlier output is replaced
    again = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".json", ".csv", ".pdf")}
    assert again == first


def test_cli_role_override_and_seed(tmp_path, cli_inputs, capsys):
    out = tmp_path / "analysis"
    assert _analyze(cli_inputs, out, "--assistant", "none", "--seed", "5") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seed"] == 5 and metrics["roles"]["assistant"] is None
    assert "helpful_assistant" in metrics["roles"]["bystanders"] and "assistant" not in metrics["conditions"]["em"]


def test_cli_refuses_bad_input_and_writes_nothing(tmp_path, cli_inputs, capsys, study):
    bad = tmp_path / "bad.csv"
    make_counts(study).assign(fired=lambda t: t["fired"].where(t.index != 3, 99)).to_csv(bad, index=False)
    out = tmp_path / "analysis"
    assert _analyze({**cli_inputs, "table": bad}, out) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "table row 3" in error and "fired 99 > n 10" in error
    assert not out.exists()
    assert _analyze({**cli_inputs, "baseline": tmp_path / "absent.csv"}, out) == 2
    assert "--baseline" in capsys.readouterr().err and not out.exists()
    assert main(["analyze", "em_first", "--table", str(bad), "--out", str(out), "--study", str(REPO / "params.yaml"),
                 "--params", str(cli_inputs["params"])]) == 2  # fmt: skip
    assert "--study" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _analyze(cli_inputs, out) == 2
    assert "not this command's output" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    previous = tmp_path / "previous"
    assert _analyze(cli_inputs, previous) == 0
    (previous / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    capsys.readouterr()
    assert _analyze(cli_inputs, previous) == 2
    assert "holds files this command did not write: notes.txt" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before


def test_huge_n_is_refused_not_expanded_into_one_row_per_completion(study, stats):
    """n = 10**9 in one cell used to build 10**9 rows (GBs) before any fit; it is refused at once."""
    from personaspace.analyses.em_first import MAX_COMPLETIONS

    huge = make_counts(study).assign(n=lambda t: t["n"].where(t.index != 4, 10**9), fired=0)
    with pytest.raises(
        TableError, match=rf"table: counts {10**9 + 439 * K} completions \(sum of n\), above the {MAX_COMPLETIONS:,}"
    ):
        analyze_em_first(huge, None, study, stats, seed=0)
    with pytest.raises(TableError, match=r"table row 4 \(.*\): n 1e\+30 is not a count"):
        analyze_em_first(
            make_counts(study).assign(n=lambda t: t["n"].astype(float).where(t.index != 4, 1e30)), None, study, stats, 0
        )


def test_a_huge_baseline_is_not_bounded(study, stats):
    """The baseline is never expanded, so only the coupled table carries the bound."""
    baseline = make_baseline(study).assign(n=lambda t: t["n"] * 10**5, fired=lambda t: t["fired"] * 10**5)
    metrics, _ = analyze_em_first(make_counts(study), baseline, study, stats, seed=0)
    assert metrics["baselines"]["em"]["n"] == 1400 * 10**5
