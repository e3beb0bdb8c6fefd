"""Content fingerprints of model and adapter folders, recorded at training and checked on every read.

>>> fingerprint_dir(Path("models/adapters/base/ds1a2b3c4d/smol/librarian/seed0"))   # doctest: +SKIP
'3f1c...'

A training stage writes its record (``training.json``, ``pretrain.json``) with ``record_fingerprint``;
``fingerprint_dir`` then refuses a folder whose files changed since, so a flipped byte in an adapter
is an error that names the folder and the way back, never a silently different eval.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RECORDS = ("training.json", "pretrain.json")  # a trained folder's record: what the training wrote besides the weights


class CacheError(RuntimeError):
    """A cached file no longer holds what was written: the message names it and the way back."""


def fingerprint_dir(path: Path, ignore: Sequence[str] = RECORDS) -> str:
    """sha256 over a folder's file names and contents (a model or an adapter), training records left out.

    The records describe the training (rows, steps, losses), not the weights; leaving them out keeps
    a retrain's cells cached whenever its adapter files are the same. A record that holds the
    fingerprint its training saw (``record_fingerprint``) is checked: a folder edited since (a flipped
    byte in an adapter) raises CacheError instead of being sampled from.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file() and p.name not in ignore):
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    found = digest.hexdigest()
    for name in RECORDS:
        record = Path(path) / name
        recorded = json.loads(record.read_text()).get("fingerprint") if record.is_file() else None
        if recorded is not None and recorded != found:
            raise CacheError(
                f"{path}: its files changed after training wrote them (fingerprint {found[:12]} is not the "
                f"{recorded[:12]} recorded in {name}); restore the stage's output with `dvc checkout {path}` "
                "(or retrain it: `dvc repro --force <its stage>`)"
            )
    return found


def record_fingerprint(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the folder's fingerprint, to be written as its training record (see fingerprint_dir)."""
    return record | {"fingerprint": fingerprint_dir(path, ignore=RECORDS)}
