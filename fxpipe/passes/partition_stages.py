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

A stage may instead *recompute* (activation checkpointing): it keeps only its boundary
buffers per in-flight microbatch and re-runs its forward during each backward, so it needs

    static + inflight[j] * (incoming + outgoing boundary) + activation bytes (one microbatch)

and its time per microbatch grows by its forward time (``unit_recompute_time``). With
``recompute="auto"`` each candidate stage is priced both ways and takes the faster variant
that fits (recomputation is never faster, so: plain if it fits, else recompute if that needs
less); stages are independent given their bounds, so the DP over bounds stays exact.

A stage may instead *offload* (stream its weights, as in Superpipeline): its parameters, their
gradients and optimizer state live in pinned host memory, and each unit's weights are copied
to the device on a copy stream while the previous unit computes, so the device holds about
two units at a time (the largest pair of consecutive units with weights, a double buffer;
in training a unit's bytes are its weights plus its weight gradients on the way home):

    weight_buffer(unit_param_bytes) + inflight[j] * (activations + both boundaries)

Each microbatch streams every unit's weights again (nothing is reused across microbatches,
which is what the runtime does): once in forward and once in backward (the weight gradients
go back to the host over the other direction of the full-duplex link meanwhile), so with
the copy overlapped a unit costs ``max(forward, w / host_bandwidth) + max(backward,
w / host_bandwidth)`` per microbatch (``unit_offload_time``, computed by the caller). On a
CPU the "host" is the device's own memory, so there the static state still counts. With
``offload="auto"`` a stage offloads only when no cheaper variant fits and offloading does
(streaming is never faster than keeping the weights), and among recomputing and offloading
the faster that fits wins.

A stage may also do *both* (the runtime checkpoints each streamed unit and recomputes it with
the weights fetched for its backward, runtime/unit_recompute.py): it costs offloading's time
plus one more forward, and needs

    weight_buffer + inflight[j] * (incoming boundary + per unit: unit_cut_bytes + its
    outgoing boundary) + max unit_recompute_peak + the largest transient

It is priced only when the problem gives ``unit_cut_bytes`` and both modes allow it; being
the slowest variant, "auto" takes it only where nothing cheaper fits.

`partition_stages` returns the exact optimum by dynamic programming over (cut, position)
with every cut considered: the objective is not monotone in a stage's length (a shorter
stage can end on a heavier boundary), so greedy or binary-search feasibility tests are not
exact here. Ties on the bottleneck are broken by the smaller sum of stage times (a second
exact DP restricted to stages no slower than the bottleneck), then by the earliest cuts.

The baselines users and other tools apply by hand, `uniform_partition` (equal unit counts)
and `params_partition` (equal parameter bytes, as DeepSpeed's
``partition_method="parameters"`` and ``torch.distributed.pipelining``'s
``split_into_equal_size``), are evaluated with the same cost model so that reports compare
like with like.

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

import bisect
import itertools
import math
from typing import Callable, Iterator, Sequence

import numpy as np

from fxpipe.errors import PlanError
from fxpipe.passes.annotate_costs import stage_transient
from fxpipe.passes.partition_problem import (OFFLOAD_MODES, RECOMPUTE_MODES, Partition, PartitionProblem, _as_floats,
                                             replica_bytes)

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


# The variants a stage can take (`_choose`); index into `_variants`' result. _BOTH: offloading
# and recomputing, one checkpoint per streamed unit (runtime/unit_recompute.py).
_PLAIN, _RECOMPUTE, _OFFLOAD, _BOTH = 0, 1, 2, 3

_GiB = float(1024**3)


# --------------------------------------------------------------------------------------
# One stage: its variants, time and memory (the problem and result: partition_problem.py)
# --------------------------------------------------------------------------------------


def _segment_sum(values: Sequence[float], start: int, end: int) -> float:
    acc = 0.0
    for u in range(end - 1, start - 1, -1):
        acc += values[u]
    return acc


def _check_stage(problem: PartitionProblem, start: int, end: int, j: int) -> None:
    if not (0 <= start < end <= problem.n):
        raise PlanError(
            f"stage [{start}, {end}) is not a non-empty range of the {problem.n} units"
        )
    if not 0 <= j < problem.p:
        raise PlanError(f"device position {j} is out of range for {problem.p} devices")


