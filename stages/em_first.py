"""Stage `em_first`: S2's analysis of the four conditions' evals (METHODS.md S2).

    python stages/em_first.py --evals data/eval/em_first/base data/eval/em_first/benign data/eval/em_first/em \
        data/eval/em_first/em_basedata --metrics metrics/em_first/em_first.json --plots plots/em_first/em_first \
        --figures figures/em_first/em_first

Reads each condition's per-completion table, reduces it to (condition, persona, question) counts
and the pre-coupling baseline, and calls the same function as `personaspace analyze em_first`.
Writes the metrics, the plot tables (CSV, for `dvc plots`) and the figures (PNG and PDF).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import personaspace.cpu_kernels  # noqa: F401  (pins the CPU kernels before numpy and torch load: cpu_kernels.py)

import pandas as pd

from personaspace import plots
from personaspace.analyses.em_first import analyze_em_first, counts_from_completions
from personaspace.checks import check_stage
from personaspace.config import ParamsError, load_params
from personaspace.io import write_json
from personaspace.tracking import log_to_parent, stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--evals", type=Path, nargs="+", required=True, help="each condition's eval output folder")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True, help="plot tables (CSV)")
    parser.add_argument("--figures", type=Path, required=True, help="figures (PNG and PDF)")
    args = parser.parse_args()
    params = load_params(args.params)
    check_stage(params, needs=("tracking",))  # a stage run alone (`dvc repro -s`) fails here, naming the key and fix
    if "em_first" not in params.study.analyses:
        raise ParamsError(f"study {params.study.name!r} does not run the em_first analysis (study.analyses)")
    missing = [str(folder) for folder in args.evals if not (folder / "completions.parquet").is_file()]
    if missing:
        raise ParamsError(f"no eval output in {missing}; run `dvc repro eval` first")
    completions = pd.concat([pd.read_parquet(folder / "completions.parquet") for folder in args.evals])
    counts, baseline = counts_from_completions(completions)
    with stage_run("em_first", {"conditions": len(args.evals)}, study=params.study.name):
        import mlflow

        metrics, tables = analyze_em_first(counts, baseline, params.study, params.stats, params.seed)
        plots.write_analysis_outputs(tables, args.plots, args.figures, plots.em_first_figures)
        write_json(metrics, args.metrics)
        decisions = {f"{name}_passes": float(c["passes"]) for name, c in metrics["contrasts"].items()}
        deltas = {f"{name}_delta": c["delta"] for name, c in metrics["contrasts"].items() if c["delta"] is not None}
        mlflow.log_metrics(decisions | deltas)
        rule = params.study.em_first.text_artifact.contrast  # the contrast whose reading is logged
        log_to_parent(deltas, {f"{rule}_interpretation": metrics["contrasts"][rule].get("interpretation")})
    headline = {name: {k: c[k] for k in ("delta", "p", "passes")} for name, c in metrics["contrasts"].items()}
    print(json.dumps({"contrasts": headline, "kill": metrics["kill"], "source_gate": metrics["source_gate"]}))


if __name__ == "__main__":
    main()
