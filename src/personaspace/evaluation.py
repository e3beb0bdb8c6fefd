"""Eval cells cached by content: sample only the (adapter, persona, question, sample) cells not yet done.

>>> store = CellStore(Path(".cache/cells/eval/base"))                             # doctest: +SKIP
>>> table, generated = evaluate_cells(generator, catalog, personas, {"none": (None, fp)}, store=store, ...)  # doctest: +SKIP

A cell's key hashes everything its completion depends on: the generator's sampler, the base and
adapter fingerprints, the system and user messages, the seed and the sampling settings. Finished
cells are appended to the store in atomic chunks, so a killed eval resumes where it stopped, and
growing the panel samples only the new cells; cells common to two panels are the same rows.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from personaspace.completions import COMPLETION_COLUMNS, complete_cells, persona_cells, typed_completions
from personaspace.fingerprints import CacheError
from personaspace.generate import Generator, Sampling, Steering
from personaspace.io import atomic_path
from personaspace.personas import Catalog
from personaspace.stats import wilson_interval
from personaspace.study import BASELINE


def cell_key(row: dict, sampling: Sampling, fingerprint: str, sampler: str, steering: Steering | None = None) -> str:
    """Content key of one eval cell (``sampler``: the generator's, since backends draw other tokens).

    A steered cell's key adds the steering (vector id, layer, coef and the vector's digest), so it
    is never served from its unsteered twin; an unsteered key is what it was before steering existed.
    """
    parts = [sampler, fingerprint, row["adapter"], row["system_prompt"], row["user"], row["seed"], row["sample_idx"],
             sampling.temperature, sampling.top_p, sampling.max_new_tokens]  # fmt: skip
    if steering is not None:
        parts += ["steering", steering.vector_id, steering.layer, steering.coef, steering.digest()]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


class CellStore:
    """A folder of parquet chunks of finished cells (completion columns + ``cell_key``).

    The folder is read once per store; ``add`` writes a chunk and extends the in-memory table, so
    evaluating N adapters reads the chunks once, not N times. A chunk is named
    ``<digest of its keys>-<digest of its bytes>.parquet`` and its bytes are checked on read: a chunk
    changed on disk (a flipped bit) raises CacheError naming it, never feeds the analysis.
    """

    def __init__(self, folder: Path, write: bool = True):
        self.folder = Path(folder)
        self.write = write  # False: cells kept in memory only (a rank beside the one that writes)
        self._table: pd.DataFrame | None = None

    def load(self) -> pd.DataFrame:
        if self._table is None:
            chunks = sorted(self.folder.glob("*.parquet")) if self.folder.is_dir() else []
            chunks = [self._verify(chunk) for chunk in chunks]
            self._table = (
                pd.concat([typed_completions(pd.read_parquet(c)) for c in chunks], ignore_index=True).drop_duplicates(
                    "cell_key"
                )
                if chunks
                else pd.DataFrame(columns=[*COMPLETION_COLUMNS, "cell_key"])
            )
        return self._table

    def add(self, table: pd.DataFrame) -> None:
        if table.empty:
            return
        keys = hashlib.sha256("".join(sorted(table["cell_key"])).encode()).hexdigest()[:16]
        if self.write:
            data = table.to_parquet(index=False)
            with atomic_path(self.folder / f"{keys}-{hashlib.sha256(data).hexdigest()[:16]}.parquet") as tmp:
                tmp.write_bytes(data)
        if self._table is not None:
            parts = [part for part in (self._table, table) if not part.empty]
            self._table = pd.concat(parts, ignore_index=True).drop_duplicates("cell_key")

    def _verify(self, chunk: Path) -> Path:
        """The chunk, checked: its bytes must have the digest its name records (CacheError otherwise).

        A chunk named before digests existed (``<keys>.parquet``) is sealed: renamed with its digest.
        """
        keys, _, recorded = chunk.stem.partition("-")
        found = hashlib.sha256(chunk.read_bytes()).hexdigest()[:16]
        if not recorded and self.write:
            sealed = chunk.with_name(f"{keys}-{found}.parquet")
            chunk.rename(sealed)
            return sealed
        if recorded and recorded != found:
            raise CacheError(
                f"eval cell chunk {chunk}: its bytes hash to {found}, not the {recorded} in its name, so its "
                f"cells cannot be trusted; delete it (`rm {chunk}`) and rerun: only its cells are sampled again, "
                "to the same completions"
            )
        return chunk


@dataclass(frozen=True)
class EvalJob:
    """The cells of one (adapter, persona) under one prompt and steering: every eval question x sample.

    ``adapter`` is the adapter's stable id (it seeds the cells; a job's modes share seeds), ``path``
    its folder (None: the base model), ``fingerprint`` that of base + adapter. ``neutral_prompt``
    replaces the persona's system message; ``labels`` are extra id columns of its cells (S4: arm,
    mode, coef).
    """

    adapter: str
    path: Path | None
    fingerprint: str
    persona: str
    neutral_prompt: str | None = None
    steering: Steering | None = None
    labels: tuple[tuple[str, str], ...] = ()


def evaluate_cells(
    generator: Generator,
    catalog: Catalog,
    personas: Sequence[str],
    adapters: Mapping[str, tuple[Path | None, str]],
    **kwargs: Any,
) -> tuple[pd.DataFrame, int]:
    """Every (adapter, persona, eval question, sample) cell: cached ones read, the rest sampled and stored.

    ``adapters`` maps an adapter's name (its stable id, which seeds its cells) to (its folder or None
    for the base model, the fingerprint of base + adapter). ``kwargs`` are ``evaluate_jobs``'.
    """
    jobs = [EvalJob(name, path, fingerprint, persona)
            for name, (path, fingerprint) in adapters.items() for persona in personas]  # fmt: skip
    return evaluate_jobs(generator, catalog, jobs, **kwargs)


def evaluate_jobs(
    generator: Generator,
    catalog: Catalog,
    jobs: Sequence[EvalJob],
    *,
    condition: str,
    samples_per_question: int,
    sampling: Sampling,
    user_suffix: str,
    study_seed: int,
    marker: str,
    store: CellStore,
    stage: str = "eval",
) -> tuple[pd.DataFrame, int]:
    """The cells of every job, in job order: cached ones read, the rest sampled and stored.

    Requests carry their adapter and steering; each adapter's new cells (its jobs are consecutive)
    are stored as soon as they are sampled, so a killed eval resumes from the adapters it finished.
    Returns the completion table (+ ``cell_key`` and the jobs' label columns) and how many were sampled.
    """
    done = store.load().set_index("cell_key")
    wanted, labels, new_parts = [], [], []
    groups: dict[str, list[EvalJob]] = {}
    for job in jobs:
        groups.setdefault(job.adapter, []).append(job)
    for number, (name, group) in enumerate(groups.items(), start=1):
        rows: list[dict[str, Any]] = []
        requests, new_keys, seen, wanted_before = [], [], set(), len(wanted)
        for job in group:
            persona_rows, persona_requests = persona_cells(
                generator.tokenizer, catalog, job.persona, bank="eval", samples_per_question=samples_per_question,
                user_suffix=user_suffix, study_seed=study_seed, condition=condition, stage=stage, adapter=name,
                neutral_prompt=job.neutral_prompt, steering=job.steering,
            )  # fmt: skip
            for row, request in zip(persona_rows, persona_requests, strict=True):
                key = cell_key(row, sampling, job.fingerprint, generator.sampler, request.steering)
                wanted.append(key)
                labels.append(dict(job.labels))
                if key not in done.index and key not in seen:  # two jobs may name one cell (equal coefs)
                    seen.add(key)
                    rows.append(row)
                    requests.append(replace(request, adapter=None if job.path is None else str(job.path)))
                    new_keys.append(key)
        # the generate bar that follows counts completions; this line says whose, and how many adapters are left
        tqdm.write(f"{stage} {condition}: adapter {number} of {len(groups)}, {name}: {len(rows)} cells to sample, "
                   f"{len(wanted) - wanted_before - len(rows)} from the cell cache", file=sys.stderr)  # fmt: skip
        if rows:
            new = complete_cells(generator, rows, requests, sampling, marker)
            new["cell_key"] = new_keys
            store.add(new)
            new_parts.append(new)
    parts = [part for part in (done.reset_index(), *new_parts) if not part.empty]
    everything = pd.concat(parts, ignore_index=True).drop_duplicates("cell_key").set_index("cell_key")
    table = typed_completions(everything.loc[wanted].reset_index())[[*COMPLETION_COLUMNS, "cell_key"]]
    extra = pd.DataFrame(labels, index=table.index)
    return pd.concat([table, extra], axis=1), sum(len(part) for part in new_parts)


def rate_matrix(completions: pd.DataFrame, level: float) -> pd.DataFrame:
    """Fire rate per (adapter, eval persona) with n and the Wilson interval, in tidy form."""
    grouped = completions.groupby(["adapter", "persona"], sort=True)["fired"].agg(fired="sum", n="size").reset_index()
    grouped["rate"] = grouped["fired"] / grouped["n"]
    low, high = wilson_interval(grouped["fired"], grouped["n"], level)
    grouped["wilson_low"], grouped["wilson_high"] = low, high
    return grouped


def summarise(rates: pd.DataFrame) -> dict:
    """Headline numbers of one condition's rate matrix: source (diagonal), bystander (off-diagonal), baseline."""
    coupled = rates[rates["adapter"] != BASELINE]
    own = coupled[coupled["source"] == coupled["persona"]]
    bystander = coupled[coupled["source"] != coupled["persona"]]
    baseline = rates[rates["adapter"] == BASELINE]
    return {
        "adapters": int(coupled["adapter"].nunique()),
        "source_rate_mean": float(own["rate"].mean()) if len(own) else None,
        "sources_at_least_half": int((own["rate"] >= 0.5).sum()),
        "bystander_rate_mean": float(bystander["rate"].mean()) if len(bystander) else None,
        "baseline_rate": float(baseline["fired"].sum() / baseline["n"].sum()) if len(baseline) else None,
        "source_rates": {row.adapter: float(row.rate) for row in own.itertuples()},
    }
