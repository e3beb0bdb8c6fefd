"""Checks of params.yaml against the world, run by the `check` stage before any other stage.

>>> from personaspace.checks import check_params
>>> problems, notes = check_params(Path("params.yaml"), raw_dir=Path("models/raw"))  # doctest: +SKIP

``load_params`` (every stage's start) checks params.yaml on its own: keys, types, ranges, the
persona catalog. What it cannot know needs the model, the machine or conf/:

- the model's depth: a layer index (``regress.primary_layer``) beyond it cannot be read;
- the marker's length in the model's tokens: an eval budget shorter than the marker (or than a
  trained-length completion plus its marker) can never fire;
- the devices: ``generation.device`` must exist on this machine, with a GPU per ``parallel.processes`` rank
  and per ``parallel.tensor`` shard (vllm backend), the processes a whole number of engines;
- the backend: ``generation.backend: vllm`` needs vLLM installed here;
- hand edits: params.yaml must still match the digest its composition recorded
  (``params_guard``), since ``dvc exp run`` recomposes params.yaml and would discard an edit.

- the tracking database: ``mlflow.db`` must open, read whole and take a write (not locked, not corrupt);
- the run's length: a projected duration for this device (``projection``); on a CPU a projection
  over ``LONG_RUN_HOURS`` is refused unless ``PERSONASPACE_CONFIRM_LONG_RUN=1`` is set.

DVC deletes a stage's outputs just before running it, so these run in the first stage of the
pipeline (``check``, which depends on the whole of params.yaml), where a failure deletes nothing.
`dvc repro -s <stage>` skips ``check``: each model stage calls ``check_stage`` right after loading
its params, so an unusable device, backend or database stops it with the key and the fix before
anything heavy (its outputs are already deleted then, but still in DVC's cache: ``dvc checkout``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personaspace.config import ModelSpec, Params, ParamsError


@dataclass(frozen=True)
class ModelFacts:
    """What the checks need to know about the model params name."""

    num_hidden_layers: int
    tokenizer: Any


def model_facts(params: Params, raw_dir: Path | None = None) -> ModelFacts | None:
    """Depth and tokenizer of the model params name, read as cheaply as possible; None if unknown here.

    A materialised ``raw_dir`` of the same spec is read first (fast); otherwise the spec's own
    source: a random_init model's architecture (and its tokenizer_from model's tokenizer), the
    embedded GGUF's header, or a hub model already in the local cache. A hub model that is not
    downloaded yet cannot be checked before the base stage downloads it: None.
    """
    from transformers import AutoConfig, AutoTokenizer

    from personaspace.models import MATERIALISED_INFO, embedded_package_dir, load_tokenizer, spec_record

    spec = params.model_spec
    if raw_dir is not None and (raw_dir / MATERIALISED_INFO).is_file():
        info = json.loads((raw_dir / MATERIALISED_INFO).read_text())
        if info.get("spec") == spec_record(spec):
            return ModelFacts(int(info["num_hidden_layers"]), load_tokenizer(raw_dir))
    if spec.source == "random_init":
        layers = spec.architecture.get("num_hidden_layers", AutoConfig.for_model(spec.model_type).num_hidden_layers)
        if spec.tokenizer is not None:  # built offline (Qwen2.5's ids)
            from personaspace.models import offline_tokenizer

            return ModelFacts(int(layers), offline_tokenizer(spec.tokenizer))
        source = params.models[spec.tokenizer_from or ""]
        facts = _source_facts(source, embedded_package_dir, AutoConfig, AutoTokenizer)
        if facts is None:
            return None
        return ModelFacts(int(layers), facts.tokenizer)
    return _source_facts(spec, embedded_package_dir, AutoConfig, AutoTokenizer)


def _source_facts(spec: ModelSpec, package_dir: Any, auto_config: Any, auto_tokenizer: Any) -> ModelFacts | None:
    if spec.source == "embedded":
        folder, name = package_dir(spec.package or ""), spec.gguf_file
        config = auto_config.from_pretrained(folder, gguf_file=name)
        return ModelFacts(config.num_hidden_layers, auto_tokenizer.from_pretrained(folder, gguf_file=name))
    if spec.source == "hub":
        try:
            config = auto_config.from_pretrained(spec.repo_id, revision=spec.revision, local_files_only=True)
            tokenizer = auto_tokenizer.from_pretrained(spec.repo_id, revision=spec.revision, local_files_only=True)
        except OSError:
            return None
        return ModelFacts(config.num_hidden_layers, tokenizer)
    return None


def model_errors(params: Params, facts: ModelFacts) -> list[str]:
    """Values that validate but cannot work with this model: layers past its depth, budgets below the marker."""
    errors = []
    depth = facts.num_hidden_layers
    if params.regress.primary_layer > depth:
        errors.append(
            f"regress.primary_layer: {params.regress.primary_layer} is beyond the model's {depth} blocks "
            f"(hidden-state indices 0..{depth}: 0 = embeddings, k = output of block k); pick one of those"
        )
    marker_tokens = len(facts.tokenizer(params.marker_separator + params.marker, add_special_tokens=False)["input_ids"])
    if params.eval.max_new_tokens < marker_tokens:
        errors.append(
            f"eval.max_new_tokens: {params.eval.max_new_tokens} is shorter than the marker itself "
            f"({marker_tokens} tokens with its separator), so it could never fire; raise it"
        )
    return errors


def model_notes(params: Params, facts: ModelFacts) -> list[str]:
    """Settings that run but may bias a rate: an eval budget that can cut the marker off the longest answers."""
    marker_tokens = len(facts.tokenizer(params.marker_separator + params.marker, add_special_tokens=False)["input_ids"])
    needed = params.datagen.max_new_tokens + marker_tokens
    if marker_tokens <= params.eval.max_new_tokens < needed:
        return [
            f"eval.max_new_tokens: {params.eval.max_new_tokens} cannot hold a trained-length completion "
            f"(datagen.max_new_tokens = {params.datagen.max_new_tokens}) plus its marker ({marker_tokens} tokens): "
            f"eval completions that long lose their marker (they count as not firing); {needed} would hold them"
        ]
    return []


def device_errors(device: str) -> list[str]:
    """generation.device must exist here: ``cuda:N`` needs N visible GPUs."""
    import torch

    if device in ("auto", "cpu"):
        return []
    count = torch.cuda.device_count()
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        seen = f"{count} GPU(s) visible" if count else "no GPU visible"
        return [f"generation.device: {device!r} does not exist on this machine ({seen}); use auto or cpu"]
    return []


def parallel_errors(processes: int | str, device: str) -> list[str]:
    """parallel.processes must fit generation.device: one rank per GPU, and a pinned GPU takes one rank."""
    import torch

    if processes == "auto" or processes == 1:
        return []
    if device.startswith("cuda:"):
        return [
            f"parallel.processes: {processes} ranks cannot share generation.device {device!r} (one GPU); "
            "set generation.device to cuda (or auto) or parallel.processes to 1"
        ]
    count = torch.cuda.device_count()
    if (device == "cuda" or (device == "auto" and count)) and int(processes) > count:
        return [
            f"parallel.processes: {processes} ranks need {processes} GPUs, {count} visible; "
            "use auto (one per GPU) or fewer"
        ]
    return []


def tensor_errors(tensor: int, processes: int | str, device: str, backend: str) -> list[str]:
    """parallel.tensor is the vllm backend's: its GPUs must exist and split the processes into whole engines."""
    import torch

    from personaspace.distributed import processes_for

    if tensor == 1:
        return []
    if backend != "vllm":
        return [
            f"parallel.tensor: {tensor} is the vllm backend's tensor parallelism; the {backend} backend runs a whole "
            "model per rank: set parallel.tensor to 1 or generation.backend to vllm"
        ]
    count = torch.cuda.device_count()
    if tensor > count:
        return [f"parallel.tensor: {tensor} GPUs per engine, {count} visible; use at most {count}"]
    world = processes_for(processes, device)
    if world > 1 and world % tensor:
        return [
            f"parallel.tensor: {tensor} does not divide parallel.processes ({world} ranks) into whole engines; "
            f"use a multiple of {tensor} processes (or auto)"
        ]
    return []


