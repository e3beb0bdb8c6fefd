"""The CPU kernels every process of the pipeline computes with: AVX2, on any x86-64 CPU.

PyTorch picks its vectorised CPU kernels (ATen's "CPU capability") at start-up from the instruction
sets the CPU has, and AVX-512 kernels round sums differently from AVX2 ones: the same coupling
training wrote other adapter bytes on an AMD EPYC with AVX-512 than on an AMD EPYC without it.
Pinned to AVX2, the AVX-512 machine wrote the other's adapter and centroid bytes exactly
(``stages/couple.py`` of aaa68be, librarian: adapter folder md5 6b0c8656...; README "Reproducibility").
So the package sets ``ATEN_CPU_CAPABILITY=avx2`` as it is imported (every stage imports it before
torch), unless the environment already sets it. ``MKL_CBWR=AVX2`` too: MKL's own switch for the same
results on every CPU with AVX2; it changed no byte on those AMD CPUs (whose MKL path is AVX2 already),
and on an Intel CPU with AVX-512 it keeps MKL's matrix products off AVX-512 (not checked: no Intel CPU
here). ``ATEN_CPU_CAPABILITY=avx512`` lets an AVX-512 CPU use its own kernels (faster, other bytes; the
eval cells it samples are keyed apart, ``HFGenerator.sampler``). No GPU kernel is affected.

numpy's OpenBLAS picks its kernels the same way (SkylakeX on AVX-512, Haswell on AVX2), and the regress
stage's plot tables differed between those two machines in the last bit (2e-16) until
``OPENBLAS_CORETYPE=Haswell`` made them equal. OpenBLAS reads it once, as numpy loads: so every stage
imports this module before numpy, pandas and torch (``import personaspace.cpu_kernels``, its own
import section in pyproject's ruff settings), and ``blas_in_use`` says what was loaded.
"""

from __future__ import annotations

import os

# AVX2 (Haswell's instruction set): every x86-64 CPU of the last decade has it
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "OPENBLAS_CORETYPE": "Haswell"}


def pin() -> None:
    """Set the pins for this process and its children, unless the environment chose already."""
    for variable, value in PINNED.items():
        os.environ.setdefault(variable, value)


def in_use() -> str:
    """The CPU kernels torch uses in this process (e.g. ``AVX2``; ``DEFAULT`` off x86)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def blas_in_use() -> list[str]:
    """The BLAS libraries loaded in this process and their kernels (e.g. ``openblas Haswell``)."""
    import threadpoolctl

    return [f"{lib['internal_api']} {lib.get('architecture') or ''}".strip() for lib in threadpoolctl.threadpool_info()]
