"""Capture-time guards that a traced graph differentiates like the model does.

A value check (graph vs eager outputs) cannot see two ways a trace silently changes training:

* fx does not record `torch.no_grad()` / `set_grad_enabled` regions: a teacher branch under
  no_grad becomes trainable, and its parameters (and those feeding it) get gradients eager
  never gives;
* both fx and torch.export trace *through* a custom `torch.autograd.Function`, keeping its
  forward's ops and dropping its backward (a gradient reversal, a straight-through estimator),
  and export records the no_grad forward of a reentrant `torch.utils.checkpoint` as a
  grad-disabled region that cuts the gradient of everything after it.

`keep_autograd_functions` makes fx record `MyFn.apply(...)` as one call; `gradient_problem`
compares, at a small batch, which parameters and which custom Functions autograd reaches from
the outputs of eager and of the graph (a graph walk: no backward runs, no gradient is made).
Only where the graph lost a custom Function are gradients computed, once each way: most such
Functions just compute their forward's own gradient faster (BLOOM's GeLUFunction) and train
the same traced through; the others are refused.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["keep_autograd_functions", "gradient_problem"]

# torch.utils.checkpoint's reentrant Function: its backward reruns its forward, so tracing
# through it gives the same gradients (fx records no grad mode); it also takes a module or
# function argument, which a graph node cannot hold.
_GRAD_TRANSPARENT = {"CheckpointFunction"}
_CONSTANT = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _apply_of(cls: type, apply: Callable) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        return apply(cls, *args, **kwargs)

    # the fingerprint and the generated code name the target by __name__
    call.__name__ = call.__qualname__ = f"{cls.__name__}_apply"
    call.__module__ = __name__
    return call


@contextlib.contextmanager
def keep_autograd_functions(tracer: fx.Tracer) -> Iterator[None]:
    """While fx traces: `Fn.apply(proxy, ...)` becomes one call_function node running `Fn.apply`.

    Only calls whose arguments are proxies and plain constants are kept whole (a module or
    callable argument cannot be a graph argument); the others, and torch.utils.checkpoint's
    reentrant Function, are traced through as before. Patches `torch.autograd.Function.apply`
    process-wide for the trace only; a call without proxies goes to the original.
    """
    Function = torch.autograd.Function
    orig = Function.__dict__["apply"]
    made: dict[type, Callable] = {}

    def apply(cls, *args: Any, **kwargs: Any) -> Any:
        leaves = pytree.tree_leaves((args, kwargs))
        if (cls.__name__ in _GRAD_TRANSPARENT or not any(isinstance(a, fx.Proxy) for a in leaves)
                or not all(isinstance(a, (fx.Proxy, *_CONSTANT)) for a in leaves)):
            return orig.__func__(cls, *args, **kwargs)
        fn = made.setdefault(cls, _apply_of(cls, orig.__func__))
        return tracer.create_proxy("call_function", fn, args, kwargs)

    Function.apply = classmethod(apply)
    try:
        yield
    finally:
        Function.apply = orig


def _module_of(fn: Any) -> nn.Module | None:
    """The module a reentrant checkpoint runs (a module, a bound method or a partial of one)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__self__", fn)
    return fn if isinstance(fn, nn.Module) else None


def _reach(outputs: list[Any]) -> tuple[set[int], set[str], bool]:
    """(ids of the leaf tensors autograd reaches from `outputs`, names of the custom
    autograd.Functions on the way, whether some leaves could not be seen).

    A reentrant checkpoint's forward ran without grad, so its node links only its inputs:
    the parameters of the module it runs are counted from the module; a plain function it
    runs hides them (the set is then a lower bound)."""
    leaves: dict[int, torch.Tensor] = {}
    funcs: set[str] = set()
    opaque = False
    seen: dict[int, Any] = {}  # keeps the nodes alive, so ids stay unique
    stack = []
    for t in outputs:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            if t.grad_fn is None:
                leaves[id(t)] = t
            else:
                stack.append(t.grad_fn)
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen[id(fn)] = fn
        var = getattr(fn, "variable", None)
        if isinstance(var, torch.Tensor):
            leaves[id(var)] = var
        cls = getattr(fn, "_forward_cls", None)
        if cls is not None and cls.__name__ not in _GRAD_TRANSPARENT:
            funcs.add(cls.__qualname__)
        elif cls is not None:
            mod = _module_of(getattr(fn, "run_function", None))
            if mod is None:
                opaque = True
            else:
                leaves.update((id(q), q) for q in mod.parameters() if q.requires_grad)
        stack.extend(f for f, _ in fn.next_functions)
    return set(leaves), funcs, opaque


