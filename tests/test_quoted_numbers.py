"""The docs' quoted numbers are the committed metrics (personaspace.quoted_numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personaspace.quoted_numbers import QUOTE, QuoteError, main, refresh, stale

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_readme_numbers_are_the_committed_metrics():
    """Every number the README and docs/ quote from a metrics file equals that file's value."""
    quoted = {path.name: len(QUOTE.findall(path.read_text())) for path in DOCS}
    assert quoted["README.md"] >= 15, quoted  # the default study's science check quotes its metrics
    for path in DOCS:
        differs = stale(path.read_text(), REPO)
        assert not differs, (
            f"{path.name} quotes numbers its metrics files no longer hold (typed -> file): {differs}; "
            f"run `python -m personaspace.quoted_numbers --write {path.relative_to(REPO)}`"
        )


def test_refresh_rewrites_each_quote_from_its_file(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"a": {"b": 0.58485}, "rates": {"x": 0.65, "y": 0.9}, "n": 11}))
    text = (
        "rate <!--= m.json a.b .3f -->0.584<!--/--> over <!--= m.json n d -->12<!--/--> personas, "
        "from <!--= m.json rates|min .2f -->0<!--/--> to <!--= m.json rates|max -->1<!--/--> "
        "(<!--= m.json rates|len -->0<!--/--> rates)"
    )
    assert refresh(text, tmp_path) == (
        "rate <!--= m.json a.b .3f -->0.585<!--/--> over <!--= m.json n d -->11<!--/--> personas, "
        "from <!--= m.json rates|min .2f -->0.65<!--/--> to <!--= m.json rates|max -->0.9<!--/--> "
        "(<!--= m.json rates|len -->2<!--/--> rates)"
    )
    assert stale(text, tmp_path) == [("0.584", "0.585"), ("12", "11"), ("0", "0.65"), ("1", "0.9"), ("0", "2")]
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    assert main([str(doc), "--root", str(tmp_path)]) == 1  # a check: says what differs, changes nothing
    assert doc.read_text() == text
    assert main([str(doc), "--root", str(tmp_path), "--write"]) == 0
    assert doc.read_text() == refresh(text, tmp_path) and not stale(doc.read_text(), tmp_path)


@pytest.mark.parametrize(
    ("quote", "message"),
    [
        ("<!--= gone.json a -->1<!--/-->", "gone.json does not exist"),
        ("<!--= m.json a.c -->1<!--/-->", "no key 'a.c' (missing at 'c')"),
        ("<!--= m.json a|mean -->1<!--/-->", "unknown reducer 'mean'"),
        ("<!--= m.json rows.1.x -->1<!--/-->", "no key 'rows.1.x' (missing at '1')"),
    ],
)
def test_a_quote_of_a_missing_file_or_key_names_it(tmp_path, quote, message):
    (tmp_path / "m.json").write_text(json.dumps({"a": {"b": 1}, "rows": [{"x": 2}]}))
    assert refresh("<!--= m.json rows.0.x -->1<!--/-->", tmp_path) == "<!--= m.json rows.0.x -->2<!--/-->"
    with pytest.raises(QuoteError, match=message.replace("(", r"\(").replace(")", r"\)")):
        refresh(quote, tmp_path)
