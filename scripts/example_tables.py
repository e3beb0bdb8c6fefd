"""Write the example inputs of every `personaspace analyze` study: hand-made tables with designed effects.

    python scripts/example_tables.py                 # -> examples/{em_first,joint_probe,train_steering}/

Each study's personas, conditions, recipes and arms come from its preset (conf/study/<study>.yaml,
read through StudyParams against params.yaml as `personaspace analyze` reads it); only the effects
are designed here, and examples/README.md says what each file holds, what the analysis finds in it
and the command that analyses it. Deterministic: no clock, and the only random numbers are seeded
(the S3 readouts' noise, the S4 cells' wobble), so rerunning rewrites identical bytes
(tests/test_example_tables.py checks the shipped files against a fresh run).

The builders are importable (the analyses' tests build their known-answer tables with them):

    spec = importlib.util.spec_from_file_location("example_tables", REPO / "scripts/example_tables.py")

- S2 `em_first_counts`, `em_first_baseline`: bystander fires per cell by condition (EM_PATTERNS);
- S3 `joint_probe_counts`, `joint_probe_baseline`, `joint_probe_states`: rates per recipe and
  condition, and per-question readouts whose bystanders lean toward the source on a chosen base;
- S4 `train_steering_cells`, `train_steering_counts`: one series per (arm, mode, coef) near its rates.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from personaspace.analyses.joint_probe import BaseStates
from personaspace.analyses.train_steering import SIGN_CHECK, UNSTEERED, coef_label
from personaspace.config import ProbesParams, StudyParams, TrainSteeringParams
from personaspace.probes import centroids
from personaspace.seeds import stable_seed
from personaspace.study import study_roles

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "examples"

# ---------------------------------------------------------------- S2: em_first
EM_QUESTIONS = [f"q{i:02d}" for i in range(10)]
EM_K = 10  # completions per (condition, persona, question) cell
# EM_SPREAD sums to 0: cells vary around the target, so the bootstrap is not degenerate
EM_SPREAD = (-2, 2, -1, 1, 0, 0, 1, -1, 2, -2)
EM_H3_SHIFT = (-2, 2, -1, 1, -2, 1, 0, -1, 0, 0)  # sums to -2: em_basedata 0.2 fires per cell (2 pp) below em
# Bystander fires per cell (out of EM_K) by (question index i, rotated index j): pooled rates base 0.05,
# em 0.40, em_basedata 0.38, benign 0.10.
EM_PATTERNS: dict[str, Callable[[int, int], int]] = {
    "base": lambda i, j: j % 2,
    "em": lambda i, j: 4 + EM_SPREAD[j],
    "em_basedata": lambda i, j: 4 + EM_SPREAD[j] + EM_H3_SHIFT[i],
    "benign": lambda i, j: 2 * (j % 2),
}
EM_SOURCE = {"base": 9, "em": 9, "em_basedata": 9, "benign": 9}  # the source fires 9 of 10 in every cell
EM_BASELINE = {"base": 0, "em": 1, "em_basedata": 0, "benign": 1}  # pre-coupling fires in questions 0 and 5


def em_first_counts(
    study: StudyParams,
    patterns: Mapping[str, Callable[[int, int], int]] = EM_PATTERNS,
    source: Mapping[str, int] | None = None,
    tokens: bool = True,
) -> pd.DataFrame:
    """Cells of every condition x eval persona x question; negatives and the assistant never fire.

    A bystander's cell fires ``patterns[condition](i, j)`` of EM_K, i the question's index and j it
    rotated by the bystander's position (so every bystander sees every value once); a source fires
    ``source[condition]`` (EM_SOURCE by default). ``mean_tokens``: 40 + i, 10 more under ``em``.
    """
    source = EM_SOURCE | dict(source or {})
    bystanders = list(study_roles(study).bystanders)
    rows = []
    for condition, pattern in patterns.items():
        for persona in study.eval_personas:
            for i, question in enumerate(EM_QUESTIONS):
                if persona in bystanders:
                    fired = pattern(i, (i + bystanders.index(persona)) % len(EM_QUESTIONS))
                else:
                    fired = source[condition] if persona in study.sources else 0
                row = {"condition": condition, "persona": persona, "question_id": question, "fired": fired, "n": EM_K}
                if tokens:
                    row["mean_tokens"] = 40.0 + i + (10.0 if condition == "em" else 0.0)
                rows.append(row)
    return pd.DataFrame(rows)


def em_first_baseline(study: StudyParams) -> pd.DataFrame:
    """Pre-coupling evals: em's base fires once in questions 0 and 5 (em_basedata's eval of it never), benign's too.

    Pooled per pretrained base: raw 0, em 14 / 1400 = 0.01, benign 0.02.
    """
    rows = [
        {"condition": c, "persona": p, "question_id": q, "fired": fires if i % 5 == 0 else 0, "n": EM_K}
        for c, fires in EM_BASELINE.items()
        for p in study.eval_personas
        for i, q in enumerate(EM_QUESTIONS)
    ]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- S3: joint_probe
JP_QUESTIONS = [f"e{i:02d}" for i in range(8)]  # a multiple of 4: each persona's wobble sums to 0
JP_K = 10
JP_HIDDEN = 12  # at least the eval personas: each persona gets its own axis
# Bystander rate of (control, treatment, specificity) = (C1 base, C2 em, C3 benign), per recipe in the
# preset's order (the lambda sweep 0.5, 1, 2): the larger lambda, the less C2 leaks.
JP_RATES = ((0.1, 0.5, 0.1), (0.1, 0.3, 0.1), (0.1, 0.1, 0.1))
JP_SHIFT = {"control": 0.0, "treatment": 0.6, "specificity": 0.0}  # bystanders' lean toward the source, per base
JP_NOISE = 0.05
# pre-coupling fires in each persona's first question, per base
JP_BASELINE_FIRES = {"control": 0, "treatment": 1, "specificity": 0}
JP_STATE_SEEDS = {"control": 1, "treatment": 2, "specificity": 3}


def joint_probe_counts(
    study: StudyParams,
    rates: Mapping[str, Mapping[str, float]],
    questions: Sequence[str] = JP_QUESTIONS,
    k: int = JP_K,
    stagger: bool = False,
) -> pd.DataFrame:
    """Fires per (recipe, condition, persona, question) cell around ``rates[recipe][condition]`` (not degenerate).

    Every eval persona fires at its condition's rate, round(rate x k) per cell, plus a wobble of
    (+1, -1, 0, 0) that cycles over questions (it sums to 0 over 4 consecutive questions); no
    completion is truncated. ``stagger``: the cycle starts one step later per condition, so the
    paired (treatment - control) difference varies from cell to cell and its bootstrap interval has
    a width (unstaggered, every cell differs by the same count).
    """
    rows = []
    for recipe, by_condition in rates.items():
        for c_i, (condition, rate) in enumerate(by_condition.items()):
            for p_i, persona in enumerate(study.eval_personas):
                for q_i, question in enumerate(questions):
                    wobble = (1, -1, 0, 0)[(p_i + q_i + (c_i if stagger else 0)) % 4]
                    fired = min(k, max(0, round(rate * k) + wobble))
                    rows.append({"condition": condition, "recipe": recipe, "persona": persona,
                                 "question_id": question, "fired": fired, "n": k, "truncated": 0})  # fmt: skip
    return pd.DataFrame(rows)


def joint_probe_baseline(
    study: StudyParams, fires: Mapping[str, int], questions: Sequence[str] = JP_QUESTIONS, k: int = JP_K
) -> pd.DataFrame:
    """Pre-coupling counts: every eval persona fires ``fires[condition]`` of ``k`` in its first question, else 0."""
    rows = [
        {"condition": c, "persona": p, "question_id": q, "fired": f if i == 0 else 0, "n": k}
        for c, f in fires.items()
        for p in study.eval_personas
        for i, q in enumerate(questions)
    ]
    return pd.DataFrame(rows)


def joint_probe_states(
    study: StudyParams,
    shift: float,
    seed: int,
    questions: Sequence[str],
    layers: Sequence[int],
    hidden: int = JP_HIDDEN,
    noise: float = JP_NOISE,
) -> BaseStates:
    """Per-question readouts: each persona its own axis plus noise; ``shift`` pulls bystanders toward the source.

    Rows in the centroids stage's order (persona by persona, questions within), values
    (rows, layers, hidden): axis(persona) + shift x axis(source) (the source itself unshifted) + a
    Gaussian of sd ``noise`` per row and layer, drawn from ``numpy.random.default_rng(seed)``.
    """
    rng = np.random.default_rng(seed)
    axes = {p: np.eye(hidden)[i] for i, p in enumerate(study.eval_personas)}
    source = study.sources[0]
    rows, personas, question_ids = [], [], []
    for persona in study.eval_personas:
        centre = axes[persona] + (shift * axes[source] if persona != source else 0)
        for question in questions:
            rows.append(centre + rng.normal(scale=noise, size=(len(layers), hidden)))
            personas.append(persona)
            question_ids.append(question)
    return BaseStates(np.asarray(rows), personas, question_ids, list(layers))


def centered_cosine(shift: float, personas: int) -> float:
    """The noise-free centered cosine of the source and a bystander under ``joint_probe_states``' design.

    ``personas`` axes e_0 (the source) .. e_{m-1}, bystander i at e_i + shift e_0, centered over all m:
    the designed geometric delta is centered_cosine(treatment's shift) - centered_cosine(control's).
    """
    m, gap = personas, (1.0 - shift) ** 2
    dot = -((m - 1) * gap + 1) / m**2
    source = ((m - 1) ** 2 * gap + (m - 1)) / m**2
    bystander = (gap + (m - 1) ** 2 + (m - 2)) / m**2
    return dot / np.sqrt(source * bystander)


# ---------------------------------------------------------------- S4: train_steering
TS_QUESTIONS = [f"q{j:02d}" for j in range(3)]
TS_N = 40  # completions per cell: rates resolved to 0.025
TS_NOISE = 0.1  # the example's cells within 10% of the rate's fires (at least 1): pooled rates within 0.07 of design
TS_RISING = np.linspace(0.1, 0.8, 10)  # the prompted ranking to recover (sources in the preset's order)
TS_UNRELATED = TS_RISING[[3, 8, 0, 6, 9, 1, 5, 2, 7, 4]]  # a permutation of it, Spearman ~0 with TS_RISING


def train_steering_cells(
    arm: str,
    mode: str,
    coef: str,
    rates: Sequence[float],
    personas: Sequence[str],
    questions: Sequence[str],
    n: int,
    noise: float = 0.3,
) -> list[dict[str, Any]]:
    """One (arm, mode, coef) series: every question of each persona near its rate.

    Seeded noise (``stable_seed("cells", arm, mode, coef)``), a whole number of fires drawn uniformly
    within ``noise`` x the rate's fires (at least 1) per cell, so question resamples reorder close personas.
    """
    rng = np.random.default_rng(stable_seed("cells", arm, mode, coef))
    rows = []
    for p, rate in zip(personas, rates, strict=True):
        spread = max(1, round(noise * rate * n))
        for q in questions:
            fired = int(np.clip(round(rate * n) + rng.integers(-spread, spread + 1), 0, n))
            rows.append(
                {"arm": arm, "persona": p, "question_id": q, "mode": mode, "coef": coef, "fired": fired, "n": n}
            )
    return rows


def train_steering_counts(
    cfg: TrainSteeringParams,
    personas: Sequence[str],
    questions: Sequence[str],
    n: int,
    steered_a: Sequence[float] = TS_RISING,
    neutral_a: Sequence[float] = TS_UNRELATED,
    iso: Sequence[float] = TS_UNRELATED,
    minus: Sequence[float] | None = None,
    others: Mapping[str, Sequence[float]] | None = None,
    iso_minus: Sequence[float] | None = None,
    noise: float = 0.3,
) -> pd.DataFrame:
    """An S4 count table under ``cfg``'s arms and c_eval: the reference arm prompted (TS_RISING), the primary
    arm neutral (``neutral_a``), the primary and control arms steered at every c_eval label (``steered_a``,
    ``iso``), the primary at -calibrated (``minus``, default half of ``steered_a``).

    ``others``: arm -> steered rates of further arms at every c_eval label, with half of them at
    -calibrated (steer_eval samples every arm at every label); ``iso_minus``: the control arm's
    -calibrated rates (None: no such rows); ``noise``: ``train_steering_cells``'.
    """
    labels, minus_label = [coef_label(c) for c in cfg.c_eval], SIGN_CHECK[1]
    rising = TS_RISING[: len(personas)]

    def cells(arm: str, mode: str, coef: str, rates: Sequence[float]) -> list[dict[str, Any]]:
        return train_steering_cells(arm, mode, coef, rates, personas, questions, n, noise)

    rows = cells(cfg.reference_arm, "prompted", UNSTEERED, rising) + cells(
        cfg.primary_arm, "neutral", UNSTEERED, neutral_a
    )
    for coef in labels:
        rows += cells(cfg.primary_arm, "steered", coef, steered_a) + cells(cfg.control_arm, "steered", coef, iso)
    rows += cells(cfg.primary_arm, "steered", minus_label, np.asarray(steered_a) / 2 if minus is None else minus)
    if iso_minus is not None:
        rows += cells(cfg.control_arm, "steered", minus_label, iso_minus)
    for arm, rates in (others or {}).items():
        for coef in labels:
            rows += cells(arm, "steered", coef, rates)
        rows += cells(arm, "steered", minus_label, np.asarray(rates) / 2)
    return pd.DataFrame(rows)


def train_steering_others(cfg: TrainSteeringParams) -> dict[str, np.ndarray]:
    """The example's other arms: one trained with the centroid at the steered layer recovers the ranking
    (TS_RISING; B, persona prompt + centroid); the rest do not (TS_UNRELATED: C, the prompt-trained adapter
    steered, the earlier failure; layer_contrast, the centroid at the contrast layer)."""
    return {
        arm: TS_RISING if spec.vector == "centroid" and spec.layer == "primary" else TS_UNRELATED
        for arm, spec in cfg.arms.items()
        if arm not in (cfg.primary_arm, cfg.control_arm)
    }


# ---------------------------------------------------------------- the shipped examples
def load_study(name: str, params: Path = REPO / "params.yaml") -> StudyParams:
    """conf/study/<name>.yaml, its interpolations (``${panels.n12}``) resolved against ``params`` as the CLI does."""
    from omegaconf import OmegaConf

    raw = yaml.safe_load(params.read_text())
    preset = yaml.safe_load((REPO / "conf/study" / f"{name}.yaml").read_text())
    resolved = OmegaConf.to_container(OmegaConf.create({**raw, "study": preset}), resolve=True)["study"]
    return StudyParams.model_validate(resolved)


def laptop_layers(name: str) -> list[int]:
    """The probe layers of the study's laptop scale (conf/study_scale/<name>_laptop.yaml), SmolLM2's indices."""
    raw = yaml.safe_load((REPO / "conf/study_scale" / f"{name}_laptop.yaml").read_text())
    layers = ProbesParams.model_validate(raw["probes"]).layers
    assert layers is not None, f"conf/study_scale/{name}_laptop.yaml names no probes.layers"
    return layers


def joint_probe_examples(study: StudyParams) -> dict[str, Any]:
    """S3: counts, baseline and, per pretrained base, the centroids stage's states.npz and centroids.npz."""
    cfg = study.joint_probe
    assert cfg is not None
    roles = {"control": cfg.control, "treatment": cfg.treatment, "specificity": cfg.specificity}
    rates = {
        recipe: {roles[role]: rate for role, rate in zip(("control", "treatment", "specificity"), by_role, strict=True)}
        for recipe, by_role in zip(study.recipes, JP_RATES, strict=True)
    }
    files: dict[str, Any] = {
        "counts.csv": joint_probe_counts(study, rates, stagger=True),
        "baseline.csv": joint_probe_baseline(study, {roles[r]: f for r, f in JP_BASELINE_FIRES.items()}),
    }
    layers = laptop_layers(study.name)
    for role, condition in roles.items():
        base = study.conditions[condition].pretrained
        states = joint_probe_states(study, JP_SHIFT[role], JP_STATE_SEEDS[role], JP_QUESTIONS, layers)
        values = states.values.astype(np.float32)  # the stage's readouts are float32
        order, cents = centroids(values, list(states.personas))
        files[f"{base}/states.npz"] = {
            cfg.readout: values, "persona": np.array(states.personas), "question_id": np.array(states.question_ids),
            "layers": np.array(layers),
        }  # fmt: skip
        files[f"{base}/centroids.npz"] = {cfg.readout: cents, "personas": np.array(order), "layers": np.array(layers),
                                          "base": np.array(base)}  # fmt: skip
    return files


