"""Cluster bootstrap of pooled fire rates over (persona, question) clusters (scipy.stats.bootstrap).

Completions within a (persona, question) cluster are not independent, so the resampling unit is
the cluster: the table is first reduced to per-cluster (fired, n) sums, then clusters are drawn
with replacement and the pooled rate sum(fired) / sum(n) recomputed, vectorised over resamples.
Percentile and BCa intervals come from the same bootstrap distribution; the two-sided p-value for
a difference is 2 x the smaller tail mass at 0, with the +1 correction of Davison & Hinkley.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats


def cluster_sums(
    completions: pd.DataFrame, clusters: Sequence[str], by: str | None = None, counted: bool = False
) -> pd.DataFrame:
    """Per cluster (and per ``by`` value): fired = number of completions that fired, n = completions.

    ``completions`` is one row per completion (``fired`` a bool), or with ``counted`` a count
    table (``fired`` and ``n`` per row), whose counts are summed.
    """
    keys = [*clusters] + ([by] if by else [])
    groups = completions.groupby(keys, observed=True, sort=True)
    sums = groups[["fired", "n"]].sum() if counted else groups["fired"].agg(fired="sum", n="size")
    return sums.reset_index()


def _pooled(fired: np.ndarray, n: np.ndarray, axis: int = -1) -> np.ndarray:
    return fired.sum(axis=axis) / n.sum(axis=axis)


def _intervals(result, estimate: float, level: float) -> dict[str, Any]:
    distribution = result.bootstrap_distribution
    tail = (1 - level) / 2
    low, high = np.quantile(distribution, [tail, 1 - tail])
    bca_low, bca_high = result.confidence_interval
    return {
        "estimate": float(estimate),
        "percentile": {"low": float(low), "high": float(high)},
        "bca": {"low": float(bca_low), "high": float(bca_high)},
        "resamples": int(distribution.shape[-1]),
        "level": level,
    }


def cluster_bootstrap_rate(
    completions: pd.DataFrame, clusters: Sequence[str], resamples: int, level: float, seed: int
) -> dict[str, Any]:
    """Pooled fire rate with cluster-bootstrap percentile and BCa intervals."""
    sums = cluster_sums(completions, clusters)
    fired, n = sums["fired"].to_numpy(float), sums["n"].to_numpy(float)
    result = stats.bootstrap(
        (fired, n), _pooled, paired=True, vectorized=True, n_resamples=resamples,
        confidence_level=level, method="BCa", rng=np.random.default_rng(seed),
    )  # fmt: skip
    return {**_intervals(result, _pooled(fired, n), level), "n_clusters": len(sums)}


def cluster_bootstrap_difference(
    completions: pd.DataFrame,
    condition_column: str,
    baseline: str,
    treatment: str,
    clusters: Sequence[str],
    resamples: int,
    level: float,
    seed: int,
    counted: bool = False,
) -> dict[str, Any]:
    """Pooled rate(treatment) - rate(baseline), clusters resampled jointly for both conditions.

    Only clusters present under both conditions are used (paired design); their count is reported.
    ``counted``: ``completions`` is a count table (see ``cluster_sums``).
    """
    sums = cluster_sums(completions, clusters, by=condition_column, counted=counted)
    wide = sums.pivot_table(index=list(clusters), columns=condition_column, values=["fired", "n"], observed=True)
    wide = wide.dropna()
    if wide.empty:
        raise ValueError(f"no (cluster) is present under both {baseline!r} and {treatment!r}")
    arrays = tuple(wide[(column, cond)].to_numpy(float) for cond in (baseline, treatment) for column in ("fired", "n"))

    def difference(f0, n0, f1, n1, axis=-1):
        return _pooled(f1, n1, axis) - _pooled(f0, n0, axis)

    result = stats.bootstrap(
        arrays, difference, paired=True, vectorized=True, n_resamples=resamples,
        confidence_level=level, method="BCa", rng=np.random.default_rng(seed),
    )  # fmt: skip
    distribution = result.bootstrap_distribution
    below = (np.sum(distribution <= 0) + 1) / (len(distribution) + 1)
    above = (np.sum(distribution >= 0) + 1) / (len(distribution) + 1)
    return {
        **_intervals(result, difference(*arrays), level),
        "p_two_sided": float(min(1.0, 2 * min(below, above))),
        "n_clusters": len(wide),
        "baseline": baseline,
        "treatment": treatment,
    }
