"""Stage `couple`: one coupling LoRA for (condition, recipe, source persona, seed).

    python stages/couple.py --recipe smol --seed 0 --model models/base \
        --data data/markers/base/librarian.parquet --out models/adapters/base/smol/librarian/seed0

The adapter folder holds the peft adapter and `training.json` (rows, steps, loss per step).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from personaspace.config import ParamsError, load_params
from personaspace.io import atomic_path, json_text
from personaspace.models import load_tokenizer
from personaspace.train import LoraRecipe, tokenize_marker_dataset, train_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--model", type=Path, required=True, help="the condition's base model folder")
    parser.add_argument("--data", type=Path, required=True, help="the source's marker dataset")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    if args.recipe not in params.recipes:
        raise ParamsError(f"--recipe {args.recipe!r} is not a key of recipes ({sorted(params.recipes)})")
    recipe = LoraRecipe(**params.recipes[args.recipe].model_dump())
    rows = pd.read_parquet(args.data)
    tokenizer = load_tokenizer(args.model)
    dataset = tokenize_marker_dataset(
        tokenizer, rows, recipe.loss, params.marker, params.marker_separator, recipe.max_length
    )
    start = time.perf_counter()
    with atomic_path(args.out) as tmp:
        summary = train_adapter(args.model, dataset, recipe, tmp, seed=args.seed)
        summary.update(
            recipe=args.recipe,
            seed=args.seed,
            source=str(rows["source"].iloc[0]),
            condition=str(rows["condition"].iloc[0]),
            seconds=round(time.perf_counter() - start, 1),
            positives=int((rows["role"] == "positive").sum()),
            negatives=int((rows["role"] == "negative").sum()),
        )
        (tmp / "training.json").write_text(json_text(summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))


if __name__ == "__main__":
    main()
