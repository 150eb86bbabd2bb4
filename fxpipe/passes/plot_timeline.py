"""A PNG Gantt chart of a simulated step: one row per device, time left to right.

Compute boxes are coloured by kind (F blue, B orange, BI red, BW green); each box shows its
microbatch number when it is wide enough. Several stages on one device (interleaved
schedules) are told apart by shade: the device's first stage in full colour, later ones
lighter. Transfers (SENDs) are thin grey bars along the bottom of the sender's row. When
the timeline was simulated with ``activation_bytes``, a second panel plots each device's
activation memory over time.

matplotlib is imported only when a chart is drawn, and the figure is rendered with the Agg
canvas directly, so the caller's pyplot backend is left alone.

Example (not run here; it writes a file):
    tl = simulate_schedule(emit_schedule("zb-h1", 4, 8), [1.0] * 4, [2.0] * 4, [0.0] * 4,
                           activation_bytes=[2**20] * 4)
    plot_timeline(tl, "zb-h1.png", title="ZB-H1, p=4, m=8")
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from fxpipe.errors import ScheduleError
from fxpipe.passes.emit_schedule import Op
from fxpipe.passes.render_timeline import device_labels
from fxpipe.passes.simulate_schedule import Timeline

__all__ = ["plot_timeline", "OP_COLORS"]

#: Box colour per compute op.
OP_COLORS: dict[Op, str] = {
    Op.FWD: "#4C72B0",
    Op.BWD: "#DD8452",
    Op.BWD_INPUT: "#C44E52",
    Op.BWD_WEIGHT: "#55A868",
}
_OP_LABEL = {Op.FWD: "F forward", Op.BWD: "B backward", Op.BWD_INPUT: "BI input grad", Op.BWD_WEIGHT: "BW weight grad"}
_COMM_COLOR = "#8C8C8C"
_WIDTH_IN = 13.0
_DPI = 110


def _import_matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise ScheduleError(
            "plot_timeline needs matplotlib, which is not installed; run `pip install matplotlib` "
            "(or use render_timeline for a text chart, or Timeline.to_chrome_trace for Perfetto)"
        ) from None
    return Figure, FigureCanvasAgg, Patch


def _lighten(color: str, amount: float) -> tuple[float, float, float]:
    r, g, b = (int(color[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return (r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount)


def _bytes_unit(peak: float) -> tuple[float, str]:
    for scale, name in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if peak >= scale:
            return scale, name
    return 1.0, "bytes"


def _time_unit(step: float) -> tuple[float, str]:
    if step >= 10.0:
        return 1.0, "s"
    if step >= 10e-3 or step == 0:
        return 1e3, "ms"
    return 1e6, "us"


def plot_timeline(
    tl: Timeline,
    path: str | Path,
    device_names: Sequence[str] | None = None,
    *,
    title: str | None = None,
) -> Path:
    """Write `tl` as a PNG Gantt chart to `path` (parent folders are created); returns the path.

    Args:
        tl: a simulated timeline (`simulate_schedule`).
        path: the PNG file to write.
        device_names: one label per device (default "d0", "d1", ...).
        title: text above the chart (default: step time and mean bubble).
    Raises ScheduleError when matplotlib is missing or device_names has the wrong length.
    """
    D = tl.num_devices
    names = device_labels(tl, device_names)
    Figure, FigureCanvasAgg, Patch = _import_matplotlib()

    step = tl.step_time
    scale, unit = _time_unit(step)
    x_end = step * scale if step > 0 else 1.0
    has_mem = tl.memory is not None
    gantt_h = 0.45 * D + 1.3
    mem_h = 2.6 if has_mem else 0.0
    fig = Figure(figsize=(_WIDTH_IN, gantt_h + mem_h), dpi=_DPI)
    FigureCanvasAgg(fig)
    if has_mem:
        ax, axm = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [gantt_h, mem_h]})
    else:
        ax, axm = fig.subplots(1, 1), None

    # Stages on each device, in order, for shading virtual stages.
    stages_on: dict[int, list[int]] = {}
    for e in tl.events:
        if e.instr.op in OP_COLORS:
            lst = stages_on.setdefault(e.device, [])
            if e.instr.stage not in lst:
                lst.append(e.instr.stage)
    for lst in stages_on.values():
        lst.sort()

    # Pixels per x unit, to decide which boxes can hold their label.
    ax_px = _WIDTH_IN * _DPI * 0.86
    px_per_x = ax_px / x_end
    char_px = 7.5 * _DPI / 72 * 0.62
    seen_ops: set[Op] = set()
    any_comm = False
    # Boxes are gathered per (row, colour) and drawn with one broken_barh each: one artist per
    # instruction made a 64-device, 32-microbatch plan take a minute to draw (same picture;
    # labels, drawn as text, sit above the boxes either way).
    boxes: dict[tuple[int, str], list[tuple[float, float]]] = {}
    comm: dict[int, list[tuple[float, float]]] = {}
    for e in tl.events:
        ins = e.instr
        row = D - 1 - e.device  # device 0 at the top
        x0, w = e.start * scale, (e.end - e.start) * scale
        if ins.op in OP_COLORS:
            if w <= 0:
                continue
            seen_ops.add(ins.op)
            shade = stages_on[e.device].index(ins.stage)
            n_shades = len(stages_on[e.device])
            color = _lighten(OP_COLORS[ins.op], 0.5 * shade / max(1, n_shades - 1)) if n_shades > 1 else OP_COLORS[ins.op]
            boxes.setdefault((row, color), []).append((x0, w))
            label = str(ins.mb)
            if w * px_per_x >= char_px * len(label) + 3:
                ax.text(x0 + w / 2, row, label, ha="center", va="center", fontsize=7.5,
                        color="white" if shade == 0 or n_shades == 1 else "black", clip_on=True)
        elif ins.op in (Op.SEND_ACT, Op.SEND_GRAD) and w > 0:
            any_comm = True
            comm.setdefault(row, []).append((x0, w))
    for (row, color), xr in boxes.items():
        ax.broken_barh(xr, (row - 0.36, 0.72), facecolors=color, edgecolors="white", linewidth=0.4)
    for row, xr in comm.items():
        ax.broken_barh(xr, (row - 0.47, 0.08), facecolors=_COMM_COLOR, edgecolors="none")
    ax.set_yticks(range(D))
    ax.set_yticklabels(list(reversed(names)))
    ax.set_ylim(-0.6, D - 0.4)
    ax.set_xlim(0, x_end)
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    handles = [Patch(facecolor=OP_COLORS[op], label=_OP_LABEL[op]) for op in OP_COLORS if op in seen_ops]
    if any_comm:
        handles.append(Patch(facecolor=_COMM_COLOR, label="transfer"))
    if any(len(v) > 1 for v in stages_on.values()):
        handles.append(Patch(facecolor=_lighten("#606060", 0.5), label="lighter = later stage on device"))
    if handles:
        ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(handles),
                  frameon=False, fontsize=8)
    mean_bubble = sum(tl.bubble_fraction) / D if D else 0.0
    head = title if title is not None else f"step {step * scale:.4g} {unit}, mean bubble {100 * mean_bubble:.1f}%"
    ax.set_title(head, fontsize=10, pad=22 if handles else 6)
    if axm is None:
        ax.set_xlabel(f"time ({unit})")
    else:
        peak = max(tl.peak_memory or (0.0,))
        bscale, bunit = _bytes_unit(peak)
        for d, steps in enumerate(tl.memory):
            xs = [t * scale for t, _ in steps] + [x_end]
            ys = [b / bscale for _, b in steps]
            ys.append(ys[-1])
            axm.step(xs, ys, where="post", label=names[d], linewidth=1.2)
        axm.set_ylabel(f"activations ({bunit})")
        axm.set_xlabel(f"time ({unit})")
        axm.set_ylim(bottom=0)
        axm.grid(color="#dddddd", linewidth=0.6)
        axm.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), fontsize=7, ncol=min(D, 12), frameon=False,
                   borderaxespad=0.2)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
