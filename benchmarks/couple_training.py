"""One coupling LoRA's training, timed per optimizer step, on a finished run's marker datasets.

    python benchmarks/couple_training.py --sources comedian,librarian --label HEAD \
        --out benchmarks/results/couple_training_cpu.json

Calls `personaspace.train.train_adapter` (the couple stage's training, without MLflow) with the
the study's (first) recipe in `--params` on `data/markers/<condition>/<source>.parquet`, into a scratch
folder, and appends one record per source under `--label` to `--out`: wall seconds, seconds per
step and the loss per step. Only the public `train_adapter` is used, so the same script measures
an older commit (check it out, run with another `--label`) for a before/after comparison.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
from transformers import TrainerCallback

from personaspace.config import load_params
from personaspace.io import write_json
from personaspace.models import load_tokenizer
from personaspace.train import tokenize_marker_dataset, train_adapter


class StepTimer(TrainerCallback):
    """Seconds of each optimizer step (forward, backward, optimizer), from Trainer's step events."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.seconds.append(time.perf_counter() - self._start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--condition", default="base")
    parser.add_argument("--sources", default="comedian", help="comma-separated source personas")
    parser.add_argument("--label", required=True, help="what is measured, e.g. a commit id")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/couple_training_cpu.json"))
    args = parser.parse_args()
    params = load_params(args.params)
    name = params.study.recipes[0]
    recipe = params.recipes[name]
    model = Path("models") / params.study.conditions[args.condition].pretrained
    tokenizer = load_tokenizer(model)
    records = []
    for source in args.sources.split(","):
        rows = pd.read_parquet(Path("data/markers") / args.condition / f"{source}.parquet")
        dataset = tokenize_marker_dataset(
            tokenizer, rows, recipe.label_loss, params.marker, params.marker_separator, recipe.max_length
        )
        timer = StepTimer()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            summary = train_adapter(model, dataset, recipe, Path(scratch) / "adapter", seed=0, callbacks=[timer])
        records.append({
            "source": source, "recipe": name, "rows": summary["rows"], "steps": summary["steps"],
            "tokens": sum(map(len, dataset["input_ids"])),
            "seconds": round(time.perf_counter() - start, 1),
            "step_seconds": [round(s, 2) for s in timer.seconds],
            "loss": [round(h["loss"], 4) for h in summary["history"]],
        })  # fmt: skip
        print(json.dumps(records[-1]))
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results["runs"].append(
        {"label": args.label, "commit": commit, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
         "records": records}
    )  # fmt: skip
    write_json(results, args.out)


if __name__ == "__main__":
    main()
