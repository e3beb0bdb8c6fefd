"""MLflow: where runs go, one run per stage execution, and the adapter registry.

>>> with stage_run("couple", params={"recipe": "smol"}, tags={"persona": "librarian"}) as run:  # doctest: +SKIP
...     log_history(history)
>>> register_adapter(adapter_dir, base_model="models/base", name="couple-base-smol-librarian",
...                  alias="seed0", tags={"persona": "librarian"})                              # doctest: +SKIP
>>> adapter_path = download_adapter("models:/couple-base-smol-librarian@seed0")                 # doctest: +SKIP

Every stage run is nested under one parent run per ``dvc repro`` / ``dvc exp run`` invocation:
the stages of one invocation find the parent by a tag keyed on the DVC process (its pid and start
time), so a stage run by hand gets a parent of its own.

A stage run ends FINISHED, FAILED on an exception, or KILLED on SIGTERM or Ctrl-C. A process killed
outright (kill -9, the OOM killer) cannot end its run, so every run records its process and host,
and the next stage_run on that host ends the runs of dead processes: stages KILLED, their parents
FAILED. The parent shows RUNNING while a stage runs, FINISHED after it unless a stage of the
invocation failed or was killed, and once FAILED it stays FAILED.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///$DVC_ROOT/mlflow.db``
(DVC exports DVC_ROOT to stages; queued experiments run in .dvc/tmp/exps/..., so a relative
path there would make a throwaway database), else ``sqlite:///<cwd>/mlflow.db``.
A bare artifact folder cannot be registered, so an adapter is logged as a pyfunc model whose
artifact is the adapter folder; loading it back gives the folder, which peft loads on the base.

Artifacts live beside a SQLite database, in ``<database folder>/mlruns``. MLflow stores them as
absolute paths, so a moved or copied repository would log to (and read from) the old place: on
opening, paths under another folder's ``mlruns`` are rewritten to this database's (``_relocate``).
A database that cannot be opened (locked by another process, corrupt, an old schema) stops the
stage with ``TrackingStoreError``, naming the file and the fix; ``store_problem`` runs the same
check in the ``check`` stage, before DVC deletes any stage's outputs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personaspace.io import in_repo_root

if TYPE_CHECKING:
    from personaspace.distributed import Ranks

EXPERIMENT = "personaspace"
# MLflow 3 opens an experiment without this tag on its GenAI traces overview; this value marks it as
# model training, so the UI opens on the runs table (the values are MLflow's ExperimentKind enum)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# MLflow 3.17's UI ignores that tag: a global "workflow type" (GenAI by default, remembered by the
# browser) picks the view, and this query selects the runs table (checked in a real browser)
RUNS_TABLE_QUERY = "workflowType=machine_learning"


def runs_table_url(server: str, experiment_id: str) -> str:
    """The MLflow UI page of the experiment's runs table on ``server`` (e.g. http://127.0.0.1:5000)."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}?{RUNS_TABLE_QUERY}"


