"""S4, training-time steering (METHODS.md): does steering at inference recover the prompted persona ranking?

>>> metrics, tables = analyze_train_steering(counts, cfg, stats, seed=0)        # doctest: +SKIP
>>> metrics["decision"]["+2"]["passes"]                                          # doctest: +SKIP
False

The count table has one row per (arm, persona, question_id, mode, coef) with ``fired`` and ``n``:
the adapter of ``persona`` trained in ``arm``, sampled under

- ``prompted``: the persona's own system prompt, unsteered (``coef`` ``0``);
- ``neutral``: the neutral prompt, unsteered (``coef`` ``0``);
- ``steered``: the neutral prompt with the arm's vector of that persona at the arm's layer, at
  each coefficient label of ``coef_labels`` (a number such as ``+2``, ``calibrated`` for the
  persona's c_train, and ``-calibrated`` for -c_train, the sign check).

``validate_counts`` checks it first (the shared ``analyses.tables`` check with the arms, modes,
coefficient labels and personas of the study, and the series the decision reads).

**Primary**, per steered coefficient: Spearman rho across personas between the primary arm's
(A's) steered fire rate and the reference arm's (C's) prompted fire rate, with a percentile
interval from a question-level cluster bootstrap (the same questions drawn for every persona and
both rankings; ``stats.bootstrap_resamples`` draws). The same rho for every other arm's steered
rates (B observational, C steered: the earlier failure, iso-random, the layer contrast).

**Kill criteria** (of the primary arm at that coefficient; each a named boolean):

- ``uniform_zero``: every persona's steered rate is below ``uniform_zero_floor``: steering reaches
  no persona's marker, so a rank correlation would rank noise;
- ``baseline_rate_driven``: the steered rates follow the same adapters' unsteered neutral-prompt
  rates at least as well as the prompted ones (rho_neutral >= rho_prompted): the ranking is the
  adapters' own leakage, not the direction;
- ``sign_inverted``: rho's interval lies below 0 (its upper end < 0);
- ``no_correlation``: rho's interval includes 0;
- ``direction_not_specific``: the control arm (iso-random) passes too (rho >= ``pass_rho`` and its
  lower end > 0): any vector of that norm would do.

**Pass** = rho >= ``pass_rho``, the interval's lower end > 0 and no kill criterion.
**Sign check**, per steered arm: the rate at -c_train is below the rate at +c_train (calibrated),
per persona and pooled. Bootstrap resamples where a ranking is constant leave rho undefined;
they are dropped and counted, and with more than half undefined the interval is None.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from personaspace.analyses import TableError
from personaspace.analyses.tables import CountTable, Coverage, Known
from personaspace.config import StatsParams, TrainSteeringParams
from personaspace.seeds import stable_seed
from personaspace.stats.rates import wilson_interval

COUNT_KEYS = ("arm", "persona", "question_id", "mode", "coef")
MODES = ("prompted", "neutral", "steered")
UNSTEERED = "0"  # the coef label of the prompted and neutral modes
SIGN_CHECK = ("calibrated", "-calibrated")  # (+c_train, -c_train)


def coef_label(coef: float | str) -> str:
    """The table's label of one c_eval entry: ``calibrated`` or a signed number (``+2``, ``-0.5``)."""
    return coef if isinstance(coef, str) else f"{coef:+g}"


def coef_labels(cfg: TrainSteeringParams) -> list[str]:
    """Every steered coefficient label an S4 eval samples: the c_eval ones, then -c_train (the sign check)."""
    labels = [coef_label(c) for c in cfg.c_eval]
    return list(dict.fromkeys([*labels, *SIGN_CHECK]))


def counts_from_completions(completions: pd.DataFrame) -> pd.DataFrame:
    """The count table from a steer_eval completions table (its arm, mode and coef columns)."""
    keys = ["arm", "persona", "question_id", "mode", "coef"]
    sums = completions.groupby(keys, sort=True)["fired"].agg(fired="sum", n="size").reset_index()
    return sums.astype({"fired": "int64", "n": "int64"})


