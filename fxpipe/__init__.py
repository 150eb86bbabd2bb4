"""fxpipe: a compiler for pipeline-parallel PyTorch.

    >>> import fxpipe
    >>> cm = fxpipe.compile(model, devices=["cpu", "cpu"], example_inputs=(x,))   # doctest: +SKIP
"""

import importlib as _importlib
import typing as _typing

# The public names load on first use (PEP 562), not on `import fxpipe`: importing torch takes
# seconds, and the command line (`python -m fxpipe --help`, or Ctrl-C while it starts) must not
# wait for it or die in it with a traceback from inside torch's import.
_WHERE = {
    "compile": "fxpipe.api", "plan": "fxpipe.api", "simulate": "fxpipe.api", "CompiledModel": "fxpipe.api",
    "Cluster": "fxpipe.compiler.cluster", "Device": "fxpipe.compiler.cluster", "Link": "fxpipe.compiler.cluster",
    "Plan": "fxpipe.compiler.plan", "load_checkpoint": "fxpipe.runtime.checkpoint",
    "FxpipeError": "fxpipe.errors", "TraceError": "fxpipe.errors", "PlanError": "fxpipe.errors",
    "ScheduleError": "fxpipe.errors", "RuntimeMismatchError": "fxpipe.errors",
}

if _typing.TYPE_CHECKING:
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


def __getattr__(name: str) -> _typing.Any:
    if name.startswith("__"):  # probes by tools (__wrapped__, __test__): never a submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _WHERE:
        value = getattr(_importlib.import_module(_WHERE[name]), name)
    else:
        # `fxpipe.passes...` after a bare `import fxpipe`, as when everything was imported eagerly
        try:
            value = _importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