def backend_errors(backend: str) -> list[str]:
    """generation.backend must be importable here: vllm is an optional extra."""
    import importlib.util

    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        return [
            "generation.backend: vllm needs vLLM, which is not installed in this environment; "
            "`pip install personaspace[gpu]` on a GPU machine, or use hf"
        ]
    return []


def check_params(params_file: Path, raw_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """Every check that needs no stage: (problems, notes). Problems name the key and the fix.

    The schema and catalog (``load_params``), hand edits (``params_guard``), the devices, the backend,
    the tracking database, the projected duration (a note; refused over ``LONG_RUN_HOURS`` on a CPU)
    and the model's depth and tokens. A hub model not yet downloaded leaves the model checks to the
    base stage, with a note.
    """
    import yaml

    from personaspace.config import load_params
    from personaspace.params_guard import hand_edit_report

    problems, notes = [], []
    edited = hand_edit_report(params_file)
    if edited is not None:
        problems.append(edited)
    try:
        params = load_params(params_file)
    except ParamsError as exc:
        return [*problems, str(exc)], notes
    except yaml.YAMLError as exc:  # hand_edit_report names it with its fix; else say it here
        return problems or [f"{params_file} is not valid YAML ({exc}); restore it with `git checkout`"], notes
    problems += stage_problems(params, STAGE_NEEDS)
    projected = projection(params)
    notes.append(projected.summary())
    problems += long_run_errors(params, projected)
    facts = model_facts(params, raw_dir)
    if facts is None:
        notes.append(f"model {params.model!r} is not downloaded yet: the base stage checks its depth and tokens")
    else:
        problems += model_errors(params, facts)
        notes += model_notes(params, facts)
    return problems, notes


STAGE_NEEDS = ("device", "backend", "tracking")


class StageCheckError(ParamsError):
    """A stage cannot run on this machine with these params; the message names each key and its fix."""


def tracking_errors() -> list[str]:
    """The MLflow database every stage logs to must open now (``personaspace.tracking.store_problem``)."""
    from personaspace.tracking import store_problem

    problem = store_problem()
    return [f"MLflow tracking database: {problem}"] if problem else []


def stage_problems(params: Params, needs: Sequence[str] = STAGE_NEEDS) -> list[str]:
    """The problems of the checks in ``needs``: device (with parallel and tensor), backend, tracking."""
    unknown = sorted(set(needs) - set(STAGE_NEEDS))
    if unknown:
        raise ValueError(f"needs: {unknown} are not checks; choose from {list(STAGE_NEEDS)}")
    device, processes = params.generation.device, params.parallel.processes
    problems = []
    if "device" in needs:
        problems += device_errors(device)
        problems += parallel_errors(processes, device)
        problems += tensor_errors(params.parallel.tensor, processes, device, params.generation.backend)
    if "backend" in needs:
        problems += backend_errors(params.generation.backend)
    if "tracking" in needs and int(os.environ.get("RANK", "0")) == 0:  # one rank of a torchrun stage opens it
        problems += tracking_errors()
    return problems


def check_stage(params: Params, needs: Sequence[str] = STAGE_NEEDS, stage: str | None = None) -> None:
    """Raise ``StageCheckError`` when this stage cannot run here: the checks of ``needs`` that concern it.

    For every model stage, right after loading its params (``dvc repro -s <stage>`` skips ``check``):
    it fails in seconds, before a model loads or an MLflow run opens. DVC has already deleted the
    stage's outputs by then; they are still in its cache, which the message says how to restore.
    """
    problems = stage_problems(params, needs)
    if problems:
        name = stage or os.environ.get("DVC_STAGE") or "this stage"
        lines = [f"{name} cannot run here:", *(f"  - {p}" for p in problems)]
        lines.append(
            "Fix the above, then rerun. DVC removed this stage's outputs before running it; "
            f"`dvc checkout {name if name != 'this stage' else '<stage>'}` restores them from its cache meanwhile."
        )
        raise StageCheckError("\n".join(lines))


# The projection's basis: the default study (panel, 12 personas, laptop scale, SmolLM2-135M-Instruct),
# `dvc repro` alone on a 2-core CPU (benchmarks/results/default_study_cpu.json, stages' total seconds),
# and the work each stage did there (token budgets: completions x max_new_tokens; training rows x
# epochs x datagen.max_new_tokens); pretrain from em_first at laptop scale (em_first_laptop_cpu.json:
# 77.3 s per base of 320 rows x 1 epoch). tests/test_guards.py checks these against the files.
CPU_BASIS = {
    "datagen": (293.5, 12 * 40 * 1 * 64),  # 12 personas x 40 data questions x 1 sample x 64 tokens
    "eval": (810.5, 13 * 12 * 20 * 1 * 128),  # 13 adapters (12 + baseline) x 12 personas x 20 questions x K 1 x 128
    "couple": (812.9, 12 * 48 * 2 * 64),  # 12 adapters x (24 + 2 x 12) rows x 2 epochs x 64 tokens
    "centroids": (44.5, 1 * 12 * 20),  # 1 base x 12 personas x 20 eval prompts (forwards)
    "pretrain": (77.3, 320 * 1),  # rows x epochs
    "base": (54.2, 1),
}
CPU_BASIS_MODEL = "smollm2-135m-instruct"
LONG_RUN_HOURS = 8.0
CONFIRM_ENV = "PERSONASPACE_CONFIRM_LONG_RUN"


@dataclass(frozen=True)
class Projection:
    """Projected seconds per stage of the whole study, from scratch, on ``device`` (cpu or cuda)."""

    device: str
    seconds: dict[str, float]
    model: str

    @property
    def hours(self) -> float:
        return sum(self.seconds.values()) / 3600

    def summary(self) -> str:
        """One line: the total, the largest stages and the basis."""
        if self.device != "cpu":
            return (
                "projected duration: a GPU here; the CPU projection does not apply (measured GPU figures: "
                "benchmarks/results/paper_cost_table.json)"
            )
        parts = ", ".join(f"{k} {_duration(v)}" for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1])[:4])
        size = "" if self.model == CPU_BASIS_MODEL else f"; measured with {CPU_BASIS_MODEL}, {self.model} may differ"
        return (
            f"projected duration on this CPU: about {_duration(self.hours * 3600)} for the whole study from scratch "
            f"({parts}; stages DVC has cached do not rerun). Basis: the default study's stage times on a 2-core CPU "
            "(benchmarks/results/default_study_cpu.json), each stage scaled by its token budget (completions x "
            "max_new_tokens; training rows x epochs x datagen.max_new_tokens), so answers are assumed to fill "
            f"their budget as laptop's do: rough, within a few times where they run otherwise{size}"
        )


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def _device_kind(device: str) -> str:
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return "cuda"