def weight_buffer(param_bytes: Sequence[float], start: int, end: int) -> float:
    """Bytes of weights an offloaded stage of units ``[start, end)`` keeps on its device: the
    unit computing and the next one with weights, being prefetched (units without weights,
    an activation between two Linears, are skipped: the runtime fetches nothing for them), so
    the largest sum of two consecutive weighted units' bytes (the largest unit's alone when
    the stage has one weighted unit)."""
    weighted = [param_bytes[u] for u in range(start, end) if param_bytes[u] > 0]
    best = max(weighted, default=0.0)
    for a, b in zip(weighted, weighted[1:]):
        best = max(best, a + b)
    return best


def _variants(problem: PartitionProblem, start: int, end: int, j: int) -> tuple[tuple[float, float], ...]:
    """(time, memory) of the stage kept plain, recomputing, offloading and both, in the DP's
    operation order (a variant the problem cannot price is (inf, inf))."""
    acc = 0.0
    for u in range(end - 1, start - 1, -1):
        acc += problem.unit_time[u][j]
    rc = 0.0
    if problem.unit_recompute_time:
        for u in range(end - 1, start - 1, -1):
            rc += problem.unit_recompute_time[u][j]
    acc_rc = acc + rc
    acc_off = 0.0
    if problem.unit_offload_time:
        for u in range(end - 1, start - 1, -1):
            acc_off += problem.unit_offload_time[u][j]
    acc_both = acc_off + rc  # streamed, and each unit's forward again in its backward
    if j < problem.p - 1 and end < problem.n:
        acc = acc + problem.boundary_time[end - 1][j]
        acc_rc = acc_rc + problem.boundary_time[end - 1][j]
        acc_off = acc_off + problem.boundary_time[end - 1][j]
        acc_both = acc_both + problem.boundary_time[end - 1][j]
    static = _segment_sum(problem.unit_static_bytes, start, end) + replica_bytes(problem.replicas, start, end)
    act = _segment_sum(problem.unit_activation_bytes, start, end)
    bytes_in = problem.boundary_bytes[start - 1] if start > 0 else 0.0
    bytes_out = problem.boundary_bytes[end - 1] if end < problem.n else 0.0
    k = float(problem.inflight[j])
    tr = stage_transient(problem.unit_transient_bytes, problem.unit_activation_bytes, start, end,
                         problem.split_backward)
    mem = (static + k * ((act + bytes_in) + bytes_out)) + tr
    mem_rc = ((static + k * (bytes_in + bytes_out)) + act) + tr
    none = (math.inf, math.inf)
    if not problem.unit_offload_time:
        return (acc, mem), (acc_rc, mem_rc), none, none
    held = weight_buffer(problem.unit_param_bytes, start, end)
    if problem.host_memory_is_device and problem.host_memory_is_device[j]:
        held = static + held
    mem_off = (held + k * ((act + bytes_in) + bytes_out)) + tr
    both = none
    if _combines(problem):
        kept = _segment_sum(_checkpoint_bytes(problem), start, end)
        peak = max(problem.unit_recompute_peak[start:end])
        tr_both = stage_transient(problem.unit_transient_bytes, problem.unit_activation_bytes, start, end, True)
        both = (acc_both, ((held + k * (bytes_in + kept)) + peak) + tr_both)
    if problem.host_memory and static > problem.host_memory[j]:
        # its static state would not fit in its share of host memory
        return (acc, mem), (acc_rc, mem_rc), none, none
    return (acc, mem), (acc_rc, mem_rc), (acc_off, mem_off), both


def _combines(problem: PartitionProblem) -> bool:
    """Whether a stage may both offload and recompute (both modes allow it, and it is priced)."""
    return problem.recompute != "off" and problem.offload != "off" and bool(problem.unit_cut_bytes)


def _checkpoint_bytes(problem: PartitionProblem) -> list[float]:
    """Per unit, what a stage that offloads and recomputes keeps of it per microbatch: the
    values crossing the streamed units' cuts inside it and the boundary after it (the
    stage's outgoing boundary for its last unit; none after the model's last unit)."""
    return [c + b for c, b in zip(problem.unit_cut_bytes, (*problem.boundary_bytes, 0.0))]


