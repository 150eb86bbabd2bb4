"""Refusals before a pipelined call runs, shared by both backends: inputs unlike the
planned ones (only the batch size may change), a training step under no_grad /
inference_mode, and a training step with nothing to train; and the loss_fn contract
checked on the last stage (`_checked_loss_fn`).

Each raises RuntimeMismatchError before any work, where the pipeline would otherwise fail
midway or blame the wrong thing. Separate from the model classes because both use them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree
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


def _checked_loss_fn(loss_fn: Callable[[Any, Any], torch.Tensor], name: str,
                     where: Callable[[], str]) -> Callable[[Any, Any], torch.Tensor]:
    """`loss_fn` wrapped so that a raise, a non-tensor, a non-scalar or a detached result is
    a RuntimeMismatchError naming loss_fn and `where()` (stage, device or rank, instruction)."""

    def checked(output: Any, target: Any) -> torch.Tensor:
        try:
            loss = loss_fn(output, target)
        except Exception as e:
            raise RuntimeMismatchError(
                f"loss_fn {name} raised {type(e).__name__}: {e} {where()}; it is called once per microbatch "
                f"with the model's output for that microbatch and its slice of target"
                f"{' (target is None: step(..., target=None))' if target is None else ''}. The step was undone "
                "(.grad is as before): fix loss_fn and call step again") from e
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise RuntimeMismatchError(
                f"loss_fn {name} returned {got} {where()}; it must return a scalar tensor: reduce it inside "
                "loss_fn (e.g. .mean() over the microbatch's samples)")
        if torch.is_grad_enabled() and not loss.requires_grad:
            outs = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
            if outs and not any(t.requires_grad for t in outs):  # not loss_fn's doing
                raise RuntimeMismatchError(
                    f"the model's output does not require grad {where()}: it depends on no parameter that "
                    "requires grad (the forward detaches it, computes it under torch.no_grad, or from buffers "
                    "only), so there is nothing to train through it; use the compiled model for inference")
            raise RuntimeMismatchError(
                f"loss_fn {name} returned a tensor that does not require grad {where()}: it was detached "
                "(.item(), .detach(), torch.no_grad or a new tensor); compute it from the model's output with torch ops")
        return loss

    return checked
