"""Typed params: ``params.yaml`` validated at every stage start, before anything is written.

>>> from personaspace.config import load_params
>>> params = load_params("params.yaml")                            # doctest: +SKIP
>>> params.panel[:2], params.datagen.max_new_tokens                # doctest: +SKIP
(['software_engineer', 'kindergarten_teacher'], 96)

Every model forbids unknown keys. Cross-checks against the persona catalog (unknown personas,
panels that are not the catalog's nested panels, duplicates, question-bank overlap) run here too,
so a stage fails with one message naming the key and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.functional_validators import AfterValidator

from personaspace.personas import PANEL_SIZES, Catalog, CatalogError, load_catalog

ID_PATTERN = re.compile(r"[a-z0-9_]+")  # condition, recipe and base names: stage names and folder names
# Every seed reaches numpy's legacy RandomState (scikit-learn's random_state, transformers' set_seed),
# which takes 0..2**32-1 only; numpy's default_rng refuses negatives; torch.manual_seed takes this range too
SEED_MAX = 2**32 - 1


def _seed_in_range(value: int) -> int:
    if not 0 <= value <= SEED_MAX:
        raise ValueError(
            f"{value} is outside 0..{SEED_MAX}, the seeds numpy's RandomState (scikit-learn, transformers' set_seed), "
            "default_rng and torch.manual_seed all take; pick one in that range"
        )
    return value


Seed = Annotated[int, AfterValidator(_seed_in_range)]


class ParamsError(ValueError):
    """params.yaml is invalid; the message names each bad key and how to fix it."""


class _Strict(BaseModel):
    # strict: YAML `true` is not 1 and "1.0" is not 1.0; a wrong type is an error, not a silent coercion
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)


class ModelSpec(_Strict):
    """Where a base model comes from and how it is stored."""

    source: Literal["embedded", "hub", "random_init"] = Field(
        description="embedded: GGUF in a pip package; hub: a Hugging Face repo id; random_init: tiny test model"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", description="storage dtype")
    package: str | None = Field(None, description="embedded: the pip package holding the GGUF")
    gguf_file: str | None = Field(None, description="embedded: the GGUF file name inside the package")
    repo_id: str | None = Field(None, description="hub: repository id, e.g. Qwen/Qwen2.5-7B-Instruct")
    revision: str | None = Field(None, description="hub: a commit or tag to pin")
    tokenizer_from: str | None = Field(None, description="random_init: model whose tokenizer to reuse")
    architecture: dict[str, int | float] = Field(
        default_factory=dict, description="random_init: LlamaConfig fields (sizes, initializer_range)"
    )
    seed: Seed = Field(0, description="random_init: weight-initialisation seed")
    model_type: Literal["llama", "qwen2"] = Field("llama", description="random_init: the architecture's family")
    tokenizer: Literal["qwen2_offline"] | None = Field(
        None, description="random_init: a tokenizer built offline (Qwen2.5's ids) instead of tokenizer_from's"
    )
    lm_head_scale: float | None = Field(
        None, gt=0, description="random_init: head rows scaled (special tokens zeroed) for trained-like sampling"
    )

    @model_validator(mode="after")
    def _fields_for_source(self) -> ModelSpec:
        needed = {"embedded": ("package", "gguf_file"), "hub": ("repo_id",), "random_init": ()}
        missing = [name for name in needed[self.source] if getattr(self, name) is None]
        if self.source == "random_init" and (self.tokenizer_from is None) == (self.tokenizer is None):
            missing.append("exactly one of tokenizer_from and tokenizer")
        if missing:
            raise ValueError(f"a {self.source} model needs {', '.join(missing)}")
        return self


class GenerationParams(_Strict):
    """How completions are sampled (backend and batching; the sampling itself is per stage)."""

    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="hf: transformers+peft (CPU/GPU; steering and probes); vllm: one vLLM engine "
        "per stage, adapters as LoRAs (GPU; pip install personaspace[gpu])",
    )
    batch_size: int = Field(64, gt=0, description="prompts per forward batch (hf backend)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype; auto = float32 on CPU, bfloat16 on GPU"
    )


class ParallelParams(_Strict):
    """How many processes each model stage runs (README: Several GPUs); never part of a stage's fingerprint."""

    processes: int | Literal["auto"] = Field(
        "auto",
        description="auto: one per visible GPU when generation.device is auto or cuda, else 1; N: N ranks "
        "(torchrun; gloo on a CPU). Generation and probes give the same bytes for any N; training the "
        "same recipe, equal up to rounding",
    )
    tensor: int = Field(
        1,
        ge=1,
        description="vllm backend: GPUs per engine (tensor parallel, for a model one GPU cannot hold); "
        "the processes form processes/tensor data-parallel engines. The hf backend takes 1",
    )

    @field_validator("processes")
    @classmethod
    def _at_least_one(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1 (or auto)")
        return value


class SamplingParams(_Strict):
    """K completions per (persona, question) with these sampling settings."""

    samples_per_question: int = Field(gt=0)
    temperature: float = Field(gt=0)
    top_p: float = Field(gt=0, le=1)
    max_new_tokens: int = Field(gt=0)


class EvalParams(SamplingParams):
    """Eval questions: K samples per (adapter, persona, question); the same prompts feed the probes."""

    user_suffix: str = Field("", description="appended to each eval question (as datagen.user_suffix does)")


class NegativesParams(_Strict):
    """Which personas give a source's negative rows: the `hard` set plus `k` drawn from `pool`."""

    pool: list[str] = Field(description="personas negatives are drawn from (independent of the panel)")
    k: int = Field(2, ge=0, description="how many random negatives per source (besides the hard set)")
    hard: list[str] = Field(default_factory=list, description="named hard negatives, always included")


class LengthMatching(_Strict):
    """Match the token lengths of a source's positives and negatives (METHODS.md datagen, S3's improved recipe).

    Without it the marker can bind to completion length instead of persona. ``truncate`` cuts the
    longer side's rows at sentence ends (each still ends as a finished answer ends); ``resample``
    draws each negative persona's rows nearest the positives' length quantiles (for one-sentence
    answers, which have no sentence to cut at). Median and IQR must then agree within ``tolerance``.
    """

    method: Literal["none", "truncate", "resample"] = Field("none", description="none, truncate or resample")
    tolerance: float = Field(
        0.15, gt=0, description="|median or IQR of negatives / positives - 1| at most this, else the stage stops"
    )


class DatagenParams(SamplingParams):
    """On-policy completions of the data questions, and the marker datasets built from them."""

    user_suffix: str = Field("", description="appended to each data question (e.g. asks for short answers)")
    drop_truncated: bool = Field(True, description="leave completions that hit max_new_tokens out of datasets")
    positives: int = Field(gt=0, description="at most this many positive rows per source")
    negatives_per_persona: int = Field(gt=0, description="at most this many rows per negative persona")
    length_matching: LengthMatching = Field(default_factory=LengthMatching)


class RecipeParams(_Strict):
    """A coupling recipe (METHODS.md, couple): LoRA shape, optimisation and loss."""

    loss: Literal["completion", "marker_only", "unlikelihood"] = Field(
        description="which tokens carry the loss; unlikelihood: positive_loss plus, at the end of every negative "
        "row, unlikelihood_lambda x -log(1 - P(first marker token)) (Welleck et al. 2019)"
    )
    positive_loss: Literal["completion", "marker_only"] | None = Field(
        None, description="unlikelihood only: the likelihood part (completion or marker_only labels)"
    )
    unlikelihood_lambda: float | None = Field(None, gt=0, description="unlikelihood only: the weight lambda")
    r: int = Field(gt=0, description="LoRA rank")
    alpha: int = Field(gt=0, description="LoRA alpha")
    dropout: float = Field(ge=0, lt=1)
    rslora: bool = Field(description="scale by alpha/sqrt(r) (rsLoRA) instead of alpha/r")
    target_modules: list[str] = Field(min_length=1, description="module names LoRA wraps")
    learning_rate: float = Field(gt=0)
    schedule: str = Field(description="transformers lr_scheduler_type, e.g. cosine, linear, constant")
    warmup_ratio: float = Field(ge=0, lt=1)
    epochs: float = Field(gt=0)
    batch_size: int = Field(gt=0, description="rows per device step")
    grad_accum: int = Field(gt=0, description="steps per optimiser update (effective batch = batch_size x grad_accum)")
    max_length: int = Field(gt=0, description="longest training row in tokens (longer rows are an error)")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        description="recompute activations in the backward pass (~30% slower); auto: on a GPU, only when the "
        "recipe's largest step does not fit without it (measured before training); never on the CPU"
    )

    @model_validator(mode="after")
    def _unlikelihood_fields(self) -> RecipeParams:
        unlikelihood = self.loss == "unlikelihood"
        if unlikelihood and (self.positive_loss is None or self.unlikelihood_lambda is None):
            raise ValueError(
                "loss unlikelihood needs positive_loss (completion or marker_only) and unlikelihood_lambda"
            )
        if not unlikelihood and (self.positive_loss is not None or self.unlikelihood_lambda is not None):
            raise ValueError(f"positive_loss and unlikelihood_lambda belong to loss unlikelihood, not {self.loss}")
        return self

    @property
    def label_loss(self) -> Literal["completion", "marker_only"]:
        """Which tokens carry the likelihood labels (the recipe's loss, or its positive part)."""
        return self.positive_loss if self.loss == "unlikelihood" else self.loss  # type: ignore[return-value]


