"""The reproducibility card of a report: commit, params, input hashes, packages, hardware, stage times, command.

Read at report time from git, dvc.lock, the installed packages, the machine and the MLflow database;
every field has a value (a field that cannot be known says why, never blank).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

PACKAGES = ("personaspace", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "numpy", "pandas",
            "scipy", "statsmodels", "pingouin", "matplotlib", "dvc", "mlflow")  # fmt: skip


def git_state(
    root: Path,
    written: Iterable[str] = ("dvc.lock", "metrics/", "plots/", "timings.json"),
    params_from_command: bool = False,
) -> dict[str, str]:
    """The commit HEAD points at and whether tracked files differ from it. Files the pipeline itself writes
    (``written``: dvc.lock, the git-tracked metrics and plot tables, the wall times) are listed apart: during `dvc repro`
    they differ by design, while a changed source or params file means the run is not the commit's.
    ``params_from_command``: params.yaml is what the card's command composes (`dvc exp run -S ...`), so a
    params.yaml that differs from the commit's is listed apart too."""
    if params_from_command:
        written = (*written, "params.yaml")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        return {"commit": f"unknown (git failed: {exc})", "dirty": "unknown"}
    changed = [line[3:] for line in status.stdout.splitlines() if line.strip()]
    own = [f for f in changed if any(f == w or f.startswith(w) for w in written)]
    other = [f for f in changed if f not in own]
    if other:
        dirty = f"yes: {len(other)} tracked source/params files differ from the commit ({', '.join(other[:5])})"
    else:
        dirty = "no" + (f" (only pipeline-written files differ: {', '.join(own[:5])})" if own else "")
    return {"commit": commit.stdout.strip(), "dirty": dirty}


def input_hashes(lock: Mapping[str, Any], paths: Iterable[str]) -> dict[str, str]:
    """dvc.lock's md5 of each input path: from the stage that wrote it (its outs), else from any stage's deps."""
    outs: dict[str, str] = {}
    deps: dict[str, str] = {}
    for stage in (lock.get("stages") or {}).values():
        for entry in stage.get("outs") or []:
            outs[entry["path"]] = entry.get("md5", "")
        for entry in stage.get("deps") or []:
            deps.setdefault(entry["path"], entry.get("md5", ""))
    found = {}
    for path in paths:
        md5 = outs.get(path) or deps.get(path)
        if not md5:  # a file inside a folder output: the folder's hash covers it
            folder = next((o for o in sorted(outs, key=len, reverse=True) if path.startswith(f"{o}/")), None)
            md5 = f"{outs[folder]} (folder {folder})" if folder else ""
        found[path] = md5 or "not in dvc.lock (run `dvc repro` to record it)"
    return found


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Installed versions (``not installed`` where a package is absent)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def hardware() -> dict[str, str]:
    """The machine: platform, CPU, cores, memory and any CUDA devices torch sees."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cores": str(os.cpu_count())}  # fmt: skip
    try:
        import psutil

        info["memory"] = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:  # psutil is a dependency of the project; kept optional here
        info["memory"] = "unknown (psutil not installed)"
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["gpus"] = ", ".join(gpus) if gpus else "none"
    return info


def stage_seconds(tracking_uri: str, study: str, stages: Iterable[str]) -> dict[str, str]:
    """Wall time of each DVC stage's newest MLflow run of this study; a stage DVC restored from its cache ran
    no process here, so it has no run: said so."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    wanted = list(stages)
    experiment = mlflow.get_experiment_by_name("personaspace")
    found: dict[str, str] = {}
    if experiment is not None:
        runs = MlflowClient().search_runs(
            [experiment.experiment_id], filter_string=f"tags.study = '{study}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=5000,
        )  # fmt: skip
        for run in runs:
            name = run.data.tags.get("dvc_stage")
            if name in wanted and name not in found and run.info.end_time:
                found[name] = f"{(run.info.end_time - run.info.start_time) / 1000:.1f} s"
    missing = "no MLflow run (the stage logs none, as `check`, or DVC restored its outputs from its cache)"
    times = {s: found.get(s, missing) for s in wanted}
    total = sum(float(v.removesuffix(" s")) for v in found.values() if v.endswith(" s"))
    times["all stages above (sum)"] = f"{total:.1f} s ({total / 60:.1f} min)"
    return times


