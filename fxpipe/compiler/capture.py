"""Capture: an `nn.Module` and example inputs -> one flat fx graph.

torch.fx `symbolic_trace` is tried first; when it cannot trace (data-dependent control flow,
decorated forwards as in `transformers` 5.x) `torch.export` (non-strict, batch dimension
dynamic) takes over, whose graph is fx too. Either way the result is normalised to the same
shape so later passes never ask which path was used:

* placeholders are the model's tensor inputs, in signature order (`Captured.input_names`);
  non-tensor arguments are baked in as constants (`Captured.constants`);
* the output node returns a flat tuple; `Captured.out_spec` rebuilds the user's structure
  (tensor, tuple, dict, HF ModelOutput);
* parameters and buffers are `get_attr` nodes whose targets are the original state_dict keys.

Deep models whose parameters are on the meta device (or with `method="repeat"`) are captured
by repetition (`compiler/repeat_capture.py`): two of their identical blocks are traced and
the second is copied for the others, which gives the same graph in a fraction of the time.

This module holds the tracing; around it: `call_binding` (a call -> the forward's arguments,
the batch size), `capture_checks` (the graph re-run at a second batch size, values then
gradients), `capture_modes` (train/eval modes the graph fixed), `capture_errors` (the message
when every path fails) and `sample_independence` (`samples_mixed`, asked by the pipeline;
`bind_inputs` and `samples_mixed` are still importable from here).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from fxpipe.compiler.call_binding import batch_size, bind_inputs, same_constant
from fxpipe.compiler.capture_checks import check_second_size
from fxpipe.compiler.capture_errors import explain_failure, first_line
from fxpipe.compiler.capture_modes import depends_on_modes, fixed_modes
from fxpipe.compiler.grad_check import keep_autograd_functions
from fxpipe.compiler.repeat_capture import KEEP, RepeatUnsupported, find_block_list, replicate_blocks, truncated_model
from fxpipe.compiler.sample_independence import samples_mixed
from fxpipe.errors import TraceError

__all__ = ["Captured", "capture", "bind_inputs", "samples_mixed"]


@dataclass
class Captured:
    """A model captured as a flat fx graph (see module docstring for the conventions)."""

    gm: fx.GraphModule
    path: str  # "fx" or "export"
    input_names: tuple[str, ...]
    constants: dict[str, Any]
    out_spec: pytree.TreeSpec
    signature: inspect.Signature
    batch_size: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    fingerprint: str = ""  # set by the pipeline: hash of the graph as captured
    repeated: str = ""  # how the repeat path built the graph ("" for a full capture)
    # train/eval mode at capture of the modules whose mode the graph fixed (see check_modes):
    # every module under torch.export (dropout on or off, BatchNorm batch or running
    # statistics are baked in); under fx, the modules it traced through when some forward
    # reads `self.training` (`mode_dependent`)
    modes: dict[str, bool] = field(default_factory=dict)
    # fx only: tracing with every module's mode flipped gave another graph, i.e. a forward fx
    # traced through branches on `self.training` (or passes it on: F.dropout(x, training=...))
    mode_dependent: bool = False

    def batch_free_outputs(self) -> tuple[bool, ...]:
        """Per flat output, whether it is computed from no model input (a parameter returned
        as is, a table made from weights only): the same for every microbatch, so inference
        returns it once instead of concatenating it, whatever its dim 0 happens to be."""
        reads_input: set[fx.Node] = set()
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" or any(i in reads_input for i in node.all_input_nodes):
                reads_input.add(node)
        out = next(n for n in reversed(self.gm.graph.nodes) if n.op == "output").args[0]
        return tuple(not (isinstance(v, fx.Node) and v in reads_input) for v in out)

    def check_modes(self, model: nn.Module) -> None:
        """RuntimeMismatchError when `model.train()`/`model.eval()` changed the mode of a
        module whose mode the graph fixed (`modes`): the call would silently compute the old
        mode. An fx graph calls nn.Dropout / nn.BatchNorm as modules, which follow their
        current mode, so only the modules fx traced through are checked, and only when some
        forward among them reads `self.training` (`mode_dependent`)."""
        if not self.modes:
            return
        from fxpipe.errors import RuntimeMismatchError

        for name, mod in model.named_modules():
            was = self.modes.get(name)
            if was is not None and mod.training != was:
                mode = lambda t: "train" if t else "eval"  # noqa: E731
                why = ("the fx graph took that mode as a constant (a forward fx traced through reads "
                       "`self.training` and only the branch taken then was kept, or fuse=True fused its dropout)"
                       if self.path == "fx" else
                       f"its {self.path} graph fixed that mode (dropout, BatchNorm statistics)")
                raise RuntimeMismatchError(
                    f"module {name or type(model).__name__!r} is in {mode(mod.training)} mode but was in "
                    f"{mode(was)} mode when compiled; {why}, so this call would not equal the model's. Call "
                    f"model.{mode(was)}() before using this compiled model, or compile the model again in "
                    f"{mode(mod.training)} mode for {mode(mod.training)} calls")

    def flat_inputs(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The tensors to feed the graph, from a call like the user's `model(*args, **kwargs)`."""
        bound = bind_inputs(self.signature, args, kwargs)
        from fxpipe.errors import RuntimeMismatchError

        missing = [n for n in self.input_names if n not in bound]
        if missing:
            raise RuntimeMismatchError(
                f"the model was compiled with tensor inputs {list(self.input_names)} but this call "
                f"does not give {missing}; call it with the same arguments as example_inputs")
        for name, value in bound.items():
            if name in self.constants and not same_constant(value, self.constants[name]):
                raise RuntimeMismatchError(
                    f"argument {name!r} was {self.constants[name]!r} when the model was compiled and is "
                    f"{value!r} now; non-tensor arguments are baked into the graph: recompile to change it")
            if name not in self.constants and name not in self.input_names and value is not None:
                raise RuntimeMismatchError(
                    f"argument {name!r} was not given when the model was compiled; recompile with it in example_inputs")
        out = []
        for n in self.input_names:
            v = bound[n]
            if not isinstance(v, torch.Tensor):
                raise RuntimeMismatchError(f"argument {n!r} must be a tensor (it was one at compile time), got {type(v).__name__}")
            out.append(v)
        return out



