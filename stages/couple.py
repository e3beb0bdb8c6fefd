"""Stage `couple`: one coupling LoRA for (condition, recipe, source persona, seed).

    python stages/couple.py --recipe smol --seed 0 --model models/raw --condition base --dataset ds1a2b3c4d \
        --data data/markers/base/ds1a2b3c4d/librarian.parquet --out models/adapters/base/ds1a2b3c4d/smol/librarian/seed0

The adapter folder holds the peft adapter and `training.json` (rows, steps, loss per step). The run
goes to MLflow (recipe, loss curve) and the adapter is registered as
`couple-<condition>-<recipe>-<source>-<dataset>` with alias `seed<N>`, loadable as
`models:/couple-base-smol-librarian-ds1a2b3c4d@seed0`. The dataset id (personaspace.study.dataset_id)
names what the adapter was trained on, so two studies' different adapters never share a name.

S4's steered arms (stage `couple_steered`) add `--arm A --steering data/steering/base`: every row
trains with its persona's vector of the arm (centroid or iso-random, at the arm's layer, times
its calibrated c_train) added to the residual stream, under the arm's prompt (neutral or the
persona's own); registered as `couple-<condition>-<recipe>-<source>-<dataset>-<arm>`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import personaspace.cpu_kernels  # noqa: F401  (pins the CPU kernels before numpy and torch load: cpu_kernels.py)

import pandas as pd

from personaspace.checks import check_stage
from personaspace.config import Params, ParamsError, load_params
from personaspace.distributed import finish, launch, output_path
from personaspace.fingerprints import record_fingerprint
from personaspace.io import json_text
from personaspace.models import load_tokenizer
from personaspace.steering import SteeringVectors, TrainingSteering
from personaspace.tracking import log_history, register_adapter, registered_name, stage_run
from personaspace.train import tokenize_marker_dataset, train_adapter


def arm_steering(params: Params, arm: str, folder: Path) -> tuple[TrainingSteering, str | None]:
    """The training steering of an S4 arm from its condition's `steering` stage output, and its system prompt."""
    cfg = params.study.train_steering  # validated with the params (personaspace.study.check_train_steering)
    if cfg is None:
        raise ParamsError(f"--arm {arm!r}: study {params.study.name!r} has no train_steering section")
    if arm not in cfg.arms or cfg.arms[arm].vector == "none":
        raise ParamsError(f"--arm {arm!r} is not a steered arm of study.train_steering.arms ({list(cfg.arms)})")
    spec = cfg.arms[arm]
    layer = cfg.layer_of(arm)
    vectors = SteeringVectors.load(folder)
    try:
        scaled = vectors.scaled(spec.vector, layer)  # c_train x v, per persona
    except ValueError as err:
        raise ParamsError(f"{folder}: {err}") from err
    system = cfg.neutral_prompt if spec.prompt == "neutral" else None
    return TrainingSteering(layer=layer, personas=vectors.personas, vectors=scaled), system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--model", type=Path, required=True, help="the condition's pretrained base")
    parser.add_argument("--condition", required=True, help="the condition the adapter belongs to")
    parser.add_argument("--data", type=Path, required=True, help="the source's marker dataset")
    parser.add_argument("--dataset", required=True, help="the marker dataset's id (graph.couple.<item>.dataset)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arm", default=None, help="S4: a steered arm of study.train_steering.arms")
    parser.add_argument("--steering", type=Path, default=None, help="S4: the condition's steering stage output")
    args = parser.parse_args()
    params = load_params(args.params)
    check_stage(
        params, needs=("device", "tracking")
    )  # a stage run alone (`dvc repro -s`) fails here, naming the key and fix
    if args.recipe not in params.recipes:
        raise ParamsError(f"--recipe {args.recipe!r} is not a key of recipes ({sorted(params.recipes)})")
    ranks = launch(params.parallel.processes, params.generation.device)  # data parallel over the GPUs
    if (args.arm is None) != (args.steering is None):
        raise ParamsError("--arm and --steering go together (an S4 steered arm and its steering stage output)")
    steering, system = arm_steering(params, args.arm, args.steering) if args.arm else (None, None)
    recipe = params.recipes[args.recipe]
    rows = pd.read_parquet(args.data)
    tokenizer = load_tokenizer(args.model)
    dataset = tokenize_marker_dataset(
        tokenizer, rows, recipe.label_loss, params.marker, params.marker_separator, recipe.max_length,
        unlikelihood=recipe.loss == "unlikelihood", steering=steering, system_prompt=system,
    )  # fmt: skip
    source, condition, data = str(rows["source"].iloc[0]), args.condition, str(rows["condition"].iloc[0])
    run_params = {"recipe": args.recipe, "seed": args.seed, "source": source, "condition": condition, "data": data,
                  **{f"recipe.{k}": v for k, v in params.recipes[args.recipe].model_dump().items()}}  # fmt: skip
    tags = {"persona": source, "condition": condition, "recipe": args.recipe, "seed": str(args.seed),
            "dataset": args.dataset}  # fmt: skip
    if args.arm:
        run_params |= {"arm": args.arm, "steering_layer": steering.layer, "prompt": "neutral" if system else "persona"}
        tags["arm"] = args.arm
    with stage_run("couple", run_params, tags=tags, study=params.study.name, ranks=ranks):
        start = time.perf_counter()
        with output_path(args.out, ranks) as tmp:
            summary = train_adapter(args.model, dataset, recipe, tmp, seed=args.seed, steering=steering)
            summary.update(
                recipe=args.recipe, seed=args.seed, source=source, condition=condition, data_from=data,
                positives=int((rows["role"] == "positive").sum()), negatives=int((rows["role"] == "negative").sum()),
            )  # fmt: skip
            if args.arm:
                summary.update(arm=args.arm, steering_layer=steering.layer, system_prompt=system)
            if ranks.main:  # the other ranks trained beside it and saved nothing
                # no wall time in the adapter folder: DVC hashes it, so a time would make every retrain differ
                (tmp / "training.json").write_text(json_text(record_fingerprint(tmp, summary)))
        if not ranks.main:
            return finish(ranks)
        import mlflow

        log_history(summary["history"])
        mlflow.log_metric("train_seconds", round(time.perf_counter() - start, 1))
        version = register_adapter(
            args.out, base_model=str(args.model), name=registered_name(condition, args.recipe, source, args.dataset, args.arm),
            alias=f"seed{args.seed}", tags=tags,
        )  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if k != "history"} | {"registered_version": version}))
    finish(ranks)


if __name__ == "__main__":
    main()
