"""Static shapes of the distributed runtime's messages: every boundary message (a stage's
received activations, its sent values' gradients, the model's outputs) is laid out
(`BoundaryLayout`) from the graph's meta values at the microbatch's sample count, which the
receiving rank knows without asking.

`BoundaryShapes` re-propagates the graph's shapes on the meta device for sample counts
other than the planned one (the last microbatch of a smaller batch) and caches values and
layouts per count. Separate from `DistributedCompiledModel` (runtime/dist_model.py): it
needs only the captured graph, the microbatch count and the stage graphs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from fxpipe.compiler.capture import Captured
from fxpipe.compiler.pipeline import microbatch_sizes
from fxpipe.passes.propagate_shapes import VAL, propagate_shapes
from fxpipe.passes.split_stages import StageGraph
from fxpipe.runtime.distributed import BoundaryLayout, grad_layout

__all__ = ["BoundaryShapes"]


class BoundaryShapes:
    """Meta values and boundary layouts of a captured graph's stages, per microbatch sample count."""

    def __init__(self, cap: Captured, microbatches: int, stage_graphs: Sequence[StageGraph]):
        self._cap = cap
        self._microbatches = microbatches
        self.stage_graphs = stage_graphs
        self._vals: dict[int, dict[str, Any]] = {}
        self._layouts: dict[tuple[str, int, int], BoundaryLayout] = {}

    def values_at(self, n: int) -> dict[str, Any]:
        """Original node name -> its meta value when a microbatch has n samples."""
        if n in self._vals:
            return self._vals[n]
        gm = self._cap.gm
        planned = microbatch_sizes(self._cap.batch_size, self._microbatches)[0]
        if n == planned:
            vals = {node.name: node.meta.get(VAL) for node in gm.graph.nodes}
        else:
            g = fx.Graph()
            out = g.graph_copy(gm.graph, {})
            g.output(out)
            copy = fx.GraphModule(gm, g)
            ins = []
            for node in copy.graph.nodes:
                if node.op == "placeholder":
                    v = node.meta.get(VAL)
                    if isinstance(v, torch.Tensor) and v.dim() > 0:
                        v = torch.empty((n, *v.shape[1:]), dtype=v.dtype, device="meta")
                    ins.append(v)
            propagate_shapes(copy, ins)
            vals = {node.name: node.meta.get(VAL) for node in copy.graph.nodes}
        self._vals[n] = vals
        return vals

    def layout(self, kind: str, s: int, n: int) -> BoundaryLayout:
        """Layout of ("act", s): stage s's received values; ("grad", s): gradients of stage s's sent ones."""
        key = (kind, s, n)
        if key not in self._layouts:
            vals = self.values_at(n)
            if kind == "act":
                names = self.stage_graphs[s].recv
                self._layouts[key] = BoundaryLayout([vals[x] for x in names], f"activations into stage {s} ({n} samples)")
            elif kind == "grad":
                names = self.stage_graphs[s].send
                self._layouts[key] = grad_layout([vals[x] for x in names], f"gradients out of stage {s + 1} ({n} samples)")
            else:  # the model's flat outputs
                out = [a for a in self._cap.gm.graph.nodes if a.op == "output"][0].args[0]
                self._layouts[key] = BoundaryLayout([vals[a.name] if isinstance(a, fx.Node) else a for a in out],
                                                    f"outputs ({n} samples)")
        return self._layouts[key]
