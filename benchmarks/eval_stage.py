"""The eval stage alone, every cell sampled afresh, on the models of a finished default run.

    python benchmarks/eval_stage.py --run . --out benchmarks/results/eval_stage_cpu.json

Runs `stages/eval.py` on `--run`'s `models/raw` and `models/adapters/base` with an empty cell cache,
scratch outputs and a scratch MLflow database (the run's own files are only read), and records the
wall time, the stage's metrics (tokens/s, fire rates) and, when `--compare` names the run's
completions table, how many completions came out token-identical to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from personaspace.io import write_json

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, default=Path("."), help="a repo where `dvc repro` has finished")
    parser.add_argument("--condition", default="base")
    parser.add_argument("--compare", type=Path, help="a completions.parquet to compare texts with")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eval_stage_cpu.json"))
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    run, c = args.run.resolve(), args.condition
    model = yaml.safe_load((run / "params.yaml").read_text())["study"]["conditions"][c]["pretrained"]
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}")
        command = [
            sys.executable, str(REPO / "stages" / "eval.py"), "--params", str(run / "params.yaml"), "--condition", c,
            "--model", str(run / "models" / model), "--adapters", str(run / "models" / "adapters" / c),
            "--cells", str(tmp / "cells"), "--out", str(tmp / "eval"), "--metrics", str(tmp / "metrics.json"),
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, cwd=run, env=env, check=True)
        wall = time.perf_counter() - start
        metrics = json.loads((tmp / "metrics.json").read_text())
        result = {
            "benchmark": "eval_stage", "machine": platform.machine(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "run": str(run), "wall_s": round(wall, 1), "metrics": metrics, "note": args.note,
        }  # fmt: skip
        if args.compare:
            ours = pd.read_parquet(tmp / "eval" / "completions.parquet")
            theirs = pd.read_parquet(args.compare)
            keys = ["adapter", "persona", "question_id", "sample_idx"]
            both = ours.merge(theirs, on=keys, suffixes=("", "_ref"))
            result["identical_texts"] = {"same": int((both["text"] == both["text_ref"]).sum()), "of": len(both)}
    write_json(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}))


if __name__ == "__main__":
    main()