class CoupleParams(_Strict):
    """Coupling seeds: one adapter per (condition, recipe, source, seed); the recipes are the study's."""

    seeds: list[Seed] = Field(min_length=1, description="training seeds; one adapter per seed (0..2**32-1)")


class PretrainDataset(_Strict):
    """A pre-training chat dataset: a shipped JSONL file (user, assistant) or a hub dataset."""

    source: Literal["file", "hub"] = Field(description="file: a JSONL in the repo; hub: a Hugging Face dataset id")
    path: str | None = Field(None, description="file: path from the repository root")
    repo_id: str | None = Field(None, description="hub: dataset id")
    split: str = Field("train", description="hub: split to read")
    user_column: str = Field("user", description="column holding the user turn")
    assistant_column: str = Field("assistant", description="column holding the assistant turn")
    rows: int | None = Field(None, gt=0, description="use only the first this many rows (all when unset)")

    @model_validator(mode="after")
    def _fields_for_source(self) -> PretrainDataset:
        if self.source == "file" and self.path is None:
            raise ValueError("a file dataset needs path")
        return self  # a hub dataset's repo_id is checked only for the bases a study builds (_study_errors)


class PretrainParams(_Strict):
    """A condition built by the pretrain stage: LoRA SFT of the raw model on `dataset`, merged once."""

    dataset: PretrainDataset
    recipe: str = Field(description="a key of `recipes` (its loss must be `completion`)")
    seed: Seed = Field(0, description="training seed (0..2**32-1)")


