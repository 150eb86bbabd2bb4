"""Activation recomputation for an offloaded stage: one checkpoint per streamed unit.

A stage planned with both `offload` and `recompute` cannot wrap its whole forward in one
`torch.utils.checkpoint`: recomputing it in backward would fetch every unit's weights while
the first unit's backward waits for them. Instead the streamed graph (runtime/offload.py) is
cut at its `_enter_unit` calls into one segment per unit, and each segment runs under its own
non-reentrant checkpoint. Per microbatch only the values crossing between segments are kept
(the checkpoints' inputs); in backward autograd reaches the units in reverse, and the first
saved tensor it needs from unit k re-runs unit k's segment, whose `enter(k)` takes the copy
the streamer fetched (prefetched) for unit k's backward anyway: one fetch per unit and
microbatch backward, at most two units resident, as without recomputation.

Recomputation must draw the same random numbers: the process generator's state is restored by
checkpoint (`preserve_rng_state`), and a seeded stage's (stage, mb) generator
(runtime/seeded_rng.py) is put back to the state it had before the segment. The buffers the
forward mutates (BatchNorm statistics) are put back after each recomputation.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.utils.checkpoint
from torch import nn

from fxpipe.runtime.offload import _enter_unit
from fxpipe.runtime.seeded_rng import current_generator

__all__ = ["buffers_updated_once", "UnitCheckpoints"]

# nodes a segment evaluates again itself instead of receiving them: attribute reads, and the
# seeded generator lookup (it must be the backward's generator while recomputing)
_LOCAL_CALLS = (current_generator,)


def buffers_updated_once(module: nn.Module, fn: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """`fn` (default `module`) for one microbatch's torch.utils.checkpoint: its recomputation in
    backward runs the forward again, which would update the buffers the forward mutates
    (BatchNorm's running statistics and num_batches_tracked, an EMA) a second time, so
    `module`'s buffers are put back after it. All of them: BatchNorm's kernel updates its
    statistics without bumping their version counters, so which ones changed cannot be told
    cheaply (buffers are small next to a stage's activations, and the copies live only
    during the recomputation)."""
    call = module if fn is None else fn
    ran = False

    def run(*args: Any) -> Any:
        nonlocal ran
        if not ran:  # the forward itself
            ran = True
            return call(*args)
        saved = [(b, b.detach().clone()) for b in module.buffers()]
        try:
            return call(*args)
        finally:
            with torch.no_grad():
                for b, old in saved:
                    b.copy_(old)

    return run


def _is_local(node: fx.Node) -> bool:
    return node.op == "get_attr" or (node.op == "call_function" and node.target in _LOCAL_CALLS)


def _segments(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """`gm` cut before each `_enter_unit` node (the nodes before the first one join the first
    segment). Segment k takes the values defined before it and read at or after it, and returns
    those read after it (the last one returns the stage's output). Attribute reads resolve in
    `gm` itself (`_stage`), so the streamer's weight swaps in `gm` are what every segment sees."""
    nodes = list(gm.graph.nodes)
    cuts = [i for i, n in enumerate(nodes) if n.op == "call_function" and n.target is _enter_unit][1:]
    spans = list(zip([0] + cuts, cuts + [len(nodes)]))
    seg_of = {n: k for k, (a, b) in enumerate(spans) for n in nodes[a:b]}
    last_use: dict[fx.Node, int] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if not _is_local(a):
                last_use[a] = max(last_use.get(a, 0), seg_of[n])
    out: list[fx.GraphModule] = []
    live: list[fx.Node] = []  # values entering the current segment, in a fixed order
    for k, (a, b) in enumerate(spans):
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {v: g.placeholder(v.name) for v in live}

        def arg(x: fx.Node) -> fx.Node:
            if x not in env:  # a local node of an earlier segment: evaluated again here
                env[x] = g.node_copy(x, arg)
                if x.op == "get_attr":
                    env[x].target = f"_stage.{x.target}"
            return env[x]

        for n in nodes[a:b]:
            if n.op == "output":
                g.output(fx.map_arg(n.args[0], arg))
                continue
            env[n] = g.node_copy(n, arg)
            if n.op in ("get_attr", "call_module"):
                env[n].target = f"_stage.{n.target}"
        live = [v for v in live + [n for n in nodes[a:b] if not _is_local(n) and n.op != "output"]
                if last_use.get(v, -1) > k]
        if k < len(spans) - 1:
            g.output(tuple(env[v] for v in live))
        holder = nn.Module()
        holder._stage = gm
        seg = fx.GraphModule(holder, g, f"{type(gm).__name__}Unit{k}")
        seg._stage = gm  # the very module the streamer swaps weights in (init copied a skeleton)
        out.append(seg)
    return out


class UnitCheckpoints:
    """Runs a streamed stage module's training forward with one checkpoint per unit."""

    def __init__(self, streamed: fx.GraphModule):
        self.module = streamed
        self.segments = _segments(streamed)

    def __call__(self, args: Sequence[Any], preserve_rng_state: bool) -> Any:
        live: Any = tuple(args)
        for seg in self.segments:
            gen = current_generator()
            live = torch.utils.checkpoint.checkpoint(
                self._segment_fn(seg, None if gen is None else gen.get_state()), *live,
                use_reentrant=False, preserve_rng_state=preserve_rng_state)
        return live

    def _segment_fn(self, seg: fx.GraphModule, gen_state: torch.Tensor | None) -> Callable[..., Any]:
        def run(*live: Any) -> Any:
            gen = current_generator()
            if gen is not None and gen_state is not None:
                gen.set_state(gen_state)  # the recomputation draws what the forward drew
            return seg(*live)

        return buffers_updated_once(self.module, run)
