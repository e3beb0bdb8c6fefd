"""Per-stage wall times of the last `dvc repro` / `dvc exp run`, read from MLflow's run records.

    python benchmarks/stage_times.py [--db mlflow.db] [--out benchmarks/results/default_study_cpu.json]

Every stage execution is one MLflow run nested under its invocation's parent run; this groups the
newest invocation's runs by stage (datagen@*, couple@*, ...) and reports count, total and mean
seconds, plus the eval stage's generation throughput from its logged metrics. A run starts after
the stage's imports, so what a stage costs beyond its run is `mean_gap_before_s`: the time from the
previous stage's end (same invocation) to this one's start, i.e. DVC saving the previous outputs,
the interpreter's start and the imports (a killed run's successor is left out: only finished runs
count). `seconds_first_to_last_stage` spans the invocation(s), pauses between them included.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict
from pathlib import Path

import mlflow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", type=Path, default=Path("mlflow.db"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/default_study_cpu.json"))
    parser.add_argument("--invocations", type=int, default=1, help="merge the newest N invocations (a resumed run)")
    parser.add_argument("--note", default="", help="free text stored with the result (machine load, commit)")
    args = parser.parse_args()
    mlflow.set_tracking_uri(f"sqlite:///{args.db.resolve()}")
    runs = mlflow.search_runs(experiment_names=["personaspace"], output_format="list")
    parents = sorted((r for r in runs if r.data.tags.get("stage") == "invocation"), key=lambda r: r.info.start_time)
    chosen = parents[-args.invocations :]
    ids = {p.info.run_id for p in chosen}
    # only finished runs: a killed stage's run is ended (KILLED) at the next start, so its span is not its work
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in ids and r.info.status == "FINISHED"]
    by_stage: dict[str, list[float]] = defaultdict(list)
    gaps: dict[str, list[float]] = defaultdict(list)
    previous: dict[str, int] = {}  # per invocation: when its last finished stage ended
    for run in sorted(children, key=lambda r: r.info.start_time):
        by_stage[run.data.tags["stage"]].append((run.info.end_time - run.info.start_time) / 1000)
        parent = run.data.tags["mlflow.parentRunId"]
        if parent in previous:  # not the invocation's first stage, whose gap holds DVC's own start
            gaps[run.data.tags["stage"]].append((run.info.start_time - previous[parent]) / 1000)
        previous[parent] = run.info.end_time
    first = min(r.info.start_time for r in children)
    last = max(r.info.end_time for r in children)
    result = {
        "invocations": [p.data.tags.get("command") for p in chosen],
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "seconds_first_to_last_stage": round((last - first) / 1000, 1),
        "stages": {
            stage: {"runs": len(times), "total_s": round(sum(times), 1), "mean_s": round(sum(times) / len(times), 1)}
            | ({"mean_gap_before_s": round(sum(gaps[stage]) / len(gaps[stage]), 1)} if gaps[stage] else {})
            for stage, times in sorted(by_stage.items())
        },
        "eval": {
            k: v
            for run in children
            if run.data.tags["stage"] == "eval"
            for k, v in run.data.metrics.items()
            if k in ("generated_tokens", "generated_now", "tokens_per_second", "seconds", "source_rate_mean")
        },
        "note": args.note,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
