"""How a call's arguments map onto the model's forward: binding and the batch size.

Used at capture (the example call) and at every call of a compiled model (`Captured.flat_inputs`),
and by the checks that run the model again on a few samples; kept apart from the tracing so
those checks need not import the tracers.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from fxpipe.errors import TraceError

__all__ = ["bind_inputs", "same_constant", "batch_size"]


def same_constant(a: Any, b: Any) -> bool:
    """Whether a non-tensor argument equals the one baked in at capture (identity when == fails)."""
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


def batch_size(tensors: dict[str, torch.Tensor]) -> int:
    """The batch size the tensor inputs agree on (dim 0); TraceError when none has one or they differ."""
    sizes = {k: t.shape[0] for k, t in tensors.items() if t.dim() > 0}
    if not sizes:
        raise TraceError("no input tensor has a batch dimension (dim 0); pipelining splits dim 0 into microbatches")
    values = set(sizes.values())
    if len(values) > 1:
        raise TraceError(f"input tensors disagree on the batch size (dim 0): {sizes}; every tensor input must be batch-first")
    return values.pop()
