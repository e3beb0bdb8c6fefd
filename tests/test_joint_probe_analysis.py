"""S3 (joint probe) analysis: each H2 bucket and the kill on constructed tables, the geometric delta
against an independent computation, and the `analyze` CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from personaspace.analyses import TableError
from personaspace.analyses.joint_probe import BaseStates, analyze_joint_probe, decide
from personaspace.config import StatsParams, StudyParams
from personaspace.probes import centroids, cosine_table
from personaspace.study import StudyError, study_roles

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [f"e{i:02d}" for i in range(20)]
LAYERS = [3, 5]
RESAMPLES = 2000  # p reaches 2/2001 < 0.001


PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture(scope="module")
def study() -> StudyParams:
    raw = yaml.safe_load((REPO / "conf/study/joint_probe.yaml").read_text())
    raw["negatives"]["pool"] = PARAMS["panels"]["n12"]  # the preset's ${panels.n12}
    raw["recipes"] = ["ul_a"]
    return StudyParams.model_validate(raw)


@pytest.fixture(scope="module")
def stats() -> StatsParams:
    return StatsParams.model_validate(PARAMS["stats"] | {"bootstrap_resamples": RESAMPLES})


def _counts(study: StudyParams, rates: dict[str, float], k: int = 10) -> pd.DataFrame:
    """Fires per (condition, persona, question) cell around each condition's bystander rate (not degenerate)."""
    rows = []
    for condition, rate in rates.items():
        for p_i, persona in enumerate(study.eval_personas):
            for q_i, question in enumerate(QUESTIONS):
                wobble = (1, -1, 0, 0)[(p_i + q_i) % 4]
                fired = min(k, max(0, round(rate * k) + wobble))
                rows.append({"condition": condition, "recipe": "ul_a", "persona": persona, "question_id": question,
                             "fired": fired, "n": k, "truncated": 0})  # fmt: skip
    return pd.DataFrame(rows)


def _states(study: StudyParams, shift: float, seed: int) -> BaseStates:
    """Per-question readouts: each persona its own direction plus noise; ``shift`` pulls bystanders toward the source."""
    rng = np.random.default_rng(seed)
    hidden = 12
    axes = {p: np.eye(hidden)[i] for i, p in enumerate(study.eval_personas)}
    rows, personas, questions = [], [], []
    for persona in study.eval_personas:
        centre = axes[persona] + (shift * axes["librarian"] if persona != "librarian" else 0)
        for question in QUESTIONS:
            noise = rng.normal(scale=0.05, size=(len(LAYERS), hidden))
            rows.append(centre + noise)
            personas.append(persona)
            questions.append(question)
    return BaseStates(np.asarray(rows), personas, questions, LAYERS)


def _analyse(study, stats, rates, shifts):
    counts = _counts(study, rates)
    states = {"raw": _states(study, shifts[0], 1), "em": _states(study, shifts[1], 2), "benign": _states(study, 0, 3)}
    return analyze_joint_probe(counts, None, states, study, stats, seed=0)


@pytest.mark.parametrize(
    ("rates", "shifts", "bucket", "kill"),
    [
        ({"base": 0.1, "em": 0.5, "benign": 0.1}, (0.0, 0.6), "flattening_supported", "not_falsified"),
        ({"base": 0.1, "em": 0.1, "benign": 0.1}, (0.0, 0.6), "recipe_bottleneck", "not_falsified"),
        ({"base": 0.1, "em": 0.5, "benign": 0.1}, (0.6, 0.0), "sft_recipe_driven", "not_falsified"),
        ({"base": 0.3, "em": 0.3, "benign": 0.1}, (0.6, 0.0), "not_supported", "falsified"),
        ({"base": 0.1, "em": 0.2, "benign": 0.1}, (0.6, 0.0), "not_supported", "not_falsified"),
    ],
)
def test_each_h2_bucket_and_the_kill_on_constructed_tables(study, stats, rates, shifts, bucket, kill):
    metrics, tables = _analyse(study, stats, rates, shifts)
    recipe = metrics["recipes"]["ul_a"]
    assert (recipe["decision"], recipe["kill"]) == (bucket, kill)
    assert recipe["h1_joint"] == (bucket == "flattening_supported")
    h1 = recipe["h1"]
    assert h1["delta"] == pytest.approx(rates["em"] - rates["base"], abs=0.01)
    if bucket in ("flattening_supported", "sft_recipe_driven"):
        assert h1["p"] < 0.001 and h1["ci_low"] > 0.15
    assert set(tables) == {"bystander_rates", "geometric_by_layer"}
    assert list(tables["geometric_by_layer"]["layer"]) == LAYERS


