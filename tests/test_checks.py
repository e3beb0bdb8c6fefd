"""The checks that run before any stage: hand edits of params.yaml, strict types, the model, the devices."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from personaspace.checks import ModelFacts, backend_errors, check_params, device_errors, model_errors, model_notes
from personaspace.cli import compose_params
from personaspace.config import ParamsError, validate_params
from personaspace.params_guard import hand_edit_report, params_digest

from .conftest import REPO

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@e.x",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@e.x",
}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **GIT_ENV)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture
def composed_repo(tmp_path) -> Path:
    """A git + DVC repo with this project's conf/, Hydra plugins and params.yaml, and a one-stage pipeline."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("conf", "hydra_plugins", "data"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "pretrain"))
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    shutil.copytree(REPO / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    (repo / "dvc.yaml").write_text(
        "stages:\n  show:\n    cmd: python -c \"import yaml; print(yaml.safe_load(open('params.yaml'))['model'])\""
        " > model.txt\n    params: [model, seed]\n    outs: [model.txt]\n"
    )
    for args in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "study"]):
        assert _run(args, repo).returncode == 0
    return repo


def test_the_committed_params_yaml_is_as_composition_wrote_it():
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    assert data["_composed"]["sha256"] == params_digest(data)
    assert hand_edit_report(REPO / "params.yaml") is None


def test_a_hand_edited_params_yaml_is_reported_with_the_edited_key_and_the_fix(composed_repo):
    path = composed_repo / "params.yaml"
    path.write_text(path.read_text().replace("model: smollm2-135m-instruct", "model: tiny-random"))
    report = hand_edit_report(path)
    assert "model: 'smollm2-135m-instruct' -> 'tiny-random'" in report
    assert "-S 'model=\"tiny-random\"'" in report and "conf/config.yaml" in report


def test_dvc_exp_run_refuses_to_discard_a_hand_edit_of_params_yaml(composed_repo):
    path = composed_repo / "params.yaml"
    edited = path.read_text().replace("model: smollm2-135m-instruct", "model: tiny-random")
    path.write_text(edited)
    result = _run(["dvc", "exp", "run", "-S", "seed=1"], composed_repo)
    assert result.returncode != 0
    assert "edited by hand" in result.stderr + result.stdout and "model:" in result.stderr + result.stdout
    assert path.read_text() == edited  # nothing was changed
    assert not (composed_repo / "model.txt").exists()
    # the fix the message names: restore the file, pass the edit as an override
    _run(["git", "checkout", "params.yaml"], composed_repo)
    result = _run(["dvc", "exp", "run", "-S", "seed=1", "-S", "model=tiny-random"], composed_repo)
    assert result.returncode == 0, result.stderr
    assert (composed_repo / "model.txt").read_text().strip() == "tiny-random"
    assert hand_edit_report(path) is None  # the composed file carries its own digest


def test_the_check_stage_refuses_a_hand_edit_that_plain_dvc_repro_would_run(composed_repo):
    path = composed_repo / "params.yaml"
    path.write_text(path.read_text().replace("\nseed: 0\n", "\nseed: 3\n", 1))
    result = _run([sys.executable, str(REPO / "stages/check.py"), "--out", "stamp.json"], composed_repo)
    assert result.returncode == 2 and "seed: 0 -> 3" in result.stderr and "-S 'seed=3'" in result.stderr
    assert not (composed_repo / "stamp.json").exists()


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"sead": 1}, "sead: unknown key"),
        ({"datagen": {"drop_truncated": 1}}, "datagen.drop_truncated: Input should be a valid boolean"),
        ({"eval": {"temperature": "1.0"}}, "eval.temperature: Input should be a valid number"),
        ({"couple": {"seeds": [True]}}, "couple.seeds.0: Input should be a valid integer"),
        ({"generation": {"device": "gpu0"}}, "generation.device: String should match pattern"),
        ({"regress": {"primary_layer": 0}}, "regress.primary_layer: Input should be greater than or equal to 1"),
        ({"regress": {"calibration": ["helpful_assistant", "villain"]}}, "names the reference persona"),
    ],
)
def test_params_are_checked_strictly_without_coercion(raw_params, edit, message):
    def merge(base: dict, update: dict) -> dict:
        for key, value in update.items():
            base[key] = merge(base[key], value) if isinstance(value, dict) and key in base else value
        return base

    with pytest.raises(ParamsError) as failure:
        validate_params(merge(raw_params, edit))
    assert message in str(failure.value)


def test_values_that_cannot_work_with_the_model_are_refused(raw_params, tiny_model_dir):
    from personaspace.models import load_tokenizer
    from personaspace.study import stage_graph

    facts = ModelFacts(num_hidden_layers=2, tokenizer=load_tokenizer(tiny_model_dir))
    raw_params["regress"]["primary_layer"] = 15
    raw_params["eval"]["max_new_tokens"] = 3
    raw_params["datagen"]["max_new_tokens"] = 1
    raw_params["graph"] = stage_graph(raw_params)  # the marker data's id follows datagen, as composition writes it
    errors = model_errors(validate_params(raw_params), facts)
    assert any(e.startswith("regress.primary_layer: 15 is beyond the model's 2 blocks") for e in errors)
    assert any(e.startswith("eval.max_new_tokens: 3 is shorter than the marker itself (6 tokens") for e in errors)
    raw_params["eval"]["max_new_tokens"] = 6
    raw_params["regress"]["primary_layer"] = 2
    assert model_errors(validate_params(raw_params), facts) == []
    # the seeds' S2 recipe samples data and eval with the same budget: allowed, with a note
    (note,) = model_notes(validate_params(raw_params), facts)
    assert note.startswith("eval.max_new_tokens: 6 cannot hold a trained-length completion")


def test_a_device_that_does_not_exist_is_refused():
    assert device_errors("cpu") == [] and device_errors("auto") == []
    import torch

    missing = f"cuda:{torch.cuda.device_count()}"
    assert device_errors(missing)[0].startswith(f"generation.device: {missing!r} does not exist on this machine")


def test_the_vllm_backend_without_vllm_is_refused_naming_the_extra():
    assert backend_errors("hf") == []
    (problem,) = backend_errors("vllm")  # the project's environment has no vLLM (it lives in .venv-vllm)
    assert problem.startswith("generation.backend: vllm") and "personaspace[gpu]" in problem


def test_check_params_reads_the_models_depth_from_a_materialised_folder(tmp_path, tiny_model_dir):
    out = tmp_path / "params.yaml"
    compose_params(out, ["model=tiny-random", "regress.primary_layer=15"], REPO / "conf")
    problems, notes = check_params(out, raw_dir=tiny_model_dir)
    assert [n for n in notes if not n.startswith("projected duration")] == []
    assert len(problems) == 1 and "beyond the model's 2 blocks" in problems[0]
