"""Memory a backward needs beyond the saved activations: the gradient buffers alive at once
while each unit's backward runs (`backward_transients`), the gradients a split (zero-bubble)
backward keeps from BI to BW (`split_kept_gradients`), and a stage's peak over its units
(`stage_transient`).

Separate from `annotate_costs` because it models autograd's backward walk (gradient
lifetimes), a question of its own; the planner reads `stage_transient` directly.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxpipe.passes.group_units import COMPUTE_OPS, UNIT
from fxpipe.passes.node_tensors import _fetch, _is_view, _node_params, value_bytes
from fxpipe.passes.propagate_shapes import VAL

__all__ = ["stage_transient", "backward_transients", "split_kept_gradients"]


def stage_transient(transient: Sequence[float], activation: Sequence[float], start: int, end: int,
                    split: bool = False) -> float:
    """Peak bytes above one microbatch's activations while a stage of units [start, end) runs
    that microbatch's backward.

    One unit's backward runs at a time, with `transient[u]` bytes of gradients alive. A plain
    backward frees each op's saved tensors as it passes it, so by unit u the activations of
    the units after u are gone: the stage needs max over u of (transient[u] - activations of
    units u+1..end-1), and never less than 0. A split backward's BI (`split=True`) keeps every
    saved tensor for BW: the largest transient[u] then adds in full. `transient` empty (a
    plan from before transients): 0.
    """
    if not transient:
        return 0.0
    if split:
        return float(max(transient[start:end], default=0.0))
    best, after = 0.0, 0.0
    for u in range(end - 1, start - 1, -1):
        best = max(best, transient[u] - after)
        after += activation[u]
    return float(best)


def backward_transients(gm: fx.GraphModule, n_units: int) -> tuple[float, ...]:
    """Per unit, the most bytes of gradient buffers alive at once while its backward runs,
    on top of the saved activations (which `activation_bytes` counts).

    Autograd walks the graph in reverse: the gradient of a value exists from the backward of
    its last user until the backward of its producer. So when node n's backward runs, the
    gradients alive are those of every value live across n in the forward (produced at or
    before n, read at or after n; model outputs are read "after the end"), which includes n's
    own output gradient and the input gradients it produces, plus one gradient buffer per
    trainable parameter n uses (computed whole before it is added into `.grad`). Only values
    that need a gradient count (floating, computed from a trainable parameter or a stage
    input); views count 0 (their gradient is a view of their base's). Stage inputs are
    values of earlier units, so a stage's received gradients are counted where they are live.

    Reads `fxpipe.val` and `fxpipe.unit`; mutates nothing. Example (hand count): Linear(4, 8)
    -> Linear(8, 2) on a batch of 3, fp32: at the second linear, the gradients of its input
    (3x8), its output (3x2) and its weight and bias (8x2 + 2): 4 * (24 + 6 + 18) = 192 bytes.
    """
    nodes = list(gm.graph.nodes)
    end = len(nodes)  # model outputs are read after the last node
    index = {nd: i for i, nd in enumerate(nodes)}
    grad_nodes: set[fx.Node] = set()
    param_grad: dict[fx.Node, float] = {}
    diff = [0.0] * (end + 2)
    for nd in nodes:
        if nd.op not in COMPUTE_OPS:
            continue
        val = nd.meta.get(VAL)
        pg = sum(p.numel() * p.element_size() for _, p in _node_params(gm, nd)
                 if isinstance(p, torch.nn.Parameter) and p.requires_grad)
        floating = any(t.is_floating_point() or t.is_complex()
                       for t in pytree.tree_leaves(val) if isinstance(t, torch.Tensor))
        if not floating or not (pg or any(a in grad_nodes for a in nd.all_input_nodes)):
            continue
        grad_nodes.add(nd)
        param_grad[nd] = float(pg)
        if _is_view(nd) or not isinstance(val, torch.Tensor):
            continue  # a view's gradient aliases its base's; a tuple's parts are its getitems
        last = max((end if u.op == "output" else index[u] for u in nd.users), default=index[nd])
        if last > index[nd]:
            b = value_bytes(val)
            diff[index[nd]] += b
            diff[last + 1] -= b
    out = [0.0] * n_units
    live = 0.0
    for i, nd in enumerate(nodes):
        live += diff[i]
        if nd in grad_nodes:
            u = nd.meta[UNIT]
            out[u] = max(out[u], live + param_grad[nd])
    return tuple(out)


def split_kept_gradients(gm: fx.GraphModule, n_units: int) -> tuple[float, ...]:
    """Per unit, bytes of the gradients the zero-bubble BI keeps until BW: one per weight
    consumer (as `runtime/weight_grad.py` finds them: the first op combining an activation
    with something computed from trainable parameters only, or a leaf module with trainable
    parameters), the size of its output. Reads `fxpipe.val`, `fxpipe.unit`; mutates nothing."""
    out = [0.0] * n_units
    param_only: set[fx.Node] = set()
    for nd in gm.graph.nodes:
        if nd.op == "get_attr":
            v = _fetch(gm, nd.target)
            if isinstance(v, torch.nn.Parameter) and v.requires_grad:
                param_only.add(nd)
            continue
        if nd.op not in COMPUTE_OPS:
            continue
        ins = nd.all_input_nodes
        if nd.op != "call_module" and ins and all(a in param_only or a.op == "get_attr" for a in ins):
            if any(a in param_only for a in ins):
                param_only.add(nd)
            continue
        if nd.op == "call_module":
            consumer = any(p.requires_grad for p in gm.get_submodule(nd.target).parameters())
        else:
            consumer = any(a in param_only for a in ins)
        val = nd.meta.get(VAL)
        if consumer and isinstance(val, torch.Tensor) and (val.is_floating_point() or val.is_complex()):
            out[nd.meta[UNIT]] += value_bytes(val)
    return tuple(out)