def test_the_geometric_delta_equals_centroid_cosines_computed_directly(study, stats):
    metrics, _ = _analyse(study, stats, {"base": 0.1, "em": 0.5, "benign": 0.1}, (0.1, 0.6))
    states = {"raw": _states(study, 0.1, 1), "em": _states(study, 0.6, 2)}
    roles = study_roles(study, 0)
    by_layer = []
    for row, layer in enumerate(LAYERS):  # probes.cosine_table: the centroids stage's own cosines
        cos = {}
        for base, s in states.items():
            order, cents = centroids(s.values, list(s.personas))
            table = cosine_table(order, cents, order, "bank", LAYERS)
            part = table[(table.layer == layer) & (table.persona_a == "librarian")
                         & table.persona_b.isin(roles.bystanders)]  # fmt: skip
            cos[base] = part.set_index("persona_b")["cosine_centered"]
        by_layer.append(float((cos["em"] - cos["raw"]).mean()))
        assert metrics["geometric"]["h1"]["by_layer"][row]["delta"] == pytest.approx(by_layer[-1], abs=1e-9)
    assert metrics["geometric"]["h1"]["delta"] == pytest.approx(np.mean(by_layer), abs=1e-9)
    geo = metrics["geometric"]["h1"]
    assert geo["ci_low"] < geo["delta"] < geo["ci_high"] and geo["passes"]


def test_the_kill_needs_every_layer_at_or_below_zero():
    cfg = type("Cfg", (), {"kill_max_behavioural": 0.05})()
    geo = {"passes": False, "by_layer": [{"delta": -0.1}, {"delta": 0.01}]}
    assert decide({"passes": False, "delta": 0.0}, geo, cfg)["kill"] == "not_falsified"
    geo["by_layer"][1]["delta"] = 0.0
    assert decide({"passes": False, "delta": 0.0}, geo, cfg)["kill"] == "falsified"
    assert decide({"passes": False, "delta": 0.06}, geo, cfg)["kill"] == "not_falsified"


def test_a_trained_negative_is_refused_as_a_bystander(study):
    raw = study.model_dump() | {"bystanders": ["chef", "villain"], "eval_personas": ["librarian", "chef", "villain"]}
    with pytest.raises(StudyError, match=r"bystanders: \['villain'\] are trained as negatives"):
        study_roles(StudyParams.model_validate(raw), 0)
    drawn = [p for p in study_roles(study, 0).negatives if p not in study.negatives.hard]
    raw = study.model_dump() | {"bystanders": drawn, "eval_personas": ["librarian", *drawn]}
    with pytest.raises(StudyError, match=r"drawn from negatives\.pool"):  # the seeded draw counts too
        study_roles(StudyParams.model_validate(raw), 0)


def test_bad_tables_are_refused_naming_the_problem(study, stats):
    counts = _counts(study, {"base": 0.1, "em": 0.1, "benign": 0.1})
    states = {"raw": _states(study, 0, 1), "em": _states(study, 0, 2), "benign": _states(study, 0, 3)}
    with pytest.raises(TableError, match=r"missing column\(s\) \['recipe'\]"):
        analyze_joint_probe(counts.drop(columns="recipe"), None, states, study, stats, 0)
    bad = counts.copy()
    bad.loc[0, "fired"] = 11
    with pytest.raises(TableError, match="fired 11 > n 10"):
        analyze_joint_probe(bad, None, states, study, stats, 0)
    with pytest.raises(TableError, match=r"no readouts of the bases \['benign'\]"):
        analyze_joint_probe(counts, None, {k: v for k, v in states.items() if k != "benign"}, study, stats, 0)


