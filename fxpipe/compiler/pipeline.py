"""The compiler pipeline: the one place that lists the passes in order.

Reading `build_plan` top to bottom tells the whole compiler: capture, shapes, units, costs,
partition, schedule, simulate, plan. `FXPIPE_DUMP=dir` writes each step's text form.

The machinery the passes lean on lives beside it: the options they are given
(`plan_options.py`), how stages are priced and simulated (`stage_pricing.py`), the searches
over cuts by simulated step (`cut_refinement.py`), auto mode's candidate search
(`auto_plan.py`) and progress lines (`progress.py`). Their public names are importable
from here as before.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from fxpipe.compiler.auto_plan import AUTO_MICROBATCHES, _plan_auto, auto_microbatch_counts
from fxpipe.compiler.capture import Captured, capture, samples_mixed
from fxpipe.compiler.cluster import Cluster, Device
from fxpipe.compiler.cut_refinement import _refine_cut, _step_among_tied_orders
from fxpipe.compiler.fingerprint import graph_fingerprint
from fxpipe.compiler.plan import OPTIMIZER_STATE_FACTOR, Plan
from fxpipe.compiler.plan_options import (MICROBATCHES_UNSET, SCHEDULES, _mode_for, _offload_for, _resolve_schedule,
                                          _stage_devices, check_options, custom_schedule, microbatch_sizes,
                                          normalize_inputs, offload_mode, recompute_mode, virtual_stage_count)
from fxpipe.compiler.progress import _Progress
from fxpipe.compiler.stage_pricing import (_problem, _simulate, _splits_backward, _stage_plans, plan_costs,
                                           simulate_plan, timeline_figures)
from fxpipe.errors import PlanError
from fxpipe.passes.annotate_costs import CostTable, annotate_costs
from fxpipe.passes.check_host_memory import HostUse, host_usage, over_host_memory
from fxpipe.passes.emit_schedule import Schedule, emit_schedule, peak_inflight, validate_schedule
from fxpipe.passes.group_units import Units, group_units
from fxpipe.passes.fuse_elementwise import fuse_elementwise
from fxpipe.passes.place_stages import place_stages
from fxpipe.passes.partition_stages import PartitionProblem, params_partition, step_candidates, uniform_partition
from fxpipe.passes.profile_units import profile_units
from fxpipe.passes.propagate_shapes import propagate_shapes

__all__ = ["build_plan", "build_from_plan", "check_options", "Compilation", "normalize_inputs", "microbatch_sizes",
           "SCHEDULES", "simulate_plan", "virtual_stage_count", "custom_schedule", "plan_costs", "MICROBATCHES_UNSET",
           "AUTO_MICROBATCHES", "auto_microbatch_counts", "recompute_mode", "offload_mode"]


@dataclass
class Compilation:
    """What planning produced: the plan plus the graph it was made from (not saved)."""

    plan: Plan
    captured: Captured
    units: Units


def _dump(name: str, text: str) -> None:
    d = os.environ.get("FXPIPE_DUMP")
    if d:
        try:
            Path(d).mkdir(parents=True, exist_ok=True)
            (Path(d) / f"{name}.txt").write_text(text)
        except OSError as e:  # a debugging aid must not fail with a traceback after planning
            raise PlanError(f"FXPIPE_DUMP={d!r}: cannot write {name}.txt there ({e.strerror or e}); set FXPIPE_DUMP "
                            "to a folder that can be created, or unset it") from None


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
        **timeline_figures(tl, part, stages),
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


def _fingerprint(model: nn.Module, cap: Captured) -> str:
    params = {k: v for k, v in list(model.named_parameters()) + list(model.named_buffers())}
    return graph_fingerprint(cap.gm, params)


def _first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"{i}: {x!r} in the plan, {y!r} here"
    i = min(len(a), len(b))
    return f"{i}: the {'plan' if len(a) < len(b) else 'model'} ends there"
