"""Shape propagation on the meta device: shapes, dtypes and FLOPs on every node, no compute.

Everything runs on `meta` tensors (inputs, parameters and buffers are replaced by meta
stand-ins), so a model built on the meta device, too big for this machine, propagates the
same way as a small real one. FLOPs come from torch's own FlopCounterMode, which counts
matmul, convolution and attention exactly.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from fxpipe.compiler.repeat_capture import TEMPLATE
from fxpipe.errors import TraceError

__all__ = ["propagate_shapes", "VAL", "FLOPS", "template_of", "same_inputs", "mha_fastpath_off"]

VAL = "fxpipe.val"  # meta tensor (or Python value) a node produces
FLOPS = "fxpipe.flops"  # floating-point operations of the node's forward


@contextlib.contextmanager
def mha_fastpath_off() -> Iterator[None]:
    """torch's fused fast path of nn.TransformerEncoder / nn.MultiheadAttention switched off.

    In eval mode without grad, TransformerEncoder first asks `_nested_tensor_from_mask_left_aligned`
    whether a src_key_padding_mask is left aligned: that op reads mask values and has no meta
    kernel, so a leaf TransformerEncoder could not be run on meta at all. The slow path gives
    the same shapes (the fast path pads its nested result back to the input's size) and the
    FLOPs the counter can see. Process-wide flag, so restored right after.
    """
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and not x.is_meta:
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    return x


def _as_meta_device(a: Any) -> Any:
    if isinstance(a, torch.device) and a.type != "meta":
        return torch.device("meta")
    if isinstance(a, str):
        try:
            return torch.device("meta") if torch.device(a).type != "meta" else a
        except RuntimeError:
            return a
    return a


def _meta_devices(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # Device arguments (factory ops, .to(device)) would otherwise make or copy real tensors.
    args = tuple(torch.device("meta") if isinstance(a, torch.device) else a for a in args)
    if "device" in kwargs:
        kwargs = {**kwargs, "device": torch.device("meta")}
    return args, kwargs


class _MetaRunner(fx.Interpreter):
    """Runs a graph on meta tensors: parameters, buffers and device arguments become meta."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self._meta_attrs: dict[str, Any] = {}

    def fetch_attr(self, target: str) -> Any:
        if target not in self._meta_attrs:
            self._meta_attrs[target] = _to_meta(super().fetch_attr(target))
        return self._meta_attrs[target]

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr_module(target)
        state = {k: _to_meta(v) for k, v in list(mod.named_parameters()) + list(mod.named_buffers())}
        return functional_call(mod, state, args, kwargs)

    def fetch_attr_module(self, target: str) -> torch.nn.Module:
        return fx.Interpreter.fetch_attr(self, target)

    def call_function(self, target, args, kwargs):
        args, kwargs = _meta_devices(args, kwargs)
        if isinstance(target, torch._ops.HigherOrderOperator):
            # torch.export wraps regions such as `torch.no_grad()` / autocast into a higher-order op
            # whose body is a GraphModule argument (HF rotary embeddings do this). The body has its
            # own baked-in devices and get_attr tensors, so it must run through a meta runner too.
            args = tuple(_MetaBody(a) if isinstance(a, fx.GraphModule) else a for a in args)
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if target in ("cpu", "cuda"):
            return args[0]  # stays on meta
        if target == "to":
            args = tuple(_as_meta_device(a) for a in args)
        args, kwargs = _meta_devices(args, kwargs)
        return super().call_method(target, args, kwargs)


class _MetaBody:
    """A higher-order op's body callable that runs on the meta device."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:  # bind keyword arguments to the body's placeholders by name
            names = [n.target for n in self.gm.graph.nodes if n.op == "placeholder"]
            args = (*args, *(kwargs[n] for n in names[len(args):]))
        return _MetaRunner(self.gm).run(*args)


class _MetaInterpreter(_MetaRunner):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.counter = FlopCounterMode(display=False)
        # fx would append "While executing ... Original traceback: None Use tlparse ..." to our
        # TraceError, which already names the node and its source line
        self.extra_traceback = False
        # copies of a repeated block (compiler/repeat_capture.py) name their template node
        self.by_name = {n.name: n for n in gm.graph.nodes} if any(
            TEMPLATE in n.meta for n in gm.graph.nodes) else {}

    def run_node(self, n: fx.Node) -> Any:
        t = template_of(n, self.by_name)
        if t is not None and VAL in t.meta and same_inputs(n, t):
            # the same op on inputs of the same shapes, dtypes and strides: the same result,
            # without dispatching it again (80 decoder layers: 78 of them come free)
            n.meta[VAL] = t.meta[VAL]
            n.meta[FLOPS] = t.meta.get(FLOPS, 0)
            return t.meta[VAL]
        before = self.counter.get_total_flops()
        try:
            out = super().run_node(n)
        except Exception as e:
            where = f"\n  from {n.stack_trace.strip().splitlines()[-1]}" if n.stack_trace else ""
            raise TraceError(
                f"shape propagation failed at node {n.format_node()}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                f"{where}\n  {_hint(e)}") from e
        n.meta[VAL] = pytree.tree_map(lambda v: v if not isinstance(v, torch.Tensor) else _to_meta(v), out)
        n.meta[FLOPS] = self.counter.get_total_flops() - before
        return out


def _hint(e: Exception) -> str:
    """What to do about an op that failed on meta tensors."""
    # an op with no meta kernel, or one reading values (nonzero, .item(), masks), fails on meta
    # tensors alone; anything else (a shape mismatch) fails the same way on real tensors
    if isinstance(e, NotImplementedError) or "meta" in str(e).lower():
        return ("Ops whose output shape depends on tensor values (nonzero, item, boolean masks) cannot be "
                "planned ahead; rewrite them with static shapes or keep them outside the pipelined model.")
    return ("The op fails on these shapes: check that the example inputs fit the model (the model called on "
            "them eagerly fails the same way); shapes here are one microbatch's.")


def template_of(n: fx.Node, by_name: dict[str, fx.Node]) -> fx.Node | None:
    """The node `n` was copied from by the repeat capture, if it still stands for `n` (same
    op, target and number of inputs; a later rewrite such as fusion may have replaced it).
    A copied `call_module` names its own block's module, which the capture checked has the
    template's class, parameter shapes and configuration."""
    name = n.meta.get(TEMPLATE) if by_name else None
    t = by_name.get(name) if name is not None else None
    if t is None or t is n or t.op != n.op or n.op == "get_attr":
        return None
    if t.target != n.target and n.op != "call_module":
        return None
    if len(t.all_input_nodes) != len(n.all_input_nodes):
        return None
    return t


def _same_meta(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.stride() == b.stride() and (a._base is None) == (b._base is None))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return (type(a) is type(b) and len(a) == len(b) and all(_same_meta(x, y) for x, y in zip(a, b)))
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def same_inputs(n: fx.Node, t: fx.Node) -> bool:
    """Whether `n`'s input nodes carry the same shapes, dtypes and strides as `t`'s
    (position by position), so that `t`'s per-node results hold for `n` too."""
    for a, b in zip(n.all_input_nodes, t.all_input_nodes):
        if a is b:
            continue
        if VAL not in a.meta or VAL not in b.meta or not _same_meta(a.meta[VAL], b.meta[VAL]):
            return False
    return True


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Annotate every node of `gm` with its output on the meta device and its FLOPs.

    Reads: the graph and its parameters' shapes. Writes `node.meta["fxpipe.val"]` and
    `node.meta["fxpipe.flops"]`. Mutates only `node.meta`; returns `gm`.

    A node copied from a template by the repeat capture (`meta["fxpipe.template"]`) whose
    inputs match the template's in shape, dtype and stride takes the template's results
    instead of running again.

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 2))
        >>> _ = propagate_shapes(gm, [torch.randn(3, 4)])
        >>> [tuple(n.meta[VAL].shape) for n in gm.graph.nodes if n.op == "call_module"]
        [(3, 2)]
    """
    interp = _MetaInterpreter(gm)
    with torch.no_grad(), mha_fastpath_off(), interp.counter:
        interp.run(*[_to_meta(x) for x in example_inputs])
    return gm
