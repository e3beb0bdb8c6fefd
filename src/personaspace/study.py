"""A study preset as a stage graph: which stage items (pretrained bases, datagen, markers, couple, eval,
analyses) its design needs.

>>> graph = stage_graph(config)                                # doctest: +SKIP
>>> sorted(graph["datagen"])[:1], sorted(graph["couple"])[:1], sorted(graph["eval"])   # doctest: +SKIP
(['base-comedian'], ['base-smol-comedian-0'], ['panel-base'])

Composition writes the graph into params.yaml (`graph: ${stage_graph:}` in conf/config.yaml) and
dvc.yaml loops over it, so a study adds items, never stages. Item keys are stable ids (condition,
persona, recipe, seed), never list positions. A condition is (pretrained base, data_from): its
coupling data comes from the datagen items of the condition named by data_from, so C2' (em,
data_from base) trains on C1's completions and nothing is generated twice.

Paths name what they hold. Marker datasets and adapters are per dataset id (``dataset_id``: the
negatives, model, datagen settings and marker they were made from): ``data/markers/<data>/<id>/``,
``models/adapters/<condition>/<id>/<recipe>/<source>/seed<N>``, registered as
``couple-<condition>-<recipe>-<source>-<id>`` (``personaspace.tracking.registered_name``). What a
study computes from them (eval, centroids, steering, analyses, report) lives under the study's
name: ``data/eval/<study>/<condition>``, ``metrics/<study>/``, ``plots/<study>/``,
``figures/<study>/``, ``results/<study>/``. So switching studies in one workspace never overwrites
another study's outputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from personaspace.seeds import stable_seed

if TYPE_CHECKING:  # config imports this module (its cross-checks call check_em_first)
    from personaspace.config import EmFirstParams, JointProbeParams, StudyParams, TrainSteeringParams

GEOMETRIC = {"panel", "joint_probe", "train_steering"}  # the analyses that read persona centroids (centroids stage)
PLAIN_EVAL = {"panel", "em_first", "joint_probe"}  # the analyses that read the eval stage (adapters x eval personas)
RAW = "raw"  # the pretrained base that is the instruct model itself (models/raw, the base stage's output)
BASELINE = "none"  # the eval item of a condition's base with no adapter: the pre-coupling false-positive baseline


def choose_negatives(source: str, pool: Sequence[str], k: int, hard: Sequence[str], study_seed: int) -> list[str]:
    """The hard set (minus the source) plus ``k`` personas drawn from the rest of the pool."""
    fixed = [p for p in hard if p != source]
    candidates = sorted(set(pool) - {source} - set(fixed))
    if k > len(candidates):
        raise ValueError(f"cannot draw {k} negatives for {source!r} from a pool of {len(candidates)}")
    rng = np.random.default_rng(stable_seed(study_seed, "negatives", source))
    drawn = rng.choice(candidates, size=k, replace=False).tolist() if k else []
    return fixed + sorted(drawn)


def negatives_of(source: str, negatives: Mapping[str, Any], study_seed: int) -> list[str]:
    """The negative personas of one source: the hard set plus k drawn from the pool (seeded by the source's name)."""
    return choose_negatives(
        source, negatives.get("pool", []), negatives.get("k", 0), negatives.get("hard", []), study_seed
    )


def data_personas(sources: Sequence[str], negatives: Mapping[str, Any], study_seed: int) -> list[str]:
    """Every persona whose completions a marker dataset needs: the sources and their negatives, sorted."""
    needed = set(sources)
    for source in sources:
        needed.update(negatives_of(source, negatives, study_seed))
    return sorted(needed)


class StudyError(ValueError):
    """The study preset cannot be analysed as S2; the message names the key."""


@dataclass(frozen=True)
class Roles:
    """Which eval personas play which role in S2."""

    sources: tuple[str, ...]
    negatives: tuple[str, ...]
    assistant: str | None
    bystanders: tuple[str, ...]

    def of(self, persona: str) -> str:
        """source, negative, assistant or bystander."""
        if persona in self.sources:
            return "source"
        if persona in self.negatives:
            return "negative"
        return "assistant" if persona == self.assistant else "bystander"


def study_roles(study: StudyParams, study_seed: int = 0) -> Roles:
    """The roles of ``study``; raises StudyError when they overlap, are not eval personas or leave no bystander.

    With a named bystander pool (``study.bystanders``, S3) the negatives are every source's, drawn
    ones included (``study_seed`` draws them), and a persona trained as a negative is refused as a
    bystander: leakage into a persona the adapter was trained to keep silent is suppression. Without
    one (S2), the negatives are ``negatives.hard`` and the bystanders the eval personas left over.
    """
    named_pool = study.bystanders is not None
    if study.negatives.k and not named_pool:
        raise StudyError(
            f"negatives.k: {study.negatives.k} random negatives cannot be named by the analysis; "
            "S2 names its negatives in negatives.hard with k: 0 (or name the bystanders in study.bystanders)"
        )
    if named_pool:
        drawn = data_personas(study.sources, study.negatives.model_dump(), study_seed)
        negatives = [p for p in drawn if p not in study.sources]
        trained = sorted(set(negatives) & set(study.bystanders or []))
        if trained:
            raise StudyError(
                f"bystanders: {trained} are trained as negatives (negatives.hard, or drawn from negatives.pool "
                "with the study seed), so their silence is suppression, not leakage; take unseen personas"
            )
        assigned = {"sources": list(study.sources), "bystanders": list(study.bystanders or [])}
    else:
        negatives = list(study.negatives.hard)
        assigned = {"sources": list(study.sources), "negatives.hard": negatives}
    if study.assistant is not None:
        assigned["assistant"] = [study.assistant]
    seen: dict[str, str] = {}
    for key, names in assigned.items():
        outside = [name for name in names if name not in study.eval_personas]
        if outside:
            raise StudyError(f"{key}: {outside} are not in eval_personas, so they have no rates; add them there")
        for name in names:
            if name in seen:
                raise StudyError(f"{key}: {name!r} is also in {seen[name]}; a persona has one role")
            seen[name] = key
    left = tuple(p for p in study.eval_personas if p not in seen)
    bystanders = tuple(study.bystanders or []) if named_pool else left
    if not bystanders:
        raise StudyError("eval_personas: no bystander is left after sources, negatives and the assistant")
    return Roles(tuple(study.sources), tuple(negatives), study.assistant, bystanders)


def check_em_first(study: StudyParams) -> tuple[Roles, EmFirstParams]:
    """The S2 analysis settings of ``study`` and its roles; raises StudyError naming the key of a contradiction."""
    if study.em_first is None:
        raise StudyError("em_first: missing; the preset needs an em_first section (contrasts, text_artifact, ...)")
    cfg = study.em_first
    if not cfg.contrasts:
        raise StudyError("em_first.contrasts: empty; name at least one contrast (e.g. H1: em - base)")
    known = list(study.conditions)
    named = [(f"em_first.contrasts.{name}.{side}", getattr(spec, side)) for name, spec in cfg.contrasts.items()
             for side in ("treatment", "control")]  # fmt: skip
    named += [(f"em_first.source_gate.{side}", getattr(cfg.source_gate, side)) for side in ("treatment", "control")]
    named.append(("em_first.kill.condition", cfg.kill.condition))
    for key, condition in named:
        if condition not in known:
            raise StudyError(f"{key}: {condition!r} is not a condition of the study ({', '.join(known)})")
    for key, contrast in (("text_artifact", cfg.text_artifact.contrast), ("source_gate", cfg.source_gate.contrast)):
        if contrast not in cfg.contrasts:
            raise StudyError(f"em_first.{key}.contrast: {contrast!r} is not a key of em_first.contrasts")
    for name, spec in cfg.contrasts.items():
        if spec.treatment == spec.control:
            raise StudyError(f"em_first.contrasts.{name}: treatment and control are both {spec.treatment!r}")
    return study_roles(study), cfg


def check_joint_probe(study: StudyParams, study_seed: int) -> tuple[Roles, JointProbeParams]:
    """The S3 analysis settings of ``study`` and its roles; raises StudyError naming the key of a contradiction."""
    if study.joint_probe is None:
        raise StudyError("joint_probe: missing; the preset needs a joint_probe section (control, treatment, ...)")
    cfg = study.joint_probe
    if study.bystanders is None:
        raise StudyError("bystanders: S3 names its bystander pool (unseen personas); list them in study.bystanders")
    for key in ("control", "treatment", "specificity"):
        if getattr(cfg, key) not in study.conditions:
            raise StudyError(
                f"joint_probe.{key}: {getattr(cfg, key)!r} is not a condition of the study ({', '.join(study.conditions)})"
            )
    if len({cfg.control, cfg.treatment, cfg.specificity}) != 3:
        raise StudyError("joint_probe: control, treatment and specificity must be three different conditions")
    return study_roles(study, study_seed), cfg


def check_train_steering(study: StudyParams, study_seed: int) -> TrainSteeringParams:
    """The S4 settings of ``study``; raises StudyError naming the key of a contradiction."""
    cfg = study.train_steering
    if cfg is None:
        raise StudyError("train_steering: missing; the preset needs a train_steering section (arms, layer, ...)")
    for key in ("primary_arm", "reference_arm", "control_arm"):
        if getattr(cfg, key) not in cfg.arms:
            raise StudyError(f"train_steering.{key}: {getattr(cfg, key)!r} is not an arm ({list(cfg.arms)})")
    for name, arm in cfg.arms.items():
        if arm.vector == "none" and arm.prompt != "persona":
            raise StudyError(
                f"train_steering.arms.{name}: an arm without a vector is the ordinary prompt-trained adapter; "
                "its prompt is `persona`"
            )
    reference, primary = cfg.arms[cfg.reference_arm], cfg.arms[cfg.primary_arm]
    if reference.vector != "none":
        raise StudyError("train_steering.reference_arm: the prompted reference is the ordinary adapter (vector: none)")
    if primary.vector == "none" or primary.prompt != "neutral":
        raise StudyError("train_steering.primary_arm: the primary arm trains on the neutral prompt with a vector")
    if cfg.arms[cfg.control_arm].vector != "iso_random":
        raise StudyError("train_steering.control_arm: the control arm steers with the iso_random vector")
    if len(study.conditions) != 1:
        raise StudyError(f"conditions: S4 trains on one condition's base, not {len(study.conditions)}")
    trained = data_personas(study.sources, study.negatives.model_dump(), study_seed)
    without = [p for p in trained if p not in study.eval_personas]
    if without:
        raise StudyError(
            f"eval_personas: {without} train (as sources or negatives) but have no centroid to steer with; "
            "add them to eval_personas or draw negatives from the sources (negatives.pool)"
        )
    return cfg


def steered_arms(study: Mapping[str, Any]) -> list[str]:
    """The arms of an S4 study that train with a vector (their adapters are the couple_steered stage's)."""
    cfg = study.get("train_steering") or {}
    return [name for name, arm in (cfg.get("arms") or {}).items() if arm.get("vector", "none") != "none"]


DATASET_KEYS = ("model", "datagen", "marker", "marker_separator")  # with study.negatives and seed: a marker dataset


def dataset_id(config: Mapping[str, Any]) -> str:
    """The id of the marker datasets a composed config trains on: a digest of everything they depend on.

    Negatives (pool, k, hard; the study seed draws them), the model whose completions they hold, the
    datagen settings (sampling and sizes) and the marker. Two studies that train on the same data share
    the id, so their adapters are one output (S4's arm C is S1's adapter); two that differ never write
    the same path or registered name (S2's librarian, trained on named negatives, is not S1's).
    """
    negatives = config["study"]["negatives"]
    spec = {
        "negatives": {"pool": sorted(negatives.get("pool", [])), "k": negatives.get("k", 0),
                      "hard": sorted(negatives.get("hard", []))},
        "seed": config["seed"],
        **{key: config[key] for key in DATASET_KEYS},
    }  # fmt: skip
    return "ds" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]


