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

__all__ = ["StageGraph", "split_stages", "build_stage_module", "resolve_attr"]


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
        for n in mine:
            for i in n.all_input_nodes:
                if i.op == "get_attr" and i not in env:
                    env[i] = g.get_attr(i.target)
                    env[i].meta.update(i.meta)
                    attrs.append(i.target)
            env[n] = g.node_copy(n, lambda x: env[x])
        if last:
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
    (torch.export records `arange(..., device=cpu)`) are retargeted to the stage's device.
    """
    graph = stage.graph
    if device is not None:
        graph = fx.Graph()
        out = graph.graph_copy(stage.graph, {})
        graph.output(out)
        for node in graph.nodes:
            d = node.kwargs.get("device")
            if isinstance(d, (torch.device, str)) and torch.device(d) != device:
                node.update_kwarg("device", device)
    return fx.GraphModule(objects, graph, f"Stage{stage.index}")