def capture(
    model: nn.Module,
    example_args: tuple = (),
    example_kwargs: dict | None = None,
    *,
    method: str = "auto",
    leaf_modules: tuple[type, ...] = (),
    check: bool = True,
) -> Captured:
    """Trace `model` into a flat fx graph; fx first, torch.export when fx cannot.

    Args:
        model: the module to capture (not modified).
        example_args / example_kwargs: a real call; tensors' dim 0 is the batch.
        method: "auto" (fx then export; by repetition for a model on the meta device when
            it has a list of identical blocks), "fx", "export", or "repeat" (by repetition,
            TraceError when the model has no list of identical blocks).
        leaf_modules: module types fx keeps as single call_module nodes.
        check: re-run the graph at a second batch size and compare with eager (skipped for
            models on the meta device), so a silently specialised graph is caught here.

    Example:
        >>> cap = capture(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
        >>> cap.path, cap.input_names
        ('fx', ('input',))
    """
    example_kwargs = dict(example_kwargs or {})
    if method not in ("auto", "fx", "export", "repeat"):
        raise TraceError(f"capture method must be 'auto', 'fx', 'export' or 'repeat', got {method!r}")
    sig = inspect.signature(model.forward)
    bound = bind_inputs(sig, tuple(example_args), example_kwargs)
    tensors = {k: v for k, v in bound.items() if isinstance(v, torch.Tensor)}
    constants = {k: v for k, v in bound.items() if not isinstance(v, torch.Tensor)}
    nested = [k for k, v in constants.items() if not isinstance(v, torch.Tensor)
              and any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(v))]
    if nested:  # they would be baked into the graph as constants: the example batch, forever
        raise TraceError(
            f"{type(model).__name__}.forward argument(s) {', '.join(repr(k) for k in nested)} hold tensors inside a "
            f"{type(constants[nested[0]]).__name__}; fxpipe splits and feeds tensors that are arguments themselves: "
            "give them as separate arguments (e.g. forward(self, input_ids, attention_mask) called with "
            "example_inputs={'input_ids': ..., 'attention_mask': ...}), or wrap the model in a module that "
            "takes them so and builds the container")
    if not tensors:
        raise TraceError("example_inputs contain no tensor: give at least one input tensor whose dim 0 is the batch")
    batch = batch_size(tensors)
    on_meta = any(p.is_meta for p in model.parameters()) or any(t.is_meta for t in tensors.values())
    t0 = time.perf_counter()
    skipped = ""
    # A model on meta cannot be checked against eager and is the huge-model case: capture it
    # by repetition. A real model keeps the full capture unless asked, since its batch-1
    # check validates exactly what it traced.
    if method == "repeat" or (method == "auto" and any(p.is_meta for p in model.parameters())):
        try:
            cap = _capture_repeated(model, leaf_modules, check and not on_meta, tensors, constants)
            cap.seconds = time.perf_counter() - t0
            cap.modes = fixed_modes(model, cap)
            return cap
        except Exception as e:  # noqa: BLE001 - any failure of the shortcut means: capture it all
            if method == "repeat":
                why = str(e) if isinstance(e, RepeatUnsupported) else first_line(e)
                raise TraceError(
                    f"capture_method='repeat' cannot capture {type(model).__name__}: {why}. It needs a "
                    "ModuleList/Sequential of >= 4 identical blocks traced the same way; use capture_method="
                    "'auto' to capture the whole model") from e
            skipped = f"repeat capture not used ({first_line(e)}); captured the whole model"
        method = "auto"
    try:
        cap = _capture_full(model, sig, tensors, constants, batch, method, leaf_modules, check and not on_meta)
    except TraceError as first:
        # A model on meta called with CPU inputs: export fails wherever an input meets a weight
        # without an embedding in between (Whisper's and Wav2Vec2's convolutions, CLIP's and
        # Swin's patch embeddings: "Tensor on device meta is not on the expected device cpu").
        # Inputs on meta trace those; they are only a second try, since a forward that reads
        # an input's values (a mask check) needs the real ones.
        if not any(p.is_meta for p in model.parameters()) or all(t.is_meta for t in tensors.values()):
            raise
        meta_tensors = {k: v.to("meta") for k, v in tensors.items()}
        try:
            cap = _capture_full(model, sig, meta_tensors, constants, batch, method, leaf_modules, check=False)
        except TraceError:
            raise first from None
        cap.notes.append(f"captured with the example inputs on the meta device ({first_line(first)} with them "
                         "on their own device)")
    if skipped:
        cap.notes.append(skipped)
    cap.modes = fixed_modes(model, cap)
    return cap