def validate_counts(
    table: pd.DataFrame, cfg: TrainSteeringParams, personas: Sequence[str] | None = None
) -> pd.DataFrame:
    """The count table's contract (``analyses.tables``); a clean copy (``coef`` as text), or TableError naming the key.

    Known: the arms of ``cfg``, the modes, the coefficient labels (``0`` unsteered, then
    ``coef_labels``) and ``personas`` (the study's sources; None: the personas of the reference arm's
    prompted rows). A mode only where steer_eval samples it: ``prompted`` for the reference arm and
    ``neutral`` for the primary arm, both at coef ``0``; ``steered`` at a steered label. Read, for
    every persona: the reference's prompted and the primary's neutral rows; the primary and control
    arms, and every other arm in the table, at every c_eval label; ``calibrated`` for an arm with
    ``-calibrated`` rows (the sign check).
    """
    given = personas is not None
    if not given and isinstance(table, pd.DataFrame) and {"arm", "mode", "persona"} <= set(table.columns):
        reference = (table["arm"].astype(str) == cfg.reference_arm) & (table["mode"].astype(str) == "prompted")
        personas = sorted(set(table.loc[reference, "persona"].dropna().astype(str)))
    labels = [coef_label(c) for c in cfg.c_eval]
    known = {
        "arm": Known(list(cfg.arms), "an arm of the study (train_steering.arms)"),
        "mode": Known(MODES, "a mode"),
        "coef": Known([UNSTEERED, *coef_labels(cfg)], "a coefficient label (0 unsteered, c_eval's, -calibrated)"),
    }
    if personas:
        what = "a source of the study" if given else f"a persona of arm {cfg.reference_arm!r}'s prompted rows"
        known["persona"] = Known(personas, what)
    spec = CountTable("table", COUNT_KEYS, known)
    table = spec.validate(table)
    steered, unsteered = table["mode"] == "steered", table["coef"] == UNSTEERED
    spec.refuse_rows(table, ~steered & ~unsteered, lambda r: f"mode {table['mode'].iloc[r]!r} is unsteered: coef '0'")
    spec.refuse_rows(table, steered & unsteered, lambda r: f"mode 'steered' takes a steered label {coef_labels(cfg)}")
    for mode, arm in (("prompted", cfg.reference_arm), ("neutral", cfg.primary_arm)):
        spec.refuse_rows(table, (table["mode"] == mode) & (table["arm"] != arm),
                         lambda r, m=mode, a=arm: f"mode {m!r} is read for arm {a!r} only (train_steering)")  # fmt: skip
    who = list(personas or [])
    needs = [
        Coverage({"arm": [cfg.reference_arm], "mode": ["prompted"], "coef": [UNSTEERED], "persona": who},
                 "the prompted ranking to recover (train_steering.reference_arm); the decision needs them"),
        Coverage({"arm": [cfg.primary_arm], "mode": ["neutral"], "coef": [UNSTEERED], "persona": who},
                 "the kill criterion baseline_rate_driven reads them; the decision needs them"),
        Coverage({"arm": [cfg.primary_arm, cfg.control_arm], "mode": ["steered"], "coef": labels, "persona": who},
                 "the decision reads the primary arm, direction_not_specific the control arm, at every c_eval label"),
    ]  # fmt: skip
    for arm in dict.fromkeys(table.loc[steered, "arm"]):
        needs.append(Coverage({"arm": [arm], "mode": ["steered"], "coef": labels, "persona": who},
                              "every arm in the table is compared at every c_eval label; add its rows or drop the arm"))  # fmt: skip
        if table.loc[steered & (table["arm"] == arm), "coef"].eq(SIGN_CHECK[1]).any():
            needs.append(Coverage({"arm": [arm], "mode": ["steered"], "coef": list(SIGN_CHECK), "persona": who},
                                  "the sign check compares -calibrated with calibrated (+c_train); add its rows"))  # fmt: skip
    for need in needs:
        spec.require(table, need)
    return table


def _grid(table: pd.DataFrame, personas: Sequence[str], questions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(fired, n) arrays (personas, questions) of one (arm, mode, coef) series; a missing cell is an error."""
    wide = table.pivot_table(index="persona", columns="question_id", values=["fired", "n"], aggfunc="sum")
    wide = wide.reindex(index=list(personas))
    fired = wide["fired"].reindex(columns=list(questions)).to_numpy(float)
    n = wide["n"].reindex(columns=list(questions)).to_numpy(float)
    if np.isnan(n).any():
        persona, question = np.argwhere(np.isnan(n))[0]
        raise TableError(f"table: no cell for persona {personas[persona]!r}, question {questions[question]!r} "
                         f"in arm {table['arm'].iloc[0]!r}, mode {table['mode'].iloc[0]!r}, coef {table['coef'].iloc[0]!r}")  # fmt: skip
    return fired, n


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair of (batch, items) arrays (average ranks for ties; NaN where one is constant)."""
    rx, ry = scipy_stats.rankdata(x, axis=-1), scipy_stats.rankdata(y, axis=-1)
    rx, ry = rx - rx.mean(axis=-1, keepdims=True), ry - ry.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis=-1) / np.sqrt((rx**2).sum(axis=-1) * (ry**2).sum(axis=-1))


