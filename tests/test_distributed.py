"""Several processes per stage: the pure parts (batch split, dealing, checks). The 2-rank runs of the
real stages are in test_pipeline.py (test_two_processes_give_the_outputs_of_one)."""

from __future__ import annotations

import pytest

from personaspace.checks import parallel_errors, tensor_errors
from personaspace.config import ParamsError, validate_params
from personaspace.distributed import Ranks, current, processes_for
from personaspace.train import per_device_batch


@pytest.mark.parametrize(
    ("batch", "accum", "world", "expected"),
    [
        (16, 4, 1, (16, 4)),  # one process: the recipe as written
        (16, 4, 2, (16, 2)),  # accumulation shrinks first
        (16, 4, 8, (8, 1)),  # then the rows per device
        (20, 1, 2, (10, 1)),
        (8, 3, 2, (6, 2)),  # 24 rows: 12 per rank, in steps of at most 8 rows
        (4, 4, 1, (4, 4)),
    ],
)
def test_per_device_batch_keeps_the_recipes_effective_batch(batch, accum, world, expected):
    rows, steps = per_device_batch(batch, accum, world)
    assert (rows, steps) == expected
    assert rows * steps * world == batch * accum and rows <= batch


def test_per_device_batch_refuses_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match="does not split over 4 processes"):
        per_device_batch(3, 2, 4)


def test_ranks_deal_every_batch_to_exactly_one_rank():
    for world in (1, 2, 3, 8):
        dealt = sorted(k for rank in range(world) for k in Ranks(rank=rank, world=world).mine(10))
        assert dealt == list(range(10))
    assert Ranks(rank=1, world=2).mine(5) == [1, 3]
    assert Ranks().main and not Ranks(rank=1, world=2).main


def test_ranks_come_from_torchruns_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert current() == Ranks(rank=3, world=4, local_rank=1)
    assert Ranks(rank=3, world=4, local_rank=1).device("cpu") == "cpu"
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    assert current() == Ranks()


def test_processes_auto_is_one_on_a_cpu():
    assert processes_for("auto", "cpu") == 1
    assert processes_for(3, "cpu") == 3


@pytest.mark.parametrize(
    ("processes", "device", "message"),
    [
        (2, "cuda:0", "cannot share generation.device 'cuda:0'"),
        (2, "cuda", "need 2 GPUs, 0 visible"),
    ],
)
def test_parallel_checks_name_the_key_and_the_fix(processes, device, message):
    errors = parallel_errors(processes, device)
    assert len(errors) == 1 and errors[0].startswith("parallel.processes") and message in errors[0]


def test_parallel_checks_pass_for_cpu_ranks_and_auto():
    assert (
        parallel_errors(2, "cpu") == [] and parallel_errors("auto", "cuda") == [] and parallel_errors(1, "cuda:0") == []
    )


@pytest.mark.parametrize(
    ("tensor", "processes", "backend", "gpus", "message"),
    [
        (2, "auto", "hf", 4, "the hf backend runs a whole model per rank"),
        (2, "auto", "vllm", 0, "2 GPUs per engine, 0 visible"),
        (2, 3, "vllm", 4, "does not divide parallel.processes (3 ranks)"),
    ],
)
def test_tensor_checks_name_the_key_and_the_fix(monkeypatch, tensor, processes, backend, gpus, message):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)  # the machine's GPU count, the check's input
    errors = tensor_errors(tensor, processes, "cuda", backend)
    assert len(errors) == 1 and errors[0].startswith("parallel.tensor") and message in errors[0]


def test_tensor_checks_pass_for_whole_engines(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert tensor_errors(2, 4, "cuda", "vllm") == tensor_errors(2, 1, "cuda", "vllm") == []
    assert tensor_errors(1, 3, "cpu", "hf") == []


@pytest.mark.parametrize("value", [0, -1, "2", 1.5])
def test_parallel_tensor_is_a_positive_int(raw_params, value):
    raw_params["parallel"] = {"processes": "auto", "tensor": value}
    with pytest.raises(ParamsError, match=r"parallel\.tensor"):
        validate_params(raw_params)


@pytest.mark.parametrize("value", [0, -1, "all", 1.5, True])
def test_parallel_processes_is_a_positive_int_or_auto(raw_params, value):
    raw_params["parallel"] = {"processes": value}
    with pytest.raises(ParamsError, match=r"parallel\.processes"):
        validate_params(raw_params)
