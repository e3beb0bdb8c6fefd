"""One tested library of statistics for persona-space studies.

Every statistic comes from scipy, statsmodels, pingouin or scikit-learn where one exists; the few
written here (Steiger's Z, the cluster bootstrap's resampling unit, the three-gate test, the
string baselines' Jaccard) are tested against published worked examples or simulations.

Undefined statistics are ``None`` with a reason (see ``undefined``), never a crash or a silent 0.
"""

from personaspace.stats.bootstrap import cluster_bootstrap_difference, cluster_bootstrap_rate, cluster_sums
from personaspace.stats.correlation import (
    adjust_pvalues,
    correlate,
    partial_spearman,
    spearman_power,
    steiger_z,
    vif,
)
from personaspace.stats.rates import wilson_interval
from personaspace.stats.regression import (
    cooks_distance,
    cv_errors,
    holdout_prediction,
    loo_pi_coverage,
    ols_line,
)
from personaspace.stats.undefined import undefined

__all__ = [
    "adjust_pvalues",
    "cluster_bootstrap_difference",
    "cluster_bootstrap_rate",
    "cluster_sums",
    "cooks_distance",
    "correlate",
    "cv_errors",
    "holdout_prediction",
    "loo_pi_coverage",
    "ols_line",
    "partial_spearman",
    "spearman_power",
    "steiger_z",
    "undefined",
    "vif",
    "wilson_interval",
]
