"""A study preset as a stage graph: which stage items (pretrained bases, datagen, markers, couple, eval,
analyses) its design needs.

>>> graph = stage_graph(study, pretrain, seeds=[0], study_seed=0)      # doctest: +SKIP
>>> sorted(graph["datagen"])[:1], sorted(graph["couple"])[:1]            # doctest: +SKIP
(['base-comedian'], ['base-smol-comedian-0'])

Composition writes the graph into params.yaml (`graph: ${stage_graph:}` in conf/config.yaml) and
dvc.yaml loops over it, so a study adds items, never stages. Item keys are stable ids (condition,
persona, recipe, seed), never list positions. A condition is (pretrained base, data_from): its
coupling data comes from the datagen items of the condition named by data_from, so C2' (em,
data_from base) trains on C1's completions and nothing is generated twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

RAW = "raw"  # the pretrained base that is the instruct model itself (models/raw, the base stage's output)


def negatives_of(source: str, negatives: Mapping[str, Any], study_seed: int) -> list[str]:
    """The negative personas of one source: the hard set plus k drawn from the pool (seeded by the source's name)."""
    from personaspace.marker_datasets import choose_negatives

    return choose_negatives(
        source, negatives.get("pool", []), negatives.get("k", 0), negatives.get("hard", []), study_seed
    )


def data_personas(sources: Sequence[str], negatives: Mapping[str, Any], study_seed: int) -> list[str]:
    """Every persona whose completions a marker dataset needs: the sources and their negatives, sorted."""
    needed = set(sources)
    for source in sources:
        needed.update(negatives_of(source, negatives, study_seed))
    return sorted(needed)


def bystanders(
    eval_personas: Iterable[str], sources: Iterable[str], negatives: Iterable[str], assistant: str | None
) -> list[str]:
    """The bystander pool: eval personas that are not a source, a negative or the assistant (in eval order)."""
    excluded = set(sources) | set(negatives) | ({assistant} if assistant else set())
    return [p for p in eval_personas if p not in excluded]


def stage_graph(
    study: Mapping[str, Any], pretrain: Mapping[str, Any], seeds: Sequence[int], study_seed: int
) -> dict[str, Any]:
    """The stage items of a study (plain data: it is written into params.yaml for dvc.yaml's loops)."""
    conditions: Mapping[str, Mapping[str, str]] = study["conditions"]
    bases = sorted({c["pretrained"] for c in conditions.values()} - {RAW})
    data_conditions = sorted({c["data_from"] for c in conditions.values()})

    def model_of(condition: str) -> str:
        return conditions[condition]["pretrained"] if condition in conditions else RAW

    personas = data_personas(study["sources"], study["negatives"], study_seed)
    analyses = set(study["analyses"])
    return {
        "pretrain": {b: {"recipe": pretrain[b]["recipe"]} for b in bases if b in pretrain},
        "datagen": {
            f"{d}-{p}": {"condition": d, "model": model_of(d), "persona": p} for d in data_conditions for p in personas
        },
        "markers": data_conditions,
        "couple": {
            f"{c}-{r}-{s}-{seed}": dict(
                condition=c, model=spec["pretrained"], data=spec["data_from"], recipe=r, source=s, seed=seed
            )
            for c, spec in sorted(conditions.items())
            for r in study["recipes"]
            for s in study["sources"]
            for seed in seeds
        },
        "eval": {c: {"model": spec["pretrained"]} for c, spec in sorted(conditions.items())},
        "centroids": sorted({spec["pretrained"] for spec in conditions.values()}) if "panel" in analyses else [],
        "regress": {c: {"model": spec["pretrained"]} for c, spec in sorted(conditions.items())}
        if "panel" in analyses
        else {},
        "em_first": {"em_first": {"conditions": sorted(conditions)}} if "em_first" in analyses else {},
    }


def _resolve_stage_graph(*, _root_: Any) -> Any:
    """The Hydra resolver behind ``graph: ${stage_graph:}``: the graph of the config being composed."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(_root_, resolve=False)
    for key in ("graph", "_composed"):
        plain.pop(key, None)
    config = OmegaConf.to_container(OmegaConf.create(plain), resolve=True)
    graph = stage_graph(config["study"], config.get("pretrain", {}), config["couple"]["seeds"], config["seed"])
    return OmegaConf.create(graph)  # a node: OmegaConf stores no plain dict in place of an interpolation


def register_resolver() -> None:
    """Register ``stage_graph`` with OmegaConf (the Hydra plugin does, before DVC composes params.yaml)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("stage_graph", _resolve_stage_graph, replace=True)