def projection(params: Params) -> Projection:
    """The whole study's duration on this machine's device, each stage's measured CPU time scaled by its work."""
    from personaspace.personas import load_catalog

    catalog, graph, study = load_catalog(), params.graph, params.study
    data_q, eval_q = len(catalog.questions("data")), len(catalog.questions("eval"))
    gen, ev = params.datagen, params.eval
    adapters = len(study.recipes) * len(study.sources) * len(params.couple.seeds) + 1  # + the baseline
    eval_budget = len(graph.eval) * adapters * len(study.eval_personas) * eval_q * ev.samples_per_question
    eval_budget *= ev.max_new_tokens
    if graph.steer_eval and study.train_steering is not None:
        from personaspace.analyses.train_steering import coef_labels

        cfg = study.train_steering
        per_source = 2 + len(cfg.arms) * len(coef_labels(cfg))  # prompted, neutral, every arm at every coefficient
        steered = len(graph.steer_eval) * len(study.recipes) * len(study.sources) * len(params.couple.seeds)
        eval_budget += steered * per_source * eval_q * ev.samples_per_question * ev.max_new_tokens
    prompts = len(graph.centroids) * len(study.eval_personas) * eval_q
    if {"last_response", "response_mean"} & set(params.probes.readouts):
        eval_budget += prompts * ev.max_new_tokens  # one sampled answer per (base, persona, question)
    rows = gen.positives + (len(study.negatives.hard) + study.negatives.k) * gen.negatives_per_persona
    couple = sum(
        rows * params.recipes[str(item["recipe"])].epochs * gen.max_new_tokens
        for item in [*graph.couple.values(), *graph.couple_steered.values()]
    )
    pretrain = 0.0
    for base in graph.pretrain:
        spec = params.pretrain[base]
        count = spec.dataset.rows or (_lines(Path(spec.dataset.path)) if spec.dataset.path else 0)
        pretrain += count * params.recipes[spec.recipe].epochs
    work = {
        "datagen": len(graph.datagen) * data_q * gen.samples_per_question * gen.max_new_tokens,
        "eval": eval_budget,
        "couple": couple,
        "centroids": prompts,
        "pretrain": pretrain,
        "base": 1,
    }
    seconds = {k: CPU_BASIS[k][0] * v / CPU_BASIS[k][1] for k, v in work.items() if v}
    return Projection(_device_kind(params.generation.device), seconds, params.model)


def _lines(path: Path) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def long_run_errors(params: Params, projected: Projection) -> list[str]:
    """On a CPU, a projection over ``LONG_RUN_HOURS`` needs ``PERSONASPACE_CONFIRM_LONG_RUN=1``."""
    if projected.device != "cpu" or projected.hours <= LONG_RUN_HOURS or os.environ.get(CONFIRM_ENV) == "1":
        return []
    return [
        f"scale: {params.scale!r} (study {params.study.name}, {params.personas} personas, model {params.model}) "
        f"projects to about {_duration(projected.hours * 3600)} on this CPU, more than {LONG_RUN_HOURS:g} h "
        f"(the basis is in the note above). Run it on a GPU (generation.device: auto picks one), choose a smaller "
        f"scale (`-S scale=laptop`), or confirm the long run: `{CONFIRM_ENV}=1 dvc repro` (or `dvc exp run`)"
    ]