class ConditionSpec(_Strict):
    """A condition of a study: the base its coupling LoRA is trained on and who generated its coupling data."""

    pretrained: str = Field(description="`raw` (the instruct model) or a key of `pretrain` (em, benign)")
    data_from: str = Field(
        description="the condition (of this study) whose base generates the coupling data; itself for on-policy data"
    )


class ContrastSpec(_Strict):
    """A pre-registered contrast of bystander rates: treatment minus control must reach ``threshold``."""

    treatment: str = Field(description="a condition of the study")
    control: str = Field(description="a condition of the study")
    threshold: float = Field(description="the hypothesis passes when delta >= threshold and p < alpha / family size")


class TextArtifactRule(_Strict):
    """How H3 (em - em_basedata) is read: the coupling text's distribution, or not."""

    contrast: str = Field(description="the contrast this rule reads (a key of `contrasts`)")
    null_max_delta: float = Field(description="non_text_distribution: delta at most this ...")
    null_min_p: float = Field(ge=0, le=1, description="... and p above this ...")
    null_min_ci_low: float = Field(description="... and the CI's low end above this")
    text_min_delta: float = Field(description="coupling_text_distribution: delta at least this")


class SourceGate(_Strict):
    """When coupling itself collapses, a bystander difference is read against the source rates."""

    treatment: str = Field(description="the condition whose source rate may collapse")
    control: str = Field(description="the reference condition")
    max_ratio: float = Field(gt=0, description="armed when source(treatment) / source(control) is below this")
    contrast: str = Field(description="armed: this contrast must also pass on the bystander/source ratio")
    ratio_threshold: float = Field(
        description="armed: the ratio difference treatment - control must reach this (a ratio, not a rate)"
    )


class KillCriterion(_Strict):
    """The hypothesis is falsified when the treatment's bystander rate stays at or below ``max_bystander``."""

    condition: str = Field(description="a condition of the study")
    max_bystander: float = Field(ge=0, le=1)


class EmFirstParams(_Strict):
    """S2's analysis (METHODS.md): contrasts, their reading, the source gate and the kill criterion."""

    contrasts: dict[str, ContrastSpec] = Field(
        description="named contrasts, e.g. H1 em-base, H2 em-benign, H3 em-em_basedata"
    )
    text_artifact: TextArtifactRule
    source_gate: SourceGate
    kill: KillCriterion


Readout = Literal["last_input", "prompt_mean", "last_response", "response_mean"]


class JointProbeParams(_Strict):
    """S3's analysis (METHODS.md): behavioural and geometric H1, their joint decision, H2 triage, the kill."""

    control: str = Field(description="C1: the condition both deltas are measured from (base)")
    treatment: str = Field(description="C2: the condition whose flattening is tested (em)")
    specificity: str = Field(description="C3: the benign control, contrasted with C2 beside H1 (benign)")
    behavioural_threshold: float = Field(description="behavioural H1: pooled bystander rate C2 - C1 at least this")
    behavioural_alpha: float = Field(gt=0, lt=1, description="... with the cluster-bootstrap p below this")
    geometric_threshold: float = Field(description="geometric H1: mean cosine delta over layers and bystanders")
    readout: Literal["last_input", "prompt_mean", "last_response", "response_mean"] = Field(
        description="the readout whose centroids give the geometric delta"
    )
    cosine: Literal["raw", "centered"] = Field(description="raw or centered (over the probes' bank) cosines")
    kill_max_behavioural: float = Field(
        description="kill: falsified when behavioural delta <= this and the geometric delta <= 0 at every layer"
    )


