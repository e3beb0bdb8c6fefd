"""Cluster bootstrap speed: 10k resamples over a 48 x 48 x 20 x 10 completion table (issue 4's target: < 10 s).

    python benchmarks/cluster_bootstrap.py --out benchmarks/results/cluster_bootstrap_cpu.json

The table is 48 sources x 48 eval personas x 20 questions x 10 samples = 460,800 completions per
condition; clusters are (eval_persona, question_id), 960 of them. Times include reducing the
completions to per-cluster sums.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from personaspace.io import write_json
from personaspace.stats import cluster_bootstrap_difference, cluster_bootstrap_rate


def completion_table(condition: str, rate: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    shape = (48, 48, 20, 10)
    index = pd.MultiIndex.from_product(
        [range(s) for s in shape], names=["source", "eval_persona", "question_id", "sample_idx"]
    )
    return pd.DataFrame({"condition": condition, "fired": rng.random(np.prod(shape)) < rate}, index=index).reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cluster_bootstrap_cpu.json"))
    args = parser.parse_args()
    c1, c2 = completion_table("c1", 0.2, 0), completion_table("c2", 0.3, 1)
    both = pd.concat([c1, c2], ignore_index=True)
    clusters = ["eval_persona", "question_id"]
    start = time.perf_counter()
    rate = cluster_bootstrap_rate(c1, clusters, args.resamples, 0.95, seed=0)
    rate_s = time.perf_counter() - start
    start = time.perf_counter()
    diff = cluster_bootstrap_difference(both, "condition", "c1", "c2", clusters, args.resamples, 0.95, seed=0)
    diff_s = time.perf_counter() - start
    result = {
        "benchmark": "cluster_bootstrap",
        "rows_per_condition": len(c1),
        "clusters": diff["n_clusters"],
        "resamples": args.resamples,
        "rate_seconds": rate_s,
        "difference_seconds": diff_s,
        "difference": {k: diff[k] for k in ("estimate", "percentile", "bca", "p_two_sided")},
        "rate": {k: rate[k] for k in ("estimate", "percentile", "bca")},
        "target_seconds": 10,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
    }
    print(
        f"rate: {rate_s:.2f} s, difference: {diff_s:.2f} s ({args.resamples} resamples, {diff['n_clusters']} clusters)"
    )
    write_json(result, args.out)


if __name__ == "__main__":
    main()
