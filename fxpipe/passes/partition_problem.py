"""The partitioner's IR: a partition problem (units, positions, costs, memory) and its result.

`passes/partition_stages.py` solves a `PartitionProblem` and returns a `Partition`;
`compiler/stage_pricing.py` builds the problem from a cost table and a device order.
Validation happens once here, so the solver and its helpers index without checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fxpipe.errors import PlanError

__all__ = ["PartitionProblem", "Partition", "RECOMPUTE_MODES", "OFFLOAD_MODES", "replica_bytes"]

RECOMPUTE_MODES = ("off", "on", "auto")
OFFLOAD_MODES = ("off", "on", "auto")


# --------------------------------------------------------------------------------------
# Problem and result
# --------------------------------------------------------------------------------------


def _as_floats(name: str, values: Sequence[float], *, allow_inf: bool = False) -> tuple[float, ...]:
    """Coerce to a tuple of non-negative floats, naming the field and index on failure."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise PlanError(f"PartitionProblem.{name} must hold numbers: {exc}") from None
    for i, v in enumerate(out):
        # NaN compares false with everything and would silently poison the DP's min/max.
        if math.isnan(v) or v < 0 or (math.isinf(v) and not allow_inf):
            allowed = (
                "a non-negative number (inf allowed)" if allow_inf
                else "a finite non-negative number"
            )
            raise PlanError(f"PartitionProblem.{name}[{i}] must be {allowed}, got {v!r}")
    return out


def _as_matrix(name: str, rows: Sequence[Sequence[float]], n_rows: int, n_cols: int,
               shape_text: str) -> tuple[tuple[float, ...], ...]:
    """Coerce to an n_rows x n_cols tuple-of-tuples of finite non-negative floats."""
    # the common case checked at once (a 64-GPU problem has ~10^5 entries); any failure is
    # reported by the entry-by-entry path below, which names the offending entry
    try:
        a = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError):
        a = None
    if a is not None and a.shape == (n_rows, n_cols) and bool(np.isfinite(a).all()) and bool((a >= 0).all()):
        return tuple(map(tuple, a.tolist()))
    rows = tuple(rows)
    if len(rows) != n_rows:
        raise PlanError(
            f"PartitionProblem.{name} must be {shape_text} = {n_rows} rows, got {len(rows)} rows"
        )
    out = []
    for i, row in enumerate(rows):
        row = _as_floats(f"{name}[{i}]", row)
        if len(row) != n_cols:
            raise PlanError(
                f"PartitionProblem.{name}[{i}] must have {n_cols} entries ({shape_text}), "
                f"got {len(row)}"
            )
        out.append(row)
    return tuple(out)


