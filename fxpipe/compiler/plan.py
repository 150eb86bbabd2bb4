"""Plan: everything the compiler decided, frozen, versioned and round-tripping through JSON.

A plan carries the graph fingerprint (so it is never applied to another model), the cluster,
the stages, the schedule, the predictions and the cost table the decision came from, so that
anyone can re-check the decision from the file alone.

Example:
    >>> plan.save("plan.json")                       # doctest: +SKIP
    >>> Plan.load("plan.json").summary()             # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch.fx as fx

from fxpipe.compiler.cluster import Cluster
from fxpipe.errors import FxpipeError, PlanError
from fxpipe.passes.annotate_costs import CostTable
from fxpipe.passes.emit_schedule import Schedule

__all__ = ["Plan", "StagePlan", "FORMAT_VERSION", "graph_fingerprint", "OPTIMIZER_STATE_FACTOR"]

FORMAT_VERSION = 1

# Optimizer state per parameter byte (fp32 states): Adam keeps two moments, momentum one.
OPTIMIZER_STATE_FACTOR = {"adam": 2.0, "adamw": 2.0, "sgd": 0.0, "sgd-momentum": 1.0, "none": 0.0}


@dataclass(frozen=True, slots=True)
class StagePlan:
    """One pipeline stage: a contiguous range of units on one device."""

    index: int
    device: int  # index into Plan.cluster.devices
    units: tuple[int, int]  # [start, end)
    param_bytes: float
    fwd_ms: float  # predicted per microbatch
    bwd_ms: float
    send_ms: float  # outgoing boundary per microbatch (each direction)
    send_bytes: float
    memory_bytes: float  # under the plan's schedule and optimizer
    inflight: int  # microbatches of activations alive at peak


@dataclass(frozen=True)
class Plan:
    """A complete, checkable pipeline plan. Build with `fxpipe.plan(...)`; never by hand."""

    fingerprint: str
    model_name: str
    capture_path: str
    input_names: tuple[str, ...]
    batch_size: int
    microbatches: int
    train: bool
    optimizer: str
    cluster: Cluster
    stages: tuple[StagePlan, ...]
    schedule: Schedule
    costs: CostTable
    predicted: dict[str, Any]  # step_ms, bottleneck_ms, bubble per device, ...
    baselines: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    # ---- views -------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage_units(self, s: int) -> tuple[str, ...]:
        a, b = self.stages[s].units
        return self.costs.unit_names[a:b]

    def summary(self) -> str:
        """The stage table: units, device, params, predicted times and memory."""
        gib = 1024**3
        rows = [("stage", "device", "units", "first..last unit", "params", "fwd ms", "bwd ms", "send ms", "memory GiB", "of GiB")]
        for st in self.stages:
            names = self.stage_units(st.index)
            dev = self.cluster.devices[st.device]
            span = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
            rows.append((str(st.index), f"{st.device}:{dev.name}", str(st.units[1] - st.units[0]), _clip(span, 38),
                         _human(st.param_bytes / 4), f"{st.fwd_ms:.3f}", f"{st.bwd_ms:.3f}", f"{st.send_ms:.3f}",
                         f"{st.memory_bytes / gib:.3f}", f"{dev.memory / gib:.1f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"fxpipe plan for {self.model_name}: {self.num_stages} stages, {self.microbatches} microbatches "
                 f"of batch {self.batch_size}, schedule {self.schedule.kind}, captured by {self.capture_path}"]
        for k, r in enumerate(rows):
            lines.append("  ".join(c.rjust(w) if i not in (1, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        p = self.predicted
        lines.append(f"predicted step {p['step_ms']:.2f} ms, bottleneck stage {p['bottleneck_ms']:.3f} ms/microbatch, "
                     f"bubble {100 * p['bubble']:.1f}%")
        for name, b in self.baselines.items():
            lines.append(f"baseline {name}: bottleneck {b['bottleneck_ms']:.3f} ms "
                         f"({b['bottleneck_ms'] / max(p['bottleneck_ms'], 1e-12):.2f}x fxpipe's){'' if b['fits'] else ', does not fit in memory'}")
        return "\n".join(lines)

    # ---- files -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "fxpipe-plan",
            "version": self.version,
            "fingerprint": self.fingerprint,
            "model_name": self.model_name,
            "capture_path": self.capture_path,
            "input_names": list(self.input_names),
            "batch_size": self.batch_size,
            "microbatches": self.microbatches,
            "train": self.train,
            "optimizer": self.optimizer,
            "cluster": self.cluster.to_dict(),
            "stages": [asdict(s) for s in self.stages],
            "schedule": self.schedule.to_dict(),
            "costs": self.costs.to_dict(),
            "predicted": self.predicted,
            "baselines": self.baselines,
            "timings": self.timings,
        }

    @staticmethod
    def from_dict(d: Any, where: str = "plan") -> "Plan":
        if not isinstance(d, dict) or d.get("format") != "fxpipe-plan":
            raise PlanError(f"{where} is not an fxpipe plan file (no \"format\": \"fxpipe-plan\")")
        v = d.get("version")
        if not isinstance(v, int) or v > FORMAT_VERSION or v < 1:
            raise PlanError(f"{where} has plan format version {v!r}; this fxpipe reads versions 1..{FORMAT_VERSION}. "
                            "Upgrade fxpipe, or re-plan the model with this version.")
        try:
            stages = tuple(_stage_from_dict(s) for s in d["stages"])
            plan = Plan(
                fingerprint=str(d["fingerprint"]), model_name=str(d["model_name"]), capture_path=str(d["capture_path"]),
                input_names=tuple(d["input_names"]), batch_size=int(d["batch_size"]), microbatches=int(d["microbatches"]),
                train=bool(d["train"]), optimizer=str(d["optimizer"]), cluster=Cluster.from_dict(d["cluster"], f"{where}: cluster"),
                stages=stages, schedule=Schedule.from_dict(d["schedule"]), costs=CostTable.from_dict(d["costs"]),
                predicted=dict(d["predicted"]), baselines=dict(d.get("baselines", {})), timings=dict(d.get("timings", {})),
                version=v)
            for key in ("step_ms", "bottleneck_ms", "bubble"):
                float(plan.predicted[key])
            for b in plan.baselines.values():
                float(b["bottleneck_ms"]), bool(b["fits"])
            plan.check()
        except FxpipeError as e:
            raise PlanError(f"{where} is damaged: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise PlanError(f"{where} is damaged or incomplete ({type(e).__name__}: {e}); re-create it with `fxpipe plan`") from None
        return plan

    def check(self) -> None:
        """Internal consistency of a plan (also of one loaded from a file)."""
        n = len(self.costs.unit_names)
        if not self.stages:
            raise PlanError("plan has no stages")
        pos = 0
        for s in self.stages:
            a, b = s.units
            if a != pos or b <= a:
                raise PlanError(f"plan stage {s.index} covers units [{a}, {b}) but must start at unit {pos} and be non-empty")
            if not 0 <= s.device < len(self.cluster.devices):
                raise PlanError(f"plan stage {s.index} is on device {s.device}, but the cluster has {len(self.cluster.devices)}")
            pos = b
        if pos != n:
            raise PlanError(f"plan stages cover {pos} of {n} units")
        if self.schedule.num_stages != len(self.stages) or self.schedule.num_microbatches != self.microbatches:
            raise PlanError("plan schedule does not match its stages/microbatches")
        from fxpipe.passes.emit_schedule import validate_schedule

        validate_schedule(self.schedule)

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON atomically (no half-written file on failure)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)

    @staticmethod
    def load(path: str | os.PathLike, fingerprint: str | None = None) -> "Plan":
        """Read a plan file; with `fingerprint`, refuse a plan made for another model."""
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file {path} is not valid JSON (truncated?): {e}") from None
        plan = Plan.from_dict(data, where=f"plan file {path}")
        if fingerprint is not None:
            plan.require_fingerprint(fingerprint)
        return plan

    def require_fingerprint(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise PlanError(f"this plan was made for another model (fingerprint {self.fingerprint[:12]} of "
                            f"{self.model_name}, this model has {fingerprint[:12]}); re-plan this model")

    def with_(self, **changes: Any) -> "Plan":
        return replace(self, **changes)


def _stage_from_dict(s: Any) -> StagePlan:
    if not isinstance(s, dict):
        raise TypeError(f"a stage must be an object, got {type(s).__name__}")
    ints = ("index", "device", "inflight")
    floats = ("param_bytes", "fwd_ms", "bwd_ms", "send_ms", "send_bytes", "memory_bytes")
    for k in ints:
        if not isinstance(s[k], int) or isinstance(s[k], bool):
            raise TypeError(f"stage field {k!r} must be an integer, got {s[k]!r}")
    for k in floats:
        if not isinstance(s[k], (int, float)) or isinstance(s[k], bool):
            raise TypeError(f"stage field {k!r} must be a number, got {s[k]!r}")
    units = s["units"]
    if not (isinstance(units, list) and len(units) == 2 and all(isinstance(u, int) for u in units)):
        raise TypeError(f"stage field 'units' must be [start, end], got {units!r}")
    extra = set(s) - set(StagePlan.__slots__)
    if extra:
        raise TypeError(f"unknown stage fields {sorted(extra)}")
    return StagePlan(**{**s, "units": (units[0], units[1])})


def graph_fingerprint(gm: fx.GraphModule, params: dict[str, Any]) -> str:
    """A hash of the graph's structure and its parameters' shapes and dtypes."""
    h = hashlib.sha256()
    for n in gm.graph.nodes:
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        h.update(f"{n.op}|{target}|{len(n.args)}|{sorted(n.kwargs)}\n".encode())
    for k in sorted(params):
        t = params[k]
        h.update(f"{k}:{tuple(getattr(t, 'shape', ()))}:{getattr(t, 'dtype', '')}\n".encode())
    return h.hexdigest()


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def _clip(s: str, w: int) -> str:
    return s if len(s) <= w else s[: w - 1] + "…"
