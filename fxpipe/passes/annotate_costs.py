"""Costs: per node FLOPs, bytes moved, parameter and activation bytes; per unit, time on a device.

Time of a node on a device is a roofline, max(flops / peak, bytes / bandwidth), plus the
device's per-op launch overhead; backward is priced at twice the forward (two matmuls per
forward matmul). A `CostTable` aggregates nodes into units and records, for every cut between
units, the bytes that cross it: the numbers the partitioner decides on and the plan file keeps.

This module holds the pass and the table. The analyses it aggregates live beside it, one
concern each, and are re-exported here: `node_tensors` (value bytes, views, parameters read),
`saved_activations` (what autograd saves for backward; fused attention), `live_values` (bytes
across cuts), `backward_memory` (gradient buffers during backward), `unit_times` (unit x
device time matrices, `device_key`, `BWD_FACTOR`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.fx as fx

from fxpipe.compiler.cluster import Device
from fxpipe.passes.backward_memory import backward_transients, split_kept_gradients, stage_transient
from fxpipe.passes.group_units import COMPUTE_OPS, UNIT, Units
from fxpipe.passes.live_values import boundary_bytes, cut_bytes, live_ranges
from fxpipe.passes.node_tensors import _is_view, _node_params, value_bytes
from fxpipe.passes.propagate_shapes import FLOPS, VAL
from fxpipe.passes.saved_activations import fused_attention_saved, saved_for_backward
from fxpipe.passes.unit_times import BWD_FACTOR, device_key, device_offload_unit_times, device_unit_times

__all__ = ["NodeCost", "SharedTensor", "CostTable", "annotate_costs", "backward_transients", "split_kept_gradients", "cut_bytes", "stage_transient",
           "fused_attention_saved",
           "COST", "BWD_FACTOR", "value_bytes", "device_key", "device_unit_times", "device_offload_unit_times",
           # re-exported from the modules below (their users import them from here)
           "saved_for_backward", "live_ranges", "boundary_bytes"]

COST = "fxpipe.cost"


@dataclass(frozen=True, slots=True)
class NodeCost:
    flops: float
    bytes: float  # memory traffic: inputs read + output written (0 for views)
    param_bytes: float  # parameters/buffers first touched by this node
    activation_bytes: float  # output bytes kept for backward (0 for views)
    launches: int


@dataclass(frozen=True, slots=True)
class SharedTensor:
    """A parameter or buffer read by several units (GPT-2's `wte` in the embedding and the LM
    head). The runtime gives every stage after the first that uses it a replica of its own
    (`api.CompiledModel._place`), so that stage holds it too (`replica_bytes`)."""

    bytes: float
    trainable_bytes: float  # `bytes` when it receives gradients, else 0
    units: tuple[int, ...]  # the units that read it, ascending (at least two)


@dataclass(frozen=True)
class CostTable:
    """Per-unit totals and per-cut boundary sizes (all per microbatch)."""

    unit_names: tuple[str, ...]
    flops: tuple[float, ...]
    bytes: tuple[float, ...]
    launches: tuple[int, ...]
    param_bytes: tuple[float, ...]
    trainable_bytes: tuple[float, ...]  # param bytes that receive gradients
    activation_bytes: tuple[float, ...]
    boundary_bytes: tuple[float, ...]  # after unit k, k = 0..n-2
    # per unit, the node-level (flops, bytes) pairs are needed for a per-device roofline;
    # we keep them compactly as two parallel tuples per unit.
    node_flops: tuple[tuple[float, ...], ...]
    node_bytes: tuple[tuple[float, ...], ...]
    # per unit, the peak bytes of gradient buffers alive at once during its backward, beyond
    # the saved activations (`backward_transients`); () in plans written before it existed
    transient_bytes: tuple[float, ...] = ()
    # per unit, bytes of the gradients a split backward's BI keeps for BW (its weight
    # consumers' output gradients, `split_kept_gradients`); () in older plans
    kept_grad_bytes: tuple[float, ...] = ()
    # tensors read by more than one unit (tied weights); () in older plans, which then count
    # no replicas, as the planner that wrote them did
    shared: tuple[SharedTensor, ...] = ()
    # per unit, bytes of values made inside it that are live across one of its weight-reading
    # nodes (`cut_bytes`): what an offloaded stage that recomputes keeps per microbatch inside
    # the unit (the runtime checkpoints each streamed unit); () in older plans
    cut_bytes: tuple[float, ...] = ()

    # Measured times (the profiler's, `passes/profile_units.py`), when there are any: per
    # device key (`device_key`), seconds per microbatch of each unit's forward and backward.
    # They are deliberately not dataclass fields: the plan file's loader checks the cost
    # table's fields strictly, so a plan carries them in `predicted["measured_costs"]`
    # (`measured_to_dict` / `with_measured`), and old plans without them still load.
    measured_fwd = None  # type: dict[str, tuple[float, ...]] | None
    measured_bwd = None  # type: dict[str, tuple[float, ...]] | None
    # per device key, the share of each unit's backward that is BI (input gradients) when the
    # backward is split as the zero-bubble runtime splits it; None: 1/2 (plans before it)
    measured_bi_fraction = None  # type: dict[str, tuple[float, ...]] | None

    def with_measured(self, fwd: dict[str, Sequence[float]], bwd: dict[str, Sequence[float]],
                      bi_fraction: dict[str, Sequence[float]] | None = None) -> "CostTable":
        """A copy of this table that prices units by the measured times (per device key);
        `bi_fraction`: measured BI / (BI + BW) per unit (see `bwd_input_time`)."""
        n = len(self.unit_names)
        for name, table in (("fwd", fwd), ("bwd", bwd), ("bi_fraction", bi_fraction or {})):
            for k, v in table.items():
                if len(v) != n:
                    raise ValueError(f"measured {name} times for {k!r} have {len(v)} entries for {n} units")
        for k, v in (bi_fraction or {}).items():
            if not all(0.0 <= float(x) <= 1.0 for x in v):
                raise ValueError(f"measured bi_fraction for {k!r} must lie in [0, 1], got {list(v)}")
        out = replace(self)
        object.__setattr__(out, "measured_fwd", {str(k): tuple(map(float, v)) for k, v in fwd.items()})
        object.__setattr__(out, "measured_bwd", {str(k): tuple(map(float, v)) for k, v in bwd.items()})
        object.__setattr__(out, "measured_bi_fraction",
                           {str(k): tuple(map(float, v)) for k, v in bi_fraction.items()} if bi_fraction else None)
        return out

    def measured_for(self, dev: Device) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(forward, backward) seconds per unit measured on `dev`'s kind, or None."""
        k = device_key(dev)
        if self.measured_fwd and k in self.measured_fwd and self.measured_bwd and k in self.measured_bwd:
            return self.measured_fwd[k], self.measured_bwd[k]
        return None

    def unit_time(self, u: int, dev: Device, train: bool = True) -> float:
        """Seconds unit u takes on `dev` per microbatch (forward, plus backward when training).

        Measured times for `dev`'s kind are used when the table has them, else the roofline.
        """
        m = self.measured_for(dev)
        if m is not None:
            return m[0][u] + (m[1][u] if train else 0.0)
        t = sum(max(f / dev.peak_flops, b / dev.mem_bandwidth) for f, b in zip(self.node_flops[u], self.node_bytes[u]))
        t += self.launches[u] * dev.launch_overhead
        return t * (1.0 + BWD_FACTOR) if train else t

    def fwd_time(self, u: int, dev: Device) -> float:
        return self.unit_time(u, dev, train=False)

    def bwd_time(self, u: int, dev: Device) -> float:
        """Seconds of unit u's backward on `dev` (measured, else BWD_FACTOR x the forward)."""
        m = self.measured_for(dev)
        return m[1][u] if m is not None else self.fwd_time(u, dev) * BWD_FACTOR

    def bwd_input_time(self, u: int, dev: Device) -> float:
        """Seconds of unit u's BI (input gradients) on `dev` when the backward is split:
        the measured share of its backward when profiled with the split, else half.
        BW takes the rest (`bwd_time - bwd_input_time`)."""
        f = (self.measured_bi_fraction or {}).get(device_key(dev))
        share = f[u] if f is not None and self.measured_for(dev) is not None else 0.5
        return self.bwd_time(u, dev) * share

    def weight_stream_time(self, u: int, dev: Device) -> float:
        """Seconds to copy unit u's weights between pinned host memory and `dev` (one way)."""
        return self.param_bytes[u] / dev.host_bandwidth

    def offload_fwd_time(self, u: int, dev: Device) -> float:
        """Unit u's forward when its stage streams its weights: the prefetch of its weights
        overlaps the previous unit's compute, so the slower of the two sets the pace."""
        return max(self.fwd_time(u, dev), self.weight_stream_time(u, dev))

    def offload_bwd_time(self, u: int, dev: Device) -> float:
        """Unit u's backward when streaming: the weights are fetched again while the weight
        gradients go back on the other direction of the link, so one crossing overlaps it."""
        return max(self.bwd_time(u, dev), self.weight_stream_time(u, dev))

    def stage_transient(self, start: int, end: int, split: bool = False) -> float:
        """Bytes a stage holding units [start, end) needs during one microbatch's backward on
        top of that microbatch's activations (see `stage_transient`; 0 for older tables)."""
        return stage_transient(self.transient_bytes, self.activation_bytes, start, end, split)

    def stage_kept(self, start: int, end: int) -> float:
        """Bytes of gradients a stage holding units [start, end) keeps from a microbatch's BI
        to its BW (zero-bubble schedules; 0 for tables without them)."""
        return float(sum(self.kept_grad_bytes[start:end]))

    def measured_to_dict(self) -> dict[str, Any] | None:
        """The measured times as JSON data (None when there are none)."""
        if not self.measured_fwd:
            return None
        out = {"fwd_s": {k: list(v) for k, v in self.measured_fwd.items()},
               "bwd_s": {k: list(v) for k, v in (self.measured_bwd or {}).items()}}
        if self.measured_bi_fraction:
            out["bi_fraction"] = {k: list(v) for k, v in self.measured_bi_fraction.items()}
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {k: list(map(list, getattr(self, k))) if k.startswith("node_") else list(getattr(self, k))
             for k in self.__dataclass_fields__ if k != "shared"}
        d["shared"] = [{"bytes": t.bytes, "trainable_bytes": t.trainable_bytes, "units": list(t.units)}
                       for t in self.shared]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any], measured: dict[str, Any] | None = None) -> "CostTable":
        """Rebuild from `to_dict` output; `measured` is `measured_to_dict` output (or None)."""
        fields = [k for k in CostTable.__dataclass_fields__ if k in d and k != "shared"]  # defaulted fields may be missing
        shared = tuple(SharedTensor(float(t["bytes"]), float(t["trainable_bytes"]), tuple(int(u) for u in t["units"]))
                       for t in d.get("shared", ()))
        t = CostTable(**{k: tuple(tuple(x) for x in d[k]) if k.startswith("node_") else tuple(d[k]) for k in fields},
                      shared=shared)
        return t.with_measured(measured["fwd_s"], measured["bwd_s"], measured.get("bi_fraction")) if measured else t


