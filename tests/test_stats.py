"""Each statistic against an independent computation: a closed form, a different library,
a published worked example, or a simulation with known truth."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from personaspace.stats import (
    adjust_pvalues,
    cluster_bootstrap_difference,
    cluster_bootstrap_rate,
    cooks_distance,
    correlate,
    cv_errors,
    loo_pi_coverage,
    partial_spearman,
    spearman_power,
    steiger_z,
    vif,
    wilson_interval,
)
from personaspace.stats.regression import prediction_band
from personaspace.stats.sensitivity import length_controlled_logit, mixed_effects_difference
from personaspace.stats.strings import bpe_jaccard, negative_levenshtein, token_jaccard


@pytest.mark.parametrize(
    "fired,n,low,high",
    # Newcombe (1998) Statistics in Medicine 17:857, Table I, Wilson score interval, examples (a)-(d).
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_interval_matches_newcombe_1998(fired, n, low, high):
    lo, hi = wilson_interval(fired, n, 0.95)
    assert (round(float(lo), 4), round(float(hi), 4)) == (low, high)


def test_wilson_interval_matches_the_closed_form():
    fired, n, z = 37, 90, stats.norm.isf(0.025)
    p = fired / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert np.allclose(wilson_interval(fired, n, 0.95), (centre - half, centre + half))


@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_wilson_interval_contains_the_rate_and_stays_in_0_1_for_every_count_up_to_1000(level):
    # every (fired, n) with 1 <= n <= 1000: 500,500 intervals, the edges 0/n and n/n included
    n = np.repeat(np.arange(1, 1001), np.arange(2, 1002))
    fired = np.concatenate([np.arange(k + 1) for k in range(1, 1001)])
    low, high = wilson_interval(fired, n, level)
    rate = fired / n
    assert ((low >= 0) & (low <= rate) & (rate <= high) & (high <= 1)).all()
    assert (low[fired == 0] == 0).all() and (high[fired == n] == 1).all()
    # away from the clip, the closed form (Wilson 1927) to rounding
    z = stats.norm.isf((1 - level) / 2)
    centre = (rate + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(rate * (1 - rate) / n + z**2 / (4 * n**2))
    assert np.allclose(low, np.clip(centre - half, 0, 1), atol=1e-12)
    assert np.allclose(high, np.clip(centre + half, 0, 1), atol=1e-12)


def test_wilson_interval_of_all_or_nothing_is_exactly_the_edge():
    # the rounding cases that crashed the regress stage's error bars
    for n in (60, 80, 220, 260):
        assert float(wilson_interval(n, n, 0.95)[1]) == 1.0
    for n in (100, 200, 280, 300):
        assert float(wilson_interval(0, n, 0.95)[0]) == 0.0


def test_steiger_z_matches_published_worked_examples():
    # Steiger (1980) Psychological Bulletin 87:245, p. 249, case A; value as computed by R's cocor.
    assert steiger_z(0.4, 0.5, 0.1, 103)[0] == pytest.approx(-0.8887185, abs=1e-7)
    # Silver, Hittner & May (2006) depcor program, Applied Psychological Measurement 30:152.
    assert steiger_z(0.3, 0.4, 0.5, 100)[0] == pytest.approx(-1.0718, abs=1e-4)


def test_steiger_z_is_standard_normal_under_the_null():
    rng = np.random.default_rng(0)
    cov = np.array([[1, 0.4, 0.4], [0.4, 1, 0.3], [0.4, 0.3, 1]])  # r_jk = r_jh in the population
    zs, ps = [], []
    for _ in range(2000):
        sample = rng.multivariate_normal(np.zeros(3), cov, size=80)
        r = np.corrcoef(sample.T)
        z, p = steiger_z(r[0, 1], r[0, 2], r[1, 2], 80)
        zs.append(z)
        ps.append(p)
    assert abs(np.mean(zs)) < 0.08 and abs(np.std(zs) - 1) < 0.08
    assert 0.03 < np.mean(np.array(ps) < 0.05) < 0.07


def test_correlate_matches_numpy_and_pandas():
    rng = np.random.default_rng(1)
    x = rng.normal(size=30)
    y = 0.5 * x + rng.normal(size=30)
    out = correlate(x, y)
    r = np.corrcoef(x, y)[0, 1]
    assert out["pearson"]["r"] == pytest.approx(r)
    t = r * np.sqrt(28 / (1 - r**2))
    assert out["pearson"]["p"] == pytest.approx(2 * stats.t.sf(abs(t), 28))
    assert out["spearman"]["rho"] == pytest.approx(pd.Series(x).corr(pd.Series(y), method="spearman"))


def test_undefined_correlations_are_none_with_a_reason():
    out = correlate([1, 1, 1, 1], [1, 2, 3, 4])
    assert out["pearson"]["r"] is None and "constant" in out["pearson"]["r_reason"]
    assert correlate([1, 2], [2, 1])["spearman"]["rho_reason"] == "needs at least 3 points, has 2"


def test_partial_spearman_matches_rank_residual_correlation():
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=40), rng.normal(size=40)
    x = z1 + rng.normal(size=40)
    y = z1 + 0.5 * x + rng.normal(size=40)
    table = pd.DataFrame({"x": x, "y": y, "z1": z1, "z2": z2})
    out = partial_spearman(table, "x", "y", ["z1", "z2"])
    ranks = table.rank()
    design = np.column_stack([np.ones(40), ranks["z1"], ranks["z2"]])

    def residual(v):
        return v - design @ np.linalg.lstsq(design, v, rcond=None)[0]

    r = np.corrcoef(residual(ranks["x"]), residual(ranks["y"]))[0, 1]
    assert out["rho"] == pytest.approx(r)
    dof = 40 - 2 - 2
    assert out["p"] == pytest.approx(2 * stats.t.sf(abs(r) * np.sqrt(dof / (1 - r**2)), dof))


def test_vif_is_one_over_one_minus_r_squared():
    rng = np.random.default_rng(3)
    a = rng.normal(size=50)
    table = pd.DataFrame({"a": a, "b": a + 0.5 * rng.normal(size=50)})
    r2 = np.corrcoef(table["a"], table["b"])[0, 1] ** 2
    assert vif(table, ["a", "b"])["a"] == pytest.approx(1 / (1 - r2))


def test_holm_and_bonferroni_match_hand_computation():
    assert adjust_pvalues([0.01, 0.04, 0.03], "holm") == pytest.approx([0.03, 0.06, 0.06])
    assert adjust_pvalues([0.01, 0.04, None, 0.03], "bonferroni") == [
        pytest.approx(0.03),
        pytest.approx(0.12),
        None,
        pytest.approx(0.09),
    ]


def test_prediction_interval_and_cooks_distance_match_closed_forms():
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1, 15)
    y = 2 * x + rng.normal(0, 0.3, 15)
    n = len(x)
    slope, intercept = np.polyfit(x, y, 1)
    residuals = y - (intercept + slope * x)
    s2 = residuals @ residuals / (n - 2)
    sxx = ((x - x.mean()) ** 2).sum()
    x0 = 0.7
    half = stats.t.isf(0.025, n - 2) * np.sqrt(s2 * (1 + 1 / n + (x0 - x.mean()) ** 2 / sxx))
    predicted, low, high = prediction_band(x, y, [x0], 0.95)
    assert (predicted[0], low[0], high[0]) == pytest.approx(
        (intercept + slope * x0, intercept + slope * x0 - half, intercept + slope * x0 + half)
    )
    leverage = 1 / n + (x - x.mean()) ** 2 / sxx
    cooks = residuals**2 / (2 * s2) * leverage / (1 - leverage) ** 2
    assert cooks_distance(x, y) == pytest.approx(cooks)


def test_loo_prediction_intervals_cover_about_95_percent_of_a_true_linear_model():
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, 150)
    y = 1 + 3 * x + rng.normal(0, 0.5, 150)
    assert 0.91 < np.mean(loo_pi_coverage(x, y, 0.95)) < 0.99


def test_cv_error_is_zero_for_an_exact_line_and_near_noise_sd_otherwise():
    x = np.linspace(0, 1, 12)
    assert cv_errors(x, 2 * x + 1, folds=5, repeats=3, seed=0)["loocv_rmse"] == pytest.approx(0, abs=1e-9)
    rng = np.random.default_rng(6)
    x = rng.uniform(0, 1, 200)
    errors = cv_errors(x, x + rng.normal(0, 0.2, 200), folds=5, repeats=2, seed=0)
    assert 0.17 < errors["kfold_rmse"] < 0.23 and errors["baseline_rmse"] > errors["kfold_rmse"]


def test_spearman_power_is_alpha_at_rho_zero_and_matches_a_scipy_simulation():
    assert spearman_power(0.0, 20, 0.05, 4000, seed=0) == pytest.approx(0.05, abs=0.012)
    rng = np.random.default_rng(7)
    r = 2 * np.sin(np.pi * 0.5 / 6)
    hits = 0
    for _ in range(800):
        sample = rng.multivariate_normal([0, 0], [[1, r], [r, 1]], size=20)
        hits += stats.spearmanr(sample[:, 0], sample[:, 1]).pvalue < 0.05
    assert spearman_power(0.5, 20, 0.05, 4000, seed=1) == pytest.approx(hits / 800, abs=0.06)


def _clustered_completions(rates_by_condition: dict[str, float], seed: int, personas=12, questions=10, k=10):
    """Completions with a per-(persona, question) random effect, so clusters are really correlated."""
    rng = np.random.default_rng(seed)
    rows = []
    effects = rng.normal(0, 0.8, size=(personas, questions))
    for condition, rate in rates_by_condition.items():
        logit = np.log(rate / (1 - rate)) + effects
        probability = 1 / (1 + np.exp(-logit))
        fired = rng.random((personas, questions, k)) < probability[..., None]
        for (p, q, s), value in np.ndenumerate(fired):
            rows.append((condition, f"p{p:02d}", f"q{q:02d}", s, bool(value), int(rng.integers(20, 200))))
    return pd.DataFrame(rows, columns=["condition", "eval_persona", "question_id", "sample_idx", "fired", "n_tokens"])


def test_cluster_bootstrap_difference_covers_the_truth_and_agrees_with_a_loop_bootstrap():
    table = _clustered_completions({"c1": 0.2, "c2": 0.5}, seed=8)
    out = cluster_bootstrap_difference(
        table, "condition", "c1", "c2", ["eval_persona", "question_id"], 4000, 0.95, seed=0
    )
    direct = table[table.condition == "c2"].fired.mean() - table[table.condition == "c1"].fired.mean()
    assert out["estimate"] == pytest.approx(direct)
    assert out["percentile"]["low"] > 0 and out["p_two_sided"] < 0.01 and out["n_clusters"] == 120
    # An independent, plain-loop cluster bootstrap gives the same percentile interval (MC error).
    sums = table.groupby(["eval_persona", "question_id", "condition"]).fired.agg(["sum", "size"]).unstack()
    rng = np.random.default_rng(99)
    draws = []
    for _ in range(2000):
        pick = sums.iloc[rng.integers(0, len(sums), len(sums))]
        draws.append(
            pick[("sum", "c2")].sum() / pick[("size", "c2")].sum()
            - pick[("sum", "c1")].sum() / pick[("size", "c1")].sum()
        )
    assert out["percentile"]["low"] == pytest.approx(np.quantile(draws, 0.025), abs=0.015)
    assert out["percentile"]["high"] == pytest.approx(np.quantile(draws, 0.975), abs=0.015)


def test_cluster_bootstrap_has_calibrated_p_values_under_the_null():
    p_values = [
        cluster_bootstrap_difference(
            _clustered_completions({"a": 0.3, "b": 0.3}, seed=s, personas=6, questions=5, k=4),
            "condition", "a", "b", ["eval_persona", "question_id"], 999, 0.95, seed=s,
        )["p_two_sided"]
        for s in range(60)
    ]  # fmt: skip
    assert 0.0 <= np.mean(np.array(p_values) < 0.05) <= 0.15
    rate = cluster_bootstrap_rate(
        _clustered_completions({"a": 0.3}, seed=1), ["eval_persona", "question_id"], 2000, 0.95, 0
    )
    assert rate["bca"]["low"] < rate["estimate"] < rate["bca"]["high"]


def test_sensitivity_models_recover_a_known_effect():
    table = _clustered_completions({"c1": 0.2, "c2": 0.5}, seed=10)
    mixed = mixed_effects_difference(table, "condition", "c1", "c2", group="eval_persona")
    assert mixed["effect"] == pytest.approx(0.3, abs=0.06) and mixed["p"] < 1e-6
    logit = length_controlled_logit(table, "condition", "c1", "c2", cluster="eval_persona")
    true_log_odds = np.log(0.5 / 0.5) - np.log(0.2 / 0.8)  # 1.386 (conditional on the cluster effect)
    assert 0.7 * true_log_odds < logit["log_odds"] < 1.1 * true_log_odds and abs(logit["log_tokens_coef"]) < 0.3


def test_string_baselines():
    assert negative_levenshtein("kitten", "sitting") == -3
    assert token_jaccard("You are a pilot.", "you are a Nurse") == pytest.approx(3 / 5)

    class WordTokenizer:
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[hash_free(w) for w in t.split()] for t in texts]}

    def hash_free(word):
        return sum(ord(c) for c in word)

    assert bpe_jaccard("a b c", "a b d", WordTokenizer()) == pytest.approx(2 / 4)


def test_a_count_table_bootstraps_as_its_completions_do():
    from personaspace.stats import cluster_bootstrap_difference

    rng = np.random.default_rng(0)
    counts = pd.DataFrame([
        {"condition": c, "persona": p, "question_id": q, "fired": int(rng.integers(0, 6)), "n": 5}
        for c in ("a", "b") for p in ("x", "y", "z") for q in ("q1", "q2", "q3", "q4")
    ])  # fmt: skip
    rows = counts.loc[counts.index.repeat(counts["n"])].reset_index(drop=True)
    rows["fired"] = rows.groupby(["condition", "persona", "question_id"]).cumcount() < rows["fired"]
    args = ("condition", "a", "b", ["persona", "question_id"], 500, 0.95, 7)
    from_counts = cluster_bootstrap_difference(counts, *args, counted=True)
    from_rows = cluster_bootstrap_difference(rows.drop(columns="n"), *args)
    assert from_counts == from_rows
