"""Whether the model computes the samples along dim 0 independently (`samples_mixed`).

Microbatching is exact only for such a model; the pipeline asks this when it would split a
batch into m > 1 microbatches. It is a question about the model, answered by running eager on
a few samples, not about the captured graph, hence apart from `capture_checks`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.utils._pytree as pytree
from torch import nn

from fxpipe.compiler.call_binding import bind_inputs
from fxpipe.compiler.capture_checks import restore_buffers, sample_rows, snapshot_buffers

if TYPE_CHECKING:
    from fxpipe.compiler.capture import Captured

__all__ = ["samples_mixed"]


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
    saved = snapshot_buffers(model)
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            runs = [pytree.tree_flatten_with_path(model(**{k: sample_rows(v, list(rows)) for k, v in tensors.items()},
                                                        **cap.constants))[0]
                    for rows in ((0, 1), (1, 0), (0,), (1,))]
    except Exception:  # noqa: BLE001 - a size the model refuses says nothing either way
        return None
    finally:
        for m, training in modes:
            m.training = training
        restore_buffers(saved)
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
