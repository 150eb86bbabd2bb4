"""Explain a plan: where each stage's time and memory go, and what the baselines would give.

`explain(plan)` is what `fxpipe inspect plan.json --why` prints:

* **time** per stage over one step (from `fxpipe.simulate(plan)`): compute (the stage's
  forward + backward over all microbatches), boundary transfer (its outgoing boundary per
  microbatch, both directions when training; on the link's own lane, so it overlaps compute)
  and its device's bubble (idle time in the step; split evenly among a device's stages when
  it holds several). The slowest stage per microbatch is marked as the bottleneck.
* **memory** per stage, the partitioner's model split into parameters, gradients, optimizer
  state (``OPTIMIZER_STATE_FACTOR`` x trainable bytes), activations (in-flight microbatches x
  the units' saved activations; one microbatch's for a stage that recomputes) and boundary
  buffers (in-flight x incoming + outgoing), and backward transients (the gradients alive
  while one microbatch's backward runs its worst unit, `annotate_costs.stage_transient`).
  A stage that streams its weights (offload) holds two consecutive weighted units' weights
  (and, in training, their weight gradients on the way home) on the device instead
  (`partition_stages.weight_buffer`, in the params column) and keeps its
  params, grads and optimizer state in host memory (the "host" column, not in the total;
  on a CPU the host memory is the device's own, so there they stay in the total).
* **auto**, when ``plan.predicted["auto"]`` holds the candidates auto mode compared: each
  (schedule, microbatches) with its predicted step and whether it fits, best first.
* **placement**, when ``plan.predicted["placement"]`` holds `Placement.to_dict()`: the chosen
  device order and the runner-up orders with their bottlenecks.
* **baselines** (uniform layer counts, equal parameter bytes) from ``plan.baselines``, each
  with its bottleneck and a predicted step time from simulating the plan's schedule on the
  baseline's stages with the same cost model.

Example:
    >>> print(explain(fxpipe.Plan.load("plan.json")))   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Sequence

from fxpipe.compiler.plan import OPTIMIZER_STATE_FACTOR, Plan, StagePlan
from fxpipe.passes.emit_schedule import Op
from fxpipe.passes.partition_stages import weight_buffer

__all__ = ["explain", "stage_memory_split", "stage_time_split", "baseline_stages", "stage_table", "compare_baseline"]

_GiB = 1024.0**3


def stage_memory_split(plan: Plan, s: int) -> dict[str, float]:
    """Bytes of stage s: params, grads, optimizer, activations, buffers, transients, total
    (on the device), and host (static state an offloaded stage keeps in host memory)."""
    st = plan.stages[s]
    a, b = st.units
    c = plan.costs
    n = len(c.unit_names)
    # replicas of tied weights first read by an earlier stage count like the stage's own
    # (`check_host_memory.replicas`)
    replicas = [t for t in c.shared if t.units[0] < a and any(a <= u < b for u in t.units)]
    params = sum(c.param_bytes[a:b]) + sum(t.bytes for t in replicas)
    trainable = sum(c.trainable_bytes[a:b]) + sum(t.trainable_bytes for t in replicas) if plan.train else 0.0
    opt = trainable * OPTIMIZER_STATE_FACTOR[plan.optimizer] if plan.train else 0.0
    # a recomputing stage holds one microbatch's activations (during its backward), not in-flight x
    act = (1 if st.recompute else st.inflight) * sum(c.activation_bytes[a:b]) if plan.train else 0.0
    bytes_in = c.boundary_bytes[a - 1] if a > 0 else 0.0
    bytes_out = c.boundary_bytes[b - 1] if b < n else 0.0
    buffers = st.inflight * (bytes_in + bytes_out)
    split = any(i.op is Op.BWD_INPUT for prog in plan.schedule.programs for i in prog)
    transients = c.stage_transient(a, b, split) if plan.train else 0.0
    out = {"params": params, "grads": trainable, "optimizer": opt, "activations": act, "buffers": buffers,
           "transients": transients}
    host = 0.0
    if st.offload:
        # the unit computing and the one being prefetched, and in training their weight
        # gradients on the way back to the host (as `compiler/stage_pricing._streamed_bytes`)
        per_unit = [pb + (tb if plan.train else 0.0) for pb, tb in zip(c.param_bytes, c.trainable_bytes)]
        held = weight_buffer(per_unit, a, b)
        if plan.cluster.devices[st.device].kind == "cpu":  # its host memory is its own: nothing leaves
            out["params"] = params + held
        else:
            host = params + trainable + opt
            out.update(params=held, grads=0.0, optimizer=0.0)
    out["total"] = sum(out.values())
    out["host"] = host
    return out


def stage_time_split(plan: Plan, timeline: Any = None) -> list[dict[str, float]]:
    """Per stage, seconds per step: compute, transfer, bubble; plus per-microbatch time."""
    import fxpipe

    tl = timeline if timeline is not None else fxpipe.simulate(plan)
    m = plan.microbatches
    direction = 2.0 if plan.train else 1.0
    per_device: dict[int, int] = {}
    for st in plan.stages:
        per_device[st.device] = per_device.get(st.device, 0) + 1
    out = []
    for st in plan.stages:
        compute = m * (st.fwd_ms + st.bwd_ms) / 1e3
        transfer = m * direction * st.send_ms / 1e3
        bubble = tl.bubble_fraction[st.device] * tl.step_time / per_device[st.device]
        per_mb = (st.fwd_ms + st.bwd_ms + direction * st.send_ms) / 1e3
        out.append({"compute": compute, "transfer": transfer, "bubble": bubble, "per_microbatch": per_mb})
    return out


def baseline_stages(plan: Plan, bounds: Sequence[Sequence[int]], recompute: Sequence[bool] | None = None,
                    offload: Sequence[bool] | None = None) -> tuple[StagePlan, ...]:
    """The plan's stages re-cut at `bounds` (same devices, schedule and cost model);
    `recompute` / `offload`: which of them recompute / stream their weights (a baseline's own
    lists), none by default."""
    c = plan.costs
    p = len(bounds)
    out = []
    for s, (a, b) in enumerate(bounds):
        d = plan.stages[s].device
        dev = plan.cluster.devices[d]
        off = bool(offload[s]) if offload else False
        fwd = sum((c.offload_fwd_time if off else c.fwd_time)(u, dev) for u in range(a, b))
        bwd = sum((c.offload_bwd_time if off else c.bwd_time)(u, dev) for u in range(a, b)) if plan.train else 0.0
        send_bytes = c.boundary_bytes[b - 1] if s < p - 1 else 0.0
        nxt = plan.stages[s + 1].device if s < p - 1 else d
        send = plan.cluster.link(d, nxt).transfer_time(send_bytes) if nxt != d else 0.0
        st = plan.stages[s]
        rc = bool(recompute[s]) if recompute else False
        out.append(StagePlan(index=s, device=d, units=(int(a), int(b)), param_bytes=sum(c.param_bytes[a:b]),
                             fwd_ms=fwd * 1e3, bwd_ms=(bwd + (fwd if rc else 0.0)) * 1e3, send_ms=send * 1e3,
                             send_bytes=send_bytes, memory_bytes=0.0, inflight=st.inflight, recompute=rc,
                             offload=off))
    stages = tuple(out)
    probe = plan.with_(stages=stages)
    return tuple(StagePlan(**{**{k: getattr(x, k) for k in StagePlan.__slots__},
                              "memory_bytes": stage_memory_split(probe, x.index)["total"]}) for x in stages)


def _stream_bound(plan: Plan, st: StagePlan) -> bool:
    """Whether some unit of an offloaded stage waits on its weights' copy (copy > compute)."""
    c, dev = plan.costs, plan.cluster.devices[st.device]
    return any(c.weight_stream_time(u, dev) > c.fwd_time(u, dev) for u in range(*st.units))