def rank_correlation(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], resamples: int, level: float, seed: int
) -> dict[str, Any]:
    """Spearman rho across personas of two rate series, with a question-level cluster-bootstrap interval.

    ``a`` and ``b`` are (fired, n) arrays (personas, questions); a resample draws questions with
    replacement (scipy.stats.bootstrap over question indices) and re-pools every persona's rate
    over the draw, for both series alike.
    """
    (fa, na), (fb, nb) = a, b
    rate_a, rate_b = fa.sum(1) / na.sum(1), fb.sum(1) / nb.sum(1)
    estimate = spearman_rows(rate_a, rate_b)
    questions = np.arange(fa.shape[1])

    def rho(index: np.ndarray, axis: int = -1) -> np.ndarray:
        index = index.astype(int)  # (..., questions): each resample's drawn question indices
        pooled_a = fa[:, index].sum(-1) / na[:, index].sum(-1)  # (personas, ...)
        pooled_b = fb[:, index].sum(-1) / nb[:, index].sum(-1)
        return spearman_rows(np.moveaxis(pooled_a, 0, -1), np.moveaxis(pooled_b, 0, -1))

    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant ranking in a resample is counted, not warned about
        result = scipy_stats.bootstrap(
            (questions,), rho, vectorized=True, n_resamples=resamples, confidence_level=level,
            method="percentile", rng=np.random.default_rng(seed),
        )  # fmt: skip
    distribution = result.bootstrap_distribution
    undefined = int(np.isnan(distribution).sum())
    tail = (1 - level) / 2
    low = high = None
    if undefined <= len(distribution) / 2:
        low, high = (float(v) for v in np.nanquantile(distribution, [tail, 1 - tail]))
    return {
        "rho": None if np.isnan(estimate) else float(estimate),
        "ci_low": low, "ci_high": high, "ci_method": "percentile, question-level cluster bootstrap",
        "resamples": resamples, "undefined_resamples": undefined, "n_personas": int(fa.shape[0]),
        "n_questions": int(fa.shape[1]),
    }  # fmt: skip


def _passes(result: dict[str, Any], pass_rho: float) -> bool:
    return (
        result["rho"] is not None
        and result["ci_low"] is not None
        and result["rho"] >= pass_rho
        and result["ci_low"] > 0
    )


def _rates(fired: np.ndarray, n: np.ndarray, personas: Sequence[str], level: float) -> dict[str, Any]:
    low, high = wilson_interval(fired.sum(1), n.sum(1), level)
    return {
        p: {"rate": float(f / m), "fired": int(f), "n": int(m), "wilson_low": float(lo), "wilson_high": float(hi)}
        for p, f, m, lo, hi in zip(personas, fired.sum(1), n.sum(1), low, high, strict=True)
    }


