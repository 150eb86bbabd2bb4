"""Shape propagation on the meta device: shapes, dtypes and FLOPs on every node, no compute.

Everything runs on `meta` tensors (inputs, parameters and buffers are replaced by meta
stand-ins), so a model built on the meta device, too big for this machine, propagates the
same way as a small real one. FLOPs come from torch's own FlopCounterMode, which counts
matmul, convolution and attention exactly.

One exception: a leaf module (`leaf_modules=`) whose output shape depends on its inputs'
values (an LSTM over `pack_padded_sequence(x, lengths)`) cannot run on meta. When the model
and the example inputs are real, such a node runs for real once, after the graph's prefix
(the model's buffers and RNG state are restored); on a meta model it is a TraceError that
says so.
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
        state = {k: _to_meta(v) for k, v in mod.named_parameters()}
        # a 0-d count stays real: BatchNorm(momentum=None) in training mode divides by
        # float(num_batches_tracked), which a meta tensor cannot give (its value is irrelevant
        # to shapes; 1, not 0, so the division works)
        state.update({k: torch.ones((), dtype=v.dtype) if v.dim() == 0 and not v.is_floating_point() else _to_meta(v)
                      for k, v in mod.named_buffers()})
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


class _StopAt(Exception):
    pass


class _RealPrefix(fx.Interpreter):
    """Runs a graph on its real tensors up to (not including) one node, keeping every value."""

    def __init__(self, gm: fx.GraphModule, stop: fx.Node):
        super().__init__(gm, garbage_collect_values=False)
        self.stop = stop

    def run_node(self, n: fx.Node) -> Any:
        if n is self.stop:
            raise _StopAt
        return super().run_node(n)


def _real_leaf_call(gm: fx.GraphModule, n: fx.Node, real_inputs: Sequence[Any],
                    counter: FlopCounterMode) -> tuple[Any, int]:
    """(output, FLOPs) of leaf module node `n` run on real values: the graph's prefix runs on
    the real example inputs first. For leaf modules whose output shape depends on input values
    (pack_padded_sequence reads its lengths), which meta tensors do not have. The caller's
    model is left as it was: buffers a training-mode forward updates are restored and the
    random number generators rewound."""
    buffers = [(b, b.detach().clone()) for b in gm.buffers()]
    try:
        with torch.random.fork_rng(devices=[]):
            prefix = _RealPrefix(gm, n)
            try:
                prefix.run(*real_inputs)
            except _StopAt:
                pass
            args, kwargs = prefix.fetch_args_kwargs_from_env(n)
            mod = gm.get_submodule(n.target)
            before = counter.get_total_flops()
            out = mod(*args, **kwargs)
            return out, counter.get_total_flops() - before
    finally:
        for b, saved in buffers:
            b.copy_(saved)


def _all_real(gm: fx.GraphModule, inputs: Sequence[Any]) -> bool:
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    tensors += list(gm.parameters()) + list(gm.buffers())
    return all(not t.is_meta for t in tensors)


class _MetaInterpreter(_MetaRunner):
    def __init__(self, gm: fx.GraphModule, real_inputs: Sequence[Any] | None = None):
        super().__init__(gm)
        # the example inputs as given, when they and the model hold real values: the fallback
        # for leaf modules meta cannot run (`_real_leaf_call`)
        self.real_inputs = real_inputs if real_inputs is not None and _all_real(gm, real_inputs) else None
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
            flops = self.counter.get_total_flops() - before
        except Exception as e:
            if n.op == "call_module" and self.real_inputs is not None:
                # a leaf module reading its input values: run it (and what feeds it) for real
                try:
                    real, flops = _real_leaf_call(self.module, n, self.real_inputs, self.counter)
                except Exception:
                    raise self._failed(n, e, leaf=True) from e
                out = pytree.tree_map(_to_meta, real)
            else:
                raise self._failed(n, e, leaf=n.op == "call_module") from e
        n.meta[VAL] = pytree.tree_map(lambda v: v if not isinstance(v, torch.Tensor) else _to_meta(v), out)
        n.meta[FLOPS] = flops
        return out

    def _failed(self, n: fx.Node, e: Exception, leaf: bool) -> TraceError:
        where = f"\n  from {n.stack_trace.strip().splitlines()[-1]}" if n.stack_trace else ""
        why = (f"\n  {n.target!r} is a leaf module: shape propagation runs it on meta tensors, which have no "
               "values; if it reads its inputs' values (pack_padded_sequence lengths, .item(), .tolist()), plan "
               "with a real model and real example inputs (then it runs for real once), or do not make it a leaf "
               "module" if leaf and self.real_inputs is None else "")
        msg = str(e).splitlines()[0] if str(e) else ""
        if _reads_values(e):
            hint = ("\n  Ops whose output shape depends on tensor values (nonzero, item, boolean masks) cannot be "
                    "planned ahead; rewrite them with static shapes or keep them outside the pipelined model.")
        else:  # a shape mismatch fails the same way on real tensors: the inputs do not fit the model
            hint = ("\n  The op fails on these shapes: check that the example inputs fit the model (the model "
                    "called on them eagerly, model(*example_inputs), fails the same way); shapes here are one "
                    "microbatch's.")
        return TraceError(f"shape propagation failed at node {n.format_node()}: {type(e).__name__}: {msg}"
                          f"{where}{why}{hint}")


def _reads_values(e: BaseException) -> bool:
    """Whether an error on meta tensors came from reading values they do not have."""
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, NotImplementedError) or any(k in text for k in (
        "meta tensor", "data-dependent", "data dependent", "no data", ".item()", "item()", "nonzero",
        "unbacked", "guardondatadependent", "cannot copy out of meta"))


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
    interp = _MetaInterpreter(gm, example_inputs)
    with torch.no_grad(), mha_fastpath_off(), interp.counter:
        interp.run(*[_to_meta(x) for x in example_inputs])
    return gm
