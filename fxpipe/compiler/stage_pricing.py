"""Pricing stages on devices: the partitioner's problem for a device order (`_problem`: unit
times, memory, recompute and offload costs), a cut's StagePlans (`_stage_plans`), and a
schedule played against them (`_simulate`, `simulate_plan`).

Separate from `pipeline.py` because planning, the cut searches (`cut_refinement.py`), auto
mode's closest-failure measure and `Plan`'s re-pricing (`plan.py`) all price stages the
same way. The `_` names are private to fxpipe.compiler.
"""

from __future__ import annotations

from typing import Sequence

from fxpipe.compiler.cluster import Cluster
from fxpipe.compiler.plan import OPTIMIZER_STATE_FACTOR, Plan, StagePlan
from fxpipe.errors import PlanError
from fxpipe.passes.annotate_costs import CostTable, device_offload_unit_times, device_unit_times
from fxpipe.passes.check_host_memory import host_shares, replicas
from fxpipe.passes.emit_schedule import Op, Schedule
from fxpipe.passes.partition_stages import Partition, PartitionProblem
from fxpipe.passes.simulate_schedule import Timeline, simulate_schedule
from fxpipe.runtime.offload import DEFAULT_MIN_UNIT_BYTES

__all__ = ["timeline_figures", "simulate_plan", "plan_costs", "_simulate", "_splits_backward", "_problem", "_combined_bytes",
           "_streamed_bytes", "_stage_plans"]


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


def timeline_figures(tl: Timeline, part: Partition, stages: Sequence[StagePlan]) -> dict:
    """The plan's `predicted` entries that come from the simulated step and the cut."""
    return {
        "step_ms": tl.step_time * 1e3,
        "bottleneck_ms": part.bottleneck * 1e3,
        "bubble": sum(tl.bubble_fraction) / len(tl.bubble_fraction),
        "bubble_per_device": list(tl.bubble_fraction),
        "peak_memory_bytes": [s.memory_bytes for s in stages],
        "peak_activation_bytes": list(tl.peak_memory or ()),
    }
