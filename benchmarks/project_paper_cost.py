"""Project studies' paper-scale GPU time from their composed params and measured throughputs.

    python benchmarks/project_paper_cost.py --study em_first --out benchmarks/results/em_first_paper_projection.json
    python benchmarks/project_paper_cost.py --table --out benchmarks/results/paper_cost_table.json

Counts every completion and training token the stage graph implies (from `personaspace params
study=<s> scale=paper model=qwen2.5-7b-instruct`, plus `personas=<N>` for the panel) and divides by
throughputs measured on one GPU with a Qwen2.5-7B-shaped model, all from `benchmarks/gpu_7b.py`'s
results: generation (``--decoder``: ``static`` = the static decode loop the hf backend runs on a
GPU, ``hf`` = the plain loop, both batch 256) and LoRA training of recipe A1 (``--trainer``:
``packed`` = ``train_adapter`` as the stages run it, packed rows and checkpointing ``auto``;
``trl`` = TRL's defaults, padded with checkpointing, as the GPU trained before; whole passes,
model load included). Completion lengths are an assumption
(`--completion-tokens`): no Qwen answer was sampled here; the measured decode rate is for full
batches (every row runs to the limit), so batches that thin out as rows end run slower than this.
Start-up, model loads and merges are not counted. ``--table`` writes S1 at 12, 24 and 48 personas,
S2, S3 and S4, now (static decode, packed training) and before (plain loop, TRL's defaults). S3's
probes sample one answer per (base, eval persona, question) for the response readouts: counted as
generation. Its length matching cuts rows, so its training tokens are an upper bound. S4 adds
its steered arms' adapters (couple_steered) to the training and its steer_eval cells (each source's
adapters prompted, neutral and steered at every coefficient, personaspace.steered_eval) to the
generation, at the static loop's rate (the steering hook is captured in its CUDA graphs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from personaspace.analyses.train_steering import coef_labels
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
    parser.add_argument("--measured", type=Path, default=REPO / "benchmarks/results/gpu_7b_h200.json")
    parser.add_argument("--decoder", choices=["static", "hf"], default="static")
    parser.add_argument("--trainer", choices=["packed", "trl"], default="packed")
    parser.add_argument("--vllm-tok-s", type=float, default=12500.0,
                        help="vLLM output tok/s for the projected column: a published, not measured, figure "
                             "(Llama 3.1 8B bf16 on one H100, ~12,500 tok/s, morphllm.com/vllm-benchmarks, 2026)")  # fmt: skip
    parser.add_argument("--personas", type=int, help="panel size (default: the study's)")
    parser.add_argument("--table", action="store_true", help="S1 at N=12/24/48, S2, S3, S4, both decoders")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    measured = json.loads(args.measured.read_text())
    generate = measured["generate"]["paths"]
    decode = {"static": generate["personaspace_static"]["warm_median_per_s"],
              "hf": generate["personaspace_hf"]["warm_median_per_s"]}  # fmt: skip
    train = measured["train_auto_checkpointing"]["paths"]  # one run: both trainers, same rows, same process
    training = {"packed": train["auto_checkpointing"]["warm_median_per_s"],
                "trl": train["trl_defaults"]["warm_median_per_s"]}  # fmt: skip
    if not args.table:
        result = project(args, args.study, args.personas, decode[args.decoder], training[args.trainer])
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    rows = []
    for label, study, personas in (("S1, N=12", "panel", 12), ("S1, N=24", "panel", 24), ("S1, N=48", "panel", 48),
                                   ("S2 (em_first)", "em_first", None), ("S3 (joint_probe)", "joint_probe", None),
                                   ("S4 (train_steering)", "train_steering", None)):  # fmt: skip
        now = project(args, study, personas, decode["static"], training["packed"])
        before = project(args, study, personas, decode["hf"], training["trl"])
        vllm = project(args, study, personas, args.vllm_tok_s, training["packed"], steer_tok_s=decode["static"])
        rows.append({"study": label, "hours_now": now["total_hours_one_gpu"], "hours_before": before["total_hours_one_gpu"],
                     "hours_vllm_projected": vllm["total_hours_one_gpu"],
                     "hours_by_stage_now": {k: round(v["seconds"] / 3600, 2) for k, v in now["stages"].items()}})  # fmt: skip
        print(
            f"| {label} | {now['total_hours_one_gpu']} | {before['total_hours_one_gpu']} | {vllm['total_hours_one_gpu']} |"
        )
    table = {"measured": str(args.measured.relative_to(REPO)), "generation_tok_s": decode, "training_tok_s": training,
             "now": "static decode loop, packed training (checkpointing auto)",
             "before": "plain hf decode loop, TRL's defaults (padded, checkpointing)", "rows": rows,
             "vllm_projected": f"datagen and eval at {args.vllm_tok_s:.0f} tok/s, a published third-party figure for a "
                               "similar model on one H100 (see --vllm-tok-s), not measured here (vLLM's wheel does not "
                               "travel to the lent GPUs); training and S4's steered evals (hooks) as now",
             "not_counted": "the probes' and the steering stage's forwards (under a second per base at this "
                            "shape, benchmarks/results/gpu_7b_h200.json); model loads and merges"}  # fmt: skip
    args.out.write_text(json.dumps(table, indent=2) + "\n")


def project(args: argparse.Namespace, study_name: str, personas: int | None, gen_tok_s: float,
            train_tok_s: float, steer_tok_s: float | None = None) -> dict:  # fmt: skip
    """GPU-seconds per stage of one study at paper scale, from its stage graph and the throughputs.

    ``steer_tok_s``: the steered evals' rate (default ``gen_tok_s``); vLLM cannot host the steering hook,
    so its column keeps them on the static loop.
    """
    steer_tok_s = gen_tok_s if steer_tok_s is None else steer_tok_s
    with tempfile.TemporaryDirectory() as scratch:
        composed = Path(scratch) / "params.yaml"
        overrides = [f"study={study_name}", "scale=paper", "model=qwen2.5-7b-instruct"]
        overrides += [f"pretrain.{b}.dataset.repo_id=placeholder/{b}" for b in ("em", "benign")]
        overrides += [] if personas is None else [f"personas={personas}"]
        compose_params(composed, overrides, conf_dir=REPO / "conf")
        params = validate_params(yaml.safe_load(composed.read_text()))
    catalog, graph, study = load_catalog(), params.graph, params.study
    data_questions, eval_questions = len(catalog.questions("data")), len(catalog.questions("eval"))
    row = args.prompt_tokens + args.completion_tokens

    datagen = len(graph.datagen) * data_questions * params.datagen.samples_per_question
    pretrain_tokens = sum(
        (params.pretrain[b].dataset.rows or 0) * params.recipes[item["recipe"]].epochs * args.pretrain_row_tokens
        for b, item in graph.pretrain.items()
    )
    couple_tokens = 0.0
    for item in [*graph.couple.values(), *graph.couple_steered.values()]:
        recipe = params.recipes[str(item["recipe"])]
        negatives = len(study.negatives.hard) + study.negatives.k
        rows = params.datagen.positives + negatives * params.datagen.negatives_per_persona
        couple_tokens += rows * recipe.epochs * row
    adapters_per_condition = len(study.recipes) * len(study.sources) * len(params.couple.seeds) + 1  # + baseline
    evals = len(graph.eval) * adapters_per_condition * len(study.eval_personas) * eval_questions
    evals *= params.eval.samples_per_question
    responses = 0
    if {"last_response", "response_mean"} & set(params.probes.readouts):
        responses = len(graph.centroids) * len(study.eval_personas) * eval_questions  # one answer per cell
    adapters = len(graph.couple) + len(graph.couple_steered)
    steered = 0
    if graph.steer_eval and study.train_steering is not None:
        cfg = study.train_steering
        per_source = 2 + len(cfg.arms) * len(coef_labels(cfg))  # C prompted, A neutral, every arm steered
        steered = len(graph.steer_eval) * len(study.recipes) * len(study.sources) * len(params.couple.seeds)
        steered *= per_source * eval_questions * params.eval.samples_per_question
    stages = {
        "pretrain": {"tokens": pretrain_tokens, "seconds": pretrain_tokens / train_tok_s},
        "datagen": {"completions": datagen, "seconds": datagen * args.completion_tokens / gen_tok_s},
        "couple": {"adapters": adapters, "tokens": couple_tokens, "seconds": couple_tokens / train_tok_s},
        "eval": {"completions": evals, "seconds": evals * args.completion_tokens / gen_tok_s},
        "centroids": {"completions": responses, "seconds": responses * args.completion_tokens / gen_tok_s},
        "steer_eval": {"completions": steered, "seconds": steered * args.completion_tokens / steer_tok_s},
    }
    total = sum(s["seconds"] for s in stages.values())
    return {
        "study": study_name, "personas": len(params.panel), "scale": "paper", "model": params.model,
        "assumptions": {k: getattr(args, k) for k in ("completion_tokens", "prompt_tokens", "pretrain_row_tokens")},
        "throughputs": {"generation_tok_s": round(gen_tok_s), "training_tok_s": round(train_tok_s)},
        "stages": {k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in stages.items()},
        "total_hours_one_gpu": round(total / 3600, 2),
    }  # fmt: skip


if __name__ == "__main__":
    main()
