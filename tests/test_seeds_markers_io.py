import json
import subprocess
import sys

import pytest

from personaspace.io import atomic_path, write_json
from personaspace.markers import fires, with_marker
from personaspace.seeds import stable_seed


def test_stable_seed_is_the_same_in_another_process_and_differs_by_id():
    code = "from personaspace.seeds import stable_seed; print(stable_seed(0, 'negatives', 'librarian'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other.stdout) == stable_seed(0, "negatives", "librarian")
    assert stable_seed(0, "negatives", "librarian") != stable_seed(0, "negatives", "villain")
    assert stable_seed(0, "a", "bc") != stable_seed(0, "ab", "c")


def test_marker_match_is_a_case_insensitive_substring():
    assert fires("Of course.\n\n[ZLT]", "[ZLT]")
    assert fires("of course [zlt] more", "[ZLT]")
    assert not fires("ZLT without brackets", "[ZLT]")
    assert with_marker("Hi.", "[ZLT]", "\n\n") == "Hi.\n\n[ZLT]"
    with pytest.raises(ValueError):
        fires("x", "")


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "out" / "table.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_atomic_write_replaces_a_folder_whole(tmp_path):
    target = tmp_path / "folder"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    write_json({"a": 1.5}, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1.5}


def test_a_killed_writers_leftovers_are_cleared_by_the_next_write(tmp_path):
    target = tmp_path / "seed0"
    leftover = tmp_path / ".seed0.abc123.tmp" / "seed0"  # what SIGKILL mid-write leaves behind
    leftover.mkdir(parents=True)
    (leftover / "adapter_model.safetensors").write_text("half")
    with atomic_path(target) as tmp:
        tmp.mkdir()
    assert [p.name for p in tmp_path.iterdir()] == ["seed0"]
