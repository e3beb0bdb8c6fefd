"""Project studies' paper-scale GPU time from their composed params and throughputs measured on one GPU.

    python benchmarks/project_paper_cost.py --study em_first --out benchmarks/results/em_first_paper_projection.json
    python benchmarks/project_paper_cost.py --table --out benchmarks/results/paper_cost_table.json

Counts every completion and training token the stage graph implies (from `personaspace params
study=<s> scale=paper model=qwen2.5-7b-instruct`, plus `personas=<N>` for the panel), divides by
throughputs measured with a Qwen2.5-7B-shaped model on one H200, and adds what each stage process
costs beyond its work (start-up, imports, the model load, DVC's bookkeeping) times the number of
stage processes the graph runs.

Measured in the pipeline (``--pipeline``, S1 run through `dvc repro` on the H200,
benchmarks/results/s1_rehearsal_h200.json): the generation rate of the eval stage (13 adapters
merged in turn into the static decode loop, 240 completions each; used for datagen and eval), and
each stage's fixed cost = its rehearsal run + the gap before it - its work at the measured rate.
From the microbenchmark (``--measured``, benchmarks/gpu_7b.py): the training rate of recipe A1 at
full rows (the rehearsal's 3-step couple stages are too short to time the training alone; their
~5 s of training agree with it). Completion lengths are an assumption (`--completion-tokens`): no
Qwen answer was sampled here. ``--table`` writes S1 at 12, 24 and 48 personas, S2, S3 and S4, plus
a column with datagen and eval at a published vLLM figure (projected, not measured). S3's probes
sample one answer per (base, eval persona, question): counted as generation; its length matching
cuts rows, so its training tokens are an upper bound. S4 adds its steered arms' adapters
(couple_steered) to the training and its steer_eval cells to the generation (the steering hook is
captured in the static loop's CUDA graphs). Pre-training was not rehearsed: its stages take the
couple stage's fixed cost; the centroids stages take datagen's (a model load and forwards).
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
    parser.add_argument("--pipeline", type=Path, default=REPO / "benchmarks/results/s1_rehearsal_h200.json")
    parser.add_argument("--vllm-tok-s", type=float, default=12500.0,
                        help="vLLM output tok/s for the projected column: a published, not measured, figure "
                             "(Llama 3.1 8B bf16 on one H100, ~12,500 tok/s, morphllm.com/vllm-benchmarks, 2026)")  # fmt: skip
    parser.add_argument("--personas", type=int, help="panel size (default: the study's)")
    parser.add_argument("--table", action="store_true", help="S1 at N=12/24/48, S2, S3, S4, both decoders")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    measured = json.loads(args.measured.read_text())
    pipeline = json.loads(args.pipeline.read_text())
    train = measured["train_auto_checkpointing"]["paths"]["auto_checkpointing"]["warm_median_per_s"]
    gen, fixed = pipeline_rates(pipeline)
    if not args.table:
        result = project(args, args.study, args.personas, gen, train, fixed)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    rows = []
    for label, study, personas in (("S1, N=12", "panel", 12), ("S1, N=24", "panel", 24), ("S1, N=48", "panel", 48),
                                   ("S2 (em_first)", "em_first", None), ("S3 (joint_probe)", "joint_probe", None),
                                   ("S4 (train_steering)", "train_steering", None)):  # fmt: skip
        now = project(args, study, personas, gen, train, fixed)
        vllm = project(args, study, personas, args.vllm_tok_s, train, fixed, steer_tok_s=gen)
        rows.append({"study": label, "hours": now["total_hours_one_gpu"], "hours_work": now["work_hours"],
                     "hours_fixed": now["fixed_hours"], "stage_processes": now["stage_processes"],
                     "hours_vllm_projected": vllm["total_hours_one_gpu"],
                     "hours_by_stage": {k: round(v["seconds"] / 3600, 2) for k, v in now["stages"].items()}})  # fmt: skip
        print(f"| {label} | {now['total_hours_one_gpu']} | {now['work_hours']} | {now['fixed_hours']} | "
              f"{vllm['total_hours_one_gpu']} |")  # fmt: skip
    table = {"pipeline": str(args.pipeline.relative_to(REPO)), "measured": str(args.measured.relative_to(REPO)),
             "generation_tok_s": round(gen), "training_tok_s": round(train), "fixed_s_per_stage_process": fixed,
             "rows": rows,
             "vllm_projected": f"datagen and eval at {args.vllm_tok_s:.0f} tok/s, a published third-party figure for a "
                               "similar model on one H100 (see --vllm-tok-s), not measured here; training, fixed "
                               "costs and S4's steered evals (hooks) as measured",
             "not_counted": "the analysis stages (markers, regress, report, the S2-S4 analyses: ~0.5-1 min each in "
                            "the rehearsal); the probes' and the steering stage's forwards"}  # fmt: skip
    args.out.write_text(json.dumps(table, indent=2) + "\n")


def pipeline_rates(pipeline: dict) -> tuple[float, dict[str, float]]:
    """(generation tok/s, fixed seconds per stage process) from a rehearsal run through DVC.

    A stage's fixed cost is what its process took beyond its work: the MLflow run plus the gap before
    it (the previous stage's DVC bookkeeping, start-up, imports), less the work measured inside it.
    """
    gen = pipeline["eval_stage"]["tokens_per_second"]
    stages = pipeline["stage_times"]
    work = {"datagen": pipeline["datagen_generate_s_mean"], "couple": pipeline["couple_train_runtime_s_mean"],
            "eval": pipeline["eval_stage"]["seconds"]}  # fmt: skip
    fixed = {s: round(stages[s]["mean_s"] + stages[s]["mean_gap_before_s"] - work[s], 1) for s in work}
    return gen, fixed


def project(args: argparse.Namespace, study_name: str, personas: int | None, gen_tok_s: float,
            train_tok_s: float, fixed: dict[str, float], steer_tok_s: float | None = None) -> dict:  # fmt: skip
    """GPU-seconds per stage of one study at paper scale: its stage graph's tokens at the throughputs, plus
    ``fixed`` seconds (per stage kind) for each stage process.

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
    processes = {"pretrain": (len(graph.pretrain), "couple"), "datagen": (len(graph.datagen), "datagen"),
                 "couple": (adapters, "couple"), "eval": (len(graph.eval), "eval"),
                 "centroids": (len(graph.centroids), "datagen"), "steer_eval": (len(graph.steer_eval), "eval")}  # fmt: skip
    work = {
        "pretrain": {"tokens": pretrain_tokens, "work_s": pretrain_tokens / train_tok_s},
        "datagen": {"completions": datagen, "work_s": datagen * args.completion_tokens / gen_tok_s},
        "couple": {"adapters": adapters, "tokens": couple_tokens, "work_s": couple_tokens / train_tok_s},
        "eval": {"completions": evals, "work_s": evals * args.completion_tokens / gen_tok_s},
        "centroids": {"completions": responses, "work_s": responses * args.completion_tokens / gen_tok_s},
        "steer_eval": {"completions": steered, "work_s": steered * args.completion_tokens / steer_tok_s},
    }
    stages = {}
    for name, entry in work.items():
        count, kind = processes[name]
        stages[name] = {**entry, "processes": count, "fixed_s": count * fixed[kind]}
        stages[name]["seconds"] = entry["work_s"] + stages[name]["fixed_s"]
    total = sum(s["seconds"] for s in stages.values())
    work_total = sum(s["work_s"] for s in stages.values())
    return {
        "study": study_name, "personas": len(params.panel), "scale": "paper", "model": params.model,
        "assumptions": {k: getattr(args, k) for k in ("completion_tokens", "prompt_tokens", "pretrain_row_tokens")},
        "throughputs": {"generation_tok_s": round(gen_tok_s), "training_tok_s": round(train_tok_s)},
        "stages": {k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in stages.items()},
        "total_hours_one_gpu": round(total / 3600, 2),
        "work_hours": round(work_total / 3600, 2),
        "fixed_hours": round((total - work_total) / 3600, 2),
        "stage_processes": sum(s["processes"] for s in stages.values()),
    }  # fmt: skip


if __name__ == "__main__":
    main()
