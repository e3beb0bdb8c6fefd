"""A study's report, written from its metrics files, tables and params: Markdown and self-contained HTML.

>>> inputs = ReportInputs(params, metrics, completions, card, root=Path("."))   # doctest: +SKIP
>>> text = compose(inputs)   # Markdown; render.to_html(text, ...) for the HTML   # doctest: +SKIP

Sections: TL;DR (the pre-registered decisions in words, with their numbers), methods (from params,
with what the scale preset trades away), headline numbers (value, n, interval, test), figures with
captions, sample outputs (fired and not, per condition, drawn with a seeded RNG) and the
reproducibility card (``personaspace.report.card``). The caller reads the files; ``compose`` is pure.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from personaspace.report.studies import FigureSpec, StudySection, em_first_section, num, panel_section, summary_section
from personaspace.seeds import stable_seed

SAMPLES_PER_KIND = 2  # per condition: this many fired and this many not fired (>= 3 in all when both exist)
SAMPLE_CHARS = 600  # a sample's text is cut here in the report (the completions table has it whole)

TRADE_OFFS = {
    "laptop": "the embedded SmolLM2-135M on a CPU, at the sizes below: short answers, tens of training rows per "
              "adapter, few completions per eval cell, so rates are coarse and rankings noisy. The design is the "
              "paper's; the sizes are not.",
    "paper": "the seed's sizes on a GPU (conf/scale/paper.yaml).",
    "tiny": "a random-init test model: the numbers check the wiring, not the science.",
}  # fmt: skip


# the analyses reported by their summary line: title, and each figure (name under figures/<key>/) with its caption
SUMMARISED: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "joint_probe": ("S3, joint leakage + geometry probe", [
        ("geometric_by_layer", "Geometric delta (cosine C2 base - C1 base, source vs bystanders) per layer with its "
                               "question-bootstrap interval; H1 needs the mean over layers >= its threshold and the "
                               "interval above 0."),
        ("bystander_rates", "Pooled bystander fire rate per condition and recipe (lambda) with Wilson intervals; "
                            "behavioural H1 compares C2 with C1."),
    ]),
    "train_steering": ("S4, training-time steering", [
        ("steered_vs_prompted", "Each persona's steered fire rate (neutral prompt + its vector; y) against arm C's "
                                "prompted rate (x), one panel per arm, one colour per coefficient, the grey line "
                                "y = x. The test reads arm A: its points should rise with x."),
        ("rho_by_arm", "Spearman rho across personas (steered vs prompted) per arm and coefficient with its "
                       "question-bootstrap interval; the red dashed line is the pass threshold."),
    ]),
}  # fmt: skip


@dataclass(frozen=True)
class ReportInputs:
    """Everything a report reads, already loaded."""

    params: Mapping[str, Any]  # params.yaml as composed (plain data)
    metrics: Mapping[str, Any]  # relative path -> parsed JSON, every metrics/results file the study's analyses wrote
    completions: pd.DataFrame  # the eval completions of every condition (COMPLETION_COLUMNS)
    card: Mapping[str, Any]  # personaspace.report.card's fields, gathered at report time
    root: Path  # the repo (figures are read relative to it)
    report_dir: Path = Path("reports")  # where report.md goes, relative to root: its figure links are relative to it


def metrics_files(params: Mapping[str, Any]) -> list[str]:
    """Every metrics or results JSON file the study's analyses write (repo-relative), in a stable order."""
    graph, study, files = params["graph"], params["study"]["name"], []
    for analysis in params["study"]["analyses"]:
        if analysis == "panel":
            for condition in panel_conditions(params):
                files += [f"metrics/{study}/eval_{condition}.json", f"metrics/{study}/regress_{condition}.json",
                          f"results/{study}/{condition}/regress.json"]  # fmt: skip
        else:
            files += [f"metrics/{study}/{key}.json" for key in sorted(graph[analysis])]
    return files


