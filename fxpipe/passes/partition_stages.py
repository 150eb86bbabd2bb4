"""Exact min-max contiguous partition of a unit sequence onto an ordered list of devices.

The model is a sequence of n units (coarse blocks in a topological order); the devices are p
positions in a fixed order (placement chooses the order and calls this pass once per order).
Stage j is a non-empty contiguous run of units and runs on position j. A stage's time per
microbatch is its units' compute time on that device plus the time to send its outgoing
boundary over the link to position j+1; the pipeline's steady-state throughput is set by the
slowest stage, so the objective is the bottleneck ``max_j stage_time_j``. Each stage must
also fit in its device's memory:

    static bytes (params + grads + optimizer state)
    + inflight[j] * (activation bytes + incoming boundary + outgoing boundary)

A stage may instead recompute, offload its weights, or both; what each variant costs and
which one a stage takes is the per-stage model in `stage_variants` (the DP reads it as
whole arrays, `stage_tables`), and the DP over bounds stays exact because stages are
independent given their bounds.

`partition_stages` returns the exact optimum by dynamic programming over (cut, position)
with every cut considered: the objective is not monotone in a stage's length (a shorter
stage can end on a heavier boundary), so greedy or binary-search feasibility tests are not
exact here. Ties on the bottleneck are broken by the smaller sum of stage times (a second
exact DP restricted to stages no slower than the bottleneck), then by the earliest cuts.

This module holds the DP and what runs it (the optimal bottleneck, the min-sum candidates
`step_candidates`, the closest partition when nothing fits). The baselines users and other
tools apply by hand, `uniform_partition` and `params_partition`, are in
`partition_baselines`; the bounds that prune the DP in `partition_bounds`; the message when
nothing fits in `explain_infeasible`. Every public name is still importable from here.

Example:
    >>> prob = PartitionProblem(
    ...     unit_names=("a", "b", "c", "d"),
    ...     unit_time=((1.0, 1.0),) * 4,
    ...     boundary_time=((0.0,),) * 3,
    ...     unit_static_bytes=(1.0,) * 4,
    ...     unit_activation_bytes=(1.0,) * 4,
    ...     boundary_bytes=(1.0,) * 3,
    ...     inflight=(2, 1),
    ...     device_memory=(100.0, 100.0),
    ...     device_names=("cuda:0", "cuda:1"),
    ... )
    >>> partition_stages(prob).bounds
    ((0, 2), (2, 4))
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from fxpipe.errors import PlanError
from fxpipe.passes.explain_infeasible import _infeasible_message
from fxpipe.passes.partition_baselines import all_partitions, params_partition, uniform_partition
from fxpipe.passes.partition_bounds import _first_starts, bottleneck_upper_bound
from fxpipe.passes.partition_problem import OFFLOAD_MODES, RECOMPUTE_MODES, Partition, PartitionProblem
from fxpipe.passes.stage_tables import _stage_tables
from fxpipe.passes.stage_variants import (_check_enough_units, evaluate_partition, stage_memory, stage_offload,
                                          stage_recompute, stage_time, weight_buffer)

__all__ = [
    "PartitionProblem",
    "Partition",
    "stage_time",
    "stage_memory",
    "evaluate_partition",
    "bottleneck_upper_bound",
    "optimal_bottleneck",
    "partition_stages",
    "uniform_partition",
    "params_partition",
    "stage_recompute",
    "step_candidates",
    "memory_shortfall",
    "RECOMPUTE_MODES",
    "OFFLOAD_MODES",
    "stage_offload",
    "weight_buffer",
    "all_partitions",
]


# --------------------------------------------------------------------------------------
# The exact DP
# --------------------------------------------------------------------------------------


def _minmax_dp(
    problem: PartitionProblem,
    cost: Callable[[np.ndarray, np.ndarray], np.ndarray],
    start_value: float,
    combine: Callable[[np.ndarray, np.ndarray], np.ndarray],
    bound: float = math.inf,
) -> tuple[np.ndarray, np.ndarray]:
    """Generic DP over (end, position): best[end, j] = min_s combine(best[s, j-1], cost).

    ``cost(time, memory)`` gives each candidate stage's cost (inf where forbidden). All
    positions are updated at once for a given end: best[., j] only reads ends s < end,
    which are final by then. Returns ``(best, parent)`` with parent[end, j] the argmin
    start (the smallest on ties, so results are deterministic).

    `bound`: no stage slower than this can be part of the answer the caller reads (its cost
    is inf, or the caller knows a partition whose bottleneck is <= bound). Starts that are
    surely slower are then never computed (`_first_starts`): O(n w p) instead of O(n^2 p),
    w the most units a stage within the bound holds (about n / p, not n, on many devices).
    The entries the caller reads are unchanged; an entry only reachable through a skipped
    stage stays inf.
    """
    n, p = problem.n, problem.p
    # prev[s, j] = best value of units [0, s) on positions 0..j-1; the empty prefix on no
    # positions costs start_value, anything else with j = 0 is impossible.
    prev = np.full((n + 1, p), np.inf)
    prev[0, 0] = start_value
    best = np.full((n + 1, p), np.inf)
    parent = np.zeros((n + 1, p), dtype=np.int64)
    first = _first_starts(problem, bound) if math.isfinite(bound) else None
    for end, time, memory in _stage_tables(problem, first):
        f = 0 if first is None else int(first[end])
        cand = combine(prev[f:end], cost(time, memory))
        arg = np.argmin(cand, axis=0)
        best[end] = cand[arg, np.arange(p)]
        parent[end] = arg + f
        if p > 1:
            prev[end, 1:] = best[end, :-1]
    return best, parent


def optimal_bottleneck(problem: PartitionProblem) -> float:
    """The optimal bottleneck over fitting partitions (pass 1 of `partition_stages`; inf when
    nothing fits), computed with a bound on stage times wherever one is known.

    The bound is a cheap fitting split's bottleneck; when neither cheap split fits, a guess
    from the lower bound (``sum of cheapest unit times / p``), doubled until the DP's answer
    is within it: an answer <= the bound is exact (every stage of an optimal partition is
    then within the bound, so none was skipped), and each try costs about its bound's share
    of the full DP; past total / 8 the full DP runs instead.
    """
    n, p = problem.n, problem.p
    caps = np.asarray(problem.device_memory, dtype=np.float64)[None, :]

    def feasible_time(time: np.ndarray, memory: np.ndarray) -> np.ndarray:
        return np.where(memory <= caps, time, np.inf)

    ub = bottleneck_upper_bound(problem)
    if math.isfinite(ub):
        return float(_minmax_dp(problem, feasible_time, 0.0, np.maximum, bound=ub)[0][n, p - 1])
    cheapest = np.asarray(problem.unit_time, dtype=np.float64).reshape(n, p).min(axis=1)
    total = float(cheapest.sum())
    guess = 1.5 * max(float(cheapest.max(initial=0.0)), total / p)
    # Guesses only while they skip most of the work: past total / 8 a try costs a large share
    # of the full DP, and a plan where nothing fits (auto's hopeless candidates) would pay
    # for every doubling before the full DP finds that out.
    while 0.0 < guess < total / 8:
        value = float(_minmax_dp(problem, feasible_time, 0.0, np.maximum, bound=guess)[0][n, p - 1])
        if value <= guess:
            return value
        guess *= 2.0
    return float(_minmax_dp(problem, feasible_time, 0.0, np.maximum)[0][n, p - 1])


def _trace_back(parent: np.ndarray, n: int, p: int) -> tuple[tuple[int, int], ...]:
    bounds = []
    end = n
    for j in range(p - 1, -1, -1):
        start = int(parent[end, j])
        bounds.append((start, end))
        end = start
    return tuple(reversed(bounds))


def partition_stages(problem: PartitionProblem, *, bottleneck: float | None = None) -> Partition:
    """The exact min-max contiguous partition under each device's memory.

    Minimises the bottleneck (slowest stage's compute + outgoing boundary time) over every
    partition into p non-empty contiguous stages, stage j on position j, subject to
    ``stage_memory <= device_memory`` on every position. Among partitions with the optimal
    bottleneck it returns one with the smallest sum of stage times, and among those the one
    with the earliest cuts (counted from the last stage backwards).

    Runs in O(n^2 p) time, vectorised over starts and positions with numpy.

    Args:
        problem: The partitioning problem.
        bottleneck: the optimal bottleneck when the caller already has it from the same
            DP (`place_stages` prices every order with pass 1): pass 1 is then skipped.

    Returns:
        The optimal `Partition` with ``method="optimal"`` and ``fits=True``.

    Raises:
        PlanError: If there are fewer units than devices, or no partition fits in memory
            (the message gives the closest partition's needs, each device's memory and
            what would make it fit).
    """
    _check_enough_units(problem)
    n, p = problem.n, problem.p
    caps = np.asarray(problem.device_memory, dtype=np.float64)[None, :]

    # Pass 1: the optimal bottleneck. max() is monotone, so keeping only the best value per
    # (prefix, position) is exact.
    if bottleneck is None:
        bottleneck = optimal_bottleneck(problem)
    if not math.isfinite(bottleneck):
        raise PlanError(_infeasible_message(problem, _closest_partition(problem)))

    # Pass 2: among stages no slower than the bottleneck, minimise the sum of stage times.
    # A lexicographic (max, sum) DP in one pass would not be exact (a prefix with a worse
    # max can still finish with the same overall max and a smaller sum), hence two passes.
    # Both passes see bit-identical stage times, so the optimum's stages all pass the test.
    def within_bottleneck(time: np.ndarray, memory: np.ndarray) -> np.ndarray:
        return np.where((memory <= caps) & (time <= bottleneck), time, np.inf)

    total, parent = _minmax_dp(problem, within_bottleneck, 0.0, np.add, bound=bottleneck)
    if not math.isfinite(total[n, p - 1]):  # pragma: no cover - impossible by construction
        raise AssertionError("partition_stages: the optimal bottleneck has no realisation")
    result = evaluate_partition(problem, _trace_back(parent, n, p), method="optimal")
    if not result.fits or result.bottleneck != bottleneck:  # pragma: no cover
        raise AssertionError("partition_stages: DP and evaluate_partition disagree")
    return result


def _min_sum_within(problem: PartitionProblem, bound: float) -> Partition | None:
    """The fitting partition with the smallest sum of stage times among those whose every
    stage takes <= `bound` (None when there is none)."""
    n, p = problem.n, problem.p
    caps = np.asarray(problem.device_memory, dtype=np.float64)[None, :]
    total, parent = _minmax_dp(problem, lambda t, m: np.where((m <= caps) & (t <= bound), t, np.inf), 0.0, np.add,
                               bound=bound)
    if not math.isfinite(total[n, p - 1]):
        return None
    return evaluate_partition(problem, _trace_back(parent, n, p), method="optimal")


def step_candidates(problem: PartitionProblem, best: Partition, microbatches: int, limit: int = 8) -> list[Partition]:
    """Partitions that give up some bottleneck for a smaller sum of stage times.

    A pipeline's step is about ``sum(stage times) + (m - 1) * bottleneck`` (the first
    microbatch crosses every stage, the others follow at the bottleneck's pace), so with few
    microbatches a split that is a little slower at its slowest stage but faster in total can
    finish sooner. For bounds B above `best`'s bottleneck B*, up to the point where no saving
    in the sum can pay for ``(m - 1) * (B - B*)``, this returns the min-sum partition under B,
    for up to `limit` bounds taken from the stage times that occur in that range. The caller
    picks among them (and `best`) by simulating the schedule.
    """
    if limit <= 0:
        return []
    b_star, s_star = best.bottleneck, sum(best.stage_time)
    free = _min_sum_within(problem, math.inf)
    if free is None or sum(free.stage_time) >= s_star:
        return []
    hi = math.inf if microbatches <= 1 else b_star + (s_star - sum(free.stage_time)) / (microbatches - 1)
    caps = np.asarray(problem.device_memory, dtype=np.float64)[None, :]
    values: set[float] = set()
    for _, time, memory in _stage_tables(problem):
        t = time[(memory <= caps) & (time > b_star) & (time <= hi)]
        values.update(t.tolist())
    bounds = sorted(values)
    if len(bounds) > limit:  # spread over the range, always keeping its ends
        step = (len(bounds) - 1) / (limit - 1) if limit > 1 else 0
        bounds = sorted({bounds[round(i * step)] for i in range(limit)})
    out: list[Partition] = []
    last = s_star
    for b in bounds:  # the min sum only falls as the bound rises; keep the cuts where it does
        part = _min_sum_within(problem, b)
        if part is not None and sum(part.stage_time) < last:
            out.append(part)
            last = sum(part.stage_time)
    return out


# --------------------------------------------------------------------------------------
# Nothing fits: the closest partition
# --------------------------------------------------------------------------------------


def _closest_partition(problem: PartitionProblem) -> Partition:
    """The partition whose worst memory overshoot (need - capacity, bytes) is smallest."""
    caps = np.asarray(problem.device_memory, dtype=np.float64)[None, :]
    _, parent = _minmax_dp(
        problem, lambda time, memory: memory - caps, -np.inf, np.maximum
    )
    return evaluate_partition(problem, _trace_back(parent, problem.n, problem.p), method="given")


def memory_shortfall(problem: PartitionProblem, relative: bool = False) -> float:
    """Bytes the closest partition (smallest worst overshoot) lacks on its worst device;
    <= 0 when some partition fits (then minus the headroom of the roomiest-fitting one).
    `relative`: as a fraction of that device's memory instead (comparable across problems
    whose positions have other capacities, e.g. interleaved stages sharing a device)."""
    _check_enough_units(problem)
    closest = _closest_partition(problem)
    if relative:
        return max((m - c) / max(c, 1.0) for m, c in zip(closest.stage_memory, problem.device_memory))
    return max(m - c for m, c in zip(closest.stage_memory, problem.device_memory))

