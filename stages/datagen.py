"""Stage `datagen`: on-policy completions of the data questions under one persona.

    python stages/datagen.py --condition base --persona librarian \
        --model models/raw --out data/completions/base/librarian.parquet

`--condition` names the data condition (seeds derive from it); `--model` is its pretrained base.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import personaspace.cpu_kernels  # noqa: F401  (pins the CPU kernels before numpy and torch load: cpu_kernels.py)

from personaspace.checks import check_stage
from personaspace.completions import sample_persona_completions
from personaspace.config import Params, load_params
from personaspace.distributed import Ranks, finish, launch
from personaspace.generate import Sampling, load_generator
from personaspace.io import write_parquet
from personaspace.personas import Catalog, load_catalog
from personaspace.tracking import stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--condition", required=True)
    parser.add_argument("--persona", required=True)
    parser.add_argument("--model", type=Path, required=True, help="the data condition's pretrained base")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    check_stage(
        params, needs=("device", "backend", "tracking")
    )  # a stage run alone (`dvc repro -s`) fails here, naming the key and fix
    catalog = load_catalog()
    catalog.persona(args.persona)
    dg = params.datagen
    run_params = {"condition": args.condition, "persona": args.persona, **dg.model_dump()}
    gen = params.generation  # hf: batches dealt to the GPUs; vllm: an engine per parallel.tensor GPUs
    ranks = launch(params.parallel.processes, gen.device)
    tags = {"persona": args.persona, "condition": args.condition}
    with stage_run("datagen", run_params, tags=tags, study=params.study.name, ranks=ranks):
        _sample(params, catalog, args, ranks)
    finish(ranks)


def _sample(params: Params, catalog: Catalog, args: argparse.Namespace, ranks: Ranks) -> None:
    gen = params.generation
    generator = load_generator(
        gen.backend, args.model, batch_size=gen.batch_size, device=gen.device, dtype=gen.dtype, ranks=ranks,
        tensor_parallel=params.parallel.tensor,
    )  # fmt: skip
    dg = params.datagen
    table = sample_persona_completions(
        generator,
        generator.tokenizer,
        catalog,
        args.persona,
        bank="data",
        samples_per_question=dg.samples_per_question,
        sampling=Sampling(dg.temperature, dg.top_p, dg.max_new_tokens),
        user_suffix=dg.user_suffix,
        study_seed=params.seed,
        condition=args.condition,
        marker=params.marker,
    )
    if not ranks.main:  # every rank holds the whole table; rank 0 writes it
        return
    import mlflow

    write_parquet(table, args.out)
    stopped = (table["finish_reason"] == "stop").mean()
    mlflow.log_metrics({"completions": len(table), "tokens": int(table["n_tokens"].sum()), "stopped": float(stopped)})
    print(
        f"{args.persona}: {len(table)} completions, {table['n_tokens'].sum()} tokens, {stopped:.0%} ended on their own"
    )


if __name__ == "__main__":
    main()