def _choose(problem: PartitionProblem, j: int, variants: tuple[tuple[float, float], ...]) -> int:
    """Which variant a stage takes (`_stage_tables` applies the same rule to whole arrays).

    The base (what the "on" modes ask for: plain, recomputing, offloading, or both) when it
    fits; else the fastest fitting of the "auto" modes' alternatives (ties: recomputation,
    then offloading, then both); else, nothing fitting, the one needing the least memory
    (ties: the base), which is what the infeasibility report shows as the closest partition.
    """
    cap = problem.device_memory[j]
    base = _base(problem)
    if variants[base][1] <= cap:
        return base
    options = _alternatives(problem)
    fitting = [v for v in options if variants[v][1] <= cap]
    if fitting:
        return min(fitting, key=lambda v: variants[v][0])  # min() keeps the first on ties
    return min([base] + options, key=lambda v: variants[v][1])


def _base(problem: PartitionProblem) -> int:
    """The variant the modes ask for where a stage fits: an "on" mode's, else plain."""
    rc, off = problem.recompute == "on", problem.offload == "on"
    return _BOTH if rc and off else _OFFLOAD if off else _RECOMPUTE if rc else _PLAIN


def _alternatives(problem: PartitionProblem) -> list[int]:
    """Variants "auto" may switch a stage to when its base does not fit, in tie-break order:
    those every "on" mode allows, plus whatever an "auto" mode adds."""
    rc = (False, True) if problem.recompute == "auto" else (problem.recompute == "on",)
    off = (False, True) if problem.offload == "auto" else (problem.offload == "on",)
    out = []
    for v, (r, o) in ((_RECOMPUTE, (True, False)), (_OFFLOAD, (False, True)), (_BOTH, (True, True))):
        if r in rc and o in off and v != _base(problem) and (v != _BOTH or _combines(problem)):
            out.append(v)
    return out


def _stage_variant(problem: PartitionProblem, start: int, end: int, j: int) -> tuple[int, float, float]:
    """(variant, time, memory) of the stage ``[start, end)`` on position j."""
    _check_stage(problem, start, end, j)
    variants = _variants(problem, start, end, j)
    v = _choose(problem, j, variants)
    return v, variants[v][0], variants[v][1]


def stage_recompute(problem: PartitionProblem, start: int, end: int, j: int) -> bool:
    """Whether the stage holding units ``[start, end)`` on position j recomputes.

    "off": never; "on": always (unless offload is "on"); "auto": only when keeping its
    activations does not fit in the device's memory and recomputing fits (and is no slower
    than offloading when that fits too), or, nothing fitting, recomputing needs the least.

    Raises:
        PlanError: If the range is empty or out of bounds, or j is not a position.
    """
    return _stage_variant(problem, start, end, j)[0] in (_RECOMPUTE, _BOTH)


def stage_offload(problem: PartitionProblem, start: int, end: int, j: int) -> bool:
    """Whether the stage holding units ``[start, end)`` on position j streams its weights
    from host memory (see the module doc): always with offload "on", never with "off"; with
    "auto" only when keeping them does not fit and offloading does (and is faster than
    recomputing when that fits too), or, nothing fitting, offloading needs the least.

    Raises:
        PlanError: If the range is empty or out of bounds, or j is not a position.
    """
    return _stage_variant(problem, start, end, j)[0] in (_OFFLOAD, _BOTH)


def stage_time(problem: PartitionProblem, start: int, end: int, j: int) -> float:
    """Seconds per microbatch of the stage holding units ``[start, end)`` on position j.

    Args:
        problem: The partitioning problem.
        start: First unit of the stage.
        end: One past the last unit of the stage.
        j: Device position the stage runs on.

    Returns:
        The units' compute time on position j (plus one more forward when the stage
        recomputes, see `stage_recompute`; each unit at least its weights' copy time when
        the stage offloads, see `stage_offload`) plus the time to send the boundary after
        unit ``end - 1`` to position j+1; there is no outgoing boundary for the last
        position or for a stage that ends the model.

    Raises:
        PlanError: If the range is empty or out of bounds, or j is not a position.
    """
    return _stage_variant(problem, start, end, j)[1]


