"""Every stage validates params before it writes anything; each bad input names its key and fix."""

import subprocess
import sys

import pytest
import yaml

from personaspace.cli import compose_params, panels_yaml
from personaspace.config import ParamsError, validate_params
from personaspace.personas import load_catalog, parse_catalog

from .conftest import REPO


def test_committed_params_are_valid(params):
    assert params.panel == list(load_catalog().panel(12))
    assert params.model == "smollm2-135m-instruct"


def test_params_yaml_is_the_composition_of_conf(tmp_path):
    out = tmp_path / "params.yaml"
    compose_params(out, [], conf_dir=REPO / "conf")
    assert yaml.safe_load(out.read_text()) == yaml.safe_load((REPO / "params.yaml").read_text())


def test_conf_panels_is_generated_from_the_catalog():
    assert (REPO / "conf" / "panels.yaml").read_text() == panels_yaml()


@pytest.mark.parametrize("size", [24, 48])
def test_composing_a_larger_panel_gives_the_catalog_panel(tmp_path, size):
    out = tmp_path / "params.yaml"
    compose_params(out, [f"personas={size}"], conf_dir=REPO / "conf")
    params = validate_params(yaml.safe_load(out.read_text()))
    assert params.panel == list(load_catalog().panel(size))


def _error(raw, catalog=None) -> str:
    with pytest.raises(ParamsError) as exc:
        validate_params(raw, catalog)
    return str(exc.value)


def test_unknown_keys_are_named(raw_params):
    raw_params["sed"] = 1
    raw_params["datagen"]["temprature"] = 0.5
    message = _error(raw_params)
    assert "sed: unknown key" in message
    assert "datagen.temprature: unknown key" in message


def test_unknown_persona_in_panel_is_named(raw_params):
    raw_params["panel"][3] = "astronaut"
    raw_params["panels"]["n12"][3] = "astronaut"
    message = _error(raw_params)
    assert "panel: unknown personas ['astronaut']" in message


def test_unknown_persona_in_negatives_is_named(raw_params):
    raw_params["datagen"]["negatives"]["hard"] = ["astronaut"]
    assert "datagen.negatives.hard: unknown personas ['astronaut']" in _error(raw_params)


def test_non_nested_panels_are_rejected(raw_params):
    n24 = raw_params["panels"]["n24"]
    n24[0], n24[20] = n24[20], n24[0]
    message = _error(raw_params)
    assert "n12 is not the first members of n24; panels must be nested" in message


def test_a_panel_that_differs_from_personas_is_rejected(raw_params):
    raw_params["personas"] = 24
    message = _error(raw_params)
    assert "_panel_key" in message and "dvc exp run -S personas=N" in message


def test_duplicate_ids_are_rejected(raw_params):
    raw_params["panel"][1] = raw_params["panel"][0]
    assert "panel: duplicate entries ['software_engineer']" in _error(raw_params)
    raw_params = yaml.safe_load((REPO / "params.yaml").read_text())
    raw_params["conditions"] = ["base", "base"]
    assert "conditions: duplicate entries" in _error(raw_params)


def test_overlapping_question_banks_fail_validation(raw_params):
    personas = yaml.safe_load((REPO / "data" / "personas.yaml").read_text())
    questions = yaml.safe_load((REPO / "data" / "questions.yaml").read_text())
    questions["eval"][0]["text"] = questions["data"][0]["text"]
    with pytest.raises(Exception, match="overlap"):
        validate_params(raw_params, parse_catalog(personas, questions))


def test_empty_marker_is_rejected(raw_params):
    raw_params["marker"] = "  "
    assert "marker: empty" in _error(raw_params)


def test_eval_max_new_tokens_below_twice_the_trained_completion_is_rejected(raw_params):
    raw_params["eval"]["max_new_tokens"] = raw_params["datagen"]["max_new_tokens"]
    message = _error(raw_params)
    assert "eval.max_new_tokens" in message and "twice the longest trained completion" in message


def test_missing_model_is_named(raw_params):
    raw_params["model"] = "gpt-7"
    assert "model: 'gpt-7' is not a key of models" in _error(raw_params)


def test_missing_embedded_package_is_named(raw_params):
    raw_params["models"]["smollm2-135m-instruct"]["package"] = "no_such_model_package"
    assert "models.smollm2-135m-instruct.package: model package 'no_such_model_package' is not installed" in _error(
        raw_params
    )


def test_model_spec_needs_the_fields_of_its_source(raw_params):
    del raw_params["models"]["qwen2.5-7b-instruct"]["repo_id"]
    assert "a hub model needs repo_id" in _error(raw_params)


def test_conditions_must_be_base_or_defined_under_pretrain(raw_params):
    raw_params["conditions"] = ["base", "em"]
    validate_params(raw_params)  # em is defined under pretrain
    raw_params["conditions"] = ["base", "emm"]
    assert "conditions: ['emm'] are neither `base` nor keys of pretrain" in _error(raw_params)


def test_pretrain_entries_are_checked(raw_params):
    raw_params["pretrain"]["em"]["recipe"] = "nope"
    assert "pretrain.em.recipe: 'nope' is not a key of recipes" in _error(raw_params)
    raw_params["pretrain"]["em"]["recipe"] = "marker_only_long"
    assert "has loss marker_only; use completion" in _error(raw_params)
    raw_params["pretrain"]["em"]["dataset"] = {"source": "hub"}
    assert "a hub dataset needs repo_id" in _error(raw_params)


def test_regress_calibration_must_be_panel_members(raw_params):
    raw_params["regress"]["calibration"] = ["pirate"]
    assert "regress.calibration: 'pirate' is not in the panel" in _error(raw_params)


def test_negatives_outside_the_panel_are_rejected(raw_params):
    raw_params["datagen"]["negatives"]["hard"] = ["pirate"]
    assert "datagen.negatives: ['pirate'] are not in the panel" in _error(raw_params)


@pytest.mark.parametrize("stage", ["base", "datagen", "markers"])
def test_a_stage_with_bad_params_fails_before_writing_anything(tmp_path, raw_params, stage):
    raw_params["datagen"]["unknown_knob"] = 3
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw_params))
    out = tmp_path / "out"
    args = {
        "base": ["--out", str(out)],
        "datagen": ["--condition", "base", "--persona", "librarian", "--model", str(tmp_path), "--out", str(out)],
        "markers": ["--condition", "base", "--completions", str(tmp_path), "--out", str(out), "--metrics", str(out)],
    }[stage]
    result = subprocess.run(
        [sys.executable, str(REPO / "stages" / f"{stage}.py"), "--params", str(bad), *args],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "datagen.unknown_knob: unknown key" in result.stderr
    assert not out.exists()
