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
    raw_params["study"]["negatives"]["hard"] = ["astronaut"]
    assert "study.negatives.hard: unknown personas ['astronaut']" in _error(raw_params)


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
    raw_params["study"]["recipes"] = ["smol", "smol"]
    assert "study.recipes: duplicate entries" in _error(raw_params)


def test_overlapping_question_banks_fail_validation(raw_params):
    personas = yaml.safe_load((REPO / "data" / "personas.yaml").read_text())
    questions = yaml.safe_load((REPO / "data" / "questions.yaml").read_text())
    questions["eval"][0]["text"] = questions["data"][0]["text"]
    with pytest.raises(Exception, match="overlap"):
        validate_params(raw_params, parse_catalog(personas, questions))


def test_empty_marker_is_rejected(raw_params):
    raw_params["marker"] = "  "
    assert "marker: empty" in _error(raw_params)


def test_eval_max_new_tokens_below_the_trained_completions_is_rejected(raw_params):
    raw_params["eval"]["max_new_tokens"] = raw_params["datagen"]["max_new_tokens"] - 1
    message = _error(raw_params)
    assert "eval.max_new_tokens: 63 is below datagen.max_new_tokens (64)" in message


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


def _regraph(raw: dict) -> dict:
    """The raw params with `graph` recomposed from the (edited) study, as composition would write it."""
    from personaspace.study import stage_graph

    raw["graph"] = stage_graph(raw)
    return raw


def test_a_condition_is_pretrained_on_raw_or_a_key_of_pretrain(raw_params):
    raw_params["study"]["conditions"]["em"] = {"pretrained": "em", "data_from": "em"}
    validate_params(_regraph(raw_params))  # em is defined under pretrain
    raw_params["study"]["conditions"]["em"] = {"pretrained": "emm", "data_from": "em"}
    assert "study.conditions.em.pretrained: 'emm' is neither `raw` nor a key of pretrain" in _error(
        _regraph(raw_params)
    )


def test_data_from_must_name_a_data_generating_condition_of_the_study(raw_params):
    raw_params["study"]["conditions"]["em"] = {"pretrained": "em", "data_from": "benign"}
    message = _error(raw_params)
    assert "study.conditions.em.data_from: 'benign' is not a condition of this study" in message
    raw_params["study"]["conditions"]["em_basedata"] = {"pretrained": "em", "data_from": "base"}
    raw_params["study"]["conditions"]["em"] = {"pretrained": "em", "data_from": "em_basedata"}
    assert "'em_basedata' takes its own data from 'base'; name the condition that generates the data" in _error(
        raw_params
    )


def test_a_source_is_never_its_own_negative(raw_params):
    raw_params["study"]["negatives"]["hard"] = ["librarian"]
    assert "study.negatives.hard: ['librarian'] are also sources" in _error(raw_params)


def test_a_hand_edited_graph_is_refused(raw_params):
    del raw_params["graph"]["datagen"]["base-librarian"]
    assert "graph: does not match the study (it is composed, never edited)" in _error(raw_params)


def test_pretrain_entries_are_checked(raw_params):
    raw_params["pretrain"]["em"]["recipe"] = "nope"
    assert "pretrain.em.recipe: 'nope' is not a key of recipes" in _error(raw_params)
    raw_params["pretrain"]["em"]["recipe"] = "marker_only_long"
    assert "has loss marker_only; use completion" in _error(raw_params)
    raw_params["pretrain"]["em"]["recipe"] = "pretrain_smol"
    raw_params["pretrain"]["em"]["dataset"] = {"source": "hub"}
    validate_params(raw_params)  # em is not built by this study: its data need not be named
    raw_params["study"]["conditions"]["em"] = {"pretrained": "em", "data_from": "em"}
    assert "pretrain.em.dataset: a hub dataset needs repo_id" in _error(_regraph(raw_params))


def test_regress_calibration_must_be_panel_members(raw_params):
    raw_params["regress"]["calibration"] = ["pirate"]
    assert "regress.calibration: 'pirate' is not in the panel" in _error(raw_params)


def test_unknown_recipes_and_sources_are_named(raw_params):
    raw_params["study"]["recipes"] = ["nope"]
    raw_params["study"]["sources"] = ["astronaut"]
    message = _error(raw_params)
    assert "study.recipes: ['nope'] are not keys of recipes" in message
    assert "study.sources: unknown personas ['astronaut']" in message


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
