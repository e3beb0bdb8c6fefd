"""S4's eval plan: which cells each arm's adapters are sampled in (personaspace.evaluation.EvalJob).

>>> vectors = SteeringVectors.load(Path("data/steering/base"))                       # doctest: +SKIP
>>> jobs = eval_jobs(cfg, vectors, adapters, condition="base")                         # doctest: +SKIP

Each adapter is sampled only under its own source persona (S4 ranks personas by their own
adapter's emission), in the modes its arm needs:

- the reference arm (C): ``prompted`` (the persona's own prompt, unsteered), and ``steered`` at
  every coefficient label with the persona's centroid at the primary layer (the earlier
  experiment's inference-time steering, replicated);
- the primary arm (A): ``neutral`` (the neutral prompt, unsteered: the kill criterion
  ``baseline_rate_driven`` reads it) and ``steered``;
- every other arm: ``steered`` with its own vector (centroid or iso-random) at its own layer.

Steered cells carry the neutral prompt. Coefficient labels (``analyses.train_steering.coef_labels``)
become numbers per persona: ``+2`` is 2.0; ``calibrated`` and ``-calibrated`` are +-c_train of that
persona's vector at that layer. All modes of one adapter share their seeds (common random numbers).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from personaspace.analyses.train_steering import UNSTEERED, coef_labels
from personaspace.config import TrainSteeringParams
from personaspace.evaluation import EvalJob
from personaspace.generate import Steering
from personaspace.steering import SteeringVectors


def coefficient(label: str, c_train: float) -> float:
    """The number behind a coefficient label for a persona whose calibrated c_train is ``c_train``."""
    if label == "calibrated":
        return c_train
    if label == "-calibrated":
        return -c_train
    return float(label)


def eval_jobs(
    cfg: TrainSteeringParams,
    vectors: SteeringVectors,
    adapters: Mapping[tuple[str, str], tuple[str, Path, str]],
    condition: str,
) -> list[EvalJob]:
    """The plan above for ``adapters``: (arm, source) -> (stable adapter id, folder, fingerprint)."""
    jobs = []
    for (arm, source), (name, path, fingerprint) in adapters.items():
        spec = cfg.arms[arm]
        common = dict(adapter=name, path=path, fingerprint=fingerprint, persona=source)
        if arm == cfg.reference_arm:
            jobs.append(EvalJob(**common, labels=(("arm", arm), ("mode", "prompted"), ("coef", UNSTEERED))))
        if arm == cfg.primary_arm:
            jobs.append(EvalJob(**common, neutral_prompt=cfg.neutral_prompt,
                                labels=(("arm", arm), ("mode", "neutral"), ("coef", UNSTEERED))))  # fmt: skip
        kind = "centroid" if spec.vector == "none" else spec.vector
        layer = cfg.layer_of(arm)
        values = tuple(float(v) for v in vectors.vector(kind, source, layer))
        for label in coef_labels(cfg):
            steering = Steering(f"{condition}/{kind}/{source}/L{layer}", layer,
                                coefficient(label, vectors.coef(source, layer)), values)  # fmt: skip
            jobs.append(EvalJob(**common, neutral_prompt=cfg.neutral_prompt, steering=steering,
                                labels=(("arm", arm), ("mode", "steered"), ("coef", label))))  # fmt: skip
    return jobs
