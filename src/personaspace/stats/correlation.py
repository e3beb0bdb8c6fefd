"""Correlations, partial correlations, VIF, multiple-testing adjustment, Steiger's Z, power.

>>> round(steiger_z(0.4, 0.5, 0.1, 103)[0], 7)   # Steiger (1980), p. 249, case A (pooled r)
-0.8887185
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from personaspace.stats.undefined import finite_or_none, undefined


def _constant(values: np.ndarray) -> bool:
    return bool(np.all(values == values[0]))


def correlate(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Pearson r and Spearman rho with two-sided p-values (scipy), or None with a reason."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 3:
        reason = f"needs at least 3 points, has {n}"
        return {"n": n, "pearson": undefined(["r", "p"], reason), "spearman": undefined(["rho", "p"], reason)}
    if _constant(x) or _constant(y):
        reason = "one variable is constant"
        return {"n": n, "pearson": undefined(["r", "p"], reason), "spearman": undefined(["rho", "p"], reason)}
    pearson = stats.pearsonr(x, y)
    spearman = stats.spearmanr(x, y)
    return {
        "n": n,
        "pearson": {"r": finite_or_none(pearson.statistic), "p": finite_or_none(pearson.pvalue)},
        "spearman": {"rho": finite_or_none(spearman.statistic), "p": finite_or_none(spearman.pvalue)},
    }


def partial_spearman(table: pd.DataFrame, x: str, y: str, covariates: Sequence[str]) -> dict[str, Any]:
    """Spearman partial correlation of x and y given covariates (pingouin), with p-value and n."""
    import pingouin

    n = len(table)
    test = f"Spearman partial correlation given {', '.join(covariates)} (pingouin)"
    if n < len(covariates) + 3:
        return {
            "n": n,
            "test": test,
            **undefined(["rho", "p"], f"needs at least {len(covariates) + 3} points, has {n}"),
        }
    if any(_constant(table[c].to_numpy()) for c in [x, y, *covariates]):
        return {"n": n, "test": test, **undefined(["rho", "p"], "a variable or covariate is constant")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pingouin.partial_corr(data=table, x=x, y=y, covar=list(covariates), method="spearman")
    p_column = "p_val" if "p_val" in result.columns else "p-val"  # pingouin renamed it
    out = {"n": n, "rho": finite_or_none(result["r"].iloc[0]), "p": finite_or_none(result[p_column].iloc[0])}
    notes = sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)})
    if notes:
        out["warnings"] = notes  # e.g. pingouin's rank-deficient covariates note
    out["test"] = test
    return out


def vif(table: pd.DataFrame, columns: Sequence[str]) -> dict[str, float | None]:
    """Variance inflation factor of each column among ``columns`` (statsmodels, with an intercept)."""
    from statsmodels.stats.outliers_influence import variance_inflation_factor
    from statsmodels.tools import add_constant

    design = add_constant(table[list(columns)].to_numpy(float), has_constant="add")
    with np.errstate(divide="ignore", invalid="ignore"):
        return {c: finite_or_none(variance_inflation_factor(design, i + 1)) for i, c in enumerate(columns)}


def adjust_pvalues(pvalues: Sequence[float | None], method: str) -> list[float | None]:
    """Holm or Bonferroni adjustment (statsmodels) over the defined p-values; None stays None."""
    from statsmodels.stats.multitest import multipletests

    defined = [i for i, p in enumerate(pvalues) if p is not None]
    adjusted: list[float | None] = [None] * len(pvalues)
    if defined:
        values = multipletests(
            [pvalues[i] for i in defined], method={"holm": "holm", "bonferroni": "bonferroni"}[method]
        )[1]
        for i, value in zip(defined, values, strict=True):
            adjusted[i] = float(value)
    return adjusted


def steiger_z(r_jk: float, r_jh: float, r_kh: float, n: int) -> tuple[float, float]:
    """Steiger's (1980) Z for H0: r_jk = r_jh (two correlations sharing variable j); two-sided p.

    Fisher z of each correlation; their asymptotic covariance from Steiger's equations 3 and 10
    with the pooled r = (r_jk + r_jh) / 2.
    """
    if n <= 3:
        raise ValueError(f"Steiger's Z needs n > 3, got {n}")
    r_bar = (r_jk + r_jh) / 2
    psi = r_kh * (1 - 2 * r_bar**2) - 0.5 * r_bar**2 * (1 - 2 * r_bar**2 - r_kh**2)
    covariance = psi / (1 - r_bar**2) ** 2
    z = (np.arctanh(r_jk) - np.arctanh(r_jh)) * np.sqrt(n - 3) / np.sqrt(2 - 2 * covariance)
    return float(z), float(2 * stats.norm.sf(abs(z)))


def spearman_power(rho: float, n: int, alpha: float, simulations: int, seed: int) -> float:
    """Monte-Carlo power of a two-sided Spearman test at population Spearman ``rho`` and sample size n.

    Samples are bivariate normal with Pearson r = 2 sin(pi rho / 6), whose Spearman correlation is
    rho; each sample is tested as scipy.stats.spearmanr does (t distribution, n - 2 df).
    """
    r = 2 * np.sin(np.pi * rho / 6)
    rng = np.random.default_rng(seed)
    draws = rng.multivariate_normal([0, 0], [[1, r], [r, 1]], size=(simulations, n))
    ranks = stats.rankdata(draws, axis=1)
    centred = ranks - ranks.mean(axis=1, keepdims=True)
    num = (centred[..., 0] * centred[..., 1]).sum(axis=1)
    den = np.sqrt((centred[..., 0] ** 2).sum(axis=1) * (centred[..., 1] ** 2).sum(axis=1))
    rho_hat = np.clip(num / den, -1 + 1e-12, 1 - 1e-12)
    t = rho_hat * np.sqrt((n - 2) / (1 - rho_hat**2))
    p = 2 * stats.t.sf(np.abs(t), n - 2)
    return float(np.mean(p < alpha))
