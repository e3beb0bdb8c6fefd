"""S4's analysis on constructed count tables: the rank correlation, each kill criterion, a pass, the sign check."""

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from personaspace.analyses import TableError
from personaspace.analyses.train_steering import (
    analyze_train_steering,
    coef_labels,
    rank_correlation,
    spearman_rows,
)
from personaspace.config import StatsParams, TrainSteeringParams
from personaspace.seeds import stable_seed

PERSONAS = [f"p{i:02d}" for i in range(10)]
QUESTIONS = [f"q{j:02d}" for j in range(12)]
N = 100  # completions per (persona, question) cell: rates resolved to 0.01


def _cfg(**changes) -> TrainSteeringParams:
    arm = {"prompt": "neutral", "vector": "centroid"}
    spec = dict(
        neutral_prompt="Provide a clear answer.", layer=21, contrast_layer=11, readout="last_input",
        centering="centered", calibration_ratio=0.2,
        arms={"A": arm, "B": {"prompt": "persona", "vector": "centroid"}, "C": {"prompt": "persona", "vector": "none"},
              "iso_random": {"prompt": "neutral", "vector": "iso_random"},
              "layer_contrast": {**arm, "layer": "contrast"}},
        primary_arm="A", reference_arm="C", control_arm="iso_random", c_eval=[2.0, "calibrated"], pass_rho=0.6,
        uniform_zero_floor=0.05,
    )  # fmt: skip
    return TrainSteeringParams(**(spec | changes))


STATS = StatsParams(
    reference_persona="p00", ci_level=0.95, alpha=0.05, influence_numerator=4, cv_folds=5, cv_repeats=2,
    power_rhos=[0.5], power_simulations=10, bootstrap_resamples=2000, drift_alpha=0.05, strong_emitter_min_rate=0.5,
    gates={"z_crit": 1.96, "slope_tolerance": 0.25, "holdout_fraction": 0.5, "expected_sign": 1},
)  # fmt: skip


def _cells(arm: str, mode: str, coef: str, rates: np.ndarray) -> list[dict]:
    """Every question of each persona near its rate: seeded noise of up to 30% of it per cell, so question
    resamples reorder close personas."""
    rng = np.random.default_rng(stable_seed("cells", arm, mode, coef))
    rows = []
    for p, rate in zip(PERSONAS, rates, strict=True):
        spread = max(1, round(0.3 * rate * N))
        for q in QUESTIONS:
            fired = int(np.clip(round(rate * N) + rng.integers(-spread, spread + 1), 0, N))
            rows.append(
                {"arm": arm, "persona": p, "question_id": q, "mode": mode, "coef": coef, "fired": fired, "n": N}
            )
    return rows


RISING = np.linspace(0.1, 0.8, 10)  # the prompted ranking to recover
UNRELATED = RISING[[3, 8, 0, 6, 9, 1, 5, 2, 7, 4]]  # a permutation of it, Spearman ~0 with RISING


def _table(steered_a=RISING, neutral_a=UNRELATED, iso=UNRELATED, minus=None) -> pd.DataFrame:
    rows = _cells("C", "prompted", "0", RISING) + _cells("A", "neutral", "0", neutral_a)
    for coef in ("+2", "calibrated"):
        rows += _cells("A", "steered", coef, steered_a) + _cells("iso_random", "steered", coef, iso)
    rows += _cells("A", "steered", "-calibrated", steered_a / 2 if minus is None else minus)
    return pd.DataFrame(rows)


def _decide(table: pd.DataFrame, **changes) -> dict:
    metrics, tables = analyze_train_steering(table, _cfg(**changes), STATS, seed=0)
    assert set(tables) == {"scatter", "rho"}
    return metrics


def test_vectorised_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, size=(50, 8)).astype(float), rng.normal(size=(50, 8))
    ours = spearman_rows(x, y)
    for row in range(50):
        expected = stats.spearmanr(x[row], y[row]).statistic
        assert ours[row] == pytest.approx(expected) or (np.isnan(ours[row]) and np.isnan(expected))


def test_the_bootstrap_resamples_questions_for_every_persona_alike_and_is_seeded():
    fired = np.array([[1.0, 9.0, 5.0], [5.0, 5.0, 5.0], [9.0, 1.0, 5.0]])  # 3 personas x 3 questions
    n = np.full_like(fired, 10.0)
    result = rank_correlation((fired, n), (fired, n), resamples=500, level=0.95, seed=3)
    # every persona pools to 0.5 over all questions (rho undefined); a draw of the same questions for
    # both series ranks them alike: rho 1, or undefined when questions 0 and 1 are drawn as often
    # (7 of 27 draws), never anything else
    assert result["rho"] is None and result["ci_low"] == result["ci_high"] == 1.0
    assert 0.15 < result["undefined_resamples"] / 500 < 0.4
    assert rank_correlation((fired, n), (fired, n), 500, 0.95, 3) == result


