"""End to end: the real `dvc repro` and `dvc exp run` in a temporary copy of the repo, tiny model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from personaspace.completions import COMPLETION_COLUMNS
from personaspace.marker_datasets import MARKER_DATASET_COLUMNS
from personaspace.personas import load_catalog

from .conftest import REPO

# Settings a test changes in conf/config.yaml: the tiny random-init model and a recipe under which
# it really couples (measured on 3 sources: own rate 0.3-0.6, bystanders ~0.09, baseline 0). Its
# logits are less peaked than the default tiny model's (initializer_range 0.5, not 1.0: at 1.0 the
# marker tokens start at a loss of ~27 and no recipe moved them); a colder eval keeps the nucleus
# small. Sizes go in a `tiny` scale (the laptop's with TINY_SCALE): 2-token completions, so that a completion plus the
# 6-token marker fits in 8; both studies train `smol` at that scale.
TINY = {
    "model": "tiny-random",
    "models": {"tiny-random": {"architecture": {"initializer_range": 0.5}}},
    "generation": {"batch_size": 64},
    "datagen": {"drop_truncated": False},
    "eval": {"temperature": 0.3},
    "recipes": {
        "smol": {"loss": "completion", "epochs": 32, "batch_size": 20, "learning_rate": 0.03, "schedule": "constant"}
    },
    "regress": {"primary_layer": 1},
    "stats": {"power_simulations": 200, "cv_repeats": 2, "bootstrap_resamples": 500},
}
TINY_SCALE = {
    "scale": "tiny",
    "datagen": {"user_suffix": "", "samples_per_question": 1, "max_new_tokens": 2, "positives": 10,
                "negatives_per_persona": 5},
    "eval": {"user_suffix": "", "samples_per_question": 1, "max_new_tokens": 8},
}  # fmt: skip
TINY_S4_SOURCES = ("librarian", "villain", "comedian")
PANEL_STAGES = {"check", "base", "eval@panel-base", "centroids@panel-raw", "regress@panel-base", "report@panel"}


def _ds(repo: Path) -> str:
    """The marker datasets' id of the repo's composed study (personaspace.study.dataset_id)."""
    markers = yaml.safe_load((repo / "params.yaml").read_text())["graph"]["markers"]
    return next(iter(markers.values()))["dataset"]


def _merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        base[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


def _run(args: list[str], cwd: Path) -> str:
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=str(cwd / "src"),  # the copy's package, not the checkout's
        HF_HUB_OFFLINE="1",
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
    )  # fmt: skip
    # each repo logs to its own mlflow.db ($DVC_ROOT); mlflow.set_tracking_uri in this process (_check_mlflow)
    # exports MLFLOW_TRACKING_URI, which would send a second clone's runs to the first repo's database
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result.stdout + result.stderr


def _tiny_repo(tmp_path_factory) -> Path:
    """A git repo holding this checkout's tracked and unignored files, configured for the tiny model."""
    repo = tmp_path_factory.mktemp("pipeline") / "repo"
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    for stale in ("dvc.lock", "mlflow.db"):
        (repo / stale).unlink(missing_ok=True)
    config = repo / "conf" / "config.yaml"
    composed = _merge(yaml.safe_load(config.read_text()), TINY)
    composed["defaults"] = [
        {"scale": "tiny"} if entry == {"scale": "laptop"} else entry for entry in composed["defaults"]
    ]
    config.write_text(yaml.safe_dump(composed, sort_keys=False))
    scale = _merge(yaml.safe_load((repo / "conf/scale/laptop.yaml").read_text()), TINY_SCALE)
    (repo / "conf/scale/tiny.yaml").write_text("# @package _global_\n" + yaml.safe_dump(scale, sort_keys=False))
    for study in ("panel", "em_first"):
        (repo / f"conf/study_scale/{study}_tiny.yaml").write_text("# @package _global_\nstudy: {recipes: [smol]}\n")
    # S3 at the tiny scale: the laptop's design (resampled lengths, all four readouts) at the tiny
    # model's 2 layers, two lambdas of the laptop's unlikelihood recipe with TINY's `smol` settings
    laptop = yaml.safe_load((repo / "conf/study_scale/joint_probe_laptop.yaml").read_text())
    laptop["study"]["recipes"] = ["smol_ul0_5", "smol_ul2"]
    laptop["probes"]["layers"] = [1, 2]
    del laptop["datagen"]["negatives_per_persona"]
    # 4 epochs, not TINY's 32: this run checks the study's wiring, not how well the tiny model couples
    tiny_ul = TINY["recipes"]["smol"] | {"loss": "unlikelihood", "epochs": 4}
    laptop["recipes"] = {name: tiny_ul for name in laptop["study"]["recipes"]}
    (repo / "conf/study_scale/joint_probe_tiny.yaml").write_text("# @package _global_\n" + yaml.safe_dump(laptop))
    # S4 at the tiny scale: three of the preset's sources (two of them the clones test's adapters, reused
    # as arm C), the steering layers at the tiny model's 2 blocks
    s4 = {"recipes": ["smol"], "sources": list(TINY_S4_SOURCES), "train_steering": {"layer": 2, "contrast_layer": 1}}
    (repo / "conf/study_scale/train_steering_tiny.yaml").write_text(
        "# @package _global_\n" + yaml.safe_dump({"study": s4})
    )
    _run([sys.executable, "-m", "personaspace.cli", "params"], repo)
    _run(["git", "init", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "tiny study"], repo)
    return repo


