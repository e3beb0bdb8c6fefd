"""Studies are presets of one pipeline: conf/study x conf/scale compose into params a stage graph reads."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from personaspace.cli import compose_params
from personaspace.config import Params, validate_params
from personaspace.study import dataset_id, stage_graph, study_roles

from .conftest import REPO

S2_EVAL_PERSONAS = [
    "librarian", "data_scientist", "french_person", "helpful_assistant", "software_engineer",
    "kindergarten_teacher", "medical_doctor", "comedian", "police_officer", "villain", "zelthari_scholar",
]  # fmt: skip


def _compose(tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / "params.yaml"
    compose_params(out, list(overrides), conf_dir=REPO / "conf")
    return yaml.safe_load(out.read_text())


def _params(tmp_path: Path, *overrides: str) -> Params:
    return validate_params(_compose(tmp_path, *overrides))


def test_the_default_study_is_the_panel_at_laptop_scale(params):
    assert (params.study.name, params.scale, params.study.recipes) == ("panel", "laptop", ["smol"])
    assert params.study.sources == params.panel == params.study.eval_personas
    assert list(params.study.conditions) == ["base"] and params.study.conditions["base"].pretrained == "raw"


def test_em_first_at_laptop_scale_has_the_four_conditions_and_the_s2_roles(tmp_path):
    params = _params(tmp_path, "study=em_first")
    study = params.study
    assert {name: (c.pretrained, c.data_from) for name, c in study.conditions.items()} == {
        "base": ("raw", "base"), "em": ("em", "em"), "em_basedata": ("em", "base"), "benign": ("benign", "benign"),
    }  # fmt: skip
    assert study.sources == ["librarian"] and study.negatives.hard == ["data_scientist", "french_person"]
    assert study.eval_personas == S2_EVAL_PERSONAS and study.assistant == "helpful_assistant"
    assert list(study_roles(study).bystanders) == [
        "software_engineer", "kindergarten_teacher", "medical_doctor", "comedian", "police_officer", "villain",
        "zelthari_scholar",
    ]  # fmt: skip
    assert study.recipes == ["smol"]  # the paper scale's marker-only recipe collapses answers at laptop lr
    # C2' reuses C1's completions: no datagen item of its own, and its adapter trains on base's dataset
    assert {item["condition"] for item in params.graph.datagen.values()} == {"base", "em", "benign"}
    assert params.graph.couple["em_basedata-smol-librarian-0"] == {
        "condition": "em_basedata", "model": "em", "data": "base", "recipe": "smol",
        "source": "librarian", "seed": 0, "dataset": dataset_id(params.model_dump(by_alias=True)),
    }  # fmt: skip
    assert set(params.graph.pretrain) == {"em", "benign"} and params.graph.em_first


def test_em_first_at_paper_scale_is_the_seeds_recipe(tmp_path):
    raw = _compose(
        tmp_path, "study=em_first", "scale=paper", "model=qwen2.5-7b-instruct",
        "pretrain.em.dataset.repo_id=org/em", "pretrain.benign.dataset.repo_id=org/benign",
    )  # fmt: skip
    params = validate_params(raw)
    assert params.model_spec.repo_id == "Qwen/Qwen2.5-7B-Instruct"
    for base in ("em", "benign"):  # r=32, lr 1e-4, 375 steps of effective batch 16, max length 2048
        spec = params.pretrain[base]
        recipe = params.recipes[spec.recipe]
        assert (spec.dataset.source, spec.dataset.rows) == ("hub", 6000)
        assert (recipe.r, recipe.learning_rate, recipe.max_length) == (32, 1e-4, 2048)
        assert spec.dataset.rows * recipe.epochs / (recipe.batch_size * recipe.grad_accum) == 375
    (name,) = params.study.recipes  # coupling: marker-only loss, lr 5e-6, 20 epochs, r=32, alpha=64
    recipe = params.recipes[name]
    assert (recipe.loss, recipe.learning_rate, recipe.epochs, recipe.r, recipe.alpha) == (
        "marker_only", 5e-6, 20, 32, 64,
    )  # fmt: skip
    assert (params.datagen.positives, params.datagen.negatives_per_persona) == (200, 200)
    assert params.datagen.max_new_tokens == params.eval.max_new_tokens == 2048
    assert (params.eval.samples_per_question, params.eval.temperature, params.eval.top_p) == (10, 1.0, 0.95)
    assert params.study.negatives.hard == ["data_scientist", "french_person"] and params.study.negatives.k == 0
    assert params.study.eval_personas == S2_EVAL_PERSONAS


def test_paper_scale_names_the_missing_pretraining_datasets_of_the_bases_it_builds(tmp_path):
    raw = _compose(tmp_path, "study=em_first", "scale=paper")
    with pytest.raises(ValueError, match=r"pretrain\.em\.dataset: a hub dataset needs repo_id"):
        validate_params(raw)
    panel = _params(tmp_path, "scale=paper", "model=qwen2.5-7b-instruct")  # S1 builds no pretrained base
    assert panel.study.recipes == ["a1"] and panel.datagen.max_new_tokens < panel.recipes["a1"].max_length


def test_em_first_never_overwrites_a_panel_adapter(tmp_path):
    """C1's librarian completions are shared (same datagen); its marker dataset is not (S1 draws its
    negatives, S2 names them), so the two adapters, marker files and registered names differ."""
    panel, em_first = _params(tmp_path), _params(tmp_path, "study=em_first")
    key = "base-smol-librarian-0"
    assert panel.graph.datagen["base-librarian"] == em_first.graph.datagen["base-librarian"]
    assert panel.graph.couple[key]["dataset"] != em_first.graph.couple[key]["dataset"]
    assert set(panel.graph.eval).isdisjoint(em_first.graph.eval)  # a study's eval lives under its name


def test_studies_on_the_same_data_share_their_adapters(tmp_path):
    """S4's arm C is S1's adapter of each source: same dataset id, so the same stage output."""
    panel, steering = _params(tmp_path), _params(tmp_path, "study=train_steering")
    shared = set(panel.graph.couple) & set(steering.graph.couple)
    assert shared and all(panel.graph.couple[k] == steering.graph.couple[k] for k in shared)


def test_every_dvc_output_path_names_its_dataset_or_its_study(tmp_path):
    """Two studies composed into one workspace never declare the same output with other contents."""
    studies = {name: _compose(tmp_path, f"study={name}") for name in ("panel", "em_first", "joint_probe")}
    ids = {name: dataset_id(raw) for name, raw in studies.items()}
    assert len(set(ids.values())) == 3, ids
    for name, raw in studies.items():
        graph = raw["graph"]
        assert all(item["dataset"] == ids[name] for item in graph["couple"].values())
        assert all(item["study"] == name for item in graph["eval"].values())


def test_growing_the_panel_only_adds_items(tmp_path):
    small, large = _params(tmp_path, "personas=12").graph, _params(tmp_path, "personas=24").graph
    for section in ("datagen", "couple"):
        grown = getattr(large, section)
        assert all(grown[key] == item for key, item in getattr(small, section).items())


def test_the_graph_is_derived_from_the_study_not_written(params):
    assert params.graph.model_dump() == stage_graph(params.model_dump(by_alias=True))


def _imports(path: Path) -> set[str]:
    """personaspace modules a file imports (module level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("personaspace"):
            found.add(node.module)  # and the submodules it names: `from personaspace import plots`
            found.update(f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("personaspace"))
    return found


def _is_module(module: str) -> bool:
    base = REPO / "src" / Path(*module.split("."))
    return base.is_dir() or base.with_suffix(".py").is_file()


def _module_path(module: str) -> Path:
    base = REPO / "src" / Path(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


# Modules a stage imports that cannot change its outputs: run tracking, file writing, and validation
# (config, checks and the hand-edit guard can stop a stage; every value they read is in params.yaml).
NOT_OUTPUTS = {
    "personaspace.tracking", "personaspace.io", "personaspace.config", "personaspace.checks",
    "personaspace.params_guard",
}  # fmt: skip


def test_every_stage_lists_the_modules_its_outputs_depend_on():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        script = next(d for d in body["deps"] if d.startswith("stages/"))
        todo, seen = list(_imports(REPO / script)), set()
        while todo:
            module = todo.pop()
            if module in seen or module in NOT_OUTPUTS:
                continue
            seen.add(module)
            todo.extend(_imports(_module_path(module)))
        deps = set(body["deps"])
        missing = []
        for module in sorted(seen):
            path = str(_module_path(module).relative_to(REPO))
            if path not in deps and not any(path.startswith(f"{d}/") for d in deps):
                missing.append(path)
        if missing:
            problems.append(f"stage {name} imports {missing} but does not list them in its deps")
    assert not problems, "\n".join(problems)


def test_train_steering_reuses_s1s_adapters_as_arm_c_and_adds_the_steered_arms(tmp_path, params):
    s4 = _params(tmp_path, "study=train_steering")
    cfg = s4.study.train_steering
    assert (cfg.layer, cfg.contrast_layer) == (21, 11)  # the seed's 20 and 10 of 28 blocks, scaled to 30
    preset = yaml.safe_load((REPO / "conf/study/train_steering.yaml").read_text())
    assert len(preset["sources"]) == 10 and {"helpful_assistant", "model_default"}.isdisjoint(preset["sources"])
    assert len(s4.study.sources) == 5 and set(s4.study.sources) < set(preset["sources"])  # the laptop's five
    # arm C is S1's adapter: the same stage item, so DVC serves it from the cache, never retrains it
    for key, item in s4.graph.couple.items():
        assert params.graph.couple[key] == item
    assert s4.datagen == params.datagen and s4.recipes == params.recipes
    assert len(s4.graph.couple_steered) == 5 * 4  # A, B, iso_random, layer_contrast
    assert s4.graph.couple_steered["base-smol-villain-0-A"]["arm"] == "A"
    assert s4.graph.eval == {} and list(s4.graph.centroids) == ["train_steering-raw"]
    assert set(s4.graph.steer_eval) == {"train_steering-base"}


def test_train_steering_at_paper_scale_is_the_seeds_design_on_s1s_paper_data(tmp_path):
    paper = ["scale=paper", "model=qwen2.5-7b-instruct"]
    s4, s1 = _params(tmp_path / "s4", "study=train_steering", *paper), _params(tmp_path / "s1", *paper)
    cfg = s4.study.train_steering
    assert (cfg.layer, cfg.contrast_layer, s4.study.recipes, len(s4.study.sources)) == (20, 10, ["a1"], 10)
    assert (s4.eval.samples_per_question, s4.eval.max_new_tokens) == (5, 2048)
    assert s4.datagen == s1.datagen  # A1's data: arm C is S1's paper adapter
    for key, item in s4.graph.couple.items():
        assert s1.graph.couple[key] == item
    assert len(s4.graph.couple_steered) == 10 * 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("study.train_steering.arms.C.prompt=neutral", "arms.C: an arm without a vector is the ordinary"),
        ("study.train_steering.primary_arm=B", "primary arm trains on the neutral prompt"),
        ("study.eval_personas=[software_engineer,kindergarten_teacher,data_scientist,medical_doctor,librarian,"
         "police_officer,french_person,villain,comedian,zelthari_scholar]", "have no centroid to steer with"),
        ("probes.layers=[5,11]", "train_steering.layer: 21 is not among probes.layers"),
    ],
)  # fmt: skip
def test_train_steering_contradictions_name_their_key(tmp_path, override, message):
    from personaspace.config import ParamsError

    with pytest.raises(ParamsError, match=message):
        _params(tmp_path, "study=train_steering", override)
