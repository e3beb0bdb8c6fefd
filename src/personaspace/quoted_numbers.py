"""Numbers the docs quote from committed metrics files, read from those files instead of typed.

A quoted number is written in Markdown as an invisible comment naming its source, then the number::

    mean source rate <!--= metrics/panel/eval_base.json source_rate_mean .2f -->0.79<!--/-->

``<file> <key> [<format>]``: a JSON file relative to the repo root, a dotted key into it (a number
picks a list's item: ``rows.0.hours``; ``|min``,
``|max`` or ``|len`` after the key reduce a mapping's values or a list), and a Python format spec
(default ``g``). ``refresh`` rewrites every quoted number from its file; ``python -m
personaspace.quoted_numbers --write README.md`` does it in place, and the test of the docs fails
when any quoted number differs from the committed metrics.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from personaspace.io import atomic_path

QUOTE = re.compile(r"<!--=\s*(?P<file>\S+)\s+(?P<key>[^\s>]+)(?:\s+(?P<format>[^\s>]+))?\s*-->(?P<shown>.*?)<!--/-->")
REDUCERS = {"min": min, "max": max, "len": len}


class QuoteError(ValueError):
    """A quoted number whose file or key cannot be read."""


def value_of(data: Any, key: str) -> Any:
    """``data``'s value at a dotted ``key``, reduced by a trailing ``|min``, ``|max`` or ``|len``."""
    path, _, reducer = key.partition("|")
    value = data
    for part in path.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]  # a list's item by position: rows.0.hours
            continue
        if not isinstance(value, dict) or part not in value:
            raise QuoteError(f"no key {path!r} (missing at {part!r})")
        value = value[part]
    if not reducer:
        return value
    if reducer not in REDUCERS:
        raise QuoteError(f"{key!r}: unknown reducer {reducer!r} (one of {sorted(REDUCERS)})")
    values = list(value.values()) if isinstance(value, dict) else value
    return REDUCERS[reducer](values)


def refresh(text: str, root: Path) -> str:
    """``text`` with every quoted number rewritten from its file under ``root``."""
    cache: dict[str, Any] = {}

    def quoted(match: re.Match[str]) -> str:
        name = match["file"]
        if name not in cache:
            path = root / name
            if not path.is_file():
                raise QuoteError(f"{match[0]!r}: {name} does not exist")
            cache[name] = json.loads(path.read_text())
        try:
            value = value_of(cache[name], match["key"])
        except QuoteError as err:
            raise QuoteError(f"{name}: {err}") from None
        shown = format(value, match["format"] or "g")
        return match[0][: match.start("shown") - match.start()] + shown + "<!--/-->"

    return QUOTE.sub(quoted, text)


def stale(text: str, root: Path) -> list[tuple[str, str]]:
    """(typed, from the file) for each quoted number of ``text`` that differs from its file."""
    fresh = QUOTE.finditer(refresh(text, root))
    return [
        (old["shown"], new["shown"]) for old, new in zip(QUOTE.finditer(text), fresh, strict=True) if old[0] != new[0]
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="Markdown files quoting numbers")
    parser.add_argument("--write", action="store_true", help="rewrite the files (default: list what differs)")
    parser.add_argument("--root", type=Path, default=Path("."), help="the repo root the quoted paths are under")
    args = parser.parse_args(argv)
    differs = 0
    for path in args.files:
        text = path.read_text()
        changes = stale(text, args.root)
        differs += len(changes)
        for typed, actual in changes:
            print(f"{path}: {typed} -> {actual}")
        if args.write and changes:
            with atomic_path(path) as tmp:
                tmp.write_text(refresh(text, args.root))
    return 1 if differs and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
