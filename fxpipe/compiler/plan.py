"""Plan: everything the compiler decided, frozen, versioned and round-tripping through JSON.

A plan carries the graph fingerprint (so it is never applied to another model), the cluster,
the stages, the schedule, the predictions and the cost table the decision came from, so that
anyone can re-check the decision from the file alone.

Example:
    >>> plan.save("plan.json")                       # doctest: +SKIP
    >>> Plan.load("plan.json").summary()             # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fxpipe.compiler.cluster import Cluster
# re-exported: pipeline.py and users import graph_fingerprint from here
from fxpipe.compiler.fingerprint import graph_fingerprint
from fxpipe.compiler.json_files import read_json_file
from fxpipe.compiler.plan_fields import (_baselines_from_dict, _costs_from_dict, _Fields, _is_int, _nested,
                                         _predicted_from_dict, _stage_from_dict)
from fxpipe.compiler.plan_restaging import restaged
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
    # activation recomputation: keep only the boundary per in-flight microbatch and re-run the
    # forward in backward (bwd_ms already includes that forward). Plan files written before
    # this field existed load as False.
    recompute: bool = False
    # weight streaming (offload): params, grads and optimizer state stay in pinned host memory
    # and each unit's weights are copied in (prefetched on the copy stream) for its forward and
    # again for its backward, every microbatch; memory_bytes counts two units' weights instead
    # of the static state, fwd_ms / bwd_ms each unit at least its copy time. Never together
    # with recompute. Plan files written before this field existed load as False.
    offload: bool = False


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
        rows = [("stage", "device", "units", "first..last unit", "params", "fwd ms", "bwd ms", "send ms", "memory GiB", "of GiB", "")]
        for st in self.stages:
            names = self.stage_units(st.index)
            dev = self.cluster.devices[st.device]
            span = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
            rows.append((str(st.index), f"{st.device}:{dev.name}", str(st.units[1] - st.units[0]), _clip(span, 38),
                         _human(st.param_bytes / 4), f"{st.fwd_ms:.3f}", f"{st.bwd_ms:.3f}", f"{st.send_ms:.3f}",
                         f"{st.memory_bytes / gib:.3f}", f"{dev.memory / gib:.1f}", _stage_flags(st)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"fxpipe plan for {self.model_name}: {self.num_stages} stage{'s' if self.num_stages != 1 else ''}, {self.microbatches} microbatch{'es' if self.microbatches != 1 else ''} "
                 f"of batch {self.batch_size}, schedule {self.schedule.kind}, captured by {self.capture_path}"]
        for k, r in enumerate(rows):
            lines.append("  ".join(c.rjust(w) if i not in (1, 3, 10) else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(r, widths))).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths).rstrip())
        p = self.predicted
        if isinstance(p.get("auto"), list):
            fit = sum(1 for c in p["auto"] if c.get("fits"))
            skipped = sum(1 for c in p["auto"] if isinstance(c, dict) and c.get("skipped"))
            tried = f"{len(p['auto']) - skipped} planned, {skipped} skipped by a lower bound" if skipped else \
                f"{len(p['auto'])} tried"
            lines.append(f"auto: chose schedule {self.schedule.kind} with {self.microbatches} microbatch{'es' if self.microbatches != 1 else ''}, the fastest "
                         f"predicted of {fit} fitting candidates ({tried}; `fxpipe inspect --why` lists them)")
        if any(st.offload for st in self.stages):
            lines.append("offload: those stages keep params, grads and optimizer state in host memory and stream "
                         "each unit's weights in for every microbatch's forward and backward (times include it)")
            both = [st.index for st in self.stages if st.offload and st.recompute]
            if both:
                lines.append(f"  stages {both} also recompute, unit by unit: per microbatch they keep only the values "
                             "crossing between streamed units, and rebuild each unit's activations in its backward "
                             "with the weights fetched for it")
            lines += [f"  host memory of {'devices of unknown node' if h.node < 0 else f'node {h.node}'}: "
                      f"{h.used / gib:.3f} GiB for stages {list(h.stages)}"
                      + (f" of {h.capacity / gib:.1f} GiB" if math.isfinite(h.capacity) else " (its size is unknown)")
                      + ("" if h.fits else ": DOES NOT FIT") for h in self.host_usage()]
        if p.get("restaged"):
            lines.append(f"stages {p['restaged']}: their numbers in the file disagreed with their cuts (edited by hand, "
                         "or written by another fxpipe version), so they and the prediction were recomputed from the "
                         "plan's cost table; re-plan to let fxpipe choose the cuts")
        lines.append(f"predicted step {p['step_ms']:.2f} ms, bottleneck stage {p['bottleneck_ms']:.3f} ms/microbatch, "
                     f"bubble {100 * p['bubble']:.1f}%")
        for name, b in self.baselines.items():
            fit = "" if b["fits"] else ", does not fit in memory"
            if "step_ms" in b:  # what fxpipe minimises; a smaller bottleneck alone can lose on fill and drain
                lines.append(f"baseline {name}: predicted step {b['step_ms']:.2f} ms "
                             f"({b['step_ms'] / max(p['step_ms'], 1e-12):.2f}x fxpipe's), "
                             f"bottleneck {b['bottleneck_ms']:.3f} ms{fit}")
            else:  # does not fit (not simulated), or a plan file from before steps were recorded
                lines.append(f"baseline {name}: bottleneck {b['bottleneck_ms']:.3f} ms "
                             f"({b['bottleneck_ms'] / max(p['bottleneck_ms'], 1e-12):.2f}x fxpipe's){fit}")
        return "\n".join(lines)

    def host_usage(self) -> list:
        """Per node with offloaded stages, the host memory they keep (`check_host_memory.HostUse`)."""
        from fxpipe.passes.check_host_memory import host_usage

        factor = OPTIMIZER_STATE_FACTOR[self.optimizer] if self.train else 0.0
        return host_usage([st.units for st in self.stages], [st.device for st in self.stages],
                          [st.offload for st in self.stages], self.costs, self.cluster, self.train, factor)

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
        """Validate and rebuild a plan from `to_dict` output.

        Every field is checked for presence, type and range before use, so a damaged or
        hand-edited file raises PlanError naming the field, never another exception.
        """
        if not isinstance(d, dict) or d.get("format") != "fxpipe-plan":
            raise PlanError(f"{where} is not an fxpipe plan file (no \"format\": \"fxpipe-plan\" in a JSON object); "
                            "write one with `fxpipe plan` or Plan.save")
        v = d.get("version")
        if not _is_int(v) or v > FORMAT_VERSION or v < 1:
            raise PlanError(f"{where} has plan format version {v!r}; this fxpipe reads versions 1..{FORMAT_VERSION}. "
                            "Upgrade fxpipe, or re-plan the model with this version.")
        r = _Fields(where)
        try:
            r.keys(d, "", required=_PLAN_KEYS, optional=("baselines", "timings"))
            plan = Plan(
                fingerprint=r.string(d, "fingerprint"), model_name=r.string(d, "model_name"),
                capture_path=r.choice(d, "capture_path", ("fx", "export")),
                input_names=tuple(r.strings(d, "input_names")), batch_size=r.integer(d, "batch_size", low=1),
                microbatches=r.integer(d, "microbatches", low=1), train=r.boolean(d, "train"),
                optimizer=r.choice(d, "optimizer", tuple(OPTIMIZER_STATE_FACTOR)),
                cluster=_nested(Cluster.from_dict, r.get(d, "cluster"), "cluster"),
                stages=tuple(_stage_from_dict(r, s, f"stages[{i}]") for i, s in enumerate(r.items(d, "stages"))),
                schedule=_nested(Schedule.from_dict, r.get(d, "schedule"), "schedule"),
                costs=_costs_from_dict(r, r.get(d, "costs")), predicted=_predicted_from_dict(r, r.get(d, "predicted")),
                baselines=_baselines_from_dict(r, d.get("baselines", {})),
                timings={k: r.number(d["timings"], k, "timings.") for k in r.mapping(d, "timings")} if "timings" in d else {},
                version=v)
            plan.check()
            plan = restaged(plan)
        except PlanError as e:
            raise PlanError(f"{where} is damaged: {e}; re-create it with `fxpipe plan`") from None
        return plan

    def check(self) -> None:
        """Internal consistency of a plan (also of one loaded from a file)."""
        n = len(self.costs.unit_names)
        if not self.stages:
            raise PlanError("plan has no stages")
        sched = self.schedule
        if sched.num_stages != len(self.stages) or sched.num_microbatches != self.microbatches:
            raise PlanError(f"the schedule has {sched.num_stages} stages and {sched.num_microbatches} microbatches, "
                            f"the plan {len(self.stages)} and {self.microbatches}")
        if sched.num_devices != len(self.cluster.devices):
            raise PlanError(f"the schedule has programs for {sched.num_devices} devices, the cluster has "
                            f"{len(self.cluster.devices)}")
        if sched.train != self.train:
            raise PlanError(f"the plan says train={self.train} but its schedule has train={sched.train}")
        if self.microbatches > self.batch_size:
            raise PlanError(f"{self.microbatches} microbatches of a batch of {self.batch_size} samples")
        pos = 0
        for i, s in enumerate(self.stages):
            a, b = s.units
            if s.index != i:
                raise PlanError(f"stage {i} has index {s.index}")
            if a != pos or b <= a:
                raise PlanError(f"plan stage {s.index} covers units [{a}, {b}) but must start at unit {pos} and be non-empty")
            if not 0 <= s.device < len(self.cluster.devices):
                raise PlanError(f"plan stage {s.index} is on device {s.device}, but the cluster has {len(self.cluster.devices)}")
            if sched.stage_device[i] != s.device:
                raise PlanError(f"plan stage {i} is on device {s.device} but its schedule runs it on device "
                                f"{sched.stage_device[i]}")
            pos = b
        if pos != n:
            raise PlanError(f"plan stages cover {pos} of {n} units")
        rc = [s.index for s in self.stages if s.recompute]
        if rc and not self.train:
            raise PlanError(f"stages {rc} recompute but the plan is forward-only (train=False): recomputation only "
                            "applies to training; set their recompute to false")
        if rc and any(i.op.name in ("BWD_INPUT", "BWD_WEIGHT") for prog in sched.programs for i in prog):
            raise PlanError(f"stages {rc} recompute but the schedule {sched.kind!r} splits the backward (BI/BW), "
                            "which fxpipe does not combine with recomputation; use another schedule or recompute=False")
        off = [s.index for s in self.stages if s.offload]
        if off and any(i.op.name in ("BWD_INPUT", "BWD_WEIGHT") for prog in sched.programs for i in prog):
            raise PlanError(f"stages {off} offload but the schedule {sched.kind!r} splits the backward (BI/BW), "
                            "which fxpipe does not combine with weight streaming; use another schedule or "
                            "offload='off'")
        from fxpipe.passes.emit_schedule import validate_schedule

        try:
            validate_schedule(sched)
        except FxpipeError as e:
            raise PlanError(f"its schedule is invalid: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON atomically: on any failure no file (and no .tmp file) is left."""
        path = Path(path)
        # a folder ("." or "runs/") has no file name to put the .tmp next to (with_name raises
        # ValueError on "."); say so instead of a traceback or a "plans/.tmp" file
        if path.is_dir() or not path.name:
            raise PlanError(f"cannot write plan file {path}: it is a folder; give a file name, e.g. {path / 'plan.json'}")
        text = json.dumps(self.to_dict(), indent=1)  # before touching the disk: a bad value fails here
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise PlanError(f"cannot write plan file {path}: {e.strerror or e}; check that the folder exists "
                            "and is writable") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @staticmethod
    def load(path: str | os.PathLike, fingerprint: str | None = None) -> "Plan":
        """Read a plan file; with `fingerprint`, refuse a plan made for another model."""
        data = read_json_file(path, "plan file", " (truncated?); re-create it with `fxpipe plan`")
        plan = Plan.from_dict(data, where=f"plan file {path}")
        if fingerprint is not None:
            plan.require_fingerprint(fingerprint)
        return plan

    def require_fingerprint(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise PlanError(f"this plan was made for another model (fingerprint {self.fingerprint[:12]} of "
                            f"{self.model_name}, this model has {fingerprint[:12]}); re-plan this model (fxpipe.plan or "
                            "`fxpipe plan`), or use the plan file made for it")

    def with_(self, **changes: Any) -> "Plan":
        return replace(self, **changes)


_PLAN_KEYS = ("format", "version", "fingerprint", "model_name", "capture_path", "input_names", "batch_size",
              "microbatches", "train", "optimizer", "cluster", "stages", "schedule", "costs", "predicted")


def _stage_flags(st: StagePlan) -> str:
    return " ".join(f for f, on in (("recompute", st.recompute), ("offload", st.offload)) if on)


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def _clip(s: str, w: int) -> str:
    return s if len(s) <= w else s[: w - 1] + "…"
