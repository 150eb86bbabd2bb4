"""One stage of a partition: its variants (plain, recompute, offload, both), time and memory.

`partition_stages` (the exact DP) and the baselines price a candidate stage ``[start, end)``
on position j with this model; it is separate from the DP so the model, what each variant
costs and which one a stage takes, reads on its own (the DP's vectorised form of the same
rules is `stage_tables`; the problem and result types are in partition_problem.py).

A stage's time per microbatch is its units' compute time on that device plus the time to
send its outgoing boundary over the link to position j+1. Its memory is

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
"""

from __future__ import annotations

import math
from typing import Sequence

from fxpipe.errors import PlanError
from fxpipe.passes.annotate_costs import stage_transient
from fxpipe.passes.partition_problem import Partition, PartitionProblem, replica_bytes

__all__ = [
    "weight_buffer",
    "stage_recompute",
    "stage_offload",
    "stage_time",
    "stage_memory",
    "evaluate_partition",
]


# The variants a stage can take (`_choose`); index into `_variants`' result. _BOTH: offloading
# and recomputing, one checkpoint per streamed unit (runtime/unit_recompute.py).
_PLAIN, _RECOMPUTE, _OFFLOAD, _BOTH = 0, 1, 2, 3


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


def _check_enough_units(problem: PartitionProblem) -> None:
    if problem.n < problem.p:
        raise PlanError(
            f"the model has {problem.n} units but {problem.p} devices were given; "
            f"use at most {problem.n} devices, or finer units"
        )
