"""Stage `pretrain`: one pretrained base (METHODS.md C2/C3).

    python stages/pretrain.py --base em --raw models/raw --out models/em

LoRA SFT of the raw model on `pretrain.<base>.dataset` with `pretrain.<base>.recipe`, merged once
into a full model folder, so datagen, couple, eval and centroids load it like the raw model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import personaspace.cpu_kernels  # noqa: F401  (pins the CPU kernels before numpy and torch load: cpu_kernels.py)

from personaspace.checks import check_stage
from personaspace.config import ParamsError, load_params
from personaspace.distributed import finish, launch, output_path
from personaspace.fingerprints import record_fingerprint
from personaspace.io import json_text
from personaspace.pretrain import build_base, load_pretrain_rows
from personaspace.tracking import log_history, stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--base", required=True, help="a key of pretrain (em, benign)")
    parser.add_argument("--raw", type=Path, required=True, help="the raw model folder (base stage)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    check_stage(
        params, needs=("device", "tracking")
    )  # a stage run alone (`dvc repro -s`) fails here, naming the key and fix
    if args.base not in params.pretrain:
        raise ParamsError(f"--base {args.base!r} is not a key of pretrain ({sorted(params.pretrain)})")
    start = time.perf_counter()
    spec = params.pretrain[args.base]
    rows = load_pretrain_rows(spec.dataset)
    recipe = params.recipes[spec.recipe]
    run_params = {"base": args.base, "recipe": spec.recipe, "rows": len(rows), **spec.dataset.model_dump()}
    ranks = launch(params.parallel.processes, params.generation.device)  # data parallel over the GPUs
    with stage_run("pretrain", run_params, tags={"base": args.base}, study=params.study.name, ranks=ranks):
        with output_path(args.out, ranks) as tmp:
            summary = build_base(args.raw, rows, recipe, tmp, seed=spec.seed, dtype=params.model_spec.dtype)
            summary.update(base=args.base, recipe=spec.recipe)
            if ranks.main:  # the other ranks trained beside it and saved nothing
                # no wall time in the model folder: DVC hashes it, so a time would make every rebuild differ
                (tmp / "pretrain.json").write_text(json_text(record_fingerprint(tmp, summary)))
        if not ranks.main:
            return finish(ranks)
        import mlflow

        log_history(summary["history"])
        mlflow.log_metric("train_seconds", round(time.perf_counter() - start, 1))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    finish(ranks)


if __name__ == "__main__":
    main()
