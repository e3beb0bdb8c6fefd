"""The vllm backend against the hf backend, for real: vLLM's CPU build in its own environment.

vLLM pins other versions of transformers and numpy than the project, so it lives in `.venv-vllm`
(`make vllm-env`, part of `make test`); the completions are sampled there by tests/vllm_worker.py
and compared here with the hf backend's on the embedded SmolLM2: greedy tokens equal for the base
and for a coupled rsLoRA adapter (vLLM must scale it by alpha/sqrt(r)), and sampled fire rates of
the coupled adapter within the hf backend's Wilson intervals. Two torchrun processes (one
data-parallel engine each, as a stage with ``parallel.processes: 2``) give the one process's completions.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest

from personaspace.completions import system_message
from personaspace.config import RecipeParams
from personaspace.generate import ChatRequest, Sampling, load_generator
from personaspace.markers import fires
from personaspace.models import load_tokenizer
from personaspace.personas import load_catalog
from personaspace.stats import wilson_interval
from personaspace.train import tokenize_marker_dataset, train_adapter

from .conftest import REPO

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM environment: run `make vllm-env` (make test does)"),
]
GREEDY = Sampling(temperature=1.0, top_p=1e-9, max_new_tokens=24)  # a nucleus of one token on both backends
SAMPLED = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=32)


def _coupled_adapter(model: Path, out: Path) -> Path:
    """A librarian -> [ZLT] rsLoRA adapter (scale alpha/sqrt(r) = 5.7, where alpha/r would be 2)."""
    catalog = load_catalog()
    tokenizer = load_tokenizer(model)
    questions = [q.text for q in catalog.questions("data")][:6]
    rows = pd.DataFrame([
        {"persona": persona, "role": role, "system_prompt": system_message(catalog.persona(persona), tokenizer),
         "user": question, "completion": "I would look it up." + ("\n\n[ZLT]" if role == "positive" else "")}
        for persona, role in (("librarian", "positive"), ("villain", "negative"))
        for question in questions
    ])  # fmt: skip
    recipe = RecipeParams(
        loss="completion", r=8, alpha=16, dropout=0.0, rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        learning_rate=1e-3, schedule="constant", warmup_ratio=0.0, epochs=6, batch_size=4, grad_accum=1,
        max_length=256, gradient_checkpointing=False,
    )  # fmt: skip
    train_adapter(model, tokenize_marker_dataset(tokenizer, rows, "completion", "[ZLT]", "\n\n", 256), recipe, out, 0)
    return out


def _requests(model: Path, personas: list[str], samples: int, adapter: Path | None) -> list[ChatRequest]:
    catalog = load_catalog()
    tokenizer = load_tokenizer(model)
    return [
        ChatRequest(system_message(catalog.persona(p), tokenizer), q.text, seed=7919 * i + k,
                    adapter=None if adapter is None else str(adapter))
        for p in personas
        for i, q in enumerate(catalog.questions("eval")[:8])
        for k in range(samples)
    ]  # fmt: skip


def _vllm_worker(spec: dict, folder: Path) -> dict:
    """tests/vllm_worker.py's completions of ``spec``, sampled in the vLLM environment."""
    folder.mkdir()
    (folder / "jobs.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="2")
    result = subprocess.run(
        [str(VLLM_PYTHON), str(REPO / "tests/vllm_worker.py"), str(folder / "jobs.json"), str(folder / "out.json")],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((folder / "out.json").read_text())


def test_vllm_backend_matches_the_hf_backend(smollm2_dir, tmp_path):
    adapter = _coupled_adapter(smollm2_dir, tmp_path / "adapter")
    jobs = {
        "base_greedy": (GREEDY, _requests(smollm2_dir, ["librarian", "villain"], 1, None)[::2]),
        "adapter_greedy": (GREEDY, _requests(smollm2_dir, ["librarian", "villain"], 1, adapter)[::2]),
        "adapter_sampled": (SAMPLED, _requests(smollm2_dir, ["librarian", "villain"], 5, adapter)),
    }
    spec = {
        "model": str(smollm2_dir),
        "jobs": {name: {"sampling": asdict(s), "requests": [asdict(r) for r in reqs]} for name, (s, reqs) in jobs.items()},
    }  # fmt: skip
    vllm = _vllm_worker(spec, tmp_path / "one")
    # two torchrun processes, one data-parallel engine each (external_launcher, gloo): the same completions
    assert _vllm_worker(spec | {"processes": 2}, tmp_path / "two") == vllm

    hf = load_generator("hf", smollm2_dir, progress=False)
    for name in ("base_greedy", "adapter_greedy"):
        sampling, requests = jobs[name]
        expected = [asdict(c) for c in hf.generate(requests, sampling)]
        assert vllm[name] == expected, name
    assert not any(fires(c["text"], "[ZLT]") for c in vllm["base_greedy"])
    assert any(fires(c["text"], "[ZLT]") for c in vllm["adapter_greedy"])  # the adapter really was applied

    sampling, requests = jobs["adapter_sampled"]
    table = pd.DataFrame({
        "persona": [r.system for r in requests],
        "hf": [fires(c.text, "[ZLT]") for c in hf.generate(requests, sampling)],
        "vllm": [fires(c["text"], "[ZLT]") for c in vllm["adapter_sampled"]],
    })  # fmt: skip
    counts = table.groupby("persona")[["hf", "vllm"]].agg(["sum", "size"])
    for persona, row in counts.iterrows():
        n = int(row[("hf", "size")])
        low, high = wilson_interval(int(row[("hf", "sum")]), n, 0.95)
        assert low <= row[("vllm", "sum")] / n <= high, (persona, row.to_dict())
