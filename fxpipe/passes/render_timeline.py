"""A text Gantt chart of a simulated step: one row per device, time left to right.

Each column is a slice of the step. A column shows the instruction covering at least half
of it: forward of microbatch k as FWD_SYMBOLS[k] (0-9, then capital letters, skipping B and
F), backward of microbatch k as BWD_SYMBOLS[k] (a = mb 0, b = mb 1, ...). Symbols repeat
when m is larger than the alphabet. In zero-bubble schedules the input-gradient backward BI
uses the backward letters and the weight-gradient backward BW shows as WEIGHT_SYMBOL ('=';
its microbatch is in the Chrome trace and the PNG). When no single instruction covers half a column
(instructions shorter than a column), it shows 'F' (forwards), 'B' (backwards) or '*'
(both); '.' is idle (including waiting on a RECV).

Example:
    >>> from fxpipe.passes.emit_schedule import emit_schedule
    >>> from fxpipe.passes.simulate_schedule import simulate_schedule
    >>> tl = simulate_schedule(emit_schedule("1f1b", 2, 2), [1e-3] * 2, [2e-3] * 2, [0.0] * 2)
    >>> print(render_timeline(tl, width=40))  # doctest: +NORMALIZE_WHITESPACE
       0 ms                             9 ms
    d0 |00001111........aaaaaaa....bbbbbbbb|
    d1 |....0000aaaaaaaa111bbbbbbbb........|
    legend: 0-9,A-Z (no B,F) = forward of mb
    0,1,..; a-z = backward of mb 0,1,..;
    F/B/* = several fwd/bwd/both in one
    column; . = idle; symbols repeat past z
    step 9 ms; bubble: d0 33.3%, d1 33.3%
"""

from __future__ import annotations

import textwrap
from typing import Sequence

from fxpipe.errors import ScheduleError
from fxpipe.passes.emit_schedule import Op
from fxpipe.passes.simulate_schedule import Timeline

__all__ = ["render_timeline", "device_labels", "FWD_SYMBOLS", "BWD_SYMBOLS", "WEIGHT_SYMBOL"]

# B and F are left out of the forward alphabet because they mark crowded columns.
FWD_SYMBOLS = "0123456789ACDEGHIJKLMNOPQRSTUVWXYZ"
BWD_SYMBOLS = "abcdefghijklmnopqrstuvwxyz"
WEIGHT_SYMBOL = "="
_BACKWARDS = (Op.BWD, Op.BWD_INPUT, Op.BWD_WEIGHT)

_MIN_CELLS = 8


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.4g} ms" if ms < 1e4 else f"{ms:.0f} ms"


def device_labels(tl: Timeline, device_names: Sequence[str] | None) -> list[str]:
    """One label per device: the given names, or "d0", "d1", ...; ScheduleError on a wrong count."""
    if device_names is None:
        return [f"d{d}" for d in range(tl.num_devices)]
    names = [str(n) for n in device_names]
    if len(names) != tl.num_devices:
        raise ScheduleError(f"device_names has {len(names)} entries for {tl.num_devices} devices; "
                            "give one name per device")
    return names


def render_timeline(tl: Timeline, width: int = 100, device_names: Sequence[str] | None = None) -> str:
    """Render `tl` as text; every line is at most `width` characters.

    Args:
        tl: a simulated timeline.
        width: total columns per line, labels included.
        device_names: one label per device (default "d0", "d1", ...).
    """
    D = tl.num_devices
    names = device_labels(tl, device_names)
    if not isinstance(width, int) or width < _MIN_CELLS + 6:
        raise ScheduleError(f"width must be an int >= {_MIN_CELLS + 6} to draw a timeline, got {width!r}")
    # Long names are cut so the chart keeps at least half the width.
    label_w = min(max((len(n) for n in names), default=1), max(1, width // 2 - 3))
    cells = width - label_w - 3  # "<label> |" + cells + "|"
    step = tl.step_time
    dt = step / cells if step > 0 else 0.0

    # Per device and column: overlap of forwards, of backwards, and the biggest single one.
    fwd = [[0.0] * cells for _ in range(D)]
    bwd = [[0.0] * cells for _ in range(D)]
    best: list[list[tuple[float, str]]] = [[(0.0, ".")] * cells for _ in range(D)]
    split = any(e.instr.op is Op.BWD_INPUT or e.instr.op is Op.BWD_WEIGHT for e in tl.events)
    if dt > 0:
        for e in tl.events:
            op = e.instr.op
            if op is not Op.FWD and op not in _BACKWARDS or e.end <= e.start:
                continue
            if op is Op.FWD:
                glyph = FWD_SYMBOLS[e.instr.mb % len(FWD_SYMBOLS)]
            elif op is Op.BWD_WEIGHT:
                glyph = WEIGHT_SYMBOL
            else:
                glyph = BWD_SYMBOLS[e.instr.mb % len(BWD_SYMBOLS)]
            acc = fwd if op is Op.FWD else bwd
            first = max(0, int(e.start / dt))
            last = min(cells - 1, int(e.end / dt))
            for c in range(first, last + 1):
                ov = min(e.end, (c + 1) * dt) - max(e.start, c * dt)
                if ov <= 1e-9 * dt:  # float dust at column edges is not a second event
                    continue
                acc[e.device][c] += ov
                if ov > best[e.device][c][0]:
                    best[e.device][c] = (ov, glyph)

    lines = [_axis(step, label_w, cells)]
    half = 0.5 * dt * (1 - 1e-9)  # tolerate rounding when an instruction fills exactly half
    for d in range(D):
        row = []
        for c in range(cells):
            f, b = fwd[d][c], bwd[d][c]
            if dt <= 0 or f + b < half:
                row.append(".")
            elif best[d][c][0] >= half:
                row.append(best[d][c][1])
            elif f > 0 and b > 0:
                row.append("*")
            else:
                row.append("F" if f > 0 else "B")
        lines.append(f"{names[d][:label_w]:<{label_w}} |{''.join(row)}|")

    legend = (
        "legend: 0-9,A-Z (no B,F) = forward of mb 0,1,..; a-z = backward of mb 0,1,..; "
        "F/B/* = several fwd/bwd/both in one column; . = idle; symbols repeat past z"
    )
    if split:
        legend += f"; BI (input gradient) uses a-z, {WEIGHT_SYMBOL} = BW (weight gradient)"
    footer = f"step {_fmt_ms(step)}; bubble: " + ", ".join(
        f"{names[d]} {100 * tl.bubble_fraction[d]:.1f}%" for d in range(D)
    )
    for text in (legend, footer):
        lines += textwrap.wrap(text, width=width, break_long_words=True, break_on_hyphens=False)
    return "\n".join(lines)


def _axis(step: float, label_w: int, cells: int) -> str:
    """'0 ms' under the first column and the step time ending at the last one."""
    left, right = "0 ms", _fmt_ms(step)
    span = cells + 2  # the two '|' around the cells
    gap = span - len(left) - len(right)
    if gap < 1:
        return (" " * (label_w + 1) + right)[: label_w + 1 + span]
    return " " * (label_w + 1) + left + " " * gap + right
