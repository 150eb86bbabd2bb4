"""What a node's value weighs and what it reads: the byte size of a (nested) value, whether a
node's output aliases an input (a view, no bytes of its own), the parameters and buffers a node
touches.

Every cost in `annotate_costs`, the saved-activation analysis (`saved_activations.py`), the
cut and backward memory accounting (`live_values.py`, `backward_memory.py`) ask these same
questions of a node, so they live here once, below all of them.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxpipe.passes.propagate_shapes import VAL

__all__ = ["value_bytes"]


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
    """Whether the node's output aliases one of its inputs (no bytes of its own).

    A meta result with a `_base` is not enough: `aten.linear` with a bias on a 3-d input
    returns a view of its own matmul's result, a new tensor (counted as a view, a ViT's
    q/k/v projections kept 0 bytes for backward). An aten op says in its schema whether its
    output aliases an input; a leaf module's output is a view only of one of its inputs;
    other callables keep the `_base` test."""
    out = node.meta.get(VAL)
    if not isinstance(out, torch.Tensor) or out._base is None:
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        rets = node.target._schema.returns
        return bool(rets) and rets[0].alias_info is not None
    if node.op == "call_module":
        ins = [a.meta.get(VAL) for a in node.all_input_nodes]
        return any(isinstance(v, torch.Tensor) and (out._base is v or out._base is v._base) for v in ins)
    return True


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
