"""Split: captured graph + stage bounds -> one fx graph per stage with explicit boundary I/O.

Boundary contract (DESIGN.md): the cut after stage s sends every value produced in stages
<= s and read after it — values skipping a stage are forwarded through it, so each stage
talks only to its neighbours. Model inputs are handed to every stage that reads them
directly (every worker/rank has the call's inputs), so they never ride on pipeline links.
Parameters are referenced by their original state_dict keys; which object backs them on
which device (owner or replica of a tied parameter) is the runtime's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from fxpipe.passes.annotate_costs import live_ranges
from fxpipe.passes.group_units import COMPUTE_OPS, UNIT

__all__ = ["StageGraph", "split_stages", "build_stage_module", "resolve_attr", "mutated_args"]


@dataclass
class StageGraph:
    """One stage's program as an fx graph: forward(*recv, *model_inputs) -> tuple(send).

    Attributes:
        index: stage number.
        graph: the stage's fx graph.
        recv: names of boundary values received from the previous stage, in placeholder order.
        model_inputs: names of the model's tensor inputs the stage reads (after `recv`).
        send: names of the values it returns (to the next stage; for the last stage the
            model's flat outputs, with constants kept as they are).
        attrs: get_attr targets (original state_dict keys) it reads.
        modules: call_module targets (fx leaf modules) it calls.
    """

    index: int
    graph: fx.Graph
    recv: tuple[str, ...]
    model_inputs: tuple[str, ...]
    send: tuple[str, ...]
    attrs: tuple[str, ...]
    modules: tuple[str, ...]

    def code(self) -> str:
        """The stage's forward as Python source (what fx generated for it)."""
        return self.graph.python_code("self").src


def split_stages(gm: fx.GraphModule, bounds: Sequence[tuple[int, int]]) -> list[StageGraph]:
    """Cut `gm` at the unit bounds into per-stage graphs.

    Reads `node.meta["fxpipe.unit"]` (from group_units). Does not mutate `gm`.

    Args:
        gm: the captured graph (flat inputs, flat tuple output).
        bounds: per stage [start, end) unit ranges, contiguous and covering.
    """
    n_units = bounds[-1][1]
    ranges = live_ranges(gm, n_units)
    unit_stage = {}
    for s, (a, b) in enumerate(bounds):
        for u in range(a, b):
            unit_stage[u] = s
    nodes = list(gm.graph.nodes)
    output_node = nodes[-1]
    out_vals = output_node.args[0]
    stages = []
    for s, (a, b) in enumerate(bounds):
        last = s == len(bounds) - 1
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        recv = [n for n in nodes if n in ranges and ranges[n][0] < a <= ranges[n][1]]
        for n in recv:
            env[n] = g.placeholder(n.name)
            env[n].meta.update(n.meta)
        mine = [n for n in nodes if n.op in COMPUTE_OPS and a <= n.meta[UNIT] < b]
        # A received value this stage writes in place (HF ResNet's `hidden += residual`, an
        # inplace ReLU) is a leaf that requires grad in training, and shares storage with the
        # sender's saved output: autograd refuses the write and the sender's backward would see
        # it. The stage works on its own copy instead; the clone passes gradients through.
        mutated = {m for n in mine for m in mutated_args(n, gm)}
        clones = [n for n in recv if n in mutated]
        used_inputs: list[fx.Node] = []
        attrs: list[str] = []
        for n in mine:
            for i in n.all_input_nodes:
                if i.op == "placeholder" and i not in used_inputs:
                    used_inputs.append(i)
        if last:
            for v in out_vals:
                if isinstance(v, fx.Node) and v.op == "placeholder" and v not in used_inputs:
                    used_inputs.append(v)
        used_inputs.sort(key=nodes.index)
        for i in used_inputs:
            env[i] = g.placeholder(i.name)
            env[i].meta.update(i.meta)
        for n in clones:  # after every placeholder: the stage's signature stays (*recv, *inputs)
            c = g.call_function(torch.clone, (env[n],))
            c.meta.update(n.meta)
            env[n] = c
        for n in mine:
            for i in n.all_input_nodes:
                if i.op == "get_attr" and i not in env:
                    env[i] = g.get_attr(i.target)
                    env[i].meta.update(i.meta)
                    attrs.append(i.target)
            env[n] = g.node_copy(n, lambda x: env[x])
        if last:
            for v in out_vals:  # a parameter or buffer returned as is: read here like any other
                if isinstance(v, fx.Node) and v.op == "get_attr" and v not in env:
                    env[v] = g.get_attr(v.target)
                    env[v].meta.update(v.meta)
                    attrs.append(v.target)
            send_vals = [env[v] if isinstance(v, fx.Node) else v for v in out_vals]
            send = [v.name if isinstance(v, fx.Node) else repr(v) for v in out_vals]
        else:
            live_out = [n for n in nodes if n in ranges and ranges[n][0] < b <= ranges[n][1]]
            send_vals = [env[n] for n in live_out]
            send = [n.name for n in live_out]
        g.output(tuple(send_vals))
        modules = [n.target for n in mine if n.op == "call_module"]
        stages.append(StageGraph(s, g, tuple(n.name for n in recv), tuple(i.target for i in used_inputs),
                                 tuple(send), tuple(dict.fromkeys(attrs)), tuple(dict.fromkeys(modules))))
    return stages


def mutated_args(node: fx.Node, gm: fx.GraphModule | None = None) -> list[fx.Node]:
    """The graph values `node` writes in place.

    ATen overloads (torch.export graphs) say so in their schema (`Tensor(a!) self`); for fx
    graphs the Python conventions are used: a trailing-underscore method or function
    (`x.add_(y)`, `torch.relu_`), `inplace=True`, `operator.setitem`, and leaf modules built
    with `inplace=True` (nn.ReLU(inplace=True)).
    """
    import operator

    first = [node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else []
    if node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is not None:
            out = []
            for i, arg in enumerate(schema.arguments):
                if arg.alias_info is None or not arg.alias_info.is_write:
                    continue
                v = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                out += [x for x in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(x, fx.Node)]
            return out
        name = getattr(node.target, "__name__", "")
        if node.target is operator.setitem or node.kwargs.get("inplace") is True or (
                name.endswith("_") and not name.startswith("_")):
            return first
        return []
    if node.op == "call_method":
        t = str(node.target)
        return first if (t.endswith("_") and not t.startswith("_")) or node.kwargs.get("inplace") is True else []
    if node.op == "call_module" and gm is not None:
        try:
            mod = gm.get_submodule(str(node.target))
        except AttributeError:
            return []
        return first if getattr(mod, "inplace", False) is True else []
    return []


def resolve_attr(model: nn.Module, gm: fx.GraphModule, target: str) -> Any:
    """The object behind a get_attr/call_module target: the user's model first (its
    parameters are the canonical ones the optimizer updates), the captured graph otherwise
    (constants torch.export lifted out of the code)."""
    for root in (model, gm):
        obj: Any = root
        try:
            for part in target.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise KeyError(target)


def build_stage_module(stage: StageGraph, objects: dict[str, Any], device: torch.device | None = None) -> fx.GraphModule:
    """An executable GraphModule for `stage` whose attributes are the given objects.

    With `device`, factory and conversion ops whose device was baked in at trace time
    (torch.export records `arange(..., device=cpu)` and `aten.to.device(x, cpu, ...)`) are
    retargeted to the stage's device, also inside the bodies of higher-order ops
    (`wrap_with_set_grad_enabled`, autocast regions), which are GraphModule attributes.
    """
    graph = stage.graph
    if device is not None:
        graph = fx.Graph()
        out = graph.graph_copy(stage.graph, {})
        graph.output(out)
        _retarget_devices(graph, device)
        objects = {k: _retargeted_body(v, device) if isinstance(v, fx.GraphModule) else v for k, v in objects.items()}
    return fx.GraphModule(objects, graph, f"Stage{stage.index}")


def _is_other_device(d: Any, device: torch.device) -> bool:
    return isinstance(d, torch.device) and d != device


def _retarget_devices(graph: fx.Graph, device: torch.device) -> None:
    for node in graph.nodes:
        d = node.kwargs.get("device")
        if isinstance(d, (torch.device, str)) and torch.device(d) != device:
            node.update_kwarg("device", device)
        # positional devices: a torch.device value in args is one whatever the op
        if any(_is_other_device(a, device) for a in node.args):
            node.args = tuple(device if _is_other_device(a, device) else a for a in node.args)


def _retargeted_body(body: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """A copy of a higher-order op's body with its devices retargeted (the captured one stays as it is)."""
    graph = fx.Graph()
    out = graph.graph_copy(body.graph, {})
    graph.output(out)
    _retarget_devices(graph, device)
    root: dict[str, Any] = {}
    for n in graph.nodes:
        if n.op in ("get_attr", "call_module"):
            obj: Any = body
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            if isinstance(obj, fx.GraphModule):
                obj = _retargeted_body(obj, device)
            elif isinstance(obj, torch.Tensor) and not isinstance(obj, nn.Parameter):
                obj = obj.to(device)  # a constant lifted into the body
            root[str(n.target)] = obj
    return fx.GraphModule(root, graph, type(body).__name__)
