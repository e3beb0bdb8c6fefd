"""Values that used to fail late or with a raw traceback, refused early with the key and the fix (issue 25).

Seeds outside what the seeding code takes, a paper-scale study started on a CPU, a stage run alone
(`dvc repro -s`) on an unusable device, backend or tracking database, a panel size with no panel,
and a params.yaml that is not YAML.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from personaspace.checks import (
    CONFIRM_ENV,
    CPU_BASIS,
    LONG_RUN_HOURS,
    StageCheckError,
    check_params,
    check_stage,
    projection,
)
from personaspace.cli import compose_params
from personaspace.cli import main as cli_main
from personaspace.config import SEED_MAX, ParamsError, validate_params

from .conftest import REPO
from .test_checks import _run, composed_repo  # noqa: F401 (a fixture)

PAPER = ["scale=paper", "generation.device=cpu"]


def _composed(tmp_path: Path, overrides: list[str]) -> Path:
    out = tmp_path / "params.yaml"
    compose_params(out, overrides, REPO / "conf")
    return out


@pytest.fixture
def no_tracking_db(monkeypatch, tmp_path):
    """The tracking database of these checks: none yet, in tmp_path (the repo's own is not touched)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(CONFIRM_ENV, raising=False)
    return tmp_path / "mlflow.db"


def test_the_seed_range_is_what_the_seeding_code_accepts():
    # RandomState (scikit-learn's random_state, transformers' set_seed) takes 0..2**32-1, default_rng no negatives
    for seed in (0, SEED_MAX):
        np.random.RandomState(seed), np.random.default_rng(seed), torch.manual_seed(seed)
    with pytest.raises(ValueError):
        np.random.RandomState(SEED_MAX + 1)
    with pytest.raises(ValueError):
        np.random.default_rng(-1)


@pytest.mark.parametrize(
    "override,key,value",
    [("seed=-1", "seed", -1), ("seed=4294967296", "seed", 4294967296), ("couple.seeds=[-1]", "couple.seeds.0", -1)],
)
def test_check_refuses_a_seed_outside_what_numpy_and_torch_take(tmp_path, no_tracking_db, override, key, value):
    problems, _ = check_params(_composed(tmp_path, [override]))
    assert any(f"{key}: {value} is outside 0..4294967295" in p and "pick one in that range" in p for p in problems)


def test_check_refuses_a_negative_seed(raw_params):
    raw_params["seed"] = -1
    with pytest.raises(ParamsError, match=r"seed: -1 is outside 0\.\.4294967295"):
        validate_params(raw_params)


def test_check_refuses_a_negative_couple_seed(raw_params):
    raw_params["couple"]["seeds"] = [0, -1]
    with pytest.raises(ParamsError, match=r"couple\.seeds\.1: -1 is outside 0\.\.4294967295"):
        validate_params(raw_params)


def test_the_projection_basis_is_the_measured_benchmark():
    default = json.loads((REPO / "benchmarks/results/default_study_cpu.json").read_text())["stages"]
    for stage in ("datagen", "eval", "couple", "centroids", "base"):
        assert CPU_BASIS[stage][0] == default[stage]["total_s"]
    em_first = json.loads((REPO / "benchmarks/results/em_first_laptop_cpu.json").read_text())["stage_times"]
    assert CPU_BASIS["pretrain"][0] == em_first["pretrain"]["mean_s"]
    assert CPU_BASIS["pretrain"][1] == len((REPO / "data/pretrain/em_small.jsonl").read_text().splitlines())


def test_the_default_study_projects_near_its_measured_cpu_time(params):
    projected = projection(params)
    measured = json.loads((REPO / "benchmarks/results/default_study_cpu.json").read_text())
    assert 0.7 < projected.hours * 3600 / measured["seconds_first_to_last_stage"] < 1.1  # uncounted: markers, regress
    assert projected.hours < LONG_RUN_HOURS


def test_check_refuses_paper_scale_on_a_cpu_without_confirmation(tmp_path, no_tracking_db, monkeypatch):
    path = _composed(tmp_path, PAPER)
    problems, notes = check_params(path)
    (long_run,) = [p for p in problems if p.startswith("scale: 'paper'")]
    assert f"{CONFIRM_ENV}=1 dvc repro" in long_run and "on a GPU" in long_run and "-S scale=laptop" in long_run
    (note,) = [n for n in notes if n.startswith("projected duration on this CPU")]
    assert "default_study_cpu.json" in note and "from scratch" in note
    monkeypatch.setenv(CONFIRM_ENV, "1")
    problems, _ = check_params(path)
    assert not [p for p in problems if p.startswith("scale:")]


def test_the_check_stage_prints_the_projection_and_refuses_a_long_cpu_run(tmp_path, no_tracking_db):
    path = _composed(tmp_path, PAPER)
    result = _run([sys.executable, str(REPO / "stages/check.py"), "--params", str(path), "--out", "stamp.json"],
                  tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "note: projected duration on this CPU: about" in result.stdout
    assert "scale: 'paper'" in result.stderr and CONFIRM_ENV in result.stderr
    assert not (tmp_path / "stamp.json").exists()


def _params(raw: dict, **generation: str) -> object:
    raw["generation"].update(generation)
    return validate_params(raw)


def test_a_stage_run_alone_refuses_a_device_that_is_not_there(raw_params, no_tracking_db):
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(StageCheckError) as raised:
        check_stage(_params(raw_params, device=missing), needs=("device",), stage="couple@x")
    message = str(raised.value)
    assert (
        message.startswith("couple@x cannot run here:") and f"generation.device: {missing!r} does not exist" in message
    )
    assert "use auto or cpu" in message and "`dvc checkout couple@x`" in message


def test_a_stage_run_alone_refuses_a_backend_that_is_not_installed(raw_params, no_tracking_db):
    with pytest.raises(StageCheckError, match=r"generation\.backend: vllm needs vLLM.*personaspace\[gpu\]"):
        check_stage(_params(raw_params, backend="vllm"), needs=("backend",))
    check_stage(_params(raw_params, backend="vllm"), needs=("device",))  # only the checks it names


def test_a_stage_run_alone_refuses_a_locked_mlflow_db(params, no_tracking_db):
    check_stage(params)  # no database yet: the stage creates it
    sqlite3.connect(no_tracking_db).execute("CREATE TABLE t (x)").connection.commit()
    holder = sqlite3.connect(no_tracking_db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StageCheckError) as raised:
            check_stage(params, stage="eval@panel-base")
        problems, _ = check_params(REPO / "params.yaml")  # the check stage refuses it too, before any deletion
    finally:
        holder.close()
    assert str(no_tracking_db) in str(raised.value) and "locked by another process" in str(raised.value)
    assert any(str(no_tracking_db) in p and "personaspace ui" in p for p in problems)
    check_stage(params)


def test_the_check_stage_refuses_a_corrupt_mlflow_db(no_tracking_db):
    no_tracking_db.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 64)
    problems, _ = check_params(REPO / "params.yaml")
    assert any(str(no_tracking_db) in p and "is corrupt" in p and ".broken" in p for p in problems)


def test_check_params_on_broken_yaml_exits_2(tmp_path, capsys, no_tracking_db):
    path = tmp_path / "params.yaml"
    path.write_text("seed: [0\npersonas: 12\n")
    assert cli_main(["check-params", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is not valid YAML" in err and "git checkout" in err and "Traceback" not in err


def test_an_unknown_panel_size_lists_the_sizes_there_are(tmp_path):
    with pytest.raises(Exception, match=r"personas: 13 is not a panel size; use one of 12, 24, 48") as raised:
        _composed(tmp_path, ["personas=13"])
    assert "panels.n13" not in str(raised.value)
    assert not (tmp_path / "params.yaml").exists()


def test_dvc_exp_run_with_an_unknown_panel_size_lists_the_sizes(composed_repo):  # noqa: F811
    before = (composed_repo / "params.yaml").read_text()
    result = _run(["dvc", "exp", "run", "-S", "personas=13"], composed_repo)
    assert result.returncode != 0
    assert "personas: 13 is not a panel size; use one of 12, 24, 48" in result.stderr + result.stdout
    assert yaml.safe_load((composed_repo / "params.yaml").read_text()) == yaml.safe_load(before)


def test_a_dvc_exp_run_beside_a_running_repro_leaves_params_yaml_alone(composed_repo):  # noqa: F811
    """A `dvc exp run -S` started while a `dvc repro` runs a stage (DVC then releases its repository lock and
    holds the stage's outputs in its rwlock file) rewrote params.yaml under it before DVC found the repository
    busy; the repro's later stages then ran with the other params. The composition guard refuses first."""
    import os
    import subprocess
    import time

    (composed_repo / "dvc.yaml").write_text(
        'stages:\n  slow:\n    cmd: python -c "import time; time.sleep(60)" && echo done > slow.txt\n'
        "    params: [seed]\n    outs: [slow.txt]\n"
    )
    before = (composed_repo / "params.yaml").read_bytes()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    repro = subprocess.Popen(["dvc", "repro"], cwd=composed_repo, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        rwlock = composed_repo / ".dvc" / "tmp" / "rwlock"
        for _ in range(600):  # the stage's command runs once DVC has write-locked its outputs
            if rwlock.is_file() and rwlock.read_text().strip() and json.loads(rwlock.read_text()).get("write"):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the dvc repro never started its stage")
        result = _run(["dvc", "exp", "run", "-S", "stats.alpha=0.01"], composed_repo)
    finally:
        repro.kill()
        repro.wait()
    assert result.returncode != 0
    assert "another DVC command is running here" in result.stdout + result.stderr, result.stdout + result.stderr
    assert (composed_repo / "params.yaml").read_bytes() == before


def test_params_without_out_says_it_rewrote_params_yaml(tmp_path, capsys, monkeypatch):
    """`personaspace params` rewrites params.yaml by default: it says so, what it composed, and how to undo it."""
    monkeypatch.chdir(REPO)  # conf/ is read from the working directory, as `dvc exp run` does
    out = tmp_path / "params.yaml"
    assert cli_main(["params", "study=em_first", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}: study em_first, scale laptop" in said and f"`git restore {out}` undoes it" in said
