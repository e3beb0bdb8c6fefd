"""Runs in the vLLM environment for tests/test_vllm_backend.py: completions of JSON jobs on one engine.

    .venv-vllm/bin/python tests/vllm_worker.py JOBS.json OUT.json

JOBS: {"model": dir, "processes": N (optional, default 1), "jobs": {name: {"sampling": {...}, "requests": [{...}]}}}.
With N processes the worker re-runs itself under torchrun (``personaspace.distributed.launch``, gloo),
one data-parallel vLLM engine per process, as a stage does with ``parallel.processes``.
OUT: {name: [{"text", "n_tokens", "finish_reason"}, ...]}. The entry point is guarded: vLLM's
engine starts worker processes that re-import this file.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from personaspace.distributed import finish, launch
from personaspace.generate import ChatRequest, Sampling, load_generator


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    ranks = launch(spec.get("processes", 1), "cpu")
    adapters = {r["adapter"] for job in spec["jobs"].values() for r in job["requests"]} - {None}
    # one engine for every job, sized for all their adapters (as an eval stage passes its condition's)
    generator = load_generator("vllm", spec["model"], dtype="float32", progress=False, loras=sorted(adapters),
                               ranks=ranks)  # fmt: skip
    result = {}
    for name, job in spec["jobs"].items():
        out = generator.generate([ChatRequest(**r) for r in job["requests"]], Sampling(**job["sampling"]))
        result[name] = [dataclasses.asdict(c) for c in out]
    if ranks.main:
        Path(sys.argv[2]).write_text(json.dumps(result))
    finish(ranks)


if __name__ == "__main__":
    main()
