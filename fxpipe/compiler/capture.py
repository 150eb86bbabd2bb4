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
"""

from __future__ import annotations

import contextlib
import inspect
import time
import traceback
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from fxpipe.compiler.grad_check import gradient_problem, keep_autograd_functions
from fxpipe.compiler.repeat_capture import KEEP, RepeatUnsupported, find_block_list, replicate_blocks, truncated_model
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
            if name in self.constants and not _same_constant(value, self.constants[name]):
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


def _same_constant(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return a is b


def bind_inputs(sig: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Bind a call to the model's forward signature (defaults not applied)."""
    try:
        ba = sig.bind(*args, **kwargs)
    except TypeError as e:
        from fxpipe.errors import RuntimeMismatchError

        raise RuntimeMismatchError(f"inputs do not match the model's forward{sig}: {e}") from None
    out = dict(ba.arguments)
    for name, p in sig.parameters.items():
        if p.kind == inspect.Parameter.VAR_KEYWORD and name in out:
            out.update(out.pop(name))
        elif p.kind == inspect.Parameter.VAR_POSITIONAL and name in out:
            if out[name]:
                from fxpipe.errors import RuntimeMismatchError

                raise RuntimeMismatchError(f"forward(*{name}) with positional varargs is not supported; pass them by name")
            out.pop(name)
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
    batch = _batch_size(tensors)
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
            cap.modes = _fixed_modes(model, cap)
            return cap
        except Exception as e:  # noqa: BLE001 - any failure of the shortcut means: capture it all
            if method == "repeat":
                why = str(e) if isinstance(e, RepeatUnsupported) else _first_line(e)
                raise TraceError(
                    f"capture_method='repeat' cannot capture {type(model).__name__}: {why}. It needs a "
                    "ModuleList/Sequential of >= 4 identical blocks traced the same way; use capture_method="
                    "'auto' to capture the whole model") from e
            skipped = f"repeat capture not used ({_first_line(e)}); captured the whole model"
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
        cap.notes.append(f"captured with the example inputs on the meta device ({_first_line(first)} with them "
                         "on their own device)")
    if skipped:
        cap.notes.append(skipped)
    cap.modes = _fixed_modes(model, cap)
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
                cap.mode_dependent = _mode_dependent(model, tensors, constants, leaf_modules, gm.code)
            if check:
                problem = _check_second_size(model, cap, tensors, constants)
                if problem:
                    errors[path] = TraceError(problem)
                    continue
            if "fx" in errors:
                cap.notes.append(f"fx symbolic_trace failed ({_first_line(errors['fx'])}); used torch.export")
            return cap
    finally:
        restore()
    raise TraceError(_explain(model, errors))


def _fixed_modes(model: nn.Module, cap: Captured) -> dict[str, bool]:
    """`Captured.modes`: every module's mode under export; under fx, when the graph depends
    on a mode, those of the modules fx traced through (a call_module node, and what is inside
    it, follows its current mode)."""
    named = list(model.named_modules())
    if cap.path != "fx":
        return {name: mod.training for name, mod in named}
    if not cap.mode_dependent:
        return {}
    called = {n.target for n in cap.gm.graph.nodes if n.op == "call_module"}
    return {name: mod.training for name, mod in named
            if not any(name == c or name.startswith(c + ".") for c in called)}


