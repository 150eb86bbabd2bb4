"""The per-stage model (`stage_variants`) over whole arrays: for each end, every start's
time and memory on every position, the variant already chosen.

The min-max DP (`partition_stages`) and placement's bounds read these tables; they are
separate from the scalar model because they are the DP's hot path (numpy over starts and
positions), written to give bit-identical values to `stage_time` / `stage_memory` (same
operations in the same order), which is what the tests check.
"""

from __future__ import annotations

import bisect
from typing import Iterator, Sequence

import numpy as np

from fxpipe.passes.partition_problem import PartitionProblem
from fxpipe.passes.stage_variants import (_BOTH, _OFFLOAD, _RECOMPUTE, _alternatives, _base, _checkpoint_bytes,
                                          _combines)

__all__: list[str] = []  # private to the partitioner: `_stage_tables` and its helpers


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