def server_command(backend_uri: str, port: int) -> list[str]:
    """`mlflow server` on ``backend_uri``, listening on 127.0.0.1:``port`` only."""
    import sys

    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else SQLite in the DVC root (or the working directory)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    # a queued experiment runs in <repo>/.dvc/tmp/exps/<tmp>/: log to the repo's database, not the copy's
    return f"sqlite:///{in_repo_root('mlflow.db')}"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def run_tags(stage: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Tags every run carries: stage, DVC experiment and baseline, git commit, plus ``extra``."""
    tags = {"stage": stage, "dvc_stage": os.environ.get("DVC_STAGE", stage)}
    for key, env in (("dvc_exp_name", "DVC_EXP_NAME"), ("dvc_exp_baseline_rev", "DVC_EXP_BASELINE_REV")):
        if os.environ.get(env):
            tags[key] = os.environ[env]
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    tags.update(extra or {})
    return tags


def _identity(process: Any) -> str:
    """``<pid>-<create_time>``: a pid alone may be reused by a later process."""
    return f"{process.pid}-{process.create_time():.3f}"


def _alive(identity: str) -> bool:
    """Whether the process ``identity`` (from ``_identity``) still runs on this host."""
    import psutil

    pid, _, created = identity.partition("-")
    try:
        process = psutil.Process(int(pid))
        # a zombie has died; only its parent has not collected its exit status yet
        return f"{process.create_time():.3f}" == created and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):
        return False


def invocation() -> tuple[str, str]:
    """(key, command) of the ``dvc`` process this stage runs under; this process itself when none."""
    import psutil

    for process in [psutil.Process(), *psutil.Process().parents()]:
        try:
            argv = process.cmdline()
        except psutil.Error:
            continue
        names = [Path(a).name for a in argv[:3]]
        if "dvc" in names and any(cmd in argv for cmd in ("repro", "exp", "queue")):
            rest = argv[names.index("dvc") + 1 :]
            return _identity(process), "dvc " + " ".join(rest)
    me = psutil.Process()
    return _identity(me), " ".join(me.cmdline())


def _parent_run_id(client: Any, experiment_id: str) -> str:
    """The parent run of this invocation: found by its tag, created by the first stage that runs."""
    key, command = invocation()
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.personaspace_invocation = '{key}'", max_results=1
    )  # fmt: skip
    if found:
        return found[0].info.run_id
    name = parent_run_name(command)
    tags = {
        "personaspace_invocation": key, "personaspace_host": socket.gethostname(), "command": command,
        "stage": "invocation",
    }  # fmt: skip
    tags.update({k: v for k, v in run_tags("invocation").items() if k.startswith(("dvc_exp", "git"))})
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def _study_panel() -> tuple[str, int] | None:
    """(study name, panel size) from the params.yaml of the DVC root (or the working directory)."""
    import yaml

    path = Path(os.environ.get("DVC_ROOT") or Path.cwd()) / "params.yaml"
    try:
        params = yaml.safe_load(path.read_text())
        return str(params["study"]["name"]), int(params["personas"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def parent_run_name(command: str) -> str:
    """``<study> · panel<N> · <DVC experiment name, else the command>``: what the runs table lines up by."""
    label = os.environ.get("DVC_EXP_NAME") or command
    found = _study_panel()
    return f"{found[0]} · panel{found[1]} · {label}" if found else label


def _experiment(client: Any) -> str:
    """The project's experiment id, created marked as model training (see EXPERIMENT_KIND), artifacts beside the DB."""
    import mlflow

    experiment_id = mlflow.set_experiment(EXPERIMENT).experiment_id
    experiment = client.get_experiment(experiment_id)
    database = sqlite_path(mlflow.get_tracking_uri())
    if database is not None:
        _relocate(database, experiment.artifact_location, experiment_id)
    key, kind = EXPERIMENT_KIND
    if experiment.tags.get(key) != kind:
        client.set_experiment_tag(experiment_id, key, kind)
    return experiment_id


# (table, column) where MLflow 3 stores local artifact paths
_ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
                     ("model_versions", "source"))  # fmt: skip


def artifact_root(database: Path) -> Path:
    """Where the artifacts of a SQLite tracking database live: ``mlruns`` beside it."""
    return database.resolve().parent / "mlruns"


def _relocate(database: Path, location: str, experiment_id: str) -> None:
    """Point the stored artifact paths at ``artifact_root(database)`` when they name another folder's ``mlruns``.

    MLflow records ``<cwd>/mlruns/<id>`` at creation (a queued experiment's cwd is a temporary copy) and
    every run's and model's path below it; after a move or copy of the repository they name the old
    place. Only plain local paths of that layout are rewritten, in one transaction; others are left alone.
    """
    old = Path(location)
    new_root = artifact_root(database)
    if "://" in location or not old.is_absolute() or old.name != experiment_id or old.parent.name != "mlruns":
        return
    if old.parent == new_root:
        return
    old_root, root = str(old.parent), str(new_root)
    with contextlib.closing(sqlite3.connect(database, timeout=30)) as connection, connection:
        for table, column in _ARTIFACT_COLUMNS:
            columns = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
            if column in columns:
                connection.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                    f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                    (root, len(old_root) + 1, old_root, len(old_root) + 1, old_root + "/"),
                )


