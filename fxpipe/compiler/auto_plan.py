"""Auto mode's candidate search (`schedule="auto"` / `microbatches="auto"`): the (schedule,
m) candidates, their lower bounds and the pruning by them, the cut refinement of the
fastest few, the choice, and the "closest failure" explanation when none fits.

Separate from `pipeline.py`, which holds the passes one candidate runs through (`_front`,
`_analyse`, `_plan_one`); this module only drives them. `build_plan` hands auto mode here,
so the pipeline's steps are imported when `_plan_auto` runs (not at import: pipeline.py
imports this module), which also keeps a test's patch of `pipeline._front` in effect here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from torch import nn

from fxpipe.compiler.capture import Captured, samples_mixed
from fxpipe.compiler.cluster import Cluster
from fxpipe.compiler.plan import Plan
from fxpipe.compiler.plan_options import (_mode_for, _offload_for, _stage_devices, microbatch_sizes,
                                          virtual_stage_count)
from fxpipe.compiler.progress import _Progress
from fxpipe.compiler.stage_pricing import _problem, _splits_backward
from fxpipe.errors import PlanError, ScheduleError
from fxpipe.passes.annotate_costs import CostTable
from fxpipe.passes.emit_schedule import emit_schedule, peak_inflight
from fxpipe.passes.group_units import Units
from fxpipe.passes.partition_stages import memory_shortfall
from fxpipe.passes.step_bound import costs_step_lower_bound

if TYPE_CHECKING:
    from fxpipe.compiler.pipeline import Compilation

__all__ = ["AUTO_SCHEDULES", "AUTO_PRUNE", "AUTO_REFINE", "AUTO_MICROBATCHES", "auto_microbatch_counts",
           "_plan_auto"]

# auto mode's candidates; the order is also the tie-break (simpler schedules first)
AUTO_SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
# Auto mode skips candidates whose step's lower bound loses to a plan found; benchmarks set
# it False to plan every candidate and check the choice is the same.
AUTO_PRUNE = True
AUTO_REFINE = 3  # auto mode refines the cut (`_refine_cut`) of this many of its fastest candidates
AUTO_MICROBATCHES = (1, 2, 4, 8, 16, 32)  # and on, doubling, up to 2 per device (`auto_microbatch_counts`)


def auto_microbatch_counts(batch: int, n_devices: int) -> list[int]:
    """The m auto mode tries: 1, 2, 4, ... up to max(32, 2 x devices), at most the batch (many
    devices need many microbatches to fill the pipeline; more than 2 per device gains little).

        >>> auto_microbatch_counts(64, 64), auto_microbatch_counts(16, 2)
        ([1, 2, 4, 8, 16, 32, 64], [1, 2, 4, 8, 16])
    """
    top = min(batch, max(AUTO_MICROBATCHES[-1], 2 * n_devices))
    return [1 << k for k in range(top.bit_length()) if 1 << k <= top]


def _plan_auto(model: nn.Module, cluster: Cluster, args: tuple, kwargs: dict, kind: Any, m: Any, auto_s: bool,
               auto_m: bool, train: bool, optimizer: str, capture_method: str, leaf_modules: tuple[type, ...],
               virtual_stages: Any, profile: bool, progress: bool, fuse: bool, mode: str,
               prog: _Progress, off: str = "off") -> Compilation:
    """Auto mode: plan every (schedule, m) candidate on one capture, keep the fastest that fits.

    Shapes and costs depend on the microbatch size and units on the stage count, so they are
    recomputed per distinct (size, stages) pair; the capture (the slow part) is shared."""
    # the pipeline's steps, at call time: pipeline.py imports this module
    from fxpipe.compiler.pipeline import Compilation, _analyse, _dump, _front, _fused_dropout, _plan_one, _profiled

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
