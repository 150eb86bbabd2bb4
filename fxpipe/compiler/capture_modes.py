"""Which train/eval modes a captured graph fixed (`Captured.modes`, `Captured.mode_dependent`).

torch.export bakes every module's mode into its graph (dropout on or off, BatchNorm batch or
running statistics); fx does so only where a forward it traced through reads `self.training`,
which `depends_on_modes` detects by tracing once more with every mode flipped. The result lets
`Captured.check_modes` refuse a call after `model.train()`/`model.eval()` changed such a mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch.fx as fx
from torch import nn

if TYPE_CHECKING:
    from fxpipe.compiler.capture import Captured

__all__ = ["fixed_modes", "depends_on_modes"]


def fixed_modes(model: nn.Module, cap: Captured) -> dict[str, bool]:
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


def depends_on_modes(model: nn.Module, retrace: Callable[[], fx.GraphModule], code: str) -> bool:
    """Whether fx's graph depends on the modules' train/eval modes: traced once more with
    every mode flipped, it differs. fx sees `self.training` as a plain bool, so a forward
    reading it is otherwise baked in unnoticed; one more trace is cheap next to the checks.
    `retrace` traces the model again with fx as the capture did."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        for m, training in modes:
            m.training = not training  # the attribute, not .train(): that would set all alike
        try:
            other = retrace()
        except Exception:  # noqa: BLE001 - traceable in one mode only: it depends on the mode
            return True
        return other.code != code
    finally:
        for m, training in modes:
            m.training = training
