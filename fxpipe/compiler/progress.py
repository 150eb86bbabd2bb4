"""Progress reporting of planning: one line per phase on stderr, with its time.

Separate from the pipeline because both `build_plan` and auto mode's candidate search
(`auto_plan.py`) report through it, and the phase timings end up in `Plan.timings`.
"""

from __future__ import annotations

import sys
import time

__all__ = ["_Progress"]


class _Progress:
    """One line per phase on stderr with its time; silent when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.timings: dict[str, float] = {}
        self._t = time.perf_counter()

    def start(self, what: str) -> None:
        self._t = time.perf_counter()
        if self.enabled:
            print(f"fxpipe: {what} ...", end="", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """One line of context between phases (e.g. which auto candidate runs next)."""
        if self.enabled:
            print(f"fxpipe: {text}", file=sys.stderr, flush=True)

    def done(self, key: str, extra: str = "") -> None:
        dt = time.perf_counter() - self._t
        self.timings[key] = round(self.timings.get(key, 0.0) + dt, 4)  # auto mode repeats phases
        if self.enabled:
            print(f" {dt:.2f}s{(' ' + extra) if extra else ''}", file=sys.stderr, flush=True)