def stage_names(pipeline: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
    """The stages of ``pipeline`` (dvc.yaml, parsed) for these params: plain stages, and each ``foreach:
    ${graph.<key>}`` expanded over that graph entry (dvc.lock may still hold stages of older pipelines)."""
    names = []
    for name, spec in (pipeline.get("stages") or {}).items():
        loop = spec.get("foreach") if isinstance(spec, dict) else None
        if loop is None:
            names.append(name)
            continue
        key = str(loop).removeprefix("${graph.").removesuffix("}")
        items = (params.get("graph") or {}).get(key) or []
        names += [f"{name}@{item}" for item in items]  # a dict's keys or a list's items, as DVC names them
    return names


# params composition derives from the others (the study's stage items, the panel); never an override
DERIVED = ("graph", "panel", "panels", "_panel_key", "_composed")


def _override(key: str, value: Any) -> str:
    """One Hydra override ``key=value`` (values in JSON, which Hydra's grammar reads)."""
    return (
        f"{key}={value}"
        if isinstance(value, str) and value.replace("-", "").replace("_", "").isalnum()
        else (f"{key}={json.dumps(value)}")
    )


def _compose(root: Path, overrides: list[str]) -> dict[str, Any]:
    """params.yaml as `dvc exp run -S ...` composes it from ``root/conf`` (DVC's own Hydra call)."""
    from dvc.utils.hydra import compose_and_dump

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "params.yaml"
        compose_and_dump(out, str(root / "conf"), None, "config", str(root), overrides)
        return yaml.safe_load(out.read_text())


def command_overrides(params: Mapping[str, Any], root: Path) -> tuple[list[str], bool]:
    """The `-S` overrides that compose ``params`` from ``root/conf``, and whether composing them gives it exactly.

    The study, scale, panel and model, then every other leaf key whose value differs from what those
    four compose to (so `dvc exp run -S eval.temperature=0.5` is carried into the command).
    """
    from personaspace.params_guard import flat_keys, params_digest

    base = [f"study={params['study']['name']}", f"scale={params['scale']}", f"personas={params['personas']}",
            f"model={params['model']}"]  # fmt: skip
    try:
        composed = _compose(root, base)
        was, now = flat_keys(composed), flat_keys(params)
        extra = [_override(k, now[k]) for k in sorted(now) if not k.startswith(DERIVED) and was.get(k) != now[k]]
        exact = params_digest(_compose(root, base + extra) if extra else composed) == params_digest(params)
    except Exception:  # conf/ no longer composes (or params.yaml was hand-edited): the card counts params.yaml dirty
        return base, False
    return base + extra, exact


def reproduce_command(params: Mapping[str, Any], commit: str, overrides: list[str] | None = None) -> str:
    """The shell commands that rebuild this report from a clone: the commit, then the study's experiment."""
    if overrides is None:
        overrides = [f"study={params['study']['name']}", f"scale={params['scale']}",
                     f"personas={params['personas']}", f"model={params['model']}"]  # fmt: skip
    flags = " ".join(f"-S {shlex.quote(o)}" for o in overrides)
    return f"git checkout {commit} && make setup && .venv/bin/dvc exp run {flags}"


def study_params_yaml(params: Mapping[str, Any]) -> str:
    """The params that define the study (design, sizes, recipes used, model), as YAML."""
    study = params["study"]
    keep = {"seed": params["seed"], "model": params["model"], "scale": params["scale"],
            "personas": params["personas"], "marker": params["marker"], "study": study,
            "recipes": {r: params["recipes"][r] for r in study["recipes"]}, "datagen": params["datagen"],
            "eval": params["eval"], "couple": params["couple"], "probes": params["probes"]}  # fmt: skip
    return yaml.safe_dump(keep, sort_keys=False, allow_unicode=True)
