"""Stage `markers`: one marker dataset per source of the study, from one data condition's completions.

    python stages/markers.py --condition base --completions data/completions/base \
        --out data/markers/base/ds1a2b3c4d --metrics metrics/markers/base-ds1a2b3c4d.json --tokenizer models/raw

The folder is named by the datasets' id (personaspace.study.dataset_id: negatives, model, datagen
settings, marker), so studies that train on other data write elsewhere.

Each source's file depends only on its own completions and its negatives' (named, or drawn from a
fixed pool), so files of existing sources are byte-identical when the panel grows. Every condition
whose data_from is this one (C1 and C2' for `base`) trains on these files. With
`datagen.length_matching`, each source's positives and negatives are length-matched and the
metrics hold their token-length distributions before and after (personaspace.length_matching).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import personaspace.cpu_kernels  # noqa: F401  (pins the CPU kernels before numpy and torch load: cpu_kernels.py)

import pandas as pd

from personaspace.checks import check_stage
from personaspace.config import ParamsError, load_params
from personaspace.io import atomic_path, write_json
from personaspace.marker_datasets import MarkerDatasetSpec, build_marker_dataset
from personaspace.models import load_tokenizer
from personaspace.study import data_personas
from personaspace.tracking import stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--condition", required=True)
    parser.add_argument("--completions", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, help="a model folder: its tokenizer counts cut texts (truncate)")
    args = parser.parse_args()
    params = load_params(args.params)
    check_stage(params, needs=("tracking",))  # a stage run alone (`dvc repro -s`) fails here, naming the key and fix
    dg = params.datagen
    count_tokens = None
    if dg.length_matching.method == "truncate":
        if args.tokenizer is None:
            raise ParamsError("datagen.length_matching.method truncate counts tokens: pass --tokenizer models/raw")
        tokenizer = load_tokenizer(args.tokenizer)

        def count_tokens(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    spec = MarkerDatasetSpec(
        positives=dg.positives,
        negatives_per_persona=dg.negatives_per_persona,
        pool=params.study.negatives.pool,
        k=params.study.negatives.k,
        hard=params.study.negatives.hard,
        drop_truncated=dg.drop_truncated,
        marker=params.marker,
        separator=params.marker_separator,
        study_seed=params.seed,
        length_matching=dg.length_matching.method,
        length_tolerance=dg.length_matching.tolerance,
        count_tokens=count_tokens,
    )
    sources = params.study.sources
    needed = data_personas(sources, params.study.negatives.model_dump(), params.seed)
    completions = {p: pd.read_parquet(args.completions / f"{p}.parquet") for p in needed}
    with stage_run(
        "markers",
        {"condition": args.condition, "sources": len(sources)},
        {"condition": args.condition},
        study=params.study.name,
    ):
        summaries = {}
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            for source in sources:
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