def stage_memory(problem: PartitionProblem, start: int, end: int, j: int) -> float:
    """Bytes the stage holding units ``[start, end)`` needs on position j.

    ``static + inflight[j] * (activations + bytes_in + bytes_out)``: static state lives
    once, while activations and both boundary buffers exist once per microbatch in flight.
    A recomputing stage (`stage_recompute`) keeps only the boundary buffers per microbatch
    in flight, plus one microbatch's activations while it runs that microbatch's backward:
    ``static + inflight[j] * (bytes_in + bytes_out) + activations``. An offloading stage
    (`stage_offload`) keeps its static state on the host and two units' weights on the
    device: ``weight_buffer + inflight[j] * (activations + bytes_in + bytes_out)``.
    A training stage adds its worst backward transient in every case.

    Args:
        problem: The partitioning problem.
        start: First unit of the stage.
        end: One past the last unit of the stage.
        j: Device position the stage runs on.

    Returns:
        The stage's peak memory in bytes under the caller's in-flight count.

    Raises:
        PlanError: If the range is empty or out of bounds, or j is not a position.
    """
    return _stage_variant(problem, start, end, j)[2]


def evaluate_partition(
    problem: PartitionProblem,
    bounds: Sequence[tuple[int, int]],
    method: str = "given",
) -> Partition:
    """Check a partition's shape and evaluate its stage times and memory.

    Args:
        problem: The partitioning problem.
        bounds: One ``(start, end)`` pair per device position, half-open, contiguous,
            non-empty and covering all units.
        method: Recorded in the result ("given" for a user's own split).

    Returns:
        The evaluated `Partition`; ``fits`` tells whether every stage is within memory.

    Raises:
        PlanError: If there is not one stage per device, or the stages are not
            non-empty, contiguous and covering ``0..n``.
    """
    n, p = problem.n, problem.p
    try:
        bounds = tuple((int(s), int(e)) for s, e in bounds)
    except (TypeError, ValueError):
        raise PlanError(
            f"partition bounds must be (start, end) pairs of ints, got {bounds!r}"
        ) from None
    if len(bounds) != p:
        raise PlanError(
            f"a partition needs exactly one stage per device: {p} devices but {len(bounds)} "
            f"stages in {list(bounds)}"
        )
    expected_start = 0
    for j, (s, e) in enumerate(bounds):
        if s != expected_start:
            raise PlanError(
                f"stage {j} starts at unit {s} but must start at {expected_start}: stages must "
                f"be contiguous and cover units 0..{n} (bounds {list(bounds)})"
            )
        if e <= s:
            raise PlanError(f"stage {j} [{s}, {e}) is empty: every stage needs at least one unit")
        expected_start = e
    if expected_start != n:
        raise PlanError(
            f"the stages end at unit {expected_start} but the model has {n} units "
            f"(bounds {list(bounds)})"
        )
    chosen = [_stage_variant(problem, s, e, j) for j, (s, e) in enumerate(bounds)]
    times = tuple(t for _, t, _ in chosen)
    mems = tuple(m for _, _, m in chosen)
    fits = all(m <= cap for m, cap in zip(mems, problem.device_memory))
    return Partition(
        bounds=bounds,
        stage_time=times,
        stage_memory=mems,
        bottleneck=max(times),
        method=method,
        fits=fits,
        recompute=tuple(v in (_RECOMPUTE, _BOTH) for v, _, _ in chosen) if problem.recompute != "off" else (),
        offload=tuple(v in (_OFFLOAD, _BOTH) for v, _, _ in chosen) if problem.offload != "off" else (),
    )


# --------------------------------------------------------------------------------------
# The exact DP
# --------------------------------------------------------------------------------------


def _check_enough_units(problem: PartitionProblem) -> None:
    if problem.n < problem.p:
        raise PlanError(
            f"the model has {problem.n} units but {problem.p} devices were given; "
            f"use at most {problem.n} devices, or finer units"
        )


