"""Values' live ranges over units and the bytes live across a cut: between units (what a
stage boundary sends, `boundary_bytes`) and inside a unit across its weight-reading nodes
(what an offloaded recomputing stage keeps, `cut_bytes`).

Separate from `annotate_costs` because these are liveness questions over the graph's order,
also asked by `split_stages` (`live_ranges`), not per-node prices.
"""

from __future__ import annotations

import bisect

import torch
import torch.fx as fx

from fxpipe.passes.group_units import COMPUTE_OPS, UNIT
from fxpipe.passes.node_tensors import _node_params, value_bytes
from fxpipe.passes.propagate_shapes import VAL

__all__ = ["live_ranges", "boundary_bytes", "cut_bytes"]


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


def cut_bytes(gm: fx.GraphModule, n_units: int) -> tuple[float, ...]:
    """Per unit, bytes of the values made inside it and last read inside it that are live
    across one of its nodes reading a parameter. The weight streamer may start a streamed
    unit before any such node (runtime/offload.py groups them by module and size), and a
    recomputing offloaded stage checkpoints each streamed unit (runtime/unit_recompute.py), so
    these are the most bytes it can keep per microbatch inside the unit, whatever the
    grouping; values read in later units are in `boundary_bytes` already."""
    nodes = [n for n in gm.graph.nodes if n.op in COMPUTE_OPS]
    pos = {n: i for i, n in enumerate(nodes)}
    readers: list[list[int]] = [[] for _ in range(n_units)]  # positions of weight-reading nodes per unit
    for n in nodes:
        if any(isinstance(t, torch.nn.Parameter) for _, t in _node_params(gm, n)):
            readers[n.meta[UNIT]].append(pos[n])
    out = [0.0] * n_units
    for node, (src, last) in live_ranges(gm, n_units).items():
        if last != src or not readers[src]:
            continue
        last_pos = max((pos[u] for u in node.users if u in pos), default=-1)
        k = bisect.bisect_right(readers[src], pos[node])  # the first reader after the node
        if k < len(readers[src]) and readers[src][k] <= last_pos:
            out[src] += value_bytes(node.meta.get(VAL))
    return tuple(out)
