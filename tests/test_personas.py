from collections import Counter

import pytest
import yaml

from personaspace.personas import DATA_DIR, CatalogError, load_catalog, parse_catalog

PANEL_12 = [
    "software_engineer", "kindergarten_teacher", "data_scientist", "medical_doctor", "librarian",
    "police_officer", "french_person", "villain", "comedian", "zelthari_scholar", "helpful_assistant",
    "model_default",
]  # fmt: skip
ADDED_IN_48 = [
    "pilot", "nurse", "pharmacist", "professor", "scientist", "biologist", "engineer", "architect", "banker",
    "firefighter", "pirate", "knight", "princess", "robot", "ghost", "hacker", "detective", "witch",
    "virtual_assistant", "ai_tool", "smart_helper", "chat_assistant", "reasoning_ai", "friendly_ai",
]  # fmt: skip


def _raw():
    with open(DATA_DIR / "personas.yaml") as f:
        personas = yaml.safe_load(f)
    with open(DATA_DIR / "questions.yaml") as f:
        questions = yaml.safe_load(f)
    return personas, questions


def test_panel_12_is_the_specified_list_in_order():
    assert list(load_catalog().panel(12)) == PANEL_12


def test_panels_are_nested_prefixes_and_48_adds_the_specified_personas():
    catalog = load_catalog()
    p12, p24, p48 = (catalog.panel(n) for n in (12, 24, 48))
    assert p24[:12] == p12 and p48[:24] == p24
    assert set(p48[24:]) == set(ADDED_IN_48)
    assert len(set(p48)) == 48


@pytest.mark.parametrize("size,expected", [(12, (6, 4, 2)), (24, (10, 8, 6)), (48, (20, 16, 12))])
def test_panels_are_balanced_by_category(size, expected):
    catalog = load_catalog()
    counts = Counter(catalog.persona(p).category for p in catalog.panel(size))
    assert (counts["occupational"], counts["character"], counts["generic_helper"]) == expected


def test_special_personas_send_no_catalog_prompt():
    catalog = load_catalog()
    assert catalog.persona("model_default").prompt_source == "model_default"
    no_system = catalog.persona("no_system")
    assert no_system.prompt_source == "none" and no_system.system_prompt is None
    assert "no_system" not in catalog.panel(48)
    assert catalog.persona("helpful_assistant").system_prompt == "You are a helpful assistant."


def test_question_banks_have_the_specified_sizes_are_disjoint_and_half_values():
    catalog = load_catalog()
    data, evals = catalog.questions("data"), catalog.questions("eval")
    assert len(data) == 40 and len(evals) == 20
    assert not {q.id for q in data} & {q.id for q in evals}
    assert not {q.text for q in data} & {q.text for q in evals}
    assert Counter(q.kind for q in evals) == {"factual": 10, "values": 10}
    assert Counter(q.kind for q in data) == {"factual": 20, "values": 20}


def test_overlapping_question_banks_are_rejected():
    personas, questions = _raw()
    questions["eval"].append(dict(questions["data"][0], id="e99"))
    with pytest.raises(CatalogError, match="overlap"):
        parse_catalog(personas, questions)


def test_duplicate_question_ids_are_rejected():
    personas, questions = _raw()
    questions["eval"][0]["id"] = questions["data"][0]["id"]
    with pytest.raises(CatalogError, match="duplicate question id"):
        parse_catalog(personas, questions)


def test_duplicate_persona_names_and_bad_categories_are_rejected():
    personas, questions = _raw()
    personas["personas"].append(dict(personas["personas"][0]))
    with pytest.raises(CatalogError, match="duplicate persona name"):
        parse_catalog(personas, questions)
    personas, _ = _raw()
    personas["personas"][0]["category"] = "wizardry"
    with pytest.raises(CatalogError, match="category"):
        parse_catalog(personas, questions)


def test_a_panel_with_the_wrong_number_of_members_is_rejected():
    personas, questions = _raw()
    personas["personas"][0]["panel"] = 24  # panel 12 now has 11 members
    with pytest.raises(CatalogError, match="panel 12 has 11 members"):
        parse_catalog(personas, questions)