def _back(a: np.ndarray, end: int, first: int) -> np.ndarray:
    """Rows end-1 down to `first` of `a` (the order every segment sum accumulates in)."""
    return a[end - 1 : first - 1 : -1] if first > 0 else a[end - 1 :: -1]


def _transients(transient: np.ndarray, act: np.ndarray, end: int, split: bool, first: int = 0) -> np.ndarray:
    """`stage_transient` of [s, end) for every start first <= s < end, same operations in the
    same order (the values do not depend on `first`: it only leaves out earlier starts)."""
    if transient.size == 0:
        return np.zeros(end - first, dtype=np.float64)
    rev = _back(transient, end, first)
    if split:
        return np.maximum.accumulate(rev)[::-1]
    after = np.zeros(end - first, dtype=np.float64)  # activations of the units after u, summed from end-1 down
    after[1:] = np.add.accumulate(act[end - 1 : first : -1])
    return np.maximum(np.maximum.accumulate(rev - after), 0.0)[::-1]


def _replica_rows(replicas: Sequence[tuple[float, Sequence[int]]], end: int, first: int) -> np.ndarray:
    """`replica_bytes` of [s, end) for every start first <= s < end, same additions in the
    same order: a shared tensor counts for starts after its first reader up to its last
    reader before `end`."""
    out = np.zeros(end - first, dtype=np.float64)
    for b, units in replicas:
        k = bisect.bisect_left(units, end) - 1  # the last reader before end
        if k < 1:
            continue  # no reader in [0, end) after the first one
        lo, hi = max(units[0] + 1, first), units[k] + 1
        if lo < hi:
            out[lo - first : hi - first] += b
    return out


