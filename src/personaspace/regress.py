"""The S1 regression suite: a per-(persona, layer) table in, a nested metrics dict and plot data out.

>>> metrics, plot_data = regress_table(table, settings)                 # doctest: +SKIP

The table has one row per (persona, layer): ``persona, category, layer, cosine, fired, n`` and
optionally ``prompt_tokens`` (system-prompt length, for the length controls), ``prompt`` (the
system prompt, for the string baselines) and ``inherited`` (bool: the persona was in the smaller
panel, for the inherited-vs-new split). ``cosine`` is the persona centroid's cosine to the
reference persona's; ``fired / n`` is the persona's own fire rate as a source. The reference
persona's own row (cosine 1 by construction) must be in the table; it is left out of every fit and
named in ``excluded``, unless ``fit_reference`` keeps it in (the lab's published convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from personaspace.analyses import TableError
from personaspace.stats import (
    adjust_pvalues,
    cooks_distance,
    correlate,
    cv_errors,
    holdout_prediction,
    loo_pi_coverage,
    partial_spearman,
    spearman_power,
    steiger_z,
    undefined,
    vif,
    wilson_interval,
)
from personaspace.stats.gates import GateThresholds, gate_outcome, stratified_split, three_gate
from personaspace.stats.regression import ols_line, prediction_band
from personaspace.stats.strings import bpe_jaccard, negative_levenshtein, token_jaccard
from personaspace.stats.undefined import replace_non_finite

REQUIRED_COLUMNS = ("persona", "category", "layer", "cosine", "fired", "n")
OPTIONAL_COLUMNS = ("prompt_tokens", "prompt", "inherited")
PERSONA_COLUMNS = ("category", "fired", "n", "prompt_tokens", "prompt", "inherited")  # the same in every layer
FLAGS = {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False}
SELF_COSINE_TOLERANCE = 1e-4  # cosines computed in float32 put a self-cosine a few 1e-7 off 1


class SettingsError(ValueError):
    """A setting (reference, calibration, primary layer) does not fit the table; the message names the option."""


@dataclass(frozen=True)
class RegressSettings:
    """Everything the suite needs besides the table (from params.yaml's ``stats`` and the CLI)."""

    reference_persona: str
    level: float
    alpha: float
    influence_numerator: float
    cv_folds: int
    cv_repeats: int
    power_rhos: Sequence[float]
    power_simulations: int
    gates: GateThresholds
    holdout_fraction: float
    seed: int
    primary_layer: int | None = None
    calibration: Sequence[str] | None = None
    tokenizer: Any = None  # for the BPE-Jaccard baseline; None leaves it out with a reason
    fit_reference: bool = False  # keep the reference persona's row in the fits (the lab's published convention)


def settings_from_params(
    stats: Any,
    seed: int,
    primary_layer: int | None = None,
    calibration: Sequence[str] | None = None,
    tokenizer: Any = None,
    reference_persona: str | None = None,
    fit_reference: bool | None = None,
) -> RegressSettings:
    """RegressSettings from params.yaml's ``stats`` section (a StatsParams) and the run's choices (None: the param)."""
    return RegressSettings(
        reference_persona=reference_persona or stats.reference_persona,
        level=stats.ci_level,
        alpha=stats.alpha,
        influence_numerator=stats.influence_numerator,
        cv_folds=stats.cv_folds,
        cv_repeats=stats.cv_repeats,
        power_rhos=stats.power_rhos,
        power_simulations=stats.power_simulations,
        gates=GateThresholds(stats.alpha, stats.gates.z_crit, stats.gates.slope_tolerance, stats.gates.expected_sign),
        holdout_fraction=stats.gates.holdout_fraction,
        seed=seed,
        primary_layer=primary_layer,
        calibration=list(calibration) if calibration else None,
        tokenizer=tokenizer,
        fit_reference=stats.fit_reference if fit_reference is None else fit_reference,
    )


def _first(bad: pd.Series) -> int:
    return int(np.argmax(bad.to_numpy()))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def validate_table(table: pd.DataFrame) -> pd.DataFrame:
    """Check the table's contract; raise TableError naming the first bad column or row.

    Nothing is coerced silently: a fractional layer or count, a true/false count or an unreadable
    ``inherited`` flag is an error, not a truncation. Rows are named by position (0 = first data row).
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise TableError(f"missing column(s) {missing}; the table needs {list(REQUIRED_COLUMNS)}")
    unknown = [c for c in table.columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        raise TableError(f"unknown column(s) {unknown}; allowed: {list(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}")
    if table.empty:
        raise TableError("the table has no rows (only a header?); it needs one row per (persona, layer)")
    table = table.reset_index(drop=True)
    for column in table.columns:
        bad = table[column].isna()
        if bad.any():
            raise TableError(f"row {_first(bad)}: column {column!r} is empty or NaN")
    numeric = ["layer", "cosine", "fired", "n"] + (["prompt_tokens"] if "prompt_tokens" in table else [])
    converted = {}
    for column in numeric:
        # pandas reads True/False as 1/0 without complaint; a count or layer is never a flag
        flags = table[column].map(lambda v: isinstance(v, bool | np.bool_))
        if flags.any():
            raise TableError(f"row {_first(flags)}: column {column!r} holds true/false, not a number")
        values = pd.to_numeric(table[column], errors="coerce")
        if values.isna().any():
            raise TableError(f"row {_first(values.isna())}: column {column!r} is not a number")
        converted[column] = values.astype(float)
    table = table.assign(**converted)
    checks = [
        ("layer", table["layer"] % 1 != 0, "layer must be a whole number"),
        ("n", table["n"] <= 0, "n must be a positive count"),
        ("fired", table["fired"] < 0, "fired must be >= 0"),
        ("fired", table["fired"] > table["n"], "fired must be <= n"),
        ("cosine", (table["cosine"] < -1 - 1e-9) | (table["cosine"] > 1 + 1e-9), "cosine must be within [-1, 1]"),
        ("fired", table["fired"] % 1 != 0, "fired must be a whole count"),
        ("n", table["n"] % 1 != 0, "n must be a whole count"),
    ]
    if "prompt_tokens" in table:
        tokens = table["prompt_tokens"]
        checks.append(("prompt_tokens", (tokens < 0) | (tokens % 1 != 0), "prompt_tokens must be a whole count >= 0"))
    for column, bad, message in checks:
        if bad.any():
            row = _first(bad)
            raise TableError(f"row {row}: {message}, got {_number(table[column].iloc[row])}")
    table["layer"] = table["layer"].astype(int)
    if "inherited" in table:
        flags = table["inherited"].map(lambda v: FLAGS.get(str(v).strip().lower()))
        if flags.isna().any():
            row = _first(flags.isna())
            raise TableError(f"row {row}: inherited must be true or false, got {table['inherited'].iloc[row]!r}")
        table["inherited"] = flags.astype(bool)
    twice = table.duplicated(["persona", "layer"])
    if twice.any():
        row = _first(twice)
        raise TableError(
            f"row {row}: persona {table['persona'].iloc[row]!r} appears twice in layer {table['layer'].iloc[row]}"
        )
    per_persona = table.groupby("persona", sort=False)[[c for c in PERSONA_COLUMNS if c in table]].nunique()
    inconsistent = per_persona[(per_persona > 1).any(axis=1)]
    if len(inconsistent):
        persona = inconsistent.index[0]
        columns = [c for c in inconsistent.columns if inconsistent.loc[persona, c] > 1]
        raise TableError(
            f"persona {persona!r}: {', '.join(columns)} differs between layers (a property of the persona, "
            "the same in every layer)"
        )
    counts = table.groupby("layer")["persona"].nunique()
    if (counts < 3).any():
        raise TableError(f"layer {int(counts.idxmin())}: needs at least 3 personas, has {int(counts.min())}")
    return table


def check_settings(table: pd.DataFrame, settings: RegressSettings) -> None:
    """The reference and calibration personas must be the table's (a typo would change the fit silently).

    ``table`` is a validated table; raises SettingsError naming the option, the value and the choices.
    """
    personas = sorted(table["persona"].unique().tolist(), key=str)
    available = ", ".join(map(str, personas))
    reference = settings.reference_persona
    option = "--reference (default: stats.reference_persona)"
    if reference not in personas:
        raise SettingsError(f"{option} {reference!r} is not a persona of the table; its personas: {available}")
    own = table[table["persona"] == reference]
    off = own[(own["cosine"] - 1).abs() > SELF_COSINE_TOLERANCE]
    if len(off):
        # the cosines are to the persona whose own cosine is 1: name it, so the fix is obvious
        ones = table.groupby("persona")["cosine"].apply(lambda c: bool(((c - 1).abs() <= SELF_COSINE_TOLERANCE).all()))
        hint = f" (cosine 1 in every layer: {', '.join(map(str, ones[ones].index))})" if ones.any() else ""
        raise SettingsError(
            f"{option} {reference!r} has cosine {_number(off['cosine'].iloc[0])} in layer {off['layer'].iloc[0]}, "
            f"not 1: the table's cosines are to another persona{hint}"
        )
    if settings.calibration:
        unknown = [p for p in settings.calibration if p not in personas]
        if unknown:
            raise SettingsError(
                f"--calibration names persona(s) not in the table: {', '.join(map(repr, unknown))}; "
                f"its personas: {available}"
            )
        if reference in settings.calibration and not settings.fit_reference:
            raise SettingsError(
                f"--calibration names the reference persona {reference!r}, which is left out of the fits; "
                "drop it, or keep the reference in the fits (--include-reference, stats.fit_reference)"
            )
    layers = sorted(table["layer"].unique().tolist())
    if settings.primary_layer is not None and settings.primary_layer not in layers:
        raise SettingsError(f"--primary-layer {settings.primary_layer} is not in the table's layers {layers}")


def _primary_layer(layers: list[int], requested: int | None) -> int:
    return layers[len(layers) // 2] if requested is None else requested


def _rates(per_persona: pd.DataFrame, level: float) -> dict[str, Any]:
    low, high = wilson_interval(per_persona["fired"], per_persona["n"], level)
    return {
        persona: {"rate": float(f / n), "fired": int(f), "n": int(n), "wilson_low": float(lo), "wilson_high": float(hi)}
        for persona, f, n, lo, hi in zip(
            per_persona.index, per_persona["fired"], per_persona["n"], low, high, strict=True
        )
    }


def _correlations(x, y) -> dict[str, Any]:
    corr = correlate(x, y)
    return {"pearson": corr["pearson"], "spearman": corr["spearman"]}


def _string_baselines(layer: pd.DataFrame, reference_prompt: str, settings: RegressSettings) -> dict[str, Any]:
    """Pearson r(rate, baseline) per string baseline, and Steiger's Z of r(rate, cosine) vs it."""
    measures = {
        "negative_levenshtein": lambda p: negative_levenshtein(p, reference_prompt),
        "token_jaccard": lambda p: token_jaccard(p, reference_prompt),
    }
    if settings.tokenizer is not None:
        measures["bpe_jaccard"] = lambda p: bpe_jaccard(p, reference_prompt, settings.tokenizer)
    out: dict[str, Any] = {} if settings.tokenizer is not None else undefined("bpe_jaccard", "no tokenizer given")
    n = len(layer)
    r_cos = correlate(layer["cosine"], layer["rate"])["pearson"]["r"]
    for name, measure in measures.items():
        baseline = layer["prompt"].map(measure).astype(float)
        r_base = correlate(baseline, layer["rate"])["pearson"]["r"]
        r_kh = correlate(layer["cosine"], baseline)["pearson"]["r"]
        if None in (r_cos, r_base, r_kh) or n <= 3:
            out[name] = {"r": r_base, **undefined(["steiger_z", "p"], "a correlation is undefined or n <= 3")}
            continue
        z, p = steiger_z(r_cos, r_base, r_kh, n)
        out[name] = {"r": r_base, "r_cosine": r_cos, "r_cosine_baseline": r_kh, "steiger_z": z, "p": p,
                     "test": "Steiger (1980) Z, Pearson r(rate, cosine) vs r(rate, baseline), two-sided"}  # fmt: skip
    return out


def _layer_metrics(layer: pd.DataFrame, settings: RegressSettings, reference_prompt: str | None) -> dict[str, Any]:
    x, y = layer["cosine"].to_numpy(), layer["rate"].to_numpy()
    n = len(layer)
    out: dict[str, Any] = {"n": n, **_correlations(x, y)}
    if np.ptp(x) == 0:
        reason = "cosine is constant in this layer"
        out.update(influential=[], **undefined(["cooks_distance", "influence_threshold"], reason))
        return out
    if np.ptp(y) == 0:  # e.g. no source fired: every residual is 0, and so is the scale Cook's distance divides by
        influential: list[str] = []
        out.update(influential=influential, **undefined(["cooks_distance", "influence_threshold"], "rate is constant"))
    else:
        cooks = cooks_distance(x, y)
        threshold = settings.influence_numerator / n
        influential = [p for p, d in zip(layer["persona"], cooks, strict=True) if d > threshold]
        out["cooks_distance"] = {p: float(d) for p, d in zip(layer["persona"], cooks, strict=True)}
        out["influence_threshold"] = threshold
        out["influential"] = influential
    kept = layer[~layer["persona"].isin(influential)]
    out["without_influential"] = {"dropped": influential, "n": len(kept), **_correlations(kept["cosine"], kept["rate"])}
    inside = loo_pi_coverage(x, y, settings.level)
    out["loo_pi"] = {"covered": int(sum(inside)), "n": n, "level": settings.level,
                     "outside": [p for p, ok in zip(layer["persona"], inside, strict=True) if not ok]}  # fmt: skip
    if settings.calibration:
        cal = layer[layer["persona"].isin(settings.calibration)]
        hold = layer[~layer["persona"].isin(settings.calibration)]
        if len(cal) >= 3 and len(hold) and np.ptp(cal["cosine"]) > 0:
            predictions = holdout_prediction(cal["cosine"], cal["rate"], hold["cosine"], hold["rate"], settings.level)
            out["holdout"] = dict(zip(hold["persona"], predictions, strict=True))
        else:
            out.update(undefined("holdout", "needs >= 3 calibration personas with varying cosine and a holdout"))
    if "prompt_tokens" in layer and (layer["prompt_tokens"] == 0).any():
        # a persona sent with no system prompt has 0 tokens, and log 0 is undefined (it used to crash the SVD)
        reason = "log prompt tokens is undefined: a persona has 0 prompt tokens (no system prompt)"
        out.update(undefined(["length_partial_spearman", "vif", "multi_partial_spearman"], reason))
    elif "prompt_tokens" in layer:
        frame = pd.DataFrame(
            {"cosine": x, "rate": y, "log_prompt_tokens": np.log(layer["prompt_tokens"].astype(float))}
        )
        out["length_partial_spearman"] = partial_spearman(frame, "cosine", "rate", ["log_prompt_tokens"])
        out["vif"] = vif(frame, ["cosine", "log_prompt_tokens"])
        if reference_prompt is not None and "prompt" in layer:
            frame["token_jaccard"] = layer["prompt"].map(lambda p: token_jaccard(p, reference_prompt)).to_numpy()
            out["multi_partial_spearman"] = {
                "covariates": ["log_prompt_tokens", "token_jaccard"],
                **partial_spearman(frame, "cosine", "rate", ["log_prompt_tokens", "token_jaccard"]),
            }
    out["within_category"] = {}
    for category, part in layer.groupby("category", sort=True):
        spearman = correlate(part["cosine"], part["rate"])["spearman"]
        out["within_category"][category] = {"spearman": {**spearman, "n": len(part)}}
    if reference_prompt is None or "prompt" not in layer:
        out.update(undefined("string_baselines", "needs a `prompt` column and the reference persona's row"))
    else:
        out["string_baselines"] = _string_baselines(layer, reference_prompt, settings)
    if n >= max(settings.cv_folds, 3):
        out["cv"] = cv_errors(x, y, settings.cv_folds, settings.cv_repeats, settings.seed)
    else:
        out.update(undefined("cv", f"needs at least {settings.cv_folds} personas"))
    line = ols_line(x, y)
    out["ols"] = line
    return out


def regress_table(table: pd.DataFrame, settings: RegressSettings) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """Metrics (nested, JSON-ready) and plot-data tables for a (persona, layer) table.

    Raises TableError (malformed table) or SettingsError (a setting the table cannot honour) before computing.
    """
    table = validate_table(table)
    check_settings(table, settings)
    per_persona = table.drop_duplicates("persona").set_index("persona")
    reference_prompt = None
    if "prompt" in per_persona:
        reference_prompt = str(per_persona.loc[settings.reference_persona, "prompt"])
    fit_rows = table if settings.fit_reference else table[table["persona"] != settings.reference_persona]
    fit_rows = fit_rows.assign(rate=fit_rows["fired"] / fit_rows["n"])
    layers = sorted(fit_rows["layer"].unique().tolist())
    if fit_rows.groupby("layer")["persona"].nunique().min() < 3:
        raise TableError("needs at least 3 personas besides the reference persona in every layer")
    primary = _primary_layer(layers, settings.primary_layer)
    metrics: dict[str, Any] = {
        "n_personas": int(fit_rows["persona"].nunique()),
        "reference_persona": settings.reference_persona,
        "reference_in_fit": settings.fit_reference,
        "excluded": [] if settings.fit_reference else [settings.reference_persona],
        "primary_layer": primary,
        "rates": _rates(per_persona, settings.level),
        "layers": {},
    }
    for layer_index in layers:
        layer = fit_rows[fit_rows["layer"] == layer_index].sort_values("persona").reset_index(drop=True)
        metrics["layers"][str(layer_index)] = _layer_metrics(layer, settings, reference_prompt)
    holm = adjust_pvalues([metrics["layers"][str(k)]["spearman"]["p"] for k in layers], "holm")
    for layer_index, p in zip(layers, holm, strict=True):
        entry = metrics["layers"][str(layer_index)]
        entry["holm"] = (
            {"spearman_p": p, "test": "Holm across the table's layers"}
            if p is not None
            else undefined("spearman_p", "Spearman p undefined in this layer")
        )
    n = metrics["n_personas"]
    metrics["power"] = {
        f"rho_{rho}": spearman_power(rho, n, settings.alpha, settings.power_simulations, settings.seed)
        for rho in settings.power_rhos
    }
    metrics["power"]["n"] = n
    metrics["gates"] = _gates(fit_rows[fit_rows["layer"] == primary], settings)
    plot_data = _plot_data(fit_rows, metrics, settings, primary)
    return replace_non_finite(
        _plain_floats(metrics), "not finite: a degenerate fit (constant rates or cosines)"
    ), plot_data


def _plain_floats(data: Any) -> Any:
    """numpy scalars -> Python floats/ints/bools, so the non-finite guard sees every number."""
    if isinstance(data, dict):
        return {k: _plain_floats(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_plain_floats(v) for v in data]
    if isinstance(data, np.generic):
        return data.item()
    return data


def _gates(layer: pd.DataFrame, settings: RegressSettings) -> dict[str, Any]:
    splits: dict[str, tuple[list[str], list[str]]] = {}
    if settings.calibration:
        cal = [p for p in layer["persona"] if p in settings.calibration]
        splits["calibration"] = (cal, [p for p in layer["persona"] if p not in settings.calibration])
    elif "inherited" in layer:
        inherited = layer["inherited"].astype(bool)
        splits["inherited_vs_new"] = (
            layer.loc[inherited, "persona"].tolist(),
            layer.loc[~inherited, "persona"].tolist(),
        )
    splits["random_stratified"] = stratified_split(layer, settings.holdout_fraction, settings.seed)
    gates = {name: three_gate(layer, cal, hold, settings.gates) for name, (cal, hold) in splits.items()}
    outcome, reason = gate_outcome(gates, settings.gates)
    return {**gates, "outcome": outcome, "outcome_reason": reason}


def _plot_data(
    rows: pd.DataFrame, metrics: dict[str, Any], settings: RegressSettings, primary: int
) -> dict[str, pd.DataFrame]:
    layer = rows[rows["layer"] == primary].sort_values("cosine").reset_index(drop=True)
    rates = metrics["rates"]
    predicted, low, high = prediction_band(layer["cosine"], layer["rate"], layer["cosine"], settings.level)
    scatter = pd.DataFrame(
        {
            "persona": layer["persona"], "category": layer["category"], "cosine": layer["cosine"],
            "rate": layer["rate"], "wilson_low": [rates[p]["wilson_low"] for p in layer["persona"]],
            "wilson_high": [rates[p]["wilson_high"] for p in layer["persona"]],
            "predicted": predicted, "pi_low": low, "pi_high": high,
        }
    )  # fmt: skip
    by_layer = pd.DataFrame(
        [
            {"layer": int(k), "spearman_rho": v["spearman"]["rho"], "spearman_p": v["spearman"]["p"],
             "holm_p": v["holm"]["spearman_p"], "pearson_r": v["pearson"]["r"]}
            for k, v in metrics["layers"].items()
        ]
    )  # fmt: skip
    forest = pd.DataFrame(
        [{"persona": p, **{k: r[k] for k in ("rate", "n", "wilson_low", "wilson_high")}} for p, r in rates.items()]
    ).sort_values("rate")
    return {"scatter": scatter, "rho_by_layer": by_layer, "rates": forest}