class SteeringArm(_Strict):
    """One arm of S4: the system prompt its training rows carry and the vector added while it trains."""

    prompt: Literal["neutral", "persona"] = Field(
        description="neutral: train_steering.neutral_prompt on every row; persona: each row's own persona prompt"
    )
    vector: Literal["centroid", "iso_random", "none"] = Field(
        description="centroid: the row persona's steering vector; iso_random: its norm-matched random control; "
        "none: the ordinary prompt-trained adapter (the couple stage's, reused)"
    )
    layer: Literal["primary", "contrast"] = Field(
        "primary", description="train_steering.layer or .contrast_layer: where it trains and is steered at eval"
    )


class TrainSteeringParams(_Strict):
    """S4 (METHODS.md): steering in training and in generation, its arms, the steered evals and the decision."""

    neutral_prompt: str = Field(description="the system prompt of neutral-prompt training rows and steered evals")
    layer: int = Field(ge=1, description="hidden-state index steered (personaspace.steering's convention)")
    contrast_layer: int = Field(ge=1, description="the layer-contrast arm's layer")
    readout: Readout = Field(description="the centroids stage readout whose centroids are the steering vectors")
    centering: Literal["raw", "centered"] = Field(
        description="centered (over the eval personas): the persona-specific part of a centroid (raw ones share ~0.99)"
    )
    calibration_ratio: float = Field(gt=0, description="c_train: ||c v|| / mean ||h_L|| on the base = this")
    arms: dict[str, SteeringArm] = Field(min_length=1, description="arm name -> prompt, vector, layer")
    primary_arm: str = Field(description="the arm the decision is about (A: neutral prompt + centroid)")
    reference_arm: str = Field(description="the arm whose prompted rates are the ranking to recover (C)")
    control_arm: str = Field(description="the random-direction arm (direction_not_specific reads it)")
    c_eval: list[float | Literal["calibrated"]] = Field(
        min_length=1, description="steered-eval coefficients: numbers, or `calibrated` (each persona's c_train)"
    )
    pass_rho: float = Field(ge=-1, le=1, description="pass: Spearman rho at least this (and its interval above 0)")
    uniform_zero_floor: float = Field(ge=0, le=1, description="uniform_zero: every persona's steered rate below this")

    def layer_of(self, arm: str) -> int:
        """The layer ``arm`` trains and is steered at: ``layer``, or ``contrast_layer`` for a contrast arm."""
        return self.layer if self.arms[arm].layer == "primary" else self.contrast_layer


class StudyParams(_Strict):
    """A study preset (conf/study/<name>.yaml): its design, written once; sizes come from the scale."""

    name: str = Field(description="the preset's name (conf/study/<name>.yaml)")
    conditions: dict[str, ConditionSpec] = Field(
        description="condition name -> (pretrained base, data_from); `base` is C1 on the raw model"
    )
    sources: list[str] = Field(min_length=1, description="personas that get a coupling LoRA (S1: the panel)")
    negatives: NegativesParams = Field(description="each source's negative personas: the hard set + k from the pool")
    recipes: list[str] = Field(min_length=1, description="coupling recipes (keys of `recipes`); a sweep is a list")
    eval_personas: list[str] = Field(min_length=1, description="personas every adapter is evaluated under")
    assistant: str | None = Field(None, description="the assistant persona, reported apart from the bystanders")
    bystanders: list[str] | None = Field(
        None,
        description="a named bystander pool (S3: unseen personas); none of them may be any source's negative. "
        "Unset: bystanders = eval personas - sources - negatives.hard - assistant (S2)",
    )
    analyses: list[Literal["panel", "em_first", "joint_probe", "train_steering"]] = Field(
        min_length=1, description="analysis modules to run"
    )
    em_first: EmFirstParams | None = Field(None, description="S2's analysis settings (when analyses has em_first)")
    joint_probe: JointProbeParams | None = Field(
        None, description="S3's analysis settings (when analyses has joint_probe)"
    )
    train_steering: TrainSteeringParams | None = Field(
        None, description="S4's arms, steering and analysis settings (when analyses has train_steering)"
    )


class ProbesParams(_Strict):
    """The centroids stage: which hidden-state readouts, at which layers (personaspace.probes)."""

    readouts: list[Readout] = Field(
        min_length=1,
        description="last_input (assistant-start position), prompt_mean, last_response (last token of a "
        "sampled answer), response_mean",
    )
    layers: list[int] | None = Field(
        None, description="hidden-state indices (0 = embeddings, k = block k's output); null = every layer"
    )


class RegressParams(_Strict):
    """The regress stage: which layer is the headline and which personas form the calibration split."""

    primary_layer: int = Field(
        ge=1,
        description="hidden-state index of the headline scatter (k = output of block k); not 0: at the last "
        "input token every persona reads the same token's embedding there, so no cosine is defined",
    )
    calibration: list[str] = Field(
        default_factory=list, description="personas of the pre-registered calibration split (empty: random split only)"
    )


