"""Atomic outputs: write to a temporary sibling, then rename, so a killed stage leaves no half file.

>>> from personaspace.io import write_parquet, write_json
>>> write_json({"n": 1}, "metrics/x.json")                                     # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (file or folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def record_timing(path: Path | str, stage: str, values: dict[str, float]) -> None:
    """Set ``stage``'s entry of a wall-time file (one JSON object keyed by stage), atomically.

    Wall times differ on every run, so they live in a file no stage declares as an output: DVC
    lists it as a top-level metric (shown by `dvc metrics show`, never hashed into dvc.lock).
    """
    path = Path(path)
    try:
        timings = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:  # e.g. a merge conflict in this git-tracked file: times are not worth a failure
        timings = {}
    timings[stage] = values
    write_json(timings, path)


def write_parquet(df: pd.DataFrame, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays -> plain Python, so JSON holds plain floats, ints and bools."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_text(data: Any) -> str:
    """Stable JSON: sorted keys, no NaN (undefined statistics are null with a reason)."""
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False, default=_plain) + "\n"


def write_json(data: Any, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(data))


class OutputError(ValueError):
    """An output folder a command may not replace; the message names it and says why."""


def check_replaceable(folder: Path | str, manifest: str) -> None:
    """Raise OutputError unless ``folder`` is absent, empty, or holds only files its ``manifest`` lists.

    A command replaces its own previous output (listed by ``write_manifest``), never a file it did not write.
    """
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a folder")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*")} - {manifest}
    if not present:
        return
    try:
        written = set(json.loads((folder / manifest).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputError(f"{folder} is not empty and has no readable {manifest}: not this command's output") from None
    foreign = sorted(present - written)
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"{folder} holds files this command did not write: {listed}")


def write_manifest(folder: Path | str, manifest: str) -> None:
    """List every file now in ``folder`` in ``folder/manifest``, so that a later run may replace them."""
    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.name != manifest)
    (folder / manifest).write_text(json_text({"files": files}))


def repo_root() -> Path:
    """The repository a stage works for: $DVC_ROOT (else the working directory), mapped back from the
    temporary copy a queued experiment runs in (``<repo>/.dvc/tmp/exps/<name>/``)."""
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def in_repo_root(path: Path | str) -> Path:
    """``path`` as given when absolute, else under ``repo_root()``: caches that outlive a queued experiment's copy."""
    path = Path(path)
    return path if path.is_absolute() else repo_root() / path
