"""What each analysis contributes to a report: its decisions in words, its headline numbers, its figures.

Pure: metrics dicts in (as the analysis stages wrote them), text and rows out. Every number is
formatted by ``num`` from a metrics value, so the report's test can find each one in a metrics file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DIGITS = 3  # decimals of every rate, correlation, delta and interval end in a report


def num(value: Any, digits: int = DIGITS) -> str:
    """A metrics value as the report prints it: ints as they are, floats at ``digits`` decimals, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def pvalue(value: Any) -> str:
    """A p-value: 4 significant digits in scientific notation below 0.001 (``num`` would print 0.000)."""
    if value is None:
        return "n/a"
    return f"{value:.3e}" if value < 1e-3 else f"{value:.4f}"


def interval(low: Any, high: Any) -> str:
    return f"[{num(low)}, {num(high)}]"


@dataclass(frozen=True)
class Headline:
    """One headline number: what it is, its value, its n, its interval and the test or method behind it."""

    quantity: str
    value: str
    n: str
    interval: str
    test: str


@dataclass(frozen=True)
class FigureSpec:
    """A figure the analysis writes (relative to the report root) and the caption that says how to read it."""

    path: str
    caption: str


@dataclass
class StudySection:
    title: str
    tldr: list[str] = field(default_factory=list)
    headline: list[Headline] = field(default_factory=list)
    figures: list[FigureSpec] = field(default_factory=list)


GATE_BUCKETS = {
    "consistent": "all three gates pass on both splits: geometry predicts leakage as pre-registered",
    "consistent_weak": "the gates pass with a weak effect",
    "attenuated": "the holdout effect is weaker than the calibration effect",
    "inverted": "the holdout slope has the opposite sign",
    "anti-correlated": "closer to the assistant means less leakage",
    "indeterminate": "the gates cannot decide",
}


def panel_section(
    condition: str, study: str, regress: Mapping[str, Any], evaluation: Mapping[str, Any], level: float
) -> StudySection:
    """S1 for one condition, from results/<study>/<condition>/regress.json and metrics/<study>/eval_<condition>.json;
    ``level`` is the Wilson intervals' (stats.ci_level)."""
    where = f"{study}/{condition}"
    primary = regress["primary_layer"]
    layer = regress["layers"][str(primary)]
    gates = regress["gates"]
    outcome = gates["outcome"]
    reference = regress["reference_persona"]
    spearman, pearson = layer["spearman"], layer["pearson"]
    off = regress["off_diagonal"]["all"]
    loo = layer["loo_pi"]
    tldr = [
        f"**Three-gate outcome: `{outcome}`** ({GATE_BUCKETS.get(outcome, outcome)}; "
        f"{gates.get('outcome_reason', 'see results/' + where + '/regress.json')}).",
        f"At the primary layer {primary}, the centered cosine of each source's centroid to `{reference}` "
        f"and the source's own fire rate: Spearman rho = {num(spearman['rho'])} (p = {pvalue(spearman['p'])}, "
        f"Holm-adjusted over layers p = {pvalue(layer['holm']['spearman_p'])}), Pearson r = {num(pearson['r'])}, "
        f"n = {layer['n']} personas"
        + (
            "."
            if regress.get("reference_in_fit", True)
            else f" (`{reference}` itself, the centroid every cosine is taken to, "
            "is left out of every fit: `stats.fit_reference`)."
        ),
        f"Leakage: the adapters fire under their own persona at {num(evaluation['source_rate_mean'])} on average "
        f"and under the other personas at {num(evaluation['bystander_rate_mean'])}; with no adapter, "
        f"{num(evaluation['baseline_rate'])}.",
        f"Off the diagonal (every source x bystander cell, n = {off['n_cells']}): Spearman rho between their "
        f"cosine and the bystander's rate = {num(off['rho'])} (p = {pvalue(off['p'])}).",
    ]
    headline = [
        Headline(f"Spearman rho, cosine to {reference} vs own rate, layer {primary}", num(spearman["rho"]),
                 str(layer["n"]), f"p = {pvalue(spearman['p'])}", "Spearman (scipy), two-sided"),
        Headline(f"Pearson r, layer {primary}", num(pearson["r"]), str(layer["n"]), f"p = {pvalue(pearson['p'])}",
                 "Pearson (scipy), two-sided"),
        Headline("Length-partial Spearman rho", num(layer["length_partial_spearman"]["rho"]),
                 str(layer["length_partial_spearman"]["n"]), f"p = {pvalue(layer['length_partial_spearman']['p'])}",
                 layer["length_partial_spearman"]["test"]),
        Headline(f"Leave-one-out: personas inside the {loo['level']:.0%} prediction interval",
                 f"{loo['covered']} of {loo['n']}",
                 str(loo["n"]), "n/a", "OLS fit on the rest (statsmodels)"),
        Headline("Off-diagonal Spearman rho (cosine vs bystander rate)", num(off["rho"]), str(off["n_cells"]),
                 f"p = {pvalue(off['p'])}", "Spearman (scipy), two-sided"),
    ]  # fmt: skip
    for persona, rate in sorted(regress["rates"].items()):
        headline.append(
            Headline(f"Own fire rate, {persona}", num(rate["rate"]), str(rate["n"]),
                     interval(rate["wilson_low"], rate["wilson_high"]), f"Wilson score interval, {level:.0%}")
        )  # fmt: skip
    figures = [
        FigureSpec(f"figures/{where}/scatter.png",
                   f"Each source persona's own fire rate (y, Wilson interval) against the centered cosine of its "
                   f"centroid to `{reference}` at layer {primary} (x), coloured by category, with the OLS fit and its "
                   "prediction band. A rising cloud: personas closer to the assistant fire their own marker more."),
        FigureSpec(f"figures/{where}/rho_by_layer.png",
                   "Spearman rho of the cosine-rate relation at every layer; a filled point is significant after "
                   "Holm's correction over layers, and the dashed lines are the first Holm step's critical rho. "
                   "Read which layers carry the relation, and whether the primary layer is one of them."),
        FigureSpec(f"figures/{where}/rate_matrix.png",
                   "Fire rate of each source's adapter (rows) under each eval persona (columns). The diagonal is "
                   "the implanted persona; bright off-diagonal cells are leakage."),
        FigureSpec(f"figures/{where}/rates_forest.png",
                   "Each source's own fire rate with its Wilson interval and n, sorted: how well each coupling took."),
    ]  # fmt: skip
    return StudySection(f"S1, panel regression: condition `{condition}`", tldr, headline, figures)


