"""The text the commands print or write about a plan.

The predicted timeline (`timeline_text`), each device's generated program, planning times
per phase, the hint when too few microbatches leave the pipeline idle, and `profile`'s
measured-vs-modelled table; `_write` puts text in a file with a CliError on failure.
Shared by the plan, inspect and demo commands, so kept out of each.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fxpipe.cli_inputs import CliError

if TYPE_CHECKING:
    from fxpipe.compiler.plan import Plan
    from fxpipe.passes.simulate_schedule import Timeline

__all__ = ["timeline_text"]


def timeline_text(plan: "Plan", width: int = 100) -> str:
    """The plan's schedule simulated with its predicted stage times, as a text Gantt chart."""
    from fxpipe.passes.render_timeline import render_timeline

    tl = _simulate(plan)
    names = [f"d{i} {d.name}" for i, d in enumerate(plan.cluster.devices)]
    kind = "training step" if plan.schedule.train else "inference pass"
    return f"predicted timeline of one {kind} ({plan.schedule.kind}):\n" + render_timeline(tl, width, names)


def _simulate(plan: "Plan") -> "Timeline":
    """The plan's schedule played against its cost model (fxpipe.simulate)."""
    import fxpipe

    return fxpipe.simulate(plan)


def _code_text(plan: "Plan") -> str:
    from fxpipe.runtime.program import device_source

    names = [d.name for d in plan.cluster.devices]
    return "\n".join(device_source(plan.schedule, d, names) for d in range(len(names)))


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror or e}") from None


def _timings_table(timings: dict[str, float]) -> str:
    """`plan`'s per-phase wall times as a table, in the order the phases ran."""
    total = sum(timings.values())
    label = {"costs": "units+costs", "partition": "partition+placement"}
    lines = [f"planning time: {total:.2f}s", f"  {'phase':<20} {'seconds':>8} {'share':>6}"]
    for k, v in timings.items():
        lines.append(f"  {label.get(k, k):<20} {v:>8.2f} {v / total if total > 0 else 0.0:>6.0%}")
    return "\n".join(lines)


def _fill_hint(plan: "Plan", asked: int | str) -> str:
    """A hint when too few microbatches leave the pipeline mostly idle (the default 4 on 16 GPUs:
    79% bubble), which the stage table alone does not tell a new user how to fix."""
    bubble, p, m = plan.predicted.get("bubble", 0.0), len(plan.cluster.devices), plan.microbatches
    if asked == "auto" or bubble < 0.5 or m >= p:
        return ""
    more = (f"--microbatches auto (the fastest that fits, up to the batch of {plan.batch_size}) or a larger batch"
            if plan.batch_size > m else "a larger batch, then more microbatches")
    return (f"hint: the devices are idle {bubble:.0%} of the step: {m} microbatch{'es' if m != 1 else ''} do{'es' if m == 1 else ''} not fill a pipeline of "
            f"{p} devices; try {more}")


def _profile_table(plan: "Plan") -> str:
    """Measured vs. modelled (roofline) forward and backward time per unit, per device kind."""
    from fxpipe.passes.annotate_costs import CostTable, device_key

    roofline = CostTable.from_dict(plan.costs.to_dict())  # the plan's table without measurements
    measured = plan.predicted.get("measured_costs") or {}
    kinds: dict[str, Any] = {}
    for d in plan.cluster.devices:
        kinds.setdefault(device_key(d), d)
    lines = []
    for key, dev in kinds.items():
        fwd, bwd = (measured.get("fwd_s") or {}).get(key), (measured.get("bwd_s") or {}).get(key)
        if fwd is None or bwd is None:
            continue
        lines.append(f"measured on {dev.name} ({key}), ms per microbatch; model = roofline estimate")
        lines.append(f"  {'unit':<36} {'fwd':>8} {'model':>8} {'bwd':>8} {'model':>8}")
        for u, name in enumerate(roofline.unit_names):
            lines.append(f"  {name[:36]:<36} {fwd[u] * 1e3:>8.3f} {roofline.fwd_time(u, dev) * 1e3:>8.3f} "
                         f"{bwd[u] * 1e3:>8.3f} {roofline.bwd_time(u, dev) * 1e3:>8.3f}")
        tf, tb = sum(fwd), sum(bwd)
        mf = sum(roofline.fwd_time(u, dev) for u in range(len(roofline.unit_names)))
        mb = sum(roofline.bwd_time(u, dev) for u in range(len(roofline.unit_names)))
        lines.append(f"  {'total':<36} {tf * 1e3:>8.3f} {mf * 1e3:>8.3f} {tb * 1e3:>8.3f} {mb * 1e3:>8.3f}"
                     f"   (measured / model: fwd {tf / mf if mf else float('nan'):.2f}x, "
                     f"bwd {tb / mb if mb else float('nan'):.2f}x)")
    return "\n".join(lines) if lines else "no measured costs in the plan"
