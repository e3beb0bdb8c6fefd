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


def replace_non_finite(data: Any, reason: str) -> Any:
    """A copy of nested dicts/lists with every NaN/inf float set to None and a ``<key>_reason`` beside it.

    The last guard before JSON: a degenerate fit (constant rates or cosines) makes some library
    statistics NaN or inf, which must read as undefined, not as a number.
    """
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, float) and finite_or_none(value) is None:
                out[key] = None
                out.setdefault(f"{key}_reason", reason)
            else:
                out[key] = replace_non_finite(value, reason)
        return out
    if isinstance(data, list):
        return [
            None if isinstance(v, float) and finite_or_none(v) is None else replace_non_finite(v, reason) for v in data
        ]
    return data
