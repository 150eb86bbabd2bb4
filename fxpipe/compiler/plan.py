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
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from fxpipe.compiler.cluster import Cluster
from fxpipe.compiler.json_files import read_json_file
from fxpipe.errors import FxpipeError, PlanError
from fxpipe.passes.annotate_costs import CostTable, SharedTensor
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


_STAGE_NUMBERS = ("param_bytes", "fwd_ms", "bwd_ms", "send_ms", "send_bytes", "memory_bytes", "inflight")


def restaged(plan: Plan) -> Plan:
    """`plan` with its per-stage numbers and predictions recomputed from its own cost table
    when they disagree with its stage cuts; `plan` itself when they agree.

    Why: the cuts (`stages[i].units`) may be edited by hand in the JSON; the runtime follows
    the cuts, but the stored parameter bytes, times, memory and predicted step would still
    describe the old ones (`fxpipe inspect` would show them). Everything they derive from is
    in the file (cost table, cluster, schedule, each stage's recompute/offload choice, which
    are kept as written), so they are recomputed with the planner's own functions; the plan
    records which stages changed in `predicted["restaged"]` and `summary()` says so.
    """
    from fxpipe.compiler.stage_pricing import _problem, _simulate, _splits_backward, _stage_plans, plan_costs
    from fxpipe.passes.emit_schedule import peak_inflight
    from fxpipe.passes.partition_problem import Partition
    from fxpipe.passes.partition_stages import stage_memory, stage_time

    costs = plan_costs(plan)
    sched = plan.schedule
    stage_device = [st.device for st in plan.stages]
    inflight = peak_inflight(sched)
    split = _splits_backward(sched)

    def problem(recompute: str, offload: str) -> Any:  # each variant forced: the stage's own choice
        return _problem(costs, plan.cluster, stage_device, inflight, plan.train, plan.optimizer, recompute,
                        split_backward=split, offload=offload)

    variants: dict[tuple[bool, bool], Any] = {}
    times, mems = [], []
    for j, st in enumerate(plan.stages):
        key = (st.recompute, st.offload)
        if key not in variants:
            variants[key] = problem("on" if st.recompute else "off", "on" if st.offload else "off")
        pr = variants[key]
        times.append(stage_time(pr, *st.units, j))
        mems.append(stage_memory(pr, *st.units, j))
    part = Partition(bounds=tuple(st.units for st in plan.stages), stage_time=tuple(times), stage_memory=tuple(mems),
                     bottleneck=max(times), method="given",
                     fits=all(m <= cap for m, cap in zip(mems, next(iter(variants.values())).device_memory)),
                     recompute=tuple(st.recompute for st in plan.stages),
                     offload=tuple(st.offload for st in plan.stages))
    fresh = _stage_plans(part, costs, plan.cluster, stage_device, plan.train, inflight)

    def same(a: StagePlan, b: StagePlan) -> bool:
        return all(math.isclose(getattr(a, k), getattr(b, k), rel_tol=1e-6, abs_tol=1e-9) for k in _STAGE_NUMBERS)

    changed = [st.index for st, f in zip(plan.stages, fresh) if not same(st, f)]
    if not changed:
        return plan
    # a cost table damaged within each field's range (1e308 bytes) can still overflow here:
    # the plan would load but not save and load again
    bad = next((f"stages[{f.index}].{k}" for f in fresh for k in _STAGE_NUMBERS if not math.isfinite(getattr(f, k))),
               None)
    tl = _simulate(sched, fresh, costs, plan.cluster)
    if bad is None and not math.isfinite(tl.step_time):
        bad = "the predicted step"
    if bad is not None:
        raise PlanError(f"its cost table gives a non-finite {bad} for the stage cuts it holds")
    predicted = {
        **plan.predicted,
        "step_ms": tl.step_time * 1e3,
        "bottleneck_ms": part.bottleneck * 1e3,
        "bubble": sum(tl.bubble_fraction) / len(tl.bubble_fraction),
        "bubble_per_device": list(tl.bubble_fraction),
        "peak_memory_bytes": [st.memory_bytes for st in fresh],
        "peak_activation_bytes": list(tl.peak_memory or ()),
        "restaged": changed,
    }
    return replace(plan, stages=tuple(fresh), predicted=predicted)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Fields:
    """Typed access to the fields of a plan's JSON form; every failure is a PlanError naming the field."""

    def __init__(self, where: str):
        self.where = where

    def get(self, d: dict, key: str, prefix: str = "") -> Any:
        if not isinstance(d, dict):
            raise PlanError(f"{prefix.rstrip('.') or 'the plan'} must be an object, got {_show(d)}")
        if key not in d:
            raise PlanError(f"field '{prefix}{key}' is missing")
        return d[key]

    def keys(self, d: Any, prefix: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
        if not isinstance(d, dict):
            raise PlanError(f"'{prefix.rstrip('.')}' must be an object, got {_show(d)}")
        missing = [k for k in required if k not in d]
        if missing:
            raise PlanError(f"field(s) {', '.join(repr(prefix + k) for k in missing)} missing")
        extra = sorted(str(k) for k in d if k not in required and k not in optional)
        if extra:
            raise PlanError(f"unknown field(s) {', '.join(repr(prefix + k) for k in extra)}")

    def _fail(self, name: str, want: str, v: Any) -> PlanError:
        return PlanError(f"field '{name}' must be {want}, got {_show(v)}")

    def string(self, d: dict, key: str, prefix: str = "") -> str:
        v = self.get(d, key, prefix)
        if not isinstance(v, str) or not v:
            raise self._fail(prefix + key, "a non-empty string", v)
        return v

    def choice(self, d: dict, key: str, options: tuple[str, ...], prefix: str = "") -> str:
        v = self.get(d, key, prefix)
        if v not in options or not isinstance(v, str):
            raise self._fail(prefix + key, f"one of {', '.join(map(repr, options))}", v)
        return v

    def strings(self, d: dict, key: str, prefix: str = "") -> list[str]:
        v = self.get(d, key, prefix)
        if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, str) and x for x in v):
            raise self._fail(prefix + key, "a non-empty list of names", v)
        return v

    def integer(self, d: dict, key: str, prefix: str = "", low: int = 0) -> int:
        v = self.get(d, key, prefix)
        if not _is_int(v) or v < low:
            raise self._fail(prefix + key, f"an integer >= {low}", v)
        return v

    def number(self, d: dict, key: str, prefix: str = "") -> float:
        v = self.get(d, key, prefix)
        return self.value(v, prefix + key)

    def value(self, v: Any, name: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise self._fail(name, "a finite number >= 0", v)
        return v

    def boolean(self, d: dict, key: str, prefix: str = "") -> bool:
        v = self.get(d, key, prefix)
        if not isinstance(v, bool):
            raise self._fail(prefix + key, "true or false", v)
        return v

    def items(self, d: dict, key: str, prefix: str = "") -> list:
        v = self.get(d, key, prefix)
        if not isinstance(v, (list, tuple)) or not v:
            raise self._fail(prefix + key, "a non-empty list", v)
        return v

    def mapping(self, d: dict, key: str, prefix: str = "") -> dict:
        v = self.get(d, key, prefix)
        if not isinstance(v, dict):
            raise self._fail(prefix + key, "an object", v)
        return v

    def numbers(self, v: Any, name: str, length: int | None = None, integers: bool = False) -> tuple:
        if not isinstance(v, (list, tuple)) or (length is not None and len(v) != length):
            raise self._fail(name, "a list of numbers" + (f" with {length} entries" if length is not None else ""), v)
        for i, x in enumerate(v):
            if integers and not _is_int(x):
                raise self._fail(f"{name}[{i}]", "an integer >= 0", x)
            self.value(x, f"{name}[{i}]")
        return tuple(v)


def _show(v: Any) -> str:
    text = repr(v)
    return (text if len(text) <= 60 else text[:57] + "...") + f" ({type(v).__name__})"


def _nested(build: Any, data: Any, name: str) -> Any:
    """Run a nested from_dict (cluster, schedule); its message already names the field."""
    try:
        return build(data, name) if build is Cluster.from_dict else build(data)
    except PlanError:
        raise
    except FxpipeError as e:  # ScheduleError: the schedule part of a plan is the plan's problem
        raise PlanError(str(e)) from None


def _stage_from_dict(r: _Fields, s: Any, name: str) -> StagePlan:
    late = ("recompute", "offload")  # fields added later: older plan files lack them
    r.keys(s, name + ".", required=tuple(k for k in StagePlan.__slots__ if k not in late), optional=late)
    pre = name + "."
    units = s["units"]
    if not (isinstance(units, (list, tuple)) and len(units) == 2 and all(_is_int(u) and u >= 0 for u in units)):
        raise PlanError(f"field '{pre}units' must be [start, end] unit indices, got {_show(units)}")
    return StagePlan(
        index=r.integer(s, "index", pre), device=r.integer(s, "device", pre), units=(units[0], units[1]),
        param_bytes=r.number(s, "param_bytes", pre), fwd_ms=r.number(s, "fwd_ms", pre),
        bwd_ms=r.number(s, "bwd_ms", pre), send_ms=r.number(s, "send_ms", pre),
        send_bytes=r.number(s, "send_bytes", pre), memory_bytes=r.number(s, "memory_bytes", pre),
        inflight=r.integer(s, "inflight", pre), recompute=r.boolean(s, "recompute", pre) if "recompute" in s else False,
        offload=r.boolean(s, "offload", pre) if "offload" in s else False)


def _costs_from_dict(r: _Fields, c: Any) -> CostTable:
    fields = tuple(CostTable.__dataclass_fields__)
    # fields added later have defaults: plans written before them still load
    optional = tuple(k for k, f in CostTable.__dataclass_fields__.items() if f.default is not MISSING)
    r.keys(c, "costs.", required=tuple(k for k in fields if k not in optional), optional=optional)
    names = r.strings(c, "unit_names", "costs.")
    n = len(names)
    out: dict[str, Any] = {"unit_names": tuple(names)}
    for k in fields:
        if k == "unit_names" or k not in c:
            continue
        if k in optional and c[k] == []:
            continue  # how to_dict writes a field that a plan from before it lacked: still absent
        if k == "shared":
            out[k] = tuple(_shared_from_dict(r, x, f"costs.shared[{i}]", n) for i, x in enumerate(r.items(c, k, "costs.")))
        elif k.startswith("node_"):
            v = c[k]
            if not isinstance(v, (list, tuple)) or len(v) != n:
                raise PlanError(f"field 'costs.{k}' must be a list of {n} lists (one per unit), got {_show(v)}")
            out[k] = tuple(r.numbers(x, f"costs.{k}[{u}]") for u, x in enumerate(v))
        else:
            out[k] = r.numbers(c[k], f"costs.{k}", n - 1 if k == "boundary_bytes" else n, integers=k == "launches")
    for u, (a, b) in enumerate(zip(out["node_flops"], out["node_bytes"])):
        if len(a) != len(b):
            raise PlanError(f"fields 'costs.node_flops[{u}]' and 'costs.node_bytes[{u}]' differ in length")
    return CostTable(**out)


def _shared_from_dict(r: _Fields, x: Any, name: str, n: int) -> SharedTensor:
    r.keys(x, name + ".", required=("bytes", "trainable_bytes", "units"))
    units = r.numbers(x["units"], f"{name}.units", integers=True)
    if len(units) < 2 or any(not 0 <= u < n for u in units) or list(units) != sorted(set(units)):
        raise PlanError(f"field '{name}.units' must list at least two distinct unit indices in 0..{n - 1}, "
                        f"ascending, got {_show(x['units'])}")
    return SharedTensor(r.number(x, "bytes", name + "."), r.number(x, "trainable_bytes", name + "."), tuple(units))


def _predicted_from_dict(r: _Fields, p: Any) -> dict[str, Any]:
    if not isinstance(p, dict):
        raise PlanError(f"field 'predicted' must be an object, got {_show(p)}")
    out = dict(p)
    for k in ("step_ms", "bottleneck_ms", "bubble"):
        out[k] = r.number(p, k, "predicted.")
    for k in ("bubble_per_device", "peak_memory_bytes"):
        if k in p:
            out[k] = list(r.numbers(p[k], f"predicted.{k}"))
    if "auto" in p:  # the candidates auto mode compared (explain_plan lists them)
        if not isinstance(p["auto"], list):
            raise PlanError(f"field 'predicted.auto' must be a list of candidates, got {_show(p['auto'])}")
        for i, c in enumerate(p["auto"]):
            pre = f"predicted.auto[{i}]."
            r.keys(c, pre, required=("schedule", "microbatches", "fits"), optional=("step_ms", "recompute_stages", "offload_stages", "why",
                                                                             "skipped", "lower_bound_ms"))
            r.string(c, "schedule", pre)
            r.integer(c, "microbatches", pre, low=1)
            if r.boolean(c, "fits", pre) or "step_ms" in c:
                r.number(c, "step_ms", pre)
            for k in ("recompute_stages", "offload_stages"):
                if k in c:
                    r.integer(c, k, pre)
            if "lower_bound_ms" in c:
                r.number(c, "lower_bound_ms", pre)
            if "skipped" in c:
                r.boolean(c, "skipped", pre)
            if "why" in c and not isinstance(c["why"], str):
                raise PlanError(f"field '{pre}why' must be a string, got {_show(c['why'])}")
    return out


def _baselines_from_dict(r: _Fields, b: Any) -> dict[str, Any]:
    if not isinstance(b, dict):
        raise PlanError(f"field 'baselines' must be an object, got {_show(b)}")
    for name, v in b.items():
        pre = f"baselines.{name}."
        r.keys(v, pre, required=("bottleneck_ms", "fits"), optional=("bounds", "recompute", "offload", "step_ms"))
        r.number(v, "bottleneck_ms", pre)
        if "step_ms" in v:
            r.number(v, "step_ms", pre)
        r.boolean(v, "fits", pre)
        for k in ("recompute", "offload"):
            if k in v and not (isinstance(v[k], list) and all(isinstance(x, bool) for x in v[k])):
                raise PlanError(f"field '{pre}{k}' must be a list of true/false per stage, got {_show(v[k])}")
        bounds = v.get("bounds", [])
        if not isinstance(bounds, (list, tuple)) or not all(
                isinstance(x, (list, tuple)) and len(x) == 2 and all(_is_int(u) for u in x) for x in bounds):
            raise PlanError(f"field '{pre}bounds' must be a list of [start, end] pairs, got {_show(bounds)}")
    return dict(b)


def graph_fingerprint(gm: fx.GraphModule, params: dict[str, Any]) -> str:
    """A hash of the graph's structure and its parameters' shapes and dtypes.

    `contiguous` calls are left out: they change no value, and torch.export records one only
    where a tensor is not contiguous already, which depends on the device's kernels (meta's
    attention returns other strides than CPU's), so a plan made on the meta device still
    matches the real model's graph.
    """
    h = hashlib.sha256()
    for n in gm.graph.nodes:
        if _is_contiguous_call(n):
            continue
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        h.update(f"{n.op}|{target}|{len(n.args)}|{sorted(n.kwargs)}\n".encode())
    for k in sorted(params):
        t = params[k]
        h.update(f"{k}:{tuple(getattr(t, 'shape', ()))}:{getattr(t, 'dtype', '')}\n".encode())
    return h.hexdigest()


def _is_contiguous_call(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target == "contiguous"
    return n.op == "call_function" and n.target is torch.ops.aten.contiguous.default


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