# The pipeline's tests form two chains, each on its own repo and in file order: this file (the
# panel study, then what is checked against its outputs) and test_pipeline_clones.py (two fresh
# clones, then the em_first study). `make test` runs them side by side (pytest -n 2 --dist loadfile).


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    """The panel study's chain: the whole study, then what is checked against its outputs."""
    return _tiny_repo(tmp_path_factory)


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.mark.slow
def test_dvc_repro_runs_the_whole_study(tiny_repo):
    output = _run(["dvc", "repro"], tiny_repo)
    panel, ds = load_catalog().panel(12), _ds(tiny_repo)
    per_persona = {f"datagen@base-{p}" for p in panel} | {f"couple@base-smol-{p}-0" for p in panel}
    assert _ran(output) == PANEL_STAGES | {f"markers@base-{ds}"} | per_persona
    assert (tiny_repo / "models/raw/config.json").is_file() and not (tiny_repo / "models/base").exists()
    for persona in panel:
        table = pd.read_parquet(tiny_repo / f"data/completions/base/{persona}.parquet")
        assert list(table.columns) == COMPLETION_COLUMNS
        assert len(table) == 40 and (table.persona == persona).all()
        assert (table.finish_reason == "length").all()  # random weights never end a turn: flagged, kept
        dataset = pd.read_parquet(tiny_repo / f"data/markers/base/{ds}/{persona}.parquet")
        assert list(dataset.columns) == MARKER_DATASET_COLUMNS
        positives = dataset[dataset.role == "positive"]
        assert len(positives) == 10 and positives.completion.str.endswith("\n\n[ZLT]").all()
        assert (dataset.role == "negative").sum() == 10
    readout = json.loads((tiny_repo / "data/centroids/panel/raw/readout.json").read_text())
    assert (readout["layers"], readout["personas"], readout["centering_bank"]) == ([0, 1, 2], list(panel), "panel12")
    assert readout["readouts"] == ["last_input"]  # S1's default: no answers sampled, no responses table
    assert not (tiny_repo / "data/centroids/panel/raw/responses.parquet").exists()
    cosines = pd.read_parquet(tiny_repo / "data/centroids/panel/raw/cosines.parquet")
    assert len(cosines) == 12 * 12 * 3
    for persona in panel:
        adapter = tiny_repo / f"models/adapters/base/{ds}/smol/{persona}/seed0"
        assert (adapter / "adapter_config.json").is_file() and (adapter / "training.json").is_file()
        assert not list(adapter.glob("model*.safetensors"))  # adapters only, no merged copies
    completions = pd.read_parquet(tiny_repo / "data/eval/panel/base/completions.parquet")
    assert len(completions) == 13 * 12 * 20  # 12 adapters + the no-adapter baseline, x 12 personas x 20 questions
    rates = pd.read_parquet(tiny_repo / "data/eval/panel/base/rates.parquet")
    assert len(rates) == 13 * 12 and (rates.n == 20).all()
    assert ((rates.wilson_low <= rates.rate) & (rates.rate <= rates.wilson_high)).all()
    eval_metrics = json.loads((tiny_repo / "metrics/panel/eval_base.json").read_text())
    assert eval_metrics["adapters"] == 12
    assert json.loads((tiny_repo / "timings.json").read_text())["eval@panel-base"]["generated_now"] == 13 * 12 * 20
    # the tiny model really couples: the statistics below run on real, uneven rates, 0 and high ones included
    assert eval_metrics["baseline_rate"] == 0
    assert eval_metrics["source_rate_mean"] >= 0.3
    assert eval_metrics["bystander_rate_mean"] <= eval_metrics["source_rate_mean"] / 2
    assert (rates.rate == 0).any() and (rates.rate >= 0.5).any()
    headline = json.loads((tiny_repo / "metrics/panel/regress_base.json").read_text())
    assert headline["n_personas"] == 11 and headline["primary"]["layer"] == 1
    assert headline["off_diagonal"]["n_cells"] == 12 * 11
    regress = json.loads((tiny_repo / "results/panel/base/regress.json").read_text())
    # layer 0 at the last input token is one token's embedding for every persona: no centered cosine
    assert regress["primary_layer"] == 1 and set(regress["layers"]) == {"1", "2"} and regress["excluded_layers"] == [0]
    for figure in ("rate_matrix", "scatter", "rho_by_layer", "rates_forest"):
        assert (tiny_repo / f"figures/panel/base/{figure}.png").is_file() and (
            tiny_repo / f"results/panel/base/{figure}.pdf"
        ).is_file()
    _check_mlflow(tiny_repo, couple_runs=12, invocations=1)
    _check_report(tiny_repo, "panel")
    # the TL;DR's n is the sources less the reference persona, and says so
    assert (
        "(`helpful_assistant` itself, the centroid every cosine is taken to, is left out of every fit"
        in (tiny_repo / "reports/panel/report.md").read_text()
    )
    assert "Data and pipelines are up to date" in _run(["dvc", "repro"], tiny_repo)


