"""S1's pre-registered three-gate test, its outcome buckets, the drift sign test, off-diagonal cells.

Three gates, evaluated per split of the panel into calibration and holdout personas:

- **A** holdout-only Spearman (cosine vs fire rate) has p < alpha and the expected sign;
- **B** the OLS slope (rate ~ cosine) on the holdout agrees with the calibration slope:
  |z| < z_crit for z = (b_hold - b_cal) / sqrt(se_hold^2 + se_cal^2), and
  |b_hold / b_cal - 1| <= slope_tolerance;
- **C** within-occupational Spearman over the panel's occupational personas has p < alpha and the
  expected sign (a property of the panel, so the same on every split).

Outcome buckets, first match wins:

- ``indeterminate``: fewer than two splits, a split with < 3 holdout or calibration personas,
  or no calibration fit with p < alpha in any split;
- ``anti_correlated``: on every split both the calibration and the holdout Spearman are
  significant with the sign opposite to the expected one;
- ``inverted``: on some split the holdout Spearman is significant with the sign opposite to the
  calibration's;
- ``consistent``: A, B and C pass on every split;
- ``consistent_weak``: A passes on every split, B or C fails somewhere;
- ``attenuated``: everything else (the holdout relation is weaker than, but not opposite to, the
  calibration's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from personaspace.stats.correlation import correlate
from personaspace.stats.regression import ols_line


@dataclass(frozen=True)
class GateThresholds:
    alpha: float
    z_crit: float
    slope_tolerance: float
    expected_sign: int  # +1: higher cosine, higher fire rate


def _significant(corr: dict, sign: int, alpha: float) -> bool:
    rho, p = corr["spearman"]["rho"], corr["spearman"]["p"]
    return bool(rho is not None and p is not None and p < alpha and np.sign(rho) == sign)


def three_gate(
    table: pd.DataFrame, calibration: Sequence[str], holdout: Sequence[str], thresholds: GateThresholds
) -> dict[str, Any]:
    """Gates A, B, C for one split. ``table``: persona, category, cosine, rate (one layer)."""
    indexed = table.set_index("persona")
    cal, hold = indexed.loc[list(calibration)], indexed.loc[list(holdout)]
    cal_corr, hold_corr = correlate(cal["cosine"], cal["rate"]), correlate(hold["cosine"], hold["rate"])
    occupational = indexed[indexed["category"] == "occupational"]
    occ_corr = correlate(occupational["cosine"], occupational["rate"])
    out: dict[str, Any] = {
        "n_calibration": len(cal),
        "n_holdout": len(hold),
        "calibration_spearman": cal_corr["spearman"],
        "holdout_spearman": hold_corr["spearman"],
        "occupational_spearman": {**occ_corr["spearman"], "n": len(occupational)},
    }
    sign = thresholds.expected_sign
    out["A"] = _significant(hold_corr, sign, thresholds.alpha)
    out["C"] = _significant(occ_corr, sign, thresholds.alpha)
    lines = len(cal) >= 3 and len(hold) >= 3 and cal["cosine"].nunique() > 1 and hold["cosine"].nunique() > 1
    if lines:
        cal_line, hold_line = ols_line(cal["cosine"], cal["rate"]), ols_line(hold["cosine"], hold["rate"])
        lines = bool(np.hypot(hold_line["slope_se"], cal_line["slope_se"]) > 0)
    if lines:
        z = (hold_line["slope"] - cal_line["slope"]) / np.hypot(hold_line["slope_se"], cal_line["slope_se"])
        ratio = hold_line["slope"] / cal_line["slope"] if cal_line["slope"] != 0 else float("inf")
        out.update(
            slope_calibration=cal_line["slope"], slope_holdout=hold_line["slope"], slope_z=float(z),
            slope_ratio=float(ratio),
        )  # fmt: skip
        out["B"] = bool(abs(z) < thresholds.z_crit and abs(ratio - 1) <= thresholds.slope_tolerance)
    else:
        out["B"] = False
        out["B_reason"] = (
            "needs >= 3 calibration and holdout personas with varying cosine, and rates off an exact line "
            "(e.g. not every rate 0: the slopes would have no standard error)"
        )
    return out


def gate_outcome(splits: Mapping[str, dict[str, Any]], thresholds: GateThresholds) -> tuple[str, str]:
    """The outcome bucket (and why) from the gates of each split; see the module docstring."""
    if len(splits) < 2:
        return "indeterminate", "the three-gate test needs two splits"
    if any(s["n_holdout"] < 3 or s["n_calibration"] < 3 for s in splits.values()):
        return "indeterminate", "a split has fewer than 3 calibration or holdout personas"
    alpha, sign = thresholds.alpha, thresholds.expected_sign

    def sig(spearman: dict, want: int) -> bool:
        return bool(spearman["p"] is not None and spearman["p"] < alpha and np.sign(spearman["rho"]) == want)

    if not any(sig(s["calibration_spearman"], 1) or sig(s["calibration_spearman"], -1) for s in splits.values()):
        return "indeterminate", "no split has a significant calibration correlation"
    if all(sig(s["calibration_spearman"], -sign) and sig(s["holdout_spearman"], -sign) for s in splits.values()):
        return "anti_correlated", "calibration and holdout are significant against the expected sign on every split"
    for name, s in splits.items():
        cal_rho = s["calibration_spearman"]["rho"]
        if cal_rho is not None and sig(s["holdout_spearman"], -int(np.sign(cal_rho))):
            return "inverted", f"split {name}: the holdout correlation is significant with the opposite sign"
    if all(s["A"] and s["B"] and s["C"] for s in splits.values()):
        return "consistent", "gates A, B and C pass on every split"
    if all(s["A"] for s in splits.values()):
        return "consistent_weak", "gate A passes on every split; B or C fails on some split"
    return "attenuated", "the holdout relation is weaker than the calibration's on some split"


def stratified_split(table: pd.DataFrame, holdout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded split stratified by category: about ``holdout_fraction`` of each category held out.

    Personas are ordered by name inside a category before the draw, so the split depends only on
    the set of personas and the seed, not on row order.
    """
    rng = np.random.default_rng(seed)
    calibration, holdout = [], []
    for _, group in table.sort_values("persona").groupby("category", sort=True):
        names = group["persona"].tolist()
        k = round(len(names) * holdout_fraction)
        chosen = set(rng.choice(names, size=k, replace=False).tolist()) if k else set()
        holdout += [p for p in names if p in chosen]
        calibration += [p for p in names if p not in chosen]
    return calibration, holdout