def test_a_recovered_ranking_passes_with_no_kill_criterion():
    metrics = _decide(_table())
    for coef in ("+2", "calibrated"):
        d = metrics["decision"][coef]
        assert d["rho"] == pytest.approx(1.0) and d["ci_low"] > 0.6 and not d["killed"] and d["passes"], d
    assert metrics["arms"]["iso_random"]["+2"]["passes"] is False
    assert metrics["sign_check"]["A"]["holds"] and metrics["sign_check"]["A"]["personas_lower"] == 10


@pytest.mark.parametrize(
    ("kind", "table"),
    [
        ("uniform_zero", _table(steered_a=np.linspace(0.0, 0.04, 10))),  # ranked, but below the floor everywhere
        ("baseline_rate_driven", _table(steered_a=RISING[[1, 0, 3, 2, 5, 4, 7, 6, 9, 8]], neutral_a=RISING[[1, 0, 3, 2, 5, 4, 7, 6, 9, 8]])),
        ("sign_inverted", _table(steered_a=RISING[::-1])),
        ("no_correlation", _table(steered_a=UNRELATED, neutral_a=RISING[::-1])),
        ("direction_not_specific", _table(iso=RISING)),
    ],
)  # fmt: skip
def test_each_kill_criterion_is_triggered_by_its_own_table(kind, table):
    d = _decide(table)["decision"]["+2"]
    assert d["kill"][kind], d
    assert d["killed"] and not d["passes"]
    if kind in ("uniform_zero", "baseline_rate_driven", "direction_not_specific"):
        assert d["rho"] > 0.6 and d["ci_low"] > 0  # the correlation alone would have passed
    if kind == "sign_inverted":
        assert d["ci_high"] < 0 and not d["kill"]["no_correlation"]


def test_the_sign_check_fails_when_the_negative_coefficient_fires_more():
    metrics = _decide(_table(minus=np.minimum(RISING * 1.2, 1.0)))
    assert not metrics["sign_check"]["A"]["holds"] and metrics["sign_check"]["A"]["personas_lower"] == 0


def test_labels_and_bad_tables():
    assert coef_labels(_cfg()) == ["+2", "calibrated", "-calibrated"]
    assert coef_labels(_cfg(c_eval=[-0.5])) == ["-0.5", "calibrated", "-calibrated"]
    table = _table()
    with pytest.raises(TableError, match=r"missing column\(s\) \['coef'\]"):
        _decide(table.drop(columns="coef"))
    with pytest.raises(TableError, match=r"arms \['D'\]"):
        _decide(pd.concat([table, table.head(1).assign(arm="D")]))
    with pytest.raises(TableError, match="appears twice"):
        _decide(pd.concat([table, table.head(1)]))
    with pytest.raises(TableError, match="no cell for persona 'p00', question 'q00'"):
        _decide(table.drop(index=table[(table["arm"] == "A") & (table["mode"] == "steered")].index[0]))
    with pytest.raises(TableError, match="no rows for arm 'A', mode 'neutral'"):
        _decide(table[table["mode"] != "neutral"])


def test_the_analyze_cli_reads_a_count_table(tmp_path, capsys):
    """`personaspace analyze train_steering --table` under the repo's preset: the stage's numbers, the figures."""
    import json
    from pathlib import Path

    from personaspace.cli import main

    repo = Path(__file__).resolve().parents[1]
    table = _table()  # its ten personas become the preset's ten sources, the only personas it may hold
    sources = yaml.safe_load((repo / "conf/study/train_steering.yaml").read_text())["sources"]
    table["persona"] = table["persona"].map(dict(zip(sorted(table["persona"].unique()), sources, strict=True)))
    table.to_csv(tmp_path / "counts.csv", index=False)
    args = ["analyze", "train_steering", "--table", str(tmp_path / "counts.csv"), "--params",
            str(repo / "params.yaml"), "--study", str(repo / "conf/study/train_steering.yaml")]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    assert "c=+2: rho +" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert set(metrics["decision"]) == {"+2", "calibrated"} and metrics["decision"]["+2"]["passes"]
    assert (tmp_path / "out/rho.csv").is_file() and list((tmp_path / "out").glob("*.png"))
    _table().drop(columns="fired").to_csv(tmp_path / "bad.csv", index=False)
    bad = ["analyze", "train_steering", "--table", str(tmp_path / "bad.csv"), *args[4:]]
    assert main([*bad, "--out", str(tmp_path / "again")]) == 2
    assert "missing column(s) ['fired']" in capsys.readouterr().err and not (tmp_path / "again").exists()


def _refusal(table: pd.DataFrame, personas: list[str] | None = None, **changes) -> str:
    """The TableError message of analyze_train_steering on ``table`` (raised before anything is computed)."""
    with pytest.raises(TableError) as exc:
        analyze_train_steering(table, _cfg(**changes), STATS, seed=0, personas=personas)
    return str(exc.value)