def stage_graph(config: Mapping[str, Any]) -> dict[str, Any]:
    """The stage items of a composed config's study (plain data: written into params.yaml for dvc.yaml's loops).

    Per-item outputs (marker datasets, adapters) live under their dataset id, so studies share them only
    when they are the same; a study's own outputs (eval, centroids, analyses, report) under its name.
    """
    study, pretrain, seeds, study_seed = (
        config["study"],
        config.get("pretrain", {}),
        config["couple"]["seeds"],
        config["seed"],
    )
    name, ds = study["name"], dataset_id(config)
    conditions: Mapping[str, Mapping[str, str]] = study["conditions"]
    bases = sorted({c["pretrained"] for c in conditions.values()} - {RAW})
    data_conditions = sorted({c["data_from"] for c in conditions.values()})

    def model_of(condition: str) -> str:
        return conditions[condition]["pretrained"] if condition in conditions else RAW

    personas = data_personas(study["sources"], study["negatives"], study_seed)
    analyses = set(study["analyses"])
    steering = "train_steering" in analyses
    per_condition = {c: {"condition": c, "study": name, "model": spec["pretrained"], "data": spec["data_from"],
                         "dataset": ds} for c, spec in sorted(conditions.items())}  # fmt: skip
    own = {f"{name}-{c}": item for c, item in per_condition.items()}  # a study's per-condition items
    return {
        "pretrain": {b: {"recipe": pretrain[b]["recipe"]} for b in bases if b in pretrain},
        "datagen": {
            f"{d}-{p}": {"condition": d, "model": model_of(d), "persona": p} for d in data_conditions for p in personas
        },
        "markers": {f"{d}-{ds}": {"condition": d, "dataset": ds} for d in data_conditions},
        "couple": {
            f"{c}-{r}-{s}-{seed}": dict(
                condition=c, model=spec["pretrained"], data=spec["data_from"], recipe=r, source=s, seed=seed, dataset=ds
            )
            for c, spec in sorted(conditions.items())
            for r in study["recipes"]
            for s in study["sources"]
            for seed in seeds
        },
        "couple_steered": {
            f"{c}-{r}-{s}-{seed}-{arm}": dict(
                condition=c,
                model=spec["pretrained"],
                data=spec["data_from"],
                recipe=r,
                source=s,
                seed=seed,
                arm=arm,
                dataset=ds,
                study=name,
            )
            for c, spec in sorted(conditions.items())
            for arm in steered_arms(study)
            for r in study["recipes"]
            for s in study["sources"]
            for seed in seeds
        }
        if steering
        else {},
        "eval": own if analyses & PLAIN_EVAL else {},
        "centroids": {
            f"{name}-{b}": {"base": b, "study": name} for b in sorted({s["pretrained"] for s in conditions.values()})
        }
        if analyses & GEOMETRIC
        else {},
        "regress": own if "panel" in analyses else {},
        "em_first": {"em_first": {"study": name, "conditions": sorted(conditions)}} if "em_first" in analyses else {},
        "joint_probe": {
            "joint_probe": {
                "study": name,
                "dataset": ds,
                "conditions": sorted(conditions),
                "bases": sorted({spec["pretrained"] for spec in conditions.values()}),
                "data": data_conditions,
            }
        }
        if "joint_probe" in analyses
        else {},
        # S4: per condition, the steering vectors (its base's centroids, calibrated on its data), the
        # steered and prompted evals of every arm's adapters, then the analysis
        "steering": own if steering else {},
        "steer_eval": own if steering else {},
        "train_steering": {"train_steering": {"study": name, "conditions": sorted(conditions)}} if steering else {},
        # one report per study: the completions it samples from, and the analysis outputs beside metrics/
        "report": {
            name: {
                "completions": f"data/steer_eval/{name}" if steering else f"data/eval/{name}",
                "details": f"results/{name}" if "panel" in analyses else f"plots/{name}",
            }
        },
    }


def _resolve_stage_graph(*, _root_: Any) -> Any:
    """The Hydra resolver behind ``graph: ${stage_graph:}``: the graph of the config being composed."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(_root_, resolve=False)
    for key in ("graph", "_composed"):
        plain.pop(key, None)
    config = OmegaConf.to_container(OmegaConf.create(plain), resolve=True)
    graph = stage_graph(config)
    return OmegaConf.create(graph)  # a node: OmegaConf stores no plain dict in place of an interpolation


def register_resolver() -> None:
    """Register ``stage_graph`` with OmegaConf (the Hydra plugin does, before DVC composes params.yaml)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("stage_graph", _resolve_stage_graph, replace=True)
