"""Fire rates with Wilson score intervals (statsmodels), clipped so they always contain the rate.

>>> [round(float(x), 4) for x in wilson_interval(81, 263, 0.95)]   # Newcombe (1998), Table I, example (a)
[0.2553, 0.3662]
>>> [float(x) for x in wilson_interval(60, 60, 0.95)][1]           # exactly 1, not 0.9999999999999999
1.0
"""

from __future__ import annotations

import numpy as np
from statsmodels.stats.proportion import proportion_confint


def wilson_interval(fired, n, level: float):
    """Wilson score interval for fired/n at confidence ``level`` (arrays broadcast).

    statsmodels' closed form is off by rounding at the edges (the upper bound of n/n is
    0.9999999999999999 for n = 60, the lower bound of 0/n is 1e-17 for n = 100), which puts the
    rate outside its own interval and gives negative error bars. The bounds are clipped into
    [0, 1] and to contain fired/n; away from the edges the clip changes nothing.
    """
    fired, n = np.asarray(fired, dtype=float), np.asarray(n, dtype=float)
    low, high = proportion_confint(fired, n, alpha=1 - level, method="wilson")
    rate = fired / n
    return np.clip(np.minimum(low, rate), 0.0, 1.0), np.clip(np.maximum(high, rate), 0.0, 1.0)