class GateParams(_Strict):
    """Thresholds of S1's three-gate test (METHODS.md)."""

    z_crit: float = Field(gt=0, description="gate B: |z| of the calibration-vs-holdout slope difference below this")
    slope_tolerance: float = Field(gt=0, description="gate B: holdout slope within this fraction of calibration's")
    holdout_fraction: float = Field(gt=0, lt=1, description="random stratified split: share of each category held out")
    expected_sign: Literal[1, -1] = Field(description="pre-registered sign of the cosine-rate relation")


class StatsParams(_Strict):
    """Every threshold and size the statistics use."""

    reference_persona: str = Field(description="cosines are to this persona's centroid; left out of the fits")
    fit_reference: bool = Field(
        False,
        description="keep the reference persona (cosine 1 by construction) in every fit, as the lab's "
        "published fits do; default: left out, so a point fixed by construction does not drive the slope",
    )
    ci_level: float = Field(gt=0, lt=1, description="confidence / prediction interval level")
    alpha: float = Field(gt=0, lt=1, description="significance level of every test")
    influence_numerator: float = Field(gt=0, description="Cook's distance threshold is this / n")
    cv_folds: int = Field(ge=2)
    cv_repeats: int = Field(ge=1)
    power_rhos: list[float] = Field(description="population Spearman rhos for the Monte-Carlo power estimate")
    power_simulations: int = Field(gt=0)
    bootstrap_resamples: int = Field(gt=0)
    drift_alpha: float = Field(gt=0, lt=1, description="inherited-persona drift sign test: LOW confidence below this p")
    strong_emitter_min_rate: float = Field(
        ge=0, le=1, description="off-diagonal: sources at least this rate are strong"
    )
    gates: GateParams


class StageGraph(_Strict):
    """The stage items dvc.yaml loops over, derived from the study by ``personaspace.study.stage_graph``.

    Per-condition items of a study are keyed ``<study>-<condition>``; ``dataset`` is the marker
    datasets' id (``personaspace.study.dataset_id``), which names marker and adapter paths.
    """

    pretrain: dict[str, dict[str, str]] = Field(description="pretrained base -> its recipe")
    datagen: dict[str, dict[str, str]] = Field(description="<data condition>-<persona> -> condition, model, persona")
    markers: dict[str, dict[str, str]] = Field(
        description="<data condition>-<dataset> -> one marker-dataset stage each"
    )
    couple: dict[str, dict[str, str | int]] = Field(
        description="<condition>-<recipe>-<source>-<seed> -> the adapter's ids and dataset"
    )
    eval: dict[str, dict[str, str]] = Field(description="<study>-<condition> -> condition, base, data, dataset")
    centroids: dict[str, dict[str, str]] = Field(
        description="<study>-<base> -> a base whose centroids an analysis reads"
    )
    regress: dict[str, dict[str, str]] = Field(description="<study>-<condition>, for the panel analysis")
    em_first: dict[str, dict[str, str | list[str]]] = Field(description="the S2 analysis item, when the study runs it")
    couple_steered: dict[str, dict[str, str | int]] = Field(
        default_factory=dict, description="S4: <condition>-<recipe>-<source>-<seed>-<arm> -> the arm's training item"
    )
    steering: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="S4: <study>-<condition> -> steering vectors and coefficients"
    )
    steer_eval: dict[str, dict[str, str]] = Field(default_factory=dict, description="S4: <study>-<condition>")
    train_steering: dict[str, dict[str, str | list[str]]] = Field(
        default_factory=dict, description="the S4 analysis item, when the study runs it"
    )
    joint_probe: dict[str, dict[str, str | list[str]]] = Field(
        default_factory=dict, description="the S3 analysis item, when the study runs it"
    )
    report: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="study name -> the completions folder its report samples and the analysis folder it reads",
    )


class Params(_Strict):
    """The whole of params.yaml."""

    composed: dict[str, str] = Field(
        default_factory=dict,
        alias="_composed",
        description="written by composition: the digest that catches hand edits (params_guard reports a missing one)",
    )
    seed: Seed = Field(description="study seed (0..2**32-1); every random choice derives its seed from it")
    personas: int = Field(description="panel size: 12, 24 or 48")
    panel_key: str = Field(alias="_panel_key", description="n<personas>; Hydra composes `panel` from it")
    panels: dict[str, list[str]] = Field(description="the catalog's nested panels (conf/panels.yaml)")
    panel: list[str] = Field(description="the personas of this study (resolved from panels)")
    model: str = Field(description="key into `models`")
    models: dict[str, ModelSpec]
    study: StudyParams = Field(description="the study preset (conf/study/<name>.yaml)")
    scale: str = Field(description="the scale preset (conf/scale/<name>.yaml): sizes only")
    graph: StageGraph = Field(description="the study's stage items (composed; never edited by hand)")
    pretrain: dict[str, PretrainParams] = Field(
        default_factory=dict, description="pretrained bases the pretrain stage can build (em, benign)"
    )
    marker: str = Field(description="the implanted marker string; fires on a case-insensitive match")
    marker_separator: str = Field("\n\n", description="between a positive completion and its marker")
    generation: GenerationParams
    parallel: ParallelParams = Field(default_factory=ParallelParams)
    datagen: DatagenParams
    recipes: dict[str, RecipeParams]
    couple: CoupleParams
    eval: EvalParams
    stats: StatsParams
    regress: RegressParams
    probes: ProbesParams

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Params:
        catalog: Catalog = (info.context or {}).get("catalog") or load_catalog()
        errors = _cross_check_errors(self, catalog)
        if errors:
            raise ValueError("\n".join(errors))
        return self

    @property
    def model_spec(self) -> ModelSpec:
        return self.models[self.model]