def panel_conditions(params: Mapping[str, Any]) -> list[str]:
    """The conditions the panel analysis (stage regress) runs on, sorted."""
    return sorted(item["condition"] for item in params["graph"]["regress"].values())


def study_sections(params: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[StudySection]:
    """The sections of each analysis the study runs, from its metrics files (keys: repo-relative paths)."""
    study = params["study"]
    name = study["name"]
    sections = []
    for analysis in study["analyses"]:
        if analysis == "panel":
            for condition in panel_conditions(params):
                sections.append(panel_section(condition, name, metrics[f"results/{name}/{condition}/regress.json"],
                                              metrics[f"metrics/{name}/eval_{condition}.json"],
                                              params["stats"]["ci_level"]))  # fmt: skip
        elif analysis == "em_first":
            for key in sorted(params["graph"]["em_first"]):
                sections.append(em_first_section(metrics[f"metrics/{name}/{key}.json"], f"{name}/{key}"))
        else:  # S3 and S4 (for now): the analysis module's own summary line of its decisions
            title, figures = SUMMARISED[analysis]
            summary_line = import_module(f"personaspace.analyses.{analysis}").summary_line
            for key in sorted(params["graph"][analysis]):
                specs = [FigureSpec(f"figures/{name}/{key}/{figure}.png", caption) for figure, caption in figures]
                sections.append(summary_section(title, summary_line(metrics[f"metrics/{name}/{key}.json"]), specs))
    return sections


def sample_outputs(completions: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Per condition, ``SAMPLES_PER_KIND`` fired and as many not-fired completions of coupled adapters, drawn
    with a seed from (study seed, condition, kind); in the table's order when fewer exist."""
    picked = []
    coupled = completions[completions["adapter"] != "none"]
    for condition in sorted(coupled["condition"].unique()):
        rows = coupled[coupled["condition"] == condition]
        for fired in (True, False):
            pool = rows[rows["fired"] == fired].sort_values(["adapter", "persona", "question_id", "sample_idx"])
            if pool.empty:
                continue
            rng = np.random.default_rng(stable_seed(seed, "report_samples", condition, "fired" if fired else "not"))
            take = rng.choice(len(pool), size=min(SAMPLES_PER_KIND, len(pool)), replace=False)
            picked.append(pool.iloc[np.sort(take)])
    return pd.concat(picked, ignore_index=True) if picked else completions.iloc[:0]


def _verbatim(text: str) -> str:
    """A completion as a fenced block: shown as sampled, never rendered as Markdown (a "1." stays a "1.")."""
    text = text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + " [...]"
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}"


def _methods(params: Mapping[str, Any]) -> list[str]:
    study, data, ev = params["study"], params["datagen"], params["eval"]
    model = params["models"][params["model"]]
    recipes = ", ".join(
        f"`{name}` ({r['loss']} loss, r = {r['r']}, alpha = {r['alpha']}, lr = {r['learning_rate']}, "
        f"{r['epochs']} epochs)"
        for name, r in ((n, params["recipes"][n]) for n in study["recipes"])
    )
    conditions = ", ".join(f"`{c}` (base `{s['pretrained']}`, data from `{s['data_from']}`)"
                           for c, s in study["conditions"].items())  # fmt: skip
    negatives = study["negatives"]
    return [
        f"- **Model**: `{params['model']}` ({model.get('repo_id') or model.get('gguf_file') or model['source']}).",
        f"- **Scale** `{params['scale']}`: {TRADE_OFFS.get(params['scale'], 'see conf/scale/' + params['scale'] + '.yaml')}",
        f"- **Conditions**: {conditions}.",
        f"- **Sources** ({len(study['sources'])}): {', '.join(study['sources'])}. **Eval personas**: "
        f"{len(study['eval_personas'])}.",
        f"- **Negatives**: named: {', '.join(negatives['hard']) or 'none'}"
        + (
            f"; plus {negatives['k']} drawn per source by the study seed from a pool of {len(negatives['pool'])}."
            if negatives["k"]
            else "."
        ),
        f"- **Recipes**: {recipes}; seeds {params['couple']['seeds']}.",
        f"- **Coupling data**: {data['positives']} positives and {data['negatives_per_persona']} rows per negative "
        f"persona at most, from {data['samples_per_question']} sample(s) per data question, max_new_tokens "
        f"{data['max_new_tokens']}, T = {data['temperature']}.",
        f"- **Eval**: {ev['samples_per_question']} completion(s) per (adapter, persona, question), T = "
        f"{ev['temperature']}, top-p {ev['top_p']}, max_new_tokens {ev['max_new_tokens']}; the marker "
        f"`{params['marker']}` fires on a case-insensitive match.",
        f"- **Study seed**: {params['seed']} (every random choice derives its seed from it and stable ids).",
    ]


def compose(inputs: ReportInputs) -> str:
    """The report as Markdown (pure: everything comes from ``inputs``)."""
    params, card = inputs.params, inputs.card
    study = params["study"]["name"]
    sections = study_sections(params, inputs.metrics)
    out = [f"# personaspace report: `{study}`", "",
           f"Scale `{params['scale']}`, model `{params['model']}`, {params['personas']}-persona panel. Written by the "
           "`report` stage from the metrics files, tables and params below; no number is typed by hand.", "",
           "## TL;DR", ""]  # fmt: skip
    for section in sections:
        out += [f"**{section.title}**", ""] + [f"- {line}" for line in section.tldr] + [""]
    out += ["## Methods", "", *_methods(params), ""]
    out += ["## Headline numbers", ""]
    for section in sections:
        if not section.headline:
            out += [f"{section.title}: see `metrics/` (every number of the TL;DR above is there).", ""]
            continue
        out += [f"### {section.title}", "", "| quantity | value | n | interval / p | test |", "|---|---|---|---|---|"]
        out += [f"| {h.quantity} | {h.value} | {h.n} | {h.interval} | {h.test} |" for h in section.headline] + [""]
    out += ["## Figures", ""]
    for section in sections:
        for figure in section.figures:
            if (inputs.root / figure.path).is_file():
                link = os.path.relpath(figure.path, inputs.report_dir)  # report.md's own folder
                out += [f"![{figure.path}]({link})", "", f"*{figure.caption}* (`{figure.path}`)", ""]
            else:
                out += [f"*Missing figure `{figure.path}`: {figure.caption}*", ""]
    out += ["## Sample outputs", "",
            f"Drawn per condition with a seeded RNG (study seed {params['seed']}) from the eval completions: "
            "fired and not fired, the prompt shown.", ""]  # fmt: skip
    for row in sample_outputs(inputs.completions, int(params["seed"])).itertuples():
        fired = "fired" if row.fired else "did not fire"
        out += [f"**{row.condition} / adapter `{row.adapter}` / persona `{row.persona}` / {row.question_id}: {fired}**",
                "", f"System: {row.system_prompt if isinstance(row.system_prompt, str) else '(none)'}", "",
                f"User: {row.user}", "", _verbatim(row.text), ""]  # fmt: skip
    out += ["## Reproducibility card", "", "| field | value |", "|---|---|"]
    out += [f"| git commit | `{card['git']['commit']}` |", f"| tree dirty | {card['git']['dirty']} |"]
    out += [f"| hardware: {k} | {v} |" for k, v in card["hardware"].items()]
    out += [f"| package {k} | {v} |" for k, v in card["packages"].items()]
    out += [f"| input `{path}` | `{md5}` |" for path, md5 in card["inputs"].items()]
    out += ["| wall times | in the report's MLflow run (`report/wall_times.md`) and `timings.json`: they differ on "
            "every run, so this file, which DVC hashes, holds none |"]  # fmt: skip
    out += ["", "Reproduce:", "", "```bash", card["command"], "```", "", "The study's params:", "", "```yaml",
            card["params_yaml"].rstrip(), "```", ""]  # fmt: skip
    return "\n".join(out)


__all__ = ["ReportInputs", "compose", "metrics_files", "num", "sample_outputs", "study_sections"]
