"""Sensitivity models on per-completion rows (statsmodels).

- ``mixed_effects_difference``: linear-probability mixed model fired ~ condition with a random
  intercept per cluster (mixedlm), as a check that a pooled difference is not carried by a few
  personas.
- ``length_controlled_logit``: logistic regression fired ~ condition + log(n_tokens) with
  cluster-robust standard errors, as a check that a difference is not a completion-length effect.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd


def _design(completions: pd.DataFrame, condition_column: str, baseline: str, treatment: str) -> pd.DataFrame:
    rows = completions[completions[condition_column].isin([baseline, treatment])].copy()
    rows["treatment"] = (rows[condition_column] == treatment).astype(float)
    rows["fired"] = rows["fired"].astype(float)
    return rows


def mixed_effects_difference(
    completions: pd.DataFrame, condition_column: str, baseline: str, treatment: str, group: str
) -> dict[str, Any]:
    """Treatment effect on fire probability with a random intercept per ``group`` (mixedlm)."""
    import statsmodels.formula.api as smf

    rows = _design(completions, condition_column, baseline, treatment)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # boundary / convergence notes are reported via `converged`
        fit = smf.mixedlm("fired ~ treatment", rows, groups=rows[group]).fit(reml=True)
    return {
        "effect": float(fit.params["treatment"]),
        "se": float(fit.bse["treatment"]),
        "p": float(fit.pvalues["treatment"]),
        "converged": bool(fit.converged),
        "n": len(rows),
        "groups": int(rows[group].nunique()),
        "test": "mixedlm fired ~ treatment + (1 | group), Wald z",
    }


def length_controlled_logit(
    completions: pd.DataFrame, condition_column: str, baseline: str, treatment: str, cluster: str
) -> dict[str, Any]:
    """Log-odds effect of treatment controlling for log(n_tokens), cluster-robust SEs by ``cluster``."""
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    rows = _design(completions, condition_column, baseline, treatment)
    rows["log_tokens"] = np.log(rows["n_tokens"].clip(lower=1))
    groups = pd.factorize(rows[cluster])[0]
    fit = smf.glm("fired ~ treatment + log_tokens", rows, family=sm.families.Binomial()).fit(
        cov_type="cluster", cov_kwds={"groups": groups}
    )
    return {
        "log_odds": float(fit.params["treatment"]),
        "se": float(fit.bse["treatment"]),
        "p": float(fit.pvalues["treatment"]),
        "log_tokens_coef": float(fit.params["log_tokens"]),
        "n": len(rows),
        "clusters": int(groups.max() + 1),
        "test": "binomial GLM fired ~ treatment + log(n_tokens), cluster-robust Wald z",
    }