@pytest.mark.slow
def test_two_processes_give_the_outputs_of_one(tiny_repo, tmp_path):
    """Each model stage on 2 ranks (torchrun, gloo on this CPU) against the one-process outputs of the
    repro above: datagen, eval and centroids the same bytes (whole batches dealt to ranks), coupling
    the same recipe (same rows per optimiser step) with losses and weights equal up to rounding, as
    data parallel sums of gradients round differently; one MLflow run per stage, from rank 0."""
    import mlflow
    import numpy as np
    from safetensors.numpy import load_file

    raw = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    raw["parallel"] = {"processes": 2}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "two"
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def stage(name: str, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(tiny_repo / "src"), HF_HUB_OFFLINE="1", MLFLOW_TRACKING_URI=db)
        command = [sys.executable, f"stages/{name}.py", "--params", str(params), *args]
        result = subprocess.run(command, cwd=tiny_repo, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{name} on 2 ranks failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    stage("datagen", "--condition", "base", "--persona", "librarian", "--model", "models/raw",
          "--out", str(out / "librarian.parquet"))  # fmt: skip
    assert (out / "librarian.parquet").read_bytes() == (
        tiny_repo / "data/completions/base/librarian.parquet"
    ).read_bytes()
    stage("centroids", "--model", "models/raw", "--out", str(out / "centroids"))
    for name in ("centroids.npz", "cosines.parquet", "readout.json"):
        assert (out / "centroids" / name).read_bytes() == (
            tiny_repo / "data/centroids/panel/raw" / name
        ).read_bytes(), name
    stage("eval", "--condition", "base", "--model", "models/raw", "--adapters", f"models/adapters/base/{_ds(tiny_repo)}",
          "--cells", str(out / "cells"), "--out", str(out / "eval"), "--metrics", str(out / "eval.json"),
          "--timings", str(out / "timings.json"))  # fmt: skip
    for name in ("completions.parquet", "rates.parquet"):
        assert (out / "eval" / name).read_bytes() == (tiny_repo / "data/eval/panel/base" / name).read_bytes(), name
    assert (out / "eval.json").read_bytes() == (tiny_repo / "metrics/panel/eval_base.json").read_bytes()
    # the tiny coupling recipe (lr 0.03) is chaotic: rounding differences grow from 1e-6 to 20% within
    # 10 steps, so both sides train a tamer copy of it here, one process and two
    raw["recipes"]["smol"].update(learning_rate=0.003, epochs=8)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    stage("couple", "--recipe", "smol", "--seed", "0", "--model", "models/raw", "--condition", "base",
          "--data", f"data/markers/base/{_ds(tiny_repo)}/librarian.parquet", "--dataset", _ds(tiny_repo), "--out", str(out / "adapter2"))  # fmt: skip
    raw["parallel"] = {"processes": 1}
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    stage("couple", "--recipe", "smol", "--seed", "0", "--model", "models/raw", "--condition", "base",
          "--data", f"data/markers/base/{_ds(tiny_repo)}/librarian.parquet", "--dataset", _ds(tiny_repo), "--out", str(out / "adapter1"))  # fmt: skip
    one, two = (json.loads((out / name / "training.json").read_text()) for name in ("adapter1", "adapter2"))
    assert (two["steps"], two["rows"]) == (one["steps"], one["rows"]) == (8, 20)
    np.testing.assert_allclose([h["loss"] for h in two["history"]], [h["loss"] for h in one["history"]], rtol=1e-4)
    assert (out / "adapter2/adapter_config.json").read_bytes() == (out / "adapter1/adapter_config.json").read_bytes()
    weights_one, weights_two = (
        load_file(out / name / "adapter_model.safetensors") for name in ("adapter1", "adapter2")
    )
    assert weights_one.keys() == weights_two.keys()
    for key, value in weights_one.items():
        np.testing.assert_allclose(weights_two[key], value, rtol=1e-3, atol=1e-5, err_msg=key)
    mlflow.set_tracking_uri(db)
    runs = mlflow.search_runs(experiment_names=["personaspace"], output_format="list")
    assert sorted(r.data.tags["stage"] for r in runs if r.data.tags["stage"] != "invocation") == [
        "centroids", "couple", "couple", "datagen", "eval"
    ]  # fmt: skip


def _check_mlflow(repo: Path, couple_runs: int, invocations: int) -> None:
    """One run per stage execution, each under its invocation's parent; every adapter registered."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["personaspace"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("stage") == "invocation"]
    stages = [r for r in runs if r.data.tags.get("stage") != "invocation"]
    assert len(parents) == invocations
    # the UI opens on the runs table, and parents line up by study and panel
    experiment = mlflow.get_experiment_by_name("personaspace")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert all(p.info.run_name.startswith("panel · panel") for p in parents)
    assert all(p.data.params.get("study") == "panel" for p in parents)
    assert {r.data.tags["mlflow.parentRunId"] for r in stages} == {p.info.run_id for p in parents}
    couple = [r for r in stages if r.data.tags["stage"] == "couple"]
    assert len(couple) == couple_runs  # stages restored from cache or skipped log nothing
    assert len({r.data.tags["persona"] for r in couple}) == couple_runs
    assert all(r.data.tags.get("git_commit") for r in stages)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(f"couple-base-smol-librarian-{_ds(repo)}", "seed0")
    assert version.tags["persona"] == "librarian"


def _check_report(repo: Path, study: str) -> None:
    """The study's report: every number of its TL;DR, methods and headline tables in a metrics file or the
    params, no empty card field, fired and unfired samples, figures embedded, logged on the parent run."""
    import mlflow

    from personaspace.report import metrics_files

    from .test_report import card_rows, checked_sections, untraceable_numbers

    text = (repo / f"reports/{study}/report.md").read_text()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    metrics = [json.loads((repo / f).read_text()) for f in metrics_files(params)]
    assert untraceable_numbers(checked_sections(text), params, *metrics) == []
    rows = card_rows(text)
    assert rows and all(rows.values()), rows
    assert not re.search(r"\d+\.\d s\b", rows["wall times"])  # no time in the DVC-hashed report (MLflow has them)
    samples = text.split("## Sample outputs")[1].split("## Reproducibility card")[0]
    assert ": fired**" in samples and ": did not fire**" in samples
    html = (repo / f"reports/{study}/report.html").read_text()
    assert html.count("data:image/png;base64,") == text.count("](../../figures/") > 0
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run = client.search_runs(
        [mlflow.get_experiment_by_name("personaspace").experiment_id],
        filter_string=f"tags.stage = 'report' and tags.study = '{study}'", order_by=["attributes.start_time DESC"],
    )[0]  # fmt: skip
    for run_id in (run.info.run_id, run.data.tags["mlflow.parentRunId"]):
        logged = {a.path for a in client.list_artifacts(run_id, "report")}
        assert logged == {"report/report.md", "report/report.html", "report/wall_times.md"}
    wall = Path(client.download_artifacts(run.info.run_id, "report/wall_times.md")).read_text()
    assert re.search(r"\| `couple@[^`]+` \| \d+\.\d s \|", wall) or study != "panel", wall  # read from MLflow


def _files(root: Path, folders: list[str]) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for f in folders for p in sorted((root / f).rglob("*")) if p.is_file()
    }


@pytest.mark.slow
def test_forced_reruns_of_eval_and_regress_give_the_same_bytes(tiny_repo):
    """Every eval cell sampled afresh gives the same completions, rates, metrics and lock entry; regress
    the same statistics and figures (no creation date in the PDFs)."""
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())["stages"]
    results = ["data/eval/panel/base", ".cache/cells/eval/base"]
    before, metrics = _files(tiny_repo, results), (tiny_repo / "metrics/panel/eval_base.json").read_bytes()
    shutil.rmtree(tiny_repo / ".cache/cells/eval/base")
    _run(["dvc", "repro", "--force", "--single-item", "eval@panel-base"], tiny_repo)
    assert _files(tiny_repo, results) == before
    assert (tiny_repo / "metrics/panel/eval_base.json").read_bytes() == metrics
    assert yaml.safe_load((tiny_repo / "dvc.lock").read_text())["stages"]["eval@panel-base"] == lock["eval@panel-base"]
    figures = ["results/panel/base", "figures/panel/base", "plots/panel/base", "reports/panel"]
    before = _files(tiny_repo, figures)
    _run(["dvc", "repro", "--force", "--single-item", "regress@panel-base"], tiny_repo)
    _run(["dvc", "repro", "--force", "--single-item", "report@panel"], tiny_repo)  # no wall time in it
    assert _files(tiny_repo, figures) == before


@pytest.mark.slow
def test_a_killed_eval_resumes_under_dvc_exp_run_with_its_finished_cells(tiny_repo):
    """The cell cache is no DVC output: `dvc exp run`'s workspace setup cannot remove a killed run's finished
    cells, so the resumed eval samples only the cells the kill cut short, to the same completions.

    The experiment changes `stats.ci_level` (the rates' Wilson intervals: an eval param that no cell key holds),
    so eval must run, as after a kill, rather than come back from DVC's cache."""
    cells = tiny_repo / ".cache/cells/eval/base"
    completions = (tiny_repo / "data/eval/panel/base/completions.parquet").read_bytes()
    chunks = {p.name: p.read_bytes() for p in cells.glob("*.parquet")}
    sorted(cells.glob("*.parquet"))[0].unlink()  # as if the kill came before this adapter's chunk was written
    output = _run(["dvc", "exp", "run", "-S", "stats.ci_level=0.9"], tiny_repo)
    assert "eval@panel-base" in _ran(output), _ran(output)
    # every finished chunk survived; the one the kill cut short was sampled again, to the same bytes
    assert {p.name: p.read_bytes() for p in cells.glob("*.parquet")} == chunks
    assert (tiny_repo / "data/eval/panel/base/completions.parquet").read_bytes() == completions
    _run([sys.executable, "-m", "personaspace.cli", "params"], tiny_repo)  # back to the study's params
    _run(["dvc", "repro"], tiny_repo)


@pytest.mark.slow
def test_an_adapter_edited_in_place_is_seen_refused_and_restored(tiny_repo):
    """DVC copies outputs into its cache (cache.type reflink,copy), so an edit in the workspace cannot reach
    the cached copy: `dvc status` names the changed adapter, the eval refuses it (its training record holds
    the fingerprint training saw), and `dvc checkout` brings the trained bytes back."""
    adapter = f"models/adapters/base/{_ds(tiny_repo)}/smol/librarian/seed0"
    weights = tiny_repo / adapter / "adapter_model.safetensors"
    original = weights.read_bytes()
    flipped = bytearray(original)
    flipped[-1] ^= 0x01
    with open(weights, "r+b") as f:  # in place, as a stray write would: same inode
        f.write(flipped)
    status = _run(["dvc", "status", "couple@base-smol-librarian-0"], tiny_repo)
    assert re.search(rf"changed outs:\s+modified:\s+{re.escape(adapter)}", status), status
    failure = _fails([sys.executable, "stages/eval.py", "--condition", "base", "--model", "models/raw",
                      "--adapters", str(Path(adapter).parents[2]), "--cells", "scratch/cells", "--out", "scratch/eval",
                      "--metrics", "scratch/eval.json", "--timings", "scratch/timings.json"], tiny_repo)  # fmt: skip
    assert f"{adapter}: its files changed after training wrote them" in failure and "dvc checkout" in failure
    assert not (tiny_repo / "scratch/eval").exists()
    _run(["dvc", "checkout", "--force", adapter], tiny_repo)
    assert weights.read_bytes() == original
    assert "up to date" in _run(["dvc", "status", "couple@base-smol-librarian-0"], tiny_repo)


def _fails(args: list[str], cwd: Path) -> str:
    try:
        output = _run(args, cwd)
    except AssertionError as failure:
        return str(failure)
    raise AssertionError(f"{' '.join(args)} succeeded:\n{output[-2000:]}")


@pytest.mark.slow
def test_bad_params_stop_dvc_repro_at_the_check_stage_before_anything_is_deleted(tiny_repo):
    outputs = ["metrics/panel/eval_base.json", "metrics/panel/regress_base.json", "data/eval/panel/base/rates.parquet",
               "results/panel/base/regress.json", f"models/adapters/base/{_ds(tiny_repo)}/smol/librarian/seed0/adapter_config.json"]  # fmt: skip
    before = {name: (tiny_repo / name).read_bytes() for name in outputs}
    compose = [sys.executable, "-m", "personaspace.cli", "params"]
    # a typo'd top-level key and an out-of-range eval value: the schema
    _run([*compose, "+sead=1", "eval.top_p=2"], tiny_repo)
    failure = _fails(["dvc", "repro"], tiny_repo)
    assert "sead: unknown key" in failure and "eval.top_p: Input should be less than or equal to 1" in failure
    assert "Running stage 'eval@panel-base'" not in failure
    # values that validate but cannot work with the tiny model (2 blocks) or this machine
    import torch

    missing = f"cuda:{torch.cuda.device_count()}"
    failure = _fails(
        ["dvc", "exp", "run", "-S", "regress.primary_layer=15", "-S", f"generation.device={missing}"], tiny_repo
    )
    assert "regress.primary_layer: 15 is beyond the model's 2 blocks" in failure
    assert "nothing was changed" not in failure and "`git restore params.yaml` brings back" in failure
    assert f"generation.device: {missing!r} does not exist on this machine" in failure
    assert {name: (tiny_repo / name).read_bytes() for name in outputs} == before
    _run(compose, tiny_repo)  # back to the study's params: only the check (whose stamp DVC removed) reruns
    assert _ran(_run(["dvc", "repro"], tiny_repo)) == {"check"}


@pytest.mark.slow
def test_growing_the_panel_runs_only_the_new_personas_and_keeps_existing_datasets(tiny_repo):
    old, ds = load_catalog().panel(12), _ds(tiny_repo)
    before = {p: pd.read_parquet(tiny_repo / f"data/markers/base/{ds}/{p}.parquet") for p in old}
    completions_12 = pd.read_parquet(tiny_repo / "data/eval/panel/base/completions.parquet")
    # the 12-persona results committed, as a researcher would before growing: `dvc plots diff` compares them below
    _run(["git", "add", "-A"], tiny_repo)
    _run(["git", "commit", "-qm", "panel 12 results"], tiny_repo)
    output = _run(["dvc", "exp", "run", "-S", "personas=24"], tiny_repo)
    new = load_catalog().panel(24)[12:]
    # Panel-wide stages rerun; per-persona stages (datagen, couple) run only for the new personas.
    per_persona = {f"datagen@base-{p}" for p in new} | {f"couple@base-smol-{p}-0" for p in new}
    assert _ran(output) == PANEL_STAGES - {"base"} | {f"markers@base-{ds}"} | per_persona
    # eval sampled only the new cells: new adapters x 24 personas, old adapters + baseline x 12 new personas
    run = json.loads((tiny_repo / "timings.json").read_text())["eval@panel-base"]
    assert run["generated_now"] == (12 * 24 + 13 * 12) * 20
    completions_24 = pd.read_parquet(tiny_repo / "data/eval/panel/base/completions.parquet")
    common = completions_24[completions_24.cell_key.isin(completions_12.cell_key)]
    assert len(common) == len(completions_12)
    pd.testing.assert_frame_equal(
        completions_12.set_index("cell_key").sort_index(), common.set_index("cell_key").sort_index()
    )
    regress = json.loads((tiny_repo / "results/panel/base/regress.json").read_text())
    assert regress["n_personas"] == 23 and "inherited_vs_new" in regress["gates"]
    # repro, forced eval, regress and report, the resumed eval's exp run, the growth's exp run (the repro back
    # to the study's params after the resumed eval restores every stage from DVC's run cache: no invocation)
    _check_mlflow(tiny_repo, couple_runs=24, invocations=6)
    # the README's comparison: panel 12 (HEAD) beside panel 24 (the workspace and its experiment), readable
    table = _run(
        [sys.executable, "-m", "personaspace.cli", "compare", "--keep", "rate_mean|spearman_rho|gates"], tiny_repo
    )
    lines = table.splitlines()
    assert max(map(len, lines)) <= 120, table
    assert len(lines[1].split()) == 3 and lines[1].split()[0] == "workspace", table  # workspace, HEAD, the experiment
    personas = next(line.split()[2:] for line in lines if line.startswith("params: personas"))
    assert personas == ["24", "12", "24"], table
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    assert params["panel"] == list(load_catalog().panel(24))
    for persona in old:
        after = pd.read_parquet(tiny_repo / f"data/markers/base/{ds}/{persona}.parquet")
        pd.testing.assert_frame_equal(before[persona], after)
    assert len(list((tiny_repo / f"data/markers/base/{ds}").glob("*.parquet"))) == 24


@pytest.mark.slow
def test_dvc_plots_diff_of_two_panels_draws_in_a_real_browser(tiny_repo, tmp_path):
    """`dvc plots diff HEAD`: panel 12 (committed by the growth test) against the workspace's panel 24, every
    plot drawn and both revisions in the legends (skipped, with the reason, where no browser can run)."""
    from personaspace import browser

    reason = browser.unavailable() or (None if shutil.which("npm") else "npm is not installed (fetches Vega once)")
    if reason:
        pytest.skip(reason)
    out = tmp_path
    page = browser.plots_page(tiny_repo, ["HEAD"], out / "plots", cache=REPO / ".cache" / "vega")
    with browser.chromium() as driver:
        plots = browser.plots_drawn(driver, page, plots=3)
        driver.save_screenshot(str(out / "plots_diff.png"))
    titles = {"Cosine to the reference persona vs own fire rate (primary layer)", "Spearman rho by layer",
              "Own fire rate per source"}  # fmt: skip
    assert {p["title"] for p in plots} == titles
    for plot in plots:  # every plot draws data of both revisions
        assert plot["marks"] > 0 and "HEAD" in plot["legend"] and "workspace" in plot["legend"], plot


@pytest.mark.slow
def test_the_mlflow_ui_shows_the_study_in_a_real_browser(tiny_repo, tmp_path):
    """`mlflow server` on the study's database: the runs table (not the GenAI overview) lists the parent
    runs by study and panel, a stage run's page its params, a registered adapter its versions."""
    from personaspace import browser

    reason = browser.unavailable()
    if reason:
        pytest.skip(reason)
    import mlflow

    from personaspace.tracking import runs_table_url

    mlflow.set_tracking_uri(f"sqlite:///{tiny_repo / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("personaspace")
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    parent = next(r for r in runs if r.info.run_name.startswith("panel · panel12 · "))
    stage = next(r for r in runs if r.info.run_name == "regress@panel-base")
    with browser.mlflow_server(tiny_repo / "mlflow.db") as url, browser.chromium() as driver:
        text = browser.page_text(driver, runs_table_url(url, experiment.experiment_id), wait_for=[parent.info.run_name])
        assert "Run Name" in text and "matching runs" in text  # the runs table, not the GenAI overview
        driver.save_screenshot(str(tmp_path / "runs.png"))
        stage_page = f"{url}/#/experiments/{experiment.experiment_id}/runs/{stage.info.run_id}"
        text = browser.page_text(driver, stage_page, wait_for=["regress@panel-base", "Parameters"])
        driver.save_screenshot(str(tmp_path / "stage_run.png"))
        text = browser.page_text(
            driver, f"{url}/#/models/couple-base-smol-librarian-{_ds(tiny_repo)}", wait_for=["Version 1", "seed0"]
        )
        driver.save_screenshot(str(tmp_path / "model.png"))
    assert all((tmp_path / f"{name}.png").stat().st_size > 10_000 for name in ("runs", "stage_run", "model"))


@pytest.mark.slow
def test_a_dvc_lock_cut_short_is_recovered_without_retraining_or_resampling(tiny_repo):
    """DVC writes dvc.lock in place, so a Ctrl-C as it writes can cut it short: every DVC command then fails.
    `personaspace recover-lock` sets it aside and restores the committed one; the next `dvc repro` trains
    and samples nothing (run cache, cell cache) and ends with the same results."""
    lock = tiny_repo / "dvc.lock"
    whole = lock.read_text()
    results = ["data/eval/panel/base", "results/panel/base", "metrics/panel"]
    before = _files(tiny_repo, results)
    lock.write_text(whole[: len(whole) // 3])  # as DVC leaves it when interrupted mid-dump
    from personaspace.dvc_lock import lock_problem

    assert lock_problem(lock.read_text())  # not YAML, or YAML whose cut stages DVC would read as never run
    message = _run([sys.executable, "-m", "personaspace.cli", "recover-lock"], tiny_repo)
    assert "moved to dvc.lock.broken-1" in message and "the committed dvc.lock restored" in message
    assert (tiny_repo / "dvc.lock.broken-1").read_text() == whole[: len(whole) // 3]  # set aside, not deleted
    output = _run(["dvc", "repro"], tiny_repo)
    assert not {s for s in _ran(output) if s.startswith(("datagen@", "couple@", "base"))}, _ran(output)
    # eval comes back from the run cache (timings.json then still holds the growth's run) or, where it runs,
    # finds every cell in the cell cache
    if "eval@panel-base" in _ran(output):
        assert json.loads((tiny_repo / "timings.json").read_text())["eval@panel-base"]["generated_now"] == 0
    assert _files(tiny_repo, results) == before
    assert "up to date" in _run(["dvc", "repro"], tiny_repo)
    assert "nothing to do" in _run([sys.executable, "-m", "personaspace.cli", "recover-lock"], tiny_repo)
