"""Fire rates with Wilson score intervals (statsmodels).

>>> [round(float(x), 4) for x in wilson_interval(81, 263, 0.95)]   # Newcombe (1998), Table I, example (a)
[0.2553, 0.3662]
"""

from __future__ import annotations

import numpy as np
from statsmodels.stats.proportion import proportion_confint


def wilson_interval(fired, n, level: float):
    """Wilson score interval for fired/n at confidence ``level`` (arrays broadcast)."""
    low, high = proportion_confint(np.asarray(fired), np.asarray(n), alpha=1 - level, method="wilson")
    return low, high
