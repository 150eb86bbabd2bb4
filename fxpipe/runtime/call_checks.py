"""Refusals before a pipelined call runs, shared by both backends: inputs unlike the
planned ones (only the batch size may change), a training step under no_grad /
inference_mode, and a training step with nothing to train.

Each raises RuntimeMismatchError before any work, where the pipeline would otherwise fail
midway or blame the wrong thing. Separate from the model classes because both use them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from fxpipe.compiler.capture import Captured
from fxpipe.errors import RuntimeMismatchError

__all__: list[str] = []  # private helpers of the two model classes, imported by name


def _check_like_planned(cap: Captured, flat: Sequence[torch.Tensor]) -> None:
    """RuntimeMismatchError unless the call's tensor inputs have the planned dtypes and shapes
    but for dim 0: the stages and boundary buffers are built for them (both backends)."""
    vals = {n.target: n.meta.get("fxpipe.val") for n in cap.gm.graph.nodes if n.op == "placeholder"}
    for name, t in zip(cap.input_names, flat):
        ref = vals.get(name)
        if isinstance(ref, torch.Tensor) and (t.dtype != ref.dtype or tuple(t.shape[1:]) != tuple(ref.shape[1:])):
            raise RuntimeMismatchError(
                f"input {name!r} has shape {tuple(t.shape)} and dtype {t.dtype}, but the plan was made for "
                f"(batch, {', '.join(map(str, ref.shape[1:]))}) of {ref.dtype}; only the batch size may change: "
                "recompile for new shapes")


def _check_grad_enabled() -> None:
    """Refuse a training step under torch.no_grad / inference_mode before any work. Grad mode
    is thread-local, so the workers would otherwise compute and accumulate gradients anyway,
    where eager's `loss.backward()` in the same place raises."""
    if torch.is_inference_mode_enabled():
        ctx = "torch.inference_mode()"
    elif not torch.is_grad_enabled():
        ctx = "torch.no_grad() (or torch.set_grad_enabled(False))"
    else:
        return
    raise RuntimeMismatchError(
        f"step is a training step (forward and backward), but it was called under {ctx}, where gradients are "
        "disabled (eager's loss.backward() fails there too); call step outside that context, or for an evaluation "
        "loss without gradients call the model instead: loss_fn(cm(x), target)")


def _check_trainable(model: nn.Module, inputs: list[list[Any]]) -> None:
    """Refuse a training step with nothing to train before it runs: otherwise the loss is
    found not to require grad on the last stage and the error blames loss_fn."""
    if any(q.requires_grad for q in model.parameters()):
        return
    if any(isinstance(t, torch.Tensor) and t.requires_grad for mb in inputs for t in mb):
        return  # gradients of the inputs are wanted
    n = len(list(model.parameters()))
    what = "has no parameters" if n == 0 else f"has {n} parameters and none of them requires grad"
    raise RuntimeMismatchError(
        f"step: {type(model).__name__} {what}, so a training step has nothing to train (no gradient to compute); "
        "call the compiled model for inference instead (cm(x)), or set requires_grad=True on the parameters "
        "you want to train")

