"""The committed dvc.lock, metrics and plot data come from the committed code and params."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import REPO


def _tracked_files() -> set[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return set(listed.split())


def stale_dependencies(status: dict, tracked: set[str]) -> dict[str, list[str]]:
    """Per stage, what changed since dvc.lock was written: code, catalog, params, committed outputs.

    Missing DVC outputs (a fresh clone has no cache) are not staleness; a git-tracked dependency
    that is modified or new, a changed param, a changed command, or a git-tracked output (metrics,
    plot data) whose content differs from the lock's hash is.
    """
    stale: dict[str, list[str]] = {}
    for stage, changes in status.items():
        for change in changes:
            if not isinstance(change, dict):  # e.g. "changed checksum", "always changed"
                stale.setdefault(stage, []).append(str(change))
                continue
            for path, state in change.get("changed deps", {}).items():
                if isinstance(state, dict):  # params: {key: modified|new|deleted}
                    stale.setdefault(stage, []).extend(f"{path}:{key} {how}" for key, how in state.items())
                elif path in tracked or any(t.startswith(f"{path}/") for t in tracked):
                    stale.setdefault(stage, []).append(f"{path} {state}")
            for path, state in change.get("changed outs", {}).items():
                if path in tracked and state == "modified":  # a metrics or plot file not from this lock's run
                    stale.setdefault(stage, []).append(f"{path} {state}")
            if "changed command" in change:
                stale.setdefault(stage, []).append("command")
    return stale


def test_dvc_lock_matches_the_committed_code_and_params():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "status", "--json"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    stale = stale_dependencies(json.loads(result.stdout or "{}"), _tracked_files())
    assert stale == {}, (
        "dvc.lock (and the metrics and README numbers from it) predate these changes; rerun the default "
        f"study with the final code (make run) and commit dvc.lock, metrics/ and plots/: {stale}"
    )


def test_stale_dependencies_ignores_missing_outputs_but_not_code_or_params():
    status = {
        "regress@base": [
            {
                "changed deps": {
                    "data/eval/base": "deleted",
                    "stages/regress.py": "modified",
                    "params.yaml": {"stats": "modified"},
                }
            },
            {"changed outs": {"results/base": "not in cache", "metrics/regress_base.json": "modified"}},
        ],
        "couple@base-librarian-0": [{"changed deps": {"models/base": "deleted"}}],
    }
    tracked = {"stages/regress.py", "src/personaspace/train.py", "metrics/regress_base.json"}
    stale = stale_dependencies(status, tracked)
    assert stale == {
        "regress@base": [
            "stages/regress.py modified",
            "params.yaml:stats modified",
            "metrics/regress_base.json modified",
        ]
    }


def test_metric_keys_are_unique_across_metrics_files_so_dvc_exp_show_needs_no_prefixes():
    def flat(data: dict, prefix: str = "") -> set[str]:
        keys: set[str] = set()
        for key, value in data.items():
            keys |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
        return keys

    seen: dict[str, str] = {}
    files = sorted((REPO / "metrics").rglob("*.json"))
    assert files, "no committed metrics files"
    for path in files:
        for key in flat(json.loads(path.read_text())):
            assert key not in seen, f"{key} is in both {seen[key]} and {path.name}"
            seen[key] = path.name


def test_dvc_lock_carries_no_stale_stages():
    """Every stage in the committed dvc.lock is a stage of the committed pipeline and params (no leftovers
    of stages renamed or of other studies, which `dvc status` never reports)."""
    from personaspace.report.card import stage_names

    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert sorted(set(lock) - set(stage_names(pipeline, params))) == []


def test_the_readmes_compare_command_shows_a_row_for_every_metric_it_keeps_within_120_columns():
    readme = (REPO / "README.md").read_text()
    keep = readme.split("personaspace compare --keep '", 1)[1].split("'", 1)[0]
    result = subprocess.run([sys.executable, "-m", "personaspace.cli", "compare", "--keep", keep], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 120, result.stdout
    rows = [line.split()[1] for line in lines[2:]]
    for pattern in keep.split("|"):
        assert any(re.search(pattern, row) for row in rows), f"no row for {pattern!r}: {rows}"
