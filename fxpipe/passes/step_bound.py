"""A lower bound on a schedule's simulated step time from unit costs alone (no partition).

Auto mode plans every (schedule, microbatches) candidate, and planning one (placement, exact
partition, simulation) is the expensive part. A candidate whose bound already exceeds the best
step planned so far cannot win, so `_plan_auto` plans candidates in the order of their bounds
and skips those. The bound holds for any cut, any device order and any per-stage choice of
recompute or offload (both only add time), and for the simulator's semantics: one compute lane
per device, an instruction waits for the values it receives.

Take m microbatches and S stages, stage k taking t_k per microbatch (forward + backward) on
its device. Stage k's first instruction waits for the first microbatch's forward through
stages 0..k-1 (``F_<k``); its 2m instructions then take ``m t_k`` on its device, whatever
else that device runs in between. With a full backward (GPipe, 1F1B, interleaved) stage k's
last instruction is a backward whose gradient must still cross stages k-1..0, so the step is
at least ``P_k + m t_k``, ``P_k`` the time of stages 0..k-1; with a split one (ZB-H1) the last
may be a weight gradient, and ``F_<k >= alpha P_k`` (alpha: the smallest forward share of any
unit) is all that is left; forward-only, t is the forward and alpha = 1. Requiring
``alpha P_k + m t_k <= X`` for every k while S stages cover all the work ``T`` gives

    X >= alpha T / (1 - (1 - alpha / m) ** S)

(stages as large as the constraint allows are best: the recurrence for P_{k+1} grows with
P_k). Also X >= m T / p (the busiest of p devices) and X >= the first microbatch's chain (T,
or the forwards only when the backward is split). T sums each unit's cheapest time over the
cluster's devices.

Example:
    >>> # 8 units of 1 + 2 ms on 4 devices; 1F1B with 2 units a stage takes (m + p - 1) 6 = 42
    >>> round(step_lower_bound("1f1b", 4, 4, fwd=[1.0] * 8, total=[3.0] * 8), 2)
    35.11
"""

from __future__ import annotations

import math
from typing import Sequence

from fxpipe.compiler.cluster import Device
from fxpipe.passes.annotate_costs import CostTable, device_unit_times

__all__ = ["step_lower_bound", "costs_step_lower_bound"]


def step_lower_bound(kind: str, microbatches: int, n_devices: int, fwd: Sequence[float],
                     total: Sequence[float], n_stages: int | None = None) -> float:
    """Seconds no plan of schedule `kind` with `microbatches` on `n_devices` (and `n_stages`
    stages, default one per device) can beat; see the module docstring.

    `fwd[u]` / `total[u]`: unit u's cheapest forward / forward + backward time per microbatch
    over the devices (`total` is `fwd` and `kind` is "forward" for inference). A kind other
    than gpipe, 1f1b, interleaved, zb-h1 or forward (a schedule from a file) gets only the
    busiest-device and forward-chain bounds.
    """
    m, p = int(microbatches), int(n_devices)
    stages = p if n_stages is None else int(n_stages)
    work = math.fsum(total)
    if m < 1 or p < 1 or stages < 1 or work <= 0.0:
        return 0.0
    device = m * work / p
    if kind in ("gpipe", "1f1b", "interleaved", "forward"):
        alpha, chain = 1.0, work
    elif kind == "zb-h1":
        shares = [f / t for f, t in zip(fwd, total) if t > 0.0]
        alpha, chain = (min(shares) if shares else 0.0), math.fsum(fwd)
    else:
        return max(device, math.fsum(fwd))
    if alpha <= 0.0:
        return max(device, chain)
    covered = -math.expm1(stages * math.log1p(-alpha / m)) if alpha < m else 1.0  # 1 - (1 - alpha/m)^S
    return max(device, chain, alpha * work / covered)


def costs_step_lower_bound(costs: CostTable, devices: Sequence[Device], kind: str, microbatches: int,
                           train: bool, n_stages: int | None = None) -> float:
    """`step_lower_bound` of a cost table (at the candidate's microbatch size) on `devices`:
    each unit at its cheapest device's time."""
    fwd = [min(r) for r in device_unit_times(costs, devices, False)]
    tot = [min(r) for r in device_unit_times(costs, devices, True)] if train else fwd
    return step_lower_bound(kind if train else "forward", microbatches, len(devices), fwd, tot, n_stages)
