"""Costs: per node FLOPs, bytes moved, parameter and activation bytes; per unit, time on a device.

Time of a node on a device is a roofline, max(flops / peak, bytes / bandwidth), plus the
device's per-op launch overhead; backward is priced at twice the forward (two matmuls per
forward matmul). A `CostTable` aggregates nodes into units and records, for every cut between
units, the bytes that cross it: the numbers the partitioner decides on and the plan file keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxpipe.compiler.cluster import Device
from fxpipe.passes.group_units import COMPUTE_OPS, UNIT, Units
from fxpipe.passes.propagate_shapes import FLOPS, VAL

__all__ = ["NodeCost", "CostTable", "annotate_costs", "COST", "BWD_FACTOR", "value_bytes"]

COST = "fxpipe.cost"
BWD_FACTOR = 2.0  # backward ~ 2x forward: grad wrt input and grad wrt weight


@dataclass(frozen=True, slots=True)
class NodeCost:
    flops: float
    bytes: float  # memory traffic: inputs read + output written (0 for views)
    param_bytes: float  # parameters/buffers first touched by this node
    activation_bytes: float  # output bytes kept for backward (0 for views)
    launches: int


@dataclass(frozen=True)
class CostTable:
    """Per-unit totals and per-cut boundary sizes (all per microbatch)."""

    unit_names: tuple[str, ...]
    flops: tuple[float, ...]
    bytes: tuple[float, ...]
    launches: tuple[int, ...]
    param_bytes: tuple[float, ...]
    trainable_bytes: tuple[float, ...]  # param bytes that receive gradients
    activation_bytes: tuple[float, ...]
    boundary_bytes: tuple[float, ...]  # after unit k, k = 0..n-2
    # per unit, the node-level (flops, bytes) pairs are needed for a per-device roofline;
    # we keep them compactly as two parallel tuples per unit.
    node_flops: tuple[tuple[float, ...], ...]
    node_bytes: tuple[tuple[float, ...], ...]

    def unit_time(self, u: int, dev: Device, train: bool = True) -> float:
        """Seconds unit u takes on `dev` per microbatch (forward, plus backward when training)."""
        t = sum(max(f / dev.peak_flops, b / dev.mem_bandwidth) for f, b in zip(self.node_flops[u], self.node_bytes[u]))
        t += self.launches[u] * dev.launch_overhead
        return t * (1.0 + BWD_FACTOR) if train else t

    def fwd_time(self, u: int, dev: Device) -> float:
        return self.unit_time(u, dev, train=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(map(list, v)) if k.startswith("node_") else list(v) for k, v in self.__dict__.items()}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "CostTable":
        fields = CostTable.__dataclass_fields__
        return CostTable(**{k: tuple(tuple(x) for x in d[k]) if k.startswith("node_") else tuple(d[k]) for k in fields})


def value_bytes(v: Any) -> float:
    """Bytes of the tensors in a (possibly nested) value; Python scalars count 8."""
    total = 0.0
    for leaf in pytree.tree_leaves(v):
        if isinstance(leaf, torch.Tensor):
            total += leaf.numel() * leaf.element_size()
        elif isinstance(leaf, (int, float, bool, torch.SymInt)):
            total += 8
    return total


def _is_view(node: fx.Node) -> bool:
    out = node.meta.get(VAL)
    return isinstance(out, torch.Tensor) and out._base is not None


def _node_params(gm: fx.GraphModule, node: fx.Node) -> Iterable[tuple[str, torch.Tensor]]:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        for k, v in list(mod.named_parameters()) + list(mod.named_buffers()):
            yield f"{node.target}.{k}", v
    for a in node.all_input_nodes:
        if a.op == "get_attr":
            v = _fetch(gm, a.target)
            if isinstance(v, torch.Tensor):
                yield a.target, v


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def annotate_costs(gm: fx.GraphModule, units: Units) -> CostTable:
    """Price every compute node and aggregate per unit.

    Reads `fxpipe.val`, `fxpipe.flops` and `fxpipe.unit` from node.meta (run
    `propagate_shapes` and `group_units` first). Writes `node.meta["fxpipe.cost"]`.
    Returns the CostTable; mutates only node.meta.
    """
    n = len(units)
    flops = [0.0] * n
    nbytes = [0.0] * n
    launches = [0] * n
    pbytes = [0.0] * n
    tbytes = [0.0] * n
    abytes = [0.0] * n
    nf: list[list[float]] = [[] for _ in range(n)]
    nb: list[list[float]] = [[] for _ in range(n)]
    seen_params: set[int] = set()
    for node in gm.graph.nodes:
        if node.op not in COMPUTE_OPS:
            continue
        u = node.meta[UNIT]
        view = _is_view(node)
        out_b = value_bytes(node.meta.get(VAL))
        in_b = sum(value_bytes(a.meta.get(VAL)) for a in node.all_input_nodes if a.op != "get_attr")
        p_b, t_b = 0.0, 0.0
        for _, p in _node_params(gm, node):
            if id(p) not in seen_params:
                seen_params.add(id(p))
                b = p.numel() * p.element_size()
                p_b += b
                t_b += b if isinstance(p, torch.nn.Parameter) and p.requires_grad else 0.0
        if node.op == "call_module":
            in_b += p_b  # a leaf module reads its own weights
        else:
            in_b += sum(value_bytes(a.meta.get(VAL)) for a in node.all_input_nodes if a.op == "get_attr")
        f = float(node.meta.get(FLOPS, 0) or 0)
        moved = 0.0 if view else in_b + out_b
        if f == 0 and not view and isinstance(node.meta.get(VAL), torch.Tensor):
            f = float(node.meta[VAL].numel())  # elementwise: one op per output element
        is_tensor_op = isinstance(node.meta.get(VAL), torch.Tensor) or node.op == "call_module"
        cost = NodeCost(f, moved, p_b, 0.0 if view or not is_tensor_op else out_b, 1 if is_tensor_op else 0)
        node.meta[COST] = cost
        flops[u] += cost.flops
        nbytes[u] += cost.bytes
        launches[u] += cost.launches
        pbytes[u] += cost.param_bytes
        tbytes[u] += t_b
        abytes[u] += cost.activation_bytes
        nf[u].append(cost.flops)
        nb[u].append(cost.bytes)
    return CostTable(units.names, tuple(flops), tuple(nbytes), tuple(launches), tuple(pbytes), tuple(tbytes),
                     tuple(abytes), boundary_bytes(gm, n), tuple(map(tuple, nf)), tuple(map(tuple, nb)))


def live_ranges(gm: fx.GraphModule, n_units: int) -> dict[fx.Node, tuple[int, int]]:
    """For every value made by a compute node: (producer unit, last unit that reads it).

    A model output counts as read by a virtual unit n (it must reach the last stage). Model
    inputs and parameters are delivered to each stage directly, so they have no range.
    """
    out: dict[fx.Node, tuple[int, int]] = {}
    for node in gm.graph.nodes:
        if node.op not in COMPUTE_OPS:
            continue
        src = node.meta[UNIT]
        last = src
        for user in node.users:
            last = max(last, n_units if user.op == "output" else user.meta[UNIT])
        out[node] = (src, last)
    return out


def boundary_bytes(gm: fx.GraphModule, n_units: int) -> tuple[float, ...]:
    """Bytes crossing the cut after unit k, for k = 0..n-2 (forwarded skips count at each cut)."""
    diff = [0.0] * (n_units + 1)
    for node, (src, last) in live_ranges(gm, n_units).items():
        if last > src:
            b = value_bytes(node.meta.get(VAL))
            diff[src] += b
            diff[min(last, n_units)] -= b
    out, run = [], 0.0
    for k in range(n_units - 1):
        run += diff[k]
        out.append(run)
    return tuple(out)


def device_unit_times(table: CostTable, devices: Sequence[Device], train: bool) -> list[list[float]]:
    """unit x device matrix of seconds per microbatch."""
    return [[table.unit_time(u, d, train) for d in devices] for u in range(len(table.unit_names))]
