"""S2, EM-first coupling (METHODS.md): per-cell fire counts in, metrics and plot tables out.

>>> counts, baseline = counts_from_completions(completions)                       # doctest: +SKIP
>>> metrics, tables = analyze_em_first(counts, baseline, study, stats, seed=0)   # doctest: +SKIP

Tables. ``counts`` has one row per (condition, persona, question_id) with whole counts ``fired`` and
``n`` and optionally ``mean_tokens`` (the cell's mean completion length in tokens). ``baseline`` has
the same columns for the pre-coupling false-positive eval (each condition's base, no adapter).
Conditions that share a pretrained base (em and em_basedata) pool into that base's baseline.

Roles. sources = ``study.sources``; negatives = ``study.negatives.hard`` (S2 names its negatives,
k = 0); assistant = ``study.assistant``; the bystander pool = every other eval persona. A role's
rate pools fired / n over its cells, with a Wilson interval at ``stats.ci_level``.

Choices, each documented where it is made:

- Clusters are (persona, question_id). The bootstrap resamples clusters of per-cell sums; the
  existing per-completion statistics get each cell expanded into ``n`` rows (``fired`` of them
  fired), every row carrying the cell's ``mean_tokens`` as its ``n_tokens``; a table counting more
  than ``MAX_COMPLETIONS`` completions is refused rather than expanded.
- Contrasts (H1, H2, H3) compare pooled bystander rates, treatment minus control. With a baseline
  the headline delta is baseline-subtracted: (r_T - b_T) - (r_C - b_C), where b is the bystander
  false-positive rate of each condition's pretrained base, bootstrapped with the same cluster draw
  for all four (paired: the same persona and question). Without one, it is the raw difference from
  ``stats.cluster_bootstrap_difference``; the raw bootstrap is reported in both cases.
- The headline interval is BCa; when BCa is undefined (a degenerate bootstrap distribution) it
  falls back to the percentile interval, and ``ci_method`` says which. p is the bootstrap's
  two-sided p; a contrast passes when delta >= its threshold and p < alpha / (number of contrasts).
- The source gate's ratio test: (bystander / source)_T - (bystander / source)_C on raw pooled rates,
  a cluster bootstrap stratified by role (bystander clusters and source clusters resampled
  independently, each draw shared by both conditions); when armed, the gate's contrast must also
  pass on it, with the gate's own ``ratio_threshold`` (ratios are not rates) and the Bonferroni alpha.
- Sensitivities on the raw bystander rows: a linear-probability mixed model with a random intercept
  per persona (is the difference carried by a few personas?) and, when tokens exist, a logistic
  regression with log(tokens) and cluster-robust SEs by (persona, question_id).
- The kill criterion reads the treatment's bystander rate net of its base's baseline when a
  baseline is given, the raw rate otherwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from personaspace.analyses import TableError
from personaspace.analyses.tables import CountTable, Known
from personaspace.config import ContrastSpec, EmFirstParams, StatsParams, StudyParams
from personaspace.seeds import stable_seed
from personaspace.stats import adjust_pvalues, cluster_bootstrap_difference, undefined, wilson_interval
from personaspace.stats.sensitivity import length_controlled_logit, mixed_effects_difference
from personaspace.stats.undefined import replace_non_finite
from personaspace.study import BASELINE as NO_ADAPTER
from personaspace.study import Roles, check_em_first

REQUIRED_KEYS = ("condition", "persona", "question_id")
OPTIONAL_COLUMNS = ("mean_tokens",)
CLUSTER = ("persona", "question_id")
COMPLETION_COLUMNS = ("condition", "adapter", "persona", "question_id", "fired")
P_TEST = "cluster bootstrap over (persona, question_id), two-sided: 2 x the smaller tail mass at 0 (+1 corrected)"
MAX_COMPLETIONS = 1_000_000
"""The most completions (sum of ``n``) a table may count: the sensitivity models fit one row per completion
(``_expand``, about 125 bytes each before the fits' copies); a paper-scale table counts tens of thousands."""


def validate_counts(table: pd.DataFrame, study: StudyParams, name: str = "table") -> pd.DataFrame:
    """Check a counts table's contract against ``study``; a clean copy, or TableError naming the row and key.

    The shared check (``analyses.tables``) with the study's conditions and eval personas; rows are
    named by position (0 = first data row) and by their (condition, persona, question_id).
    """
    spec = CountTable(
        name, REQUIRED_KEYS, optional=OPTIONAL_COLUMNS,
        known={"condition": Known(list(study.conditions), "a condition of the study"),
               "persona": Known(study.eval_personas, "an eval persona of the study")},
    )  # fmt: skip
    return spec.validate(table)


def _check_expandable(counts: pd.DataFrame) -> None:
    """TableError when the coupled counts exceed ``MAX_COMPLETIONS`` (the rows ``_expand`` would build)."""
    total = float(counts["n"].sum())
    if total > MAX_COMPLETIONS:
        raise TableError(
            f"table: counts {total:.0f} completions (sum of n), above the {MAX_COMPLETIONS:,} its per-completion "
            "sensitivity fits expand to; check that n counts the completions of one (condition, persona, "
            "question_id) cell, or subsample completions before counting"
        )


def counts_from_completions(completions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Reduce the per-completion eval table to (counts, baseline) cells of (condition, persona, question_id).

    Rows with adapter ``none`` form the pre-coupling baseline (None when there are none); the others
    the counts. Several adapters of one condition (e.g. seeds) pool into its cells. ``mean_tokens``
    is the cell's mean ``n_tokens`` when that column exists.
    """
    missing = [c for c in COMPLETION_COLUMNS if c not in completions.columns]
    if missing:
        raise TableError(f"completions: missing column(s) {missing}; the table needs {list(COMPLETION_COLUMNS)}")
    fired = completions["fired"]
    if not (fired.dtype == bool or fired.isin([0, 1, True, False]).all()):
        row = int(np.argmax((~fired.isin([0, 1, True, False])).to_numpy()))
        raise TableError(f"completions row {row}: fired must be true or false, got {fired.iloc[row]!r}")
    rows = completions.assign(fired=fired.astype(bool))
    aggregations = {"fired": ("fired", "sum"), "n": ("fired", "size")}
    if "n_tokens" in rows:
        aggregations["mean_tokens"] = ("n_tokens", "mean")

    def reduce(part: pd.DataFrame) -> pd.DataFrame:
        cells = part.groupby(["condition", *CLUSTER], sort=True, observed=True).agg(**aggregations).reset_index()
        return cells.astype({"fired": np.int64, "n": np.int64})

    is_baseline = rows["adapter"].astype(str) == NO_ADAPTER
    if is_baseline.all():
        raise TableError("completions: every row has adapter 'none'; there are no coupled-adapter rows to analyse")
    baseline = reduce(rows[is_baseline]) if is_baseline.any() else None
    return reduce(rows[~is_baseline]), baseline


def _check_coverage(
    counts: pd.DataFrame, baseline: pd.DataFrame | None, study: StudyParams, cfg: EmFirstParams
) -> None:
    """Every condition the analysis reads has the rows it needs; TableError names the key otherwise."""
    present = set(counts["condition"])
    uses = [
        (f"em_first.contrasts.{name}", c)
        for name, spec in cfg.contrasts.items()
        for c in (spec.treatment, spec.control)
    ]
    uses += [(f"em_first.source_gate.{side}", getattr(cfg.source_gate, side)) for side in ("treatment", "control")]
    uses.append(("em_first.kill.condition", cfg.kill.condition))
    for key, condition in uses:
        if condition not in present:
            raise TableError(f"{key} names condition {condition!r}, which has no rows in the table")
    for key, condition in uses:
        rows = counts[counts["condition"] == condition]
        if not (rows["role"] == "bystander").any():
            raise TableError(f"{key}: condition {condition!r} has no bystander rows in the table")
    gate = cfg.source_gate
    gated = cfg.contrasts[gate.contrast]
    for condition in dict.fromkeys([gate.treatment, gate.control, gated.treatment, gated.control]):
        have = set(counts.loc[counts["condition"] == condition, "persona"])
        for source in study.sources:
            if source not in have:
                raise TableError(
                    f"em_first.source_gate: condition {condition!r} has no rows for source persona {source!r}"
                )
    for name, spec in cfg.contrasts.items():
        if _shared_clusters(counts, [spec.treatment, spec.control], "bystander").empty:
            raise TableError(
                f"em_first.contrasts.{name}: {spec.treatment!r} and {spec.control!r} share no bystander "
                "(persona, question_id) cell"
            )
    if baseline is None:
        return
    for condition in [c for c in study.conditions if c in present]:
        pretrained = study.conditions[condition].pretrained
        if not ((baseline["pretrained"] == pretrained) & (baseline["role"] == "bystander")).any():
            raise TableError(
                f"baseline: no bystander rows for pretrained base {pretrained!r} (condition {condition!r} subtracts it); "
                "add its pre-coupling eval or leave the baseline out"
            )
    for name, spec in cfg.contrasts.items():
        if _net_arrays(counts, baseline, study, spec)[0].shape[1] == 0:
            raise TableError(
                f"em_first.contrasts.{name}: no bystander (persona, question_id) cell is in both conditions and both "
                "baselines; the baseline must cover the coupled eval's cells"
            )


def _summary(cells: pd.DataFrame, level: float) -> dict[str, Any]:
    """Pooled fired / n with its Wilson interval (and the n-weighted mean completion length)."""
    fired, n = int(cells["fired"].sum()), int(cells["n"].sum())
    if n == 0:
        return {"fired": 0, "n": 0, **undefined(["rate", "wilson_low", "wilson_high"], "no rows for this role")}
    low, high = wilson_interval(fired, n, level)
    out: dict[str, Any] = {
        "fired": fired,
        "n": n,
        "rate": fired / n,
        "wilson_low": float(low),
        "wilson_high": float(high),
    }
    if "mean_tokens" in cells:
        out["mean_tokens"] = float((cells["mean_tokens"] * cells["n"]).sum() / n)
    return out


def _role_summaries(cells: pd.DataFrame, roles: Roles, level: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "source": _summary(cells[cells["role"] == "source"], level),
        "negatives": {p: _summary(cells[cells["persona"] == p], level) for p in roles.negatives},
        "bystander": _summary(cells[cells["role"] == "bystander"], level),
    }
    if roles.assistant is not None:
        out["assistant"] = _summary(cells[cells["persona"] == roles.assistant], level)
    return out


def _subtract(coupled: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """``coupled`` with its base's rate beside it and the difference (``net_rate``)."""
    if coupled.get("rate") is None or base.get("rate") is None:
        return {**coupled, **undefined(["baseline_rate", "net_rate"], "no rate for this role (coupled or baseline)")}
    return {**coupled, "baseline_rate": base["rate"], "net_rate": coupled["rate"] - base["rate"]}


def _expand(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per completion: each cell repeated ``n`` times, its first ``fired`` rows fired.

    ``n_tokens`` is the cell's ``mean_tokens`` (the table holds no finer lengths); ``cluster`` names
    the (persona, question_id) cell for the cluster-robust fits.
    """
    rows = cells.loc[cells.index.repeat(cells["n"])].reset_index(drop=True)
    position = rows.groupby(["condition", *CLUSTER], sort=False).cumcount().to_numpy()
    rows["fired"] = position < rows["fired"].to_numpy()
    rows["cluster"] = rows["persona"] + "\x1f" + rows["question_id"]
    if "mean_tokens" in rows:
        rows["n_tokens"] = rows["mean_tokens"]
    return rows


def _per_cluster(cells: pd.DataFrame, conditions: Sequence[str], role: str, by: str = "condition") -> pd.DataFrame:
    """Per-(persona, question_id) sums of ``role`` cells, wide: columns (fired|n, value of ``by``)."""
    part = cells[(cells["role"] == role) & cells[by].isin(conditions)]
    sums = part.groupby([*CLUSTER, by], sort=True)[["fired", "n"]].sum()
    return sums.unstack(by)


def _shared_clusters(cells: pd.DataFrame, conditions: Sequence[str], role: str) -> pd.DataFrame:
    wide = _per_cluster(cells, conditions, role)
    wanted = [(column, c) for c in conditions for column in ("fired", "n")]
    if any(key not in wide.columns for key in wanted):
        return wide.iloc[0:0]
    return wide[wanted].dropna()


def _net_arrays(
    counts: pd.DataFrame, baseline: pd.DataFrame, study: StudyParams, spec: ContrastSpec
) -> tuple[np.ndarray, list[str]]:
    """Rows fired/n of treatment, control, treatment's base, control's base on their shared bystander cells."""
    coupled = _per_cluster(counts, [spec.treatment, spec.control], "bystander")
    bases = [study.conditions[spec.treatment].pretrained, study.conditions[spec.control].pretrained]
    base = _per_cluster(baseline, bases, "bystander", by="pretrained")
    keys = [(coupled, spec.treatment), (coupled, spec.control), (base, bases[0]), (base, bases[1])]
    parts = []
    for frame, label in keys:
        if ("fired", label) not in frame.columns:
            return np.zeros((8, 0)), []
        parts += [frame[("fired", label)].rename(f"f{len(parts)}"), frame[("n", label)].rename(f"n{len(parts)}")]
    joined = pd.concat(parts, axis=1, join="inner").dropna()
    return joined.to_numpy(float).T, list(joined.index)


def _bootstrap(
    strata: Sequence[np.ndarray], statistic: Callable[..., np.ndarray], resamples: int, level: float, seed: int
) -> dict[str, Any]:
    """Cluster bootstrap of ``statistic`` over per-cluster sums, clusters drawn within each stratum.

    ``strata[s]`` has one row per summed quantity (e.g. fired and n of each condition) and one
    column per cluster; a draw takes the same clusters for every row (paired across conditions),
    independently per stratum. ``statistic(*sums)`` gets each stratum's row totals (shape (rows, ...)).
    scipy.stats.bootstrap resamples cluster indices, exactly as ``cluster_bootstrap_difference``
    does for its paired arrays, so one stratum with rows (f0, n0, f1, n1) reproduces it.
    """

    def on_indices(*indices: np.ndarray, axis: int = -1) -> np.ndarray:
        sums = [matrix[:, index.astype(int)].sum(axis=-1) for matrix, index in zip(strata, indices, strict=True)]
        return statistic(*sums)

    data = tuple(np.arange(matrix.shape[1]) for matrix in strata)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate distribution has no BCa interval: NaN, reported as undefined
        result = scipy_stats.bootstrap(
            data, on_indices, paired=False, vectorized=True, n_resamples=resamples,
            confidence_level=level, method="BCa", rng=np.random.default_rng(seed),
        )  # fmt: skip
        estimate = float(statistic(*[matrix.sum(axis=-1) for matrix in strata]))
    distribution = result.bootstrap_distribution
    out: dict[str, Any] = {
        "estimate": estimate,
        "resamples": int(distribution.shape[-1]),
        "level": level,
        "n_clusters": sum(int(matrix.shape[1]) for matrix in strata),
    }
    if not np.isfinite(distribution).all():
        reason = "a resample has a zero denominator rate, so the bootstrap distribution is undefined"
        bounds = undefined(["low", "high"], reason)
        return {**out, "percentile": bounds, "bca": bounds, **undefined("p_two_sided", reason)}
    tail = (1 - level) / 2
    low, high = np.quantile(distribution, [tail, 1 - tail])
    below = (np.sum(distribution <= 0) + 1) / (len(distribution) + 1)
    above = (np.sum(distribution >= 0) + 1) / (len(distribution) + 1)
    bca_low, bca_high = result.confidence_interval
    return {
        **out,
        "percentile": {"low": float(low), "high": float(high)},
        "bca": {"low": float(bca_low), "high": float(bca_high)},
        "p_two_sided": float(min(1.0, 2 * min(below, above))),
    }


def _headline(boot: dict[str, Any]) -> dict[str, Any]:
    """delta, the BCa interval (percentile when BCa is undefined) and p from one bootstrap result."""
    bca, percentile = boot["bca"], boot["percentile"]
    finite = [v is not None and np.isfinite(v) for v in (bca["low"], bca["high"])]
    if all(finite):
        ci = {"ci_low": bca["low"], "ci_high": bca["high"], "ci_method": "bca"}
    else:
        ci = {
            "ci_low": percentile["low"],
            "ci_high": percentile["high"],
            "ci_method": "percentile",
            "ci_method_reason": "BCa is undefined (degenerate bootstrap distribution); percentile interval instead",
        }
    return {"delta": boot["estimate"], **ci, "p": boot["p_two_sided"]}


def _passes(delta: float | None, p: float | None, threshold: float, alpha: float) -> bool:
    return delta is not None and p is not None and delta >= threshold and p < alpha


def _sensitivities(rows: pd.DataFrame, spec: ContrastSpec) -> dict[str, Any]:
    """Mixed-effects and length-controlled checks of one contrast on raw bystander rows; undefined on failure."""
    out: dict[str, Any] = {}
    try:
        out["mixed_effects"] = mixed_effects_difference(
            rows, "condition", spec.control, spec.treatment, group="persona"
        )
        out["mixed_effects"]["group"] = "persona"
    except (ValueError, np.linalg.LinAlgError) as exc:
        out["mixed_effects"] = undefined("effect", f"mixedlm failed: {exc}")
    if "n_tokens" not in rows:
        out["length_controlled"] = undefined("log_odds", "the table has no mean_tokens column")
        return out
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # perfect separation and the like show as non-finite values, made None
            out["length_controlled"] = length_controlled_logit(
                rows, "condition", spec.control, spec.treatment, "cluster"
            )
        out["length_controlled"]["tokens"] = "cell mean completion tokens (mean_tokens)"
    except (ValueError, np.linalg.LinAlgError) as exc:
        out["length_controlled"] = undefined("log_odds", f"logistic fit failed: {exc}")
    return out


def _contrast(
    name: str,
    spec: ContrastSpec,
    counts: pd.DataFrame,
    expanded: pd.DataFrame,
    baseline: pd.DataFrame | None,
    study: StudyParams,
    stats: StatsParams,
    seed: int,
    alpha: float,
) -> dict[str, Any]:
    level, resamples = stats.ci_level, stats.bootstrap_resamples
    pair = expanded[(expanded["role"] == "bystander") & expanded["condition"].isin([spec.treatment, spec.control])]
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate distribution has no BCa interval: NaN, reported as undefined
        raw = cluster_bootstrap_difference(
            pair, "condition", spec.control, spec.treatment, list(CLUSTER), resamples, level,
            stable_seed(seed, "em_first", name, "raw"),
        )  # fmt: skip
    raw = {k: v for k, v in raw.items() if k not in ("baseline", "treatment")}
    out: dict[str, Any] = {
        "treatment": spec.treatment,
        "control": spec.control,
        "threshold": spec.threshold,
        "delta_raw": raw["estimate"],
    }
    boots: dict[str, Any] = {"raw": raw}
    if baseline is None:
        head = _headline(raw)
        out.update(undefined(["delta_baseline_subtracted", "baseline_difference"], "no baseline table was given"))
    else:
        arrays, _ = _net_arrays(counts, baseline, study, spec)

        def net(s: np.ndarray) -> np.ndarray:
            return (s[0] / s[1] - s[4] / s[5]) - (s[2] / s[3] - s[6] / s[7])

        boots["baseline_subtracted"] = _bootstrap(
            [arrays], net, resamples, level, stable_seed(seed, "em_first", name, "net")
        )
        head = _headline(boots["baseline_subtracted"])
        sums = arrays.sum(axis=1)
        out["delta_baseline_subtracted"] = head["delta"]
        out["baseline_difference"] = float(sums[4] / sums[5] - sums[6] / sums[7])
    out.update(head)
    out.update(
        p_test=P_TEST,
        ci_level=level,
        alpha_bonferroni=alpha,
        baseline_subtracted=baseline is not None,
        n_clusters=(boots.get("baseline_subtracted") or raw)["n_clusters"],
        bootstrap=boots,
    )
    out["passes"] = _passes(out["delta"], out["p"], spec.threshold, alpha)
    out.update(_sensitivities(pair, spec))
    return out


def _ratio_contrast(
    name: str, spec: ContrastSpec, threshold: float, counts: pd.DataFrame, stats: StatsParams, seed: int, alpha: float
) -> dict[str, Any]:
    """(bystander / source)_T - (bystander / source)_C: role-stratified cluster bootstrap on raw pooled rates."""
    conditions = [spec.treatment, spec.control]
    # _shared_clusters returns the columns (fired, n) of treatment, then control
    strata = [_shared_clusters(counts, conditions, role).to_numpy(float).T for role in ("bystander", "source")]

    def ratio_difference(b: np.ndarray, s: np.ndarray) -> np.ndarray:
        return (b[0] / b[1]) / (s[0] / s[1]) - (b[2] / b[3]) / (s[2] / s[3])

    test = (
        "role-stratified cluster bootstrap: bystander and source (persona, question_id) cells resampled "
        "independently, each draw shared by both conditions; raw pooled rates"
    )
    out: dict[str, Any] = {"threshold": threshold, "test": test}
    if any(matrix.shape[1] == 0 for matrix in strata):
        reason = "no source or bystander cell is shared by both conditions"
        return {**out, **undefined(["delta", "ci_low", "ci_high", "p"], reason), "passes": False}
    seed = stable_seed(seed, "em_first", name, "ratio")
    boot = _bootstrap(strata, ratio_difference, stats.bootstrap_resamples, stats.ci_level, seed)
    if boot["p_two_sided"] is None:
        estimate = boot["estimate"] if np.isfinite(boot["estimate"]) else None
        head = {"delta": estimate, **undefined(["ci_low", "ci_high", "p"], boot["p_two_sided_reason"])}
    else:
        head = _headline(boot)
    out.update(head, bootstrap=boot, n_clusters_bystander=strata[0].shape[1], n_clusters_source=strata[1].shape[1])
    out["passes"] = _passes(head["delta"], head["p"], threshold, alpha)
    return out


def _interpret_h3(contrast: dict[str, Any], rule: Any) -> str:
    delta, p, low = contrast["delta"], contrast["p"], contrast["ci_low"]
    if delta is None:
        return "ambiguous"
    if (
        delta <= rule.null_max_delta
        and p is not None
        and p > rule.null_min_p
        and low is not None
        and low > rule.null_min_ci_low
    ):
        return "non_text_distribution"
    if delta >= rule.text_min_delta:
        return "coupling_text_distribution"
    return "ambiguous"


def analyze_em_first(
    counts: pd.DataFrame, baseline: pd.DataFrame | None, study: StudyParams, stats: StatsParams, seed: int
) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """S2's metrics (nested, JSON-ready) and plot tables from per-cell counts and the optional baseline.

    Every table and setting is checked first: StudyError (preset) or TableError (tables, naming the
    row or key) is raised before anything is computed. Thresholds come from ``study.em_first`` and
    ``stats``; every bootstrap seed is ``stable_seed(seed, "em_first", <contrast>, <kind>)``.
    """
    roles, cfg = check_em_first(study)
    counts = validate_counts(counts, study, "table")
    _check_expandable(counts)
    counts["role"] = counts["persona"].map(roles.of)
    counts["pretrained"] = counts["condition"].map(lambda c: study.conditions[c].pretrained)
    if baseline is not None:
        baseline = validate_counts(baseline, study, "baseline")
        baseline["role"] = baseline["persona"].map(roles.of)
        baseline["pretrained"] = baseline["condition"].map(lambda c: study.conditions[c].pretrained)
    _check_coverage(counts, baseline, study, cfg)

    level = stats.ci_level
    conditions = [c for c in study.conditions if c in set(counts["condition"])]
    baselines: dict[str, Any] = {}
    if baseline is not None:
        for pretrained in dict.fromkeys(study.conditions[c].pretrained for c in study.conditions):
            cells = baseline[baseline["pretrained"] == pretrained]
            if cells.empty:
                continue
            summaries = _role_summaries(cells, roles, level)
            pooled = [c for c in study.conditions if c in set(cells["condition"])]
            bystander = summaries.pop("bystander")
            baselines[pretrained] = {**bystander, **summaries, "pool": "bystander", "conditions": pooled}

    per_condition: dict[str, Any] = {}
    for condition in conditions:
        spec = study.conditions[condition]
        summaries = _role_summaries(counts[counts["condition"] == condition], roles, level)
        if baseline is not None:
            base = baselines[spec.pretrained]
            base_roles = {"bystander": base, "source": base["source"], "negatives": base["negatives"]}
            if roles.assistant is not None:
                base_roles["assistant"] = base["assistant"]
            for role, summary in list(summaries.items()):
                if role == "negatives":
                    summaries[role] = {p: _subtract(s, base_roles[role][p]) for p, s in summary.items()}
                else:
                    summaries[role] = _subtract(summary, base_roles[role])
        source, bystander = summaries["source"]["rate"], summaries["bystander"]["rate"]
        if source and bystander is not None:
            ratio = {"bystander_over_source": bystander / source}
        else:
            ratio = undefined("bystander_over_source", "the source rate is 0 or undefined")
        per_condition[condition] = {"pretrained": spec.pretrained, "data_from": spec.data_from, **summaries, **ratio}

    alpha = stats.alpha / len(cfg.contrasts)
    expanded = _expand(counts)
    contrasts = {
        name: _contrast(name, spec, counts, expanded, baseline, study, stats, seed, alpha)
        for name, spec in cfg.contrasts.items()
    }
    adjusted = adjust_pvalues([c["p"] for c in contrasts.values()], "bonferroni")
    for contrast, p_adjusted in zip(contrasts.values(), adjusted, strict=True):
        contrast.update(p_bonferroni=p_adjusted, alpha=stats.alpha, family_size=len(cfg.contrasts))

    gate = cfg.source_gate
    source_t = per_condition[gate.treatment]["source"]["rate"]
    source_c = per_condition[gate.control]["source"]["rate"]
    gated = contrasts[gate.contrast]
    gated["ratio"] = _ratio_contrast(
        gate.contrast, cfg.contrasts[gate.contrast], gate.ratio_threshold, counts, stats, seed, alpha
    )
    source_gate: dict[str, Any] = {
        "treatment": gate.treatment,
        "control": gate.control,
        "max_ratio": gate.max_ratio,
        "contrast": gate.contrast,
        "source_treatment": source_t,
        "source_control": source_c,
    }
    if not source_c:  # 0 (source rows are required, so never undefined)
        source_gate.update(
            ratio=None,
            ratio_reason=f"source({gate.control}) is 0: the coupling never took there",
            armed=False,
            armed_reason="the ratio is undefined, so the gate cannot arm",
        )
    else:
        source_gate.update(ratio=source_t / source_c, armed=source_t / source_c < gate.max_ratio)
    gated["passes_rates"] = gated["passes"]
    gated["passes"] = gated["passes"] and (gated["ratio"]["passes"] if source_gate["armed"] else True)

    rule = cfg.text_artifact
    contrasts[rule.contrast]["interpretation"] = _interpret_h3(contrasts[rule.contrast], rule)
    contrasts[rule.contrast]["interpretation_rule"] = rule.model_dump()

    killed = per_condition[cfg.kill.condition]["bystander"]
    basis = "net_rate" if baseline is not None else "rate"
    kill_rate = killed.get(basis)
    kill = {
        "condition": cfg.kill.condition,
        "max_bystander": cfg.kill.max_bystander,
        "rate": kill_rate,
        "rate_basis": "baseline_subtracted" if baseline is not None else "raw",
        "triggered": kill_rate is not None and kill_rate <= cfg.kill.max_bystander,
    }

    decisions = {name: "pass" if c["passes"] else "fail" for name, c in contrasts.items()}
    decisions[f"{rule.contrast}_interpretation"] = contrasts[rule.contrast]["interpretation"]
    decisions["source_gate"] = "armed" if source_gate["armed"] else "not_armed"
    decisions["kill"] = "triggered" if kill["triggered"] else "not_triggered"
    metrics = {
        "study": study.name,
        "seed": seed,
        "roles": {
            "sources": list(roles.sources),
            "negatives": list(roles.negatives),
            "assistant": roles.assistant,
            "bystanders": list(roles.bystanders),
        },
        "ci": {"level": level, "headline": "bca", "fallback": "percentile", "resamples": stats.bootstrap_resamples},
        "baseline_subtracted": baseline is not None,
        "conditions": per_condition,
        "baselines": baselines,
        "contrasts": contrasts,
        "source_gate": source_gate,
        "kill": kill,
        "decisions": decisions,
    }
    metrics = replace_non_finite(metrics, "the statistic is not finite (degenerate data)")
    return metrics, _plot_tables(counts, metrics, roles, study, level)


def _plot_tables(
    counts: pd.DataFrame, metrics: dict[str, Any], roles: Roles, study: StudyParams, level: float
) -> dict[str, pd.DataFrame]:
    """bystander_rates, persona_rates, contrasts and (with tokens) completion_length tables."""
    bystander = []
    for condition, entry in metrics["conditions"].items():
        row = {"condition": condition, "pretrained": entry["pretrained"]}
        row.update({k: entry["bystander"].get(k) for k in ("fired", "n", "rate", "wilson_low", "wilson_high")})
        row.update(baseline_rate=entry["bystander"].get("baseline_rate"), net_rate=entry["bystander"].get("net_rate"))
        bystander.append(row)
    orders = {"condition": list(study.conditions), "persona": study.eval_personas}

    def study_order(column: pd.Series) -> pd.Series:  # conditions and personas in the preset's order
        return column.map({v: i for i, v in enumerate(orders[column.name])}) if column.name in orders else column

    cells = counts.groupby(["condition", "persona"], sort=False)[["fired", "n"]].sum().reset_index()
    cells = cells.sort_values(["condition", "persona"], key=study_order)
    low, high = wilson_interval(cells["fired"], cells["n"], level)
    personas = cells.assign(
        role=cells["persona"].map(roles.of), rate=cells["fired"] / cells["n"], wilson_low=low, wilson_high=high
    )
    personas = personas[["condition", "persona", "role", "fired", "n", "rate", "wilson_low", "wilson_high"]]
    keys = ("treatment", "control", "delta", "ci_low", "ci_high", "ci_method", "p", "threshold", "passes")
    contrasts = pd.DataFrame(
        {"contrast": name, **{k: c[k] for k in keys}, "baseline_subtracted": c["baseline_subtracted"]}
        for name, c in metrics["contrasts"].items()
    )
    tables = {
        "bystander_rates": pd.DataFrame(bystander),
        "persona_rates": personas.reset_index(drop=True),
        "contrasts": contrasts,
    }
    if "mean_tokens" in counts:
        lengths = counts.sort_values(["condition", "persona", "question_id"], key=study_order)
        columns = ["condition", "persona", "role", "question_id", "n", "mean_tokens"]
        tables["completion_length"] = lengths[columns].reset_index(drop=True)
    return tables


def summary_line(metrics: dict[str, Any]) -> str:
    """One line of S2's decisions: each contrast, H3's reading, the source gate and the kill criterion."""

    def number(value: float | None, fmt: str) -> str:
        return "undefined" if value is None else format(value, fmt)

    parts = []
    for name, c in metrics["contrasts"].items():
        text = (
            f"{name} {'pass' if c['passes'] else 'fail'} (delta {number(c['delta'], '+.3f')} "
            f"[{number(c['ci_low'], '.3f')}, {number(c['ci_high'], '.3f')}], p = {number(c['p'], '.4g')})"
        )
        if "interpretation" in c:
            text += f" -> {c['interpretation']}"
        parts.append(text)
    gate, kill = metrics["source_gate"], metrics["kill"]
    parts.append(f"source gate {'armed' if gate['armed'] else 'not armed'} (ratio {number(gate['ratio'], '.2f')})")
    parts.append(
        f"kill {'triggered' if kill['triggered'] else 'not triggered'} "
        f"(bystander({kill['condition']}) {number(kill['rate'], '.3f')})"
    )
    return "; ".join(parts)
