"""How an undefined statistic is reported: ``None`` plus a sibling ``<key>_reason`` string."""

from __future__ import annotations

from typing import Any


def undefined(keys: str | list[str], reason: str) -> dict[str, Any]:
    """``{"r": None, "r_reason": reason, ...}`` for each key."""
    keys = [keys] if isinstance(keys, str) else keys
    out: dict[str, Any] = {}
    for key in keys:
        out[key] = None
        out[f"{key}_reason"] = reason
    return out


def finite_or_none(value: float) -> float | None:
    """A plain float, or None when the library returned NaN/inf."""
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None
