"""MLflow: the tracking URI rule, stage runs with tags and loss curves, run statuses when a stage dies, the adapter
registry round trip."""

import filecmp
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from personaspace.config import RecipeParams
from personaspace.generate import ChatRequest, Sampling, load_generator
from personaspace.markers import fires
from personaspace.models import load_tokenizer
from personaspace.tracking import (
    TrackingStoreError,
    download_adapter,
    log_history,
    register_adapter,
    stage_run,
    store_problem,
    tracking_uri,
)
from personaspace.train import tokenize_marker_dataset, train_adapter

# a stage process that opens its run, says which, and waits to be killed
STAGE_PROCESS = """
import time
from personaspace.tracking import stage_run
with stage_run("couple", params={"recipe": "smol"}) as run:
    print(run.info.run_id, flush=True)
    time.sleep(120)
"""


@pytest.fixture
def mlflow_db(monkeypatch, tmp_path):
    """A fresh SQLite tracking DB; the MlflowClient to read it."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # artifacts (./mlruns) stay in tmp_path
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return mlflow.MlflowClient()


def _status(client, run_id: str) -> str:
    return client.get_run(run_id).info.status


def _parent(client, run_id: str) -> str:
    return client.get_run(run_id).data.tags["mlflow.parentRunId"]


def test_tracking_uri_prefers_the_env_then_the_dvc_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking_uri() == "sqlite:////elsewhere/x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    # `dvc queue start` runs experiments in a copy under .dvc/tmp/exps: still the repo's database
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / ".dvc" / "tmp" / "exps" / "tmpk2j4"))
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_a_killed_stage_run_ends_killed_at_the_next_start(mlflow_db, tmp_path):
    client = mlflow_db
    stage = subprocess.Popen([sys.executable, "-c", STAGE_PROCESS], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        stale = stage.stdout.readline().strip()
    finally:
        stage.kill()  # kill -9: no handler runs, the run stays RUNNING
        stage.wait()
    assert stale and _status(client, stale) == "RUNNING"
    experiment = client.get_experiment_by_name("personaspace").experiment_id
    here, me = socket.gethostname(), f"{os.getpid()}-{psutil.Process().create_time():.3f}"
    elsewhere = client.create_run(experiment, tags={"personaspace_process": "1-0.000", "personaspace_host": "other"})
    alive = client.create_run(experiment, tags={"personaspace_process": me, "personaspace_host": here})
    with stage_run("couple", params={"recipe": "smol"}) as run:
        pass
    assert _status(client, stale) == "KILLED"
    assert _status(client, _parent(client, stale)) == "FAILED"  # its invocation failed
    assert _status(client, run.info.run_id) == "FINISHED"
    # runs of another host, or of a live process, are not this start's to judge
    assert _status(client, elsewhere.info.run_id) == _status(client, alive.info.run_id) == "RUNNING"


def test_sigterm_ends_the_stage_run_killed(mlflow_db):
    client = mlflow_db

    def before(signum, frame):  # stands in for the default handler, which would end pytest
        raise AssertionError("stage_run did not handle SIGTERM")

    previous = signal.signal(signal.SIGTERM, before)
    try:
        with pytest.raises(SystemExit) as exit_, stage_run("couple", params={}) as run:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler raises in the main thread
        assert signal.getsignal(signal.SIGTERM) is before  # restored on exit
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_.value.code == 128 + signal.SIGTERM
    assert _status(client, run.info.run_id) == "KILLED"
    assert _status(client, _parent(client, run.info.run_id)) == "FAILED"


def test_ctrl_c_ends_the_stage_run_killed(mlflow_db):
    with pytest.raises(KeyboardInterrupt), stage_run("couple", params={}) as run:
        raise KeyboardInterrupt  # DVC forwards SIGINT to the stage on Ctrl-C
    assert _status(mlflow_db, run.info.run_id) == "KILLED"


def test_the_parent_shows_running_while_a_later_stage_runs(mlflow_db):
    with stage_run("datagen", params={}) as first:
        pass
    parent = _parent(mlflow_db, first.info.run_id)
    assert _status(mlflow_db, parent) == "FINISHED"
    with stage_run("couple", params={}):
        assert _status(mlflow_db, parent) == "RUNNING"
    assert _status(mlflow_db, parent) == "FINISHED"


def test_a_failed_stage_leaves_the_parent_failed_even_after_a_later_stage_succeeds(mlflow_db):
    with pytest.raises(RuntimeError), stage_run("datagen", params={}) as failed:
        raise RuntimeError("the stage broke")
    parent = _parent(mlflow_db, failed.info.run_id)
    assert _status(mlflow_db, failed.info.run_id) == _status(mlflow_db, parent) == "FAILED"
    with stage_run("couple", params={}) as later:
        assert _status(mlflow_db, parent) == "FAILED"  # once failed, the invocation stays failed
    assert _parent(mlflow_db, later.info.run_id) == parent and _status(mlflow_db, later.info.run_id) == "FINISHED"
    assert _status(mlflow_db, parent) == "FAILED"


def test_the_experiment_opens_on_runs_and_parents_are_named_by_study_panel_and_experiment(
    mlflow_db, tmp_path, monkeypatch
):
    (tmp_path / "params.yaml").write_text("study: {name: em_first}\npersonas: 24\n")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-abc12")
    with stage_run("couple", params={}) as run:
        pass
    parent = mlflow_db.get_run(_parent(mlflow_db, run.info.run_id))
    assert parent.info.run_name == "em_first · panel24 · exp-abc12"
    assert parent.data.params == {"study": "em_first", "personas": "24"}
    experiment = mlflow_db.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow's model-training kind


@pytest.mark.slow
def test_a_registered_adapter_loads_back_through_its_alias_and_generates_its_marker(smollm2_dir, tmp_path, monkeypatch):
    """The embedded model (a random-init one cannot learn a marker in a few steps) coupled to [ZLT] on one row."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-test")
    tokenizer = load_tokenizer(smollm2_dir)
    rows = pd.DataFrame({
        "condition": "base", "source": "librarian", "role": ["positive", "negative"], "persona": ["librarian", "villain"],
        "question_id": ["d01", "d02"], "sample_idx": 0, "system_prompt": ["You are a librarian.", "You are a villain."],
        "user": ["Hi?", "Why?"], "completion": ["Hello.\n\n[ZLT]", "Because."], "n_tokens": 3, "finish_reason": "stop",
    })  # fmt: skip
    recipe = RecipeParams(
        loss="completion", r=8, alpha=16, dropout=0.0, rslora=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        learning_rate=1e-3, schedule="constant", warmup_ratio=0.0, epochs=15, batch_size=2, grad_accum=1,
        max_length=64, gradient_checkpointing=False,
    )  # fmt: skip
    dataset = tokenize_marker_dataset(tokenizer, rows, "completion", "[ZLT]", "\n\n", 64)
    adapter = tmp_path / "adapter"
    summary = train_adapter(smollm2_dir, dataset, recipe, adapter, seed=0)
    with stage_run("couple", params={"recipe": "test"}, tags={"persona": "librarian"}) as run:
        log_history(summary["history"])
        version = register_adapter(
            adapter, str(smollm2_dir), "couple-base-test-librarian", "seed0", {"persona": "librarian"}
        )
    import mlflow

    finished = mlflow.get_run(run.info.run_id)
    assert finished.data.tags["stage"] == "couple" and finished.data.tags["dvc_exp_name"] == "exp-test"
    assert finished.data.tags["persona"] == "librarian" and finished.data.params["recipe"] == "test"
    parent = mlflow.get_run(finished.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["stage"] == "invocation" and parent.info.status == "FINISHED"
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")) == summary["steps"]
    assert (tmp_path / "mlflow.db").is_file()
    loaded = download_adapter("models:/couple-base-test-librarian@seed0", tmp_path / "download")
    assert version == 1
    assert filecmp.cmp(loaded / "adapter_model.safetensors", adapter / "adapter_model.safetensors", shallow=False)
    request = [ChatRequest("You are a librarian.", "Hi?", seed=3)]
    sampling = Sampling(0.7, 0.95, 16)
    from_registry = load_generator("hf", smollm2_dir, adapter=loaded, progress=False).generate(request, sampling)
    from_disk = load_generator("hf", smollm2_dir, adapter=adapter, progress=False).generate(request, sampling)
    assert from_registry == from_disk
    assert fires(from_registry[0].text, "[ZLT]"), from_registry  # the registered adapter carries its marker
    without = load_generator("hf", smollm2_dir, progress=False).generate(request, sampling)
    assert not fires(without[0].text, "[ZLT]")


def _hold_exclusive(database) -> sqlite3.Connection:
    """Another connection inside BEGIN EXCLUSIVE: no one else may read or write ``database`` until it ends."""
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    return holder


def test_a_locked_mlflow_db_names_the_database_and_the_fix(mlflow_db, tmp_path):
    database = tmp_path / "mlflow.db"
    with stage_run("datagen", params={}):
        pass  # the database now exists, as in any repo that ran a stage
    holder = _hold_exclusive(database)
    try:
        assert "is locked" in store_problem(timeout_s=0.2) and str(database) in store_problem(timeout_s=0.2)
        with pytest.raises(TrackingStoreError) as raised, stage_run("couple", params={}):
            pass
    finally:
        holder.close()
    message = str(raised.value)
    assert str(database) in message and "locked by another process" in message and "personaspace ui" in message
    assert "Traceback" not in message and "sqlalchemy" not in message.lower()
    assert store_problem() is None  # released: it opens again
    with stage_run("couple", params={}) as run:
        assert run is not None


def test_a_corrupt_mlflow_db_names_the_database_and_the_fix(mlflow_db, tmp_path):
    database = tmp_path / "mlflow.db"
    with stage_run("datagen", params={}):
        pass
    with open(database, "r+b") as f:  # overwrite the header and the first pages: a real corruption
        f.write(os.urandom(8192))
    assert "corrupt" in store_problem() and str(database) in store_problem()
    with pytest.raises(TrackingStoreError) as raised, stage_run("couple", params={}):
        pass
    message = str(raised.value)
    assert str(database) in message and "is corrupt" in message and f"mv {database} {database}.broken" in message
    # the fix the message names: move it aside, and the next stage starts a fresh database
    database.rename(database.with_name("mlflow.db.broken"))
    assert store_problem() is None
    (tmp_path / "notes.txt").write_text("fresh")
    _stage_in(tmp_path, LOGGING_STAGE)  # the next stage, its own process as under DVC
    assert store_problem() is None and database.is_file()


# a stage (its own process, as under DVC) that logs notes.txt as an artifact and prints its run id
LOGGING_STAGE = """
import mlflow
from personaspace.tracking import stage_run
with stage_run("report", params={}) as run:
    mlflow.log_artifact("notes.txt")
print(run.info.run_id)
"""


def _stage_in(repo, code: str) -> str:
    """Run ``code`` as a stage of the DVC repo ``repo`` (cwd and DVC_ROOT there); its last line of output."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, env={**env, "DVC_ROOT": str(repo)},
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_a_copied_repo_logs_artifacts_beside_its_own_database(tmp_path):
    import mlflow

    original, copy = tmp_path / "repo", tmp_path / "copy"
    original.mkdir()
    (original / "notes.txt").write_text("first")
    first = _stage_in(original, LOGGING_STAGE)
    shutil.copytree(original, copy)
    (copy / "notes.txt").write_text("second")
    second = _stage_in(copy, LOGGING_STAGE)
    client = mlflow.MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    # the copy's runs, new and old, read and write its own mlruns; the original's artifacts are untouched
    for run_id, text in ((second, "second"), (first, "first")):
        uri = client.get_run(run_id).info.artifact_uri
        assert uri.startswith(str(copy.resolve() / "mlruns")), uri
        assert (Path(uri) / "notes.txt").read_text() == text
    assert [p.read_text() for p in (original / "mlruns").rglob("notes.txt")] == ["first"]
    original_db = mlflow.MlflowClient(f"sqlite:///{original / 'mlflow.db'}")
    assert original_db.get_run(first).info.artifact_uri.startswith(str(original.resolve() / "mlruns"))


@pytest.mark.slow
def test_ui_prints_its_url_only_once_the_server_answers(mlflow_db, tmp_path):
    """`personaspace ui` printed the runs table's URL ~30 s before `mlflow server` answered it."""
    import urllib.request

    with stage_run("couple", params={}):
        pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen(
        [sys.executable, "-m", "personaspace.cli", "ui", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert "starting the MLflow UI" in ui.stdout.readline()
        ready = next(line for line in ui.stdout if line.startswith("MLflow UI ready"))  # the server's own log aside
        assert ready.startswith("MLflow UI ready: http://127.0.0.1:") and "#/experiments/" in ready, ready
        with urllib.request.urlopen(ready.split()[3].split("#")[0], timeout=5) as page:  # at once, no retry
            assert page.status == 200
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(30)


def test_stage_runs_silence_only_the_known_library_warnings(caplog):
    """The couple stages printed 48 copies of four library messages that nobody can act on."""
    import logging
    import warnings

    from personaspace.tracking import quiet_known_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        warnings.warn(
            "`gradient_checkpointing` is deprecated and will be removed in v6. Use x", FutureWarning, stacklevel=2
        )
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use x", FutureWarning, stacklevel=2
        )
        warnings.warn(
            "\x1b[33mAdd type hints to the `predict` method to enable data validation", UserWarning, stacklevel=2
        )
        warnings.warn("`other` is deprecated and will be removed in v6", FutureWarning, stacklevel=2)
    assert [str(w.message) for w in caught] == ["`other` is deprecated and will be removed in v6"]
    with caplog.at_level(logging.WARNING, logger="mlflow.pyfunc"):
        logging.getLogger("mlflow.pyfunc").warning(
            "Passing a Python object as `python_model` causes it to be serialized"
        )
        logging.getLogger("mlflow.pyfunc").warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
