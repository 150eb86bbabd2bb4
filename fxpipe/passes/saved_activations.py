"""Which values autograd keeps for backward: the activation memory of `annotate_costs`.

Each node runs once on meta tensors under `saved_tensors_hooks` (`_saved_by`), except scaled
dot-product attention, priced as the fused kernel real devices run (`fused_attention_saved`).
Separate from the pass because it is an analysis of its own (autograd's saved tensors, not
FLOPs or traffic), with its own fast path for repeated blocks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxpipe.compiler.repeat_capture import TEMPLATE
from fxpipe.passes.group_units import COMPUTE_OPS
from fxpipe.passes.node_tensors import _is_view
from fxpipe.passes.propagate_shapes import VAL, mha_fastpath_off, same_inputs, template_of

__all__ = ["saved_for_backward", "fused_attention_saved"]


def saved_for_backward(gm: fx.GraphModule, *, fused_attention_dropout: bool = False
                       ) -> tuple[set[fx.Node], dict[fx.Node, float]]:
    """Which values autograd keeps for backward, found by running each node once on meta
    tensors under `saved_tensors_hooks`.

    Returns (the nodes whose output is kept: saved by an op, directly or through a view, or a
    model output; per node, bytes of other tensors its op saves). Parameters and model inputs
    are not activations. A node that cannot run on meta tensors keeps its output, as before.
    A copy of a repeated block's node (`fxpipe.template`) whose inputs match its template's
    reuses the template's answer. Scaled dot-product attention is priced as the fused kernel
    real devices run (`fused_attention_saved`), not as the math path meta tensors take.
    Reads `fxpipe.val`; mutates nothing.
    """
    kept: set[fx.Node] = set()
    extra: dict[fx.Node, float] = {}
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    for v in pytree.tree_leaves(out_node.args[0]):
        if isinstance(v, fx.Node):
            kept.add(v)
    # copies of a repeated block (compiler/repeat_capture.py) take their template's answer
    by_name = {n.name: n for n in gm.graph.nodes} if any(TEMPLATE in n.meta for n in gm.graph.nodes) else {}
    answers: dict[fx.Node, tuple[list[fx.Node], bool, float] | None] = {}
    for node in gm.graph.nodes:
        if node.op not in COMPUTE_OPS or not isinstance(node.meta.get(VAL), (torch.Tensor, tuple, list)):
            continue
        t = template_of(node, by_name)
        if t is not None and t in answers and same_inputs(node, t):
            found = answers[t]
            if found is not None:  # the template's saved inputs, position for position
                at = {a: i for i, a in enumerate(t.all_input_nodes)}
                found = ([node.all_input_nodes[at[a]] for a in found[0]], found[1], found[2])
        else:
            found = fused_attention_saved(node, fused_attention_dropout)
            found = _saved_by(gm, node) if found is None else found
        answers[node] = found
        if found is None:
            kept.add(node)
            continue
        ins, out_saved, other = found
        kept.update(ins)
        if out_saved:
            kept.add(node)
        if other:
            extra[node] = other
    roots = set()
    for n in kept:  # a view keeps its base alive
        while n.op in COMPUTE_OPS and _is_view(n):
            src = [a for a in n.all_input_nodes if isinstance(a.meta.get(VAL), torch.Tensor)]
            if not src:
                break
            n = src[0]
        roots.add(n)
    return {n for n in roots if n.op in COMPUTE_OPS}, extra


_SDPA_TARGETS = (torch.ops.aten.scaled_dot_product_attention.default, torch.nn.functional.scaled_dot_product_attention)


def fused_attention_saved(node: fx.Node, dropout_fused: bool = False) -> tuple[list[fx.Node], bool, float] | None:
    """What a fused scaled dot-product attention kernel saves for backward, as `_saved_by`
    answers: its query, key, value (and mask) inputs, its output and the per-row logsumexp
    (batch x heads x query length, fp32); no score matrix. None when `node` is no SDPA call
    or would not run fused.

    On meta tensors SDPA always takes the math path, which saves the (heads x s x s) scores
    two or three times over (GPT-2 XL, 2 x 1024 tokens, fp32: 637 MiB per layer against
    12.7 MiB fused). Real devices run it fused: CPU (flash) without dropout, CUDA (flash /
    memory-efficient) also with dropout (`dropout_fused`: every device is a GPU); a CPU with
    dropout takes the math path, which `_saved_by` prices."""
    if node.op != "call_function" or node.target not in _SDPA_TARGETS:
        return None
    args = list(node.args) + [None] * max(0, 5 - len(node.args))
    q, k, v, mask, p = (node.kwargs.get(n, args[i]) for i, n in
                        enumerate(("query", "key", "value", "attn_mask", "dropout_p")))
    p = 0.0 if p is None else p
    if not isinstance(p, (int, float)) or (p > 0 and not dropout_fused):
        return None
    qv = q.meta.get(VAL) if isinstance(q, fx.Node) else None
    if not isinstance(qv, torch.Tensor) or qv.dim() < 2 or not isinstance(node.meta.get(VAL), torch.Tensor):
        return None
    ins = [a for a in (q, k, v, mask) if isinstance(a, fx.Node) and isinstance(a.meta.get(VAL), torch.Tensor)]
    lse = float(qv[..., 0].numel()) * 4  # fp32 logsumexp per query row and head
    return ins, True, lse


def _meta_like(v: Any, grad: bool) -> Any:
    if not isinstance(v, torch.Tensor):
        return v
    t = torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device="meta")
    return t.requires_grad_(True) if grad and (t.is_floating_point() or t.is_complex()) else t


def _saved_by(gm: fx.GraphModule, node: fx.Node) -> tuple[list[fx.Node], bool, float] | None:
    """(input nodes it saves, whether it saves its output, bytes of anything else it saves),
    or None when the node cannot be run on meta tensors."""
    params: set[int] = set()
    by_id: dict[int, fx.Node] = {}

    def arg(n: fx.Node) -> Any:
        val = n.meta.get(VAL)
        t = _meta_like(val, True)
        if isinstance(t, torch.Tensor):
            (params.add(id(t)) if n.op == "get_attr" else by_id.__setitem__(id(t), n))
        return t

    try:
        args = fx.node.map_arg(node.args, arg)
        kwargs = fx.node.map_arg(node.kwargs, arg)
        seen: list[torch.Tensor] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen.append(t)
            return t

        with torch.enable_grad(), mha_fastpath_off(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if node.op == "call_module":
                mod = gm.get_submodule(node.target)
                state = {k: _meta_like(v, isinstance(v, torch.nn.Parameter) and v.requires_grad)
                         for k, v in list(mod.named_parameters()) + list(mod.named_buffers())}
                params.update(id(v) for v in state.values())
                out = torch.func.functional_call(mod, state, args, kwargs)
            elif node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                out = node.target(*args, **kwargs)
    except Exception:
        return None
    outs = {id(t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)}
    ins: list[fx.Node] = []
    out_saved, other, counted = False, 0.0, set()
    for t in seen:
        base = t._base if t._base is not None else t
        if id(base) in params:
            continue
        if id(base) in by_id:
            ins.append(by_id[id(base)])
        elif id(base) in outs and not isinstance(out, (tuple, list)):
            out_saved = True
        elif id(base) not in counted:
            counted.add(id(base))
            other += base.numel() * base.element_size()
    return ins, out_saved, other
