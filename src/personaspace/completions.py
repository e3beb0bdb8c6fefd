"""On-policy completions: a base model answers a question bank under each persona's system prompt.

>>> table = sample_persona_completions(generator, tokenizer, catalog, "librarian",   # doctest: +SKIP
...     bank="data", samples_per_question=2, sampling=sampling, user_suffix="", study_seed=0,
...     condition="base", marker="[ZLT]")

One row per completion, with every id (condition, adapter, persona, question, sample) and the
seed that produced it, the exact system and user messages sent, the text, n_tokens,
finish_reason and whether it fired. Completions that hit the token limit are kept and flagged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import pandas as pd

from personaspace.generate import ChatRequest, Generator, Sampling, Steering
from personaspace.markers import fires
from personaspace.models import model_default_system_prompt
from personaspace.personas import Catalog, Persona
from personaspace.seeds import stable_seed

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

COMPLETION_COLUMNS = [
    "stage", "condition", "adapter", "persona", "category", "question_bank", "question_id",
    "question_kind", "sample_idx", "seed", "system_prompt", "user", "text", "n_tokens",
    "finish_reason", "fired", "temperature", "top_p", "max_new_tokens", "steer_vector", "steer_layer", "steer_coef",
]  # fmt: skip
UNSTEERED = {"steer_vector": "none", "steer_layer": 0, "steer_coef": 0.0}  # layer 0 (embeddings) is never steered


def system_message(persona: Persona, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The system message a persona sends with this model's tokenizer (None = no system turn)."""
    if persona.prompt_source == "catalog":
        return persona.system_prompt
    if persona.prompt_source == "none":
        return None
    default = model_default_system_prompt(tokenizer)
    if default is None:
        raise ValueError(
            f"persona {persona.name!r} reads the model's default system prompt, but this model's chat "
            "template has none; leave it out of the panel for this model"
        )
    return default


def persona_cells(
    tokenizer: PreTrainedTokenizerBase,
    catalog: Catalog,
    persona_name: str,
    *,
    bank: Literal["data", "eval"],
    samples_per_question: int,
    user_suffix: str,
    study_seed: int,
    condition: str,
    stage: str,
    adapter: str,
    neutral_prompt: str | None = None,
    steering: Steering | None = None,
) -> tuple[list[dict], list[ChatRequest]]:
    """The id columns and the request of every (question, sample) cell of one persona; seeds from stable ids.

    ``neutral_prompt`` replaces the persona's system message (S4: the persona then reaches the model
    only through ``steering``). The seeds do not depend on either, so a steered cell and its
    unsteered twin draw the same sampling noise (common random numbers: their difference is the
    steering's, not the draw's).
    """
    persona = catalog.persona(persona_name)
    system = system_message(persona, tokenizer) if neutral_prompt is None else neutral_prompt
    steered = UNSTEERED if steering is None else {
        "steer_vector": steering.vector_id, "steer_layer": steering.layer, "steer_coef": steering.coef,
    }  # fmt: skip
    rows, requests = [], []
    for question in catalog.questions(bank):
        user = question.text + user_suffix
        for sample_idx in range(samples_per_question):
            seed = stable_seed(study_seed, stage, condition, adapter, persona.name, question.id, sample_idx)
            requests.append(ChatRequest(system=system, user=user, seed=seed, steering=steering))
            rows.append(
                {
                    "stage": stage, "condition": condition, "adapter": adapter, "persona": persona.name,
                    "category": persona.category, "question_bank": bank, "question_id": question.id,
                    "question_kind": question.kind, "sample_idx": sample_idx, "seed": seed,
                    "system_prompt": system, "user": user, **steered,
                }
            )  # fmt: skip
    return rows, requests


def complete_cells(
    generator: Generator, rows: list[dict], requests: list[ChatRequest], sampling: Sampling, marker: str
) -> pd.DataFrame:
    """Sample every request in one batched call; the per-completion table with every id."""
    completions = generator.generate(requests, sampling) if requests else []
    out = []
    for row, completion in zip(rows, completions, strict=True):
        out.append(
            dict(
                row, text=completion.text, n_tokens=completion.n_tokens, finish_reason=completion.finish_reason,
                fired=fires(completion.text, marker), temperature=sampling.temperature, top_p=sampling.top_p,
                max_new_tokens=sampling.max_new_tokens,
            )
        )  # fmt: skip
    return typed_completions(pd.DataFrame(out, columns=COMPLETION_COLUMNS))


def typed_completions(table: pd.DataFrame) -> pd.DataFrame:
    """The completion table's column types (counts as int64, fired as bool), whatever it was built from.

    A table from before steering existed (a cell cache's older chunks) gets the unsteered columns.
    """
    table = table.assign(**{k: v for k, v in UNSTEERED.items() if k not in table.columns})
    return table.astype({"seed": "int64", "sample_idx": "int64", "n_tokens": "int64", "fired": "bool",
                         "steer_layer": "int64", "steer_coef": "float64"})  # fmt: skip


def sample_persona_completions(
    generator: Generator,
    tokenizer: PreTrainedTokenizerBase,
    catalog: Catalog,
    persona_name: str,
    *,
    bank: Literal["data", "eval"],
    samples_per_question: int,
    sampling: Sampling,
    user_suffix: str,
    study_seed: int,
    condition: str,
    marker: str,
    stage: str = "datagen",
    adapter: str = "none",
) -> pd.DataFrame:
    """K completions per question of ``bank`` under one persona; seeds derive from stable ids."""
    rows, requests = persona_cells(
        tokenizer, catalog, persona_name, bank=bank, samples_per_question=samples_per_question,
        user_suffix=user_suffix, study_seed=study_seed, condition=condition, stage=stage, adapter=adapter,
    )  # fmt: skip
    return complete_cells(generator, rows, requests, sampling, marker)
