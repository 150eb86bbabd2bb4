"""The compiler pipeline: the one place that lists the passes in order.

Reading `build_plan` top to bottom tells the whole compiler: capture, shapes, units, costs,
partition, schedule, simulate, plan. `FXPIPE_DUMP=dir` writes each step's text form.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from fxpipe.compiler.capture import Captured, capture, samples_mixed
from fxpipe.compiler.cluster import Cluster, Device
from fxpipe.compiler.plan import OPTIMIZER_STATE_FACTOR, Plan, StagePlan, graph_fingerprint
from fxpipe.errors import PlanError, ScheduleError
from fxpipe.passes.annotate_costs import CostTable, annotate_costs, device_offload_unit_times, device_unit_times
from fxpipe.passes.check_host_memory import HostUse, host_shares, host_usage, over_host_memory, replicas
from fxpipe.passes.emit_schedule import Op, Schedule, emit_schedule, peak_inflight, validate_schedule
from fxpipe.passes.group_units import Units, group_units
from fxpipe.passes.load_schedule import load_schedule
from fxpipe.passes.fuse_elementwise import fuse_elementwise
from fxpipe.passes.place_stages import Placement, class_orders, device_classes, place_stages
from fxpipe.passes.partition_stages import (Partition, PartitionProblem, evaluate_partition, memory_shortfall,
                                            optimal_bottleneck, params_partition, partition_stages,
                                            step_candidates, uniform_partition)
from fxpipe.passes.profile_units import profile_units
from fxpipe.passes.propagate_shapes import propagate_shapes
from fxpipe.passes.simulate_schedule import Timeline, simulate_schedule
from fxpipe.passes.step_bound import costs_step_lower_bound
from fxpipe.runtime.offload import DEFAULT_MIN_UNIT_BYTES

__all__ = ["build_plan", "build_from_plan", "check_options", "Compilation", "normalize_inputs", "microbatch_sizes",
           "SCHEDULES", "simulate_plan", "virtual_stage_count", "custom_schedule", "plan_costs", "MICROBATCHES_UNSET",
           "AUTO_MICROBATCHES", "auto_microbatch_counts", "recompute_mode", "offload_mode"]

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
# auto mode's candidates; the order is also the tie-break (simpler schedules first)
AUTO_SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
# Auto mode skips candidates whose step's lower bound loses to a plan found; benchmarks set
# it False to plan every candidate and check the choice is the same.
AUTO_PRUNE = True
AUTO_REFINE = 3  # auto mode refines the cut (`_refine_cut`) of this many of its fastest candidates
AUTO_MICROBATCHES = (1, 2, 4, 8, 16, 32)  # and on, doubling, up to 2 per device (`auto_microbatch_counts`)


@dataclass
class Compilation:
    """What planning produced: the plan plus the graph it was made from (not saved)."""

    plan: Plan
    captured: Captured
    units: Units


def normalize_inputs(example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple of args, or a dict of kwargs as example inputs."""
    kwargs = dict(example_kwargs or {})
    if example_inputs is None:
        args: tuple = ()
    elif isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif isinstance(example_inputs, dict):
        args, kwargs = (), {**example_inputs, **kwargs}
    elif isinstance(example_inputs, (list, tuple)):
        args = tuple(example_inputs)
    else:
        raise PlanError(f"example_inputs must be a tensor, a tuple of arguments or a dict of keyword arguments, "
                        f"got {type(example_inputs).__name__}")
    if not args and not kwargs:
        raise PlanError("example_inputs are required: pass a real batch, e.g. example_inputs=(x,)")
    return args, kwargs


