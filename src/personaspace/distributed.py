"""One stage, several processes: torchrun launch, rank facts, work split by batch and gathered.

>>> ranks = launch(params.parallel.processes, params.generation.device)  # doctest: +SKIP
>>> device = ranks.device(params.generation.device)                       # this rank's GPU   # doctest: +SKIP

A stage command is the same for 1 or N processes: ``launch`` re-executes the stage under
``torch.distributed.run`` (torchrun) when params ask for more processes than are running, then
joins the process group (NCCL on GPUs, gloo on CPUs). Training is data parallel through
accelerate inside TRL's trainer; generation and probes deal whole batches to the ranks
(``mine``) and gather the results (``gather``), so every batch holds exactly the rows it holds in
one process and the outputs are the same bytes. Only rank 0 writes files or logs to MLflow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# torchrun exports these to every process it starts
_WORLD, _RANK, _LOCAL_RANK = "WORLD_SIZE", "RANK", "LOCAL_RANK"
# run by ``finish`` after its last barrier: engines that built groups on the process group tear them down
_AT_FINISH: list[Callable[[], None]] = []


@dataclass(frozen=True)
class Ranks:
    """This process's place in the stage's process group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The one process that writes outputs and logs."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """This rank's device for ``generation.device``: ``cuda:<local rank>`` when several share the GPUs."""
        from personaspace.models import resolve_device

        resolved = resolve_device(device)
        if self.world > 1 and resolved.startswith("cuda"):
            return f"cuda:{self.local_rank}"
        return resolved

    def on_any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank, so that all ranks take the same branch (one process: ``flag``)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        flags: list[Any] = [None] * self.world
        dist.all_gather_object(flags, flag)
        return any(flags)

    def mine(self, count: int) -> list[int]:
        """Indices of the ``count`` work units (batches) this rank runs: every world-th, from its rank."""
        return list(range(self.rank, count, self.world))


def current() -> Ranks:
    """The ranks of this process, from torchrun's environment."""
    return Ranks(
        rank=int(os.environ.get(_RANK, 0)),
        world=int(os.environ.get(_WORLD, 1)),
        local_rank=int(os.environ.get(_LOCAL_RANK, 0)),
    )


def processes_for(processes: int | str, device: str) -> int:
    """How many processes ``parallel.processes`` means here: ``auto`` = every visible GPU (1 on a CPU)."""
    if processes != "auto":
        return int(processes)
    import torch

    from personaspace.models import resolve_device

    uses_gpu = resolve_device(device).startswith("cuda")
    return max(1, torch.cuda.device_count()) if uses_gpu and device in ("auto", "cuda") else 1


def launch(processes: int | str, device: str, argv: Sequence[str] | None = None) -> Ranks:
    """Run this stage on ``processes`` ranks; return this process's ranks.

    With one process (or already under torchrun) it returns at once. Otherwise it runs
    ``python -m torch.distributed.run --standalone --nproc-per-node N`` on this script and its
    arguments, and exits with its status: the calling process does no work itself.
    """
    wanted = processes_for(processes, device)
    ranks = current()
    if ranks.world > 1:
        _join(ranks, device)
        return ranks
    if wanted <= 1:
        return ranks
    args = list(sys.argv if argv is None else argv)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={wanted}", *args]
    # one thread per rank and core share unless the user set it: N ranks x all cores oversubscribes a CPU
    env = dict(os.environ)
    if not device.startswith("cuda") and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // wanted))
    raise SystemExit(subprocess.call(command, env=env))


def _join(ranks: Ranks, device: str) -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    gpu = ranks.device(device).startswith("cuda")
    if gpu:
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group("nccl" if gpu else "gloo", device_id=torch.device(ranks.device(device)) if gpu else None)


def gather(local: dict[int, T], ranks: Ranks) -> dict[int, T]:
    """Merge every rank's ``{index: result}`` into one dict on every rank (one process: ``local``)."""
    if ranks.world == 1:
        return local
    import torch.distributed as dist

    parts: list[Any] = [None] * ranks.world
    dist.all_gather_object(parts, local)
    merged: dict[int, T] = {}
    for part in parts:
        merged.update(part)
    return merged


@contextmanager
def output_path(path: Path | str, ranks: Ranks) -> Iterator[Path]:
    """Rank 0: ``io.atomic_path(path)``. Other ranks: a scratch path, thrown away, nothing beside ``path``."""
    from personaspace.io import atomic_path

    if ranks.main:
        with atomic_path(path) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix=f"personaspace-rank{ranks.rank}-") as scratch:
        yield Path(scratch) / Path(path).name


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (a no-op in one process)."""
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()


def finish(ranks: Ranks) -> None:
    """Leave the process group cleanly at the end of a stage (all ranks wait for rank 0's writes)."""
    if ranks.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
        while _AT_FINISH:
            _AT_FINISH.pop()()
        if dist.is_initialized():  # a vLLM engine's shutdown destroys it too
            dist.destroy_process_group()


def at_finish(callback: Callable[[], None]) -> None:
    """Have ``finish`` call ``callback`` after its last barrier, before it leaves the process group."""
    _AT_FINISH.append(callback)