def _table(rows: list[tuple[str, ...]], left: Sequence[int] = (1,)) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  " + "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return lines


def explain(plan: Plan) -> str:
    """Why the plan looks the way it does: time, memory and the baselines (see module doc)."""
    import fxpipe

    tl = fxpipe.simulate(plan)
    times = stage_time_split(plan, tl)
    worst = max(range(len(times)), key=lambda s: times[s]["per_microbatch"])
    lines = [f"why this plan ({plan.model_name}, {plan.num_stages} stage{'s' if plan.num_stages != 1 else ''}, {plan.microbatches} microbatch{'es' if plan.microbatches != 1 else ''}, "
             f"schedule {plan.schedule.kind}, optimizer {plan.optimizer}, {'training' if plan.train else 'inference'}):",
             "", f"time per step (predicted step {tl.step_time * 1e3:.3f} ms; transfers run on the link's lane "
                 "and overlap compute; bubble = the device's idle time):"]
    rows = [("stage", "device", "units", "compute ms", "transfer ms", "bubble ms", "per-mb ms", "")]
    for s, (st, t) in enumerate(zip(plan.stages, times)):
        dev = plan.cluster.devices[st.device]
        rows.append((str(s), f"{st.device}:{dev.name}", f"{st.units[0]}-{st.units[1] - 1}",
                     f"{t['compute'] * 1e3:.3f}", f"{t['transfer'] * 1e3:.3f}", f"{t['bubble'] * 1e3:.3f}",
                     f"{t['per_microbatch'] * 1e3:.4f}", "<- bottleneck" if s == worst else ""))
    lines += _table(rows)
    mems = [stage_memory_split(plan, s) for s in range(plan.num_stages)]
    unit, scale = ("GiB", _GiB) if max(m["total"] for m in mems) >= 0.1 * _GiB else ("MiB", 1024.0**2)
    lines += ["", f"memory per stage ({unit}; activations and buffers x microbatches in flight; transients: gradients "
                  "alive during one backward; 'of' = the device's):"]
    offloads = any(st.offload for st in plan.stages)
    rows = [("stage", "device", "in flight", "params", "grads", "optimizer", "activations", "buffers", "transients",
             "total", "of", "") + (("host",) if offloads else ())]
    for s, st in enumerate(plan.stages):
        mem = mems[s]
        dev = plan.cluster.devices[st.device]
        rows.append((str(s), f"{st.device}:{dev.name}", str(st.inflight),
                     *(f"{mem[k] / scale:.3f}" for k in ("params", "grads", "optimizer", "activations", "buffers",
                                                         "transients", "total")),
                     f"{dev.memory / scale:.1f}",
                     " + ".join(f for f, on in (("recompute", st.recompute), ("offload", st.offload)) if on))
                    + ((f"{mem['host'] / scale:.3f}",) if offloads else ()))
    lines += _table(rows, left=(1, 11))
    if any(st.recompute for st in plan.stages):
        lines.append("  recompute: the stage keeps only its boundaries per microbatch in flight and runs its forward "
                     "again in backward (its bwd includes that forward)")
    if offloads:
        slow = [st.index for st in plan.stages if st.offload and _stream_bound(plan, st)]
        lines.append("  offload: the stage streams its weights: params, grads and optimizer state stay in host memory "
                     "('host'), the device holds two consecutive weighted units' weights and, in training, their weight "
                     "gradients on the way home ('params'), and each unit's weights "
                     "cross the host link in every microbatch's forward and again in its backward (no reuse across "
                     "microbatches); each unit takes max(compute, weights / host bandwidth)"
                     + (f"; the copy is slower than the compute on stage(s) {slow}" if slow else
                        "; the compute hides every copy"))
    auto = plan.predicted.get("auto")
    if isinstance(auto, list) and auto:
        lines += ["", f"auto mode: {len(auto)} (schedule, microbatches) candidates, the fastest predicted step that "
                      "fits was chosen (ties: fewer microbatches, simpler schedule); 'skipped': not planned, "
                      "its step's lower bound is slower than a plan found:"]
        rows = [("", "schedule", "microbatches", "step ms", "fits", "recompute stages", "offload stages")]
        # fitting by step, then those skipped by their lower bound, then those that do not fit
        ranked = sorted(auto, key=lambda r: (not r.get("fits"), not r.get("skipped"),
                                             r.get("step_ms", r.get("lower_bound_ms", float("inf"))),
                                             r.get("microbatches", 0)))
        for r in ranked:
            chosen = r.get("schedule") == plan.schedule.kind and r.get("microbatches") == plan.microbatches
            status = ("chosen" if chosen else "runner-up" if r.get("fits") else "skipped" if r.get("skipped")
                      else "no fit")
            rows.append((status, str(r.get("schedule")),
                         str(r.get("microbatches")), f"{r['step_ms']:.3f}" if "step_ms" in r else
                         f">= {r['lower_bound_ms']:.3f}" if "lower_bound_ms" in r else "-",
                         "yes" if r.get("fits") else "-" if r.get("skipped") else "NO",
                         str(r.get("recompute_stages", "-")) if r.get("fits")
                         else "not planned" if r.get("skipped") else str(r.get("why", ""))[:70], str(r.get("offload_stages", "-")) if r.get("fits") else ""))
        lines += _table(rows, left=(0, 1, 5))
    pl = plan.predicted.get("placement")
    if isinstance(pl, dict) and isinstance(pl.get("order"), list):
        lines += ["", f"placement ({pl.get('method', '?')}, {pl.get('candidates', '?')} device orders evaluated; "
                      "order = the original cluster's device per stage position):"]
        rows = [("order", "devices", "bottleneck ms")]
        # the order's smallest bottleneck (what orders are compared by); the plan's cut may
        # give some of it up for a shorter step (plans before it was recorded: the cut's)
        order_b = pl.get("bottleneck_ms", plan.predicted["bottleneck_ms"])
        rows.append(("chosen " + str(pl["order"]), " ".join(d.name for d in plan.cluster.devices), f"{order_b:.4f}"))
        for r in pl.get("runner_ups") or []:
            rows.append(("runner-up " + str(r.get("order")), "", f"{r.get('bottleneck_ms', float('nan')):.4f}"))
        lines += _table(rows, left=(0, 1))
        if plan.predicted["bottleneck_ms"] > order_b * (1 + 1e-9):
            lines.append(f"  the plan's cut has bottleneck {plan.predicted['bottleneck_ms']:.4f} ms: slower at its "
                         "slowest stage than this order's best cut, but a shorter predicted step")
        if pl.get("lower_bound_ms") is not None:
            lines.append(f"  lower bound on any order's bottleneck: {pl['lower_bound_ms']:.4f} ms")
    if plan.baselines:
        lines += ["", "baselines (same cost model, devices and schedule):"]
        rows = [("plan", "stage sizes (units)", "bottleneck ms", "step ms", "vs fxpipe", "fits")]
        rows.append(("fxpipe", " ".join(str(b - a) for a, b in (st.units for st in plan.stages)),
                     f"{plan.predicted['bottleneck_ms']:.4f}", f"{tl.step_time * 1e3:.3f}", "1.00x", "yes"))
        for name, b in plan.baselines.items():
            bounds = b.get("bounds") or []
            step_s = None
            if bounds and len(bounds) == plan.num_stages:
                try:
                    step_s = fxpipe.simulate(plan.with_(stages=baseline_stages(plan, bounds, b.get("recompute"),
                                                                               b.get("offload")))).step_time
                except Exception:  # a baseline we cannot simulate still has its bottleneck
                    step_s = None
            # steps are what the plan minimises; the bottleneck ratio only where no step is known
            ratio = (step_s / max(tl.step_time, 1e-15) if step_s is not None
                     else b["bottleneck_ms"] / max(plan.predicted["bottleneck_ms"], 1e-12))
            rows.append((name, " ".join(str(y - x) for x, y in bounds) or "-", f"{b['bottleneck_ms']:.4f}",
                         "-" if step_s is None else f"{step_s * 1e3:.3f}", f"{ratio:.2f}x", "yes" if b["fits"] else "NO"))
        lines += _table(rows, left=(0, 1))
    return "\n".join(lines)


