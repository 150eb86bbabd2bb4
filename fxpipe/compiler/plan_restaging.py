"""A loaded plan's per-stage numbers and prediction recomputed from its own cost table.

`Plan.from_dict` passes every plan through `restaged`: when a file's stage cuts were edited
by hand (or written by another fxpipe version) its stored times, memory and predicted step
no longer describe them. Kept apart from plan.py because it is planning, not the plan's
form: it prices the stages with the planner's own functions (compiler/stage_pricing).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fxpipe.errors import PlanError

if TYPE_CHECKING:
    from fxpipe.compiler.plan import Plan, StagePlan

__all__ = ["restaged"]

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
    from fxpipe.compiler.stage_pricing import (_problem, _simulate, _splits_backward, _stage_plans, plan_costs,
                                               timeline_figures)
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
    predicted = {**plan.predicted, **timeline_figures(tl, part, fresh), "restaged": changed}
    return replace(plan, stages=tuple(fresh), predicted=predicted)