def annotate_costs(gm: fx.GraphModule, units: Units, *, fused_attention_dropout: bool = False) -> CostTable:
    """Price every compute node and aggregate per unit.

    Reads `fxpipe.val`, `fxpipe.flops` and `fxpipe.unit` from node.meta (run
    `propagate_shapes` and `group_units` first). Writes `node.meta["fxpipe.cost"]`.
    Returns the CostTable; mutates only node.meta.

    Activation bytes are what autograd really keeps for backward (`saved_for_backward`):
    a node's output counts when some op saves it (or a view of it) or it is a model output,
    plus the buffers ops save beside their inputs (dropout masks, normalisation statistics).
    A residual add's output that only feeds another add is not kept, a GELU's input is.
    `fused_attention_dropout`: every device runs SDPA with dropout in a fused kernel (CUDA;
    see `fused_attention_saved`).
    """
    saved_roots, extra = saved_for_backward(gm, fused_attention_dropout=fused_attention_dropout)
    n = len(units)
    flops = [0.0] * n
    nbytes = [0.0] * n
    launches = [0] * n
    pbytes = [0.0] * n
    tbytes = [0.0] * n
    abytes = [0.0] * n
    nf: list[list[float]] = [[] for _ in range(n)]
    nb: list[list[float]] = [[] for _ in range(n)]
    seen_params: set[int] = set()
    users: dict[int, tuple[torch.Tensor, set[int]]] = {}  # id -> (tensor, units reading it)
    for node in gm.graph.nodes:
        if node.op not in COMPUTE_OPS:
            continue
        u = node.meta[UNIT]
        view = _is_view(node)
        out_b = value_bytes(node.meta.get(VAL))
        in_b = sum(value_bytes(a.meta.get(VAL)) for a in node.all_input_nodes if a.op != "get_attr")
        p_b, t_b = 0.0, 0.0
        for _, p in _node_params(gm, node):
            users.setdefault(id(p), (p, set()))[1].add(u)
            if id(p) not in seen_params:
                seen_params.add(id(p))
                b = p.numel() * p.element_size()
                p_b += b
                t_b += b if isinstance(p, torch.nn.Parameter) and p.requires_grad else 0.0
        if node.op == "call_module":
            in_b += p_b  # a leaf module reads its own weights
        else:
            in_b += sum(value_bytes(a.meta.get(VAL)) for a in node.all_input_nodes if a.op == "get_attr")
        f = float(node.meta.get(FLOPS, 0) or 0)
        moved = 0.0 if view else in_b + out_b
        if f == 0 and not view and isinstance(node.meta.get(VAL), torch.Tensor):
            f = float(node.meta[VAL].numel())  # elementwise: one op per output element
        is_tensor_op = isinstance(node.meta.get(VAL), torch.Tensor) or node.op == "call_module"
        kept = out_b if node in saved_roots else 0.0
        cost = NodeCost(f, moved, p_b, 0.0 if view or not is_tensor_op else kept + extra.get(node, 0.0),
                        1 if is_tensor_op else 0)
        node.meta[COST] = cost
        flops[u] += cost.flops
        nbytes[u] += cost.bytes
        launches[u] += cost.launches
        pbytes[u] += cost.param_bytes
        tbytes[u] += t_b
        abytes[u] += cost.activation_bytes
        nf[u].append(cost.flops)
        nb[u].append(cost.bytes)
    shared = []
    for p, us in users.values():
        if len(us) > 1:
            b = float(p.numel() * p.element_size())
            shared.append(SharedTensor(b, b if isinstance(p, torch.nn.Parameter) and p.requires_grad else 0.0,
                                       tuple(sorted(us))))
    return CostTable(units.names, tuple(flops), tuple(nbytes), tuple(launches), tuple(pbytes), tuple(tbytes),
                     tuple(abytes), boundary_bytes(gm, n), tuple(map(tuple, nf)), tuple(map(tuple, nb)),
                     backward_transients(gm, n), split_kept_gradients(gm, n), tuple(shared), cut_bytes(gm, n))