def em_first_section(metrics: Mapping[str, Any], key: str) -> StudySection:
    """S2 from metrics/<key>.json (personaspace.analyses.em_first); ``key`` is <study>/<analysis>."""
    tldr, headline = [], []
    level = metrics["ci"]["level"]
    for name, c in metrics["contrasts"].items():
        verdict = "passes" if c["passes"] else "fails"
        text = (f"**{name} {verdict}**: bystander rate {c['treatment']} - {c['control']} = {num(c['delta'])} "
                f"{interval(c['ci_low'], c['ci_high'])} ({c['ci_method']}), p = {pvalue(c['p'])} against a "
                f"threshold of {num(c['threshold'])} at Bonferroni alpha {num(c['alpha_bonferroni'], 4)}")  # fmt: skip
        if "interpretation" in c:
            text += f"; reading: `{c['interpretation']}`"
        tldr.append(text + ".")
        headline.append(Headline(f"{name}: bystander rate {c['treatment']} - {c['control']}", num(c["delta"]),
                                 f"{c['n_clusters']} clusters", interval(c["ci_low"], c["ci_high"]),
                                 f"{c['p_test']}; {c['ci_method']} {num(level, 2)} interval"))  # fmt: skip
    gate, kill = metrics["source_gate"], metrics["kill"]
    tldr.append(f"Source gate **{'armed' if gate['armed'] else 'not armed'}** (source rate ratio "
                f"{gate['treatment']}/{gate['control']} = {num(gate['ratio'])}, arms below {num(gate['max_ratio'])}).")  # fmt: skip
    tldr.append(f"Kill criterion **{'triggered' if kill['triggered'] else 'not triggered'}**: bystander rate of "
                f"{kill['condition']} ({kill['rate_basis']}) = {num(kill['rate'])}, triggers at or below "
                f"{num(kill['max_bystander'])}.")  # fmt: skip
    for condition, c in metrics["conditions"].items():
        for role in ("source", "bystander"):
            s = c[role]
            headline.append(Headline(f"{role} rate, {condition}", num(s["rate"]), str(s["n"]),
                                     interval(s["wilson_low"], s["wilson_high"]), "Wilson score interval"))  # fmt: skip
    figures = [
        FigureSpec(f"figures/{key}/bystander_rates.png",
                   "Pooled bystander fire rate per condition (Wilson interval), with the pre-coupling baseline of "
                   "its base (x): H1 compares C2 with C1, H2 C2 with C3, H3 C2 with C2'."),
        FigureSpec(f"figures/{key}/contrasts.png",
                   "Each pre-registered contrast's delta with its bootstrap interval; the red tick is its threshold. "
                   "A contrast passes when the delta clears the threshold and p is below the Bonferroni alpha."),
        FigureSpec(f"figures/{key}/persona_forest.png",
                   "Every eval persona's rate per condition with Wilson intervals: is a difference carried by a few "
                   "personas?"),
    ]  # fmt: skip
    return StudySection("S2, EM-first coupling", tldr, headline, figures)


def summary_section(title: str, line: str, figures: list[FigureSpec]) -> StudySection:
    """S3 and S4 (for now): the analysis module's own summary line of its decisions, and its figures."""
    return StudySection(title, [part.strip() + "." for part in line.split(";")], [], figures)
