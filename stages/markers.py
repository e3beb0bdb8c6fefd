"""Stage `markers`: one marker dataset per source persona of the panel, for one condition.

    python stages/markers.py --condition base --completions data/completions/base \
        --out data/markers/base --metrics metrics/markers_base.json

Each source's file depends only on its own completions and its negatives' (drawn from the fixed
pool in params), so files of existing sources are byte-identical when the panel grows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from personaspace.config import load_params
from personaspace.io import atomic_path, write_json
from personaspace.marker_datasets import MarkerDatasetSpec, build_marker_dataset
from personaspace.tracking import stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--condition", required=True)
    parser.add_argument("--completions", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    dg = params.datagen
    spec = MarkerDatasetSpec(
        positives=dg.positives,
        negatives_per_persona=dg.negatives_per_persona,
        pool=dg.negatives.pool,
        k=dg.negatives.k,
        hard=dg.negatives.hard,
        drop_truncated=dg.drop_truncated,
        marker=params.marker,
        separator=params.marker_separator,
        study_seed=params.seed,
    )
    completions = {p: pd.read_parquet(args.completions / f"{p}.parquet") for p in params.panel}
    with stage_run(
        "markers", {"condition": args.condition, "personas": len(params.panel)}, {"condition": args.condition}
    ):
        summaries = {}
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            for source in params.panel:
                dataset, summary = build_marker_dataset(source, completions, spec, args.condition)
                dataset.to_parquet(tmp / f"{source}.parquet", index=False)
                summaries[source] = summary
        all_rows = pd.concat(completions.values())
        metrics = {
            "condition": args.condition,
            "datagen_completions": len(all_rows),
            "truncated_fraction": float((all_rows["finish_reason"] != "stop").mean()),
            "median_tokens": float(all_rows["n_tokens"].median()),
            "base_fire_rate": float(all_rows["fired"].mean()),
            "sources": summaries,
        }
        write_json(metrics, args.metrics)
    print(f"{len(summaries)} marker datasets in {args.out}")


if __name__ == "__main__":
    main()