def test_the_analyze_cli_reads_a_count_table_and_states_files(study, tmp_path, capsys):
    import json

    from personaspace.cli import main

    _counts(study, {"base": 0.1, "em": 0.5, "benign": 0.1}).to_csv(tmp_path / "counts.csv", index=False)
    files = []
    for base, shift, seed in (("raw", 0.0, 1), ("em", 0.6, 2), ("benign", 0.0, 3)):
        s = _states(study, shift, seed)
        np.savez(tmp_path / f"{base}.npz", last_response=s.values, persona=np.array(s.personas),
                 question_id=np.array(s.question_ids), layers=np.array(LAYERS))  # fmt: skip
        files.append(f"{base}={tmp_path / f'{base}.npz'}")
    preset = yaml.safe_load((REPO / "conf/study/joint_probe.yaml").read_text()) | {"recipes": ["ul_a"]}
    (tmp_path / "joint_probe.yaml").write_text(yaml.safe_dump(preset))  # the table's recipe: the preset's are refused
    args = ["analyze", "joint_probe", "--table", str(tmp_path / "counts.csv"), "--params", str(REPO / "params.yaml"),
            "--study", str(tmp_path / "joint_probe.yaml")]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "out"), "--states", *files]) == 0
    assert "flattening_supported" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert metrics["recipes"]["ul_a"]["decision"] == "flattening_supported"
    assert (tmp_path / "out/geometric_by_layer.png").is_file()
    assert main([*args, "--out", str(tmp_path / "again"), "--states", files[0]]) == 2  # em and benign missing
    assert "no readouts of the bases" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def _refusal(study, stats, table: pd.DataFrame, baseline: pd.DataFrame | None = None) -> str:
    """The TableError message of analyze_joint_probe on ``table`` (raised before anything is computed)."""
    states = {"raw": _states(study, 0, 1), "em": _states(study, 0, 2), "benign": _states(study, 0, 3)}
    with pytest.raises(TableError) as exc:
        analyze_joint_probe(table, baseline, states, study, stats, 0)
    return str(exc.value)


def _good(study) -> pd.DataFrame:
    return _counts(study, {"base": 0.1, "em": 0.5, "benign": 0.1})


def _cell(table: pd.DataFrame, row: int, **values) -> pd.DataFrame:
    table = table.copy()
    for column, value in values.items():
        table[column] = table[column].astype(object)
        table.loc[row, column] = value
    return table


def test_joint_probe_refuses_nan_fired(study, stats):
    assert "table row 3: column 'fired' is empty or NaN" in _refusal(study, stats, _cell(_good(study), 3, fired=np.nan))


def test_joint_probe_refuses_nan_n(study, stats):
    assert "table row 4: column 'n' is empty or NaN" in _refusal(study, stats, _cell(_good(study), 4, n=np.nan))


def test_joint_probe_refuses_fractional_counts(study, stats):
    assert "fired must be a whole count, got 2.5" in _refusal(study, stats, _cell(_good(study), 1, fired=2.5))
    assert "n must be a whole count, got 9.5" in _refusal(study, stats, _cell(_good(study), 1, n=9.5))


def test_joint_probe_refuses_text_in_a_count_column(study, stats):
    message = _refusal(study, stats, _cell(_good(study), 2, fired="three"))
    assert "table row 2 (condition 'base', recipe 'ul_a', persona 'librarian', question_id 'e02')" in message
    assert "fired 'three' is not a number" in message


def test_joint_probe_refuses_truncated_above_n(study, stats):
    assert "truncated 11 > n 10" in _refusal(study, stats, _cell(_good(study), 5, truncated=11))


def test_joint_probe_refuses_an_unknown_persona(study, stats):
    message = _refusal(study, stats, _cell(_good(study), 0, persona="pirate"))
    assert "persona 'pirate' is not an eval persona of the study (librarian, chef," in message


def test_joint_probe_refuses_an_unknown_condition(study, stats):
    message = _refusal(study, stats, _cell(_good(study), 0, condition="em2"))
    assert "condition 'em2' is not a condition of the study (base, em, benign)" in message


def test_joint_probe_refuses_an_unknown_recipe(study, stats):
    message = _refusal(study, stats, _good(study).assign(recipe="ul_b"))
    assert "recipe 'ul_b' is not a recipe of the study (study.recipes) (ul_a)" in message


def test_one_row_recipe_typo_is_refused(study, stats):
    """One row of recipe `ul_aa` used to get its own decision (not_supported) from zero paired cells."""
    message = _refusal(study, stats, pd.concat([_good(study), _good(study).iloc[[0]].assign(recipe="ul_aa")]))
    assert "table row 480 (" in message and "unknown recipes ['ul_aa'] in 1 row(s)" in message


def test_joint_probe_refuses_a_recipe_with_no_rows(study, stats):
    two = study.model_copy(update={"recipes": ["ul_a", "ul_b"]})
    message = _refusal(two, stats, _good(study))
    assert "table: no rows for recipe 'ul_b'; joint_probe reads every recipe of study.recipes" in message


