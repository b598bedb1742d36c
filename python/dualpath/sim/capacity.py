"""Online capacity: the highest agent arrival rate (APS) a cluster serves within the SLO.

The paper (§7.8): agents arrive as a Poisson process and replay their trajectories; a rate is
within the SLO when TTFT <= 4 s and TPOT <= 50 ms (here: the means over all turns, as
compare_1p1d judges a measured run). `max_aps` brackets the capacity from a guess (doubling or
halving) and then bisects on a log scale to a relative tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SLO_TTFT_S, SLO_TPOT_S = 4.0, 0.050


def within_slo(ttft_mean: float, tpot_mean: float) -> bool:
    return ttft_mean <= SLO_TTFT_S and tpot_mean <= SLO_TPOT_S


def max_aps(within: Callable[[float], bool], guess: float, tolerance: float = 0.08,
            max_steps: int = 8) -> float:
    """Highest rate r with within(r) (0.0 if even guess / 2**max_steps is over), to
    `tolerance` relative. `within` is assumed monotone (more load, not better)."""
    if not guess > 0 or not 0 < tolerance < 1:
        raise ValueError("max_aps: guess must be > 0 and tolerance in (0, 1)")
    lo, hi, aps = 0.0, None, guess
    for _ in range(max_steps):
        if within(aps):
            lo = aps
            if hi is not None:
                break
            aps *= 2
        else:
            hi = aps
            if lo > 0:
                break
            aps /= 2
    if hi is None or lo == 0.0:
        return lo
    while (hi - lo) / hi > tolerance:
        mid = math.sqrt(lo * hi)
        if within(mid):
            lo = mid
        else:
            hi = mid
    return lo
