"""Stage `report`: the study's report, written from its metrics files, completions and params.

    python stages/report.py --completions data/eval/panel --out reports/panel

Writes `report.md` and `report.html` (self-contained: figures embedded) into `--out`, atomically,
and logs both to the stage's MLflow run and to the invocation's parent run. Reads only what
personaspace.report lists: the study's metrics files, its conditions' completions (under
`--completions`), its figures, dvc.lock (the inputs' hashes), git, the installed packages, the
machine. Wall times (from the MLflow database) go beside it in MLflow as `report/wall_times.md`, never
into the folder DVC hashes, so identical runs write identical reports.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import personaspace.cpu_kernels  # noqa: F401  (pins the CPU kernels before numpy and torch load: cpu_kernels.py)

import pandas as pd
import yaml

from personaspace.checks import check_stage
from personaspace.config import ParamsError, load_params
from personaspace.io import atomic_path
from personaspace.report import ReportInputs, compose, metrics_files
from personaspace.report.card import (
    command_overrides,
    git_state,
    hardware,
    input_hashes,
    package_versions,
    reproduce_command,
    stage_names,
    stage_seconds,
    study_params_yaml,
)
from personaspace.report.render import to_html
from personaspace.tracking import log_artifacts_to_parent, stage_run, tracking_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--completions", type=Path, required=True, help="data/<eval stage>/<study>: its conditions' outputs"
    )
    parser.add_argument("--out", type=Path, required=True, help="reports/<study>")
    args = parser.parse_args()
    check_stage(load_params(args.params), needs=("tracking",))  # validates; the report reads the params as plain data
    params = yaml.safe_load(args.params.read_text())
    root = Path.cwd()
    files = metrics_files(params)
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise ParamsError(f"the study's analyses have not written {missing}; run `dvc repro` first")
    metrics = {f: json.loads((root / f).read_text()) for f in files}  # json: NaN stays a number
    # data/<stage>/<study>/<condition>: the conditions are that stage's graph items (eval, or S4's steer_eval)
    stage = args.completions.parent.name
    conditions = sorted(item["condition"] for item in params["graph"].get(stage, {}).values())
    if not conditions:
        raise ParamsError(f"--completions {args.completions}: no stage `{stage}` runs in this study")
    folders = [args.completions / c for c in conditions]
    absent = [str(f) for f in folders if not (f / "completions.parquet").is_file()]
    if absent:
        raise ParamsError(f"no completions in {absent}; run `dvc repro` first")
    completions = pd.concat([pd.read_parquet(f / "completions.parquet") for f in folders], ignore_index=True)
    study = params["study"]["name"]
    with stage_run("report", {"study": study, "conditions": len(folders)}, study=study) as run:
        import mlflow

        overrides, exact = command_overrides(params, root)
        git = git_state(root, params_from_command=exact)
        lock = yaml.safe_load((root / "dvc.lock").read_text()) if (root / "dvc.lock").is_file() else {}
        pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
        stages = [s for s in stage_names(pipeline, params) if not s.startswith("report@")]
        card = {
            "git": git,
            "hardware": hardware(),
            "packages": package_versions(),
            "inputs": input_hashes(lock, [*files, *map(str, folders)]),
            "command": reproduce_command(params, git["commit"], overrides),
            "params_yaml": study_params_yaml(params),
        }
        text = compose(ReportInputs(params, metrics, completions, card, root=root, report_dir=args.out))
        html = to_html(text, base=root / args.out, title=f"personaspace report: {study}")
        with atomic_path(args.out) as tmp:
            tmp.mkdir(parents=True)
            (tmp / "report.md").write_text(text)
            (tmp / "report.html").write_text(html)
        written = [args.out / "report.md", args.out / "report.html"]
        if run is not None:
            # wall times differ on every run: beside the report in MLflow, never in the DVC-hashed folder
            times = stage_seconds(tracking_uri(), study, stages)
            table = "| stage | wall time |\n|---|---|\n" + "".join(f"| `{k}` | {v} |\n" for k, v in times.items())
            with tempfile.TemporaryDirectory() as scratch:
                wall = Path(scratch) / "wall_times.md"
                wall.write_text(f"# Wall times: {study}\n\n{table}")
                for path in [*written, wall]:
                    mlflow.log_artifact(str(path), "report")
                log_artifacts_to_parent([*written, wall], "report")
    print(f"wrote {written[0]} and {written[1]}")


if __name__ == "__main__":
    main()