def _capture_full(model: nn.Module, sig: inspect.Signature, tensors: dict[str, torch.Tensor],
                  constants: dict[str, Any], batch: int, method: str, leaf_modules: tuple[type, ...],
                  check: bool) -> Captured:
    """Trace the whole model: fx, then export (method "auto"), or the one path asked for."""
    t0 = time.perf_counter()
    errors: dict[str, BaseException] = {}
    # transformers caches are outputs no pipeline wants, and export cannot flatten them.
    restore = _disable_hf_cache(model)
    try:
        for path in (("fx", "export") if method == "auto" else (method,)):
            try:
                if path == "fx":
                    gm, out_spec = _trace_fx(model, tensors, constants, leaf_modules)
                else:
                    gm, out_spec = _trace_export(model, tensors, constants)
            except Exception as e:  # any tracer failure is a reason to try the next path
                errors[path] = e
                continue
            cap = Captured(gm, path, tuple(tensors), constants, out_spec, sig, batch,
                           time.perf_counter() - t0)
            if path == "fx":
                cap.mode_dependent = depends_on_modes(
                    model, lambda: _trace_fx(model, tensors, constants, leaf_modules)[0], gm.code)
            if check:
                problem = check_second_size(model, cap, tensors, constants)
                if problem:
                    errors[path] = TraceError(problem)
                    continue
            if "fx" in errors:
                cap.notes.append(f"fx symbolic_trace failed ({first_line(errors['fx'])}); used torch.export")
            return cap
    finally:
        restore()
    raise TraceError(explain_failure(model, errors))


