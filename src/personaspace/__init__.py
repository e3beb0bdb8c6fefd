"""personaspace: a data-versioned pipeline for experiments on persona space in chat models."""

from personaspace import cpu_kernels

cpu_kernels.pin()  # before any module of the package imports torch: the same bytes on every x86-64 CPU

__version__ = "0.1.0"
