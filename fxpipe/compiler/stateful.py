"""What a training-mode forward computes or updates per call: BatchNorm-like statistics.

fxpipe runs a batch as m microbatches, each through the stages' forwards in microbatch order.
A module that normalises with the batch's statistics (BatchNorm in training mode) then sees
each microbatch's statistics, and a buffer the forward updates (running_mean / running_var /
num_batches_tracked, an EMA) is updated once per microbatch, m times per call, in microbatch
order. That is what eager gives running the microbatches one after the other
(`for xc in x.tensor_split(m): model(xc)`), as GPipe and torch.distributed.pipelining do, not
eager on the whole batch; `compile` warns when it applies (`warn_per_microbatch_state`).
"""

from __future__ import annotations

import warnings

from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from fxpipe.errors import MicrobatchStatisticsWarning, RuntimeMismatchError

__all__ = ["per_microbatch_state", "warn_per_microbatch_state", "check_shared_statistics", "shared_buffer_writes"]


def per_microbatch_state(model: nn.Module, gm: fx.GraphModule) -> list[str]:
    """Names of what depends on how a call is split into microbatches: BatchNorm-like modules
    in training mode (`_BatchNorm`, or any module tracking running statistics), then buffers
    the graph writes in place (an EMA updated in forward)."""
    names = [name or type(model).__name__ for name, mod in model.named_modules()
             if mod.training and (isinstance(mod, nn.modules.batchnorm._BatchNorm)
                                  or getattr(mod, "track_running_stats", False) is True)]
    covered = tuple(n + "." for n in names)
    buffers = {k for k, _ in model.named_buffers()}
    for n in gm.graph.nodes:
        first = n.args[0] if n.args else None
        if (isinstance(first, fx.Node) and first.op == "get_attr" and first.target in buffers
                and not first.target.startswith(covered) and first.target not in names and _writes_first(n)):
            names.append(first.target)
    return names


