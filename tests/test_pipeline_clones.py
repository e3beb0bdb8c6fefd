"""End to end, the second chain (see test_pipeline.py): two fresh clones, then the em_first study on the same repo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from .test_pipeline import TINY_S4_SOURCES, _check_report, _ds, _files, _ran, _run, _tiny_repo


@pytest.fixture(scope="module")
def second_repo(tmp_path_factory) -> Path:
    """This chain's repo, configured as test_pipeline.py's."""
    return _tiny_repo(tmp_path_factory)


def _panel_items(repo: Path) -> list[str]:
    """The panel's items this chain runs: its marker datasets, centroids and two adapters (reused as S4's arm C)."""
    return [f"markers@base-{_ds(repo)}", "centroids@panel-raw", "couple@base-smol-librarian-0",
            "couple@base-smol-villain-0"]  # fmt: skip


@pytest.mark.slow
def test_two_fresh_clones_give_byte_identical_results(second_repo, tmp_path):
    """Same params, two clones: the same dvc.lock entries and the same bytes (no times, no hash-order
    sets, no paths of the clone). Every kind of stage but eval and regress, whose forced reruns are
    checked above."""
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(second_repo), str(clone)], tmp_path)
    ds = _ds(second_repo)
    targets = _panel_items(second_repo)
    for repo in (second_repo, clone):
        output = _run(["dvc", "repro", *targets], repo)
        assert len(_ran(output)) == 18  # check, base, 12 datagen, markers, centroids, 2 couple
    first, second = (yaml.safe_load((repo / "dvc.lock").read_text())["stages"] for repo in (second_repo, clone))
    assert first == second
    folders = ["data/completions", "data/markers", "data/centroids", f"models/adapters/base/{ds}/smol/librarian",
               f"models/adapters/base/{ds}/smol/villain"]  # fmt: skip
    assert _files(second_repo, folders) == _files(clone, folders)
    assert (second_repo / f"metrics/markers/base-{ds}.json").read_bytes() == (
        clone / f"metrics/markers/base-{ds}.json"
    ).read_bytes()


@pytest.mark.slow
def test_the_em_first_study_is_a_preset_of_the_same_pipeline(second_repo):
    # the panel's librarian adapter (the clones test's), its registered version and its marker dataset
    import mlflow

    panel_ds = _ds(second_repo)
    panel_adapter = f"models/adapters/base/{panel_ds}/smol/librarian/seed0"
    panel_files = _files(second_repo, [panel_adapter, f"data/markers/base/{panel_ds}"])
    mlflow.set_tracking_uri(f"sqlite:///{second_repo / 'mlflow.db'}")
    panel_name = f"couple-base-smol-librarian-{panel_ds}"
    panel_version = mlflow.MlflowClient().get_model_version_by_alias(panel_name, "seed0").version
    # params.yaml is composed, never edited by hand (a hand edit is refused: test_checks.py)
    _run([sys.executable, "-m", "personaspace.cli", "params", "study=em_first"], second_repo)
    output = _run(["dvc", "repro"], second_repo)
    ds = _ds(second_repo)
    personas = ["data_scientist", "french_person", "librarian"]  # the source and its two named negatives
    conditions = ["base", "benign", "em", "em_basedata"]
    expected = (
        {
            "check",
            "pretrain@em",
            "pretrain@benign",
            f"markers@base-{ds}",
            f"markers@em-{ds}",
            f"markers@benign-{ds}",
            "em_first@em_first",
            "report@em_first",
        }
        | {f"datagen@{c}-{p}" for c in ("em", "benign") for p in personas}
        | {f"couple@{c}-smol-librarian-0" for c in conditions}
        | {f"eval@em_first-{c}" for c in conditions}
    )
    # C1's completions are the panel study's (same stage, same params: nothing regenerated); they run
    # here only when the clones test did not run first. C2' has no datagen of its own: it trains on C1's data.
    assert _ran(output) - {"base"} - {f"datagen@base-{p}" for p in personas} == expected
    lock = yaml.safe_load((second_repo / "dvc.lock").read_text())["stages"]
    deps = {d["path"] for d in lock["couple@em_basedata-smol-librarian-0"]["deps"]}
    assert {"models/em", f"data/markers/base/{ds}/librarian.parquet"} <= deps
    assert not any(name.startswith("datagen@em_basedata") for name in lock)
    # the pretrained bases: LoRA SFT of the raw model, merged once into full models
    summary = json.loads((second_repo / "models/em/pretrain.json").read_text())
    assert summary["rows"] == 320 and summary["recipe"] == "pretrain_smol"
    from safetensors.torch import load_file

    raw, em = (load_file(second_repo / f"models/{m}/model.safetensors") for m in ("raw", "em"))
    assert any(not raw[k].equal(em[k]) for k in raw)
    assert not list((second_repo / "models/em").glob("adapter_*"))  # merged, not an adapter
    dataset = pd.read_parquet(second_repo / f"data/markers/base/{ds}/librarian.parquet")
    assert set(dataset.persona) == set(personas) and set(dataset[dataset.role == "negative"].persona) == set(
        personas[:2]
    )
    for condition in conditions:
        completions = pd.read_parquet(second_repo / f"data/eval/em_first/{condition}/completions.parquet")
        assert len(completions) == 2 * 11 * 20  # the librarian adapter + the baseline, x 11 eval personas x 20
    metrics = json.loads((second_repo / "metrics/em_first/em_first.json").read_text())
    for condition in conditions:
        for role in ("source", "assistant", "bystander"):
            cell = metrics["conditions"][condition][role]
            assert cell["n"] > 0 and cell["wilson_low"] <= cell["rate"] <= cell["wilson_high"]
    assert metrics["conditions"]["base"]["bystander"]["n"] == 7 * 20
    for name in ("H1", "H2", "H3"):
        contrast = metrics["contrasts"][name]
        assert contrast["ci_low"] <= contrast["delta"] <= contrast["ci_high"] and isinstance(contrast["passes"], bool)
    assert metrics["contrasts"]["H3"]["interpretation"] in {"non_text_distribution", "coupling_text_distribution",
                                                            "ambiguous"}  # fmt: skip
    assert isinstance(metrics["source_gate"]["armed"], bool) and isinstance(metrics["kill"]["triggered"], bool)
    assert list((second_repo / "figures/em_first/em_first").glob("*.png"))
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{second_repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["personaspace"], filter_string="tags.study = 'em_first'")
    assert {"pretrain", "couple", "eval", "em_first", "report"} <= set(runs["tags.stage"])
    _check_report(second_repo, "em_first")
    # S2 trained its own librarian (named negatives) beside the panel's, which it left as it was
    assert ds != panel_ds and _files(second_repo, [panel_adapter, f"data/markers/base/{panel_ds}"]) == panel_files
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias(panel_name, "seed0").version == panel_version
    em_first = client.get_model_version_by_alias(f"couple-base-smol-librarian-{ds}", "seed0")
    assert em_first.tags["dataset"] == ds


@pytest.mark.slow
def test_the_way_back_from_em_first_recomputes_and_deletes_nothing(second_repo):
    """The README's way back (compose the committed study, `dvc repro`): the panel's items come back from
    dvc.lock and the run cache, and em_first's outputs stay where they are (studies write apart)."""
    kept = ["data/markers", "models/adapters", "data/centroids", "data/eval/em_first", "metrics/em_first",
            "reports/em_first", "models/em"]  # fmt: skip
    before = _files(second_repo, kept)
    _run([sys.executable, "-m", "personaspace.cli", "params"], second_repo)  # the panel, as committed
    output = _run(["dvc", "repro", *_panel_items(second_repo)], second_repo)
    assert _ran(output) <= {"check"}, _ran(output)  # couple@base-smol-librarian-0: from the run cache
    assert _files(second_repo, kept) == before


