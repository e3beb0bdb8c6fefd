"""The shipped examples (examples/, written by scripts/example_tables.py): they are exactly what the script writes,
and `personaspace analyze <study>` on each, run as examples/README.md runs it, finds the designed effect."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats

from personaspace.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
RESAMPLES = 2000  # joint_probe's p < 0.001 needs 2 / (resamples + 1) below it; each analysis takes a few seconds


def _load_script():
    spec = importlib.util.spec_from_file_location("example_tables", REPO / "scripts" / "example_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("example_tables", module)
    spec.loader.exec_module(module)
    return module


et = _load_script()

# each study's command, as examples/README.md gives it (run from the repo root), less --params and --out
COMMANDS = {
    "em_first": ["--table", "examples/em_first/counts.csv", "--baseline", "examples/em_first/baseline.csv"],
    "joint_probe": [
        "--table", "examples/joint_probe/counts.csv", "--baseline", "examples/joint_probe/baseline.csv",
        "--states", "raw=examples/joint_probe/raw/states.npz", "em=examples/joint_probe/em/states.npz",
        "benign=examples/joint_probe/benign/states.npz",
    ],
    "train_steering": ["--table", "examples/train_steering/counts.csv"],
}  # fmt: skip


def test_examples_readme_gives_the_tested_commands():
    """Each `personaspace analyze` command in examples/README.md is COMMANDS' (the one run below), with its --out."""
    text = (EXAMPLES / "README.md").read_text().replace("\\\n", " ")
    commands = [shlex.split(line) for line in text.splitlines() if line.startswith("personaspace analyze ")]
    given = {words[2]: words[3:] for words in commands}
    assert set(given) == set(COMMANDS)
    for study, words in given.items():
        at = words.index("--out")
        assert words[:at] + words[at + 2 :] == COMMANDS[study], study
        assert words[at + 1].startswith("reanalysis/"), study


def test_the_shipped_examples_are_what_the_script_writes(tmp_path):
    written = et.write_examples(tmp_path)
    relative = sorted(str(p.relative_to(tmp_path)) for p in written)
    shipped = sorted(str(p.relative_to(EXAMPLES)) for p in EXAMPLES.rglob("*") if p.is_file() and p.name != "README.md")
    assert shipped == relative, "examples/ holds other files than scripts/example_tables.py writes"
    for name in relative:
        assert (EXAMPLES / name).read_bytes() == (tmp_path / name).read_bytes(), (
            f"examples/{name} differs from what the script writes; run `python scripts/example_tables.py`"
        )
    sizes = {name: (tmp_path / name).stat().st_size for name in relative}
    assert sum(sizes.values()) < 1_000_000, sizes
    assert all(len((tmp_path / n).read_text().splitlines()) <= 601 for n in relative if n.endswith(".csv"))


def test_the_states_files_are_the_centroids_stage_format():
    """states.npz: the readout (rows, layers, hidden) float32, persona, question_id, layers; centroids.npz records the
    base, so the analysis refuses a states file given as another base's."""
    from personaspace.analyses import TableError
    from personaspace.analyses.joint_probe import load_states

    study = et.load_study("joint_probe")
    for base in ("raw", "em", "benign"):
        with np.load(EXAMPLES / "joint_probe" / base / "states.npz") as data:
            assert set(data.files) == {"last_response", "persona", "question_id", "layers"}
            assert data["last_response"].dtype == np.float32
            assert data["last_response"].shape == (8 * 8, 6, et.JP_HIDDEN)
            assert list(dict.fromkeys(data["persona"])) == study.eval_personas
            assert data["layers"].tolist() == et.laptop_layers("joint_probe")
        states = load_states(EXAMPLES / "joint_probe" / base / "states.npz", "last_response", base=base)
        assert states.base == base
    with pytest.raises(TableError, match="holds the readouts of base 'em', given as base 'raw'"):
        load_states(EXAMPLES / "joint_probe/em/states.npz", "last_response", base="raw")


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> dict[str, dict]:
    """Each study's metrics.json from `personaspace analyze <study>` on its examples, with RESAMPLES resamples."""
    root = tmp_path_factory.mktemp("examples")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["stats"]["bootstrap_resamples"] = RESAMPLES
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the README's relative paths, and the default --study conf/study/<study>.yaml
        for study, args in COMMANDS.items():
            target = root / study
            assert main(["analyze", study, *args, "--params", str(params), "--out", str(target)]) == 0, study
            assert list(target.glob("*.png")), f"{study}: no figures"
            out[study] = json.loads((target / "metrics.json").read_text())
    return out