class TrackingStoreError(RuntimeError):
    """The MLflow tracking database cannot be opened; the message names the file and the fix."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI; None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").partition("?")[0])


def store_message(uri: str, error: BaseException) -> str:
    """What went wrong opening the tracking store ``uri`` and how to fix it."""
    database = sqlite_path(uri)
    where = str(database) if database is not None else uri
    text = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
    if "locked" in text or "busy" in text:
        return (
            f"MLflow database {where} is locked by another process ({text}): a stage of another `dvc repro`, "
            "`personaspace ui` / `mlflow server` during a write, or a sqlite3 shell inside a transaction. "
            f"Wait for it to finish or stop it (`fuser {where}` lists the processes holding it), then rerun."
        )
    if any(word in text for word in ("not a database", "malformed", "disk image", "corrupt")):
        return (
            f"MLflow database {where} is corrupt ({text}). Move it aside (`mv {where} {where}.broken`): the next "
            f"stage starts a fresh one (its runs stay in the moved file; `sqlite3 {where}.broken .recover | "
            f"sqlite3 {where}` may rescue them), then rerun."
        )
    if "schema" in text or "upgrade" in text:
        return f"MLflow database {where} has an older schema ({text}); run `mlflow db upgrade {uri}`, then rerun."
    return (
        f"MLflow cannot open its tracking store {where} ({text}); check that the file and its folder are "
        "readable and writable, or set MLFLOW_TRACKING_URI to another store, then rerun."
    )


def store_problem(uri: str | None = None, timeout_s: float = 2.0) -> str | None:
    """None if the tracking database opens, reads whole and takes a write now; else ``store_message``'s text.

    Quick (a SQLite ``quick_check`` and an empty write transaction, waiting at most ``timeout_s`` for a
    lock); only SQLite stores are checked, a server store is not contacted. A missing file is fine: the
    first stage creates it.
    """
    uri = uri or tracking_uri()
    database = sqlite_path(uri)
    if database is None or not database.exists():
        return None
    try:
        connection = sqlite3.connect(f"{database.resolve().as_uri()}?mode=rw", uri=True, timeout=timeout_s,
                                     isolation_level=None)  # fmt: skip
        with contextlib.closing(connection):
            found = [row[0] for row in connection.execute("PRAGMA quick_check")]
            if found != ["ok"]:
                raise sqlite3.DatabaseError(f"database disk image is malformed: {'; '.join(found[:3])}")
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("ROLLBACK")
    except sqlite3.Error as exc:
        return store_message(uri, exc)
    return None


@contextmanager
def _store_errors(uri: str) -> Iterator[None]:
    """Errors opening the tracking store as one ``TrackingStoreError`` naming the database and the fix."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (sqlite3.Error, SQLAlchemyError, MlflowException) as exc:
        if (
            isinstance(exc, MlflowException)
            and not isinstance(exc.__cause__ or exc.__context__, sqlite3.Error | SQLAlchemyError)
            and "schema" not in str(exc)
        ):
            raise
        raise TrackingStoreError(store_message(uri, exc)) from None


def _end_dead_runs(client: Any, experiment_id: str) -> None:
    """End the RUNNING runs whose process on this host has died: stages KILLED, their parents FAILED.

    A parent also ends FAILED when its own ``dvc`` process has died (killed before its last stage).
    Runs of other hosts are left alone: their processes cannot be checked from here.
    """
    running = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.personaspace_host = '{socket.gethostname()}'",
    )  # fmt: skip
    failed_parents = set()
    for run in running:
        tags = run.data.tags
        if "personaspace_process" in tags and not _alive(tags["personaspace_process"]):
            client.set_terminated(run.info.run_id, "KILLED")
            if "mlflow.parentRunId" in tags:
                failed_parents.add(tags["mlflow.parentRunId"])
        elif "personaspace_invocation" in tags and not _alive(tags["personaspace_invocation"]):
            failed_parents.add(run.info.run_id)
    for parent in failed_parents:
        client.set_terminated(parent, "FAILED")


