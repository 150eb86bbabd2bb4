"""Post-capture checks that the graph computes what the model computes, beyond the example.

A trace can silently specialise on the example batch (a shape, a size-dependent branch) or
differentiate otherwise than eager; `check_second_size` runs graph and eager again at batch
sizes 1 and 2 and compares values, then gradients (`grad_check.gradient_problem`). The helpers
that run the user's model without leaving a trace on it (buffers restored, RNG forked) live
here too and are shared with `sample_independence`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from fxpipe.compiler.capture_errors import first_line
from fxpipe.compiler.grad_check import gradient_problem

if TYPE_CHECKING:
    from fxpipe.compiler.capture import Captured

__all__ = ["check_second_size", "call_quietly", "sample_rows", "snapshot_buffers", "restore_buffers"]


def sample_rows(t: torch.Tensor, rows: Any) -> torch.Tensor:
    """Samples `rows` of a batch input; a 0-d tensor (a temperature) is not batched, so whole,
    as the runtime passes it to every microbatch."""
    return t if t.dim() == 0 else t[rows]


def call_quietly(gm: fx.GraphModule, *args: Any) -> Any:
    """Call `gm` without fx's wrapper, which prints a traceback of the generated code to stderr
    before re-raising: a failure here is an expected answer of a check (the next capture path
    is tried), not something to show the user."""
    return nn.Module.__call__(gm, *args)


def check_second_size(model, cap: Captured, tensors, constants) -> str | None:
    """Run the graph at a smaller batch and compare with eager: catches shapes baked in at trace time.

    Batch 1 first. A size that eager itself refuses (BatchNorm1d in training mode needs more
    than one value per channel) says nothing about the graph, so the next size is tried, and
    the check is skipped when eager accepts none of them.
    """
    for size in (s for s in (1, 2) if s < cap.batch_size):
        small = {k: sample_rows(v, slice(size)) for k, v in tensors.items()}
        # Both runs update buffers a training-mode model mutates (BatchNorm running stats and
        # num_batches_tracked); a check must leave the user's model as it found it.
        saved = snapshot_buffers(model, cap.gm)
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
                restore_buffers(saved)
                torch.manual_seed(0)
                try:
                    got = call_quietly(cap.gm, *small.values())
                except Exception as e:
                    return (f"the {cap.path} graph fails at batch size {size} where the model runs ({first_line(e)}): "
                            "shapes were specialised to the example batch")
        finally:
            restore_buffers(saved)
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
    saved = snapshot_buffers(model, cap.gm)

    def seeded(f: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:  # each run from the same buffers and RNG state, as the value check
            restore_buffers(saved)
            torch.manual_seed(0)
            return f()
        return run

    try:
        with torch.random.fork_rng(devices=[]):
            return gradient_problem(model, cap.gm, cap.path, seeded(lambda: model(**small, **constants)),
                                    seeded(lambda: call_quietly(cap.gm, *small.values())))
    finally:
        restore_buffers(saved)


def _same_with_grad(model: nn.Module, small: dict[str, torch.Tensor], constants: dict[str, Any],
                    got: list[torch.Tensor]) -> bool:
    """Whether eager run with gradients on gives the graph's outputs `got`: then a mismatch
    under no_grad is the model's own grad-mode branch (a fused inference fast path), not a
    shape the trace baked in."""
    saved = snapshot_buffers(model)
    try:
        with torch.enable_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            want = [w.detach() for w in pytree.tree_leaves(model(**small, **constants)) if isinstance(w, torch.Tensor)]
    except Exception:
        return False
    finally:
        restore_buffers(saved)
    return len(want) == len(got) and all(
        a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4) for a, b in zip(got, want))


def snapshot_buffers(*modules: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for mod in modules:
        for b in mod.buffers():
            if id(b) not in seen and not b.is_meta:
                seen[id(b)] = (b, b.detach().clone())
    return list(seen.values())


def restore_buffers(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for b, copy in saved:
            b.copy_(copy)
