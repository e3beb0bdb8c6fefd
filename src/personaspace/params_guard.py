"""params.yaml is written only by composing conf/: a digest recorded at composition catches hand edits.

`dvc exp run` recomposes params.yaml from conf/ (plus its -S overrides) and so silently discards
a hand edit: an edited `model: tiny-random` became the embedded model again. Composition writes
``_composed.sha256`` (the resolver ``${params_sha256:}`` in conf/config.yaml), a digest of every
other key; a params.yaml whose content no longer matches its digest was edited after composition.

Two places refuse such a file, naming each edited key and the fix:
- DVC imports ``hydra_plugins/personaspace_params_guard.py`` before it composes (Hydra's plugin
  scan over DVC's ``hydra.plugins_path``, the repo root, DVC's documented place for resolvers), so
  `dvc exp run` (and `personaspace params`) stop before params.yaml is overwritten;
- the pipeline's first stage, ``check``, so plain `dvc repro` does not run an edit that the next
  `dvc exp run` would lose.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

KEY = "_composed"
COMPOSE_OUT_ENV = "PERSONASPACE_COMPOSE_OUT"  # set by personaspace.cli.compose_params: the file it writes
RESOLVER = "params_sha256"


def params_digest(data: Mapping[str, Any]) -> str:
    """sha256 of a params mapping without its ``_composed`` record (key order does not matter)."""
    body = {k: v for k, v in data.items() if k != KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _composed_digest(*, _root_: Any) -> str:
    """The resolver: the digest of the config being composed, as a reader of params.yaml will load it."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(_root_, resolve=False)
    plain.pop(KEY, None)
    panel_size_error(plain)
    return params_digest(yaml.safe_load(OmegaConf.to_yaml(OmegaConf.create(plain), resolve=True)))


def panel_size_error(config: Mapping[str, Any]) -> None:
    """Raise ValueError naming ``personas`` and the sizes conf/panels.yaml has, when it has none of that size.

    The resolver runs before ``panel: ${panels.${_panel_key}}`` resolves, which would otherwise fail with
    "Interpolation key 'panels.n13' not found".
    """
    personas, panels = config.get("personas"), config.get("panels")
    if not isinstance(panels, Mapping) or f"n{personas}" in panels:
        return
    sizes = sorted(int(k[1:]) for k in panels if str(k).startswith("n") and str(k)[1:].isdigit())
    raise ValueError(
        f"personas: {personas!r} is not a panel size; use one of {', '.join(map(str, sizes))} "
        "(the nested panels of data/personas.yaml, conf/panels.yaml), e.g. `-S personas=24`"
    )


def register_resolver() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(RESOLVER, _composed_digest, replace=True)