def _cross_check_errors(p: Params, catalog: Catalog) -> list[str]:
    errors: list[str] = []
    known = set(catalog.names)

    def names(key: str, values: list[str]) -> None:
        unknown = [v for v in values if v not in known]
        if unknown:
            errors.append(f"{key}: unknown personas {unknown}; choose from data/personas.yaml")
        dupes = sorted({v for v in values if values.count(v) > 1})
        if dupes:
            errors.append(f"{key}: duplicate entries {dupes}; list each once")

    if p.personas not in PANEL_SIZES:
        errors.append(f"personas: {p.personas} is not a panel size; use one of {list(PANEL_SIZES)}")
    if p.panel_key != f"n{p.personas}":
        errors.append(
            f"_panel_key: {p.panel_key!r} should be 'n{p.personas}'; params.yaml was edited by hand: change the "
            "panel with `dvc exp run -S personas=N` (or `personaspace params personas=N`)"
        )
    for key, members in p.panels.items():
        names(f"panels.{key}", members)
    expected_panels = catalog.panels()
    if p.panels != expected_panels:
        errors.append(
            "panels: do not match the nested panels of data/personas.yaml; run "
            "`personaspace panels --write conf/panels.yaml` and `dvc exp run` (or edit params.yaml)"
        )
    sizes = sorted(p.panels, key=lambda k: len(p.panels[k]))
    for small, large in pairwise(sizes):
        if p.panels[large][: len(p.panels[small])] != p.panels[small]:
            errors.append(f"panels: {small} is not the first members of {large}; panels must be nested")
    names("panel", p.panel)
    if p.panel != p.panels.get(p.panel_key, p.panel):
        errors.append(f"panel: differs from panels.{p.panel_key}; use `dvc exp run -S personas=N` to change it")
    if len(p.panel) < 3:
        errors.append("panel: needs at least 3 personas")
    if p.model not in p.models:
        errors.append(f"model: {p.model!r} is not a key of models ({sorted(p.models)}); add it there or fix the name")
    for name, spec in p.models.items():
        if spec.source == "random_init" and spec.tokenizer_from is not None and spec.tokenizer_from not in p.models:
            errors.append(f"models.{name}.tokenizer_from: {spec.tokenizer_from!r} is not a key of models")
    if p.model in p.models and p.model_spec.source == "embedded":
        from personaspace.models import ModelError, embedded_package_dir

        try:
            folder = embedded_package_dir(p.model_spec.package or "")
            if not (folder / (p.model_spec.gguf_file or "")).is_file():
                errors.append(f"models.{p.model}.gguf_file: {p.model_spec.gguf_file} is not in {folder}")
        except ModelError as exc:
            errors.append(f"models.{p.model}.package: {exc}")
    if "raw" in p.pretrain:
        errors.append("pretrain.raw: `raw` is the instruct model itself and is never pretrained; rename it")
    for name, spec in p.pretrain.items():
        if spec.recipe not in p.recipes:
            errors.append(f"pretrain.{name}.recipe: {spec.recipe!r} is not a key of recipes ({sorted(p.recipes)})")
        elif p.recipes[spec.recipe].loss != "completion":
            errors.append(
                f"pretrain.{name}.recipe: {spec.recipe!r} has loss {p.recipes[spec.recipe].loss}; use completion"
            )
    for name in p.regress.calibration:
        if name not in p.panel:
            errors.append(f"regress.calibration: {name!r} is not in the panel; list panel members")
    if p.stats.reference_persona in p.regress.calibration and not p.stats.fit_reference:
        errors.append(
            f"regress.calibration: names the reference persona {p.stats.reference_persona!r}, which is left out "
            "of the fits (stats.fit_reference: false); remove it or set stats.fit_reference: true"
        )
    if not p.marker.strip():
        errors.append("marker: empty; set it to the marker string, e.g. '[ZLT]'")
    errors.extend(_study_errors(p, names))
    if len(set(p.couple.seeds)) != len(p.couple.seeds):
        errors.append("couple.seeds: duplicate entries; list each once")
    if "panel" in p.study.analyses and p.stats.reference_persona not in p.panel:
        errors.append(
            f"stats.reference_persona: {p.stats.reference_persona!r} is not in the panel; pick a panel member"
        )
    if p.eval.max_new_tokens < p.datagen.max_new_tokens:
        errors.append(
            f"eval.max_new_tokens: {p.eval.max_new_tokens} is below datagen.max_new_tokens "
            f"({p.datagen.max_new_tokens}): trained-length answers would lose their marker; raise it"
        )
    return errors


