"""Stage `couple`: one coupling LoRA for (condition, recipe, source persona, seed).

    python stages/couple.py --recipe smol --seed 0 --model models/raw --condition base \
        --data data/markers/base/librarian.parquet --out models/adapters/base/smol/librarian/seed0

The adapter folder holds the peft adapter and `training.json` (rows, steps, loss per step). The run
goes to MLflow (recipe, loss curve) and the adapter is registered as `couple-<condition>-<recipe>-<source>`
with alias `seed<N>`, loadable as `models:/couple-base-smol-librarian@seed0`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from personaspace.config import ParamsError, load_params
from personaspace.distributed import finish, launch, output_path
from personaspace.io import json_text
from personaspace.models import load_tokenizer
from personaspace.tracking import log_history, register_adapter, stage_run
from personaspace.train import tokenize_marker_dataset, train_adapter


def registered_name(condition: str, recipe: str, source: str) -> str:
    """The model-registry name of a coupling adapter (one version per seed, aliased seed<N>)."""
    return f"couple-{condition}-{recipe}-{source}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--model", type=Path, required=True, help="the condition's pretrained base")
    parser.add_argument("--condition", required=True, help="the condition the adapter belongs to")
    parser.add_argument("--data", type=Path, required=True, help="the source's marker dataset")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    if args.recipe not in params.recipes:
        raise ParamsError(f"--recipe {args.recipe!r} is not a key of recipes ({sorted(params.recipes)})")
    ranks = launch(params.parallel.processes, params.generation.device)  # data parallel over the GPUs
    recipe = params.recipes[args.recipe]
    rows = pd.read_parquet(args.data)
    tokenizer = load_tokenizer(args.model)
    dataset = tokenize_marker_dataset(
        tokenizer, rows, recipe.label_loss, params.marker, params.marker_separator, recipe.max_length,
        unlikelihood=recipe.loss == "unlikelihood",
    )  # fmt: skip
    source, condition, data = str(rows["source"].iloc[0]), args.condition, str(rows["condition"].iloc[0])
    run_params = {"recipe": args.recipe, "seed": args.seed, "source": source, "condition": condition, "data": data,
                  **{f"recipe.{k}": v for k, v in params.recipes[args.recipe].model_dump().items()}}  # fmt: skip
    tags = {"persona": source, "condition": condition, "recipe": args.recipe, "seed": str(args.seed)}
    with stage_run("couple", run_params, tags=tags, study=params.study.name, ranks=ranks):
        start = time.perf_counter()
        with output_path(args.out, ranks) as tmp:
            summary = train_adapter(args.model, dataset, recipe, tmp, seed=args.seed)
            summary.update(
                recipe=args.recipe, seed=args.seed, source=source, condition=condition, data_from=data,
                positives=int((rows["role"] == "positive").sum()), negatives=int((rows["role"] == "negative").sum()),
            )  # fmt: skip
            if ranks.main:  # the other ranks trained beside it and saved nothing
                # no wall time in the adapter folder: DVC hashes it, so a time would make every retrain differ
                (tmp / "training.json").write_text(json_text(summary))
        if not ranks.main:
            return finish(ranks)
        import mlflow

        log_history(summary["history"])
        mlflow.log_metric("train_seconds", round(time.perf_counter() - start, 1))
        version = register_adapter(
            args.out, base_model=str(args.model), name=registered_name(condition, args.recipe, source),
            alias=f"seed{args.seed}", tags=tags,
        )  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if k != "history"} | {"registered_version": version}))
    finish(ranks)


if __name__ == "__main__":
    main()
