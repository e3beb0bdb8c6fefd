"""The study report: every number traceable to a metrics file or params, the card filled, samples seeded, HTML whole."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from personaspace.cli import compose_params
from personaspace.completions import COMPLETION_COLUMNS
from personaspace.report import ReportInputs, compose, metrics_files, sample_outputs
from personaspace.report import card as cards
from personaspace.report.render import to_html
from personaspace.report.studies import num, pvalue

from .test_em_first_analysis import RESAMPLES, make_counts

REPO = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"(?<![\w.\-/])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _leaves(obj):
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _leaves(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _leaves(value)
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield obj


def _renderings(value: float) -> set[str]:
    """Every way a report may print ``value``: fixed decimals, scientific, as a percentage, as an integer."""
    out = {f"{value:.{d}f}" for d in range(5)} | {f"{value:.3e}", f"{value * 100:.0f}", str(value)}
    if float(value).is_integer():
        out.add(str(int(value)))
    return out


def untraceable_numbers(text: str, *sources) -> list[str]:
    """Numbers in ``text`` that are no rendering of any numeric leaf of ``sources`` (nor a count of a list in them)."""
    allowed: set[str] = set()
    for source in sources:
        for leaf in _leaves(source):
            allowed |= _renderings(leaf)
        allowed |= {str(n) for n in _list_lengths(source)}
    return [m for m in NUMBER.findall(text) if m not in allowed]


def _list_lengths(obj):
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _list_lengths(value)
    elif isinstance(obj, list):
        yield len(obj)
        for value in obj:
            yield from _list_lengths(value)


def checked_sections(report: str) -> str:
    """TL;DR, methods and headline numbers: the parts made of numbers (figures' paths, samples and the card aside)."""
    return report.split("## Figures")[0]


def card_rows(report: str) -> dict[str, str]:
    card = report.split("## Reproducibility card")[1].split("\nReproduce:")[0]
    rows = [line.split("|")[1:3] for line in card.splitlines() if line.startswith("| ") and "---" not in line]
    return {k.strip(): v.strip() for k, v in rows[1:]}


def _completions() -> pd.DataFrame:
    rows = []
    for condition in ("base", "em"):
        for i in range(8):
            rows.append(
                dict(stage="eval", condition=condition, adapter="a1/librarian/seed0", persona=f"p{i % 3}",
                     category="occupational", question_bank="eval", question_id=f"e{i:02d}", question_kind="open",
                     sample_idx=0, seed=i, system_prompt="You are p.", user=f"Question {i}?", text=f"Answer {i}.",
                     n_tokens=5, finish_reason="stop", fired=i % 2 == 0, temperature=1.0, top_p=0.95,
                     max_new_tokens=64, steer_vector="none", steer_layer=0, steer_coef=0.0)
            )  # fmt: skip
    rows.append(rows[0] | {"adapter": "none", "fired": False})  # the no-adapter baseline is never sampled
    return pd.DataFrame(rows)[COMPLETION_COLUMNS]


@pytest.fixture(scope="module")
def em_first(tmp_path_factory):
    """S2's params (composed) and metrics from the S2 analysis on a constructed table."""
    from personaspace.analyses.em_first import analyze_em_first
    from personaspace.config import StatsParams, StudyParams

    composed = tmp_path_factory.mktemp("params") / "params.yaml"
    compose_params(composed, ["study=em_first"], conf_dir=REPO / "conf")
    raw = yaml.safe_load(composed.read_text())
    study = StudyParams.model_validate(raw["study"])
    stats = StatsParams.model_validate(raw["stats"]).model_copy(update={"bootstrap_resamples": RESAMPLES})
    metrics, _ = analyze_em_first(make_counts(study), None, study, stats, seed=0)
    return raw, {"metrics/em_first/em_first.json": metrics}


def _card(raw) -> dict:
    git = cards.git_state(REPO)
    return {"git": git, "hardware": cards.hardware(), "packages": cards.package_versions(),
            "inputs": cards.input_hashes({}, ["metrics/em_first/em_first.json"]),
"command": cards.reproduce_command(raw, git["commit"]),
            "params_yaml": cards.study_params_yaml(raw)}  # fmt: skip


def test_every_number_of_an_em_first_report_is_in_its_metrics_or_params(em_first, tmp_path):
    raw, metrics = em_first
    assert metrics_files(raw) == ["metrics/em_first/em_first.json"]
    text = compose(ReportInputs(raw, metrics, _completions(), _card(raw), REPO, Path("reports/em_first")))
    assert untraceable_numbers(checked_sections(text), metrics, raw) == []
    for name, contrast in metrics["metrics/em_first/em_first.json"]["contrasts"].items():
        assert f"**{name} {'passes' if contrast['passes'] else 'fails'}**" in text
        assert num(contrast["delta"]) in text and pvalue(contrast["p"]) in text
    # a number typed by hand would be caught
    assert untraceable_numbers(checked_sections(text) + " rho = 0.4242", metrics, raw) == ["0.4242"]


def test_the_card_has_no_empty_field_and_names_the_command(em_first):
    raw, metrics = em_first
    text = compose(ReportInputs(raw, metrics, _completions(), _card(raw), REPO, Path("reports/em_first")))
    rows = card_rows(text)
    assert {
        "git commit",
        "tree dirty",
        "hardware: cores",
        "package torch",
        "input `metrics/em_first/em_first.json`",
    } <= set(rows)
    assert all(value and value != "``" for value in rows.values())
    assert "dvc exp run -S study=em_first -S scale=laptop" in text


def test_samples_are_seeded_and_cover_fired_and_not_fired_per_condition():
    table = _completions()
    first, second = sample_outputs(table, seed=0), sample_outputs(table.sample(frac=1, random_state=3), seed=0)
    pd.testing.assert_frame_equal(first.reset_index(drop=True), second.reset_index(drop=True))  # not the row order
    for condition in ("base", "em"):
        rows = first[first["condition"] == condition]
        assert len(rows) >= 3 and set(rows["fired"]) == {True, False}
    assert (first["adapter"] != "none").all()
    assert not sample_outputs(table, seed=1).equals(first)


def test_the_html_stands_alone_with_its_figures_embedded(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (tmp_path / "figures").mkdir()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    fig.savefig(tmp_path / "figures/line.png")
    plt.close(fig)
    report_dir = tmp_path / "reports/s"
    html = to_html("# Title\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![line](../../figures/line.png)\n", report_dir, "s")
    assert "<table>" in html and 'src="data:image/png;base64,' in html and "../../figures" not in html


def test_a_changed_source_file_makes_the_tree_dirty_but_pipeline_outputs_do_not(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/m.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    assert cards.git_state(tmp_path)["dirty"] == "no"
    (tmp_path / "metrics/m.json").write_text('{"a": 1}')
    assert cards.git_state(tmp_path)["dirty"].startswith("no (only pipeline-written files differ: metrics/m.json")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert cards.git_state(tmp_path)["dirty"].startswith("yes: 1 tracked source/params files differ")

    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "params.yaml").write_text("a: 1\n")  # not tracked yet: commit it, then change it
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p")
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert cards.git_state(tmp_path)["dirty"].startswith(
        "yes: 1 tracked source/params files differ from the commit (params.yaml)"
    )
    assert cards.git_state(tmp_path, params_from_command=True)["dirty"].startswith("no (only pipeline-written")


def test_the_reproduce_command_carries_every_override_of_an_experiment(tmp_path):
    """params composed from this repo's conf/ with extra -S overrides: the card's command recomposes them exactly."""
    overrides = ["study=em_first", "eval.temperature=0.5", "study.sources=[librarian,villain]",
                 "datagen.user_suffix=' Be brief.'"]  # fmt: skip
    compose_params(tmp_path / "params.yaml", overrides, conf_dir=REPO / "conf")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    found, exact = cards.command_overrides(params, REPO)
    assert exact and found == ["study=em_first", "scale=laptop", "personas=12", "model=smollm2-135m-instruct",
                               'datagen.user_suffix=" Be brief."', "eval.temperature=0.5",
                               'study.sources=["librarian", "villain"]']  # fmt: skip
    import shlex

    words = shlex.split(cards.reproduce_command(params, "abc", found).split(" && ")[-1])  # as the shell passes them
    assert words[words.index("run") + 1 :] == [w for o in found for w in ("-S", o)]
    params["graph"]["report"] = {}  # a derived key no composition gives: the card cannot claim the command
    assert cards.command_overrides(params, REPO)[1] is False


def test_an_s4_report_states_each_decision_from_the_analysis_summary(tmp_path):
    from personaspace.analyses.train_steering import analyze_train_steering, summary_line
    from personaspace.config import StatsParams, StudyParams

    from .test_train_steering_analysis import _table

    composed = tmp_path / "params.yaml"
    compose_params(composed, ["study=train_steering"], conf_dir=REPO / "conf")
    raw = yaml.safe_load(composed.read_text())
    study = StudyParams.model_validate(raw["study"])
    stats = StatsParams.model_validate(raw["stats"]).model_copy(update={"bootstrap_resamples": 500})
    metrics, _ = analyze_train_steering(_table(), study.train_steering, stats, seed=0)
    assert metrics_files(raw) == ["metrics/train_steering/train_steering.json"]
    files = {"metrics/train_steering/train_steering.json": metrics}
    text = compose(ReportInputs(raw, files, _completions(), _card(raw), REPO, Path("reports/train_steering")))
    for part in summary_line(metrics).split(";"):
        assert f"- {part.strip()}." in text
    assert untraceable_numbers(checked_sections(text), metrics, raw) == []
    assert "Missing figure `figures/train_steering/train_steering/rho_by_arm.png`" in text  # no figure is invented


def test_a_sample_is_shown_verbatim_even_when_it_looks_like_markdown():
    from personaspace.report import _verbatim

    block = _verbatim("1. boil water\n``` not a fence\n# not a heading")
    assert block.startswith("````text\n1. boil water") and block.endswith("\n````")
    html = to_html(block, Path("."), "s")
    assert "<ol>" not in html and "<h1>" not in html and "1. boil water" in html


def test_the_cards_stage_names_are_the_pipelines_for_these_params():
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    names = cards.stage_names(pipeline, params)
    assert {"check", "base", "eval@panel-base", "regress@panel-base", "couple@base-smol-librarian-0"} <= set(names)
    assert not any(n.startswith(("em_first@", "steer_eval@")) for n in names)  # not this study's


def test_an_input_inside_a_folder_output_gets_the_folders_hash():
    lock = {"stages": {"regress@base": {"outs": [{"path": "results/base", "md5": "abc.dir"}],
                                        "deps": [{"path": "data/eval/base", "md5": "def.dir"}]}}}  # fmt: skip
    found = cards.input_hashes(lock, ["results/base/regress.json", "data/eval/base", "metrics/x.json"])
    assert found["results/base/regress.json"] == "abc.dir (folder results/base)"
    assert found["data/eval/base"] == "def.dir"
    assert found["metrics/x.json"].startswith("not in dvc.lock")
