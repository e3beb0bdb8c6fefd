"""The CPU kernels every process of the pipeline computes with: AVX2, on any x86-64 CPU.

PyTorch picks its vectorised CPU kernels (ATen's "CPU capability") at start-up from the instruction
sets the CPU has, and AVX-512 kernels round sums differently from AVX2 ones: the same coupling
training wrote other adapter bytes on an Intel CPU with AVX-512 than on an AMD EPYC without it.
Pinned to AVX2, the Intel CPU wrote the AMD CPU's bytes exactly (``stages/couple.py`` of aaa68be,
librarian: adapter folder md5 6b0c8656..., README "Reproducibility"). So the package sets
``ATEN_CPU_CAPABILITY=avx2`` as it is imported (every stage imports it before torch), unless the
environment already sets it: ``ATEN_CPU_CAPABILITY=avx512`` lets an AVX-512 CPU use its own (faster,
other bytes; the eval cells it samples are keyed apart, ``HFGenerator.sampler``). The pin reaches no
GPU kernel.
"""

from __future__ import annotations

import os

PINNED = "avx2"  # the widest instruction set every x86-64 CPU of the last decade has
VARIABLE = "ATEN_CPU_CAPABILITY"


def pin() -> None:
    """Set the pin for this process and its children, unless the environment chose already."""
    os.environ.setdefault(VARIABLE, PINNED)


def in_use() -> str:
    """The CPU kernels torch uses in this process (e.g. ``AVX2``; ``DEFAULT`` off x86)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()
