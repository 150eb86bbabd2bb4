"""Static state that is not in a stage's unit sums: tied-weight replicas and host memory.

Two things the per-unit cost table cannot say alone:

* **Replicas.** A tensor read by units of several stages (GPT-2's `wte`, used by the embedding
  and the LM head) is the user's object in the first stage that reads it and a copy in every
  later one (`api.CompiledModel._place`); the copy's gradient is summed into the original's
  after the step. A copy holds its weight and, in training, its gradient; the distributed
  runtime's later rank also steps it with its own optimizer (`cm.parameters()` include it),
  so a replica is priced like the original: weight + gradient + optimizer state. A plan is
  the same for both runtimes, so it counts what the larger one holds.
* **Host memory.** An offloaded stage keeps its params, grads and optimizer state (and its
  replicas) in the host memory of its device's node; every offloaded stage of one node
  shares it (`cluster.host_groups`). `host_usage` adds them up per node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from fxpipe.compiler.cluster import Cluster, host_groups
from fxpipe.passes.annotate_costs import CostTable
from fxpipe.passes.partition_problem import replica_bytes

__all__ = ["HostUse", "replicas", "stage_static", "host_usage", "host_shares", "over_host_memory"]


def replicas(costs: CostTable, train: bool, factor: float) -> tuple[tuple[float, tuple[int, ...]], ...]:
    """`PartitionProblem.replicas` from a cost table: per shared tensor, what one replica
    holds (weight; in training also gradient and `factor` x optimizer state) and its readers."""
    return tuple((t.bytes + (t.trainable_bytes * (1.0 + factor) if train else 0.0), t.units) for t in costs.shared)


def stage_static(costs: CostTable, start: int, end: int, train: bool, factor: float) -> float:
    """Params + grads + optimizer state of the units [start, end), with the replicas it holds."""
    own = sum(pb + (tb * (1.0 + factor) if train else 0.0)
              for pb, tb in zip(costs.param_bytes[start:end], costs.trainable_bytes[start:end]))
    return own + replica_bytes(replicas(costs, train, factor), start, end)


@dataclass(frozen=True, slots=True)
class HostUse:
    """Host memory of one node taken by its offloaded stages (node -1: devices of unknown node)."""

    node: int
    used: float  # bytes
    capacity: float  # bytes; inf when no device of the node gives its host memory
    stages: tuple[int, ...]

    @property
    def fits(self) -> bool:
        return self.used <= self.capacity


def host_usage(stage_units: Sequence[tuple[int, int]], stage_device: Sequence[int], offload: Sequence[bool],
               costs: CostTable, cluster: Cluster, train: bool, factor: float) -> list[HostUse]:
    """Per node with offloaded stages (CPUs left out: their host is their device memory), the
    host bytes those stages keep: each one's `stage_static`."""
    out = []
    for node, (devs, cap) in sorted(host_groups(cluster.devices).items()):
        mine = [s for s, (d, off) in enumerate(zip(stage_device, offload)) if off and d in devs]
        if mine:
            used = math.fsum(stage_static(costs, *stage_units[s], train, factor) for s in mine)
            out.append(HostUse(node, used, cap, tuple(mine)))
    return out


def over_host_memory(uses: Sequence[HostUse]) -> list[HostUse]:
    """The nodes whose offloaded stages need more host memory than the node has."""
    return [u for u in uses if not u.fits]


def host_shares(devices: Sequence, stage_device: Sequence[int]) -> tuple[float, ...]:
    """Per stage position, an equal share of its node's host memory among the positions on
    that node (inf on CPUs and where unknown): if every offloaded stage stays within its share,
    they fit together, whichever stages offload. () when no node's host memory is known."""
    groups = host_groups(devices)
    where = {d: node for node, (devs, _) in groups.items() for d in devs}
    count: dict[int, int] = {}
    for d in stage_device:
        if d in where:
            count[where[d]] = count.get(where[d], 0) + 1
    out = tuple(groups[where[d]][1] / count[where[d]] if d in where else math.inf for d in stage_device)
    return out if any(math.isfinite(x) for x in out) else ()