@dataclass(frozen=True)
class PartitionProblem:
    """Everything the partitioner needs, already reduced to numbers per unit and position.

    n is the number of units and p the number of device positions (stage j runs on
    position j). Lists are accepted and stored as tuples so that problems are hashable.

    Attributes:
        unit_names: n unit names, for messages.
        unit_time: n x p; seconds unit u takes on position j per microbatch (forward and
            backward already summed by the caller).
        boundary_time: (n-1) x (p-1); seconds to move the boundary after unit k over the
            link from position j to j+1 per microbatch (both directions already included).
        unit_static_bytes: n; parameters + gradients + optimizer state of each unit.
        unit_activation_bytes: n; activation bytes one in-flight microbatch keeps alive.
        boundary_bytes: n-1; bytes of the boundary after unit k, per microbatch.
        inflight: p; microbatches whose activations are alive at once on position j
            (schedule-dependent: GPipe keeps m, 1F1B keeps p - j).
        device_memory: p; bytes available on position j (``math.inf`` means unbounded).
        device_names: p; device names, for messages.
        unit_recompute_time: n x p (or empty); extra seconds per microbatch unit u costs on
            position j when its stage recomputes (one more forward). Empty: recomputation
            is not available and `recompute` must be "off".
        recompute: "off" (keep activations), "on" (every stage recomputes) or "auto" (a
            stage recomputes only where keeping its activations would not fit).
        unit_transient_bytes: n (or empty: none); gradients alive while unit u runs its
            backward, on top of saved activations (`annotate_costs.stage_transient`): a stage
            needs its worst one once, while it runs one microbatch's backward.
        split_backward: the schedule splits backward into BI and BW (zero bubble): BI keeps
            every saved tensor, so a unit's transient adds in full.
        unit_param_bytes: n (or empty); bytes one unit of an offloaded stage holds on the
            device while resident: its weights, and in training also its weight gradients on
            their way back to the host (the runtime keeps at most two units' of each in
            flight); double-buffered on the device (`weight_buffer`).
        unit_offload_time: n x p (or empty); seconds per microbatch unit u takes on position
            j when its stage streams its weights (replaces unit_time for that stage; never
            less than it, since the copy at best hides behind the compute).
        offload: "off", "on" (every stage offloads) or "auto" (a stage offloads only where
            nothing cheaper fits and offloading does). Not with ``split_backward``.
        unit_cut_bytes: n (or empty: offloading never combines with recomputation); bytes a
            stage that both offloads and recomputes keeps per microbatch inside unit u (the
            runtime checkpoints each streamed unit; `annotate_costs.cut_bytes`), on top of
            the boundaries between its units.
        unit_recompute_peak: n (given with unit_cut_bytes); activation bytes of the largest
            streamed unit the runtime may form around unit u: such a stage rebuilds one
            streamed unit's activations at a time in backward.
        host_memory_is_device: p bools (or empty: none); True where the host memory the
            weights would move to is the device's own memory (a CPU): offloading there
            frees nothing, so its static state still counts.
        replicas: per tensor read by several units (tied weights), ``(bytes, units)``: the
            bytes a replica of it holds (weight, and in training its gradient and optimizer
            state) and the units reading it, ascending. A stage that reads it but does not
            hold its first reader keeps a replica (`replica_bytes`), counted with its static
            state (on the host when the stage offloads).
        host_memory: p (or empty: unbounded); bytes of host memory an offloaded stage on
            position j may keep there (its static state and replicas); an offloaded variant
            over it is not available. The caller divides a node's host memory among the
            positions sharing it, so any choice of offloaded stages fits together.
    """

    unit_names: tuple[str, ...]
    unit_time: tuple[tuple[float, ...], ...]
    boundary_time: tuple[tuple[float, ...], ...]
    unit_static_bytes: tuple[float, ...]
    unit_activation_bytes: tuple[float, ...]
    boundary_bytes: tuple[float, ...]
    inflight: tuple[int, ...]
    device_memory: tuple[float, ...]
    device_names: tuple[str, ...]
    unit_recompute_time: tuple[tuple[float, ...], ...] = ()
    recompute: str = "off"
    unit_transient_bytes: tuple[float, ...] = ()
    split_backward: bool = False
    unit_param_bytes: tuple[float, ...] = ()
    unit_offload_time: tuple[tuple[float, ...], ...] = ()
    offload: str = "off"
    host_memory_is_device: tuple[bool, ...] = ()
    replicas: tuple[tuple[float, tuple[int, ...]], ...] = ()
    host_memory: tuple[float, ...] = ()
    unit_cut_bytes: tuple[float, ...] = ()
    unit_recompute_peak: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        # Validate once here so that the DP and the helpers can index without checks.
        names = tuple(self.unit_names)
        devices = tuple(self.device_names)
        n, p = len(names), len(devices)
        if n == 0:
            raise PlanError("PartitionProblem needs at least one unit, got 0 unit_names")
        if p == 0:
            raise PlanError("PartitionProblem needs at least one device, got 0 device_names")
        for field_name, seq in (("unit_names", names), ("device_names", devices)):
            for i, s in enumerate(seq):
                if not isinstance(s, str):
                    raise PlanError(f"PartitionProblem.{field_name}[{i}] must be a str, got {s!r}")

        def vec(name: str, values: Sequence[float], length: int, what: str,
                allow_inf: bool = False) -> tuple[float, ...]:
            out = _as_floats(name, values, allow_inf=allow_inf)
            if len(out) != length:
                raise PlanError(
                    f"PartitionProblem.{name} must have {what} = {length} entries, got {len(out)}"
                )
            return out

        unit_time = _as_matrix("unit_time", self.unit_time, n, p, f"n x p = {n} x {p}")
        boundary_time = _as_matrix(
            "boundary_time", self.boundary_time, n - 1, p - 1, f"(n-1) x (p-1) = {n - 1} x {p - 1}"
        )
        static = vec("unit_static_bytes", self.unit_static_bytes, n, "n")
        act = vec("unit_activation_bytes", self.unit_activation_bytes, n, "n")
        bbytes = vec("boundary_bytes", self.boundary_bytes, n - 1, "n-1")
        memory = vec("device_memory", self.device_memory, p, "p", allow_inf=True)
        inflight = tuple(self.inflight)
        if len(inflight) != p:
            raise PlanError(
                f"PartitionProblem.inflight must have p = {p} entries, got {len(inflight)}"
            )
        for j, k in enumerate(inflight):
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
                raise PlanError(
                    f"PartitionProblem.inflight[{j}] must be a non-negative int "
                    f"(microbatches alive on {devices[j]!r}), got {k!r}"
                )
        inflight = tuple(int(k) for k in inflight)
        if self.recompute not in RECOMPUTE_MODES or not isinstance(self.recompute, str):
            raise PlanError(f"PartitionProblem.recompute must be one of {', '.join(map(repr, RECOMPUTE_MODES))}, "
                            f"got {self.recompute!r}")
        rc_time = tuple(self.unit_recompute_time)
        if rc_time:
            rc_time = _as_matrix("unit_recompute_time", rc_time, n, p, f"n x p = {n} x {p}")
        elif self.recompute != "off":
            raise PlanError(f"PartitionProblem.recompute={self.recompute!r} needs unit_recompute_time "
                            "(each unit's forward time per position); give it or use recompute='off'")

        transient = tuple(self.unit_transient_bytes)
        if transient:
            transient = vec("unit_transient_bytes", transient, n, "n (or none)")
        if not isinstance(self.split_backward, bool):
            raise PlanError(f"PartitionProblem.split_backward must be True or False, got {self.split_backward!r}")

        if not isinstance(self.offload, str) or self.offload not in OFFLOAD_MODES:
            raise PlanError(f"PartitionProblem.offload must be one of {', '.join(map(repr, OFFLOAD_MODES))}, "
                            f"got {self.offload!r}")
        params = tuple(self.unit_param_bytes)
        if params:
            params = vec("unit_param_bytes", params, n, "n (or none)")
        off_time = tuple(self.unit_offload_time)
        if off_time:
            off_time = _as_matrix("unit_offload_time", off_time, n, p, f"n x p = {n} x {p}")
            below = np.argwhere(np.asarray(off_time, dtype=np.float64) < np.asarray(unit_time, dtype=np.float64))
            if below.size:
                u, j = (int(x) for x in below[0])
                raise PlanError(f"PartitionProblem.unit_offload_time[{u}][{j}] = {off_time[u][j]!r} is less "
                                f"than unit_time[{u}][{j}] = {unit_time[u][j]!r}: streaming weights can at "
                                "best hide behind the compute, never speed it up")
        if self.offload != "off":
            if not params or not off_time:
                raise PlanError(f"PartitionProblem.offload={self.offload!r} needs unit_param_bytes and "
                                "unit_offload_time (each unit's weights and its time when streaming them); give "
                                "them or use offload='off'")
            if self.split_backward:
                raise PlanError(f"PartitionProblem.offload={self.offload!r} cannot be combined with split_backward "
                                "(the zero-bubble BI/BW backward would stream each unit's weights twice); use "
                                "offload='off' with it")
        cut = tuple(self.unit_cut_bytes)
        peak = tuple(self.unit_recompute_peak)
        if bool(cut) != bool(peak):
            raise PlanError("PartitionProblem.unit_cut_bytes and unit_recompute_peak go together (what a stage that "
                            "offloads and recomputes keeps); give both or neither")
        if cut:
            cut = vec("unit_cut_bytes", cut, n, "n (or none)")
            peak = vec("unit_recompute_peak", peak, n, "n (or none)")
        if self.offload == "on" and self.recompute == "on" and not cut:
            raise PlanError("PartitionProblem.offload='on' and recompute='on' ask every stage to do both, which "
                            "needs unit_cut_bytes and unit_recompute_peak (what such a stage keeps per "
                            "microbatch); give them, or choose 'auto' for one of the two")
        shared = tuple(self.host_memory_is_device)
        if shared and (len(shared) != p or not all(isinstance(x, (bool, np.bool_)) for x in shared)):
            raise PlanError(f"PartitionProblem.host_memory_is_device must be p = {p} bools (or empty), "
                            f"got {shared!r}")
        shared = tuple(bool(x) for x in shared)
        replicas = []
        for i, entry in enumerate(self.replicas):
            try:
                b, units = entry
                units = tuple(int(u) for u in units)
            except (TypeError, ValueError):
                raise PlanError(f"PartitionProblem.replicas[{i}] must be (bytes, units), got {entry!r}") from None
            (b,) = _as_floats(f"replicas[{i}].bytes", (b,))
            if len(units) < 2 or list(units) != sorted(set(units)) or not 0 <= units[0] or units[-1] >= n:
                raise PlanError(f"PartitionProblem.replicas[{i}] must name at least two distinct units in 0..{n - 1}, "
                                f"ascending, got {units!r}")
            replicas.append((b, units))
        host = tuple(self.host_memory)
        if host:
            host = vec("host_memory", host, p, "p (or none)", allow_inf=True)

        for name, value in (
            ("unit_names", names), ("unit_time", unit_time), ("boundary_time", boundary_time),
            ("unit_static_bytes", static), ("unit_activation_bytes", act),
            ("boundary_bytes", bbytes), ("inflight", inflight), ("device_memory", memory),
            ("device_names", devices), ("unit_recompute_time", rc_time), ("unit_transient_bytes", transient),
            ("unit_param_bytes", params), ("unit_offload_time", off_time), ("host_memory_is_device", shared),
            ("replicas", tuple(replicas)), ("host_memory", host), ("unit_cut_bytes", cut),
            ("unit_recompute_peak", peak),
        ):
            object.__setattr__(self, name, value)

    @property
    def n(self) -> int:
        """Number of units."""
        return len(self.unit_names)

    @property
    def p(self) -> int:
        """Number of device positions (and of stages)."""
        return len(self.device_names)