def _cell(row: int, **values) -> pd.DataFrame:
    table = _table()
    for column, value in values.items():
        table[column] = table[column].astype(object)
        table.loc[row, column] = value
    return table


def test_train_steering_refuses_nan_fired():
    assert "table row 5: column 'fired' is empty or NaN" in _refusal(_cell(5, fired=np.nan))


def test_train_steering_refuses_nan_n():
    assert "table row 6: column 'n' is empty or NaN" in _refusal(_cell(6, n=np.nan))


def test_train_steering_refuses_fractional_counts():
    assert "fired must be a whole count, got 3.5" in _refusal(_cell(2, fired=3.5))
    assert "n must be a whole count, got 99.5" in _refusal(_cell(2, n=99.5))


def test_train_steering_refuses_text_in_a_count_column():
    message = _refusal(_cell(3, n="many"))
    assert (
        "table row 3 (arm 'C', persona 'p00', question_id 'q03', mode 'prompted', coef '0'): n 'many' is not a number"
        in message
    )


def test_train_steering_refuses_fired_above_n():
    assert "fired 101 > n 100" in _refusal(_cell(0, fired=101))


def test_train_steering_refuses_an_unknown_persona():
    """A persona outside the reference's prompted rows used to be dropped from every ranking."""
    message = _refusal(_cell(200, persona="p99"))
    assert "persona 'p99' is not a persona of arm 'C''s prompted rows (p00," in message
    message = _refusal(_table(), personas=[*PERSONAS[:9], "p10"])  # the study's sources, when given
    assert "persona 'p09' is not a source of the study" in message


def test_train_steering_refuses_unknown_values():
    assert "mode 'steerd' is not a mode (prompted, neutral, steered)" in _refusal(_cell(300, mode="steerd"))
    message = _refusal(_cell(300, coef="+3"))
    assert "coef '+3' is not a coefficient label" in message and "(0, +2, calibrated, -calibrated)" in message


def test_one_row_arm_typo_is_refused():
    message = _refusal(pd.concat([_table(), _table().iloc[[400]].assign(arm="iso_rand")]))
    assert "arm 'iso_rand' is not an arm of the study (train_steering.arms)" in message


def test_train_steering_refuses_a_mode_the_arm_is_not_sampled_in():
    steered_at_zero = _table()
    steered_at_zero.loc[steered_at_zero["mode"] == "steered", "coef"] = "0"
    steered_at_zero = steered_at_zero.drop_duplicates(["arm", "persona", "question_id", "mode", "coef"])
    assert "mode 'steered' takes a steered label" in _refusal(steered_at_zero)
    assert "mode 'prompted' is unsteered: coef '0'" in _refusal(_cell(0, coef="+2"))
    assert "mode 'prompted' is read for arm 'C' only" in _refusal(_cell(0, arm="A"))


def test_train_steering_refuses_a_missing_control_arm():
    """Without the control arm, direction_not_specific was never evaluated and the decision could pass."""
    table = _table()
    message = _refusal(table[table["arm"] != "iso_random"])
    assert "table: no rows for arm 'iso_random'; the decision reads" in message


def test_train_steering_refuses_an_arm_missing_a_coefficient():
    table = _table()
    partial = pd.concat([table, table[(table["arm"] == "A") & (table["coef"] == "+2")].assign(arm="B")])
    assert "no rows for arm 'B', mode 'steered', coef 'calibrated'" in _refusal(partial)


def test_train_steering_refuses_a_missing_persona_in_a_series():
    table = _table()
    gap = table[~((table["arm"] == "A") & (table["mode"] == "neutral") & (table["persona"] == "p04"))]
    assert "no rows for arm 'A', mode 'neutral', coef '0', persona 'p04'" in _refusal(gap)


def test_train_steering_refuses_minus_calibrated_without_calibrated():
    """With c_eval [2.0], an arm's -calibrated rows need its calibrated ones, or the sign check is skipped."""
    table = _table()
    message = _refusal(table[~((table["arm"] == "A") & (table["coef"] == "calibrated"))], c_eval=[2.0])
    assert "no rows for arm 'A', mode 'steered', coef 'calibrated'; the sign check compares" in message


def test_analyze_train_steering_refuses_text_in_a_count_column_without_a_traceback(tmp_path, capsys):
    from pathlib import Path

    from personaspace.cli import main

    repo = Path(__file__).resolve().parents[1]
    _cell(7, fired="seven").to_csv(tmp_path / "counts.csv", index=False)
    args = ["analyze", "train_steering", "--table", str(tmp_path / "counts.csv"), "--params",
            str(repo / "params.yaml"), "--study", str(repo / "conf/study/train_steering.yaml")]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "table row 7 (" in error and "fired 'seven' is not a number" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()