def drift_sign_test(before: Mapping[str, float], after: Mapping[str, float], alpha: float) -> dict[str, Any]:
    """Sign test (exact binomial) over inherited personas' rate changes between two panels.

    Confidence is ``LOW`` when the changes lean one way with p < alpha: the inherited personas'
    rates drifted, so comparisons across the two panels are suspect.
    """
    shared = sorted(set(before) & set(after))
    changes = np.array([after[p] - before[p] for p in shared])
    up, down = int((changes > 0).sum()), int((changes < 0).sum())
    if up + down == 0:
        return {"n": len(shared), "up": 0, "down": 0, "p": None, "p_reason": "no rate changed", "confidence": "OK"}
    p = float(stats.binomtest(up, up + down, 0.5).pvalue)
    return {
        "n": len(shared),
        "up": up,
        "down": down,
        "mean_change": float(changes.mean()),
        "p": p,
        "test": "exact binomial sign test, two-sided",
        "confidence": "LOW" if p < alpha else "OK",
    }


def off_diagonal(rates: pd.DataFrame, cosines: pd.DataFrame, strong_emitter_min_rate: float) -> dict[str, Any]:
    """Cosine(source, bystander) vs bystander fire rate over all N(N-1) off-diagonal cells.

    ``rates`` and ``cosines`` are source x persona matrices (same labels). Sources whose own
    (diagonal) rate is >= ``strong_emitter_min_rate`` are strong emitters; the others weak.
    """
    sources = [s for s in rates.index if s in rates.columns]
    cells = [(s, b, float(cosines.loc[s, b]), float(rates.loc[s, b])) for s in sources for b in rates.columns if b != s]
    frame = pd.DataFrame(cells, columns=["source", "bystander", "cosine", "rate"])
    own = {s: float(rates.loc[s, s]) for s in sources}
    strong = frame["source"].map(lambda s: own[s] >= strong_emitter_min_rate)
    out = {}
    for name, part in (("all", frame), ("strong", frame[strong]), ("weak", frame[~strong])):
        corr = correlate(part["cosine"], part["rate"])
        out[name] = {**corr["spearman"], "pearson_r": corr["pearson"]["r"], "n_cells": len(part)}
    out["strong_emitter_min_rate"] = strong_emitter_min_rate
    return out
