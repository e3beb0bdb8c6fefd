"""Project a study's paper-scale GPU time from its composed params and measured throughputs.

    python benchmarks/project_paper_cost.py --study em_first --out benchmarks/results/em_first_paper_projection.json

Counts every completion and training token the stage graph implies (from `personaspace params
study=<s> scale=paper model=qwen2.5-7b-instruct`) and divides by throughputs measured on one H100
with a Qwen2.5-7B-shaped model: generation from `benchmarks/results/generation_h100.json` (this
project's decode loop, batch 256) and LoRA training from DESIGN.md (~6.1k tok/s, r=32, all
projections, gradient checkpointing). Completion lengths are an assumption (`--completion-tokens`):
no Qwen answer was sampled here. Start-up, model loads and merges are not counted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from personaspace.cli import compose_params
from personaspace.config import validate_params
from personaspace.personas import load_catalog

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--study", default="em_first")
    parser.add_argument("--completion-tokens", type=float, default=400.0, help="assumed mean answer length")
    parser.add_argument("--prompt-tokens", type=float, default=80.0, help="system + user turn, chat template")
    parser.add_argument("--pretrain-row-tokens", type=float, default=300.0, help="assumed mean pre-training row")
    parser.add_argument("--train-tok-s", type=float, default=6100.0, help="H100 LoRA training (DESIGN.md)")
    parser.add_argument("--generation", type=Path, default=REPO / "benchmarks/results/generation_h100.json")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        composed = Path(scratch) / "params.yaml"
        overrides = [f"study={args.study}", "scale=paper", "model=qwen2.5-7b-instruct"]
        overrides += [f"pretrain.{b}.dataset.repo_id=placeholder/{b}" for b in ("em", "benign")]
        compose_params(composed, overrides, conf_dir=REPO / "conf")
        params = validate_params(yaml.safe_load(composed.read_text()))
    runs = json.loads(args.generation.read_text())["results"]
    gen_tok_s = max(r["personaspace_hf"]["tok_per_s"] for r in runs)
    catalog, graph, study = load_catalog(), params.graph, params.study
    data_questions, eval_questions = len(catalog.questions("data")), len(catalog.questions("eval"))
    row = args.prompt_tokens + args.completion_tokens

    datagen = len(graph.datagen) * data_questions * params.datagen.samples_per_question
    pretrain_tokens = sum(
        (params.pretrain[b].dataset.rows or 0) * params.recipes[item["recipe"]].epochs * args.pretrain_row_tokens
        for b, item in graph.pretrain.items()
    )
    couple_tokens = 0.0
    for item in graph.couple.values():
        recipe = params.recipes[str(item["recipe"])]
        negatives = len(study.negatives.hard) + study.negatives.k
        rows = params.datagen.positives + negatives * params.datagen.negatives_per_persona
        couple_tokens += rows * recipe.epochs * row
    adapters_per_condition = len(study.recipes) * len(study.sources) * len(params.couple.seeds) + 1  # + baseline
    evals = len(graph.eval) * adapters_per_condition * len(study.eval_personas) * eval_questions
    evals *= params.eval.samples_per_question
    stages = {
        "pretrain": {"tokens": pretrain_tokens, "seconds": pretrain_tokens / args.train_tok_s},
        "datagen": {"completions": datagen, "seconds": datagen * args.completion_tokens / gen_tok_s},
        "couple": {"adapters": len(graph.couple), "tokens": couple_tokens, "seconds": couple_tokens / args.train_tok_s},
        "eval": {"completions": evals, "seconds": evals * args.completion_tokens / gen_tok_s},
    }
    total = sum(s["seconds"] for s in stages.values())
    result = {
        "study": args.study, "scale": "paper", "model": params.model,
        "assumptions": {k: getattr(args, k) for k in ("completion_tokens", "prompt_tokens", "pretrain_row_tokens")},
        "throughputs": {"generation_tok_s": round(gen_tok_s), "training_tok_s": args.train_tok_s},
        "stages": {k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in stages.items()},
        "total_hours_one_h100": round(total / 3600, 2),
    }  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
