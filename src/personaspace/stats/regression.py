"""Rate ~ cosine OLS fits (statsmodels): prediction intervals, influence, leave-one-out, holdout, CV."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _fit(x: np.ndarray, y: np.ndarray):
    import statsmodels.api as sm

    return sm.OLS(np.asarray(y, float), sm.add_constant(np.asarray(x, float), has_constant="add")).fit()


def ols_line(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Intercept, slope and the slope's standard error of y ~ x."""
    fit = _fit(np.asarray(x), np.asarray(y))
    return {"intercept": float(fit.params[0]), "slope": float(fit.params[1]), "slope_se": float(fit.bse[1])}


def prediction_band(
    x: Sequence[float], y: Sequence[float], x_new: Sequence[float], level: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted y at x_new with the ``level`` prediction interval (a new observation, not the mean)."""
    import statsmodels.api as sm

    fit = _fit(np.asarray(x), np.asarray(y))
    frame = fit.get_prediction(sm.add_constant(np.asarray(x_new, float), has_constant="add")).summary_frame(
        alpha=1 - level
    )
    return frame["mean"].to_numpy(), frame["obs_ci_lower"].to_numpy(), frame["obs_ci_upper"].to_numpy()


def cooks_distance(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """Cook's distance of each point in y ~ x."""
    return _fit(np.asarray(x), np.asarray(y)).get_influence().cooks_distance[0]


def loo_pi_coverage(x: Sequence[float], y: Sequence[float], level: float) -> list[bool]:
    """For each point: is it inside the ``level`` prediction interval of the fit on all the others?"""
    x, y = np.asarray(x, float), np.asarray(y, float)
    inside = []
    for i in range(len(x)):
        rest = np.arange(len(x)) != i
        _, low, high = prediction_band(x[rest], y[rest], x[i : i + 1], level)
        inside.append(bool(low[0] <= y[i] <= high[0]))
    return inside


def holdout_prediction(
    x_cal: Sequence[float], y_cal: Sequence[float], x_hold: Sequence[float], y_hold: Sequence[float], level: float
) -> list[dict[str, Any]]:
    """Fit on calibration points; predict each holdout point with its prediction interval."""
    predicted, low, high = prediction_band(x_cal, y_cal, x_hold, level)
    return [
        {"predicted": float(p), "pi_low": float(lo), "pi_high": float(hi), "inside": bool(lo <= y <= hi)}
        for p, lo, hi, y in zip(predicted, low, high, y_hold, strict=True)
    ]


def cv_errors(x: Sequence[float], y: Sequence[float], folds: int, repeats: int, seed: int) -> dict[str, float]:
    """Root-mean-square prediction error of y ~ x under repeated k-fold CV and under LOOCV (scikit-learn splits)."""
    from sklearn.model_selection import LeaveOneOut, RepeatedKFold

    x, y = np.asarray(x, float), np.asarray(y, float)

    def rmse(splitter) -> float:
        errors = []
        for train, test in splitter.split(x):
            line = ols_line(x[train], y[train])
            errors.append(y[test] - (line["intercept"] + line["slope"] * x[test]))
        return float(np.sqrt(np.mean(np.concatenate(errors) ** 2)))

    return {
        "kfold_rmse": rmse(RepeatedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)),
        "loocv_rmse": rmse(LeaveOneOut()),
        "baseline_rmse": float(np.std(y)),
    }