def _stage_tables(problem: PartitionProblem,
                  first: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(end, time, memory)`` for end = 1..n; arrays are (end, p), row = start.

    Row s, column j holds the time / memory of the stage [s, end) on position j, computed
    with the same operation order as `stage_time` / `stage_memory`; each entry is already
    the variant `_choose` picks (plain, recomputing or offloading).

    With `first` (indexed by end, `_first_starts`), only starts first[end]..end-1 are
    computed: the arrays are (end - first[end], p), row = start - first[end], and their
    values are bit-identical to the same rows of the full tables (every sum accumulates
    from end-1 down, so leaving out earlier starts changes no partial sum).
    """
    n, p = problem.n, problem.p
    unit_time = np.asarray(problem.unit_time, dtype=np.float64).reshape(n, p)
    btime = np.zeros((n, p), dtype=np.float64)  # row end-1; row n-1 and column p-1 stay 0
    if n > 1 and p > 1:
        btime[: n - 1, : p - 1] = np.asarray(problem.boundary_time, dtype=np.float64)
    static = np.asarray(problem.unit_static_bytes, dtype=np.float64)
    act = np.asarray(problem.unit_activation_bytes, dtype=np.float64)
    # bytes_in[s] is the boundary entering a stage that starts at s (none for s = 0).
    bytes_in = np.zeros(n, dtype=np.float64)
    bytes_in[1:] = np.asarray(problem.boundary_bytes, dtype=np.float64)
    inflight = np.asarray(problem.inflight, dtype=np.float64)
    caps = np.asarray(problem.device_memory, dtype=np.float64)[None, :]
    mode = problem.recompute
    rc_time = (np.asarray(problem.unit_recompute_time, dtype=np.float64).reshape(n, p)
               if problem.unit_recompute_time else np.zeros((n, p), dtype=np.float64))
    transient = np.asarray(problem.unit_transient_bytes, dtype=np.float64)
    offload = problem.offload
    if offload != "off":
        off_time = np.asarray(problem.unit_offload_time, dtype=np.float64).reshape(n, p)
        params = np.asarray(problem.unit_param_bytes, dtype=np.float64)
        # nxt[u]: the next unit after u with weights (n if none): `weight_buffer`'s pairs
        nxt = np.full(n, n, dtype=np.int64)
        for u in range(n - 2, -1, -1):
            nxt[u] = u + 1 if params[u + 1] > 0 else nxt[u + 1]
        shared = np.asarray(problem.host_memory_is_device or (False,) * p, dtype=bool)[None, :]
        host_caps = np.asarray(problem.host_memory, dtype=np.float64)[None, :] if problem.host_memory else None
    combines = _combines(problem)
    if combines:
        chk = np.asarray(_checkpoint_bytes(problem), dtype=np.float64)
        rc_peak = np.asarray(problem.unit_recompute_peak, dtype=np.float64)
    alternatives = _alternatives(problem)
    base = _base(problem)
    for end in range(1, n + 1):
        f = 0 if first is None else int(first[end])
        # Sums over [s, end) for every s, accumulated from end-1 backwards like the helpers.
        seg_time = np.add.accumulate(_back(unit_time, end, f), axis=0)[::-1]
        seg_static = np.add.accumulate(_back(static, end, f))[::-1]
        if problem.replicas:  # tied weights: replicas held by stages after their first reader's
            seg_static = seg_static + _replica_rows(problem.replicas, end, f)
        seg_act = np.add.accumulate(_back(act, end, f))[::-1]
        if end < n:
            time = seg_time + btime[end - 1]
            bytes_out = problem.boundary_bytes[end - 1]
        else:
            time = seg_time  # the model's end: no outgoing boundary on any position
            bytes_out = 0.0
        per_mb = (seg_act + bytes_in[f:end]) + bytes_out
        tr = _transients(transient, act, end, problem.split_backward, f)[:, None]
        memory = (seg_static[:, None] + inflight[None, :] * per_mb[:, None]) + tr
        if (mode == "off" and offload == "off") or (mode != "on" and offload != "on" and (memory <= caps).all()):
            yield end, time, memory  # no alternative, or plain fits everywhere (then `_choose` keeps it)
            continue
        variants: list = [(time, memory), None, None, None]
        if mode != "off":
            seg_rc = np.add.accumulate(_back(rc_time, end, f), axis=0)[::-1]
            time_rc = seg_time + seg_rc
            if end < n:
                time_rc = time_rc + btime[end - 1]
            per_mb_rc = bytes_in[f:end] + bytes_out
            memory_rc = ((seg_static[:, None] + inflight[None, :] * per_mb_rc[:, None]) + seg_act[:, None]) + tr
            variants[_RECOMPUTE] = (time_rc, memory_rc)
        if offload != "off":
            seg_off = np.add.accumulate(_back(off_time, end, f), axis=0)[::-1]
            time_off = seg_off
            if end < n:
                time_off = time_off + btime[end - 1]
            # pairs[u]: unit u and the next weighted unit of the stage resident at once
            follow = nxt[f:end]
            pairs = params[f:end] + np.where(follow < end, params[np.minimum(follow, n - 1)], 0.0)
            held = np.maximum.accumulate(pairs[::-1])[::-1][:, None]
            held = np.where(shared, seg_static[:, None] + held, held)
            memory_off = (held + inflight[None, :] * per_mb[:, None]) + tr
            if combines:  # streamed and recomputed per unit: `_variants`' formula, same order
                time_both = seg_off + seg_rc
                if end < n:
                    time_both = time_both + btime[end - 1]
                kept = np.add.accumulate(_back(chk, end, f))[::-1]
                peak = np.maximum.accumulate(_back(rc_peak, end, f))[::-1]
                tr_max = _transients(transient, act, end, True, f)[:, None]
                memory_both = ((held + inflight[None, :] * (bytes_in[f:end] + kept)[:, None]) + peak[:, None]) + tr_max
            if host_caps is not None:  # static state beyond its share of host memory: not available
                host_ok = seg_static[:, None] <= host_caps
                time_off = np.where(host_ok, time_off, np.inf)
                memory_off = np.where(host_ok, memory_off, np.inf)
                if combines:
                    time_both = np.where(host_ok, time_both, np.inf)
                    memory_both = np.where(host_ok, memory_both, np.inf)
            variants[_OFFLOAD] = (time_off, memory_off)
            if combines:
                variants[_BOTH] = (time_both, memory_both)
            if not alternatives:  # offload "on" with nothing to fall back on
                yield end, variants[base][0], variants[base][1]
                continue
        yield (end, *_choose_arrays(variants, base, alternatives, caps))


def _choose_arrays(variants: list, base: int, alternatives: list[int],
                   caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_choose` on whole (start, position) arrays: same comparisons, same tie-breaks."""
    base_t, base_m = variants[base]
    best_t = np.full(base_t.shape, np.inf)
    best_m = np.full(base_t.shape, np.inf)
    found = np.zeros(base_t.shape, dtype=bool)
    least_t, least_m = base_t, base_m
    for v in alternatives:
        t, m = variants[v]
        fits = m <= caps
        take = fits & (~found | (t < best_t))  # strictly faster: the earlier one keeps ties
        best_t, best_m = np.where(take, t, best_t), np.where(take, m, best_m)
        found |= fits
        less = m < least_m
        least_t, least_m = np.where(less, t, least_t), np.where(less, m, least_m)
    fits_base = base_m <= caps
    time = np.where(fits_base, base_t, np.where(found, best_t, least_t))
    memory = np.where(fits_base, base_m, np.where(found, best_m, least_m))
    return time, memory


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
        raise PlanError(_infeasible_message(problem))

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
# Infeasibility report
# --------------------------------------------------------------------------------------


def _gib(x: float) -> str:
    text = f"{x / _GiB:.2f} GiB"
    if 0 < abs(x) < 0.005 * _GiB:  # would print as 0.00 GiB: show the bytes too
        text += f" ({x:.0f} bytes)"
    return text


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


def _device_summary(problem: PartitionProblem) -> str:
    """Each device's memory, consecutive equal capacities merged so 64 GPUs stay one line."""
    names, caps = problem.device_names, problem.device_memory
    if all(c == caps[0] for c in caps):
        if len(caps) == 1:
            return f"Device {names[0]} has {_gib(caps[0])}."
        return f"Each of the {len(caps)} devices has {_gib(caps[0])}."
    runs: list[tuple[int, int]] = []  # [first, last] positions with equal capacity
    for j in range(len(caps)):
        if runs and caps[runs[-1][1]] == caps[j]:
            runs[-1] = (runs[-1][0], j)
        else:
            runs.append((j, j))
    parts = [
        f"{names[a]} {_gib(caps[a])}" if a == b else f"{names[a]}..{names[b]} {_gib(caps[a])} each"
        for a, b in runs
    ]
    return "Devices have: " + ", ".join(parts) + "."


_MAX_STAGES_LISTED = 3
_MAX_BOUNDS_LISTED = 8


def _infeasible_message(problem: PartitionProblem) -> str:
    n, p = problem.n, problem.p
    caps = problem.device_memory
    names = problem.unit_names
    closest = _closest_partition(problem)
    over = [
        (need - caps[j], j)
        for j, need in enumerate(closest.stage_memory)
        if need > caps[j]
    ]
    over.sort(key=lambda t: (-t[0], t[1]))
    lines = [
        f"no partition of the {n} units onto the {p} devices fits in memory (each stage needs "
        f"params + grads + optimizer state + microbatches in flight x (activations + boundary "
        f"buffers) <= its device's memory).",
        # Spell the bounds out only while they stay readable.
        "The closest partition"
        + (f" {list(closest.bounds)}" if p <= _MAX_BOUNDS_LISTED else "")
        + f" (smallest worst shortfall) still overflows on {len(over)} of {p} devices:",
    ]
    for short, j in over[:_MAX_STAGES_LISTED]:
        s, e = closest.bounds[j]
        need = closest.stage_memory[j]
        static = _segment_sum(problem.unit_static_bytes, s, e) + replica_bytes(problem.replicas, s, e)
        per_mb = (
            _segment_sum(problem.unit_activation_bytes, s, e)
            + (problem.boundary_bytes[s - 1] if s > 0 else 0.0)
            + (problem.boundary_bytes[e - 1] if e < n else 0.0)
        )
        units = names[s] if e - s == 1 else f"{names[s]}..{names[e - 1]}"
        if closest.recompute and closest.recompute[j] and closest.offload and closest.offload[j]:
            kept = (problem.boundary_bytes[s - 1] if s > 0 else 0.0) + _segment_sum(_checkpoint_bytes(problem), s, e)
            parts = (f"weights streamed from host memory, recomputed unit by unit: "
                     f"{_gib(weight_buffer(problem.unit_param_bytes, s, e))} double buffer + {problem.inflight[j]} in "
                     f"flight x {_gib(kept)} unit inputs and boundaries + "
                     f"{_gib(max(problem.unit_recompute_peak[s:e]))} activations of the unit being recomputed")
        elif closest.recompute and closest.recompute[j]:
            act = _segment_sum(problem.unit_activation_bytes, s, e)
            parts = (f"static {_gib(static)} + {problem.inflight[j]} in flight x {_gib(per_mb - act)} boundaries "
                     f"+ {_gib(act)} activations of the microbatch being recomputed")
        elif closest.offload and closest.offload[j]:
            parts = (f"weights streamed from host memory: {_gib(weight_buffer(problem.unit_param_bytes, s, e))} "
                     f"double buffer + {problem.inflight[j]} in flight x {_gib(per_mb)} activations and boundaries")
        else:
            parts = (f"static {_gib(static)} + {problem.inflight[j]} in flight x "
                     f"{_gib(per_mb)} activations and boundaries")
        lines.append(
            f"  stage {j} (units {s}-{e - 1}: {units}) on {problem.device_names[j]} needs "
            f"{_gib(need)} ({parts}) but the device has {_gib(caps[j])}: {_gib(short)} short"
        )
    if len(over) > _MAX_STAGES_LISTED:
        lines.append(
            f"  ... and {len(over) - _MAX_STAGES_LISTED} more stages over their device's memory"
        )
    lines.append(_device_summary(problem))

    # Which remedy can work depends on what overflows: static state only shrinks with more
    # (or bigger) devices; activations also shrink with recomputation or smaller microbatches.
    total_static = math.fsum(problem.unit_static_bytes)
    total_memory = math.fsum(caps)
    largest = max(caps)
    heaviest = max(range(n), key=lambda u: (problem.unit_static_bytes[u], -u))
    heaviest_static = problem.unit_static_bytes[heaviest]
    # streaming weights from host memory (offload) takes the static state off the device; worth
    # suggesting wherever a device's host memory is not its own (not on CPUs)
    can_offload = not all(problem.host_memory_is_device) if problem.host_memory_is_device else True
    offload_fix = ("; or stream weights from host memory with offload='auto' (params, grads and optimizer "
                   "state stay on the host, each unit's weights are copied in while the previous unit computes, "
                   "at the cost of host-link time)" if problem.offload == "off" and can_offload else "")
    if problem.offload != "off" and any(closest.offload):
        held = weight_buffer(problem.unit_param_bytes, 0, n)  # the largest double buffer of any stage
        fix = (
            f"even with weights streamed from host memory a device holds two consecutive units' weights (and in "
            f"training their weight gradients; up to {_gib(held)}) plus its activations and boundary buffers: use "
            + ("activation recomputation (recompute='auto'), " if problem.recompute == "off" else "")
            + "finer units (split the largest blocks), more microbatches (fewer bytes per microbatch), more "
            "devices, or devices with more memory"
        )
    elif heaviest_static > largest:
        fix = (
            f"unit {names[heaviest]!r} alone holds {_gib(heaviest_static)} of params, grads and "
            f"optimizer state, more than the largest device ({_gib(largest)}), so more devices "
            f"cannot help: use devices with more memory, finer units (split that block), or a "
            f"lighter optimizer / lower precision"
        )
    elif total_static > total_memory:
        fix = (
            f"params, grads and optimizer state alone total {_gib(total_static)} but the {p} "
            f"devices hold {_gib(total_memory)} together: use more devices (at least "
            f"{math.ceil(total_static / largest)} of {_gib(largest)}) or devices with more "
            f"memory; recomputation and more microbatches do not shrink this part"
        )
    else:
        fix = (
            f"params, grads and optimizer state total {_gib(total_static)} of the "
            f"{_gib(total_memory)} all devices hold, so activations and boundary buffers "
            f"overflow: use "
            + ("activation recomputation (recompute=True or 'auto'), " if problem.recompute == "off" else "")
            + "more microbatches (fewer bytes per "
            "microbatch), a schedule with fewer microbatches in flight (1F1B instead of "
            "GPipe), more devices, or devices with more memory"
        )
    lines.append("To make it fit: " + fix + offload_fix + ".")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------


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
