"""graph_fingerprint: the hash that ties a plan to the graph it was made for.

A plan stores it, and `Plan.load(path, fingerprint)` / `compile(plan=...)` refuse a plan
whose fingerprint differs from the model's. Kept apart from plan.py because it reads fx
graphs and torch ops, which the plan's own form never does.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.fx as fx

__all__ = ["graph_fingerprint"]


def graph_fingerprint(gm: fx.GraphModule, params: dict[str, Any]) -> str:
    """A hash of the graph's structure and its parameters' shapes and dtypes.

    `contiguous` calls are left out: they change no value, and torch.export records one only
    where a tensor is not contiguous already, which depends on the device's kernels (meta's
    attention returns other strides than CPU's), so a plan made on the meta device still
    matches the real model's graph.
    """
    h = hashlib.sha256()
    for n in gm.graph.nodes:
        if _is_contiguous_call(n):
            continue
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        h.update(f"{n.op}|{target}|{len(n.args)}|{sorted(n.kwargs)}\n".encode())
    for k in sorted(params):
        t = params[k]
        h.update(f"{k}:{tuple(getattr(t, 'shape', ()))}:{getattr(t, 'dtype', '')}\n".encode())
    return h.hexdigest()


def _is_contiguous_call(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target == "contiguous"
    return n.op == "call_function" and n.target is torch.ops.aten.contiguous.default

