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

DVC deletes a stage's outputs just before running it, so these run in the first stage of the
pipeline (``check``, which depends on the whole of params.yaml), where a failure deletes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personaspace.config import ModelSpec, Params


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

    from personaspace.models import MATERIALISED_INFO, embedded_package_dir, load_tokenizer

    spec = params.model_spec
    if raw_dir is not None and (raw_dir / MATERIALISED_INFO).is_file():
        info = json.loads((raw_dir / MATERIALISED_INFO).read_text())
        if info.get("spec") == spec.model_dump():
            return ModelFacts(int(info["num_hidden_layers"]), load_tokenizer(raw_dir))
    if spec.source == "random_init":
        source = params.models[spec.tokenizer_from or ""]
        facts = _source_facts(source, embedded_package_dir, AutoConfig, AutoTokenizer)
        if facts is None:
            return None
        layers = spec.architecture.get("num_hidden_layers", AutoConfig.for_model("llama").num_hidden_layers)
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

    The schema and catalog (``load_params``), hand edits (``params_guard``), the devices and the
    model's depth and tokens. A hub model not yet downloaded leaves the model checks to the base
    stage, with a note.
    """
    from personaspace.config import ParamsError, load_params
    from personaspace.params_guard import hand_edit_report

    problems, notes = [], []
    edited = hand_edit_report(params_file)
    if edited is not None:
        problems.append(edited)
    try:
        params = load_params(params_file)
    except ParamsError as exc:
        return [*problems, str(exc)], notes
    problems += device_errors(params.generation.device)
    problems += parallel_errors(params.parallel.processes, params.generation.device)
    problems += tensor_errors(params.parallel.tensor, params.parallel.processes, params.generation.device,
                              params.generation.backend)  # fmt: skip
    problems += backend_errors(params.generation.backend)
    facts = model_facts(params, raw_dir)
    if facts is None:
        notes.append(f"model {params.model!r} is not downloaded yet: the base stage checks its depth and tokens")
    else:
        problems += model_errors(params, facts)
        notes += model_notes(params, facts)
    return problems, notes