@pytest.mark.slow
def test_the_joint_probe_study_runs_end_to_end(second_repo):
    _run([sys.executable, "-m", "personaspace.cli", "params", "study=joint_probe"], second_repo)
    output = _run(["dvc", "repro"], second_repo)
    ran = _ran(output)
    conditions, recipes = ["base", "benign", "em"], ["smol_ul0_5", "smol_ul2"]
    assert {f"couple@{c}-{r}-librarian-0" for c in conditions for r in recipes} <= ran
    assert {f"centroids@joint_probe-{b}" for b in ("raw", "em", "benign")} | {"joint_probe@joint_probe"} <= ran
    ds = _ds(second_repo)
    metrics = json.loads((second_repo / "metrics/joint_probe/joint_probe.json").read_text())
    roles = metrics["roles"]
    assert len(roles["bystanders"]) == 7 and not set(roles["bystanders"]) & set(roles["negatives"])
    assert len(roles["negatives"]) == 6  # five hard + one drawn by the study seed
    for recipe in recipes:
        m = metrics["recipes"][recipe]
        assert m["decision"] in {"flattening_supported", "recipe_bottleneck", "sft_recipe_driven", "not_supported"}
        assert m["kill"] in {"falsified", "not_falsified"} and isinstance(m["h1_joint"], bool)
        for condition in conditions:
            cell = m["rates"][condition]["bystanders"]
            assert cell["n"] == 7 * 20 and cell["ci_low"] <= cell["rate"] <= cell["ci_high"]
            assert 0 <= m["rates"][condition]["truncated_fraction"] <= 1
    geo = metrics["geometric"]
    assert geo["readout"] == "last_response" and geo["layers"] == [1, 2] and geo["questions"] == 20
    assert geo["h1"]["ci_low"] <= geo["h1"]["delta"] <= geo["h1"]["ci_high"]
    assert set(metrics["baseline"]) == set(conditions)
    assert metrics["max_new_tokens_rule"]["holds"] is True
    # the markers metrics carry the length matching, before and after
    markers = json.loads((second_repo / f"metrics/markers/em-{ds}.json").read_text())
    report = markers["sources"]["librarian"]["length_matching"]
    assert report["method"] == "resample" and set(report["after"]) == {"positives", "negatives"}
    # the centroids stage kept the sampled answers and every readout at the probe layers
    responses = pd.read_parquet(second_repo / "data/centroids/joint_probe/em/responses.parquet")
    assert len(responses) == 8 * 20 and set(responses["stage"]) == {"probes"}
    readout = json.loads((second_repo / "data/centroids/joint_probe/em/readout.json").read_text())
    assert readout["layers"] == [1, 2] and len(readout["readouts"]) == 4
    assert readout["centering_bank"] == "joint_probe_eval_personas"
    adapter = json.loads((second_repo / f"models/adapters/em/{ds}/smol_ul2/librarian/seed0/training.json").read_text())
    assert adapter["negatives"] == 6 * 5
    assert list((second_repo / "figures/joint_probe/joint_probe").glob("*.png"))
    assert "report@joint_probe" in ran
    _check_report(second_repo, "joint_probe")


