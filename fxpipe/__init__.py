"""fxpipe: a compiler for pipeline-parallel PyTorch.

    >>> import fxpipe
    >>> cm = fxpipe.compile(model, devices=["cpu", "cpu"], example_inputs=(x,))   # doctest: +SKIP
"""

from fxpipe.api import CompiledModel, compile, plan, simulate
from fxpipe.compiler.cluster import Cluster, Device, Link
from fxpipe.compiler.plan import Plan
from fxpipe.errors import FxpipeError, PlanError, RuntimeMismatchError, ScheduleError, TraceError
from fxpipe.runtime.checkpoint import load_checkpoint

__all__ = [
    "compile", "plan", "simulate", "load_checkpoint", "CompiledModel", "Plan", "Cluster", "Device", "Link",
    "FxpipeError", "TraceError", "PlanError", "ScheduleError", "RuntimeMismatchError",
]
__version__ = "0.1.0"