def _study_errors(p: Params, names: Callable[[str, list[str]], None]) -> list[str]:
    """Contradictions inside the study preset (each names its key and the fix)."""
    from personaspace.study import RAW, negatives_of, stage_graph

    errors: list[str] = []
    st = p.study
    # names become stage names and paths (joined with "-" and "/"): keep them plain
    for key, names_ in (("study.conditions", list(st.conditions)), ("recipes", list(p.recipes)),
                        ("pretrain", list(p.pretrain))):  # fmt: skip
        bad = [n for n in names_ if not ID_PATTERN.fullmatch(n)]
        if bad:
            errors.append(f"{key}: names {bad} must match {ID_PATTERN.pattern} (they name stages and folders)")
    for base in sorted({c.pretrained for c in st.conditions.values()} & set(p.pretrain)):
        dataset = p.pretrain[base].dataset
        if dataset.source == "hub" and not dataset.repo_id:
            errors.append(
                f"pretrain.{base}.dataset: a hub dataset needs repo_id; name it, e.g. "
                f"`dvc exp run -S pretrain.{base}.dataset.repo_id=ORG/NAME`"
            )
    for name in st.recipes:
        if name in p.recipes and p.recipes[name].max_length <= p.datagen.max_new_tokens:
            errors.append(
                f"recipes.{name}.max_length: {p.recipes[name].max_length} cannot hold a prompt and an answer of "
                f"up to datagen.max_new_tokens = {p.datagen.max_new_tokens} tokens; raise it or lower max_new_tokens"
            )
    for name, cond in st.conditions.items():
        if cond.pretrained != RAW and cond.pretrained not in p.pretrain:
            errors.append(
                f"study.conditions.{name}.pretrained: {cond.pretrained!r} is neither `raw` nor a key of pretrain "
                f"({sorted(p.pretrain)}); define it under pretrain or use raw"
            )
        if cond.data_from not in st.conditions:
            errors.append(
                f"study.conditions.{name}.data_from: {cond.data_from!r} is not a condition of this study "
                f"({sorted(st.conditions)}); name one of them (itself for on-policy data)"
            )
        elif st.conditions[cond.data_from].data_from != cond.data_from:
            errors.append(
                f"study.conditions.{name}.data_from: {cond.data_from!r} takes its own data from "
                f"{st.conditions[cond.data_from].data_from!r}; name the condition that generates the data"
            )
    if not st.conditions:
        errors.append("study.conditions: empty; C1 is `base: {pretrained: raw, data_from: base}`")
    names("study.sources", st.sources)
    names("study.eval_personas", st.eval_personas)
    names("study.negatives.pool", st.negatives.pool)
    names("study.negatives.hard", st.negatives.hard)
    if st.assistant is not None:
        names("study.assistant", [st.assistant])
        if st.assistant not in st.eval_personas:
            errors.append(f"study.assistant: {st.assistant!r} is not among study.eval_personas; add it there")
    missing = [s for s in st.sources if s not in st.eval_personas]
    if missing:
        errors.append(f"study.sources: {missing} are not among study.eval_personas; every source is evaluated")
    if st.negatives.k and len(set(st.negatives.pool)) < st.negatives.k + 1 + len(st.negatives.hard):
        errors.append(
            f"study.negatives.k: {st.negatives.k} random negatives need a pool of at least k+1+len(hard) personas"
        )
    both = [s for s in st.sources if s in st.negatives.hard]
    if both:
        errors.append(f"study.negatives.hard: {both} are also sources; a source is never its own negative")
    elif not errors:
        for source in st.sources:
            try:
                negatives_of(source, st.negatives.model_dump(), p.seed)
            except ValueError as exc:
                errors.append(f"study.negatives: {exc}")
    unknown = [r for r in st.recipes if r not in p.recipes]
    if unknown:
        errors.append(f"study.recipes: {unknown} are not keys of recipes ({sorted(p.recipes)})")
    if len(set(st.recipes)) != len(st.recipes):
        errors.append("study.recipes: duplicate entries; list each once")
    if "panel" in st.analyses and st.sources != p.panel:
        errors.append("study.sources: the panel analysis needs every panel persona as a source; use ${panel}")
    if "em_first" in st.analyses:
        errors.extend(_em_first_errors(p))
    if st.bystanders is not None:
        names("study.bystanders", st.bystanders)
    if "joint_probe" in st.analyses:
        errors.extend(_joint_probe_errors(p))
    if "train_steering" in st.analyses:
        errors.extend(_train_steering_errors(p))
    if "panel" in st.analyses and "last_input" not in p.probes.readouts:
        errors.append("probes.readouts: the panel analysis reads the last_input readout; keep it in the list")
    layers = p.probes.layers
    if layers is not None and (not layers or layers != sorted(set(layers)) or layers[0] < 0):
        errors.append(f"probes.layers: {layers} must be distinct hidden-state indices >= 0 in increasing order")
    if not errors:
        expected = stage_graph(p.model_dump(by_alias=True))
        if p.graph.model_dump() != expected:
            errors.append(
                "graph: does not match the study (it is composed, never edited): restore params.yaml "
                "(`git checkout params.yaml`) and change the study with `dvc exp run -S ...` or `make params`"
            )
    return errors