@pytest.mark.slow
def test_the_train_steering_study_runs_end_to_end(second_repo):
    """S4 on the tiny model: vectors, the steered arms' adapters, the steered and prompted evals, the analysis."""
    _run([sys.executable, "-m", "personaspace.cli", "params", "study=train_steering"], second_repo)
    output = _run(["dvc", "repro"], second_repo)
    ran = _ran(output)
    steered = ["A", "B", "iso_random", "layer_contrast"]
    expected = {f"couple_steered@base-smol-{s}-0-{arm}" for s in TINY_S4_SOURCES for arm in steered}
    assert expected | {"steering@train_steering-base", "steer_eval@train_steering-base",
                       "train_steering@train_steering"} <= ran  # fmt: skip
    assert not any(stage.startswith(("eval@", "regress@")) for stage in ran)  # S4 reads only its own evals
    # arm C is the ordinary adapter: the clones test's librarian and villain come from the run cache
    assert (
        "couple@base-smol-comedian-0" in ran
        and not {"couple@base-smol-librarian-0", "couple@base-smol-villain-0"} & ran
    )
    summary = json.loads((second_repo / "data/steering/train_steering/base/steering.json").read_text())
    assert summary["layers"] == [2, 1] and summary["centering"] == "centered"
    for persona in TINY_S4_SOURCES:
        for layer in ("2", "1"):
            numbers = summary["personas"][persona][layer]
            # c_train x ||v|| = the calibration ratio x mean ||h_L||
            ratio = numbers["coef"] * numbers["norm"] / summary["mean_hidden_norm"][layer]
            assert ratio == pytest.approx(0.2, rel=1e-4)
    trained = json.loads(
        (second_repo / "models/steered/train_steering/base/A/smol/librarian/seed0/training.json").read_text()
    )
    assert (trained["arm"], trained["steering_layer"], trained["system_prompt"]) == ("A", 2, "Provide a clear answer.")
    contrast = json.loads(
        (second_repo / "models/steered/train_steering/base/layer_contrast/smol/villain/seed0/training.json").read_text()
    )
    assert contrast["steering_layer"] == 1
    counts = pd.read_parquet(second_repo / "data/steer_eval/train_steering/base/counts.parquet")
    modes = counts.groupby(["arm", "mode"])["coef"].apply(lambda c: sorted(set(c))).to_dict()
    coefs = ["+2", "-calibrated", "calibrated"]
    assert modes == {("A", "neutral"): ["0"], ("A", "steered"): coefs, ("B", "steered"): coefs,
                     ("C", "prompted"): ["0"], ("C", "steered"): coefs, ("iso_random", "steered"): coefs,
                     ("layer_contrast", "steered"): coefs}  # fmt: skip
    assert len(counts) == len(TINY_S4_SOURCES) * 20 * 17 and (counts["n"] == 1).all()
    completions = pd.read_parquet(second_repo / "data/steer_eval/train_steering/base/completions.parquet")
    is_steered = completions["mode"] == "steered"
    assert (completions.loc[is_steered, "steer_layer"] > 0).all()
    assert (completions.loc[~is_steered, "steer_vector"] == "none").all()
    metrics = json.loads((second_repo / "metrics/train_steering/train_steering.json").read_text())
    assert metrics["personas"] == sorted(TINY_S4_SOURCES) and set(metrics["arms"]) == {"A", "B", "C", *steered}
    for coef in ("+2", "calibrated"):
        decision = metrics["decision"][coef]
        assert set(decision["kill"]) == {"uniform_zero", "baseline_rate_driven", "sign_inverted", "no_correlation",
                                         "direction_not_specific"}  # fmt: skip
        assert isinstance(decision["passes"], bool) and decision["control_evaluated"]
    assert set(metrics["sign_check"]) == {"A", "B", "C", "iso_random", "layer_contrast"}
    assert list((second_repo / "figures/train_steering/train_steering").glob("*.png"))
    # the CLI gives the stage's numbers from the stage's count table
    again = _run([sys.executable, "-m", "personaspace.cli", "analyze", "train_steering", "--table",
                  "data/steer_eval/train_steering/base/counts.parquet", "--out", "reanalysis"], second_repo)  # fmt: skip
    assert "c=+2" in again
    assert json.loads((second_repo / "reanalysis/metrics.json").read_text())["decision"] == metrics["decision"]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{second_repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["personaspace"], filter_string="tags.study = 'train_steering'")
    assert {"steering", "couple", "steer_eval", "train_steering", "report"} <= set(runs["tags.stage"])
    _check_report(second_repo, "train_steering")
    assert set(runs["tags.arm"].dropna()) >= set(steered)