def test_em_first_example_gives_the_designed_rates_and_decisions(analysed):
    metrics = analysed["em_first"]
    rates = {c: entry["bystander"]["rate"] for c, entry in metrics["conditions"].items()}
    assert rates == pytest.approx({"base": 0.05, "em": 0.40, "em_basedata": 0.38, "benign": 0.10})
    assert {b: entry["rate"] for b, entry in metrics["baselines"].items()} == pytest.approx(
        {"raw": 0.0, "em": 0.01, "benign": 0.02}
    )
    assert metrics["conditions"]["em"]["source"]["rate"] == pytest.approx(0.9)
    deltas = {name: c["delta"] for name, c in metrics["contrasts"].items()}
    assert deltas == pytest.approx({"H1": 0.34, "H2": 0.31, "H3": 0.02})  # baseline-subtracted
    assert metrics["contrasts"]["H3"]["p"] > 0.10 and metrics["contrasts"]["H3"]["ci_low"] > -0.05
    assert metrics["source_gate"]["ratio"] == pytest.approx(1.0) and metrics["kill"]["rate"] == pytest.approx(0.39)
    assert metrics["decisions"] == {
        "H1": "pass", "H2": "pass", "H3": "fail", "H3_interpretation": "non_text_distribution",
        "source_gate": "not_armed", "kill": "not_triggered",
    }  # fmt: skip


def test_joint_probe_example_gives_the_designed_deltas_and_buckets(analysed):
    metrics = analysed["joint_probe"]
    study = et.load_study("joint_probe")
    cfg = study.joint_probe
    assert list(metrics["recipes"]) == sorted(study.recipes)
    for recipe, (control, treatment, specificity) in zip(study.recipes, et.JP_RATES, strict=True):
        entry = metrics["recipes"][recipe]
        rates = {c: r["bystanders"]["rate"] for c, r in entry["rates"].items()}
        assert rates == pytest.approx({cfg.control: control, cfg.treatment: treatment, cfg.specificity: specificity})
        assert entry["h1"]["delta"] == pytest.approx(treatment - control)
        assert entry["h1"]["ci_low"] < entry["h1"]["delta"] < entry["h1"]["ci_high"]  # staggered: not degenerate
    decisions = [metrics["recipes"][r]["decision"] for r in study.recipes]
    assert decisions == ["flattening_supported", "flattening_supported", "recipe_bottleneck"]
    assert set(metrics["summary"]["kills"].values()) == {"not_falsified"}
    geo = metrics["geometric"]["h1"]
    designed = et.centered_cosine(et.JP_SHIFT["treatment"], 8) - et.centered_cosine(et.JP_SHIFT["control"], 8)
    assert designed == pytest.approx(0.0688, abs=1e-4)
    assert geo["delta"] == pytest.approx(designed, abs=0.005) and geo["passes"] and geo["ci_low"] > 0.05
    assert [layer["layer"] for layer in geo["by_layer"]] == et.laptop_layers("joint_probe")
    assert all(layer["ci_excludes_zero"] for layer in geo["by_layer"])
    baseline = {c: entry["bystanders"]["rate"] for c, entry in metrics["baseline"].items()}
    assert baseline == pytest.approx({cfg.control: 0.0, cfg.treatment: 7 / 560, cfg.specificity: 0.0})


def test_train_steering_example_recovers_the_ranking_only_in_the_centroid_arms(analysed):
    metrics = analysed["train_steering"]
    study = et.load_study("train_steering")
    assert metrics["personas"] == sorted(study.sources) and metrics["questions"] == len(et.TS_QUESTIONS)
    prompted = [metrics["prompted_rates"][p]["rate"] for p in study.sources]
    assert np.abs(np.array(prompted) - et.TS_RISING).max() < 0.04  # the designed rates, up to the cells' noise
    assert scipy_stats.spearmanr(prompted, et.TS_RISING).statistic == pytest.approx(1.0)
    for coef in ("+2", "calibrated"):
        decision = metrics["decision"][coef]
        assert decision["rho"] == pytest.approx(1.0) and 0.9 < decision["ci_low"] <= decision["ci_high"] <= 1.0
        assert decision["passes"] and not decision["killed"], decision
        assert abs(decision["rho_neutral"]) < 0.2  # the neutral-prompt rates are the unrelated permutation
    passes = {
        arm: [r["passes"] for c, r in by_coef.items() if c != "-calibrated"] for arm, by_coef in metrics["arms"].items()
    }
    assert passes == {"A": [True, True], "B": [True, True], "C": [False, False], "iso_random": [False, False],
                      "layer_contrast": [False, False]}  # fmt: skip
    holds = {arm: check["holds"] for arm, check in metrics["sign_check"].items()}
    assert holds == {"A": True, "B": True, "C": True, "iso_random": False, "layer_contrast": True}