def test_joint_probe_refuses_a_missing_bystander(study, stats):
    table = _good(study)
    message = _refusal(study, stats, table[~((table["condition"] == "em") & (table["persona"] == "cowboy"))])
    assert "table: no rows for recipe 'ul_a', condition 'em', persona 'cowboy'" in message


def test_joint_probe_refuses_a_missing_condition(study, stats):
    table = _good(study)
    assert "no rows for recipe 'ul_a', condition 'benign';" in _refusal(
        study, stats, table[table.condition != "benign"]
    )


def test_joint_probe_refuses_a_duplicated_cell(study, stats):
    assert "appears twice" in _refusal(study, stats, pd.concat([_good(study), _good(study).iloc[[7]]]))


def test_joint_probe_refuses_a_broken_baseline(study, stats):
    baseline = _good(study).drop(columns="recipe")
    assert "baseline row 6: column 'n' is empty or NaN" in _refusal(
        study, stats, _good(study), _cell(baseline, 6, n=np.nan)
    )
    message = _refusal(study, stats, _good(study), baseline[baseline.persona != "wizard"])
    assert "baseline: no rows for condition 'base', persona 'wizard'" in message


def _save_states(folder: Path, states: BaseStates, base: str | None) -> Path:
    """A centroids stage output folder: states.npz and, with ``base``, the centroids.npz that records it."""
    folder.mkdir(parents=True)
    np.savez(folder / "states.npz", last_response=states.values, persona=np.array(states.personas),
             question_id=np.array(states.question_ids), layers=np.array(LAYERS))  # fmt: skip
    if base is not None:
        np.savez(folder / "centroids.npz", layers=np.array(LAYERS), base=base)
    return folder / "states.npz"


def test_swapped_states_files_are_refused(study, stats, tmp_path):
    """raw= and em= swapped used to flip the geometric delta's sign silently."""
    from personaspace.analyses.joint_probe import load_states

    paths = {base: _save_states(tmp_path / base, _states(study, shift, seed), base)
             for base, shift, seed in (("raw", 0.0, 1), ("em", 0.6, 2), ("benign", 0.0, 3))}  # fmt: skip
    assert load_states(paths["em"], "last_response", "em").base == "em"
    with pytest.raises(TableError, match=r"holds the readouts of base 'em', given as base 'raw'"):
        load_states(paths["em"], "last_response", "raw")
    swapped = {"raw": load_states(paths["em"], "last_response"), "em": load_states(paths["raw"], "last_response"),
               "benign": load_states(paths["benign"], "last_response")}  # fmt: skip
    with pytest.raises(TableError, match=r"the readouts given as base 'raw' were recorded from base 'em'"):
        analyze_joint_probe(_good(study), None, swapped, study, stats, 0)
    bare = _save_states(tmp_path / "bare", _states(study, 0.0, 1), None)
    assert load_states(bare, "last_response", "raw").base is None  # nothing recorded: nothing to check


def test_analyze_joint_probe_refuses_text_in_a_count_column_without_a_traceback(study, tmp_path, capsys):
    from personaspace.cli import main

    _cell(_good(study), 2, n="ten").to_csv(tmp_path / "counts.csv", index=False)
    preset = yaml.safe_load((REPO / "conf/study/joint_probe.yaml").read_text()) | {"recipes": ["ul_a"]}
    (tmp_path / "joint_probe.yaml").write_text(yaml.safe_dump(preset))
    paths = [
        f"{b}={_save_states(tmp_path / b, _states(study, 0.0, s), b)}"
        for b, s in (("raw", 1), ("em", 2), ("benign", 3))
    ]
    args = ["analyze", "joint_probe", "--table", str(tmp_path / "counts.csv"), "--params", str(REPO / "params.yaml"),
            "--study", str(tmp_path / "joint_probe.yaml"), "--out", str(tmp_path / "out")]  # fmt: skip
    assert main([*args, "--states", *paths]) == 2
    error = capsys.readouterr().err
    assert "table row 2 (" in error and "n 'ten' is not a number" in error and "Traceback" not in error
    swapped = [paths[1].replace("em=", "raw="), paths[0].replace("raw=", "em="), paths[2]]
    _good(study).to_csv(tmp_path / "counts.csv", index=False)
    assert main([*args, "--states", *swapped]) == 2
    error = capsys.readouterr().err  # each states file records its base: the swap is named before any analysis
    assert "holds the readouts of base 'em', given as base 'raw'" in error and not (tmp_path / "out").exists()