def _capture_repeated(model: nn.Module, leaf_modules: tuple[type, ...], check: bool,
                      tensors: dict[str, torch.Tensor], constants: dict[str, Any]) -> Captured:
    """Capture the first KEEP blocks (fx, else export) and replicate block 1 for the rest."""
    blocks = find_block_list(model)
    small = truncated_model(model, blocks, KEEP)
    cap = _capture_full(small, inspect.signature(small.forward), tensors, constants, batch_size(tensors), "auto",
                        leaf_modules, check=False)
    cap.gm = replicate_blocks(cap.gm, model, blocks, KEEP)
    where = blocks.path or type(model).__name__
    cap.repeated = f"repeat: {KEEP} of {len(blocks.keys)} blocks of {where} traced"
    cap.notes.append(f"captured {KEEP} of the {len(blocks.keys)} identical blocks of {where} and copied block "
                     f"{blocks.keys[1]} for the others")
    if check:  # a real model: the replicated graph must agree with the whole model's eager run
        problem = check_second_size(model, cap, tensors, constants)
        if problem:
            raise RepeatUnsupported(problem)
    return cap


# ---- fx ---------------------------------------------------------------------------------

class _LeafTracer(fx.Tracer):
    # Buffers read as attributes are proxies (get_attr nodes), as parameters are: otherwise
    # fx hands `self.ema` to the forward as the real tensor, so `self.ema.mul_(0.9)` runs once
    # at trace time on the user's buffer and is missing from the graph.
    proxy_buffer_attributes = True

    def __init__(self, leaves: tuple[type, ...]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def _trace_fx(model, tensors, constants, leaf_modules):
    tracer = _LeafTracer(tuple(leaf_modules))
    with keep_autograd_functions(tracer):  # a custom Function's backward is not its forward's
        graph = tracer.trace(model, concrete_args=dict(constants) or None)
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "placeholder":
            continue
        name = node.target.lstrip("*")
        base = name.rsplit("_", 1)[0] if name not in tensors and name not in constants else name
        if name in tensors:
            continue
        value = constants.get(name, constants.get(base, node.args[0] if node.args else None))
        node.replace_all_uses_with(value) if node.users else None
        g.erase_node(node)
    # placeholders in signature order
    ph = {n.target: n for n in g.nodes if n.op == "placeholder"}
    if set(ph) != set(tensors):
        raise TraceError(f"fx placeholders {sorted(ph)} do not match the tensor inputs {sorted(tensors)}")
    out_node = next(n for n in g.nodes if n.op == "output")
    leaves, spec = pytree.tree_flatten(_expand_dataclass_outputs(out_node.args[0], type(model).__name__))
    out_node.args = (tuple(leaves),)
    for node in reversed(list(g.nodes)):  # the dataclass-building nodes it bypassed (not a general
        # dead-code pass: that would drop in-place buffer updates, whose results nothing reads)
        if node.op == "call_function" and isinstance(node.target, type) and is_dataclass(node.target) and not node.users:
            g.erase_node(node)
    _reorder_placeholders(g, list(tensors))
    g.lint()
    gm.recompile()
    return gm, spec


def _expand_dataclass_outputs(value: Any, model_name: str) -> Any:
    """The output structure with each dataclass the forward builds spelled out field by field.

    fx records `return Out(a=x, b=y)` as ONE call_function node that builds the dataclass, so
    the flattened output would be a single opaque value: microbatch results could not be
    concatenated (the first microbatch's would be returned) and the batch-size check would see
    no tensors. A dataclass known to pytree (`torch.export.register_dataclass`, transformers'
    ModelOutputs) is rebuilt around its field nodes so its tensors become output leaves and
    `out_spec` rebuilds the user's type; an unregistered one is refused (export refuses it too).
    """
    def expand(v: Any) -> Any:
        if not (isinstance(v, fx.Node) and v.op == "call_function" and isinstance(v.target, type)
                and is_dataclass(v.target)):
            return v
        cls = v.target
        if cls not in pytree.SUPPORTED_NODES:
            raise TraceError(
                f"{model_name}.forward returns a {cls.__qualname__} dataclass, which torch's pytree cannot flatten, so "
                f"its tensors cannot be concatenated over microbatches; register it once before compiling "
                f"(torch.export.register_dataclass({cls.__qualname__})) or return a tuple or dict")
        if v.args:
            raise TraceError(f"{model_name}.forward builds its {cls.__qualname__} output with positional arguments "
                             f"fx cannot map to fields; build it with keywords")
        return cls(**{k: pytree.tree_map(expand, a) for k, a in v.kwargs.items()})

    return pytree.tree_map(expand, value)


# ---- torch.export ----------------------------------------------------------------------

def _trace_export(model, tensors, constants):
    from torch.export import Dim

    kwargs = {**tensors, **constants}
    dyn = {k: ({0: Dim.AUTO} if k in tensors and tensors[k].dim() > 0 else None) for k in kwargs}
    params = inspect.signature(model.forward).parameters
    named = {n for n, q in params.items() if q.kind not in (q.VAR_KEYWORD, q.VAR_POSITIONAL)}
    with _named_forward(model, list(kwargs)) if set(kwargs) - named else contextlib.nullcontext():
        ep = torch.export.export(model, (), kwargs, dynamic_shapes=dyn, strict=False)
    gm = ep.module()
    g = gm.graph
    out_spec = gm._out_spec if hasattr(gm, "_out_spec") else g._codegen.pytree_info.out_spec
    g._codegen = fx.graph.CodeGen()  # plain positional calling convention, flat outputs
    for node in list(g.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            g.erase_node(node)  # input guards; we check inputs ourselves
    for node in list(g.nodes):
        if node.op == "placeholder" and node.target not in tensors:
            node.replace_all_uses_with(constants.get(node.target)) if node.users else None
            g.erase_node(node)
    out_node = next(n for n in g.nodes if n.op == "output")
    leaves = out_node.args[0]
    out_node.args = (tuple(leaves) if isinstance(leaves, (list, tuple)) else (leaves,),)
    _reorder_placeholders(g, list(tensors))
    g.lint()
    # A fresh GraphModule drops export's pytree calling hooks; it keeps only what g uses.
    return fx.GraphModule(gm, g, type(model).__name__), out_spec


@contextlib.contextmanager
def _named_forward(model: nn.Module, names: list[str]) -> Iterator[None]:
    """`model.forward` seen by export with one named parameter per argument given.

    Arguments that land in a `**kwargs` (transformers 5: output_hidden_states, return_dict)
    need dynamic_shapes nested under that name, which torch.export (2.13) then fails to match
    ("Must provide a tree_name"); an instance attribute with a flat signature sidesteps it and
    keeps every parameter's name (the module itself is what export traces)."""
    had = "forward" in model.__dict__
    orig = model.forward

    def forward(**kw: Any) -> Any:
        return orig(**kw)

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    model.forward = forward
    try:
        yield
    finally:
        if had:
            model.forward = orig
        else:
            del model.forward


def _reorder_placeholders(g: fx.Graph, order: list[str]) -> None:
    ph = {n.target: n for n in g.nodes if n.op == "placeholder"}
    anchor = None
    for name in order:
        node = ph[name]
        if anchor is None:
            next(iter(g.nodes)).prepend(node)
        else:
            anchor.append(node)
        anchor = node


def _disable_hf_cache(model: nn.Module) -> Callable[[], None]:
    # A composite model (LLaVA: vision tower + language model) keeps use_cache in a sub-config
    # (config.text_config) and its submodules hold their own configs: switch every one off.
    seen: dict[int, Any] = {}
    todo = [getattr(m, "config", None) for m in model.modules()]
    while todo:
        cfg = todo.pop()
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "to_dict"):
            continue
        seen[id(cfg)] = cfg
        todo += [v for v in vars(cfg).values() if hasattr(v, "to_dict") and hasattr(v, "use_cache")]
    switched = [c for c in seen.values() if getattr(c, "use_cache", False) is True]
    for cfg in switched:
        cfg.use_cache = False

    def restore():
        for c in switched:
            c.use_cache = True

    return restore