def _mode_dependent(model: nn.Module, tensors: dict[str, torch.Tensor], constants: dict[str, Any],
                    leaf_modules: tuple[type, ...], code: str) -> bool:
    """Whether fx's graph depends on the modules' train/eval modes: traced once more with
    every mode flipped, it differs. fx sees `self.training` as a plain bool, so a forward
    reading it is otherwise baked in unnoticed; one more trace is cheap next to the checks."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        for m, training in modes:
            m.training = not training  # the attribute, not .train(): that would set all alike
        try:
            other, _ = _trace_fx(model, tensors, constants, leaf_modules)
        except Exception:  # noqa: BLE001 - traceable in one mode only: it depends on the mode
            return True
        return other.code != code
    finally:
        for m, training in modes:
            m.training = training


def _capture_repeated(model: nn.Module, leaf_modules: tuple[type, ...], check: bool,
                      tensors: dict[str, torch.Tensor], constants: dict[str, Any]) -> Captured:
    """Capture the first KEEP blocks (fx, else export) and replicate block 1 for the rest."""
    blocks = find_block_list(model)
    small = truncated_model(model, blocks, KEEP)
    cap = _capture_full(small, inspect.signature(small.forward), tensors, constants, _batch_size(tensors), "auto",
                        leaf_modules, check=False)
    cap.gm = replicate_blocks(cap.gm, model, blocks, KEEP)
    where = blocks.path or type(model).__name__
    cap.repeated = f"repeat: {KEEP} of {len(blocks.keys)} blocks of {where} traced"
    cap.notes.append(f"captured {KEEP} of the {len(blocks.keys)} identical blocks of {where} and copied block "
                     f"{blocks.keys[1]} for the others")
    if check:  # a real model: the replicated graph must agree with the whole model's eager run
        problem = _check_second_size(model, cap, tensors, constants)
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


# ---- checks and messages ----------------------------------------------------------------

def _rows(t: torch.Tensor, rows: Any) -> torch.Tensor:
    """Samples `rows` of a batch input; a 0-d tensor (a temperature) is not batched, so whole,
    as the runtime passes it to every microbatch."""
    return t if t.dim() == 0 else t[rows]


def _batch_size(tensors: dict[str, torch.Tensor]) -> int:
    sizes = {k: t.shape[0] for k, t in tensors.items() if t.dim() > 0}
    if not sizes:
        raise TraceError("no input tensor has a batch dimension (dim 0); pipelining splits dim 0 into microbatches")
    values = set(sizes.values())
    if len(values) > 1:
        raise TraceError(f"input tensors disagree on the batch size (dim 0): {sizes}; every tensor input must be batch-first")
    return values.pop()


def _call_quietly(gm: fx.GraphModule, *args: Any) -> Any:
    """Call `gm` without fx's wrapper, which prints a traceback of the generated code to stderr
    before re-raising: a failure here is an expected answer of a check (the next capture path
    is tried), not something to show the user."""
    return nn.Module.__call__(gm, *args)


def _check_second_size(model, cap: Captured, tensors, constants) -> str | None:
    """Run the graph at a smaller batch and compare with eager: catches shapes baked in at trace time.

    Batch 1 first. A size that eager itself refuses (BatchNorm1d in training mode needs more
    than one value per channel) says nothing about the graph, so the next size is tried, and
    the check is skipped when eager accepts none of them.
    """
    for size in (s for s in (1, 2) if s < cap.batch_size):
        small = {k: _rows(v, slice(size)) for k, v in tensors.items()}
        # Both runs update buffers a training-mode model mutates (BatchNorm running stats and
        # num_batches_tracked); a check must leave the user's model as it found it.
        saved = _snapshot_buffers(model, cap.gm)
        try:
            # same seed for both runs: dropout in a training-mode model draws the same masks
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                try:
                    want = pytree.tree_leaves(model(**small, **constants))
                except Exception:
                    continue  # the model itself does not run at this size
                # The graph must start from the buffers eager started from: a forward that
                # updates a buffer it then reads (an EMA subtracted from the output) would
                # otherwise see eager's update and differ for no fault of the trace.
                _restore_buffers(saved)
                torch.manual_seed(0)
                try:
                    got = _call_quietly(cap.gm, *small.values())
                except Exception as e:
                    return (f"the {cap.path} graph fails at batch size {size} where the model runs ({_first_line(e)}): "
                            "shapes were specialised to the example batch")
        finally:
            _restore_buffers(saved)
        want = [w for w in want if isinstance(w, torch.Tensor)]
        got = [g for g in got if isinstance(g, torch.Tensor)]
        if len(got) != len(want):
            return f"the {cap.path} graph returns {len(got)} tensors where the model returns {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4):
                if _same_with_grad(model, small, constants, got):
                    return (f"{type(model).__name__} computes its output {i} differently under torch.no_grad than "
                            f"with gradients on (nn.TransformerEncoder's fast path in eval mode zeroes padded "
                            f"positions), and the {cap.path} graph follows the gradient path, so pipelined "
                            "inference would differ from eager's; switch the fast path off before compiling "
                            "(torch.backends.mha.set_fastpath_enabled(False): eager then computes the same "
                            "either way), or use capture_method='fx', which runs torch.nn modules as they are")
                return (f"the {cap.path} graph's output {i} differs from eager at batch size {size} (shape "
                        f"{tuple(a.shape)} vs {tuple(b.shape)}): the trace specialised on the example batch")
        # equal values can still differentiate differently (grad-mode regions, custom Functions)
        return _check_gradients(model, cap, small, constants)
    return None


def _check_gradients(model: nn.Module, cap: Captured, small: dict[str, torch.Tensor],
                     constants: dict[str, Any]) -> str | None:
    saved = _snapshot_buffers(model, cap.gm)

    def seeded(f: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:  # each run from the same buffers and RNG state, as the value check
            _restore_buffers(saved)
            torch.manual_seed(0)
            return f()
        return run

    try:
        with torch.random.fork_rng(devices=[]):
            return gradient_problem(model, cap.gm, cap.path, seeded(lambda: model(**small, **constants)),
                                    seeded(lambda: _call_quietly(cap.gm, *small.values())))
    finally:
        _restore_buffers(saved)


def _same_with_grad(model: nn.Module, small: dict[str, torch.Tensor], constants: dict[str, Any],
                    got: list[torch.Tensor]) -> bool:
    """Whether eager run with gradients on gives the graph's outputs `got`: then a mismatch
    under no_grad is the model's own grad-mode branch (a fused inference fast path), not a
    shape the trace baked in."""
    saved = _snapshot_buffers(model)
    try:
        with torch.enable_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            want = [w.detach() for w in pytree.tree_leaves(model(**small, **constants)) if isinstance(w, torch.Tensor)]
    except Exception:
        return False
    finally:
        _restore_buffers(saved)
    return len(want) == len(got) and all(
        a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4) for a, b in zip(got, want))


def samples_mixed(model: nn.Module, cap: Captured, args: tuple, kwargs: dict) -> str | None:
    """Why `model` does not compute the samples along dim 0 independently, or None.

    Microbatching is exact only for a model whose output for samples 0 and 1 together is its
    output for each alone, concatenated. A sequence-first model (nn.LSTM, nn.MultiheadAttention
    and nn.Transformer default to batch_first=False) passes every shape check with time as
    dim 0, and split into microbatches it silently computes something else. Eager runs, in
    eval mode (dropout off, BatchNorm on running statistics: neither is the model's doing), on
    samples (0, 1), on (1, 0), and on each alone. The swapped pair has the same shapes, so the
    same kernels and roundings: an independent model gives the same rows, in any dtype. The
    runs alone also catch a dependence on the batch size, but batch 1 may take other kernels,
    which in 16 bits round differently, so they are compared only in 32 bits and up. None also
    when that cannot be judged (meta tensors, a batch of 1, a model that refuses those sizes).
    An output with a dimension other than 0 that grows with the batch (CLIP's (batch, batch)
    `logits_per_image`, XLNet's (seq, batch, d) `mems`) is reported too: per-microbatch results
    are blocks of it, and their concatenation along dim 0 is the wrong shape and values. Only
    here, where m > 1 is asked for: with one microbatch nothing is concatenated, so such a
    model (a contrastive loss over the whole batch) compiles exactly.
    """
    bound = bind_inputs(cap.signature, args, kwargs)
    tensors = {k: v for k, v in bound.items() if isinstance(v, torch.Tensor)}
    if cap.batch_size < 2 or any(t.is_meta for t in tensors.values()) or any(q.is_meta for q in model.parameters()):
        return None
    modes = [(m, m.training) for m in model.modules()]
    saved = _snapshot_buffers(model)
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            runs = [pytree.tree_flatten_with_path(model(**{k: _rows(v, list(rows)) for k, v in tensors.items()},
                                                        **cap.constants))[0]
                    for rows in ((0, 1), (1, 0), (0,), (1,))]
    except Exception:  # noqa: BLE001 - a size the model refuses says nothing either way
        return None
    finally:
        for m, training in modes:
            m.training = training
        _restore_buffers(saved)
    for (path, both), (_, swapped), (_, a), (_, b) in zip(*runs):
        if (isinstance(both, torch.Tensor) and isinstance(a, torch.Tensor) and both.dim() == a.dim() > 1
                and both.shape[1:] != a.shape[1:]):
            return (f"its output {pytree.keystr(path) or '(the tensor)'} has shape {tuple(both.shape)} for samples "
                    f"0 and 1 together and {tuple(a.shape)} for sample 0 alone: a dimension other than 0 grows "
                    "with the batch, so the output relates samples to each other (as CLIP's logits_per_image = "
                    "image x text similarity does) or has its batch elsewhere than dim 0 (XLNet's mems are "
                    "(seq, batch, d)), and per-microbatch results cannot be concatenated into it")
        if isinstance(both, torch.Tensor) and both.dim() == 0 and both.is_floating_point() and a.dim() == 0:
            # a 0-d output the model reduced itself is combined as a mean weighted by each
            # microbatch's share; one outside the range of the per-sample values is no weighted
            # mean (a sum, a max-minus-min) and would come out silently scaled
            lo, hi = torch.minimum(a, b).float(), torch.maximum(a, b).float()
            tol = 1e-4 + 1e-3 * torch.maximum(a.abs(), b.abs()).float()
            if both.float() < lo - tol or both.float() > hi + tol:
                return (f"its 0-d output {pytree.keystr(path) or '(the tensor)'} for samples 0 and 1 together "
                        f"({both.item():.4g}) is not a mean of their values alone ({a.item():.4g}, {b.item():.4g}), "
                        "and fxpipe combines microbatches' 0-d outputs as means weighted by their share of the "
                        "batch; return it per sample (shape (batch,)) or as a mean over the batch")
            continue
        if not (isinstance(both, torch.Tensor) and both.dim() > 0 and both.is_floating_point()
                and both.shape[0] == 2 and swapped.shape == both.shape and a.shape[0] == b.shape[0] == 1):
            continue
        others = [swapped.flip(0)]
        alone = torch.cat([a, b])
        if torch.finfo(both.dtype).bits > 16 and alone.shape == both.shape:
            others.append(alone)
        for other in others:
            if not torch.allclose(both.float(), other.float(), rtol=1e-3, atol=1e-4):
                diff = (both.float() - other.float()).abs().max().item()
                how = "in the other order" if other is others[0] else "each alone"
                return (f"its output {pytree.keystr(path) or '(the tensor)'} for samples 0 and 1 together differs "
                        f"from the same samples run {how} by up to {diff:.3g} (in eval mode)")
    return None


def _snapshot_buffers(*modules: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for mod in modules:
        for b in mod.buffers():
            if id(b) not in seen and not b.is_meta:
                seen[id(b)] = (b, b.detach().clone())
    return list(seen.values())


def _restore_buffers(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for b, copy in saved:
            b.copy_(copy)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"[:300]


def _user_frame(e: BaseException) -> str:
    """The deepest frame of the traceback that is not torch's own code: where the user's model is."""
    frames = traceback.extract_tb(e.__traceback__)
    user = [f for f in frames if "site-packages/torch" not in f.filename and "/fxpipe/" not in f.filename]
    if not user:
        return ""
    f = user[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {f.line}"


def _explain(model: nn.Module, errors: dict[str, BaseException]) -> str:
    lines = [f"could not capture {type(model).__name__} as a graph."]
    for path, e in errors.items():
        where = _user_frame(e)
        # fxpipe's own diagnosis is one line with its fix: keep it whole
        why = f"TraceError: {e}" if type(e) is TraceError and "\n" not in str(e) else _first_line(e)
        lines.append(f"  {path}: {why}" + (f"\n      at {where}" if where else ""))
    lines.append(
        "What to try: make control flow independent of tensor values (use torch.where / torch.cond), "
        "mark the offending submodule as a leaf (leaf_modules=(MyBlock,)) so fx does not look inside it, "
        "pass non-tensor arguments as constants, or give an example batch of at least 2.")
    return "\n".join(lines)


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