@dataclass(frozen=True)
class Partition:
    """A contiguous partition evaluated with the cost model.

    Attributes:
        bounds: per stage ``(start, end)`` unit indices, half-open; contiguous, covering
            ``0..n``, stage j on position j.
        stage_time: per stage, compute + outgoing boundary time (the last stage has none).
        stage_memory: per stage, bytes needed (see `stage_memory`).
        bottleneck: ``max(stage_time)``; the time per microbatch in steady state.
        method: how it was obtained: "optimal", "uniform", "params" or "given".
        fits: True when every stage's memory is within its device's memory.
        recompute: per stage, whether it recomputes its activations (see the module doc);
            empty when the problem's recompute mode is "off".
        offload: per stage, whether it streams its weights from host memory (see the module
            doc); empty when the problem's offload mode is "off".
    """

    bounds: tuple[tuple[int, int], ...]
    stage_time: tuple[float, ...]
    stage_memory: tuple[float, ...]
    bottleneck: float
    method: str
    fits: bool
    recompute: tuple[bool, ...] = ()
    offload: tuple[bool, ...] = ()


# --------------------------------------------------------------------------------------
# Cost of one stage
# --------------------------------------------------------------------------------------
#
# Segment sums are accumulated from the last unit of the stage backwards, one addition at a
# time. The vectorised DP accumulates in exactly the same order (np.add.accumulate is
# sequential), so the helpers and the DP produce bit-identical floats: a stage the DP
# accepts as fitting is never reported as overflowing by `evaluate_partition`, even when a
# device's memory equals a stage's need to the last byte. Summing directly, rather than
# subtracting prefix sums, also avoids cancellation when a few units dominate the total.


def replica_bytes(replicas: Sequence[tuple[float, Sequence[int]]], start: int, end: int) -> float:
    """Bytes of the replicas a stage of units ``[start, end)`` holds: one per shared tensor
    that the stage reads and an earlier stage read first (the runtime gives the first stage
    reading a tensor the original, every later one a copy). Summed in `replicas` order, as
    the DP does (`stage_tables._replica_rows`), so both give the same float."""
    acc = 0.0
    for b, units in replicas:
        if units[0] < start and any(start <= u < end for u in units):
            acc += b
    return acc
