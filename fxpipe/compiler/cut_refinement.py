"""Choosing among cuts by their simulated step, beyond the bottleneck the partitioner
minimises: the device order among those tied on the bottleneck (`_step_among_tied_orders`),
and hill-climbing single cuts from the best simulated one (`_refine_cut`).

Separate from `pipeline.py`: `_plan_one` calls each once, after the partition; both are
searches that simulate many candidate cuts, not passes. The `_` names are private to
fxpipe.compiler.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

from fxpipe.compiler.cluster import Cluster
from fxpipe.compiler.stage_pricing import _simulate, _stage_plans
from fxpipe.passes.annotate_costs import CostTable
from fxpipe.passes.emit_schedule import Schedule
from fxpipe.passes.partition_stages import (Partition, PartitionProblem, evaluate_partition, optimal_bottleneck,
                                            partition_stages)
from fxpipe.passes.place_stages import Placement, class_orders, device_classes

__all__ = ["_TIED_ORDERS", "_step_among_tied_orders", "_refine_cut"]

_TIED_ORDERS = 128  # distinct device orders up to which orders tied on the bottleneck are simulated


def _step_among_tied_orders(placement: Placement, make_problem: Callable[[Sequence[int]], PartitionProblem],
                            cluster: Cluster, sched: Schedule, costs: CostTable, stage_device: Sequence[int],
                            train: bool, inflight: Sequence[int]) -> Placement:
    """Of the device orders with the chosen order's bottleneck (what placement compares, ties
    going to the order listed), the one whose optimal cut simulates to the shortest step.

    Where the slower devices sit changes the fill and drain, which the bottleneck does not
    see: Llama-2-7B on 4 H100 + 4 L4, 1F1B, m=16 predicted 5953 ms listed 'h100*4,l4*4' and
    6245 ms listed 'l4*4,h100*4'. Only for clusters with at most `_TIED_ORDERS` distinct
    orders (one bounded DP per order, one more DP and a simulation per tied one)."""
    orders = list(itertools.islice(class_orders(device_classes(cluster)), _TIED_ORDERS + 1))
    if not 1 < len(orders) <= _TIED_ORDERS:
        return placement
    best_b = placement.partition.bottleneck

    def step(order: Sequence[int], part: Partition) -> float:
        sub = cluster.subset(order)
        return _simulate(sched, _stage_plans(part, costs, sub, stage_device, train, inflight), costs, sub).step_time

    best = (step(placement.order, placement.partition), placement.order, placement.problem, placement.partition)
    for order in orders:
        if order == placement.order:
            continue
        prob = make_problem(order)
        if not optimal_bottleneck(prob) <= best_b * (1 + 1e-12):
            continue
        t_part = partition_stages(prob, bottleneck=best_b)
        t = step(order, t_part)
        if t < best[0] * (1 - 1e-9):
            best = (t, order, prob, t_part)
    if best[1] == placement.order:
        return placement
    others = ((placement.order, best_b),) + tuple((o, b) for o, b in placement.runner_ups if o != best[1])
    return dataclasses.replace(placement, order=best[1], problem=best[2], partition=best[3],
                               runner_ups=others[:len(placement.runner_ups) or 1])


def _refine_cut(problem: PartitionProblem, best: tuple, sched: Schedule, costs: CostTable, cluster: Cluster,
                stage_device: Sequence[int], train: bool, inflight: Sequence[int], budget: int) -> tuple[tuple, int]:
    """Hill-climb from the best simulated cut: move one cut by one unit (by 2 or 3 only when
    no one-unit move helps: units without work make plateaus), keep the first move that fits
    and predicts a shorter step, until no move helps or `budget` simulations are spent.
    Returns ((partition, stages, timeline), simulations)."""
    part, stages, tl = best
    p, n, spent = len(part.bounds), problem.n, 0
    size = 1
    while size <= 3 and spent < budget:
        improved = False
        for k in range(p - 2, -1, -1):  # cut after stage k, from the last one back
            for delta in (size, -size):
                cuts = [e for _, e in part.bounds[:-1]]
                cuts[k] += delta
                lo = cuts[k - 1] if k else 0
                hi = cuts[k + 1] if k + 1 < len(cuts) else n
                if not lo < cuts[k] < hi or spent >= budget:
                    continue
                c = evaluate_partition(problem, tuple(zip([0] + cuts, cuts + [n])), method=part.method)
                if not c.fits:
                    continue
                spent += 1
                st_c = _stage_plans(c, costs, cluster, stage_device, train, inflight)
                tl_c = _simulate(sched, st_c, costs, cluster)
                if tl_c.step_time < tl.step_time * (1 - 1e-9):
                    part, stages, tl, improved = c, st_c, tl_c, True
                    break
            if improved:
                break
        size = 1 if improved else size + 1
    return (part, stages, tl), spent
