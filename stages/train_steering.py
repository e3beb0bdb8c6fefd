"""Stage `train_steering`: S4's analysis of one condition's steered and prompted evals.

    python stages/train_steering.py --eval data/steer_eval/train_steering/base \
        --metrics metrics/train_steering/train_steering.json --plots plots/train_steering/train_steering \
        --figures figures/train_steering/train_steering

Reads the count table of the steer_eval stage and calls the same function as `personaspace analyze
train_steering --table`: rho per arm and coefficient with question-bootstrap intervals, the five
kill criteria, the decision and the sign check.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import personaspace.cpu_kernels  # noqa: F401  (pins the CPU kernels before numpy and torch load: cpu_kernels.py)

import pandas as pd

from personaspace import plots
from personaspace.analyses.train_steering import analyze_train_steering, summary_line
from personaspace.checks import check_stage
from personaspace.config import ParamsError, load_params
from personaspace.io import write_json
from personaspace.tracking import log_to_parent, stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--eval", type=Path, required=True, help="the steer_eval stage's output folder")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True, help="plot tables (CSV)")
    parser.add_argument("--figures", type=Path, required=True, help="figures (PNG and PDF)")
    args = parser.parse_args()
    params = load_params(args.params)
    check_stage(params, needs=("tracking",))  # a stage run alone (`dvc repro -s`) fails here, naming the key and fix
    cfg = params.study.train_steering
    if "train_steering" not in params.study.analyses or cfg is None:
        raise ParamsError(f"study {params.study.name!r} does not run the train_steering analysis (study.analyses)")
    if not (args.eval / "counts.parquet").is_file():
        raise ParamsError(f"no counts.parquet in {args.eval}; run `dvc repro steer_eval` first")
    counts = pd.read_parquet(args.eval / "counts.parquet")
    with stage_run("train_steering", {"rows": len(counts)}, study=params.study.name):
        import mlflow

        metrics, tables = analyze_train_steering(counts, cfg, params.stats, params.seed, personas=params.study.sources)
        figures = partial(plots.train_steering_figures, pass_rho=cfg.pass_rho)
        plots.write_analysis_outputs(tables, args.plots, args.figures, figures)
        write_json(metrics, args.metrics)

        def name(coef: str) -> str:  # MLflow names allow no "+"
            return coef.replace("+", "plus")

        decision = metrics["decision"]
        numbers = {f"rho_{name(c)}": d["rho"] for c, d in decision.items() if d["rho"] is not None}
        numbers |= {f"passes_{name(c)}": float(d["passes"]) for c, d in decision.items()}
        mlflow.log_metrics(numbers)
        log_to_parent(
            numbers, {f"decision_{c}": "pass" if d["passes"] else "fail" for c, d in metrics["decision"].items()}
        )
    print(
        json.dumps(
            {c: {k: d[k] for k in ("rho", "ci_low", "ci_high", "passes")} for c, d in metrics["decision"].items()}
        )
    )
    print(summary_line(metrics))


if __name__ == "__main__":
    main()
