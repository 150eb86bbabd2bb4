"""The one exception hierarchy of fxpipe: every user-facing failure is an FxpipeError.

Messages say what went wrong, where (node, source line, stage, device) and what to do.
"""

from __future__ import annotations

__all__ = ["FxpipeError", "TraceError", "PlanError", "ScheduleError", "RuntimeMismatchError",
           "MicrobatchStatisticsWarning"]


class FxpipeError(Exception):
    """Base class of every error fxpipe raises on purpose."""


class TraceError(FxpipeError):
    """The model could not be captured as a graph (fx and torch.export both failed)."""


class PlanError(FxpipeError):
    """No valid plan: infeasible memory, bad cluster, bad plan file, bad options."""


class ScheduleError(FxpipeError):
    """A schedule is incomplete, violates a dependency, or would deadlock."""


class RuntimeMismatchError(FxpipeError):
    """Run-time inputs or state disagree with what the plan was compiled for."""


class MicrobatchStatisticsWarning(UserWarning):
    """A training-mode model computes or updates statistics per microbatch (BatchNorm): the
    result is eager's on the microbatches in order, not on the whole batch."""
