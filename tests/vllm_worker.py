"""Runs in the vLLM environment for tests/test_vllm_backend.py: completions of JSON jobs on one engine.

    .venv-vllm/bin/python tests/vllm_worker.py JOBS.json OUT.json

JOBS: {"model": dir, "max_lora_rank": r, "jobs": {name: {"sampling": {...}, "requests": [{...}]}}}.
OUT: {name: [{"text", "n_tokens", "finish_reason"}, ...]}. The entry point is guarded: vLLM's
engine starts worker processes that re-import this file.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from personaspace.generate import ChatRequest, Sampling
from personaspace.vllm_backend import VLLMGenerator


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    generator = VLLMGenerator(spec["model"], dtype="float32", max_lora_rank=spec["max_lora_rank"], progress=False)
    result = {}
    for name, job in spec["jobs"].items():
        out = generator.generate([ChatRequest(**r) for r in job["requests"]], Sampling(**job["sampling"]))
        result[name] = [dataclasses.asdict(c) for c in out]
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