def _same_gradients(want: list[torch.Tensor], got: list[torch.Tensor], params: list[torch.Tensor]) -> bool:
    """Whether a random cotangent on the outputs gives the same parameter gradients both ways."""
    pairs = [(w, g) for w, g in zip(want, got) if w.requires_grad and g.requires_grad and w.shape == g.shape
             and (w.is_floating_point() or w.is_complex())]
    if not pairs or not params or len(want) != len(got):
        return False
    gen = torch.Generator().manual_seed(0)
    cots = [torch.randn(w.shape, generator=gen, dtype=w.dtype if w.is_floating_point() else torch.float32).to(w.device)
            for w, _ in pairs]
    a = torch.autograd.grad([w for w, _ in pairs], params, cots, allow_unused=True)
    b = torch.autograd.grad([g for _, g in pairs], params, cots, allow_unused=True)
    for x, y in zip(a, b):
        if (x is None) != (y is None):
            return False
        if x is not None and not torch.allclose(x.float(), y.float(), rtol=1e-3,
                                                atol=1e-5 + 1e-3 * x.abs().max().item()):
            return False
    return True


def gradient_problem(model: nn.Module, gm: fx.GraphModule, path: str, run_eager: Callable[[], Any],
                     run_graph: Callable[[], Any]) -> str | None:
    """Why training through `gm` would give other gradients than eager, or None.

    `run_eager` / `run_graph` run the model and the graph on the same small batch (the caller
    seeds them and restores buffers); both run here with grad enabled. Only parameters that
    require grad are compared; a forward that fails with grad on is not judged here.
    """
    params = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        return None
    with torch.enable_grad():
        try:
            want_out = [t for t in pytree.tree_leaves(run_eager()) if isinstance(t, torch.Tensor)]
        except Exception:
            return None
        try:
            got_out = [t for t in pytree.tree_leaves(run_graph()) if isinstance(t, torch.Tensor)]
        except Exception as e:
            return f"the {path} graph fails with gradients enabled ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    want_ids, want_funcs, want_opaque = _reach(want_out)
    got_ids, got_funcs, _ = _reach(got_out)
    lost_funcs = sorted(want_funcs - got_funcs)
    # Many custom Functions only implement their forward's own gradient faster (BLOOM's
    # GeLUFunction): traced through, they train the same. Only then, compare the gradients.
    if lost_funcs and not _same_gradients(want_out, got_out, [p for p in model.parameters() if id(p) in want_ids]):
        return (f"{type(model).__name__} calls the custom torch.autograd.Function {', '.join(lost_funcs)}, whose "
                f"backward the {path} capture does not keep (it traces through the forward only) and which gives "
                "other gradients than its forward's ops; call it with tensor and constant arguments only, so fx "
                "keeps the call whole (capture_method='fx'), or express the op without a custom Function")
    # eager's set is only a lower bound when a checkpointed function hid its parameters
    extra = [] if want_opaque else sorted(params[i] for i in (got_ids - want_ids) if i in params)
    missing = sorted(params[i] for i in (want_ids - got_ids) if i in params)
    if not extra and not missing:
        return None
    names = lambda ns: ", ".join(ns[:4]) + (f" and {len(ns) - 4} more" if len(ns) > 4 else "")  # noqa: E731
    if extra:
        return (f"the {path} graph trains parameters eager gives no gradient ({names(extra)}): fx does not record "
                "torch.no_grad() / torch.set_grad_enabled regions in forward; torch.export does (the default "
                "capture_method='auto' tries it next), or compute that branch from .detach()ed tensors")
    return (f"the {path} graph gives no gradient to parameters eager trains ({names(missing)}): torch.export "
            "records the no_grad forward of a reentrant torch.utils.checkpoint (or of a custom "
            "torch.autograd.Function) as a grad-disabled region; use torch.utils.checkpoint(..., "
            "use_reentrant=False) (transformers: gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            "{'use_reentrant': False})), or leave recomputation to fxpipe (recompute=True)")
