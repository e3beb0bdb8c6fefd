"""Stage `joint_probe`: S3's analysis of three conditions' evals and their pre-coupling bases' readouts.

    python stages/joint_probe.py --evals data/eval/joint_probe/base data/eval/joint_probe/benign \
        data/eval/joint_probe/em --centroids data/centroids/joint_probe/benign data/centroids/joint_probe/em \
        data/centroids/joint_probe/raw --markers data/markers/base/ds1a2b3c4d data/markers/benign/ds1a2b3c4d \
        data/markers/em/ds1a2b3c4d --metrics metrics/joint_probe/joint_probe.json \
        --plots plots/joint_probe/joint_probe --figures figures/joint_probe/joint_probe

Reduces the eval tables to (condition, recipe, persona, question) counts and the pre-coupling
baseline, reads each base's per-question readouts (`states.npz` of the centroids stage), checks
METHODS.md's rule that eval's max_new_tokens is at least twice the longest trained completion
(from the marker datasets), and calls the same function as `personaspace analyze joint_probe`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import personaspace.cpu_kernels  # noqa: F401  (pins the CPU kernels before numpy and torch load: cpu_kernels.py)

import pandas as pd

from personaspace import plots
from personaspace.analyses.joint_probe import analyze_joint_probe, counts_from_completions, load_states, summary_line
from personaspace.checks import check_stage
from personaspace.config import ParamsError, load_params
from personaspace.io import write_json
from personaspace.tracking import log_to_parent, stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--evals", type=Path, nargs="+", required=True, help="each condition's eval output folder")
    parser.add_argument("--centroids", type=Path, nargs="+", required=True, help="each base's centroids folder")
    parser.add_argument("--markers", type=Path, nargs="+", required=True, help="each data condition's marker datasets")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True, help="plot tables (CSV)")
    parser.add_argument("--figures", type=Path, required=True, help="figures (PNG and PDF)")
    args = parser.parse_args()
    params = load_params(args.params)
    check_stage(params, needs=("tracking",))  # a stage run alone (`dvc repro -s`) fails here, naming the key and fix
    study = params.study
    if "joint_probe" not in study.analyses or study.joint_probe is None:
        raise ParamsError(f"study {study.name!r} does not run the joint_probe analysis (study.analyses)")
    missing = [str(f) for f in args.evals if not (f / "completions.parquet").is_file()]
    missing += [str(f) for f in args.centroids if not (f / "states.npz").is_file()]
    if missing:
        raise ParamsError(f"no stage output in {missing}; run `dvc repro eval centroids` first")
    completions = pd.concat([pd.read_parquet(folder / "completions.parquet") for folder in args.evals])
    counts, baseline = counts_from_completions(completions)
    states = {
        folder.name: load_states(folder / "states.npz", study.joint_probe.readout, base=folder.name)
        for folder in args.centroids
    }
    trained = pd.concat([pd.read_parquet(path) for folder in args.markers for path in sorted(folder.glob("*.parquet"))])
    longest = int(trained["n_tokens"].max())
    rule = {
        "longest_trained_completion_tokens": longest,
        "eval_max_new_tokens": params.eval.max_new_tokens,
        "holds": params.eval.max_new_tokens >= 2 * longest,
        "rule": "eval.max_new_tokens >= 2 x the longest trained completion (METHODS.md); marker tokens not counted",
    }
    with stage_run("joint_probe", {"conditions": len(args.evals)}, study=study.name):
        import mlflow

        metrics, tables = analyze_joint_probe(counts, baseline, states, study, params.stats, params.seed, rule)
        plots.write_analysis_outputs(tables, args.plots, args.figures, plots.joint_probe_figures)
        write_json(metrics, args.metrics)
        geo = metrics["geometric"]["h1"]
        numbers = {"geometric_delta": geo["delta"], "geometric_passes": float(geo["passes"])}
        for recipe, m in metrics["recipes"].items():
            if m["h1"]["delta"] is not None:
                numbers[f"{recipe}_behavioural_delta"] = m["h1"]["delta"]
            numbers[f"{recipe}_h1_joint"] = float(m["h1_joint"])
        mlflow.log_metrics(numbers)
        log_to_parent(numbers, {f"{r}_decision": d for r, d in metrics["summary"]["decisions"].items()})
    if not rule["holds"]:
        print(
            f"note: eval.max_new_tokens {rule['eval_max_new_tokens']} < 2 x the longest trained completion ({longest})"
        )
    print(json.dumps(metrics["summary"]))
    print(summary_line(metrics))


if __name__ == "__main__":
    main()
