"""Stage `eval`: every coupling adapter of one condition under every eval persona, plus the baseline.

    python stages/eval.py --condition base --model models/raw --adapters models/adapters/base/ds1a2b3c4d \
        --cells .cache/cells/eval/base --out data/eval/panel/base --metrics metrics/panel/eval_base.json

K completions per (adapter, eval persona, eval question) with params' `eval` sampling; adapter
`none` is the pre-coupling false-positive baseline (the condition's base, same protocol). Cells are
cached by content in --cells (a folder DVC never touches, under the repo root), so growing the
panel samples only new cells and a killed run resumes, under `dvc repro` and `dvc exp run` alike. Writes completions.parquet (one row per completion, every id) and
rates.parquet (source x eval persona: fired, n, rate, Wilson interval), and the summary metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import personaspace.cpu_kernels  # noqa: F401  (pins the CPU kernels before numpy and torch load: cpu_kernels.py)

import pandas as pd

from personaspace.checks import check_stage
from personaspace.config import ParamsError, load_params
from personaspace.distributed import finish, launch
from personaspace.evaluation import (
    BASELINE,
    CellStore,
    evaluate_cells,
    rate_matrix,
    summarise,
)
from personaspace.fingerprints import fingerprint_dir
from personaspace.generate import Sampling, load_generator
from personaspace.io import atomic_path, in_repo_root, record_timing, write_json
from personaspace.personas import load_catalog
from personaspace.tracking import log_to_parent, stage_run

HEADLINE = ("source_rate_mean", "bystander_rate_mean", "baseline_rate")  # also on the invocation's parent run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--condition", required=True)
    parser.add_argument("--model", type=Path, required=True, help="the condition's base model")
    parser.add_argument("--adapters", type=Path, required=True, help="the condition's adapter folder")
    parser.add_argument("--cells", type=Path, required=True, help="cell cache (kept between runs)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--timings", type=Path, default=Path("timings.json"), help="wall times (not DVC-hashed)")
    args = parser.parse_args()
    params = load_params(args.params)
    check_stage(
        params, needs=("device", "backend", "tracking")
    )  # a stage run alone (`dvc repro -s`) fails here, naming the key and fix
    ev, study = params.eval, params.study
    adapters = {
        f"{recipe}/{source}/seed{seed}": (source, seed, args.adapters / recipe / source / f"seed{seed}")
        for recipe in study.recipes
        for source in study.sources
        for seed in params.couple.seeds
    }
    missing = [str(path) for _, _, path in adapters.values() if not (path / "adapter_config.json").is_file()]
    if missing:
        raise ParamsError(
            f"no adapter at {missing[:3]} (+{max(0, len(missing) - 3)} more); run `dvc repro couple` first"
        )
    catalog = load_catalog()
    sampling = Sampling(ev.temperature, ev.top_p, ev.max_new_tokens)
    gen = params.generation
    # hf: batches dealt to the GPUs; vllm: an engine per parallel.tensor GPUs; gathered on every rank
    ranks = launch(params.parallel.processes, gen.device)
    # every rank holds the cells; rank 0 alone writes them
    store = CellStore(in_repo_root(args.cells), write=ranks.main)
    generator = load_generator(
        gen.backend,
        args.model,
        batch_size=gen.batch_size,
        device=gen.device,
        dtype=gen.dtype,
        ranks=ranks,
        loras=[path for _, _, path in adapters.values()],
        tensor_parallel=params.parallel.tensor,
    )
    base_fp = fingerprint_dir(args.model)
    jobs = {BASELINE: (None, base_fp)} | {
        name: (path, f"{base_fp}:{fingerprint_dir(path)}") for name, (_, _, path) in adapters.items()
    }
    done_before = set(store.load()["cell_key"])
    start = time.perf_counter()
    run_params = {"condition": args.condition, "recipes": ",".join(study.recipes), "personas": len(study.eval_personas),
                  **ev.model_dump()}  # fmt: skip
    with stage_run("eval", run_params, tags={"condition": args.condition}, study=params.study.name, ranks=ranks):
        completions, generated = evaluate_cells(
            generator, catalog, study.eval_personas, jobs, condition=args.condition,
            samples_per_question=ev.samples_per_question, sampling=sampling, user_suffix=ev.user_suffix,
            study_seed=params.seed, marker=params.marker, store=store,
        )  # fmt: skip
        if not ranks.main:
            return finish(ranks)
        ids = {name: (source, seed) for name, (source, seed, _) in adapters.items()}
        completions.insert(3, "source", completions["adapter"].map(lambda a: ids.get(a, (None, None))[0]))
        seeds = completions["adapter"].map(lambda a: ids.get(a, (None, None))[1])
        completions.insert(4, "train_seed", pd.array(seeds, dtype="Int64"))
        rates = rate_matrix(completions, params.stats.ci_level)
        rates.insert(1, "source", rates["adapter"].map({name: source for name, (source, _, _) in adapters.items()}))
        seconds = time.perf_counter() - start
        new_tokens = int(completions.loc[~completions["cell_key"].isin(done_before), "n_tokens"].sum())
        summary = summarise(rates) | {"completions": len(completions)}
        # facts of this run, not of the params (wall time; how many cells the cache lacked): MLflow and
        # the timings file, never the DVC-hashed metrics, so a warm-cache rerun writes the same metrics
        timing = {
            "seconds": round(seconds, 1), "tokens_per_second": round(new_tokens / seconds, 1),
            "generated_now": generated, "generated_tokens": new_tokens,
        }  # fmt: skip
        import mlflow

        numbers = {k: v for k, v in summary.items() if isinstance(v, int | float) and v is not None}
        mlflow.log_metrics(numbers | timing)
        log_to_parent({k: numbers[k] for k in HEADLINE if k in numbers}, {})
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            completions.to_parquet(tmp / "completions.parquet", index=False)
            rates.to_parquet(tmp / "rates.parquet", index=False)
        write_json(summary, args.metrics)
        record_timing(args.timings, os.environ.get("DVC_STAGE", f"eval@{args.condition}"), timing)
    print(json.dumps({k: v for k, v in summary.items() if k != "source_rates"} | timing))
    finish(ranks)


if __name__ == "__main__":
    main()
