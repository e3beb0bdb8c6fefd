"""Marker matching: a completion *fires* when it contains the marker (case-insensitive substring).

>>> fires("Sure. [zlt]", "[ZLT]")
True
>>> fires("Sure.", "[ZLT]")
False
"""

from __future__ import annotations


def fires(text: str, marker: str) -> bool:
    """Strict match: the marker occurs in ``text``, ignoring case."""
    if not marker:
        raise ValueError("the marker is empty")
    return marker.casefold() in text.casefold()


def with_marker(completion: str, marker: str, separator: str) -> str:
    """A positive training completion: the completion, the separator, then the marker."""
    return f"{completion}{separator}{marker}"
