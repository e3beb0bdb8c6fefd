"""The persona catalog, its nested panels, and the two question banks, read from ``data/``.

>>> from personaspace.personas import load_catalog
>>> catalog = load_catalog()
>>> catalog.panel(12)[:2]
('software_engineer', 'kindergarten_teacher')
>>> catalog.persona("librarian").category
'occupational'

This module is the only reader of ``data/personas.yaml`` and ``data/questions.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import yaml

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
CATEGORIES = ("occupational", "character", "generic_helper")
PANEL_SIZES = (12, 24, 48)
Category = Literal["occupational", "character", "generic_helper"]
# How a persona's system message is obtained: written in the catalog, read from the model's
# chat template (model_default), or no system message at all (no_system).
PromptSource = Literal["catalog", "model_default", "none"]


class CatalogError(ValueError):
    """The persona catalog or question banks are malformed."""


@dataclass(frozen=True)
class Persona:
    name: str
    category: Category
    panel: int | None
    system_prompt: str | None
    prompt_source: PromptSource = "catalog"


@dataclass(frozen=True)
class Question:
    id: str
    kind: Literal["factual", "values"]
    text: str


@dataclass(frozen=True)
class Catalog:
    personas: tuple[Persona, ...]
    data_questions: tuple[Question, ...]
    eval_questions: tuple[Question, ...]

    def persona(self, name: str) -> Persona:
        for persona in self.personas:
            if persona.name == name:
                return persona
        raise CatalogError(f"unknown persona {name!r}; known personas: {', '.join(self.names)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.personas)

    def panel(self, size: int) -> tuple[str, ...]:
        """Panel ``size``: every persona whose smallest panel is <= size, in catalog order."""
        if size not in PANEL_SIZES:
            raise CatalogError(f"no panel of size {size}; panels are {PANEL_SIZES}")
        members = tuple(p.name for p in self.personas if p.panel is not None and p.panel <= size)
        if len(members) != size:
            raise CatalogError(f"panel {size} has {len(members)} members in data/personas.yaml")
        return members

    def panels(self) -> dict[str, list[str]]:
        """All panels keyed ``n12``, ``n24``, ``n48`` (the form params.yaml uses)."""
        return {f"n{size}": list(self.panel(size)) for size in PANEL_SIZES}

    def questions(self, bank: Literal["data", "eval"]) -> tuple[Question, ...]:
        return {"data": self.data_questions, "eval": self.eval_questions}[bank]


def _parse_persona(raw: dict) -> Persona:
    allowed = {"name", "category", "panel", "system_prompt", "from"}
    unknown = set(raw) - allowed
    if unknown:
        raise CatalogError(f"persona {raw.get('name')!r}: unknown keys {sorted(unknown)}")
    name, category, panel = raw.get("name"), raw.get("category"), raw.get("panel")
    source = raw.get("from", "catalog")
    prompt = raw.get("system_prompt")
    if not isinstance(name, str) or not name.isidentifier():
        raise CatalogError(f"persona name {name!r} must be an identifier (letters, digits, _)")
    if category not in CATEGORIES:
        raise CatalogError(f"persona {name!r}: category {category!r} not in {CATEGORIES}")
    if panel is not None and panel not in PANEL_SIZES:
        raise CatalogError(f"persona {name!r}: panel {panel!r} not in {PANEL_SIZES} or null")
    if source not in ("catalog", "model_default", "none"):
        raise CatalogError(f"persona {name!r}: from {source!r} not in catalog/model_default/none")
    if (source == "catalog") != (isinstance(prompt, str) and bool(prompt.strip())):
        raise CatalogError(
            f"persona {name!r}: a catalog persona needs a non-empty system_prompt; "
            "model_default and none personas must have system_prompt: null"
        )
    return Persona(name, category, panel, prompt, source)


def _parse_bank(raw: list, bank: str) -> tuple[Question, ...]:
    questions = []
    for item in raw:
        if set(item) != {"id", "kind", "text"} or item["kind"] not in ("factual", "values"):
            raise CatalogError(f"{bank} question {item!r}: needs id, kind (factual|values), text")
        questions.append(Question(str(item["id"]), item["kind"], str(item["text"]).strip()))
    return tuple(questions)


def parse_catalog(personas_yaml: dict, questions_yaml: dict) -> Catalog:
    """Build and validate a catalog from the two parsed YAML documents."""
    personas = tuple(_parse_persona(raw) for raw in personas_yaml["personas"])
    catalog = Catalog(
        personas,
        _parse_bank(questions_yaml["data"], "data"),
        _parse_bank(questions_yaml["eval"], "eval"),
    )
    _check_unique("persona name", [p.name for p in personas])
    _check_unique("system prompt", [p.system_prompt for p in personas if p.system_prompt])
    all_questions = catalog.data_questions + catalog.eval_questions
    _check_unique("question id", [q.id for q in all_questions])
    data_texts = {q.text.lower() for q in catalog.data_questions}
    overlap = sorted(q.text for q in catalog.eval_questions if q.text.lower() in data_texts)
    if overlap:
        raise CatalogError(f"question banks overlap (data and eval share {overlap}); make them disjoint")
    for size in PANEL_SIZES:
        catalog.panel(size)  # each panel has exactly its size
    return catalog


def _check_unique(what: str, values: list) -> None:
    seen, dupes = set(), set()
    for value in values:
        (dupes if value in seen else seen).add(value)
    if dupes:
        raise CatalogError(f"duplicate {what}: {sorted(dupes)}")


@cache
def load_catalog(data_dir: Path = DATA_DIR) -> Catalog:
    """Read and validate ``personas.yaml`` and ``questions.yaml`` from ``data_dir``."""
    with open(data_dir / "personas.yaml") as f:
        personas_yaml = yaml.safe_load(f)
    with open(data_dir / "questions.yaml") as f:
        questions_yaml = yaml.safe_load(f)
    return parse_catalog(personas_yaml, questions_yaml)
