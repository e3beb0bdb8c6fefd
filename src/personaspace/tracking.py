"""MLflow: where runs go, one run per stage execution, and the adapter registry.

>>> with stage_run("couple", params={"recipe": "smol"}, tags={"persona": "librarian"}) as run:  # doctest: +SKIP
...     log_history(history)
>>> register_adapter(adapter_dir, base_model="models/base", name="couple-base-smol-librarian",
...                  alias="seed0", tags={"persona": "librarian"})                              # doctest: +SKIP
>>> adapter_path = download_adapter("models:/couple-base-smol-librarian@seed0")                 # doctest: +SKIP

Every stage run is nested under one parent run per ``dvc repro`` / ``dvc exp run`` invocation:
the stages of one invocation find the parent by a tag keyed on the DVC process (its pid and start
time), so a stage run by hand gets a parent of its own.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///$DVC_ROOT/mlflow.db``
(DVC exports DVC_ROOT to stages; queued experiments run in .dvc/tmp/exps/..., so a relative
path there would make a throwaway database), else ``sqlite:///<cwd>/mlflow.db``.
A bare artifact folder cannot be registered, so an adapter is logged as a pyfunc model whose
artifact is the adapter folder; loading it back gives the folder, which peft loads on the base.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXPERIMENT = "personaspace"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else SQLite in the DVC root (or the working directory)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 2):
        # a queued experiment runs in <repo>/.dvc/tmp/exps/<tmp>/: log to the repo's database, not the copy's
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            root = Path(*parts[:i])
            break
    return f"sqlite:///{root / 'mlflow.db'}"


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
            return f"{process.pid}-{process.create_time():.3f}", "dvc " + " ".join(rest)
    me = psutil.Process()
    return f"{me.pid}-{me.create_time():.3f}", " ".join(me.cmdline())


def _parent_run_id(client: Any, experiment_id: str) -> str:
    """The parent run of this invocation: found by its tag, created by the first stage that runs."""
    key, command = invocation()
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.personaspace_invocation = '{key}'", max_results=1
    )  # fmt: skip
    if found:
        return found[0].info.run_id
    name = os.environ.get("DVC_EXP_NAME") or command
    tags = {"personaspace_invocation": key, "command": command, "stage": "invocation"}
    tags.update({k: v for k, v in run_tags("invocation").items() if k.startswith(("dvc_exp", "git"))})
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run for one stage execution, nested under the invocation's parent run."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.set_experiment(EXPERIMENT)
    client = MlflowClient()
    parent = _parent_run_id(client, experiment.experiment_id)
    all_tags = {**run_tags(stage, tags), "mlflow.parentRunId": parent}
    status = "FAILED"
    try:
        with mlflow.start_run(run_name=os.environ.get("DVC_STAGE", stage), tags=all_tags) as run:
            mlflow.log_params({k: str(v) for k, v in params.items()})
            yield run
        status = "FINISHED"
    finally:
        # the parent ends with its latest stage (a stage cannot know it is the last one)
        client.set_terminated(parent, status)


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
