"""A lower bound on a schedule's simulated step time from unit costs alone (no partition).

Auto mode plans every (schedule, microbatches) candidate, and planning one (placement, exact
partition, simulation) is the expensive part. A candidate whose bound already exceeds the best
step planned so far cannot win, so `_plan_auto` plans candidates in the order of their bounds
and skips those. The bound holds for any cut, any device order and any per-stage choice of
recompute or offload (both only add time), and for the simulator's semantics: one compute lane
per device, an instruction waits for the values it receives.

With one stage per device (GPipe, 1F1B, ZB-H1), m microbatches and stage k taking t_k per
microbatch (forward + backward) on its device, the device of stage k cannot start before the
first microbatch's forward has crossed stages 0..k-1 (``F_<k``) and then works ``m t_k``; with a
full backward (GPipe, 1F1B) its last instruction is a backward whose gradient must still cross
stages k-1..0, so the step is at least ``P_k + m t_k`` with ``P_k`` the time of stages 0..k-1;
with a split one (ZB-H1) the last instruction may be a weight gradient, and ``F_<k`` >=
``alpha P_k`` (alpha: the smallest forward share of any unit) is all that is left. Requiring
``alpha P_k + m t_k <= X`` for every k and covering all the work ``T`` with p stages gives

    X >= alpha T / (1 - (1 - alpha / m) ** p)

(stages as large as the constraint allows are best: the recurrence for P_{k+1} grows with P_k).
It is >= m T / p and, at m = 1, >= alpha T. Interleaved stages share devices, so only the
device bound ``m T / p`` and the first microbatch's forward-and-backward chain ``T`` are used.
T sums each unit's cheapest time over the cluster's devices.

Example:
    >>> round(step_lower_bound("1f1b", 4, 4, fwd=[1.0] * 8, total=[3.0] * 8), 3)  # uniform: (m + p - 1) t = 42
    35.31
"""

from __future__ import annotations

import math
from typing import Sequence

from fxpipe.compiler.cluster import Device
from fxpipe.passes.annotate_costs import CostTable, device_unit_times

__all__ = ["step_lower_bound", "costs_step_lower_bound"]


def step_lower_bound(kind: str, microbatches: int, n_devices: int, fwd: Sequence[float],
                     total: Sequence[float]) -> float:
    """Seconds no plan of schedule `kind` with `microbatches` on `n_devices` can beat.

    `fwd[u]` / `total[u]`: unit u's cheapest forward / forward + backward time per microbatch
    over the devices (`total` is `fwd` for inference). 0.0 for an unknown kind.
    """
    m, p = int(microbatches), int(n_devices)
    work = math.fsum(total)
    if m < 1 or p < 1 or work <= 0.0:
        return 0.0
    weak = max(work, m * work / p)  # the first microbatch's chain; the busiest device
    if kind in ("gpipe", "1f1b", "forward"):
        alpha = 1.0
    elif kind == "zb-h1":
        shares = [f / t for f, t in zip(fwd, total) if t > 0.0]
        alpha = min(shares) if shares else 0.0
        weak = max(math.fsum(fwd), m * work / p)  # BW leaves the backward chain off the critical path
    else:  # interleaved (several stages per device) and schedules read from files
        return weak
    if alpha <= 0.0:
        return weak
    covered = -math.expm1(p * math.log1p(-alpha / m)) if alpha < m else 1.0  # 1 - (1 - alpha/m)^p
    return max(weak, alpha * work / covered)


def costs_step_lower_bound(costs: CostTable, devices: Sequence[Device], kind: str, microbatches: int,
                           train: bool) -> float:
    """`step_lower_bound` of a cost table (at the candidate's microbatch size) on `devices`:
    each unit at its cheapest device's time."""
    fwd = [min(r) for r in device_unit_times(costs, devices, False)]
    tot = [min(r) for r in device_unit_times(costs, devices, True)] if train else fwd
    return step_lower_bound(kind if train else "forward", microbatches, len(devices), fwd, tot)
