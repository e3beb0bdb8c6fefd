"""S4's eval plan: the modes each arm is sampled in, with which vector, layer and coefficient."""

from pathlib import Path

import numpy as np
import pytest

from personaspace.steered_eval import coefficient, eval_jobs
from personaspace.steering import SteeringVectors

from .test_train_steering_analysis import _cfg


def _vectors() -> SteeringVectors:
    personas, layers = ("chef", "librarian"), (21, 11)
    centroid = np.arange(2 * 2 * 3, dtype=float).reshape(2, 2, 3)
    return SteeringVectors(personas, layers, {"centroid": centroid, "iso_random": -centroid,
                                              "coef": np.array([[1.5, 0.5], [2.5, 0.25]])})  # fmt: skip


def test_each_arm_is_sampled_in_the_modes_it_needs_with_its_vector_layer_and_coefficient():
    cfg = _cfg()
    adapters = {(arm, "librarian"): (f"{arm}/smol/librarian/seed0", Path(f"/a/{arm}"), f"fp-{arm}") for arm in cfg.arms}
    jobs = eval_jobs(cfg, _vectors(), adapters, "base")
    modes = {}
    for job in jobs:
        labels = dict(job.labels)
        modes.setdefault(labels["arm"], []).append((labels["mode"], labels["coef"]))
        assert job.persona == "librarian" and job.adapter == f"{labels['arm']}/smol/librarian/seed0"
        assert (job.neutral_prompt is None) == (labels["mode"] == "prompted")
        assert (job.steering is None) == (labels["mode"] != "steered")
    steered = [("steered", c) for c in ("+2", "calibrated", "-calibrated")]
    assert modes == {"A": [("neutral", "0"), *steered], "B": steered, "C": [("prompted", "0"), *steered],
                     "iso_random": steered, "layer_contrast": steered}  # fmt: skip
    by = {(dict(j.labels)["arm"], dict(j.labels)["coef"]): j.steering for j in jobs if j.steering}
    assert by[("A", "calibrated")].coef == 2.5 and by[("A", "-calibrated")].coef == -2.5 and by[("A", "+2")].coef == 2.0
    assert by[("A", "+2")].vector == (6.0, 7.0, 8.0) and by[("A", "+2")].vector_id == "base/centroid/librarian/L21"
    assert by[("C", "+2")].vector_id == "base/centroid/librarian/L21"  # the ordinary adapter, steered (replication)
    assert by[("iso_random", "+2")].vector == (-6.0, -7.0, -8.0)
    contrast = by[("layer_contrast", "calibrated")]
    assert (contrast.layer, contrast.coef, contrast.vector) == (11, 0.25, (9.0, 10.0, 11.0))


def test_coefficient_labels_become_numbers():
    assert (coefficient("+2", 0.7), coefficient("calibrated", 0.7), coefficient("-calibrated", 0.7)) == (2.0, 0.7, -0.7)
    with pytest.raises(ValueError):
        coefficient("two", 0.7)
