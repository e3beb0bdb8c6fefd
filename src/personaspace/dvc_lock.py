"""A dvc.lock cut short, and the way back.

>>> recover_lock(Path("."))                                   # doctest: +SKIP
'dvc.lock could not be read (...); moved to dvc.lock.broken-1, the committed dvc.lock restored; ...'

DVC (3.67) writes dvc.lock in place (``dvc/utils/serialize/_common.py``: ``open(path, "w+")``, then
dump), so a Ctrl-C in the second after a stage ends can leave it truncated, and every DVC command then
fails. Nothing of value is lost with it: each stage's outputs are in DVC's cache and run cache, the
eval cells in their own cache. ``recover_lock`` sets the broken file aside (it deletes nothing) and
restores the committed one; the next ``dvc repro`` restores trained and sampled stages from the run
cache and reruns only the cheap stages whose metrics DVC does not cache.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml


def lock_problem(text: str) -> str | None:
    """Why ``text`` is not a whole dvc.lock, or None.

    DVC's own lockfile schema first; then what a cut can leave valid: every stage of this project has
    outputs, and DVC ends the file with a newline.
    """
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA
    from voluptuous import Invalid

    try:
        data = yaml.safe_load(text)
        COMPILED_LOCKFILE_SCHEMA(data)
    except yaml.YAMLError as err:
        return f"not YAML ({str(err).splitlines()[0]})"
    except Invalid as err:
        return f"not DVC's lockfile schema ({err})"
    cut = [name for name, entry in data["stages"].items() if not entry.get("outs")]
    if cut:
        return f"stages without outputs: {cut[:3]} (cut short while DVC wrote it)"
    return None if text.endswith("\n") else "it does not end with a newline (cut short while DVC wrote it)"


def recover_lock(root: Path) -> str:
    """Set a broken ``root/dvc.lock`` aside and restore git's committed one; a message saying what was done."""
    lock = root / "dvc.lock"
    problem = lock_problem(lock.read_text(errors="replace")) if lock.exists() else None
    if problem is None:
        return f"{lock} is readable: nothing to do"
    n = 1
    while (root / f"dvc.lock.broken-{n}").exists():
        n += 1
    aside = root / f"dvc.lock.broken-{n}"
    lock.rename(aside)
    committed = subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=root, capture_output=True, text=True)
    restored = committed.returncode == 0 and lock_problem(committed.stdout) is None
    if restored:
        lock.write_text(committed.stdout)
    what = "the committed dvc.lock restored" if restored else "no committed dvc.lock to restore (DVC starts a new one)"
    return (
        f"{lock} could not be read ({problem}); moved to {aside.name}, {what}. Next: `dvc repro` (or your `dvc exp "
        "run -S ...` again): trained and sampled stages come back from DVC's run cache and the eval cell cache; "
        "only stages whose metrics DVC does not cache run again, in seconds."
    )
