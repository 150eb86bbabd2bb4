"""Bounds that let the min-max DP skip work without changing its answer.

`bottleneck_upper_bound` is the bottleneck of a cheap fitting split (the optimum is no
slower); `_first_starts` turns such a bound into, per end, the earliest start whose stage
could still be within it. Separate from the DP (`partition_stages`) because they are
estimates around it, not part of the recurrence.
"""

from __future__ import annotations

import math

import numpy as np

from fxpipe.passes.partition_baselines import uniform_partition
from fxpipe.passes.partition_problem import PartitionProblem
from fxpipe.passes.stage_variants import evaluate_partition

__all__ = ["bottleneck_upper_bound"]


def _first_starts(problem: PartitionProblem, bound: float) -> np.ndarray:
    """Per end, the earliest start s whose stage [s, end) can take <= `bound` on some position.

    A stage's time is at least the sum over its units of the unit's cheapest time (over
    positions, plain or offloaded; recomputing only adds time, boundaries only add), and that
    sum only grows as s moves back, so every earlier start is slower than `bound` everywhere.
    A small slack keeps rounding (a different summation order) from dropping a start.
    """
    n, p = problem.n, problem.p
    lb = np.asarray(problem.unit_time, dtype=np.float64).reshape(n, p)
    if problem.offload != "off" and problem.unit_offload_time:
        lb = np.minimum(lb, np.asarray(problem.unit_offload_time, dtype=np.float64).reshape(n, p))
    prefix = np.concatenate(([0.0], np.cumsum(lb.min(axis=1))))
    slack = 1e-9 * (prefix[-1] + bound)
    first = np.searchsorted(prefix, prefix - bound - slack, side="left")
    return np.minimum(first, np.maximum(np.arange(n + 1) - 1, 0))  # at least one start per end


def bottleneck_upper_bound(problem: PartitionProblem) -> float:
    """The bottleneck of a cheap fitting partition (inf when neither tried fits): the optimal
    one is no slower, so it bounds the min-max DP (`_minmax_dp`'s `bound`).

    Tries the uniform split and a split at equal shares of the cheapest unit times.
    """
    n, p = problem.n, problem.p
    if n < p:
        return math.inf
    cheapest = np.asarray(problem.unit_time, dtype=np.float64).reshape(n, p).min(axis=1)
    prefix = np.concatenate(([0.0], np.cumsum(cheapest)))
    cuts = [0]
    for k in range(1, p):  # each stage keeps >= 1 unit and leaves >= 1 for every later one
        c = int(np.searchsorted(prefix, k * prefix[-1] / p))
        cuts.append(min(max(c, cuts[-1] + 1), n - p + k))
    cuts.append(n)
    ub = math.inf
    for part in (uniform_partition(problem),
                 evaluate_partition(problem, tuple(zip(cuts[:-1], cuts[1:])), method="given")):
        if part.fits:
            ub = min(ub, part.bottleneck)
    return ub
