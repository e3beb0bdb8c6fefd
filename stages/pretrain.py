"""Stage `pretrain`: the base model of one condition.

    python stages/pretrain.py --condition em --raw models/raw --out models/em

`base` is the raw model (hard links, nothing trained); any other condition is LoRA SFT of the raw
model on `pretrain.<condition>.dataset` with `pretrain.<condition>.recipe`, merged once into a full
model folder, so couple, eval and centroids load it like any base.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from personaspace.config import ParamsError, load_params
from personaspace.io import atomic_path, json_text
from personaspace.pretrain import build_condition, link_model, load_pretrain_rows
from personaspace.tracking import log_history, stage_run
from personaspace.train import LoraRecipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--condition", required=True)
    parser.add_argument("--raw", type=Path, required=True, help="the raw model folder (base stage)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    if args.condition != "base" and args.condition not in params.pretrain:
        raise ParamsError(f"--condition {args.condition!r} is neither base nor a key of pretrain")
    start = time.perf_counter()
    if args.condition == "base":
        with atomic_path(args.out) as tmp:
            link_model(args.raw, tmp)
        print(f"base = {args.raw} (hard links) -> {args.out}")
        return
    spec = params.pretrain[args.condition]
    rows = load_pretrain_rows(spec.dataset)
    recipe = LoraRecipe(**params.recipes[spec.recipe].model_dump())
    run_params = {"condition": args.condition, "recipe": spec.recipe, "rows": len(rows), **spec.dataset.model_dump()}
    with stage_run("pretrain", run_params, tags={"condition": args.condition}):
        import mlflow

        with atomic_path(args.out) as tmp:
            summary = build_condition(args.raw, rows, recipe, tmp, seed=spec.seed, dtype=params.model_spec.dtype)
            summary.update(condition=args.condition, recipe=spec.recipe)
            # no wall time in the model folder: DVC hashes it, so a time would make every rebuild differ
            (tmp / "pretrain.json").write_text(json_text(summary))
        log_history(summary["history"])
        mlflow.log_metric("train_seconds", round(time.perf_counter() - start, 1))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))


if __name__ == "__main__":
    main()