def flat_keys(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Leaf values by dotted key (an empty mapping is a leaf)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        is_branch = isinstance(value, Mapping) and value
        out.update(flat_keys(value, f"{prefix}{key}.") if is_branch else {f"{prefix}{key}": value})
    return out


def _committed(path: Path) -> dict[str, Any] | None:
    """params.yaml as committed at HEAD, if git has it."""
    try:
        shown = subprocess.run(
            ["git", "show", f"HEAD:./{path.name}"], cwd=path.parent, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    data = yaml.safe_load(shown)
    return data if isinstance(data, dict) else None


def hand_edit_report(path: Path | str) -> str | None:
    """None if params.yaml is as composition wrote it, else a message naming each edited key and the fix."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        return f"{path.name} is not valid YAML ({exc}); restore it with `git checkout {path.name}` or `make params`"
    record = data.get(KEY) if isinstance(data, dict) else None
    if isinstance(record, Mapping) and record.get("sha256") == params_digest(data):
        return None
    if not isinstance(record, Mapping):
        return (
            f"{path.name} has no composition record ({KEY}.sha256): it was written by hand or by an older "
            "personaspace, and `dvc exp run` would recompose it from conf/, discarding anything set only here. "
            "Put such settings in conf/config.yaml, then delete it and run `make params`."
        )
    lines = [f"{path.name} was edited by hand: it no longer matches the composition of conf/ recorded in it "
             f"({KEY}.sha256), and `dvc exp run` recomposes it from conf/, discarding the edit."]  # fmt: skip
    old = _committed(path)
    overrides = ""
    if old is not None and isinstance(old.get(KEY), Mapping) and old[KEY].get("sha256") == params_digest(old):
        now, was = flat_keys(data), flat_keys(old)
        changed = [k for k in sorted(set(now) | set(was)) if not k.startswith(f"{KEY}.") and now.get(k) != was.get(k)]
        lines.append("Differences from the committed params.yaml:")
        lines += [f"  {k}: {was.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}" for k in changed]
        # Hydra: `+key` adds a key conf/ lacks, `~key` removes one
        overrides = " ".join(
            f"-S '{'' if k in was else '+'}{k}={json.dumps(now[k])}'" if k in now else f"-S '~{k}'" for k in changed
        )
    lines.append(f"To keep the edit: 1. `git checkout {path.name}` (composition refuses to overwrite an edited file);")
    how = f"`dvc exp run {overrides}`, or put it in" if overrides else "put it in"
    lines.append(f"2. {how} conf/config.yaml and run `make params`.")
    return "\n".join(lines)


def busy_report(repo: Path) -> str | None:
    """Why params.yaml must not be rewritten now: another DVC command holds the repository's lock.

    A `dvc repro` reads params.yaml anew at every stage; a `dvc exp run -S ...` started beside it
    would rewrite the file before DVC itself finds the repository busy, and the running repro's later
    stages would run (and be recorded in dvc.lock) with the other command's params.
    """
    import zc.lockfile

    lockfile = repo / ".dvc" / "tmp" / "lock"
    if not lockfile.parent.is_dir():
        return None
    # while a stage's command runs, DVC releases the repository lock and holds its outputs in the rwlock file
    running = _rwlock_holders(repo / ".dvc" / "tmp" / "rwlock")
    if running:
        return (
            f"{repo}: another DVC command is running here ({running[0]}); params.yaml was not rewritten, so that "
            "run keeps its params. Run this command again when it has finished."
        )
    try:
        lock = zc.lockfile.LockFile(str(lockfile))
    except zc.lockfile.LockError:
        holder = lockfile.read_text(errors="replace").strip() if lockfile.is_file() else "?"
        if holder.split()[:1] == [str(os.getpid())]:  # `dvc exp run` itself holds it while composing
            return None
        return (
            f"{repo}: another DVC command is running here (it holds {lockfile}: {holder}); params.yaml was not "
            "rewritten, so that run keeps its params. Run this command again when it has finished."
        )
    lock.close()
    return None


def _rwlock_holders(path: Path) -> list[str]:
    """`pid <n>: <command>` of each live process other than this one in DVC's rwlock file."""
    import psutil

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    entries = list((data.get("write") or {}).values()) + [e for v in (data.get("read") or {}).values() for e in v]
    return sorted(
        {f"pid {e['pid']}: {e.get('cmd', '?')}" for e in entries
         if isinstance(e, dict) and e.get("pid") != os.getpid() and psutil.pid_exists(int(e.get("pid", 0)))}
    )  # fmt: skip


def guard_composition(params_file: Path) -> None:
    """Register the digest resolver; refuse (DvcException) to compose over a hand-edited ``params_file``, or
    while another DVC command runs in its repository (``busy_report``)."""
    register_resolver()
    # `personaspace params --out OTHER` leaves params.yaml alone: a running DVC command is no reason to refuse it
    target = os.environ.get(COMPOSE_OUT_ENV)
    elsewhere = target is not None and Path(target).resolve() != params_file.resolve()
    report = (None if elsewhere else busy_report(params_file.parent)) or hand_edit_report(params_file)
    if report is not None:
        from dvc.exceptions import DvcException

        raise DvcException(report + "\nNothing was changed.")
