"""Seeds derived from stable ids, never from Python's ``hash()`` or list positions.

>>> stable_seed(0, "negatives", "librarian")
5009640039150802035
"""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the string forms of ``parts`` (same parts, same seed, any process)."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1
