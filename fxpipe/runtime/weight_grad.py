"""Split a stage's backward into input gradients (BI) and weight gradients (BW).

Zero-bubble schedules run BI on the critical path (its result is what the previous stage
waits for) and defer BW into bubbles. Running plain autograd twice would redo the whole
input-gradient chain in BW. Instead:

* the stage graph also returns the outputs of its *weight consumers*: the first ops that
  combine an activation with a parameter (a linear, an embedding, a LayerNorm's affine, a
  leaf-module call), each with the parameters it consumes directly;
* BI runs `torch.autograd.grad` w.r.t. the stage inputs only, with hooks that keep the
  gradient arriving at each consumer output (the total over all paths: every path to a
  consumer on the way to the inputs is traversed);
* BW backpropagates from each consumer output, with its kept gradient, to *its own*
  parameters only: autograd then prunes everything but that op's weight branch (for a
  linear, exactly the weight-gradient GEMM). One call per consumer, since a joint call would
  reach earlier consumers' weights through the activation history and count them twice.

Exactness guards: a parameter consumed by two consumers of the stage (a weight reused
within the stage), or reaching a stage output through attributes only (returned as is, or a
weight table sent on), is left out of the per-consumer pass and gets one ordinary backward
restricted to it; a consumer BI did not reach (a branch that does not lead to the stage
inputs) gets its gradient in BW from `autograd.grad` w.r.t. its output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

__all__ = ["Consumers", "expose_weight_consumers", "SplitState", "backward_input", "backward_weight",
           "trainable_consumers", "with_split_backward", "split_backward_module"]


@dataclass(frozen=True)
class Consumers:
    """Per consumer (in output order): the parameter targets it uses directly."""

    params: tuple[tuple[str, ...], ...]
    shared: frozenset[str]  # targets used by more than one consumer
    # targets that reach a stage output through attributes only (a parameter returned as is,
    # a weight table sent to the next stage): no consumer sees that path's gradient
    direct: frozenset[str] = frozenset()


def _param_sources(node: fx.Node, memo: dict[fx.Node, frozenset[str] | None],
                   param_targets: set[str]) -> frozenset[str] | None:
    """The parameters a node is computed from, when it is computed from attributes only (a
    weight, its transpose or cast, a constant buffer); None when an activation is involved."""
    if node in memo:
        return memo[node]
    out: frozenset[str] | None
    if node.op == "get_attr":
        out = frozenset([node.target]) if node.target in param_targets else frozenset()
    elif node.op in ("call_function", "call_method") and node.all_input_nodes:
        parts = [_param_sources(i, memo, param_targets) for i in node.all_input_nodes]
        out = None if any(p is None for p in parts) else frozenset().union(*parts)
    else:
        out = None
    memo[node] = out
    return out


def expose_weight_consumers(graph: fx.Graph, module_params: dict[str, tuple[str, ...]],
                            param_targets: set[str]) -> tuple[fx.Graph, int, Consumers]:
    """A copy of `graph` returning (original outputs..., consumer outputs...).

    Args:
        graph: a stage graph (flat tuple output).
        module_params: call_module target -> its parameter names (qualified), for leaf modules.
        param_targets: get_attr targets that are trainable parameters (not buffers/constants).
    Returns:
        The new graph, the number of original outputs, and the consumers' parameter lists.
    """
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    memo: dict[fx.Node, frozenset[str] | None] = {}
    found: list[tuple[fx.Node, tuple[str, ...]]] = []
    out_node = None
    for node in graph.nodes:
        if node.op == "output":
            out_node = node
            continue
        env[node] = g.node_copy(node, lambda n: env[n])
        if node.op == "call_module" and module_params.get(node.target):
            found.append((env[node], module_params[node.target]))
        elif node.op in ("call_function", "call_method") and _param_sources(node, memo, param_targets) is None:
            srcs = set()
            for i in node.all_input_nodes:
                s = _param_sources(i, memo, param_targets)
                if s:
                    srcs |= s
            if srcs:
                found.append((env[node], tuple(sorted(srcs))))
    outs = out_node.args[0]
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    g.output(tuple(env[o] if isinstance(o, fx.Node) else o for o in outs) + tuple(n for n, _ in found))
    counts: dict[str, int] = {}
    for _, ps in found:
        for p in ps:
            counts[p] = counts.get(p, 0) + 1
    shared = frozenset(p for p, c in counts.items() if c > 1)
    direct = frozenset().union(*(_param_sources(o, memo, param_targets) or frozenset()
                                 for o in outs if isinstance(o, fx.Node)))
    return g, len(outs), Consumers(tuple(ps for _, ps in found), shared, direct)


@dataclass
class SplitState:
    """What BI leaves for BW for one (stage, microbatch)."""

    outs: list
    grads: list
    consumer_out: list
    kept: dict[int, torch.Tensor] = field(default_factory=dict)
    # consumers whose gradient BI keeps for BW (`trainable_consumers`); None keeps all. A
    # consumer of frozen parameters only needs none, and keeping it would hold memory to BW
    keep: frozenset[int] | None = None


def _pairs(outs: Sequence[Any], grads: Sequence[Any]) -> tuple[list, list | None]:
    ts, gs = [], []
    for o, g in zip(outs, grads):
        if isinstance(o, torch.Tensor) and o.requires_grad and o.grad_fn is not None:
            ts.append(o)
            gs.append(g)
    if any(g is None for g in gs):
        if len(ts) != 1:
            raise RuntimeError("internal: several stage outputs need gradients but some have none")
        return ts, None
    return ts, gs


def backward_input(state: SplitState, leaves: Sequence[Any]) -> list[torch.Tensor | None]:
    """Gradients w.r.t. the stage inputs (`leaves`); keeps the graph and consumer grads for BW."""
    need = [v for v in leaves if isinstance(v, torch.Tensor) and v.requires_grad]
    ts, gs = _pairs(state.outs, state.grads)
    got: dict[int, torch.Tensor | None] = {}
    if ts and need:
        handles = []
        for i, c in enumerate(state.consumer_out):
            if isinstance(c, torch.Tensor) and c.requires_grad and (state.keep is None or i in state.keep):
                handles.append(c.register_hook(_keeper(state.kept, i)))
        try:
            res = torch.autograd.grad(ts, need, gs, retain_graph=True, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        got = {id(v): g for v, g in zip(need, res)}
    # A stage input forwarded unchanged as an output (a skip) also gets that output's grad.
    for o, g in zip(state.outs, state.grads):
        if isinstance(o, torch.Tensor) and g is not None and id(o) in {id(v) for v in need}:
            prev = got.get(id(o))
            got[id(o)] = g if prev is None else prev + g
    return [got.get(id(v)) if isinstance(v, torch.Tensor) else None for v in leaves]


def _keeper(store: dict[int, torch.Tensor], i: int):
    def keep(g: torch.Tensor) -> None:
        store[i] = g
    return keep


def trainable_consumers(consumers: Consumers, params: dict[str, torch.Tensor]) -> frozenset[int]:
    """The consumers that have a parameter requiring grad *now* (frozen and unfrozen
    parameters change between steps: the split module exposes every parameter's consumer)."""
    return frozenset(i for i, ps in enumerate(consumers.params)
                     if any(p in params and params[p].requires_grad for p in ps))


def backward_weight(state: SplitState, consumers: Consumers, params: dict[str, torch.Tensor]) -> None:
    """Accumulate the stage's parameter gradients into `.grad` (see module docstring)."""
    ts, gs = _pairs(state.outs, state.grads)
    if not ts:
        return
    # only consumers with a trainable parameter: a frozen one's gradient would be recomputed
    # below as "missing" (a second backward through the stage) only to be thrown away
    live = trainable_consumers(consumers, params)
    todo = [i for i, c in enumerate(state.consumer_out)
            if isinstance(c, torch.Tensor) and c.requires_grad and c.grad_fn is not None and i in live]
    missing = [i for i in todo if i not in state.kept]
    if missing:
        res = torch.autograd.grad(ts, [state.consumer_out[i] for i in missing], gs, retain_graph=True, allow_unused=True)
        for i, g in zip(missing, res):
            if g is not None:
                state.kept[i] = g
    # A consumer whose output is not one tensor (a leaf LSTM's or MultiheadAttention's tuple)
    # has no single gradient BI could keep: its parameters join the restricted ordinary
    # backward below, else they would get no gradient at all.
    fallback = set(consumers.shared | consumers.direct).union(*(consumers.params[i] for i, c in enumerate(state.consumer_out)
                                             if not isinstance(c, torch.Tensor)))
    shared = [params[p] for p in sorted(fallback) if p in params and params[p].requires_grad]
    for i in todo:
        own = [params[p] for p in consumers.params[i] if p in params and p not in fallback and params[p].requires_grad]
        if own and i in state.kept:
            torch.autograd.backward([state.consumer_out[i]], [state.kept[i]], inputs=own, retain_graph=True)
    if shared:
        torch.autograd.backward(ts, gs, inputs=shared)
    state.kept.clear()
    state.consumer_out.clear()


def with_split_backward(runner: Any) -> Any:
    """The same StageRunner, its module rewritten to also return weight-consumer outputs."""
    import dataclasses

    module, n_out, consumers = split_backward_module(runner.module)
    return dataclasses.replace(runner, module=module, n_out=n_out, consumers=consumers,
                               params=dict(runner.module.named_parameters()))


def split_backward_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, int, Consumers]:
    """`gm` rewritten to also return its weight consumers' outputs (what BI/BW need), the
    number of its original outputs, and the consumers; the profiler times the same thing."""
    from torch import nn

    # Every parameter, frozen or not: the module is built once, but requires_grad may change
    # between steps (unfreezing layers mid-training). With only the trainable ones exposed, a
    # layer unfrozen later had no consumer and silently got no gradient. Which consumers
    # actually run in BW is decided per step (`trainable_consumers`).
    module_params = {}
    param_targets = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sub = gm.get_submodule(node.target)
            module_params[node.target] = tuple(f"{node.target}.{n}" for n, _ in sub.named_parameters())
        elif node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, nn.Parameter):
                param_targets.add(node.target)
    graph, n_out, consumers = expose_weight_consumers(gm.graph, module_params, param_targets)
    return fx.GraphModule(gm, graph, type(gm).__name__), n_out, consumers