def _invocation_status(client: Any, experiment_id: str, parent: str) -> str:
    """FAILED once any stage of the invocation failed or was killed, else FINISHED."""
    if client.get_run(parent).info.status == "FAILED":
        # failed by a stage, or by _end_dead_runs when its dvc died (no stage of it FAILED then): it stays failed
        return "FAILED"
    # one query per status: MLflow's search takes IN only on run_id
    failed = any(
        client.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}' and attributes.status = '{status}'",
            max_results=1,
        )
        for status in ("FAILED", "KILLED")
    )  # fmt: skip
    return "FAILED" if failed else "FINISHED"


class Terminated(SystemExit):
    """SIGTERM as an exception, so the stage's run ends KILLED; uncaught, the process exits 143 as on SIGTERM."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` within the block; the previous handler is restored after it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python runs signal handlers only in the main thread, and only it may install them
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        # None: the previous handler was not installed from Python; the default is the best guess
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


# Library messages every stage run repeats and nobody can act on (48 of them in a default study's couple stages):
# transformers' v6 rename (TRL and peft read the old name), MLflow's notes on the adapter wrapper (no predict
# to type: it only carries the adapter folder; CloudPickle of this module's own class).
KNOWN_WARNINGS = (
    (FutureWarning, r"`(is_)?gradient_checkpointing` is deprecated and will be removed in v6"),
    (UserWarning, r".*Add type hints to the `predict` method"),
)
KNOWN_LOG_MESSAGES = {"mlflow.pyfunc": "Passing a Python object as `python_model` causes it to be serialized"}


def quiet_known_warnings() -> None:
    """Silence exactly the library messages of ``KNOWN_WARNINGS`` / ``KNOWN_LOG_MESSAGES``; all others still show."""
    import logging
    import warnings

    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for logger, start in KNOWN_LOG_MESSAGES.items():
        logging.getLogger(logger).addFilter(lambda record, start=start: not record.getMessage().startswith(start))


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    study: str | None = None,
    ranks: Ranks | None = None,
) -> Iterator[Any]:
    """An MLflow run for one stage execution, nested under the invocation's parent run.

    ``study`` (the preset's name) tags both the run and its parent, so runs filter study by study.
    Of a stage's several ranks (``personaspace.distributed``) only rank 0 has a run; the others get None.

    Ends the runs of dead processes first (see the module docstring). The run ends FINISHED, KILLED on
    SIGTERM or KeyboardInterrupt, FAILED on any other exception, which is re-raised.
    """
    if ranks is not None and not ranks.main:
        yield None
        return
    import mlflow
    import psutil
    from mlflow import MlflowClient

    quiet_known_warnings()
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with _store_errors(uri):
        client = MlflowClient()
        experiment_id = _experiment(client)
        _end_dead_runs(client, experiment_id)
        parent = _parent_run_id(client, experiment_id)
    if client.get_run(parent).info.status != "FAILED":  # a failed invocation stays failed, even while it goes on
        client.update_run(parent, status="RUNNING")
    identity = {"personaspace_process": _identity(psutil.Process()), "personaspace_host": socket.gethostname()}
    all_tags = {**run_tags(stage, tags), **identity, "mlflow.parentRunId": parent}
    if study:
        all_tags["study"] = study
        client.set_tag(parent, "study", study)
    found = _study_panel()
    if found:
        # params on the parent, so the comparison view lines studies and panels up; set once per run
        for key, value in (("study", found[0]), ("personas", found[1])):
            with contextlib.suppress(mlflow.exceptions.MlflowException):
                client.log_param(parent, key, str(value))
    status = "FAILED"
    with _sigterm_raises():
        run = mlflow.start_run(run_name=os.environ.get("DVC_STAGE", stage), tags=all_tags)
        try:
            mlflow.log_params({k: str(v) for k, v in params.items()})
            yield run
            status = "FINISHED"
        except (Terminated, KeyboardInterrupt):
            status = "KILLED"
            raise
        finally:
            mlflow.end_run(status)
            # a stage cannot know it is the invocation's last one: the parent always shows the outcome so far
            client.set_terminated(parent, _invocation_status(client, experiment_id, parent))


def log_to_parent(metrics: Mapping[str, float], params: Mapping[str, Any]) -> None:
    """Headline metrics and params on this invocation's parent run too, so runs compare panel by panel."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    parent = _parent_run_id(client, mlflow.get_experiment_by_name(EXPERIMENT).experiment_id)
    for key, value in metrics.items():
        client.log_metric(parent, key, float(value))
    for key, value in params.items():
        # a param is set once per run; a second condition's regress stage logs the same value again
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.log_param(parent, key, str(value))


def log_artifacts_to_parent(paths: Sequence[Path], artifact_path: str) -> None:
    """Files logged on this invocation's parent run too (the study's report), under ``artifact_path``."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    parent = _parent_run_id(client, mlflow.get_experiment_by_name(EXPERIMENT).experiment_id)
    for path in paths:
        client.log_artifact(parent, str(path), artifact_path)


def log_history(history: Sequence[Mapping[str, Any]], prefix: str = "train") -> None:
    """A training loss curve: one metric point per logged step."""
    import mlflow

    for entry in history:
        for key, value in entry.items():
            if key != "step" and value is not None:
                mlflow.log_metric(f"{prefix}_{key}", float(value), step=int(entry["step"]))


def _adapter_model() -> Any:
    """A pyfunc model whose only job is to carry the adapter folder as its artifact."""
    import mlflow

    class AdapterModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            self.adapter = context.artifacts["adapter"]

        def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
            raise NotImplementedError("load the adapter folder with peft on its base model (download_adapter)")

    return AdapterModel()


def registered_name(condition: str, recipe: str, source: str, dataset: str, arm: str | None = None) -> str:
    """The model-registry name of a coupling adapter (one version per seed, aliased seed<N>): a couple item's
    ``couple-<condition>-<recipe>-<source>-<dataset>`` (S4's steered arms add ``-<arm>``)."""
    return f"couple-{condition}-{recipe}-{source}-{dataset}" + (f"-{arm}" if arm else "")


def register_adapter(
    adapter_dir: Path, base_model: str, name: str, alias: str, tags: Mapping[str, str] | None = None
) -> int:
    """Log ``adapter_dir`` as a pyfunc model in the active run, register it as ``name``, set ``alias``."""
    import mlflow
    from mlflow import MlflowClient

    info = mlflow.pyfunc.log_model(
        name="adapter", python_model=_adapter_model(), artifacts={"adapter": str(adapter_dir)},
        registered_model_name=name, metadata={"base_model": base_model}, pip_requirements=[],
    )  # fmt: skip
    client = MlflowClient()
    version = int(info.registered_model_version)
    client.set_registered_model_alias(name, alias, version)
    for key, value in {"base_model": base_model, **(tags or {})}.items():
        client.set_model_version_tag(name, str(version), key, value)
    return version


def download_adapter(model_uri: str, dst: Path | None = None) -> Path:
    """The adapter folder of a registered model (``models:/NAME@ALIAS``), downloaded locally."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst) if dst else None))
    candidates = [p.parent for p in root.rglob("adapter_config.json")]
    if len(candidates) != 1:
        raise FileNotFoundError(f"{model_uri}: expected one adapter folder in the model, found {len(candidates)}")
    return candidates[0]