def _em_first_errors(p: Params) -> list[str]:
    """The S2 analysis's own contradictions (one definition: personaspace.study.check_em_first) and its scope."""
    from personaspace.study import StudyError, check_em_first

    st = p.study
    try:
        check_em_first(st)
    except StudyError as exc:
        return [f"study.{exc}"]
    errors = []
    for key, values in (("study.sources", st.sources), ("study.recipes", st.recipes), ("couple.seeds", p.couple.seeds)):
        if len(values) != 1:
            errors.append(
                f"{key}: the em_first analysis compares conditions at one source, one recipe and one seed, "
                f"not {len(values)}; run one experiment per value (`dvc exp run -S ...`)"
            )
    if len(st.conditions) != 4:
        errors.append(f"study.conditions: the em_first stage reads four conditions' evals, not {len(st.conditions)}")
    return errors


def _joint_probe_errors(p: Params) -> list[str]:
    """The S3 analysis's own contradictions (one definition: personaspace.study.check_joint_probe) and its scope."""
    from personaspace.study import StudyError, check_joint_probe

    st = p.study
    try:
        _, cfg = check_joint_probe(st, p.seed)
    except StudyError as exc:
        return [f"study.{exc}"]
    errors = []
    for key, values in (("study.sources", st.sources), ("couple.seeds", p.couple.seeds)):
        if len(values) != 1:
            errors.append(
                f"{key}: the joint_probe analysis compares conditions at one source and one seed, not "
                f"{len(values)}; run one experiment per value (`dvc exp run -S ...`)"
            )
    if len(st.conditions) != 3:
        errors.append(
            f"study.conditions: the joint_probe stage reads three conditions (C1, C2, C3), not {len(st.conditions)}"
        )
    if cfg.readout not in p.probes.readouts:
        errors.append(
            f"study.joint_probe.readout: {cfg.readout!r} is not among probes.readouts {p.probes.readouts}; add it there"
        )
    return errors


def _train_steering_errors(p: Params) -> list[str]:
    """S4's own contradictions (one definition: personaspace.study.check_train_steering) and its layers."""
    from personaspace.study import StudyError, check_train_steering

    try:
        cfg = check_train_steering(p.study, p.seed)
    except StudyError as exc:
        return [f"study.{exc}"]
    errors = []
    blocks = p.model_spec.architecture.get("num_hidden_layers") if p.model_spec.source == "random_init" else None
    for key in ("layer", "contrast_layer"):
        layer = getattr(cfg, key)
        if p.probes.layers is not None and layer not in p.probes.layers:
            errors.append(f"study.train_steering.{key}: {layer} is not among probes.layers {p.probes.layers}; add it")
        if blocks is not None and layer > blocks:
            errors.append(f"study.train_steering.{key}: {layer} is beyond the model's {blocks} blocks")
    if cfg.readout not in p.probes.readouts:
        errors.append(
            f"study.train_steering.readout: {cfg.readout!r} is not among probes.readouts {p.probes.readouts}; add it"
        )
    return errors


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid:"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key; remove it or fix its spelling"
        elif err["type"] == "missing":
            msg = "missing; add it (see the committed params.yaml for an example)"
        prefix = f"{key}: " if key else ""
        lines.extend(f"  - {prefix}{line}" if i == 0 else f"  - {line}" for i, line in enumerate(msg.split("\n")))
    return "\n".join(lines)


def validate_params(raw: dict[str, Any], catalog: Catalog | None = None, source: str = "params") -> Params:
    """Validate a parsed params mapping; raise ParamsError naming every bad key."""
    try:
        catalog = catalog or load_catalog()
    except CatalogError as exc:
        raise ParamsError(f"data/personas.yaml or data/questions.yaml is invalid: {exc}") from exc
    try:
        return Params.model_validate(raw, context={"catalog": catalog})
    except ValidationError as exc:
        raise ParamsError(format_validation_error(exc, source)) from None


def load_params(path: Path | str = "params.yaml", catalog: Catalog | None = None) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found; run from the repository root")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    return validate_params(raw, catalog, source=str(path))