def stage_table(plan: Plan, stages: Sequence[StagePlan], title: str) -> str:
    """A stage table (units, device, params, per-microbatch times, memory) for `stages`."""
    rows = [("stage", "device", "units", "first..last unit", "fwd ms", "bwd ms", "send ms", "memory GiB", "of GiB", "")]
    p = max(((st.fwd_ms + st.bwd_ms + st.send_ms * (2 if plan.train else 1)), st.index) for st in stages)[1]
    for st in stages:
        a, b = st.units
        names = plan.costs.unit_names[a:b]
        span = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
        span = span if len(span) <= 38 else span[:37] + "…"
        dev = plan.cluster.devices[st.device]
        fits = st.memory_bytes <= dev.memory
        rows.append((str(st.index), f"{st.device}:{dev.name}", f"{a}-{b - 1}", span, f"{st.fwd_ms:.3f}",
                     f"{st.bwd_ms:.3f}", f"{st.send_ms:.3f}", f"{st.memory_bytes / _GiB:.3f}", f"{dev.memory / _GiB:.1f}",
                     ("<- bottleneck" if st.index == p else "") + ("" if fits else " OVER MEMORY")))
    return "\n".join([title] + _table(rows, left=(1, 3)))


def compare_baseline(plan: Plan, name: str) -> str:
    """fxpipe's stage table next to the baseline `name`'s ("uniform" or "params"), with times."""
    import fxpipe
    from fxpipe.errors import PlanError

    if name not in plan.baselines or not plan.baselines[name].get("bounds"):
        have = ", ".join(sorted(plan.baselines)) or "none"
        raise PlanError(f"the plan has no baseline {name!r} (it has: {have})")
    b = plan.baselines[name]
    stages = baseline_stages(plan, b["bounds"], b.get("recompute"), b.get("offload"))
    step = fxpipe.simulate(plan.with_(stages=stages)).step_time * 1e3
    mine = plan.predicted
    return "\n".join([
        stage_table(plan, plan.stages, f"fxpipe: bottleneck {mine['bottleneck_ms']:.4f} ms/microbatch, "
                                       f"predicted step {mine['step_ms']:.3f} ms"),
        "",
        stage_table(plan, stages, f"baseline {name}: bottleneck {b['bottleneck_ms']:.4f} ms/microbatch, "
                                  f"predicted step {step:.3f} ms ({step / max(mine['step_ms'], 1e-12):.2f}x fxpipe's)"
                                  + ("" if b["fits"] else ", does NOT fit in memory")),
    ])