def analyze_train_steering(
    counts: pd.DataFrame, cfg: TrainSteeringParams, stats: StatsParams, seed: int, personas: Sequence[str] | None = None
) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """The S4 metrics (see the module docstring) and plot tables: ``scatter`` and ``rho``.

    ``personas``: the study's sources, the only personas the table may hold (``validate_counts``).
    """
    table = validate_counts(counts, cfg, personas)
    reference = table[(table["arm"] == cfg.reference_arm) & (table["mode"] == "prompted")]
    personas = sorted(reference["persona"].unique())
    questions = sorted(table["question_id"].unique())
    if len(personas) < 3:
        raise TableError(f"table: {len(personas)} personas have prompted rates of arm {cfg.reference_arm!r}; "
                         "a rank correlation needs at least 3")  # fmt: skip
    level, resamples = stats.ci_level, stats.bootstrap_resamples
    prompted = _grid(reference, personas, questions)

    def series(arm: str, mode: str, coef: str) -> tuple[np.ndarray, np.ndarray] | None:
        part = table[(table["arm"] == arm) & (table["mode"] == mode) & (table["coef"] == coef)]
        return _grid(part, personas, questions) if len(part) else None

    arms: dict[str, Any] = {}
    scatter = []
    for arm in cfg.arms:
        arm_out: dict[str, Any] = {}
        for coef in coef_labels(cfg):
            steered = series(arm, "steered", coef)
            if steered is None:
                continue
            result = rank_correlation(steered, prompted, resamples, level,
                                      stable_seed(seed, "train_steering", arm, coef))  # fmt: skip
            result["passes"] = _passes(result, cfg.pass_rho)
            result["rates"] = _rates(*steered, personas, level)
            arm_out[coef] = result
            scatter += [
                {"arm": arm, "coef": coef, "persona": p, "steered_rate": r["rate"],
                 "prompted_rate": float(prompted[0][i].sum() / prompted[1][i].sum())}
                for i, (p, r) in enumerate(result["rates"].items())
            ]  # fmt: skip
        arms[arm] = arm_out

    neutral = series(cfg.primary_arm, "neutral", UNSTEERED)
    decision: dict[str, Any] = {}
    for coef in [coef_label(c) for c in cfg.c_eval]:
        primary = arms[cfg.primary_arm].get(coef)
        if primary is None:
            raise TableError(f"table: no steered rows of arm {cfg.primary_arm!r} at coef {coef!r}")
        steered = series(cfg.primary_arm, "steered", coef)
        assert steered is not None and neutral is not None
        follows_neutral = rank_correlation(steered, neutral, resamples, level,
                                           stable_seed(seed, "train_steering", "neutral", coef))  # fmt: skip
        control = arms.get(cfg.control_arm, {}).get(coef)
        rates = np.array([r["rate"] for r in primary["rates"].values()])
        kill = {
            "uniform_zero": bool((rates < cfg.uniform_zero_floor).all()),
            "baseline_rate_driven": bool(
                follows_neutral["rho"] is not None
                and (primary["rho"] is None or follows_neutral["rho"] >= primary["rho"])
            ),
            "sign_inverted": bool(primary["ci_high"] is not None and primary["ci_high"] < 0),
            "no_correlation": bool(primary["ci_low"] is None or primary["ci_low"] <= 0 <= primary["ci_high"]),
            "direction_not_specific": bool(control is not None and control["passes"]),
        }
        decision[coef] = {
            "rho": primary["rho"], "ci_low": primary["ci_low"], "ci_high": primary["ci_high"],
            "rho_neutral": follows_neutral["rho"], "kill": kill, "killed": any(kill.values()),
            "control_evaluated": control is not None,
            "passes": bool(primary["passes"] and not any(kill.values())),
        }  # fmt: skip

    sign_check: dict[str, Any] = {}
    plus_label, minus_label = SIGN_CHECK
    for arm in cfg.arms:
        plus, minus = series(arm, "steered", plus_label), series(arm, "steered", minus_label)
        if plus is None or minus is None:
            continue
        plus_rates, minus_rates = plus[0].sum(1) / plus[1].sum(1), minus[0].sum(1) / minus[1].sum(1)
        plus_pooled, minus_pooled = plus[0].sum() / plus[1].sum(), minus[0].sum() / minus[1].sum()
        sign_check[arm] = {
            "rate_plus": float(plus_pooled), "rate_minus": float(minus_pooled),
            "holds": bool(minus_pooled < plus_pooled),
            "personas_lower": int((minus_rates < plus_rates).sum()), "personas": len(personas),
            "per_persona": {p: bool(m < q) for p, m, q in zip(personas, minus_rates, plus_rates, strict=True)},
        }  # fmt: skip

    metrics = {
        "personas": personas, "questions": len(questions), "primary_arm": cfg.primary_arm,
        "reference_arm": cfg.reference_arm, "control_arm": cfg.control_arm, "pass_rho": cfg.pass_rho,
        "prompted_rates": _rates(*prompted, personas, level), "arms": arms, "decision": decision,
        "sign_check": sign_check,
    }  # fmt: skip
    rho_rows = [
        {"arm": arm, "coef": coef, "rho": r["rho"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]}
        for arm, by_coef in arms.items()
        for coef, r in by_coef.items()
    ]
    return metrics, {"scatter": pd.DataFrame(scatter), "rho": pd.DataFrame(rho_rows)}


def summary_line(metrics: dict[str, Any]) -> str:
    """One line per steered coefficient of the primary arm: rho [interval], kill criteria, pass."""
    parts = []
    for coef, d in metrics["decision"].items():
        rho = "undefined" if d["rho"] is None else f"{d['rho']:+.2f}"
        interval = "" if d["ci_low"] is None else f" [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
        killed = [k for k, v in d["kill"].items() if v]
        parts.append(f"c={coef}: rho {rho}{interval}, {'PASS' if d['passes'] else 'fail'}"
                     + (f" (killed: {', '.join(killed)})" if killed else ""))  # fmt: skip
    return "; ".join(parts)
