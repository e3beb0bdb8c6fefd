"""Stage `steer_eval` (S4): every arm's adapters, prompted, neutral and steered, under their own persona.

    python stages/steer_eval.py --condition base --model models/raw --adapters models/adapters/base/ds1a2b3c4d \
        --steered models/steered/train_steering/base --steering data/steering/train_steering/base \
        --cells .cache/cells/steer_eval/base --out data/steer_eval/train_steering/base \
        --metrics metrics/train_steering/steer_eval_base.json

The plan is personaspace.steered_eval's; cells are sampled on the hf backend whatever
`generation.backend` says (vLLM cannot host the steering hook) and cached by content in --cells,
their key holding the steering. Writes completions.parquet (+ arm, mode, coef) and counts.parquet:
fired and n per (arm, persona, question_id, mode, coef), the table `personaspace analyze
train_steering --table` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import personaspace.cpu_kernels  # noqa: F401  (pins the CPU kernels before numpy and torch load: cpu_kernels.py)

from personaspace.analyses.train_steering import counts_from_completions
from personaspace.checks import check_stage
from personaspace.config import ParamsError, load_params
from personaspace.evaluation import CellStore, evaluate_jobs
from personaspace.fingerprints import fingerprint_dir
from personaspace.generate import Sampling, load_generator
from personaspace.io import atomic_path, in_repo_root, record_timing, write_json
from personaspace.personas import load_catalog
from personaspace.steered_eval import eval_jobs
from personaspace.steering import SteeringVectors
from personaspace.study import StudyError, check_train_steering
from personaspace.tracking import stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--condition", required=True)
    parser.add_argument("--model", type=Path, required=True, help="the condition's base model")
    parser.add_argument("--adapters", type=Path, required=True, help="the condition's ordinary adapters (arm C)")
    parser.add_argument("--steered", type=Path, required=True, help="the condition's steered arms' adapters")
    parser.add_argument("--steering", type=Path, required=True, help="the condition's steering stage output")
    parser.add_argument("--cells", type=Path, required=True, help="cell cache (kept between runs)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--timings", type=Path, default=Path("timings.json"), help="wall times (not DVC-hashed)")
    args = parser.parse_args()
    params = load_params(args.params)
    check_stage(
        params, needs=("device", "tracking")
    )  # a stage run alone (`dvc repro -s`) fails here, naming the key and fix
    study, ev, gen = params.study, params.eval, params.generation
    try:
        cfg = check_train_steering(study, params.seed)
    except StudyError as exc:
        raise ParamsError(f"study.{exc}") from exc
    if len(study.recipes) != 1 or len(params.couple.seeds) != 1:
        raise ParamsError("study.recipes, couple.seeds: S4 compares arms at one recipe and one seed; "
                          "run one experiment per value (`dvc exp run -S ...`)")  # fmt: skip
    recipe, seed = study.recipes[0], params.couple.seeds[0]
    folders = {
        (arm, source): (args.adapters if spec.vector == "none" else args.steered / arm) / recipe / source / f"seed{seed}"
        for arm, spec in cfg.arms.items()
        for source in study.sources
    }  # fmt: skip
    missing = [str(f) for f in folders.values() if not (f / "adapter_config.json").is_file()]
    if missing:
        raise ParamsError(f"no adapter at {missing[:3]} (+{max(0, len(missing) - 3)} more); "
                          "run `dvc repro couple couple_steered` first")  # fmt: skip
    base_fp = fingerprint_dir(args.model)
    adapters = {key: (f"{key[0]}/{recipe}/{key[1]}/seed{seed}", folder, f"{base_fp}:{fingerprint_dir(folder)}")
                for key, folder in folders.items()}  # fmt: skip
    jobs = eval_jobs(cfg, SteeringVectors.load(args.steering), adapters, args.condition)
    generator = load_generator("hf", args.model, batch_size=gen.batch_size, device=gen.device, dtype=gen.dtype)
    store = CellStore(in_repo_root(args.cells))
    start = time.perf_counter()
    with stage_run("steer_eval", {"condition": args.condition, "jobs": len(jobs)}, tags={"condition": args.condition},
                   study=study.name):  # fmt: skip
        completions, generated = evaluate_jobs(
            generator, load_catalog(), jobs, condition=args.condition, samples_per_question=ev.samples_per_question,
            sampling=Sampling(ev.temperature, ev.top_p, ev.max_new_tokens), user_suffix=ev.user_suffix,
            study_seed=params.seed, marker=params.marker, store=store, stage="steer_eval",
        )  # fmt: skip
        counts = counts_from_completions(completions)
        pooled = counts.groupby(["arm", "mode", "coef"], sort=True)[["fired", "n"]].sum()
        summary = {f"{a}/{m}/{c}": round(float(r.fired / r.n), 4) for (a, m, c), r in pooled.iterrows()}
        seconds = time.perf_counter() - start
        timing = {"seconds": round(seconds, 1), "generated_now": generated}
        import mlflow

        mlflow.log_metrics({"completions": len(completions), **timing})
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            completions.to_parquet(tmp / "completions.parquet", index=False)
            counts.to_parquet(tmp / "counts.parquet", index=False)
        write_json({"completions": len(completions), "pooled_rates": summary}, args.metrics)
        record_timing(args.timings, os.environ.get("DVC_STAGE", f"steer_eval@{args.condition}"), timing)
    print(json.dumps({"completions": len(completions), **timing}))


if __name__ == "__main__":
    main()
