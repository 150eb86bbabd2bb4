"""Group the compute nodes of a captured graph into units: the atoms the partitioner cuts between.

A unit is a maximal run of consecutive compute nodes (in the graph's topological order) that
belong to the same module at a chosen depth of `nn_module_stack` — by default the blocks of a
transformer, so a 96-layer model has about 100 units, not 10,000 nodes. Nodes that belong to
no module (top-level glue like a residual add) join the run before them. Because units are
runs in node order, any cut between two units is a valid pipeline boundary for any DAG.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

__all__ = ["Units", "group_units", "UNIT", "COMPUTE_OPS"]

UNIT = "fxpipe.unit"  # index of the unit a compute node belongs to
COMPUTE_OPS = ("call_function", "call_method", "call_module")


@dataclass(frozen=True)
class Units:
    """The unit structure of a graph: names and, per unit, its compute nodes' names."""

    names: tuple[str, ...]
    nodes: tuple[tuple[str, ...], ...]
    depth: int  # module depth used; 0 = one unit per node

    def __len__(self) -> int:
        return len(self.names)


def _module_path(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for v in stack.values():
        fqn = v[0] if isinstance(v, tuple) else str(v)
        if not fqn or fqn.startswith("_empty_nn_module_stack"):  # root module / export's placeholder
            continue
        out.append(fqn)
    return out


def _keep_getitems_with_producer(g: fx.Graph) -> None:
    # A tuple must never cross a boundary: its getitems move right behind the producer.
    for node in list(g.nodes):
        if node.op == "call_function" and node.target is operator.getitem:
            src = node.args[0]
            if isinstance(src, fx.Node) and src.op in COMPUTE_OPS:
                anchor = src
                while anchor.next.op == "call_function" and anchor.next.target is operator.getitem and anchor.next.args[0] is src:
                    if anchor.next is node:
                        break
                    anchor = anchor.next
                if anchor.next is not node:
                    anchor.append(node)


def _runs(compute: list[fx.Node], depth: int) -> list[tuple[str, list[fx.Node]]]:
    runs: list[tuple[str, list[fx.Node]]] = []
    for node in compute:
        if node.op == "call_function" and node.target is operator.getitem and runs:
            runs[-1][1].append(node)
            continue
        path = _module_path(node)
        if depth == 0:
            key = node.name
        elif not path:
            key = None
        else:
            key = path[min(depth, len(path)) - 1]
        if runs and (key is None or key == runs[-1][0]):
            runs[-1][1].append(node)
        else:
            runs.append((key or "(top)", [node]))
    return runs


def group_units(gm: fx.GraphModule, min_units: int = 8, max_units: int = 512) -> Units:
    """Choose a module depth and group compute nodes into units; tag each node with its unit.

    The shallowest depth giving at least `min_units` units is used (a depth beyond
    `max_units` is not tried once a coarser one exists); if no depth gives `min_units`, every
    compute node is its own unit.

    Reads `nn_module_stack`. Writes `node.meta["fxpipe.unit"]`; may move getitem nodes next to
    their producer (a valid topological reorder). Returns the Units.

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
        >>> group_units(gm, min_units=2).names
        ('0', '1')
    """
    g = gm.graph
    _keep_getitems_with_producer(g)
    compute = [n for n in g.nodes if n.op in COMPUTE_OPS]
    if not compute:
        return Units((), (), 0)
    max_depth = max((len(_module_path(n)) for n in compute), default=0)
    chosen = None
    for depth in range(1, max_depth + 1):
        runs = _runs(compute, depth)
        if len(runs) > max_units and chosen is not None:
            break
        chosen = (depth, runs)
        if len(runs) >= min_units:
            break
    if chosen is None or len(chosen[1]) < min_units:
        # no module depth is fine enough: one unit per compute node
        chosen = (0, _runs(compute, 0))
    depth, runs = chosen
    seen: dict[str, int] = {}
    names = []
    for key, _ in runs:
        k = seen.get(key, 0)
        seen[key] = k + 1
        names.append(key if k == 0 else f"{key}#{k}")
    for i, (_, nodes) in enumerate(runs):
        for n in nodes:
            n.meta[UNIT] = i
    return Units(tuple(names), tuple(tuple(n.name for n in nodes) for _, nodes in runs), depth)
