"""The pipeline's processes compute with AVX2 kernels on every x86-64 CPU (personaspace.cpu_kernels)."""

from __future__ import annotations

import ast
import os
import platform
import subprocess
import sys
from pathlib import Path

from personaspace.cpu_kernels import PINNED

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import hashlib, sys
import personaspace  # as every stage does, before torch
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
torch.manual_seed(0)
ids = torch.randint(0, 1000, (4, 64))
out = model(ids, labels=ids)
out.loss.backward()
grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
digest = hashlib.sha256(out.logits.detach().numpy().tobytes() + grads.numpy().tobytes()).hexdigest()
print(torch.backends.cpu.get_cpu_capability(), digest)
"""


def _unpinned_env() -> dict[str, str]:
    """This environment less the pins (the test process itself imported personaspace, which set them)."""
    return {k: v for k, v in os.environ.items() if k not in PINNED}


BEST = subprocess.run(  # what the CPU offers, asked by a process that does not import personaspace
    [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
    env=_unpinned_env(),
    capture_output=True,
    text=True,
    check=True,
).stdout.strip()
pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or BEST not in ("AVX2", "AVX512"), reason="an x86-64 CPU with AVX2"
)


def _probe(model_dir, **env: str) -> tuple[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(model_dir)], env=_unpinned_env() | env, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    capability, digest = done.stdout.split()
    return capability, digest


def test_a_training_step_uses_avx2_kernels_whatever_the_cpu_offers(tiny_model_dir):
    """One forward and backward of the tiny model: AVX2 kernels unasked, the same bytes as with AVX2 asked for
    and with MKL and oneDNN held to AVX2 too (what an AVX2-only CPU computes)."""
    pinned = _probe(tiny_model_dir)
    assert pinned[0] == "AVX2"
    assert _probe(tiny_model_dir, ATEN_CPU_CAPABILITY="avx2") == pinned
    assert _probe(tiny_model_dir, MKL_CBWR="AVX2", ONEDNN_MAX_CPU_ISA="AVX2") == pinned


@pytest.mark.skipif(BEST != "AVX512", reason="shows what the pin prevents on a CPU with AVX-512")
def test_avx512_kernels_write_other_bytes_and_an_explicit_choice_is_kept(tiny_model_dir):
    pinned = _probe(tiny_model_dir)
    own = _probe(tiny_model_dir, ATEN_CPU_CAPABILITY="avx512")
    assert own[0] == "AVX512" and own[1] != pinned[1]


def test_a_stage_loads_numpy_with_openblas_pinned_to_haswell_kernels():
    """A stage's first import pins OpenBLAS before numpy loads it (AVX-512 CPUs would load SkylakeX kernels)."""
    done = subprocess.run(
        [sys.executable, "-c", "import personaspace.cpu_kernels as k, numpy; print(k.blas_in_use())"],
        env=_unpinned_env(), capture_output=True, text=True, check=True,
    )  # fmt: skip
    openblas = [lib for lib in ast.literal_eval(done.stdout) if lib.startswith("openblas")]
    assert openblas == ["openblas Haswell"], done.stdout


def test_every_stage_imports_the_pins_before_any_third_party_module():
    """OpenBLAS reads OPENBLAS_CORETYPE once, as numpy loads: a stage importing pandas first would miss it."""
    late = []
    for script in sorted((REPO / "stages").glob("*.py")):
        tree = ast.parse(script.read_text())
        imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        names = [n.names[0].name if isinstance(n, ast.Import) else n.module or "" for n in imports]
        outside = [name for name in names if name.split(".")[0] not in sys.stdlib_module_names | {"__future__"}]
        if not outside or outside[0] != "personaspace.cpu_kernels":
            late.append(f"{script.name}: first non-stdlib import {outside[:1]}")
    assert not late, late