def _writes_first(n: fx.Node) -> bool:
    """Whether node `n` writes into its first argument (x.add_(..), aten.copy_, out=...)."""
    if n.op == "call_method":
        return n.target.endswith("_") and not n.target.startswith("_")
    if n.op != "call_function":
        return False
    schema = getattr(n.target, "_schema", None)
    if schema is not None:  # an aten op (export): its schema says what it writes
        a = schema.arguments[0] if schema.arguments else None
        return bool(a is not None and a.alias_info is not None and a.alias_info.is_write)
    name = getattr(n.target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


def warn_per_microbatch_state(model: nn.Module, gm: fx.GraphModule, microbatches: int) -> None:
    """One MicrobatchStatisticsWarning when a call with `microbatches` > 1 would compute or
    update statistics per microbatch (see the module docstring)."""
    if microbatches <= 1:
        return
    names = per_microbatch_state(model, gm)
    if not names:
        return
    shown = ", ".join(repr(n) for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    warnings.warn(
        f"{type(model).__name__} is in training mode with batch statistics or buffers updated in forward ({shown}) "
        f"and runs as {microbatches} microbatches: each microbatch is normalised with its own statistics, and the "
        f"buffers (BatchNorm's running statistics, num_batches_tracked) are updated once per microbatch, "
        f"{microbatches} times per step or call, in microbatch order: as eager running the microbatches one after "
        "the other, not as eager on the whole batch. For whole-batch statistics use microbatches=1; to silence "
        "this, warnings.filterwarnings('ignore', category=fxpipe.errors.MicrobatchStatisticsWarning)",
        MicrobatchStatisticsWarning, stacklevel=4)


def _written(n: fx.Node) -> list[Any]:
    """The arguments node `n` writes into: an in-place op's first argument, an aten op's
    arguments its schema marks as written, a training-mode batch_norm's running statistics
    (aten.batch_norm and F.batch_norm update them without saying so in a schema)."""
    if n.op != "call_function":
        return [n.args[0]] if n.args and _writes_first(n) else []
    if n.target is torch.nn.functional.batch_norm:
        training = n.kwargs.get("training", n.args[5] if len(n.args) > 5 else False)
        return [n.kwargs.get("running_mean", n.args[1] if len(n.args) > 1 else None),
                n.kwargs.get("running_var", n.args[2] if len(n.args) > 2 else None)] if training else []
    schema = getattr(n.target, "_schema", None)
    if schema is None:
        return [n.args[0]] if n.args and _writes_first(n) else []
    if schema.name == "aten::batch_norm":
        return [n.args[3], n.args[4]] if len(n.args) > 5 and n.args[5] is True else []
    return [a for a, arg in zip(n.args, schema.arguments) if arg.alias_info is not None and arg.alias_info.is_write]


def shared_buffer_writes(gm: fx.GraphModule, bounds: Sequence[tuple[int, int]],
                         stage_attrs: Sequence[Iterable[str]]) -> dict[str, tuple[int, ...]]:
    """Buffers the graph itself updates in place (an export graph's training-mode batch_norm,
    its `num_batches_tracked.add_`, an EMA in forward) that more than one stage reads or
    writes: target -> those stages. `bounds`: per stage its [start, end) units (nodes carry
    their unit in meta["fxpipe.unit"]); `stage_attrs`: per stage, the get_attr targets it reads. Each stage holds its own copy of such a buffer (another
    rank's, or the local runtime's replica), so the other stages' writes would be lost."""
    from fxpipe.passes.group_units import UNIT

    stage_of = {n.name: next((s for s, (a, b) in enumerate(bounds) if a <= n.meta[UNIT] < b), -1)
                for n in gm.graph.nodes if UNIT in n.meta}
    buffers = {k for k, _ in gm.named_buffers()}
    alias: dict[str, str] = {}  # node name -> the buffer it is (get_attr) or aliases (x.add_ returns x)
    written: dict[str, set[int]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target in buffers:
            alias[n.name] = n.target
        for a in _written(n):
            if isinstance(a, fx.Node) and a.name in alias:
                written.setdefault(alias[a.name], set()).add(stage_of.get(n.name, -1))
                if n.args and a is n.args[0]:
                    alias[n.name] = alias[a.name]
    out = {}
    for target, stages in written.items():
        users = stages | {s for s, attrs in enumerate(stage_attrs) if target in attrs}
        users.discard(-1)
        if len(users) > 1:
            out[target] = tuple(sorted(users))
    return out


def check_shared_statistics(model: nn.Module, shared: Iterable[nn.Module],
                            written: dict[str, tuple[int, ...]] | None = None) -> None:
    """RuntimeMismatchError when a module used by more than one stage (`shared`: the user's
    modules) would update running statistics in this call (BatchNorm in training mode).

    Each stage runs its own copy (the local runtime's replica, another rank's module), or one
    module is updated stage after stage instead of in eager's order, so the updates of all but
    one use would be lost or reordered: eager updates the one module once per use, in order.
    Both backends call it per call, so they refuse the same calls. `written`: buffers the graph
    updates in place that several stages use (`shared_buffer_writes`), refused the same way."""
    for top in shared:
        for mod in top.modules():
            if mod.training and getattr(mod, "track_running_stats", False) is True:
                name = next((k for k, v in model.named_modules() if v is mod), type(mod).__name__)
                raise RuntimeMismatchError(
                    f"module {name!r} ({type(mod).__name__}) is used by more than one stage and updates its "
                    "running statistics in training mode; each stage runs its own copy, so the updates of all "
                    f"but one would be lost. Put it in eval mode (model.{name}.eval(): statistics frozen), or "
                    "give each use its own module")
    for target, stages in (written or {}).items():
        raise RuntimeMismatchError(
            f"buffer {target!r} is updated in place by the model's forward (running statistics, an EMA) and used by "
            f"stages {list(stages)}; each stage holds its own copy, so the updates would be lost or not seen by the "
            "other stages (eager updates the one buffer). Put the modules updating it in eval mode and compile again "
            "(an export graph fixes the mode), give each use its own module, or plan so that one stage holds all its "
            "uses (fewer devices)")
