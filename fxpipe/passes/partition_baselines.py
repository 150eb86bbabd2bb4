"""Baseline partitions, evaluated with the partitioner's cost model.

`uniform_partition` (equal unit counts) and `params_partition` (equal parameter bytes, as
DeepSpeed's ``partition_method="parameters"`` and ``torch.distributed.pipelining``'s
``split_into_equal_size``) are the splits users and other tools apply by hand; they are
evaluated with the same model (`stage_variants`) so that reports compare like with like.
`all_partitions` enumerates every split for brute-force checks. Separate from the exact DP
(`partition_stages`): none of them searches.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence

from fxpipe.errors import PlanError
from fxpipe.passes.partition_problem import Partition, PartitionProblem, _as_floats
from fxpipe.passes.stage_variants import _check_enough_units, evaluate_partition

__all__ = ["all_partitions", "uniform_partition", "params_partition"]


def all_partitions(problem: PartitionProblem) -> Iterator[Partition]:
    """Every contiguous partition of the problem's units onto its positions, evaluated.

    C(n-1, p-1) of them: for brute-force checks of `partition_stages` on small problems
    (tests, `benchmarks/planner.py`), never for planning.
    """
    n, p = problem.n, problem.p
    for cuts in itertools.combinations(range(1, n), p - 1):
        edges = (0, *cuts, n)
        yield evaluate_partition(problem, [(edges[j], edges[j + 1]) for j in range(p)])


def uniform_partition(problem: PartitionProblem) -> Partition:
    """Baseline: equal unit counts per stage, as users split by hand.

    With n = q*p + r the first r stages get q+1 units and the rest q. The result is
    evaluated with the same cost model and returned even if it does not fit in memory;
    check ``fits``.

    Args:
        problem: The partitioning problem.

    Returns:
        The uniform `Partition` with ``method="uniform"``.

    Raises:
        PlanError: If there are fewer units than devices.
    """
    _check_enough_units(problem)
    q, r = divmod(problem.n, problem.p)
    bounds = []
    start = 0
    for j in range(problem.p):
        end = start + q + (1 if j < r else 0)
        bounds.append((start, end))
        start = end
    return evaluate_partition(problem, bounds, method="uniform")


def params_partition(problem: PartitionProblem, unit_param_bytes: Sequence[float]) -> Partition:
    """Baseline: equal parameter bytes per stage (DeepSpeed / torch pipelining style).

    Cut k (k = 1..p-1) is placed greedily, in order, at the unit boundary whose parameter
    prefix sum is closest to ``k * total / p`` (the earlier boundary on ties), while leaving
    at least one unit for this and every later stage. With no parameters at all the
    targets carry no information, so it falls back to equal unit counts. The result is
    returned even if it does not fit in memory; check ``fits``.

    Args:
        problem: The partitioning problem.
        unit_param_bytes: n; parameter bytes of each unit.

    Returns:
        The `Partition` with ``method="params"``.

    Raises:
        PlanError: If there are fewer units than devices, or unit_param_bytes does not have
            one finite non-negative number per unit.
    """
    _check_enough_units(problem)
    n, p = problem.n, problem.p
    params = _as_floats("unit_param_bytes", unit_param_bytes)
    if len(params) != n:
        raise PlanError(f"unit_param_bytes must have one entry per unit ({n}), got {len(params)}")
    prefix = [0.0]
    for v in params:
        prefix.append(prefix[-1] + v)
    total = prefix[-1]
    if total == 0:
        uniform = uniform_partition(problem)
        return evaluate_partition(problem, uniform.bounds, method="params")
    cuts = [0]
    for k in range(1, p):
        target = k * total / p
        lo = cuts[-1] + 1  # this stage non-empty
        hi = n - (p - k)  # one unit left for each later stage
        cut = min(range(lo, hi + 1), key=lambda c: (abs(prefix[c] - target), c))
        cuts.append(cut)
    cuts.append(n)
    bounds = [(cuts[j], cuts[j + 1]) for j in range(p)]
    return evaluate_partition(problem, bounds, method="params")
