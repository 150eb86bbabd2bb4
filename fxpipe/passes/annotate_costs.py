"""Costs: per node FLOPs, bytes moved, parameter and activation bytes; per unit, time on a device.

Time of a node on a device is a roofline, max(flops / peak, bytes / bandwidth), plus the
device's per-op launch overhead; backward is priced at twice the forward (two matmuls per
forward matmul). A `CostTable` aggregates nodes into units and records, for every cut between
units, the bytes that cross it: the numbers the partitioner decides on and the plan file keeps.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxpipe.compiler.cluster import Device
from fxpipe.compiler.repeat_capture import TEMPLATE
from fxpipe.passes.group_units import COMPUTE_OPS, UNIT, Units
from fxpipe.passes.propagate_shapes import FLOPS, VAL, mha_fastpath_off, same_inputs, template_of

__all__ = ["NodeCost", "SharedTensor", "CostTable", "annotate_costs", "backward_transients", "split_kept_gradients", "cut_bytes", "stage_transient",
           "fused_attention_saved",
           "COST", "BWD_FACTOR", "value_bytes", "device_key", "device_unit_times", "device_offload_unit_times"]

COST = "fxpipe.cost"
BWD_FACTOR = 2.0  # backward ~ 2x forward: grad wrt input and grad wrt weight


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


def device_key(dev: Device) -> str:
    """What measured times are keyed by: devices with one key run a unit equally fast
    (CPU workers with the same thread count; a CUDA device by its name)."""
    return f"cpu/{dev.threads}t" if dev.kind == "cpu" else dev.name


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


def live_ranges(gm: fx.GraphModule, n_units: int) -> dict[fx.Node, tuple[int, int]]:
    """For every value made by a compute node: (producer unit, last unit that reads it).

    A model output counts as read by a virtual unit n (it must reach the last stage). Model
    inputs and parameters are delivered to each stage directly, so they have no range.
    """
    out: dict[fx.Node, tuple[int, int]] = {}
    for node in gm.graph.nodes:
        if node.op not in COMPUTE_OPS:
            continue
        src = node.meta[UNIT]
        last = src
        for user in node.users:
            last = max(last, n_units if user.op == "output" else user.meta[UNIT])
        out[node] = (src, last)
    return out


def boundary_bytes(gm: fx.GraphModule, n_units: int) -> tuple[float, ...]:
    """Bytes crossing the cut after unit k, for k = 0..n-2 (forwarded skips count at each cut)."""
    diff = [0.0] * (n_units + 1)
    for node, (src, last) in live_ranges(gm, n_units).items():
        if last > src:
            b = value_bytes(node.meta.get(VAL))
            diff[src] += b
            diff[min(last, n_units)] -= b
    out, run = [], 0.0
    for k in range(n_units - 1):
        run += diff[k]
        out.append(run)
    return tuple(out)


def cut_bytes(gm: fx.GraphModule, n_units: int) -> tuple[float, ...]:
    """Per unit, bytes of the values made inside it and last read inside it that are live
    across one of its nodes reading a parameter. The weight streamer may start a streamed
    unit before any such node (runtime/offload.py groups them by module and size), and a
    recomputing offloaded stage checkpoints each streamed unit (runtime/unit_recompute.py), so
    these are the most bytes it can keep per microbatch inside the unit, whatever the
    grouping; values read in later units are in `boundary_bytes` already."""
    nodes = [n for n in gm.graph.nodes if n.op in COMPUTE_OPS]
    pos = {n: i for i, n in enumerate(nodes)}
    readers: list[list[int]] = [[] for _ in range(n_units)]  # positions of weight-reading nodes per unit
    for n in nodes:
        if any(isinstance(t, torch.nn.Parameter) for _, t in _node_params(gm, n)):
            readers[n.meta[UNIT]].append(pos[n])
    out = [0.0] * n_units
    for node, (src, last) in live_ranges(gm, n_units).items():
        if last != src or not readers[src]:
            continue
        last_pos = max((pos[u] for u in node.users if u in pos), default=-1)
        k = bisect.bisect_right(readers[src], pos[node])  # the first reader after the node
        if k < len(readers[src]) and readers[src][k] <= last_pos:
            out[src] += value_bytes(node.meta.get(VAL))
    return tuple(out)


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


def device_unit_times(table: CostTable, devices: Sequence[Device], train: bool) -> list[list[float]]:
    """unit x device matrix of seconds per microbatch."""
    # Devices priced alike (same roofline, no measured times of their own) share one column:
    # a 64-GPU cluster prices each unit once, not 64 times, for every order placement tries.
    columns: dict[tuple, list[float]] = {}
    per_device = []
    for d in devices:
        key = (device_key(d) if table.measured_for(d) is not None else None, d.peak_flops, d.mem_bandwidth,
               d.launch_overhead)
        if key not in columns:
            columns[key] = [table.unit_time(u, d, train) for u in range(len(table.unit_names))]
        per_device.append(columns[key])
    return [[col[u] for col in per_device] for u in range(len(table.unit_names))]


def device_offload_unit_times(table: CostTable, devices: Sequence[Device], train: bool,
                              plain: Sequence[Sequence[float]] | None = None) -> list[list[float]]:
    """unit x device matrix of seconds per microbatch when the unit's stage streams its
    weights from host memory: ``max(fwd, w / host_bandwidth)`` (+ ``max(bwd, w /
    host_bandwidth)`` when training). Written as `device_unit_times`' entry (`plain`, when the
    caller has it already) plus the copy time the compute cannot hide, so an entry is never
    below the plain one by rounding."""
    n = len(table.unit_names)
    if plain is None:
        plain = device_unit_times(table, devices, train)
    columns: dict[tuple, list[float]] = {}  # devices priced alike share a column (as device_unit_times)
    out = [list(row) for row in plain]
    for j, d in enumerate(devices):
        measured = table.measured_for(d)
        key = (device_key(d) if measured is not None else None, d.peak_flops, d.mem_bandwidth,
               d.launch_overhead, d.host_bandwidth)
        if key not in columns:
            col = []
            for u in range(n):
                w = table.weight_stream_time(u, d)
                f = table.fwd_time(u, d)
                b = measured[1][u] if measured is not None else f * BWD_FACTOR  # = bwd_time, priced once
                col.append(max(0.0, w - f) + (max(0.0, w - b) if train else 0.0))
            columns[key] = col
        for u in range(n):
            out[u][j] = plain[u][j] + columns[key][u]
    return out
