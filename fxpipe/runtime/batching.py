"""A pipelined call's batch and outputs, shared by both backends (`CompiledModel`,
`DistributedCompiledModel`): the target split into microbatches like the inputs, the
microbatches' outputs joined back into the model's output structure, and inference
outputs marked so that backward through them says how to train.

Separate from either model class because both use it and neither should import the other.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from fxpipe.errors import RuntimeMismatchError

__all__: list[str] = []  # private helpers of the two model classes, imported by name


class _NoBackward(torch.autograd.Function):
    """Gives an output of `cm(x)` the grad_fn eager's output would have, whose backward says
    how to train instead of torch's "element 0 of tensors does not require grad". The output
    is marked dirty, not viewed or copied: no memory, and in-place use of it stays legal."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeMismatchError(
            "backward through the output of cm(x): a compiled model's call is pipelined inference and keeps no "
            "autograd graph (the activations live in the pipeline's stages); train with "
            "cm.step(x, target=t, loss_fn=...), which runs forward and backward through the pipeline and puts the "
            "gradients in .grad as loss_fn(model(x), t).backward() would")


def _inference_outputs(flat: list[Any], model: nn.Module, args: tuple, kwargs: dict) -> list[Any]:
    """The call's outputs; where eager's would require grad (grad mode on, a trainable
    parameter or input), floating outputs get `_NoBackward` so that `.backward()` on them
    fails clearly instead of silently or with torch's generic message."""
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return flat
    inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not (any(p.requires_grad for p in model.parameters()) or any(t.requires_grad for t in inputs)):
        return flat
    anchor = torch.zeros((), requires_grad=True)
    mine = {id(t) for t in inputs} | {id(t) for t in model.buffers()}  # a buffer returned as is stays one

    def mark(t: Any) -> Any:
        # only tensors the pipeline made: not a user's input, a view of one, or a parameter
        if (isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and not t.requires_grad
                and t._base is None and id(t) not in mine and not isinstance(t, nn.Parameter)):
            return _NoBackward.apply(t, anchor)
        return t

    return [pytree.tree_map(mark, v) for v in flat]


def _concat(vals: list[Any], sizes: list[int]) -> Any:
    v0 = vals[0]
    if isinstance(v0, torch.Tensor):
        if v0.dim() > 0 and all(v.shape[0] == s for v, s in zip(vals, sizes)):
            return torch.cat([v.to(v0.device) for v in vals], 0)
        if len(vals) == 1:
            return v0
        if v0.dim() == 0 and v0.is_floating_point():
            # a scalar the model reduces itself (an HF `loss`): the per-sample-mean contract of
            # `step` applies, so weight each microbatch by its share of the batch
            return sum(v.to(v0.device) * n for v, n in zip(vals, sizes)) / sum(sizes)
        raise RuntimeMismatchError(
            f"an output of shape {tuple(v0.shape)} has no batch dimension, so microbatch results cannot be "
            "concatenated; return per-sample outputs (batch first) from the model")
    return v0  # constants are the same for every microbatch


def _unflatten(spec: pytree.TreeSpec, flat: list) -> Any:
    out = pytree.tree_unflatten(flat, spec)
    # fx hands out immutable containers; users expect the ordinary ones
    from torch.fx.immutable_collections import immutable_dict, immutable_list

    if isinstance(out, immutable_dict):
        return dict(out)
    if isinstance(out, immutable_list):
        return list(out)
    return out



def _split_target(target: Any, m: int, batch: int) -> list[Any]:
    """Per microbatch, `target` split along dim 0 like the inputs. None (the whole target or
    an entry of a structure) reaches every microbatch's loss_fn as None: a loss that needs no
    target (a language model predicting its own inputs) passes target=None."""
    leaves, spec = pytree.tree_flatten(target)
    parts = []
    for t in leaves:
        if t is None:
            parts.append([None] * m)
            continue
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != batch:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise RuntimeMismatchError(
                f"target must be a tensor (or a structure of tensors) with the batch size {batch} as dim 0, "
                f"got {got}; give one target per input sample, split along dim 0 like the inputs (or None where "
                "loss_fn needs no target)")
        parts.append(torch.tensor_split(t, m))
    return [pytree.tree_unflatten([p[i] for p in parts], spec) for i in range(m)]