def microbatch_sizes(batch: int, m: int) -> list[int]:
    """Sizes of m microbatches of a batch (torch.tensor_split's: the first ones one larger)."""
    if batch < 1:  # "use microbatches <= 0" below would be no advice at all
        raise PlanError(f"the batch is empty (dim 0 of the inputs is {batch}); give at least one sample per "
                        f"microbatch ({m} here)")
    if m > batch:
        raise PlanError(f"{m} microbatches asked for a batch of {batch} samples: each microbatch needs at least "
                        f"one sample; use microbatches <= {batch} or a larger batch")
    return [batch // m + (1 if i < batch % m else 0) for i in range(m)]


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


def _dump(name: str, text: str) -> None:
    d = os.environ.get("FXPIPE_DUMP")
    if d:
        try:
            Path(d).mkdir(parents=True, exist_ok=True)
            (Path(d) / f"{name}.txt").write_text(text)
        except OSError as e:  # a debugging aid must not fail with a traceback after planning
            raise PlanError(f"FXPIPE_DUMP={d!r}: cannot write {name}.txt there ({e.strerror or e}); set FXPIPE_DUMP "
                            "to a folder that can be created, or unset it") from None


def auto_microbatch_counts(batch: int, n_devices: int) -> list[int]:
    """The m auto mode tries: 1, 2, 4, ... up to max(32, 2 x devices), at most the batch (many
    devices need many microbatches to fill the pipeline; more than 2 per device gains little).

        >>> auto_microbatch_counts(64, 64), auto_microbatch_counts(16, 2)
        ([1, 2, 4, 8, 16, 32, 64], [1, 2, 4, 8, 16])
    """
    top = min(batch, max(AUTO_MICROBATCHES[-1], 2 * n_devices))
    return [1 << k for k in range(top.bit_length()) if 1 << k <= top]


def _stage_devices(schedule: str, p: int, v: int) -> tuple[int, ...]:
    """Stage -> device: one stage per device, or v round-robin virtual stages (interleaved)."""
    return tuple(s % p for s in range(p * v)) if schedule == "interleaved" else tuple(range(p))


def virtual_stage_count(schedule: str, virtual_stages: Any) -> int:
    """v: 2 by default for the interleaved schedule, 1 (and only 1) for the others."""
    if virtual_stages is None:
        return 2 if schedule == "interleaved" else 1
    if not isinstance(virtual_stages, int) or isinstance(virtual_stages, bool) or virtual_stages < 1:
        raise PlanError(f"virtual_stages must be a positive integer, got {virtual_stages!r}")
    if virtual_stages > 1 and schedule != "interleaved":
        raise PlanError(f"virtual_stages={virtual_stages} needs schedule='interleaved' (schedule {schedule!r} runs "
                        "one stage per device)")
    return virtual_stages


def recompute_mode(recompute: Any) -> str:
    """The partitioner's mode for the `recompute` option: True -> "on", False -> "off", "auto"."""
    if recompute is True:
        return "on"
    if recompute is False:
        return "off"
    if isinstance(recompute, str) and recompute == "auto":
        return "auto"
    raise PlanError(f"recompute must be True (every stage recomputes its activations in backward), False (none) "
                    f"or 'auto' (only stages that would not fit otherwise), got {recompute!r}")


def offload_mode(offload: Any) -> str:
    """The partitioner's mode for the `offload` option ("off", "on" or "auto"), checked."""
    if isinstance(offload, str) and offload in ("off", "on", "auto"):
        return offload
    raise PlanError(f"offload must be 'auto' (a stage streams its weights from host memory only when it would not "
                    f"fit otherwise), 'off' (never) or 'on' (every stage), got {offload!r}")


def check_options(*, microbatches: Any, schedule: Any, optimizer: Any, train: Any, recompute: Any = False,
                  offload: Any = "off") -> None:
    """Refuse bad planning options before any work is done (PlanError says what to pass).

    `schedule` and `microbatches` may be "auto" (auto mode picks them)."""
    if not isinstance(schedule, str) or schedule not in SCHEDULES + ("auto",):
        raise PlanError(f"unknown schedule {schedule!r}: use one of {', '.join(map(repr, SCHEDULES + ('auto',)))}")
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZER_STATE_FACTOR:
        raise PlanError(f"unknown optimizer {optimizer!r}: use one of {', '.join(map(repr, OPTIMIZER_STATE_FACTOR))} "
                        "(it decides how much optimizer state the memory model counts per parameter)")
    if microbatches != "auto" and (not isinstance(microbatches, int) or isinstance(microbatches, bool)
                                   or microbatches < 1):
        raise PlanError(f"microbatches must be a positive integer (e.g. microbatches=4) or 'auto', "
                        f"got {microbatches!r} of type {type(microbatches).__name__}")
    if not isinstance(train, bool):
        raise PlanError(f"train must be True or False, got {train!r}")
    mode = recompute_mode(recompute)
    if mode == "on" and not train:
        raise PlanError("recompute=True needs train=True: a forward-only plan keeps no activations to recompute; "
                        "leave recompute out")
    if mode == "on" and schedule == "zb-h1":
        raise PlanError("recompute=True cannot be combined with schedule='zb-h1': its split backward (BI then BW) "
                        "would recompute each forward twice, and fxpipe's BI/BW runtime does not support it; use "
                        "schedule='1f1b' (or 'gpipe', 'interleaved') with recompute, or recompute='auto'")
    off = offload_mode(offload)
    if off == "on" and schedule == "zb-h1":
        raise PlanError("offload='on' cannot be combined with schedule='zb-h1': its split backward (BI then BW) "
                        "would stream each unit's weights twice, and fxpipe's BI/BW runtime does not stream them; "
                        "use schedule='1f1b' (or 'gpipe', 'interleaved') with offload, or offload='auto'")


def _front(model: nn.Module, args: tuple, kwargs: dict, p: int, m: int, capture_method: str,
           leaf_modules: tuple[type, ...], prog: "_Progress", plan: Plan | None = None,
           fuse: bool = False, fused_dropout: bool = False) -> tuple[Captured, Units, CostTable]:
    """capture -> shapes -> (fuse) -> units -> costs: what planning and re-using a saved `plan` share."""
    if not isinstance(model, nn.Module):
        raise PlanError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # capture first: everything after works on the one flat fx graph it returns
    # (a model on meta with a list of identical blocks: two traced, the rest copied)
    prog.start("capture")
    cap = capture(model, args, kwargs, method=capture_method, leaf_modules=leaf_modules)
    prog.done("capture", f"({cap.path}, {len(cap.gm.graph.nodes)} nodes{'; ' + cap.repeated if cap.repeated else ''})")
    # the fingerprint is of the graph as captured: later rewrites (fusion) do not change it
    cap.fingerprint = _fingerprint(model, cap)
    if plan is not None:  # another model's plan is refused before any more work
        plan.require_fingerprint(cap.fingerprint)
    sizes = microbatch_sizes(cap.batch_size, m)
    # before any pricing: with several microbatches a model that relates the samples of dim 0
    # (a sequence-first model: time is dim 0) would run silently wrong
    mixed = samples_mixed(model, cap, args, kwargs) if m > 1 else None
    if mixed:
        raise PlanError(
            f"{type(model).__name__} does not compute the samples along dim 0 independently: {mixed}. fxpipe "
            f"splits dim 0 of every input into microbatches ({m} here), so the pipeline would compute something "
            "else. If dim 0 is not the batch (a sequence-first model: nn.LSTM, nn.GRU, nn.MultiheadAttention and "
            "nn.Transformer default to batch_first=False), make the model batch-first (batch_first=True, inputs "
            "(batch, seq, ...)); if it relates samples on purpose (in-batch statistics or negatives), use "
            "microbatches=1")
    _dump("capture", cap.gm.code)
    units, costs = _analyse(cap, args, kwargs, sizes[0], p, prog, fuse=fuse, fused_dropout=fused_dropout)
    return cap, units, costs


def _analyse(cap: Captured, args: tuple, kwargs: dict, size: int, p: int, prog: "_Progress",
             fuse: bool = False, fused_dropout: bool = False) -> tuple[Units, CostTable]:
    """shapes -> (fuse) -> units -> costs of the captured graph for microbatches of `size`
    samples and p stages; auto mode re-runs it per distinct (size, p), the capture once.
    `fused_dropout`: attention with dropout runs fused on every device (`_fused_dropout`)."""
    # shapes at the largest microbatch: what each stage really sees per step
    prog.start("shapes")
    flat = cap.flat_inputs(args, kwargs)
    propagate_shapes(cap.gm, [x[:size] if x.dim() else x for x in flat])
    prog.done("shapes")

    # fusion after shapes (it reads them to match bias and mask operands), before units and
    # costs (a fused op is one node of its unit, priced with the FLOPs it replaced)
    if fuse:
        prog.start("fuse")
        called = {n.target for n in cap.gm.graph.nodes if n.op == "call_module"}
        fused = fuse_elementwise(cap.gm).fused
        # a fused dropout took its module's mode as a constant: calls must keep that mode
        gone = called - {n.target for n in cap.gm.graph.nodes if n.op == "call_module"}
        cap.modes.update({name: cap.gm.get_submodule(name).training for name in gone})
        prog.done("fuse", f"({len(fused)} fused)")

    # units before costs: costs are aggregated per unit, the partitioner's atoms
    prog.start("units+costs")
    units = group_units(cap.gm, min_units=max(8, 4 * p))
    costs = annotate_costs(cap.gm, units, fused_attention_dropout=fused_dropout)
    prog.done("costs", f"({len(units)} units)")
    _dump("units", "\n".join(f"{i}: {n} ({len(units.nodes[i])} nodes)" for i, n in enumerate(units.names)))
    return units, costs


def _fused_dropout(cluster: Cluster) -> bool:
    """Whether every device runs attention with dropout fused (CUDA's flash / memory-efficient
    SDPA; a CPU runs it by the math path, which keeps the score matrix)."""
    return all(d.kind != "cpu" for d in cluster.devices)


def _too_few_units(cap: Captured, units: Units, p: int) -> str:
    """Why `cap` has fewer units than devices, and what gives it more."""
    msg = (f"the model has {len(units)} units ({', '.join(units.names[:8])}{', ...' if len(units) > 8 else ''}) but "
           f"{p} devices were given, and a unit is the smallest piece a stage holds; use at most {len(units)} devices")
    # fx keeps every torch.nn module but Sequential as one call (nn.TransformerEncoder with all
    # its layers, nn.Transformer): the whole stack becomes a single unit
    whole = [(str(n.target), type(cap.gm.get_submodule(str(n.target))).__name__)
             for n in cap.gm.graph.nodes if n.op == "call_module"
             and any(True for _ in cap.gm.get_submodule(str(n.target)).children())]
    if cap.path == "fx" and whole:
        shown = ", ".join(f"{t} ({k})" for t, k in whole[:3])
        msg += (f", or let the capture look inside the torch.nn modules fx keeps whole ({shown}) with "
                "capture_method='export'")
    return msg


class _Unset:
    """The default of `microbatches`: 4, or what a custom schedule says (None is a bad value)."""

    def __repr__(self) -> str:
        return "4 (or the schedule's)"


MICROBATCHES_UNSET: Any = _Unset()


def custom_schedule(schedule: Any) -> Schedule | None:
    """The user's own schedule when `schedule` is one (a Schedule, or the path of a .json/.csv
    file, read by `load_schedule`), None when it names a built-in kind."""
    if isinstance(schedule, Schedule):
        validate_schedule(schedule)
        return schedule
    if isinstance(schedule, os.PathLike) or (
            isinstance(schedule, str) and schedule not in SCHEDULES and Path(schedule).suffix.lower() in (".json", ".csv")):
        return load_schedule(schedule)
    return None


def _resolve_schedule(schedule: Any, microbatches: Any, p: int, train: bool,
                      virtual_stages: Any) -> tuple[str, Schedule | None, Any]:
    """(kind, user schedule or None, m): a user schedule decides the stage count and m."""
    user = custom_schedule(schedule)
    given = microbatches is not MICROBATCHES_UNSET
    if user is None:
        return schedule, None, microbatches if given else 4
    if given and microbatches != user.num_microbatches:
        raise PlanError(f"microbatches={microbatches!r} was given but the schedule runs {user.num_microbatches} "
                        "microbatches; leave microbatches out (the schedule decides it) or write the schedule for "
                        f"{microbatches}")
    if user.num_devices != p:
        raise PlanError(f"the schedule has programs for {user.num_devices} devices but the cluster has {p} devices; "
                        f"give {user.num_devices} devices or write the schedule for {p}")
    if user.train != train:
        raise PlanError(f"the schedule is a {'training' if user.train else 'forward-only'} schedule but "
                        f"train={train} was asked for")
    if virtual_stages is not None:
        raise PlanError("virtual_stages is decided by a custom schedule's stage_device; leave it out")
    return user.kind, user, user.num_microbatches


def build_plan(
    model: nn.Module,
    devices: Sequence[str | Device] | Cluster,
    example_inputs: Any = None,
    example_kwargs: dict | None = None,
    *,
    microbatches: int | str = MICROBATCHES_UNSET,
    schedule: str | Schedule | os.PathLike = "1f1b",
    train: bool = True,
    optimizer: str = "adam",
    capture_method: str = "auto",
    leaf_modules: tuple[type, ...] = (),
    virtual_stages: int | None = None,
    progress: bool = False,
    profile: bool = False,
    fuse: bool = False,
    recompute: bool | str = "auto",
    offload: str = "auto",
) -> Compilation:
    """Run the planning passes; decide everything, execute nothing (except, with `profile`,
    each unit once per device kind to time it).

    `schedule` is a built-in kind or the user's own (a Schedule, or a .json/.csv path): its
    stage_device and num_microbatches then decide the stages and m (4 by default otherwise).
    `schedule="auto"` and/or `microbatches="auto"` plan every candidate (gpipe, 1f1b,
    interleaved v=2, zb-h1; m in 1, 2, 4, .., max(32, 2 x devices) up to the batch) and keep
    the fitting plan with the smallest predicted step (ties: fewer microbatches, then the
    simpler schedule); the candidates are recorded in ``plan.predicted["auto"]``. Candidates
    are planned in the order of a lower bound on their step and skipped once a plan beats it.
    `recompute`: True (every stage recomputes its activations in backward), False, or
    "auto" (per stage, only where keeping the activations would not fit; the DP decides).
    `offload`: "auto" (a stage keeps its weights, grads and optimizer state in host memory and
    streams each unit's weights in only where it would not fit otherwise, and then fits),
    "off" or "on" (every stage; for benchmarks and tests).
    """
    cluster = devices if isinstance(devices, Cluster) else Cluster.from_devices(devices)
    auto_s = isinstance(schedule, str) and schedule == "auto"
    auto_m = isinstance(microbatches, str) and microbatches == "auto"
    if auto_s or auto_m:
        if custom_schedule(schedule if not auto_s else "1f1b") is not None:
            raise PlanError("microbatches='auto' cannot be used with a custom schedule: the schedule fixes the "
                            "microbatch count; leave microbatches out")
        if virtual_stages is not None and auto_s:
            raise PlanError("virtual_stages cannot be given with schedule='auto' (it tries interleaved with v=2); "
                            "give schedule='interleaved' to choose v")
        kind, user, m = schedule, None, microbatches if microbatches is not MICROBATCHES_UNSET else 4
        if not auto_s and isinstance(kind, str) and kind in SCHEDULES:
            virtual_stage_count(kind, virtual_stages)  # refuses v > 1 with a non-interleaved schedule
    else:
        kind, user, m = _resolve_schedule(schedule, microbatches, len(cluster), train, virtual_stages)
    check_options(microbatches=m, schedule=kind if user is None else SCHEDULES[0], optimizer=optimizer, train=train,
                  recompute=recompute, offload=offload)
    if not isinstance(profile, bool):
        raise PlanError(f"profile must be True or False, got {profile!r}")
    if profile and isinstance(model, nn.Module) and any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        # said before the capture, which takes minutes on a large model (profile_units says it too)
        raise PlanError("profile=True runs every unit on the device, but the model's parameters are on the meta "
                        "device: materialize them first, or plan with profile=False (roofline costs)")
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    prog = _Progress(progress)
    p = len(cluster)
    mode = recompute_mode(recompute)
    off = offload_mode(offload)
    if not (auto_s or auto_m):
        stage_device = user.stage_device if user is not None else _stage_devices(kind, p, virtual_stage_count(kind, virtual_stages))
        cap, units, costs = _front(model, args, kwargs, len(stage_device), m, capture_method, leaf_modules, prog,
                                   fuse=fuse, fused_dropout=_fused_dropout(cluster))
        costs = _profiled(costs, model, cap, args, kwargs, m, cluster, stage_device, train, profile, progress, prog)
        if user is not None and _splits_backward(user) and off == "on":
            raise PlanError("offload='on' cannot be combined with a schedule that splits the backward (BI/BW): "
                            "fxpipe's BI/BW runtime does not stream weights; use offload='auto' or 'off'")
        plan = _plan_one(kind, user, m, stage_device, cap, units, costs, cluster, model, train, optimizer,
                         _mode_for(mode, kind, train), fuse, prog, _offload_for(off, kind, user))
        _dump("plan", plan.summary())
        _dump("schedule", plan.schedule.listing())
        return Compilation(plan, cap, units)
    return _plan_auto(model, cluster, args, kwargs, kind, m, auto_s, auto_m, train, optimizer, capture_method,
                      leaf_modules, virtual_stages, profile, progress, fuse, mode, prog, off)


def _mode_for(mode: str, kind: str, train: bool) -> str:
    """Recompute mode per schedule: none when forward-only, none with the split backward
    (zb-h1's runtime does not recompute; check_options refuses recompute=True there)."""
    return "off" if not train or kind == "zb-h1" else mode


def _offload_for(off: str, kind: str, user: Schedule | None = None) -> str:
    """Offload mode per schedule: none with the split backward (zb-h1, or a user schedule with
    BI/BW): its runtime does not stream weights (check_options refuses offload='on' there)."""
    split = kind == "zb-h1" or (user is not None and _splits_backward(user))
    return "off" if split else off


def _profiled(costs: CostTable, model: nn.Module, cap: Captured, args: tuple, kwargs: dict, m: int, cluster: Cluster,
              stage_device: Sequence[int], train: bool, profile: bool, progress: bool, prog: _Progress) -> CostTable:
    # profiling after the units (it times each one) and before the partition (which it prices)
    if not profile:
        return costs
    prog.start("profile")
    flat = cap.flat_inputs(args, kwargs)
    size = microbatch_sizes(cap.batch_size, m)[0]
    measured = profile_units(cap.gm, model, [x[:size] if x.dim() else x for x in flat],
                             [cluster.devices[d] for d in sorted(set(stage_device))], train=train, progress=progress)
    prog.done("profile", f"({len(measured[0])} device kind(s))")
    return costs.with_measured(*measured)


def _plan_one(kind: str, user: Schedule | None, m: int, stage_device: Sequence[int], cap: Captured, units: Units,
              costs: CostTable, cluster: Cluster, model: nn.Module, train: bool, optimizer: str, mode: str, fuse: bool,
              prog: _Progress, offload: str = "off", refine: bool = True, host_limits: bool = False) -> Plan:
    """schedule -> placement + partition -> simulate -> Plan, for one schedule kind and m.
    `refine`: improve the chosen cut by moving single cuts (`_refine_cut`); auto mode does it
    only for its best candidates.

    Offloaded stages of one node share its host memory, which a per-stage DP cannot see; so
    the plan is checked after the partition, and when its offloaded stages overfill a host it
    is planned again with each position limited to an equal share of its node's host memory
    (`host_limits`, always within the host: any mix of offloaded stages then fits), and
    refused with the bytes needed and available when nothing fits that way."""
    n_units, n_devs = len(costs.unit_names), len(cluster)
    given = cluster  # the device order as given (placement reorders `cluster` below)
    if len(stage_device) > n_devs and n_units < len(stage_device):
        # the partitioner would say "N devices were given" of the virtual stages, which misleads
        raise PlanError(f"the model has {n_units} units but schedule {kind!r} asks for {len(stage_device)} stages "
                        f"({len(stage_device) // n_devs} virtual stages on each of {n_devs} devices); use fewer "
                        f"virtual stages (at most {n_units // n_devs} here), or finer units")
    if n_units < len(stage_device):  # said here, where the graph can tell the user why the units are so few
        raise PlanError(_too_few_units(cap, units, len(stage_device)))
    # the schedule first: which stage sits where and how many microbatches each keeps alive
    # do not depend on the cut, and the partitioner needs both for its memory model
    prog.start("schedule")
    sched = user if user is not None else emit_schedule(kind, len(stage_device), m, stage_device=stage_device,
                                                        train=train)
    validate_schedule(sched)
    inflight = peak_inflight(sched)
    prog.done("schedule")

    # placement and partition together: every distinct device order gets the exact partition
    # (with the schedule's in-flight counts, since memory depends on the schedule); identical
    # devices keep the order given; recomputation and weight streaming (offload) are decided
    # per stage inside the partition
    prog.start("partition")
    def make_problem(order: Sequence[int]) -> PartitionProblem:
        return _problem(costs, cluster.subset(order), stage_device, inflight, train, optimizer, mode,
                        split_backward=_splits_backward(sched), offload=offload, host_limits=host_limits)

    placement = _step_among_tied_orders(place_stages(make_problem, cluster), make_problem, cluster, sched, costs,
                                        stage_device, train, inflight)
    cluster = cluster.subset(placement.order)
    problem, part = placement.problem, placement.partition
    baselines = {}
    base_parts = {"uniform": uniform_partition(problem), "params": params_partition(problem, costs.param_bytes)}
    for name, b in base_parts.items():
        baselines[name] = {"bounds": [list(x) for x in b.bounds], "bottleneck_ms": b.bottleneck * 1e3, "fits": b.fits}
        if any(b.recompute):
            baselines[name]["recompute"] = list(b.recompute)
        if any(b.offload):
            baselines[name]["offload"] = list(b.offload)
    # the min-bottleneck cut is the best in steady state; with few microbatches the fill and
    # drain weigh too, so cuts trading bottleneck for a smaller total (and the baselines) are
    # simulated as well and the smallest predicted step wins (ties: the smaller bottleneck)
    n_units, n_stages = len(costs.unit_names), len(stage_device)
    limit = 8 if n_units * n_units * n_stages <= 2_000_000 else 0  # each is one more DP pass
    cands = [part] + step_candidates(problem, part, m, limit) + [b for b in base_parts.values() if b.fits]
    prog.done("partition", f"({len(stage_device)} stages)")

    # simulate the schedule against the candidate cuts: the predicted step and bubble
    prog.start("simulate")
    best_key, chosen = None, None
    for c in cands:
        st_c = _stage_plans(c, costs, cluster, stage_device, train, inflight)
        tl_c = _simulate(sched, st_c, costs, cluster)
        for name, b in base_parts.items():
            if b is c:  # the summary compares steps: with few microbatches a baseline's smaller
                # bottleneck can still lose to fxpipe's cut on the fill and drain
                baselines[name]["step_ms"] = tl_c.step_time * 1e3
        key = (tl_c.step_time, c.bottleneck)
        if best_key is None or key < best_key:
            best_key, chosen = key, (c, st_c, tl_c)
    part, stages, tl = chosen
    # the stage times alone do not fix the step: among cuts with one bottleneck and one sum,
    # where the light stages sit changes the fill and drain (GPT-2 XL on 8 H100s, 1F1B, m=8:
    # the left-packed cut leaves the last stage nearly empty at 807 ms, moving a few cuts
    # right gives 779 ms), so the best cut is improved by moving one cut at a time
    tried = len(cands)
    if limit and refine:
        # a few dozen simulations, fewer for long ones (a simulation's work ~ stages x m)
        budget = min(96, 8 * max(1, n_stages - 1), max(8, 40_000 // (n_stages * m)))
        (part, stages, tl), extra = _refine_cut(problem, (part, stages, tl), sched, costs, cluster, stage_device,
                                                train, inflight, budget=budget)
        tried += extra
    prog.done("simulate", f"({tried} cut(s) simulated)")
    factor = OPTIMIZER_STATE_FACTOR[optimizer] if train else 0.0
    hosts = host_usage([s.units for s in stages], stage_device, [s.offload for s in stages], costs, cluster, train,
                       factor)
    over = over_host_memory(hosts)
    if over and not host_limits:
        try:
            return _plan_one(kind, user, m, stage_device, cap, units, costs, given, model, train, optimizer, mode,
                             fuse, prog, offload, refine, host_limits=True)
        except PlanError as e:
            raise PlanError(_host_message(over, e)) from None
    if over:  # within their shares the stages fit together; only rounding could get here
        raise PlanError(_host_message(over, PlanError("the shares add up to more than the host by rounding.")))
    predicted = {
        "step_ms": tl.step_time * 1e3,
        "bottleneck_ms": part.bottleneck * 1e3,
        "bubble": sum(tl.bubble_fraction) / len(tl.bubble_fraction),
        "bubble_per_device": list(tl.bubble_fraction),
        "peak_memory_bytes": [s.memory_bytes for s in stages],
        "peak_activation_bytes": list(tl.peak_memory or ()),
        "cost_source": "measured" if costs.measured_fwd else "roofline",
        "fuse": fuse,
        "recompute": mode,
        "offload": offload,
        "placement": placement.to_dict(),
    }
    if hosts:  # nodes whose host memory holds offloaded stages
        predicted["host_memory"] = [{"node": h.node, "bytes": h.used, "stages": list(h.stages),
                                     **({"capacity": h.capacity} if math.isfinite(h.capacity) else {})} for h in hosts]
    if costs.measured_fwd:  # the plan file's cost table has no room for them (see CostTable)
        predicted["measured_costs"] = costs.measured_to_dict()
    return Plan(
        fingerprint=cap.fingerprint, model_name=type(model).__name__, capture_path=cap.path,
        input_names=cap.input_names, batch_size=cap.batch_size, microbatches=m, train=train, optimizer=optimizer,
        cluster=cluster, stages=tuple(stages), schedule=sched, costs=costs, predicted=predicted,
        baselines=baselines, timings=prog.timings)


def _host_message(over: Sequence[HostUse], retry: PlanError) -> str:
    gib = 1024**3
    where = "; ".join(
        f"{'devices of unknown node (taken as one machine)' if h.node < 0 else f'node {h.node}'}: stages "
        f"{list(h.stages)} need {h.used / gib:.2f} GiB, its host has {h.capacity / gib:.2f} GiB" for h in over)
    return (f"the offloaded stages do not fit in host memory ({where}): an offloaded stage keeps its params, grads "
            f"and optimizer state in its node's host memory, shared by the node's devices. With each stage limited "
            f"to an equal share of its node's host memory no plan fits either: {str(retry).splitlines()[0]} "
            f"To make it fit: use more devices or nodes (less to offload per node), devices with more memory, "
            f"activation recomputation, a lighter optimizer, or give the devices' true host_memory in a cluster file "
            f"(or Cluster.preset(..., host_memory=...)) if the default is too small.")


_TIED_ORDERS = 128  # distinct device orders up to which orders tied on the bottleneck are simulated


def _step_among_tied_orders(placement: Placement, make_problem: Callable[[Sequence[int]], PartitionProblem],
                            cluster: Cluster, sched: Schedule, costs: CostTable, stage_device: Sequence[int],
                            train: bool, inflight: Sequence[int]) -> Placement:
    """Of the device orders with the chosen order's bottleneck (what placement compares, ties
    going to the order listed), the one whose optimal cut simulates to the shortest step.

    Where the slower devices sit changes the fill and drain, which the bottleneck does not
    see: Llama-2-7B on 4 H100 + 4 L4, 1F1B, m=16 predicted 5953 ms listed 'h100*4,l4*4' and
    6245 ms listed 'l4*4,h100*4'. Only for clusters with at most `_TIED_ORDERS` distinct
    orders (one bounded DP per order, one more DP and a simulation per tied one)."""
    orders = list(itertools.islice(class_orders(device_classes(cluster)), _TIED_ORDERS + 1))
    if not 1 < len(orders) <= _TIED_ORDERS:
        return placement
    best_b = placement.partition.bottleneck

    def step(order: Sequence[int], part: Partition) -> float:
        sub = cluster.subset(order)
        return _simulate(sched, _stage_plans(part, costs, sub, stage_device, train, inflight), costs, sub).step_time

    best = (step(placement.order, placement.partition), placement.order, placement.problem, placement.partition)
    for order in orders:
        if order == placement.order:
            continue
        prob = make_problem(order)
        if not optimal_bottleneck(prob) <= best_b * (1 + 1e-12):
            continue
        t_part = partition_stages(prob, bottleneck=best_b)
        t = step(order, t_part)
        if t < best[0] * (1 - 1e-9):
            best = (t, order, prob, t_part)
    if best[1] == placement.order:
        return placement
    others = ((placement.order, best_b),) + tuple((o, b) for o, b in placement.runner_ups if o != best[1])
    return dataclasses.replace(placement, order=best[1], problem=best[2], partition=best[3],
                               runner_ups=others[:len(placement.runner_ups) or 1])


def _refine_cut(problem: PartitionProblem, best: tuple, sched: Schedule, costs: CostTable, cluster: Cluster,
                stage_device: Sequence[int], train: bool, inflight: Sequence[int], budget: int) -> tuple[tuple, int]:
    """Hill-climb from the best simulated cut: move one cut by one unit (by 2 or 3 only when
    no one-unit move helps: units without work make plateaus), keep the first move that fits
    and predicts a shorter step, until no move helps or `budget` simulations are spent.
    Returns ((partition, stages, timeline), simulations)."""
    part, stages, tl = best
    p, n, spent = len(part.bounds), problem.n, 0
    size = 1
    while size <= 3 and spent < budget:
        improved = False
        for k in range(p - 2, -1, -1):  # cut after stage k, from the last one back
            for delta in (size, -size):
                cuts = [e for _, e in part.bounds[:-1]]
                cuts[k] += delta
                lo = cuts[k - 1] if k else 0
                hi = cuts[k + 1] if k + 1 < len(cuts) else n
                if not lo < cuts[k] < hi or spent >= budget:
                    continue
                c = evaluate_partition(problem, tuple(zip([0] + cuts, cuts + [n])), method=part.method)
                if not c.fits:
                    continue
                spent += 1
                st_c = _stage_plans(c, costs, cluster, stage_device, train, inflight)
                tl_c = _simulate(sched, st_c, costs, cluster)
                if tl_c.step_time < tl.step_time * (1 - 1e-9):
                    part, stages, tl, improved = c, st_c, tl_c, True
                    break
            if improved:
                break
        size = 1 if improved else size + 1
    return (part, stages, tl), spent


def _plan_auto(model: nn.Module, cluster: Cluster, args: tuple, kwargs: dict, kind: Any, m: Any, auto_s: bool,
               auto_m: bool, train: bool, optimizer: str, capture_method: str, leaf_modules: tuple[type, ...],
               virtual_stages: Any, profile: bool, progress: bool, fuse: bool, mode: str,
               prog: _Progress, off: str = "off") -> Compilation:
    """Auto mode: plan every (schedule, m) candidate on one capture, keep the fastest that fits.

    Shapes and costs depend on the microbatch size and units on the stage count, so they are
    recomputed per distinct (size, stages) pair; the capture (the slow part) is shared."""
    p = len(cluster)
    # forward-only, every kind emits the same "forward" schedule: one candidate per m
    kinds = (list(AUTO_SCHEDULES) if train else ["gpipe"]) if auto_s else [kind]
    if auto_s and mode == "on":
        kinds = [k for k in kinds if k != "zb-h1"]  # refused with recompute=True (check_options)
    if auto_s and off == "on":
        kinds = [k for k in kinds if k != "zb-h1"]  # refused with offload='on' (check_options)
    v_given = virtual_stages
    # capture once, analysed first for the smallest candidate (m=1 always fits a batch)
    first_m = 1 if auto_m else m
    first_devices = _stage_devices(kinds[0], p, virtual_stage_count(kinds[0], v_given if kinds[0] == "interleaved" else None))
    fused_dropout = _fused_dropout(cluster)
    cap, units0, costs0 = _front(model, args, kwargs, len(first_devices), first_m, capture_method, leaf_modules, prog,
                                 fuse=fuse, fused_dropout=fused_dropout)
    ms = auto_microbatch_counts(cap.batch_size, p) if auto_m else [m]
    if not auto_m:
        microbatch_sizes(cap.batch_size, m)  # refuses m > batch with the usual message
    # _front checked only m=1: a model that relates the samples of dim 0 (sequence first)
    # is exact only unsplit, so auto keeps m=1 for it and says why the others were dropped
    mixed_rows: list[dict[str, Any]] = []
    mixed = samples_mixed(model, cap, args, kwargs) if auto_m and any(c > 1 for c in ms) else None
    if mixed:
        why = (f"not tried: {type(model).__name__} does not compute the samples along dim 0 independently "
               f"({mixed}); only microbatches=1 is exact")[:200]
        mixed_rows = [{"schedule": k, "microbatches": c, "fits": False, "why": why} for k in kinds for c in ms if c > 1]
        ms = [1]
    analysed: dict[tuple[int, int], tuple[Units, CostTable]] = {}
    analysed[(microbatch_sizes(cap.batch_size, first_m)[0], len(first_devices))] = (units0, costs0)
    last_key = next(iter(analysed))

    def analysis(size: int, n_stages: int, m_: int, stage_device: Sequence[int]) -> tuple[Units, CostTable]:
        nonlocal last_key
        key = (size, n_stages)
        if key not in analysed:
            u, c = _analyse(cap, args, kwargs, size, n_stages, prog, fused_dropout=fused_dropout)
            analysed[key] = (u, _profiled(c, model, cap, args, kwargs, m_, cluster, stage_device, train, profile, progress, prog))
            last_key = key
        return analysed[key]

    if profile:  # the first analysis was not profiled yet
        k0 = next(iter(analysed))
        analysed[k0] = (units0, _profiled(costs0, model, cap, args, kwargs, first_m, cluster, first_devices, train, profile,
                                          progress, prog))
    candidates = []  # (kind, m, stage -> device)
    for kind_ in kinds:
        v = virtual_stage_count(kind_, v_given if kind_ == "interleaved" else None)
        candidates += [(kind_, m_, _stage_devices(kind_, p, v)) for m_ in ms]
    # Each candidate's step has a lower bound from its unit costs alone (`step_lower_bound`):
    # planning the candidates in the order of their bounds, one whose bound exceeds the best
    # step planned so far cannot win and is skipped (a 64-GPU model: most of the candidates).
    bounds: list[float] = []
    # the progress lines below would otherwise repeat "shapes ... units+costs ..." unexplained
    prog.note(f"auto: {len(candidates)} candidates; pricing each microbatch size and stage count for a lower "
              "bound on its step")
    for kind_, m_, stage_device in candidates:
        try:
            _, costs = analysis(microbatch_sizes(cap.batch_size, m_)[0], len(stage_device), m_, stage_device)
        except (PlanError, ScheduleError):
            bounds.append(0.0)  # planned anyway: its own planning says what is wrong
            continue
        bounds.append(costs_step_lower_bound(costs, cluster.devices, kind_, m_, train, len(stage_device)))
    rows: list[dict[str, Any] | None] = [None] * len(candidates)
    plans: list[tuple[Plan, Units, tuple[int, int]]] = []
    planned: list[int] = []  # the candidate of each plan
    failures: list[tuple[float, int, int, str, PlanError]] = []
    best_step = math.inf
    for done, i in enumerate(sorted(range(len(candidates)), key=lambda i: (bounds[i], i))):
        kind_, m_, stage_device = candidates[i]
        size = microbatch_sizes(cap.batch_size, m_)[0]
        row: dict[str, Any] = {"schedule": kind_, "microbatches": m_}
        rows[i] = row
        # a relative margin: the simulator sums the same times in another order
        if AUTO_PRUNE and bounds[i] > best_step * (1.0 + 1e-6):
            row.update(fits=False, skipped=True, lower_bound_ms=bounds[i] * 1e3,
                       why=f"not planned: its step is at least {bounds[i] * 1e3:.3f} ms (lower bound), slower "
                           f"than a plan already found ({best_step * 1e3:.3f} ms)")
            continue
        prog.note(f"auto candidate {done + 1}/{len(candidates)}: schedule {kind_}, {m_} microbatch"
                  f"{'es' if m_ != 1 else ''}")
        try:
            units, costs = analysis(size, len(stage_device), m_, stage_device)
            plan = _plan_one(kind_, None, m_, stage_device, cap, units, costs, cluster, model, train, optimizer,
                             _mode_for(mode, kind_, train), fuse, prog, _offload_for(off, kind_), refine=False)
        except (PlanError, ScheduleError) as e:
            row.update(fits=False, why=str(e).splitlines()[0][:200])
            err = e if isinstance(e, PlanError) else PlanError(str(e))
            failures.append((_shortfall(cap, analysed.get((size, len(stage_device))), cluster, kind_, m_,
                                        stage_device, train, optimizer, _mode_for(mode, kind_, train),
                                        _offload_for(off, kind_)), m_, AUTO_SCHEDULES.index(kind_)
                             if kind_ in AUTO_SCHEDULES else len(AUTO_SCHEDULES),
                             f"schedule={kind_!r}, microbatches={m_}", err))
            continue
        row.update(schedule=plan.schedule.kind, fits=True, step_ms=plan.predicted["step_ms"],
                   recompute_stages=sum(1 for st in plan.stages if st.recompute),
                   offload_stages=sum(1 for st in plan.stages if st.offload))
        plans.append((plan, units, (size, len(stage_device))))
        planned.append(i)
        best_step = min(best_step, plan.predicted["step_ms"] / 1e3)
    # the cut refinement (`_refine_cut`, a few dozen simulations) only for the best few: it
    # improves a step by a few percent, so a candidate far behind would not win with it
    if plans:
        prog.note(f"auto: refining the cuts of the {min(AUTO_REFINE, len(plans))} fastest")
    for j in sorted(range(len(plans)), key=lambda j: plans[j][0].predicted["step_ms"])[:AUTO_REFINE]:
        i = planned[j]
        kind_, m_, stage_device = candidates[i]
        units, costs = analysis(plans[j][2][0], len(stage_device), m_, stage_device)
        plan = _plan_one(kind_, None, m_, stage_device, cap, units, costs, cluster, model, train, optimizer,
                         _mode_for(mode, kind_, train), fuse, prog, _offload_for(off, kind_))
        if plan.predicted["step_ms"] < plans[j][0].predicted["step_ms"]:
            plans[j] = (plan, units, plans[j][2])
            rows[i]["step_ms"] = plan.predicted["step_ms"]
    skipped = sum(1 for r in rows if r and r.get("skipped"))
    if skipped:
        prog.note(f"auto: {skipped} of {len(candidates)} candidates skipped (their lower bound exceeds a plan found)")
    rows = [r for r in rows if r is not None]
    if not plans:
        failures.sort(key=lambda f: f[:3])  # closest first; ties: fewer microbatches, simpler schedule
        short, _, _, what, err = failures[0]
        raise PlanError(f"no candidate of auto mode fits ({len(rows)} tried: schedules "
                        f"{', '.join(kinds)}; microbatches {', '.join(map(str, ms))}); the closest is {what}: {err}")
    order = {k: i for i, k in enumerate(AUTO_SCHEDULES)}

    def rank(item: tuple[Plan, Units, tuple[int, int]]) -> tuple:
        pl = item[0]
        # step times that differ only by float rounding count as ties
        return (round(pl.predicted["step_ms"], 9), pl.microbatches, order.get(pl.schedule.kind, 99))

    best, units, key = min(plans, key=rank)
    if key != last_key:  # the graph's shapes must be those of the chosen microbatch size
        prog.note(f"auto: shapes for the chosen {best.microbatches} microbatch"
                  f"{'es' if best.microbatches != 1 else ''}")
        units, _ = _analyse(cap, args, kwargs, key[0], key[1], prog, fused_dropout=fused_dropout)
    predicted = dict(best.predicted, auto=rows + mixed_rows)
    plan = best.with_(predicted=predicted, timings=prog.timings)
    _dump("plan", plan.summary())
    _dump("schedule", plan.schedule.listing())
    return Compilation(plan, cap, units)


def _shortfall(cap: Captured, analysed: tuple[Units, CostTable] | None, cluster: Cluster, kind: str, m: int,
               stage_device: Sequence[int], train: bool, optimizer: str, mode: str, off: str = "off") -> float:
    """How far a failed auto candidate is from fitting (what its worst stage lacks, as a fraction
    of that stage's memory, in the given device order: an interleaved stage has half a device,
    so bytes would favour it); inf when it failed for another reason than memory."""
    if analysed is None:
        return math.inf
    try:
        sched = emit_schedule(kind, len(stage_device), m, stage_device=stage_device, train=train)
        prob = _problem(analysed[1], cluster, stage_device, peak_inflight(sched), train, optimizer, mode,
                        split_backward=_splits_backward(sched), offload=off)
        return memory_shortfall(prob, relative=True)
    except (PlanError, ScheduleError):
        return math.inf


def build_from_plan(
    model: nn.Module,
    plan: Plan,
    example_inputs: Any = None,
    example_kwargs: dict | None = None,
    *,
    capture_method: str = "auto",
    leaf_modules: tuple[type, ...] = (),
    progress: bool = False,
) -> Compilation:
    """Capture `model` and attach a saved `plan` to it instead of planning again.

    Refuses (PlanError) a plan made for another model (graph fingerprint) or one whose units
    this fxpipe groups differently, and one whose offloaded stages overfill a node's host
    memory, before anything is placed on a device.
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"plan must be a fxpipe.Plan or the path of a plan file, got {type(plan).__name__}")
    # planning checks host memory after the partition; a loaded plan (edited, made for another
    # cluster file, or by an fxpipe before the check) is checked here, before it runs
    over = over_host_memory(plan.host_usage())
    if over:
        gib = 1024**3
        where = "; ".join(
            f"{'devices of unknown node (taken as one machine)' if h.node < 0 else f'node {h.node}'}: offloaded "
            f"stages {list(h.stages)} need {h.used / gib:.2f} GiB, its host has {h.capacity / gib:.2f} GiB"
            for h in over)
        raise PlanError(f"the plan's offloaded stages do not fit in the host memory of their devices ({where}): an "
                        "offloaded stage keeps its params, grads and optimizer state in its node's host memory. "
                        "Re-plan for this cluster (fxpipe.plan(..., offload='auto') finds a plan within it), or give "
                        "the devices' true host_memory in the plan's cluster if it is larger")
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    prog = _Progress(progress)
    # units are grouped for the plan's stage count (2 per device when interleaved), as when planning
    cap, units, costs = _front(model, args, kwargs, len(plan.stages), plan.microbatches, capture_method,
                               leaf_modules, prog, plan=plan, fuse=bool(plan.predicted.get("fuse", False)))
    if tuple(costs.unit_names) != tuple(plan.costs.unit_names):
        raise PlanError(f"the plan has {len(plan.costs.unit_names)} units but this model groups into {len(units)} "
                        f"(first difference at unit {_first_difference(plan.costs.unit_names, costs.unit_names)}); "
                        "the plan was made by another fxpipe version: re-plan the model with this one")
    return Compilation(plan, cap, units)


def simulate_plan(plan: Plan) -> Timeline:
    """Play a plan's schedule against its cost model (see `fxpipe.simulate`)."""
    return _simulate(plan.schedule, plan.stages, plan_costs(plan), plan.cluster)


def plan_costs(plan: Plan) -> CostTable:
    """The plan's cost table with its measured times (kept in `predicted["measured_costs"]`)."""
    measured = plan.predicted.get("measured_costs")
    if not measured or plan.costs.measured_fwd:
        return plan.costs
    try:
        return plan.costs.with_measured(measured["fwd_s"], measured["bwd_s"], measured.get("bi_fraction"))
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"the plan's predicted.measured_costs is damaged ({e}); re-plan with profile=True") from None


def _simulate(sched: Schedule, stages: Sequence[StagePlan], costs: CostTable, cluster: Cluster) -> Timeline:
    # a recomputing stage keeps only its incoming boundary per microbatch in flight
    act = [(costs.boundary_bytes[s.units[0] - 1] if s.units[0] > 0 else 0.0) if s.recompute
           else sum(costs.activation_bytes[s.units[0]:s.units[1]]) for s in stages]
    # one that also streams keeps the values crossing its streamed units and rebuilds one unit
    # at a time (`_combined_bytes`, as the partitioner prices it)
    both = _combined_bytes(costs, any(s.recompute and s.offload for s in stages))
    rebuilt = [sum(costs.activation_bytes[s.units[0]:s.units[1]]) for s in stages]
    for i, s in enumerate(stages):
        if s.recompute and s.offload:
            a, b = s.units
            act[i] += sum(both["unit_cut_bytes"][a:b]) + sum(costs.boundary_bytes[a:b - 1])
            rebuilt[i] = max(both["unit_recompute_peak"][a:b])
    # BI: the measured share of each unit's backward (half when not profiled); BW the rest.
    # A split backward keeps all saved tensors through BI, so its transient adds in full.
    split = any(i.op.name == "BWD_INPUT" for prog in sched.programs for i in prog)
    # The first stage has no differentiable input: its BI computes nothing and its BW the whole
    # backward (runtime/weight_grad.py), whatever the units' own split.
    bi = [0.0 if s.units[0] == 0 else sum(costs.bwd_input_time(u, cluster.devices[s.device]) for u in range(*s.units))
          for s in stages]
    bw = [max(0.0, s.bwd_ms / 1e3 - x) for s, x in zip(stages, bi)]
    # a backward's gradient buffers (a recomputing stage first rebuilds its activations)
    trans = [costs.stage_transient(*s.units, split=split)
             + (rebuilt[i] if s.recompute else 0.0) for i, s in enumerate(stages)]
    return simulate_schedule(sched, [s.fwd_ms / 1e3 for s in stages], [s.bwd_ms / 1e3 for s in stages],
                             [s.send_ms / 1e3 for s in stages], bwd_input_time=bi, bwd_weight_time=bw,
                             activation_bytes=act, transient_bytes=trans if sched.train else [0.0] * len(stages),
                             kept_bytes=[costs.stage_kept(*s.units) if sched.train else 0.0 for s in stages])


def _fingerprint(model: nn.Module, cap: Captured) -> str:
    params = {k: v for k, v in list(model.named_parameters()) + list(model.named_buffers())}
    return graph_fingerprint(cap.gm, params)


def _first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"{i}: {x!r} in the plan, {y!r} here"
    i = min(len(a), len(b))
    return f"{i}: the {'plan' if len(a) < len(b) else 'model'} ends there"


def _splits_backward(sched: Schedule) -> bool:
    """Whether the schedule runs backward as BI + BW (zero bubble): BI keeps saved tensors."""
    return any(i.op is Op.BWD_INPUT for prog in sched.programs for i in prog)


def _problem(costs: CostTable, cluster: Cluster, stage_device: Sequence[int], inflight: Sequence[int], train: bool,
             optimizer: str, recompute: str = "off", split_backward: bool = False,
             offload: str = "off", host_limits: bool = False) -> PartitionProblem:
    """Positions are stages; stage s runs on device stage_device[s]. A device holding k
    stages (interleaved) gives each 1/k of its memory. A recomputing stage pays one more
    forward per microbatch (`recompute`: the partitioner's mode). Training stages also need
    their worst backward transient (gradients alive during one unit's backward). An
    offloading stage (`offload`: the partitioner's mode) pays each unit's weight copy over the
    device's host link where the compute does not hide it; on a CPU the host memory is the
    device's own, so offloading there frees nothing. A stage reading a tied weight first read
    by an earlier stage holds a replica (`check_host_memory.replicas`). `host_limits`: each
    position may keep at most an equal share of its node's host memory when it offloads
    (`host_shares`; `_plan_one` asks for it when the plan without it overfills a host)."""
    n = len(costs.unit_names)
    devs = [cluster.devices[d] for d in stage_device]
    times = device_unit_times(costs, devs, train)
    direction = 2.0 if train else 1.0  # activations forward, gradients back
    links = [cluster.link(a, b) if a != b else None for a, b in zip(stage_device, stage_device[1:])]
    btime = tuple(tuple((l.transfer_time(costs.boundary_bytes[k]) * direction if l is not None else 0.0) for l in links)
                  for k in range(n - 1))
    factor = OPTIMIZER_STATE_FACTOR[optimizer] if train else 0.0
    static = tuple(pb + (tb * (1.0 + factor) if train else 0.0) for pb, tb in zip(costs.param_bytes, costs.trainable_bytes))
    act = costs.activation_bytes if train else tuple(0.0 for _ in range(n))
    share = [stage_device.count(d) for d in stage_device]
    return PartitionProblem(
        unit_names=costs.unit_names, unit_time=tuple(map(tuple, times)), boundary_time=btime,
        unit_static_bytes=static, unit_activation_bytes=act, boundary_bytes=costs.boundary_bytes,
        inflight=tuple(inflight), device_memory=tuple(d.memory / k for d, k in zip(devs, share)),
        device_names=tuple(f"{d.name}" if k == 1 else f"{d.name} (stage {s})" for s, (d, k) in enumerate(zip(devs, share))),
        unit_recompute_time=tuple(map(tuple, device_unit_times(costs, devs, False))) if recompute != "off" else (),
        recompute=recompute, unit_transient_bytes=costs.transient_bytes if train else (),
        split_backward=split_backward and train, unit_param_bytes=_streamed_bytes(costs, train),
        unit_offload_time=tuple(map(tuple, device_offload_unit_times(costs, devs, train, times))) if offload != "off" else (),
        offload=offload, host_memory_is_device=tuple(d.kind == "cpu" for d in devs),
        replicas=replicas(costs, train, factor),
        host_memory=host_shares(cluster.devices, stage_device) if host_limits and offload != "off" else (),
        **_combined_bytes(costs, train and recompute != "off" and offload != "off"))


def _combined_bytes(costs: CostTable, both: bool) -> dict[str, tuple[float, ...]]:
    """What a stage that offloads and recomputes keeps (`PartitionProblem.unit_cut_bytes`,
    `unit_recompute_peak`); nothing when the modes cannot combine. The runtime streams units
    of at least DEFAULT_MIN_UNIT_BYTES of weights, merging smaller neighbours, so a streamed
    unit around unit u may reach back into u-1 and on until that many bytes: its activations
    are priced as all of those units' (conservative). A table from before `cut_bytes` prices
    each unit's whole activations as kept (as conservative)."""
    if not both:
        return {}
    n = len(costs.unit_names)
    act = costs.activation_bytes
    cut = costs.cut_bytes if costs.cut_bytes else act
    peak = []
    for u in range(n):
        total, w, v = (act[u - 1] if u > 0 else 0.0), 0.0, u
        while v < n:
            total += act[v]
            w += costs.param_bytes[v]
            v += 1
            if w >= DEFAULT_MIN_UNIT_BYTES:
                break
        peak.append(total)
    return {"unit_cut_bytes": tuple(cut), "unit_recompute_peak": tuple(peak)}


def _streamed_bytes(costs: CostTable, train: bool) -> tuple[float, ...]:
    """Device bytes per unit of an offloaded stage: its weights, plus in training its weight
    gradients, which are made on the device and copied back to the host (on an H100,
    counting the weights alone under-predicted a streamed stage's peak by ~3x)."""
    if not train:
        return tuple(costs.param_bytes)
    return tuple(pb + tb for pb, tb in zip(costs.param_bytes, costs.trainable_bytes))


def _stage_plans(part: Partition, costs: CostTable, cluster: Cluster, stage_device: Sequence[int], train: bool,
                 inflight: Sequence[int]) -> list[StagePlan]:
    out = []
    p = len(part.bounds)
    for s, (a, b) in enumerate(part.bounds):
        d = stage_device[s]
        dev = cluster.devices[d]
        rc = bool(part.recompute[s]) if part.recompute else False
        off = bool(part.offload[s]) if part.offload else False
        if off:  # each unit at least as long as its weights' copy over the host link
            fwd = sum(costs.offload_fwd_time(u, dev) for u in range(a, b))
            bwd = sum(costs.offload_bwd_time(u, dev) for u in range(a, b))
        else:
            fwd = sum(costs.fwd_time(u, dev) for u in range(a, b))
            bwd = sum(costs.bwd_time(u, dev) for u in range(a, b))
        if rc:  # the forward runs again inside the backward (an offloaded one: with the weights its backward fetched)
            bwd += sum(costs.fwd_time(u, dev) for u in range(a, b)) if off else fwd
        send_bytes = costs.boundary_bytes[b - 1] if s < p - 1 else 0.0
        nxt = stage_device[s + 1] if s < p - 1 else d
        send = cluster.link(d, nxt).transfer_time(send_bytes) if nxt != d else 0.0
        out.append(StagePlan(index=s, device=d, units=(a, b), param_bytes=sum(costs.param_bytes[a:b]),
                             fwd_ms=fwd * 1e3, bwd_ms=bwd * 1e3 if train else 0.0, send_ms=send * 1e3,
                             send_bytes=send_bytes, memory_bytes=part.stage_memory[s], inflight=int(inflight[s]),
                             recompute=rc, offload=off))
    return out
