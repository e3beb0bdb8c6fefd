"""S3, the joint leakage + geometry probe (METHODS.md): two readouts of "EM flattens persona space" must agree.

>>> metrics, tables = analyze_joint_probe(counts, baseline, states, study, stats, seed=0)   # doctest: +SKIP
>>> metrics["recipes"]["ul_lambda1"]["decision"]                                              # doctest: +SKIP
'not_supported'

- **Behavioural H1**, per coupling recipe (the lambda sweep): the pooled bystander fire rate of the
  treatment (C2, EM-first) minus the control's (C1, base-first) is at least
  ``behavioural_threshold`` with a cluster-bootstrap p below ``behavioural_alpha`` ((persona,
  question) clusters, paired across conditions; ``stats.bootstrap_resamples`` draws; the p-value is
  2 x the smaller tail mass at 0, +1 corrected). Raw rates: each condition's pre-coupling baseline
  (its base with no adapter) is reported beside, not subtracted.
- **Geometric H1**, on the pre-coupling bases: delta = cos(source, bystander | C2's base) -
  cos(source, bystander | C1's base), centroids of the ``readout`` at the probes' layers, averaged
  over the bystanders, per layer and over the layers; passes when the mean is at least
  ``geometric_threshold`` and its percentile interval over a question bootstrap (the same questions
  drawn for both bases; every persona's centroid re-averaged over the draw) lies above 0.
- **Joint H1** = both, per recipe. **H2 triage**: ``flattening_supported`` (both),
  ``recipe_bottleneck`` (geometric only: the geometry moved, the recipe did not show it),
  ``sft_recipe_driven`` (behavioural only), ``not_supported`` (neither).
- **Kill**: ``falsified`` when the geometric delta is <= 0 at every layer AND the behavioural
  delta is <= ``kill_max_behavioural``.
- **EM-specificity**: the same two deltas of C2 against C3 (benign-first), reported beside.

Inputs are tables and arrays, never files: per-(condition, recipe, persona, question) counts (an
optional ``truncated`` column counts completions that hit the token limit), the pre-coupling
baseline counts, and per base the per-question readouts of the centroids stage. The tables are
checked before anything is computed (``count_tables``: the shared ``analyses.tables`` check with
the study's conditions, recipes and personas), and readouts recorded from another base than the
one they are given as are refused (``load_states``, ``geometric``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from personaspace.analyses import TableError
from personaspace.analyses.tables import CountTable, Coverage, Known
from personaspace.config import JointProbeParams, StatsParams, StudyParams
from personaspace.seeds import stable_seed
from personaspace.stats.bootstrap import cluster_bootstrap_difference
from personaspace.stats.rates import wilson_interval
from personaspace.study import Roles, check_joint_probe

COUNT_KEYS = ("condition", "recipe", "persona", "question_id")
BASELINE_KEYS = ("condition", "persona", "question_id")
CLUSTER = ("persona", "question_id")
P_TEST = "cluster bootstrap over (persona, question_id), paired, two-sided: 2 x the smaller tail mass at 0 (+1)"
BUCKETS = {
    (True, True): "flattening_supported",
    (False, True): "recipe_bottleneck",
    (True, False): "sft_recipe_driven",
    (False, False): "not_supported",
}  # (behavioural passes, geometric passes) -> H2 bucket


@dataclass(frozen=True)
class BaseStates:
    """One base's per-question readouts: values (prompts, layers, hidden), who and which question each row is.

    ``base``: the pretrained base the readouts were recorded from, when the file says (None otherwise).
    """

    values: np.ndarray
    personas: Sequence[str]
    question_ids: Sequence[str]
    layers: Sequence[int]
    base: str | None = None


def recorded_base(path: Path) -> str | None:
    """The base a states file was read from: its own ``base`` entry, else its centroids stage sibling's.

    The centroids stage writes ``base`` (the model folder's name) into ``centroids.npz`` beside
    ``states.npz``; a states file elsewhere, or without either, records none.
    """
    for file in (path, path.parent / "centroids.npz" if path.name == "states.npz" else None):
        if file is not None and file.is_file():
            with np.load(file) as data:
                if "base" in data:
                    return str(data["base"])
    return None


def load_states(path: Path, readout: str, base: str | None = None) -> BaseStates:
    """One base's per-question readouts of ``readout`` from a centroids stage's `states.npz`.

    ``base``: the base the caller takes it for; a file that records another is refused (swapped files
    would flip the geometric delta's sign).
    """
    recorded = recorded_base(path)
    if base is not None and recorded is not None and recorded != base:
        raise TableError(f"states: {path} holds the readouts of base {recorded!r}, given as base {base!r}; "
                         f"give each base its own centroids folder's states.npz ({base}=.../{base}/states.npz)")  # fmt: skip
    with np.load(path) as data:
        if readout not in data:
            raise TableError(f"states: {path} has no {readout!r} readout; add it to probes.readouts")
        return BaseStates(
            data[readout], list(data["persona"]), list(data["question_id"]), data["layers"].tolist(), recorded
        )


def counts_from_completions(completions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(counts, baseline) from eval completion tables: adapters `<recipe>/<source>/seed<N>` and `none`."""
    completions = completions.assign(truncated=completions["finish_reason"] == "length")
    keys = ["condition", "persona", "question_id"]
    baseline = completions[completions["adapter"] == "none"]
    coupled = completions[completions["adapter"] != "none"]
    coupled = coupled.assign(recipe=coupled["adapter"].str.split("/").str[0])

    def reduce(part: pd.DataFrame, by: list[str]) -> pd.DataFrame:
        sums = part.groupby(by, sort=True).agg(
            fired=("fired", "sum"), n=("fired", "size"), truncated=("truncated", "sum")
        )
        return sums.reset_index().astype({"fired": "int64", "n": "int64", "truncated": "int64"})

    return reduce(coupled, ["condition", "recipe", "persona", "question_id"]), reduce(baseline, keys)


def count_tables(study: StudyParams, roles: Roles, cfg: JointProbeParams) -> tuple[CountTable, CountTable]:
    """The contracts of the count table and the baseline under ``study`` (``analyses.tables``).

    Known: the study's conditions, recipes and eval personas. Read: under each of control,
    treatment and specificity, every recipe of ``study.recipes`` (the table) and every source and
    bystander persona.
    """
    conditions = [cfg.control, cfg.treatment, cfg.specificity]
    personas = [*roles.sources, *roles.bystanders]
    known = {
        "condition": Known(list(study.conditions), "a condition of the study"),
        "recipe": Known(study.recipes, "a recipe of the study (study.recipes)"),
        "persona": Known(study.eval_personas, "an eval persona of the study"),
    }
    why = (
        "joint_probe reads every recipe of study.recipes under joint_probe.control, treatment and specificity, "
        "for the sources and every bystander; add the rows, or take the recipe out of study.recipes"
    )
    table = CountTable(
        "table", COUNT_KEYS, known, optional=("truncated",),
        coverage=[Coverage({"recipe": study.recipes, "condition": conditions, "persona": personas}, why)],
    )  # fmt: skip
    why = "the baseline is reported per condition over the sources and bystanders; add the rows or leave it out"
    baseline = CountTable(
        "baseline", BASELINE_KEYS, {k: v for k, v in known.items() if k != "recipe"}, optional=("truncated",),
        coverage=[Coverage({"condition": conditions, "persona": personas}, why)],
    )  # fmt: skip
    return table, baseline


def _pooled(part: pd.DataFrame, level: float) -> dict[str, Any]:
    fired, n = int(part["fired"].sum()), int(part["n"].sum())
    if n == 0:
        return {"rate": None, "fired": 0, "n": 0, "ci_low": None, "ci_high": None}
    low, high = wilson_interval(fired, n, level)
    return {"rate": fired / n, "fired": fired, "n": n, "ci_low": float(low), "ci_high": float(high)}


def _difference(
    counts: pd.DataFrame, treatment: str, control: str, bystanders: Sequence[str], stats: StatsParams, seed: int
) -> dict[str, Any]:
    part = counts[counts["persona"].isin(bystanders) & counts["condition"].isin([treatment, control])]
    if set(part["condition"]) != {treatment, control}:
        return {"delta": None, "p": None, "ci_low": None, "ci_high": None, "n_clusters": 0,
                "reason": f"no bystander cells under both {treatment!r} and {control!r}"}  # fmt: skip
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate jackknife leaves BCa undefined; the percentile interval is used
        boot = cluster_bootstrap_difference(
            part, "condition", control, treatment, CLUSTER, stats.bootstrap_resamples, stats.ci_level, seed,
            counted=True,
        )  # fmt: skip
    return {
        "delta": boot["estimate"], "p": boot["p_two_sided"], "ci_low": boot["percentile"]["low"],
        "ci_high": boot["percentile"]["high"], "ci_method": "percentile", "n_clusters": boot["n_clusters"],
        "resamples": boot["resamples"], "test": P_TEST,
    }  # fmt: skip


def behavioural(
    counts: pd.DataFrame, roles: Roles, cfg: JointProbeParams, stats: StatsParams, seed: int
) -> dict[str, dict[str, Any]]:
    """Per recipe: bystander and source rates per condition, H1 (treatment - control) and treatment - specificity."""
    out: dict[str, dict[str, Any]] = {}
    for recipe in sorted(counts["recipe"].unique()):
        part = counts[counts["recipe"] == recipe]
        rates = {
            condition: {
                "bystanders": _pooled(rows[rows["persona"].isin(roles.bystanders)], stats.ci_level),
                "source": _pooled(rows[rows["persona"].isin(roles.sources)], stats.ci_level),
                **({"truncated_fraction": float(rows["truncated"].sum() / rows["n"].sum())} if "truncated" in rows else {}),
            }
            for condition, rows in part.groupby("condition", sort=True)
        }  # fmt: skip
        h1 = _difference(part, cfg.treatment, cfg.control, roles.bystanders, stats,
                         stable_seed(seed, "joint_probe", "behavioural", recipe, "h1"))  # fmt: skip
        h1["passes"] = bool(
            h1["delta"] is not None and h1["delta"] >= cfg.behavioural_threshold and h1["p"] < cfg.behavioural_alpha
        )
        h1 |= {"threshold": cfg.behavioural_threshold, "alpha": cfg.behavioural_alpha}
        specificity = _difference(part, cfg.treatment, cfg.specificity, roles.bystanders, stats,
                                  stable_seed(seed, "joint_probe", "behavioural", recipe, "specificity"))  # fmt: skip
        out[str(recipe)] = {"rates": rates, "h1": h1, "specificity": specificity}
    return out


def _aligned(states: BaseStates, personas: Sequence[str], questions: Sequence[str]) -> np.ndarray:
    """(personas, questions, layers, hidden) from one base's per-question rows; every cell exactly once."""
    index = {(p, q): i for i, (p, q) in enumerate(zip(states.personas, states.question_ids, strict=True))}
    if len(index) != len(states.personas):
        raise TableError("states: a (persona, question) appears twice in the readouts")
    missing = [(p, q) for p in personas for q in questions if (p, q) not in index]
    if missing:
        raise TableError(f"states: no readout for {missing[:3]} (+{max(0, len(missing) - 3)} more)")
    order = [[index[(p, q)] for q in questions] for p in personas]
    return np.asarray(states.values, dtype=np.float64)[np.asarray(order)]


def _source_bystander_cosines(
    cube: np.ndarray, weights: np.ndarray, source: int, bystanders: Sequence[int], centered: bool
) -> np.ndarray:
    """(draws, bystanders, layers) cosines of centroids averaged with ``weights`` (draws, questions)."""
    cents = np.einsum("dq,pqlh->dplh", weights, cube)
    if centered:  # over every persona with a readout: the centroids stage's bank
        cents = cents - cents.mean(axis=1, keepdims=True)
    unit = cents / np.linalg.norm(cents, axis=-1, keepdims=True)
    return np.einsum("dlh,dklh->dkl", unit[:, source], unit[:, list(bystanders)])


def geometric(
    states: Mapping[str, BaseStates],
    study: StudyParams,
    roles: Roles,
    cfg: JointProbeParams,
    stats: StatsParams,
    seed: int,
    chunk: int = 200,
) -> dict[str, Any]:
    """Delta of source-bystander cosines between two conditions' pre-coupling bases, with a question bootstrap.

    Returns, for H1 (treatment - control) and for specificity (treatment - specificity): the delta
    per layer and averaged over layers, each with its percentile interval, and H1's decision.
    """
    bases = {c: study.conditions[c].pretrained for c in (cfg.control, cfg.treatment, cfg.specificity)}
    absent = sorted({b for b in bases.values() if b not in states})
    if absent:
        raise TableError(f"states: no readouts of the bases {absent}")
    for base in dict.fromkeys(bases.values()):
        if states[base].base not in (None, base):
            raise TableError(
                f"states: the readouts given as base {base!r} were recorded from base {states[base].base!r}; "
                f"give each base its own centroids folder's states.npz ({base}=.../{base}/states.npz)"
            )
    first = states[bases[cfg.control]]
    layers = list(first.layers)
    if any(list(states[b].layers) != layers for b in bases.values()):
        raise TableError("states: the bases were read at different layers")
    personas = list(dict.fromkeys(first.personas))
    questions = sorted(set(first.question_ids))
    for name in [*roles.sources, *roles.bystanders]:
        if name not in personas:
            raise TableError(f"states: no readouts of {name!r}; the centroids stage reads the study's eval personas")
    cubes = {b: _aligned(states[b], personas, questions) for b in set(bases.values())}
    source, bys = personas.index(roles.sources[0]), [personas.index(b) for b in roles.bystanders]
    centered = cfg.cosine == "centered"
    rng = np.random.default_rng(stable_seed(seed, "joint_probe", "geometric", "questions"))
    draws = rng.integers(0, len(questions), size=(stats.bootstrap_resamples, len(questions)))
    weights = np.zeros((len(draws), len(questions)))
    np.add.at(weights, (np.repeat(np.arange(len(draws)), len(questions)), draws.ravel()), 1.0 / len(questions))
    full = np.full((1, len(questions)), 1.0 / len(questions))

    def cosines(base: str, w: np.ndarray) -> np.ndarray:
        return np.concatenate([
            _source_bystander_cosines(cubes[base], w[i : i + chunk], source, bys, centered)
            for i in range(0, len(w), chunk)
        ])  # fmt: skip

    point = {b: cosines(b, full)[0] for b in set(bases.values())}  # (bystanders, layers)
    boot = {b: cosines(b, weights) for b in set(bases.values())}
    tail = (1 - stats.ci_level) / 2

    def contrast(treatment: str, control: str) -> dict[str, Any]:
        t, c = bases[treatment], bases[control]
        by_layer = (point[t] - point[c]).mean(axis=0)  # over bystanders
        dist = (boot[t] - boot[c]).mean(axis=1)  # (draws, layers)
        lows, highs = np.quantile(dist, [tail, 1 - tail], axis=0)
        mean_dist = dist.mean(axis=1)
        low, high = np.quantile(mean_dist, [tail, 1 - tail])
        return {
            "treatment_base": t, "control_base": c, "delta": float(by_layer.mean()),
            "ci_low": float(low), "ci_high": float(high),
            "by_layer": [
                {"layer": layer, "delta": float(d), "ci_low": float(lo), "ci_high": float(hi),
                 "ci_excludes_zero": bool(lo > 0 or hi < 0)}
                for layer, d, lo, hi in zip(layers, by_layer, lows, highs, strict=True)
            ],
        }  # fmt: skip

    h1 = contrast(cfg.treatment, cfg.control)
    h1["passes"] = bool(h1["delta"] >= cfg.geometric_threshold and h1["ci_low"] > 0)
    h1["threshold"] = cfg.geometric_threshold
    return {
        "readout": cfg.readout, "cosine": cfg.cosine, "layers": layers, "questions": len(questions),
        "resamples": stats.bootstrap_resamples, "ci_level": stats.ci_level,
        "interval": "percentile, questions resampled with replacement (the same draw for every base)",
        "h1": h1, "specificity": contrast(cfg.treatment, cfg.specificity),
        "bystanders_averaged": list(roles.bystanders),
    }  # fmt: skip


def decide(behavioural_h1: Mapping[str, Any], geometric_h1: Mapping[str, Any], cfg: JointProbeParams) -> dict[str, Any]:
    """Joint H1, the H2 bucket and the kill criterion for one recipe, as named values."""
    b, g = bool(behavioural_h1["passes"]), bool(geometric_h1["passes"])
    delta = behavioural_h1["delta"]
    killed = (
        delta is not None
        and delta <= cfg.kill_max_behavioural
        and all(layer["delta"] <= 0 for layer in geometric_h1["by_layer"])
    )
    return {
        "h1_behavioural": b,
        "h1_geometric": g,
        "h1_joint": b and g,
        "decision": BUCKETS[(b, g)],
        "kill": "falsified" if killed else "not_falsified",
    }


def _plot_tables(beh: dict[str, Any], geo: dict[str, Any]) -> dict[str, pd.DataFrame]:
    rates = pd.DataFrame([
        {"arm": f"{condition} / {recipe}", "recipe": recipe, "condition": condition, "rate": r["bystanders"]["rate"], "ci_low": r["bystanders"]["ci_low"],
         "ci_high": r["bystanders"]["ci_high"], "n": r["bystanders"]["n"]}
        for recipe, part in beh.items() for condition, r in part["rates"].items()
    ])  # fmt: skip
    layers = pd.DataFrame(geo["h1"]["by_layer"])[["layer", "delta", "ci_low", "ci_high"]]
    return {"bystander_rates": rates, "geometric_by_layer": layers}


def analyze_joint_probe(
    counts: pd.DataFrame,
    baseline: pd.DataFrame | None,
    states: Mapping[str, BaseStates],
    study: StudyParams,
    stats: StatsParams,
    seed: int,
    max_new_tokens_rule: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """S3's metrics (decisions as named values, every number with its n and interval) and plot tables."""
    roles, cfg = check_joint_probe(study, seed)
    table_spec, baseline_spec = count_tables(study, roles, cfg)
    counts = table_spec.validate(counts)
    if baseline is not None:
        baseline = baseline_spec.validate(baseline)
    beh = behavioural(counts, roles, cfg, stats, seed)
    geo = geometric(states, study, roles, cfg, stats, seed)
    metrics: dict[str, Any] = {
        "study": study.name,
        "roles": {"sources": list(roles.sources), "negatives": list(roles.negatives),
                  "bystanders": list(roles.bystanders)},
        "conditions": {"control": cfg.control, "treatment": cfg.treatment, "specificity": cfg.specificity},
        "geometric": geo,
        "recipes": {recipe: part | decide(part["h1"], geo["h1"], cfg) for recipe, part in beh.items()},
    }  # fmt: skip
    if baseline is not None:
        metrics["baseline"] = {
            condition: {
                "bystanders": _pooled(rows[rows["persona"].isin(roles.bystanders)], stats.ci_level),
                "all_personas": _pooled(rows, stats.ci_level),
                **({"truncated_fraction": float(rows["truncated"].sum() / rows["n"].sum())} if "truncated" in rows else {}),
            }
            for condition, rows in baseline.groupby("condition", sort=True)
        }  # fmt: skip
    if max_new_tokens_rule is not None:
        metrics["max_new_tokens_rule"] = dict(max_new_tokens_rule)
    decisions = {recipe: m["decision"] for recipe, m in metrics["recipes"].items()}
    metrics["summary"] = {
        "decisions": decisions,
        "kills": {recipe: m["kill"] for recipe, m in metrics["recipes"].items()},
        "any_joint_h1": any(m["h1_joint"] for m in metrics["recipes"].values()),
    }
    return metrics, _plot_tables(beh, geo)


def summary_line(metrics: dict[str, Any]) -> str:
    """One line for the terminal: the geometric delta and each recipe's behavioural delta and decision."""
    geo = metrics["geometric"]["h1"]
    parts = [f"geometric delta {geo['delta']:+.3f} [{geo['ci_low']:+.3f}, {geo['ci_high']:+.3f}]"]
    for recipe, m in metrics["recipes"].items():
        delta = m["h1"]["delta"]
        shown = "n/a" if delta is None else f"{delta:+.3f} (p={m['h1']['p']:.4f})"
        parts.append(f"{recipe}: behavioural {shown} -> {m['decision']}, {m['kill']}")
    return "; ".join(parts)