def example_files() -> dict[str, Any]:
    """Every shipped example: relative path under examples/ -> a DataFrame (CSV) or a dict of arrays (npz)."""
    em_first = load_study("em_first")
    joint_probe = load_study("joint_probe")
    train_steering = load_study("train_steering")
    cfg = train_steering.train_steering
    assert cfg is not None
    files: dict[str, Any] = {
        "em_first/counts.csv": em_first_counts(em_first),
        "em_first/baseline.csv": em_first_baseline(em_first),
        **{f"joint_probe/{k}": v for k, v in joint_probe_examples(joint_probe).items()},
        "train_steering/counts.csv": train_steering_counts(
            cfg,
            train_steering.sources,
            TS_QUESTIONS,
            TS_N,
            others=train_steering_others(cfg),
            iso_minus=TS_UNRELATED,
            noise=TS_NOISE,
        ),
    }
    return files


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """``numpy.savez``'s format (one .npy per array in an uncompressed zip) with fixed timestamps: same bytes every run."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def file_bytes(content: Any) -> bytes:
    """A DataFrame as CSV (no index, LF line ends), a mapping of arrays as npz."""
    if isinstance(content, pd.DataFrame):
        return content.to_csv(index=False, lineterminator="\n").encode()
    return npz_bytes(content)


def write_examples(out: Path = OUT) -> list[Path]:
    """Write every example under ``out``; the paths written."""
    written = []
    for relative, content in example_files().items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(file_bytes(content))
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help="folder to write into (default: examples/)")
    args = parser.parse_args()
    for path in write_examples(args.out):
        print(f"{path.stat().st_size:>7} B  {path}")


if __name__ == "__main__":
    main()
